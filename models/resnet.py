"""ResNet backbones with configurable stem, width and normalisation.

The residual blocks are torchvision's ``BasicBlock`` and ``Bottleneck``; the
network around them (stem, stages, downsampling shortcuts) is assembled here
so that the base width, the stem and the normalisation layer can be chosen.

Like every backbone of :mod:`models`, :class:`ResNet` describes itself: ``layer_ids()`` and
``num_layers()`` give the depth of each parameter (stem 0, residual block ``j`` at ``j``) for
layer-wise LR decay, and ``pipeline_layers()`` lists it as a flat chain of modules
(stem, the residual blocks, global average pooling), e.g. for pipeline-parallel stages.

Normalisation options:

* ``"bn"``: ``nn.BatchNorm2d`` everywhere (the usual ResNet).
* ``"gn_ws"``: ``nn.GroupNorm`` plus weight standardisation on every
  convolution (:class:`WSConv2d`), as in Richemond et al. 2020, "BYOL works
  even without batch statistics".  Such a model has no BatchNorm at all and so
  needs no cross-device statistics.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.resnet import BasicBlock, Bottleneck

from .layer_ids import ids_by_prefix
from .registry import register_backbone

__all__ = ["WSConv2d", "ResNet", "ResNetStem", "GlobalAvgPool", "resnet18", "resnet34", "resnet50", "resnet101",
           "resnet152", "num_groups_for"]

Block = Union[Type[BasicBlock], Type[Bottleneck]]

_STEMS = ("cifar", "imagenet")
_NORMS = ("bn", "gn_ws")


class WSConv2d(nn.Conv2d):
    """``nn.Conv2d`` with weight standardisation.

    In every forward pass the weight of each output channel is standardised
    over its fan-in (input channels x kernel height x kernel width) to zero
    mean and unit variance before the convolution:
    ``w_hat = (w - mean(w)) / sqrt(var(w) + eps)``.  The stored parameter is
    left untouched.

    Args:
        *args: As for ``nn.Conv2d``.
        eps: Added to the variance for numerical stability.
        **kwargs: As for ``nn.Conv2d``.
    """

    def __init__(self, *args, eps: float = 1e-5, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.eps = eps

    def standardized_weight(self) -> torch.Tensor:
        """Returns the standardised weight, shape ``[C_out, C_in/groups, kH, kW]``."""
        w = self.weight
        var, mean = torch.var_mean(w, dim=(1, 2, 3), keepdim=True, unbiased=False)
        return (w - mean) * torch.rsqrt(var + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolves ``x`` ``[B, C_in, H, W]`` with the standardised weight."""
        return self._conv_forward(x, self.standardized_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", eps={self.eps}"


def num_groups_for(channels: int, max_groups: int = 32) -> int:
    """Largest group count ``<= max_groups`` that divides ``channels`` (at least 1)."""
    for g in range(min(max_groups, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups_for(channels), channels)


def _to_ws_convs(module: nn.Module) -> None:
    """Replaces, in place, every plain ``nn.Conv2d`` below ``module`` by a :class:`WSConv2d`."""
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d) and not isinstance(child, WSConv2d):
            ws = WSConv2d(
                child.in_channels,
                child.out_channels,
                child.kernel_size,
                stride=child.stride,
                padding=child.padding,
                dilation=child.dilation,
                groups=child.groups,
                bias=child.bias is not None,
                padding_mode=child.padding_mode,
            )
            setattr(module, name, ws)
        else:
            _to_ws_convs(child)


class ResNetStem(nn.Module):
    """The stem of a :class:`ResNet` as a module of its own: ``maxpool(relu(bn1(conv1(x))))``.

    It holds the ResNet's own ``conv1``, ``bn1``, ``relu`` and ``maxpool`` (shared, not copied).
    ``[B, in_chans, H, W] -> [B, width, H / s, W / s]`` (``s`` = 1 for the cifar stem, 4 for imagenet).
    """

    def __init__(self, resnet: "ResNet") -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))


class GlobalAvgPool(nn.Module):
    """Mean over the spatial dimensions: ``[B, C, H, W] -> [B, C]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class ResNet(nn.Module):
    """A ResNet trunk without classifier, for representation learning.

    Args:
        block: ``BasicBlock`` (ResNet-18/34) or ``Bottleneck`` (ResNet-50+),
            from ``torchvision.models.resnet``.
        layers: Number of blocks in each of the four stages.
        in_chans: Number of input image channels.
        stem: ``"cifar"`` (3x3 conv, stride 1, no max-pool; for 32x32 images)
            or ``"imagenet"`` (7x7 conv, stride 2, then 3x3 max-pool stride 2).
        norm: ``"bn"`` (BatchNorm) or ``"gn_ws"`` (GroupNorm with up to 32
            groups plus weight-standardised convolutions; no BatchNorm).
        width: Channel count of the stem and the first stage (64 for the
            standard nets).  Stage ``i`` has ``width * 2**i`` planes, so e.g.
            ``width=128`` is a 2x wide ResNet and ``width=8`` a tiny test model.
        zero_init_residual: If True, the last normalisation layer of each
            residual block starts with zero scale, so each block starts as the
            identity.

    Attributes:
        embed_dim: Channel count of the final feature map
            (``8 * width * block.expansion``).
        num_features: Alias of ``embed_dim``.

    Shapes:
        ``forward_features``: ``[B, in_chans, H, W] -> [B, embed_dim, H/s, W/s]``
        with total stride ``s = 8`` (cifar stem) or ``32`` (imagenet stem).
        ``forward_pooled`` / ``forward``: ``[B, in_chans, H, W] -> [B, embed_dim]``.

    Layer ids (see :meth:`layer_ids`): the stem is 0, residual block ``j`` (counted from 1 over the
    four stages) is ``j``, and :meth:`num_layers` is the number of blocks plus one.
    """

    def __init__(
        self,
        block: Block,
        layers: Sequence[int],
        in_chans: int = 3,
        stem: str = "cifar",
        norm: str = "bn",
        width: int = 64,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if stem not in _STEMS:
            raise ValueError(f"stem must be one of {', '.join(_STEMS)}; got {stem!r}")
        if norm not in _NORMS:
            raise ValueError(f"norm must be one of {', '.join(_NORMS)}; got {norm!r}")
        if len(layers) != 4:
            raise ValueError(f"layers must list 4 stage depths, got {list(layers)}")
        if int(width) != width or width < 1:
            raise ValueError(f"width must be a positive integer, got {width!r}")
        if in_chans < 1:
            raise ValueError(f"in_chans must be >= 1, got {in_chans}")
        width = int(width)

        self.stem_type = stem
        self.norm_type = norm
        self.width = width
        self.in_chans = in_chans
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d if norm == "bn" else _group_norm

        if stem == "cifar":
            self.conv1 = nn.Conv2d(in_chans, width, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_chans, width, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = norm_layer(width)
        self.relu = nn.ReLU(inplace=True)

        inplanes = width
        stages: List[nn.Sequential] = []
        for i, depth in enumerate(layers):
            planes = width * 2**i
            stride = 1 if i == 0 else 2
            stage, inplanes = self._make_stage(block, inplanes, planes, depth, stride, norm_layer)
            stages.append(stage)
        self.layer1, self.layer2, self.layer3, self.layer4 = stages

        self.embed_dim: int = inplanes
        self.num_features: int = inplanes

        if norm == "gn_ws":
            _to_ws_convs(self)
        self._init_weights(zero_init_residual)

    @staticmethod
    def _make_stage(
        block: Block,
        inplanes: int,
        planes: int,
        depth: int,
        stride: int,
        norm_layer: Callable[[int], nn.Module],
    ) -> tuple[nn.Sequential, int]:
        out_ch = planes * block.expansion
        downsample = None
        if stride != 1 or inplanes != out_ch:
            downsample = nn.Sequential(
                nn.Conv2d(inplanes, out_ch, kernel_size=1, stride=stride, bias=False),
                norm_layer(out_ch),
            )
        blocks = [block(inplanes, planes, stride=stride, downsample=downsample, norm_layer=norm_layer)]
        for _ in range(1, depth):
            blocks.append(block(out_ch, planes, norm_layer=norm_layer))
        return nn.Sequential(*blocks), out_ch

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def residual_blocks(self) -> List[nn.Module]:
        """The residual blocks of the four stages, in forward order."""
        return [b for stage in (self.layer1, self.layer2, self.layer3, self.layer4) for b in stage]

    def num_layers(self) -> int:
        """``num_blocks + 1``: the layer id just above the last residual block."""
        return len(self.residual_blocks()) + 1

    def layer_ids(self) -> Dict[str, int]:
        """Depth id of every parameter, for layer-wise LR decay.

        Returns:
            ``{name: id}`` for every name of ``named_parameters()``: the stem (``conv1``, ``bn1``)
            is 0 and residual block ``j`` (counted from 1 over all four stages, downsampling
            shortcut included) is ``j``; e.g. a ResNet-18 has ids 0-8 and ``num_layers() == 9``.
        """
        prefixes = [("conv1", 0), ("bn1", 0)]
        j = 0
        for si, stage in enumerate((self.layer1, self.layer2, self.layer3, self.layer4), start=1):
            for bi in range(len(stage)):
                j += 1
                prefixes.append((f"layer{si}.{bi}", j))
        return ids_by_prefix(self, prefixes)

    def pipeline_layers(self) -> List[nn.Module]:
        """The network as a flat chain of modules, e.g. to cut it into pipeline stages.

        Returns:
            ``[ResNetStem, block_1, ..., block_N, GlobalAvgPool]``: each takes one tensor and
            returns one, they share this model's parameters (each parameter in exactly one of
            them) and ``x -> layers[-1](...layers[0](x))`` equals :meth:`forward_pooled`.
        """
        return [ResNetStem(self), *self.residual_blocks(), GlobalAvgPool()]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Computes the last feature map.

        Args:
            x: Images ``[B, in_chans, H, W]`` (any memory format).

        Returns:
            Feature map ``[B, embed_dim, H', W']``.
        """
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def forward_pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Global-average-pooled features.

        Args:
            x: Images ``[B, in_chans, H, W]``.

        Returns:
            Embeddings ``[B, embed_dim]``.
        """
        return self.forward_features(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`forward_pooled`: ``[B, in_chans, H, W] -> [B, embed_dim]``."""
        return self.forward_pooled(x)


@register_backbone("resnet18")
def resnet18(
    in_chans: int = 3,
    stem: str = "cifar",
    norm: str = "bn",
    width: int = 64,
    zero_init_residual: bool = False,
) -> ResNet:
    """ResNet-18 trunk (``BasicBlock``, [2, 2, 2, 2]); ``embed_dim = 512 * width / 64``.

    See :class:`ResNet` for the arguments.
    """
    return ResNet(BasicBlock, [2, 2, 2, 2], in_chans, stem, norm, width, zero_init_residual)


@register_backbone("resnet34")
def resnet34(
    in_chans: int = 3,
    stem: str = "cifar",
    norm: str = "bn",
    width: int = 64,
    zero_init_residual: bool = False,
) -> ResNet:
    """ResNet-34 trunk (``BasicBlock``, [3, 4, 6, 3]); ``embed_dim = 512 * width / 64``.

    See :class:`ResNet` for the arguments.
    """
    return ResNet(BasicBlock, [3, 4, 6, 3], in_chans, stem, norm, width, zero_init_residual)


@register_backbone("resnet50")
def resnet50(
    in_chans: int = 3,
    stem: str = "cifar",
    norm: str = "bn",
    width: int = 64,
    zero_init_residual: bool = False,
) -> ResNet:
    """ResNet-50 trunk (``Bottleneck``, [3, 4, 6, 3]); ``embed_dim = 2048 * width / 64``.

    See :class:`ResNet` for the arguments.
    """
    return ResNet(Bottleneck, [3, 4, 6, 3], in_chans, stem, norm, width, zero_init_residual)


@register_backbone("resnet101")
def resnet101(
    in_chans: int = 3,
    stem: str = "cifar",
    norm: str = "bn",
    width: int = 64,
    zero_init_residual: bool = False,
) -> ResNet:
    """ResNet-101 trunk (``Bottleneck``, [3, 4, 23, 3]); ``embed_dim = 2048 * width / 64``.

    See :class:`ResNet` for the arguments.
    """
    return ResNet(Bottleneck, [3, 4, 23, 3], in_chans, stem, norm, width, zero_init_residual)


@register_backbone("resnet152")
def resnet152(
    in_chans: int = 3,
    stem: str = "cifar",
    norm: str = "bn",
    width: int = 64,
    zero_init_residual: bool = False,
) -> ResNet:
    """ResNet-152 trunk (``Bottleneck``, [3, 8, 36, 3]), the depth of SimCLRv2's largest encoder;
    ``embed_dim = 2048 * width / 64`` (``width=192`` is the paper's 3x wide variant).

    See :class:`ResNet` for the arguments.
    """
    return ResNet(Bottleneck, [3, 8, 36, 3], in_chans, stem, norm, width, zero_init_residual)
