"""``firm report``: one self-contained HTML page about a trained model and its evaluation.

It reads what the other commands left in the folder: ``config.json`` (settings, threshold),
``log.jsonl`` (learning curve), ``scores.csv`` and ``results.json`` (from ``firm evaluate``) and
the feature bank. Figures are PNG files beside ``index.html`` and are also embedded in it as
data URIs, so the page can be mailed or archived on its own. Missing parts are named in the page
together with the command that produces them.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import os
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: never needs a display
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.ticker import MaxNLocator

from .maps import MAPS_INDEX
from .rundir import CONFIG as CONFIG_FILE
from .rundir import LOG, MAPS, check_state, load_model_dir
from .serialization import ModelFileError, atomic_write, read_json

__all__ = ["build_report", "REPORT_FILES", "short_names"]

REPORT_FILES = ("index.html", "*.png")
"""What ``firm report`` writes in its folder: the page and its figures."""

_NON_SCORE = {"index", "path", "label", "is_anomaly"}
_GRID = 8  # images per row of the most / least anomalous grids
_MAX_EMBED = 2000  # scored images in the projection: enough to see the clusters, cheap on a CPU
_COLOURS = {0: ("#2c7bb6", "normal"), 1: ("#d7191c", "anomalous")}


class _Page:
    """Collects HTML sections and writes each figure as a PNG file and an embedded image."""

    def __init__(self, out: Path):
        self.out, self.parts = out, []

    def figure(self, fig, name: str, caption: str) -> None:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        atomic_write(self.out / f"{name}.png", buf.getvalue())
        uri = base64.b64encode(buf.getvalue()).decode()
        self.parts.append(f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{uri}">'
                          f"<figcaption>{html.escape(caption)}</figcaption></figure>")

    def text(self, tag: str, content: str) -> None:
        self.parts.append(f"<{tag}>{html.escape(content)}</{tag}>")

    def table(self, rows: list[tuple], header: tuple) -> None:
        def cells(row: tuple, tag: str) -> str:
            return "".join(f"<{tag}>{html.escape(str(v))}</{tag}>" for v in row)
        body = "".join(f"<tr>{cells(r, 'td')}</tr>" for r in rows)
        self.parts.append(f"<table><tr>{cells(header, 'th')}</tr>{body}</table>")


def _read_scores(path: Path) -> tuple[list[dict], list[str]]:
    """The rows of ``firm evaluate``'s scores.csv and its score columns (``scorer:tta``). The
    ranking ``firm score`` writes is no evaluation: its ``rank`` is no score and ``flagged`` a
    prediction, not the truth, so such a file gives no rows."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "is_anomaly" not in rows[0]:
        return [], []
    columns = [c for c in rows[0] if c not in _NON_SCORE and ":" in c]
    return rows, columns


def short_names(paths: list[str]) -> list[str]:
    """Each path by its folder and file name (``crack/007.png``), with more parent folders only
    where that still leaves two paths the same name."""
    parts = [Path(p).parts for p in paths]
    for depth in range(2, max((len(q) for q in parts), default=2) + 1):
        names = ["/".join(q[-depth:]) for q in parts]
        if len(set(names)) == len(set(paths)):
            return names
    return [str(p) for p in paths]


def _evaluated_folders(rows: list[dict]) -> str:
    """Which folders ``firm evaluate`` scored, by label: ``ROOT: normal good (20); anomalous
    crack, scratch (40)``."""
    paths = [r["path"] for r in rows if r.get("path")]
    if not paths:
        return ""
    root = Path(os.path.commonpath([str(Path(p).parent) for p in paths]))
    parts = []
    for value, (_, name) in _COLOURS.items():
        chosen = [r["path"] for r in rows if r.get("path") and int(r["is_anomaly"]) == value]
        folders = sorted({str(Path(p).parent.relative_to(root)) for p in chosen})
        if chosen:
            listed = ", ".join(folders[:6]) + (f" and {len(folders) - 6} more" if len(folders) > 6 else "")
            parts.append(f"{name} {listed} ({len(chosen)} images)")
    return f"{root}: " + "; ".join(parts)


def _read_config(path: Path) -> dict:
    """config.json as the page reads it: the settings' groups, and ``detector`` with the scorer,
    ensemble, threshold and training files of the model. A detector fitted on image files has
    no dataset."""
    raw = read_json(path, "model config")
    if not isinstance(raw, dict):
        raise ModelFileError(f"model config {path} is not a JSON object")
    settings, state = raw.get("settings") or {}, check_state(raw.get("state") or {}, path)
    data = settings.get("data") or {}
    if str(data.get("dataset", "")).startswith("folder:"):
        data = {}
    ev = settings.get("eval") or {}
    return {**settings, "data": data,
            "detector": {**(settings.get("detector") or {}), "scorer": ev.get("scorer"), "tta": ev.get("tta"),
                         "threshold": state.get("threshold"), "train_paths": state.get("train_paths") or []}}


def _scored_images(rows: list[dict], wanted: list[int], config: dict,
                   size: int) -> tuple[list[int], torch.Tensor | None, str]:
    """Images of ``rows[wanted]`` (from their files, or the dataset's test split), the rows that
    could be read, and a note when some or all could not."""
    if "path" in rows[0]:
        from .data import load_image_folder
        exists = [i for i in wanted if Path(rows[i]["path"]).is_file()]
        if not exists:
            return [], None, "the scored image files are no longer at the paths in scores.csv"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # files that no longer decode are simply left out
            found = load_image_folder([rows[i]["path"] for i in exists], size)
        by_path = {p: k for k, p in enumerate(found.paths)}
        kept = [i for i in exists if rows[i]["path"] in by_path]
        note = f"{len(wanted) - len(kept)} scored image(s) could not be read" if len(kept) < len(wanted) else ""
        return kept, found.images[[by_path[rows[i]["path"]] for i in kept]], note
    data = config.get("data") or {}
    if not data.get("dataset"):
        return [], None, "scores.csv has neither image paths nor a dataset to take the images from"
    from .config import settings_from_dict
    from .runner import prepare_data
    try:
        settings = settings_from_dict({g: config[g] for g in ("data", "model", "train") if config.get(g)})
        sets = {name: images.images for name, images, _ in prepare_data(settings).eval_sets}
        images = [sets[rows[i].get("eval_set") or next(iter(sets))][int(rows[i]["index"])] for i in wanted]
    except (FileNotFoundError, ValueError, KeyError, IndexError) as e:
        return [], None, f"test images unavailable ({e}); set FIRM_DATA_ROOT to show them"
    return wanted, torch.stack(images) if images else None, ""


def _roc_and_histograms(page: _Page, scores: np.ndarray, labels: np.ndarray, column: str, threshold,
                        auc: float | None) -> None:
    from sklearn.metrics import roc_curve
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    if auc is not None:
        fpr, tpr, _ = roc_curve(labels, scores)
        axes[0].plot(fpr, tpr, color="#d7191c", lw=2, label=f"AUROC {auc:.4f}")
        if threshold is not None:
            axes[0].plot([np.mean(scores[labels == 0] > threshold)], [np.mean(scores[labels == 1] > threshold)], "ko",
                         label="threshold")
        axes[0].legend(loc="lower right")
    else:
        axes[0].text(0.5, 0.5, "needs normal and anomalous images", ha="center", va="center")
    axes[0].plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    axes[0].set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC ({column})", aspect="equal")
    bins = np.histogram_bin_edges(scores, bins=40)
    for value, (colour, name) in _COLOURS.items():
        if (labels == value).any():
            axes[1].hist(scores[labels == value], bins=bins, alpha=0.6, color=colour, label=f"{name} ({(labels == value).sum()})")
    if threshold is not None:
        axes[1].axvline(threshold, color="black", ls="--", label="threshold")
    axes[1].set(xlabel="anomaly score (higher = more anomalous)", ylabel="images", title="Score distributions")
    axes[1].xaxis.set_major_locator(MaxNLocator(6))  # scores are long decimals: fewer ticks keep them legible
    axes[1].legend(fontsize=8, framealpha=0.9)
    page.figure(fig, "roc_histogram", "ROC curve and score histograms of normal and anomalous test images")


def _learning_curve(page: _Page, log: list[dict]) -> None:
    fig, ax = plt.subplots(figsize=(11, 3.6))
    losses = [(r["epoch"], r["loss"]) for r in log if "loss" in r]  # epoch 0 (untrained) has an AUROC only
    if losses:
        ax.plot(*zip(*losses), "o-" if len(log) < 30 else "-", color="black", label="training loss")
    ax.set(xlabel="epoch", ylabel="loss", title="Learning curve")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    keys = sorted({k for r in log for k in r if k.startswith("auroc")})
    if keys:
        twin = ax.twinx()
        for key in keys:
            pts = [(r["epoch"], r[key]) for r in log if key in r]
            twin.plot(*zip(*pts), "o-", label=key)
        twin.set_ylabel("AUROC")
        twin.legend(loc="center right")
    ax.legend(loc="upper right")
    page.figure(fig, "learning_curve", "Training loss per epoch" + (" and AUROC during training" if keys else ""))


def _grid(page: _Page, images: torch.Tensor, rows: list[dict], kept: list[int], scores: np.ndarray) -> None:
    fig, axes = plt.subplots(2, _GRID, figsize=(11, 4.0))
    groups = [("most anomalous", kept[:_GRID]), ("least anomalous", kept[::-1][:_GRID])]
    position = {i: n for n, i in enumerate(kept)}
    shown = [i for _, idx in groups for i in idx]
    names = dict(zip(shown, short_names([rows[i]["path"] for i in shown]))) if "path" in rows[0] else {}
    for ax_row, (title, idx) in zip(axes, groups):
        for ax, i in zip(ax_row, idx + [None] * _GRID):
            ax.set_axis_off()
            if i is None:
                continue
            ax.imshow(images[position[i]].permute(1, 2, 0).numpy())
            colour, name = _COLOURS[int(rows[i]["is_anomaly"])]
            ax.set_title(f"{scores[i]:.3f} {name}" + (f"\n{_clip(names[i])}" if i in names else ""), fontsize=7,
                         color=colour)
        ax_row[0].text(-0.15, 0.5, title, transform=ax_row[0].transAxes, rotation=90, va="center", ha="right", fontsize=9)
    page.figure(fig, "extremes", "Most (top row) and least (bottom row) anomalous test images: score, true label "
                                 "and folder / file")


def _clip(name: str, width: int = 22) -> str:
    """A name that fits under a grid image: its end, where the folder and file are."""
    return name if len(name) <= width else "..." + name[-(width - 3):]


def _projection(page: _Page, model, bank: torch.Tensor, queries: torch.Tensor | None, labels: np.ndarray | None,
                progress: bool) -> None:
    from sklearn.decomposition import PCA

    from .features import extract_features
    def unit(x: torch.Tensor) -> np.ndarray:  # the scorers compare directions, so project those
        return torch.nn.functional.normalize(x.float(), dim=1).numpy()

    pca = PCA(n_components=2).fit(unit(bank))
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.scatter(*pca.transform(unit(bank)).T, s=6, c="#bbbbbb", label=f"feature bank ({len(bank)} training images)")
    if queries is not None:
        feats = extract_features(model, queries, "none", query=True, progress=progress).features[0, 0]
        xy = pca.transform(unit(feats))
        for value, (colour, name) in _COLOURS.items():
            mask = labels == value
            ax.scatter(*xy[mask].T, s=10, c=colour, alpha=0.7, label=f"{name} test images ({mask.sum()})")
    ax.set(xlabel="PC 1", ylabel="PC 2", title="Embedding projection (PCA of L2-normalised backbone features, rotation 0)")
    ax.legend(fontsize=8)
    page.figure(fig, "embedding", "2-D PCA projection of the features")


def _anomaly_maps(page: _Page, maps_dir: Path, rows: list[dict]) -> None:
    """The most anomalous images' heat-map overlays from a folder written by
    :func:`firm.maps.save_overlays` (its ``index.csv``), titled with the map maximum, the file
    name and, when scores.csv knows the image, its true label."""
    from PIL import Image

    from .maps import read_overlay_index
    shown = read_overlay_index(maps_dir)[:2 * _GRID]
    if not shown:
        page.text("p", f"{maps_dir / MAPS_INDEX} lists no overlay file that is still there.")
        return
    labels = {r["path"]: int(r["is_anomaly"]) for r in rows if r.get("path") and r.get("is_anomaly") not in (None, "")}
    names = short_names([row["name"] for row in shown])
    lines = (len(shown) + _GRID - 1) // _GRID
    fig, axes = plt.subplots(lines, _GRID, figsize=(11, 1.8 * lines), squeeze=False)
    for ax, row, short in zip(axes.ravel(), shown + [None] * (lines * _GRID - len(shown)), names + [""] * _GRID):
        ax.set_axis_off()
        if row is None:
            continue
        with Image.open(maps_dir / row["file"]) as im:
            ax.imshow(np.asarray(im.convert("RGB")))
        colour, name = _COLOURS.get(_label_of(row["name"], labels), ("black", ""))
        ax.set_title(f"{row['score']:.3f} {name}\n{_clip(short)}", fontsize=7, color=colour)
    page.figure(fig, "anomaly_maps", f"The {len(shown)} most anomalous images by anomaly map (red = anomalous): "
                                     "map maximum, true label where known, folder / file")


def _label_of(name: str, labels: dict[str, int]) -> int | None:
    """The true label of an overlay's image: ``name`` is its path as ``firm score`` was given it
    (relative to where it ran), ``labels`` maps scores.csv's absolute paths; the label of the one
    path that ends with ``name``, or None."""
    if name in labels:
        return labels[name]
    parts = Path(name).parts
    found = {v for path, v in labels.items() if Path(path).parts[-len(parts):] == parts}
    return found.pop() if len(found) == 1 else None


def _summary(config: dict, records: list[dict], threshold, scores, labels, auc, column,
             scored: list[dict] = ()) -> list[tuple]:
    det, data, model, train = (config.get(k) or {} for k in ("detector", "data", "model", "train"))
    n_files = len(det.get("train_paths") or [])
    encoder = f"ResNet-18 width {model.get('width')}, head {model.get('head_layers')} x {model.get('head_hidden')}"
    rows = [("dataset", f"{data['dataset']}, normal class {data.get('normal_class')}") if data.get("dataset") else
            ("trained on", f"{n_files} image files" if n_files else "images passed as an array"),
            ("loss / epochs", f"{det.get('loss', train.get('loss', '?'))} / {train.get('epochs', det.get('epochs', '?'))}"),
            ("encoder", f"{encoder}, {model.get('image_size')} px images"),
            ("scorer / tta", f"{det.get('scorer')} / {det.get('tta')}"),
            ("threshold", "none" if threshold is None else f"{threshold:.6g}")]
    if evaluated := _evaluated_folders(list(scored)):
        rows.append(("evaluated on", evaluated))
    if threshold is not None and scores is not None:
        rows.append(("flagged at the threshold", ", ".join(f"{np.mean(scores[labels == v] > threshold):.0%} of {name} images"
                                                           for v, (_, name) in _COLOURS.items() if (labels == v).any())))
    plotted = [r for r in records if f"{r.get('scorer')}:{r.get('tta', 'none')}" == column]
    if auc is not None and not plotted:
        rows.append((f"AUROC {column} (from scores.csv, plotted)", f"{auc:.4f}"))
    def label(r: dict) -> str:
        notes = (["the detector's own score"] if r.get("own") else []) + (["plotted"] if r in plotted else [])
        return f"AUROC {r['scorer']} / {r.get('tta', 'none')}" + (f" ({', '.join(notes)})" if notes else "")
    rows += [(label(r), f"{r['auroc']:.4f}") for r in records if r.get("auroc") is not None]
    return rows + [(f"{label} {r['scorer']}", f"{r[k]:.4f}") for r in records
                   for k, label in (("pixel_auroc", "pixel AUROC"), ("pro", "PRO")) if r.get(k) is not None]


def build_report(run_dir: str | Path, out: str | Path | None = None, progress: bool = True,
                 maps: str | Path | None = None) -> Path:
    """Write ``out/index.html`` (default RUN_DIR/report/) and its PNG figures; returns the HTML path.

    ``maps``: a folder of anomaly-map overlays (:func:`firm.maps.save_overlays`) to show; by
    default RUN_DIR/maps/ when it holds them."""
    run_dir = Path(run_dir)
    present = {name: (run_dir / name).exists() for name in (CONFIG_FILE, LOG, "scores.csv", "results.json")}
    if not any(present.values()):
        raise FileNotFoundError(f"{run_dir} holds no model, log or scores: pass a folder written by firm train or firm fit")
    out = Path(out) if out is not None else run_dir / "report"
    config = _read_config(run_dir / CONFIG_FILE) if present[CONFIG_FILE] else {}
    det = config.get("detector") or {}
    threshold = det.get("threshold")
    records = json.loads((run_dir / "results.json").read_text()) if present["results.json"] else []
    log = [json.loads(line) for line in (run_dir / LOG).read_text().splitlines() if line.strip()] if present[LOG] else []
    rows, columns = _read_scores(run_dir / "scores.csv") if present["scores.csv"] else ([], [])
    notes, column, scores, labels, auc = [], None, None, None, None
    if rows and columns:
        own = [c for c in columns if c.startswith("detector:")]  # the detector's own score, on its threshold's scale
        configured = own[0] if own else f"{det.get('scorer')}:{det.get('tta')}"
        column = configured if configured in columns else columns[0]
        threshold = threshold if column == configured else None  # the threshold belongs to the configured score
        scores = np.array([float(r[column]) for r in rows])
        labels = np.array([int(r["is_anomaly"]) for r in rows])
        if labels.min() != labels.max():
            from sklearn.metrics import roc_auc_score
            auc = float(roc_auc_score(labels, scores))
    else:
        evaluate = f"firm evaluate {run_dir}" if (config.get("data") or {}).get("dataset") else \
            f"firm evaluate --model {run_dir} --normal-dir NORMAL_DIR --anomaly-dir ANOMALY_DIR"
        notes.append(f"No scores.csv of firm evaluate in this folder: run `{evaluate}` to add the ROC curve, score histograms, "
                     "image grids, test images in the projection and the AUROC figures.")
    if not config:
        notes.append(f"No {CONFIG_FILE}: training has not finished; `firm train --resume {run_dir}` completes it.")
    elif not log:
        notes.append(f"No {LOG}: the learning curve is missing (firm train and firm fit write it).")

    page = _Page(out)
    if config:
        page.text("h2", "Summary")
        page.table(_summary(config, records, threshold, scores, labels, auc, column, rows), ("setting", "value"))
    if scores is not None:
        page.text("h2", "Scores")
        _roc_and_histograms(page, scores, labels, column, threshold, auc)
    if log:
        page.text("h2", "Training")
        _learning_curve(page, log)
    if config and (run_dir / "bank.safetensors").exists():
        model, _, _, bank = load_model_dir(run_dir)
        queries = query_labels = None
        if scores is not None:
            # read only the images shown: the extremes for the grid and a seeded sample for the projection
            order = [int(i) for i in np.argsort(-scores, kind="stable")]
            sample = set(np.random.default_rng(0).permutation(len(rows))[:_MAX_EMBED].tolist())
            wanted = [i for i in order if i in sample or i in order[:_GRID] or i in order[-_GRID:]]
            kept, images, note = _scored_images(rows, wanted, config, model.config.image_size)
            notes += [note] if note else []
            if images is not None:
                page.text("h2", "Most and least anomalous images")
                _grid(page, images, rows, kept, scores)
                pick = [n for n, i in enumerate(kept) if i in sample]
                queries, query_labels = images[pick], labels[[kept[n] for n in pick]]
        page.text("h2", "Embeddings")
        _projection(page, model, bank[0, 0], queries, query_labels, progress)
    maps_dir = Path(maps) if maps is not None else run_dir / MAPS
    if (maps_dir / MAPS_INDEX).is_file():
        page.text("h2", "Anomaly maps")
        _anomaly_maps(page, maps_dir, rows)
    elif maps is not None:
        notes.append(f"{maps_dir} holds no anomaly maps ({MAPS_INDEX} from firm score --maps is missing).")
    title = html.escape(f"FIRM report: {run_dir.resolve().name}")
    head = [f"<h1>{title}</h1>", f'<p class="meta">{html.escape(str(run_dir.resolve()))}</p>']
    head += [f'<p class="note">{html.escape(n)}</p>' for n in notes]
    atomic_write(out / "index.html", _HTML.format(title=title, body="\n".join(head + page.parts)))
    return out / "index.html"


_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1150px; margin: 1.5em auto; padding: 0 1em; color: #222; }}
h1 {{ font-size: 1.6em; }} h2 {{ border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 1.6em; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ddd; padding: .3em .8em; text-align: left; }}
th {{ background: #f3f3f3; }} figure {{ margin: 1em 0; }} img {{ max-width: 100%; height: auto; }}
figcaption, .meta {{ color: #666; font-size: .9em; }}
.note {{ background: #fff6d6; border-left: 4px solid #e0b000; padding: .5em .8em; }}
</style></head><body>
{body}
</body></html>
"""
