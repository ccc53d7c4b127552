"""Dataset readers on small files written in the standard layouts (CIFAR-100, MNIST IDX)."""
import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from firm.data import load_dataset, validation_split


def _write_cifar100(folder, n):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        data = {"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), "fine_labels": list(range(n)),
                "coarse_labels": [i % 20 for i in range(n)]}
        (folder / split).write_bytes(pickle.dumps(data))
    (folder / "meta").write_bytes(pickle.dumps({"coarse_label_names": [f"super{i}" for i in range(20)]}))


def test_cifar100_uses_the_20_superclasses(tmp_path):
    _write_cifar100(tmp_path / "cifar-100-python", 40)
    train, test = load_dataset("cifar100", tmp_path)
    assert train.images.shape == (40, 3, 32, 32) and len(test) == 40
    assert train.labels.max() == 19 and train.classes[3] == "super3"


def test_dataset_pickles_cannot_run_code(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    for name in ("data_batch_1", "test_batch"):
        (folder / name).write_bytes(pickle.dumps({"data": Evil()}))
    with pytest.raises(pickle.UnpicklingError, match="never needs"):
        load_dataset("cifar10", tmp_path)


def _idx(array: np.ndarray) -> bytes:
    return bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def test_mnist_idx_files_plain_or_gzipped(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (12, 28, 28), dtype=np.uint8)
    labels = np.arange(12, dtype=np.uint8) % 10
    (raw / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(images)))
    (raw / "train-labels-idx1-ubyte").write_bytes(_idx(labels))
    (raw / "t10k-images-idx3-ubyte").write_bytes(_idx(images[:5]))
    (raw / "t10k-labels-idx1-ubyte").write_bytes(_idx(labels[:5]))
    train, test = load_dataset("mnist", tmp_path)
    assert train.images.shape == (12, 3, 32, 32) and test.labels.tolist() == [0, 1, 2, 3, 4]
    (raw / "t10k-labels-idx1-ubyte").write_bytes(_idx(labels[:5])[:-2])
    with pytest.raises(ValueError, match="truncated"):
        load_dataset("mnist", tmp_path)


def test_validation_split_stays_inside_the_training_set():
    train, _ = load_dataset("digits")
    normal, val, is_anomaly = validation_split(train, 3, holdout=0.2, anomalies=50, seed=1)
    assert int(is_anomaly.sum()) == 50 and int((is_anomaly == 0).sum()) == round(0.2 * int((train.labels == 3).sum()))
    assert (normal.labels == 3).all() and (val.labels[is_anomaly == 1] != 3).all()
    # held-out normal images are not among the training images
    held = val.images[is_anomaly == 0].flatten(1)
    assert not (held[:, None, :] == normal.images.flatten(1)[None]).all(-1).any()
    assert torch.equal(validation_split(train, 3, holdout=0.2, anomalies=50, seed=1)[1].images, val.images)
