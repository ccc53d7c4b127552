"""The ``firm`` command: one subcommand per job; ``firm SUBCOMMAND --help`` explains each option.

The options that are settings are generated from the dataclasses in :mod:`firm.config` (one
flag per field, choices from the registries), so they are checked when the command line is
parsed. Values come from the subcommand's preset (``--preset``), then from ``--config
FILE.yaml`` (the settings, nested as in ``run.json`` or flat by field name, plus any other long
option of the subcommand), then from the flags given.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import shlex
import sys
import time
import warnings
from dataclasses import fields
from pathlib import Path

from .config import (GROUPS, METHODS, PRESETS, SCORES, Settings, SettingsError, apply_overrides, describe, field_group,
                     field_type, preset)

__all__ = ["main", "build_parser"]

@functools.cache
def _registries() -> dict:
    """The registry each name-valued setting draws from: its flag's choices, checked at parse time."""
    from .data import DATASETS, SPLITS
    from .features import TTA_MODES
    from .losses import LOSS_MODES, LOSSES
    from .models import BACKBONES, INITS, STEMS
    from .scoring import SCORERS
    from .shifts import SHIFTS
    return dict(loss=LOSSES, loss_mode=LOSS_MODES, scorer=SCORERS, tta=TTA_MODES, scorers=SCORERS,
                final_tta=TTA_MODES, curve_scorers=SCORERS, curve_tta=TTA_MODES, shifts=SHIFTS, backbone=BACKBONES,
                stem=STEMS, init=INITS, split=SPLITS, dataset=DATASETS, ood=DATASETS, method=METHODS, score=SCORES)


def _choices(name: str) -> tuple[str, ...]:
    """The names setting ``name`` may take (none: not a registry name); a single scorer cannot be
    ``all``, which names every scorer."""
    from .scoring import ALL
    registry = _registries().get(name)
    if registry is None:
        return ()
    return tuple(c for c in registry.choices if c != ALL) if name == "scorer" else registry.choices


def _value_type(name: str, cls: type):
    """An argparse type for field ``name``: parses, converts and checks choices."""
    base, is_list, is_tuple, optional = field_type(cls, name)

    def convert(text: str):
        try:
            value = apply_overrides(Settings(), {name: text})
        except SettingsError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        value = getattr(getattr(value, field_group(name)), name)
        if value is None:
            return "none"  # given as none: kept as text, so it still overrides the preset (None = not given)
        try:
            return _checked(name, value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = "on|off" if base is bool else ("list" if is_list or is_tuple else base.__name__)
    return convert


def _checked(name: str, value):
    """``value`` of setting ``name`` with registry names checked (a SettingsError naming the
    choices) and dataset names in their registry spelling (``Digits``, ``fashion-mnist`` ->
    ``digits``, ``fashionmnist``; an image folder as given)."""
    if name in ("dataset", "ood"):
        from .data import canonical_dataset
        return canonical_dataset(value) if name == "dataset" else [canonical_dataset(v) for v in value]
    registry = _registries().get(name)
    for v in value if isinstance(value, (list, tuple)) else [value]:
        if registry is not None and v not in _choices(name):
            raise registry.unknown(v, keywords=v not in registry.keywords)
    return value


def _name_list(name: str):
    """An argparse type for a comma list of names that setting ``name``'s registry holds."""
    def convert(text: str) -> list[str]:
        names = [v.strip() for v in text.split(",") if v.strip()]
        if not names:
            raise argparse.ArgumentTypeError(f"give at least one name; choose from {', '.join(_choices(name))}")
        try:
            return _checked(name, names)
        except SettingsError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = "list"
    return convert


def _show(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) or "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return "none" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _add_settings(p: argparse.ArgumentParser, default_preset: str, groups: tuple[str, ...],
                  exclude: tuple[str, ...] = (), only: tuple[str, ...] | None = None) -> None:
    """One flag per settings field of ``groups`` (``only`` those named, if given; none of
    ``exclude``); defaults shown are the preset's."""
    p.add_argument("--preset", choices=list(PRESETS), default=default_preset,
                   help="named settings to start from; flags override its values")
    base = PRESETS[default_preset]
    for group in groups:
        cls = GROUPS[group]
        g = p.add_argument_group(f"{group} settings")
        for f in fields(cls):
            if f.name in exclude or (only is not None and f.name not in only):
                continue
            choices = _choices(f.name)
            many = field_type(cls, f.name)[1]
            alternative = _registries()[f.name].alternative if choices else ""
            extra = (f"; {'comma list of' if many else 'one of'}: {', '.join(choices)}{' ' if alternative else ''}"
                     f"{alternative}") if choices else ""
            g.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=argparse.SUPPRESS,
                           type=_value_type(f.name, cls),
                           metavar=_value_type(f.name, cls).__name__.upper() if field_type(cls, f.name)[0] is not bool
                           else "on|off",
                           help=f"{describe(f.name)} (preset {default_preset}: {_show(getattr(getattr(base, group), f.name))})"
                           + extra)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML file: settings (nested as in run.json, or flat) and any other "
                   "long option of this command; flags on the command line override it")
    p.add_argument("--quiet", action="store_true", help="no progress bars (they are also off when stderr is not a terminal)")


_SETTINGS_NAMES = {f.name for cls in GROUPS.values() for f in fields(cls)}
_FINAL_EVAL = ("scorers", "final_tta")  # what a run's final evaluation scores: firm bench and firm evaluate only


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default, except a default of None ("not given": a folder, a model),
    where "(default: None)" would tell nothing. Settings flags name their preset's value."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None:
            return action.help or ""
        return super()._get_help_string(action)


_COMMAND_HELP = {
    "train": "train on a dataset's normal class (one-class protocol)",
    "evaluate": "AUROC of a trained model on its test split or on folders",
    "demo": "FIRM vs NT-Xent on scikit-learn's digits, no files needed",
    "bench": "the paper's comparison: classes x losses x seeds, resumable",
    "speed": "measure training-step, loss and kNN throughput; writes speed.json",
    "fit": "train a detector on a folder of normal images",
    "score": "score images with a model; CSV ranked by anomaly score",
    "report": "HTML report: ROC, histograms, learning curve, images, embedding",
    "export": "export the encoder to ONNX with its feature bank, check parity",
}
"""Each command's line in ``firm --help``."""


def _root_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """The ``firm`` parser without its commands, and the action the commands are added to."""
    from . import __version__
    parser = argparse.ArgumentParser(prog="firm", description="FIRM contrastive anomaly detection: train, score, "
                                     "evaluate, benchmark and export.")
    parser.add_argument("--version", action="version", version=f"firm {__version__}")
    return parser, parser.add_subparsers(dest="command", metavar="COMMAND")


def _command_list() -> argparse.ArgumentParser:
    """``firm``, ``firm --help`` and ``firm --version``: the commands without their options, whose
    choices come from registries that import torch, so that these answer at once."""
    parser, sub = _root_parser()
    for name, text in _COMMAND_HELP.items():
        sub.add_parser(name, help=text)
    return parser


def build_parser() -> argparse.ArgumentParser:
    fmt = _HelpFormatter
    parser, sub = _root_parser()

    p = sub.add_parser("train", formatter_class=fmt, help=_COMMAND_HELP["train"],
                       description="Train an encoder on one class of a standard dataset into a run folder (settings, "
                       "log, checkpoints, model). The default preset is `cpu` (minutes per class on a CPU); "
                       "--preset paper is the authors' 2,000-epoch experiment (days on a CPU, hours on a GPU).")
    _add_common(p)
    p.add_argument("--out", help="run folder to create (must be new or empty unless --overwrite)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the killed run in RUN_DIR with its saved settings")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    _add_settings(p, "cpu", ("data", "model", "train", "eval"), exclude=("ood", *_FINAL_EVAL))

    p = sub.add_parser("evaluate", formatter_class=fmt, help=_COMMAND_HELP["evaluate"],
                       description="Writes results.json (records with loss, scorer, tta, auroc) and per-image scores.csv.")
    _add_common(p)
    p.add_argument("run_dir", nargs="?", help="run folder written by firm train (scored on its dataset's test split)")
    p.add_argument("--model", help="model folder (firm fit / firm train) to evaluate on folders")
    p.add_argument("--normal-dir", nargs="+", help="folder(s) of normal test images")
    p.add_argument("--anomaly-dir", nargs="+", help="folder(s) of anomalous test images")
    p.add_argument("--data-root", help="override the data root stored in the run")
    p.add_argument("--ood", type=_name_list("ood"), metavar="LIST",
                   help="comma list of OOD datasets or folders, for a run trained on every class")
    p.add_argument("--scorers", default="all", type=_name_list("scorers"), metavar="LIST",
                   help=f"{describe('scorers')}; comma list of: {', '.join(_choices('scorers'))}")
    p.add_argument("--final-tta", default="none,angled", type=_name_list("final_tta"), metavar="LIST",
                   help=f"{describe('final_tta')}; comma list of: {', '.join(_choices('final_tta'))}")
    p.add_argument("--out", help="folder for results.json and scores.csv (default: the run or model folder)")
    p.add_argument("--overwrite", action="store_true", help="replace results.json and scores.csv already there")
    p.add_argument("--mask-dir", help="ground-truth masks of the folders' images (MASK_DIR/<folder>/<stem>_mask.png or "
                   "MASK_DIR/<stem>_mask.png): adds the anomaly maps' pixel AUROC and PRO (model fitted with patch_bank > 0)")

    p = sub.add_parser("demo", formatter_class=fmt, help=_COMMAND_HELP["demo"],
                       description="Every digit in turn is the normal class; FIRM and NT-Xent with the demo preset. "
                       "Resumable: a rerun skips finished runs.")
    _add_common(p)
    p.add_argument("--out", default="runs/demo", help="folder for the runs and results.json")
    p.add_argument("--epochs", type=int, default=PRESETS["demo"].train.epochs, help="epochs per run")
    p.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1),
                   help="runs trained at once, in worker processes that share the cores; the default is this "
                   "machine's cores, at most 4")

    p = sub.add_parser("bench", formatter_class=fmt, help=_COMMAND_HELP["bench"],
                       description="Train every class x loss x seed (x budget) with identical settings, record learning "
                       "curves and all scorers, and write results.json, report.md and plots. Rerunning skips finished "
                       "runs. Settings flags override the preset for every run of the grid.")
    _add_common(p)
    p.add_argument("--classes", help="comma list of normal classes (default: all); 'all' alone = multi-class ID")
    p.add_argument("--losses", default="firm,ntxent,supcon,rotsupcon", type=_name_list("loss"),
                   help=f"comma list of losses: {', '.join(_choices('loss'))}")
    p.add_argument("--seeds", default="0", help="comma list of seeds")
    p.add_argument("--epochs-ladder", help="comma list of budgets (epochs): the same grid at each budget")
    p.add_argument("--shard", default="0/1", help="i/n: run every n-th cell starting at i (for job arrays)")
    p.add_argument("--jobs", type=int, default=1, help="cells run at once in worker processes on this machine")
    p.add_argument("--threads", type=int, help="threads per job (default: the cores divided among the jobs)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved settings and the grid, run nothing")
    p.add_argument("--report-only", action="store_true", help="only rebuild the report from finished runs")
    p.add_argument("--out", default="runs/bench", help="bench folder")
    _add_settings(p, "cpu", ("data", "model", "train", "eval"), exclude=("normal_class", "seed", "loss"))

    p = sub.add_parser("speed", formatter_class=fmt, help=_COMMAND_HELP["speed"],
                       description="The training step is timed with the preset's encoder and projection head; the "
                       "flags below override the preset's values.")
    _add_common(p)
    p.add_argument("--out", default="runs/speed", help="folder for speed.json")
    p.add_argument("--overwrite", action="store_true", help="replace the speed.json already there")
    _add_settings(p, "cpu", ("model", "train"), only=("width", "batch_size", "device", "amp"))

    p = sub.add_parser("fit", formatter_class=fmt, help=_COMMAND_HELP["fit"],
                       description="Fit a FIRMDetector on normal images (folders searched recursively; any size, grey or "
                       "colour; 16-bit PNG and TIFF are read at their depth and scaled by their own range, darkest to "
                       "brightest) into a model folder. A share of the images is held out to set the threshold. A killed "
                       "fit continues with --resume MODEL.")
    _add_common(p)
    p.add_argument("--normal-dir", nargs="+", help="folder(s) or files of normal images")
    p.add_argument("--out", help="model folder to write (must be new or empty unless --overwrite)")
    p.add_argument("--resume", metavar="MODEL_DIR", help="continue the killed fit in MODEL_DIR with its saved settings")
    p.add_argument("--overwrite", action="store_true", help="replace the model already in --out")
    _add_settings(p, "detector", ("model", "train", "eval", "detector"), exclude=_FINAL_EVAL)
    p.add_argument("--outlier-dir", help="folder of real outlier images (Outlier Exposure) instead of shifted copies")

    p = sub.add_parser("score", formatter_class=fmt, help=_COMMAND_HELP["score"])
    _add_common(p)
    p.add_argument("--model", help="model folder")
    p.add_argument("inputs", nargs="*", help="image files or folders")
    p.add_argument("--out", default="scores.csv", help="CSV to write (rank, path, score, flagged)")
    p.add_argument("--overwrite", action="store_true", help="replace the CSV already at --out (never firm evaluate's "
                   "scores.csv)")
    p.add_argument("--threshold", type=float, help="override the model's threshold")
    p.add_argument("--maps", metavar="DIR", help="also write anomaly-map overlays (PNG) and index.csv to DIR, a new or "
                   "empty folder (firm report shows MODEL/maps); needs a model fitted with patch_bank > 0")

    p = sub.add_parser("report", formatter_class=fmt, help=_COMMAND_HELP["report"])
    _add_common(p)
    p.add_argument("run_dir", nargs="?", help="run or model folder (with scores.csv from firm evaluate, if any)")
    p.add_argument("--out", help="report folder (default: RUN_DIR/report)")
    p.add_argument("--overwrite", action="store_true", help="replace the report already in the folder")

    p = sub.add_parser("export", formatter_class=fmt, help=_COMMAND_HELP["export"])
    _add_common(p)
    p.add_argument("--model", help="model folder")
    p.add_argument("--out", help="export folder (default: MODEL/onnx)")
    p.add_argument("--overwrite", action="store_true", help="replace the export already in the folder")
    for name, (usage, title, required, main) in _FOLDER_HELP.items():
        _arrange_help(sub.choices[name], usage, title, required, main,
                      {"image_size": _fit_image_size_help()} if name == "fit" else {})
    return parser


# --help of the commands a folder user runs: their usage, the options they must give, the few
# they choose most often; every other option is listed after these, under "advanced".
_FOLDER_HELP = {
    "fit": ("firm fit --normal-dir DIR [DIR ...] --out MODEL [options]\n       firm fit --resume MODEL",
            "required (unless --resume)", ("normal_dir", "out"),
            ("resume", "overwrite", "epochs", "image_size", "method", "patch_bank", "target_fpr", "device", "config",
             "quiet")),
    "score": ("firm score --model MODEL INPUT [INPUT ...] [--out CSV] [options]", "required", ("model", "inputs"),
              ("out", "overwrite", "maps", "threshold", "quiet")),
    "evaluate": ("firm evaluate --model MODEL --normal-dir DIR [DIR ...] --anomaly-dir DIR [DIR ...] [options]\n"
                 "       firm evaluate RUN_DIR [options]", "required (or RUN_DIR alone)",
                 ("model", "normal_dir", "anomaly_dir", "run_dir"),
                 ("out", "overwrite", "mask_dir", "quiet")),
}


def _fit_image_size_help() -> str:
    """What ``firm fit`` really does with --image-size: the preset's 32 px holds without the weights only."""
    d, m = PRESETS["detector"].detector, PRESETS["detector"].model
    return (f"side the images are resized to, with FIRM (default: the pretrained patch detector reads images at "
            f"--pretrained-size {d.pretrained_size} when their median shorter side reaches --large-image-size "
            f"{d.large_image_size}, smaller ones at --small-pretrained-size {d.small_pretrained_size}; without its "
            f"weights FIRM trains at {d.large_image_size} or {m.image_size} px; a size given here is always used, with "
            "FIRM)")


def _arrange_help(p: argparse.ArgumentParser, usage: str, title: str, required: tuple[str, ...], main: tuple[str, ...],
                  helps: dict[str, str] | None = None) -> None:
    """Order ``p``'s --help for a new user: ``required`` (under ``title``), then ``main``, then every
    other option under "advanced ..." groups; ``helps`` replaces an option's help text (where the
    preset's value is not what the command really uses)."""
    by_dest = {a.dest: a for a in p._actions}
    for dest, text in (helps or {}).items():
        by_dest[dest].help = text
    if "run_dir" in required:  # evaluate's other form, which takes none of the options beside it
        by_dest["run_dir"].help = f"instead of --model and the folders: {by_dest['run_dir'].help}"
    placed = {"help", *required, *main}
    old = list(p._action_groups)
    first = p.add_argument_group(title)
    first._group_actions = [by_dest[d] for d in required]
    common = p.add_argument_group("options")
    common._group_actions = [by_dest[d] for d in ("help", *main)]
    for group in old:
        group._group_actions = [a for a in group._group_actions if a.dest not in placed]
        group.title = "advanced options" if group.title in ("options", "positional arguments") else f"advanced: {group.title}"
    p._action_groups = [first, common] + [g for g in old if g._group_actions]
    p.usage = usage


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[command]


def _yaml_option(action: argparse.Action, value):
    """The value of an option (not a setting) from a --config file, in the form the command line
    gives it; a ValueError naming the option when its shape is wrong (``normal_dir: good`` where
    a list of folders is expected would otherwise be read letter by letter)."""
    name = action.dest
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return value
    if action.nargs in ("+", "*"):
        if not isinstance(value, list) or any(isinstance(v, (list, dict)) for v in value):
            raise ValueError(f"{name} must be a list, e.g. {name}: [{value if isinstance(value, str) else '...'}]; "
                             f"got {value!r}")
        return [str(v) for v in value]
    if isinstance(value, list) and getattr(action.type, "__name__", "") == "list":
        value = ",".join(map(str, value))  # a comma-list option written as a YAML list
    if isinstance(value, (list, dict)):
        raise ValueError(f"{name} must be a single value, got {value!r}")
    return value if value is None or isinstance(value, bool) else str(value)  # strings are parsed as on the command line


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace, Settings | None]:
    """Parse the command line; return the options and, for commands with settings, the settings
    (preset, then YAML, then flags)."""
    args = parser.parse_args(argv)
    if not args.command:
        return args, None
    sub = _subparser(parser, args.command)
    dests = {a.dest for a in sub._actions}
    yaml_settings: dict = {}
    if getattr(args, "config", None):
        import yaml
        path = Path(args.config)
        if not path.is_file():
            parser.error(f"--config {path}: no such file")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            parser.error(f"--config {path} is not valid YAML: {e}")
        if not isinstance(values, dict):
            parser.error(f"--config {path} must be a mapping of option names to values")
        options = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name in GROUPS and isinstance(value, dict):
                yaml_settings.update({k: v for k, v in value.items() if k in dests})
                unknown = sorted(set(value) - dests)
                if unknown:
                    parser.error(f"--config {path}: firm {args.command} has no setting(s) {', '.join(unknown)}")
            elif name in dests and name not in ("config", "command"):
                (yaml_settings if name in _SETTINGS_NAMES else options)[name] = value
            else:
                parser.error(f"--config {path}: unknown option {key!r} for firm {args.command}")
        actions = {a.dest: a for a in sub._actions}
        try:
            options = {name: _yaml_option(actions[name], value) for name, value in options.items()}
        except ValueError as e:
            sub.error(f"--config {path}: {e}")
        sub.set_defaults(**options)
        args = parser.parse_args(argv)
    if "preset" not in dests:
        return args, None
    given = {k: v for k, v in vars(args).items() if k in _SETTINGS_NAMES and v is not None}
    try:
        settings = apply_overrides(preset(args.preset), yaml_settings)
        # The flags were checked as they were parsed; the --config file's values are checked here,
        # so an unknown name fails at parse time wherever it was given.
        for name in yaml_settings:
            group = getattr(settings, field_group(name))
            setattr(group, name, _checked(name, getattr(group, name)))
    except (SettingsError, ValueError) as e:
        sub.error(f"--config {args.config}: {e}")
    try:
        settings = apply_overrides(settings, given)
        from .runner import validate
        validate(settings)  # every name and range, before any command reads an image
    except SettingsError as e:
        sub.error(str(e))
    args.given_settings = given
    return args, settings


def _require(args, *names: str) -> None:
    missing = [n for n in names if not getattr(args, n, None)]
    if missing:
        flag = "--" + missing[0].replace("_", "-")
        raise SystemExit(f"firm {args.command}: missing {flag} (give it on the command line or in --config)")


def _progress(args) -> bool:
    """Progress bars only on a terminal: a log file gets no carriage returns or cursor moves."""
    return not args.quiet and sys.stderr.isatty()


def _rank() -> int:
    """This process's rank under torchrun (0 alone)."""
    return int(os.environ.get("RANK", "0"))


def _check_resume_flags(args, saved: Settings) -> None:
    """A resumed run keeps its settings: refuse flags that would change them, naming each."""
    conflicts = []
    for name, value in args.given_settings.items():
        group = field_group(name)
        current = getattr(getattr(saved, group), name)
        if getattr(getattr(apply_overrides(saved, {name: value}), group), name) != current:
            conflicts.append(f"--{name.replace('_', '-')} {_show(value)} (the run has {_show(current)})")
    if conflicts:
        raise ValueError(f"--resume keeps the run's saved settings; drop {'; '.join(conflicts)}, "
                         "or start a new run folder")


@contextlib.contextmanager
def _discarded_if_unstarted(args, out: Path, new_folder: bool):
    """A new run that fails before its first epoch (no readable image, say) leaves nothing
    behind (nor the folder, when ``new_folder``), so that the same command can be run again."""
    try:
        yield
    except Exception:
        if not args.resume and _rank() == 0:
            from .rundir import discard_unstarted
            discard_unstarted(out, remove_folder=new_folder)
        raise


def cmd_train(args, settings: Settings) -> None:
    from .detector import FIRMDetector
    from .rundir import prepare_output, read_run_settings, train_files, write_run_settings
    from .runner import run, validate
    if args.resume:
        out, new_folder = prepare_output(args.resume, resume=True, flag="--resume"), False
        settings, _ = read_run_settings(out)
        _check_resume_flags(args, settings)
        validate(settings)  # a run.json edited by hand is checked before anything is trained
    else:
        _require(args, "out")
        if args.preset == "paper" and settings.train.device in ("auto", "cpu"):
            from .training import resolve_device
            if resolve_device(settings.train.device).type == "cpu":
                print("note: --preset paper is the authors' 2,000-epoch width-64 run; on a CPU it takes days "
                      "(use --preset cpu for minutes)", file=sys.stderr)
        # Under torchrun only rank 0 writes; the other ranks would find its files and refuse the folder.
        new_folder = not Path(args.out).exists()
        out = prepare_output(args.out, overwrite=args.overwrite) if _rank() == 0 else Path(args.out)
        if _rank() == 0:
            write_run_settings(out, settings)
    with _discarded_if_unstarted(args, out, new_folder):
        outcome = run(settings, files=train_files(out), resume=bool(args.resume), final_eval=False,
                      progress=_progress(args))
    if _rank() == 0:
        settings.train = outcome.trained.train
        FIRMDetector.from_encoder(outcome.trained.encoder, outcome.data.normal.images, settings,
                                  outcome.trained.history, progress=_progress(args)).save(out)
        print(f"model written to {out}")


def cmd_evaluate(args) -> None:
    from .inference import evaluate_model
    from .rundir import RESULTS, SCORES, check_output_folder
    check_output_folder(args.out or args.run_dir or args.model or ".", (RESULTS, SCORES), args.overwrite,
                        default=not args.out)
    records = evaluate_model(args.run_dir, args.model, args.normal_dir, args.anomaly_dir, args.data_root,
                             args.ood or [], args.scorers, args.final_tta,
                             args.out, progress=_progress(args), mask_dir=args.mask_dir)
    width = max(len(r["scorer"]) for r in records)
    print("AUROC: 1.0 = every anomaly scored above every normal image, 0.5 = chance")
    for r in sorted(records, key=lambda r: not r.get("own")):  # the detector's own score first
        extra = "".join(f"  {label} {r[k]:.4f}" for k, label in (("pixel_auroc", "pixel AUROC"), ("pro", "PRO"))
                        if r.get(k) is not None)
        auc = "n/a" if r["auroc"] is None else f"{r['auroc']:.4f}"
        own = "  <- the detector's own score (decision_function)" if r.get("own") else ""
        print(f"{r.get('eval_set', ''):10s} {r['scorer']:{width}s}  {r['tta']:8s}  AUROC {auc}{extra}{own}")
    print(f"results.json and scores.csv written to {args.out or args.run_dir or args.model}")


def cmd_demo(args) -> None:
    from .bench import plan_grid, run_grid
    from .serialization import write_json
    settings = apply_overrides(preset("demo"), {"epochs": args.epochs})
    specs = plan_grid(settings, ["digits"], None, ["firm", "ntxent"], [0])
    reused = []
    start = time.perf_counter()
    # A digits run is many small operations, at each of which two threads wait for each other:
    # several runs at once (one thread each on a small machine) use the cores better.
    results = run_grid(specs, settings, args.out, "demo", jobs=args.jobs, progress=_progress(args),
                       log=lambda m: reused.append(m) if m.startswith("skip") else print(m))
    results.sort(key=lambda r: (r["normal_class"], r["loss"]))
    wall = time.perf_counter() - start
    if reused:
        print(f"reused {len(reused)} of {len(specs)} runs finished earlier in {args.out} (not trained again; remove "
              "the folder or pass another --out to train them anew)")
    final = {(r["loss"], r["normal_class"]): x["auroc"] for r in results for x in r["records"]
             if x["final"] and x["scorer"] == "cos1" and x["tta"] == "none"}
    means = {loss: sum(values) / len(values) for loss in ("firm", "ntxent")
             if (values := [v for (k, _), v in final.items() if k == loss])}
    seconds = sum(r["total_seconds"] for r in results)
    write_json(Path(args.out) / "results.json", [x for r in results for x in r["records"]])
    digits = len({c for _, c in final})
    print(f"\nmean cos1 AUROC over {digits} digits ({args.epochs} epochs each; {seconds:.0f} s of training and scoring "
          f"over the runs, {wall:.0f} s wall): " + ", ".join(f"{k} {v:.4f}" for k, v in means.items()))
    print(f"results written to {Path(args.out) / 'results.json'}")


def cmd_bench(args, settings: Settings) -> None:
    from .bench import plan_grid, run_grid
    from .bench_report import write_report
    from .config import dump_yaml
    from .losses import resolve_mode
    classes = None if not args.classes else [c.strip() for c in args.classes.split(",") if c.strip()]
    budgets = [int(b) for b in args.epochs_ladder.split(",")] if args.epochs_ladder else None
    i, _, n = args.shard.partition("/")
    try:
        shard = (int(i), int(n or 1))
    except ValueError:
        raise ValueError(f"--shard expects i/n, e.g. 0/4; got {args.shard!r}") from None
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    specs = plan_grid(settings, [settings.data.dataset], classes, args.losses, seeds, budgets, shard)
    if args.dry_run:
        print(f"# firm bench --preset {args.preset}: resolved settings (losses, seeds, classes and budgets vary per run)")
        print(dump_yaml(settings))
        print("# layout per loss: " + ", ".join(f"{loss} {resolve_mode(loss, settings.train.loss_mode)}"
                                                for loss in args.losses))
        print(f"# {len(specs)} runs in this shard: " + " ".join(s.key for s in specs))
        return
    out = Path(args.out)
    if not args.report_only:
        run_grid(specs, settings, out, args.preset, jobs=args.jobs, threads=args.threads, progress=_progress(args))
    print(f"report written to {write_report(out, command=args.command_line)}")


def cmd_speed(args, settings: Settings) -> None:
    from .rundir import check_output_folder
    from .serialization import write_json
    from .speed import format_table, run_speed
    check_output_folder(args.out, ("speed.json",), args.overwrite)
    t = settings.train
    result = run_speed(t.device, settings.model.width, t.batch_size, t.amp, args.preset)
    path = Path(args.out) / "speed.json"
    write_json(path, result)
    print(format_table(result))
    print(f"written to {path}")


def cmd_fit(args, settings: Settings) -> None:
    from .detector import FIRMDetector
    from .rundir import prepare_output, read_run_settings, write_run_settings
    if args.resume:
        out, new_folder = prepare_output(args.resume, resume=True, flag="--resume"), False
        settings, extra = read_run_settings(out)
        _check_resume_flags(args, settings)
        FIRMDetector(settings)._resolved()  # a run.json edited by hand is checked before anything is read
        normal_dirs, outlier_dir = extra["normal_dir"], extra.get("outlier_dir")
    else:
        _require(args, "normal_dir", "out")
        FIRMDetector(settings)._resolved()  # refuse bad settings before anything is read or written
        new_folder = not Path(args.out).exists()
        out = prepare_output(args.out, overwrite=args.overwrite) if _rank() == 0 else Path(args.out)
        # absolute, so that --resume works from any working directory
        normal_dirs = [str(Path(p).resolve()) for p in args.normal_dir]
        outlier_dir = str(Path(args.outlier_dir).resolve()) if args.outlier_dir else None
        if _rank() == 0:
            write_run_settings(out, settings, {"normal_dir": normal_dirs, "outlier_dir": outlier_dir})
    det = FIRMDetector(settings, progress=_progress(args))
    with _discarded_if_unstarted(args, out, new_folder):
        det.fit(normal_dirs, outliers=outlier_dir, run_dir=out, resume=bool(args.resume))
    if _rank() != 0:
        return
    det.save(out)
    threshold = "none" if det.threshold_ is None else f"{det.threshold_:.4g}"
    for note in det.notes_:
        print(note)
    print(f"detector trained on {len(det.train_paths_)} images at {det.settings_.model.image_size} px, "
          f"threshold {threshold}, written to {out}")


def cmd_score(args) -> None:
    from .detector import FIRMDetector
    from .inference import score_to_csv
    from .rundir import check_output_file, prepare_output
    _require(args, "model", "inputs")
    out = check_output_file(args.out, args.overwrite)
    maps = Path(args.maps) if args.maps else None
    if maps is not None and maps.is_dir() and any(maps.iterdir()):
        raise FileExistsError(f"--maps {maps} is not empty; choose a new or empty folder for the overlays")
    det = FIRMDetector.load(args.model, progress=_progress(args))
    if maps is not None:
        det.check_maps()  # before the folder is created
        prepare_output(maps, flag="--maps")
    if args.threshold is not None:
        det.set_threshold(args.threshold)
    rows = score_to_csv(det, args.inputs, out, maps_dir=maps)
    flagged = sum(r["flagged"] for r in rows)
    written = f"; overlays and index.csv written to {maps}" if maps is not None else ""
    print(f"{len(rows)} images scored, {flagged} above the threshold; ranked CSV written to {out}{written}")


def cmd_report(args) -> None:
    from .report import REPORT_FILES, build_report
    from .rundir import REPORT, check_output_folder
    _require(args, "run_dir")
    out = check_output_folder(args.out or Path(args.run_dir) / REPORT, REPORT_FILES, args.overwrite, default=not args.out)
    print(f"report written to {build_report(args.run_dir, out, progress=_progress(args))}")


def cmd_export(args) -> None:
    from .export import EXPORT_FILES, export_onnx, require_onnx
    from .rundir import ONNX, check_output_folder
    _require(args, "model")
    require_onnx()
    out = check_output_folder(args.out or Path(args.model) / ONNX, EXPORT_FILES, args.overwrite, default=not args.out)
    summary = export_onnx(args.model, out)
    print(f"ONNX model written to {summary['path']}; max |score difference| vs PyTorch {summary['max_abs_diff']:.2e}")


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "demo": cmd_demo, "bench": cmd_bench, "speed": cmd_speed,
            "fit": cmd_fit, "score": cmd_score, "report": cmd_report, "export": cmd_export}


def _warning_line(message, category, filename, lineno, line=None) -> str:
    """Warnings as one line for the user, without the source line that raised them."""
    return f"firm: warning: {message}\n"


def _once(show):
    """``warnings.showwarning`` that shows each message once: a library warning raised for every
    scorer and ensemble (scikit-learn's, say) is one line, not ten."""
    shown = set()

    def show_once(message, category, filename, lineno, file=None, line=None):
        if str(message) not in shown:
            shown.add(str(message))
            show(message, category, filename, lineno, file, line)
    return show_once


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser() if argv[:1] and argv[0] in _COMMAND_HELP else _command_list()
    args, settings = _parse(parser, argv)
    args.command_line = shlex.join(["firm", *argv])  # what a report names as the command that wrote it
    if not args.command:
        parser.print_help()
        return 2
    from .serialization import ModelFileError
    from .training import TrainingError
    format_warning, warnings.formatwarning = warnings.formatwarning, _warning_line
    show_warning, warnings.showwarning = warnings.showwarning, _once(warnings.showwarning)
    try:
        command = COMMANDS[args.command]
        command(args, settings) if settings is not None else command(args)
    except KeyboardInterrupt:
        hint = " (continue with --resume)" if args.command in ("train", "fit") else ""
        start = "\n" if _progress(args) else ""  # end the line a progress bar was drawing
        print(f"{start}firm {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    except (OSError, ValueError, ModelFileError, TrainingError) as e:
        print(f"firm {args.command}: error: {e}", file=sys.stderr)
        return 1
    finally:
        warnings.formatwarning, warnings.showwarning = format_warning, show_warning
    return 0


if __name__ == "__main__":
    sys.exit(main())
