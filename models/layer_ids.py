"""Depth ids of backbone parameters, for layer-wise learning-rate decay (LLRD).

Layer-wise decay (Clark et al. 2020, ELECTRA; Bao et al. 2022, BEiT) fine-tunes a parameter at
layer id ``i`` with ``lr * decay ** (depth - i)``: the classifier on top keeps the full LR and
each layer below gets ``decay`` times the LR of the layer above it.

Every backbone says itself which parameter sits at which depth, through two methods:

* ``layer_ids() -> dict[str, int]``: every name of ``named_parameters()`` mapped to its id;
* ``num_layers() -> int``: ``num_blocks + 1``, the id of whatever comes after the last block.

The backbones of this package number their parameters as follows:

* :class:`~models.resnet.ResNet` (any depth): id 0 is the stem (``conv1``, ``bn1``); residual
  block ``j`` (counted over all four stages, from 1) has id ``j``. A ResNet-18 has blocks 1-8,
  a ResNet-50 blocks 1-16.
* :class:`~models.vit.VisionTransformer`: id 0 holds the patch embedding, class / mask tokens
  and position embeddings; transformer block ``j`` (from 1) has id ``j``; the final norm sits
  above the last block, at ``num_blocks + 1``.
* :class:`~models.text.TextTransformer`: id 0 holds the token and position embeddings;
  transformer block ``j`` (from 1) has id ``j``; the final norm is at ``num_blocks + 1``.

``num_layers(backbone) = num_blocks + 1`` is the id of whatever comes after the last block: the
ViT's final norm and, in a classifier built on the backbone, the first layer on top of it (as
in BEiT, where the head sits at ``depth + 1``).

The functions here (:func:`layer_ids`, :func:`num_layers`, :func:`num_blocks`) work on any
module that declares those two methods, and check what it declares; :func:`ids_by_prefix` is
the helper the backbones use to build their maps.
"""

from __future__ import annotations

from typing import Dict, Iterable, Tuple

import torch.nn as nn

__all__ = ["layer_ids", "num_layers", "num_blocks", "ids_by_prefix"]

_CONTRACT = ("layer_ids() -> dict[str, int] (every named_parameters() name to its depth id) and "
             "num_layers() -> int (num_blocks + 1); see docs/backbones.md")


def _declared(backbone: nn.Module, method: str):
    fn = getattr(backbone, method, None)
    if not callable(fn):
        raise ValueError(f"backbone type {type(backbone).__name__} declares no layer ids: "
                         f"implement its method {method}(); a backbone defines {_CONTRACT}")
    return fn


def num_layers(backbone: nn.Module) -> int:
    """The id just above the last block (``num_blocks + 1``): ``backbone.num_layers()``.

    Raises:
        ValueError: If the module has no ``num_layers()`` method (the message names its type), or
            the method does not return a positive int.
    """
    top = _declared(backbone, "num_layers")()
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"{type(backbone).__name__}.num_layers() must return an int >= 1, got {top!r}")
    return top


def num_blocks(backbone: nn.Module) -> int:
    """Number of residual / transformer blocks: ``num_layers(backbone) - 1``.

    Raises:
        ValueError: As :func:`num_layers`.
    """
    return num_layers(backbone) - 1


def layer_ids(backbone: nn.Module) -> Dict[str, int]:
    """Maps every parameter name of ``backbone`` (as in ``named_parameters()``) to its layer id.

    Delegates to ``backbone.layer_ids()`` and checks the answer.

    Args:
        backbone: Any module that declares ``layer_ids()`` and ``num_layers()``, e.g. a backbone
            built by :func:`models.create_backbone`.

    Returns:
        ``{name: id}`` with ids in ``[0, num_layers(backbone)]``.

    Raises:
        ValueError: If the module does not declare ``layer_ids()`` / ``num_layers()`` (the message
            names its type and the method to implement), or if the map misses a parameter,
            names one that does not exist, or has an id outside ``[0, num_layers]``.
    """
    ids = dict(_declared(backbone, "layer_ids")())
    top = num_layers(backbone)
    kind = type(backbone).__name__
    names = [n for n, _ in backbone.named_parameters()]
    missing = [n for n in names if n not in ids]
    if missing:
        raise ValueError(f"{kind}.layer_ids() places no id on parameter(s) {', '.join(missing[:5])}"
                         f"{' ...' if len(missing) > 5 else ''}")
    extra = sorted(set(ids) - set(names))
    if extra:
        raise ValueError(f"{kind}.layer_ids() names unknown parameter(s) {', '.join(extra[:5])}"
                         f"{' ...' if len(extra) > 5 else ''}")
    bad = {n: v for n, v in ids.items()
           if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= top}
    if bad:
        name, value = next(iter(bad.items()))
        raise ValueError(f"{kind}.layer_ids() gives '{name}' the id {value!r}; ids must be ints in "
                         f"[0, num_layers()] = [0, {top}]")
    return {n: ids[n] for n in names}


def ids_by_prefix(model: nn.Module, prefixes: Iterable[Tuple[str, int]]) -> Dict[str, int]:
    """Layer ids of ``model``'s parameters from ``(prefix, id)`` pairs.

    A prefix is a submodule path (``"layer1.0"``, ``"blocks.3"``) or a parameter name
    (``"pos_embed"``); a parameter gets the id of the longest prefix that is its own name or a
    dotted ancestor of it.

    Returns:
        ``{name: id}`` for every name of ``model.named_parameters()``, in that order.

    Raises:
        ValueError: If some parameter matches no prefix.
    """
    table = dict(prefixes)
    ids: Dict[str, int] = {}
    for name, _ in model.named_parameters():
        parts = name.split(".")
        for k in range(len(parts), 0, -1):
            key = ".".join(parts[:k])
            if key in table:
                ids[name] = table[key]
                break
        else:
            raise ValueError(f"{type(model).__name__}: no layer id is defined for parameter '{name}'")
    return ids
