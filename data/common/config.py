"""One config mechanism: typed dataclasses filled from YAML recipes and ``key=value`` overrides.

The dataclasses are the source of truth. Every command that takes settings (``pretrain fit``,
``finetune``, ``distill``, ``search align``) fills its dataclass with :func:`load_values` +
:func:`fill`; an unknown key anywhere is a :class:`ConfigError` naming the key and the nearest
valid ones, a value of the wrong type names the key and the type expected.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError

__all__ = ["ConfigError", "coerce", "fill", "load_values", "merge", "nearest", "parse_overrides", "read_recipe"]


class ConfigError(UserError, ValueError):
    """A recipe or override is wrong; the message names the key or value."""


def nearest(key: str, valid: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the close matches of ``key`` among ``valid``, or ``""``."""
    near = difflib.get_close_matches(key, valid, n=3, cutoff=0.7)
    return f" (did you mean {', '.join(repr(n) for n in near)}?)" if near else ""


def coerce(value: Any, typ: Any, key: str) -> Any:
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
                return tuple(coerce(v, args[0], key) for v in value)
            if len(value) != len(args):
                raise TypeError
            return tuple(coerce(v, a, key) for v, a in zip(value, args))
    except (TypeError, ValueError):
        tname = getattr(typ, "__name__", str(typ))
        raise ConfigError(f"config key '{key}': expected {tname}, got {value!r}") from None
    return value


def fill(obj: Any, values: dict, prefix: str = "", choices: dict | None = None) -> None:
    """Set the fields of dataclass ``obj`` (nested dataclasses included) from a nested dict.

    Every value is converted to its field's type; an unknown key, a value of the wrong type, or a
    value outside ``choices[full key]`` raises :class:`ConfigError` naming the key and the valid
    ones. A dataclass may declare ``ALIASES = {short: field}``: ``short`` given at its level is
    filled into the nested dataclass ``field`` (``model.width`` -> ``model.image.width``). A field
    named ``objectives`` is left to the caller (per-objective sections).
    """
    choices = choices or {}
    if not isinstance(values, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.')}' must be a mapping, got {values!r}")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj) if f.name != "objectives"]
    aliases = getattr(type(obj), "ALIASES", {})
    for k, v in values.items():
        if k in aliases and k not in names:  # shorthand: model.width -> model.image.width
            fill(getattr(obj, aliases[k]), {k: v}, f"{prefix}{aliases[k]}.", choices)
            continue
        key = prefix + k
        if k not in names:
            raise ConfigError(f"unknown config key '{key}'{nearest(k, names)}; valid keys here: {', '.join(names)}")
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            fill(cur, v, key + ".", choices)
        else:
            val = coerce(v, hints[k], key)
            if key in choices and val not in choices[key]:
                valid = ", ".join(repr(c) for c in choices[key])
                raise ConfigError(f"config key '{key}': unknown value {val!r}; valid: {valid}")
            setattr(obj, k, val)


def parse_overrides(overrides: list[str]) -> dict:
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


def merge(a: dict, b: dict) -> dict:
    """``b`` merged into ``a`` recursively (``b`` wins); neither is modified."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_recipe(recipe: str | Path) -> dict:
    """The mapping of a YAML recipe file; a missing file or bad YAML is a ConfigError naming it."""
    path = Path(recipe)
    if not path.is_file():
        raise ConfigError(f"recipe file '{recipe}' does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe file '{recipe}' is not valid YAML: {exc}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"recipe file '{recipe}' must hold a mapping of config keys")
    return values


def load_values(recipe: str | Path | None = None, overrides: list[str] | None = None, base: dict | None = None
                ) -> dict:
    """``base``, then the recipe, then the ``key=value`` overrides, merged into one nested dict."""
    values = dict(base or {})
    if recipe is not None:
        values = merge(values, read_recipe(recipe))
    return merge(values, parse_overrides(overrides or []))
