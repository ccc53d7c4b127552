"""How much the authors' checkpoint selection adds, and how it depends on how often the curve is evaluated.

For each bench folder given, at one budget: per method, the mean over runs of the last epoch's AUROC and of
the AUROC at the learning-curve evaluation with the best test AUROC of the selecting curve (the authors' cos5
with the rotation ensemble where the runs recorded it, else cos1), choosing among every evaluation and among
every tenth epoch's only. Measured from committed records; nothing here picks a model.

    python benchmarks/selection_effect.py docs/results/cifar10-ladder docs/results/cifar10-selection --out DIR

prints one table and writes DIR/selection_effect.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from firm.bench_stats import SELECTION, best_checkpoint, final_aurocs, learning_curves, load_runs, method_order

TARGETS = (("cos1", "none"), SELECTION)
STRIDES = (1, 10)
"""Choose among every evaluation, or among every tenth epoch's (the authors' spacing)."""


def folder_rows(folder: Path, budget: int) -> list[dict]:
    """One row per (method, target scorer/ensemble, stride) of the folder's runs at ``budget`` epochs; a
    stride finer than the curve's own spacing is left out (it repeats the next one)."""
    _, records = load_runs(folder)
    records = [r for r in records if r.get("budget") in (budget, None)]
    rows = []
    for target in TARGETS:
        last, curves = final_aurocs(records, *target), learning_curves(records, *target)
        if not curves:
            continue
        spacing = min(e for epochs, _ in curves.values() for e in epochs if e > 0)
        for stride in sorted({max(s, spacing) for s in STRIDES}):
            best = best_checkpoint(records, *target, every=stride)
            for method in method_order({k[3] for k in last}):
                keys = [k for k in last if k[3] == method and k in best]
                if keys:
                    mean_last = statistics.fmean(last[k] for k in keys)
                    mean_best = statistics.fmean(best[k][0] for k in keys)
                    rows.append({"folder": folder.name, "method": method, "target": "/".join(target),
                                 "selected_by": best[keys[0]][1], "every": stride, "runs": len(keys),
                                 "last_epoch": mean_last, "best_test_checkpoint": mean_best,
                                 "added_points": 100 * (mean_best - mean_last)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="bench folders holding runs/*.json")
    parser.add_argument("--budget", type=int, default=100, help="the runs' total epochs (default 100)")
    parser.add_argument("--out", type=Path, required=True, help="folder for selection_effect.json")
    args = parser.parse_args()
    rows = [row for folder in args.folders for row in folder_rows(folder, args.budget)]
    print(f"{'folder':20} {'method':8} {'AUROC of':12} {'chosen by':12} {'every':>5} {'runs':>4} "
          f"{'last':>7} {'best':>7} {'added':>6}")
    for r in rows:
        print(f"{r['folder']:20} {r['method']:8} {r['target']:12} {r['selected_by']:12} {r['every']:>5} "
              f"{r['runs']:>4} {r['last_epoch']:7.4f} {r['best_test_checkpoint']:7.4f} {r['added_points']:+6.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "selection_effect.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
