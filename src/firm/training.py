"""Training: batches of inliers and synthetic outliers, two views, the encoder, the loss.

The whole step runs on the model's device without per-image Python work: the images live there
as uint8, a :class:`BatchPlan` says which image and which shift fills each slot, and
shifts and views are batched tensor operations. Under ``torchrun`` every rank takes its slice of
each global batch and the loss gathers the embeddings of all ranks.

Checkpoints (one safetensors file holding weights, optimizer, scheduler and epoch) are
written atomically every ``checkpoint_every`` epochs; :meth:`Trainer.train` with ``resume=True``
continues from the last one and reproduces an uninterrupted run exactly. The saved model is the
last epoch's: test labels never choose it.
"""
from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from .config import ModelConfig, TrainConfig, check_ranges
from .losses import LOSSES, batch_labels, build_loss
from .models import Encoder
from .serialization import ModelFileError, atomic_write, load_tensors, save_tensors, to_cpu_state
from .shifts import AUTO, build_shifts
from .views import ViewAugment, ViewConfig

__all__ = ["TrainConfig", "Trainer", "BatchPlan", "TrainingError", "resolve_device", "machine_info", "init_distributed",
           "TrainFiles"]


class TrainingError(RuntimeError):
    """Training cannot go on (for example the loss became NaN); the last checkpoint is kept."""


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` is CUDA when available, else CPU; a requested CUDA that is missing is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available here; use --device cpu")
    return device


def machine_info(device: torch.device = torch.device("cpu")) -> dict:
    """What the figures were measured on: device name, versions, threads, load."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    if device.type == "cpu" and Path("/proc/cpuinfo").exists():
        models = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")]
        name = models[0] if models else name
    try:
        import faiss
        faiss_threads = faiss.omp_get_max_threads()
    except ImportError:  # pragma: no cover
        faiss_threads = None
    return {"device": str(device), "device_name": name, "torch": torch.__version__, "python": platform.python_version(),
            "torch_threads": torch.get_num_threads(), "faiss_threads": faiss_threads, "cpu_count": os.cpu_count(),
            "load_average_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def init_distributed(device: str = "auto") -> torch.device:
    """Join the process group that ``torchrun`` describes (gloo on CPU, nccl on GPU) and return
    this rank's device; a single process gets ``resolve_device(device)``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        if dist.is_available() and dist.is_initialized() and torch.cuda.is_available() and device != "cpu":
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return resolve_device(device)
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if use_cuda else torch.device("cpu")


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@dataclass
class BatchPlan:
    """Which source image and which variant fill each batch slot, epoch by epoch.

    ``id_share=None`` is the authors' composition: the epoch's pool holds every ID image once
    unshifted and once per outlier variant (so with three rotations 1/4 of a batch is ID), shuffled
    and cut into batches. With ``id_share=p`` each batch holds ``round(p * batch_size)`` inliers,
    walking through a permutation of the ID images once per epoch, and the other slots are
    outliers made from random images with random variants.
    ``outlier_sources`` is the number of images outliers are drawn from (the ID images for shifts,
    an auxiliary set for Outlier Exposure).
    """

    num_images: int
    batch_size: int
    num_variants: int
    id_share: float | None = None
    outlier_sources: int | None = None
    seed: int = 0

    def __post_init__(self):
        if self.num_images < 1:
            raise ValueError("the training set is empty: there are no normal images to train on")
        if self.id_share is not None and not 0 < self.id_share < 1:
            raise ValueError(f"id_share must be in (0, 1), got {self.id_share}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be at least 2, got {self.batch_size}")
        if self.outlier_sources is None:
            self.outlier_sources = self.num_images

    @property
    def inliers_per_batch(self) -> int:
        if self.id_share is None:
            return self.batch_size
        return max(1, min(self.batch_size - 1, round(self.id_share * self.batch_size)))

    def steps_per_epoch(self) -> int:
        """Number of full batches in an epoch (a last partial batch is dropped)."""
        if self.id_share is None:
            return max(1, self.num_images * (1 + self.num_variants) // self.batch_size)
        return max(1, math.ceil(self.num_images / self.inliers_per_batch))

    def epoch(self, epoch: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """``(source_index, variant)``, each ``(steps, batch_size)``; variant 0 = inlier.

        For inliers ``source_index`` indexes the ID images, for outliers the outlier sources.
        """
        gen = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + epoch)
        steps, b = self.steps_per_epoch(), self.batch_size
        if self.id_share is None:
            size = self.num_images * (1 + self.num_variants)
            # A pool smaller than one batch (few images, large batch) is drawn several times over.
            pool = torch.cat([torch.randperm(size, generator=gen) for _ in range(math.ceil(steps * b / size))])
            pool = pool[: steps * b]
            index, variant = pool % self.num_images, pool // self.num_images
            if self.outlier_sources != self.num_images:
                random_source = torch.randint(self.outlier_sources, (len(pool),), generator=gen)
                index = torch.where(variant > 0, random_source, index)
        else:
            k = self.inliers_per_batch
            reps = math.ceil(steps * k / self.num_images)
            inliers = torch.cat([torch.randperm(self.num_images, generator=gen) for _ in range(reps)])[: steps * k]
            outliers = torch.randint(self.outlier_sources, (steps * (b - k),), generator=gen)
            out_variant = torch.randint(1, self.num_variants + 1, (steps * (b - k),), generator=gen)
            index = torch.cat([inliers.view(steps, k), outliers.view(steps, b - k)], 1)
            variant = torch.cat([torch.zeros(steps, k, dtype=torch.long), out_variant.view(steps, b - k)], 1)
        return index.view(steps, b).to(device), variant.view(steps, b).to(device)


@dataclass(frozen=True)
class TrainFiles:
    """Where a Trainer writes: the JSON-lines log and the (atomically replaced) checkpoint."""

    log: Path
    checkpoint: Path


class Trainer:
    """Trains an :class:`Encoder` on normal images with synthetic (or auxiliary) outliers.

    ``images`` are the normal training images, uint8 ``(N, C, H, W)``; ``class_labels`` their ID
    class ids (all 0 in the one-class setting); ``auxiliary`` optional real outlier images
    (Outlier Exposure) that replace the shifted copies. ``evaluate(model, epoch)`` is called
    before the first epoch and every ``eval_every`` epochs for learning curves; its dict goes
    into the log only.
    ``files`` names where the log and the checkpoint go (rank 0 only; the run folder's layout
    decides the names); without it nothing is written.
    """

    def __init__(self, model: Encoder, config: TrainConfig, images: Tensor, class_labels: Tensor | None = None,
                 auxiliary: Tensor | None = None, files: TrainFiles | None = None,
                 evaluate: Callable[[Encoder, int], dict] | None = None, progress: bool = True):
        check_ranges(config)
        if config.shifts == [AUTO]:
            raise ValueError(f"shifts {AUTO!r} must be resolved from the normal images before training "
                             "(firm.shift_choice.choose_shifts)")
        self.config = config
        self.device = init_distributed(config.device)
        self.rank, self.world = _rank_world()
        if config.batch_size % self.world:
            raise ValueError(f"batch size {config.batch_size} must be divisible by the number of processes ({self.world})")
        if images.ndim != 4 or images.dtype != torch.uint8:
            raise ValueError(f"training images must be uint8 (N, C, H, W); got {images.dtype} {tuple(images.shape)}")
        if len(images) == 0:
            raise ValueError("no training images: the normal class or folder is empty")
        self.images = images.to(self.device)
        if class_labels is None:
            class_labels = torch.zeros(len(images), dtype=torch.long)
        self.class_labels = class_labels.to(self.device)
        if len(self.class_labels) != len(images):
            raise ValueError(f"{len(self.class_labels)} class labels for {len(images)} images")
        if bool((self.class_labels < 0).any()):
            raise ValueError("ID class labels must be >= 0 (negative labels are reserved for outliers)")
        self.entry = LOSSES.get(config.loss)
        if not self.entry.trains:
            raise ValueError(f"loss {config.loss!r} trains nothing: build the encoder and score it as it is")
        if auxiliary is not None and not self.entry.outliers:
            raise ValueError(f"loss {config.loss!r} trains on normal images only: it takes no outlier images")
        self.auxiliary = auxiliary.to(self.device) if auxiliary is not None else None
        self.shifts = build_shifts(config.shifts)
        # With Outlier Exposure the plan keeps the authors' slot layout (one slot per shift
        # variant); every such slot is filled with an auxiliary image instead.
        # A loss without outliers gets batches of normal images only, whatever the shifts setting.
        self.plan = BatchPlan(len(images), config.batch_size, self.shifts.num_variants if self.entry.outliers else 0,
                              None if not self.entry.outliers else config.id_share,
                              outlier_sources=len(auxiliary) if auxiliary is not None else None, seed=config.seed)
        self.views = ViewAugment(ViewConfig(size=images.shape[-1], crop_scale=tuple(config.crop_scale),
                                            jitter=tuple(config.jitter), blur_p=config.blur_p))
        self.loss_fn = build_loss(config.loss, config.tau, config.loss_mode)
        self.files = files
        self.evaluate = evaluate
        self.progress = progress and self.rank == 0

        self.model = model.to(self.device)
        # PyTorch's CPU channels-last convolution backward corrupts memory for some shapes
        # (segfaults and double frees on torch 2.13, on AVX2 and AVX-512 CPUs alike); the layout
        # is a speed option only, so it is used on GPUs alone.
        self.channels_last = config.channels_last and self.device.type != "cpu"
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.net: nn.Module = self.model
        if self.world > 1:
            if config.sync_bn and self.device.type != "cuda":
                raise ValueError("SyncBatchNorm runs on GPUs only (a PyTorch limit); train without --sync-bn on CPU")
            if config.sync_bn:
                self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if config.compile:
            self.net = torch.compile(self.net)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=config.lr, momentum=config.momentum,
                                         weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(self.optimizer, max_lr=config.lr,
                                                             total_steps=config.epochs * self.plan.steps_per_epoch(),
                                                             pct_start=config.warmup)
        self.generator = torch.Generator(device=self.device)
        self.host_generator = torch.Generator()
        self.epoch = 0
        # Wall time of the epochs trained so far (curve evaluations included), summed over every
        # resume, so that a run stopped and continued still reports what it cost.
        self.seconds = 0.0
        self.seconds_before_resume = 0.0
        self.history: list[dict] = []
        self._unsaved: tuple[dict[str, Tensor], dict] | None = None  # the last finished epoch, when not checkpointed
        self.amp_dtype = torch.bfloat16 if config.amp else None

    # ----------------------------------------------------------------- one step
    def make_batch(self, index: Tensor, variant: Tensor) -> tuple[Tensor, Tensor]:
        """Two stacked views ``(2B, C, H, W)`` and the loss labels ``(B,)`` of one batch slice."""
        if self.auxiliary is None:
            x = self.images[index].float().div_(255)
            if self.entry.outliers:
                x = self.shifts(x, variant, self.generator)
        else:
            inlier = (variant == 0).view(-1, 1, 1, 1)
            x = torch.where(inlier, self.images[index.clamp(max=len(self.images) - 1)],
                            self.auxiliary[index.clamp(max=len(self.auxiliary) - 1)]).float().div_(255)
            variant = variant.clamp(max=1)
        classes = torch.where(variant == 0, self.class_labels[index.clamp(max=len(self.images) - 1)], 0)
        labels = batch_labels(self.config.loss, classes, variant)
        views = torch.cat([self.views(x, self.generator, self.host_generator),
                           self.views(x, self.generator, self.host_generator)])
        if self.channels_last:
            views = views.contiguous(memory_format=torch.channels_last)
        return views, labels

    def step(self, index: Tensor, variant: Tensor) -> Tensor:
        """One optimisation step on a global batch (this rank takes its slice); returns the loss."""
        b = index.shape[0] // self.world
        index, variant = index[self.rank * b:(self.rank + 1) * b], variant[self.rank * b:(self.rank + 1) * b]
        views, labels = self.make_batch(index, variant)
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            z = self.net(views)
        z1, z2 = z.float().chunk(2)
        loss = self.loss_fn(z1, z2, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return loss.detach()

    def seed_epoch(self, epoch: int) -> None:
        """Seed the augmentation generators from (seed, epoch, rank): an epoch's randomness is
        then the same whether the run was resumed or not, and differs between ranks."""
        seed = (self.config.seed * 1_000_003 + epoch) * 1009 + self.rank
        self.generator.manual_seed(seed)
        self.host_generator.manual_seed(seed)

    # ----------------------------------------------------------------- epochs
    def train(self, resume: bool = False) -> Encoder:
        """Train to ``config.epochs`` (continuing from the run's checkpoint if ``resume``; a run
        interrupted before it wrote one starts again from its first epoch, as it would have run)."""
        if resume and self.files is not None and not self.files.checkpoint.exists():
            resume = False
        if resume:
            self.load_checkpoint()
        else:
            if self.entry.prepare is not None:
                self.entry.prepare(self.loss_fn, self.model, self.images)
            if self.rank == 0 and self.files is not None:
                atomic_write(self.files.log, "")
            if self.config.eval_every and self.evaluate is not None and self.rank == 0:
                self._log({"epoch": 0, **self.evaluate(self.model, 0)})  # the curve's untrained start
        cfg = self.config
        self.model.train()
        epochs = tqdm(range(self.epoch, cfg.epochs), desc=f"train {cfg.loss}", disable=not self.progress,
                      initial=self.epoch, total=cfg.epochs, unit="epoch")
        try:
            for epoch in epochs:
                self._train_epoch(epoch, epochs)
        except KeyboardInterrupt:
            self._save_unsaved_epochs()
            raise
        self.model.eval()
        return self.model

    def _train_epoch(self, epoch: int, bar) -> None:
        """One epoch: its steps, its log record, and its checkpoint when one is due (else the
        state in memory, which :meth:`_save_unsaved_epochs` writes if the run is interrupted)."""
        cfg = self.config
        start = time.perf_counter()
        index, variant = self.plan.epoch(epoch, self.device)
        self.seed_epoch(epoch)
        total = torch.zeros((), device=self.device)
        steps = tqdm(range(len(index)), desc=f"epoch {epoch + 1}", leave=False, disable=not self.progress)
        for s in steps:
            total += self.step(index[s], variant[s])
            if self.progress and (s % 20 == 19 or s == len(index) - 1):
                steps.set_postfix(loss=f"{float(total) / (s + 1):.4f}")
        mean_loss = float(total) / len(index)
        if self.world > 1:
            t = torch.tensor([mean_loss], device=self.device)
            dist.all_reduce(t)
            mean_loss = float(t) / self.world
        if not math.isfinite(mean_loss):
            where = f"; the last good checkpoint {self.files.checkpoint} is kept" if self.files else ""
            raise TrainingError(f"the loss became {mean_loss} in epoch {epoch + 1}{where}. Lower the learning rate "
                                "(--lr) or disable mixed precision (--amp off).")
        self.epoch = epoch + 1
        seconds = time.perf_counter() - start
        record = {"epoch": self.epoch, "loss": mean_loss, "lr": self.scheduler.get_last_lr()[0],
                  "seconds": seconds, "images_per_s": len(index) * cfg.batch_size / seconds}
        due_eval = cfg.eval_every and (self.epoch % cfg.eval_every == 0 or self.epoch == cfg.epochs)
        if due_eval and self.evaluate is not None and self.rank == 0:
            record.update(self.evaluate(self.model, self.epoch))
            self.model.train()
        bar.set_postfix(loss=f"{mean_loss:.4f}")
        self._log(record)
        self.seconds += time.perf_counter() - start
        due_ckpt = cfg.checkpoint_every and self.epoch % cfg.checkpoint_every == 0
        if due_ckpt or self.epoch == cfg.epochs:
            self.save_checkpoint()
            self._unsaved = None
        elif self.rank == 0 and self.files is not None:
            self._unsaved = self._checkpoint_state()

    def _log(self, record: dict) -> None:
        self.history.append(record)
        if self.rank != 0 or self.files is None:
            return
        with open(self.files.log, "a") as f:
            f.write(json.dumps(record) + "\n")

    # ----------------------------------------------------------------- checkpoints
    def _checkpoint_state(self) -> tuple[dict[str, Tensor], dict]:
        """Copies of the weights, optimizer, scheduler and epoch as they are now, unaffected by
        later steps."""
        tensors = {f"model.{k}": v for k, v in to_cpu_state(self.model).items()}
        tensors.update({f"loss.{k}": v.detach().cpu().clone() for k, v in self.loss_fn.state_dict().items()})
        optim = self.optimizer.state_dict()
        for index, state in optim["state"].items():
            tensors.update({f"optim.{index}.{name}": v.detach().cpu().clone() for name, v in state.items()
                            if isinstance(v, Tensor)})
        meta = {"epoch": self.epoch, "seconds": self.seconds, "scheduler": self.scheduler.state_dict(),
                "param_groups": optim["param_groups"],
                "train": self.config.to_dict(), "model": self.model.config.to_dict()}
        return tensors, json.loads(json.dumps(meta))

    def save_checkpoint(self) -> None:
        """Atomically write weights, optimizer, scheduler and epoch (rank 0). Random state needs
        no saving: data order and augmentations are seeded per epoch."""
        if self.rank != 0 or self.files is None:
            return
        save_tensors(self.files.checkpoint, *self._checkpoint_state())

    def _save_unsaved_epochs(self) -> None:
        """On an interrupt, checkpoint the last finished epoch if no checkpoint holds it yet, so
        that ``resume`` loses at most the epoch that was running."""
        if self._unsaved is not None:
            save_tensors(self.files.checkpoint, *self._unsaved)
            self._unsaved = None

    def load_checkpoint(self) -> None:
        if self.files is None:
            raise ValueError("resume needs the run folder that holds the checkpoint")
        tensors, meta = load_tensors(self.files.checkpoint, "checkpoint")
        if ModelConfig.from_dict(meta.get("model") or {}).to_dict() != self.model.config.to_dict():
            raise ModelFileError(f"checkpoint {self.files.checkpoint} is for another model ({meta.get('model')}); "
                                 "resume with the same settings or start a new run folder")
        state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        try:
            self.model.load_state_dict(state)
            self.loss_fn.load_state_dict({k[len("loss."):]: v.to(self.device) for k, v in tensors.items()
                                          if k.startswith("loss.")})
        except RuntimeError as e:
            raise ModelFileError(f"checkpoint weights in {self.files.checkpoint} do not match the model: {e}") from e
        # The optimizer's param groups carry the lr and momentum the scheduler last set.
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value.to(self.device)
        self.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        self.scheduler.load_state_dict(meta["scheduler"])
        self.epoch = int(meta["epoch"])
        # Checkpoints written before firm recorded the time carry none: their earlier epochs count as 0 s.
        self.seconds = self.seconds_before_resume = float(meta.get("seconds", 0.0))
        if self.rank == 0:
            log = self.files.log
            kept = [line for line in (log.read_text().splitlines() if log.exists() else [])
                    if line.strip() and json.loads(line).get("epoch", 0) <= self.epoch]
            atomic_write(log, "".join(line + "\n" for line in kept))
            self.history = [json.loads(line) for line in kept]
