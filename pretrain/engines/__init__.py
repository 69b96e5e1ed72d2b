"""Engines: one file each, one interface (:class:`~pretrain.engines.base.Engine`).

The loop calls ``engine.train_step(micro_batches)`` and nothing else per step, so any schedule
(data parallel, ZeRO, a pipeline) fits behind it. ``ENGINES`` maps the ``engine=`` config value
to a builder ``(cfg, objective, optimizer, schedule, layout, channels_last=False) -> Engine``; a new engine is a new
file that registers its builder here.
"""
from data.common import Registry

from .base import Engine, NonFiniteLossError, autocast_context, map_tensors, mean_scalars, to_channels_last
from .plain import PlainEngine, build_plain
from .zero import (DeepSpeedEngine, build_deepspeed, consolidate_deepspeed_checkpoint, ds_config, init_distributed,
                   shutdown_distributed, zero_stage_of)

ENGINES: Registry = Registry("engine")
ENGINES.register("plain", build_plain, distributed=False)
ENGINES.register("deepspeed", build_deepspeed, distributed=True)


def build_engine(cfg, objective, optimizer, schedule, layout, channels_last: bool = False) -> Engine:
    """The engine ``cfg.engine`` names, around ``objective``."""
    return ENGINES.get(cfg.engine)(cfg, objective, optimizer, schedule, layout, channels_last=channels_last)


__all__ = ["ENGINES", "Engine", "NonFiniteLossError", "PlainEngine", "DeepSpeedEngine", "autocast_context",
           "build_engine", "consolidate_deepspeed_checkpoint", "ds_config", "init_distributed", "map_tensors",
           "mean_scalars", "shutdown_distributed", "to_channels_last", "zero_stage_of"]
