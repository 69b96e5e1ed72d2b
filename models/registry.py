"""The registry of backbones: name -> factory function.

Backbone modules register their factory functions with
:func:`register_backbone`; callers build models by name with
:func:`create_backbone`. ``BACKBONES`` is a :class:`data.common.Registry`
(a read-only mapping with ``register``, ``get`` and ``names``).

Example::

    @register_backbone("my_net")
    def my_net(in_chans: int = 3) -> nn.Module:
        ...

    model = create_backbone("my_net", in_chans=1)
"""

from __future__ import annotations

import inspect
from typing import Callable, List, TypeVar

import torch.nn as nn

from data.common import Registry

__all__ = ["BACKBONES", "register_backbone", "create_backbone", "list_backbones", "backbone_keywords"]

Factory = Callable[..., nn.Module]
F = TypeVar("F", bound=Factory)

#: Maps a backbone name to the factory function that builds it.
BACKBONES: Registry = Registry("backbone")


def register_backbone(name: str) -> Callable[[F], F]:
    """Returns a decorator that registers a backbone factory under ``name``.

    Args:
        name: Registry key.  Must not be registered already.

    Returns:
        A decorator that stores the factory and returns it unchanged.

    Raises:
        ValueError: If ``name`` is not a non-empty string or is already registered.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"backbone name must be a non-empty string, got {name!r}")
    return BACKBONES.register(name)


def list_backbones() -> List[str]:
    """Returns the registered backbone names, sorted alphabetically."""
    return BACKBONES.names()


def _accepted_kwargs(factory: Factory) -> List[str] | None:
    """Names of the keyword arguments ``factory`` accepts (None: any)."""
    params = inspect.signature(factory).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return [
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]


def backbone_keywords(name: str) -> set[str] | None:
    """Keyword names the factory of backbone ``name`` takes (None: any keyword); an unknown name
    raises the registry's error."""
    accepted = _accepted_kwargs(BACKBONES.get(name))
    return None if accepted is None else set(accepted)


def create_backbone(name: str, **kwargs) -> nn.Module:
    """Builds a registered backbone.

    Args:
        name: A name from :func:`list_backbones`.
        **kwargs: Keyword arguments forwarded to the backbone's factory.

    Returns:
        The backbone module.  It has an ``embed_dim`` attribute and the methods
        ``forward_features`` and ``forward_pooled`` (``forward`` is
        ``forward_pooled``).

    Raises:
        UnknownNameError: (a ValueError) If ``name`` is not registered.  The
            message lists the valid names and, when there is a close one, suggests it.
        TypeError: If a keyword argument is not accepted by the factory.  The
            message names the keyword and the accepted ones.
    """
    factory = BACKBONES.get(name)
    accepted = _accepted_kwargs(factory)
    if accepted is not None:
        unknown = [k for k in kwargs if k not in accepted]
        if unknown:
            bad = ", ".join(repr(k) for k in unknown)
            word = "argument" if len(unknown) == 1 else "arguments"
            raise TypeError(
                f"create_backbone({name!r}) got unexpected keyword {word} {bad}; "
                f"accepted keywords: {', '.join(accepted)}"
            )
    return factory(**kwargs)
