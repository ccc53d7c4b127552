"""firm.serialization: tensor files of a newer format or holding a pickle are refused, and a failed
save leaves the file it would have replaced as it was."""
import pytest
import torch

from firm.serialization import ModelFileError, load_tensors, save_tensors


def test_newer_tensor_file_is_refused(tmp_path):
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, tmp_path / "t.safetensors", metadata={"format": "firm", "format_version": "7"})
    with pytest.raises(ModelFileError, match="format version 7"):
        load_tensors(tmp_path / "t.safetensors")


def test_a_pickle_is_never_loaded(tmp_path):
    import pickle
    (tmp_path / "evil.safetensors").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ModelFileError):
        load_tensors(tmp_path / "evil.safetensors")


def test_save_tensors_is_atomic_on_failure(tmp_path):
    path = tmp_path / "t.safetensors"
    save_tensors(path, {"a": torch.ones(3)})
    before = path.read_bytes()
    with pytest.raises(Exception):
        save_tensors(path, {"a": object()})  # not a tensor: fails before anything is replaced
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]
