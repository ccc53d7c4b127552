"""Paired statistics for comparing two methods run on the same (class, seed) cells.

A bench trains every method on the same normal classes with the same seeds (same data order,
views and initial weights), so the honest comparison is paired: one difference per
(class, seed) that both methods ran. Classes are the units that vary most (a class is easy or
hard for every method), seeds vary within a class, so the uncertainty comes from a
hierarchical bootstrap: resample classes with replacement, then seeds within each chosen class.

The estimate is the mean over classes of each class's mean difference over its seeds (every
class weighs the same, as in the paper's "mean over classes"); with the same number of seeds
per class it equals the plain mean over all pairs, and the bootstrap resamples that same
statistic.
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["TIE_TOLERANCE", "RESAMPLES", "PairedResult", "compare", "compare_differences", "hierarchical_bootstrap",
           "wilcoxon_p", "wins_ties_losses", "per_class_summary", "mean_of_class_means"]

TIE_TOLERANCE = 1e-4
"""Differences with ``|d| < TIE_TOLERANCE`` are ties (AUROCs are recorded to 6 decimals; 1e-4
is 0.01 AUROC points, far below anything a reader would call a gain)."""
RESAMPLES = 10_000

Cell = tuple[Hashable, Hashable]  # (class, seed)


def _by_class(diffs: Mapping[Cell, float]) -> dict[Hashable, list[float]]:
    groups: dict[Hashable, list[float]] = defaultdict(list)
    for (cls, seed) in sorted(diffs, key=lambda k: (str(k[0]), str(k[1]))):
        groups[cls].append(float(diffs[(cls, seed)]))
    return dict(groups)


def mean_of_class_means(groups: Sequence[Sequence[float]]) -> float:
    """Mean over classes of each class's mean (the point estimate the bootstrap resamples)."""
    return float(np.mean([np.mean(g) for g in groups]))


def hierarchical_bootstrap(groups: Sequence[Sequence[float]], resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """Bootstrap distribution of the mean of class means: each resample draws as many classes
    as there are, with replacement, then for each drawn class as many of its values (seeds) as
    it has, with replacement. Vectorised over resamples (in blocks that bound memory)."""
    if not groups or any(len(g) == 0 for g in groups):
        raise ValueError("hierarchical_bootstrap needs at least one class and at least one value per class")
    sizes = np.array([len(g) for g in groups])
    n_cls, width = len(groups), int(sizes.max())
    values = np.zeros((n_cls, width))
    for i, g in enumerate(groups):
        values[i, :len(g)] = g
    rng = np.random.default_rng(seed)
    out = np.empty(resamples)
    block = max(1, 2_000_000 // (n_cls * width))
    slots = np.arange(width)
    for start in range(0, resamples, block):
        b = min(block, resamples - start)
        cls = rng.integers(0, n_cls, size=(b, n_cls))                 # the classes drawn
        n = sizes[cls]                                                 # their seed counts, (b, C)
        idx = (rng.random((b, n_cls, width)) * n[..., None]).astype(np.int64)  # seeds drawn within each class
        used = slots < n[..., None]                                    # a class with fewer seeds uses fewer slots
        picked = values[cls[..., None], idx]
        out[start:start + b] = ((picked * used).sum(-1) / n).mean(-1)
    return out


def wilcoxon_p(diffs: Sequence[float], tolerance: float = TIE_TOLERANCE) -> tuple[float | None, str]:
    """Two-sided Wilcoxon signed-rank p-value of paired differences (``scipy.stats.wilcoxon``,
    its default method). Differences within ``tolerance`` of zero count as zero and are
    dropped (scipy's ``"wilcox"`` rule). Returns ``(p, note)``: ``p`` is None when the test
    cannot be run, and the note says why; a note also warns when there are too few pairs for
    p to fall below 0.05 at all."""
    from scipy.stats import wilcoxon
    d = np.asarray(diffs, dtype=np.float64)
    d = np.where(np.abs(d) < tolerance, 0.0, d)
    nonzero = int(np.count_nonzero(d))
    if len(d) < 2:
        return None, f"{len(d)} pair: too few for a test"
    if nonzero == 0:
        return None, "every difference is a tie: nothing to test"
    p = float(wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue)
    note = ""
    if 2.0 / 2 ** nonzero >= 0.05:  # the smallest two-sided p of the exact test with this many non-zero pairs
        note = f"with {nonzero} non-tied pairs p cannot fall below {2.0 / 2 ** nonzero:.3g}"
    return p, note


def wins_ties_losses(diffs: Sequence[float], tolerance: float = TIE_TOLERANCE) -> tuple[int, int, int]:
    """Counts of differences above ``tolerance``, within it, and below ``-tolerance``."""
    d = np.asarray(diffs, dtype=np.float64)
    ties = int(np.sum(np.abs(d) < tolerance))
    wins = int(np.sum(d >= tolerance))
    return wins, ties, len(d) - wins - ties


def per_class_summary(values: Mapping[Cell, float]) -> dict[Hashable, tuple[float, float, int]]:
    """Per class: mean, sample standard deviation over seeds (``nan`` for one seed), seed count."""
    out = {}
    for cls, v in _by_class(values).items():
        out[cls] = (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else math.nan, len(v))
    return out


@dataclass(frozen=True)
class PairedResult:
    """A paired comparison of method A against method B (differences A - B).

    ``mean``: mean over classes of the per-class mean difference; ``ci_low``/``ci_high``: the
    percentile interval of the hierarchical bootstrap (None with fewer than 2 pairs);
    ``p_value``: Wilcoxon signed-rank (None with a ``p_note`` when it cannot be computed);
    ``wins``/``ties``/``losses``: pairs where A is ahead / within ``tolerance`` / behind;
    ``class_best``/``class_worst``: the largest and smallest per-class mean difference.
    """

    n_pairs: int
    n_classes: int
    mean: float
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    p_note: str
    wins: int
    ties: int
    losses: int
    class_best: float
    class_worst: float
    tolerance: float = TIE_TOLERANCE
    confidence: float = 0.95
    resamples: int = RESAMPLES

    @property
    def covers_zero(self) -> bool | None:
        """Whether the interval reaches zero, to within the tie tolerance (None without an interval)."""
        return None if self.ci_low is None else self.ci_low < self.tolerance and self.ci_high > -self.tolerance

    def verdict(self, null: str = "zero") -> str:
        """Where the interval lies: "not distinguishable from zero", "above zero" or "below zero"."""
        if self.ci_low is None:
            return "no interval (one pair)"
        if self.covers_zero:
            return f"not distinguishable from {null}"
        return f"above {null}" if self.mean > 0 else f"below {null}"

    def text(self, fmt: Callable[[float], str] = lambda x: f"{x:+.4f}", null: str = "zero") -> str:
        """One line: estimate, interval, verdict, Wilcoxon p and the counts. ``fmt`` renders a
        difference (e.g. AUROC points, or ``exp`` of a log-ratio as a factor); ``null`` names
        what zero difference means in those units."""
        ci = (f" [{self.confidence:.0%} CI {fmt(self.ci_low)} to {fmt(self.ci_high)}]" if self.ci_low is not None
              else " [no interval from one pair]")
        verdict = f", not distinguishable from {null}" if self.covers_zero else ""
        p = f"Wilcoxon p = {self.p_value:.3g}" if self.p_value is not None else "Wilcoxon p: none"
        note = f" ({self.p_note})" if self.p_note else ""
        return (f"{fmt(self.mean)}{ci}{verdict}; {p}{note}; {self.wins} wins, {self.ties} ties, {self.losses} losses "
                f"over {self.n_pairs} pairs ({self.n_classes} classes)")

    def to_dict(self) -> dict:
        return {**asdict(self), "covers_zero": self.covers_zero}


def compare_differences(diffs: Mapping[Cell, float], tolerance: float = TIE_TOLERANCE, resamples: int = RESAMPLES,
                        confidence: float = 0.95, seed: int = 0) -> PairedResult:
    """Statistics of paired differences keyed by ``(class, seed)``."""
    d = {k: float(v) for k, v in diffs.items() if math.isfinite(v)}
    if not d:
        raise ValueError("no finite paired differences to compare")
    groups = list(_by_class(d).values())
    values = [x for g in groups for x in g]
    low = high = None
    if len(values) >= 2:
        boot = hierarchical_bootstrap(groups, resamples, seed)
        alpha = (1.0 - confidence) / 2
        low, high = (float(x) for x in np.quantile(boot, [alpha, 1.0 - alpha]))
    p, note = wilcoxon_p(values, tolerance)
    wins, ties, losses = wins_ties_losses(values, tolerance)
    class_means = [float(np.mean(g)) for g in groups]
    return PairedResult(len(values), len(groups), mean_of_class_means(groups), low, high, p, note, wins, ties, losses,
                        max(class_means), min(class_means), tolerance, confidence, resamples)


def compare(a: Mapping[Cell, float], b: Mapping[Cell, float], **kwargs) -> PairedResult | None:
    """Paired comparison of A against B over the ``(class, seed)`` cells both have (finite
    values only); None when they share none. Keyword arguments go to ``compare_differences``."""
    diffs = {k: a[k] - b[k] for k in a.keys() & b.keys() if math.isfinite(a[k]) and math.isfinite(b[k])}
    return compare_differences(diffs, **kwargs) if diffs else None
