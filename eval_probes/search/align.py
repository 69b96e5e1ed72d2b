"""Small heads that align frozen image embeddings with caption embeddings (AION-Search's step 3).

The image encoder and the text encoder stay frozen. Two small MLP heads map the image embedding
(standardised with the training set's mean and std) and the caption embedding into a shared
space, trained with CLIP's symmetric InfoNCE (:func:`losses.clip_loss`; Radford et al., ICML
2021) on the captioned subset only. Afterwards every image of the collection, captioned or not,
goes through the image head, and a text query through the text head.

This module holds the heads (:class:`AlignmentHeads`), their settings (:class:`AlignConfig`) and
the pairs they learn from (:class:`CaptionedEmbeddings`); the ``align`` objective of
:mod:`pretrain` trains them with the project's training loop (``pretrain search align``).

HEAD_DIR holds ``weights.safetensors`` (the heads) and ``heads.json``::

    {"format": 1, "text_encoder": "minilm", "image_dim": D, "text_dim": 384, "out_dim": E,
     "hidden_dim": H, "logit_scale": s, "config": {...}, "trained_on": {...}, "metrics": {...}}

A HEAD_DIR written by ``pretrain search align`` is also the training run's directory
(``config.yaml``, ``metrics.jsonl``, ``checkpoints/``); heads.json is written last.
"""
from __future__ import annotations

import json
import math
import os
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data.common import atomic_dir
from data.common.config import fill, parse_overrides

from . import SearchError
from .text import TextEncoder, get_text_encoder

__all__ = ["AlignConfig", "AlignmentHeads", "CaptionedEmbeddings", "caption_accuracy", "pair_captions",
           "config_from_overrides"]

WEIGHTS = "weights.safetensors"
OLD_WEIGHTS = "heads.safetensors"  # HEAD_DIRs written before the heads trained through the training loop

FORMAT = 1


@dataclass
class AlignConfig:
    """Alignment-head training settings.

    Attributes:
        text_encoder: registered text encoder (``eval_probes.search.text``).
        out_dim: dimension E of the shared space.
        hidden_dim: hidden width of both MLP heads.
        epochs: passes over the captioned pairs.
        batch_size: pairs per InfoNCE batch (the other pairs of the batch are the negatives).
        lr: AdamW peak learning rate (cosine decay to 0 after a 5% warm-up).
        weight_decay: AdamW weight decay.
        temperature: initial softmax temperature (CLIP's 0.07); learned unless ``learn_temperature``
            is false.
        learn_temperature: learn the logit scale (clamped at 100, as in CLIP).
        dropout: dropout on the hidden layer of both heads.
        val_fraction: pairs held out to report validation loss and caption-retrieval accuracy.
        seed: initialisation, shuffling and the validation split.
        stop_at: stop after this many optimizer steps with a checkpoint (continue with
            ``pretrain search align --resume HEAD_DIR``); 0 = train all epochs.
        engine: the training engine (``plain``, or ``deepspeed`` under the launcher).
    """

    text_encoder: str = "minilm"
    out_dim: int = 128
    hidden_dim: int = 512
    epochs: int = 20
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    temperature: float = 0.07
    learn_temperature: bool = True
    dropout: float = 0.1
    val_fraction: float = 0.1
    seed: int = 0
    stop_at: int = 0
    engine: str = "plain"

    def validate(self) -> None:
        checks = [("out_dim", self.out_dim >= 1, "an integer >= 1"),
                  ("hidden_dim", self.hidden_dim >= 1, "an integer >= 1"),
                  ("epochs", self.epochs >= 1, "an integer >= 1"),
                  ("batch_size", self.batch_size >= 2, "an integer >= 2 (InfoNCE needs negatives)"),
                  ("lr", self.lr > 0, "a positive number"),
                  ("temperature", self.temperature > 0, "a positive number"),
                  ("dropout", 0 <= self.dropout < 1, "in [0, 1)"),
                  ("val_fraction", 0 <= self.val_fraction < 1, "in [0, 1)"),
                  ("stop_at", self.stop_at >= 0, "an integer >= 0 (0 = train all epochs)")]
        for name, ok, want in checks:
            if not ok:
                raise SearchError(f"align: {name}={getattr(self, name)!r} is invalid; expected {want}")


def _mlp(d_in: int, hidden: int, d_out: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, d_out))


class AlignmentHeads(nn.Module):
    """Image and text heads into one shared, L2-normalised space.

    Args:
        image_dim: D, the frozen image-embedding dimension.
        text_dim: T, the text encoder's dimension.
        out_dim: E, the shared dimension.
        hidden_dim: hidden width of both heads.
        text_encoder: registered name of the text encoder whose outputs the text head takes.
        temperature: initial temperature (logit scale = 1 / temperature).
        dropout: dropout on the hidden layers (training only).
    """

    def __init__(self, image_dim: int, text_dim: int, out_dim: int = 128, hidden_dim: int = 512,
                 text_encoder: str = "minilm", temperature: float = 0.07, dropout: float = 0.0):
        super().__init__()
        self.image_dim, self.text_dim, self.out_dim, self.hidden_dim = image_dim, text_dim, out_dim, hidden_dim
        self.text_encoder_name = text_encoder
        self.register_buffer("image_mean", torch.zeros(image_dim))
        self.register_buffer("image_std", torch.ones(image_dim))
        self.image_head = _mlp(image_dim, hidden_dim, out_dim, dropout)
        self.text_head = _mlp(text_dim, hidden_dim, out_dim, dropout)
        # shape [1], not a 0-dim tensor: DeepSpeed's parameter broadcast cannot take 0-dim parameters
        self.log_logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / temperature)))
        self.info: dict = {}
        self._text_encoder: TextEncoder | None = None

    # ------------------------------------------------------------------ tensors

    def logit_scale(self) -> torch.Tensor:
        return self.log_logit_scale.exp().clamp(max=100.0)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """[N, D] raw image embeddings -> [N, E] unit vectors."""
        return F.normalize(self.image_head((x - self.image_mean) / self.image_std), dim=-1)

    def encode_text(self, t: torch.Tensor) -> torch.Tensor:
        """[N, T] text-encoder outputs -> [N, E] unit vectors."""
        return F.normalize(self.text_head(t), dim=-1)

    # ------------------------------------------------------------------ numpy API

    @torch.no_grad()
    def image(self, vectors: np.ndarray, batch_size: int = 8192) -> np.ndarray:
        """Map raw image embeddings ``[N, D]`` to the shared space: float32 ``[N, E]``, unit rows."""
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or vectors.shape[1] != self.image_dim:
            raise SearchError(f"the alignment heads take [N, {self.image_dim}] image embeddings, "
                              f"got shape {tuple(vectors.shape)}")
        was = self.training
        self.eval()
        out = np.empty((len(vectors), self.out_dim), dtype=np.float32)
        for lo in range(0, len(vectors), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(vectors[lo:lo + batch_size], dtype=np.float32))
            out[lo:lo + batch_size] = self.encode_image(x).numpy()
        self.train(was)
        return out

    @torch.no_grad()
    def text_vectors(self, text_emb: np.ndarray) -> np.ndarray:
        """Map text-encoder outputs ``[n, T]`` to the shared space: float32 ``[n, E]``."""
        was = self.training
        self.eval()
        out = self.encode_text(torch.from_numpy(np.ascontiguousarray(text_emb, dtype=np.float32))).numpy()
        self.train(was)
        return out

    def text_encoder(self) -> TextEncoder:
        if self._text_encoder is None:
            self._text_encoder = get_text_encoder(self.text_encoder_name)
        return self._text_encoder

    def text(self, texts: Sequence[str]) -> np.ndarray:
        """Embed query strings with the text encoder and the text head: float32 ``[n, E]``."""
        if isinstance(texts, str):
            texts = [texts]
        return self.text_vectors(self.text_encoder().encode(list(texts)))

    # ------------------------------------------------------------------ files

    def config_json(self) -> dict:
        return {"format": FORMAT, "text_encoder": self.text_encoder_name, "image_dim": self.image_dim,
                "text_dim": self.text_dim, "out_dim": self.out_dim, "hidden_dim": self.hidden_dim,
                "logit_scale": float(self.logit_scale().detach()), **self.info}

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write HEAD_DIR atomically: a temporary sibling folder, then rename (an existing HEAD_DIR
        is replaced only once the new one is complete)."""
        from safetensors.torch import save_file

        out = Path(out_dir).resolve()
        with atomic_dir(out) as tmp:
            save_file(self.tensors(), str(tmp / WEIGHTS))
            (tmp / "heads.json").write_text(json.dumps(self.config_json(), indent=1, default=str))
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        """The heads' state as contiguous tensors (what ``weights.safetensors`` holds)."""
        return {k: v.detach().contiguous() for k, v in self.state_dict().items()}

    @classmethod
    def load(cls, head_dir: str | os.PathLike) -> "AlignmentHeads":
        """Load HEAD_DIR written by ``pretrain search align`` (or :meth:`save`)."""
        from safetensors.torch import load_file

        head_dir = Path(head_dir)
        cfg_path = head_dir / "heads.json"
        weights = next((head_dir / n for n in (WEIGHTS, OLD_WEIGHTS) if (head_dir / n).is_file()), None)
        if not cfg_path.is_file() or weights is None:
            raise SearchError(f"'{head_dir}' is not a heads directory (expected heads.json and {WEIGHTS}; "
                              f"write one with 'pretrain search align')")
        try:
            cfg = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as exc:
            raise SearchError(f"'{cfg_path}' is not valid JSON ({exc.msg})") from None
        if cfg.get("format") != FORMAT:
            raise SearchError(f"'{cfg_path}' has format {cfg.get('format')!r}; expected {FORMAT}")
        heads = cls(int(cfg["image_dim"]), int(cfg["text_dim"]), int(cfg["out_dim"]), int(cfg["hidden_dim"]),
                    text_encoder=cfg["text_encoder"])
        state = load_file(str(weights))
        if "log_logit_scale" in state and state["log_logit_scale"].ndim == 0:  # HEAD_DIRs of earlier versions
            state["log_logit_scale"] = state["log_logit_scale"].reshape(1)
        try:
            heads.load_state_dict(state)
        except RuntimeError as exc:
            raise SearchError(f"'{weights}' does not hold the heads heads.json describes: "
                              f"{str(exc).splitlines()[0]}") from None
        heads.info = {k: v for k, v in cfg.items() if k not in heads.config_json()}
        heads.eval()
        return heads


def caption_accuracy(img: torch.Tensor, txt: torch.Tensor, caption_ids) -> float:
    """Fraction of images whose best-scoring caption (among the given ones) has the true text.

    ``caption_ids`` names each row's caption text (equal ids: equal texts), so identical captions
    ("the digit seven") count as correct and the number is fair to captions that repeat.
    """
    best = (img @ txt.T).argmax(dim=1)
    ids = torch.as_tensor(np.asarray(caption_ids))
    return float((ids[best] == ids).double().mean())


class CaptionedEmbeddings(torch.utils.data.Dataset):
    """The (image embedding, caption embedding) pairs alignment heads train on, split into
    ``train`` and ``val``.

    The captions of ``captions_path`` are matched to the embeddings of ``emb_dir`` by id
    (:func:`pair_captions`); each distinct caption is embedded once with the text encoder. A
    random ``val_fraction`` of the pairs (drawn by ``seed``; none below 20 pairs) is held out.

    Items are ``{"image_vec": [D] float32, "text_vec": [T] float32, "caption_id": int, "index": int}``
    (``caption_id`` numbers the distinct caption texts). ``info.extra`` holds ``image_dim``,
    ``text_dim`` and ``text_encoder``; :attr:`image_vecs` are the split's raw image embeddings.
    """

    SPLITS = ("train", "val")

    def __init__(self, emb_dir, captions_path, split: str = "train", val_fraction: float = 0.1, seed: int = 0,
                 text_encoder: str = "minilm"):
        from data import DatasetInfo

        if split not in self.SPLITS:
            raise SearchError(f"captioned embeddings have the splits {', '.join(self.SPLITS)}; got '{split}'")
        if not 0 <= val_fraction < 1:
            raise SearchError(f"align: val_fraction={val_fraction!r} is invalid; expected in [0, 1)")
        vecs, text_vecs, caption_ids, enc_name = _embedded_pairs(str(Path(emb_dir).resolve()),
                                                                 str(Path(captions_path).resolve()), text_encoder)
        n = len(vecs)
        if n < 4:
            raise SearchError(f"align: only {n} captioned images in '{captions_path}'; need at least 4")
        gen = torch.Generator().manual_seed(seed)
        perm = torch.randperm(n, generator=gen).numpy()
        self._shuffle_state = gen.get_state()  # training order continues the generator that split
        n_val = int(round(val_fraction * n)) if n >= 20 else 0
        rows = perm[:n_val] if split == "val" else perm[n_val:]
        self.image_vecs = torch.from_numpy(vecs[rows])
        self.text_vecs = torch.from_numpy(text_vecs[rows])
        self.caption_ids = torch.from_numpy(caption_ids[rows])
        self.info = DatasetInfo(f"captioned:{emb_dir}", 0, 0, 0, (), (), flip=False, color=False,
                                extra={"image_dim": int(vecs.shape[1]), "text_dim": int(text_vecs.shape[1]),
                                       "text_encoder": enc_name, "pairs": n, "train_pairs": n - n_val,
                                       "val_pairs": n_val})

    def shuffle_generator(self) -> torch.Generator:
        """The generator that drew the split, in the state right after it: its successive
        permutations order the training epochs (see :class:`data.StepBatchSampler`)."""
        g = torch.Generator()
        g.set_state(self._shuffle_state)
        return g

    def __len__(self) -> int:
        return len(self.image_vecs)

    def __getitem__(self, i: int) -> dict:
        return {"image_vec": self.image_vecs[i], "text_vec": self.text_vecs[i],
                "caption_id": int(self.caption_ids[i]), "index": int(i)}


_PAIRS_CACHE: dict = {}


def _embedded_pairs(emb_dir: str, captions_path: str, text_encoder: str):
    """(image embeddings [n, D], caption embeddings [n, T], caption ids [n], encoder name), read and
    embedded once per process for the same files (the train and val splits share them)."""
    from data.captions import read_captions
    from .embed import EmbeddingStore

    key = (emb_dir, captions_path, text_encoder, Path(captions_path).stat().st_mtime_ns)
    if key not in _PAIRS_CACHE:
        store = EmbeddingStore(emb_dir)
        vecs, texts, _ = pair_captions(store, read_captions(captions_path))
        enc = get_text_encoder(text_encoder)
        uniq, inverse = np.unique(np.asarray(texts, dtype=object).astype(str), return_inverse=True)
        text_vecs = np.ascontiguousarray(enc.encode(list(uniq))[inverse], dtype=np.float32)
        _PAIRS_CACHE.clear()
        _PAIRS_CACHE[key] = (np.ascontiguousarray(vecs, dtype=np.float32), text_vecs,
                             inverse.astype(np.int64), getattr(enc, "name", text_encoder))
    return _PAIRS_CACHE[key]


def pair_captions(store, records: list[dict]) -> tuple[np.ndarray, list[str], list[int]]:
    """Match caption records to the embeddings of an :class:`~.embed.EmbeddingStore`.

    Returns:
        (image embeddings [n, D] float32, captions [n], ids [n]).

    Raises:
        SearchError: If the captions describe another dataset or split than the embeddings, or
            name ids that have no embedding.
    """
    data = store.meta.get("data", {}) or {}
    for key in ("data", "split"):
        want = data.get("spec") if key == "data" else data.get("split")
        got = {r.get(key) for r in records if r.get(key) is not None}
        if want is not None and got and got != {want}:
            raise SearchError(f"captions are for {key} {sorted(got)} but the embeddings in '{store.path}' are for "
                              f"{key} '{want}'")
    ids = np.asarray([r["id"] for r in records], dtype=np.int64)
    missing = ~store.has(ids)
    if missing.any():
        raise SearchError(f"captions name id {int(ids[missing][0])} (and {int(missing.sum()) - 1} more) that the "
                          f"embeddings in '{store.path}' do not have")
    return store.lookup(ids, dtype=np.float32), [r["caption"] for r in records], ids.tolist()


def config_from_overrides(overrides, base: AlignConfig | None = None) -> AlignConfig:
    """An :class:`AlignConfig` from ``key=value`` strings (or a ``{field: value}`` dict) on top of
    ``base``, through the project's one config mechanism: values take the field's type, and an
    unknown key or a bad value is a ConfigError naming it and the valid ones."""
    cfg = dataclasses.replace(base) if base is not None else AlignConfig()
    values = overrides if isinstance(overrides, dict) else parse_overrides(list(overrides or []))
    fill(cfg, values, "align.")
    return cfg
