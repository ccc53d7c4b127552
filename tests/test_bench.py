"""firm bench: report arithmetic on hand-made curves, resume, shards."""
import json
import math

import pytest
import torch

from firm import bench
from firm.bench import plan_grid, run_grid, spec_settings
from firm.bench_stats import final_aurocs, learning_curves
from firm.config import Settings, apply_overrides, preset




def curve_records(dataset, cls, loss, seed, epochs, values):
    recs = [dict(dataset=dataset, eval_set="test", normal_class=cls, loss=loss, seed=seed, scorer="cos1", tta="none",
                 epoch=e, final=False, auroc=v) for e, v in zip(epochs, values)]
    recs.append({**recs[-1], "final": True})
    return recs


@pytest.fixture
def hand_made():
    # Class 0: NT-Xent reaches its final 0.8 only at epoch 8; FIRM reaches 0.8 at epoch 2.
    # Class 1: NT-Xent final 0.6 at epoch 8; FIRM reaches 0.6 at epoch 1 (interpolated).
    return (curve_records("toy", 0, "ntxent", 0, [0, 2, 4, 6, 8], [0.5, 0.6, 0.7, 0.75, 0.8])
            + curve_records("toy", 0, "firm", 0, [0, 2, 4, 6, 8], [0.5, 0.8, 0.9, 0.9, 0.9])
            + curve_records("toy", 1, "ntxent", 0, [0, 2, 4, 6, 8], [0.5, 0.52, 0.55, 0.58, 0.6])
            + curve_records("toy", 1, "firm", 0, [0, 2, 4, 6, 8], [0.5, 0.7, 0.7, 0.7, 0.7]))


def test_final_aurocs_and_learning_curves_of_hand_made_records(hand_made):
    final = final_aurocs(hand_made)
    assert final[("toy", "test", 0, "firm", 0)] == 0.9 and final[("toy", "test", 1, "ntxent", 0)] == 0.6
    curves = learning_curves(hand_made)
    assert curves[("toy", "test", 1, "firm", 0)] == ([0, 2, 4, 6, 8], [0.5, 0.7, 0.7, 0.7, 0.7])
    assert len(curves) == len(final) == 4


def tiny(**overrides) -> Settings:
    """The cpu preset with a tiny network: seconds per run on digits."""
    return apply_overrides(preset("cpu"), {"width": 4, "head_hidden": 16, "head_layers": 1, "epochs": 1,
                                           "batch_size": 16, "train_images": 24, "eval_every": 1, "device": "cpu",
                                           "scorers": ["cos1", "mahalanobis"], "final_tta": ["none"], **overrides})


@pytest.mark.slow
def test_interrupted_bench_completes_the_rest_without_redoing(tmp_path, monkeypatch):
    settings = tiny()
    specs = plan_grid(settings, ["digits"], ["1", "2"], ["firm", "ntxent"], [0])[:3]
    assert [s.key for s in specs] == ["digits-c1-firm-concat-e1-s0", "digits-c1-ntxent-concat-e1-s0",
                                      "digits-c2-firm-concat-e1-s0"]
    real_run, calls = bench.run, []

    def interrupted(cell_settings, *args, **kwargs):
        if len(calls) == 1:
            raise KeyboardInterrupt  # the machine goes away during the second run
        calls.append((cell_settings.data.normal_class, cell_settings.train.loss))
        return real_run(cell_settings, *args, **kwargs)

    monkeypatch.setattr(bench, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_grid(specs, settings, tmp_path, progress=False, log=lambda *_: None)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["digits-c1-firm-concat-e1-s0.json"]

    calls.clear()
    monkeypatch.setattr(bench, "run", lambda s, *a, **k: calls.append((s.data.normal_class, s.train.loss))
                        or real_run(s, *a, **k))
    results = run_grid(specs, settings, tmp_path, progress=False, log=lambda *_: None)
    assert calls == [("1", "ntxent"), ("2", "firm")]
    assert [r["run"] for r in results] == [s.key for s in specs]
    for result in results:
        finals = {r["scorer"]: r for r in result["records"] if r["final"]}
        assert set(finals) == {"cos1", "mahalanobis"}
        curve = [r for r in result["records"] if not r["final"]]
        assert [r["epoch"] for r in curve] == [0, 1]
        # the curve's last point and the final cos1 record score the same model on the same images
        assert finals["cos1"]["auroc"] == pytest.approx(curve[-1]["auroc"], abs=1e-9)
        # one digit against the other nine: far above chance even for a width-4 network after one epoch
        assert finals["cos1"]["auroc"] > 0.7, result["run"]

    with pytest.raises(ValueError, match="other settings"):
        run_grid(specs[:1], tiny(lr=0.05), tmp_path, progress=False, log=lambda *_: None)

    # a run stored before a setting existed used that setting's default: still the same run
    stored = tmp_path / "runs" / f"{specs[0].key}.json"
    record = json.loads(stored.read_text())
    del record["settings"]["detector"]["large_image_size"]
    stored.write_text(json.dumps(record))
    calls.clear()
    assert len(run_grid(specs, settings, tmp_path, progress=False, log=lambda *_: None)) == len(specs) and calls == []

    # a record whose data lay elsewhere (as committed, data root DATA) or that checkpointed is the same cell
    record["settings"]["data"]["data_root"] = "DATA"
    record["settings"]["train"]["checkpoint_every"] = 5
    stored.write_text(json.dumps(record))
    assert len(run_grid(specs, settings, tmp_path, progress=False, log=lambda *_: None)) == len(specs) and calls == []


def test_one_job_runs_with_the_threads_given_and_gives_them_back(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(bench, "_run_cell", lambda *a, **k: seen.append(torch.get_num_threads()) or {"run": "x"})
    monkeypatch.setattr(bench, "_summary", lambda result: "")
    specs = plan_grid(tiny(), ["digits"], ["1"], ["firm", "ntxent"], [0])
    before = torch.get_num_threads()
    run_grid(specs, tiny(), tmp_path, jobs=1, threads=before + 1, progress=False, log=lambda *_: None)
    assert seen == [before + 1] * 2 and torch.get_num_threads() == before


def test_shards_partition_the_grid():
    base = preset("cpu")
    full = plan_grid(base, ["cifar10"], None, ["firm", "ntxent"], [0, 1])
    shards = [plan_grid(base, ["cifar10"], None, ["firm", "ntxent"], [0, 1], shard=(i, 3)) for i in range(3)]
    assert len(full) == 40 and len({s.key for s in full}) == 40
    assert sorted(s.key for part in shards for s in part) == sorted(s.key for s in full)
    assert [len(part) for part in shards] == [14, 13, 13]
    with pytest.raises(ValueError, match="shard"):
        plan_grid(base, ["cifar10"], None, ["firm"], [0], shard=(3, 3))
    ladder = plan_grid(base, ["Fashion-MNIST"], ["3"], ["firm"], [0], budgets=[5, 10])
    assert [s.key for s in ladder] == ["fashionmnist-c3-firm-concat-e5-s0", "fashionmnist-c3-firm-concat-e10-s0"]
    assert spec_settings(base, ladder[1]).train.epochs == 10 and spec_settings(base, ladder[1]).data.normal_class == "3"
    with pytest.raises(ValueError, match="unknown dataset"):
        plan_grid(base, ["imagenet"], ["0"], ["firm"], [0])
    with pytest.raises(ValueError, match="unknown loss"):
        plan_grid(base, ["cifar10"], ["0"], ["simclr"], [0])


def test_same_data_order_for_every_loss():
    """Losses share the seed-derived batch plan and augmentation stream: only the loss differs."""

    from firm.models import Encoder
    from firm.training import Trainer
    images = torch.randint(0, 255, (30, 3, 32, 32), dtype=torch.uint8)
    base = tiny(seed=3)
    batches = []
    for spec in plan_grid(base, ["digits"], ["0"], ["firm", "ntxent"], [3]):
        s = spec_settings(base, spec)
        trainer = Trainer(Encoder(s.model), s.train, images, progress=False)
        index, variant = trainer.plan.epoch(0)
        trainer.seed_epoch(0)
        batches.append(trainer.make_batch(index[0], variant[0])[0])
    assert torch.equal(batches[0], batches[1])
    assert not math.isnan(float(batches[0].sum()))


def test_multiclass_id_setting_scores_each_ood_set(tmp_path):
    from PIL import Image
    ood = tmp_path / "noise"
    ood.mkdir()
    rng = __import__("numpy").random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype="uint8")).save(ood / f"{i}.png")
    settings = tiny(train_images=60, ood=[str(ood)])
    specs = plan_grid(settings, ["digits"], ["all"], ["firm"], [0])
    assert [s.key for s in specs] == ["digits-all-firm-concat-e1-s0"]
    results = run_grid(specs, settings, tmp_path / "bench", progress=False, log=lambda *_: None)
    finals = [r for r in results[0]["records"] if r["final"]]
    assert {r["eval_set"] for r in finals} == {"ood:noise"} and {r["scorer"] for r in finals} == {"cos1", "mahalanobis"}
    # uniform noise against digits: any encoder separates them
    assert all(r["auroc"] > 0.9 for r in finals)
    with pytest.raises(ValueError, match="--ood"):
        plan_grid(tiny(), ["digits"], ["all"], ["ntxent"], [0])


@pytest.mark.slow
def test_bench_from_the_command_line(tmp_path, capsys):
    from firm.cli import main
    argv = ["bench", "--dataset", "Digits", "--classes", "2", "--losses", "firm,ntxent", "--epochs", "1", "--width", "4",
            "--head-hidden", "16", "--head-layers", "1", "--batch-size", "16", "--train-images", "24", "--scorers", "cos1",
            "--final-tta", "none", "--device", "cpu", "--out", str(tmp_path), "--quiet"]
    assert main(argv) == 0
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == ["digits-c2-firm-concat-e1-s0.json", "digits-c2-ntxent-concat-e1-s0.json"]
    assert (tmp_path / "report.md").exists() and "report written to" in capsys.readouterr().out
    assert "Command: `firm bench --dataset Digits --classes 2" in (tmp_path / "report.md").read_text()
    assert main(argv) == 0  # a rerun skips the finished runs
    assert "skip digits-c2-firm-concat-e1-s0 (done)" in capsys.readouterr().out
    # a rebuilt report names the command that rebuilt it, not a grid command that never ran
    assert main(argv + ["--report-only"]) == 0
    assert "--quiet --report-only`" in (tmp_path / "report.md").read_text()
