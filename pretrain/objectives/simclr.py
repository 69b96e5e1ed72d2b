"""SimCLR / SimCLRv2 (Chen et al. 2020a, "A Simple Framework..."; 2020b, "Big Self-Supervised Models...")."""
from __future__ import annotations

from dataclasses import dataclass

import torch


from losses import nt_xent_loss
from models import MLPHead

from ..config import ConfigError
from .base import Objective, register_objective


@dataclass
class SimclrConfig:
    proj_hidden: int = 0  # 0 = the backbone's embed_dim, as in SimCLRv2
    proj_dim: int = 128
    proj_layers: int = 3  # SimCLRv2's deeper head (SimCLR v1 used 2)
    temperature: float = 0.2
    # the projector's norm layers: bn (SimCLR's, statistics over the global batch), ln or none (no
    # batch statistics: a step in gradient-caching chunks then has exactly the one-pass gradient)
    head_norm: str = "bn"


@register_objective("simclr", SimclrConfig)
class SimCLR(Objective):
    """Contrast two views of each image against every other image of the (global) batch."""

    # why it cannot run as pipeline stages (parallel.pp > 1); docs/parallel.md
    pipeline_refusal = ("its NT-Xent loss compares every view with every other view of the batch, so both views' encodings "
                        "must reach the loss together (not cut yet: use ZeRO, or tp with a ViT)")

    view_recipe = "simclr"
    supports_grad_chunks = True

    def __init__(self, towers, cfg: SimclrConfig):
        super().__init__(towers)
        self.cfg = cfg
        if cfg.head_norm not in ("bn", "ln", "none"):
            raise ConfigError(f"config key 'simclr.head_norm': expected bn, ln or none, got {cfg.head_norm!r}")
        hidden = cfg.proj_hidden or self.backbone.embed_dim
        self.projector = MLPHead(self.backbone.embed_dim, hidden, cfg.proj_dim, num_layers=cfg.proj_layers,
                                 norm=cfg.head_norm, last_norm=cfg.head_norm != "none")

    def forward(self, batch: dict) -> dict:
        v1, v2 = batch["views"][:2]
        n = v1.shape[0]
        z = self.encode_chunked(lambda x: self.projector(self.backbone.forward_pooled(x)), torch.cat([v1, v2])).float()
        loss = nt_xent_loss(z[:n], z[n:], temperature=self.cfg.temperature)
        return {"loss": loss}
