"""Export a detector for deployment without PyTorch: ONNX encoder, numpy feature bank, JSON settings.

    export_onnx("model/")                      # writes model/onnx/{encoder.onnx, bank.npy, detector.json}
    OnnxDetector("model/onnx").decision_function(uint8_images_nchw)   # needs numpy + onnxruntime only

The ONNX graph is the backbone only (images in [0, 1], NCHW, dynamic batch; it normalises them
itself) and outputs raw features. The cos-kNN scoring is a few lines of numpy, reproduced in
:class:`OnnxDetector`; other scorers (KDE, SVMs, Mahalanobis) are refused rather than approximated.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import warnings
from pathlib import Path

import numpy as np

__all__ = ["BANK_NPY", "DEPLOY_FILE", "ENCODER_FILE", "EXPORT_FILES", "ExportError", "MissingExtraError", "OnnxDetector",
           "export_onnx", "require_onnx"]

ENCODER_FILE = "encoder.onnx"
BANK_NPY = "bank.npy"
DEPLOY_FILE = "detector.json"
EXPORT_FILES = (ENCODER_FILE, BANK_NPY, DEPLOY_FILE)
DEPLOY_FORMAT = "firm-onnx"
_SCORER = re.compile(r"^cos(\d+)(_norm)?$")
_TTA_TURNS = {"none": 1, "angled": 4}  # "ensemble" uses random crops: not reproducible outside torch


class ExportError(ValueError):
    """The exported model does not reproduce the detector's scores (a ValueError, so the CLI reports it plainly)."""


class MissingExtraError(ValueError):
    """An optional part of firm is not installed (a ValueError, so the CLI reports it plainly)."""


def require_onnx() -> None:
    """Raise :class:`MissingExtraError`, naming the extra to install, when onnx or onnxruntime
    is missing (the demo's install leaves them out)."""
    import importlib.util
    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtraError(f"ONNX export needs the onnx extra ({' and '.join(missing)} missing here): "
                                'run pip install -e ".[onnx]" in the firm repository, or pip install onnx onnxruntime')


def _check_scoring(scorer: str, tta: str, center_crop: float = 1.0) -> tuple[int, bool]:
    """``(k, use_norm)`` of a cos-kNN scorer; a clear error for what the ONNX scorer cannot reproduce."""
    if center_crop != 1:
        raise ValueError(f"ONNX export supports models scored without the test-time zoom (center_crop 1), not "
                         f"center_crop {center_crop:.4g}; refit with --center-crop 1 to deploy with onnxruntime")
    match = _SCORER.match(str(scorer))
    if not match or int(match.group(1)) < 1:
        raise ValueError(f"ONNX export supports the cos-kNN scorers (cos1, cos5, cos1_norm, cos5_norm, ...), not "
                         f"{scorer!r}; refit with --scorer cos1 or cos5 to deploy with onnxruntime")
    if tta not in _TTA_TURNS:
        raise ValueError(f"ONNX export supports tta 'none' or 'angled', not {tta!r} (its random crops are "
                         "not reproducible outside PyTorch); refit with --tta none or angled")
    return int(match.group(1)), bool(match.group(2))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class OnnxDetector:
    """The exported detector: ``decision_function`` (higher = more anomalous) and ``predict``
    on uint8 images ``(N, C, H, W)`` of the exported size, using numpy and onnxruntime only."""

    def __init__(self, folder: str | os.PathLike, providers: list[str] | None = None):
        import onnxruntime as ort
        folder = Path(folder)
        self.config = json.loads((folder / DEPLOY_FILE).read_text())
        if self.config.get("format") != DEPLOY_FORMAT:
            raise ValueError(f"{folder / DEPLOY_FILE} was not written by firm export")
        for name, digest in self.config.get("files", {}).items():
            if _sha256(folder / name) != digest:
                raise ValueError(f"{folder / name} is corrupted: its SHA-256 differs from the one recorded at export")
        self.k, self.use_norm = _check_scoring(self.config["scorer"], self.config["tta"])
        self.image_size, self.threshold = int(self.config["image_size"]), self.config.get("threshold")
        bank = np.load(folder / BANK_NPY, allow_pickle=False).astype(np.float32)  # (rotations, N, D), raw
        self.bank = bank / np.maximum(np.linalg.norm(bank, axis=-1, keepdims=True), 1e-12)
        self.session = ort.InferenceSession(str(folder / ENCODER_FILE), providers=providers or ["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def features(self, images: np.ndarray, quarter_turns: int = 0, batch_size: int = 256) -> np.ndarray:
        """Raw backbone features of uint8 images, rotated by ``quarter_turns`` x 90 degrees."""
        x = np.asarray(images)
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[2:] != (self.image_size,) * 2:
            raise ValueError(f"expected uint8 images (N, 3, {self.image_size}, {self.image_size}), got {x.dtype} "
                             f"{x.shape}; resize them to the exported image size first")
        if x.shape[1] == 1 and self.config.get("channels", 3) == 3:
            x = np.repeat(x, 3, axis=1)  # as firm.data does for grey images
        x = np.rot90(x, quarter_turns, axes=(2, 3))
        out = [self.session.run(None, {self.input_name: np.ascontiguousarray(x[i:i + batch_size], np.float32) / 255})[0]
               for i in range(0, len(x), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.bank.shape[-1]), np.float32)

    def decision_function(self, images: np.ndarray) -> np.ndarray:
        """Minus the mean top-k cosine similarity to the bank, averaged over the rotations."""
        total = np.zeros(len(images), dtype=np.float64)
        for r in range(self.bank.shape[0]):
            q = self.features(images, r)
            norm = np.linalg.norm(q, axis=1, keepdims=True)
            sims = (q / np.maximum(norm, 1e-12)) @ self.bank[r].T
            k = min(self.k, sims.shape[1])
            sim = np.partition(sims, -k, axis=1)[:, -k:].mean(1)
            total -= sim * norm[:, 0] if self.use_norm else sim
        raw = total / self.bank.shape[0]
        scale = self.config.get("score_scale")  # (center, unit): 0 = the median normal image, 1 = the threshold
        return raw if scale is None else (raw - scale[0]) / scale[1]

    def predict(self, images: np.ndarray) -> np.ndarray:
        """1 for images scored above the exported threshold, 0 otherwise."""
        if self.threshold is None:
            raise RuntimeError("the exported detector has no threshold")
        return (self.decision_function(images) > self.threshold).astype(np.int64)


def _export_backbone(encoder, path: Path, image_size: int, channels: int) -> None:
    """ONNX graph of the backbone; the TorchScript exporter needs no onnxscript and is exact here."""
    import torch
    dummy = torch.rand(2, channels, image_size, image_size)
    buf = io.BytesIO()
    kwargs = {"input_names": ["images"], "output_names": ["features"], "opset_version": 17,
              "dynamic_axes": {"images": {0: "batch"}, "features": {0: "batch"}}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice is not the user's concern
        try:
            torch.onnx.export(encoder.backbone.eval(), (dummy,), buf, dynamo=False, **kwargs)
        except (TypeError, RuntimeError):  # a torch without the legacy exporter: torch.export path (needs onnxscript)
            buf = io.BytesIO()
            torch.onnx.export(encoder.backbone.eval(), (dummy,), buf, dynamo=True, **kwargs)
    from .serialization import atomic_write
    atomic_write(path, buf.getvalue())


def export_onnx(model_dir: str | os.PathLike, out: str | os.PathLike | None = None, check_images: int = 16,
                tolerance: float = 1e-4) -> dict:
    """Export the detector in ``model_dir`` to ``out`` (default MODEL_DIR/onnx) and check that
    onnxruntime's scores match PyTorch's on ``check_images`` fixed random images; raises
    :class:`ExportError` if they differ by more than ``tolerance``. Returns a summary dict."""
    from .detector import FIRMDetector
    from .rundir import ONNX
    require_onnx()
    model_dir = Path(model_dir)
    out = Path(out) if out is not None else model_dir / ONNX
    det = FIRMDetector.load(model_dir, progress=False)
    if det.score_ != "pooled":
        raise ValueError(f"{model_dir} scores images with its patch bank, which ONNX export does not cover yet (it "
                         "exports pooled-feature scorers); refit with --score pooled to deploy with onnxruntime")
    scorer, tta = det.settings_.eval.scorer, det.settings_.eval.tta
    k, _ = _check_scoring(scorer, tta, det.settings_.eval.center_crop)
    new_folder = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _export(det, out, k, check_images, tolerance)
    except ExportError:
        raise  # its message points at the files, to be looked at
    except BaseException:
        # an export that failed leaves nothing: no half-written folder that looks like an export
        for name in EXPORT_FILES:
            (out / name).unlink(missing_ok=True)
        if new_folder and not any(out.iterdir()):
            out.rmdir()
        raise


def _export(det, out: Path, k: int, check_images: int, tolerance: float) -> dict:
    from .serialization import atomic_write, write_json
    scorer, tta = det.settings_.eval.scorer, det.settings_.eval.tta
    size, channels = det.encoder_.config.image_size, det.encoder_.config.in_channels
    _export_backbone(det.encoder_, out / ENCODER_FILE, size, channels)
    bank = det.bank_.features[:_TTA_TURNS[tta], 0].float().numpy()
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(bank), allow_pickle=False)
    atomic_write(out / BANK_NPY, buf.getvalue())
    settings = {"format": DEPLOY_FORMAT, "format_version": 1, "image_size": size, "channels": channels,
                "input": {"name": "images", "layout": "NCHW", "dtype": "float32", "range": [0.0, 1.0]},
                "scorer": scorer, "k": k, "tta": tta, "rotations": int(bank.shape[0]),
                "threshold": det.threshold_, "bank_size": int(bank.shape[1]), "feature_dim": int(bank.shape[2]),
                "score_scale": det.score_scale_,
                "score": "minus the mean top-k cosine similarity to the bank, averaged over rotations "
                         "(rotation r = r x 90 degrees counter-clockwise, against bank[r]), then (raw - center) / unit "
                         "with score_scale = [center, unit] when given (1.0 = the threshold); higher = more anomalous",
                "files": {name: _sha256(out / name) for name in (ENCODER_FILE, BANK_NPY)}}
    write_json(out / DEPLOY_FILE, settings)
    images = np.random.default_rng(0).integers(0, 256, (check_images, channels, size, size), dtype=np.uint8)
    expected = det.decision_function(images)
    got = OnnxDetector(out).decision_function(images)
    unit = det.score_scale_[1] if det.score_scale_ is not None else 1.0
    diff = float(np.max(np.abs(got - expected))) * unit  # on the raw score's scale, where the tolerance is set
    if not diff <= tolerance:
        raise ExportError(f"ONNX scores differ from PyTorch's by up to {diff:.3g} (> {tolerance:g}); the export "
                           f"in {out} is not faithful")
    return {"path": str(out / ENCODER_FILE), "bank": str(out / BANK_NPY), "config": str(out / DEPLOY_FILE),
            "max_abs_diff": diff, "images_checked": check_images, "scorer": scorer, "tta": tta}
