"""Building an objective's towers (``model.image``, ``model.text``, ...) through the backbone registry.

An objective declares the towers it needs (``Objective.towers``); the batch schema it trains on
says what the data fixes about each (``in_chans`` and ``image_size`` of images, ``vocab_size`` and
``context_length`` of token ids). Nothing here asks a backbone's name or type: a config field or
data size is passed to the backbone's factory exactly when the factory takes a keyword of that
name.
"""
from __future__ import annotations

import dataclasses

from torch import nn

from models import create_backbone
from models.registry import backbone_keywords

from .config import ConfigError, ModelConfig, TowerConfig


def factory_keywords(backbone: str) -> set[str] | None:
    """Keyword names the backbone's factory takes (None: any keyword)."""
    return backbone_keywords(backbone)


def tower_kwargs(tower: TowerConfig, **from_data) -> dict:
    """The factory keywords of ``tower``: its set fields and the data's sizes that the factory takes."""
    accepted = factory_keywords(tower.backbone)
    kw = {}
    for f in dataclasses.fields(tower):
        v = getattr(tower, f.name)
        if f.name != "backbone" and v not in ("", 0) and (accepted is None or f.name in accepted):
            kw[f.name] = v
    for k, v in from_data.items():
        if accepted is None or k in accepted:
            kw[k] = v
    return kw


def build_tower(model: ModelConfig, name: str, **from_data) -> nn.Module:
    """The tower ``model.<name>`` with the data's sizes (``in_chans=...``, ``vocab_size=...``)."""
    tower = getattr(model, name, None)
    if not isinstance(tower, TowerConfig):
        valid = [f.name for f in dataclasses.fields(ModelConfig) if f.type in (TowerConfig, "TowerConfig")]
        raise ConfigError(f"unknown tower '{name}'; valid towers: {', '.join(valid)}")
    if not tower.backbone:
        raise ConfigError(f"model.{name}.backbone is not set, but the objective needs a {name} tower "
                          f"(e.g. model.{name}.backbone=...; see pretrain list)")
    return create_backbone(tower.backbone, **tower_kwargs(tower, **from_data))


def build_towers(model: ModelConfig, names, sizes: dict[str, dict]) -> dict[str, nn.Module]:
    """Every tower in ``names``, each with the data sizes ``sizes[name]`` (see :mod:`pretrain.batches`)."""
    return {n: build_tower(model, n, **sizes.get(n, {})) for n in names}
