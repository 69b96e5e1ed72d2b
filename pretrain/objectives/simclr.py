"""SimCLR / SimCLRv2 (Chen et al. 2020a, "A Simple Framework..."; 2020b, "Big Self-Supervised Models...")."""
from __future__ import annotations

from dataclasses import dataclass

import torch


from losses import nt_xent_loss
from models import MLPHead

from .base import Objective, register_objective


@dataclass
class SimclrConfig:
    proj_hidden: int = 0  # 0 = the backbone's embed_dim, as in SimCLRv2
    proj_dim: int = 128
    proj_layers: int = 3  # SimCLRv2's deeper head (SimCLR v1 used 2)
    temperature: float = 0.2


@register_objective("simclr", SimclrConfig)
class SimCLR(Objective):
    """Contrast two views of each image against every other image of the (global) batch."""

    view_recipe = "simclr"

    def __init__(self, towers, cfg: SimclrConfig):
        super().__init__(towers)
        self.cfg = cfg
        hidden = cfg.proj_hidden or self.backbone.embed_dim
        self.projector = MLPHead(self.backbone.embed_dim, hidden, cfg.proj_dim, num_layers=cfg.proj_layers,
                                 norm="bn", last_norm=True)

    def forward(self, batch: dict) -> dict:
        v1, v2 = batch["views"][:2]
        n = v1.shape[0]
        z = self.projector(self.backbone.forward_pooled(torch.cat([v1, v2]))).float()
        loss = nt_xent_loss(z[:n], z[n:], temperature=self.cfg.temperature)
        return {"loss": loss}
