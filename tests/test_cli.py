"""The ``firm`` command line (cli.py): names checked at parse time, resume, output checks,
interrupts, warnings, progress bars and help, on tiny models and scikit-learn's digits written as
image files (no dataset files needed)."""
import contextlib
import csv
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from firm import cli, runner
from firm.cli import main
from firm.config import apply_overrides, preset
from firm.data import find_images, load_dataset, load_image_folder
from firm.detector import FIRMDetector
from firm.rundir import write_run_settings
from firm.serialization import load_tensors



SMALL = ["--width", "4", "--head-hidden", "16", "--head-layers", "1", "--batch-size", "16", "--device", "cpu", "--quiet"]
FIT = [*SMALL, "--epochs", "1", "--method", "firm"]  # these tests train: the firm path
TRAIN = [*SMALL, "--epochs", "1", "--dataset", "digits", "--train-images", "30", "--eval-every", "0"]


def _write_pngs(folder: Path, images: torch.Tensor, prefix: str = "i") -> Path:
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img[0].numpy()).save(folder / f"{prefix}{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Digit 3 as normal images (train and test) and digit 7 as anomalies, as 8 x 8 PNG files."""
    root = tmp_path_factory.mktemp("digits")
    train, test = load_dataset("digits", size=8, channels=1)
    _write_pngs(root / "normal", train.images[train.labels == 3][:50])
    _write_pngs(root / "test_normal", test.images[test.labels == 3][:20])
    _write_pngs(root / "anomalies", test.images[test.labels == 7][:20])
    return root


@pytest.fixture(scope="module")
def fitted(folders):
    """A tiny detector fitted by ``firm fit``, and what the command printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["fit", "--normal-dir", str(folders / "normal"), "--out", str(folders / "model"), *FIT]) == 0
    return folders / "model", out.getvalue()


def _copy(model: Path, tmp_path: Path) -> Path:
    shutil.copytree(model, tmp_path / "model")
    return tmp_path / "model"


def _never(*args, **kwargs):
    raise AssertionError("training started although the command should have been refused first")


# --------------------------------------------------------------- names are checked when parsed
@pytest.mark.parametrize("flag, value", [("--scorer", "cos3"), ("--loss", "simclr"), ("--tta", "flip"),
                                         ("--shifts", "rotation,rot"), ("--backbone", "vgg16"),
                                         ("--dataset", "imagenet"), ("--loss-mode", "diagonal"),
                                         ("--split", "train"), ("--normal-class", "10")])
def test_unknown_names_are_refused_at_parse_time(tmp_path, monkeypatch, capsys, flag, value):
    monkeypatch.setattr(runner, "run", _never)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--out", str(tmp_path / "run"), *TRAIN, flag, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert value.split(",")[-1] in err and flag in err
    assert not (tmp_path / "run").exists()  # nothing written, so no --resume can ever read the bad value


def test_resume_never_rereads_a_bad_value(tmp_path, monkeypatch, capsys, folders):
    monkeypatch.setattr(runner, "train_encoder", _never)
    monkeypatch.setattr(FIRMDetector, "fit", _never)
    # a run refused at parse time left nothing to resume
    with pytest.raises(SystemExit):
        main(["train", "--out", str(tmp_path / "run"), *TRAIN, "--scorer", "cos3"])
    assert main(["train", "--resume", str(tmp_path / "run")]) == 1
    assert "no such run folder" in capsys.readouterr().err
    # a run.json edited by hand is checked before anything is trained
    bad = apply_overrides(preset("cpu"), {"dataset": "digits"})
    bad.eval.scorer = "cos3"
    write_run_settings(tmp_path / "edited", bad)
    assert main(["train", "--resume", str(tmp_path / "edited")]) == 1
    assert "cos3" in capsys.readouterr().err
    write_run_settings(tmp_path / "fit", bad, {"normal_dir": [str(folders / "normal")], "outlier_dir": None})
    assert main(["fit", "--resume", str(tmp_path / "fit")]) == 1
    assert "cos3" in capsys.readouterr().err


# --------------------------------------------------------------- fit honours every settings flag
def test_fit_honours_model_and_train_flags(tmp_path, monkeypatch, folders):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module, **kw: compiled.append(module) or module)
    model = tmp_path / "model"
    assert main(["fit", "--normal-dir", str(folders / "normal"), "--out", str(model), *FIT, "--head-out", "16",
                 "--tau", "0.5", "--amp", "on", "--channels-last", "off", "--compile", "on"]) == 0
    det = FIRMDetector.load(model)
    s = det.settings_
    assert s.model.head_out == 16 and s.train.tau == 0.5
    assert (s.train.amp, s.train.channels_last, s.train.compile) == (True, False, True)
    assert len(compiled) == 1  # the encoder really went through torch.compile
    assert det.encoder_(torch.rand(2, 3, 32, 32)).shape == (2, 16)  # the head really projects to 16 dimensions


# --------------------------------------------------------------- bench dataset names
@pytest.mark.parametrize("given, registry", [("Digits", "digits"), ("fashion-mnist", "fashionmnist"),
                                             ("CIFAR_10", "cifar10")])
def test_bench_dataset_names_resolve_to_the_registry(tmp_path, capsys, given, registry):
    assert main(["bench", "--dataset", given, "--classes", "1,2", "--losses", "firm", "--dry-run",
                 "--out", str(tmp_path / "bench")]) == 0
    out = capsys.readouterr().out
    assert f"dataset: {registry}" in out
    assert re.search(r"# 2 runs in this shard: " + f"{registry}-c1-firm-\\S+ {registry}-c2-firm-", out)
    assert not (tmp_path / "bench").exists()


def test_bench_unknown_dataset_fails_at_parse_time(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--dataset", "imagenet", "--dry-run", "--out", str(tmp_path / "bench")])
    assert exit_info.value.code == 2 and "imagenet" in capsys.readouterr().err


# --------------------------------------------------------------- evaluate a multi-class run
def test_evaluate_multiclass_run_needs_ood(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--normal-class", "all", "--out", str(run), *TRAIN, "--train-images", "60"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(run), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "--ood" in err and "every class" in err and "Traceback" not in err and "AUROC" not in err
    assert not (run / "results.json").exists()
    noise = tmp_path / "noise"
    noise.mkdir()
    rng = np.random.default_rng(0)
    from PIL import Image
    for i in range(15):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(noise / f"{i}.png")
    assert main(["evaluate", str(run), "--ood", str(noise), "--scorers", "cos1", "--final-tta", "none", "--quiet"]) == 0
    records = json.loads((run / "results.json").read_text())
    assert [(r["eval_set"], r["scorer"]) for r in records] == [("ood:noise", "cos1")]
    assert records[0]["auroc"] > 0.9  # noise against digits


def test_a_fitted_detector_is_evaluated_on_folders_only(tmp_path, capsys, fitted, folders):
    """A detector fitted on image files records so (it once claimed the preset's CIFAR-10 class 0)."""
    model = _copy(fitted[0], tmp_path)
    det = FIRMDetector.load(model)
    assert det.settings_.data.dataset == f"folder:{folders / 'normal'}"
    assert main(["evaluate", "--model", str(model), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "not trained on a dataset" in err and "--normal-dir" in err and not (model / "results.json").exists()
    det.fit(folders / "test_normal")  # a loaded detector can be fitted again
    assert det.settings_.data.dataset == f"folder:{folders / 'test_normal'}"


# --------------------------------------------------------------- resume keeps the settings
@pytest.mark.parametrize("command", ["train", "fit"])
def test_resume_refuses_a_changed_setting(tmp_path, monkeypatch, capsys, command, folders):
    monkeypatch.setattr(runner, "run", _never)
    monkeypatch.setattr(FIRMDetector, "fit", _never)
    settings = apply_overrides(preset("cpu" if command == "train" else "detector"), {"epochs": 3})
    write_run_settings(tmp_path / "run", settings, {"normal_dir": [str(folders / "normal")]})
    assert main([command, "--resume", str(tmp_path / "run"), "--epochs", "9999", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "--epochs 9999" in err and "the run has 3" in err
    # a flag equal to the saved value changes nothing and is accepted
    monkeypatch.setattr(runner, "run", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    monkeypatch.setattr(FIRMDetector, "fit", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main([command, "--resume", str(tmp_path / "run"), "--epochs", "3", "--quiet"]) == 130


# --------------------------------------------------------------- the report and firm score's CSV
def test_report_ignores_the_ranking_of_firm_score(tmp_path, fitted, folders):
    model = _copy(fitted[0], tmp_path)
    assert main(["score", "--model", str(model), str(folders / "test_normal"), str(folders / "anomalies"),
                 "--out", str(tmp_path / "ranked.csv"), "--quiet"]) == 0
    shutil.copy(tmp_path / "ranked.csv", model / "scores.csv")  # firm score itself refuses to write there
    with open(model / "scores.csv", newline="") as f:
        assert list(csv.DictReader(f))[0].keys() == {"rank", "path", "score", "flagged"}
    assert main(["report", str(model), "--quiet"]) == 0
    page = (model / "report" / "index.html").read_text()
    assert not (model / "report" / "roc_histogram.png").exists()  # no ROC: flagged is no ground truth
    assert "<td>AUROC" not in page and "(plotted)" not in page and "extremes.png" not in page
    assert "No scores.csv of firm evaluate" in page


# --------------------------------------------------------------- output folders
def _old_run(folder: Path) -> None:
    for name in ("run.json", "log.jsonl", "results.json", "scores.csv"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("old\n")
    for name in ("report/index.html", "onnx/encoder.onnx"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("old\n")


@pytest.mark.parametrize("command", ["train", "fit"])
def test_out_into_a_non_empty_folder(tmp_path, monkeypatch, capsys, command, folders):
    args = ["--normal-dir", str(folders / "normal"), *FIT] if command == "fit" else TRAIN
    out = tmp_path / "out"
    _old_run(out)
    (out / ".gitignore").write_text("*\n")  # hidden files are the user's: kept
    with monkeypatch.context() as m:
        m.setattr(runner, "run", _never)
        m.setattr(FIRMDetector, "fit", _never)
        assert main([command, "--out", str(out), *args]) == 1
        assert "not empty" in capsys.readouterr().err and (out / "results.json").read_text() == "old\n"
    assert main([command, "--out", str(out), *args, "--overwrite"]) == 0
    patches = ["patches.safetensors"] if command == "fit" else []  # the detector's patch bank for anomaly maps
    assert sorted(p.name for p in out.iterdir()) == sorted([".gitignore", "bank.safetensors", "checkpoint.safetensors",
                                                            "config.json", "log.jsonl", "model.safetensors", "run.json",
                                                            *patches])
    assert "old" not in (out / "log.jsonl").read_text()
    FIRMDetector.load(out)
    # --overwrite never deletes what firm did not write
    (out / "notes.txt").write_text("mine")
    with monkeypatch.context() as m:
        m.setattr(runner, "run", _never)
        m.setattr(FIRMDetector, "fit", _never)
        assert main([command, "--out", str(out), *args, "--overwrite"]) == 1
    assert "notes.txt" in capsys.readouterr().err and (out / "notes.txt").exists()


@pytest.mark.parametrize("command", ["train", "fit"])
def test_out_an_existing_file_fails_before_training(tmp_path, monkeypatch, capsys, command, folders):
    monkeypatch.setattr(runner, "run", _never)
    monkeypatch.setattr(FIRMDetector, "fit", _never)
    monkeypatch.setattr(runner, "train_encoder", _never)
    (tmp_path / "file").write_text("x")
    args = ["--normal-dir", str(folders / "normal"), *FIT] if command == "fit" else TRAIN
    assert main([command, "--out", str(tmp_path / "file"), *args]) == 1
    err = capsys.readouterr().err
    assert "is a file" in err and "Traceback" not in err
    assert (tmp_path / "file").read_text() == "x"


def test_score_out_a_folder_is_refused(tmp_path, capsys, fitted, folders):
    assert main(["score", "--model", str(fitted[0]), str(folders / "test_normal"), "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "is a folder" in err and "scores.csv" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------- symbolic links
def test_symlinked_folders_are_followed_and_loops_end(tmp_path, folders):
    data = tmp_path / "data"
    data.mkdir()
    (data / "digits").symlink_to(folders / "normal", target_is_directory=True)
    (data / "loop").symlink_to(data, target_is_directory=True)  # a link back to the folder being searched
    (data / "more").mkdir()
    (data / "more" / "same_digits").symlink_to(folders / "normal", target_is_directory=True)  # the same folder again
    found = find_images(data)
    assert sorted(p.name for p in found) == sorted(p.name for p in (folders / "normal").iterdir())  # each image once
    assert all(p.parent == data / "digits" for p in found)
    assert len(load_image_folder(data / "digits")) == len(load_image_folder([data])) == 50
    assert find_images(data / "more") == sorted((data / "more" / "same_digits").iterdir())


# --------------------------------------------------------------- working directory
def test_report_from_another_working_directory(tmp_path, monkeypatch, fitted, folders):
    work = tmp_path / "work"
    work.mkdir()
    for name in ("normal", "test_normal", "anomalies"):
        shutil.copytree(folders / name, work / name)
    monkeypatch.chdir(work)
    assert main(["fit", "--normal-dir", "normal", "--out", "model", *FIT]) == 0
    assert main(["evaluate", "--model", "model", "--normal-dir", "test_normal", "--anomaly-dir", "anomalies",
                 "--scorers", "cos1", "--final-tta", "none", "--quiet"]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["report", "../work/model", "--quiet"]) == 0
    report = work / "model" / "report"
    page = (report / "index.html").read_text()
    assert (report / "extremes.png").exists() and (report / "roc_histogram.png").exists()  # the images were found
    assert "could not be read" not in page and "no longer at the paths" not in page
    assert all(Path(p).is_absolute() for p in FIRMDetector.load("../work/model").train_paths_)


# --------------------------------------------------------------- image size
def test_image_size_zero_is_a_clear_error(tmp_path, capsys, monkeypatch, folders):
    monkeypatch.setattr(runner, "train_encoder", _never)
    with pytest.raises(SystemExit) as exit_info:  # refused as the command line is parsed
        main(["fit", "--normal-dir", str(folders / "normal"), "--out", str(tmp_path / "m"), *FIT, "--image-size", "0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "image_size" in err and "unreadable" not in err and "could be read" not in err
    assert not (tmp_path / "m").exists()
    with pytest.raises(ValueError, match="image_size"):
        FIRMDetector.from_preset("detector", image_size=0, progress=False).fit(folders / "normal")


# --------------------------------------------------------------- a killed fit resumes
@pytest.mark.slow
def test_killed_fit_resumes_to_the_same_weights(tmp_path, folders):
    args = ["--normal-dir", str(folders / "normal"), *SMALL, "--method", "firm", "--epochs", "6", "--checkpoint-every", "1"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "firm", "fit", *args, "--out", str(killed)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while time.time() < deadline and not (killed / "checkpoint.safetensors").exists() and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "config.json").exists(), "the fit finished before it could be killed"
    epoch = load_tensors(killed / "checkpoint.safetensors")[1]["epoch"]
    assert 1 <= epoch < 6
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the killed process: the same arithmetic, bit for bit
    try:
        assert main(["fit", "--resume", str(killed), "--quiet"]) == 0
        assert main(["fit", *args, "--out", str(tmp_path / "reference")]) == 0
    finally:
        torch.set_num_threads(threads)
    resumed, reference = FIRMDetector.load(killed), FIRMDetector.load(tmp_path / "reference")
    a, b = resumed.encoder_.state_dict(), reference.encoder_.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.threshold_ == reference.threshold_ and resumed.train_paths_ == reference.train_paths_
    assert [r["epoch"] for r in resumed.history_] == [1, 2, 3, 4, 5, 6]


# --------------------------------------------------------------- messages
@pytest.mark.parametrize("command, hint", [("fit", " (continue with --resume)"), ("score", "")])
def test_ctrl_c_returns_130_with_one_line(monkeypatch, capsys, command, hint, folders, tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(FIRMDetector, "fit", interrupted)
    monkeypatch.setitem(cli.COMMANDS, "score", interrupted)
    argv = (["fit", "--normal-dir", str(folders / "normal"), "--out", str(tmp_path / "m"), *FIT] if command == "fit"
            else ["score", "--model", "m", "x.png"])
    assert main(argv) == 130
    captured = capsys.readouterr()
    assert captured.err == f"firm {command}: interrupted{hint}\n" and captured.out == ""


def test_warnings_are_one_line_without_the_source(monkeypatch, capsys, tmp_path, folders):
    shutil.copytree(folders / "test_normal", tmp_path / "images")
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG not an image")
    monkeypatch.setitem(cli.COMMANDS, "score", lambda args: load_image_folder(tmp_path / "images"))
    def show(message, category, filename, lineno, file=None, line=None):  # print, as Python does outside pytest
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        monkeypatch.setattr(warnings, "showwarning", show)
        assert main(["score", "--model", "m", "x.png"]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("firm: warning: skipped 1 unreadable image file(s) of 21: ")
    assert "broken.png" in err and "warn(" not in err and "data.py" not in err
    assert warnings.formatwarning is not cli._warning_line  # restored after the command


def test_progress_bars_only_on_a_terminal(monkeypatch, capsys, folders, tmp_path):
    seen = []

    def record(self, *args, **kwargs):
        seen.append(self.progress)
        raise KeyboardInterrupt
    monkeypatch.setattr(FIRMDetector, "fit", record)
    argv = ["fit", "--normal-dir", str(folders / "normal"), "--epochs", "1"]  # without --quiet
    assert main([*argv, "--out", str(tmp_path / "a")]) == 130  # stderr captured: not a terminal
    assert capsys.readouterr().err == "firm fit: interrupted (continue with --resume)\n"
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main([*argv, "--out", str(tmp_path / "b")]) == 130
    # after a progress bar, the message starts on a line of its own
    assert capsys.readouterr().err == "\nfirm fit: interrupted (continue with --resume)\n"
    assert main([*argv, "--out", str(tmp_path / "c"), "--quiet"]) == 130
    assert seen == [False, True, False]


def test_fit_prints_a_short_threshold(fitted):
    model, printed = fitted
    match = re.search(r"threshold (\S+), written to", printed)
    assert match, printed
    mantissa = match.group(1).lstrip("-").split("e")[0]
    assert len(mantissa.replace(".", "").lstrip("0")) <= 4
    assert float(match.group(1)) == pytest.approx(FIRMDetector.load(model).threshold_, rel=1e-3)


# --------------------------------------------------------------- defaults and help
def test_train_defaults_to_the_cpu_preset(monkeypatch):
    seen = {}
    monkeypatch.setitem(cli.COMMANDS, "train", lambda args, settings: seen.update(settings=settings, args=args))
    assert main(["train", "--out", "x"]) == 0
    s = seen["settings"]
    assert seen["args"].preset == "cpu" and s == preset("cpu")
    assert (s.model.width, s.train.epochs, s.data.train_images) == (16, 10, 2000)


@pytest.mark.parametrize("command, flag, shown", [("train", "--width", "preset cpu: 16"),
                                                  ("bench", "--epochs", "preset cpu: 10"),
                                                  ("fit", "--epochs", "preset detector: 30"),
                                                  ("fit", "--target-fpr", "preset detector: 0.05"),
                                                  ("evaluate", "--final-tta", "default: none,angled"),
                                                  ("demo", "--epochs", "default: 8")])
def test_help_shows_the_defaults(capsys, command, flag, shown):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(flag + " "))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("-")), len(lines))
    entry = " ".join(" ".join(lines[start:end]).split())  # help lines wrap anywhere
    assert shown in entry, entry
    assert "default: None" not in " ".join(" ".join(lines).split())
