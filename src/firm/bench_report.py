"""The bench report: tables shaped like the paper's, convergence figures and learning curves.

Everything here is computed from the records of finished runs (``firm.bench.load_records``),
so the report can be rebuilt at any time, from any subset of shards.
"""
from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from .data import CLASS_NAMES
from .evaluation import aulc, epochs_to_reach
from .serialization import atomic_write, write_json

__all__ = ["final_aurocs", "learning_curves", "convergence", "write_report", "PAPER_CLAIMS"]

PAPER_CLAIMS = (
    "The paper (ResNet-18 width 64, 2,000 epochs, batch 32, 5 seeds, official CIFAR-10 files) reports on CIFAR-10 a "
    "mean AUROC gain of FIRM of 6.2 points over NT-Xent and 2 points over Rot-SupCon (up to 16.9 on single classes), "
    "about 12x faster convergence than NT-Xent and 7x faster than Rot-SupCon, and robustness across scoring functions."
)
LOSS_ORDER = ["firm", "ntxent", "supcon", "rotsupcon"]
Key = tuple  # (dataset, eval_set, normal_class, loss, seed)


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def _mean_cell(class_means: list[float], n_classes: int) -> str:
    """Bold mean of a loss's per-class AUROCs, naming how many classes it covers when not all."""
    if not class_means:
        return "-"
    cell = f"**{statistics.mean(class_means):.4f}**"
    return cell if len(class_means) == n_classes else f"{cell} ({len(class_means)} of {n_classes} classes)"


def _class_name(dataset: str, c: int) -> str:
    if c < 0:
        return "all (multi-class ID)"
    names = CLASS_NAMES.get(dataset)
    return f"{c} {names[c]}" if names and c < len(names) else str(c)


def final_aurocs(records: list[dict], scorer: str = "cos1", tta: str = "none") -> dict[Key, float]:
    return {(r["dataset"], r["eval_set"], r["normal_class"], r["loss"], r["seed"]): r["auroc"]
            for r in records if r["final"] and r["scorer"] == scorer and r["tta"] == tta}


def learning_curves(records: list[dict]) -> dict[Key, tuple[list[float], list[float]]]:
    """cos1 AUROC against epoch for each run (evaluation set)."""
    points = defaultdict(dict)
    for r in records:
        if not r["final"] and r["scorer"] == "cos1" and r["tta"] == "none":
            points[(r["dataset"], r["eval_set"], r["normal_class"], r["loss"], r["seed"])][r["epoch"]] = r["auroc"]
    return {k: (sorted(v), [v[e] for e in sorted(v)]) for k, v in points.items()}


def convergence(curves: dict[Key, tuple[list[float], list[float]]], final: dict[Key, float],
                baseline: str = "ntxent") -> dict[str, dict]:
    """Per loss: AULC of each run, and the epochs each run needs to reach the baseline's final
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


def _speedup(conv: dict, loss: str, other: str) -> tuple[float, int]:
    """Mean epochs of ``other`` over mean epochs of ``loss`` on the runs where both reach the
    target; returns the factor and the number of such runs."""
    a, b = conv.get(loss, {}).get("epochs", {}), conv.get(other, {}).get("epochs", {})
    both = [k for k in a if k in b and math.isfinite(a[k]) and math.isfinite(b[k])]
    if not both:
        return math.nan, 0
    mean_loss = statistics.mean(a[k] for k in both)
    return (statistics.mean(b[k] for k in both) / mean_loss if mean_loss > 0 else math.inf), len(both)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _plot_curves(curves: dict, path: Path, per_class: bool) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = defaultdict(lambda: defaultdict(list))
    for (dataset, eval_set, cls, loss, _seed), (epochs, values) in curves.items():
        panel = (dataset, eval_set, cls) if per_class else (dataset, eval_set)
        groups[panel][loss].append((epochs, values))
    panels = sorted(groups)
    cols = min(5, len(panels)) or 1
    rows = math.ceil(len(panels) / cols) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        for loss in sorted(groups[panel], key=lambda x: LOSS_ORDER.index(x) if x in LOSS_ORDER else 99):
            runs = groups[panel][loss]
            common = sorted(set.intersection(*[set(e) for e, _ in runs]))
            mean = [statistics.mean(v[e.index(x)] for e, v in runs) for x in common]
            ax.plot(common, mean, marker=".", label=loss if per_class else f"{loss} ({len(runs)} runs)")
        title = f"{panel[0]} {_class_name(panel[0], panel[2])}" if per_class else f"{panel[0]} ({panel[1]}), mean"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_ylabel("cos1 AUROC", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def _dataset_section(dataset: str, eval_set: str, records: list[dict], final: dict[Key, float],
                     curves: dict, losses: list[str]) -> list[str]:
    """The paper-shaped tables of one dataset and evaluation set."""
    mine = [r for r in records if r["dataset"] == dataset and r["eval_set"] == eval_set]
    final = {k: v for k, v in final.items() if k[:2] == (dataset, eval_set)}
    classes = sorted({k[2] for k in final})

    def per_class(scores: dict[Key, float], c: int, loss: str) -> list[float]:
        return [v for k, v in scores.items() if k[2:4] == (c, loss)]

    rows = [[_class_name(dataset, c)] + [_mean_std(per_class(final, c, loss)) for loss in losses] for c in classes]
    means = {loss: [statistics.mean(per_class(final, c, loss)) for c in classes if per_class(final, c, loss)]
             for loss in losses}
    rows.append(["**mean**"] + [_mean_cell(means[loss], len(classes)) for loss in losses])
    md = [f"## {dataset}, {eval_set} set: final AUROC (cos1, no ensemble)", ""]
    missing = {loss: len(classes) - len(means[loss]) for loss in losses if len(means[loss]) < len(classes)}
    if missing:
        md += ["Incomplete grid: " + ", ".join(f"{loss} lacks {n} of {len(classes)} classes" for loss, n in missing.items())
               + ". Means over different sets of classes do not compare; the gains below use only the classes that "
               "both losses finished.", ""]
    md += [_table(["normal class"] + losses, rows), ""]
    if "firm" in losses:
        gains = []
        for base in [x for x in losses if x != "firm"]:
            diffs = [statistics.mean(per_class(final, c, "firm")) - statistics.mean(per_class(final, c, base))
                     for c in classes if per_class(final, c, "firm") and per_class(final, c, base)]
            if diffs:
                gains.append([base, f"{100 * statistics.mean(diffs):+.2f}", f"{100 * max(diffs):+.2f}",
                              f"{100 * min(diffs):+.2f}", f"{sum(d > 0 for d in diffs)}/{len(diffs)}"])
        md += ["Gain of FIRM over each baseline, in AUROC points:", "",
               _table(["baseline", "mean gain", "largest (one class)", "smallest", "classes FIRM wins"], gains), ""]
    srows = []
    for scorer, tta in sorted({(r["scorer"], r["tta"]) for r in mine if r["final"]}):
        scores = final_aurocs(mine, scorer, tta)
        class_means = {loss: [statistics.mean(per_class(scores, c, loss)) for c in classes if per_class(scores, c, loss)]
                       for loss in losses}
        srows.append([scorer, tta] + [_mean_std(class_means[loss]) for loss in losses])
    md += ["### Scorer robustness (mean over classes, ± std across classes)", "",
           _table(["scorer", "ensemble"] + losses, srows), ""]
    mine_curves = {k: v for k, v in curves.items() if k[:2] == (dataset, eval_set)}
    if mine_curves:
        conv = convergence(mine_curves, final)
        crow = []
        for loss in losses:
            c = conv.get(loss, {"aulc": [], "epochs": {}})
            reached = [e for e in c["epochs"].values() if math.isfinite(e)]
            factor, n = _speedup(conv, "firm", loss) if loss != "firm" else (math.nan, 0)
            crow.append([loss, _mean_std(c["aulc"]), f"{statistics.mean(reached):.2f}" if reached else "never",
                         f"{len(reached)}/{len(c['epochs'])}", f"{factor:.2f}x ({n} runs)" if n else "-"])
        md += ["### Convergence", "",
               "AULC: area under the cos1 AUROC-vs-epoch curve, x scaled to [0, 1], Simpson's rule (epoch 0 = the "
               "untrained encoder). Target: each run's NT-Xent final AUROC on the same class and seed. Speed-up of "
               "FIRM: mean epochs the baseline needs to reach the target / mean epochs FIRM needs (runs where both "
               "reach it).", "",
               _table(["loss", "AULC", "mean epochs to target", "runs reaching it", "FIRM speed-up vs this loss"], crow), ""]
    return md


def _machines(runs: list[dict]) -> str:
    """Where the runs were trained, as each run recorded it (a shared grid can span machines)."""
    seen = sorted({f"{m['device_name']}, {m['cpu_count']} cores, {m['torch_threads']} torch threads, torch {m['torch']}"
                   if (m := r.get("machine")) else "not recorded" for r in runs})
    return "; ".join(seen)


def write_report(out_dir: str | Path, command: str = "") -> Path:
    """Write ``results.json``, ``report.md``, ``curves.png`` and ``curves_per_class.png``."""
    from .bench import load_records
    out = Path(out_dir)
    runs = [json.loads(f.read_text()) for f in sorted((out / "runs").glob("*.json"))]
    records = load_records(out)
    write_json(out / "results.json", records)
    if not records:
        atomic_write(out / "report.md", "# firm bench\n\nNo finished runs yet.\n")
        return out / "report.md"
    final = final_aurocs(records)
    curves = learning_curves(records)
    losses = sorted({k[3] for k in final}, key=lambda x: LOSS_ORDER.index(x) if x in LOSS_ORDER else 99)
    md = ["# firm bench report", ""]
    if command:
        md += [f"Command: `{command}`", ""]
    wall = sum(r["total_seconds"] for r in runs)
    md += [f"Machine: {_machines(runs)}. Runs: {len(runs)}, total wall time {wall / 3600:.2f} h "
           f"({wall / max(len(runs), 1) / 60:.1f} min per run).", "",
           f"Preset: `{json.dumps(runs[0]['preset'])}`", "", f"> {PAPER_CLAIMS}", ""]
    for dataset, eval_set in sorted({k[:2] for k in final}):
        md += _dataset_section(dataset, eval_set, records, final, curves, losses)
    _plot_curves(curves, out / "curves.png", per_class=False)
    _plot_curves(curves, out / "curves_per_class.png", per_class=True)
    md += ["Learning curves: `curves.png` (mean over classes) and `curves_per_class.png`.", ""]
    atomic_write(out / "report.md", "\n".join(md))
    return out / "report.md"
