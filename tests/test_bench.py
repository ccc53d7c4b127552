"""firm bench: report arithmetic on hand-made curves, resume, shards."""
import json
import math

import pytest

from firm import bench
from firm.bench import PRESETS, RunSpec, plan_grid, run_grid
from firm.bench_report import convergence, final_aurocs, learning_curves, write_report
from firm.serialization import write_json


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


def test_convergence_arithmetic(hand_made):
    final = final_aurocs(hand_made)
    assert final[("toy", "test", 0, "firm", 0)] == 0.9
    conv = convergence(learning_curves(hand_made), final)
    assert conv["firm"]["epochs"][("toy", "test", 0, 0)] == pytest.approx(2.0)
    assert conv["firm"]["epochs"][("toy", "test", 1, 0)] == pytest.approx(0.1 / 0.2 * 2)  # 0.5 -> 0.7 over 2 epochs
    assert conv["ntxent"]["epochs"][("toy", "test", 0, 0)] == pytest.approx(8.0)
    # AULC of the straight-ish FIRM curve of class 1: Simpson on [0.5, 0.7, 0.7, 0.7, 0.7] over x in [0, 1]
    expected = (0.25 / 3) * (0.5 + 4 * 0.7 + 2 * 0.7 + 4 * 0.7 + 0.7)
    assert sorted(conv["firm"]["aulc"])[0] == pytest.approx(expected)


def test_report_tables(hand_made, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    for loss in ("firm", "ntxent"):
        recs = [r for r in hand_made if r["loss"] == loss]
        write_json(runs / f"toy-{loss}.json", {"records": recs, "total_seconds": 60.0, "preset": {"epochs": 8}})
    text = write_report(tmp_path, "firm bench --dataset toy").read_text()
    # means: FIRM (0.9 + 0.7) / 2 = 0.8, NT-Xent (0.8 + 0.6) / 2 = 0.7, gain +10 points, FIRM wins both classes
    assert "**0.8000**" in text and "**0.7000**" in text
    assert "| ntxent | +10.00 | +10.00 | +10.00 | 2/2 |" in text
    # speed-up: NT-Xent needs (8 + 8) / 2 = 8 epochs, FIRM (2 + 1) / 2 = 1.5 -> 5.33x
    assert "5.33x (2 runs)" in text
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert len(json.loads((tmp_path / "results.json").read_text())) == len(hand_made)


TINY = {**PRESETS["cpu"], "width": 4, "head_hidden": 16, "head_layers": 1, "epochs": 1, "batch_size": 16,
        "train_images": 24, "eval_every": 1, "scorers": ["cos1", "mahalanobis"], "final_tta": ["none"]}


def test_interrupted_bench_completes_the_rest_without_redoing(tmp_path, monkeypatch):
    specs = [RunSpec("digits", 1, "firm", 0), RunSpec("digits", 1, "ntxent", 0), RunSpec("digits", 2, "firm", 0)]
    real_run_one, calls = bench.run_one, []

    def interrupted(spec, *args, **kwargs):
        if len(calls) == 1:
            raise KeyboardInterrupt  # the machine goes away during the second run
        calls.append(spec.key)
        return real_run_one(spec, *args, **kwargs)

    monkeypatch.setattr(bench, "run_one", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_grid(specs, TINY, tmp_path, progress=False, log=lambda *_: None)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["digits-c1-firm-s0.json"]

    calls.clear()
    monkeypatch.setattr(bench, "run_one", lambda spec, *a, **k: calls.append(spec.key) or real_run_one(spec, *a, **k))
    results = run_grid(specs, TINY, tmp_path, progress=False, log=lambda *_: None)
    assert calls == ["digits-c1-ntxent-s0", "digits-c2-firm-s0"]
    assert len(results) == 3
    finals = [r for res in results for r in res["records"] if r["final"]]
    assert {r["scorer"] for r in finals} == {"cos1", "mahalanobis"}
    assert all(0 <= r["auroc"] <= 1 for r in finals)
    curve = [r for r in results[1]["records"] if not r["final"]]
    assert [r["epoch"] for r in curve] == [0, 1]

    with pytest.raises(ValueError, match="other settings"):
        run_grid(specs[:1], {**TINY, "epochs": 2}, tmp_path, progress=False, log=lambda *_: None)


def test_shards_partition_the_grid():
    full = plan_grid(["cifar10"], None, ["firm", "ntxent"], [0, 1], {"cifar10": 10})
    shards = [plan_grid(["cifar10"], None, ["firm", "ntxent"], [0, 1], {"cifar10": 10}, (i, 3)) for i in range(3)]
    assert len(full) == 40
    assert sorted(s.key for part in shards for s in part) == sorted(s.key for s in full)
    with pytest.raises(ValueError, match="shard"):
        plan_grid(["cifar10"], None, ["firm"], [0], {"cifar10": 10}, (3, 3))


def test_same_data_order_for_every_loss():
    """Losses share the seed-derived batch plan and augmentation stream: only the loss differs."""
    import torch

    from firm.models import Encoder, ModelConfig
    from firm.training import Trainer
    images = torch.randint(0, 255, (30, 3, 32, 32), dtype=torch.uint8)
    batches = []
    for loss in ("firm", "ntxent"):
        _, cfg = bench.preset_configs(TINY, loss, seed=3, device="cpu")
        trainer = Trainer(Encoder(ModelConfig(width=4, head_hidden=16, head_layers=1)), cfg, images, progress=False)
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
    specs = plan_grid(["digits"], [-1], ["firm"], [0], {"digits": 10})
    assert specs[0].key == "digits-all-firm-s0"
    results = run_grid(specs, {**TINY, "train_images": 60}, tmp_path / "bench", ood=[str(ood)], progress=False,
                       log=lambda *_: None)
    finals = [r for r in results[0]["records"] if r["final"]]
    assert {r["eval_set"] for r in finals} == {"ood:noise"}
    assert all(0 <= r["auroc"] <= 1 for r in finals)
    with pytest.raises(ValueError, match="--ood"):
        run_grid(plan_grid(["digits"], [-1], ["ntxent"], [0], {"digits": 10}), TINY, tmp_path / "b2", progress=False)


def test_report_flags_an_incomplete_grid(hand_made, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    # NT-Xent finished both classes, FIRM only class 0: FIRM's mean covers 1 of 2 classes.
    for name, recs in {"ntxent": [r for r in hand_made if r["loss"] == "ntxent"],
                       "firm": [r for r in hand_made if r["loss"] == "firm" and r["normal_class"] == 0]}.items():
        write_json(runs / f"toy-{name}.json", {"records": recs, "total_seconds": 60.0, "preset": {"epochs": 8}})
    text = write_report(tmp_path).read_text()
    assert "Incomplete grid: firm lacks 1 of 2 classes" in text
    assert "**0.9000** (1 of 2 classes)" in text and "| **0.7000** |" in text
    # the gain uses class 0 only: 0.9 - 0.8
    assert "| ntxent | +10.00 | +10.00 | +10.00 | 1/1 |" in text
