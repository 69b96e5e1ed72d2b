"""BYOL: Bootstrap Your Own Latent (Grill et al., NeurIPS 2020)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


from losses import byol_loss
from models import MLPHead, ema_update_, frozen_copy

from ..config import ConfigError
from .base import Objective, decay_groups, register_objective


@dataclass
class ByolConfig:
    proj_hidden: int = 4096
    proj_dim: int = 256
    pred_hidden: int = 4096
    base_momentum: float = 0.996  # EMA momentum at step 0, raised to final_momentum on a cosine
    final_momentum: float = 1.0
    # Norm of the projector / predictor hidden layers: bn (the paper), ln, or none. With
    # model.norm=gn_ws and head_norm=ln no layer uses batch statistics (Richemond et al. 2020).
    head_norm: str = "bn"
    # Weight standardisation in every linear layer of the projector and predictor (models.WSLinear):
    # removes, per sample, the feature component all images share, which head batch norm would
    # otherwise centre away over the batch. For model.norm=gn_ws with head_norm=none or ln.
    head_ws: bool = False
    # Learning-rate multiplier of the predictor (a predictor that keeps close to its optimum, as
    # in DirectPred / SimSiam analyses, is what keeps BYOL from collapsing).
    pred_lr_scale: float = 1.0


def cosine_momentum(step: int, max_steps: int, base: float, final: float = 1.0) -> float:
    """BYOL's target decay: tau = final - (final - base) * (cos(pi * k / K) + 1) / 2."""
    k = min(max(step, 0), max_steps)
    return final - (final - base) * (math.cos(math.pi * k / max(max_steps, 1)) + 1) / 2


# target_std below which BYOL warns that its projections are collapsing (a mean target cosine of
# 0.999 between images gives about 0.03)
COLLAPSE_STD = 0.05


@torch.no_grad()
def projection_spread(z: torch.Tensor) -> torch.Tensor:
    """Collapse monitor: the standard deviation over the batch of the l2-normalised rows of ``z``
    ``[B, D]``, averaged over dimensions and times ``sqrt(D)``. About 1 for outputs spread over the
    sphere, 0 when every sample gets the same direction. Logged only; the model never uses it."""
    zn = torch.nn.functional.normalize(z.float(), dim=1)
    return zn.std(0).mean() * math.sqrt(zn.shape[1])


@register_objective("byol", ByolConfig)
class BYOL(Objective):
    """Online network (backbone, projector, predictor) regresses an EMA target's projection.

    The loss is symmetrised over the two views: each view's prediction is pulled towards the
    target projection of the other view; the two terms are summed as in the paper.
    """

    # why it cannot run as pipeline stages (parallel.pp > 1); docs/parallel.md
    pipeline_refusal = ("two networks (online and EMA target) each encode both views and meet only in the loss; a chain of "
                        "stages carries one network (not cut yet: use ZeRO, or tp with a ViT)")

    view_recipe = "byol"
    has_ema_teacher = True
    # How the teacher is averaged: models.ema_update_ on whole tensors by default; an engine that
    # partitions parameters (DeepSpeed ZeRO-3) replaces it with an update of the local shards.
    ema_update_fn = staticmethod(ema_update_)

    def __init__(self, towers, cfg: ByolConfig):
        super().__init__(towers)
        self.cfg = cfg
        if not cfg.pred_lr_scale > 0:
            raise ConfigError(f"byol.pred_lr_scale must be > 0; got {cfg.pred_lr_scale!r}")
        if cfg.head_norm not in ("bn", "ln", "none"):
            raise ConfigError(f"byol.head_norm must be bn, ln or none; got {cfg.head_norm!r}")
        self.projector = MLPHead(self.backbone.embed_dim, cfg.proj_hidden, cfg.proj_dim, num_layers=2, norm=cfg.head_norm,
                                 weight_std=cfg.head_ws)
        self.predictor = MLPHead(cfg.proj_dim, cfg.pred_hidden, cfg.proj_dim, num_layers=2, norm=cfg.head_norm,
                                 weight_std=cfg.head_ws)
        self.target_backbone = frozen_copy(self.backbone)
        self.target_projector = frozen_copy(self.projector)
        self.momentum = cfg.base_momentum

    def trainable_modules(self):
        return [self.backbone, self.projector, self.predictor]

    def param_groups(self) -> list[dict]:
        """The base groups; the predictor's get ``lr_scale = pred_lr_scale`` when it is not 1."""
        if self.cfg.pred_lr_scale == 1.0:
            return super().param_groups()
        return (decay_groups([self.backbone, self.projector])
                + decay_groups([self.predictor], prefix="predictor_", lr_scale=self.cfg.pred_lr_scale))

    def forward(self, batch: dict) -> dict:
        v1, v2 = batch["views"][:2]
        n = v1.shape[0]
        x = torch.cat([v1, v2])  # one pass over both views: larger GEMMs, shared BN statistics
        p = self.predictor(self.projector(self.backbone.forward_pooled(x)))
        with torch.no_grad():
            z = self.target_projector(self.target_backbone.forward_pooled(x))
        p1, p2 = p[:n].float(), p[n:].float()
        z1, z2 = z[:n].float(), z[n:].float()
        loss = byol_loss(p1, z2) + byol_loss(p2, z1)
        return {"loss": loss, "momentum": torch.tensor(self.momentum), "target_std": projection_spread(z)}

    def check_metrics(self, metrics: dict) -> str | None:
        std = metrics.get("target_std")
        if std is None or std >= COLLAPSE_STD:
            return None
        return (f"target_std {std:.3f} at step {metrics.get('step')}: the target projections of different "
                f"images point nearly the same way (collapse); the backbone may still learn, but see docs/results.md "
                f"on BYOL without batch statistics (byol.pred_lr_scale, byol.head_ws)")

    @torch.no_grad()
    def on_step_end(self, step: int, max_steps: int) -> None:
        self.ema_update_fn(self.target_backbone, self.backbone, self.momentum)
        self.ema_update_fn(self.target_projector, self.projector, self.momentum)
        self.momentum = cosine_momentum(step + 1, max_steps, self.cfg.base_momentum, self.cfg.final_momentum)

    def state_dict_extra(self) -> dict:
        return {"momentum": self.momentum}

    def load_state_dict_extra(self, d: dict) -> None:
        self.momentum = float(d.get("momentum", self.momentum))
