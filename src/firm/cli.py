"""The ``firm`` command: one subcommand per job; ``firm SUBCOMMAND --help`` explains each option.

Every subcommand takes ``--config FILE.yaml`` whose keys are its long options (``batch_size``
or ``batch-size``); options given on the command line override the file.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]


def _csv(value) -> list[str]:
    """A comma-separated string (from a flag) or a list (from YAML) as a list of strings."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [v.strip() for v in str(value).split(",") if v.strip()]


def _bool(value: str) -> bool:
    if isinstance(value, bool):
        return value
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected on/off, got {value!r}")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML file with option values (keys are the long options); "
                   "options on the command line override it")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="cifar10", help="cifar10, cifar100 (20 superclasses), fashionmnist, mnist or digits")
    p.add_argument("--data-root", help="folder holding the dataset files (or set FIRM_DATA_ROOT)")


def _add_model(p: argparse.ArgumentParser, paper: bool) -> None:
    g = p.add_argument_group("encoder")
    g.add_argument("--width", type=int, default=64 if paper else 16, help="ResNet-18 base width (64 = the paper)")
    g.add_argument("--head-hidden", type=int, default=1024 if paper else 512, help="projection head hidden width")
    g.add_argument("--head-layers", type=int, default=7 if paper else 2, help="projection head hidden layers")
    g.add_argument("--head-out", type=int, default=128, help="projection dimension")


def _add_training(p: argparse.ArgumentParser, paper: bool) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--loss", default="firm", choices=["firm", "ntxent", "supcon", "rotsupcon"], help="contrastive loss")
    g.add_argument("--epochs", type=int, default=2000 if paper else 30, help="training epochs")
    g.add_argument("--batch-size", type=int, default=32 if paper else 64, help="global batch size (inliers + outliers)")
    g.add_argument("--lr", type=float, default=0.01 if paper else 0.02, help="peak learning rate of the one-cycle schedule")
    g.add_argument("--tau", type=float, default=0.2, help="temperature of the contrastive loss")
    g.add_argument("--id-share", type=float, default=None, help="share of inliers per batch (default: the authors' pool, "
                   "every image once plus once per shift variant, i.e. 1/4 with rotations)")
    g.add_argument("--shifts", default="rotation", help="synthetic outliers: comma list of rotation, cutpaste, "
                   "cutpaste_scar, permutation, hflip")
    g.add_argument("--outlier-dir", help="folder of real outlier images (Outlier Exposure) instead of shifted copies")
    g.add_argument("--seed", type=int, default=0, help="random seed (data order, augmentations, initialisation)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--amp", type=_bool, default=False, metavar="on|off", help="bf16 autocast (pays on recent GPUs)")
    g.add_argument("--channels-last", type=_bool, default=True, metavar="on|off", help="channels-last memory layout")
    g.add_argument("--compile", type=_bool, default=False, metavar="on|off", help="torch.compile the encoder")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="firm", description="FIRM contrastive anomaly detection: train, score, "
                                     "evaluate, benchmark and export.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"firm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train on a dataset's normal class (one-class protocol)",
                       description="Train an encoder on one class of a standard dataset; writes RUN_DIR/model.safetensors, "
                       "config.json, bank.safetensors, log.jsonl and checkpoints. Defaults are the paper's setting.")
    _add_common(p)
    _add_data(p)
    p.add_argument("--normal-class", default="0", help="class index used as normal, or 'all' (multi-class ID)")
    p.add_argument("--train-images", type=int, help="train on a seeded subset of this many normal images")
    p.add_argument("--out", help="run folder to create")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the killed run in RUN_DIR with its saved settings")
    p.add_argument("--checkpoint-every", type=int, default=10, help="epochs between checkpoints (and at the end)")
    p.add_argument("--eval-every", type=int, default=0, help="log the test-split cos1 AUROC every N epochs "
                   "(a learning curve for reports; never used to choose the model)")
    p.add_argument("--sync-bn", type=_bool, default=False, metavar="on|off", help="SyncBatchNorm under torchrun")
    p.add_argument("--scorer", default="cos1", help="scorer stored for firm score")
    p.add_argument("--tta", default="none", help="test-time ensemble stored for firm score: none, angled, ensemble")
    _add_model(p, paper=True)
    _add_training(p, paper=True)

    p = sub.add_parser("evaluate", help="AUROC of a trained model on its test split or on labelled folders",
                       description="Writes results.json (records with loss, scorer, tta, auroc) and per-image scores.csv.")
    _add_common(p)
    p.add_argument("run_dir", nargs="?", help="run folder written by firm train (scored on its dataset's test split)")
    p.add_argument("--model", help="model folder (firm fit / firm train) to evaluate on folders")
    p.add_argument("--normal-dir", nargs="+", help="folder(s) of normal test images")
    p.add_argument("--anomaly-dir", nargs="+", help="folder(s) of anomalous test images")
    p.add_argument("--data-root", help="override the data root stored in the run")
    p.add_argument("--scorers", default=None, help="comma list of scorers (default: all)")
    p.add_argument("--tta", default="none,angled", help="comma list of test-time ensembles: none, angled, ensemble")
    p.add_argument("--out", help="folder for results.json and scores.csv (default: the run or model folder)")

    p = sub.add_parser("demo", help="FIRM vs NT-Xent on scikit-learn's digits, no files needed (a few minutes on a CPU)")
    _add_common(p)
    p.add_argument("--out", default="runs/demo", help="folder for results.json")
    p.add_argument("--epochs", type=int, default=8, help="epochs per run")

    p = sub.add_parser("bench", help="the paper's comparison: classes x losses x seeds, resumable",
                       description="Train every class x loss x seed with the identical budget, record learning curves and "
                       "all scorers, and write results.json, report.md and curves.png. Rerunning skips finished runs.")
    _add_common(p)
    _add_data(p)
    p.add_argument("--classes", help="comma list of normal classes (default: all); 'all' alone = multi-class ID")
    p.add_argument("--losses", default="firm,ntxent,supcon,rotsupcon", help="comma list of losses")
    p.add_argument("--seeds", default="0", help="comma list of seeds")
    p.add_argument("--preset", default="cpu", choices=["cpu", "paper"], help="budget and architecture preset")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override preset entries, e.g. epochs=4")
    p.add_argument("--split", default="test", choices=["test", "validation"],
                   help="evaluate on the test split, or on a validation split of the training data (for tuning)")
    p.add_argument("--ood", help="comma list of OOD datasets or folders (multi-class-ID setting, with --classes all)")
    p.add_argument("--shard", default="0/1", help="i/n: run every n-th cell starting at i (share the grid)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--report-only", action="store_true", help="only rebuild the report from finished runs")
    p.add_argument("--out", default="runs/bench", help="bench folder")

    p = sub.add_parser("speed", help="measure training-step, loss and kNN throughput; writes speed.json")
    _add_common(p)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--width", type=int, default=16, help="encoder width")
    p.add_argument("--batch-size", type=int, default=256, help="training batch size")
    p.add_argument("--amp", type=_bool, default=False, metavar="on|off", help="bf16 autocast")
    p.add_argument("--head", default="cpu", choices=["cpu", "paper"], help="projection head: the cpu preset's or the paper's")
    p.add_argument("--out", default="runs/speed", help="folder for speed.json")

    p = sub.add_parser("fit", help="train a detector on a folder of normal images",
                       description="Fit a FIRMDetector on normal images (folders searched recursively; any size, grey or "
                       "colour) and save it to --out. A share of the images is held out to set the threshold.")
    _add_common(p)
    p.add_argument("--normal-dir", nargs="+", help="folder(s) or files of normal images")
    p.add_argument("--out", help="model folder to write")
    p.add_argument("--image-size", type=int, default=32, help="side images are resized to")
    p.add_argument("--scorer", default="cos1", help="scorer")
    p.add_argument("--tta", default="none", help="test-time ensemble: none, angled, ensemble")
    p.add_argument("--target-fpr", type=float, default=0.05, help="share of held-out normal images above the threshold")
    p.add_argument("--contamination", type=float, help="expected share of anomalies (sets the threshold instead)")
    p.add_argument("--holdout", type=float, default=0.1, help="share of normal images held out for the threshold")
    _add_model(p, paper=False)
    _add_training(p, paper=False)

    p = sub.add_parser("score", help="score images with a model; CSV ranked by anomaly score")
    _add_common(p)
    p.add_argument("--model", help="model folder")
    p.add_argument("inputs", nargs="*", help="image files or folders")
    p.add_argument("--out", default="scores.csv", help="CSV to write (path, score, is_anomaly)")
    p.add_argument("--threshold", type=float, help="override the model's threshold")

    p = sub.add_parser("report", help="HTML report with ROC, histograms, learning curve, image grids, embedding map")
    _add_common(p)
    p.add_argument("run_dir", nargs="?", help="run or model folder (with scores.csv from firm evaluate, if any)")
    p.add_argument("--out", help="report folder (default: RUN_DIR/report)")

    p = sub.add_parser("export", help="export the encoder to ONNX with its feature bank, and check parity")
    _add_common(p)
    p.add_argument("--model", help="model folder")
    p.add_argument("--out", help="export folder (default: MODEL/onnx)")
    return parser


def _apply_config(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse, then re-parse with the YAML file's values as defaults of the chosen subcommand."""
    args = parser.parse_args(argv)
    if not getattr(args, "config", None):
        return args
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
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    subparser = subparsers.choices[args.command]
    dests = {a.dest for a in subparser._actions}
    values = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - dests - {"config"})
    if unknown:
        parser.error(f"--config {path}: unknown option(s) {', '.join(unknown)} for firm {args.command}")
    subparser.set_defaults(**values)
    return parser.parse_args(argv)


def _require(args, *names: str) -> None:
    missing = [n for n in names if not getattr(args, n, None)]
    if missing:
        flag = "--" + missing[0].replace("_", "-")
        raise SystemExit(f"firm {args.command}: missing {flag} (give it on the command line or in --config)")


def _model_config(args):
    from .models import ModelConfig
    return ModelConfig(width=args.width, head_hidden=args.head_hidden, head_layers=args.head_layers,
                       head_out=args.head_out, image_size=getattr(args, "image_size", 32))


def cmd_train(args) -> None:
    from .runs import train_run
    from .training import TrainConfig
    if args.resume:
        path = train_run(args.resume, resume=True, progress=not args.quiet)
    else:
        _require(args, "out")
        cfg = TrainConfig(loss=args.loss, tau=args.tau, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                          id_share=args.id_share, shifts=_csv(args.shifts), seed=args.seed, device=args.device,
                          amp=args.amp, channels_last=args.channels_last, compile=args.compile, sync_bn=args.sync_bn,
                          checkpoint_every=args.checkpoint_every, eval_every=args.eval_every)
        normal = args.normal_class if str(args.normal_class) == "all" else int(args.normal_class)
        data = {"dataset": args.dataset, "data_root": args.data_root, "normal_class": normal,
                "train_images": args.train_images, "outlier_dir": args.outlier_dir}
        path = train_run(args.out, data, _model_config(args), cfg, {"scorer": args.scorer, "tta": args.tta},
                         progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"model written to {path}")


def cmd_evaluate(args) -> None:
    from .runs import evaluate_run
    records = evaluate_run(args.run_dir, args.model, args.normal_dir, args.anomaly_dir, args.data_root,
                           _csv(args.scorers) or None, _csv(args.tta), args.out, progress=not args.quiet)
    width = max(len(r["scorer"]) for r in records)
    for r in records:
        print(f"{r['scorer']:{width}s}  {r['tta']:8s}  AUROC {r['auroc']:.4f}")
    print(f"results.json and scores.csv written to {args.out or args.run_dir or args.model}")


def cmd_demo(args) -> None:
    from .runs import demo
    demo(args.out, args.epochs, progress=not args.quiet)


def cmd_bench(args) -> None:
    from .bench import bench_command
    bench_command(args)


def cmd_speed(args) -> None:
    from .speed import speed_command
    speed_command(args)


def cmd_fit(args) -> None:
    from .detector import FIRMDetector
    _require(args, "normal_dir", "out")
    det = FIRMDetector(loss=args.loss, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, width=args.width,
                       head_hidden=args.head_hidden, head_layers=args.head_layers, image_size=args.image_size,
                       shifts=args.shifts, id_share=args.id_share, scorer=args.scorer, tta=args.tta,
                       target_fpr=args.target_fpr, contamination=args.contamination, holdout=args.holdout,
                       seed=args.seed, device=args.device, progress=not args.quiet)
    det.fit(args.normal_dir, outliers=args.outlier_dir)
    det.save(args.out)
    print(f"detector trained on {len(det.train_paths_)} images, threshold {det.threshold_}, written to {args.out}")


def cmd_score(args) -> None:
    from .detector import score_to_csv
    _require(args, "model", "inputs")
    rows = score_to_csv(args.model, args.inputs, args.out, args.threshold, progress=not args.quiet)
    flagged = sum(r["is_anomaly"] for r in rows)
    print(f"{len(rows)} images scored, {flagged} above the threshold; ranked CSV written to {args.out}")


def cmd_report(args) -> None:
    from .report import build_report
    _require(args, "run_dir")
    path = build_report(args.run_dir, args.out, progress=not args.quiet)
    print(f"report written to {path}")


def cmd_export(args) -> None:
    from .export import export_onnx
    _require(args, "model")
    summary = export_onnx(args.model, args.out)
    print(f"ONNX model written to {summary['path']}; max |score difference| vs PyTorch {summary['max_abs_diff']:.2e}")


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "demo": cmd_demo, "bench": cmd_bench, "speed": cmd_speed,
            "fit": cmd_fit, "score": cmd_score, "report": cmd_report, "export": cmd_export}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = _apply_config(parser, sys.argv[1:] if argv is None else argv)
    if not args.command:
        parser.print_help()
        return 2
    from .serialization import ModelFileError
    from .training import TrainingError
    try:
        COMMANDS[args.command](args)
    except (FileNotFoundError, ValueError, ModelFileError, TrainingError) as e:
        print(f"firm {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
