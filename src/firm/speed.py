"""``firm speed``: throughput of the training step, the loss and kNN scoring; writes speed.json.

* encoder vs whole step: the encoder alone (forward + backward of ``z.sum()`` on ready-made
  views) against the whole :meth:`Trainer.step`, both counted per training image (two views
  each), in float32 and under bf16 autocast (channels-last), all measured interleaved so that
  background load hits them alike; the bf16 / float32 throughput ratios are reported;
* the grouped FIRM loss against the dense-mask formula of the authors' code (time and value);
* exact top-k cosine kNN (:func:`~firm.scoring.knn_similarity`, and each of its backends)
  against the bare matmul that any exact method must do and against scikit-learn's brute-force
  search;
* the versions of torch, numpy, faiss and the BLAS libraries loaded, which the timings depend on.

Timings are wall-clock medians of a few interleaved repeats (minima for the long kNN runs).
"""
from __future__ import annotations

import itertools
import os
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable
from copy import deepcopy

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import preset
from .losses import OUTLIER_LABEL, FIRMLoss
from .models import Encoder, ModelConfig
from .scoring import KNN_BACKENDS, knn_backend, knn_measurements, knn_search, knn_similarity
from .training import TrainConfig, Trainer, machine_info, resolve_device

__all__ = ["dense_firm_loss", "lean_dense_firm_loss", "measure_knn", "measure_loss", "measure_step", "run_speed",
           "library_versions", "format_table"]


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes, with the device's queue drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def dense_firm_loss(z1: Tensor, z2: Tensor, labels: Tensor, tau: float = 0.2) -> Tensor:
    """The FIRM loss as the authors' code computes it: the SupCon reference implementation (Khosla
    et al.) with FIRM's positives, several 2N x 2N float masks (class mask, pair mask, diagonal
    mask) multiplied into the log-probabilities."""
    n = z1.shape[0]
    features = torch.cat([z1, z2])
    y = labels.view(-1, 1)
    inlier = (y != OUTLIER_LABEL).to(z1.dtype)
    same_class = torch.eq(y, y.T).to(z1.dtype) * inlier * inlier.T
    pair = torch.eye(n, device=z1.device, dtype=z1.dtype)
    mask = torch.clamp(same_class + pair, max=1).repeat(2, 2)
    logits = features @ features.T / tau
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    logits_mask = torch.ones_like(mask).scatter_(1, torch.arange(2 * n, device=z1.device).view(-1, 1), 0)
    mask = mask * logits_mask
    exp_logits = torch.exp(logits) * logits_mask
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    return -((mask * log_prob).sum(1) / mask.sum(1)).mean()


def lean_dense_firm_loss(z1: Tensor, z2: Tensor, labels: Tensor, tau: float = 0.2) -> Tensor:
    """A leaner dense version (boolean masks, one float mask): the strongest dense baseline."""
    n = z1.shape[0]
    z, y = torch.cat([z1, z2]), torch.cat([labels, labels])
    idx = torch.arange(2 * n, device=z.device)
    eye = idx[:, None] == idx[None, :]
    inlier = y != OUTLIER_LABEL
    mask = ((y[:, None] == y[None, :]) & inlier[:, None]).to(z.dtype)  # inliers of the same class
    mask[idx, (idx + n) % (2 * n)] = 1.0  # every sample's other view
    mask = mask.masked_fill(eye, 0.0)
    logp = F.log_softmax((z @ z.T / tau).masked_fill(eye, float("-inf")), dim=1).masked_fill(eye, 0.0)
    return (-(mask * logp).sum(1) / mask.sum(1)).mean()


def _one_class_batch(n: int, dim: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Two L2-normalised views of ``n`` samples, a quarter of them inliers of class 0."""
    g = torch.Generator().manual_seed(seed)
    z1, z2 = (F.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=1) for _ in range(2))
    labels = torch.full((n,), OUTLIER_LABEL, dtype=torch.long)
    labels[torch.randperm(n, generator=g)[: max(1, n // 4)]] = 0
    return z1.to(device, dtype), z2.to(device, dtype), labels.to(device)


def measure_loss(sizes: tuple[int, ...] = (256, 1024, 4096), dim: int = 128, tau: float = 0.2,
                 device: torch.device | str = "cpu", repeats: int = 5) -> dict:
    """Forward + backward time of :class:`FIRMLoss` against the dense implementations per N, and
    the largest relative difference of the values in float64 and float32."""
    device = torch.device(device)
    loss_fn, rows, diffs = FIRMLoss(tau), [], {torch.float64: 0.0, torch.float32: 0.0}
    dense = {"dense": dense_firm_loss, "lean_dense": lean_dense_firm_loss}
    for n in sizes:
        for dtype, worst in diffs.items():
            z1, z2, labels = _one_class_batch(n, dim, dtype, device)
            with torch.no_grad():
                ours = float(loss_fn(z1, z2, labels))
                ref = [float(f(z1, z2, labels, tau)) for f in dense.values()]
            diffs[dtype] = max([worst] + [abs(ours - r) / abs(r) for r in ref])
        z1, z2, labels = _one_class_batch(n, dim, torch.float32, device)
        z1.requires_grad_(True)
        z2.requires_grad_(True)
        fns = {"firm": _backward_of(loss_fn, z1, z2, labels)}
        fns.update({name: _backward_of(lambda a, b, y, f=f: f(a, b, y, tau), z1, z2, labels) for name, f in dense.items()})
        times = _interleaved(fns, device, warmup=1, repeats=repeats if n <= 1024 else max(1, repeats // 2))
        rows.append({"n": n, "firm_ms": 1e3 * times["firm"], "dense_ms": 1e3 * times["dense"],
                     "lean_dense_ms": 1e3 * times["lean_dense"], "speedup": times["dense"] / times["firm"],
                     "speedup_vs_lean": times["lean_dense"] / times["firm"]})
    ref = min(rows, key=lambda r: abs(r["n"] - 1024))  # the reference size, or the closest measured
    return {"loss": rows, "loss_speedup_vs_dense": ref["speedup"], "loss_speedup_vs_lean_dense": ref["speedup_vs_lean"],
            "loss_speedup_at_n": ref["n"], "loss_max_rel_diff_float64": diffs[torch.float64],
            "loss_max_rel_diff_float32": diffs[torch.float32]}


def _backward_of(loss: Callable[[Tensor, Tensor, Tensor], Tensor], z1: Tensor, z2: Tensor,
                 labels: Tensor) -> Callable[[], None]:
    return lambda: loss(z1, z2, labels).backward()


def _interleaved(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int,
                 reduce: Callable[[list[float]], float] = statistics.median) -> dict[str, float]:
    """Seconds of each function (median of the repeats by default), taking turns so that
    background load hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_timed(fn, device))
    return {name: reduce(t) for name, t in times.items()}


def _peak_memory_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "torch.cuda.max_memory_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10), "ru_maxrss (whole process so far)"


def _step_functions(model: Encoder, device: torch.device, images: Tensor, batch_size: int, amp: bool, steps: int,
                    seed: int) -> dict[str, Callable[[], None]]:
    """The encoder alone and the whole :meth:`Trainer.step` of a fresh trainer, in float32 or
    under bf16 autocast, both channels-last."""
    # Enough scheduled steps that OneCycleLR never runs out during the measurement.
    config = TrainConfig(loss="firm", epochs=steps, batch_size=batch_size, lr=0.02, seed=seed, device=str(device),
                         amp=amp, channels_last=True, checkpoint_every=0)
    trainer = Trainer(model, config, images, progress=False)
    trainer.seed_epoch(0)
    index, variant = trainer.plan.epoch(0, device)
    views, _ = trainer.make_batch(index[0], variant[0])  # ready-made, channels_last views for the encoder alone
    count = itertools.count()

    def encoder_only() -> None:
        # What the step does with the encoder, minus loss and optimizer: zero_grad, forward, backward.
        trainer.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            z = trainer.net(views)
        z.float().sum().backward()

    def whole_step() -> None:
        s = next(count) % len(index)
        trainer.step(index[s], variant[s])

    return {"encoder": encoder_only, "step": whole_step}


def measure_step(device: torch.device | str = "cpu", width: int = 16, batch_size: int = 256, amp: bool = False,
                 head: str = "cpu", warmup: int = 3, repeats: int = 9, seed: int = 0, compare_bf16: bool = True) -> dict:
    """Encoder-only forward + backward against the whole :meth:`Trainer.step`, in training images
    per second; ``step_over_encoder`` is their ratio (1 = the rest of the step costs nothing).

    The plain keys are for the precision ``amp`` asks for. With ``compare_bf16`` both float32 and
    bf16 autocast (channels-last both, the same initial weights) are measured, all four
    interleaved, and ``bf16_speedup_step`` / ``bf16_speedup_encoder`` are the bf16 throughput
    over the float32 one: one run checks a claim such as "bf16 autocast is 1.7-1.9x float32".
    ``head`` names the preset (:func:`firm.config.preset`) whose projection head is used.
    """
    device = resolve_device(str(device))
    model_config = preset(head).model
    model = Encoder(ModelConfig(width=width, head_hidden=model_config.head_hidden, head_layers=model_config.head_layers))
    images = torch.randint(0, 256, (max(batch_size, 64), 3, 32, 32), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(seed))
    main = "bf16" if amp else "float32"
    precisions = ("float32", "bf16") if compare_bf16 else (main,)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    fns = {}
    for precision in precisions:
        net = model if precision == precisions[-1] else deepcopy(model)  # the same initial weights for both
        for part, fn in _step_functions(net, device, images, batch_size, precision == "bf16", warmup + repeats + 10,
                                        seed).items():
            fns[f"{part}_{precision}"] = fn
    times = _interleaved(fns, device, warmup, repeats)
    peak, kind = _peak_memory_mb(device)
    if len(precisions) > 1:
        kind += ", both precisions' trainers alive"
    rate = {name: batch_size / t for name, t in times.items()}
    encoder, step = rate[f"encoder_{main}"], rate[f"step_{main}"]
    out = {"encoder_imgs_per_s": encoder, "step_imgs_per_s": step, "step_over_encoder": step / encoder,
           "encoder_seconds": times[f"encoder_{main}"], "step_seconds": times[f"step_{main}"],
           "peak_memory_mb": peak, "peak_memory_kind": kind, "model": model.config.to_dict(), "head": head}
    if compare_bf16:
        out.update({name.replace("_", "_imgs_per_s_", 1): r for name, r in rate.items()})  # encoder_imgs_per_s_bf16 ...
        out["bf16_speedup_encoder"] = rate["encoder_bf16"] / rate["encoder_float32"]
        out["bf16_speedup_step"] = rate["step_bf16"] / rate["step_float32"]
    return out


def measure_knn(bank_size: int = 50_000, queries: int = 10_000, dim: int = 512, k: int = 5,
                repeats: int = 3, seed: int = 0) -> dict:
    """Exact top-k cosine kNN on the CPU (where scoring runs): ours (:func:`~firm.scoring.knn_similarity`
    with the backend it picks on this machine), every other backend, the bare matmul that any exact
    method must do, and scikit-learn's brute-force NearestNeighbors with the cosine metric (the same
    computation) and with the euclidean metric on the normalised data (same ranking, sklearn's
    faster path)."""
    from sklearn.neighbors import NearestNeighbors
    g = torch.Generator().manual_seed(seed)
    bank = F.normalize(torch.randn(bank_size, dim, generator=g), dim=1)
    query = F.normalize(torch.randn(queries, dim, generator=g), dim=1)
    chosen = knn_backend(bank, query, k)  # measures the backends on a slice first, once per process
    fns = {"ours": lambda: knn_similarity(bank, query, k), "floor": lambda: query @ bank.T}
    fns.update({name: (lambda name=name: knn_search(bank, query, k, backend=name)) for name in KNN_BACKENDS
                if name != chosen})
    best = _interleaved(fns, torch.device("cpu"), warmup=0, repeats=repeats, reduce=min)
    sk, found = {}, {}
    for metric in ("cosine", "euclidean"):  # one run each: they take several seconds
        nn = NearestNeighbors(n_neighbors=k, algorithm="brute", metric=metric).fit(bank.numpy())
        start = time.perf_counter()
        found[metric] = nn.kneighbors(query.numpy())[0]
        sk[metric] = time.perf_counter() - start
    ours, floor = best["ours"], best["floor"]
    exact_diff = float((knn_similarity(bank, query, k) - (1 - torch.from_numpy(found["cosine"]))).abs().max())
    return {"knn_seconds": ours, "matmul_floor_seconds": floor, "sklearn_knn_seconds": sk["cosine"],
            "sklearn_euclidean_knn_seconds": sk["euclidean"], "knn_over_floor": ours / floor,
            "knn_speedup_vs_sklearn": sk["cosine"] / ours, "knn_speedup_vs_sklearn_euclidean": sk["euclidean"] / ours,
            "knn_vs_sklearn_max_abs_diff": exact_diff, "knn_backend": chosen,
            "knn_seconds_by_backend": {name: best["ours" if name == chosen else name] for name in KNN_BACKENDS},
            "knn_backend_slice_seconds": knn_measurements(),
            "knn_setup": {"bank": bank_size, "queries": queries, "dim": dim, "k": k, "device": "cpu",
                          "sklearn": "NearestNeighbors(algorithm='brute'), metric 'cosine' and 'euclidean', all queries"}}


def library_versions() -> dict:
    """Versions of the libraries the timings depend on, and the BLAS and OpenMP libraries loaded in
    this process as threadpoolctl reports them (file names without their folders)."""
    import numpy
    versions: dict = {"torch": torch.__version__, "numpy": numpy.__version__, "torch_blas": _torch_blas()}
    for name in ("faiss", "sklearn", "threadpoolctl"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        versions["threadpools"] = None
    else:
        keys = ("user_api", "internal_api", "prefix", "version", "num_threads", "threading_layer", "architecture")
        versions["threadpools"] = [{**{key: pool[key] for key in keys if key in pool},
                                    "file": os.path.basename(pool.get("filepath", ""))} for pool in threadpool_info()]
    return versions


def _torch_blas() -> str | None:
    """The BLAS torch was built with (``BLAS_INFO`` in its build configuration)."""
    found = re.search(r"BLAS_INFO=([^,\s]+)", torch.__config__.show())
    return found.group(1) if found else None


def run_speed(device: str = "cpu", width: int = 16, batch_size: int = 256, amp: bool = False, head: str = "cpu",
              loss_sizes: tuple[int, ...] = (256, 1024, 4096), knn: dict | None = None, repeats: int = 5) -> dict:
    """Every measurement as one flat dict (what speed.json holds). The training step is measured in
    float32 and under bf16 autocast in the same run (``bf16_speedup_step``, ``bf16_speedup_encoder``);
    ``amp`` picks which of the two the plain ``encoder_imgs_per_s`` / ``step_imgs_per_s`` report."""
    dev = resolve_device(device)
    result = {**machine_info(dev), "width": width, "batch_size": batch_size, "amp": amp}
    # The step runs first so that the process's peak RSS is the step's, not the kNN matmul's.
    result.update(measure_step(dev, width, batch_size, amp, head, warmup=min(3, repeats), repeats=repeats))
    result.update(measure_loss(loss_sizes, device=dev, repeats=repeats))
    result.update(measure_knn(**(knn or {})))
    result["libraries"] = library_versions()
    return result


def format_table(r: dict) -> str:
    """The measurements as the table ``firm speed`` prints."""
    lines = [(f"{r['device_name']} ({r['device']}), torch {r['torch']}, {r['torch_threads']} threads, "
              f"width {r['width']}, batch {r['batch_size']}, amp {'on' if r['amp'] else 'off'}"),
             f"{'encoder fwd+bwd':28s}{r['encoder_imgs_per_s']:12.1f} img/s",
             f"{'whole training step':28s}{r['step_imgs_per_s']:12.1f} img/s  ({r['step_over_encoder']:.2f} of encoder)",
             *([f"{'bf16 autocast / float32':28s}{r['bf16_speedup_step']:12.2f} x   step "
                f"({r['step_imgs_per_s_bf16']:.1f} vs {r['step_imgs_per_s_float32']:.1f} img/s), "
                f"encoder x{r['bf16_speedup_encoder']:.2f}"] if "bf16_speedup_step" in r else []),
             f"{'peak memory (step)':28s}{r['peak_memory_mb']:12.1f} MiB"]
    for row in r["loss"]:
        lines.append(f"{'loss fwd+bwd N=' + str(row['n']):28s}{row['firm_ms']:12.2f} ms  dense {row['dense_ms']:.2f} ms"
                     f" (x{row['speedup']:.2f}), lean dense {row['lean_dense_ms']:.2f} ms (x{row['speedup_vs_lean']:.2f})")
    lines += [f"{'loss rel. diff f64 / f32':28s}{r['loss_max_rel_diff_float64']:12.1e} / {r['loss_max_rel_diff_float32']:.1e}",
              (f"{'kNN (exact, ' + r['knn_backend'] + ')':28s}{r['knn_seconds']:12.3f} s   ({r['knn_over_floor']:.2f} x "
               f"matmul floor {r['matmul_floor_seconds']:.3f} s)"),
              *(f"{'  kNN backend ' + name:28s}{t:12.3f} s   ({t / r['matmul_floor_seconds']:.2f} x matmul floor)"
                for name, t in r["knn_seconds_by_backend"].items() if name != r["knn_backend"]),
              f"{'sklearn kNN, cosine':28s}{r['sklearn_knn_seconds']:12.3f} s   (ours x{r['knn_speedup_vs_sklearn']:.1f})",
              (f"{'sklearn kNN, euclidean':28s}{r['sklearn_euclidean_knn_seconds']:12.3f} s   "
               f"(ours x{r['knn_speedup_vs_sklearn_euclidean']:.1f})")]
    return "\n".join(lines)
