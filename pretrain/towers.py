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
        if f.name not in ("backbone", "init") and v not in ("", 0) and (accepted is None or f.name in accepted):
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
    module = create_backbone(tower.backbone, **tower_kwargs(tower, **from_data))
    if tower.init:
        init_from_run(module, tower.init, name)
    return module


def init_from_run(module: nn.Module, run_dir: str, name: str) -> None:
    """Copy the ``name`` tower of the run in ``run_dir`` (its ``weights.safetensors``, as ``pretrain
    probe`` loads it) into ``module``, which must have the same architecture (EVA-CLIP starts its
    image tower from a masked-image-modelling run this way). A grey (1-channel) tower may start a
    colour one and the reverse: the first convolution is adapted by :func:`_adapt_input_channels`."""
    from pathlib import Path

    from .probe import load_run  # the probe module imports the loop, which builds towers

    key = f"model.{name}.init"
    if not (Path(run_dir) / "config.yaml").is_file() or not (Path(run_dir) / "weights.safetensors").is_file():
        raise ConfigError(f"config key '{key}': '{run_dir}' is not a finished run of this project (expected "
                          f"config.yaml and weights.safetensors there)")
    run_cfg, model = load_run(run_dir)
    if name not in getattr(model, "towers", ()):
        raise ConfigError(f"config key '{key}': the run '{run_dir}' (objective '{run_cfg.objective}') has no {name} "
                          f"tower; its towers: {', '.join(model.towers)}")
    target = module.state_dict()
    source = {k: _adapt_input_channels(v, target[k].shape) if k in target else v
              for k, v in model.tower(name).state_dict().items()}
    bad = [f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}" for k, v in source.items()
           if k in target and v.shape != target[k].shape]
    missing, extra = sorted(set(target) - set(source)), sorted(set(source) - set(target))
    if bad or missing or extra:
        got = getattr(run_cfg.model, name).backbone
        raise ConfigError(f"config key '{key}': the {name} tower of '{run_dir}' ({got}) does not fit "
                          f"model.{name} ({type(module).__name__}): "
                          + "; ".join(x for x in (f"shapes differ: {', '.join(bad[:3])}" if bad else "",
                                                  f"missing: {', '.join(missing[:3])}" if missing else "",
                                                  f"unexpected: {', '.join(extra[:3])}" if extra else "") if x))
    module.load_state_dict(source)


def _adapt_input_channels(weight, shape):
    """A first convolution's weight ``[O, c, kh, kw]`` for ``C`` input channels where one side is grey
    (``c == 1`` or ``C == 1``): repeated over the channels and divided by ``C`` (1 -> C), or summed over
    them (C -> 1), so a grey image repeated to ``C`` channels, or the grey image itself, gives the
    same output as before. Any other tensor is returned as it is."""
    if (weight.dim() != 4 or len(shape) != 4 or weight.shape[1] == shape[1] or weight.shape[0] != shape[0]
            or weight.shape[2:] != tuple(shape[2:]) or 1 not in (weight.shape[1], shape[1])):
        return weight
    if weight.shape[1] == 1:
        return weight.repeat(1, shape[1], 1, 1) / shape[1]
    return weight.sum(1, keepdim=True)


def build_towers(model: ModelConfig, names, sizes: dict[str, dict]) -> dict[str, nn.Module]:
    """Every tower in ``names``, each with the data sizes ``sizes[name]`` (see :mod:`pretrain.batches`)."""
    return {n: build_tower(model, n, **sizes.get(n, {})) for n in names}
