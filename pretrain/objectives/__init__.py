"""Objective registry. A new objective is one file here with ``@register_objective("name", Config)``."""
from .base import (Objective, PipelineSpec, PipelineUnsupportedError, create_objective, list_objectives, objective_class, objective_config_class,
                   register_objective)
from . import align, byol, clip, distill, simclr, supervised, swav  # noqa: F401  (registration side effects)
from . import vqkd, beit_v2  # noqa: F401  (BEiT v2: the tokenizer, then masked image modelling of its codes)
from . import data2vec2  # noqa: F401
from . import vatt  # noqa: F401  (video, audio and text)

__all__ = ["Objective", "PipelineSpec", "PipelineUnsupportedError", "create_objective", "list_objectives", "objective_class", "objective_config_class",
           "register_objective"]
