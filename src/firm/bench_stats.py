"""A bench folder's records turned into statistics: final AUROCs, learning curves, paired gains,
convergence races, scorer robustness, the best-test-checkpoint figure and the budget ladder.

Everything is computed from the run results in ``out_dir/runs/*.json``, so the statistics can
be rebuilt at any time, from any subset of shards. This module reads those files itself and
imports neither ``bench`` nor ``cli``; ``bench_report`` renders what it returns.

Methods. A method is a loss, or ``loss/layout`` (e.g. ``firm/concat``, ``firm/pairwise``) when
runs of one loss use several loss layouts. FIRM in each of its layouts is compared with every
other method, paired over the (class, seed) cells both ran, the class as the unit
(``firm.stats``).

Budgets. A run's ``budget`` is its total epochs. Runs without ``loss_mode`` / ``budget`` (older
folders) are one layout and one budget.
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from .evaluation import aulc, epochs_to_reach
from .rundir import BENCH_RUNS
from .serialization import read_json
from .stats import PairedResult, compare, compare_differences, per_class_summary, race

__all__ = ["final_aurocs", "learning_curves", "method_labels", "method_order", "load_runs",
           "target_epochs", "speedup_log_ratios", "best_checkpoint", "bench_statistics",
           "statistics_json", "gain_changes", "ladder_json", "ladder_pairs", "change_key", "find_comparison",
           "budget_groups", "PAPER_LADDER", "SELECTION"]

PAPER_LADDER = {"dataset": "cifar10", "budget": 2000, "seeds": 5,
                "gain_points": {"ntxent": 6.2, "rotsupcon": 2.0}, "speedup": {"ntxent": 12.0, "rotsupcon": 7.0}}
"""The paper's CIFAR-10 claims as points on the budget ladder (gain in AUROC points, speed-up factor)."""
SELECTION = ("cos5", "angled")
"""The authors' checkpoint selection: the learning-curve evaluation with the best test AUROC of this
(scorer, ensemble). Where a run's curve does not record it, its cos1 curve selects instead."""
LOSS_ORDER = ["firm", "ntxent", "supcon", "rotsupcon"]
MODE_ORDER = ["concat", "pairwise"]
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


def _key(r: dict) -> Key:
    return r["dataset"], r["eval_set"], _class(r["normal_class"]), _method(r), r["seed"]


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


def method_order(methods) -> list[str]:
    """Methods in the paper's order of losses, then layouts."""
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


def final_aurocs(records: list[dict], scorer: str = "cos1", tta: str = "none") -> dict[Key, float]:
    """Final AUROC of each run for one scorer and ensemble (records of one budget)."""
    return {_key(r): r["auroc"] for r in records if r["final"] and r["scorer"] == scorer and r["tta"] == tta}


def learning_curves(records: list[dict], scorer: str = "cos1", tta: str = "none"
                    ) -> dict[Key, tuple[list[float], list[float]]]:
    """AUROC against epoch for each run (evaluation set), for one scorer and ensemble."""
    points = defaultdict(dict)
    for r in records:
        if not r["final"] and r["scorer"] == scorer and r["tta"] == tta:
            points[_key(r)][r["epoch"]] = r["auroc"]
    return {k: (sorted(v), [v[e] for e in sorted(v)]) for k, v in points.items()}


def target_epochs(firm_curves: dict[Cell, tuple[list, list]], other_curves: dict[Cell, tuple[list, list]],
                  other_final: dict[Cell, float]) -> tuple[dict[Cell, float], dict[Cell, float], int]:
    """Per (class, seed): the epochs FIRM and the other method need to first reach the other
    method's final AUROC (linear interpolation between evaluations; ``inf``: FIRM never does, a
    censored cell). A cell is undefined, dropped and counted, when the other method's final AUROC
    is at or below its own untrained encoder's (it "reaches" its target at epoch 0, having learnt
    nothing that a speed can be measured against). Returns FIRM's epochs, the other's, the count."""
    firm, other, undefined = {}, {}, 0
    for cell in sorted(firm_curves.keys() & other_curves.keys() & other_final.keys()):
        target = other_final[cell]
        e_other = epochs_to_reach(*other_curves[cell], target)
        if e_other == 0 or math.isinf(e_other):
            undefined += 1
            continue
        firm[cell], other[cell] = epochs_to_reach(*firm_curves[cell], target), e_other
    return firm, other, undefined


def speedup_log_ratios(firm_epochs: dict[Cell, float], other_epochs: dict[Cell, float]) -> dict[Cell, float]:
    """``log(epochs the other method needs / epochs FIRM needs)`` over the cells where FIRM reached
    the target after epoch 0 (a ratio's natural paired scale is its log: 2x and 0.5x cancel, and
    the mean of log-ratios is the log of the geometric-mean speed-up). Censored cells are not
    here: ``race`` counts them."""
    return {c: math.log(other_epochs[c] / e) for c, e in firm_epochs.items() if math.isfinite(e) and e > 0}


def best_checkpoint(records: list[dict], scorer: str = "cos1", tta: str = "none",
                    every: int = 1) -> dict[Key, tuple[float, str]]:
    """The authors' selection, measured and never used: per run, the learning-curve AUROC
    (``scorer``, ``tta``) at the evaluation (after epoch 0, at an epoch divisible by ``every``) with
    the best test AUROC of ``SELECTION``, or of ``scorer``/``tta`` itself where the curve does not
    record ``SELECTION``. Optimistic by construction (the test labels choose the epoch; the more
    candidates, the more so). Returns ``{key: (AUROC, the selecting scorer/ensemble)}`` for runs
    whose curve has at least one such evaluation."""
    target = learning_curves(records, scorer, tta)
    chosen = learning_curves(records, *SELECTION)
    out = {}
    for key, (epochs, values) in target.items():
        by_epoch = dict(zip(epochs, values))
        sel_epochs, sel_values = chosen.get(key, ([], []))
        candidates = [(v, e) for e, v in zip(sel_epochs, sel_values) if e > 0 and e % every == 0 and e in by_epoch]
        label = "/".join(SELECTION)
        if not candidates:
            candidates = [(v, e) for e, v in by_epoch.items() if e > 0 and e % every == 0]
            label = f"{scorer}/{tta}"
        if candidates:
            best = max(candidates, key=lambda ve: (ve[0], -ve[1]))  # the earliest of equal bests
            out[key] = (by_epoch[best[1]], label)
    return out


# ----------------------------------------------------------------------------------------------
# Statistics


def budget_groups(records: list[dict]) -> list:
    """The budgets of the records, in increasing order, None (not recorded) last."""
    budgets = {r.get("budget") for r in records}
    return sorted(budgets, key=lambda b: (b is None, b if b is not None else 0))


def _cells(scores: dict[Key, float], method: str) -> dict[Cell, float]:
    return {(k[2], k[4]): v for k, v in scores.items() if k[3] == method}


def _pairs(present: list[str]) -> list[tuple[str, str]]:
    """(FIRM method, other method): each FIRM layout against every other method, each pair once."""
    firms = [m for m in present if _is_firm(m)]
    return [(f, other) for i, f in enumerate(firms) for other in present if other != f and other not in firms[:i]]


def _speed(firm_curves: dict, other_curves: dict, other_final: dict) -> dict | None:
    firm_e, other_e, undefined = target_epochs(firm_curves, other_curves, other_final)
    outcome = race(firm_e, other_e)
    if outcome is None:
        return None
    logs = speedup_log_ratios(firm_e, other_e)
    return {"race": outcome, "undefined": undefined,
            "result": compare(logs, {c: 0.0 for c in logs}) if logs else None}


def bench_statistics(records: list[dict]) -> dict:
    """Every paired comparison and per-class summary of a bench, grouped by dataset, evaluation
    set and budget: ``{"methods", "groups": [{dataset, eval_set, budget, methods, auroc, per_class,
    comparisons, robustness, selection, aulc}]}``. ``comparisons``: ``{method, other, metric,
    result: PairedResult}`` for the metrics ``auroc`` (final cos1 AUROC, no ensemble), ``aulc``
    and ``best_test`` (``best_checkpoint``), and ``{method, other, metric, race, undefined, result}``
    for convergence to the other's final AUROC (``speed``) and to its best test checkpoint's
    (``speed_best_test``). ``robustness``: the AUROC
    comparison of every pair under every final scorer and ensemble. ``selection``: per method,
    its mean last-epoch and best-test-checkpoint AUROC over classes."""
    methods = method_order({_method(r) for r in records})
    groups = []
    for budget in budget_groups(records):
        mine = [r for r in records if r.get("budget") == budget]
        final = final_aurocs(mine)
        curves = learning_curves(mine)
        best = best_checkpoint(mine)
        for dataset, eval_set in sorted({k[:2] for k in final}):
            where = (dataset, eval_set)
            fin = {k: v for k, v in final.items() if k[:2] == where}
            present = method_order({k[3] for k in fin})
            auroc = {m: _cells(fin, m) for m in present}
            curve = {m: {(k[2], k[4]): v for k, v in curves.items() if k[:2] == where and k[3] == m} for m in present}
            area = {m: {c: aulc(*v) for c, v in curve[m].items() if len(v[0]) >= 2} for m in present}
            picked = {m: {(k[2], k[4]): v[0] for k, v in best.items() if k[:2] == where and k[3] == m}
                      for m in present}
            informative = any(len(e) > 2 for m in present for e, _ in curve[m].values())
            comps, robust = [], []
            for f, other in _pairs(present):
                entry = dict(method=f, other=other)
                metrics = [("auroc", auroc[f], auroc[other]), ("aulc", area[f], area[other])]
                if informative:
                    metrics.append(("best_test", picked[f], picked[other]))
                for metric, a, b in metrics:
                    result = compare(a, b)
                    if result is not None:
                        comps.append({**entry, "metric": metric, "result": result})
                speed = _speed(curve[f], curve[other], auroc[other])
                if speed:
                    comps.append({**entry, "metric": "speed", **speed})
                chosen = _speed(curve[f], curve[other], picked[other]) if informative else None
                if chosen:
                    comps.append({**entry, "metric": "speed_best_test", **chosen})
            for scorer, tta in sorted({(r["scorer"], r["tta"]) for r in mine if r["final"]}):
                scores = {k: v for k, v in final_aurocs(mine, scorer, tta).items() if k[:2] == where}
                for f, other in _pairs(present):
                    result = compare(_cells(scores, f), _cells(scores, other))
                    if result is not None:
                        robust.append(dict(scorer=scorer, tta=tta, method=f, other=other, result=result))
            selection = {}
            if informative:
                for m in present:
                    cells = auroc[m].keys() & picked[m].keys()
                    if cells:
                        last = per_class_summary({c: auroc[m][c] for c in cells})
                        top = per_class_summary({c: picked[m][c] for c in cells})
                        selection[m] = {"last": sum(v[0] for v in last.values()) / len(last),
                                        "best_test": sum(v[0] for v in top.values()) / len(top),
                                        "classes": len(last), "runs": len(cells),
                                        "selected_by": sorted({best[k][1] for k in best
                                                               if k[:2] == where and k[3] == m})}
            groups.append(dict(dataset=dataset, eval_set=eval_set, budget=budget, methods=present, auroc=auroc,
                               per_class={m: per_class_summary(auroc[m]) for m in present}, comparisons=comps,
                               robustness=robust, selection=selection,
                               aulc={m: list(area[m].values()) for m in present}))
    return {"methods": methods, "groups": groups}


def find_comparison(group: dict, method: str, other: str, metric: str) -> dict | None:
    """The comparison of ``method`` with ``other`` in ``metric`` within a group, if any."""
    return next((c for c in group["comparisons"]
                 if (c["method"], c["other"], c["metric"]) == (method, other, metric)), None)


def _speed_json(c: dict) -> dict:
    return {"race": c["race"].to_dict(), "undefined": c["undefined"],
            "log_speedup": c["result"].to_dict() if c["result"] else None}


def statistics_json(stats: dict, text) -> dict:
    """The comparisons, robustness rows, selection figures and per-class summaries as JSON rows;
    ``text(comparison)`` gives each comparison's one-line reading."""
    comparisons, robustness, per_class, selection = [], [], [], []
    for g in stats["groups"]:
        where = {"dataset": g["dataset"], "eval_set": g["eval_set"], "budget": g["budget"]}
        for c in g["comparisons"]:
            head = {**where, "method": c["method"], "other": c["other"], "metric": c["metric"]}
            body = _speed_json(c) if "race" in c else c["result"].to_dict()
            comparisons.append({**head, **body, "text": text(c)})
        robustness += [{**where, "scorer": r["scorer"], "tta": r["tta"], "method": r["method"], "other": r["other"],
                        **r["result"].to_dict()} for r in g["robustness"]]
        selection += [{**where, "method": m, **s} for m, s in g["selection"].items()]
        for m, classes in g["per_class"].items():
            per_class += [{**where, "method": m, "normal_class": cls, "mean": mean, "std": std, "seeds": n}
                          for cls, (mean, std, n) in sorted(classes.items())]
    return {"comparisons": comparisons, "robustness": robustness, "selection": selection, "per_class": per_class}


def ladder_pairs(stats: dict) -> list[tuple[dict, dict]]:
    """(group, AUROC comparison) of every budget that is recorded."""
    return [(g, c) for g in stats["groups"] if g["budget"] is not None for c in g["comparisons"]
            if c["metric"] == "auroc"]


def _paper_claims(others: set[str]) -> dict:
    """PAPER_LADDER narrowed to the losses FIRM is compared with here, so that the ladder's table and
    plot (both read it from the ladder JSON) never show a claim against a loss the grid did not run."""
    keep = [o for o in PAPER_LADDER["gain_points"] if o in others]
    return {**PAPER_LADDER, "gain_points": {o: PAPER_LADDER["gain_points"][o] for o in keep},
            "speedup": {o: PAPER_LADDER["speedup"][o] for o in keep}}


def change_key(group: dict, comparison: dict) -> tuple:
    return group["dataset"], group["eval_set"], group["budget"], comparison["method"], comparison["other"]


def gain_changes(stats: dict) -> dict[tuple, tuple[int, PairedResult]]:
    """How the AUROC gain of each ladder comparison moved from the smallest budget at which both
    methods ran, keyed by ``change_key``: (that budget, the paired statistics of each (class, seed)
    cell's gain here minus its gain there). It answers "does the gap grow" on the same cells, which
    the per-budget figures cannot: they may hold different cells, and they ignore that a class is
    easy at every budget."""
    out = {}
    for group, c in ladder_pairs(stats):
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
            out[change_key(group, c)] = (base["budget"], compare_differences(diffs))
    return out


def ladder_json(stats: dict, changes: dict[tuple, tuple[int, PairedResult]]) -> dict | None:
    """The ladder (several recorded budgets): per budget and comparison, the AUROC gain, its change
    from the smallest budget and the convergence race and speed-up; the paper's claims beside them."""
    budgets = [b for b in budget_groups([{"budget": g["budget"]} for g in stats["groups"]]) if b is not None]
    if len(budgets) < 2:
        return None
    rows = []
    for g, c in ladder_pairs(stats):
        speed = find_comparison(g, c["method"], c["other"], "speed")
        change = changes.get(change_key(g, c))
        rows.append({"dataset": g["dataset"], "eval_set": g["eval_set"], "budget": g["budget"], "method": c["method"],
                     "other": c["other"], "auroc_gain": c["result"].to_dict(),
                     "gain_change": {"from_budget": change[0], **change[1].to_dict()} if change else None,
                     "speed": _speed_json(speed) if speed else None})
    others = {c["other"].partition("/")[0] for g in stats["groups"] for c in g["comparisons"]}
    return {"budgets": budgets, "rows": rows, "paper": _paper_claims(others)}
