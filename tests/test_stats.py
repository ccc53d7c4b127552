"""firm.stats: paired comparisons over (class, seed) cells, the class as the unit, checked against
scipy and hand-made cases."""
import math
import statistics

import numpy as np
import pytest
from scipy.stats import binomtest, wilcoxon
from scipy.stats import t as student_t

from firm.stats import (MIN_CLASSES, TIE_TOLERANCE, compare, compare_differences, hierarchical_bootstrap,
                        per_class_summary, race, t_interval, wilcoxon_p, wins_ties_losses)


def synthetic(shift, rng, classes=10, seeds=5, class_sd=0.02, seed_sd=0.01):
    """Paired differences with a known mean: shift + a per-class effect + per-seed noise."""
    effect = rng.normal(0, class_sd, classes)
    return {(c, s): shift + effect[c] + rng.normal(0, seed_sd) for c in range(classes) for s in range(seeds)}


def test_interval_excludes_zero_for_a_large_shift_and_includes_it_for_none():
    big = compare_differences(synthetic(0.05, np.random.default_rng(0)))
    assert big.ci_low <= 0.05 <= big.ci_high
    assert big.ci_low > 0 and not big.covers_zero and big.verdict() == "above zero"
    assert "not distinguishable" not in big.text()
    null = compare_differences(synthetic(0.0, np.random.default_rng(1)))
    assert null.ci_low < 0 < null.ci_high and null.covers_zero
    assert "not distinguishable from zero" in null.text()
    assert null.resamples == 10_000 and null.n_pairs == 50 and null.n_classes == 10


def test_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(2)
    trials, hits = 200, 0
    for i in range(trials):
        r = compare_differences(synthetic(0.03, rng), resamples=2000, seed=i)
        hits += r.ci_low <= 0.03 <= r.ci_high
    # a percentile bootstrap over 10 classes covers a little under its nominal 95 %
    assert 0.85 <= hits / trials <= 0.99


def test_estimate_is_the_mean_over_classes_of_class_means():
    diffs = {(0, 0): 0.1, (0, 1): 0.3, (1, 0): -0.1, (1, 1): 0.0, (1, 2): 0.2}
    r = compare_differences(diffs)
    assert r.mean == pytest.approx((0.2 + 0.1 / 3) / 2)
    assert r.class_best == pytest.approx(0.2) and r.class_worst == pytest.approx(0.1 / 3)


def test_wilcoxon_runs_on_class_means_as_scipy_does():
    # three seeds per class; the test sees the six class means, never the 18 correlated cells
    rng = np.random.default_rng(3)
    a = {(c, s): 0.7 + rng.normal(0, 0.05) for c in range(6) for s in range(3)}
    b = {(c, s): v - 0.01 + rng.normal(0, 0.02) for (c, s), v in a.items()}
    class_diffs = [np.mean([a[c, s] - b[c, s] for s in range(3)]) for c in range(6)]
    r = compare(a, b)
    assert r.p_value == pytest.approx(wilcoxon(class_diffs).pvalue, rel=1e-12)
    assert r.n_pairs == 18 and r.n_classes == 6 and sorted(r.class_values) == pytest.approx(sorted(class_diffs))
    assert (r.wins, r.ties, r.losses) == wins_ties_losses(class_diffs)
    # fixed numbers: 7 positive and 3 negative class means, exact two-sided p from scipy
    fixed = [0.066, 0.05, 0.031, 0.024, 0.017, 0.012, 0.004, -0.009, -0.021, -0.028]
    cells = {(c, s): d + (0.01 if s == 0 else -0.01) for c, d in enumerate(fixed) for s in range(2)}
    assert compare_differences(cells).p_value == pytest.approx(wilcoxon(fixed).pvalue, rel=1e-12)
    # a difference within the tie tolerance counts as zero: scipy's "wilcox" rule drops it
    diffs = [0.03, -0.01, 0.02, 0.04, 0.5 * TIE_TOLERANCE, -0.02, 0.05, 0.01]
    p, _ = wilcoxon_p(diffs)
    assert p == pytest.approx(wilcoxon([d for d in diffs if abs(d) >= TIE_TOLERANCE]).pvalue, rel=1e-12)


def test_t_interval_matches_scipy_on_the_class_means():
    fixed = [0.066, 0.05, 0.031, 0.024, 0.017, 0.012, 0.004, -0.009, -0.021, -0.028]
    expected = student_t.interval(0.95, len(fixed) - 1, loc=np.mean(fixed),
                                  scale=np.std(fixed, ddof=1) / math.sqrt(len(fixed)))
    assert t_interval(fixed) == pytest.approx(expected, rel=1e-12)
    cells = {(c, s): d + 0.005 * (s - 1) for c, d in enumerate(fixed) for s in range(3)}  # seeds centred on d
    r = compare_differences(cells)
    assert (r.t_low, r.t_high) == pytest.approx(expected, rel=1e-9)
    assert r.interval == (min(r.ci_low, r.t_low), max(r.ci_high, r.t_high))


def test_verdict_follows_the_more_cautious_interval():
    # the bootstrap interval excludes zero, the t-interval does not: not distinguishable
    values = [0.03, 0.02, 0.04, -0.054, 0.05, 0.01, 0.03, 0.02, 0.02, 0.03]
    r = compare_differences({(c, 0): v for c, v in enumerate(values)})
    assert r.ci_low > TIE_TOLERANCE and r.t_low < 0
    assert r.covers_zero and r.verdict() == "not distinguishable from zero"
    assert "not distinguishable from zero" in r.text()


def test_fewer_than_five_classes_give_values_and_range_never_an_interval():
    cells = {(0, 0): 0.0026, (1, 0): 0.0183, (2, 0): 0.0236}
    r = compare_differences(cells)
    assert MIN_CLASSES == 5 and r.n_classes == 3
    assert None in (r.ci_low, r.ci_high, r.t_low, r.t_high) and r.interval is None and r.covers_zero is None
    assert r.verdict() == "too few classes (3) for an interval"
    line = r.text(lambda x: f"{100 * x:+.2f}")
    assert "CI" not in line and "class values +0.26, +1.83, +2.36 (range +0.26 to +2.36)" in line
    # three positive classes: the exact two-sided Wilcoxon p is 2 / 2**3 = 0.25, and the note says it is a floor
    assert r.p_value == pytest.approx(0.25) and "cannot fall below 0.25" in r.p_note
    five = compare_differences({(c, 0): 0.01 * (c + 1) for c in range(5)})
    assert five.has_interval and five.verdict() == "above zero" and "95% CI" in five.text()


def test_race_keeps_censored_cells_and_tests_the_sign_over_classes():
    inf = math.inf
    a = {(0, 0): 2.0, (0, 1): 3.0, (1, 0): inf, (1, 1): 1.0, (2, 0): 4.0, (3, 0): inf, (4, 0): inf, (5, 0): 5.0}
    b = {(0, 0): 8.0, (0, 1): 8.0, (1, 0): 6.0, (1, 1): 6.0, (2, 0): 4.0, (3, 0): 2.0, (4, 0): inf, (5, 0): 9.0}
    r = race(a, b)
    # cell (4, 0): neither got there, left out; (1, 0) and (3, 0): censored, B first
    assert (r.n_cells, r.first, r.second, r.level, r.censored) == (7, 4, 2, 1, 2)
    # classes: 0 (A, A) first; 1 (B, A) level; 2 level; 3 B; 5 A
    assert (r.n_classes, r.classes_first, r.classes_second, r.classes_level) == (5, 2, 1, 2)
    assert r.p_value == pytest.approx(binomtest(2, 3, 0.5).pvalue)
    assert "2 where A never got there" in r.text()
    assert race({(0, 0): inf}, {(0, 0): inf}) is None


def test_wilcoxon_reports_why_it_cannot_run():
    p, note = wilcoxon_p([0.0, 0.0, 0.5 * TIE_TOLERANCE])
    assert p is None and "tie" in note
    p, note = wilcoxon_p([0.1])
    assert p is None and "too few" in note
    # 4 non-tied pairs, all positive: the exact two-sided p is 2 / 2**4, and 0.05 is out of reach
    p, note = wilcoxon_p([0.01, 0.02, 0.03, 0.04])
    assert p == pytest.approx(0.125) and "cannot fall below" in note
    all_ties = compare_differences({(c, 0): 0.0 for c in range(5)})
    assert all_ties.p_value is None and all_ties.covers_zero and (all_ties.wins, all_ties.ties) == (0, 5)


def test_wins_ties_losses_by_hand():
    diffs = [0.02, -0.01, 0.5 * TIE_TOLERANCE, -0.5 * TIE_TOLERANCE, 0.0, 2 * TIE_TOLERANCE, -3 * TIE_TOLERANCE]
    assert wins_ties_losses(diffs) == (2, 3, 2)
    assert wins_ties_losses(diffs, tolerance=0.05) == (0, 7, 0)


def test_bootstrap_resamples_classes_then_seeds_within_them():
    # Class 0 has 20 seeds all at +1, class 1 one seed at 0. Per class the values are constant,
    # so every resample's mean of class means is 0, 0.5 or 1 (two draws of classes); a bootstrap
    # over the 21 pooled pairs would give k/21 and be dominated by class 0.
    groups = [[1.0] * 20, [0.0]]
    boot = hierarchical_bootstrap(groups, resamples=10_000, seed=0)
    assert set(np.unique(boot)) <= {0.0, 0.5, 1.0}
    assert abs(np.mean(boot == 0.5) - 0.5) < 0.03 and abs(np.mean(boot == 1.0) - 0.25) < 0.03
    r = compare_differences({**{(0, s): 1.0 for s in range(20)}, (1, 0): 0.0})
    assert r.mean == pytest.approx(0.5) and r.n_classes == 2
    # Seeds are drawn within the drawn class only: class 0 = [0, 1], class 1 = [10]. A resample's
    # value is (m0 + m1) / 2 with each m one of {0, 0.5, 1} (two draws from class 0) or 10.
    boot = hierarchical_bootstrap([[0.0, 1.0], [10.0]], resamples=5000, seed=1)
    possible = {(x + y) / 2 for x in (0.0, 0.5, 1.0, 10.0) for y in (0.0, 0.5, 1.0, 10.0)}
    assert all(any(math.isclose(v, p) for p in possible) for v in np.unique(boot))
    assert np.any(np.isclose(boot, 0.25))  # both draws class 0, seed means 0 and 0.5


def test_bootstrap_is_deterministic_for_a_seed():
    groups = [[0.1, 0.2], [0.3], [-0.1, 0.0, 0.4]]
    assert np.array_equal(hierarchical_bootstrap(groups, 500, seed=7), hierarchical_bootstrap(groups, 500, seed=7))
    assert not np.array_equal(hierarchical_bootstrap(groups, 500, seed=7), hierarchical_bootstrap(groups, 500, seed=8))


def test_compare_pairs_only_the_shared_cells():
    a = {(0, 0): 0.8, (0, 1): 0.9, (1, 0): 0.7, (3, 0): math.nan}
    b = {(0, 0): 0.7, (1, 0): 0.75, (2, 0): 0.6, (3, 0): 0.5}
    r = compare(a, b)
    assert (r.n_pairs, r.n_classes) == (2, 2)
    assert r.mean == pytest.approx((0.1 - 0.05) / 2)
    assert compare({(0, 0): 0.5}, {(1, 0): 0.5}) is None
    one = compare({(0, 0): 0.9}, {(0, 0): 0.8})
    assert one.ci_low is None and one.covers_zero is None and "too few classes (1)" in one.text()


def test_per_class_summary_matches_statistics():
    values = {(0, 0): 0.8, (0, 1): 0.84, (0, 2): 0.79, (1, 0): 0.6}
    summary = per_class_summary(values)
    assert summary[0][0] == pytest.approx(statistics.mean([0.8, 0.84, 0.79]))
    assert summary[0][1] == pytest.approx(statistics.stdev([0.8, 0.84, 0.79]))
    assert summary[0][2] == 3
    assert summary[1][0] == 0.6 and math.isnan(summary[1][1]) and summary[1][2] == 1


def test_text_renders_units():
    r = compare_differences({(c, 0): 0.05 + 0.001 * c for c in range(8)})
    line = r.text(lambda x: f"{100 * x:+.2f} points")
    assert line.startswith("+5.35 points [95% CI: bootstrap ") and ", t +5." in line
    assert "classes ahead / level / behind 8 / 0 / 0 (8 pairs)" in line
