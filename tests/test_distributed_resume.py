"""Distributed loss over gloo, a real torchrun training, and resume after SIGKILL."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from firm import FIRMLoss, NTXentLoss
from firm.serialization import load_tensors

pytestmark = pytest.mark.slow  # several processes

WORLD = 2
N_GLOBAL = 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_batch():
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(N_GLOBAL, 10, generator=g, dtype=torch.float64)
    x2 = torch.randn(N_GLOBAL, 10, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, -1, -1, -1, 0, -1, 0, -1, -1, -1, 0, -1])
    weight = torch.randn(6, 10, generator=g, dtype=torch.float64)
    return x1, x2, labels, weight


def _forward(weight, x1, x2, labels, loss_fn):
    return loss_fn(F.normalize(x1 @ weight.T, dim=1), F.normalize(x2 @ weight.T, dim=1), labels)


def _worker(rank: int, port: int, out_dir: str, mode: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    x1, x2, labels, weight = _global_batch()
    n = N_GLOBAL // WORLD
    local = slice(rank * n, (rank + 1) * n)
    model = torch.nn.Linear(10, 6, bias=False).double()
    model.weight.data.copy_(weight)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    loss_fn = FIRMLoss(tau=0.2, mode=mode)
    # Both views go through ONE forward of the DDP module, as in the Trainer. (Calling the bare
    # module for view 2 let DDP's gradient all-reduce start after view 1's contribution alone,
    # racing the loss's own all-reduce: the ranks could issue their collectives in different
    # orders, which aborted the process group about one run in eight on a loaded machine.)
    z1, z2 = F.normalize(ddp(torch.cat([x1[local], x2[local]])), dim=1).chunk(2)
    loss = loss_fn(z1, z2, labels[local])
    loss.backward()
    value = loss.detach().clone()
    dist.all_reduce(value)
    torch.save({"loss": float(value) / WORLD, "grad": model.weight.grad.clone()}, Path(out_dir) / f"rank{rank}.pt")
    # Tear down only when both ranks are done: a rank that closes its gloo pairs while the other
    # still holds pending operations (DDP's reducer, the gather) aborts the peer with SIGABRT.
    del ddp
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["concat", "pairwise"])
def test_distributed_loss_equals_loss_on_the_concatenated_batch(tmp_path, mode):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path), mode), nprocs=WORLD, join=True)
    x1, x2, labels, weight = _global_batch()
    w = weight.clone().requires_grad_(True)
    single = _forward(w, x1, x2, labels, FIRMLoss(tau=0.2, mode=mode))
    single.backward()
    single = single.detach()
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert abs(got["loss"] - float(single)) < 1e-12
        assert torch.allclose(got["grad"], w.grad, atol=1e-12)  # DDP-averaged = global-batch gradient


def test_without_process_group_the_loss_is_local():
    x1, x2, labels, weight = _global_batch()
    z1, z2 = F.normalize(x1 @ weight.T, dim=1), F.normalize(x2 @ weight.T, dim=1)
    assert torch.isclose(NTXentLoss(gather_distributed=False)(z1, z2), NTXentLoss()(z1, z2))


TINY = ["--width", "4", "--head-hidden", "32", "--head-layers", "1", "--batch-size", "32", "--lr", "0.02",
        "--dataset", "digits", "--quiet"]


def test_torchrun_two_processes_train_on_cpu(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "firm", "train", *TINY, "--normal-class", "0", "--epochs", "2", "--out", str(out), "--device", "cpu"]
    subprocess.run(cmd, check=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1, 2]  # epoch 0: the untrained encoder's point of the learning curve
    assert all(r["loss"] > 0 for r in log[1:])
    assert log[-1]["auroc_test"] > 0.7  # digit 0 against the other nine, scored on rank 0
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()


def _train_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "firm", "train", *TINY, "--normal-class", "all", "--train-images", "200", "--epochs", "3",
            "--checkpoint-every", "1", "--out", str(out), *extra]


def _weights(run: Path) -> dict:
    return load_tensors(run / "model.safetensors")[0]


def test_sigkill_mid_epoch_then_resume_ends_with_the_same_weights(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference = tmp_path / "reference"
    subprocess.run(_train_cmd(reference), check=True, timeout=600, env=env)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(killed), env=env)
    log = killed / "log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.exists() and log.read_text().count("\n") >= 1):
        time.sleep(0.05)
    time.sleep(0.3)  # well inside epoch 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "model.safetensors").exists(), "the run finished before it could be killed"
    epoch_saved = load_tensors(killed / "checkpoint.safetensors")[1]["epoch"]
    assert epoch_saved in (1, 2)

    subprocess.run([sys.executable, "-m", "firm", "train", "--resume", str(killed), "--quiet"], check=True,
                   timeout=600, env=env)
    a, b = _weights(reference), _weights(killed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [json.loads(x)["epoch"] for x in log.read_text().splitlines()] == [1, 2, 3]
