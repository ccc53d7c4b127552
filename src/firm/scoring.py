"""Scorers: anomaly scores from backbone features, higher meaning more anomalous.

Every scorer is fitted on the raw features of the normal training images (the *bank*) and
scores raw query features. Most work on L2-normalised features, as the paper does; the
``_norm`` variants also use the query's norm before normalisation and ``ocsvm_linear`` uses the
raw features. :data:`SCORERS` is the registry: name -> description and a builder that takes the
:class:`~firm.config.EvalConfig` (``ocsvm_nu`` reaches the one-class SVMs). :func:`score` applies
a scorer to a :class:`~firm.features.FeatureSet`, averaging over the rotations and views of a
test-time ensemble (rotation r of the queries against the bank at rotation r).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .config import EvalConfig
from .features import FeatureSet

__all__ = ["Scorer", "ScorerEntry", "SCORERS", "build_scorer", "scorer_names", "fit_scorers", "apply_scorers", "score",
           "knn_similarity"]

_CHUNK = 4096
_FAISS_BLOCKS = (1024, 16384)  # queries x bank rows per BLAS call in knn_similarity


def knn_similarity(bank: Tensor, queries: Tensor, k: int) -> Tensor:
    """Top-``k`` inner products of each query with the bank, ``(Q, k)``, exact, through faiss
    (batched BLAS plus a heap) when available, else torch in chunks."""
    k = min(k, len(bank))
    try:
        import faiss
    except ImportError:  # pragma: no cover - faiss is a dependency, but keep scoring usable without it
        return torch.cat([(q @ bank.T).topk(k, dim=1).values for q in queries.split(_CHUNK)])
    # faiss's default blocks (4096 queries x 1024 bank rows) mean one BLAS call and one threaded
    # heap pass per block: hundreds of thread hand-offs, which cost up to 1.6x the matmul itself
    # on a busy 2-core machine. 1024 x 16384 blocks (a 64 MiB buffer) stay at the matmul's speed.
    # faiss.knn also searches the bank in place instead of copying it into an index.
    cvar = faiss.cvar
    saved = cvar.distance_compute_blas_query_bs, cvar.distance_compute_blas_database_bs
    cvar.distance_compute_blas_query_bs, cvar.distance_compute_blas_database_bs = _FAISS_BLOCKS
    try:
        sims, _ = faiss.knn(np.ascontiguousarray(queries.numpy(), dtype=np.float32),
                            np.ascontiguousarray(bank.numpy(), dtype=np.float32), k, faiss.METRIC_INNER_PRODUCT)
    finally:
        cvar.distance_compute_blas_query_bs, cvar.distance_compute_blas_database_bs = saved
    return torch.from_numpy(sims)


class Scorer:
    """Base class: ``fit(bank)`` on raw training features, ``score(queries)`` -> anomaly scores."""

    name = "scorer"

    def fit(self, bank: Tensor) -> "Scorer":
        self.bank_ = F.normalize(bank.float(), dim=1)
        return self

    def score(self, queries: Tensor) -> Tensor:
        raise NotImplementedError


class CosineKNN(Scorer):
    """Minus the mean of the top-k cosine similarities to the bank (cos_k); ``use_norm``
    multiplies that similarity by the query's norm (cos_k_norm)."""

    def __init__(self, k: int = 1, use_norm: bool = False):
        self.k, self.use_norm = k, use_norm
        self.name = f"cos{k}" + ("_norm" if use_norm else "")

    def score(self, queries: Tensor) -> Tensor:
        sim = knn_similarity(self.bank_, F.normalize(queries.float(), dim=1), self.k).mean(1)
        if self.use_norm:
            sim = sim * queries.float().norm(dim=1)
        return -sim


def _spread(normalised: Tensor) -> float:
    """``var * d`` of normalised features: the scale that sets the kernel widths below."""
    return float(normalised.var()) * normalised.shape[1]


class KDE(Scorer):
    """Minus ``(1/gamma) * logsumexp(gamma * cos)`` over the bank, gamma = 20 / (var * d)."""

    name = "kde"

    def fit(self, bank: Tensor) -> "KDE":
        super().fit(bank)
        self.gamma_ = 20.0 / max(_spread(self.bank_), 1e-12)
        return self

    def score(self, queries: Tensor) -> Tensor:
        q = F.normalize(queries.float(), dim=1)
        lse = torch.cat([torch.logsumexp(self.gamma_ * (c @ self.bank_.T), dim=1) for c in q.split(_CHUNK)])
        return -lse / self.gamma_


class OneClassSVMScorer(Scorer):
    """One-class SVM: RBF kernel (gamma = 10 / (var * d)) on normalised features, or linear on
    raw features. The score is minus the SVM's decision function. ``nu`` defaults to
    scikit-learn's 0.5, which the authors kept."""

    def __init__(self, kernel: str = "rbf", nu: float = 0.5):
        self.kernel, self.nu = kernel, nu
        self.name = f"ocsvm_{kernel}"

    def _prepare(self, x: Tensor) -> np.ndarray:
        x = x.float() if self.kernel == "linear" else F.normalize(x.float(), dim=1)
        return x.double().numpy()

    def fit(self, bank: Tensor) -> "OneClassSVMScorer":
        from sklearn.svm import OneClassSVM
        x = self._prepare(bank)
        gamma = 10.0 / max(_spread(torch.from_numpy(x)), 1e-12) if self.kernel == "rbf" else "scale"
        self.svm_ = OneClassSVM(kernel=self.kernel, nu=self.nu, gamma=gamma).fit(x)
        return self

    def score(self, queries: Tensor) -> Tensor:
        return -torch.from_numpy(self.svm_.decision_function(self._prepare(queries))).float()


class Center(Scorer):
    """Minus the cosine similarity to the normalised mean of the normalised bank."""

    name = "center"

    def fit(self, bank: Tensor) -> "Center":
        super().fit(bank)
        self.center_ = F.normalize(self.bank_.mean(0), dim=0)
        return self

    def score(self, queries: Tensor) -> Tensor:
        return -(F.normalize(queries.float(), dim=1) @ self.center_)


class Mahalanobis(Scorer):
    """Squared Mahalanobis distance to the bank's mean under a Ledoit-Wolf shrunk covariance.

    A single Gaussian density (GDE) ranks exactly as this distance, so it also serves as GDE.
    """

    name = "mahalanobis"

    def fit(self, bank: Tensor) -> "Mahalanobis":
        from sklearn.covariance import LedoitWolf
        super().fit(bank)
        x = self.bank_.double()
        self.mean_ = x.mean(0)
        self.precision_ = torch.from_numpy(LedoitWolf(assume_centered=False).fit(x.numpy()).precision_)
        return self

    def score(self, queries: Tensor) -> Tensor:
        d = F.normalize(queries.double(), dim=1) - self.mean_
        return ((d @ self.precision_) * d).sum(1).float()


@dataclass(frozen=True)
class ScorerEntry:
    """One entry of :data:`SCORERS`: what the scorer computes and how to build it from the
    evaluation settings."""

    description: str
    build: Callable[[EvalConfig], Scorer]


SCORERS: dict[str, ScorerEntry] = {
    "cos1": ScorerEntry("cosine similarity to the nearest bank feature", lambda c: CosineKNN(1)),
    "cos5": ScorerEntry("mean cosine similarity to the 5 nearest bank features", lambda c: CosineKNN(5)),
    "cos1_norm": ScorerEntry("cos1 times the query's feature norm", lambda c: CosineKNN(1, use_norm=True)),
    "cos5_norm": ScorerEntry("cos5 times the query's feature norm", lambda c: CosineKNN(5, use_norm=True)),
    "kde": ScorerEntry("Gaussian-kernel density of cosine similarities (gamma = 20 / (var * d))", lambda c: KDE()),
    "ocsvm_rbf": ScorerEntry("RBF one-class SVM on normalised features (gamma = 10 / (var * d), nu = ocsvm_nu)",
                             lambda c: OneClassSVMScorer("rbf", nu=c.ocsvm_nu)),
    "ocsvm_linear": ScorerEntry("linear one-class SVM on raw features (nu = ocsvm_nu)",
                                lambda c: OneClassSVMScorer("linear", nu=c.ocsvm_nu)),
    "center": ScorerEntry("cosine similarity to the mean bank feature", lambda c: Center()),
    "mahalanobis": ScorerEntry("Mahalanobis distance, Ledoit-Wolf covariance (ranks as a Gaussian density)",
                               lambda c: Mahalanobis()),
}


def scorer_names(names: Iterable[str]) -> list[str]:
    """Scorer names with ``"all"`` expanded to every registered scorer, duplicates dropped and
    unknown names rejected."""
    out: list[str] = []
    for name in names:
        for n in SCORERS if name == "all" else [name]:
            if n not in SCORERS:
                raise ValueError(f"unknown scorer {n!r}; choose from all, {', '.join(SCORERS)}")
            if n not in out:
                out.append(n)
    return out


def build_scorer(name: str, config: EvalConfig | None = None) -> Scorer:
    """An unfitted scorer ``name`` with the settings of ``config`` (default ``EvalConfig()``)."""
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; choose from {', '.join(SCORERS)}")
    return SCORERS[name].build(config or EvalConfig())


def fit_scorers(name: str, bank: FeatureSet, config: EvalConfig | None = None) -> list[Scorer]:
    """Scorer ``name`` fitted on each rotation of the bank."""
    return [build_scorer(name, config).fit(bank.features[r, 0]) for r in range(bank.rotations)]


def apply_scorers(scorers: list[Scorer], queries: FeatureSet) -> Tensor:
    """Anomaly scores averaged over the ensemble: rotation r of the queries goes to scorer r."""
    if len(scorers) != queries.rotations:
        raise ValueError(f"bank has {len(scorers)} rotations but queries have {queries.rotations}: "
                         "extract both with the same test-time ensemble")
    total = torch.zeros(len(queries))
    for r, scorer in enumerate(scorers):
        for c in range(queries.features.shape[1]):
            total += scorer.score(queries.features[r, c])
    return total / (len(scorers) * queries.features.shape[1])


def score(name: str, bank: FeatureSet, queries: FeatureSet, config: EvalConfig | None = None) -> Tensor:
    """Anomaly scores of the queries under scorer ``name`` fitted on the bank."""
    return apply_scorers(fit_scorers(name, bank, config), queries)
