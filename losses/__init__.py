"""Self-supervised and multimodal losses as pure functions on tensors.

Every loss works in a single process and, unchanged, under
``torch.distributed`` data parallelism (contrastive negatives are gathered
from all ranks with :func:`gather_with_grad`). Only ``torch`` is imported.
"""

from .byol import byol_loss
from .clip import blockwise_info_nce, clip_loss
from .distill import distillation_loss
from .dist import (all_reduce_max_, all_reduce_mean, all_reduce_sum_, data_parallel_group, gather_with_grad, rank,
                   set_data_parallel_group, world_size)
from .nt_xent import nt_xent_loss
from .siglip import siglip_loss
from .swav import sinkhorn, swav_loss
from .vatt import mil_nce_loss, nce_loss

__all__ = [
    "byol_loss",
    "nt_xent_loss",
    "clip_loss",
    "blockwise_info_nce",
    "siglip_loss",
    "distillation_loss",
    "sinkhorn",
    "swav_loss",
    "nce_loss",
    "mil_nce_loss",
    "gather_with_grad",
    "world_size",
    "rank",
    "all_reduce_mean",
    "all_reduce_sum_",
    "all_reduce_max_",
    "data_parallel_group",
    "set_data_parallel_group",
]
