"""The parallel layout of a run: how its ranks split into data-, tensor- and pipeline-parallel groups.

A layout is the only source of the data-parallel group. Samplers shard the data over
``dp_rank`` / ``dp_size``, batch arithmetic multiplies by ``dp_size``, and the collectives of
:mod:`losses` (contrastive gathers, Sinkhorn's sums, global batch norm) run over ``dp_group``
once :meth:`ParallelLayout.install` has been called. With tensor or pipeline parallelism the
world is not the data-parallel group, which is why nothing else may ask the world.

Ranks are numbered as Megatron-LM and DeepSpeed do, tensor-parallel fastest::

    rank = pp_index * (dp * tp) + dp_index * tp + tp_index

so the ``tp`` ranks of one tensor-parallel group are neighbours (on one machine when possible).
The object also answers the ``mpu`` questions DeepSpeed asks (``get_data_parallel_group()``,
``get_model_parallel_world_size()``, ...), so it can be handed to ``deepspeed.initialize``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist

from data.common import UserError


class LayoutError(UserError, ValueError):
    """The requested layout does not fit the number of ranks."""


@dataclass
class ParallelLayout:
    """Sizes, this rank's coordinates and the process groups of a ``dp x tp x pp`` layout.

    Build it with :meth:`single` (one process), :meth:`from_world` (sizes from the launcher's
    world and the requested ``tp`` and ``pp``) or :meth:`build` (explicit sizes). Groups are None
    where they would hold the whole world or a single rank in one process.
    """

    dp: int = 1
    tp: int = 1
    pp: int = 1
    rank: int = 0
    dp_group: Any = None
    tp_group: Any = None
    pp_group: Any = None
    mp_group: Any = None  # tensor x pipeline ranks of one model replica
    _dp_ranks: list = field(default_factory=lambda: [0])

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def single(cls) -> "ParallelLayout":
        """One process: every size is 1."""
        return cls()

    @classmethod
    def from_world(cls, tp: int = 1, pp: int = 1) -> "ParallelLayout":
        """The layout of the current process group: ``dp = world / (tp * pp)``.

        Raises:
            LayoutError: when ``tp * pp`` does not divide the world size.
        """
        if not (dist.is_available() and dist.is_initialized()):
            if tp * pp != 1:
                raise LayoutError(f"parallel layout tp={tp} x pp={pp} needs {tp * pp} ranks; this is one process "
                                  f"(start it with the deepspeed launcher)")
            return cls.single()
        world = dist.get_world_size()
        if tp < 1 or pp < 1 or world % (tp * pp):
            raise LayoutError(f"parallel layout: tp={tp} x pp={pp} must divide the world size {world}")
        return cls.build(world // (tp * pp), tp, pp)

    @classmethod
    def build(cls, dp: int, tp: int = 1, pp: int = 1) -> "ParallelLayout":
        """An explicit ``dp x tp x pp`` layout of the current process group; every rank must call
        it with the same sizes (the groups are created collectively)."""
        if min(dp, tp, pp) < 1:
            raise LayoutError(f"parallel layout sizes must be >= 1; got dp={dp}, tp={tp}, pp={pp}")
        if not (dist.is_available() and dist.is_initialized()):
            if dp * tp * pp != 1:
                raise LayoutError(f"parallel layout dp={dp} x tp={tp} x pp={pp} needs {dp * tp * pp} ranks; "
                                  f"this is one process")
            return cls.single()
        world, rank = dist.get_world_size(), dist.get_rank()
        if dp * tp * pp != world:
            raise LayoutError(f"parallel layout dp={dp} x tp={tp} x pp={pp} = {dp * tp * pp} ranks, "
                              f"but the world has {world}")
        lay = cls(dp=dp, tp=tp, pp=pp, rank=rank)

        def index(p: int, d: int, t: int) -> int:
            return p * dp * tp + d * tp + t

        def mine(rank_lists, needed: bool):
            """Create one group per list (every rank creates every group, in the same order: new_group
            is collective) and return this rank's group and its ranks; no groups when not ``needed``."""
            found = (None, [rank])
            for ranks in rank_lists:
                g = dist.new_group(ranks) if needed else None
                if rank in ranks:
                    found = (g, ranks)
            return found

        P, Dp, T = range(pp), range(dp), range(tp)
        lay.tp_group, _ = mine([[index(p, d, t) for t in T] for p in P for d in Dp], tp > 1)
        lay.dp_group, lay._dp_ranks = mine([[index(p, d, t) for d in Dp] for p in P for t in T], dp != world)
        lay.pp_group, _ = mine([[index(p, d, t) for p in P] for d in Dp for t in T], pp > 1)
        lay.mp_group, _ = mine([[index(p, d, t) for p in P for t in T] for d in Dp], tp * pp > 1)
        return lay

    # -- coordinates -----------------------------------------------------------------------------------

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return (self.rank // self.tp) % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.dp * self.tp)

    @property
    def dp_size(self) -> int:
        return self.dp

    @property
    def mp_size(self) -> int:
        """Ranks of one model replica (tensor x pipeline)."""
        return self.tp * self.pp

    @property
    def dp_ranks(self) -> list[int]:
        """Global ranks of this rank's data-parallel group."""
        return list(self._dp_ranks) if self.world > 1 else [0]

    def install(self) -> "ParallelLayout":
        """Make this layout's data-parallel group the one every collective of :mod:`losses` uses."""
        from losses import set_data_parallel_group

        set_data_parallel_group(self.dp_group)
        return self

    def describe(self) -> str:
        return f"dp={self.dp} x tp={self.tp} x pp={self.pp}"

    @staticmethod
    def parse(text: str) -> "ParallelLayout":
        """The sizes of a :meth:`describe` string (``"dp=2 x tp=1 x pp=2"``), as a layout without groups."""
        sizes = dict(part.strip().split("=") for part in text.split(" x "))
        return ParallelLayout(dp=int(sizes["dp"]), tp=int(sizes["tp"]), pp=int(sizes["pp"]))

    # -- the mpu interface DeepSpeed reads -----------------------------------------------------------------

    def get_data_parallel_group(self):
        return self.dp_group if self.dp_group is not None else dist.group.WORLD

    def get_model_parallel_group(self):
        return self.mp_group

    def get_model_parallel_rank(self) -> int:
        return self.pp_rank * self.tp + self.tp_rank

    def get_tensor_model_parallel_group(self):
        return self.tp_group

    def get_pipeline_model_parallel_group(self):
        return self.pp_group


# the remaining mpu questions are plain read-outs of sizes and coordinates
for _name, _attr in [("get_data_parallel_rank", "dp_rank"), ("get_data_parallel_world_size", "dp"),
                     ("get_model_parallel_world_size", "mp_size"), ("get_tensor_model_parallel_rank", "tp_rank"),
                     ("get_tensor_model_parallel_world_size", "tp"), ("get_pipeline_model_parallel_rank", "pp_rank"),
                     ("get_pipeline_model_parallel_world_size", "pp")]:
    setattr(ParallelLayout, _name, (lambda attr: lambda self: getattr(self, attr))(_attr))
