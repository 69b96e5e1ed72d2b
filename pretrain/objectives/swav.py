"""SwAV: Swapping Assignments between Views (Caron et al., "Unsupervised Learning of Visual Features by
Contrasting Cluster Assignments", NeurIPS 2020), with multi-crop and an optional feature queue."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from losses import swav_loss, world_size
from models import MLPHead

from ..config import ConfigError
from .base import Objective, register_objective


@dataclass
class SwavConfig:
    proj_hidden: int = 2048
    proj_dim: int = 128
    num_prototypes: int = 3000
    temperature: float = 0.1  # of the softmax predictions
    epsilon: float = 0.05  # Sinkhorn entropy regularisation
    sinkhorn_iterations: int = 3
    freeze_prototypes_steps: int = 313  # prototypes get no update during the first steps
    queue_length: int = 0  # queued global-crop embeddings over all ranks (each keeps length / world size); 0 = off
    queue_start_epoch: int = 15  # the queue is created at the first step of this epoch


def _unit_rows(w: Tensor) -> Tensor:
    return F.normalize(w, dim=1)


class Prototypes(nn.Module):
    """K trainable prototype vectors (a linear layer without bias); scores are computed in fp32.

    Shapes: ``[N, D] -> [N, K]``. With ``frozen=True`` the scores are the same but the weight's
    gradient is zero (a zero tensor, not None, so that every engine reduces and steps it alike).
    """

    def __init__(self, dim: int, num_prototypes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_prototypes, dim))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's initialisation
        with torch.no_grad():
            self.weight.copy_(_unit_rows(self.weight))

    def forward(self, z: Tensor, frozen: bool = False) -> Tensor:
        w = self.weight.detach() + 0.0 * self.weight if frozen else self.weight
        # scores are divided by epsilon=0.05 inside Sinkhorn: bf16's 3 digits would not do
        with torch.autocast(z.device.type, enabled=False):
            return z.float() @ w.float().T


@register_objective("swav", SwavConfig)
class SwAV(Objective):
    """Predict each global crop's Sinkhorn code from every other crop's prototype scores.

    Crops of one resolution go through the backbone as one batch (one pass per resolution, as
    in the reference implementation); all crops then share the projection head, whose outputs
    are L2-normalised and scored against unit-norm prototypes. The prototypes are projected
    back onto the unit sphere after every optimizer step (:meth:`param_projections`, applied
    by the engine to the parameters the optimizer really updates) and get a zero gradient for
    the first ``freeze_prototypes_steps`` steps.

    With ``queue_length > 0`` each rank keeps the global-crop embeddings of its previous
    batches (``queue_length / world size`` rows per global crop), starting at the first step of
    epoch ``queue_start_epoch``; once full, the queue's scores against the current prototypes
    join the batch's scores in Sinkhorn, and only the batch's codes are used. The queue, its
    fill level and the step counter are saved with checkpoints (``state_dict_extra``).
    """

    # why it cannot run as pipeline stages (parallel.pp > 1); docs/parallel.md
    pipeline_refusal = ("multi-crop views of two sizes go through the backbone separately and the Sinkhorn assignment needs "
                        "the whole batch's scores")

    view_recipe = "simclr"
    multi_crop = True
    local_views = 6  # the paper's 2 x 224 + 6 x 96
    num_global = 2

    def __init__(self, towers, cfg: SwavConfig):
        super().__init__(towers)
        for name in ("proj_hidden", "proj_dim", "num_prototypes", "sinkhorn_iterations"):
            if getattr(cfg, name) < 1:
                raise ConfigError(f"swav.{name} must be >= 1; got {getattr(cfg, name)}")
        for name in ("temperature", "epsilon"):
            if not getattr(cfg, name) > 0:
                raise ConfigError(f"swav.{name} must be > 0; got {getattr(cfg, name)}")
        for name in ("freeze_prototypes_steps", "queue_length", "queue_start_epoch"):
            if getattr(cfg, name) < 0:
                raise ConfigError(f"swav.{name} must be >= 0; got {getattr(cfg, name)}")
        self.cfg = cfg
        self.projector = MLPHead(self.backbone.embed_dim, cfg.proj_hidden, cfg.proj_dim, num_layers=2, norm="bn")
        self.prototypes = Prototypes(cfg.proj_dim, cfg.num_prototypes)
        self.step = 0  # optimizer steps taken (freeze and queue start are counted in these)
        self.queue_start_step = 0  # set by on_train_start from the epoch length; 0 outside the loop
        self.queue: Tensor | None = None  # [num_global, L, proj_dim] fp32, newest rows first
        self.queue_count = 0  # rows of each crop's queue filled so far

    # -- hooks -----------------------------------------------------------------------------------

    def on_train_start(self, steps_per_epoch: float) -> None:
        self.queue_start_step = math.ceil(self.cfg.queue_start_epoch * steps_per_epoch)

    def on_step_end(self, step: int, max_steps: int) -> None:
        self.step = step + 1

    def param_projections(self):
        return [(self.prototypes.weight, _unit_rows)]

    def state_dict_extra(self) -> dict:
        q = None if self.queue is None else self.queue.clone()
        return {"step": self.step, "queue": q, "queue_count": self.queue_count}

    def load_state_dict_extra(self, d: dict) -> None:
        self.step = int(d.get("step", self.step))
        q = d.get("queue")
        self.queue = None if q is None else q.clone().float()
        self.queue_count = int(d.get("queue_count", 0))

    # -- training --------------------------------------------------------------------------------

    @property
    def prototypes_frozen(self) -> bool:
        return self.step < self.cfg.freeze_prototypes_steps

    @property
    def queue_active(self) -> bool:
        return self.cfg.queue_length > 0 and self.step >= self.queue_start_step

    def embeddings(self, views: list[Tensor]) -> Tensor:
        """L2-normalised projections [V * B, proj_dim] (fp32) of all crops, in crop order.

        Consecutive crops of the same size share one backbone pass (multi-crop efficiency).
        """
        feats, i = [], 0
        while i < len(views):
            j = i + 1
            while j < len(views) and views[j].shape[-2:] == views[i].shape[-2:]:
                j += 1
            x = views[i] if j == i + 1 else torch.cat(views[i:j])
            feats.append(self.backbone.forward_pooled(x))
            i = j
        return F.normalize(self.projector(torch.cat(feats)).float(), dim=1)

    def forward(self, batch: dict) -> dict:
        views = batch["views"]
        if len(views) < 2:
            raise ValueError(f"SwAV needs at least 2 views per batch; got {len(views)}")
        n, ng = views[0].shape[0], min(self.num_global, len(views))
        z = self.embeddings(views)
        queue_on = self.training and self.queue_active
        if queue_on and self.queue is None:
            rows = self.cfg.queue_length // world_size()
            if rows < n:
                raise ConfigError(f"swav.queue_length={self.cfg.queue_length} leaves {rows} queued rows per rank, "
                                 f"fewer than the batch of {n}; use at least batch_size x world size")
            self.queue = z.new_zeros(ng, rows, z.shape[1])
            self.queue_count = 0
        queued = self.queue if queue_on and self.queue_count >= self.queue.shape[1] else None
        zq = z if queued is None else torch.cat([z, queued.reshape(-1, z.shape[1])])
        s = self.prototypes(zq, frozen=self.prototypes_frozen)
        scores = list(s[:z.shape[0]].split(n))
        queue_scores = None if queued is None else list(s[z.shape[0]:].reshape(ng, -1, s.shape[1]))
        loss = swav_loss(scores, self.cfg.temperature, self.cfg.epsilon, self.cfg.sinkhorn_iterations,
                         num_global=ng, queue_scores=queue_scores)
        if queue_on:
            with torch.no_grad():
                rows = self.queue.shape[1]
                for c in range(ng):
                    new = z[c * n:(c + 1) * n].detach()
                    self.queue[c] = torch.cat([new, self.queue[c]])[:rows]
                self.queue_count = min(rows, self.queue_count + n)
        return {"loss": loss, "queue_used": torch.tensor(float(queued is not None)),
                "prototypes_frozen": torch.tensor(float(self.prototypes_frozen))}
