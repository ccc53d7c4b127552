"""firm.runner.validate: every name against its registry and every number against its range, one
error type, and no image read."""
import pytest

from firm import runner
from firm.config import MIN_IMAGE_SIZE, PRESETS, SettingsError, apply_overrides, preset
from firm.data import load_dataset
from firm.runner import train_encoder, validate


@pytest.mark.parametrize("name, value, message", [
    ("loss", "simclr", "unknown loss 'simclr'; choose one of firm, ntxent"),
    ("loss_mode", "diagonal", "unknown loss layout 'diagonal'; choose one of concat, pairwise, authors"),
    ("shifts", "rotation,rotate", "unknown shift 'rotate'; choose one of rotation"),
    ("shifts", "auto,rotation", "'auto' alone"),
    ("backbone", "vgg16", "unknown backbone 'vgg16'"),
    ("stem", "tiny", "unknown stem 'tiny'; choose one of cifar, imagenet, auto"),
    ("init", "xavier", "unknown initialisation 'xavier'"),
    ("scorer", "all", "scorer 'all' .* cannot be used here"),
    ("scorers", "cos1,cos3", "unknown scorer 'cos3'"),
    ("tta", "flip", "unknown test-time ensemble 'flip'; choose one of none, angled, ensemble"),
    ("final_tta", "none,flips", "unknown test-time ensemble 'flips'"),
    ("dataset", "imagenet", "unknown dataset 'imagenet'; choose one of cifar10, .* or a folder"),
    ("ood", "imagenet", "unknown dataset 'imagenet'"),
    ("split", "train", "unknown split 'train'; choose one of test, validation"),
    ("normal_class", "10", "'normal_class' must be 0..9 or 'all'"),
    ("normal_class", "cat", "'normal_class' must be 0..9 or 'all'"),
    ("image_size", MIN_IMAGE_SIZE - 1, f"'image_size' must be >= {MIN_IMAGE_SIZE}"),
    ("holdout", 1.0, r"'holdout' must be in \[0, 1\)"),
    ("method", "padim", "unknown detector method 'padim'; choose one of patch, finetune, firm, auto"),
    ("score", "mean", "unknown detector score 'mean'; choose one of patch, pooled, auto"),
])
def test_bad_settings_are_refused_with_one_error_type(name, value, message):
    with pytest.raises(SettingsError, match=message):
        validate(apply_overrides(preset("cpu"), {name: value}))


def test_presets_and_keywords_are_valid():
    for settings in PRESETS.values():
        validate(settings)
    validate(apply_overrides(preset("cpu"), {"shifts": "auto", "scorers": "all", "stem": "auto", "normal_class": "all",
                                             "dataset": "cifar100", "loss_mode": "authors"}))
    validate(apply_overrides(preset("cpu"), {"dataset": "cifar100", "normal_class": "19"}))  # 20 superclasses


def test_validation_reads_no_image(monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise AssertionError("validate read data")
    monkeypatch.setattr(runner, "load_dataset", refuse)
    monkeypatch.setattr(runner, "load_image_folder", refuse)
    validate(apply_overrides(preset("cpu"), {"data_root": str(tmp_path / "missing"), "ood": [str(tmp_path)]}))


def test_the_smallest_image_size_trains():
    """MIN_IMAGE_SIZE is what training really needs: 2-pixel images train (1 pixel fails in the
    views' reflect-padded blur, so validate refuses it first)."""
    settings = apply_overrides(preset("demo"), {"image_size": MIN_IMAGE_SIZE, "epochs": 1, "batch_size": 16,
                                                "device": "cpu"})
    validate(settings)
    images = load_dataset("digits", size=MIN_IMAGE_SIZE)[0].images[:32]
    trained = train_encoder(settings, images, progress=False, log=lambda message: None)
    assert len(trained.history) == 1
