"""Anomaly maps: PatchCore-style patch scoring on the encoder's backbone (FIRM-trained or not).

How a map is made (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", 2022):

1. *Patch features.* The backbone's stage-2 and stage-3 feature maps (the mid-level layers:
   stage 1 is too generic, stage 4 too specific to what the network was trained on) are each
   averaged over a 3 x 3 neighbourhood, so that a patch feature describes its surroundings too.
   The patch grid is stage 2's, average-pooled by a whole factor when finer than ``max_grid``
   cells a side (the CIFAR stem keeps stage 2 at half the image size), which bounds the patches
   per image; stage 3 is sampled bilinearly at the grid's patch centres and concatenated.
   Positions are exact: a strided convolution centres cell ``i`` on pixel ``i * stride``, and
   maps are placed there (plain ``align_corners=False`` resizing would shift them by up to
   half a cell, 4-8 px at stride 8-16).
   Features are not L2-normalised (PatchCore compares raw features by Euclidean distance, and
   their size tells anomalies apart too), but each stage is divided by its mean patch norm on
   the training images, so both stages weigh the same whatever their scale (random and trained
   networks differ there by large factors). On KolektorSDD at 128 px (random-init width-16
   ResNet-18, CIFAR stem, bank 4096) this beat per-patch L2 normalisation: pixel AUROC 0.80
   vs 0.75, image AUROC 0.72 vs 0.58 (development figures, one seed).
2. *Memory bank.* The patch features of all normal training images, subsampled by greedy
   k-center coreset selection (each new member is the patch farthest from the members so far,
   distances measured on a random projection to ``projection_dim`` dimensions) to
   ``coreset`` of the patches and at most ``max_bank`` of them: the bank, and so the memory
   and the search per test patch, stay bounded however many training images there are. The
   selection costs ``bank size x patches x min(D, projection_dim)`` multiply-adds, the
   largest part of ``fit`` on a CPU.
3. *Maps.* Each test patch's Euclidean distance to its nearest bank patch (exact, through
   the tiled kNN search), placed at the patch's centre and interpolated bilinearly to every pixel,
   then smoothed by a Gaussian (sigma 4 px, as PatchCore). The image score is PatchCore's
   re-weighted distance of the image's most distant patch (:meth:`PatchBank.score`); higher =
   more anomalous for both.

Metrics: :func:`pixel_auroc` (ROC over all pixels) and :func:`pro_score` (area under the
per-region-overlap curve up to a false-positive rate of 0.3, normalised, as in MVTec AD).
:func:`save_overlays` writes heat-map overlays and an ``index.csv`` that ``firm report`` reads.
"""
from __future__ import annotations

import csv
import io
import math
import os
from collections import Counter
from dataclasses import dataclass
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .evaluation import auroc
from .features import model_device
from .models import Encoder
from .scoring import knn_search
from .serialization import atomic_write

__all__ = ["PatchBank", "PatchGrid", "patch_features", "greedy_coreset", "nearest_distance", "gaussian_blur", "image_scores",
           "pixel_auroc", "pro_score", "map_metrics", "save_overlays", "read_overlay_index", "MAPS_INDEX"]

MAPS_INDEX = "index.csv"  # written by save_overlays beside the PNG files: file, name, score
_STAGES = (2, 3)
# On a CPU a forward pass over more pixels than this is slower per image, not faster: the
# activations of a large batch no longer stay in the caches, and each one is a fresh allocation.
_CPU_BATCH_PIXELS = 2 ** 18


def _stride(pixels: int, cells: int) -> int:
    """Input pixels per cell of a ResNet feature map: a power of two (each strided layer halves
    the map, rounding up). Cell ``i`` of such a map is centred on pixel ``i * stride``."""
    return 2 ** round(math.log2(pixels / cells))


def _sample(m: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """Bilinear samples of ``m`` ``(B, C, h, w)`` at fractional cell indices ``rows`` x ``cols``;
    beyond the first and the last cell the edge value is repeated."""
    h, w = m.shape[-2:]
    gy = rows.float() * (2 / max(h - 1, 1)) - 1
    gx = cols.float() * (2 / max(w - 1, 1)) - 1
    yy, xx = torch.meshgrid(gy.to(m.device), gx.to(m.device), indexing="ij")
    grid = torch.stack([xx, yy], dim=-1).expand(m.shape[0], -1, -1, -1)  # not len(m): ONNX export keeps shape[0] dynamic
    return F.grid_sample(m, grid, mode="bilinear", padding_mode="border", align_corners=True)


@torch.no_grad()
def patch_features(encoder: Encoder, x: Tensor, stages: Sequence[int] = _STAGES,
                   max_grid: int = 32) -> tuple[Tensor, tuple[float, float, float, float]]:
    """Patch features ``(B, D, h, w)`` of images ``x`` (float, in [0, 1], on the encoder's
    device; the stages' channels in order, not normalised) and where the patches lie:
    ``(oy, sy, ox, sx)``, patch ``(i, j)`` being centred on pixel ``(oy + i * sy, ox + j * sx)``.

    The grid is the first stage's, average-pooled by a whole factor when it has more than
    ``max_grid`` cells a side. The other stages are sampled bilinearly at the grid's patch
    centres (a strided convolution centres cell ``i`` on pixel ``i * stride``, which
    ``align_corners`` interpolation would shift by half a cell).
    """
    maps = encoder.feature_maps(x, tuple(stages))
    H, W = x.shape[-2:]
    h1, w1 = maps[0].shape[-2:]
    fy, fx = math.ceil(h1 / max_grid), math.ceil(w1 / max_grid)
    ty, tx = _stride(H, h1), _stride(W, w1)
    oy, sy, ox, sx = (fy - 1) / 2 * ty, fy * ty, (fx - 1) / 2 * tx, fx * tx
    size = (math.ceil(h1 / fy), math.ceil(w1 / fx))
    rows, cols = oy + sy * torch.arange(size[0]), ox + sx * torch.arange(size[1])
    parts = []
    for m in maps:
        m = F.avg_pool2d(m.float(), 3, stride=1, padding=1, count_include_pad=False)  # 3 x 3 neighbourhood
        ty, tx = _stride(H, m.shape[-2]), _stride(W, m.shape[-1])
        gy, gx = max(1, int(sy // ty)), max(1, int(sx // tx))
        if gy > 1 or gx > 1:  # finer than the grid: average first, so that sampling does not alias
            m = F.avg_pool2d(m, (gy, gx), stride=(gy, gx), ceil_mode=True)
        my, mx = (gy - 1) / 2 * ty, (gx - 1) / 2 * tx
        if m.shape[-2:] != size or (my, gy * ty, mx, gx * tx) != (oy, sy, ox, sx):
            m = _sample(m, (rows - my) / (gy * ty), (cols - mx) / (gx * tx))
        parts.append(m)
    return torch.cat(parts, dim=1), (oy, sy, ox, sx)


def greedy_coreset(features: Tensor, size: int, projection_dim: int | None = 128, seed: int = 0,
                   progress: bool = False) -> Tensor:
    """Indices of ``size`` rows of ``features`` ``(N, D)`` chosen by greedy k-center selection.

    Starts from a seeded random row; each next row is the one farthest from those chosen so
    far, so the chosen rows cover all rows with the smallest radius greedy can find. Distances
    are measured on a seeded Gaussian random projection to ``projection_dim`` dimensions when
    ``D`` is larger (None: never). Stops early, with fewer rows, once every row coincides with
    a chosen one. Cost: ``size`` passes over the ``(N, projection_dim)`` matrix, so the
    projection's width sets the time (a pass is bound by memory bandwidth).
    """
    from tqdm.auto import tqdm
    n = len(features)
    size = min(int(size), n)
    if size < 1:
        raise ValueError(f"coreset size must be >= 1, got {size}")
    gen = torch.Generator().manual_seed(seed)
    x = features.detach().float().cpu()
    if projection_dim is not None and x.shape[1] > projection_dim:
        x = x @ (torch.randn(x.shape[1], projection_dim, generator=gen) / math.sqrt(projection_dim))
    x = x.contiguous()
    sq = (x * x).sum(1)
    chosen = torch.empty(size, dtype=torch.long)
    chosen[0] = int(torch.randint(n, (1,), generator=gen))
    mind = torch.full((n,), float("inf"))  # squared distance of each row to its nearest chosen row
    threads = torch.get_num_threads()
    # One small pass per step: on a busy machine, handing each pass to several threads costs
    # more than the pass itself (7x slower on a loaded 2-core machine), so run it in one thread.
    torch.set_num_threads(1)
    bar = tqdm(total=size, desc="coreset", unit="patch", disable=not progress, leave=False, miniters=256)
    try:
        count = 1
        while True:
            i = int(chosen[count - 1])
            torch.minimum(mind, torch.addmv(sq, x, x[i], alpha=-2).add_(sq[i]).clamp_(min=0), out=mind)
            mind[i] = 0  # exactly covered, whatever the rounding
            if count == size:
                break
            j = int(mind.argmax())
            if float(mind[j]) <= 0:
                break  # every row coincides with a chosen one
            chosen[count] = j
            count += 1
            bar.update()
    finally:
        bar.close()
        torch.set_num_threads(threads)
    return chosen[:count]


def gaussian_blur(maps: Tensor, sigma: float) -> Tensor:
    """``(N, H, W)`` maps smoothed by a separable Gaussian of ``sigma`` pixels (reflected
    borders; kernel radius 4 sigma, as PatchCore's). ``sigma <= 0`` returns the maps unchanged."""
    if sigma <= 0:
        return maps
    radius = int(4 * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).to(maps.device)
    x = maps.float().unsqueeze(1)
    h, w = x.shape[-2:]
    # reflection needs a border narrower than the map; replicate beyond that (tiny maps only)
    mode_h = "reflect" if radius < h else "replicate"
    mode_w = "reflect" if radius < w else "replicate"
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode=mode_h), k.view(1, 1, -1, 1))
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode=mode_w), k.view(1, 1, 1, -1))
    return x.squeeze(1)


def image_scores(maps: Tensor) -> Tensor:
    """Image anomaly scores: the maximum of each map ``(N, H, W)`` -> ``(N,)``."""
    return maps.flatten(1).amax(1)


def nearest_distance(bank: Tensor, queries: Tensor) -> Tensor:
    """Euclidean distance of each query ``(Q, D)`` to its nearest bank row ``(M, D)``, exact.
    The row is found through :func:`~firm.scoring.knn_search` (in tiles, so memory stays
    bounded): it minimises ``|q - b|^2 = |q|^2 - (2 q.b - |b|^2)``, an inner product of
    ``[q, 1]`` with ``[2 b, -|b|^2]``. The distance to it is then measured directly: that
    difference of squares loses all precision for a query close to its row (a patch of a
    training image), whose distance would come out as the square root of a rounding error."""
    bank, queries = bank.float(), queries.float()
    keys = torch.cat([2 * bank, -(bank * bank).sum(1, keepdim=True)], dim=1)
    nearest = knn_search(keys, torch.cat([queries, queries.new_ones(len(queries), 1)], dim=1), 1)[1][:, 0]
    return (queries - bank[nearest]).norm(dim=1)


@dataclass
class PatchGrid:
    """Raw patch features of a set of images: ``features`` ``(N, h, w, D)`` on the CPU, ``layout``
    ``(oy, sy, ox, sx)`` (patch ``(i, j)`` is centred on pixel ``(oy + i * sy, ox + j * sx)``) and
    the images' ``image_shape`` ``(H, W)``."""

    features: Tensor
    layout: tuple[float, float, float, float]
    image_shape: tuple[int, int]


class PatchBank:
    """Patch-level anomaly detector on an encoder's backbone (PatchCore-style); see the module doc.

    Parameters: ``encoder`` (its backbone is used, in eval mode, never changed), ``stages``
    (1-indexed ResNet stages; the first sets the patch grid), ``coreset`` (share of the training
    patches kept, 1.0 = all), ``max_bank`` (at most this many patches kept: bounds the memory,
    the coreset's cost and the search), ``projection_dim`` (dimensions of the random projection
    for the coreset selection), ``sigma`` (Gaussian smoothing of the maps, in input pixels),
    ``max_grid`` (patches per side at most), ``batch_size`` (images per search and per forward
    pass, fewer in a pass on a CPU when the images are large), ``seed``, ``neighbours`` (the bank
    neighbourhood of PatchCore's image-score re-weighting, :meth:`score`), ``progress`` (bars for
    feature extraction, coreset and scoring).

    Fitted attributes: ``bank_`` (scaled patch features ``(M, D)``), ``stage_scales_`` (the
    mean patch norm of each stage on the training images, which the features are divided by),
    ``n_patches_`` (training patches before the coreset), ``grid_`` (patch grid of the training
    images). Follows the PyOD sign convention: higher = more anomalous.
    """

    def __init__(self, encoder: Encoder, stages: Sequence[int] = _STAGES, coreset: float = 0.1, max_bank: int = 4096,
                 projection_dim: int | None = 128, sigma: float = 4.0, max_grid: int = 32, batch_size: int = 32,
                 seed: int = 0, neighbours: int = 9, progress: bool = False):
        self.encoder, self.stages, self.coreset, self.max_bank = encoder, tuple(stages), coreset, max_bank
        self.projection_dim, self.sigma, self.max_grid = projection_dim, sigma, max_grid
        self.batch_size, self.seed, self.neighbours, self.progress = batch_size, seed, neighbours, progress

    def _check(self) -> None:
        if not self.stages or sorted(set(self.stages)) != list(self.stages) or min(self.stages) < 1:
            raise ValueError(f"stages must be increasing 1-indexed backbone stages, got {self.stages}")
        if not 0 < self.coreset <= 1:
            raise ValueError(f"coreset must be a share in (0, 1], got {self.coreset}")
        if self.max_bank < 1 or self.max_grid < 1 or self.batch_size < 1 or self.neighbours < 1:
            raise ValueError("max_bank, max_grid, batch_size and neighbours must be >= 1")

    @staticmethod
    def _as_images(images: Tensor) -> Tensor:
        if not isinstance(images, Tensor) or images.ndim != 4 or images.dtype != torch.uint8:
            raise ValueError("images must be a uint8 tensor (N, C, H, W), as firm.data's readers return them; got "
                             f"{type(images).__name__} {getattr(images, 'dtype', '')} {tuple(getattr(images, 'shape', ()))}")
        if len(images) == 0:
            raise ValueError("no images")
        return images

    def _patches(self, images: Tensor, desc: str):
        """Yield ``(start, patch features (B * h * w, D) on the CPU, (B, h, w), layout)`` batch by
        batch, from the encoder's inference copy (:meth:`~firm.models.Encoder.for_inference`)."""
        from tqdm.auto import tqdm
        model, device = self.encoder.for_inference(), model_device(self.encoder)
        step = self.batch_size
        if device.type == "cpu":
            step = max(1, min(step, _CPU_BATCH_PIXELS // (images.shape[-2] * images.shape[-1])))
        for start in tqdm(range(0, len(images), step), desc=desc, unit="batch",
                          disable=not self.progress, leave=False):
            x = images[start:start + step].to(device).float().div_(255)
            feats, layout = patch_features(model, x, self.stages, self.max_grid)
            b, d, h, w = feats.shape
            yield start, feats.permute(0, 2, 3, 1).reshape(-1, d).cpu(), (b, h, w), layout

    def _stage_split(self) -> list[int]:
        return list(self.encoder.map_dims(self.stages))

    def extract(self, images: Tensor) -> "PatchGrid":
        """Raw patch features of uint8 images ``(N, C, H, W)``: what :meth:`fit` and :meth:`score`
        compute first; pass the result to them instead of the images to reuse it."""
        self._check()
        images = self._as_images(images)
        chunks, layout = [], None
        for _, feats, (b, h, w), batch_layout in self._patches(images, "patch features"):
            chunks.append(feats.view(b, h, w, -1))
            layout = batch_layout  # the same for every batch: the images share one shape
        return PatchGrid(torch.cat(chunks), layout, tuple(images.shape[-2:]))

    def fit(self, images: "Tensor | PatchGrid") -> "PatchBank":
        """Build the memory bank from normal uint8 images ``(N, C, H, W)`` (or their :meth:`extract`)."""
        grid = images if isinstance(images, PatchGrid) else self.extract(images)
        self._check()
        self.grid_ = tuple(grid.features.shape[1:3])
        feats = grid.features.reshape(-1, grid.features.shape[-1])
        dims = self._stage_split()
        norms = torch.stack([part.norm(dim=1).mean() for part in feats.split(dims, dim=1)])
        self.stage_scales_ = norms.clamp(min=1e-12)
        feats = feats / self._channel_scales()
        self.n_patches_ = len(feats)
        size = min(self.max_bank, max(1, math.ceil(self.coreset * len(feats))))
        if size < len(feats):
            feats = feats[greedy_coreset(feats, size, self.projection_dim, self.seed, self.progress)]
        self.bank_ = feats.contiguous()
        return self

    def _channel_scales(self) -> Tensor:
        dims = self._stage_split()
        return torch.cat([s.expand(d) for s, d in zip(self.stage_scales_, dims)])

    def anomaly_maps(self, images: Tensor) -> Tensor:
        """Anomaly maps ``(N, H, W)`` at the images' size (float32, higher = more anomalous): each
        patch's distance to its nearest bank patch, placed at the patch's centre and interpolated
        bilinearly between centres, then smoothed by the Gaussian."""
        return self.score(images)[0]

    def score(self, images: "Tensor | PatchGrid", with_maps: bool = True) -> tuple[Tensor | None, Tensor]:
        """Anomaly maps ``(N, H, W)`` (:meth:`anomaly_maps`; None when not ``with_maps``, which
        saves their upsampling and smoothing) and image scores ``(N,)``, in one pass (``images``:
        uint8 ``(N, C, H, W)``, or their :meth:`extract`).

        The image score is PatchCore's: the largest patch distance ``s*`` of the image, weighted
        by how unusual the bank's neighbourhood of that patch's nearest bank patch ``m*`` is:
        ``s* * (1 - softmax(d)[0])``, ``d`` being the patch's distances to ``m*`` and to the
        ``neighbours - 1`` bank patches nearest ``m*``. A patch near a dense part of the bank gets
        a weight near ``1 - 1 / neighbours``; one near an isolated bank patch gets a larger one.
        """
        if not hasattr(self, "bank_"):
            raise RuntimeError("PatchBank is not fitted: call fit(normal_images) first")
        grid = images if isinstance(images, PatchGrid) else self.extract(images)
        (H, W), (oy, sy, ox, sx) = grid.image_shape, grid.layout
        n, h, w, _ = grid.features.shape
        maps, scores = torch.empty(n, H, W) if with_maps else None, torch.empty(n)
        scales = self._channel_scales()
        for start in range(0, n, self.batch_size):
            feats = grid.features[start:start + self.batch_size] / scales
            b = len(feats)
            dist = nearest_distance(self.bank_, feats.reshape(b * h * w, -1))
            scores[start:start + b] = self._reweighted(feats.view(b, h * w, -1), dist.view(b, h * w))
            if not with_maps:
                continue
            up = _sample(dist.view(b, 1, h, w), (torch.arange(H) - oy) / sy, (torch.arange(W) - ox) / sx)
            maps[start:start + b] = gaussian_blur(up.squeeze(1), self.sigma)
        return maps, scores

    def _reweighted(self, feats: Tensor, dist: Tensor) -> Tensor:
        """PatchCore's image scores of ``B`` images from their patch features ``(B, P, D)`` and
        nearest-bank distances ``(B, P)`` (see :meth:`score`)."""
        worst = dist.argmax(1)
        rows = torch.arange(len(dist))
        patch, top = feats[rows, worst], dist[rows, worst]
        to_bank = torch.cdist(patch, self.bank_)  # (B, M): a few rows, exact
        nearest = to_bank.argmin(1)
        k = min(self.neighbours, len(self.bank_))
        support = torch.cdist(self.bank_[nearest], self.bank_).topk(k, largest=False).indices  # m* first
        d = to_bank.gather(1, support)
        return top * (1 - torch.softmax(d, dim=1)[:, 0])

    _PARAMS = ("stages", "coreset", "max_bank", "projection_dim", "sigma", "max_grid", "batch_size", "seed")

    def to_tensors(self) -> tuple[dict[str, Tensor], dict]:
        """The tensors and header metadata that :meth:`from_tensors` rebuilds this bank from
        (``patches.safetensors`` of a model folder)."""
        params = {k: getattr(self, k) for k in self._PARAMS}
        params["stages"] = list(params["stages"])
        return ({"bank": self.bank_.float(), "stage_scales": self.stage_scales_.float()},
                {"params": params, "n_patches": int(self.n_patches_), "grid": list(self.grid_)})

    @classmethod
    def from_tensors(cls, encoder: Encoder, tensors: dict[str, Tensor], meta: dict, source: str) -> "PatchBank":
        """A fitted bank on ``encoder`` from what :meth:`to_tensors` returned; ``source`` names
        the file in errors (:class:`ValueError` when tensors or parameters are missing or do not
        fit the encoder)."""
        try:
            bank = cls(encoder, **{k: meta["params"][k] for k in cls._PARAMS})
            bank.bank_, bank.stage_scales_ = tensors["bank"], tensors["stage_scales"]
            bank.n_patches_, bank.grid_ = int(meta["n_patches"]), tuple(meta["grid"])
            dims = list(encoder.map_dims(bank.stages))
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ValueError(f"patch bank {source} lacks its tensors or parameters ({e}); refit the detector") from e
        if bank.bank_.ndim != 2 or bank.bank_.shape[1] != sum(dims) or len(bank.stage_scales_) != len(dims):
            raise ValueError(f"patch bank {source} has features of shape {tuple(bank.bank_.shape)}, the encoder's "
                             f"stages {list(bank.stages)} give {sum(dims)} dimensions; refit the detector")
        return bank


def _check_maps_masks(maps, masks) -> tuple[np.ndarray, np.ndarray]:
    m = np.asarray(maps.detach().cpu() if isinstance(maps, Tensor) else maps, dtype=np.float64)
    g = np.asarray(masks.detach().cpu() if isinstance(masks, Tensor) else masks)
    if m.shape != g.shape or m.ndim != 3:
        raise ValueError(f"maps and masks must both be (N, H, W) of the same shape; got {m.shape} and {g.shape}")
    if not np.isfinite(m).all():
        raise ValueError("anomaly maps contain NaN or infinite values")
    return m, g != 0


def pixel_auroc(maps, masks) -> float:
    """AUROC of the map values over all pixels of all images, defect pixels (mask != 0) being
    the positives; equal to ``sklearn.metrics.roc_auc_score(masks.ravel() != 0, maps.ravel())``."""
    m, g = _check_maps_masks(maps, masks)
    return auroc(m.ravel(), g.ravel().astype(np.int64))


def pro_score(maps, masks, max_fpr: float = 0.3) -> float:
    """Area under the per-region-overlap (PRO) curve up to ``max_fpr``, divided by ``max_fpr``
    (MVTec AD's AU-PRO, exact: every distinct map value is a threshold).

    Regions are the 8-connected components of each mask. At a threshold, a region's overlap is
    the share of its pixels above it, PRO is the mean overlap over all regions of all images
    (each region weighs the same, whatever its size), and the false-positive rate is the share
    of defect-free pixels above it. Images without defects add only defect-free pixels.
    """
    from scipy import ndimage

    if not 0 < max_fpr <= 1:
        raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}")
    m, g = _check_maps_masks(maps, masks)
    regions = np.zeros(g.shape, dtype=np.int64)
    offset = 0
    for i in range(len(g)):
        labelled, count = ndimage.label(g[i], structure=np.ones((3, 3), dtype=int))
        regions[i] = np.where(labelled > 0, labelled + offset, 0)
        offset += count
    n_ok = int((~g).sum())
    if offset == 0 or n_ok == 0:
        raise ValueError("PRO needs defect regions and defect-free pixels; the masks hold only one kind")
    sizes = np.bincount(regions.ravel(), minlength=offset + 1).astype(np.float64)
    flat_regions = regions.ravel()
    fp_step = np.where(flat_regions == 0, 1.0 / n_ok, 0.0)
    pro_step = np.where(flat_regions > 0, 1.0 / (offset * sizes[flat_regions].clip(min=1)), 0.0)
    order = np.argsort(-m.ravel(), kind="stable")
    values = m.ravel()[order]
    fpr, pro = np.cumsum(fp_step[order]), np.cumsum(pro_step[order])
    last = np.r_[values[1:] != values[:-1], True]  # tied values form one threshold
    fpr = np.r_[0.0, fpr[last].clip(max=1)]
    pro = np.r_[0.0, pro[last].clip(max=1)]
    keep = fpr <= max_fpr
    x, y = fpr[keep], pro[keep]
    if x[-1] < max_fpr:  # close the curve at max_fpr by linear interpolation
        j = int(np.searchsorted(fpr, max_fpr, side="right"))
        x0, x1, y0, y1 = fpr[j - 1], fpr[j], pro[j - 1], pro[j]
        x, y = np.r_[x, max_fpr], np.r_[y, y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)]
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2) / max_fpr)


def map_metrics(maps, masks=None, is_anomaly=None, max_fpr: float = 0.3) -> dict:
    """``image_auroc`` (map maxima against ``is_anomaly``), ``pixel_auroc`` and ``pro`` (when
    masks are given), each left out when its labels hold only one kind."""
    out, maps = {}, torch.as_tensor(maps)
    if is_anomaly is not None and len(np.unique(np.asarray(is_anomaly))) == 2:
        out["image_auroc"] = auroc(image_scores(maps).numpy(), np.asarray(is_anomaly))
    defect = None if masks is None else int((torch.as_tensor(masks) != 0).sum())
    if defect is not None and 0 < defect < maps.numel():
        out["pixel_auroc"] = pixel_auroc(maps, masks)
        out["pro"] = pro_score(maps, masks, max_fpr)
    return out


def _overlay_names(paths_or_names: Sequence[str | os.PathLike]) -> list[str]:
    """File names for the overlays: the image's stem, with its folder's name in front when two
    images share a stem (MVTec AD's test/crack/000.png and test/good/000.png), then a number."""
    paths = [Path(str(p)) for p in paths_or_names]
    stems = Counter(p.stem or "image" for p in paths)
    names = [f"{p.parent.name}_{p.stem}" if stems[p.stem or "image"] > 1 and p.parent.name else p.stem or "image"
             for p in paths]
    counts, seen, out = Counter(names), Counter(), []
    for n in names:
        seen[n] += 1
        out.append(f"{n}.png" if counts[n] == 1 else f"{n}_{seen[n]}.png")
    return out


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it: the outline drawn on overlays."""
    padded = np.pad(mask, 1)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def save_overlays(images: Tensor, maps: Tensor, paths_or_names: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                  vmax: float | None = None, vmin: float | None = None, alpha: float = 0.5, masks: Tensor | None = None,
                  colormap: str = "jet", scores: Sequence[float] | None = None) -> list[Path]:
    """Write one PNG per image: its anomaly map as a heat map (``colormap``, blended with
    ``alpha``) over the image, and ``index.csv`` (file, name, score: ``scores``, default the map
    maximum) beside them.

    Colours span ``[vmin, vmax]`` (default: the smallest and largest value of all ``maps``,
    so the overlays of one call are comparable; pass a fixed ``vmax``, e.g. a threshold, to
    compare across calls). ``masks`` (N, H, W), when given, are outlined in white. Files are
    written atomically; returns their paths.
    """
    import matplotlib
    from PIL import Image

    images, maps = torch.as_tensor(images), torch.as_tensor(maps).float()
    if images.ndim != 4 or images.dtype != torch.uint8 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be uint8 (N, 1 or 3, H, W), got {images.dtype} {tuple(images.shape)}")
    if maps.shape != (len(images), *images.shape[-2:]):
        raise ValueError(f"maps must be (N, H, W) = {(len(images), *images.shape[-2:])}, got {tuple(maps.shape)}")
    if len(paths_or_names) != len(images):
        raise ValueError(f"{len(paths_or_names)} names for {len(images)} images")
    masks = None if masks is None else torch.as_tensor(masks)
    if masks is not None and tuple(masks.shape) != tuple(maps.shape):
        raise ValueError(f"masks must have the maps' shape {tuple(maps.shape)}, got {tuple(masks.shape)}")
    lo = float(maps.min()) if vmin is None else float(vmin)
    hi = float(maps.max()) if vmax is None else float(vmax)
    scale = (maps - lo) / max(hi - lo, 1e-12)
    cmap = matplotlib.colormaps[colormap]
    out_dir, written, rows = Path(out_dir), [], []
    for i, name in enumerate(_overlay_names(paths_or_names)):
        rgb = images[i].expand(3, -1, -1).permute(1, 2, 0).numpy().astype(np.float32) / 255
        heat = cmap(scale[i].clamp(0, 1).numpy())[..., :3]
        blend = (1 - alpha) * rgb + alpha * heat
        if masks is not None:
            blend[_outline(masks[i].numpy() != 0)] = 1.0
        buf = io.BytesIO()
        Image.fromarray((blend * 255).round().astype(np.uint8)).save(buf, format="PNG")
        atomic_write(out_dir / name, buf.getvalue())
        written.append(out_dir / name)
        rows.append((name, str(paths_or_names[i]), f"{float(maps[i].max() if scores is None else scores[i]):.6g}"))
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(("file", "name", "score"))
    writer.writerows(rows)
    atomic_write(out_dir / MAPS_INDEX, text.getvalue())
    return written


def read_overlay_index(maps_dir: str | os.PathLike) -> list[dict]:
    """Rows of a maps folder's ``index.csv`` (file, name, score as float) whose PNG exists,
    most anomalous first; empty when the folder holds no index."""
    maps_dir = Path(maps_dir)
    if not (maps_dir / MAPS_INDEX).is_file():
        return []
    with open(maps_dir / MAPS_INDEX, newline="") as f:
        rows = [dict(r, score=float(r["score"])) for r in csv.DictReader(f) if (maps_dir / r["file"]).is_file()]
    return sorted(rows, key=lambda r: -r["score"])
