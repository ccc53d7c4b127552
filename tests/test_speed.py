"""firm speed at toy sizes: every figure is present, positive and finite; no timing is asserted."""
import json
import math

import pytest
import torch

from firm.cli import main
from firm.losses import FIRMLoss
from firm.scoring import KNN_BACKENDS
from firm.speed import (
    dense_firm_loss,
    lean_dense_firm_loss,
    library_versions,
    measure_knn,
    measure_loss,
    measure_step,
    run_speed,
)

TINY_KNN = {"bank_size": 2000, "queries": 300, "dim": 64, "k": 5, "repeats": 2}


def _positive_finite(d: dict, keys) -> None:
    for key in keys:
        assert key in d, key
        assert isinstance(d[key], (int, float)) and math.isfinite(d[key]) and d[key] > 0, (key, d[key])


@pytest.mark.parametrize("seed", [0, 1])
def test_dense_reference_matches_grouped_loss_with_gradients(seed):
    g = torch.Generator().manual_seed(seed)
    z1, z2 = (torch.nn.functional.normalize(torch.randn(64, 16, generator=g, dtype=torch.float64), dim=1)
              for _ in range(2))
    labels = torch.randint(-1, 3, (64,), generator=g)  # several ID classes and outliers
    grads = []
    for fn in (lambda a, b: FIRMLoss(0.3)(a, b, labels), lambda a, b: dense_firm_loss(a, b, labels, 0.3),
               lambda a, b: lean_dense_firm_loss(a, b, labels, 0.3)):
        a, b = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
        value = fn(a, b)
        value.backward()
        grads.append((float(value.detach()), a.grad, b.grad))
    v1, a1, b1 = grads[0]
    for v2, a2, b2 in grads[1:]:
        assert abs(v1 - v2) <= 1e-12 * abs(v2)
        assert torch.allclose(a1, a2, atol=1e-12) and torch.allclose(b1, b2, atol=1e-12)


def test_measure_loss_small():
    r = measure_loss(sizes=(32, 64), dim=16, repeats=1)
    assert [row["n"] for row in r["loss"]] == [32, 64]
    assert r["loss_speedup_at_n"] == 64
    for row in r["loss"]:
        _positive_finite(row, ["firm_ms", "dense_ms", "lean_dense_ms", "speedup", "speedup_vs_lean"])
    assert 0 <= r["loss_max_rel_diff_float64"] <= 1e-6
    assert 0 <= r["loss_max_rel_diff_float32"] <= 1e-5


def test_measure_knn_small_is_exact():
    r = measure_knn(**TINY_KNN)
    _positive_finite(r, ["knn_seconds", "matmul_floor_seconds", "sklearn_knn_seconds", "knn_over_floor",
                         "knn_speedup_vs_sklearn", "sklearn_euclidean_knn_seconds", "knn_speedup_vs_sklearn_euclidean"])
    assert r["knn_vs_sklearn_max_abs_diff"] < 1e-5
    assert r["knn_backend"] in KNN_BACKENDS and set(r["knn_seconds_by_backend"]) == set(KNN_BACKENDS)
    assert r["knn_seconds_by_backend"][r["knn_backend"]] == r["knn_seconds"]


def test_library_versions_name_the_libraries_without_machine_paths():
    versions = library_versions()
    assert versions["torch"] == torch.__version__ and versions["numpy"]
    for pool in versions["threadpools"] or []:
        assert "/" not in pool["file"] and pool["user_api"] in ("blas", "openmp")


BF16_KEYS = ["encoder_imgs_per_s_float32", "step_imgs_per_s_float32", "encoder_imgs_per_s_bf16", "step_imgs_per_s_bf16",
             "bf16_speedup_encoder", "bf16_speedup_step"]


@pytest.mark.parametrize("amp, main", [(True, "bf16"), (False, "float32")])
def test_measure_step_small_in_both_precisions(amp, main):
    r = measure_step("cpu", width=8, batch_size=16, amp=amp, warmup=1, repeats=1)
    _positive_finite(r, ["encoder_imgs_per_s", "step_imgs_per_s", "step_over_encoder", "peak_memory_mb", *BF16_KEYS])
    assert r["model"]["width"] == 8 and r["model"]["head_hidden"] == 512 and r["model"]["head_layers"] == 2
    # the plain keys are the precision asked for
    assert r["encoder_imgs_per_s"] == r[f"encoder_imgs_per_s_{main}"] and r["step_imgs_per_s"] == r[f"step_imgs_per_s_{main}"]


def test_measure_step_one_precision_only():
    r = measure_step("cpu", width=8, batch_size=16, warmup=1, repeats=1, compare_bf16=False)
    _positive_finite(r, ["encoder_imgs_per_s", "step_imgs_per_s", "step_over_encoder"])
    assert not set(BF16_KEYS) & set(r)


def test_firm_speed_writes_json_and_table(tmp_path, monkeypatch, capsys):
    from firm import speed

    def tiny_run(device, width, batch_size, amp, head):
        return run_speed(device, width, batch_size, amp, head, loss_sizes=(64,), knn=TINY_KNN, repeats=1)

    monkeypatch.setattr(speed, "run_speed", tiny_run)
    assert main(["speed", "--width", "8", "--batch-size", "16", "--out", str(tmp_path / "s"), "--quiet"]) == 0
    data = json.loads((tmp_path / "s" / "speed.json").read_text())
    _positive_finite(data, ["encoder_imgs_per_s", "step_imgs_per_s", "step_over_encoder", "loss_speedup_vs_dense",
                            "knn_seconds", "matmul_floor_seconds", "sklearn_knn_seconds", "knn_over_floor",
                            "knn_speedup_vs_sklearn", "peak_memory_mb", "torch_threads", *BF16_KEYS])
    for key in ("device_name", "torch", "width", "batch_size", "loss_max_rel_diff_float64", "loss_max_rel_diff_float32"):
        assert key in data
    assert data["width"] == 8 and data["batch_size"] == 16 and data["device"] == "cpu"
    assert data["amp"] is False and data["step_imgs_per_s"] == data["step_imgs_per_s_float32"]
    assert data["libraries"]["torch"] == torch.__version__ and data["knn_backend"] in KNN_BACKENDS
    out = capsys.readouterr().out
    assert "img/s" in out and "speed.json" in out and "bf16 autocast / float32" in out
