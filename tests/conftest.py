"""Shared test settings and fixtures."""
import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One torch thread for every test module: the networks here are tiny and gain nothing from
    more, and on a loaded 2-core machine two threads wait for each other at every operation
    (several times slower). Tests that start processes set OMP_NUM_THREADS for them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_png(path, array):
    """Write uint8 ``array`` as a PNG at ``path``, making its folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture
def mvtec(tmp_path):
    """A tiny folder in the MVTec AD layout: 32 x 48 grey images, a 'crack' kind with masks."""
    root = tmp_path / "part"
    plain = np.full((48, 32), 120, dtype=np.uint8)
    for name in ("000", "001", "002"):
        write_png(root / "train" / "good" / f"{name}.png", plain)
    for name in ("000", "001"):
        write_png(root / "test" / "good" / f"{name}.png", plain)
        cracked = plain.copy()
        cracked[8:24, 4:20] = 250
        write_png(root / "test" / "crack" / f"{name}.png", cracked)
        mask = np.zeros((48, 32), dtype=np.uint8)
        mask[8:24, 4:20] = 255
        write_png(root / "ground_truth" / "crack" / f"{name}_mask.png", mask)
    return root
