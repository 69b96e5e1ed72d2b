"""Backbones, heads and weight-averaging utilities.

Every backbone built by :func:`create_backbone` follows one contract:

* ``embed_dim: int``
* ``forward_features(x)``: feature map ``[B, C, H, W]`` (ResNet) or tokens
  ``[B, N, D]`` (ViT)
* ``forward_pooled(x)``: ``[B, embed_dim]``; ``forward(x)`` is the same.
"""

from .registry import create_backbone, list_backbones, register_backbone
from .resnet import ResNet, WSConv2d
from .vit import VisionTransformer
from .heads import MLPHead, WSLinear
from .ema import ModelEMA, ema_update_, frozen_copy
from .layer_ids import layer_ids, num_blocks, num_layers

__all__ = [
    "create_backbone",
    "list_backbones",
    "register_backbone",
    "MLPHead",
    "ema_update_",
    "frozen_copy",
    "layer_ids",
    "num_blocks",
    "num_layers",
    "ModelEMA",
    "ResNet",
    "VisionTransformer",
    "WSConv2d",
    "WSLinear",
]
