"""Bad model files and bad input: each gets a clear error (or warning) and nothing written is lost."""
import json
import time
import warnings

import numpy as np
import pytest
import torch

from firm.config import ModelConfig, Settings, TrainConfig
from firm.data import as_images, load_dataset, load_image_folder, one_class_split, resolve_data_root
from firm.models import Encoder
from firm.rundir import CHECKPOINT, load_model_dir, save_model_dir, train_files
from firm.serialization import FORMAT_VERSION, ModelFileError, load_tensors, save_tensors, write_json
from firm.training import Trainer, TrainingError

TINY = ModelConfig(width=4, head_hidden=16, head_layers=1)




@pytest.fixture
def model_dir(tmp_path):
    model = Encoder(TINY)
    settings = Settings(model=TINY)
    settings.train.tau = 0.5
    save_model_dir(tmp_path / "m", model, settings, {"note": "test"}, bank=torch.randn(1, 1, 10, model.feature_dim))
    return tmp_path / "m"


def test_round_trip(tmp_path):
    model = Encoder(TINY)
    settings = Settings(model=TINY)
    settings.train.tau, settings.eval.scorer = 0.5, "cos5"
    bank = torch.randn(4, 1, 10, model.feature_dim)
    save_model_dir(tmp_path / "m", model, settings, {"threshold": 0.25}, bank=bank)
    loaded, got, state, got_bank = load_model_dir(tmp_path / "m")
    assert state == {"threshold": 0.25} and got == settings and loaded.config == TINY
    assert json.loads((tmp_path / "m" / "config.json").read_text())["format_version"] == FORMAT_VERSION
    assert torch.equal(got_bank, bank)
    expected = model.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())


def test_truncated_weights_are_refused(model_dir):
    path = model_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ModelFileError, match="corrupted"):
        load_model_dir(model_dir)
    # without a recorded checksum the safetensors structure itself is checked
    with pytest.raises(ModelFileError, match="truncated or corrupted"):
        load_tensors(path)


def test_flipped_byte_is_detected(model_dir):
    path = model_dir / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="SHA-256"):
        load_model_dir(model_dir)


def test_newer_format_version_is_refused(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["format_version"] = 99
    write_json(model_dir / "config.json", cfg)
    with pytest.raises(ModelFileError, match="newer"):
        load_model_dir(model_dir)


def test_newer_tensor_file_is_refused(tmp_path):
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, tmp_path / "t.safetensors", metadata={"format": "firm", "format_version": "7"})
    with pytest.raises(ModelFileError, match="format version 7"):
        load_tensors(tmp_path / "t.safetensors")


def test_weights_that_do_not_match_the_config(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["settings"]["model"]["width"] = 8
    write_json(model_dir / "config.json", cfg)
    with pytest.raises(ModelFileError, match="do not match the architecture"):
        load_model_dir(model_dir)


def test_broken_config_and_missing_folder(model_dir, tmp_path):
    (model_dir / "config.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="not valid JSON"):
        load_model_dir(model_dir)
    with pytest.raises(ModelFileError, match="does not exist"):
        load_model_dir(tmp_path / "nowhere")


def test_a_pickle_is_never_loaded(tmp_path):
    import pickle
    (tmp_path / "evil.safetensors").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ModelFileError):
        load_tensors(tmp_path / "evil.safetensors")


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


def test_nan_loss_stops_training_and_keeps_the_last_checkpoint(tmp_path):
    images = torch.randint(0, 255, (40, 3, 32, 32), dtype=torch.uint8)
    cfg = TrainConfig(epochs=3, batch_size=16, checkpoint_every=1, device="cpu", channels_last=False)
    trainer = Trainer(Encoder(TINY), cfg, images, files=train_files(tmp_path), progress=False)
    real_loss, calls = trainer.loss_fn, {"n": 0}

    class Poisoned(torch.nn.Module):  # a loss module, as the trainer checkpoints the loss's state too
        def forward(self, z1, z2, labels):
            calls["n"] += 1
            value = real_loss(z1, z2, labels)
            return value * float("nan") if calls["n"] > trainer.plan.steps_per_epoch() else value

    trainer.loss_fn = Poisoned()
    with pytest.raises(TrainingError, match="loss became nan in epoch 2"):
        trainer.train()
    tensors, meta = load_tensors(tmp_path / CHECKPOINT)
    assert meta["epoch"] == 1
    assert all(torch.isfinite(v).all() for k, v in tensors.items() if v.is_floating_point())


def test_training_input_errors():
    with pytest.raises(ValueError, match="uint8"):
        Trainer(Encoder(TINY), TrainConfig(device="cpu"), torch.rand(4, 3, 32, 32), progress=False)
    with pytest.raises(ValueError, match="no training images"):
        Trainer(Encoder(TINY), TrainConfig(device="cpu"), torch.zeros(0, 3, 32, 32, dtype=torch.uint8), progress=False)
    with pytest.raises(ValueError, match="unknown loss"):
        Trainer(Encoder(TINY), TrainConfig(loss="simclr", device="cpu"), torch.zeros(4, 3, 32, 32, dtype=torch.uint8),
                progress=False)
    with pytest.raises(ValueError, match="ID class labels"):
        Trainer(Encoder(TINY), TrainConfig(device="cpu"), torch.zeros(4, 3, 32, 32, dtype=torch.uint8),
                class_labels=torch.tensor([0, 1, -1, 0]), progress=False)


def test_checkpoint_of_another_model_is_refused(tmp_path):
    images = torch.randint(0, 255, (20, 3, 32, 32), dtype=torch.uint8)
    cfg = TrainConfig(epochs=1, batch_size=16, device="cpu", channels_last=False)
    Trainer(Encoder(TINY), cfg, images, files=train_files(tmp_path), progress=False).train()
    other = Trainer(Encoder(ModelConfig(width=8, head_hidden=16, head_layers=1)), cfg, images,
                    files=train_files(tmp_path), progress=False)
    with pytest.raises(ModelFileError, match="another model"):
        other.train(resume=True)


def test_a_resumed_run_counts_the_time_spent_before_it_was_stopped(tmp_path):
    images = torch.randint(0, 255, (20, 3, 32, 32), dtype=torch.uint8)
    cfg = TrainConfig(epochs=3, batch_size=16, device="cpu", channels_last=False, checkpoint_every=1, eval_every=1)

    def slow_then_stopped(model, epoch):
        if epoch == 1:
            time.sleep(1.0)  # the slow part happens before the stop
        if epoch == 2:
            raise KeyboardInterrupt  # after epoch 1's checkpoint, before epoch 2's
        return {}

    with pytest.raises(KeyboardInterrupt):
        Trainer(Encoder(TINY), cfg, images, files=train_files(tmp_path), evaluate=slow_then_stopped,
                progress=False).train()
    resumed = Trainer(Encoder(TINY), cfg, images, files=train_files(tmp_path), progress=False)
    resumed.train(resume=True)
    assert resumed.seconds_before_resume >= 1.0
    assert [r["epoch"] for r in resumed.history] == [0, 1, 2, 3]
    assert resumed.seconds >= resumed.seconds_before_resume + sum(r["seconds"] for r in resumed.history[2:])


def test_save_tensors_is_atomic_on_failure(tmp_path):
    path = tmp_path / "t.safetensors"
    save_tensors(path, {"a": torch.ones(3)})
    before = path.read_bytes()
    with pytest.raises(Exception):
        save_tensors(path, {"a": object()})  # not a tensor: fails before anything is replaced
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]
