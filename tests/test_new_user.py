"""The paths a new user takes with bad input, one test per case: interrupted and failed runs,
16-bit images, too few images, outputs that exist or cannot be written, config values of the
wrong shape, a missing optional extra, and results a person can read. Each test writes its own
files in ``tmp_path``; the models are tiny and train for an epoch or two."""
import json
import os
import stat
import sys
import zlib
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from firm.cli import main
from firm.data import load_dataset
from firm.detector import FIRMDetector
from firm.training import Trainer

SMALL = ["--width", "4", "--head-hidden", "16", "--head-layers", "1", "--batch-size", "16", "--device", "cpu",
         "--quiet", "--patch-bank", "0"]


def _pngs(folder: Path, digit: int = 3, count: int = 40, split: str = "train", prefix: str = "") -> Path:
    """``count`` 8 x 8 grey PNG files of one digit of scikit-learn's digits."""
    from PIL import Image
    train, test = load_dataset("digits", size=8, channels=1)
    images = (train if split == "train" else test)
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images.images[images.labels == digit][:count]):
        Image.fromarray(img[0].numpy()).save(folder / f"{prefix}{i:03d}.png")
    return folder


def _fit(tmp_path: Path, *extra: str, normal: Path | None = None, out: str = "model") -> list[str]:
    normal = normal or _pngs(tmp_path / "normal")
    return ["fit", "--normal-dir", str(normal), "--out", str(tmp_path / out), *SMALL, *extra]


def _interrupt_at_step(monkeypatch, step: int) -> None:
    """Make the ``step``-th training step (counted from 1) raise KeyboardInterrupt, as Ctrl-C would."""
    calls = {"n": 0}
    original = Trainer.step

    def step_or_stop(self, index, variant):
        calls["n"] += 1
        if calls["n"] == step:
            raise KeyboardInterrupt
        return original(self, index, variant)
    monkeypatch.setattr(Trainer, "step", step_or_stop)


def _weights(model: Path) -> dict:
    return FIRMDetector.load(model).encoder_.state_dict()


# --------------------------------------------------------------- interrupting never strands work
def test_ctrl_c_before_the_first_checkpoint_resumes_to_the_same_weights(tmp_path, monkeypatch, capsys):
    argv = _fit(tmp_path, "--epochs", "4", "--checkpoint-every", "0")  # 36 training images: 3 steps per epoch
    _interrupt_at_step(monkeypatch, 8)  # in epoch 3
    assert main(argv) == 130
    assert "continue with --resume" in capsys.readouterr().err
    monkeypatch.undo()
    assert main(["fit", "--resume", str(tmp_path / "model"), "--quiet"]) == 0
    log = [json.loads(line) for line in (tmp_path / "model" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3, 4]
    assert main(argv[:4] + [str(tmp_path / "reference")] + argv[5:]) == 0
    a, b = _weights(tmp_path / "model"), _weights(tmp_path / "reference")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_in_the_first_epoch_resumes_from_the_start(tmp_path, monkeypatch):
    argv = _fit(tmp_path, "--epochs", "2")
    _interrupt_at_step(monkeypatch, 2)
    assert main(argv) == 130
    assert not (tmp_path / "model" / "checkpoint.safetensors").exists()
    monkeypatch.undo()
    assert main(["fit", "--resume", str(tmp_path / "model"), "--quiet"]) == 0
    assert (tmp_path / "model" / "config.json").exists()
    # a plain rerun is not refused either: the interrupted run had nothing worth keeping
    _interrupt_at_step(monkeypatch, 1)
    assert main(_fit(tmp_path, "--epochs", "2", out="other")) == 130
    monkeypatch.undo()
    assert main(_fit(tmp_path, "--epochs", "1", out="other")) == 0


@pytest.mark.parametrize("case", ["empty folder", "no readable image"])
def test_a_fit_failing_on_its_input_leaves_nothing_behind(tmp_path, capsys, case):
    normal = tmp_path / "normal"
    normal.mkdir()
    if case == "no readable image":
        (normal / "a.png").write_bytes(b"not a png")
    argv = _fit(tmp_path, "--epochs", "1", normal=normal)
    assert main(argv) == 1
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "model").exists()
    _pngs(normal)
    assert main(argv) == 0  # the same command, once the folder holds images


# --------------------------------------------------------------- images at their real depth
def _png16(path: Path, pixels: np.ndarray) -> Path:
    """A 16-bit grey (H, W) or RGB (H, W, 3) PNG, written by hand: Pillow writes no 16-bit colour."""
    h, w = pixels.shape[:2]
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", w, h, 16, 0 if pixels.ndim == 2 else 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))
    return path


def _tiff16(path: Path, pixels: np.ndarray) -> Path:
    """An uncompressed 16-bit grey or RGB TIFF (little-endian), written by hand."""
    h, w = pixels.shape[:2]
    c = 1 if pixels.ndim == 2 else pixels.shape[2]
    data = pixels.astype("<u2").tobytes()
    entries = [(256, 4, 1, w), (257, 4, 1, h), (258, 3, c, 8 if c == 1 else 0), (259, 3, 1, 1),
               (262, 3, 1, 1 if c == 1 else 2), (273, 4, 1, 0), (277, 3, 1, c), (278, 4, 1, h),
               (279, 4, 1, len(data)), (284, 3, 1, 1)]
    ifd_size = 2 + 12 * len(entries) + 4
    bits_at, data_at = 8 + ifd_size, 8 + ifd_size + 6
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        value = {258: 16 if c == 1 else bits_at, 273: data_at}.get(tag, value)
        ifd += struct.pack("<HHI", tag, kind, count) + (struct.pack("<HH", value, 0) if kind == 3
                                                         else struct.pack("<I", value))
    path.write_bytes(b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x00" * 4 + struct.pack("<3H", 16, 16, 16) + data)
    return path


@pytest.mark.parametrize("write", [_png16, _tiff16], ids=["png", "tiff"])
@pytest.mark.parametrize("colour", [False, True], ids=["grey", "colour"])
def test_16_bit_images_are_read_at_their_depth_and_scaled_by_their_range(tmp_path, write, colour):
    from firm.data import load_image_folder
    ramp = np.tile(np.linspace(1000, 63000, 64).round().astype(np.uint16), (16, 1))  # 0-63000 in the issue
    pixels = np.stack([ramp, ramp // 2 + 500, 64000 - ramp], -1) if colour else ramp
    path = write(tmp_path / f"gradient.{'png' if write is _png16 else 'tif'}", pixels)
    images = load_image_folder(path, size=(16, 64), channels=3 if colour else 1).images[0].numpy()
    row = images[0, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255  # the image's own range spans 0-255
    assert (np.diff(row) >= 0).all() and len(set(row.tolist())) == 64  # a gradient, not two values
    if colour:  # the channels keep their order and their share of the common range
        green, blue = images[1, 0].astype(int), images[2, 0].astype(int)
        assert (np.diff(green) >= 0).all() and (np.diff(blue) <= 0).all() and 120 < green[-1] < 135


def test_16_bit_noise_is_not_mostly_white(tmp_path):
    from firm.data import load_image_folder
    noise = np.random.default_rng(0).integers(0, 65536, (32, 32)).astype(np.uint16)
    images = load_image_folder(_png16(tmp_path / "noise.png", noise), size=32, channels=1).images
    assert 0.4 < float((images > 127).float().mean()) < 0.6
