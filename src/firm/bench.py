"""``firm bench``: the paper's comparison as one resumable grid of runs.

Every run (dataset x normal class x loss x seed) trains with the identical budget, data order
and views (the batch plan and the augmentation generators depend on the seed only, never on the
loss), records a learning curve (cos1 AUROC every ``eval_every`` epochs) and, at the end, every
scorer under every test-time ensemble of the preset. Each finished run is one JSON file written
atomically, so a rerun skips what is done and ``--shard i/n`` splits the grid between machines.

``split="validation"`` evaluates on a split of the *training* data instead (held-out normal
images plus images of the other classes, as DROC did); it is what presets are tuned on.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import ImageSet, load_dataset, load_image_folder, one_class_split, subsample, validation_split
from .evaluation import evaluate_scorers
from .models import Encoder, ModelConfig
from .scoring import SCORERS
from .serialization import write_json
from .training import TrainConfig, Trainer, machine_info

__all__ = ["PRESETS", "RunSpec", "preset_configs", "plan_grid", "run_grid", "run_one", "load_records", "bench_command"]

# ``paper`` is the authors' setting. ``cpu`` was chosen on validation splits of the CIFAR-10
# training set (docs/results/cpu_preset_tuning.md); it is sized for the 10 CIFAR-10 classes x 3
# losses x 1 seed to take about 3 hours on a 2-core machine.
PRESETS: dict[str, dict] = {
    "paper": dict(width=64, head_hidden=1024, head_layers=7, head_out=128, epochs=2000, batch_size=32, lr=0.01,
                  id_share=None, train_images=None, eval_every=100, final_tta=["none", "angled", "ensemble"],
                  channels_last=False, amp=True),
    "cpu": dict(width=16, head_hidden=512, head_layers=2, head_out=128, epochs=10, batch_size=64, lr=0.02,
                id_share=None, train_images=2000, eval_every=1, final_tta=["none", "angled"],
                channels_last=True, amp=False),
}
_MODEL_KEYS = ("width", "head_hidden", "head_layers", "head_out")
_TRAIN_KEYS = ("epochs", "batch_size", "lr", "id_share", "channels_last", "amp", "tau", "momentum", "weight_decay", "shifts")


@dataclass(frozen=True)
class RunSpec:
    """One cell of the grid. ``normal_class=-1`` is the multi-class-ID setting (all classes ID)."""

    dataset: str
    normal_class: int
    loss: str
    seed: int

    @property
    def key(self) -> str:
        cls = "all" if self.normal_class < 0 else f"c{self.normal_class}"
        return f"{self.dataset}-{cls}-{self.loss}-s{self.seed}"


def preset_configs(preset: dict, loss: str, seed: int, device: str = "auto") -> tuple[ModelConfig, TrainConfig]:
    """Model and training configs of a preset for one loss and seed."""
    model = ModelConfig(**{k: preset[k] for k in _MODEL_KEYS if k in preset})
    train = TrainConfig(loss=loss, seed=seed, device=device, checkpoint_every=0, eval_every=preset.get("eval_every", 0),
                        **{k: preset[k] for k in _TRAIN_KEYS if k in preset})
    return model, train


def plan_grid(datasets: list[str], classes: list[int] | None, losses: list[str], seeds: list[int],
              n_classes: dict[str, int], shard: tuple[int, int] = (0, 1)) -> list[RunSpec]:
    """The grid in a fixed order, and this shard's share of it (every n-th run)."""
    runs = [RunSpec(d, c, loss, s) for d in datasets for c in (classes if classes is not None else range(n_classes[d]))
            for s in seeds for loss in losses]
    i, n = shard
    if not 0 <= i < n:
        raise ValueError(f"shard {i}/{n}: the index must be in 0..{n - 1}")
    return runs[i::n]


class _DataCache:
    """Datasets (and OOD sets) read once per process."""

    def __init__(self, data_root: str | None):
        self.data_root = data_root
        self._sets: dict[str, tuple[ImageSet, ImageSet]] = {}

    def get(self, name: str) -> tuple[ImageSet, ImageSet]:
        if name not in self._sets:
            if Path(name).is_dir():
                folder = load_image_folder(name, name=Path(name).name)
                self._sets[name] = (folder, folder)
            else:
                self._sets[name] = load_dataset(name, self.data_root)
        return self._sets[name]


EvalSet = tuple[str, ImageSet, torch.Tensor]  # (name, images, is_anomaly)


def _split(cache: _DataCache, spec: RunSpec, split: str, ood: list[str]) -> tuple[ImageSet, list[EvalSet]]:
    """Training images and the evaluation sets ``(name, images, is_anomaly)`` of one run."""
    train, test = cache.get(spec.dataset)
    if spec.normal_class >= 0:
        if split == "validation":
            normal, val, y = validation_split(train, spec.normal_class, holdout=0.1, anomalies=1500, seed=spec.seed)
            return normal, [("validation", val, y)]
        normal, test, y = one_class_split(train, test, spec.normal_class)
        return normal, [("test", test, y)]
    if not ood:
        raise ValueError("the multi-class-ID setting (all classes normal) needs --ood DATASET_OR_FOLDER")
    sets = []
    for name in ood:
        other = cache.get(name)[1]
        images = ImageSet(torch.cat([test.images, other.images]), torch.cat([test.labels, other.labels]), test.classes)
        y = torch.cat([torch.zeros(len(test), dtype=torch.long), torch.ones(len(other), dtype=torch.long)])
        sets.append((f"ood:{Path(name).name}", images, y))
    return train, sets


def run_one(spec: RunSpec, preset: dict, cache: _DataCache, split: str = "test", ood: list[str] = (),
            device: str = "auto", progress: bool = True) -> dict:
    """Train one run and return its result: meta data plus records of the learning curve and the
    final scores (``scorer``, ``tta``, ``epoch``, ``auroc`` and the run's identity)."""
    normal, eval_sets = _split(cache, spec, split, list(ood))
    normal = subsample(normal, preset.get("train_images"), spec.seed)
    class_labels = normal.labels if spec.normal_class < 0 else torch.zeros(len(normal), dtype=torch.long)
    model_cfg, train_cfg = preset_configs(preset, spec.loss, spec.seed, device)
    torch.manual_seed(spec.seed)
    model = Encoder(model_cfg)
    base = {"dataset": spec.dataset, "normal_class": spec.normal_class, "loss": spec.loss, "seed": spec.seed, "split": split}
    records: list[dict] = []

    def curve(m: Encoder, epoch: int) -> dict:
        out = {}
        for name, images, y in eval_sets:
            recs, _ = evaluate_scorers(m, normal.images, images.images, y, ["cos1"], "none")
            records.append({**base, "eval_set": name, "scorer": "cos1", "tta": "none", "epoch": epoch,
                            "final": False, "auroc": recs[0]["auroc"]})
            out[f"auroc_{name}"] = recs[0]["auroc"]
        return out

    start = time.perf_counter()
    trainer = Trainer(model, train_cfg, normal.images, class_labels, evaluate=curve, progress=progress)
    if train_cfg.eval_every:
        curve(model, 0)  # the untrained encoder: the curve's starting point
    trainer.train()
    train_seconds = time.perf_counter() - start
    for name, images, y in eval_sets:
        recs, _ = evaluate_scorers(model, normal.images, images.images, y, list(preset.get("scorers", SCORERS)),
                                   preset.get("final_tta", ["none"]))
        records += [{**base, "eval_set": name, "epoch": train_cfg.epochs, "final": True, **r} for r in recs]
    return {"run": spec.key, **base, "train_images": len(normal), "train_seconds": train_seconds,
            "total_seconds": time.perf_counter() - start, "preset": preset, "machine": machine_info(trainer.device),
            "records": records}


def load_records(out_dir: str | Path) -> list[dict]:
    """All records of the finished runs in a bench folder."""
    records = []
    for f in sorted((Path(out_dir) / "runs").glob("*.json")):
        records += json.loads(f.read_text())["records"]
    return records


def run_grid(specs: list[RunSpec], preset: dict, out_dir: str | Path, data_root: str | None = None,
             split: str = "test", ood: list[str] = (), device: str = "auto", progress: bool = True,
             log=print) -> list[dict]:
    """Run every spec not already done in ``out_dir/runs`` and return all finished results."""
    runs_dir = Path(out_dir) / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    cache = _DataCache(data_root)
    results = []
    for spec in tqdm(specs, desc="bench", disable=not progress, unit="run"):
        path = runs_dir / f"{spec.key}.json"
        if path.exists():
            done = json.loads(path.read_text())
            if done.get("preset") != json.loads(json.dumps(preset)) or done.get("split") != split:
                raise ValueError(f"{path} holds a run with other settings (preset or split); "
                                 "use another --out folder or remove that file")
            log(f"skip {spec.key} (done)")
            results.append(done)
            continue
        result = run_one(spec, preset, cache, split, ood, device, progress)
        write_json(path, result)
        final = [r for r in result["records"] if r["final"] and r["scorer"] == "cos1" and r["tta"] == "none"]
        log(f"{spec.key}: cos1 AUROC " + ", ".join(f"{r['eval_set']} {r['auroc']:.4f}" for r in final)
            + f" ({result['total_seconds']:.0f} s)")
        results.append(result)
    return results


def _parse_overrides(items: list[str]) -> dict:
    import yaml
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        out[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return out


def bench_command(args) -> None:
    """``firm bench``: run this shard's share of the grid, then rebuild the report from every
    finished run in the folder (all shards)."""
    from .bench_report import write_report
    from .cli import _csv
    from .data import NUM_CLASSES
    datasets = _csv(args.dataset)
    preset = {**PRESETS[args.preset], **_parse_overrides(args.set)}
    unknown = set(preset) - set(PRESETS["paper"]) - {"tau", "momentum", "weight_decay", "shifts", "scorers"}
    if unknown:
        raise ValueError(f"--set: unknown preset keys {sorted(unknown)}")
    classes = None if not args.classes else [-1 if c == "all" else int(c) for c in _csv(args.classes)]
    i, _, n = args.shard.partition("/")
    shard = (int(i), int(n or 1))
    counts = {d: NUM_CLASSES.get(d, 0) if not Path(d).is_dir() else 1 for d in datasets}
    specs = plan_grid(datasets, classes, _csv(args.losses), [int(s) for s in _csv(args.seeds)], counts, shard)
    out = Path(args.out)
    if not args.report_only:
        run_grid(specs, preset, out, args.data_root, args.split, _csv(args.ood), args.device,
                 progress=not args.quiet)
    # The command that produces (or resumes) these runs: a --report-only rebuild names the bench itself.
    command = "firm " + " ".join(a for a in sys.argv[1:] if a != "--report-only") if sys.argv else ""
    report = write_report(out, command=command)
    print(f"report written to {report}")
