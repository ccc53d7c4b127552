"""firm.data: dataset readers on small files written in the standard layouts (CIFAR-100, MNIST IDX,
MVTec AD folders and masks), validation splits, the data root, normal classes, image arrays and
unreadable image files."""
import gzip
import pickle
import struct
import warnings

import numpy as np
import pytest
import torch

from firm.bench import plan_grid
from firm.config import SettingsError, apply_overrides, preset
from firm.data import (LAYOUTS, as_images, folder_layout, load_dataset, load_defect_dataset,
                       load_image_folder, normal_classes, one_class_split, read_masks, resolve_data_root,
                       validation_split)
from firm.runner import prepare_data, run, validate

from conftest import write_png


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


def test_load_defect_dataset(mvtec):
    train, test = load_defect_dataset(mvtec, size=16)
    masks = test.masks
    assert train.images.shape == (3, 3, 16, 16) and train.labels.tolist() == [0, 0, 0]
    assert test.images.shape == (4, 3, 16, 16) and test.labels.tolist() == [0, 0, 1, 1]
    assert [p.split("/")[-2] for p in test.paths] == ["good", "good", "crack", "crack"]
    assert masks.shape == (4, 16, 16) and masks.dtype == torch.uint8
    assert masks[:2].sum() == 0
    # resized as the images are: the mask covers the pixels that are more than half defect
    expected = (test.images[2, 0] > (120 + 250) / 2).to(torch.uint8)
    assert 20 < int(expected.sum()) < 60
    assert torch.equal(masks[2], expected) and torch.equal(masks[3], expected)


def test_masks_missing_and_absent(mvtec):
    (mvtec / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"crack/001\.png has no mask"):
        load_defect_dataset(mvtec, size=16)
    for f in (mvtec / "ground_truth" / "crack").iterdir():
        f.unlink()
    (mvtec / "ground_truth" / "crack").rmdir()
    (mvtec / "ground_truth").rmdir()
    assert load_defect_dataset(mvtec, size=16)[1].masks is None


def test_read_masks_by_name(mvtec, tmp_path):
    test = load_defect_dataset(mvtec, size=16)[1]
    # firm evaluate --mask-dir: a flat folder; good images may have none
    flat = tmp_path / "masks"
    mask = np.zeros((48, 32), dtype=np.uint8)
    mask[:24] = 1
    write_png(flat / "000.png", mask)  # a flat name matches test/good/000.png and test/crack/000.png
    masks = read_masks(test.paths, flat, 16)
    assert masks.sum(dim=(1, 2)).tolist() == [128, 0, 128, 0] and masks[0, :8].all()
    with pytest.raises(FileNotFoundError, match=r"crack/001\.png has no mask"):
        read_masks(test.paths, flat, 16, is_anomaly=[0, 0, 1, 1])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_masks(test.paths, tmp_path / "nowhere", 16)
    (tmp_path / "other").mkdir()
    write_png(tmp_path / "other" / "unrelated.png", mask)
    with pytest.raises(FileNotFoundError, match="no mask in .* matches any"):
        read_masks(test.paths, tmp_path / "other", 16)
    write_png(flat / "001_mask.png", np.zeros((10, 40), dtype=np.uint8))  # another shape than its image
    with pytest.raises(ValueError, match="cannot be aligned"):
        read_masks(test.paths, flat, 16, is_anomaly=[0, 0, 1, 1])


def test_a_defect_folder_is_a_dataset_by_its_layout(mvtec, tmp_path):
    """A folder in the MVTec AD layout reads as train (good) and test (good and defects, with
    masks) wherever a dataset is named; a plain folder of images is one class."""
    assert folder_layout(mvtec) is LAYOUTS.get("mvtec")
    train, test = load_dataset(str(mvtec), size=16)
    assert len(train) == 3 and test.labels.tolist() == [0, 0, 1, 1] and test.masks.shape == (4, 16, 16)
    assert test.subset([2, 0]).masks.sum(dim=(1, 2)).tolist() == [int(test.masks[2].sum()), 0]
    assert train.classes == test.classes == ["good", "defect"] and normal_classes(str(mvtec)) == [0]
    plain = mvtec / "train"
    assert folder_layout(plain) is LAYOUTS.get("images") and normal_classes(str(plain)) == []
    folder_train, folder_test = load_dataset(str(plain), size=16)
    assert folder_train is folder_test and folder_train.masks is None


def test_settings_and_grids_on_folders(mvtec):
    """validate accepts the defect folder's normal class only; a plain folder needs 'all'; the
    bench grid of a defect folder without --classes is its normal class."""
    validate(apply_overrides(preset("cpu"), {"dataset": str(mvtec), "normal_class": "0"}))
    with pytest.raises(SettingsError, match="'normal_class' must be 0 or 'all'"):
        validate(apply_overrides(preset("cpu"), {"dataset": str(mvtec), "normal_class": "1"}))
    with pytest.raises(SettingsError, match="'normal_class' must be 'all'"):
        validate(apply_overrides(preset("cpu"), {"dataset": str(mvtec / "train"), "normal_class": "0"}))
    runs = plan_grid(preset("cpu"), [str(mvtec)], None, ["firm"], [0])
    assert [r.normal_class for r in runs] == ["0"]


def test_firm_trains_on_a_defect_folder(mvtec):
    """The one run path on a defect folder: trained on train/good, scored on test/ (good vs defect)."""
    settings = apply_overrides(preset("demo"), {"dataset": str(mvtec), "normal_class": "0", "image_size": 8,
                                                "epochs": 1, "batch_size": 4, "scorers": "cos1", "final_tta": "none",
                                                "device": "cpu"})
    data = prepare_data(settings)
    assert len(data.normal) == 3 and [name for name, _, _ in data.eval_sets] == ["test"]
    assert data.eval_sets[0][2].tolist() == [0, 0, 1, 1]
    records = run(settings, progress=False, log=lambda message: None).records
    assert [(r["dataset"], r["normal_class"], r["scorer"]) for r in records if r["final"]] == [(str(mvtec), "0", "cos1")]


def test_missing_or_empty_data_root(tmp_path, monkeypatch):
    monkeypatch.delenv("FIRM_DATA_ROOT", raising=False)
    with pytest.raises(FileNotFoundError, match="--data-root"):
        resolve_data_root(None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_data_root(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="CIFAR-10 not found"):
        load_dataset("cifar10", tmp_path)
    with pytest.raises(FileNotFoundError, match="Fashion-MNIST not found"):
        load_dataset("fashionmnist", tmp_path)
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet", tmp_path)


def test_normal_class_outside_the_known_classes_or_empty():
    train, test = load_dataset("digits")
    with pytest.raises(ValueError, match="not a class"):
        one_class_split(train, test, 12)
    empty = train.subset(torch.nonzero(train.labels != 3).squeeze(1))
    with pytest.raises(ValueError, match="no training images"):
        one_class_split(empty, test, 3)


def test_image_arrays_are_converted_where_safe_and_refused_where_not():
    grey = np.zeros((2, 20, 24), dtype=np.uint8)
    assert as_images(grey).shape == (2, 3, 32, 32)
    hwc = np.zeros((2, 40, 40, 3), dtype=np.uint8)
    assert as_images(hwc, size=16).shape == (2, 3, 16, 16)
    with pytest.warns(UserWarning, match="alpha"):
        assert as_images(np.zeros((2, 8, 8, 4), dtype=np.uint8)).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="2 channels"):
        as_images(np.zeros((2, 2, 8, 8), dtype=np.uint8), name="my images")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        as_images(np.full((2, 8, 8), 200.0), name="float images")
    with pytest.raises(ValueError, match="batch of images"):
        as_images(np.zeros((8, 8)))
    floats = as_images(np.full((1, 3, 8, 8), 0.5, dtype=np.float32), size=8)
    assert int(floats[0, 0, 0, 0]) == 128


def test_corrupt_image_files_are_skipped_counted_and_listed(tmp_path):
    from PIL import Image
    Image.new("RGB", (10, 12), (255, 0, 0)).save(tmp_path / "good.png")
    Image.new("L", (50, 30), 128).save(tmp_path / "grey.jpg")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image file\(s\) of 3: .*broken.png"):
        found = load_image_folder(tmp_path)
    assert len(found) == 2 and found.images.shape == (2, 3, 32, 32)
    (tmp_path / "good.png").unlink()
    (tmp_path / "grey.jpg").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="could be read"):
            load_image_folder(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no image files"):
        load_image_folder(tmp_path / "empty")
