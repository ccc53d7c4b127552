"""A detector for your own images, in the scikit-learn / PyOD style.

    det = FIRMDetector.from_preset("detector", epochs=30).fit("normal_images/")  # folder, paths, array
    det.decision_function(["new1.png", "new2.jpg"])          # higher = more anomalous
    det.predict(new_images)                                   # 1 = anomaly, 0 = normal
    det.anomaly_maps(new_images)                              # (N, H, W) heat maps, higher = more anomalous
    det.save("model/"); FIRMDetector.load("model/")

``fit`` holds out a fraction of the normal images, trains the encoder on the rest, keeps their
backbone features as the bank, and sets ``threshold_`` so that a ``target_fpr`` share of the
held-out normal images would be flagged (or a ``contamination`` share, when given). With
``patch_bank > 0`` it also keeps a :class:`~firm.maps.PatchBank` of training patches for anomaly maps.
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.base import BaseEstimator
from torch import Tensor

from .config import DataConfig, Settings, apply_overrides, preset
from .data import ImageSet, as_images, as_nchw, find_images, load_image_folder, read_masks
from .features import FeatureSet, extract_features
from .maps import PatchBank, image_scores, map_metrics, save_overlays
from .models import Encoder, resolve_stem
from .evaluation import evaluate_scorers
from .losses import resolve_mode
from .rundir import LOG, PATCHES, RESULTS, SCORES, load_extra, load_model_dir, read_log, save_model_dir, train_files
from .runner import final_scorers, prepare_data, train_encoder, validate
from .scoring import apply_scorers, fit_scorers
from .serialization import ModelFileError, atomic_write, write_json

__all__ = ["FIRMDetector", "read_images", "median_side", "score_to_csv", "evaluate_model", "write_results", "FOLDER_PREFIX"]

FOLDER_PREFIX = "folder:"
"""``settings.data.dataset`` of a detector fitted on image files or arrays: ``folder:`` and the
images' common folder (``folder:array`` for arrays)."""


def _is_paths(X) -> bool:
    """Whether ``X`` names image files or folders (one path or a list of them) rather than arrays."""
    path = (str, os.PathLike)
    return isinstance(X, path) or (isinstance(X, (list, tuple)) and bool(X) and isinstance(X[0], path))


def median_side(X, name: str = "images") -> int:
    """Median shorter side, in pixels, of the images ``X`` as they are stored (any input that
    :func:`read_images` takes); image files are measured from their headers, not decoded."""
    if not _is_paths(X):
        return int(min(as_nchw(X.images if isinstance(X, ImageSet) else X, name).shape[-2:]))
    from PIL import Image, UnidentifiedImageError
    sides = []
    for f in find_images(X):
        try:
            with Image.open(f) as im:
                sides.append(min(im.size))
        except (UnidentifiedImageError, OSError, ValueError):
            continue  # read_images reports unreadable files
    return int(np.median(sides)) if sides else 0


def read_images(X, size: int = 32, channels: int = 3, name: str = "images") -> tuple[Tensor, list[str]]:
    """uint8 images ``(N, channels, size, size)`` and their paths (empty for arrays) from a
    folder, an image file, a list of those, an :class:`ImageSet`, or an array / tensor."""
    if isinstance(X, ImageSet):
        return as_images(X.images, size, channels, name), list(X.paths)
    if _is_paths(X):
        found = load_image_folder(X, size, channels, name=name)
        return found.images, found.paths
    return as_images(X, size, channels, name), []


class FIRMDetector(BaseEstimator):
    """FIRM anomaly detector: ``fit`` on normal images, then score new ones.

    Follows PyOD's convention: :meth:`decision_function` is higher for more anomalous images
    (:meth:`score_samples` is its negative, scikit-learn's convention).

    ``settings`` (a :class:`~firm.config.Settings`; default: the ``detector`` preset) holds the
    encoder, training, scoring and threshold settings; :meth:`from_preset` builds one from a preset
    and flat overrides, e.g. ``FIRMDetector.from_preset("detector", epochs=30, image_size=128)``.
    ``fit`` holds out ``holdout`` of the normal images and sets ``threshold_`` so that a
    ``target_fpr`` share of them (or a ``contamination`` share) would be flagged. With
    ``large_image_size`` set (the ``detector`` preset: 128), normal images whose median shorter
    side reaches it train at that size (``stem auto``: the ImageNet stem), others at ``image_size``.

    Fitted attributes: ``settings_`` (the settings really used, ``shifts auto`` resolved),
    ``encoder_``, ``bank_`` (training features at 4 rotations), ``patches_`` (the
    :class:`~firm.maps.PatchBank` for :meth:`anomaly_maps`, None when ``patch_bank`` is 0),
    ``threshold_``, ``holdout_scores_``, ``history_`` (per-epoch log), ``train_paths_``, ``notes_``.
    """

    def __init__(self, settings: Settings | None = None, progress: bool = True):
        self.settings = settings
        self.progress = progress

    @classmethod
    def from_preset(cls, name: str = "detector", progress: bool = True, **overrides) -> "FIRMDetector":
        """A detector with preset ``name``'s settings and flat overrides (``epochs=30``, ...)."""
        return cls(apply_overrides(preset(name), overrides), progress=progress)

    # ------------------------------------------------------------------ fitting
    def _resolved(self) -> Settings:
        s = (self.settings or preset("detector")).copy()
        validate(dataclasses.replace(s, data=DataConfig()))  # the images come from fit(X), not from the data settings
        rate = s.detector.contamination if s.detector.contamination is not None else s.detector.target_fpr
        if not 0 < rate < 1:
            raise ValueError(f"target_fpr / contamination must be in (0, 1), got {rate}")
        if not 0 <= s.detector.holdout < 1:
            raise ValueError(f"holdout must be in [0, 1), got {s.detector.holdout}")
        if s.detector.patch_bank < 0:
            raise ValueError(f"patch_bank must be >= 0 (0 = no anomaly maps), got {s.detector.patch_bank}")
        return s

    def fit(self, X, y=None, outliers=None, run_dir: str | os.PathLike | None = None,
            resume: bool = False) -> "FIRMDetector":
        """Train on normal images ``X``; ``outliers`` (optional) are real auxiliary images used
        instead of synthetic outliers (Outlier Exposure). ``y`` is ignored. With ``run_dir`` the
        training log and checkpoints go there, and ``resume=True`` continues a killed fit."""
        s = self._resolved()
        m = s.model
        notes = []
        large = s.detector.large_image_size
        if large and (side := median_side(X, "normal images")) >= large:
            m.image_size = large
            notes.append(f"images of {side} px (median shorter side) >= large_image_size: trained at {large} px "
                         f"with the {resolve_stem(m)} stem")
            self._log(notes[-1])
        images, paths = read_images(X, m.image_size, m.in_channels, name="normal images")
        gen = torch.Generator().manual_seed(s.train.seed)
        order = torch.randperm(len(images), generator=gen)
        n_hold = int(round(s.detector.holdout * len(images)))
        if n_hold and len(images) - n_hold < 2:
            raise ValueError(f"only {len(images)} normal images: too few to hold out {s.detector.holdout:.0%} "
                             "for the threshold")
        if 0 < n_hold < 20:
            warnings.warn(f"the threshold rests on only {n_hold} held-out normal images; it will be coarse", stacklevel=2)
        train_idx, hold_idx = order[n_hold:], order[:n_hold]
        aux = read_images(outliers, m.image_size, m.in_channels, name="outlier images")[0] if outliers is not None else None
        files = train_files(run_dir) if run_dir is not None else None
        trained = train_encoder(s, images[train_idx], auxiliary=aux, files=files, resume=resume,
                                progress=self.progress, log=self._log)
        s.train = trained.train
        # Trained on images given here, not on a dataset's split: recorded so that nothing (firm
        # evaluate, the report) takes the preset's dataset for the data the detector learned.
        source = os.path.commonpath([os.path.abspath(p) for p in paths]) if paths else "array"
        s.data = dataclasses.replace(s.data, dataset=f"{FOLDER_PREFIX}{source}", normal_class="0", train_images=None)
        self.settings_, self.history_, self.notes_ = s, trained.history, notes + trained.notes
        self.train_paths_ = [str(Path(paths[i]).resolve()) for i in train_idx.tolist()] if paths else []
        self._fit_scoring(trained.encoder, images[train_idx])  # features on the training device
        self.patches_ = (PatchBank(self.encoder_, max_bank=s.detector.patch_bank, seed=s.train.seed).fit(images[train_idx])
                         if s.detector.patch_bank > 0 else None)
        if n_hold:
            self.holdout_scores_ = self.decision_function(images[hold_idx])
            self.set_threshold_from(self.holdout_scores_)
        else:
            self.holdout_scores_, self.threshold_ = np.zeros(0), None
        return self

    def _log(self, message: str) -> None:
        if self.progress:
            print(message)

    @classmethod
    def from_encoder(cls, encoder: Encoder, bank_images: Tensor, settings: Settings, history: list[dict] = (),
                     progress: bool = True) -> "FIRMDetector":
        """A detector around an already trained encoder, its bank built from ``bank_images``
        (no threshold until :meth:`set_threshold_from` or :meth:`set_threshold`)."""
        det = cls(settings, progress=progress)
        det.settings_ = det._resolved()
        det.history_, det.notes_, det.train_paths_ = list(history), [], []
        det.patches_ = None
        det.holdout_scores_, det.threshold_ = np.zeros(0), None
        det._fit_scoring(encoder, bank_images)
        return det

    def _fit_scoring(self, encoder: Encoder, bank_images: Tensor) -> None:
        self.encoder_ = encoder.eval()
        self.bank_ = extract_features(encoder, bank_images, "angled", query=False, progress=self.progress,
                                      config=self.settings_.eval)
        self._fit_scorers()

    def _fit_scorers(self) -> None:
        e = self.settings_.eval
        bank = self.bank_ if e.tta != "none" else FeatureSet(self.bank_.features[:1])
        self.scorers_ = fit_scorers(e.scorer, bank, config=e)

    def set_threshold_from(self, normal_scores: np.ndarray) -> float:
        """Threshold at the (1 - rate) quantile of scores of normal images (rate = contamination
        if set, else target_fpr): about that share of normal images will be flagged."""
        d = self.settings_.detector
        rate = d.contamination if d.contamination is not None else d.target_fpr
        self.threshold_ = float(np.quantile(np.asarray(normal_scores, dtype=np.float64), 1 - rate, method="higher"))
        return self.threshold_

    def set_threshold(self, threshold: float) -> None:
        self.threshold_ = float(threshold)

    # ------------------------------------------------------------------ scoring
    def _check_fitted(self) -> None:
        if not hasattr(self, "encoder_"):
            raise RuntimeError("this FIRMDetector is not fitted yet: call fit(normal_images) or FIRMDetector.load(folder)")

    @property
    def image_size(self) -> int:
        self._check_fitted()
        return self.settings_.model.image_size

    def read(self, X, name: str = "images to score") -> tuple[Tensor, list[str]]:
        """Images as this detector's encoder takes them, and their paths."""
        self._check_fitted()
        return read_images(X, self.image_size, self.settings_.model.in_channels, name=name)

    def decision_function(self, X) -> np.ndarray:
        """Anomaly score of each image (higher = more anomalous)."""
        images, _ = self.read(X)
        e = self.settings_.eval
        queries = extract_features(self.encoder_, images, e.tta, query=True, seed=self.settings_.train.seed,
                                   progress=self.progress, config=e)
        return apply_scorers(self.scorers_, queries).numpy().astype(np.float64)

    def check_maps(self) -> None:
        """Raise the error that says how to get anomaly maps when this detector has no patch bank."""
        self._check_fitted()
        if getattr(self, "patches_", None) is None:
            raise ValueError("this detector has no patch bank, so it cannot make anomaly maps (it was fitted with "
                             "patch_bank 0, or by firm train or an older firm): refit it with patch_bank > 0, "
                             "e.g. firm fit --patch-bank 4096")

    def anomaly_maps(self, X) -> np.ndarray:
        """Anomaly maps ``(N, H, W)`` at the detector's image size (float32, higher = more
        anomalous; each map's maximum is an image score): see :mod:`firm.maps`."""
        self.check_maps()
        images, _ = self.read(X)
        return self.patches_.anomaly_maps(images).numpy()

    def score_samples(self, X) -> np.ndarray:
        """scikit-learn's convention: higher = more normal (minus :meth:`decision_function`)."""
        return -self.decision_function(X)

    def predict(self, X) -> np.ndarray:
        """1 for images scored above ``threshold_`` (anomalies), 0 otherwise."""
        self._check_fitted()
        if self.threshold_ is None:
            raise RuntimeError("no threshold: fit with holdout > 0, or call set_threshold(value)")
        return (self.decision_function(X) > self.threshold_).astype(np.int64)

    # ------------------------------------------------------------------ files
    def save(self, directory: str | os.PathLike) -> Path:
        """Weights, feature bank and patch bank (safetensors) and settings (JSON) in ``directory``."""
        self._check_fitted()
        state = {"threshold": self.threshold_, "holdout_scores": np.asarray(self.holdout_scores_).tolist(),
                 "train_paths": self.train_paths_, "notes": self.notes_}
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.history_ and not (directory / LOG).exists():
            atomic_write(directory / LOG, "".join(json.dumps(r) + "\n" for r in self.history_))
        extra = {PATCHES: _patch_bank_tensors(self.patches_)} if getattr(self, "patches_", None) is not None else None
        return save_model_dir(directory, self.encoder_, self.settings_, state, self.bank_.features, extra)

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str = "cpu", progress: bool = False) -> "FIRMDetector":
        """A fitted detector from a folder written by :meth:`save` (or by ``firm train``)."""
        encoder, settings, state, bank = load_model_dir(directory, device)
        if bank is None:
            raise ModelFileError(f"{directory} holds no feature bank; it was not saved by a fitted detector")
        settings.train.device = str(device)
        det = cls(settings, progress=progress)
        det.settings_ = settings
        det.encoder_, det.bank_ = encoder, FeatureSet(bank)
        det.threshold_ = state.get("threshold")
        det.holdout_scores_ = np.asarray(state.get("holdout_scores", []), dtype=np.float64)
        det.train_paths_ = state.get("train_paths", [])
        det.notes_ = state.get("notes", [])
        det.history_ = read_log(directory)
        det._fit_scorers()
        saved = load_extra(directory, PATCHES, "patch bank")
        det.patches_ = None if saved is None else _patch_bank_from(encoder, *saved, Path(directory) / PATCHES)
        return det


_PATCH_PARAMS = ("stages", "coreset", "max_bank", "projection_dim", "sigma", "max_grid", "batch_size", "seed")


def _patch_bank_tensors(patches: PatchBank) -> tuple[dict[str, Tensor], dict]:
    """The tensors and header metadata of ``patches.safetensors``."""
    params = {k: getattr(patches, k) for k in _PATCH_PARAMS}
    params["stages"] = list(params["stages"])
    return ({"bank": patches.bank_.float(), "stage_scales": patches.stage_scales_.float()},
            {"params": params, "n_patches": int(patches.n_patches_), "grid": list(patches.grid_)})


def _patch_bank_from(encoder: Encoder, tensors: dict[str, Tensor], meta: dict, path: Path) -> PatchBank:
    """A fitted :class:`PatchBank` on ``encoder`` from what :func:`_patch_bank_tensors` saved."""
    try:
        patches = PatchBank(encoder, **{k: meta["params"][k] for k in _PATCH_PARAMS})
        patches.bank_, patches.stage_scales_ = tensors["bank"], tensors["stage_scales"]
        patches.n_patches_, patches.grid_ = int(meta["n_patches"]), tuple(meta["grid"])
        dims = list(encoder.map_dims(patches.stages))
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise ModelFileError(f"patch bank {path} lacks its tensors or parameters ({e}); refit the detector") from e
    if patches.bank_.ndim != 2 or patches.bank_.shape[1] != sum(dims) or len(patches.stage_scales_) != len(dims):
        raise ModelFileError(f"patch bank {path} has features of shape {tuple(patches.bank_.shape)}, the encoder's "
                             f"stages {list(patches.stages)} give {sum(dims)} dimensions; refit the detector")
    return patches


def score_to_csv(det: FIRMDetector, inputs, out: str | os.PathLike, maps_dir: str | os.PathLike | None = None
                 ) -> list[dict]:
    """Score image files or folders; write a CSV ranked by anomaly score (``rank, path, score,
    flagged``: ``flagged`` is the prediction, score above the threshold, not a ground truth) and
    return its rows. Paths are absolute, so the CSV can be read from any working directory.
    With ``maps_dir``, also write each image's anomaly-map overlay and ``index.csv`` there
    (:func:`firm.maps.save_overlays`)."""
    import csv
    import io
    if maps_dir is not None:
        det.check_maps()  # before any image is read
    found = load_image_folder(inputs, det.image_size, det.settings_.model.in_channels, name="images to score")
    scores = det.decision_function(found.images)
    flags = scores > det.threshold_ if det.threshold_ is not None else np.zeros(len(scores), dtype=bool)
    order = np.argsort(-scores, kind="stable")
    rows = [{"rank": r + 1, "path": str(Path(found.paths[i]).resolve()), "score": float(scores[i]),
             "flagged": int(flags[i])} for r, i in enumerate(order)]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["rank", "path", "score", "flagged"])
    writer.writeheader()
    writer.writerows({**r, "score": f"{r['score']:.6g}"} for r in rows)
    atomic_write(out, buf.getvalue())
    if maps_dir is not None:
        save_overlays(found.images, torch.from_numpy(det.anomaly_maps(found.images)), found.paths, maps_dir)
    return rows


def write_results(out_dir: Path, records: list[dict], scores: dict[tuple[str, str], Tensor], rows: list[dict]) -> None:
    """``results.json`` (the records) and ``scores.csv`` (one row per image: its identity, the
    ground truth ``is_anomaly`` and one column per scorer and ensemble), both written atomically."""
    import csv
    import io
    write_json(out_dir / RESULTS, records)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(list(rows[0]) + [f"{s}:{t}" for s, t in scores])
    values = [scores[k].tolist() for k in scores]
    for i, row in enumerate(rows):
        writer.writerow(list(row.values()) + [f"{v[i]:.6g}" for v in values])
    atomic_write(out_dir / SCORES, buf.getvalue())


def evaluate_model(run_dir: str | os.PathLike | None = None, model_dir: str | os.PathLike | None = None,
                   normal_dirs=None, anomaly_dirs=None, data_root: str | None = None, ood: list[str] = (),
                   scorers: list[str] = ("all",), tta: list[str] = ("none",), out_dir: str | os.PathLike | None = None,
                   progress: bool = True, mask_dir: str | os.PathLike | None = None) -> list[dict]:
    """AUROC of a saved model for every scorer and ensemble, written to ``results.json`` and
    per-image ``scores.csv``: on its dataset's test split (``run_dir``; with ``ood`` for a run
    trained on every class) or on labelled folders (``model_dir`` with ``normal_dirs`` and
    ``anomaly_dirs``). With ``mask_dir`` (ground-truth masks matched to the images by name, see
    :func:`firm.data.read_masks`; folders only) a ``patch_map`` record adds the anomaly maps'
    image AUROC (map maxima), ``pixel_auroc`` and ``pro``."""
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
        if data.normal_class == "all" and not data.ood:
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
        records, scores = evaluate_scorers(det.encoder_, det.bank_, images, y, final_scorers(e), list(e.final_tta),
                                           progress=progress, config=e)
        if mask_dir is not None:
            paths = [r["path"] for r in rows]
            maps = torch.from_numpy(det.patches_.anomaly_maps(images).numpy())
            masks = read_masks(paths, mask_dir, det.image_size, y)
            metrics = map_metrics(maps, masks, y.numpy())
            records.append({"scorer": "patch_map", "tta": "none", "auroc": metrics.get("image_auroc"),
                            "pixel_auroc": metrics.get("pixel_auroc"), "pro": metrics.get("pro")})
            scores[("patch_map", "none")] = image_scores(maps)
        all_records += [{**base, "eval_set": name, **r} for r in records]
        for key, value in scores.items():
            all_scores[key] = torch.cat([all_scores[key], value]) if key in all_scores else value
        all_rows += [{"eval_set": name, **r} for r in rows]
    write_results(Path(out_dir or folder), all_records, all_scores, all_rows)
    return all_records
