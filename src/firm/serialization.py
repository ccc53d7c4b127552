"""Safe, atomic files: tensors in safetensors, everything else in JSON; nothing is unpickled.

Every write goes to a temporary file in the same folder and is renamed into place, so a killed
process leaves either the old file or the new one, never half of one. Tensor files carry a
SHA-256 in the JSON that refers to them, so corruption is detected, not just truncation.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, fields
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["FORMAT_VERSION", "ModelFileError", "DictConfig", "atomic_write", "write_json", "read_json", "save_tensors",
           "load_tensors", "sha256_of", "check_format"]

FORMAT_VERSION = 1
FORMAT_NAME = "firm"
_UMASK = os.umask(0)
os.umask(_UMASK)


class ModelFileError(ValueError):
    """A model, checkpoint or config file that cannot be used as it is."""


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=2, allow_nan=True) + "\n")


def read_json(path: str | os.PathLike, what: str = "file") -> dict:
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{what} {path} is missing")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{what} {path} is not valid JSON ({e}); it is truncated or corrupted") from e


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_tensors(path: str | os.PathLike, tensors: dict[str, Tensor], metadata: dict | None = None) -> str:
    """Save tensors (made contiguous, on the CPU) to a safetensors file; returns its SHA-256.

    ``metadata`` (any JSON-able dict) is stored in the file's header under ``"firm"``.
    """
    from safetensors.torch import save
    header = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION)}
    if metadata is not None:
        header["firm"] = json.dumps(metadata)
    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=header)
    atomic_write(path, data)
    return sha256_of(data)


def load_tensors(path: str | os.PathLike, what: str = "tensor file", sha256: str | None = None) -> tuple[dict[str, Tensor], dict]:
    """Tensors and the ``metadata`` dict saved by :func:`save_tensors`, with clear errors for a
    missing, truncated, corrupted or newer-format file."""
    from safetensors import SafetensorError
    from safetensors.torch import load
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{what} {path} is missing")
    data = path.read_bytes()
    if sha256 is not None and sha256_of(data) != sha256:
        raise ModelFileError(f"{what} {path} is corrupted: its SHA-256 does not match the one recorded when it was saved")
    if len(data) < 8:
        raise ModelFileError(f"{what} {path} is truncated ({len(data)} bytes)")
    header_len = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8:8 + header_len]) if 8 + header_len <= len(data) else None
        if header is None:
            raise ValueError("header runs past the end of the file")
        tensors = load(data)
    except (SafetensorError, ValueError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{what} {path} is not a valid safetensors file ({e}); it is truncated or corrupted") from e
    meta = header.get("__metadata__") or {}
    check_format(meta, path, what)
    return tensors, json.loads(meta["firm"]) if "firm" in meta else {}


def check_format(meta: dict, path: str | os.PathLike, what: str) -> None:
    """Refuse files from another program or a newer format version."""
    if meta.get("format") != FORMAT_NAME:
        raise ModelFileError(f"{what} {path} was not written by firm (no firm format marker)")
    try:
        version = int(meta.get("format_version", -1))
    except (TypeError, ValueError):
        version = -1
    if version < 1:
        raise ModelFileError(f"{what} {path} has an invalid format version {meta.get('format_version')!r}")
    if version > FORMAT_VERSION:
        raise ModelFileError(f"{what} {path} uses format version {version}, newer than this firm reads "
                             f"({FORMAT_VERSION}); upgrade the firm package to load it")


class DictConfig:
    """Mixin for config dataclasses: ``to_dict`` and a ``from_dict`` that names unknown keys."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"{cls.__name__} has no settings {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


def to_cpu_state(module: torch.nn.Module) -> dict[str, Tensor]:
    """A module's state dict with shared tensors copied apart (safetensors refuses aliases)."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


MODEL_FILE = "model.safetensors"
BANK_FILE = "bank.safetensors"
CONFIG_FILE = "config.json"


def save_model_dir(directory: str | os.PathLike, model: torch.nn.Module, config: dict,
                   bank: Tensor | None = None) -> Path:
    """Save an encoder (weights), its feature bank and a JSON config into ``directory``.

    ``config`` is any JSON-able dict (training, data and detector settings); the model's own
    architecture, the format version and the files' SHA-256 sums are added. The config is
    written last, so a folder whose config is present is complete.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = {MODEL_FILE: save_tensors(directory / MODEL_FILE, to_cpu_state(model), {"model": model.config.to_dict()})}
    if bank is not None:
        files[BANK_FILE] = save_tensors(directory / BANK_FILE, {"bank": bank.float()})
    from . import __version__
    full = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "firm_version": __version__,
            **config, "model": model.config.to_dict(), "files": files}
    write_json(directory / CONFIG_FILE, full)
    return directory


def load_model_dir(directory: str | os.PathLike, device: str | torch.device = "cpu"):
    """``(encoder, config, bank)`` from a folder written by :func:`save_model_dir`; ``bank`` is
    None if the folder has none. Never unpickles; every kind of bad file gets a clear error."""
    from .models import Encoder, ModelConfig
    directory = Path(directory)
    if not directory.is_dir():
        raise ModelFileError(f"model folder {directory} does not exist; pass the folder written by firm train or firm fit")
    config = read_json(directory / CONFIG_FILE, "model config")
    if not isinstance(config, dict):
        raise ModelFileError(f"model config {directory / CONFIG_FILE} is not a JSON object")
    marker = {k: str(v) for k, v in config.items() if k in ("format", "format_version")}
    check_format(marker, directory / CONFIG_FILE, "model config")
    try:
        model = Encoder(ModelConfig.from_dict(config["model"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFileError(f"model config {directory / CONFIG_FILE} has no valid 'model' section ({e})") from e
    files = config.get("files", {})
    state, _ = load_tensors(directory / MODEL_FILE, "model weights", files.get(MODEL_FILE))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = [f"{k}: file {tuple(state[k].shape)} vs config {tuple(v.shape)}" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    if missing or extra or wrong:
        detail = "; ".join(filter(None, [f"missing {missing[:3]}" if missing else "", f"unexpected {extra[:3]}" if extra else "",
                                         f"shape mismatch {wrong[:3]}" if wrong else ""]))
        raise ModelFileError(f"weights in {directory / MODEL_FILE} do not match the architecture in its config ({detail})")
    model.load_state_dict(state)
    bank = None
    if BANK_FILE in files:
        tensors, _ = load_tensors(directory / BANK_FILE, "feature bank", files[BANK_FILE])
        bank = tensors["bank"]
        if bank.shape[-1] != model.feature_dim:
            raise ModelFileError(f"feature bank in {directory / BANK_FILE} has dimension {bank.shape[-1]}, "
                                 f"the model's features have {model.feature_dim}")
    return model.to(device).eval(), config, bank
