"""The layout of the folders firm writes: every file name, what it holds, how it is read back.

A run or model folder (``firm train --out``, ``firm fit --out``):

=====================  ==============================================================
``run.json``           the settings of the run (written first, so a killed run resumes)
``log.jsonl``          one JSON line per epoch (loss, lr, speed, learning-curve AUROC)
``checkpoint.safetensors``  weights, optimizer and schedule, replaced atomically
``model.safetensors``  the trained encoder's weights
``bank.safetensors``   backbone features of the training images at four rotations
``patches.safetensors``  the patch bank for anomaly maps (coreset of training patch features,
                       stage scales; its parameters in the header), absent when ``patch_bank`` is 0
``config.json``        the settings the run really used, the threshold, format version and
                       the SHA-256 of each tensor file (written last: present = complete)
``results.json``       ``firm evaluate``'s records (scorer, ensemble, AUROC)
``scores.csv``         per-image scores of ``firm evaluate``
``report/``            ``firm report``'s HTML page and PNGs
``onnx/``              ``firm export``'s ONNX graph (encoder and bank, or the patch scorer)
``maps/``              ``firm score --maps``'s heat-map overlays
=====================  ==============================================================

A bench folder holds ``runs/<run key>.json`` (one finished run each), ``partial/<run key>/``
(checkpoints of a run in progress, removed when it finishes), ``results.json``, ``report.md``
and the PNG plots.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import os
import shutil
from pathlib import Path

import torch
from torch import Tensor

from .config import Settings, SettingsError, settings_from_dict
from .models import Encoder
from .serialization import (FORMAT_NAME, FORMAT_VERSION, ModelFileError, check_format, load_tensors, read_json,
                            save_tensors, to_cpu_state, write_json)
from .training import TrainFiles

__all__ = ["RUN_SETTINGS", "LOG", "CHECKPOINT", "MODEL", "BANK", "PATCHES", "CONFIG", "RESULTS", "SCORES", "REPORT", "ONNX",
           "MAPS", "BENCH_RUNS", "BENCH_PARTIAL", "BENCH_REPORT", "prepare_output", "holds_no_work", "discard_unstarted",
           "check_output_folder", "check_output_file", "train_files",
           "write_run_settings", "read_run_settings", "save_model_dir", "load_model_dir", "check_state", "load_extra", "read_log",
           "write_results", "write_score_csv", "SCORE_COLUMNS"]

RUN_SETTINGS = "run.json"
LOG = "log.jsonl"
CHECKPOINT = "checkpoint.safetensors"
MODEL = "model.safetensors"
BANK = "bank.safetensors"
PATCHES = "patches.safetensors"
CONFIG = "config.json"
RESULTS = "results.json"
SCORES = "scores.csv"
REPORT = "report"
ONNX = "onnx"
MAPS = "maps"
BENCH_RUNS = "runs"
BENCH_PARTIAL = "partial"
BENCH_REPORT = "report.md"
_RUN_ITEMS = (RUN_SETTINGS, LOG, CHECKPOINT, MODEL, BANK, PATCHES, CONFIG, RESULTS, SCORES, REPORT, ONNX, MAPS)


def prepare_output(path: str | os.PathLike, overwrite: bool = False, resume: bool = False,
                   flag: str = "--out") -> Path:
    """Check a run or model folder before any work starts, and create it.

    A non-empty folder is refused unless ``resume`` (continue what is there) or ``overwrite``
    (first remove what an earlier run wrote; a folder with other files in it is still refused,
    so nothing of the user's is deleted).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{flag} {path} is a file; give a folder name (a new or an empty folder)")
    if resume:
        if not path.is_dir():
            raise FileNotFoundError(f"--resume {path}: no such run folder")
        _check_writable(path, flag, default=False)
        return path
    if path.is_dir() and any(path.iterdir()) and not holds_no_work(path):
        if not overwrite:
            raise FileExistsError(f"{flag} {path} is not empty; pass --overwrite to replace the run in it, "
                                  "--resume to continue it, or choose a new folder")
        foreign = sorted(p.name for p in path.iterdir() if p.name not in _RUN_ITEMS and not p.name.startswith("."))
        if foreign:
            raise FileExistsError(f"{flag} {path} holds files firm did not write ({', '.join(foreign[:5])}); "
                                  "--overwrite only replaces a firm run folder: choose a new folder")
    _check_writable(path, flag, default=False)
    if path.is_dir():
        _remove_run_files(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"{flag} {path}: cannot create the folder ({e.strerror}); choose another place") from e
    return path


def _remove_run_files(path: Path) -> None:
    """Remove what an earlier run wrote in ``path``, and temporary files of its interrupted writes."""
    for p in path.iterdir():
        if p.name in _RUN_ITEMS or (p.name.startswith(".") and p.name.endswith(".tmp")):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def holds_no_work(path: str | os.PathLike) -> bool:
    """Whether the run folder ``path`` holds nothing worth keeping: at most the settings and an
    epoch log without a finished epoch (a run that failed or was stopped before its first epoch)."""
    path = Path(path)
    names = {p.name for p in path.iterdir() if not (p.name.startswith(".") and p.name.endswith(".tmp"))}
    if not names <= {RUN_SETTINGS, LOG}:
        return False
    try:
        return not any(r.get("epoch", 0) >= 1 for r in read_log(path))
    except ValueError:  # a log that does not parse is kept for the user to look at
        return False


def discard_unstarted(path: str | os.PathLike, remove_folder: bool) -> None:
    """After a run failed before its first epoch: remove what it wrote (and the folder, if the
    run created it), so that the same command can simply be run again."""
    path = Path(path)
    if not path.is_dir() or not holds_no_work(path):
        return
    _remove_run_files(path)
    if remove_folder and not any(path.iterdir()):
        path.rmdir()


def _check_writable(path: Path, flag: str, default: bool) -> None:
    """``path`` (a folder to write in, or to create) is writable: the nearest folder that exists
    on its way up is a writable folder."""
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise NotADirectoryError(f"{flag} {path}: {p} is a file, not a folder")
            if not os.access(p, os.W_OK):
                where = f"pass {flag} with a writable place" if default else "choose a writable place"
                raise PermissionError(f"{p} is read-only: {flag} {path} cannot be written; {where}")
            return


def _is_temporary(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


def check_output_folder(path: str | os.PathLike, writes: tuple[str, ...], overwrite: bool = False,
                        flag: str = "--out", default: bool = False) -> Path:
    """Check a folder a command will write the files ``writes`` (names or ``*.png``-style
    patterns) into, before any work starts; creates nothing.

    Refused: a file; a folder holding other files, unless it is a run or model folder; a file
    of ``writes`` already there, unless ``overwrite``; a folder that cannot be written (the
    message suggests ``flag`` when the folder is the command's ``default``)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{flag} {path} is a file; give a folder name (a new or an empty folder)")
    if path.is_dir():
        names = sorted(p.name for p in path.iterdir() if not _is_temporary(p.name))
        ours = [n for n in names if any(fnmatch.fnmatch(n, w) for w in writes)]
        others = [n for n in names if n not in ours]
        if others and not {RUN_SETTINGS, CONFIG} & set(names):
            raise FileExistsError(f"{flag} {path} holds files firm did not write there ({', '.join(others[:5])}); "
                                  "choose a new or empty folder")
        if ours and not overwrite:
            raise FileExistsError(f"{path} already holds {', '.join(ours[:3])}{' ...' if len(ours) > 3 else ''}; "
                                  f"pass --overwrite to replace them, or choose another {flag}")
    _check_writable(path, flag, default)
    return path


def check_output_file(path: str | os.PathLike, overwrite: bool = False, flag: str = "--out") -> Path:
    """Check a file to be written (a CSV, say) before any work starts: not a folder, not there
    yet unless ``overwrite``, never ``firm evaluate``'s :data:`SCORES` (``firm report`` reads
    it), and its folder exists or can be created."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {path} is a folder; give a file name, e.g. {path / 'scores.csv'}")
    if path.exists():
        if _is_evaluation_scores(path):
            raise FileExistsError(f"{path} holds firm evaluate's per-image scores (firm report reads them); "
                                  f"choose another {flag}")
        if not overwrite:
            raise FileExistsError(f"{path} already exists; pass --overwrite to replace it, or choose another {flag}")
    elif path.name == SCORES and {RESULTS, CONFIG} & {p.name for p in path.parent.glob("*")}:
        raise FileExistsError(f"{path} is where firm evaluate writes its per-image scores for this folder; "
                              f"choose another {flag}")
    _check_writable(path.parent, flag, default=False)
    return path


def _is_evaluation_scores(path: Path) -> bool:
    """Whether ``path`` is a CSV written by ``firm evaluate`` (it has the ground truth column)."""
    try:
        with open(path, newline="") as f:
            return "is_anomaly" in f.readline().strip().split(",")
    except (OSError, UnicodeDecodeError):
        return False


def train_files(run_dir: str | os.PathLike) -> TrainFiles:
    run_dir = Path(run_dir)
    return TrainFiles(log=run_dir / LOG, checkpoint=run_dir / CHECKPOINT)


def write_run_settings(run_dir: str | os.PathLike, settings: Settings, extra: dict | None = None) -> None:
    """``run.json``: the settings (and e.g. the inputs of a detector) a resumed run needs."""
    write_json(Path(run_dir) / RUN_SETTINGS, {"settings": settings.to_dict(), **(extra or {})})


def read_run_settings(run_dir: str | os.PathLike) -> tuple[Settings, dict]:
    """The settings in ``run.json`` and its other entries."""
    raw = read_json(Path(run_dir) / RUN_SETTINGS, "run settings")
    try:
        return settings_from_dict(raw.pop("settings")), raw
    except (KeyError, SettingsError) as e:
        raise ModelFileError(f"{Path(run_dir) / RUN_SETTINGS} is not a run settings file of this firm version ({e})") from e


def read_log(run_dir: str | os.PathLike) -> list[dict]:
    import json
    log = Path(run_dir) / LOG
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []


def save_model_dir(directory: str | os.PathLike, model: Encoder, settings: Settings, state: dict | None = None,
                   bank: Tensor | None = None, extra: dict[str, tuple[dict[str, Tensor], dict]] | None = None) -> Path:
    """Weights, feature bank and ``config.json`` (the settings used, ``state`` such as the
    threshold, the format version and each tensor file's SHA-256); the config is written last.
    ``extra`` maps more tensor files (e.g. :data:`PATCHES`) to ``(tensors, metadata)``; only the
    files listed in ``config.json`` are read back."""
    from . import __version__
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = {MODEL: save_tensors(directory / MODEL, to_cpu_state(model), {"model": model.config.to_dict()})}
    if bank is not None:
        files[BANK] = save_tensors(directory / BANK, {"bank": bank.float()})
    for name, (tensors, metadata) in (extra or {}).items():
        files[name] = save_tensors(directory / name, tensors, metadata)
    settings = settings.copy()
    settings.model = model.config
    write_json(directory / CONFIG, {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "firm_version": __version__,
                                    "settings": settings.to_dict(), "state": state or {}, "files": files})
    return directory


def load_model_dir(directory: str | os.PathLike, device: str | torch.device = "cpu"
                   ) -> tuple[Encoder, Settings, dict, Tensor | None]:
    """``(encoder, settings, state, bank)`` from a folder written by :func:`save_model_dir`;
    ``bank`` is None if there is none. Never unpickles; every kind of bad file gets a clear error.
    Extra tensor files are read with :func:`load_extra`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ModelFileError(f"model folder {directory} does not exist; pass the folder written by firm train or firm fit")
    if not (directory / CONFIG).exists() and (directory / RUN_SETTINGS).exists():
        raise ModelFileError(f"{directory} holds an unfinished run (no {CONFIG}); finish it with --resume {directory}")
    config = read_json(directory / CONFIG, "model config")
    if not isinstance(config, dict):
        raise ModelFileError(f"model config {directory / CONFIG} is not a JSON object")
    marker = {k: str(v) for k, v in config.items() if k in ("format", "format_version")}
    check_format(marker, directory / CONFIG, "model config")
    try:
        settings = settings_from_dict(config["settings"])
        _check_saved_settings(settings)
        # The saved weights replace any pretrained start, which need not exist on this machine.
        model = Encoder(dataclasses.replace(settings.model, weights=None))
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFileError(f"model config {directory / CONFIG} has no valid settings ({e}); it was written by an "
                             "older firm or edited by hand: train the model again") from e
    state = check_state(config.get("state", {}), directory / CONFIG)
    files = config.get("files", {})
    if not isinstance(files, dict):
        raise ModelFileError(f"model config {directory / CONFIG}: 'files' must map file names to their SHA-256")
    weights, _ = load_tensors(directory / MODEL, "model weights", files.get(MODEL))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    wrong = [f"{k}: file {tuple(weights[k].shape)} vs config {tuple(v.shape)}" for k, v in expected.items()
             if k in weights and weights[k].shape != v.shape]
    if missing or extra or wrong:
        detail = "; ".join(filter(None, [f"missing {missing[:3]}" if missing else "", f"unexpected {extra[:3]}" if extra else "",
                                         f"shape mismatch {wrong[:3]}" if wrong else ""]))
        raise ModelFileError(f"weights in {directory / MODEL} do not match the architecture in its config ({detail})")
    model.load_state_dict(weights)
    bank = None
    if BANK in files:
        tensors, _ = load_tensors(directory / BANK, "feature bank", files[BANK])
        bank = tensors["bank"]
        if bank.shape[-1] != model.feature_dim:
            raise ModelFileError(f"feature bank in {directory / BANK} has dimension {bank.shape[-1]}, "
                                 f"the model's features have {model.feature_dim}")
    return model.to(device).eval(), settings, state, bank


def _check_saved_settings(settings: Settings) -> None:
    """The checks a command runs on settings given to it, on settings read back from a file
    (a value edited by hand); the data settings of a detector name no dataset, so they are not checked."""
    from .config import DataConfig
    from .runner import validate
    validate(dataclasses.replace(settings, data=DataConfig()))


# The entries of config.json's "state" that firm reads back, and what each must be.
_STATE_KINDS = {"threshold": ("a number or null", lambda v: v is None or _is_number(v)),
                "holdout_scores": ("a list of numbers", lambda v: isinstance(v, list) and all(map(_is_number, v))),
                "train_paths": ("a list of file names", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)),
                "notes": ("a list of texts", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v))}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_state(state, path: str | os.PathLike) -> dict:
    """The ``state`` of a model's config.json, each entry firm reads checked (a clear
    :class:`ModelFileError` naming the entry, rather than a failure deep in a command)."""
    if not isinstance(state, dict):
        raise ModelFileError(f"model config {path}: 'state' must be a mapping (threshold, holdout_scores, ...)")
    for name, (kind, ok) in _STATE_KINDS.items():
        if name in state and not ok(state[name]):
            raise ModelFileError(f"model config {path}: {name} must be {kind}, got {state[name]!r:.60}; it was edited "
                                 "by hand: restore it, or fit the model again")
    return dict(state)


def load_extra(directory: str | os.PathLike, name: str, what: str) -> tuple[dict[str, Tensor], dict] | None:
    """``(tensors, metadata)`` of an extra tensor file that :func:`save_model_dir` wrote (its
    SHA-256 checked against ``config.json``), or None when the folder's config lists none."""
    directory = Path(directory)
    files = read_json(directory / CONFIG, "model config").get("files", {})
    if name not in files:
        return None
    return load_tensors(directory / name, what, files[name])


def _csv_text(header: list[str], rows) -> str:
    import csv
    import io
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def write_results(out_dir: str | os.PathLike, records: list[dict], scores: dict[tuple[str, str], Tensor],
                  rows: list[dict]) -> None:
    """``firm evaluate``'s files: ``results.json`` (the records) and ``scores.csv`` (one row per
    image: its identity, the ground truth ``is_anomaly`` and one ``scorer:ensemble`` column per
    score, at float32 precision), both written atomically."""
    from .serialization import atomic_write
    out_dir = Path(out_dir)
    write_json(out_dir / RESULTS, records)
    values = [scores[k].tolist() for k in scores]
    lines = (list(row.values()) + [f"{v[i]:.9g}" for v in values] for i, row in enumerate(rows))
    atomic_write(out_dir / SCORES, _csv_text(list(rows[0]) + [f"{s}:{t}" for s, t in scores], lines))


SCORE_COLUMNS = ("rank", "path", "score", "flagged")
"""Columns of ``firm score``'s CSV: rank (1 = most anomalous), absolute path, anomaly score,
and ``flagged`` (1 when the score is above the detector's threshold: a prediction, not a truth)."""


def write_score_csv(out: str | os.PathLike, rows: list[dict]) -> None:
    """``firm score``'s CSV (:data:`SCORE_COLUMNS`), written atomically."""
    from .serialization import atomic_write
    atomic_write(out, _csv_text(list(SCORE_COLUMNS), ([r["rank"], r["path"], f"{r['score']:.9g}", r["flagged"]]
                                                      for r in rows)))
