"""firm.rundir's model folders: a save and load round trip, and truncated, corrupted, newer-format,
mismatched or missing files refused with a clear error."""
import json

import pytest
import torch

from firm.config import ModelConfig, Settings
from firm.models import Encoder
from firm.rundir import load_model_dir, save_model_dir
from firm.serialization import FORMAT_VERSION, ModelFileError, load_tensors, write_json

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
