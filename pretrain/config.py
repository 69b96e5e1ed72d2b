"""Typed run configuration: dataclasses filled from a YAML recipe plus ``key=value`` overrides.

The dataclasses are the source of truth. An unknown key anywhere is a :class:`ConfigError`
naming the key and the nearest valid ones. Each objective contributes its own nested
``Config`` dataclass under its name (``byol.proj_dim=256``).
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A recipe or override is wrong; the message names the key or value."""


@dataclass
class ModelConfig:
    """Backbone choice and its keyword arguments (see ``pretrain list``)."""

    backbone: str = "resnet18"
    stem: str = "cifar"  # cifar | imagenet (ResNets)
    norm: str = "bn"  # bn | gn_ws (ResNets)
    width: int = 64  # ResNet base width (64 = standard)
    patch_size: int = 4  # ViTs
    channels_last: bool = True
    global_bn: bool = True  # batch-norm statistics over all ranks (SimCLR's global BN)


@dataclass
class OptimConfig:
    name: str = "lars"  # sgd | adamw | lars
    lr: float = 1.0  # base LR, scaled by batch_size / 256 when scale_lr
    scale_lr: bool = True
    weight_decay: float = 1.5e-6
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 10
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 0.0  # max global grad norm, 0 = off
    grad_accum: int = 1
    lars_eta: float = 0.001


@dataclass
class AugConfig:
    views: str = ""  # byol | simclr; empty = the objective's own recipe
    crop_scale: tuple[float, float] = (0.08, 1.0)  # of the (global) views
    jitter_strength: float = 1.0
    # multi-crop (SwAV): small local views after the 2 global ones, for objectives that use them
    local_views: int = -1  # -1 = the objective's default (0 for objectives without multi-crop)
    local_size: int = 0  # 0 = round(global size * 96 / 224)
    local_crop_scale: tuple[float, float] = (0.05, 0.14)


@dataclass
class ProbeConfig:
    probes: tuple[str, ...] = ("linear", "knn")
    epochs: int = 100
    knn_k: int = 20
    knn_temperature: float = 0.07
    baselines: bool = True  # also probe raw pixels and the random-init backbone


@dataclass
class DeepSpeedConfig:
    config: str = ""  # DeepSpeed JSON; empty = launch/ds_configs/zero{zero_stage}.json
    zero_stage: int = -1  # -1 = as the JSON says (0 when no JSON is given)


@dataclass
class RunConfig:
    objective: str = "byol"
    data: str = "mnist5k"
    image_size: int = 0  # 0 = the dataset's native size
    batch_size: int = 256  # per process (micro batch)
    max_steps: int = 1000
    seed: int = 0
    precision: str = "bf16"  # fp32 | bf16 (autocast)
    engine: str = "plain"  # plain | deepspeed
    log_every: int = 10
    checkpoint_every: int = 0  # 0 = only at the end
    stop_at: int = 0  # stop after this step with a checkpoint (a planned pre-emption); 0 = run to max_steps
    keep_last: int = 2
    num_workers: int = 0
    threads: int = 0  # torch intra-op threads, 0 = leave as is
    run_dir: str = "runs/default"
    progress: bool = True
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    # per-objective sections, filled from the objective registry (name -> Config instance)
    objectives: dict = field(default_factory=dict)

    @property
    def objective_config(self):
        return self.objectives[self.objective]


CHOICES = {
    "precision": ("fp32", "bf16"),
    "engine": ("plain", "deepspeed"),
    "deepspeed.zero_stage": (-1, 0, 1, 2, 3),
    "model.stem": ("cifar", "imagenet"),
    "model.norm": ("bn", "gn_ws"),
    "byol.head_norm": ("bn", "ln", "none"),
    "optim.name": ("sgd", "adamw", "lars"),
    "aug.views": ("", "byol", "simclr"),
}


def _nearest(key: str, valid: list[str]) -> str:
    near = difflib.get_close_matches(key, valid, n=3, cutoff=0.7)
    return f" (did you mean {', '.join(repr(n) for n in near)}?)" if near else ""


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Convert a parsed YAML value to the dataclass field's type, or raise a ConfigError naming the key."""
    origin = typing.get_origin(typ)
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            raise TypeError
        if typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if typ is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if typ is str:
            if isinstance(value, (dict, list)):
                raise TypeError
            return "" if value is None else str(value)
        if origin is tuple:
            args = typing.get_args(typ)
            if isinstance(value, str):
                value = [v for v in value.replace(",", " ").split()]
            value = list(value)
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_coerce(v, args[0], key) for v in value)
            if len(value) != len(args):
                raise TypeError
            return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    except (TypeError, ValueError):
        tname = getattr(typ, "__name__", str(typ))
        raise ConfigError(f"config key '{key}': expected {tname}, got {value!r}") from None
    return value


def _fill(obj: Any, values: dict, prefix: str) -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.')}' must be a mapping, got {values!r}")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj) if f.name != "objectives"]
    for k, v in values.items():
        key = prefix + k
        if k not in names:
            raise ConfigError(f"unknown config key '{key}'{_nearest(k, names)}; valid keys here: {', '.join(names)}")
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            _fill(cur, v, key + ".")
        else:
            val = _coerce(v, hints[k], key)
            if key in CHOICES and val not in CHOICES[key]:
                valid = ", ".join(repr(c) for c in CHOICES[key])
                raise ConfigError(f"config key '{key}': unknown value {val!r}; valid: {valid}")
            setattr(obj, k, val)


def _parse_overrides(overrides: list[str]) -> dict:
    """``a.b=1`` strings -> nested dict; values parsed as YAML scalars/lists."""
    out: dict = {}
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override '{ov}' is not of the form key=value")
        key, raw = ov.split("=", 1)
        if not key:
            raise ConfigError(f"override '{ov}' has an empty key")
        try:
            val = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            val = raw
        d = out
        parts = key.split(".")
        for p in parts[:-1]:
            d = d.setdefault(p, {})
            if not isinstance(d, dict):
                raise ConfigError(f"override '{ov}' conflicts with another override of '{p}'")
        d[parts[-1]] = val
    return out


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_config(values: dict) -> RunConfig:
    """Fill a RunConfig from a nested dict, validating every key against the dataclasses."""
    from .objectives import list_objectives, objective_config_class

    values = dict(values or {})
    cfg = RunConfig()
    objective_names = list_objectives()
    obj_sections = {k: values.pop(k) for k in list(values) if k in objective_names}
    _fill(cfg, values, "")
    if cfg.objective not in objective_names:
        raise ConfigError(f"unknown objective '{cfg.objective}'{_nearest(cfg.objective, objective_names)}; "
                          f"valid objectives: {', '.join(objective_names)}")
    for name in objective_names:
        ocfg = objective_config_class(name)()
        if name in obj_sections:
            _fill(ocfg, obj_sections[name] or {}, name + ".")
        cfg.objectives[name] = ocfg
    return cfg


def load_config(recipe: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML recipe (optional), apply ``key=value`` overrides and validate everything."""
    values: dict = {}
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError(f"recipe file '{recipe}' does not exist")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"recipe file '{recipe}' is not valid YAML: {exc}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"recipe file '{recipe}' must hold a mapping of config keys")
    values = _merge(values, _parse_overrides(overrides or []))
    return build_config(values)


def to_dict(cfg: RunConfig) -> dict:
    """Plain dict of the resolved config; only the active objective's section is kept."""
    d = dataclasses.asdict(cfg)
    objs = d.pop("objectives")
    d[cfg.objective] = objs.get(cfg.objective, {})

    def fix(x):
        if isinstance(x, tuple):
            return [fix(v) for v in x]
        if isinstance(x, dict):
            return {k: fix(v) for k, v in x.items()}
        return x

    return fix(d)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
