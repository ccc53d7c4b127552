"""Paired statistics for comparing two methods run on the same (class, seed) cells.

A bench trains every method on the same normal classes with the same seeds (same data order,
views and initial weights), so the comparison is paired: one difference per (class, seed) that
both methods ran. The unit is the class: seeds of one class share its data and are correlated,
so each class's differences are first averaged over its seeds and every test and interval runs
on those class means.

- Estimate: the mean over classes of the class means (every class weighs the same, as in the
  paper's "mean over classes").
- Test: the Wilcoxon signed-rank test on the class means (scipy; exact for these sizes).
- Intervals: a t-interval on the class means and a hierarchical percentile bootstrap (classes
  with replacement, then seeds within each drawn class). The bootstrap is narrower with few
  classes, so a difference counts as distinguishable from zero only when both intervals exclude
  it. With fewer than ``MIN_CLASSES`` classes there is no interval at all: the class values and
  their range are all the data can say.
- Convergence races (``race``): who first reaches a target AUROC, cell by cell, with cells where
  a method never got there kept as censored and a sign test over classes.
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["TIE_TOLERANCE", "RESAMPLES", "MIN_CLASSES", "PairedResult", "RaceResult", "compare",
           "compare_differences", "hierarchical_bootstrap", "t_interval", "wilcoxon_p", "sign_test_p",
           "wins_ties_losses", "per_class_summary", "class_means", "race"]

TIE_TOLERANCE = 1e-4
"""Differences with ``|d| < TIE_TOLERANCE`` are ties (AUROCs are recorded to 6 decimals; 1e-4
is 0.01 AUROC points, far below anything a reader would call a gain)."""
RESAMPLES = 10_000
MIN_CLASSES = 5
"""Fewer classes than this get no interval: a 95 % interval from 3 values is [min, max] for the
bootstrap and covers the mean about 75 % of the time."""

Cell = tuple[Hashable, Hashable]  # (class, seed)


def _by_class(values: Mapping[Cell, float]) -> dict[Hashable, list[float]]:
    groups: dict[Hashable, list[float]] = defaultdict(list)
    for (cls, seed) in sorted(values, key=lambda k: (str(k[0]), str(k[1]))):
        groups[cls].append(float(values[(cls, seed)]))
    return dict(groups)


def class_means(values: Mapping[Cell, float]) -> dict[Hashable, float]:
    """Each class's mean over its seeds."""
    return {cls: float(np.mean(v)) for cls, v in _by_class(values).items()}


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


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean of ``values`` (at least two)."""
    from scipy.stats import t
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        raise ValueError("a t-interval needs at least two values")
    half = float(t.ppf(0.5 + confidence / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return float(v.mean()) - half, float(v.mean()) + half


def _floor_note(nonzero: int) -> str:
    """A warning when ``nonzero`` units cannot give a two-sided exact p below 0.05 (2 / 2^n)."""
    floor = 2.0 / 2 ** nonzero
    return f"with {nonzero} non-tied classes p cannot fall below {floor:.3g}" if floor >= 0.05 else ""


def wilcoxon_p(diffs: Sequence[float], tolerance: float = TIE_TOLERANCE) -> tuple[float | None, str]:
    """Two-sided Wilcoxon signed-rank p-value of paired differences (``scipy.stats.wilcoxon``,
    its default method). Differences within ``tolerance`` of zero count as zero and are
    dropped (scipy's ``"wilcox"`` rule). Returns ``(p, note)``: ``p`` is None when the test
    cannot be run, and the note says why; a note also warns when there are too few values for
    p to fall below 0.05 at all."""
    from scipy.stats import wilcoxon
    d = np.asarray(diffs, dtype=np.float64)
    d = np.where(np.abs(d) < tolerance, 0.0, d)
    nonzero = int(np.count_nonzero(d))
    if len(d) < 2:
        return None, f"{len(d)} class: too few for a test"
    if nonzero == 0:
        return None, "every difference is a tie: nothing to test"
    return float(wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue), _floor_note(nonzero)


def sign_test_p(ahead: int, behind: int) -> tuple[float | None, str]:
    """Two-sided exact sign test (binomial, 1/2) of ``ahead`` against ``behind`` (ties left out)."""
    from scipy.stats import binomtest
    if ahead + behind == 0:
        return None, "no class ahead or behind: nothing to test"
    return float(binomtest(ahead, ahead + behind, 0.5).pvalue), _floor_note(ahead + behind)


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
    """A paired comparison of method A against method B (differences A - B), the class as the unit.

    ``mean``: mean of ``class_values`` (each class's mean difference over its seeds);
    ``ci_low``/``ci_high``: the hierarchical bootstrap's percentile interval and ``t_low``/``t_high``
    the t-interval on the class values (all None with fewer than ``MIN_CLASSES`` classes);
    ``p_value``: Wilcoxon signed-rank on the class values (None with a ``p_note`` when it cannot
    run); ``wins``/``ties``/``losses``: classes where A is ahead / within ``tolerance`` / behind;
    ``class_best``/``class_worst``: the largest and smallest class value.
    """

    n_pairs: int
    n_classes: int
    mean: float
    class_values: tuple[float, ...]
    ci_low: float | None
    ci_high: float | None
    t_low: float | None
    t_high: float | None
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
    def has_interval(self) -> bool:
        return self.ci_low is not None

    @property
    def interval(self) -> tuple[float, float] | None:
        """The union of the two intervals, the more cautious reading (None without intervals)."""
        if not self.has_interval:
            return None
        return min(self.ci_low, self.t_low), max(self.ci_high, self.t_high)

    @property
    def covers_zero(self) -> bool | None:
        """Whether either interval reaches zero, to within the tie tolerance (None without intervals)."""
        if not self.has_interval:
            return None
        low, high = self.interval
        return low < self.tolerance and high > -self.tolerance

    def verdict(self, null: str = "zero") -> str:
        """"above zero" or "below zero" when both intervals exclude zero, else "not
        distinguishable from zero"; with too few classes, says so."""
        if not self.has_interval:
            return f"too few classes ({self.n_classes}) for an interval"
        if self.covers_zero:
            return f"not distinguishable from {null}"
        return f"above {null}" if self.mean > 0 else f"below {null}"

    def values_text(self, fmt: Callable[[float], str]) -> str:
        """The class values and their range (what a comparison over few classes can show)."""
        values = ", ".join(fmt(v) for v in sorted(self.class_values))
        return f"class values {values} (range {fmt(self.class_worst)} to {fmt(self.class_best)})"

    def text(self, fmt: Callable[[float], str] = lambda x: f"{x:+.4f}", null: str = "zero") -> str:
        """One line: estimate, both intervals (or the class values with too few classes), verdict,
        Wilcoxon p and the counts. ``fmt`` renders a difference (e.g. AUROC points, or ``exp`` of a
        log-ratio as a factor); ``null`` names what zero difference means in those units."""
        if self.has_interval:
            spread = (f" [{self.confidence:.0%} CI: bootstrap {fmt(self.ci_low)} to {fmt(self.ci_high)}, "
                      f"t {fmt(self.t_low)} to {fmt(self.t_high)}]")
        else:
            spread = f" [{self.values_text(fmt)}]"
        p = f"Wilcoxon p over classes = {self.p_value:.3g}" if self.p_value is not None else "Wilcoxon p: none"
        note = f" ({self.p_note})" if self.p_note else ""
        return (f"{fmt(self.mean)}{spread}, {self.verdict(null)}; {p}{note}; classes ahead / level / behind "
                f"{self.wins} / {self.ties} / {self.losses} ({self.n_pairs} pairs)")

    def to_dict(self) -> dict:
        return {**asdict(self), "class_values": list(self.class_values), "covers_zero": self.covers_zero,
                "verdict": self.verdict()}


def compare_differences(diffs: Mapping[Cell, float], tolerance: float = TIE_TOLERANCE, resamples: int = RESAMPLES,
                        confidence: float = 0.95, seed: int = 0) -> PairedResult:
    """Statistics of paired differences keyed by ``(class, seed)``, the class as the unit."""
    d = {k: float(v) for k, v in diffs.items() if math.isfinite(v)}
    if not d:
        raise ValueError("no finite paired differences to compare")
    groups = list(_by_class(d).values())
    means = [float(np.mean(g)) for g in groups]
    boot = t_int = (None, None)
    if len(groups) >= MIN_CLASSES:
        alpha = (1.0 - confidence) / 2
        boot = tuple(float(x) for x in np.quantile(hierarchical_bootstrap(groups, resamples, seed),
                                                   [alpha, 1.0 - alpha]))
        t_int = t_interval(means, confidence)
    p, note = wilcoxon_p(means, tolerance)
    wins, ties, losses = wins_ties_losses(means, tolerance)
    return PairedResult(len(d), len(groups), float(np.mean(means)), tuple(means), *boot, *t_int, p, note,
                        wins, ties, losses, max(means), min(means), tolerance, confidence, resamples)


def compare(a: Mapping[Cell, float], b: Mapping[Cell, float], **kwargs) -> PairedResult | None:
    """Paired comparison of A against B over the ``(class, seed)`` cells both have (finite
    values only); None when they share none. Keyword arguments go to ``compare_differences``."""
    diffs = {k: a[k] - b[k] for k in a.keys() & b.keys() if math.isfinite(a[k]) and math.isfinite(b[k])}
    return compare_differences(diffs, **kwargs) if diffs else None


@dataclass(frozen=True)
class RaceResult:
    """Who first reached a target, A or B, over (class, seed) cells (``race``).

    Cell counts: ``first`` (A reached it before B), ``second`` (B before A, including every cell
    where A never did), ``level``; ``censored``: cells where A never reached it. Class counts:
    the sign of each class's mean outcome over its seeds (+1 A first, -1 B first, 0 level), with
    the two-sided sign test over the classes that are not level."""

    n_cells: int
    n_classes: int
    first: int
    second: int
    level: int
    censored: int
    classes_first: int
    classes_second: int
    classes_level: int
    p_value: float | None
    p_note: str

    def text(self, a: str = "A", b: str = "B") -> str:
        p = f"sign test over classes p = {self.p_value:.3g}" if self.p_value is not None else "sign test: none"
        note = f" ({self.p_note})" if self.p_note else ""
        return (f"{a} first in {self.first} of {self.n_cells} cells, {b} first in {self.second} ({self.censored} "
                f"where {a} never got there), level {self.level}; classes {self.classes_first} / "
                f"{self.classes_level} / {self.classes_second}; {p}{note}")

    def to_dict(self) -> dict:
        return asdict(self)


def race(a_epochs: Mapping[Cell, float], b_epochs: Mapping[Cell, float]) -> RaceResult | None:
    """Compare the epochs A and B need to reach a target, cell by cell (``inf``: never reached,
    a censored cell, which counts as B first when B got there). None without a shared cell in
    which at least one of them reached the target."""
    outcome = {}
    for cell in a_epochs.keys() & b_epochs.keys():
        a, b = a_epochs[cell], b_epochs[cell]
        if math.isinf(a) and math.isinf(b):
            continue
        outcome[cell] = 0.0 if a == b else (1.0 if a < b else -1.0)
    if not outcome:
        return None
    cells = list(outcome.values())
    per_class = list(class_means(outcome).values())
    first, level, second = wins_ties_losses(cells, 0.5)
    ahead, tied, behind = wins_ties_losses(per_class, 1e-9)
    p, note = sign_test_p(ahead, behind)
    censored = sum(1 for c in outcome if math.isinf(a_epochs[c]))
    return RaceResult(len(cells), len(per_class), first, second, level, censored, ahead, behind, tied, p, note)
