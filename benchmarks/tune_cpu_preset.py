"""Choose the ``cpu`` bench preset on validation splits of the CIFAR-10 *training* set.

Each candidate trains FIRM and NT-Xent on two normal classes with the same number of training
samples (so a faster-looking config cannot win by seeing more data) and is scored by cos1 AUROC
on held-out normal training images plus images of the other classes (firm.bench, split
"validation"). The test split is never read. Writes DIR/tuning.json and prints a table.

    python benchmarks/tune_cpu_preset.py --data-root ../shared/data --out runs/tune
"""
import argparse
import json
import time
from pathlib import Path

from firm.bench import PRESETS, RunSpec, run_grid
from firm.shifts import BatchPlan

SAMPLES = 48_000  # training samples (batch slots) per run, equal for every candidate
CANDIDATES = {
    "base: b64 lr0.02 head512x2 pool": {},
    "lr0.06": {"lr": 0.06},
    "lr0.006": {"lr": 0.006},
    "b256 lr0.08": {"batch_size": 256, "lr": 0.08},
    "id_share0.5": {"id_share": 0.5},
    "paper head 1024x7": {"head_hidden": 1024, "head_layers": 7},
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--out", default="runs/tune")
    ap.add_argument("--classes", default="0,4")
    ap.add_argument("--losses", default="firm,ntxent")
    args = ap.parse_args()
    classes = [int(c) for c in args.classes.split(",")]
    losses = args.losses.split(",")
    summary = []
    for name, overrides in CANDIDATES.items():
        preset = {**PRESETS["cpu"], **overrides, "scorers": ["cos1"], "final_tta": ["none"], "eval_every": 0}
        plan = BatchPlan(preset["train_images"], preset["batch_size"], 3, preset["id_share"])
        preset["epochs"] = max(1, round(SAMPLES / (plan.steps_per_epoch() * preset["batch_size"])))
        specs = [RunSpec("cifar10", c, loss, 0) for c in classes for loss in losses]
        start = time.time()
        results = run_grid(specs, preset, Path(args.out) / name.split(":")[0].replace(" ", "_"), args.data_root,
                           split="validation", progress=False)
        by_loss = {loss: [r2["auroc"] for r in results if r["loss"] == loss for r2 in r["records"] if r2["final"]]
                   for loss in losses}
        row = {"candidate": name, "overrides": overrides, "epochs": preset["epochs"],
               "mean_auroc": sum(sum(v) for v in by_loss.values()) / sum(len(v) for v in by_loss.values()),
               **{f"auroc_{loss}": sum(v) / len(v) for loss, v in by_loss.items()},
               "seconds_per_run": sum(r["total_seconds"] for r in results) / len(results),
               "wall_seconds": time.time() - start}
        summary.append(row)
        print(json.dumps(row), flush=True)
        (Path(args.out) / "tuning.json").write_text(json.dumps(summary, indent=2))
    print("\n| candidate | epochs | mean | " + " | ".join(losses) + " | s/run |")
    print("|---|---|---|" + "---|" * len(losses) + "---|")
    for r in summary:
        print(f"| {r['candidate']} | {r['epochs']} | {r['mean_auroc']:.4f} | "
              + " | ".join(f"{r['auroc_' + loss]:.4f}" for loss in losses) + f" | {r['seconds_per_run']:.0f} |")


if __name__ == "__main__":
    main()
