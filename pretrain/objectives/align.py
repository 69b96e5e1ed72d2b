"""Alignment heads over frozen embeddings: the training step of ``pretrain search align``.

AION-Search (Parker et al. 2025) makes an image collection searchable by text with two small
heads on top of frozen encoders: an MLP from the (standardised) image embedding and an MLP from
the caption's sentence embedding into one unit sphere, trained with CLIP's symmetric InfoNCE
(:func:`losses.clip_loss`, Radford et al. 2021) and a learned temperature on the captioned
images only. The encoders never train; the heads (:class:`eval_probes.search.align.AlignmentHeads`)
are the whole model, so the objective declares no tower and trains on ``embedded_pairs``
batches (``data=EMB_DIR``, ``align.captions=CAPTIONS.jsonl``; see :mod:`pretrain.batches`).

It reports the InfoNCE loss and caption-retrieval accuracy of the held-out pairs (``val_loss``,
``val_caption_acc``) every ``eval_every`` steps and at the end, and exports the heads' tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from eval_probes.search.align import AlignmentHeads, caption_accuracy
from losses import clip_loss

from ..config import ConfigError
from .base import Objective, register_objective

HEADS_FORMAT = "ssl-pretrain-align-heads/1"


@dataclass
class AlignObjectiveConfig:
    captions: str = ""  # CAPTIONS.jsonl whose ids name embeddings of data=EMB_DIR
    text_encoder: str = "minilm"  # registered text encoder (eval_probes.search.text)
    out_dim: int = 128  # E, the shared space
    hidden_dim: int = 512  # hidden width of both heads
    temperature: float = 0.07  # initial softmax temperature (CLIP's)
    learn_temperature: bool = True  # learn the logit scale (clamped at 100)
    dropout: float = 0.1  # on the hidden layer of both heads
    val_fraction: float = 0.1  # pairs held out for val_loss / val_caption_acc (none below 20 pairs)
    image_dim: int = 0  # 0 = the embeddings' (filled in from the data)
    text_dim: int = 0  # 0 = the text encoder's (filled in from the data)


@register_objective("align", AlignObjectiveConfig)
class Align(Objective):
    """Two MLP heads trained with symmetric InfoNCE on (image embedding, caption embedding) pairs."""

    # why it cannot run as pipeline stages (parallel.pp > 1); docs/parallel.md
    pipeline_refusal = ("two small heads over cached embeddings: nothing deep enough to cut")

    towers = ()
    batch = "embedded_pairs"
    pretraining = False
    eval_split = "val"

    def __init__(self, towers, cfg: AlignObjectiveConfig):
        super().__init__(towers)
        self.cfg = cfg
        if cfg.image_dim < 1 or cfg.text_dim < 1:
            raise ConfigError("align: image_dim and text_dim come from the data (the embeddings and the text "
                              f"encoder); got {cfg.image_dim} and {cfg.text_dim}")
        if not cfg.temperature > 0:
            raise ConfigError(f"config key 'align.temperature': expected a positive number, got {cfg.temperature}")
        if not 0 <= cfg.dropout < 1:
            raise ConfigError(f"config key 'align.dropout': expected a value in [0, 1), got {cfg.dropout}")
        for key in ("out_dim", "hidden_dim"):
            if getattr(cfg, key) < 1:
                raise ConfigError(f"config key 'align.{key}': expected an integer >= 1, got {getattr(cfg, key)}")
        self.heads = AlignmentHeads(cfg.image_dim, cfg.text_dim, cfg.out_dim, cfg.hidden_dim,
                                    text_encoder=cfg.text_encoder, temperature=cfg.temperature, dropout=cfg.dropout)
        self.heads.log_logit_scale.requires_grad_(cfg.learn_temperature)
        if cfg.val_fraction <= 0:
            self.eval_split = None

    @classmethod
    def resolve_config(cls, cfg, info):
        """``image_dim`` / ``text_dim`` from the data; a value given that differs is an error."""
        dims = {k: int(info.extra.get(k, 0)) for k in ("image_dim", "text_dim")}
        for key, got in dims.items():
            given = getattr(cfg, key)
            if given and got and given != got:
                raise ConfigError(f"config key 'align.{key}'={given}, but the data gives {got}")
        return replace(cfg, image_dim=cfg.image_dim or dims["image_dim"], text_dim=cfg.text_dim or dims["text_dim"],
                       text_encoder=info.extra.get("text_encoder", cfg.text_encoder))

    @torch.no_grad()
    def on_data(self, train_ds) -> None:
        """Standardise image embeddings with the training pairs' mean and std."""
        x = train_ds.image_vecs.float()
        self.heads.image_mean.copy_(x.mean(0))
        self.heads.image_std.copy_(x.std(0).clamp_min(1e-6) if len(x) > 1 else torch.ones(x.shape[1]))

    def param_groups(self) -> list[dict]:
        """AdamW weight decay on the weight matrices only (biases and the logit scale go without)."""
        params = [p for p in self.heads.parameters() if p.requires_grad]
        return [{"params": [p for p in params if p.ndim >= 2], "name": "weights"},
                {"params": [p for p in params if p.ndim < 2], "name": "no_decay", "weight_decay": 0.0,
                 "lars_exclude": True}]

    def forward(self, batch: dict) -> dict:
        img = self.heads.encode_image(batch["image_vec"].float())
        txt = self.heads.encode_text(batch["text_vec"].float())
        scale = self.heads.logit_scale()
        loss = clip_loss(img, txt, scale)
        return {"loss": loss, "logit_scale": scale.detach()}

    @torch.no_grad()
    def evaluate(self, loader, final: bool = False) -> dict[str, float]:
        """InfoNCE loss (``loss``) and caption-retrieval accuracy (``caption_acc``) over all held-out pairs."""
        was = self.training
        self.eval()
        imgs, txts, ids = [], [], []
        for b in loader:
            imgs.append(self.heads.encode_image(b["image_vec"].float()).float())
            txts.append(self.heads.encode_text(b["text_vec"].float()).float())
            ids.append(b["caption_id"])
        self.train(was)
        if not imgs or sum(len(i) for i in imgs) < 2:
            return {}
        img, txt, cid = torch.cat(imgs), torch.cat(txts), torch.cat(ids)
        # every rank evaluates all held-out pairs: the loss of this one matrix, without gathering
        logits = self.heads.logit_scale().float() * img @ txt.T
        target = torch.arange(len(img))
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
        return {"loss": float(loss), "caption_acc": caption_accuracy(img, txt, cid)}

    def export_state(self, state: dict, run: dict):
        """The heads' tensors (names as :class:`AlignmentHeads` has them), once training is complete."""
        if not run["final"]:
            return None
        return ({k[len("heads."):]: v for k, v in state.items() if k.startswith("heads.")},
                {"format": HEADS_FORMAT})
