"""One experiment path: settings -> data -> trained encoder -> evaluation records.

``firm train`` is one run plus a saved model, ``firm bench`` a grid of runs, ``firm demo`` a
grid on the digits preset, and :class:`~firm.detector.FIRMDetector` trains through
:func:`train_encoder` as well, so every way of training shares the same seeding, shift choice,
encoder construction, learning curve and Trainer.
"""
from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .config import METHODS, SCORES, EvalConfig, Settings, SettingsError, TrainConfig, check_ranges
from .data import (ALL_CLASSES, SPLITS, ImageSet, canonical_dataset, load_dataset, load_image_folder, normal_classes,
                   one_class_split, subsample, validation_split)
from .evaluation import evaluate_scorers
from .features import TTA_MODES
from .losses import LOSSES, resolve_mode
from .models import BACKBONES, INITS, STEMS, Encoder
from .scoring import SCORERS, scorer_names
from .shift_choice import choose_shifts
from .shifts import AUTO, SHIFTS, build_shifts
from .training import Trainer, TrainFiles, machine_info

__all__ = ["validate", "EvalSet", "RunData", "DataCache", "prepare_data", "train_encoder", "TrainedEncoder",
           "run", "RunOutcome", "final_scorers", "feature_check",
           "shifted_copies"]

EvalSet = tuple[str, ImageSet, Tensor]  # (name, images, is_anomaly)


def final_scorers(config: EvalConfig) -> list[str]:
    """The scorers a run evaluates at its end (``all`` = every registered one)."""
    return scorer_names(config.scorers)


def _curve_key(eval_set: str, scorer: str, tta: str) -> str:
    """The epoch-log key of one learning-curve AUROC (cos1 without an ensemble keeps the key older logs use)."""
    return f"auroc_{eval_set}" if (scorer, tta) == ("cos1", "none") else f"auroc_{eval_set}_{scorer}_{tta}"


def validate(settings: Settings) -> None:
    """Refuse unknown names and values out of range with one :class:`~firm.config.SettingsError`
    naming the setting: every registry is asked for the names, :func:`~firm.config.check_ranges`
    for the numbers. Reads no image, so every entry point calls it first."""
    check_ranges(settings)
    t, m, e, d = settings.train, settings.model, settings.eval, settings.data
    resolve_mode(t.loss, t.loss_mode)  # the loss and its layout
    SHIFTS.check(t.shifts)
    if not t.shifts or (AUTO in t.shifts and len(t.shifts) > 1):
        raise SettingsError(f"setting 'shifts': give registered shifts or {AUTO!r} alone, got {t.shifts}")
    BACKBONES.get(m.backbone)
    STEMS.check(m.stem)
    INITS.get(m.init)
    SCORERS.get(e.scorer)
    scorer_names(e.scorers)
    scorer_names(e.curve_scorers)
    TTA_MODES.get(e.tta)
    TTA_MODES.check(e.final_tta)
    TTA_MODES.check(e.curve_tta)
    SPLITS.get(d.split)
    METHODS.check(settings.detector.method)
    SCORES.check(settings.detector.score)
    for name in d.ood:
        canonical_dataset(name)
    dataset = canonical_dataset(d.dataset)
    if d.normal_class == ALL_CLASSES:
        return
    normal = normal_classes(dataset)
    if not str(d.normal_class).isdigit() or int(d.normal_class) not in normal:
        count = f"0..{normal[-1]}" if len(normal) > 1 else " or ".join(map(str, normal))
        count = f"{count} or {ALL_CLASSES!r}" if count else repr(ALL_CLASSES)
        raise SettingsError(f"setting 'normal_class' must be {count} for {d.dataset}, got {d.normal_class!r}")


@dataclass
class RunData:
    """What one run trains on and is evaluated on."""

    normal: ImageSet
    class_labels: Tensor
    eval_sets: list[EvalSet]
    auxiliary: Tensor | None = None
    check: EvalSet | None = None
    """held-out normal images of the training data and anomalies, never trained on: where
    fine-tuned features are compared with the pretrained ones (:func:`feature_check`)"""


class DataCache:
    """Datasets (and OOD sets) read once per process."""

    def __init__(self) -> None:
        self._sets: dict[tuple, tuple[ImageSet, ImageSet]] = {}

    def get(self, name: str, data_root: str | None, size: int, channels: int) -> tuple[ImageSet, ImageSet]:
        key = (name, data_root, size, channels)
        if key not in self._sets:
            self._sets[key] = load_dataset(name, data_root, size, channels)
        return self._sets[key]


def prepare_data(settings: Settings, cache: DataCache | None = None) -> RunData:
    """Training images, ID class labels and evaluation sets of a run's data settings."""
    d, m, seed = settings.data, settings.model, settings.train.seed
    cache = cache or DataCache()
    train, test = cache.get(d.dataset, d.data_root, m.image_size, m.in_channels)
    if d.normal_class == ALL_CLASSES:
        if d.split == "validation":
            raise ValueError("the validation split is defined for one normal class; pick --normal-class N")
        normal = subsample(train, d.train_images, seed)
        eval_sets = []
        for name in d.ood:
            other = cache.get(name, d.data_root, m.image_size, m.in_channels)[1]
            images = ImageSet(torch.cat([test.images, other.images]), torch.cat([test.labels, other.labels]), test.classes)
            y = torch.cat([torch.zeros(len(test), dtype=torch.long), torch.ones(len(other), dtype=torch.long)])
            eval_sets.append((f"ood:{Path(name).name}", images, y))
        class_labels = normal.labels
    else:
        c = int(d.normal_class)
        # Runs from pretrained weights always keep the validation share of the normal class out of
        # training, so that fine-tuned and pretrained features can be compared on it (and the
        # frozen baseline's bank is the same images as the fine-tuned runs').
        if d.split == "validation" or m.weights:
            normal, val, y = validation_split(train, c, holdout=0.1, anomalies=1500, seed=seed)
            check = ("validation", val, y)
        if d.split == "validation":
            eval_sets = [check]
        else:
            full, test, y = one_class_split(train, test, c)
            normal = normal if m.weights else full
            eval_sets = [("test", test, y)]
        normal = subsample(normal, d.train_images, seed)
        class_labels = torch.zeros(len(normal), dtype=torch.long)
    auxiliary = None
    if d.outlier_dir:
        auxiliary = load_image_folder(d.outlier_dir, m.image_size, m.in_channels, name="outlier images").images
    return RunData(normal, class_labels, eval_sets, auxiliary, check if m.weights else None)


@dataclass
class TrainedEncoder:
    """An encoder after training, the train settings it really ran with and its epoch log.
    ``seconds_before_resume``: the wall time its epochs took before a resume (0 if none)."""

    encoder: Encoder
    train: TrainConfig
    history: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds_before_resume: float = 0.0


def train_encoder(settings: Settings, images: Tensor, class_labels: Tensor | None = None,
                  auxiliary: Tensor | None = None, files: TrainFiles | None = None, resume: bool = False,
                  curve: Callable[[Encoder, int], dict] | None = None, progress: bool = True,
                  log: Callable[[str], None] = print) -> TrainedEncoder:
    """Seed, resolve ``shifts auto`` from the normal images, build the encoder, train.

    ``curve(model, epoch)`` is the learning curve (before the first epoch and every
    ``eval_every`` epochs); its values go into the log only, never into any choice.
    """
    train = settings.train
    notes = []
    if not LOSSES.get(train.loss).trains:
        torch.manual_seed(train.seed)
        notes.append(f"loss {train.loss}: no training, the {settings.model.backbone} features as built"
                     + (f" from weights {settings.model.weights}" if settings.model.weights else ""))
        log(notes[-1])
        return TrainedEncoder(Encoder(settings.model).eval(), train, [], notes)
    if train.shifts == [AUTO]:
        shifts, reason = choose_shifts(images, seed=train.seed)
        train = dataclasses.replace(train, shifts=shifts)
        notes.append(f"shifts auto -> {','.join(shifts)}: {reason}")
        log(notes[-1])
    torch.manual_seed(train.seed)
    encoder = Encoder(settings.model)
    trainer = Trainer(encoder, train, images, class_labels, auxiliary=auxiliary, files=files, evaluate=curve,
                      progress=progress)
    trainer.train(resume=resume)
    return TrainedEncoder(trainer.model, train, trainer.history, notes, trainer.seconds_before_resume)


def feature_check(settings: Settings, tuned: Encoder, bank: Tensor, images: Tensor, is_anomaly: Tensor,
                  log: Callable[[str], None] = print, tuned_auroc: float | None = None) -> dict:
    """cos1 AUROC of the pretrained features (a fresh encoder from ``settings.model``'s weights)
    and of the fine-tuned encoder ``tuned`` (or ``tuned_auroc``, when already measured) on
    held-out ``images`` against the normal ``bank`` images; ``{"scorer", "frozen", "fine_tuned",
    "note"}``. A fine-tuned AUROC below the frozen one is warned about: fine-tuning then damaged
    what the pretrained features knew."""
    frozen = Encoder(settings.model).to(next(tuned.parameters()).device)
    out = {"scorer": "cos1", "fine_tuned": tuned_auroc}
    for name, model in (("frozen", frozen), ("fine_tuned", tuned)):
        if out.get(name) is None:
            records, _ = evaluate_scorers(model, bank, images, is_anomaly, ["cos1"], "none", config=settings.eval)
            out[name] = records[0]["auroc"]
    worse = out["fine_tuned"] < out["frozen"]
    out["note"] = (f"held-out check: cos1 AUROC {out['fine_tuned']:.4f} fine-tuned vs {out['frozen']:.4f} with the "
                   f"pretrained features ({len(images)} images)"
                   + ("; fine-tuning made the features worse" if worse else ""))
    if worse:
        warnings.warn(out["note"], stacklevel=2)
    log(out["note"])
    return out


def shifted_copies(images: Tensor, shifts: list[str], seed: int = 0) -> Tensor:
    """uint8 ``images``, each shifted by a random variant of ``shifts``: synthetic anomalies for
    the held-out check of image folders, which hold no real ones."""
    shift_set = build_shifts(shifts)
    gen = torch.Generator().manual_seed(seed)
    variant = torch.randint(1, shift_set.num_variants + 1, (len(images),), generator=gen)
    out = shift_set(images.float().div(255), variant, gen)
    return out.mul(255).round().clamp(0, 255).to(torch.uint8)


@dataclass
class RunOutcome:
    """A finished run: the trained encoder, its training images, and its records."""

    trained: TrainedEncoder
    data: RunData
    records: list[dict]
    meta: dict


def run(settings: Settings, cache: DataCache | None = None, files: TrainFiles | None = None, resume: bool = False,
        final_eval: bool = True, progress: bool = True, log: Callable[[str], None] = print) -> RunOutcome:
    """Train one run and evaluate it: a learning curve (the AUROC of every curve scorer under every
    curve ensemble, every ``eval_every`` epochs) and, with ``final_eval``, every final scorer under every
    final ensemble. The curve is recorded only: the model evaluated and returned is the last epoch's.

    Each record holds the run's identity (dataset, normal class, loss, layout, seed, budget),
    ``eval_set``, ``scorer``, ``tta``, ``epoch``, ``final`` and ``auroc``.
    """
    validate(settings)
    start = time.perf_counter()
    data = prepare_data(settings, cache)
    t, e = settings.train, settings.eval
    base = {"dataset": settings.data.dataset, "normal_class": settings.data.normal_class, "loss": t.loss,
            "loss_mode": resolve_mode(t.loss, t.loss_mode), "seed": t.seed, "budget": t.epochs,
            "split": settings.data.split}
    scored = [s for s in data.eval_sets if bool(s[2].any()) and not bool(s[2].all())]

    def curve(model: Encoder, epoch: int) -> dict:
        out = {}
        for name, images, y in scored:
            recs, _ = evaluate_scorers(model, data.normal.images, images.images, y, list(e.curve_scorers),
                                       list(e.curve_tta), config=e)
            out.update({_curve_key(name, r["scorer"], r["tta"]): r["auroc"] for r in recs})
        return out

    trained = train_encoder(settings, data.normal.images, data.class_labels, data.auxiliary, files, resume,
                            curve if scored else None, progress, log)
    # A resumed run's clock started in this process: add the time its checkpoint saved for the earlier epochs.
    start -= trained.seconds_before_resume
    train_seconds = time.perf_counter() - start
    # The learning curve is read back from the epoch log, so a resumed run keeps its early points.
    curves = [(s, m) for m in e.curve_tta for s in scorer_names(e.curve_scorers)]
    records = [{**base, "eval_set": name, "scorer": s, "tta": m, "epoch": h["epoch"], "final": False, "auroc": h[key]}
               for h in trained.history for name, _, _ in scored for s, m in curves
               if (key := _curve_key(name, s, m)) in h]
    if final_eval:
        for name, images, y in scored:
            recs, _ = evaluate_scorers(trained.encoder, data.normal.images, images.images, y, final_scorers(e),
                                       list(e.final_tta), progress=progress, config=e)
            records += [{**base, "eval_set": name, "epoch": t.epochs, "final": True, **r} for r in recs]
    check = None
    if data.check is not None and LOSSES.get(t.loss).trains:
        name, images, y = data.check
        known = next((r["auroc"] for r in records if r["final"] and (r["eval_set"], r["scorer"], r["tta"])
                      == (name, "cos1", "none")), None)
        check = {"eval_set": name, **feature_check(settings, trained.encoder, data.normal.images, images.images, y,
                                                   log, known)}
    meta = {**base, "train_images": len(data.normal), "train_seconds": train_seconds,
            "total_seconds": time.perf_counter() - start, "shifts": trained.train.shifts,
            "notes": trained.notes + ([check["note"]] if check else []), "feature_check": check,
            "machine": machine_info(next(trained.encoder.parameters()).device)}
    return RunOutcome(trained, data, records, meta)
