"""The paths a new user takes with bad input, one test per case: interrupted and failed runs,
16-bit images, too few images, outputs that exist or cannot be written, config values of the
wrong shape, a missing optional extra, and results a person can read. Each test writes its own
files in ``tmp_path``; the models are tiny and train for an epoch or two."""
import json
import os
import sys
import zlib
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from firm.cli import main
from firm.data import load_dataset
from firm.detector import FIRMDetector
from firm.serialization import load_tensors
from firm.training import Trainer

SMALL = ["--width", "4", "--head-hidden", "16", "--head-layers", "1", "--batch-size", "16", "--device", "cpu",
         "--quiet", "--patch-bank", "0"]
FIT = [*SMALL, "--method", "firm"]  # these tests train: the firm path


def _pngs(folder: Path, digit: int = 3, count: int = 40, split: str = "train", prefix: str = "") -> Path:
    """``count`` 8 x 8 grey PNG files of one digit of scikit-learn's digits."""
    from PIL import Image
    train, test = load_dataset("digits", size=8, channels=1)
    images = (train if split == "train" else test)
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images.images[images.labels == digit][:count]):
        Image.fromarray(img[0].numpy()).save(folder / f"{prefix}{i:03d}.png")
    return folder


def _fit(tmp_path: Path, *extra: str, normal: Path | None = None, out: str = "model") -> list[str]:
    normal = normal or _pngs(tmp_path / "normal")
    return ["fit", "--normal-dir", str(normal), "--out", str(tmp_path / out), *FIT, *extra]


def _interrupt_in_epoch(monkeypatch, epoch: float) -> None:
    """Raise KeyboardInterrupt, as Ctrl-C would, at the training step ``epoch`` epochs in (1.5: the
    middle of the second epoch; 0: the first step)."""
    calls = {"n": 0}
    original = Trainer.step

    def step_or_stop(self, index, variant):
        if calls["n"] == int(epoch * self.plan.steps_per_epoch()):
            raise KeyboardInterrupt
        calls["n"] += 1
        return original(self, index, variant)
    monkeypatch.setattr(Trainer, "step", step_or_stop)


def _weights(model: Path) -> dict:
    return FIRMDetector.load(model).encoder_.state_dict()


# --------------------------------------------------------------- interrupting never strands work
@pytest.mark.slow
def test_ctrl_c_before_the_first_checkpoint_resumes_to_the_same_weights(tmp_path, monkeypatch, capsys):
    argv = _fit(tmp_path, "--epochs", "4", "--checkpoint-every", "0")
    _interrupt_in_epoch(monkeypatch, 2.5)
    assert main(argv) == 130
    assert load_tensors(tmp_path / "model" / "checkpoint.safetensors")[1]["epoch"] == 2  # the last finished epoch
    assert "continue with --resume" in capsys.readouterr().err
    monkeypatch.undo()
    assert main(["fit", "--resume", str(tmp_path / "model"), "--quiet"]) == 0
    log = [json.loads(line) for line in (tmp_path / "model" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3, 4]
    assert main(argv[:4] + [str(tmp_path / "reference")] + argv[5:]) == 0
    a, b = _weights(tmp_path / "model"), _weights(tmp_path / "reference")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_in_firm_train_before_the_first_checkpoint_resumes(tmp_path, monkeypatch):
    argv = ["train", "--dataset", "digits", "--normal-class", "3", "--train-images", "40", "--epochs", "3",
            "--eval-every", "0", *SMALL[:-2]]  # the cpu preset checkpoints at the end only
    _interrupt_in_epoch(monkeypatch, 1.5)
    assert main([*argv, "--out", str(tmp_path / "run")]) == 130
    assert load_tensors(tmp_path / "run" / "checkpoint.safetensors")[1]["epoch"] == 1
    monkeypatch.undo()
    assert main(["train", "--resume", str(tmp_path / "run"), "--quiet"]) == 0
    assert main([*argv, "--out", str(tmp_path / "reference")]) == 0
    a, b = _weights(tmp_path / "run"), _weights(tmp_path / "reference")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_ctrl_c_in_the_first_epoch_resumes_from_the_start(tmp_path, monkeypatch):
    argv = _fit(tmp_path, "--epochs", "2")
    _interrupt_in_epoch(monkeypatch, 0.5)
    assert main(argv) == 130
    assert not (tmp_path / "model" / "checkpoint.safetensors").exists()
    monkeypatch.undo()
    assert main(["fit", "--resume", str(tmp_path / "model"), "--quiet"]) == 0
    assert (tmp_path / "model" / "config.json").exists()
    # a plain rerun is not refused either: the interrupted run had nothing worth keeping
    _interrupt_in_epoch(monkeypatch, 0)
    assert main(_fit(tmp_path, "--epochs", "2", out="other")) == 130
    monkeypatch.undo()
    assert main(_fit(tmp_path, "--epochs", "1", out="other")) == 0


@pytest.mark.parametrize("case", ["empty folder", "no readable image"])
def test_a_fit_failing_on_its_input_leaves_nothing_behind(tmp_path, capsys, case):
    normal = tmp_path / "normal"
    normal.mkdir()
    if case == "no readable image":
        (normal / "a.png").write_bytes(b"not a png")
    argv = _fit(tmp_path, "--epochs", "1", normal=normal)
    assert main(argv) == 1
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "model").exists()
    _pngs(normal)
    assert main(argv) == 0  # the same command, once the folder holds images


# --------------------------------------------------------------- images at their real depth
def _png16(path: Path, pixels: np.ndarray) -> Path:
    """A 16-bit grey (H, W) or RGB (H, W, 3) PNG, written by hand: Pillow writes no 16-bit colour."""
    h, w = pixels.shape[:2]
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", w, h, 16, 0 if pixels.ndim == 2 else 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))
    return path


def _tiff16(path: Path, pixels: np.ndarray) -> Path:
    """An uncompressed 16-bit grey or RGB TIFF (little-endian), written by hand."""
    h, w = pixels.shape[:2]
    c = 1 if pixels.ndim == 2 else pixels.shape[2]
    data = pixels.astype("<u2").tobytes()
    entries = [(256, 4, 1, w), (257, 4, 1, h), (258, 3, c, 8 if c == 1 else 0), (259, 3, 1, 1),
               (262, 3, 1, 1 if c == 1 else 2), (273, 4, 1, 0), (277, 3, 1, c), (278, 4, 1, h),
               (279, 4, 1, len(data)), (284, 3, 1, 1)]
    ifd_size = 2 + 12 * len(entries) + 4
    bits_at, data_at = 8 + ifd_size, 8 + ifd_size + 6
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        value = {258: 16 if c == 1 else bits_at, 273: data_at}.get(tag, value)
        ifd += struct.pack("<HHI", tag, kind, count) + (struct.pack("<HH", value, 0) if kind == 3
                                                         else struct.pack("<I", value))
    path.write_bytes(b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x00" * 4 + struct.pack("<3H", 16, 16, 16) + data)
    return path


@pytest.mark.parametrize("write", [_png16, _tiff16], ids=["png", "tiff"])
@pytest.mark.parametrize("colour", [False, True], ids=["grey", "colour"])
def test_16_bit_images_are_read_at_their_depth_and_scaled_by_their_range(tmp_path, write, colour):
    from firm.data import load_image_folder
    ramp = np.tile(np.linspace(1000, 63000, 64).round().astype(np.uint16), (16, 1))  # 0-63000 in the issue
    pixels = np.stack([ramp, ramp // 2 + 500, 64000 - ramp], -1) if colour else ramp
    path = write(tmp_path / f"gradient.{'png' if write is _png16 else 'tif'}", pixels)
    images = load_image_folder(path, size=(16, 64), channels=3 if colour else 1).images[0].numpy()
    row = images[0, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255  # the image's own range spans 0-255
    assert (np.diff(row) >= 0).all() and len(set(row.tolist())) == 64  # a gradient, not two values
    if colour:  # the channels keep their order and their share of the common range
        green, blue = images[1, 0].astype(int), images[2, 0].astype(int)
        assert (np.diff(green) >= 0).all() and (np.diff(blue) <= 0).all() and 120 < green[-1] < 135


def test_16_bit_noise_is_not_mostly_white(tmp_path):
    from firm.data import load_image_folder
    noise = np.random.default_rng(0).integers(0, 65536, (32, 32)).astype(np.uint16)
    images = load_image_folder(_png16(tmp_path / "noise.png", noise), size=32, channels=1).images
    assert 0.4 < float((images > 127).float().mean()) < 0.6


# --------------------------------------------------------------- outputs are checked before any work
@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A tiny fitted model and labelled test folders whose files share names (two ``000.png``)."""
    root = tmp_path_factory.mktemp("fitted")
    _pngs(root / "normal")
    _pngs(root / "test" / "good", split="test", count=12)
    _pngs(root / "test" / "seven", digit=7, split="test", count=6)
    _pngs(root / "test" / "nine", digit=9, split="test", count=6)
    assert main(["fit", "--normal-dir", str(root / "normal"), "--out", str(root / "model"), *FIT, "--epochs", "1"]) == 0
    return root


def _model(fitted: Path, tmp_path: Path) -> Path:
    import shutil
    return Path(shutil.copytree(fitted / "model", tmp_path / "model"))


def _never(*args, **kwargs):
    raise AssertionError("the command started its work although its output was refused")


def _evaluate(fitted: Path, model: Path, *extra: str) -> list[str]:
    return ["evaluate", "--model", str(model), "--normal-dir", str(fitted / "test" / "good"), "--anomaly-dir",
            str(fitted / "test" / "seven"), str(fitted / "test" / "nine"), "--scorers", "cos1",
            "--quiet", *extra]


def test_score_refuses_an_existing_file_without_overwrite(fitted, tmp_path, capsys, monkeypatch):
    model = _model(fitted, tmp_path)
    out = tmp_path / "ranked.csv"
    out.write_text("mine\n")
    argv = ["score", "--model", str(model), str(fitted / "test"), "--out", str(out), "--quiet"]
    with monkeypatch.context() as m:
        m.setattr("firm.detector.FIRMDetector.load", _never)
        assert main(argv) == 1
    assert "--overwrite" in capsys.readouterr().err and out.read_text() == "mine\n"
    assert main([*argv, "--overwrite"]) == 0
    assert out.read_text().startswith("rank,path,score,flagged")


def test_score_never_replaces_the_files_of_evaluate(fitted, tmp_path, capsys):
    model = _model(fitted, tmp_path)
    assert main(_evaluate(fitted, model)) == 0
    before = (model / "scores.csv").read_text()
    for extra in ([], ["--overwrite"]):
        assert main(["score", "--model", str(model), str(fitted / "test"), "--out", str(model / "scores.csv"),
                     "--quiet", *extra]) == 1
        assert "firm evaluate" in capsys.readouterr().err
    assert (model / "scores.csv").read_text() == before


@pytest.mark.parametrize("command", ["report", "export", "evaluate"])
def test_an_unrelated_non_empty_folder_is_refused(fitted, tmp_path, capsys, monkeypatch, command):
    model = _model(fitted, tmp_path)
    if command == "report":
        assert main(_evaluate(fitted, model)) == 0
    folder = tmp_path / "holiday photos"
    folder.mkdir()
    (folder / "beach.jpg").write_bytes(b"mine")
    argv = {"report": ["report", str(model)], "export": ["export", "--model", str(model)],
            "evaluate": _evaluate(fitted, model)}[command] + ["--out", str(folder)]
    for target in ("firm.report.build_report", "firm.export.export_onnx", "firm.inference.evaluate_model"):
        monkeypatch.setattr(target, _never)
    assert main(argv) == 1
    assert "did not write" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == ["beach.jpg"]


@pytest.mark.parametrize("command", ["report", "export", "evaluate"])
def test_an_earlier_output_is_replaced_only_with_overwrite(fitted, tmp_path, capsys, command):
    model = _model(fitted, tmp_path)
    if command == "report":
        assert main(_evaluate(fitted, model)) == 0
    argv = {"report": ["report", str(model), "--quiet"], "export": ["export", "--model", str(model)],
            "evaluate": _evaluate(fitted, model)}[command]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(argv) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0


def test_evaluate_on_a_read_only_model_folder_says_so_before_scoring(fitted, tmp_path, capsys, monkeypatch):
    model = _model(fitted, tmp_path)
    real_access = os.access
    # as root, a folder without write permission is still writable: refuse it the way a mount would
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == model and mode == os.W_OK
                        else real_access(p, mode, **kw))
    monkeypatch.setattr("firm.inference.evaluate_model", _never)
    assert main(_evaluate(fitted, model)) == 1
    err = capsys.readouterr().err
    assert "read-only" in err and "--out" in err and "Errno" not in err
    monkeypatch.undo()
    assert main(_evaluate(fitted, model, "--out", str(tmp_path / "results"))) == 0
    assert (tmp_path / "results" / "scores.csv").exists()


# --------------------------------------------------------------- values of the wrong shape
@pytest.mark.parametrize("yaml_text, named", [("normal_dir: good\n", "normal_dir"),
                                              ("out: [a, b]\n", "out"),
                                              ("overwrite: maybe\n", "overwrite"),
                                              ("epochs: [1, 2]\n", "epochs"),
                                              ("shifts: {rotation: 1}\n", "shifts"),
                                              ("train: {lr: [0.1]}\n", "lr")])
def test_yaml_values_of_the_wrong_shape_are_refused_by_name(tmp_path, capsys, monkeypatch, yaml_text, named):
    _pngs(tmp_path / "good")
    config = tmp_path / "fit.yaml"
    config.write_text(yaml_text)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(FIRMDetector, "fit", _never)
    argv = ["fit", "--config", str(config), "--quiet"] + ([] if "normal_dir" in yaml_text else ["--normal-dir", "good"])
    argv += [] if "out:" in yaml_text else ["--out", "model"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err
    assert not (tmp_path / "g").exists() and not (tmp_path / "model").exists()


def test_a_yaml_list_of_folders_is_accepted(tmp_path, monkeypatch):
    _pngs(tmp_path / "good")
    (tmp_path / "fit.yaml").write_text("normal_dir: [good]\nout: model\nepochs: 1\n")
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", "fit.yaml", *FIT]) == 0


@pytest.mark.parametrize("entry, value", [("threshold", "high"), ("holdout_scores", "none"),
                                          ("settings.eval.scorer", "cos3"), ("settings.model.width", "wide")])
@pytest.mark.parametrize("command", ["score", "evaluate", "report", "export"])
def test_a_bad_value_in_config_json_is_a_clean_error_in_every_command(fitted, tmp_path, capsys, entry, value, command):
    model = _model(fitted, tmp_path)
    config = json.loads((model / "config.json").read_text())
    where = config if entry.startswith("settings") else config["state"]
    *parents, leaf = entry.split(".")
    for key in parents:
        where = where[key]
    where[leaf] = value
    (model / "config.json").write_text(json.dumps(config))
    argv = {"score": ["score", "--model", str(model), str(fitted / "test"), "--out", str(tmp_path / "s.csv")],
            "evaluate": _evaluate(fitted, model), "report": ["report", str(model)],
            "export": ["export", "--model", str(model)]}[command]
    assert main([*argv, "--quiet"] if command != "evaluate" else argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"firm {command}: error: ") and err.count("\n") == 1 and leaf in err, err


# --------------------------------------------------------------- optional parts fail cleanly
def test_export_without_the_onnx_extra_names_it_and_leaves_nothing(fitted, tmp_path, capsys, monkeypatch):
    model = _model(fitted, tmp_path)
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert main(["export", "--model", str(model), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert '.[onnx]' in err and "onnxruntime" in err and err.count("\n") == 1
    assert not (model / "onnx").exists()


# --------------------------------------------------------------- results a person can read
def test_the_report_names_images_by_folder_and_file_and_the_folders_evaluated(fitted, tmp_path):
    from firm.report import short_names
    model = _model(fitted, tmp_path)
    assert main(_evaluate(fitted, model)) == 0
    assert main(["report", str(model), "--quiet"]) == 0
    page = (model / "report" / "index.html").read_text()
    assert "evaluated on" in page
    summary = page[page.index("evaluated on"):][:300]
    assert "normal good (12 images)" in summary and "anomalous nine, seven (12 images)" in summary
    paths = ["/data/a/test/seven/000.png", "/data/a/test/nine/000.png", "/data/b/test/nine/000.png"]
    assert short_names(paths) == ["a/test/seven/000.png", "a/test/nine/000.png", "b/test/nine/000.png"]
    assert short_names(paths[:2]) == ["seven/000.png", "nine/000.png"]


# --------------------------------------------------------------- the README's two commands
def test_the_readme_test_command_has_its_own_fresh_environment_and_ci_runs_exactly_it():
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    section = readme[readme.index("## The two commands"):]
    demo, tests = [block.strip() for block in section.split("```bash")[1:3]]
    demo, tests = demo.split("```")[0].strip(), tests.split("```")[0].strip()
    assert ". .venv/bin/activate" in demo and "firm demo" in demo
    assert tests.startswith("python3 -m venv --clear .venv-test && . .venv-test/bin/activate") and ".venv/" not in tests
    ci = [line for line in (root / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == tests


def test_demo_says_when_it_reused_finished_runs(tmp_path, monkeypatch, capsys):
    import firm.bench

    def finished(specs, settings, out, preset, progress, log, jobs=1):
        for spec in specs[:3]:
            log(f"skip {spec.key} (done)")
        return [{"loss": s.loss, "normal_class": s.normal_class, "total_seconds": 1.0,
                 "records": [{"final": True, "scorer": "cos1", "tta": "none", "auroc": 0.9}]} for s in specs]
    monkeypatch.setattr(firm.bench, "run_grid", finished)
    assert main(["demo", "--out", str(tmp_path / "demo"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "reused 3 of 20 runs finished earlier" in out


@pytest.mark.parametrize("argv", [["--help"], ["--version"], []])
def test_firm_help_answers_without_importing_torch(argv):
    import subprocess
    code = ("import sys\nfrom firm.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, file=sys.stderr)" % (argv,))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stderr.strip().splitlines()[-1] == "False", done.stderr
    assert "firm" in done.stdout


# --------------------------------------------------------------- too few normal images
def test_one_normal_image_is_refused_naming_the_minimum(tmp_path, capsys):
    normal = _pngs(tmp_path / "normal", count=1)
    assert main(_fit(tmp_path, "--epochs", "1", normal=normal)) == 1
    err = capsys.readouterr().err
    assert "only 1 normal image" in err and "at least 10" in err
    assert not (tmp_path / "model").exists()


def test_few_normal_images_warn_that_the_threshold_is_coarse(tmp_path):
    normal = _pngs(tmp_path / "normal", count=12)
    with pytest.warns(UserWarning, match=r"1 held-out normal image.*below 20, that is below 200 normal images"):
        assert main(_fit(tmp_path, "--epochs", "1", normal=normal)) == 0


def test_evaluate_shows_a_library_warning_once(tmp_path):
    import subprocess
    from firm.config import apply_overrides, preset
    from firm.models import Encoder
    settings = apply_overrides(preset("detector"), {"width": 4, "head_hidden": 16, "head_layers": 1})
    one = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, 3, 32, 32), dtype=np.uint8))
    FIRMDetector.from_encoder(Encoder(settings.model), one, settings, progress=False).save(tmp_path / "model")
    good, bad = _pngs(tmp_path / "good", count=5, split="test"), _pngs(tmp_path / "bad", digit=7, count=5, split="test")
    done = subprocess.run([sys.executable, "-m", "firm", "evaluate", "--model", str(tmp_path / "model"), "--normal-dir",
                           str(good), "--anomaly-dir", str(bad), "--quiet"], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "warning" in line]
    assert lines and len(lines) == len(set(lines)), done.stderr


# --------------------------------------------------------------- --help for a folder user
def _help(capsys, command: str) -> str:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    return capsys.readouterr().out


def _sections(text: str) -> dict[str, list[str]]:
    """The option names under each heading of a --help text."""
    sections, current = {}, None
    for line in text.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            current = sections.setdefault(line[:-1], [])
        elif current is not None and line.startswith("  ") and line[2:3] not in (" ", ""):
            current.append(line.split()[0].rstrip(","))
    return sections


@pytest.mark.parametrize("command, required", [("fit", ["--normal-dir", "--out"]), ("score", ["--model", "inputs"]),
                                               ("evaluate", ["--model", "--normal-dir", "--anomaly-dir"])])
def test_help_puts_what_a_folder_user_needs_first(capsys, command, required):
    text = _help(capsys, command)
    sections = _sections(text)
    names = list(sections)
    assert names[0].startswith("required") and names[1] == "options", names
    assert sections[names[0]][:len(required)] == required
    assert all(name.startswith("advanced") for name in names[2:]) and len(sections["options"]) <= 11
    usage = text.split("\n\n")[0]
    assert all(flag in usage and f"[{flag}" not in usage for flag in required if flag.startswith("--"))


def test_fit_help_shows_the_defaults_the_fit_really_uses(capsys):
    entries = " ".join(_help(capsys, "fit").split())
    image_size = entries[entries.index("--image-size INT"):][:400]
    assert "32 px" in image_size and "128" in image_size and "always used" in image_size
    nu = entries[entries.index("--ocsvm-nu FLOAT"):][:200]
    assert "preset detector: 0.1" in nu and "is 0.5" in nu


def test_speed_refuses_to_replace_its_earlier_figures_without_overwrite(tmp_path, capsys, monkeypatch):
    import firm.speed
    (tmp_path / "speed.json").write_text("{}")
    monkeypatch.setattr(firm.speed, "run_speed", _never)
    assert main(["speed", "--out", str(tmp_path), "--quiet"]) == 1
    assert "--overwrite" in capsys.readouterr().err and (tmp_path / "speed.json").read_text() == "{}"


def test_the_report_labels_map_overlays_of_images_scored_by_a_relative_path():
    from firm.report import _label_of
    labels = {"/data/test/seven/000.png": 1, "/data/test/good/000.png": 0}
    assert _label_of("test/seven/000.png", labels) == 1 and _label_of("good/000.png", labels) == 0
    assert _label_of("000.png", labels) is None  # two images of that name: no label rather than a guess
