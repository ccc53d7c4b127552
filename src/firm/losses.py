"""Contrastive losses: FIRM and the baselines it is compared with.

All the losses are the same softmax cross-entropy over cosine similarities; they differ only
in which pairs count as positives. Positives are expressed as *groups*: two rows are positives
of each other when they share a group id. FIRM puts all inliers of one ID class in one group and
gives every outlier a group of its own (shared only with its second view); NT-Xent gives every
sample its own group; SupCon uses the labels as groups. MSC, the baseline for fine-tuning
pretrained features, is NT-Xent's rule on embeddings shifted by the normal images' mean; the
``frozen`` entry trains nothing, so that unadapted features run through the same harness.

Groups let the positive term be computed from per-group sums of embeddings,
``sum_{p in P(i)} z_i . z_p = z_i . (sum_{j in g(i)} z_j) - z_i . z_i``, so no N x N float mask
is ever built: the only quadratic object is the similarity matrix that the softmax needs. In the
concat layout on one process that matrix is symmetric, and the backward pass uses it so: one
gradient matmul instead of two.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .registry import Registry

OUTLIER_LABEL = -1

__all__ = [
    "OUTLIER_LABEL",
    "ContrastiveLoss",
    "FIRMLoss",
    "NTXentLoss",
    "SupConLoss",
    "MSCLoss",
    "LossEntry",
    "LOSSES",
    "LOSS_MODES",
    "AUTHORS_MODE",
    "resolve_mode",
    "build_loss",
    "masked_softmax_loss",
]


def masked_softmax_loss(
    anchors: Tensor,
    keys: Tensor | None,
    anchor_groups: Tensor,
    key_groups: Tensor,
    tau: float,
    self_index: Tensor | None = None,
) -> Tensor:
    """Per-anchor contrastive cross-entropy where positives are keys of the same group.

    ``loss_i = logsumexp_k(a_i . k_k / tau) - mean_{p: g(p) = g(i)} a_i . k_p / tau``.
    ``self_index[i]`` is the column of anchor ``i`` among the keys (concat layout): that column
    is removed from the softmax and from the positives. ``keys=None`` means that the anchors are
    their own keys, each anchor's own column removed (the concat layout on one process): the
    similarity matrix is then symmetric, which saves one of the backward's two matrix products.
    Half-precision inputs are computed in float32 so that large batches cannot overflow.
    """
    if anchors.dtype in (torch.float16, torch.bfloat16):
        anchors = anchors.float()
        keys = None if keys is None else keys.float()
    symmetric = keys is None
    if symmetric:
        keys, self_index = anchors, torch.arange(anchors.shape[0], device=anchors.device)
    n_groups, anchor_gid, key_gid = _group_indices(anchor_groups, key_groups)
    group_sizes = torch.bincount(key_gid, minlength=n_groups)
    positive_count = group_sizes.index_select(0, anchor_gid)
    own = None
    if self_index is not None:
        own = key_gid.index_select(0, self_index) == anchor_gid
        positive_count = positive_count - own.long()
    if bool((positive_count == 0).any()):
        row = int(torch.nonzero(positive_count == 0)[0])
        raise ValueError(
            f"row {row} of the contrastive loss has no positive: its sample has no second view "
            "with the same label. Pass z1 and z2 in the same sample order, one row per sample."
        )
    shift = _global_shift(anchors, 1.0 / tau) if symmetric else None
    if shift is not None:
        log_normaliser = _SymmetricLogSumExp.apply(anchors, 1.0 / tau, shift)
    else:
        log_normaliser = _MaskedLogSumExp.apply(anchors, keys, 1.0 / tau, self_index)
    # index_add_/index_select rather than advanced indexing: their backward passes are a
    # gather and a row-wise add, where ``t[index]``'s is a much slower accumulating index_put.
    group_sums = keys.new_zeros(n_groups, keys.shape[1]).index_add_(0, key_gid, keys)
    positive_dot = (anchors * group_sums.index_select(0, anchor_gid)).sum(1)
    if own is not None:
        positive_dot = positive_dot - torch.where(own, (anchors * keys.index_select(0, self_index)).sum(1), 0.0)
    return log_normaliser - positive_dot / positive_count.to(positive_dot.dtype) / tau


def _group_indices(anchor_groups: Tensor, key_groups: Tensor) -> tuple[int, Tensor, Tensor]:
    """``(number of groups, anchor group index, key group index)``, indices in ``range(number)``.

    Small non-negative ids (every loss here produces them) index the group table directly;
    anything else is ranked with ``torch.unique``, which costs a sort.
    """
    both = torch.cat([anchor_groups, key_groups])
    low, high = (int(v) for v in torch.stack(torch.aminmax(both)).tolist())
    if low >= 0 and high < 4 * len(both):
        return high + 1, anchor_groups, key_groups
    groups, inverse = torch.unique(both, return_inverse=True)
    return len(groups), inverse[: len(anchor_groups)], inverse[len(anchor_groups):]


_LOG2E = 1.4426950408889634  # exp2 is several times cheaper than exp on CPU; scores are rescaled to base 2


def _global_shift(z: Tensor, scale: float) -> float | None:
    """One shift for every row of ``exp(scale * z z^T - shift)``, or None when none is safe.

    A shared shift keeps the weight matrix symmetric. ``shift = scale * max |z|^2`` bounds every
    entry (Cauchy-Schwarz), so the shifted exponents lie in ``[-2 shift, 0]``; when that range
    would underflow the dtype (a very small tau), the row-wise shift is needed instead.
    """
    shift = scale * float(z.detach().pow(2).sum(1).max())
    return shift if 2 * shift < -math.log(torch.finfo(z.dtype).tiny) - 8 else None


class _MaskedLogSumExp(torch.autograd.Function):
    """``logsumexp_k(scale * a_i . k_k)`` per anchor, column ``self_index[i]`` left out.

    Fused by hand because the similarity matrix is the only large object of the loss: the
    forward turns it in place into unnormalised softmax weights (no further copies), and the
    backward never touches it element-wise; the per-row factor ``grad_i / sum_i`` is applied to
    the small ``(rows, D)`` operands of the two gradient matmuls instead.
    """

    @staticmethod
    def forward(ctx, anchors: Tensor, keys: Tensor, scale: float, self_index: Tensor | None) -> Tensor:
        weights = torch.mm(anchors * (scale * _LOG2E), keys.T)
        if self_index is not None:
            rows = torch.arange(anchors.shape[0], device=anchors.device)
            weights[rows, self_index] = float("-inf")
        top = weights.amax(1, keepdim=True)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # a row with no column at all
        weights.sub_(top).exp2_()
        total = weights.sum(1)
        ctx.scale = scale
        ctx.save_for_backward(anchors, keys, weights, total)
        return (top.squeeze(1) + total.log2()) / _LOG2E

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        anchors, keys, weights, total = ctx.saved_tensors
        row_factor = (grad * ctx.scale / total).unsqueeze(1)  # softmax_ik = weights_ik / total_i
        grad_anchors = torch.mm(weights, keys).mul_(row_factor) if ctx.needs_input_grad[0] else None
        grad_keys = torch.mm(weights.T, anchors * row_factor) if ctx.needs_input_grad[1] else None
        return grad_anchors, grad_keys, None, None


class _SymmetricLogSumExp(torch.autograd.Function):
    """``logsumexp_{k != i}(scale * z_i . z_k)`` per row, with one shift for all rows.

    The weights ``w_ik = exp(scale * z_i . z_k - shift)`` then form a symmetric matrix, and the
    gradient ``sum_k w_ik (r_i + r_k) z_k`` (``r_i = grad_i * scale / sum_i``) is one matmul
    where the general case needs two.
    """

    @staticmethod
    def forward(ctx, z: Tensor, scale: float, shift: float) -> Tensor:
        weights = torch.mm(z * (scale * _LOG2E), z.T).sub_(shift * _LOG2E).exp2_()
        weights.fill_diagonal_(0.0)
        total = weights.sum(1)
        ctx.scale = scale
        ctx.save_for_backward(z, weights, total)
        return total.log() + shift

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        z, weights, total = ctx.saved_tensors
        r = grad * ctx.scale / total
        grad_z = torch.empty_like(z)
        # Row blocks bound the extra memory to one block, and one buffer serves them all (a fresh
        # large buffer per block costs page faults). On a CPU a block of 2^20 entries stays in
        # cache; a GPU wants few launches, so its blocks are larger.
        block = max(64, (1 << (24 if z.is_cuda else 20)) // len(z))
        buffer = weights.new_empty(min(block, len(z)), len(z))
        for start in range(0, len(z), block):
            rows = slice(start, start + block)
            block_weights = weights[rows]
            scaled = buffer[: len(block_weights)]
            torch.mul(block_weights, r[rows].unsqueeze(1), out=scaled).addcmul_(block_weights, r)
            torch.mm(scaled, z, out=grad_z[rows])
        return grad_z, None, None


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums each rank's gradient for the local slice (works on gloo)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        n = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * n:(dist.get_rank() + 1) * n]


def _gather(x: Tensor) -> Tensor:
    if x.requires_grad:
        return _GatherWithGrad.apply(x)
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


AUTHORS_MODE = "authors"
LOSS_MODES: Registry[str] = Registry(
    "loss layout",
    {"concat": "both views of every sample in one 2N x 2N similarity matrix (SimCLR's)",
     "pairwise": "view 1 against view 2, N x N, and back"},
    keywords={AUTHORS_MODE: "each loss's layout as the authors ran it"})
"""Loss layouts; ``authors`` resolves per loss (:func:`resolve_mode`)."""


class ContrastiveLoss(nn.Module):
    """Base of the loss family: ``loss(z1, z2, labels)`` on two L2-normalised views.

    Subclasses only define :meth:`positive_groups`. Layouts:

    * ``"concat"``: the 2N x 2N similarity matrix of both views, diagonal excluded, averaged
      over the 2N rows;
    * ``"pairwise"``: N x N logits of view-1 anchors against view-2 keys, averaged over N.

    Under ``torch.distributed`` (world size > 1) the embeddings of all ranks are gathered with
    their gradients and each rank computes the rows of its own anchors against the global
    batch. The returned value is scaled by the world size so that DistributedDataParallel's
    gradient averaging yields exactly the gradient of the loss over the global batch; the mean
    of the returned values over ranks equals that loss.
    """

    def __init__(self, tau: float = 0.2, mode: str = "concat", gather_distributed: bool = True):
        super().__init__()
        if tau <= 0:
            raise ValueError(f"tau must be positive, got {tau}")
        LOSS_MODES.get(mode)
        self.tau = tau
        self.mode = mode
        self.gather_distributed = gather_distributed

    def positive_groups(self, labels: Tensor) -> Tensor:
        """Group id of each sample (both views share it); equal ids are positives."""
        raise NotImplementedError

    def forward(self, z1: Tensor, z2: Tensor, labels: Tensor | None = None) -> Tensor:
        n = _check_views(z1, z2, labels)
        if labels is None:
            labels = torch.zeros(n, dtype=torch.long, device=z1.device)
        world, rank = 1, 0
        if self.gather_distributed and dist.is_available() and dist.is_initialized():
            world, rank = dist.get_world_size(), dist.get_rank()
        if world > 1:
            k1, k2, all_labels = _gather(z1), _gather(z2), _gather(labels.to(z1.device))
        else:
            k1, k2, all_labels = z1, z2, labels.to(z1.device)
        groups = self.positive_groups(all_labels.long())
        local = slice(rank * n, (rank + 1) * n)
        if self.mode == "pairwise":
            rows = masked_softmax_loss(z1, k2, groups[local], groups, self.tau)
            return rows.sum() / n  # = world x (sum of this rank's rows) / N_global
        n_global = n * world
        anchors = torch.cat([z1, z2])
        key_groups = torch.cat([groups, groups])
        if world == 1:
            return masked_softmax_loss(anchors, None, key_groups, key_groups, self.tau).mean()
        keys = torch.cat([k1, k2])
        offsets = torch.arange(rank * n, (rank + 1) * n, device=z1.device)
        self_index = torch.cat([offsets, offsets + n_global])
        rows = masked_softmax_loss(anchors, keys, key_groups[self_index], key_groups, self.tau, self_index)
        return rows.sum() * world / (2 * n_global)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, mode={self.mode!r}"


def _check_views(z1: Tensor, z2: Tensor, labels: Tensor | None) -> int:
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(
            f"z1 and z2 must be two (N, D) tensors of the same shape (view 1 and view 2 of the "
            f"same N samples, in the same order); got {tuple(z1.shape)} and {tuple(z2.shape)}"
        )
    if labels is not None and (labels.ndim != 1 or labels.shape[0] != z1.shape[0]):
        raise ValueError(f"labels must be a 1-D tensor with one label per sample ({z1.shape[0]}); "
                         f"got shape {tuple(labels.shape)}")
    if labels is not None and (labels.dtype.is_floating_point or labels.dtype == torch.bool):
        raise ValueError(f"labels must be integers (class ids, or the outlier label); got dtype {labels.dtype}")
    return z1.shape[0]


class FIRMLoss(ContrastiveLoss):
    """FIRM: inliers of one ID class are all positives of each other; an outlier's only positive
    is its own second view; inliers and outliers repel.

    ``labels`` hold ID class ids (>= 0) and ``outlier_label`` for synthetic outliers.
    """

    def __init__(self, tau: float = 0.2, outlier_label: int = OUTLIER_LABEL, mode: str = "concat",
                 gather_distributed: bool = True):
        super().__init__(tau, mode, gather_distributed)
        self.outlier_label = outlier_label

    def positive_groups(self, labels: Tensor) -> Tensor:
        outlier = labels == self.outlier_label
        if bool((labels[~outlier] < 0).any()):
            bad = sorted(set(labels[(~outlier) & (labels < 0)].tolist()))
            raise ValueError(
                f"labels {bad} are neither ID class ids (>= 0) nor the outlier label "
                f"({self.outlier_label}); pass outlier_label= to match your labelling"
            )
        # Outliers get ids above every class id: one fresh group per outlier sample.
        first_free = labels.max().clamp(min=0) + 1
        own = first_free + torch.arange(len(labels), device=labels.device)
        return torch.where(outlier, own, labels)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, outlier_label={self.outlier_label}"


class NTXentLoss(ContrastiveLoss):
    """NT-Xent (SimCLR): each sample's only positive is its own second view; labels are ignored."""

    def positive_groups(self, labels: Tensor) -> Tensor:
        return torch.arange(len(labels), device=labels.device)


class SupConLoss(ContrastiveLoss):
    """Supervised contrastive loss: all samples with the same label are positives.

    With binary labels (ID vs outlier) this is the paper's SupCon baseline; with one label per
    shifting transform (0 = identity, 1..3 = rotations) it is Rot-SupCon.
    """

    def positive_groups(self, labels: Tensor) -> Tensor:
        return labels


def _firm_labels(class_labels: Tensor, variant: Tensor) -> Tensor:
    """Class id for inliers, :data:`OUTLIER_LABEL` for every outlier (each its own group)."""
    return torch.where(variant == 0, class_labels, torch.full_like(class_labels, OUTLIER_LABEL))


def _supcon_labels(class_labels: Tensor, variant: Tensor) -> Tensor:
    """Inliers keep their class id; all outliers share one group (-1)."""
    return torch.where(variant == 0, class_labels, torch.full_like(class_labels, -1))


def _rotsupcon_labels(class_labels: Tensor, variant: Tensor) -> Tensor:
    """Inliers keep their class id; outliers are grouped by transform (-1, -2, ... for variants 1, 2, ...)."""
    return torch.where(variant == 0, class_labels, -variant.long())


class MSCLoss(NTXentLoss):
    """Mean-shifted contrastive loss (Reiss & Hoshen, AAAI 2023), with its angular centre term.

    The embeddings (the normalised backbone features of a pretrained network, no projection
    head) are shifted by ``center``, the normalised mean embedding of the normal training images
    before fine-tuning (:meth:`set_center`), renormalised, and compared as NT-Xent compares views;
    ``angular`` adds the mean squared distance of both views to the centre, which pulls the
    normal images towards it. Only normal images are trained on (:attr:`LossEntry.outliers` is off).
    """

    def __init__(self, tau: float = 0.25, mode: str = "concat", angular: bool = True,
                 gather_distributed: bool = True):
        super().__init__(tau, mode, gather_distributed)
        self.angular = angular
        self.register_buffer("center", torch.zeros(0))

    @torch.no_grad()
    def set_center(self, model: nn.Module, images: Tensor, batch_size: int = 256) -> None:
        """The normalised mean embedding of uint8 ``images`` under ``model`` in eval mode (its
        mode is restored), the centre every later embedding is shifted by."""
        was_training = model.training
        model.eval()
        try:
            total = None
            for start in range(0, len(images), batch_size):
                z = model(images[start:start + batch_size].float().div_(255)).float().sum(0)
                total = z if total is None else total + z
        finally:
            model.train(was_training)
        self.center = torch.nn.functional.normalize(total / len(images), dim=0)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "center" in state_dict:  # the centre's size is known only once it has been set
            self.center = torch.empty_like(state_dict[prefix + "center"])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, z1: Tensor, z2: Tensor, labels: Tensor | None = None) -> Tensor:
        if self.center.numel() != z1.shape[1]:
            raise ValueError("the mean-shifted loss needs its centre first: call set_center(model, normal_images)")
        s1, s2 = z1 - self.center, z2 - self.center
        loss = super().forward(torch.nn.functional.normalize(s1, dim=1), torch.nn.functional.normalize(s2, dim=1),
                               labels)
        if self.angular:
            loss = loss + s1.pow(2).sum(1).mean() + s2.pow(2).sum(1).mean()
        return loss

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, angular={self.angular}"


def _set_msc_center(loss: ContrastiveLoss, model: nn.Module, images: Tensor) -> None:
    loss.set_center(model, images)


@dataclass(frozen=True)
class LossEntry:
    """A registered method of adapting the encoder: its loss module (None: no training at all,
    the features are scored as built), how a batch's labels are made, the layout the authors ran
    it in, whether its batches hold outliers (``outliers``; off: normal images only), and what
    must be set up from the model and the normal images before the first step (``prepare``)."""

    factory: Callable[[float, str], ContrastiveLoss] | None
    labels: Callable[[Tensor, Tensor], Tensor]
    authors_mode: str
    description: str
    outliers: bool = True
    prepare: Callable[[ContrastiveLoss, nn.Module, Tensor], None] | None = None

    @property
    def trains(self) -> bool:
        return self.factory is not None


LOSSES: Registry[LossEntry] = Registry("loss", {
    "firm": LossEntry(lambda tau, mode: FIRMLoss(tau=tau, mode=mode), _firm_labels, "pairwise",
                      "FIRM: inliers of a class are positives of each other, each outlier only of its own view"),
    "ntxent": LossEntry(lambda tau, mode: NTXentLoss(tau=tau, mode=mode), _firm_labels, "pairwise",
                        "NT-Xent (SimCLR): every sample's only positive is its own second view"),
    "supcon": LossEntry(lambda tau, mode: SupConLoss(tau=tau, mode=mode), _supcon_labels, "concat",
                        "SupCon: inliers by class, all outliers one class"),
    "rotsupcon": LossEntry(lambda tau, mode: SupConLoss(tau=tau, mode=mode), _rotsupcon_labels, "concat",
                           "Rot-SupCon: inliers by class, outliers one class per transform"),
    "msc": LossEntry(lambda tau, mode: MSCLoss(tau=tau, mode=mode), _firm_labels, "concat",
                     "MSC (mean-shifted contrastive, Reiss & Hoshen 2023): NT-Xent on embeddings shifted by the "
                     "normal images' mean, plus the angular centre loss; normal images only", outliers=False,
                     prepare=_set_msc_center),
    "frozen": LossEntry(None, _firm_labels, "concat",
                        "no training: the (pretrained) backbone's features as built, the DN2 baseline"),
})


def resolve_mode(name: str, mode: str) -> str:
    """The layout loss ``name`` runs in: ``mode``, or for :data:`AUTHORS_MODE` the one the authors used."""
    entry = LOSSES.get(name)
    LOSS_MODES.check(mode)
    return entry.authors_mode if mode == AUTHORS_MODE else mode


def build_loss(name: str, tau: float = 0.2, mode: str = "concat") -> ContrastiveLoss:
    """The loss registered as ``name`` (see :data:`LOSSES`) in layout ``mode``."""
    entry = LOSSES.get(name)
    if not entry.trains:
        raise ValueError(f"{name!r} trains nothing, so it has no loss: its runs score the features as built")
    return entry.factory(tau, resolve_mode(name, mode))


def batch_labels(name: str, class_labels: Tensor, variant: Tensor) -> Tensor:
    """Labels for loss ``name`` from a batch's ID class ids and shift variants (0 = inlier)."""
    return LOSSES.get(name).labels(class_labels, variant)
