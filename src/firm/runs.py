"""Runs on the standard datasets: ``firm train``, ``firm evaluate RUN_DIR`` and ``firm demo``.

A run folder holds ``run.json`` (the settings, written first, so a killed run can be resumed),
``log.jsonl`` (one line per epoch), ``checkpoint.safetensors`` and, when training has finished,
the model files of a :class:`~firm.detector.FIRMDetector` (``model.safetensors``,
``bank.safetensors``, ``config.json``) so that ``firm score`` and ``firm report`` accept it too.
"""
from __future__ import annotations

import csv
import io
import time
from pathlib import Path

import torch

from .data import ImageSet, load_dataset, load_image_folder, one_class_split, subsample
from .detector import FIRMDetector
from .evaluation import evaluate_scorers
from .features import FeatureSet
from .models import Encoder, ModelConfig
from .scoring import SCORERS
from .serialization import ModelFileError, atomic_write, load_model_dir, read_json, write_json
from .training import TrainConfig, Trainer

__all__ = ["RUN_FILE", "run_data", "train_run", "evaluate_run", "write_results", "demo"]

RUN_FILE = "run.json"


def run_data(data: dict) -> tuple[ImageSet, ImageSet, torch.Tensor, torch.Tensor]:
    """``(normal_train, test, is_anomaly, class_labels)`` of a run's data settings (``run.json``)."""
    train, test = load_dataset(data["dataset"], data.get("data_root"))
    several = data["normal_class"] == "all"
    if several:
        normal, is_anomaly = train, torch.zeros(len(test), dtype=torch.long)
    else:
        normal, test, is_anomaly = one_class_split(train, test, int(data["normal_class"]))
    normal = subsample(normal, data.get("train_images"), data.get("seed", 0))
    class_labels = normal.labels if several else torch.zeros(len(normal), dtype=torch.long)
    return normal, test, is_anomaly, class_labels


def train_run(out: str | Path, data: dict | None = None, model_config: ModelConfig | None = None,
              train_config: TrainConfig | None = None, scoring: dict | None = None, resume: bool = False,
              progress: bool = True) -> Path:
    """Train on a dataset's normal class into run folder ``out`` (or resume the run there).

    ``data``: ``dataset``, ``data_root``, ``normal_class`` (an int, or ``"all"`` for several ID
    classes), optional ``train_images`` (a seeded subset) and ``outlier_dir`` (Outlier Exposure).
    ``scoring``: ``scorer`` and ``tta`` stored for ``firm score``.
    """
    out = Path(out)
    if resume:
        settings = read_json(out / RUN_FILE, "run settings")
        data, scoring = settings["data"], settings["scoring"]
        model_config = ModelConfig.from_dict(settings["model"])
        train_config = TrainConfig.from_dict(settings["train"])
    else:
        if data is None or model_config is None or train_config is None:
            raise ValueError("a new run needs data, model and training settings")
        scoring = scoring or {"scorer": "cos1", "tta": "none"}
        data = {**data, "seed": train_config.seed}
        settings = {"data": data, "model": model_config.to_dict(), "train": train_config.to_dict(), "scoring": scoring}
    normal, test, is_anomaly, class_labels = run_data(data)
    auxiliary = load_image_folder(data["outlier_dir"], model_config.image_size).images if data.get("outlier_dir") else None
    torch.manual_seed(train_config.seed)
    model = Encoder(model_config)

    def learning_curve(m: Encoder, epoch: int) -> dict:
        """cos1 AUROC on the test split, for the log only: the saved model is the last epoch's."""
        if not bool(is_anomaly.any()):
            return {}
        records, _ = evaluate_scorers(m, normal.images, test.images, is_anomaly, ["cos1"], "none")
        return {"auroc_test": records[0]["auroc"]}

    trainer = Trainer(model, train_config, normal.images, class_labels, auxiliary=auxiliary, run_dir=out,
                      evaluate=learning_curve, progress=progress)
    if trainer.rank == 0 and not resume:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / RUN_FILE, settings)
    start = time.perf_counter()
    trainer.train(resume=resume)
    if trainer.rank == 0:
        det = FIRMDetector.from_encoder(model, normal.images, loss=train_config.loss, seed=train_config.seed,
                                        progress=progress, **scoring)
        det.history_ = trainer.history
        det.save(out, extra={"train": train_config.to_dict(), "data": data, "train_seconds": time.perf_counter() - start})
    return out


def write_results(out_dir: Path, records: list[dict], scores: dict[tuple[str, str], torch.Tensor], rows: list[dict]) -> None:
    """``results.json`` (the records) and ``scores.csv`` (one row per image, one column per
    scorer and ensemble), both written atomically."""
    write_json(out_dir / "results.json", records)
    buf = io.StringIO()
    columns = list(rows[0]) + [f"{s}:{t}" for s, t in scores]
    writer = csv.writer(buf)
    writer.writerow(columns)
    values = [scores[k].tolist() for k in scores]
    for i, row in enumerate(rows):
        writer.writerow(list(row.values()) + [f"{v[i]:.6g}" for v in values])
    atomic_write(out_dir / "scores.csv", buf.getvalue())


def evaluate_run(run_dir: str | Path | None = None, model_dir: str | Path | None = None, normal_dirs=None,
                 anomaly_dirs=None, data_root: str | None = None, scorers: list[str] | None = None,
                 tta: list[str] = ("none",), out_dir: str | Path | None = None, progress: bool = True) -> list[dict]:
    """AUROC of a trained model for every scorer and ensemble, written to ``results.json`` and
    per-image ``scores.csv``: on its dataset's test split (``run_dir``) or on labelled folders
    (``model_dir`` with ``normal_dirs`` and ``anomaly_dirs``)."""
    folder = Path(run_dir or model_dir or "")
    if not (run_dir or model_dir):
        raise ValueError("evaluate needs a run folder (firm evaluate RUN_DIR) or --model DIR")
    model, config, bank = load_model_dir(folder)
    scorers = list(scorers or SCORERS)
    size = model.config.image_size
    if normal_dirs or anomaly_dirs:
        if not (normal_dirs and anomaly_dirs):
            raise ValueError("folder evaluation needs both --normal-dir and --anomaly-dir")
        normal = load_image_folder(normal_dirs, size, name="normal")
        anomalous = load_image_folder(anomaly_dirs, size, name="anomaly")
        images = torch.cat([normal.images, anomalous.images])
        is_anomaly = torch.cat([torch.zeros(len(normal), dtype=torch.long), torch.ones(len(anomalous), dtype=torch.long)])
        rows = [{"index": i, "path": p, "is_anomaly": int(a)} for i, (p, a) in
                enumerate(zip(normal.paths + anomalous.paths, is_anomaly.tolist()))]
        base = {"loss": config.get("detector", {}).get("loss", config.get("train", {}).get("loss", "firm")),
                "eval_set": "folders"}
    else:
        data = dict(config.get("data") or {})
        if not data:
            raise ModelFileError(f"{folder} was not trained on a dataset; evaluate it on folders with "
                                 "--normal-dir and --anomaly-dir")
        if data_root:
            data["data_root"] = data_root
        _, test, is_anomaly, _ = run_data(data)
        images = test.images
        rows = [{"index": i, "label": int(c), "is_anomaly": int(a)} for i, (c, a) in
                enumerate(zip(test.labels.tolist(), is_anomaly.tolist()))]
        base = {"loss": config["train"]["loss"], "dataset": data["dataset"], "normal_class": data["normal_class"],
                "seed": config["train"]["seed"], "epoch": config["train"]["epochs"], "eval_set": "test"}
    if bank is None:
        raise ModelFileError(f"{folder} holds no feature bank; train or fit it again")
    records, scores = evaluate_scorers(model, FeatureSet(bank), images, is_anomaly, scorers, list(tta), progress=progress)
    records = [{**base, **r} for r in records]
    write_results(Path(out_dir or folder), records, scores, rows)
    return records


def demo(out: str | Path = "runs/demo", epochs: int = 8, classes: list[int] = tuple(range(10)), progress: bool = True,
         log=print) -> list[dict]:
    """FIRM and NT-Xent side by side on scikit-learn's digits (no files needed): every digit in
    turn is the normal class; prints and saves per-class and mean cos1 AUROC."""
    out = Path(out)
    train, test = load_dataset("digits")
    records = []
    start = time.perf_counter()
    for loss in ("firm", "ntxent"):
        for c in classes:
            normal, _, is_anomaly = one_class_split(train, test, c)
            torch.manual_seed(0)
            model = Encoder(ModelConfig(width=16, head_hidden=512, head_layers=2))
            cfg = TrainConfig(loss=loss, epochs=epochs, batch_size=64, lr=0.02, seed=0, checkpoint_every=0,
                              channels_last=True)
            Trainer(model, cfg, normal.images, progress=False).train()
            recs, _ = evaluate_scorers(model, normal.images, test.images, is_anomaly, ["cos1"], "none")
            records.append({"dataset": "digits", "normal_class": c, "loss": loss, "seed": 0, "epoch": epochs,
                            "eval_set": "test", **recs[0]})
            if progress:
                log(f"{loss:7s} digit {c}: AUROC {recs[0]['auroc']:.4f}")
    means = {loss: sum(r["auroc"] for r in records if r["loss"] == loss) / len(classes) for loss in ("firm", "ntxent")}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", records)
    log(f"\nmean cos1 AUROC over {len(classes)} digits ({epochs} epochs each, {time.perf_counter() - start:.0f} s): "
        + ", ".join(f"{k} {v:.4f}" for k, v in means.items()))
    log(f"results written to {out / 'results.json'}")
    return records
