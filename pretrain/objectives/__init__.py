"""Objective registry. A new objective is one file here with ``@register_objective("name", Config)``."""
from .base import (Objective, create_objective, list_objectives, objective_class, objective_config_class,
                   register_objective)
from . import align, byol, clip, distill, simclr, supervised, swav  # noqa: F401  (registration side effects)

__all__ = ["Objective", "create_objective", "list_objectives", "objective_class", "objective_config_class",
           "register_objective"]
