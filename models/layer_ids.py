"""Depth ids of backbone parameters, for layer-wise learning-rate decay (LLRD).

Layer-wise decay (Clark et al. 2020, ELECTRA; Bao et al. 2022, BEiT) fine-tunes a parameter at
layer id ``i`` with ``lr * decay ** (depth - i)``: the classifier on top keeps the full LR and
each layer below gets ``decay`` times the LR of the layer above it. This module is the one place
that says which parameter sits at which depth, for every backbone in :mod:`models`:

* :class:`~models.resnet.ResNet` (any depth): id 0 is the stem (``conv1``, ``bn1``); residual
  block ``j`` (counted over all four stages, from 1) has id ``j``. A ResNet-18 has blocks 1-8,
  a ResNet-50 blocks 1-16.
* :class:`~models.vit.VisionTransformer`: id 0 holds the patch embedding, class / mask tokens
  and position embeddings; transformer block ``j`` (from 1) has id ``j``; the final norm sits
  above the last block, at ``num_blocks + 1``.

``num_layers(backbone) = num_blocks + 1`` is the id of whatever comes after the last block: the
ViT's final norm and, in a classifier built on the backbone, the first layer on top of it (as
in BEiT, where the head sits at ``depth + 1``).
"""

from __future__ import annotations

from typing import Dict

import torch.nn as nn

from .resnet import ResNet
from .vit import VisionTransformer

__all__ = ["layer_ids", "num_layers", "num_blocks"]


def _resnet_stages(model: ResNet):
    return [model.layer1, model.layer2, model.layer3, model.layer4]


def num_blocks(backbone: nn.Module) -> int:
    """Number of residual / transformer blocks of a backbone of this package.

    Raises:
        ValueError: For a module type without layer ids (the message names the type).
    """
    if isinstance(backbone, ResNet):
        return sum(len(s) for s in _resnet_stages(backbone))
    if isinstance(backbone, VisionTransformer):
        return len(backbone.blocks)
    raise ValueError(f"no layer ids are defined for backbone type {type(backbone).__name__}; "
                     f"known: ResNet, VisionTransformer (models/layer_ids.py)")


def num_layers(backbone: nn.Module) -> int:
    """The id just above the last block (``num_blocks + 1``); see the module docstring."""
    return num_blocks(backbone) + 1


def layer_ids(backbone: nn.Module) -> Dict[str, int]:
    """Maps every parameter name of ``backbone`` (as in ``named_parameters()``) to its layer id.

    Args:
        backbone: A ResNet or VisionTransformer built by :func:`models.create_backbone`.

    Returns:
        ``{name: id}`` with ids in ``[0, num_layers(backbone)]``.

    Raises:
        ValueError: For a module type without layer ids, or a parameter that no rule places.
    """
    top = num_layers(backbone)
    ids: Dict[str, int] = {}
    if isinstance(backbone, ResNet):
        block_of: Dict[str, int] = {}
        j = 0
        for si, stage in enumerate(_resnet_stages(backbone), start=1):
            for bi in range(len(stage)):
                j += 1
                block_of[f"layer{si}.{bi}."] = j
        for name, _ in backbone.named_parameters():
            if name.startswith(("conv1.", "bn1.")):
                ids[name] = 0
                continue
            prefix = ".".join(name.split(".")[:2]) + "."
            if prefix not in block_of:
                raise ValueError(f"layer_ids: no rule places ResNet parameter '{name}'")
            ids[name] = block_of[prefix]
        return ids
    for name, _ in backbone.named_parameters():
        if name.startswith(("patch_embed.", "cls_token", "pos_embed", "mask_token")):
            ids[name] = 0
        elif name.startswith("blocks."):
            ids[name] = int(name.split(".")[1]) + 1
        elif name.startswith("norm."):
            ids[name] = top
        else:
            raise ValueError(f"layer_ids: no rule places ViT parameter '{name}'")
    return ids
