"""The bench report: tables shaped like the paper's, paired statistics, scorer robustness, the
authors' checkpoint selection measured beside ours, a budget ladder, convergence races and
learning curves, rendered as ``report.md`` and figures from ``firm.bench_stats``.

Everything is computed from the run results in ``out_dir/runs/*.json``, so the report can be
rebuilt at any time (``firm bench --report-only``), from any subset of shards.
"""
from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from .bench_stats import (budget_groups, bench_statistics, change_key, find_comparison, final_aurocs, gain_changes,
                          ladder_json, ladder_pairs, learning_curves, load_runs, method_order, statistics_json)
from .data import DATASETS
from .rundir import BENCH_REPORT, RESULTS
from .serialization import atomic_write, write_json
from .stats import MIN_CLASSES, PairedResult

__all__ = ["write_report", "PAPER_CLAIMS"]

PAPER_CLAIMS = (
    "The paper (ResNet-18 width 64, 2,000 epochs, batch 32, 5 seeds, official CIFAR-10 files) reports on CIFAR-10 a "
    "mean AUROC gain of FIRM of 6.2 points over NT-Xent and 2 points over Rot-SupCon (up to 16.9 on single classes), "
    "about 12x faster convergence than NT-Xent and 7x faster than Rot-SupCon, and robustness across scoring functions."
)
NO_MODELS_FROM_TEST = ("Models are never chosen by test labels: every number is the last epoch's model, except the "
                       "column marked \"best test checkpoint\", which measures the authors' selection and feeds "
                       "nothing; the learning curves are recorded for these figures only.")
STATS_NOTE = (
    "Paired statistics (`firm.stats`), the class as the unit: each class's differences are averaged over the seeds "
    "both methods ran, and everything below runs on those class values. Estimate: their mean. Intervals (95 %): a "
    "hierarchical percentile bootstrap (10,000 resamples of classes, then of seeds within each drawn class; fixed "
    "RNG seed) and a t-interval on the class values; the verdict follows the more cautious of the two (FIRM ahead or "
    "behind only when both exclude zero). Wilcoxon signed-rank p (two-sided) on the class values; a difference "
    f"within 1e-4 is a tie. With fewer than {MIN_CLASSES} classes there is no interval: the class values are listed "
    "instead. With one seed per class the spread is over classes only, not seed noise.")
P_FLOOR_NOTE = ("† Too few classes for the test to reach p < 0.05 at all: with n non-tied classes the smallest "
                "two-sided exact p is 2 / 2^n (0.25 for 3, 0.125 for 4, 0.0625 for 5).")
SPEED_NOTE = (
    "Convergence to the other method's final AUROC, per (class, seed) cell: the epochs each method needs to first "
    "reach it (linear interpolation between evaluations). A cell is undefined, and dropped, when the other method's "
    "final AUROC is at or below its untrained encoder's (epoch 0). Race: which method got there first; a cell where "
    "FIRM never got there is censored and counts for the other method; classes count by the sign of their mean "
    "outcome over seeds, with a two-sided sign test. Speed-up: the geometric mean of (epochs the other needs / epochs "
    "FIRM needs) over the cells where FIRM reached the target only, so it leaves out exactly the cells where FIRM was "
    "slowest; read it beside the race.")


# ----------------------------------------------------------------------------------------------
# Cells


def _points(x: float) -> str:
    text = f"{100 * x:+.2f}"
    return "+0.00" if text == "-0.00" else text


def _factor(x: float) -> str:
    return f"{math.exp(x):.2f}x"


def _clean(x):
    """JSON-safe: non-finite floats as None."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def _mean_cell(class_means: list[float], n_classes: int) -> str:
    """Bold mean of a method's per-class AUROCs, naming how many classes it covers when not all."""
    if not class_means:
        return "-"
    cell = f"**{statistics.mean(class_means):.4f}**"
    return cell if len(class_means) == n_classes else f"{cell} ({len(class_means)} of {n_classes} classes)"


def _class_name(dataset: str, c: int) -> str:
    if c < 0:
        return "all (multi-class ID)"
    names = DATASETS[dataset].classes if dataset in DATASETS else None
    return f"{c} {names[c]}" if names and c < len(names) else str(c)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _at_p_floor(p_value: float | None, p_note: str) -> bool:
    """Whether a p-value is shown with † (too few classes for it to reach 0.05; see P_FLOOR_NOTE)."""
    return p_value is not None and bool(p_note)


def _p_cell(p_value: float | None, p_note: str) -> str:
    if p_value is None:
        return f"- ({p_note})"
    return f"{p_value:.3g}" + ("†" if _at_p_floor(p_value, p_note) else "")


def _pair(low: float, high: float, fmt) -> str:
    return f"[{fmt(low)}, {fmt(high)}]"


def _values(r: PairedResult, fmt) -> str:
    """The class values (fewer than MIN_CLASSES) or the worst and best of them."""
    if r.has_interval:
        return f"{fmt(r.class_worst)} to {fmt(r.class_best)}"
    return ", ".join(fmt(v) for v in sorted(r.class_values))


def _compact(r: PairedResult, fmt) -> str:
    """Estimate with the cautious interval (bold when it excludes zero), or the class values."""
    if not r.has_interval:
        return f"{fmt(r.mean)} (values {_values(r, fmt)})"
    text = f"{fmt(r.mean)} {_pair(*r.interval, fmt)}"
    return f"**{text}**" if not r.covers_zero else text


def _verdict(r: PairedResult, null: str) -> str:
    v = r.verdict(null)
    return {f"above {null}": "FIRM ahead", f"below {null}": "FIRM behind"}.get(v, v)


def _comparison_table(comps: list[dict], fmt, null: str, value_header: str) -> str:
    header = ["FIRM", "vs", "classes (pairs)", value_header, "95 % bootstrap", "95 % t", "class values (worst to best)",
              "Wilcoxon p (classes)", "classes ahead / level / behind", "verdict"]
    rows = []
    for c in comps:
        r = c["result"]
        none = f"none ({r.n_classes} class{'es' if r.n_classes != 1 else ''})"
        rows.append([c["method"], c["other"], f"{r.n_classes} ({r.n_pairs})", fmt(r.mean),
                     _pair(r.ci_low, r.ci_high, fmt) if r.has_interval else none,
                     _pair(r.t_low, r.t_high, fmt) if r.has_interval else none, _values(r, fmt),
                     _p_cell(r.p_value, r.p_note), f"{r.wins} / {r.ties} / {r.losses}", _verdict(r, null)])
    floor = [P_FLOOR_NOTE] if any(_at_p_floor(c["result"].p_value, c["result"].p_note) for c in comps) else []
    return "\n\n".join([_table(header, rows)] + floor)


def _race_cell(c: dict) -> str:
    race = c["race"]
    return (f"{race.first} / {race.second} / {race.level} ({race.censored} censored); classes {race.classes_first} / "
            f"{race.classes_second} / {race.classes_level}, p {_p_cell(race.p_value, race.p_note)}")


def _speedup_cell(c: dict) -> str:
    r = c["result"]
    if r is None:
        return "- (FIRM reached the target in no cell)"
    return f"{_compact(r, _factor)} over {r.n_pairs} cell{'s' if r.n_pairs != 1 else ''}"


def _speed_table(comps: list[dict]) -> str:
    header = ["FIRM", "vs", "cells (classes)", "undefined, dropped",
              "race, cells: FIRM first / other first / level (FIRM never reached); classes: FIRM first / other "
              "first / level, sign test p", "speed-up where FIRM reached the target [95 % interval]"]
    rows = [[c["method"], c["other"], f"{c['race'].n_cells} ({c['race'].n_classes})", str(c["undefined"]),
             _race_cell(c), _speedup_cell(c)] for c in comps]
    floor = [P_FLOOR_NOTE] if any(_at_p_floor(c["race"].p_value, c["race"].p_note) for c in comps) else []
    return "\n\n".join([_table(header, rows)] + floor)


# ----------------------------------------------------------------------------------------------
# Sections


def _section_title(dataset: str, eval_set: str, budget, several_budgets: bool) -> str:
    title = f"{dataset}, {eval_set} set"
    if several_budgets:
        title += f", budget {budget} epochs" if budget is not None else ", budget not recorded"
    return title


def _robustness_section(group: dict) -> list[str]:
    """Every final scorer and ensemble: each FIRM comparison's gain with its cautious interval."""
    pairs = list(dict.fromkeys((r["method"], r["other"]) for r in group["robustness"]))
    settings = list(dict.fromkeys((r["scorer"], r["tta"]) for r in group["robustness"]))
    if len(settings) < 2:
        return []
    cell = {(r["scorer"], r["tta"], r["method"], r["other"]): r["result"] for r in group["robustness"]}
    rows = [[scorer, tta] + [_compact(cell[scorer, tta, m, o], _points) if (scorer, tta, m, o) in cell else "-"
                             for m, o in pairs] for scorer, tta in settings]
    ahead = {p: sum(1 for s in settings if (r := cell.get((*s, *p))) and r.has_interval and not r.covers_zero
                    and r.mean > 0) for p in pairs}
    behind = {p: sum(1 for s in settings if (r := cell.get((*s, *p))) and r.has_interval and not r.covers_zero
                     and r.mean < 0) for p in pairs}
    counts = "; ".join(f"{m} vs {o}: ahead under {ahead[m, o]}, behind under {behind[m, o]} of {len(settings)}"
                       for m, o in pairs)
    return ["### Robustness: the gain under every scorer and ensemble (AUROC points)", "",
            "Mean gain over classes with the union of the bootstrap and t 95 % intervals (bold: both exclude zero); "
            f"with fewer than {MIN_CLASSES} classes the class values instead. {counts}.", "",
            _table(["scorer", "ensemble"] + [f"{m} - {o}" for m, o in pairs], rows), ""]


def _selection_section(group: dict) -> list[str]:
    """Last epoch (ours) beside the best test checkpoint (the authors' selection; optimistic)."""
    sel = group["selection"]
    if not sel:
        return []
    by = sorted({s for v in sel.values() for s in v["selected_by"]})
    rows = [[m, f"{v['classes']} ({v['runs']})", f"{v['last']:.4f}", f"{v['best_test']:.4f}",
             _points(v["best_test"] - v["last"])] for m, v in sel.items()]
    gains = []
    for c in group["comparisons"]:
        if c["metric"] == "auroc":
            found = {m: find_comparison(group, c["method"], c["other"], m)
                     for m in ("best_test", "speed", "speed_best_test")}
            gains.append([c["method"], c["other"], _compact(c["result"], _points)]
                         + [_compact(found["best_test"]["result"], _points) if found["best_test"] else "-"]
                         + [f"{_race_cell(found[m])}; speed-up {_speedup_cell(found[m])}" if found[m] else "-"
                            for m in ("speed", "speed_best_test")])
    return ["### Last epoch against the best test checkpoint (cos1, no ensemble)", "",
            "The authors evaluate on the test set during training and report the checkpoint with the best test "
            f"AUROC; here that checkpoint is chosen by the test AUROC of {', '.join(by)} among the learning-curve "
            "evaluations after epoch 0. It is optimistic (the test labels choose it), measured only to size the "
            "selection effect, and never used to pick a model.", "",
            _table(["method", "classes (runs)", "last epoch (ours)",
                    "best test checkpoint (the authors' selection; optimistic)", "difference"], rows), "",
            "Gains with the union of the two 95 % intervals (or the class values with fewer than "
            f"{MIN_CLASSES} classes); races as in the convergence section, to the other method's last-epoch AUROC "
            "and to its best test checkpoint's.", "",
            _table(["FIRM", "vs", "gain, last epoch", "gain, best test checkpoints",
                    "race to the other's last-epoch AUROC", "race to the other's best test AUROC"], gains), ""]


def _dataset_section(group: dict, records: list[dict], several_budgets: bool) -> list[str]:
    """The paper-shaped tables and the paired statistics of one dataset, evaluation set and budget."""
    dataset, eval_set, budget = group["dataset"], group["eval_set"], group["budget"]
    methods = group["methods"]
    mine = [r for r in records if r["dataset"] == dataset and r["eval_set"] == eval_set and r.get("budget") == budget]
    final = final_aurocs(mine)
    classes = sorted({k[2] for k in final})
    per_class = group["per_class"]
    seeds = max((n for m in methods for _, _, n in per_class[m].values()), default=1)

    def cell(m: str, c) -> str:
        if c not in per_class[m]:
            return "-"
        mean, std, n = per_class[m][c]
        text = f"{mean:.4f}" if n == 1 else f"{mean:.4f} ± {std:.4f}"
        return text if n == seeds else f"{text} ({n} seed{'s' if n != 1 else ''})"

    rows = [[_class_name(dataset, c)] + [cell(m, c) for m in methods] for c in classes]
    means = {m: [per_class[m][c][0] for c in classes if c in per_class[m]] for m in methods}
    rows.append(["**mean**"] + [_mean_cell(means[m], len(classes)) for m in methods])
    title = _section_title(dataset, eval_set, budget, several_budgets)
    spread = f"mean ± std over {seeds} seeds" if seeds > 1 else "one seed"
    md = [f"## {title}: final AUROC (cos1, no ensemble)", "", f"Per class: {spread}; mean: over classes.", ""]
    missing = {m: len(classes) - len(means[m]) for m in methods if len(means[m]) < len(classes)}
    if missing:
        md += ["Incomplete grid: " + ", ".join(f"{m} lacks {n} of {len(classes)} classes" for m, n in missing.items())
               + ". Means over different sets of classes do not compare; the gains below use only the classes that "
               "both methods finished.", ""]
    runs = {m: sum(n for _, _, n in per_class[m].values()) for m in methods}
    short = {m: n for m, n in runs.items() if n < max(runs.values()) and m not in missing}
    if short:
        md += ["Incomplete grid: " + ", ".join(f"{m} has {n} of {max(runs.values())} runs" for m, n in short.items())
               + " (some seeds missing); the gains below pair only the (class, seed) cells both methods ran.", ""]
    md += [_table(["normal class"] + methods, rows), ""]
    by_metric = defaultdict(list)
    for c in group["comparisons"]:
        by_metric[c["metric"]].append(c)
    if by_metric["auroc"]:
        md += ["### Gain of FIRM over each other method, in AUROC points", "", STATS_NOTE, "",
               _comparison_table(by_metric["auroc"], _points, "zero", "mean gain"), ""]
    srows = []
    for scorer, tta in sorted({(r["scorer"], r["tta"]) for r in mine if r["final"]}):
        scores = final_aurocs(mine, scorer, tta)
        class_means = {m: [statistics.mean(v for k, v in scores.items() if k[2:4] == (c, m))
                           for c in classes if any(k[2:4] == (c, m) for k in scores)] for m in methods}
        srows.append([scorer, tta] + [_mean_std(class_means[m]) for m in methods])
    md += ["### Scorer robustness (mean over classes, ± std across classes)", "",
           _table(["scorer", "ensemble"] + methods, srows), ""]
    md += _robustness_section(group)
    md += _selection_section(group)
    if any(group["aulc"].values()):
        md += ["### Convergence", "",
               "AULC: area under the cos1 AUROC-vs-epoch curve, x scaled to [0, 1], Simpson's rule (epoch 0 = the "
               "untrained encoder).", "",
               _table(["method", "AULC (mean ± std over runs)", "runs"],
                      [[m, _mean_std(group["aulc"][m]), str(len(group["aulc"][m]))] for m in methods]), ""]
        if by_metric["aulc"]:
            md += ["Gain of FIRM in AULC (points, paired as above):", "",
                   _comparison_table(by_metric["aulc"], _points, "zero", "mean AULC gain"), ""]
        if by_metric["speed"]:
            md += [SPEED_NOTE, "", _speed_table(by_metric["speed"]), ""]
    return md


def _ladder_section(stats: dict, paper: dict, changes: dict[tuple, tuple[int, PairedResult]]) -> list[str]:
    md = ["## Budget ladder: FIRM's gain and speed-up against the training budget", "",
          "Each budget is its own set of runs (same classes and seeds); gains and races pair cells within a budget. "
          "Whether the gap grows is the *change in gain*: each (class, seed) cell's gain at this budget minus its "
          "gain at the smallest budget, over the cells that ran both methods at both budgets, with the same "
          f"statistics as the gain (with fewer than {MIN_CLASSES} classes: the class values, no interval). "
          "`ladder.png` plots the AUROC gain and the speed-up against the budget (bars: the 95 % interval, or the "
          f"range of the class values with fewer than {MIN_CLASSES} classes), with the paper's CIFAR-10 claims at "
          f"{paper['budget']:,} epochs beside them: whether the trend reaches them is an extrapolation for the reader "
          "to judge.", ""]

    def order(gc):
        g, c = gc
        return g["dataset"], g["eval_set"], c["method"], c["other"], g["budget"]

    rows, floored = [], False
    for g, c in sorted(ladder_pairs(stats), key=order):
        r = c["result"]
        speed = find_comparison(g, c["method"], c["other"], "speed")
        change = changes.get(change_key(g, c))
        floored = floored or _at_p_floor(r.p_value, r.p_note) or bool(
            change and _at_p_floor(change[1].p_value, change[1].p_note))
        change_cell = (f"{_compact(change[1], _points)}, p {_p_cell(change[1].p_value, change[1].p_note)}, "
                       f"{change[1].wins} / {change[1].ties} / {change[1].losses} (from {change[0]})") if change else "-"
        rows.append([f"{g['dataset']} ({g['eval_set']})", str(g["budget"]), c["method"], c["other"],
                     f"{r.n_classes} ({r.n_pairs})", _compact(r, _points), _p_cell(r.p_value, r.p_note),
                     _verdict(r, "zero"), change_cell, _race_cell(speed) if speed else "-",
                     _speedup_cell(speed) if speed else "-"])
    for other, gain in paper["gain_points"].items():
        rows.append([f"{paper['dataset']} (paper)", f"{paper['budget']:,}", "firm", other,
                     f"10 x {paper['seeds']} seeds", f"{gain:+.1f}", "-", "(as reported)", "-", "-",
                     f"about {paper['speedup'][other]:.0f}x"])
    md += [_table(["dataset", "budget (epochs)", "FIRM", "vs", "classes (pairs)", "AUROC gain, points",
                   "Wilcoxon p (classes)", "verdict", "change in gain, Wilcoxon p, classes grew / same / shrank",
                   "race to the other's final AUROC (cells FIRM / other / level; classes)",
                   "speed-up where FIRM reached it"], rows), ""]
    return md + ([P_FLOOR_NOTE, ""] if floored else [])


def _comparison_text(c: dict) -> str:
    if "race" in c:
        race = c["race"].text("FIRM", c["other"])
        speed = c["result"].text(_factor, "1x") if c["result"] else "no cell where FIRM reached the target"
        return f"race: {race}; {c['undefined']} cells undefined; speed-up where FIRM reached it: {speed}"
    return c["result"].text(_points, "zero")


# ----------------------------------------------------------------------------------------------
# Figures


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _plot_curves(curves: dict, path: Path, per_class: bool) -> None:
    plt = _pyplot()
    groups = defaultdict(lambda: defaultdict(list))
    for (dataset, eval_set, cls, method, _seed), (epochs, values) in curves.items():
        panel = (dataset, eval_set, cls) if per_class else (dataset, eval_set)
        groups[panel][method].append((epochs, values))
    panels = sorted(groups)
    cols = min(5, len(panels)) or 1
    rows = math.ceil(len(panels) / cols) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        for method in method_order(groups[panel]):
            runs = groups[panel][method]
            common = sorted(set.intersection(*[set(e) for e, _ in runs]))
            mean = [statistics.mean(v[e.index(x)] for e, v in runs) for x in common]
            ax.plot(common, mean, marker=".", label=method if per_class else f"{method} ({len(runs)} runs)")
        title = f"{panel[0]} {_class_name(panel[0], panel[2])}" if per_class else f"{panel[0]} ({panel[1]}), mean"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_ylabel("cos1 AUROC", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    _save(fig, path)


def _plot_ladder(ladder: dict, path: Path) -> None:
    """AUROC gain and speed-up against the budget, one line per comparison, one row of two panels per
    dataset and evaluation set; bars: the union of the two 95 % intervals, or the range of the class
    values with too few classes for an interval; the paper's claims as stars."""
    plt = _pyplot()
    from matplotlib.ticker import NullFormatter, NullLocator, ScalarFormatter

    def bars(stats: list[dict], transform) -> tuple[list, list, list]:
        mid, low, high = [], [], []
        for s in stats:
            m = transform(s["mean"])
            if s["ci_low"] is None:  # too few classes for an interval: the range of the class values
                lo, hi = transform(s["class_worst"]), transform(s["class_best"])
            else:
                lo, hi = transform(min(s["ci_low"], s["t_low"])), transform(max(s["ci_high"], s["t_high"]))
            mid.append(m)
            low.append(m - lo)
            high.append(hi - m)
        return mid, low, high

    panels = sorted({(r["dataset"], r["eval_set"]) for r in ladder["rows"]})
    fig, axes = plt.subplots(len(panels), 2, figsize=(12.5, 3.6 * len(panels)), squeeze=False)
    for (ax_gain, ax_speed), (dataset, eval_set) in zip(axes, panels):
        rows = [r for r in ladder["rows"] if (r["dataset"], r["eval_set"]) == (dataset, eval_set)]
        ticks = sorted({r["budget"] for r in rows})
        colour = {}  # the colour of the first line against each loss: the paper's star for it matches
        for method, other in sorted({(r["method"], r["other"]) for r in rows}):
            line = sorted((r for r in rows if (r["method"], r["other"]) == (method, other)), key=lambda r: r["budget"])
            mid, low, high = bars([r["auroc_gain"] for r in line], lambda x: 100 * x)
            drawn = ax_gain.errorbar([r["budget"] for r in line], mid, yerr=[low, high], marker="o", capsize=3,
                                     label=f"{method} vs {other}")
            colour.setdefault(other.partition("/")[0], drawn.lines[0].get_color())
            timed = [r for r in line if r["speed"] and r["speed"]["log_speedup"]]
            if timed:
                mid, low, high = bars([r["speed"]["log_speedup"] for r in timed], math.exp)
                ax_speed.errorbar([r["budget"] for r in timed], mid, yerr=[low, high], marker="o", capsize=3,
                                  color=drawn.lines[0].get_color(), label=f"{method} vs {other}")
        paper = ladder["paper"]
        if dataset == paper["dataset"]:
            ticks.append(paper["budget"])
            for other, gain in paper["gain_points"].items():
                style = dict(marker="*", markersize=13, linestyle="none", color=colour.get(other, "black"),
                             markeredgecolor="black", label=f"paper: firm vs {other}")
                ax_gain.plot([paper["budget"]], [gain], **style)
                ax_speed.plot([paper["budget"]], [paper["speedup"][other]], **style)
        ax_gain.axhline(0, color="gray", lw=0.8)
        ax_speed.axhline(1, color="gray", lw=0.8)
        ax_speed.set_yscale("log")
        ax_speed.yaxis.set_major_formatter(ScalarFormatter())
        ax_speed.yaxis.set_minor_formatter(NullFormatter())
        for ax, ylabel in ((ax_gain, "AUROC gain of FIRM, points"), (ax_speed, "speed-up of FIRM where it got there, x")):
            ax.set_xscale("log")
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.set_xlabel("budget (epochs)", fontsize=8)
            ax.set_ylabel(f"{ylabel}\n(bars: 95 % interval, or class range if < {MIN_CLASSES} classes)", fontsize=8)
            ax.set_title(f"{dataset} ({eval_set})", fontsize=9)
            ax.grid(alpha=0.3)
        ax_speed.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # the same lines in both panels
    fig.tight_layout()
    _save(fig, path)


def _machines(runs: list[dict]) -> str:
    """Where the runs were trained, as each run recorded it (a shared grid can span machines)."""
    seen = sorted({f"{m['device_name']}, {m['cpu_count']} cores, {m['torch_threads']} torch threads, torch {m['torch']}"
                   if (m := r.get("machine")) else "not recorded" for r in runs})
    return "; ".join(seen)


def _presets(runs: list[dict]) -> list[str]:
    """The preset of the runs: a name (newer runs, whose full settings are in each run file) or
    the preset's values (older runs)."""
    counts: dict[str, int] = defaultdict(int)
    for r in runs:
        p = r.get("preset")
        counts[p if isinstance(p, str) else json.dumps(p)] += 1
    if len(counts) == 1:
        return [f"Preset: `{next(iter(counts))}`", ""]
    return [f"Presets ({len(counts)}):", ""] + [f"- `{p}` ({n} runs)" for p, n in counts.items()] + [""]


def _wall_time(runs: list[dict]) -> str:
    """Total, mean and range of the runs' wall times, the figures a results README quotes."""
    minutes = [r["total_seconds"] / 60 for r in runs if r.get("total_seconds") is not None]
    if not minutes:
        return "run times not recorded"
    timed = f", {len(minutes)} of the runs timed" if len(minutes) < len(runs) else ""
    return (f"total wall time {sum(minutes) / 60:.2f} h ({sum(minutes) / len(minutes):.1f} min per run, "
            f"{min(minutes):.1f}-{max(minutes):.1f}{timed})")


def _check_section(runs: list[dict]) -> list[str]:
    """The held-out check of runs fine-tuned from pretrained weights: the cos1 AUROC of the
    pretrained and of the fine-tuned features on the normal class's validation share."""
    checked = [r for r in runs if r.get("feature_check")]
    if not checked:
        return []
    rows = [[r["run"], f"{r['feature_check']['frozen']:.4f}", f"{r['feature_check']['fine_tuned']:.4f}",
             _points(r["feature_check"]["fine_tuned"] - r["feature_check"]["frozen"])]
            for r in sorted(checked, key=lambda r: r["run"])]
    worse = sum(r["feature_check"]["fine_tuned"] < r["feature_check"]["frozen"] for r in checked)
    return ["## Held-out check: fine-tuned vs pretrained features", "",
            f"cos1 AUROC on the normal class's held-out validation share (never trained on) against images of "
            f"the other training classes; fine-tuning made the features worse in {worse} of {len(checked)} runs.", "",
            _table(["run", "pretrained", "fine-tuned", "change"], rows), ""]


def write_report(out_dir: str | Path, command: str = "") -> Path:
    """Write ``results.json`` (``records``, ``comparisons``, ``robustness``, ``selection``,
    ``per_class``, ``ladder``), ``report.md``, ``curves.png``, ``curves_per_class.png`` and, with
    several budgets, ``ladder.png``."""
    out = Path(out_dir)
    runs, records = load_runs(out)
    if not records:
        write_json(out / RESULTS, {"records": [], "comparisons": [], "robustness": [], "selection": [],
                                   "per_class": [], "ladder": None})
        atomic_write(out / BENCH_REPORT, "# firm bench\n\nNo finished runs yet.\n")
        return out / BENCH_REPORT
    stats = bench_statistics(records)
    changes = gain_changes(stats)
    ladder = ladder_json(stats, changes)
    write_json(out / RESULTS, _clean({"records": records, "methods": stats["methods"],
                                      **statistics_json(stats, _comparison_text), "ladder": ladder}))
    md = ["# firm bench report", ""]
    if command:
        md += [f"Command: `{command}`", ""]
    md += [f"Machine: {_machines(runs)}. Runs: {len(runs)}, {_wall_time(runs)}.", ""]
    md += _presets(runs)
    modes = defaultdict(set)
    for r in records:
        modes[r["method"]].add(r["loss_mode"])
    named = [m if "/" in m or modes[m] == {None} else f"{m} (layout {next(iter(modes[m]))})" for m in stats["methods"]]
    md += [f"Methods: {', '.join(named)} (a method is the loss, plus its layout where runs of one loss use several).",
           "", NO_MODELS_FROM_TEST, "", f"> {PAPER_CLAIMS}", ""]
    if ladder:
        md += _ladder_section(stats, ladder["paper"], changes)
        _plot_ladder(ladder, out / "ladder.png")
    elif (out / "ladder.png").exists():  # from an earlier report of this folder; one budget now
        (out / "ladder.png").unlink()
    several = len({g["budget"] for g in stats["groups"]}) > 1
    for group in stats["groups"]:
        md += _dataset_section(group, records, several)
    curves = learning_curves(records)
    if several:  # one line per method and budget
        curves = {}
        for b in budget_groups(records):
            for k, v in learning_curves([r for r in records if r.get("budget") == b]).items():
                curves[k[:3] + (f"{k[3]} ({b} ep.)", k[4])] = v
    _plot_curves(curves, out / "curves.png", per_class=False)
    _plot_curves(curves, out / "curves_per_class.png", per_class=True)
    md += _check_section(runs)
    md += ["Learning curves: `curves.png` (mean over classes) and `curves_per_class.png`.", ""]
    atomic_write(out / BENCH_REPORT, "\n".join(md))
    return out / BENCH_REPORT
