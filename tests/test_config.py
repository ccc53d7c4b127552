"""firm.config: the settings dataclasses, presets (the paper preset's training and evaluation values are
the authors'), YAML and run.json round trips, the CLI's --config."""
import dataclasses
from dataclasses import fields

import pytest
import yaml

from firm import cli
from firm.config import (GROUPS, PRESETS, DataConfig, DetectorConfig, EvalConfig, ModelConfig, Settings, SettingsError,
                         TrainConfig, apply_overrides, check_ranges, dump_yaml, preset, settings_from_dict)
from firm.features import zoom_size
from firm.losses import AUTHORS_MODE
from firm.rundir import read_run_settings, write_run_settings


def _changed() -> Settings:
    """Settings with a non-default value of every kind: str, int, float, bool, optional, list, tuple."""
    return apply_overrides(preset("cpu"), {
        "dataset": "fashionmnist", "normal_class": "all", "train_images": None, "ood": ["mnist", "/data/noise"],
        "width": 8, "head_out": 32, "weights": "/w/resnet.safetensors", "tau": 0.35, "amp": True, "channels_last": False,
        "shifts": ["rotation", "cutpaste"], "id_share": 0.25, "crop_scale": (0.3, 0.9), "jitter": (0.1, 0.2, 0.3, 0.05),
        "final_tta": ["none", "angled"], "center_crop": 32 / 36, "ensemble_crop_scale": (0.5, 1.0),
        "contamination": 0.02})


@pytest.mark.parametrize("settings", [Settings(), _changed(), *PRESETS.values()], ids=["defaults", "changed", *PRESETS])
def test_yaml_round_trip(settings):
    loaded = settings_from_dict(yaml.safe_load(dump_yaml(settings)))
    assert loaded == settings
    assert isinstance(loaded.train.crop_scale, tuple) and isinstance(loaded.data.ood, list)


@pytest.mark.parametrize("settings", [Settings(), _changed()], ids=["defaults", "changed"])
def test_run_json_round_trip(settings, tmp_path):
    write_run_settings(tmp_path, settings, {"normal_dir": ["/images"]})
    loaded, extra = read_run_settings(tmp_path)
    assert loaded == settings and extra == {"normal_dir": ["/images"]}


@pytest.mark.parametrize("text", [
    "model:\n  width: 8\n  head_out: 32\ntrain:\n  epochs: 3\n  shifts: [rotation, hflip]\n",
    "width: 8\nhead_out: 32\nepochs: 3\nshifts: rotation,hflip\n",
    "model: {width: 8}\nhead_out: 32\ntrain: {epochs: 3}\nshifts: [rotation, hflip]\n",
], ids=["nested", "flat", "mixed"])
def test_cli_config_file_flat_nested_and_mixed(text, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    _, settings = cli._parse(cli.build_parser(), ["train", "--config", str(path)])
    # the preset is the base: only the file's values change
    assert settings == apply_overrides(preset("cpu"), {"width": 8, "head_out": 32, "epochs": 3,
                                                       "shifts": ["rotation", "hflip"]})


def test_unknown_keys_and_bad_values_are_named():
    with pytest.raises(SettingsError, match="widht"):
        settings_from_dict({"model": {"widht": 8}})
    with pytest.raises(SettingsError, match="trian"):
        settings_from_dict({"trian": {"epochs": 3}})
    with pytest.raises(SettingsError, match="no_such_setting"):
        apply_overrides(Settings(), {"no_such_setting": 1})
    for name, value in (("epochs", "three"), ("amp", "maybe")):
        with pytest.raises(SettingsError, match=name):
            apply_overrides(Settings(), {name: value})


@pytest.mark.parametrize("name, value, message", [
    ("image_size", 1, ">= 2"), ("batch_size", 1, ">= 2"), ("warmup", 1.0, r"in \(0, 1\)"),
    ("ocsvm_nu", 0.0, r"in \(0, 1\]"), ("holdout", 1.0, r"in \[0, 1\)"), ("crop_scale", (0.9, 0.2), "low <= high"),
    ("in_channels", 2, "1 \\(grey\\) or 3"), ("frozen_stages", 5, r"in \[0, 4\]"), ("contamination", 0.0, r"in \(0, 1\)"),
])
def test_ranges_name_the_setting_and_its_range(name, value, message):
    check_ranges(Settings())
    with pytest.raises(SettingsError, match=f"{name}.*{message}"):
        check_ranges(apply_overrides(Settings(), {name: value}))


def test_every_preset_is_in_range():
    for settings in PRESETS.values():
        check_ranges(settings)


def test_every_field_name_is_unique_across_groups():
    names = [f.name for cls in GROUPS.values() for f in fields(cls)]
    assert len(names) == len(set(names))
    assert set(GROUPS) == {f.name for f in fields(Settings)}
    assert list(GROUPS.values()) == [DataConfig, ModelConfig, TrainConfig, EvalConfig, DetectorConfig]


def test_paper_preset_is_the_dataclass_defaults():
    assert preset("paper") == Settings()
    s = Settings()  # the authors' reference values (docs/method.md)
    assert (s.model.width, s.model.head_hidden, s.model.head_layers, s.model.head_out) == (64, 1024, 7, 128)
    assert (s.train.epochs, s.train.batch_size, s.train.lr, s.train.tau) == (2000, 32, 0.01, 0.2)
    # presets are copies: changing one never changes the registry
    p = preset("cpu")
    p.model.width = 999
    assert PRESETS["cpu"].model.width == 16
    with pytest.raises(SettingsError, match="unknown preset"):
        preset("fast")


def test_paper_trains_in_float32_with_the_authors_optimiser_and_layouts():
    t = preset("paper").train
    assert (t.amp, t.lr, t.momentum, t.weight_decay, t.batch_size, t.epochs, t.tau) == (False, 0.01, 0.9, 3e-4, 32, 2000, 0.2)
    assert t.loss_mode == AUTHORS_MODE  # each loss in its authors' layout (test_losses.py pins which)


def test_eval_config_holds_the_authors_values_and_the_cpu_preset_the_old_ones():
    paper = EvalConfig()
    assert paper.center_crop == pytest.approx(32 / 36) and zoom_size(32, paper.center_crop) == 36
    assert paper.ensemble_crops == 10 and tuple(paper.ensemble_crop_scale) == (0.55, 1.0)
    assert paper.ensemble_shared_crops is True and paper.ocsvm_nu == 0.5
    assert preset("paper").eval == paper
    cpu = preset("cpu").eval
    assert cpu.center_crop == 1.0 and tuple(cpu.ensemble_crop_scale) == (0.5, 1.0)
    assert cpu.ensemble_shared_crops is False and cpu.ocsvm_nu == 0.1 and cpu.ensemble_crops == 10


def test_cli_config_file_with_nested_sections(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setitem(cli.COMMANDS, "train", lambda args, settings: seen.update(args=args, settings=settings))
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"preset": "demo", "out": str(tmp_path / "out"),
                                    "data": {"normal_class": "3"}, "model": {"width": 8, "head_layers": 1},
                                    "train": {"epochs": 4, "shifts": ["rotation", "hflip"]},
                                    "eval": {"scorer": "cos5"}, "tau": 0.5}))
    assert cli.main(["train", "--config", str(path), "--epochs", "2"]) == 0
    s = seen["settings"]
    expected = apply_overrides(preset("demo"), {"normal_class": "3", "width": 8, "head_layers": 1, "epochs": 2,
                                                "shifts": ["rotation", "hflip"], "scorer": "cos5", "tau": 0.5})
    assert s == expected  # the preset from the file, its sections, and the flag over the file's epochs
    assert seen["args"].out == str(tmp_path / "out") and seen["args"].preset == "demo"


@pytest.mark.parametrize("text, message", [
    ("model:\n  widht: 8\n", "widht"),
    ("eval:\n  scorer: cos3\n", "cos3"),
    ("dataset: imagenet\n", "imagenet"),
    ("detector:\n  holdout: 0.2\n", "holdout"),  # firm train has no detector settings
    ("outt: somewhere\n", "outt"),
])
def test_cli_config_file_errors_at_parse_time(tmp_path, monkeypatch, capsys, text, message):
    monkeypatch.setitem(cli.COMMANDS, "train", lambda *a: pytest.fail("the command ran"))
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--config", str(path), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_dataset_names_from_the_config_file_are_canonical(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setitem(cli.COMMANDS, "train", lambda args, settings: seen.update(settings=settings))
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  dataset: Fashion-MNIST\n")
    assert cli.main(["train", "--config", str(path), "--out", str(tmp_path / "out")]) == 0
    assert seen["settings"].data.dataset == "fashionmnist"


def test_none_on_the_command_line_overrides_the_preset(monkeypatch):
    seen = {}
    monkeypatch.setitem(cli.COMMANDS, "train", lambda args, settings: seen.update(settings=settings))
    assert PRESETS["cpu"].data.train_images == 2000
    assert cli.main(["train", "--out", "x", "--train-images", "none"]) == 0
    assert seen["settings"].data.train_images is None


def test_settings_are_plain_dataclasses():
    s = Settings()
    assert dataclasses.is_dataclass(s) and s.copy() == s and s.copy() is not s
    assert s.copy().train.shifts is not s.train.shifts  # deep copies: no shared lists
