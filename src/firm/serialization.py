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
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["FORMAT_VERSION", "FORMAT_NAME", "ModelFileError", "WeightsError",
           "to_cpu_state", "atomic_write", "write_json", "read_json",
           "save_tensors", "load_tensors", "sha256_of", "check_format"]

FORMAT_VERSION = 2  # 2: config.json holds the run's full settings
FORMAT_NAME = "firm"
_UMASK = os.umask(0)
os.umask(_UMASK)


class ModelFileError(ValueError):
    """A model, checkpoint or config file that cannot be used as it is."""


class WeightsError(ValueError):
    """A pretrained-weights file that cannot be used; the message names the file and the fix."""


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


def to_cpu_state(module: torch.nn.Module) -> dict[str, Tensor]:
    """A module's state dict with shared tensors copied apart (safetensors refuses aliases)."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
