"""MLP projection / prediction heads for self-supervised learning."""

from __future__ import annotations

from typing import List

import torch
import torch.nn as nn

__all__ = ["MLPHead", "WSLinear"]

_NORMS = ("bn", "ln", "none")


def _make_norm(kind: str, dim: int, affine: bool = True) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm1d(dim, affine=affine)
    if kind == "ln":
        return nn.LayerNorm(dim, elementwise_affine=affine)
    raise ValueError(f"no norm layer for kind {kind!r}")


class WSLinear(nn.Linear):
    """``nn.Linear`` with scaled weight standardisation.

    In every forward pass each output unit's weight row is standardised over its fan-in and
    scaled by ``1 / sqrt(fan_in)``: ``w_hat = (w - mean(w)) / (sqrt(var(w) + eps) * sqrt(fan_in))``,
    so unit-variance inputs give unit-variance outputs whatever the stored weight's scale. The
    stored parameter is left untouched.

    Because every row of ``w_hat`` sums to zero, an input component shared by all features
    (``x + c * 1``) does not reach the output. Pooled post-ReLU features are all positive and
    share a large common component; a plain linear layer passes it on, so the projections of
    different images start nearly parallel (cosine ~0.9 for a GN+WS ResNet-18), which batch
    norm in the head would otherwise remove by centring over the batch. This removes it per
    sample, without batch statistics.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, eps: float = 1e-5) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.eps = eps

    def standardized_weight(self) -> torch.Tensor:
        """The weight used in the forward pass, ``[out_features, in_features]``."""
        w = self.weight
        var, mean = torch.var_mean(w, dim=1, keepdim=True, unbiased=False)
        return (w - mean) * torch.rsqrt((var + self.eps) * w.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., in_features] -> [..., out_features]``."""
        return nn.functional.linear(x, self.standardized_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", eps={self.eps}, weight_std=True"


class MLPHead(nn.Module):
    """Stack of linear layers used as projector or predictor.

    Layer ``i < num_layers - 1`` (hidden) is ``Linear -> norm -> ReLU`` (or
    ``Linear -> ReLU`` with ``norm="none"``); the last layer is ``Linear``,
    optionally followed by a norm (``last_norm=True``).  A ``Linear`` that is
    directly followed by a norm has no bias.

    Common configurations:

    * BYOL projector / predictor: ``MLPHead(d, 4096, 256, num_layers=2, norm="bn")``
      (``Linear-BN-ReLU-Linear``).
    * SimCLR v2 projector: ``MLPHead(d, d, 128, num_layers=3, norm="bn", last_norm=True)``,
      fine-tuned later from ``head.truncate(1)``.
    * SimSiam projector ends with a BN without affine: ``last_norm=True,
      last_norm_affine=False``.

    Args:
        in_dim: Input feature dimension.
        hidden_dim: Output dimension of every hidden layer.
        out_dim: Output dimension of the last layer.
        num_layers: Number of linear layers (>= 1).
        norm: ``"bn"`` (BatchNorm1d), ``"ln"`` (LayerNorm) or ``"none"``.
        last_norm: Put a norm of kind ``norm`` after the last linear layer
            (requires ``norm != "none"``).
        last_norm_affine: Whether that last norm has a learnable scale/shift.
        weight_std: Use :class:`WSLinear` (weight standardisation) for every linear layer.

    Attributes:
        layers: ``nn.ModuleList`` with one ``nn.Sequential`` per linear layer.
        dims: Output dimension of each layer block (``dims[-1] == out_dim``).

    Shapes:
        ``[B, in_dim] -> [B, out_dim]``.  Inputs with extra leading dimensions
        ``[..., in_dim]`` are flattened to 2-D for the norms and reshaped back.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        out_dim: int,
        num_layers: int = 2,
        norm: str = "bn",
        last_norm: bool = False,
        last_norm_affine: bool = True,
        weight_std: bool = False,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if norm not in _NORMS:
            raise ValueError(f"norm must be one of {', '.join(_NORMS)}; got {norm!r}")
        if last_norm and norm == "none":
            raise ValueError("last_norm=True needs a norm kind ('bn' or 'ln'), got norm='none'")

        self.in_dim = in_dim
        self.hidden_dim = hidden_dim
        self.out_dim = out_dim
        self.num_layers = num_layers
        self.norm = norm
        self.weight_std = weight_std
        self.dims: List[int] = [hidden_dim] * (num_layers - 1) + [out_dim]

        has_norm = norm != "none"
        linear = WSLinear if weight_std else nn.Linear
        blocks = []
        d_in = in_dim
        for i, d_out in enumerate(self.dims):
            if i < num_layers - 1:
                mods: List[nn.Module] = [linear(d_in, d_out, bias=not has_norm)]
                if has_norm:
                    mods.append(_make_norm(norm, d_out))
                mods.append(nn.ReLU(inplace=True))
            else:
                mods = [linear(d_in, d_out, bias=not last_norm)]
                if last_norm:
                    mods.append(_make_norm(norm, d_out, affine=last_norm_affine))
            blocks.append(nn.Sequential(*mods))
            d_in = d_out
        self.layers = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Applies all layers: ``[..., in_dim] -> [..., out_dim]``."""
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        for block in self.layers:
            x = block(x)
        return x.reshape(*lead, x.shape[-1])

    def truncate(self, k: int) -> nn.Sequential:
        """Returns the first ``k`` layer blocks as an ``nn.Sequential``.

        The modules are shared with this head (not copied).  ``k = 0`` gives an
        empty ``nn.Sequential`` (the identity).  Output dimension is
        ``dims[k - 1]`` (``in_dim`` for ``k = 0``).  The result expects 2-D
        inputs ``[B, in_dim]``.

        Args:
            k: Number of leading layers to keep, ``0 <= k <= num_layers``.
        """
        if not 0 <= k <= self.num_layers:
            raise ValueError(f"k must be in [0, {self.num_layers}], got {k}")
        return nn.Sequential(*list(self.layers)[:k])
