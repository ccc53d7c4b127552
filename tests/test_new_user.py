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
