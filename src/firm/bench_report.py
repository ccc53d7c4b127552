"""The bench report: tables shaped like the paper's, paired statistics, a budget ladder,
convergence figures and learning curves.

Everything here is computed from the run results in ``out_dir/runs/*.json``, so the report can
be rebuilt at any time, from any subset of shards. This module reads those files itself and
imports neither ``bench`` nor ``cli``.

Methods. A method is a loss, or ``loss/layout`` (e.g. ``firm/concat``, ``firm/pairwise``) when
runs of one loss use several loss layouts, so a bench comparing layouts reports them apart. FIRM
in each of its layouts is compared with every other method, paired over the (class, seed) cells
both ran (``firm.stats``): mean gain with a 95 % hierarchical bootstrap interval, Wilcoxon
signed-rank p, wins / ties / losses.

Budgets. A run's ``budget`` is its total epochs. When a folder holds several budgets, every
table is given per budget and a ladder section shows the gain and the speed-up against the
budget, beside the paper's claims at 2,000 epochs. Runs without ``loss_mode`` / ``budget``
(older folders) are one layout and one budget, as before.
"""
from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from .data import CLASS_NAMES
from .evaluation import aulc, epochs_to_reach
from .rundir import BENCH_REPORT, BENCH_RUNS, RESULTS
from .serialization import atomic_write, read_json, write_json
from .stats import PairedResult, compare, compare_differences, per_class_summary

__all__ = ["final_aurocs", "learning_curves", "convergence", "method_labels", "load_runs", "speedup_log_ratios",
           "bench_statistics", "read_results", "write_report", "PAPER_CLAIMS", "PAPER_LADDER"]

PAPER_CLAIMS = (
    "The paper (ResNet-18 width 64, 2,000 epochs, batch 32, 5 seeds, official CIFAR-10 files) reports on CIFAR-10 a "
    "mean AUROC gain of FIRM of 6.2 points over NT-Xent and 2 points over Rot-SupCon (up to 16.9 on single classes), "
    "about 12x faster convergence than NT-Xent and 7x faster than Rot-SupCon, and robustness across scoring functions."
)
PAPER_LADDER = {"dataset": "cifar10", "budget": 2000, "seeds": 5,
                "gain_points": {"ntxent": 6.2, "rotsupcon": 2.0}, "speedup": {"ntxent": 12.0, "rotsupcon": 7.0}}
"""The paper's CIFAR-10 claims as points on the budget ladder (gain in AUROC points, speed-up factor)."""
LOSS_ORDER = ["firm", "ntxent", "supcon", "rotsupcon"]
MODE_ORDER = ["concat", "pairwise"]
NO_MODELS_FROM_TEST = ("Models are never chosen by test labels: every number is the last epoch's model; the learning "
                       "curves are recorded for these figures only, never used to pick a model or a stopping epoch.")
Key = tuple  # (dataset, eval_set, normal_class, method, seed)
Cell = tuple  # (normal_class, seed)


# ----------------------------------------------------------------------------------------------
# Records


def _method(r: dict) -> str:
    return r.get("method", r["loss"])


def _class(c) -> int:
    """A normal class as a number: newer runs record ``"3"`` or ``"all"``, older ones 3 or -1."""
    if isinstance(c, str):
        return -1 if c == "all" else int(c)
    return c


def _loss_rank(loss: str) -> int:
    return LOSS_ORDER.index(loss) if loss in LOSS_ORDER else len(LOSS_ORDER)


def method_labels(records: list[dict]) -> dict[tuple[str, str | None], str]:
    """``(loss, loss_mode) -> method``: the loss, plus ``/layout`` when runs of that loss use
    several layouts (a missing layout reads ``unrecorded`` then)."""
    modes = defaultdict(set)
    for r in records:
        modes[r["loss"]].add(r.get("loss_mode"))
    return {(loss, mode): loss if len(ms) == 1 else f"{loss}/{mode or 'unrecorded'}"
            for loss, ms in modes.items() for mode in ms}


def _method_order(methods) -> list[str]:
    def rank(m: str):
        loss, _, mode = m.partition("/")
        return (_loss_rank(loss), loss, MODE_ORDER.index(mode) if mode in MODE_ORDER else len(MODE_ORDER), mode)
    return sorted(methods, key=rank)


def _is_firm(method: str) -> bool:
    return method.partition("/")[0] == "firm"


def load_runs(out_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """The run results of a bench folder and all their records, each record given the run's
    ``loss_mode`` and ``budget`` where it lacks them (None in older folders) and its method label."""
    runs = [read_json(f, "bench run") for f in sorted((Path(out_dir) / BENCH_RUNS).glob("*.json"))]
    records = []
    for run in runs:
        for r in run.get("records", []):
            records.append({**r, "loss_mode": r.get("loss_mode", run.get("loss_mode")),
                            "budget": r.get("budget", run.get("budget"))})
    labels = method_labels(records)
    for r in records:
        r["method"] = labels[(r["loss"], r["loss_mode"])]
    return runs, records


def read_results(path: str | Path) -> dict:
    """A bench ``results.json``: the current form (a dict with ``records`` and the statistics)
    or the older one (a bare list of records), always as a dict."""
    data = json.loads(Path(path).read_text())
    return {"records": data} if isinstance(data, list) else data


def final_aurocs(records: list[dict], scorer: str = "cos1", tta: str = "none") -> dict[Key, float]:
    """Final AUROC of each run for one scorer and ensemble (records of one budget)."""
    return {(r["dataset"], r["eval_set"], _class(r["normal_class"]), _method(r), r["seed"]): r["auroc"]
            for r in records if r["final"] and r["scorer"] == scorer and r["tta"] == tta}


def learning_curves(records: list[dict]) -> dict[Key, tuple[list[float], list[float]]]:
    """cos1 AUROC against epoch for each run (evaluation set)."""
    points = defaultdict(dict)
    for r in records:
        if not r["final"] and r["scorer"] == "cos1" and r["tta"] == "none":
            points[(r["dataset"], r["eval_set"], _class(r["normal_class"]), _method(r), r["seed"])][r["epoch"]] = r["auroc"]
    return {k: (sorted(v), [v[e] for e in sorted(v)]) for k, v in points.items()}


def convergence(curves: dict[Key, tuple[list[float], list[float]]], final: dict[Key, float],
                baseline: str = "ntxent") -> dict[str, dict]:
    """Per method: AULC of each run, and the epochs each run needs to reach the baseline's final
    AUROC on the same class and seed (``inf`` if it never does)."""
    out = defaultdict(lambda: {"aulc": [], "epochs": {}})
    for key, (epochs, values) in curves.items():
        loss = key[3]
        if len(epochs) >= 2:
            out[loss]["aulc"].append(aulc(epochs, values))
        target_key = key[:3] + (baseline, key[4])
        if target_key in final:
            out[loss]["epochs"][key[:3] + key[4:]] = epochs_to_reach(epochs, values, final[target_key])
    return dict(out)


def speedup_log_ratios(firm_curves: dict[Cell, tuple[list, list]], other_curves: dict[Cell, tuple[list, list]],
                       other_final: dict[Cell, float]) -> tuple[dict[Cell, float], int, int]:
    """Per (class, seed): ``log(epochs the other method needs / epochs FIRM needs)`` to first
    reach the other method's final AUROC (linear interpolation between evaluations).

    A ratio's natural paired scale is its log: 2x and 0.5x cancel, and the mean of log-ratios is
    the log of the geometric-mean speed-up. When FIRM never reaches the target, its epochs count
    as its last evaluated epoch (the budget): that pair's value is then an upper bound, in FIRM's
    favour. Pairs where the ratio is undefined (one method needs 0 epochs and the other more, or
    the other method's curve never reaches its own final AUROC) are left out. Returns the
    log-ratios, the number of censored pairs and the number left out."""
    out, censored, undefined = {}, 0, 0
    for cell in sorted(firm_curves.keys() & other_curves.keys() & other_final.keys()):
        target = other_final[cell]
        e_other = epochs_to_reach(*other_curves[cell], target)
        e_firm = epochs_to_reach(*firm_curves[cell], target)
        if math.isinf(e_firm):
            e_firm, censored = float(firm_curves[cell][0][-1]), censored + 1
        if math.isinf(e_other) or (e_other == 0) != (e_firm == 0):
            undefined += 1
            continue
        out[cell] = 0.0 if e_other == 0 else math.log(e_other / e_firm)
    return out, censored, undefined


# ----------------------------------------------------------------------------------------------
# Statistics


def _budget_groups(records: list[dict]) -> list:
    budgets = {r.get("budget") for r in records}
    return sorted(budgets, key=lambda b: (b is None, b if b is not None else 0))


def _cells(scores: dict[Key, float], method: str) -> dict[Cell, float]:
    return {(k[2], k[4]): v for k, v in scores.items() if k[3] == method}


def _clean(x):
    """JSON-safe: non-finite floats as None."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x


def _points(x: float) -> str:
    text = f"{100 * x:+.2f}"
    return "+0.00" if text == "-0.00" else text


def _factor(x: float) -> str:
    return f"{math.exp(x):.2f}x"


def bench_statistics(records: list[dict]) -> dict:
    """Every paired comparison and per-class summary of a bench, grouped by dataset, evaluation
    set and budget: ``{"methods", "groups": [{dataset, eval_set, budget, methods, per_class,
    comparisons: [{method, other, metric, result: PairedResult, ...}]}]}``. Metrics: ``auroc``
    (final cos1 AUROC, no ensemble), ``aulc`` and ``log_speedup`` (``speedup_log_ratios``)."""
    methods = _method_order({_method(r) for r in records})
    groups = []
    for budget in _budget_groups(records):
        mine = [r for r in records if r.get("budget") == budget]
        final = final_aurocs(mine)
        curves = learning_curves(mine)
        for dataset, eval_set in sorted({k[:2] for k in final}):
            fin = {k: v for k, v in final.items() if k[:2] == (dataset, eval_set)}
            cur = {k: v for k, v in curves.items() if k[:2] == (dataset, eval_set)}
            present = _method_order({k[3] for k in fin})
            auroc = {m: _cells(fin, m) for m in present}
            curve = {m: {(k[2], k[4]): v for k, v in cur.items() if k[3] == m} for m in present}
            area = {m: {c: aulc(*v) for c, v in curve[m].items() if len(v[0]) >= 2} for m in present}
            comps = []
            firms = [m for m in present if _is_firm(m)]
            for i, f in enumerate(firms):
                for other in [m for m in present if m != f and m not in firms[:i]]:
                    entry = dict(method=f, other=other)
                    for metric, a, b in (("auroc", auroc[f], auroc[other]), ("aulc", area[f], area[other])):
                        result = compare(a, b)
                        if result is not None:
                            comps.append({**entry, "metric": metric, "result": result})
                    logs, censored, undefined = speedup_log_ratios(curve[f], curve[other], auroc[other])
                    if logs:
                        comps.append({**entry, "metric": "log_speedup", "result": compare(logs, {c: 0.0 for c in logs}),
                                      "censored": censored, "undefined": undefined})
            groups.append(dict(dataset=dataset, eval_set=eval_set, budget=budget, methods=present, auroc=auroc,
                               per_class={m: per_class_summary(auroc[m]) for m in present}, comparisons=comps,
                               aulc={m: list(area[m].values()) for m in present}))
    return {"methods": methods, "groups": groups}


def _find(group: dict, method: str, other: str, metric: str) -> dict | None:
    return next((c for c in group["comparisons"]
                 if (c["method"], c["other"], c["metric"]) == (method, other, metric)), None)


def _statistics_json(stats: dict) -> dict:
    comparisons, per_class = [], []
    for g in stats["groups"]:
        where = {"dataset": g["dataset"], "eval_set": g["eval_set"], "budget": g["budget"]}
        for c in g["comparisons"]:
            fmt, null = (_factor, "1x") if c["metric"] == "log_speedup" else (_points, "zero")
            extra = {k: c[k] for k in ("censored", "undefined") if k in c}
            comparisons.append({**where, "method": c["method"], "other": c["other"], "metric": c["metric"],
                                **c["result"].to_dict(), **extra, "text": c["result"].text(fmt, null)})
        for m, classes in g["per_class"].items():
            per_class += [{**where, "method": m, "normal_class": cls, "mean": mean, "std": std, "seeds": n}
                          for cls, (mean, std, n) in sorted(classes.items())]
    return {"comparisons": comparisons, "per_class": per_class}


def _ladder_pairs(stats: dict) -> list[tuple[dict, dict]]:
    """(group, AUROC comparison) of every budget that is recorded."""
    return [(g, c) for g in stats["groups"] if g["budget"] is not None for c in g["comparisons"]
            if c["metric"] == "auroc"]


def _paper_claims(others: set[str]) -> dict:
    """PAPER_LADDER narrowed to the losses FIRM is compared with here, so that the ladder's table and
    plot (both read it from the ladder JSON) never show a claim against a loss the grid did not run."""
    keep = [o for o in PAPER_LADDER["gain_points"] if o in others]
    return {**PAPER_LADDER, "gain_points": {o: PAPER_LADDER["gain_points"][o] for o in keep},
            "speedup": {o: PAPER_LADDER["speedup"][o] for o in keep}}


def _gain_changes(stats: dict) -> dict[tuple, tuple[int, PairedResult]]:
    """How the AUROC gain of each ladder comparison moved from the smallest budget at which both
    methods ran, keyed by (dataset, eval_set, budget, method, other): (that budget, the paired
    statistics of each (class, seed) cell's gain here minus its gain there). It answers "does the gap
    grow" on the same cells, which the per-budget intervals cannot: they may hold different cells, and
    they ignore that a class is easy at every budget."""
    out = {}
    for group, c in _ladder_pairs(stats):
        method, other = c["method"], c["other"]
        base = min((g for g in stats["groups"] if g["budget"] is not None
                    and (g["dataset"], g["eval_set"]) == (group["dataset"], group["eval_set"])
                    and {method, other} <= g["auroc"].keys()), key=lambda g: g["budget"])
        if base is group:
            continue
        now, then = group["auroc"], base["auroc"]
        cells = now[method].keys() & now[other].keys() & then[method].keys() & then[other].keys()
        diffs = {cell: (now[method][cell] - now[other][cell]) - (then[method][cell] - then[other][cell])
                 for cell in cells}
        diffs = {cell: d for cell, d in diffs.items() if math.isfinite(d)}
        if diffs:
            out[_change_key(group, c)] = (base["budget"], compare_differences(diffs))
    return out


def _change_key(group: dict, comparison: dict) -> tuple:
    return group["dataset"], group["eval_set"], group["budget"], comparison["method"], comparison["other"]


def _ladder_json(stats: dict, changes: dict[tuple, tuple[int, PairedResult]]) -> dict | None:
    budgets = [b for b in _budget_groups([{"budget": g["budget"]} for g in stats["groups"]]) if b is not None]
    if len(budgets) < 2:
        return None
    rows = []
    for g, c in _ladder_pairs(stats):
        speed = _find(g, c["method"], c["other"], "log_speedup")
        change = changes.get(_change_key(g, c))
        rows.append({"dataset": g["dataset"], "eval_set": g["eval_set"], "budget": g["budget"], "method": c["method"],
                     "other": c["other"], "auroc_gain": c["result"].to_dict(),
                     "gain_change": {"from_budget": change[0], **change[1].to_dict()} if change else None,
                     "log_speedup": speed["result"].to_dict() if speed else None,
                     "speedup_censored": speed["censored"] if speed else None})
    others = {c["other"].partition("/")[0] for g in stats["groups"] for c in g["comparisons"]}
    return {"budgets": budgets, "rows": rows, "paper": _paper_claims(others)}


# ----------------------------------------------------------------------------------------------
# Markdown


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
    names = CLASS_NAMES.get(dataset)
    return f"{c} {names[c]}" if names and c < len(names) else str(c)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _at_p_floor(r: PairedResult) -> bool:
    """Whether the p-value is shown with † (too few pairs for it to reach 0.05; see P_FLOOR_NOTE)."""
    return r.p_value is not None and bool(r.p_note)


def _p_cell(r: PairedResult) -> str:
    if r.p_value is None:
        return f"- ({r.p_note})"
    return f"{r.p_value:.3g}" + ("†" if _at_p_floor(r) else "")


P_FLOOR_NOTE = ("† Too few pairs for the test to reach p < 0.05 at all: with n non-tied pairs the smallest two-sided "
                "Wilcoxon p is 2 / 2^n (0.125 for 4, 0.0625 for 5).")


def _ci_cell(r: PairedResult, fmt) -> str:
    return f"[{fmt(r.ci_low)}, {fmt(r.ci_high)}]" if r.ci_low is not None else "- (one pair)"


def _verdict(r: PairedResult, null: str) -> str:
    v = r.verdict(null)
    return {f"above {null}": "FIRM ahead", f"below {null}": "FIRM behind"}.get(v, v)


def _comparison_table(comps: list[dict], fmt, null: str, value_header: str, speed: bool = False) -> str:
    header = ["FIRM", "vs", "pairs (classes)", value_header, "95 % CI", "Wilcoxon p", "wins / ties / losses",
              "best class", "worst class", "verdict"]
    if speed:
        header.append("FIRM never reached the target")
    rows = []
    for c in comps:
        r = c["result"]
        row = [c["method"], c["other"], f"{r.n_pairs} ({r.n_classes})", fmt(r.mean), _ci_cell(r, fmt), _p_cell(r),
               f"{r.wins} / {r.ties} / {r.losses}", fmt(r.class_best), fmt(r.class_worst), _verdict(r, null)]
        if speed:
            row.append(f"{c['censored']} of {r.n_pairs + c['undefined']}")
        rows.append(row)
    floor = [P_FLOOR_NOTE] if any(_at_p_floor(c["result"]) for c in comps) else []
    return "\n\n".join([_table(header, rows)] + floor)


STATS_NOTE = (
    "Paired statistics (`firm.stats`) over the (class, seed) cells both methods ran: the estimate is the mean over "
    "classes of each class's mean difference; the 95 % interval is a hierarchical percentile bootstrap (10,000 "
    "resamples of classes with replacement, then of seeds within each drawn class; fixed RNG seed); the Wilcoxon "
    "signed-rank test (two-sided) runs on the same differences; a difference within 1e-4 is a tie. An interval that "
    "reaches zero (to within 1e-4) reads \"not distinguishable from zero\". With one seed per class the interval "
    "reflects the spread over classes only, not seed noise.")


def _section_title(dataset: str, eval_set: str, budget, several_budgets: bool) -> str:
    title = f"{dataset}, {eval_set} set"
    if several_budgets:
        title += f", budget {budget} epochs" if budget is not None else ", budget not recorded"
    return title


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
    if any(group["aulc"].values()):
        md += ["### Convergence", "",
               "AULC: area under the cos1 AUROC-vs-epoch curve, x scaled to [0, 1], Simpson's rule (epoch 0 = the "
               "untrained encoder).", "",
               _table(["method", "AULC (mean ± std over runs)", "runs"],
                      [[m, _mean_std(group["aulc"][m]), str(len(group["aulc"][m]))] for m in methods]), ""]
        if by_metric["aulc"]:
            md += ["Gain of FIRM in AULC (points, paired as above):", "",
                   _comparison_table(by_metric["aulc"], _points, "zero", "mean AULC gain"), ""]
        if by_metric["log_speedup"]:
            md += ["Speed-up of FIRM: for each (class, seed) the target is the other method's final AUROC; the "
                   "paired quantity is log(epochs the other method needs to first reach it / epochs FIRM needs), "
                   "shown as a factor (exp of the mean log-ratio: a geometric-mean speed-up; 1x = as fast). Where "
                   "FIRM never reaches the target its epochs count as the full budget, a bound in FIRM's favour "
                   "(last column).", "",
                   _comparison_table(by_metric["log_speedup"], _factor, "1x", "speed-up", speed=True), ""]
    return md


def _ladder_section(stats: dict, paper: dict, changes: dict[tuple, tuple[int, PairedResult]]) -> list[str]:
    md = ["## Budget ladder: FIRM's gain and speed-up against the training budget", "",
          "Each budget is its own set of runs (same classes and seeds); gains and speed-ups pair cells within a "
          "budget. Whether the gap grows is the *change in gain*: each (class, seed) cell's gain at this budget "
          "minus its gain at the smallest budget, over the cells that ran both methods at both budgets, with the "
          "same interval and Wilcoxon p as the gain (with few classes a percentile bootstrap interval is too narrow "
          "and the p-value has a floor, so read both together). `ladder.png` plots the AUROC gain (95 % interval) and "
          "the speed-up against the budget, with the "
          f"paper's CIFAR-10 claims at {paper['budget']:,} epochs beside them: whether the trend reaches them "
          "is an extrapolation for the reader to judge.", ""]

    def order(gc):
        g, c = gc
        return g["dataset"], g["eval_set"], c["method"], c["other"], g["budget"]

    rows, floored = [], False
    for g, c in sorted(_ladder_pairs(stats), key=order):
        r = c["result"]
        speed = _find(g, c["method"], c["other"], "log_speedup")
        speed_cell = (f"{_factor(speed['result'].mean)} {_ci_cell(speed['result'], _factor)}"
                      + (f", {speed['censored']} censored" if speed["censored"] else "")) if speed else "-"
        change = changes.get(_change_key(g, c))
        floored = floored or bool(change and _at_p_floor(change[1]))
        change_cell = (f"{_points(change[1].mean)} {_ci_cell(change[1], _points)}, p {_p_cell(change[1])}, "
                       f"{change[1].wins} / {change[1].ties} / {change[1].losses} (from {change[0]})") if change else "-"
        rows.append([f"{g['dataset']} ({g['eval_set']})", str(g["budget"]), c["method"], c["other"],
                     f"{r.n_pairs} ({r.n_classes})", f"{_points(r.mean)} {_ci_cell(r, _points)}",
                     _verdict(r, "zero"), change_cell, speed_cell])
    for other, gain in paper["gain_points"].items():
        rows.append([f"{paper['dataset']} (paper)", f"{paper['budget']:,}", "firm", other,
                     f"10 classes x {paper['seeds']} seeds", f"{gain:+.1f}", "(as reported)", "-",
                     f"about {paper['speedup'][other]:.0f}x"])
    md += [_table(["dataset", "budget (epochs)", "FIRM", "vs", "pairs (classes)", "AUROC gain, points [95 % CI]",
                   "verdict", "change in gain [95 % CI], Wilcoxon p, grew / same / shrank", "speed-up [95 % CI]"],
                  rows), ""]
    return md + ([P_FLOOR_NOTE, ""] if floored else [])


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
        for method in _method_order(groups[panel]):
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
    """AUROC gain and speed-up (each with its 95 % interval) against the budget, one line per
    comparison, one row of two panels per dataset and evaluation set; the paper's claims as stars."""
    plt = _pyplot()
    from matplotlib.ticker import NullFormatter, NullLocator, ScalarFormatter

    def bars(line: list[dict], key: str, transform) -> tuple[list, list, list]:
        mid, low, high = [], [], []
        for r in line:
            s = r[key]
            m = transform(s["mean"])
            lo = transform(s["ci_low"]) if s["ci_low"] is not None else m
            hi = transform(s["ci_high"]) if s["ci_high"] is not None else m
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
            mid, low, high = bars(line, "auroc_gain", lambda x: 100 * x)
            drawn = ax_gain.errorbar([r["budget"] for r in line], mid, yerr=[low, high], marker="o", capsize=3,
                                     label=f"{method} vs {other}")
            colour.setdefault(other.partition("/")[0], drawn.lines[0].get_color())
            timed = [r for r in line if r["log_speedup"]]
            if timed:
                mid, low, high = bars(timed, "log_speedup", math.exp)
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
        for ax, ylabel in ((ax_gain, "AUROC gain of FIRM, points (95 % CI)"), (ax_speed, "speed-up of FIRM, x (95 % CI)")):
            ax.set_xscale("log")
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.set_xlabel("budget (epochs)", fontsize=8)
            ax.set_ylabel(ylabel, fontsize=8)
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


def write_report(out_dir: str | Path, command: str = "") -> Path:
    """Write ``results.json`` (``records``, ``comparisons``, ``per_class``, ``ladder``),
    ``report.md``, ``curves.png``, ``curves_per_class.png`` and, with several budgets,
    ``ladder.png``."""
    out = Path(out_dir)
    runs, records = load_runs(out)
    if not records:
        write_json(out / RESULTS, {"records": [], "comparisons": [], "per_class": [], "ladder": None})
        atomic_write(out / BENCH_REPORT, "# firm bench\n\nNo finished runs yet.\n")
        return out / BENCH_REPORT
    stats = bench_statistics(records)
    changes = _gain_changes(stats)
    ladder = _ladder_json(stats, changes)
    write_json(out / RESULTS, _clean({"records": records, "methods": stats["methods"], **_statistics_json(stats),
                                             "ladder": ladder}))
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
        for b in _budget_groups(records):
            for k, v in learning_curves([r for r in records if r.get("budget") == b]).items():
                curves[k[:3] + (f"{k[3]} ({b} ep.)", k[4])] = v
    _plot_curves(curves, out / "curves.png", per_class=False)
    _plot_curves(curves, out / "curves_per_class.png", per_class=True)
    md += ["Learning curves: `curves.png` (mean over classes) and `curves_per_class.png`.", ""]
    atomic_write(out / BENCH_REPORT, "\n".join(md))
    return out / BENCH_REPORT
