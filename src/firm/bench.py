"""``firm bench``: the paper's comparison as one resumable grid of runs of :func:`firm.runner.run`.

Every cell (dataset x normal class x loss x seed x budget) trains with the identical settings,
data order and views (the batch plan and the augmentation generators depend on the seed only,
never on the loss), records a learning curve and, at the end, every scorer under every final
test-time ensemble. Each finished run is one JSON file written atomically, so a rerun skips what
is done; ``shard=(i, n)`` splits the grid between machines (or a scheduler's job array), and
``jobs=N`` runs N cells at once in worker processes on one machine.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from .config import Settings, SettingsError, settings_from_dict
from .data import ALL_CLASSES, canonical_dataset, normal_classes
from .losses import resolve_mode
from .rundir import BENCH_PARTIAL, BENCH_RUNS, read_run_settings, train_files, write_run_settings
from .runner import DataCache, run, validate
from .serialization import write_json

__all__ = ["RunSpec", "plan_grid", "spec_settings", "run_grid"]


@dataclass(frozen=True)
class RunSpec:
    """One cell of the grid; ``normal_class="all"`` is the multi-class-ID setting."""

    dataset: str
    normal_class: str
    loss: str
    seed: int
    epochs: int
    loss_mode: str

    @property
    def key(self) -> str:
        cls = ALL_CLASSES if self.normal_class == ALL_CLASSES else f"c{self.normal_class}"
        return f"{Path(self.dataset).name}-{cls}-{self.loss}-{self.loss_mode}-e{self.epochs}-s{self.seed}"


def plan_grid(base: Settings, datasets: list[str], classes: list[str] | None, losses: list[str], seeds: list[int],
              budgets: list[int] | None = None, shard: tuple[int, int] = (0, 1)) -> list[RunSpec]:
    """The grid in a fixed order, and this shard's share of it (every n-th run).

    ``classes=None`` is every class of each dataset; ``budgets`` (epochs) default to the
    settings' own. Unknown datasets or losses are refused here, before any image is read.
    """
    i, n = shard
    if not 0 <= i < n:
        raise ValueError(f"shard {i}/{n}: the index must be in 0..{n - 1}")
    runs = []
    for d in (canonical_dataset(name) for name in datasets):
        if classes is None and not normal_classes(d):
            raise ValueError(f"{d}: give the classes to run with --classes (a folder of images has no class list)")
        for c in classes if classes is not None else [str(k) for k in normal_classes(d)]:
            for budget in budgets or [base.train.epochs]:
                for s in seeds:
                    for loss in losses:
                        runs.append(RunSpec(d, str(c), loss, s, budget, resolve_mode(loss, base.train.loss_mode)))
    if not runs:
        raise ValueError("the grid is empty: give at least one dataset, class, loss, seed and budget")
    if not base.data.ood and any(r.normal_class == ALL_CLASSES for r in runs):
        raise ValueError("normal class 'all' (every class is normal) has no anomalies to score: give the "
                         "out-of-distribution sets with --ood DATASET_OR_FOLDER")
    for spec in {r.loss: r for r in runs}.values():
        validate(spec_settings(base, spec))
    return runs[i::n]


def spec_settings(base: Settings, spec: RunSpec) -> Settings:
    """The settings of one cell: ``base`` with the cell's dataset, class, loss, layout, seed and budget."""
    s = base.copy()
    s.data.dataset, s.data.normal_class = spec.dataset, spec.normal_class
    s.train.loss, s.train.loss_mode, s.train.seed, s.train.epochs = spec.loss, spec.loss_mode, spec.seed, spec.epochs
    return s


_CACHE: DataCache | None = None


def _set_threads(threads: int) -> int:
    """Give torch and faiss ``threads`` threads; returns torch's number before."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        import faiss
        faiss.omp_set_num_threads(threads)
    except ImportError:  # pragma: no cover
        pass
    return before


def _init_worker(threads: int) -> None:
    """A bench worker: its own data cache, and ``threads`` threads for torch and faiss."""
    global _CACHE
    _set_threads(threads)
    _CACHE = DataCache()


def _run_cell(settings: Settings, spec: RunSpec, path: Path, preset_name: str, progress: bool) -> dict:
    """Train and evaluate one cell; with ``checkpoint_every`` its checkpoints go to
    ``partial/<key>/`` and a killed cell continues from there on the next bench."""
    global _CACHE
    _CACHE = _CACHE or DataCache()
    partial = path.parent.parent / BENCH_PARTIAL / spec.key
    files, resume = None, False
    if settings.train.checkpoint_every:
        files = train_files(partial)
        resume = files.checkpoint.exists() and read_run_settings(partial)[0].to_dict() == settings.to_dict()
        if not resume:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            write_run_settings(partial, settings)
    outcome = run(settings, _CACHE, files=files, resume=resume, progress=progress, log=lambda _: None)
    result = {"run": spec.key, **outcome.meta, "preset": preset_name, "settings": settings.to_dict(),
              "records": outcome.records}
    write_json(path, result)
    shutil.rmtree(partial, ignore_errors=True)
    return result


def _summary(result: dict) -> str:
    final = [r for r in result["records"] if r["final"] and r["scorer"] == "cos1" and r["tta"] == "none"]
    return (f"{result['run']}: cos1 AUROC " + ", ".join(f"{r['eval_set']} {r['auroc']:.4f}" for r in final)
            + f" ({result['total_seconds']:.0f} s)")


# Where the data lay and how often the run checkpointed say nothing about what a run computed, so
# records committed with a placeholder data root (docs/results/*/runs) resume a grid on another machine.
_BOOKKEEPING = (("data", "data_root"), ("train", "checkpoint_every"))


def _experiment(settings: dict) -> dict:
    """``settings.to_dict()`` as plain JSON values, without the bookkeeping fields."""
    plain = json.loads(json.dumps(settings))
    for section, field in _BOOKKEEPING:
        plain[section].pop(field, None)
    return plain


def _same_settings(stored: dict | None, settings: Settings) -> bool:
    """Whether a finished run's stored settings are ``settings``, bookkeeping aside. A field added
    to the settings after the run was made counts as its default value, which is what the run used then."""
    if not isinstance(stored, dict):
        return False
    try:
        stored = settings_from_dict(stored).to_dict()
    except (SettingsError, TypeError, ValueError):  # a field that no longer exists
        return False
    return _experiment(stored) == _experiment(settings.to_dict())


def run_grid(specs: list[RunSpec], base: Settings, out_dir: str | Path, preset_name: str = "", jobs: int = 1,
             threads: int | None = None, progress: bool = True, log: Callable[[str], None] = print) -> list[dict]:
    """Run every cell not already done in ``out_dir/runs`` and return all finished results.

    ``jobs`` worker processes share the cells, each with ``threads`` threads (default: the
    machine's cores divided among the jobs). A finished cell whose stored settings differ from
    what it would run now is refused, so one folder never mixes two experiments.
    """
    runs_dir = Path(out_dir) / BENCH_RUNS
    runs_dir.mkdir(parents=True, exist_ok=True)
    results, todo = [], []
    for spec in specs:
        settings = spec_settings(base, spec)
        path = runs_dir / f"{spec.key}.json"
        if path.exists():
            done = json.loads(path.read_text())
            if not _same_settings(done.get("settings"), settings):
                raise ValueError(f"{path} holds a run with other settings; use another --out folder or remove that file")
            log(f"skip {spec.key} (done)")
            results.append(done)
        else:
            todo.append((settings, spec, path))
    if jobs <= 1:
        # two runs side by side, each with every core's worth of threads, slow each other down
        # several-fold, so a thread count given for one job is kept here too
        before = _set_threads(threads) if threads else None
        try:
            for settings, spec, path in tqdm(todo, desc="bench", disable=not progress, unit="run"):
                result = _run_cell(settings, spec, path, preset_name, progress)
                log(_summary(result))
                results.append(result)
        finally:
            if before is not None:
                _set_threads(before)
        return results
    import multiprocessing as mp
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                             initargs=(threads,)) as pool:
        futures = [pool.submit(_run_cell, settings, spec, path, preset_name, False) for settings, spec, path in todo]
        for future in tqdm(as_completed(futures), total=len(futures), desc="bench", disable=not progress, unit="run"):
            result = future.result()
            log(_summary(result))
            results.append(result)
    return results
