"""Small heads that align frozen image embeddings with caption embeddings (AION-Search's step 3).

The image encoder and the text encoder stay frozen. Two small MLP heads map the image embedding
(standardised with the training set's mean and std) and the caption embedding into a shared
space, trained with CLIP's symmetric InfoNCE (:func:`losses.clip_loss`; Radford et al., ICML
2021) on the captioned subset only. Afterwards every image of the collection, captioned or not,
goes through the image head, and a text query through the text head.

HEAD_DIR holds ``heads.safetensors`` and ``heads.json``::

    {"format": 1, "text_encoder": "minilm", "image_dim": D, "text_dim": 384, "out_dim": E,
     "hidden_dim": H, "logit_scale": s, "config": {...}, "trained_on": {...}, "metrics": {...}}
"""
from __future__ import annotations

import json
import math
import os
import time
import dataclasses
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from losses import clip_loss

from data.common import atomic_dir
from data.common.config import fill, parse_overrides

from . import SearchError
from .text import TextEncoder, get_text_encoder

__all__ = ["AlignConfig", "AlignmentHeads", "train_alignment", "align_embeddings", "pair_captions"]

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

    def validate(self) -> None:
        checks = [("out_dim", self.out_dim >= 1, "an integer >= 1"),
                  ("hidden_dim", self.hidden_dim >= 1, "an integer >= 1"),
                  ("epochs", self.epochs >= 1, "an integer >= 1"),
                  ("batch_size", self.batch_size >= 2, "an integer >= 2 (InfoNCE needs negatives)"),
                  ("lr", self.lr > 0, "a positive number"),
                  ("temperature", self.temperature > 0, "a positive number"),
                  ("dropout", 0 <= self.dropout < 1, "in [0, 1)"),
                  ("val_fraction", 0 <= self.val_fraction < 1, "in [0, 1)")]
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
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))
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
            state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
            save_file(state, str(tmp / "heads.safetensors"))
            (tmp / "heads.json").write_text(json.dumps(self.config_json(), indent=1, default=str))
        return out

    @classmethod
    def load(cls, head_dir: str | os.PathLike) -> "AlignmentHeads":
        """Load HEAD_DIR written by :meth:`save` (``pretrain search align``)."""
        from safetensors.torch import load_file

        head_dir = Path(head_dir)
        cfg_path, weights = head_dir / "heads.json", head_dir / "heads.safetensors"
        if not cfg_path.is_file() or not weights.is_file():
            raise SearchError(f"'{head_dir}' is not a heads directory (expected heads.json and heads.safetensors; "
                              f"write one with 'pretrain search align')")
        try:
            cfg = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as exc:
            raise SearchError(f"'{cfg_path}' is not valid JSON ({exc.msg})") from None
        if cfg.get("format") != FORMAT:
            raise SearchError(f"'{cfg_path}' has format {cfg.get('format')!r}; expected {FORMAT}")
        heads = cls(int(cfg["image_dim"]), int(cfg["text_dim"]), int(cfg["out_dim"]), int(cfg["hidden_dim"]),
                    text_encoder=cfg["text_encoder"])
        heads.load_state_dict(load_file(str(weights)))
        heads.info = {k: v for k, v in cfg.items() if k not in heads.config_json()}
        heads.eval()
        return heads


def _caption_accuracy(img: torch.Tensor, txt: torch.Tensor, captions: Sequence[str]) -> float:
    """Fraction of images whose best-scoring caption (among the given ones) has the true text.

    Identical captions ("the digit seven") count as correct, so the number is fair to captions
    that repeat.
    """
    best = (img @ txt.T).argmax(dim=1).numpy()
    return float(np.mean([captions[b] == captions[i] for i, b in enumerate(best)]))


def train_alignment(image_vecs: np.ndarray, captions: Sequence[str], config: AlignConfig | None = None,
                    text_encoder: TextEncoder | None = None, progress: bool = True) -> AlignmentHeads:
    """Train alignment heads on (image embedding, caption) pairs with InfoNCE.

    Args:
        image_vecs: [N, D] frozen image embeddings (raw encoder outputs) of the captioned images.
        captions: N caption strings, row i describing image i.
        config: training settings (defaults: :class:`AlignConfig`).
        text_encoder: overrides ``config.text_encoder`` (an already loaded encoder).
        progress: tqdm bar over epochs.

    Returns:
        The trained heads (eval mode), with ``info["metrics"]`` holding the final train loss,
        validation loss and validation caption-retrieval accuracy, and the wall time.
    """
    cfg = config or AlignConfig()
    cfg.validate()
    image_vecs = np.ascontiguousarray(image_vecs, dtype=np.float32)
    n = len(image_vecs)
    if image_vecs.ndim != 2 or n != len(captions):
        raise SearchError(f"align: {n} image embeddings but {len(captions)} captions; expected one caption per image")
    if n < 4:
        raise SearchError(f"align: only {n} captioned images; need at least 4")
    t0 = time.time()
    enc = text_encoder or get_text_encoder(cfg.text_encoder)
    uniq, inverse = np.unique(np.asarray(captions, dtype=object).astype(str), return_inverse=True)
    text_vecs = enc.encode(list(uniq))[inverse]  # each distinct caption is embedded once

    gen = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(n, generator=gen).numpy()
    n_val = int(round(cfg.val_fraction * n)) if n >= 20 else 0
    val, tr = perm[:n_val], perm[n_val:]
    x_tr, t_tr = torch.from_numpy(image_vecs[tr]), torch.from_numpy(text_vecs[tr])

    torch.manual_seed(cfg.seed)
    heads = AlignmentHeads(image_vecs.shape[1], text_vecs.shape[1], cfg.out_dim, cfg.hidden_dim,
                           text_encoder=getattr(enc, "name", cfg.text_encoder), temperature=cfg.temperature,
                           dropout=cfg.dropout)
    heads.image_mean.copy_(x_tr.mean(0))
    heads.image_std.copy_(x_tr.std(0).clamp_min(1e-6) if len(tr) > 1 else torch.ones(image_vecs.shape[1]))
    heads.log_logit_scale.requires_grad_(cfg.learn_temperature)
    params = [p for p in heads.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    bs = min(cfg.batch_size, len(tr))
    steps_per_epoch = max(1, len(tr) // bs)
    total = cfg.epochs * steps_per_epoch
    warmup = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))

    heads.train()
    history = []
    bar = tqdm(range(cfg.epochs), desc="align", unit="epoch", disable=not progress)
    for _ in bar:
        order = torch.randperm(len(tr), generator=gen)
        losses = []
        for s in range(steps_per_epoch):  # full batches only: every batch has bs - 1 negatives
            b = order[s * bs:(s + 1) * bs]
            loss = clip_loss(heads.encode_image(x_tr[b]), heads.encode_text(t_tr[b]), heads.logit_scale())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        history.append(float(np.mean(losses)))
        bar.set_postfix(loss=f"{history[-1]:.3f}")
    bar.close()
    heads.eval()

    metrics = {"train_loss": history[-1], "train_loss_first_epoch": history[0], "pairs": n,
               "train_pairs": int(len(tr)), "val_pairs": int(n_val)}
    with torch.no_grad():
        if n_val >= 2:
            xv = heads.encode_image(torch.from_numpy(image_vecs[val]))
            tv = heads.encode_text(torch.from_numpy(text_vecs[val]))
            metrics["val_loss"] = float(clip_loss(xv, tv, heads.logit_scale()))
            metrics["val_caption_acc"] = _caption_accuracy(xv, tv, [str(captions[i]) for i in val])
    metrics["wall_s"] = round(time.time() - t0, 2)
    heads.info = {"config": asdict(cfg), "metrics": metrics}
    return heads


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


def align_embeddings(emb_dir: str | os.PathLike, captions_path: str | os.PathLike, out_dir: str | os.PathLike,
                     config: AlignConfig | None = None, progress: bool = True) -> AlignmentHeads:
    """``pretrain search align``: read EMB_DIR and a captions file, train, write HEAD_DIR."""
    from .captions import read_captions
    from .embed import EmbeddingStore

    store = EmbeddingStore(emb_dir)
    records = read_captions(captions_path)
    vecs, texts, _ = pair_captions(store, records)
    heads = train_alignment(vecs, texts, config, progress=progress)
    heads.info["trained_on"] = {"embeddings": str(Path(emb_dir).resolve()),
                                "captions": str(Path(captions_path).resolve()), "pairs": len(texts)}
    heads.save(out_dir)
    return heads


def config_from_overrides(overrides, base: AlignConfig | None = None) -> AlignConfig:
    """An :class:`AlignConfig` from ``key=value`` strings (or a ``{field: value}`` dict) on top of
    ``base``, through the project's one config mechanism: values take the field's type, and an
    unknown key or a bad value is a ConfigError naming it and the valid ones."""
    cfg = dataclasses.replace(base) if base is not None else AlignConfig()
    values = overrides if isinstance(overrides, dict) else parse_overrides(list(overrides or []))
    fill(cfg, values, "align.")
    return cfg
