"""Scoring and evaluating a saved model: ``firm score`` (a ranked CSV, optional map overlays) and
``firm evaluate`` (AUROC of every scorer and ensemble on a dataset's test split or on labelled
folders, with pixel metrics when masks are given). The files they write are described in
:mod:`firm.rundir`.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import torch

from .config import PATCH, DataConfig
from .data import ALL_CLASSES, read_masks
from .detector import FOLDER_PREFIX, FIRMDetector
from .evaluation import auroc, evaluate_scorers
from .losses import resolve_mode
from .maps import map_metrics, save_overlays
from .rundir import write_results, write_score_csv
from .runner import final_scorers, prepare_data, validate
from .scoring import ALL
from .serialization import ModelFileError

__all__ = ["score_to_csv", "evaluate_model"]


def score_to_csv(det: FIRMDetector, inputs, out: str | os.PathLike, maps_dir: str | os.PathLike | None = None
                 ) -> list[dict]:
    """Score image files or folders; write a CSV ranked by anomaly score (``rank, path, score,
    flagged``: the score on the detector's scale, 1.0 = its threshold; ``flagged`` is the
    prediction, not a ground truth) and return its rows. Paths are absolute, so the CSV can be
    read from any working directory. With ``maps_dir``, also write each image's anomaly-map
    overlay and ``index.csv`` there (:func:`firm.maps.save_overlays`; colours from 0 = the median
    normal image to 2 = twice the threshold's distance from it)."""
    if maps_dir is not None:
        det.check_maps()  # before any image is read
    images, paths = det.read(inputs, "images to score")
    if maps_dir is not None:
        maps, scores = det.maps_and_scores(images)
    else:
        scores = det.decision_function(images)
    flags = scores > det.threshold_ if det.threshold_ is not None else np.zeros(len(scores), dtype=bool)
    order = np.argsort(-scores, kind="stable")
    rows = [{"rank": r + 1, "path": str(Path(paths[i]).resolve()), "score": float(scores[i]),
             "flagged": int(flags[i])} for r, i in enumerate(order)]
    write_score_csv(out, rows)
    if maps_dir is not None:
        scale = dict(vmin=0.0, vmax=2.0) if det.map_scale_ is not None else {}
        save_overlays(images, torch.from_numpy(maps), paths, maps_dir, scores=scores, **scale)
    return rows


def evaluate_model(run_dir: str | os.PathLike | None = None, model_dir: str | os.PathLike | None = None,
                   normal_dirs=None, anomaly_dirs=None, data_root: str | None = None, ood: list[str] = (),
                   scorers: list[str] = (ALL,), tta: list[str] = ("none",), out_dir: str | os.PathLike | None = None,
                   progress: bool = True, mask_dir: str | os.PathLike | None = None) -> list[dict]:
    """AUROC of a saved model for every scorer and ensemble, written to ``results.json`` and
    per-image ``scores.csv``: on its dataset's test split (``run_dir``; with ``ood`` for a run
    trained on every class) or on labelled folders (``model_dir`` with ``normal_dirs`` and
    ``anomaly_dirs``). The first record of a fitted detector is its own score (``own: true``,
    scorer ``detector``: what ``decision_function`` returns), with the anomaly maps'
    ``pixel_auroc`` and ``pro`` when ``mask_dir`` is given (ground-truth masks matched to the
    images by name, see :func:`firm.data.read_masks`; folders only); the pooled scorers follow."""
    if not (run_dir or model_dir):
        raise ValueError("evaluate needs a run folder (firm evaluate RUN_DIR) or --model DIR")
    if mask_dir is not None and not (normal_dirs or anomaly_dirs):
        raise ValueError("--mask-dir needs the folders it describes: pass --normal-dir and --anomaly-dir")
    folder = Path(run_dir or model_dir)
    det = FIRMDetector.load(folder, progress=progress)
    if mask_dir is not None:
        det.check_maps()
    s = det.settings_
    e = dataclasses.replace(s.eval, scorers=list(scorers), final_tta=list(tta))
    if normal_dirs or anomaly_dirs:
        validate(dataclasses.replace(s, eval=e, data=DataConfig()))  # the names; the data are the folders
        if not (normal_dirs and anomaly_dirs):
            raise ValueError("folder evaluation needs both --normal-dir and --anomaly-dir")
        normal, normal_paths = det.read(normal_dirs, "normal images")
        anomalous, anomaly_paths = det.read(anomaly_dirs, "anomalous images")
        names = normal_paths + anomaly_paths
        y = torch.cat([torch.zeros(len(normal), dtype=torch.long), torch.ones(len(anomalous), dtype=torch.long)])
        sets = [("folders", torch.cat([normal, anomalous]), y,
                 [{"index": i, "path": str(Path(p).resolve()), "is_anomaly": int(a)} for i, (p, a) in
                  enumerate(zip(names, y.tolist()))])]
    else:
        data = dataclasses.replace(s.data, data_root=data_root or s.data.data_root, ood=list(ood) or s.data.ood)
        if not s.data.dataset or s.data.dataset.startswith(FOLDER_PREFIX):
            raise ModelFileError(f"{folder} was not trained on a dataset; evaluate it with --normal-dir and --anomaly-dir")
        if data.normal_class == ALL_CLASSES and not data.ood:
            raise ValueError(f"{folder} was trained on every class of {s.data.dataset}: there is no anomaly in its test "
                             "split; pass --ood DATASET_OR_FOLDER to score it against out-of-distribution images")
        validate(dataclasses.replace(s, eval=e, data=data))
        prepared = prepare_data(dataclasses.replace(s, data=data))
        sets = [(name, images.images, y, [{"index": i, "label": int(c), "is_anomaly": int(a)} for i, (c, a) in
                                          enumerate(zip(images.labels.tolist(), y.tolist()))])
                for name, images, y in prepared.eval_sets]
    base = {"loss": s.train.loss, "loss_mode": resolve_mode(s.train.loss, s.train.loss_mode), "dataset": s.data.dataset,
            "normal_class": s.data.normal_class, "seed": s.train.seed, "epoch": s.train.epochs}
    all_records, all_scores, all_rows = [], {}, []
    for name, images, y, rows in sets:
        own, records, scores = _own_score(det, images, y, rows, mask_dir), [], {}
        if own is not None:
            records.append(own[0])
            scores[("detector", det.score_)] = own[1]
        if det.bank_ is not None:
            pooled, scores_pooled = evaluate_scorers(det.encoder_, det.bank_, images, y, final_scorers(e),
                                                     list(e.final_tta), progress=progress, config=e)
            records += [{**r, "own": own is None and (r["scorer"], r["tta"]) == (s.eval.scorer, s.eval.tta)}
                        for r in pooled]
            scores.update(scores_pooled)
        all_records += [{**base, "eval_set": name, **r} for r in records]
        for key, value in scores.items():
            all_scores[key] = torch.cat([all_scores[key], value]) if key in all_scores else value
        all_rows += [{"eval_set": name, **r} for r in rows]
    write_results(Path(out_dir or folder), all_records, all_scores, all_rows)
    return all_records


def _own_score(det: FIRMDetector, images: torch.Tensor, y: torch.Tensor, rows: list[dict], mask_dir
               ) -> tuple[dict, torch.Tensor] | None:
    """The record and per-image scores of the detector's own score (what ``decision_function``
    returns), with the maps' pixel AUROC and PRO when ``mask_dir`` is given; None for a run
    folder of ``firm train``, whose own score is one of the pooled scorers' records."""
    if det.score_ != PATCH and mask_dir is None and not det.settings_.data.dataset.startswith(FOLDER_PREFIX):
        return None
    record = {"scorer": "detector", "tta": det.score_, "own": True}
    if mask_dir is not None:
        maps, scores = det.maps_and_scores(images)
        masks = read_masks([r["path"] for r in rows], mask_dir, det.input_shape, y)
        metrics = map_metrics(torch.from_numpy(maps), masks, y.numpy())
        record.update(pixel_auroc=metrics.get("pixel_auroc"), pro=metrics.get("pro"))
    else:
        scores = det.decision_function(images)
    record["auroc"] = auroc(scores, y.numpy()) if 0 < int(y.sum()) < len(y) else None
    return record, torch.from_numpy(scores)
