"""Backbones, heads and weight-averaging utilities.

Every backbone built by :func:`create_backbone` follows one contract (docs/backbones.md):

* ``embed_dim: int``
* ``forward_features(x)``: feature map ``[B, C, H, W]`` (ResNet), tokens ``[B, N, D]`` (ViT) or
  ``[B, L, D]`` (text tower, from token ids ``[B, L]``)
* ``forward_pooled(x)``: ``[B, embed_dim]``; ``forward(x)`` is the same.
* ``layer_ids()``: ``{parameter name: depth id}`` for layer-wise LR decay, ids in
  ``[0, num_layers()]``; ``num_layers()``: number of blocks + 1.
* ``pipeline_layers()``: a flat list of one-tensor-in, one-tensor-out modules sharing the
  backbone's parameters whose composition is ``forward_pooled``.

The functions :func:`layer_ids`, :func:`num_layers` and :func:`num_blocks` work on any module that
declares ``layer_ids()`` and ``num_layers()``.
"""

from .registry import create_backbone, list_backbones, register_backbone
from .resnet import ResNet, WSConv2d
from .vit import VisionTransformer
from .text import TextTransformer
from .efficientnet import EfficientNetLite0
from .minilm import MiniLMText
from .vatt import Vatt
from .heads import MLPHead, WSLinear
from .ema import ModelEMA, ema_update_, frozen_copy
from .quantizer import NormEMAQuantizer, spherical_kmeans
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
    "spherical_kmeans",
    "ModelEMA",
    "NormEMAQuantizer",
    "ResNet",
    "TextTransformer",
    "Vatt",
    "VisionTransformer",
    "WSConv2d",
    "WSLinear",
]
