"""Captions for a random subset of an image collection, and measured digit attributes.

AION-Search (text search over unlabelled galaxy images) had a vision-language model describe a
random subset of the images; the captions were then embedded by a text model and used to align
the frozen image embeddings with text. Offline, this module fills the captioner's place with:

- :class:`DigitCaptioner` (``mnist``): varied natural-language descriptions of handwritten
  digits, built from the label and attributes measured from the pixels (stroke thickness,
  slant, size). Because the attributes are measured, text queries about rare attributes
  ("a seven written with very thick strokes") have a ground truth (:func:`digit_queries`).
- :class:`ClassNameCaptioner` (``classname``): captions that hold only the class name; usable
  on any labelled collection and the baseline that attribute captions are compared against.

A captioner is anything with ``caption(dataset, indices, rng) -> list[dict]``; new ones are
added with :func:`register_captioner`.

Captions file (JSONL, one record per captioned image)::

    {"id": 12, "caption": "a handwritten seven with very thick strokes", "label": 7,
     "data": "mnist5k", "split": "train", "captioner": "mnist", "attributes": {...}}
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from data.common import Registry, UnknownNameError, UserError
from data.common.atomic import read_jsonl, write_jsonl

__all__ = ["Captioner", "DigitCaptioner", "ClassNameCaptioner", "register_captioner", "get_captioner",
           "list_captioners", "default_captioner", "digit_attributes", "skeletonize", "attribute_quantiles",
           "write_captions", "read_captions", "caption_dataset", "NamedQuery", "digit_queries",
           "CaptionError", "UnknownCaptionerError", "CAPTIONERS", "DIGIT_WORDS", "DIGIT_DATASETS"]

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

#: Datasets whose images are single handwritten digits on a dark background.
DIGIT_DATASETS = ("mnist5k", "digits")


class CaptionError(UserError, ValueError):
    """A captions file or captioner request that cannot be used; the message names it."""


class UnknownCaptionerError(UnknownNameError, CaptionError):
    """A captioner name that is not registered."""


# --------------------------------------------------------------------------- pixel measurements


def _images_to_array(images) -> np.ndarray:
    """uint8/float images [N, H, W] or [N, 1, H, W] (tensor or array) -> float32 [N, H, W] in [0, 1]."""
    arr = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    if arr.ndim == 4:
        if arr.shape[1] != 1:
            arr = arr.mean(axis=1)  # colour -> grey
        else:
            arr = arr[:, 0]
    if arr.ndim != 3:
        raise ValueError(f"digit images must be [N, H, W] or [N, 1, H, W], got shape {tuple(arr.shape)}")
    arr = arr.astype(np.float32)
    if arr.size and arr.max() > 1.0:
        arr = arr / 255.0
    return arr


def skeletonize(mask: np.ndarray) -> np.ndarray:
    """Zhang-Suen thinning of a batch of binary images to one-pixel-wide skeletons.

    Zhang & Suen, "A fast parallel algorithm for thinning digital patterns", CACM 1984. All
    images are thinned at once (vectorised over the batch) until no pixel changes.

    Args:
        mask: bool [N, H, W] (or [H, W]).

    Returns:
        bool array of the same shape, the skeletons.
    """
    single = mask.ndim == 2
    m = np.array(mask[None] if single else mask, dtype=bool, copy=True)
    while True:
        changed = False
        for sub in (0, 1):
            p = np.pad(m, ((0, 0), (1, 1), (1, 1)))
            # neighbours P2..P9, clockwise from north
            p2, p3, p4, p5 = p[:, :-2, 1:-1], p[:, :-2, 2:], p[:, 1:-1, 2:], p[:, 2:, 2:]
            p6, p7, p8, p9 = p[:, 2:, 1:-1], p[:, 2:, :-2], p[:, 1:-1, :-2], p[:, :-2, :-2]
            ring = (p2, p3, p4, p5, p6, p7, p8, p9, p2)
            b = sum(x.astype(np.int8) for x in ring[:8])
            a = sum((~ring[i] & ring[i + 1]).astype(np.int8) for i in range(8))
            if sub == 0:
                cond = ~(p2 & p4 & p6) & ~(p4 & p6 & p8)
            else:
                cond = ~(p2 & p4 & p8) & ~(p2 & p6 & p8)
            remove = m & (b >= 2) & (b <= 6) & (a == 1) & cond
            if remove.any():
                m &= ~remove
                changed = True
        if not changed:
            break
    return m[0] if single else m


def digit_attributes(images, threshold: float = 0.5) -> dict[str, np.ndarray]:
    """Stroke thickness, slant and size of digit images, measured from the pixels.

    - ``thickness`` (pixels): the mean stroke width from ink area and skeleton length. A stroke
      of width t and length L covers t*L pixels and thins (Zhang-Suen) to about L - t pixels, so
      t solves ``t * (skeleton + t) = ink``.
    - ``slant`` (degrees, positive = top leans right): the shear of the intensity-weighted
      second moments, ``atan(-mu11 / mu02)`` with rows growing downwards.
    - ``height``, ``width`` (pixels): bounding box of the ink; ``area`` = height * width as a
      fraction of the image.
    - ``ink``: the fraction of pixels that are ink.

    Args:
        images: [N, H, W] or [N, 1, H, W], uint8 (0-255) or float (0-1); white ink on black.
        threshold: ink threshold on the [0, 1] scale.

    Returns:
        dict of float32 arrays [N].
    """
    x = _images_to_array(images)
    n, h, w = x.shape
    mask = x >= threshold
    skel = skeletonize(mask)
    ink = mask.sum(axis=(1, 2)).astype(np.float32)
    # Thinning shortens a stroke by about half its width at each of its two ends, so
    # ink = t * (skeleton + t); solve the quadratic for the mean stroke width t.
    length = skel.sum(axis=(1, 2)).astype(np.float32)
    thickness = 0.5 * (np.sqrt(length * length + 4.0 * ink) - length)

    rows, cols = np.mgrid[:h, :w].astype(np.float32)
    total = np.maximum(x.sum(axis=(1, 2)), 1e-6)
    cy = (x * rows).sum(axis=(1, 2)) / total
    cx = (x * cols).sum(axis=(1, 2)) / total
    dy = rows[None] - cy[:, None, None]
    dx = cols[None] - cx[:, None, None]
    mu11 = (x * dx * dy).sum(axis=(1, 2))
    mu02 = np.maximum((x * dy * dy).sum(axis=(1, 2)), 1e-6)
    slant = np.degrees(np.arctan(-mu11 / mu02))

    any_row, any_col = mask.any(axis=2), mask.any(axis=1)
    has = any_row.any(axis=1)
    height = np.where(has, h - np.argmax(any_row[:, ::-1], axis=1) - np.argmax(any_row, axis=1), 0)
    width = np.where(has, w - np.argmax(any_col[:, ::-1], axis=1) - np.argmax(any_col, axis=1), 0)
    return {
        "thickness": thickness.astype(np.float32),
        "slant": slant.astype(np.float32),
        "height": height.astype(np.float32),
        "width": width.astype(np.float32),
        "area": (height * width / float(h * w)).astype(np.float32),
        "ink": (ink / float(h * w)).astype(np.float32),
    }


def _rank_quantile(values: np.ndarray) -> np.ndarray:
    """Mid-rank quantile of each value within ``values``, in (0, 1)."""
    order = np.argsort(values, kind="stable")
    q = np.empty(len(values), dtype=np.float32)
    q[order] = (np.arange(len(values)) + 0.5) / max(len(values), 1)
    return q


def attribute_quantiles(attrs: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, np.ndarray]:
    """Quantiles that turn measurements into words: thickness and slant over the whole collection,
    size (bounding-box area) within each class (a one is narrow by nature)."""
    labels = np.asarray(labels)
    size_q = np.zeros(len(labels), dtype=np.float32)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        size_q[idx] = _rank_quantile(attrs["area"][idx])
    return {"thickness_q": _rank_quantile(attrs["thickness"]), "slant_q": _rank_quantile(attrs["slant"]),
            "size_q": size_q}


# --------------------------------------------------------------------------- captioners


class Captioner(ABC):
    """Writes one natural-language caption per requested image of a dataset."""

    name: str = ""

    @abstractmethod
    def caption(self, dataset, indices: np.ndarray, rng: np.random.Generator) -> list[dict]:
        """Caption ``dataset[i]`` for each ``i`` in ``indices``.

        Returns:
            One record per index: ``{"id": i, "caption": str, "label": int | None, ...}``.
        """


#: Captioner name -> class (or zero-argument factory).
CAPTIONERS: Registry = Registry("captioner", error=UnknownCaptionerError)


def register_captioner(name: str):
    """Register a captioner class (or zero-argument factory) under ``name``."""
    return CAPTIONERS.register(name)


def list_captioners() -> list[str]:
    return CAPTIONERS.names()


def get_captioner(name: str) -> Captioner:
    return CAPTIONERS.get(name)()


def default_captioner(spec: str) -> str:
    """The captioner ``auto`` picks for a dataset spec: attribute captions for digit sets."""
    return "mnist" if spec in DIGIT_DATASETS else "classname"


def _dataset_images(dataset) -> np.ndarray:
    """All images of an in-memory dataset as uint8 [N, C, H, W]."""
    images = getattr(dataset, "images", None)
    if images is None:
        raise CaptionError("the 'mnist' captioner measures pixels of an in-memory digit dataset "
                           "(mnist5k, digits); use --captioner classname for image folders")
    return images.numpy() if hasattr(images, "numpy") else np.asarray(images)


def _class_names(dataset) -> list[str]:
    info = getattr(dataset, "info", None)
    return list(getattr(info, "class_names", []) or [])


def _labels(dataset) -> np.ndarray | None:
    labels = getattr(dataset, "labels", None)
    if labels is None:
        return None
    return labels.numpy() if hasattr(labels, "numpy") else np.asarray(labels)


# Phrase banks: several wordings per attribute level so that captions vary like a
# vision-language model's; rare levels are always mentioned, common ones sometimes.
_THICKNESS = {
    "very thin": ("written with very thin strokes", "drawn with hairline strokes", "with extremely thin lines"),
    "thin": ("with thin strokes", "drawn with a fine pen", "with light, thin lines"),
    "regular": ("with strokes of ordinary width", "with regular pen strokes"),
    "thick": ("with thick strokes", "drawn with a heavy pen", "with bold lines"),
    "very thick": ("written with very thick strokes", "drawn in very heavy, bold strokes",
                   "with extremely thick lines"),
}
_SLANT = {
    "strongly left": ("strongly slanted to the left", "leaning far to the left", "with a pronounced backward slant"),
    "left": ("slanted slightly to the left", "leaning a little to the left"),
    "upright": ("upright", "standing straight"),
    "right": ("slanted to the right", "leaning a little to the right"),
    "strongly right": ("strongly slanted to the right", "leaning far to the right", "in a steep rightward italic"),
}
_SIZE = {"small": ("small", "compact", "tiny"), "large": ("large", "wide", "big")}
_BASES = (
    "{a} {adj}handwritten {word}", "the {adj}digit {digit}", "{a} {adj}{word} written by hand",
    "a scanned, {adj}handwritten {digit}", "an image of the {adj}number {word}", "{a} {adj}hand-drawn {word} ({digit})",
    "the {adj}number {digit}, handwritten",
)


def _with_article(text: str) -> str:
    """Replace each ``{a}`` by 'a' or 'an' for the word that follows it."""
    parts = text.split("{a} ")
    out = parts[0]
    for part in parts[1:]:
        vowel = part[:1].lower() in "aeio" and not part.lower().startswith("one")  # "a one", "an eight"
        out += ("an " if vowel else "a ") + part
    return out


def thickness_level(q: float) -> str:
    return ("very thin" if q < 0.05 else "thin" if q < 0.25 else "regular" if q < 0.75
            else "thick" if q < 0.95 else "very thick")


def slant_level(q: float, degrees: float) -> str:
    if q < 0.05 and degrees < 0:
        return "strongly left"
    if q < 0.25 and degrees < 0:
        return "left"
    if q >= 0.95 and degrees > 0:
        return "strongly right"
    if q >= 0.75 and degrees > 0:
        return "right"
    return "upright"


def size_level(q: float) -> str:
    return "small" if q < 0.1 else "large" if q >= 0.9 else "medium"


@register_captioner("mnist")
class DigitCaptioner(Captioner):
    """Varied captions of handwritten digits from the label and measured attributes.

    Thickness and slant are described by their quantile over the whole dataset split (the 5%
    extremes are "very thick", "strongly slanted to the right", ...), size by its quantile within
    the digit's class. Rare levels are always mentioned; common ones with probability 1/2, so
    the captions read like a describer who mentions what stands out.
    """

    name = "mnist"

    def caption(self, dataset, indices: np.ndarray, rng: np.random.Generator) -> list[dict]:
        images = _dataset_images(dataset)
        labels = _labels(dataset)
        if labels is None:
            raise CaptionError("the 'mnist' captioner needs digit labels (dataset.labels)")
        attrs = digit_attributes(images)
        quant = attribute_quantiles(attrs, labels)
        out = []
        for i in np.asarray(indices, dtype=np.int64):
            label = int(labels[i])
            a = {k: float(v[i]) for k, v in attrs.items()}
            q = {k: float(v[i]) for k, v in quant.items()}
            levels = {"thickness": thickness_level(q["thickness_q"]),
                      "slant": slant_level(q["slant_q"], a["slant"]),
                      "size": size_level(q["size_q"])}
            out.append({"id": int(i), "caption": self._sentence(label, levels, rng), "label": label,
                        "attributes": {**{k: round(v, 4) for k, v in a.items()},
                                       **{k: round(v, 4) for k, v in q.items()}, **levels}})
        return out

    @staticmethod
    def _sentence(label: int, levels: dict, rng: np.random.Generator) -> str:
        size = levels["size"]
        adj = ""
        if size != "medium" and rng.random() < (0.8 if size == "small" else 0.5):
            adj = _SIZE[size][rng.integers(len(_SIZE[size]))] + " "
        template = _BASES[rng.integers(len(_BASES))]
        base = _with_article(template.replace("{adj}", adj).format(word=DIGIT_WORDS[label], digit=label, a="{a}"))
        phrases = []
        t, s = levels["thickness"], levels["slant"]
        if t in ("very thin", "very thick") or (t in ("thin", "thick") and rng.random() < 0.6) or rng.random() < 0.2:
            phrases.append(_THICKNESS[t][rng.integers(len(_THICKNESS[t]))])
        if s.startswith("strongly") or (s in ("left", "right") and rng.random() < 0.6) or rng.random() < 0.2:
            phrases.append(_SLANT[s][rng.integers(len(_SLANT[s]))])
        rng.shuffle(phrases)
        if not phrases:
            return base
        if len(phrases) == 1:
            return f"{base}, {phrases[0]}"
        return f"{base}, {phrases[0]} and {phrases[1]}"


@register_captioner("classname")
class ClassNameCaptioner(Captioner):
    """Captions that hold only the class name ("the digit seven"; "an image of cats" for a folder 'cats')."""

    name = "classname"

    def caption(self, dataset, indices: np.ndarray, rng: np.random.Generator) -> list[dict]:
        labels = _labels(dataset)
        names = _class_names(dataset)
        if labels is None or not names:
            raise CaptionError("the 'classname' captioner needs a labelled dataset with class names")
        digits = names == [str(i) for i in range(10)]
        out = []
        for i in np.asarray(indices, dtype=np.int64):
            label = int(labels[i])
            text = f"the digit {DIGIT_WORDS[label]}" if digits else f"an image of {names[label]}"
            out.append({"id": int(i), "caption": text, "label": label})
        return out


# --------------------------------------------------------------------------- files


def caption_dataset(dataset, spec: str, split: str, fraction: float, seed: int = 0,
                    captioner: str = "auto") -> list[dict]:
    """Caption a random subset (``fraction`` of the items, without replacement) of a dataset.

    Args:
        dataset: a dataset of :func:`data.build_dataset`.
        spec, split: recorded in every record, so ``search align`` can check they match the
            embeddings.
        fraction: in (0, 1].
        seed: the subset and the wording depend only on it.
        captioner: a registered name or ``auto`` (:func:`default_captioner`).

    Returns:
        Records sorted by id.
    """
    if not 0.0 < fraction <= 1.0:
        raise CaptionError(f"--fraction must be in (0, 1], got {fraction}")
    name = default_captioner(spec) if captioner == "auto" else captioner
    cap = get_captioner(name)
    rng = np.random.default_rng(seed)
    n = len(dataset)
    count = max(1, int(round(fraction * n)))
    indices = np.sort(rng.choice(n, size=count, replace=False))
    records = cap.caption(dataset, indices, rng)
    for r in records:
        r.update({"data": spec, "split": split, "captioner": name})
    return records


def write_captions(records: Iterable[dict], path: str | Path) -> Path:
    """Write records as JSONL atomically (temporary file in the same folder, then rename)."""
    return write_jsonl(path, records)


def read_captions(path: str | Path) -> list[dict]:
    """Read a captions JSONL file; every record needs an integer ``id`` and a non-empty ``caption``."""
    path = Path(path)
    if not path.is_file():
        raise CaptionError(f"captions file '{path}' does not exist")
    records = []
    for lineno, r in read_jsonl(path, lambda n, exc: CaptionError(f"{path}:{n}: not valid JSON ({exc.msg})")):
        if not isinstance(r, dict) or not isinstance(r.get("id"), int) or isinstance(r.get("id"), bool):
            raise CaptionError(f"{path}:{lineno}: expected an object with an integer 'id'")
        if not isinstance(r.get("caption"), str) or not r["caption"].strip():
            raise CaptionError(f"{path}:{lineno}: expected a non-empty string 'caption'")
        records.append(r)
    if not records:
        raise CaptionError(f"captions file '{path}' holds no records")
    return records


# --------------------------------------------------------------------------- evaluation queries


@dataclass
class NamedQuery:
    """A text query with its ground truth: the dataset ids that are relevant."""

    name: str
    text: str
    relevant: np.ndarray  # int64 ids
    rare: bool


def digit_queries(images, labels, ids=None, rare_fraction: float = 0.05) -> list[NamedQuery]:
    """Named queries over a digit collection, with ground truth from the measured attributes.

    Class queries ("a handwritten seven", relevant: label 7) and rare-phenomena queries, whose
    relevant set is the most extreme ``rare_fraction`` of the collection by the measured
    attribute (e.g. the 5% thickest strokes), as AION-Search evaluated rare galaxy types.

    Args:
        images: [N, (1,) H, W] digit images of the indexed collection.
        labels: [N] digit labels.
        ids: [N] dataset ids of the rows (default ``arange(N)``).
        rare_fraction: size of each rare relevant set, as a fraction of N.

    Returns:
        Class queries first, then rare ones.
    """
    labels = np.asarray(labels)
    ids = np.arange(len(labels), dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
    attrs = digit_attributes(images)
    tq, sq = _rank_quantile(attrs["thickness"]), _rank_quantile(attrs["slant"])
    hi, lo = 1.0 - rare_fraction, rare_fraction
    queries = [NamedQuery(f"class_{c}", f"a handwritten {DIGIT_WORDS[c]}", ids[labels == c], False)
               for c in range(10) if (labels == c).any()]
    rare = [
        ("very_thick", "a digit written with very thick strokes", tq >= hi),
        ("very_thin", "a digit written with very thin strokes", tq < lo),
        ("slant_right", "a digit strongly slanted to the right", (sq >= hi) & (attrs["slant"] > 0)),
        ("slant_left", "a digit strongly slanted to the left", (sq < lo) & (attrs["slant"] < 0)),
        ("thick_seven", "a seven written with very thick strokes", (labels == 7) & (tq >= 0.9)),
        ("slanted_one", "a one strongly slanted to the right", (labels == 1) & (sq >= 0.9) & (attrs["slant"] > 0)),
    ]
    queries += [NamedQuery(name, text, ids[sel], True) for name, text, sel in rare if sel.any()]
    return queries
