"""Image data: readers for the standard on-disk layouts, image folders and arrays, and the
one-class protocol.

Everything is held as uint8 tensors ``(N, C, H, W)`` (small enough to live on the training
device) and converted to the model's input (3 x 32 x 32 by default) once, when read.
"""
from __future__ import annotations

import gzip
import os
import pickle
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import Registry

__all__ = [
    "ImageSet", "DatasetEntry", "DATASETS", "SPLITS", "ALL_CLASSES", "canonical_dataset", "DATA_ROOT_ENV",
    "resolve_data_root", "load_dataset", "as_images", "as_nchw",
    "load_image_folder", "eight_bit", "find_images", "image_shape", "is_paths", "image_sides", "median_side", "read_images",
    "subsample", "one_class_split", "validation_split", "IMAGE_EXTENSIONS", "FolderLayout", "LAYOUTS", "folder_layout",
    "is_defect_folder", "load_defect_dataset", "read_masks", "normal_classes",
]

DATA_ROOT_ENV = "FIRM_DATA_ROOT"
ALL_CLASSES = "all"
"""``normal_class`` that makes every class of a dataset normal (the multi-class-ID setting)."""
_CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
_CIFAR100_SUPERCLASSES = [
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables", "household_electrical_devices",
    "household_furniture", "insects", "large_carnivores", "large_man-made_outdoor_things",
    "large_natural_outdoor_scenes", "large_omnivores_and_herbivores", "medium_mammals", "non-insect_invertebrates",
    "people", "reptiles", "small_mammals", "trees", "vehicles_1", "vehicles_2"]
_FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                    "Ankle boot"]
_DIGIT_CLASSES = [str(i) for i in range(10)]
_DEFECT_CLASSES = ["good", "defect"]
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")


@dataclass
class ImageSet:
    """Images as uint8 ``(N, C, H, W)``, integer labels, class names, (for files) paths and (for
    defect sets) ground-truth masks, uint8 0 / 1 ``(N, H, W)``."""

    images: Tensor
    labels: Tensor
    classes: list[str]
    name: str = ""
    paths: list[str] = field(default_factory=list)
    masks: Tensor | None = None

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index: Tensor | np.ndarray | list[int]) -> "ImageSet":
        index = torch.as_tensor(index, dtype=torch.long)
        paths = [self.paths[i] for i in index.tolist()] if self.paths else []
        masks = None if self.masks is None else self.masks[index]
        return ImageSet(self.images[index], self.labels[index], self.classes, self.name, paths, masks)


def image_shape(size: int | tuple[int, int]) -> tuple[int, int]:
    """``(height, width)`` of a size given as one side (square) or as ``(height, width)``."""
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if h < 1 or w < 1:
        raise ValueError(f"image size must be a positive number of pixels, got {size}")
    return h, w


def input_shape(size: int, aspect: float = 1.0, multiple: int = 8) -> tuple[int, int]:
    """``(height, width)`` with shorter side ``size`` and width / height about ``aspect``, the
    longer side rounded to a multiple of ``multiple`` pixels."""
    if aspect == 1:
        return size, size
    long = max(size, int(round(size * max(aspect, 1 / aspect) / multiple)) * multiple)
    return (size, long) if aspect > 1 else (long, size)


def resize_images(images: Tensor, size: int | tuple[int, int], channels: int = 3) -> Tensor:
    """uint8 ``(N, C, H, W)`` to ``(N, channels, height, width)`` (``size``: one side, or
    ``(height, width)``): antialiased bilinear resize to exactly that shape, so no part of the
    image is cut off; grey is replicated to RGB."""
    c = images.shape[1]
    if c not in (1, 3) or channels not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {c} (model expects {channels})")
    shape = image_shape(size)
    if tuple(images.shape[-2:]) != shape:
        out = []
        for chunk in images.split(4096):
            x = F.interpolate(chunk.float(), size=shape, mode="bilinear", antialias=True, align_corners=False)
            out.append(x.round().clamp(0, 255).to(torch.uint8))
        images = torch.cat(out) if out else images.new_zeros(0, c, *shape)
    if c == 1 and channels == 3:
        images = images.expand(-1, 3, -1, -1)
    elif c == 3 and channels == 1:
        images = (images.float() * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        images = images.round().clamp(0, 255).to(torch.uint8)
    return images.contiguous()


def as_nchw(array, name: str = "images") -> Tensor:
    """An array or tensor of images ``(N, H, W)``, ``(N, H, W, C)`` or ``(N, C, H, W)`` (C in 1, 3,
    4) as a CPU tensor ``(N, C, H, W)``, values and size untouched; other shapes are refused."""
    x = torch.as_tensor(np.asarray(array) if not isinstance(array, Tensor) else array).detach().cpu()
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if x.ndim != 4:
        raise ValueError(f"{name}: expected a batch of images (N, H, W), (N, H, W, C) or (N, C, H, W); "
                         f"got shape {tuple(x.shape)}")
    if x.shape[1] not in (1, 3, 4) and x.shape[-1] in (1, 3, 4):
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] not in (1, 3, 4):
        raise ValueError(f"{name}: {x.shape[1]} channels cannot be read as grey, RGB or RGBA (shape {tuple(x.shape)}); "
                         "pass images with 1, 3 or 4 channels")
    return x


def as_images(array, size: int | tuple[int, int] = 32, channels: int = 3, name: str = "images") -> Tensor:
    """An array or tensor of images in any common layout as uint8 ``(N, channels, height, width)``
    (``size``: one side, or ``(height, width)``).

    Accepts ``(N, H, W)`` grey, ``(N, H, W, C)`` or ``(N, C, H, W)`` with C in 1, 3 or 4 (alpha
    dropped, with a warning); uint8, or floats in [0, 1]. Other sizes are resized. Anything that
    cannot be converted without guessing is refused with a message naming ``name``.
    """
    x = as_nchw(array, name)
    if x.shape[1] == 4:
        warnings.warn(f"{name}: dropping the alpha channel of RGBA images", stacklevel=2)
        x = x[:, :3]
    if x.dtype.is_floating_point:
        lo, hi = (float(x.min()), float(x.max())) if x.numel() else (0.0, 1.0)
        if lo < 0 or hi > 1:
            raise ValueError(f"{name}: float images must lie in [0, 1], got values in [{lo:.3g}, {hi:.3g}]; "
                             "pass uint8 images or divide by 255")
        x = (x * 255).round().to(torch.uint8)
    elif x.dtype != torch.uint8:
        if x.numel() and (int(x.min()) < 0 or int(x.max()) > 255):
            raise ValueError(f"{name}: integer images must lie in [0, 255], got [{int(x.min())}, {int(x.max())}]")
        x = x.to(torch.uint8)
    if len(x) == 0:
        raise ValueError(f"{name}: no images (the array is empty)")
    return resize_images(x, size, channels)


def resolve_data_root(data_root: str | os.PathLike | None) -> Path:
    """The data folder: the argument, else ``$FIRM_DATA_ROOT``; a clear error when neither exists."""
    root = data_root or os.environ.get(DATA_ROOT_ENV)
    if not root:
        raise FileNotFoundError(f"no data root given: pass --data-root DIR (or set {DATA_ROOT_ENV}) to the folder "
                                "that holds cifar-10-batches-py/, FashionMNIST/raw/ etc.")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"data root {path} does not exist or is not a folder; pass --data-root to an existing folder")
    return path


def _find(root: Path, folder: str, files: list[str], dataset: str) -> Path:
    """``root/folder`` (or root itself, when the user pointed at the folder) holding ``files``."""
    for candidate in (root / folder, root):
        if all((candidate / f).exists() or (candidate / (f + ".gz")).exists() for f in files):
            return candidate
    raise FileNotFoundError(
        f"{dataset} not found under {root}: expected {root / folder}/ with {', '.join(files)} "
        f"(the layout torchvision's download creates). Point --data-root at the folder that holds {folder}/."
    )


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler for dataset files that builds numpy arrays and builtins only, never code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("builtins", "list"), ("builtins", "dict")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"dataset file refers to {module}.{name}, which a data file never needs")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return _ArrayUnpickler(f, encoding="latin1").load()


def _cifar_images(rows: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(rows, dtype=np.uint8).reshape(-1, 3, 32, 32))


def load_cifar10(root: Path) -> tuple[ImageSet, ImageSet]:
    folder = _find(root, "cifar-10-batches-py", ["data_batch_1", "test_batch"], "CIFAR-10")
    classes = _unpickle(folder / "batches.meta")["label_names"] if (folder / "batches.meta").exists() else \
        _CIFAR10_CLASSES
    batches = [_unpickle(folder / f"data_batch_{i}") for i in range(1, 6) if (folder / f"data_batch_{i}").exists()]
    test = _unpickle(folder / "test_batch")
    train_set = ImageSet(_cifar_images(np.concatenate([b["data"] for b in batches])),
                         torch.tensor(sum((list(b["labels"]) for b in batches), []), dtype=torch.long), classes, "cifar10")
    test_set = ImageSet(_cifar_images(test["data"]), torch.tensor(test["labels"], dtype=torch.long), classes, "cifar10")
    return train_set, test_set


def load_cifar100(root: Path) -> tuple[ImageSet, ImageSet]:
    """CIFAR-100 with its 20 superclasses ("coarse labels") as the classes (the paper's CIFAR-100-20)."""
    folder = _find(root, "cifar-100-python", ["train", "test"], "CIFAR-100")
    meta = _unpickle(folder / "meta") if (folder / "meta").exists() else {}
    classes = meta.get("coarse_label_names", _CIFAR100_SUPERCLASSES)
    sets = []
    for split in ("train", "test"):
        d = _unpickle(folder / split)
        sets.append(ImageSet(_cifar_images(d["data"]), torch.tensor(d["coarse_labels"], dtype=torch.long), classes, "cifar100"))
    return sets[0], sets[1]


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (bad magic number)")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: header says {shape}, found {body.size} values")
    return body.reshape(shape)


def _idx_path(folder: Path, stem: str) -> Path:
    return folder / stem if (folder / stem).exists() else folder / (stem + ".gz")


def _load_idx_dataset(root: Path, folder_name: str, dataset: str, classes: list[str]) -> tuple[ImageSet, ImageSet]:
    stems = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    folder = None
    for sub in (f"{folder_name}/raw", folder_name, "raw", "."):
        try:
            folder = _find(root, sub, stems, dataset)
            break
        except FileNotFoundError:
            continue
    if folder is None:
        _find(root, f"{folder_name}/raw", stems, dataset)  # raises the explanatory error
    arrays = [_read_idx(_idx_path(folder, s)) for s in stems]
    name = dataset.lower().replace("-", "")
    return tuple(ImageSet(torch.from_numpy(arrays[i].copy()).unsqueeze(1), torch.from_numpy(arrays[i + 1].astype(np.int64)),
                          classes, name) for i in (0, 2))


def load_fashionmnist(root: Path) -> tuple[ImageSet, ImageSet]:
    return _load_idx_dataset(root, "FashionMNIST", "Fashion-MNIST", _FASHION_CLASSES)


def load_mnist(root: Path) -> tuple[ImageSet, ImageSet]:
    return _load_idx_dataset(root, "MNIST", "MNIST", _DIGIT_CLASSES)


def load_digits(root: Path | None = None, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """scikit-learn's bundled 8 x 8 digits (1,797 images): the default that needs no files.
    Split per class, 2/3 train and 1/3 test, with a fixed seed."""
    from sklearn.datasets import load_digits as sk_digits
    d = sk_digits()
    images = torch.from_numpy(np.round(d.images * (255 / 16)).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(d.target.astype(np.int64))
    gen = torch.Generator().manual_seed(seed)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = torch.nonzero(labels == c).squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=gen)]
        cut = (2 * len(idx)) // 3
        train_idx.append(idx[:cut])
        test_idx.append(idx[cut:])
    full = ImageSet(images, labels, _DIGIT_CLASSES, "digits")
    return full.subset(torch.cat(train_idx)), full.subset(torch.cat(test_idx))


@dataclass(frozen=True)
class DatasetEntry:
    """A registered dataset: ``loader(root)`` returns its train and test :class:`ImageSet`
    (``root`` is the data root, or None when ``needs_root`` is false), with its class names."""

    loader: Callable[[Path | None], tuple[ImageSet, ImageSet]]
    classes: list[str]
    description: str
    needs_root: bool = True


DATASETS: Registry[DatasetEntry] = Registry("dataset", {
    "cifar10": DatasetEntry(load_cifar10, _CIFAR10_CLASSES, "CIFAR-10 (cifar-10-batches-py/)"),
    "cifar100": DatasetEntry(load_cifar100, _CIFAR100_SUPERCLASSES,
                             "CIFAR-100 with its 20 superclasses as the classes (cifar-100-python/)"),
    "fashionmnist": DatasetEntry(load_fashionmnist, _FASHION_CLASSES, "Fashion-MNIST (FashionMNIST/raw/)"),
    "mnist": DatasetEntry(load_mnist, _DIGIT_CLASSES, "MNIST (MNIST/raw/)"),
    "digits": DatasetEntry(load_digits, _DIGIT_CLASSES, "scikit-learn's 8 x 8 digits, no files needed",
                           needs_root=False),
}, alternative="or a folder (MVTec AD layout, or any images)")

SPLITS: Registry[str] = Registry("split", {
    "test": "the dataset's test split",
    "validation": "a validation split of the training data (for tuning; the test split is never read)"})


def canonical_dataset(name: str) -> str:
    """The registry name of dataset ``name`` (case, dashes and underscores ignored), or an
    existing image folder as given; an error that lists the choices otherwise."""
    key = name.lower().replace("-", "").replace("_", "")
    if key in DATASETS:
        return key
    if Path(name).is_dir():
        return name
    raise DATASETS.unknown(name)


def load_dataset(name: str, data_root: str | os.PathLike | None = None, size: int = 32,
                 channels: int = 3) -> tuple[ImageSet, ImageSet]:
    """Train and test split of dataset ``name`` (a registered name, or a folder read by its
    layout, :data:`LAYOUTS`), converted to ``channels x size x size``."""
    key = canonical_dataset(name)
    if key not in DATASETS:
        return folder_layout(key).loader(Path(key), size, channels)
    entry = DATASETS.get(key)
    train, test = entry.loader(resolve_data_root(data_root) if entry.needs_root else None)
    for s in (train, test):
        s.images = resize_images(s.images, size, channels)
    return train, test


def _walk_images(folder: Path) -> list[Path]:
    """Image files under ``folder``, sorted, following symbolic links to folders; a link that
    leads back to a folder already being searched is skipped, so links cannot loop."""
    found, seen = [], set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        found += [Path(root) / f for f in files if Path(f).suffix.lower() in IMAGE_EXTENSIONS
                  and (Path(root) / f).is_file()]
    return sorted(found)


def find_images(paths: list[str | os.PathLike] | str | os.PathLike) -> list[Path]:
    """Image files under the given folders (recursively) and files, sorted; clear errors if none."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    found = []
    for p in map(Path, paths):
        if p.is_dir():
            found += _walk_images(p)
        elif p.is_file():
            found.append(p)
        else:
            raise FileNotFoundError(f"{p} does not exist: pass an image file or a folder of images")
    if not found:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found in {', '.join(map(str, paths))}")
    return found


def _deep_pixels(im) -> np.ndarray | None:
    """The pixels of a decoded file of more than 8 bits per channel at their real depth, ``(H,
    W)`` or ``(H, W, C)``; None for 8-bit images. Pillow decodes 16-bit colour to its high bytes,
    so such a file is decoded a second time with the byte order swapped, which gives the low bytes."""
    from PIL import Image
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return np.asarray(im)
    raw = [t.args if isinstance(t.args, str) else t.args[0] for t in (im.tile or [])]
    if not raw or not all(isinstance(r, str) and r[-4:] in (";16B", ";16L") for r in raw) or not im.filename:
        return None
    swapped = [t._replace(args=_swap_order(t.args)) for t in im.tile]
    high = np.asarray(im).astype(np.uint16)
    try:
        with Image.open(im.filename) as low:
            low.tile = swapped
            return high * 256 + np.asarray(low).astype(np.uint16)
    except (OSError, ValueError):  # a decoder that cannot swap: the high bytes alone still span the range
        return high * 256


def _swap_order(args):
    flip = {";16B": ";16L", ";16L": ";16B"}
    if isinstance(args, str):
        return args[:-4] + flip[args[-4:]]
    return (args[0][:-4] + flip[args[0][-4:]], *args[1:])


def eight_bit(im, channels: int = 3):
    """A decoded image file (PIL) as 8-bit grey (``channels`` 1) or RGB.

    Files of more than 8 bits per channel (16-bit grey or colour PNG and TIFF, 32-bit integer or
    float TIFF) are read at their real depth and scaled by their own range: the image's darkest
    value becomes 0 and its brightest 255 (a flat image reads as black). So a 12-bit camera
    image stored in 16 bits keeps its contrast, but brightness is not compared between such
    images. 8-bit files are converted as they are."""
    from PIL import Image
    deep = _deep_pixels(im)
    if deep is not None:
        deep = (deep[..., :3] if deep.ndim == 3 else deep).astype(np.float64)  # alpha dropped, as for 8-bit files
        finite = deep[np.isfinite(deep)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        deep = np.nan_to_num(deep, nan=lo, posinf=hi, neginf=lo)
        scaled = (deep - lo) * (255 / (hi - lo) if hi > lo else 0.0)
        im = Image.fromarray(np.round(scaled).astype(np.uint8))
    return im.convert("RGB" if channels == 3 else "L")


def load_image_folder(paths, size: int | tuple[int, int] = 32, channels: int = 3, label: int = 0,
                      name: str = "") -> ImageSet:
    """Read image files (folders are searched recursively) into an :class:`ImageSet`.

    Any size, aspect, grey or colour; files that cannot be decoded are skipped and listed in one
    warning. Fails only if no image at all can be read.
    """
    from PIL import Image, UnidentifiedImageError

    height, width = image_shape(size)
    files = find_images(paths)
    images, kept, bad = [], [], []
    for f in files:
        try:
            with Image.open(f) as im:
                im = eight_bit(im, channels)
                im = im.resize((width, height), Image.BILINEAR, reducing_gap=None)
                arr = np.asarray(im, dtype=np.uint8)
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
            bad.append(f"{f} ({type(e).__name__})")
            continue
        images.append(arr.reshape(height, width, channels))
        kept.append(str(f))
    if bad:
        warnings.warn(f"skipped {len(bad)} unreadable image file(s) of {len(files)}: " + "; ".join(bad[:20])
                      + (" ..." if len(bad) > 20 else ""), stacklevel=2)
    if not images:
        raise ValueError(f"none of the {len(files)} file(s) in {paths} could be read as an image")
    tensor = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return ImageSet(tensor, torch.full((len(kept),), label, dtype=torch.long), [name or "images"], name, kept)


def is_paths(X) -> bool:
    """Whether ``X`` names image files or folders (one path or a list of them) rather than arrays."""
    path = (str, os.PathLike)
    return isinstance(X, path) or (isinstance(X, (list, tuple)) and bool(X) and isinstance(X[0], path))


def image_sides(X, name: str = "images") -> list[tuple[int, int]]:
    """``(height, width)`` of each image ``X`` as stored (any input :func:`read_images` takes);
    files are measured from their headers, not decoded, and unreadable ones are left out
    (:func:`read_images` reports them)."""
    if not is_paths(X):
        h, w = as_nchw(X.images if isinstance(X, ImageSet) else X, name).shape[-2:]
        return [(int(h), int(w))]
    from PIL import Image, UnidentifiedImageError
    sides = []
    for f in find_images(X):
        try:
            with Image.open(f) as im:
                sides.append((im.size[1], im.size[0]))
        except (UnidentifiedImageError, OSError, ValueError):
            continue
    return sides


def median_side(X, name: str = "images") -> int:
    """Median shorter side, in pixels, of the images ``X`` as they are stored (0 if none is readable)."""
    sides = [min(s) for s in image_sides(X, name)]
    return int(np.median(sides)) if sides else 0


def read_images(X, size: int | tuple[int, int] = 32, channels: int = 3, name: str = "images") -> tuple[Tensor, list[str]]:
    """uint8 images ``(N, channels, height, width)`` and their paths (empty for arrays) from a
    folder, an image file, a list of those, an :class:`ImageSet`, or an array / tensor."""
    if isinstance(X, ImageSet):
        return as_images(X.images, size, channels, name), list(X.paths)
    if is_paths(X):
        found = load_image_folder(X, size, channels, name=name)
        return found.images, found.paths
    return as_images(X, size, channels, name), []


def subsample(images: ImageSet, count: int | None, seed: int = 0) -> ImageSet:
    """A seeded subset of ``count`` images (all of them when ``count`` is None or larger).

    Seeded by the run's seed alone, so that every loss of a comparison trains on the same images.
    """
    if not count or count >= len(images):
        return images
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(1234 + seed))
    return images.subset(order[:count])


def one_class_split(train: ImageSet, test: ImageSet, normal_class: int) -> tuple[ImageSet, ImageSet, Tensor]:
    """The one-class protocol: train on class ``normal_class`` only; the whole test split is
    scored; returns ``(normal_train, test, is_anomaly)``."""
    n_classes = len(train.classes)
    if not 0 <= normal_class < n_classes:
        raise ValueError(f"normal class {normal_class} is not a class of {train.name or 'the dataset'} "
                         f"(classes 0..{n_classes - 1}: {', '.join(train.classes)})")
    normal = train.subset(torch.nonzero(train.labels == normal_class).squeeze(1))
    if len(normal) == 0:
        raise ValueError(f"normal class {normal_class} ({train.classes[normal_class]}) has no training images")
    return normal, test, (test.labels != normal_class).long()


def validation_split(train: ImageSet, normal_class: int, holdout: float = 0.1, anomalies: int | None = None,
                     seed: int = 0) -> tuple[ImageSet, ImageSet, Tensor]:
    """A validation protocol inside the training split (as DROC did): hold out a fraction of the
    normal images and add as many images of the other classes as anomalies (``anomalies`` to
    choose the number). Returns ``(normal_train, validation, is_anomaly)``; never touches the
    test split."""
    one_class_split(train, train, normal_class)  # same checks and messages as the test protocol
    gen = torch.Generator().manual_seed(seed)
    normal_idx = torch.nonzero(train.labels == normal_class).squeeze(1)
    normal_idx = normal_idx[torch.randperm(len(normal_idx), generator=gen)]
    n_val = max(1, int(round(holdout * len(normal_idx))))
    if n_val >= len(normal_idx):
        raise ValueError(f"holdout {holdout} leaves no normal images to train on")
    other_idx = torch.nonzero(train.labels != normal_class).squeeze(1)
    other_idx = other_idx[torch.randperm(len(other_idx), generator=gen)][: anomalies or n_val]
    val = train.subset(torch.cat([normal_idx[:n_val], other_idx]))
    is_anomaly = torch.cat([torch.zeros(n_val, dtype=torch.long), torch.ones(len(other_idx), dtype=torch.long)])
    return train.subset(normal_idx[n_val:]), val, is_anomaly


def _mask_candidates(mask_dir: Path, image: Path) -> list[Path]:
    """Mask files for ``image`` in ``mask_dir``: ``<folder>/<stem>[_mask].<ext>`` with the image's
    own folder name (MVTec AD's ground_truth/<defect>/), else ``<stem>[_mask].<ext>`` (flat)."""
    for folder in (mask_dir / image.parent.name, mask_dir):
        found = [folder / f"{image.stem}{tail}{ext}" for tail in ("_mask", "") for ext in IMAGE_EXTENSIONS]
        found = [f for f in found if f.is_file() and f.resolve() != image.resolve()]
        if found:
            return found
    return []


def _read_mask(path: Path, image: Path, size: int | tuple[int, int]) -> np.ndarray:
    """Mask file as 0/1 uint8 ``(height, width)``: non-zero pixels are defect; resized as the image is
    (bilinear, antialiased) and thresholded at half, so a thin defect keeps about its area."""
    from PIL import Image

    with Image.open(path) as im:
        m = np.asarray(im.convert("L")) > 0
    if image.is_file():
        with Image.open(image) as im:
            iw, ih = im.size
        if abs(m.shape[1] / m.shape[0] - iw / ih) > 0.02 * iw / ih:
            raise ValueError(f"mask {path} is {m.shape[1]} x {m.shape[0]} px but its image {image} is {iw} x {ih}: "
                             "the shapes differ, so the mask cannot be aligned with the image")
    t = torch.from_numpy(m.astype(np.float32))[None, None]
    t = F.interpolate(t, size=image_shape(size), mode="bilinear", antialias=True, align_corners=False)
    return (t[0, 0] >= 0.5).numpy().astype(np.uint8)


def read_masks(paths: list[str | os.PathLike], mask_dir: str | os.PathLike, size: int | tuple[int, int],
               is_anomaly: Tensor | np.ndarray | list[int] | None = None) -> Tensor:
    """Ground-truth masks of the images at ``paths``, as uint8 ``(N, height, width)`` holding 0 / 1
    (``size``: one side, or ``(height, width)``).

    A mask is matched to an image by name: ``mask_dir/<image's folder>/<stem>_mask.png`` (the
    MVTec AD layout, ground_truth/<defect>/000_mask.png for test/<defect>/000.png), else
    ``mask_dir/<stem>_mask.png``; ``<stem>.png`` and other image extensions are accepted too. An
    image with no mask is defect-free (all zeros) when ``is_anomaly`` says it is normal; a
    defective one with no mask is an error that names it. Without ``is_anomaly`` an image with
    no mask is taken as defect-free, but at least one mask must match.
    """
    mask_dir = Path(mask_dir)
    if not mask_dir.is_dir():
        raise FileNotFoundError(f"mask folder {mask_dir} does not exist or is not a folder")
    labels = None if is_anomaly is None else [int(v) for v in np.asarray(is_anomaly).ravel()]
    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"{len(labels)} labels for {len(paths)} images")
    out = np.zeros((len(paths), *image_shape(size)), dtype=np.uint8)
    matched = 0
    for i, p in enumerate(map(Path, paths)):
        found = _mask_candidates(mask_dir, p)
        if len(found) > 1:
            raise ValueError(f"image {p} has {len(found)} masks in {mask_dir} ({', '.join(map(str, found))}); keep one")
        if found:
            out[i] = _read_mask(found[0], p, size)
            matched += 1
        elif labels is not None and labels[i]:
            raise FileNotFoundError(f"defect image {p} has no mask in {mask_dir}: expected "
                                    f"{mask_dir / p.parent.name / (p.stem + '_mask.png')} or "
                                    f"{mask_dir / (p.stem + '_mask.png')}")
    if labels is None and paths and not matched:
        raise FileNotFoundError(f"no mask in {mask_dir} matches any of the {len(paths)} images by name "
                                f"(expected e.g. {mask_dir / (Path(paths[0]).stem + '_mask.png')})")
    return torch.from_numpy(out)


def is_defect_folder(root: str | os.PathLike) -> bool:
    """Whether ``root`` is in the MVTec AD layout (``train/good/`` and ``test/``)."""
    root = Path(root)
    return (root / "train" / "good").is_dir() and (root / "test").is_dir()


def load_defect_dataset(root: str | os.PathLike, size: int | tuple[int, int] = 256,
                        channels: int = 3) -> tuple[ImageSet, ImageSet]:
    """A folder in the MVTec AD layout: ``train/good/``, ``test/good/``, ``test/<defect>/`` and,
    optionally, ``ground_truth/<defect>/<stem>_mask.png``.

    Returns ``(train, test)`` like every dataset loader: the normal training images (class 0,
    ``good``) and the test images (good first, then each defect folder in name order; labels 0
    good, 1 defect; with paths), whose ``masks`` are uint8 0 / 1 ``(N, H, W)``, all zero for good
    images, or None when the folder has no ``ground_truth/``. A defect image without a mask is an
    error that names it.
    """
    root = Path(root)
    train_dir, test_dir = root / "train" / "good", root / "test"
    if not is_defect_folder(root):
        raise FileNotFoundError(f"{root} is not in the MVTec AD layout: expected {train_dir}/ and {test_dir}/ "
                                "(test/good/ and one folder per defect kind, optional ground_truth/<defect>/)")
    kinds = sorted(d.name for d in test_dir.iterdir() if d.is_dir() and d.name != "good")
    folders = ([test_dir / "good"] if (test_dir / "good").is_dir() else []) + [test_dir / k for k in kinds]
    if not folders:
        raise FileNotFoundError(f"{test_dir} holds no good/ or defect folders")
    train = load_image_folder(train_dir, size, channels, label=0, name=root.name)
    parts = [load_image_folder(f, size, channels, label=int(f.name != "good"), name=f.name) for f in folders]
    test = ImageSet(torch.cat([s.images for s in parts]), torch.cat([s.labels for s in parts]), _DEFECT_CLASSES,
                    root.name, [p for s in parts for p in s.paths])
    train.classes = _DEFECT_CLASSES
    if (root / "ground_truth").is_dir():
        test.masks = read_masks(test.paths, root / "ground_truth", size, test.labels)
    return train, test


def _load_one_folder(root: Path, size: int | tuple[int, int], channels: int) -> tuple[ImageSet, ImageSet]:
    folder = load_image_folder(root, size, channels, name=root.name)
    return folder, folder


@dataclass(frozen=True)
class FolderLayout:
    """How a folder named as a dataset is read: ``matches(folder)`` says whether a folder has this
    layout (the first matching entry is used), ``loader(folder, size, channels)`` returns its train
    and test :class:`ImageSet`; ``classes`` are their class names, of which ``normal`` may be the
    normal class (what ``firm bench`` runs when no classes are given)."""

    matches: Callable[[Path], bool]
    loader: Callable[[Path, int | tuple[int, int], int], tuple[ImageSet, ImageSet]]
    classes: list[str]
    normal: tuple[int, ...]
    description: str


LAYOUTS: Registry[FolderLayout] = Registry("folder layout", {
    "mvtec": FolderLayout(is_defect_folder, load_defect_dataset, _DEFECT_CLASSES, (0,),
                          "MVTec AD / anomalib: train/good/ (normal), test/good/ and test/<defect>/, optional "
                          "ground_truth/<defect>/<stem>_mask.png; class 0 is normal, the test split has real defects"),
    "images": FolderLayout(lambda root: True, _load_one_folder, ["images"], (),
                           "any folder of images (searched recursively): one class, train and test alike, as an "
                           "out-of-distribution set (--ood) or with normal class 'all'"),
})


def folder_layout(root: str | os.PathLike) -> FolderLayout:
    """The layout of folder ``root``: the first entry of :data:`LAYOUTS` that matches it."""
    return next(entry for name in LAYOUTS.names if (entry := LAYOUTS.get(name)).matches(Path(root)))


def normal_classes(name: str) -> list[int]:
    """The classes of dataset ``name`` that can be the normal class (every class of a registered
    dataset; a folder's by its layout)."""
    key = canonical_dataset(name)
    return list(range(len(DATASETS.get(key).classes))) if key in DATASETS else list(folder_layout(key).normal)
