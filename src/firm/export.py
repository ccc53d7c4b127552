"""Export a detector for deployment without PyTorch: ONNX graph, JSON settings (and a numpy bank).

    export_onnx("model/")                      # writes model/onnx/ and checks it against PyTorch
    det = OnnxDetector("model/onnx")           # needs numpy + onnxruntime only
    det.decision_function(uint8_images_nchw)   # on the detector's scale: 1.0 = the threshold
    det.anomaly_maps(uint8_images_nchw)        # patch detectors only

Every graph takes images in [0, 1], NCHW, at the detector's input shape, with a dynamic batch,
and normalises them itself. What it computes depends on the detector's score:

* pooled (``encoder.onnx``, ``bank.npy``): the graph is the backbone and outputs raw pooled
  features; the cos-kNN scoring against the bank is a few lines of numpy, reproduced in
  :class:`OnnxDetector`. Other scorers (KDE, SVMs, Mahalanobis) are refused rather than approximated.
* patch (``patch_scorer.onnx``): the whole :class:`~firm.maps.PatchBank` scorer is one graph
  with the memory bank inside; it outputs raw image scores ``(N,)`` and raw maps ``(N, H, W)``,
  which :class:`OnnxDetector` puts on the detector's scales.
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

__all__ = ["BANK_NPY", "DEPLOY_FILE", "ENCODER_FILE", "EXPORT_FILES", "PATCH_FILE", "ExportError", "MissingExtraError",
           "OnnxDetector", "export_onnx", "require_onnx"]

ENCODER_FILE = "encoder.onnx"
BANK_NPY = "bank.npy"
PATCH_FILE = "patch_scorer.onnx"
DEPLOY_FILE = "detector.json"
EXPORT_FILES = (ENCODER_FILE, BANK_NPY, PATCH_FILE, DEPLOY_FILE)
DEPLOY_FORMAT = "firm-onnx"
POOLED, PATCH = "pooled", "patch"  # the detector scores the export reproduces (FIRMDetector.score_)
_FORMAT_VERSIONS = {POOLED: 1, PATCH: 2}  # a patch export is refused by readers that know only pooled ones
PATCH_BATCH_BYTES = 256 * 2 ** 20
"""Memory for the float32 distances of a batch's patches to the bank, which sets :class:`OnnxDetector`'s
default batch on a patch export (the graph holds a few such matrices at once)."""
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
    """The exported detector: :meth:`decision_function` (higher = more anomalous), :meth:`predict`
    and, for patch detectors, :meth:`anomaly_maps`, on uint8 images ``(N, C, H, W)`` of the
    exported input shape, using numpy and onnxruntime only."""

    def __init__(self, folder: str | os.PathLike, providers: list[str] | None = None):
        import onnxruntime as ort
        folder = Path(folder)
        self.config = json.loads((folder / DEPLOY_FILE).read_text())
        if self.config.get("format") != DEPLOY_FORMAT:
            raise ValueError(f"{folder / DEPLOY_FILE} was not written by firm export")
        self.kind = self.config.get("kind", POOLED)
        if _FORMAT_VERSIONS.get(self.kind) != self.config.get("format_version"):
            raise ValueError(f"{folder / DEPLOY_FILE} holds a {self.kind!r} export of format version "
                             f"{self.config.get('format_version')}, which this firm cannot read; upgrade firm")
        for name, digest in self.config.get("files", {}).items():
            if _sha256(folder / name) != digest:
                raise ValueError(f"{folder / name} is corrupted: its SHA-256 differs from the one recorded at export")
        if self.kind == POOLED:
            self.k, self.use_norm = _check_scoring(self.config["scorer"], self.config["tta"])
            bank = np.load(folder / BANK_NPY, allow_pickle=False).astype(np.float32)  # (rotations, N, D), raw
            self.bank = bank / np.maximum(np.linalg.norm(bank, axis=-1, keepdims=True), 1e-12)
            self.image_size = int(self.config["image_size"])
            self.input_shape = (self.image_size, self.image_size)
        else:
            self.input_shape = tuple(int(v) for v in self.config["input_shape"])
        self.threshold = self.config.get("threshold")
        model = ENCODER_FILE if self.kind == POOLED else PATCH_FILE
        self.session = ort.InferenceSession(str(folder / model), providers=providers or ["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def _inputs(self, images: np.ndarray) -> np.ndarray:
        """uint8 images ``(N, C, H, W)`` checked against the exported shape, with the exported channels."""
        x = np.asarray(images)
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[2:] != self.input_shape:
            raise ValueError(f"expected uint8 images (N, 3, {self.input_shape[0]}, {self.input_shape[1]}), got "
                             f"{x.dtype} {x.shape}; resize them to the exported input shape (height, width) first")
        if x.shape[1] == 1 and self.config.get("channels", 3) == 3:
            x = np.repeat(x, 3, axis=1)  # as firm.data does for grey images
        return x

    def _run(self, x: np.ndarray, batch_size: int) -> list[np.ndarray]:
        """The graph's outputs on uint8 images ``x``, batch by batch, concatenated."""
        runs = [self.session.run(None, {self.input_name: np.ascontiguousarray(x[i:i + batch_size], np.float32) / 255})
                for i in range(0, len(x), batch_size)]
        return [np.concatenate(parts) for parts in zip(*runs)]

    def features(self, images: np.ndarray, quarter_turns: int = 0, batch_size: int = 256) -> np.ndarray:
        """Raw backbone features of uint8 images, rotated by ``quarter_turns`` x 90 degrees (pooled exports)."""
        if self.kind != POOLED:
            raise ValueError("a patch export outputs scores and maps, not pooled features")
        x = np.rot90(self._inputs(images), quarter_turns, axes=(2, 3))
        return self._run(x, batch_size)[0] if len(x) else np.zeros((0, self.bank.shape[-1]), np.float32)

    def raw_scores_and_maps(self, images: np.ndarray, batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Raw image scores ``(N,)`` and raw anomaly maps ``(N, H, W)`` of a patch export, before the
        detector's scales (the graph's two outputs). ``batch_size`` defaults to as many images as keep
        the graph's patch-to-bank distance matrix within :data:`PATCH_BATCH_BYTES`."""
        if self.kind != PATCH:
            raise ValueError("this export scores pooled features; only patch detectors have anomaly maps (refit "
                             "with --score patch, or use the PyTorch detector's maps)")
        if batch_size is None:
            per_image = 4 * int(np.prod(self.config["patch_grid"])) * int(self.config["bank_size"])
            batch_size = int(np.clip(PATCH_BATCH_BYTES // per_image, 1, 64))
        x = self._inputs(images)
        if not len(x):
            return np.zeros(0, np.float32), np.zeros((0, *self.input_shape), np.float32)
        scores, maps = self._run(x, batch_size)  # the graph's outputs, in the order exported
        return scores, maps

    def _pooled_raw(self, images: np.ndarray) -> np.ndarray:
        """Minus the mean top-k cosine similarity to the bank, averaged over the rotations."""
        total = np.zeros(len(images), dtype=np.float64)
        for r in range(self.bank.shape[0]):
            q = self.features(images, r)
            norm = np.linalg.norm(q, axis=1, keepdims=True)
            sims = (q / np.maximum(norm, 1e-12)) @ self.bank[r].T
            k = min(self.k, sims.shape[1])
            sim = np.partition(sims, -k, axis=1)[:, -k:].mean(1)
            total -= sim * norm[:, 0] if self.use_norm else sim
        return total / self.bank.shape[0]

    def decision_function(self, images: np.ndarray) -> np.ndarray:
        """Anomaly score of each image: the raw score, then ``(raw - center) / unit`` with the
        exported ``score_scale`` when there is one (0 = the median held-out normal image, 1.0 = the threshold)."""
        if self.kind == PATCH:
            return self.maps_and_scores(images)[1]
        return _scaled(self._pooled_raw(images), self.config.get("score_scale"))

    def maps_and_scores(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`anomaly_maps` and :meth:`decision_function` in one pass (patch exports only)."""
        scores, maps = self.raw_scores_and_maps(images)
        return (_scaled(maps, self.config.get("map_scale")).astype(np.float32),
                _scaled(scores.astype(np.float64), self.config.get("score_scale")))

    def anomaly_maps(self, images: np.ndarray) -> np.ndarray:
        """Anomaly maps ``(N, H, W)`` (float32, higher = more anomalous) on the exported ``map_scale``
        (0 = the median held-out normal image's maximum, 1.0 = its threshold quantile), as
        :meth:`firm.detector.FIRMDetector.anomaly_maps` (patch exports only)."""
        return self.maps_and_scores(images)[0]

    def predict(self, images: np.ndarray) -> np.ndarray:
        """1 for images scored above the exported threshold, 0 otherwise."""
        if self.threshold is None:
            raise RuntimeError("the exported detector has no threshold")
        return (self.decision_function(images) > self.threshold).astype(np.int64)


def _scaled(raw: np.ndarray, scale) -> np.ndarray:
    """``raw`` on a ``(center, unit)`` scale, unchanged without one."""
    return raw if scale is None else (raw - scale[0]) / scale[1]


def _export_graph(module, dummy, path: Path, outputs: tuple[str, ...]) -> None:
    """ONNX graph of ``module`` on inputs like ``dummy`` (the batch left dynamic); the TorchScript
    exporter needs no onnxscript and is exact here."""
    import torch
    buf = io.BytesIO()
    kwargs = {"input_names": ["images"], "output_names": list(outputs), "opset_version": 17,
              "dynamic_axes": {name: {0: "batch"} for name in ("images", *outputs)}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer notices are not the user's concern
        try:
            torch.onnx.export(module.eval(), (dummy,), buf, dynamo=False, **kwargs)
        except (TypeError, RuntimeError):  # a torch without the legacy exporter: torch.export path (needs onnxscript)
            buf = io.BytesIO()
            torch.onnx.export(module.eval(), (dummy,), buf, dynamo=True, **kwargs)
    from .serialization import atomic_write
    atomic_write(path, buf.getvalue())


def _patch_scorer(patches, shape: tuple[int, int]):
    """A module computing :meth:`firm.maps.PatchBank.score` of images in [0, 1] at ``shape`` with
    plain tensor operations (the graph that is exported): ``(raw image scores (N,), raw maps (N, H, W))``.

    The nearest-bank search is a full matmul and minimum (the package searches in tiles; both are
    exact); the re-weighting's bank neighbourhood is found by topk in the graph."""
    import torch
    from .maps import _sample, gaussian_blur, patch_features

    class PatchScorer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = patches.encoder.for_inference()  # the weights PatchBank.score runs
            bank = patches.bank_.float()
            self.register_buffer("bank", bank)
            self.register_buffer("bank_sq", (bank * bank).sum(1))
            self.register_buffer("scales", patches._channel_scales().float())
            self.k = min(patches.neighbours, len(bank))

        def _distances(self, x):
            """Euclidean distances ``(B, M)`` of rows ``(B, D)`` to the bank, as ``torch.cdist`` computes them."""
            return ((x * x).sum(1, keepdim=True) - ((2 * x) @ self.bank.T - self.bank_sq)).clamp(min=0).sqrt()

        def forward(self, images):
            feats, (oy, sy, ox, sx) = patch_features(self.encoder, images, patches.stages, patches.max_grid)
            h, w = feats.shape[-2:]
            q = feats.flatten(2).transpose(1, 2) / self.scales  # (N, h * w, D)
            # the nearest bank row maximises 2 q.b - |b|^2; the distance to it is measured directly, as nearest_distance does
            nearest = ((2 * q) @ self.bank.T - self.bank_sq).argmax(-1)
            dist = (q - self.bank[nearest]).norm(dim=-1)
            # PatchCore's re-weighting of the most distant patch, as PatchBank._reweighted
            worst = dist.argmax(1, keepdim=True)
            top = dist.gather(1, worst)[:, 0]
            to_bank = self._distances(q.gather(1, worst.unsqueeze(-1).expand(-1, -1, q.shape[-1]))[:, 0])
            support = self._distances(self.bank[to_bank.argmin(1)]).topk(self.k, largest=False).indices  # m* first
            scores = top * (1 - torch.softmax(to_bank.gather(1, support), dim=1)[:, 0])
            H, W = shape
            up = _sample(dist.reshape(-1, 1, h, w), (torch.arange(H) - oy) / sy, (torch.arange(W) - ox) / sx)
            return scores, gaussian_blur(up.squeeze(1), patches.sigma)

    return PatchScorer().eval()


def export_onnx(model_dir: str | os.PathLike, out: str | os.PathLike | None = None, check_images: int = 16,
                tolerance: float = 1e-4) -> dict:
    """Export the detector in ``model_dir`` to ``out`` (default MODEL_DIR/onnx) and check that
    onnxruntime's scores (and, for a patch detector, its anomaly maps) match PyTorch's on
    ``check_images`` fixed random images; raises :class:`ExportError` if they differ by more than
    ``tolerance`` on the raw scale (before the detector's scales). Returns a summary dict."""
    from .detector import FIRMDetector
    from .rundir import ONNX
    require_onnx()
    model_dir = Path(model_dir)
    out = Path(out) if out is not None else model_dir / ONNX
    det = FIRMDetector.load(model_dir, progress=False)
    if det.score_ not in _FORMAT_VERSIONS:
        raise ValueError(f"{model_dir} scores images by {det.score_!r}, which ONNX export does not cover")
    if det.score_ == POOLED:
        e = det.settings_.eval
        _check_scoring(e.scorer, e.tta, e.center_crop)
    new_folder = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    for name in EXPORT_FILES:  # an export of the other kind there would be left beside this one
        (out / name).unlink(missing_ok=True)
    try:
        return (_export_pooled if det.score_ == POOLED else _export_patch)(det, out, check_images, tolerance)
    except ExportError:
        raise  # its message points at the files, to be looked at
    except BaseException:
        # an export that failed leaves nothing: no half-written folder that looks like an export
        for name in EXPORT_FILES:
            (out / name).unlink(missing_ok=True)
        if new_folder and not any(out.iterdir()):
            out.rmdir()
        raise


def _export_pooled(det, out: Path, check_images: int, tolerance: float) -> dict:
    import torch
    from .serialization import atomic_write, write_json
    scorer, tta = det.settings_.eval.scorer, det.settings_.eval.tta
    k, _ = _check_scoring(scorer, tta)
    size, channels = det.encoder_.config.image_size, det.encoder_.config.in_channels
    _export_graph(det.encoder_.backbone, torch.rand(2, channels, size, size), out / ENCODER_FILE, ("features",))
    bank = det.bank_.features[:_TTA_TURNS[tta], 0].float().numpy()
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(bank), allow_pickle=False)
    atomic_write(out / BANK_NPY, buf.getvalue())
    settings = {"format": DEPLOY_FORMAT, "format_version": _FORMAT_VERSIONS[POOLED], "kind": POOLED,
                "image_size": size, "channels": channels,
                "input": {"name": "images", "layout": "NCHW", "dtype": "float32", "range": [0.0, 1.0]},
                "scorer": scorer, "k": k, "tta": tta, "rotations": int(bank.shape[0]),
                "threshold": det.threshold_, "bank_size": int(bank.shape[1]), "feature_dim": int(bank.shape[2]),
                "score_scale": det.score_scale_,
                "score": "minus the mean top-k cosine similarity to the bank, averaged over rotations "
                         "(rotation r = r x 90 degrees counter-clockwise, against bank[r]), then (raw - center) / unit "
                         "with score_scale = [center, unit] when given (1.0 = the threshold); higher = more anomalous",
                "files": {name: _sha256(out / name) for name in (ENCODER_FILE, BANK_NPY)}}
    write_json(out / DEPLOY_FILE, settings)
    images = _check_images(check_images, channels, (size, size))
    expected = det.decision_function(images)
    got = OnnxDetector(out).decision_function(images)
    unit = det.score_scale_[1] if det.score_scale_ is not None else 1.0
    diff = _check_parity("scores", (got - expected) * unit, tolerance, out)  # on the raw score's scale
    return {"path": str(out / ENCODER_FILE), "bank": str(out / BANK_NPY), "config": str(out / DEPLOY_FILE),
            "max_abs_diff": diff, "images_checked": check_images, "score": POOLED, "scorer": scorer, "tta": tta}


def _export_patch(det, out: Path, check_images: int, tolerance: float) -> dict:
    import torch
    from .serialization import write_json
    patches, shape, channels = det.patches_, tuple(det.input_shape), det.encoder_.config.in_channels
    _export_graph(_patch_scorer(patches, shape), torch.rand(2, channels, *shape), out / PATCH_FILE, ("scores", "maps"))
    height, width = shape
    settings = {
        "format": DEPLOY_FORMAT, "format_version": _FORMAT_VERSIONS[PATCH], "kind": PATCH, "input_shape": [height, width],
        "channels": channels,
        "input": {"name": "images", "layout": "NCHW", "dtype": "float32", "range": [0.0, 1.0],
                  "shape": ["batch", channels, height, width]},
        "outputs": {"scores": "(batch,) float32 raw image scores: PatchCore's re-weighted Euclidean distance of the "
                              "image's most unusual patch to its nearest bank patch",
                    "maps": f"(batch, {height}, {width}) float32 raw anomaly maps: each patch's distance to its "
                            "nearest bank patch, interpolated bilinearly between patch centres and smoothed by a "
                            f"Gaussian of sigma {patches.sigma:g} px"},
        "score_scale": det.score_scale_, "map_scale": det.map_scale_, "threshold": det.threshold_,
        "score": "decision score = (raw score - center) / unit with score_scale = [center, unit], and maps = "
                 "(raw map - center) / unit with map_scale (0 = the median held-out normal image, 1.0 = the "
                 "threshold quantile); raw values when a scale is null; higher = more anomalous, and images whose "
                 "decision score exceeds threshold are anomalies",
        "bank_size": len(patches.bank_), "feature_dim": int(patches.bank_.shape[1]), "stages": list(patches.stages),
        "patch_grid": list(patches.grid_),
        "neighbours": patches.neighbours, "sigma": patches.sigma, "files": {PATCH_FILE: _sha256(out / PATCH_FILE)}}
    write_json(out / DEPLOY_FILE, settings)
    images = _check_images(check_images, channels, shape)
    maps, scores = patches.score(torch.from_numpy(images))
    got_scores, got_maps = OnnxDetector(out).raw_scores_and_maps(images)
    diff = _check_parity("scores", got_scores - scores.numpy(), tolerance, out)
    map_diff = _check_parity("anomaly maps", got_maps - maps.numpy(), tolerance, out)
    return {"path": str(out / PATCH_FILE), "config": str(out / DEPLOY_FILE), "max_abs_diff": diff,
            "max_abs_map_diff": map_diff, "images_checked": check_images, "score": PATCH}


def _check_images(n: int, channels: int, shape: tuple[int, int]) -> np.ndarray:
    """Fixed random uint8 images ``(n, channels, H, W)`` for the parity check."""
    return np.random.default_rng(0).integers(0, 256, (n, channels, *shape), dtype=np.uint8)


def _check_parity(what: str, diff: np.ndarray, tolerance: float, out: Path) -> float:
    """The largest ``|diff|``; :class:`ExportError` when it exceeds ``tolerance``."""
    worst = float(np.max(np.abs(diff))) if diff.size else 0.0
    if not worst <= tolerance:
        raise ExportError(f"ONNX {what} differ from PyTorch's by up to {worst:.3g} (> {tolerance:g}); the export "
                          f"in {out} is not faithful")
    return worst
