"""CLIP (Radford et al. 2021) and SigLIP (Zhai et al. 2023): image and text towers aligned by a
contrastive loss over the global batch, with LiT / BASIC-style locked towers (Zhai et al. 2022;
Pham et al. 2023) and per-tower learning rates.

Each tower's pooled output goes through a linear projection (no bias, as in CLIP) into a joint
space of ``embed_dim``; the loss scores every image of the global batch against every text:

* ``loss=clip``: the symmetric InfoNCE of :func:`losses.clip_loss`, with the learned temperature
  ``logit_scale`` (its log, started at ln(1/0.07) and clamped to [0, ln 100] after every step);
* ``loss=siglip``: the pairwise sigmoid loss of :func:`losses.siglip_loss`, with the learned
  ``logit_scale`` (the paper starts it at ln 10) and bias ``logit_bias`` (started at -10).

Both scalars are ``[1]`` tensors: DeepSpeed cannot broadcast 0-dim parameters.

Evaluation (``eval_split=test``) measures what users of such a model care about, on held-out pairs:
image->text and text->image recall@1/5/10 and mean rank (a query counts if any of its positives is
in the top k), and zero-shot top-1 / top-5 per source that has classes (class names x prompt
templates, one normalised text embedding per class: the mean over templates, re-normalised).
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from losses import clip_loss, siglip_loss
from models.layer_ids import layer_ids, num_layers

from ..config import ConfigError
from .base import Objective, register_objective

__all__ = ["ClipConfig", "Clip", "retrieval_metrics", "zero_shot_classifier", "zero_shot_accuracy"]

LOSSES = ("clip", "siglip")


@dataclass
class ClipConfig:
    loss: str = "clip"  # clip (softmax InfoNCE) | siglip (pairwise sigmoid)
    embed_dim: int = 128  # width of the joint embedding space (the two projections' output)
    init_logit_scale: float = math.log(1 / 0.07)  # ln of the initial scale (SigLIP's paper: ln 10)
    max_logit_scale: float = math.log(100)  # the log scale is clamped to [0, this] after every step
    init_logit_bias: float = -10.0  # SigLIP's bias b
    lock_image: bool = False  # LiT: the image tower is not trained (nor its batch-norm statistics)
    lock_text: bool = False
    image_lr_scale: float = 1.0  # the image tower's LR = lr x this (the heads keep lr)
    text_lr_scale: float = 1.0
    layer_decay: float = 1.0  # per tower: lr x decay ** (num_layers - layer id); 1 = off
    # a locked tower's pooled output is a function of its input alone: keep each one computed (in
    # memory, per process) and look it up when the same image or caption comes again
    cache_locked: bool = True
    templates: tuple[str, ...] = ()  # zero-shot prompts ("a photo of a {}."); empty = each source's own


@register_objective("clip", ClipConfig)
class Clip(Objective):
    """Two towers and two linear projections trained by a contrastive image-text loss."""

    # why it cannot run as pipeline stages (parallel.pp > 1); docs/parallel.md
    pipeline_refusal = ("two towers (image and text) meet only in the contrastive loss; a chain of stages holds one (use "
                        "ZeRO, grad_chunks, or tp)")

    towers = ("image", "text")
    supports_grad_chunks = True
    batch = "pairs"
    eval_split = "test"

    def __init__(self, towers, cfg: ClipConfig):
        super().__init__(towers)
        check_config(cfg)
        self.cfg = cfg
        img_dim, txt_dim = self.tower("image").embed_dim, self.tower("text").embed_dim
        self.image_proj = nn.Linear(img_dim, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(txt_dim, cfg.embed_dim, bias=False)
        nn.init.normal_(self.image_proj.weight, std=img_dim ** -0.5)
        nn.init.normal_(self.text_proj.weight, std=txt_dim ** -0.5)
        self.logit_scale = nn.Parameter(torch.full([1], float(cfg.init_logit_scale)))
        if cfg.loss == "siglip":
            self.logit_bias = nn.Parameter(torch.full([1], float(cfg.init_logit_bias)))
        for name, locked in (("image", cfg.lock_image), ("text", cfg.lock_text)):
            if locked:
                self.tower(name).requires_grad_(False)
        self._frozen: dict[str, dict[bytes, Tensor]] = {"image": {}, "text": {}}

    def train(self, mode: bool = True):
        super().train(mode)
        for name, locked in (("image", self.cfg.lock_image), ("text", self.cfg.lock_text)):
            if locked:  # a locked tower keeps its batch-norm statistics and has no dropout
                self.tower(name).eval()
        return self

    # ------------------------------------------------------------------ embeddings

    def pooled(self, name: str, x: Tensor) -> Tensor:
        """Tower ``name``'s pooled output; from the cache of a locked tower where it has one."""
        tower = self.tower(name)
        locked = self.cfg.lock_image if name == "image" else self.cfg.lock_text
        if not (locked and self.cfg.cache_locked):
            return tower.forward_pooled(x)
        cache = self._frozen[name]
        rows = x.detach().cpu().contiguous()
        keys = [hashlib.blake2b(r.numpy().tobytes(), digest_size=16).digest() for r in rows]
        todo = [i for i, k in enumerate(keys) if k not in cache]
        if todo:
            with torch.no_grad():
                out = tower.forward_pooled(x[todo]).float().cpu()
            for i, row in zip(todo, out):
                cache[keys[i]] = row
        return torch.stack([cache[k] for k in keys]).to(x.device)

    def encode_image(self, image: Tensor) -> Tensor:
        """Joint-space image embeddings [B, embed_dim] (not normalised)."""
        return self.image_proj(self.pooled("image", image))

    def encode_text(self, ids: Tensor) -> Tensor:
        """Joint-space text embeddings [B, embed_dim] (not normalised) of token ids [B, L]."""
        return self.text_proj(self.pooled("text", ids))

    def scale(self) -> Tensor:
        return self.logit_scale.clamp(max=self.cfg.max_logit_scale).exp()

    def forward(self, batch: dict) -> dict[str, Tensor]:
        img = self.encode_chunked(self.encode_image, batch["image"]).float()
        txt = self.encode_chunked(self.encode_text, batch["text"]).float()
        scale = self.scale()
        if self.cfg.loss == "siglip":
            loss = siglip_loss(img, txt, scale, self.logit_bias)
        else:
            # with gradient caching the logits too are computed a chunk of rows at a time
            chunks = self.grad_chunks if self.training else 1
            loss = clip_loss(img, txt, scale, block=-(-img.shape[0] // chunks) if chunks > 1 else 0)
        return {"loss": loss, "logit_scale": scale.detach().reshape(())}

    def param_projections(self):
        hi = self.cfg.max_logit_scale
        return [(self.logit_scale, lambda p: p.clamp(0.0, hi))]

    def trainable_modules(self) -> list[nn.Module]:
        return [m for n, m in self.named_children()
                if not ((n == "backbone" and self.cfg.lock_image) or (n == "text_tower" and self.cfg.lock_text))]

    def param_groups(self) -> list[dict]:
        """Each unlocked tower's parameters with ``lr_scale = <tower>_lr_scale x layer_decay **
        (num_layers - layer id)``; the projections and the scalars with the base LR. Norms, biases,
        position embeddings and the scalars get no weight decay."""
        groups: dict[tuple, dict] = {}

        def add(p, key, name, lr_scale, plain):
            g = groups.get((key, plain))
            if g is None:
                g = {"params": [], "name": f"{name}_{'no_decay' if plain else 'decay'}", "lr_scale": lr_scale}
                if plain:
                    g.update(weight_decay=0.0, lars_exclude=True)
                groups[(key, plain)] = g
            g["params"].append(p)

        for tower, attr, lr_scale, locked in (("image", "backbone", self.cfg.image_lr_scale, self.cfg.lock_image),
                                              ("text", "text_tower", self.cfg.text_lr_scale, self.cfg.lock_text)):
            if locked:
                continue
            module = self.tower(tower)
            decay = self.cfg.layer_decay
            ids = layer_ids(module) if decay != 1.0 else {}
            top = num_layers(module) if decay != 1.0 else 0
            no_wd = set(getattr(module, "no_weight_decay", lambda: set())())
            for name, p in module.named_parameters():
                if not p.requires_grad:
                    continue
                lid = ids.get(name, top)
                add(p, (tower, lid), f"{tower}_layer{lid}", lr_scale * decay ** (top - lid),
                    p.ndim <= 1 or name in no_wd)
        for name, p in self.named_parameters():
            if p.requires_grad and not name.startswith(("backbone.", "text_tower.")):
                add(p, ("heads",), "heads", 1.0, p.ndim <= 1)
        return list(groups.values())

    @torch.no_grad()
    def embed(self, batch: dict) -> Tensor:
        """Features for probes: the pooled image-tower output (as for every objective)."""
        return self.pooled("image", batch["image"]).float()

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, loader, final: bool = False) -> dict[str, float]:
        was_training = self.training
        self.eval()
        imgs, txts, owners, labels, sources = [], [], [], [], []
        offset = 0
        for batch in loader:
            n = batch["image"].shape[0]
            if n == 0:
                continue
            imgs.append(F.normalize(self.encode_image(batch["image"]).float(), dim=1))
            txts.append(F.normalize(self.encode_text(batch["text"]).float(), dim=1))
            owners.append(batch["text_owner"] + offset)
            labels.append(batch["label"])
            sources.append(batch["source"])
            offset += n
        if not imgs:
            self.train(was_training)
            return {}
        img, txt = torch.cat(imgs), torch.cat(txts)
        owner, label, source = torch.cat(owners), torch.cat(labels), torch.cat(sources)
        out = retrieval_metrics(img, txt, owner)
        templates = list(self.cfg.templates)
        device = img.device
        for si, src in enumerate(getattr(loader, "sources", [])):
            classes = src["classes"]
            rows = (source == si) & (label >= 0)
            if len(classes) < 2 or not rows.any():
                continue
            names = [loader.class_names[c] for c in classes]
            weights = zero_shot_classifier(lambda ids: self.encode_text(ids.to(device)).float(), loader.tokenizer,
                                           names, templates or src["templates"])
            target = label[rows] - classes[0]  # a source's classes are consecutive ids
            key = re.sub(r"[^0-9a-zA-Z]+", "_", src["name"]).strip("_")
            out.update({f"zeroshot_{key}_{k}": v for k, v in zero_shot_accuracy(img[rows], weights, target).items()})
        self.train(was_training)
        return out


def check_config(cfg: ClipConfig) -> None:
    if cfg.loss not in LOSSES:
        raise ConfigError(f"config key 'clip.loss': expected one of {', '.join(LOSSES)}, got '{cfg.loss}'")
    if cfg.embed_dim < 1:
        raise ConfigError(f"config key 'clip.embed_dim': expected an integer >= 1, got {cfg.embed_dim}")
    if not 0.0 < cfg.layer_decay <= 1.0:
        raise ConfigError(f"config key 'clip.layer_decay': expected a value in (0, 1], got {cfg.layer_decay}")
    for key in ("image_lr_scale", "text_lr_scale"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"config key 'clip.{key}': expected a value >= 0, got {getattr(cfg, key)}")
    for t in cfg.templates:
        if "{}" not in t:
            raise ConfigError(f"config key 'clip.templates': each template needs a '{{}}' for the class name, got {t!r}")


def retrieval_metrics(img: Tensor, txt: Tensor, owner: Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    """Image<->text retrieval over normalised embeddings ``img`` [N, D] and ``txt`` [T, D], where
    caption ``t`` belongs to image ``owner[t]``.

    Image->text: an image's rank is the number of captions scoring above its best own caption;
    text->image: a caption's rank is the number of images scoring above its own. ``r@k`` is the
    fraction of queries with rank < k; ``mean_rank`` is the mean of rank + 1 (1 = first).
    Ties count in the query's favour.
    """
    sims = img @ txt.T  # [N, T]
    n = img.shape[0]
    own = torch.zeros_like(sims, dtype=torch.bool)
    own[owner, torch.arange(txt.shape[0], device=txt.device)] = True
    best_own = sims.masked_fill(~own, float("-inf")).amax(dim=1, keepdim=True)  # [N, 1]
    i2t = (sims.masked_fill(own, float("-inf")) > best_own).sum(1)  # other captions above the best own one
    t2i = (sims > sims[owner, torch.arange(txt.shape[0], device=txt.device)].unsqueeze(0)).sum(0)
    has = own.any(dim=1)
    i2t = i2t[has]
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = float((i2t < k).float().mean())
        out[f"t2i_r{k}"] = float((t2i < k).float().mean())
    out["i2t_mean_rank"] = float((i2t + 1).float().mean())
    out["t2i_mean_rank"] = float((t2i + 1).float().mean())
    out["retrieval_images"], out["retrieval_texts"] = float(n), float(txt.shape[0])
    return out


@torch.no_grad()
def zero_shot_classifier(encode_text, tokenizer, class_names, templates) -> Tensor:
    """``[C, D]``: for each class, the normalised mean of its normalised prompt embeddings
    (``template.format(name)`` for every template), re-normalised. ``encode_text(ids) -> [n, D]``."""
    rows = []
    for name in class_names:
        emb = F.normalize(encode_text(tokenizer([t.format(name) for t in templates])), dim=1)
        rows.append(F.normalize(emb.mean(0), dim=0))
    return torch.stack(rows)


def zero_shot_accuracy(img: Tensor, weights: Tensor, target: Tensor) -> dict[str, float]:
    """Top-1 (and top-5 with at least 5 classes) accuracy of normalised images ``img`` [N, D] classified by
    the nearest class embedding ``weights`` [C, D]."""
    logits = img @ weights.T
    out = {"top1": float((logits.argmax(1) == target).float().mean())}
    if weights.shape[0] >= 5:
        top5 = logits.topk(5, dim=1).indices
        out["top5"] = float((top5 == target.unsqueeze(1)).any(1).float().mean())
    return out
