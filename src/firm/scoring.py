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

import contextlib
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .config import EvalConfig
from .features import FeatureSet
from .registry import Registry

__all__ = ["Scorer", "ScorerEntry", "SCORERS", "ALL", "build_scorer", "scorer_names", "fit_scorers", "apply_scorers", "score",
           "knn_similarity", "knn_search", "knn_backend", "knn_measurements", "KNN_BACKENDS"]

_CHUNK = 4096
# kNN in tiles of queries x bank rows. A tile of similarities (4 Mi floats, 16 MiB per thread)
# stays in the last-level cache between the matmul that writes it and the reductions that read
# it, and is wide enough that the per-row work of the top-k (a few small ops) is cheap beside it.
_TILE = 1 << 22
_TILE_BANK = 8192
_GROUP = 64  # bank rows per group in the top-k: one max per group, then top-k of the best groups
_FAISS_BLOCKS = (1024, 16384)  # queries x bank rows per BLAS call when faiss runs the search
# Calls smaller than this (queries x bank rows x dim) use torch without measuring the others;
# larger ones measure every backend once per process on a slice of their own data.
_MEASURE_ABOVE = 1 << 35
_SLICE = (1024, 8192)  # queries x bank rows of that slice


def _torch_matmul(queries: Tensor, bank_rows: Tensor, out: Tensor) -> None:
    torch.mm(queries, bank_rows.T, out=out)


def _numpy_matmul(queries: Tensor, bank_rows: Tensor, out: Tensor) -> None:
    np.matmul(queries.numpy(), bank_rows.numpy().T, out=out.numpy())


Matmul = Callable[[Tensor, Tensor, Tensor], None]


def _knn_block(bank: Tensor, queries: Tensor, k: int, width: int, matmul: Matmul) -> tuple[Tensor, Tensor]:
    """Exact top-``k`` of a block of queries against the bank, ``width`` bank rows at a time: per
    tile, the matmul (``matmul(queries, bank_rows, out)``), then the maximum of each group of
    ``_GROUP`` consecutive bank rows, the ``k`` groups with the largest maxima, and the top ``k``
    of those groups' similarities, merged with the best so far. The ``k`` largest similarities of
    a row always lie in its ``k`` groups of largest maxima (a group holding one of them has a
    maximum at least that large, and at most ``k - 1`` other groups can beat it), so the result
    is exact, ties included."""
    n, n_bank = len(queries), len(bank)
    buffer = queries.new_empty(n * width)
    best_sims = best_index = None
    for b0 in range(0, n_bank, width):
        w = min(width, n_bank - b0)
        padded = -(-w // _GROUP) * _GROUP
        tile = buffer[: n * padded].view(n, padded)
        matmul(queries, bank[b0:b0 + w], tile[:, :w])
        groups = padded // _GROUP
        if groups < 4 * k:  # too few groups to save work: top-k of the whole tile
            v, j = tile[:, :w].topk(min(k, w), dim=1)
        else:
            tile[:, w:] = float("-inf")
            grouped = tile.view(n, groups, _GROUP)
            top_groups = grouped.amax(2).topk(k, dim=1, sorted=False).indices
            candidates = grouped[torch.arange(n, device=queries.device)[:, None], top_groups].view(n, k * _GROUP)
            v, j = candidates.topk(k, dim=1)
            j = top_groups.gather(1, j // _GROUP) * _GROUP + j % _GROUP
        j += b0
        if best_sims is not None:
            v, pick = torch.cat([best_sims, v], 1).topk(k, dim=1)
            j = torch.cat([best_index, j], 1).gather(1, pick)
        best_sims, best_index = v, j
    return best_sims, best_index


def _knn_tiled(bank: Tensor, queries: Tensor, k: int, matmul: Matmul, blas: bool) -> tuple[Tensor, Tensor]:
    """Exact top-``k`` in blocks of queries (:func:`_knn_block`), the reductions in torch and the
    matmuls by ``matmul``. On a CPU with several torch threads, each block runs whole on one
    thread and the threads take blocks in turn: torch's own threading would split every small
    reduction across threads, which then wait for each other at each one (slow on a busy
    machine). For the duration of the call torch is set to one thread per block, and with
    ``blas`` (``matmul`` calls a BLAS library torch does not manage) that library to as many
    threads as torch would use; both settings are restored afterwards."""
    width = min(_TILE_BANK, -(-len(bank) // _GROUP) * _GROUP)
    threads = torch.get_num_threads() if queries.device.type == "cpu" else 1
    rows = max(1, min(_TILE // width, -(-len(queries) // threads)))
    starts = range(0, len(queries), rows)
    parallel = threads > 1 and len(starts) > 1
    sims = queries.new_empty(len(queries), k)
    index = torch.empty(len(queries), k, dtype=torch.long, device=queries.device)

    def block(start: int) -> None:
        sims[start:start + rows], index[start:start + rows] = _knn_block(bank, queries[start:start + rows], k, width,
                                                                         matmul)

    with contextlib.ExitStack() as stack:
        if blas:
            from threadpoolctl import threadpool_limits
            stack.enter_context(threadpool_limits(1 if parallel else threads, user_api="blas"))
        if not parallel:
            for start in starts:
                block(start)
            return sims, index
        torch.set_num_threads(1)
        stack.callback(torch.set_num_threads, threads)
        with ThreadPoolExecutor(min(threads, len(starts))) as pool:
            list(pool.map(block, starts))
    return sims, index


def _knn_torch(bank: Tensor, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Exact top-``k`` in tiles, the matmuls by torch's BLAS (any device)."""
    return _knn_tiled(bank, queries, k, _torch_matmul, blas=False)


def _knn_numpy(bank: Tensor, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Exact top-``k`` in tiles, the matmuls by numpy's BLAS (CPU, another library than torch's)."""
    return _knn_tiled(bank, queries, k, _numpy_matmul, blas=True)


def _knn_faiss(bank: Tensor, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Exact top-``k`` through ``faiss.knn`` (batched BLAS plus a heap), searching the bank in place."""
    import faiss
    # faiss's default blocks (4096 queries x 1024 bank rows) mean one BLAS call and one threaded
    # heap pass per block; larger blocks mean fewer thread hand-offs on a busy machine.
    cvar = faiss.cvar
    saved = cvar.distance_compute_blas_query_bs, cvar.distance_compute_blas_database_bs
    cvar.distance_compute_blas_query_bs, cvar.distance_compute_blas_database_bs = _FAISS_BLOCKS
    try:
        sims, index = faiss.knn(np.ascontiguousarray(queries.numpy(), dtype=np.float32),
                                np.ascontiguousarray(bank.numpy(), dtype=np.float32), k, faiss.METRIC_INNER_PRODUCT)
    finally:
        cvar.distance_compute_blas_query_bs, cvar.distance_compute_blas_database_bs = saved
    return torch.from_numpy(sims), torch.from_numpy(index)


def _faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


KNN_BACKENDS: Registry[Callable[[Tensor, Tensor, int], tuple[Tensor, Tensor]]] = Registry("kNN backend",
                                                                                       {"torch": _knn_torch,
                                                                                        "numpy": _knn_numpy})
"""The exact top-k implementations :func:`knn_search` chooses from: the same tiled search with
torch's or numpy's BLAS (often different libraries), and faiss when installed."""
if _faiss_available():
    KNN_BACKENDS.register("faiss", _knn_faiss)

_measured: dict[str, float] = {}


def knn_measurements() -> dict[str, float]:
    """Seconds each backend took on this process's measuring slice (empty until a call was large
    enough to measure)."""
    return dict(_measured)


def _measure(bank: Tensor, queries: Tensor, k: int, repeats: int = 3) -> None:
    """Time every backend on a slice of the call's own data, taking turns, keeping each one's best."""
    bank, queries = bank[: _SLICE[1]].contiguous(), queries[: _SLICE[0]].contiguous()
    times: dict[str, float] = {name: float("inf") for name in KNN_BACKENDS}
    for _ in range(repeats):
        for name, search in KNN_BACKENDS.items():
            start = time.perf_counter()
            search(bank, queries, k)
            times[name] = min(times[name], time.perf_counter() - start)
    _measured.update(times)


def knn_backend(bank: Tensor, queries: Tensor, k: int) -> str:
    """The backend :func:`knn_search` uses for these inputs: torch for small searches and for other
    devices and dtypes than float32 on the CPU; otherwise the one that was fastest on the slice
    measured in this process (at its first such call). Every backend is exact, so the choice
    changes the time only."""
    if (queries.device.type != "cpu" or queries.dtype != torch.float32 or len(KNN_BACKENDS) == 1
            or len(queries) * len(bank) * queries.shape[1] < _MEASURE_ABOVE):
        return "torch"
    if not _measured:
        _measure(bank, queries, k)
    return min(_measured, key=_measured.__getitem__)


def knn_search(bank: Tensor, queries: Tensor, k: int, backend: str | None = None) -> tuple[Tensor, Tensor]:
    """Exact top-``k`` inner products of each query ``(Q, D)`` with the bank ``(M, D)``: similarities
    ``(Q, k)`` in decreasing order and the bank rows they belong to (among tied rows, any).
    ``backend`` names one of :data:`KNN_BACKENDS`; by default :func:`knn_backend` picks."""
    k = min(k, len(bank))
    if k == 0 or len(queries) == 0:
        return queries.new_empty(len(queries), k), torch.empty(len(queries), k, dtype=torch.long, device=queries.device)
    search = KNN_BACKENDS.get(backend or knn_backend(bank, queries, k))
    return search(bank.contiguous(), queries.contiguous(), k)


def knn_similarity(bank: Tensor, queries: Tensor, k: int) -> Tensor:
    """Top-``k`` inner products of each query with the bank, ``(Q, k)``, exact (:func:`knn_search`)."""
    return knn_search(bank, queries, k)[0]


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


ALL = "all"
"""The scorer name that stands for every registered scorer."""

SCORERS: Registry[ScorerEntry] = Registry("scorer", {
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
}, keywords={ALL: "every registered scorer"})


def scorer_names(names: Iterable[str]) -> list[str]:
    """Scorer names with :data:`ALL` expanded to every registered scorer, duplicates dropped and
    unknown names rejected."""
    out: list[str] = []
    for name in SCORERS.check(names):
        for n in SCORERS if name == ALL else [name]:
            if n not in out:
                out.append(n)
    return out


def build_scorer(name: str, config: EvalConfig | None = None) -> Scorer:
    """An unfitted scorer ``name`` with the settings of ``config`` (default ``EvalConfig()``)."""
    return SCORERS.get(name).build(config or EvalConfig())


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
