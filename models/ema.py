"""Exponential moving averages of model weights.

* :func:`frozen_copy` and :func:`ema_update_` implement the momentum / target
  encoder of BYOL, MoCo, DINO and similar methods.
* :class:`ModelEMA` keeps an averaged copy of a model during (fine-)training
  for evaluation.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Mapping

import torch
import torch.nn as nn

__all__ = ["frozen_copy", "ema_update_", "ModelEMA"]


def frozen_copy(module: nn.Module) -> nn.Module:
    """Deep-copies ``module`` and disables gradients on the copy.

    The train/eval mode is kept as it is.

    Args:
        module: Module to copy.

    Returns:
        The copy, with ``requires_grad=False`` on every parameter.
    """
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


def _check_pairs(kind: str, target: List[torch.Tensor], online: List[torch.Tensor]) -> None:
    if len(target) != len(online):
        raise ValueError(
            f"target and online have different numbers of {kind}: {len(target)} vs {len(online)}"
        )
    for i, (t, o) in enumerate(zip(target, online)):
        if t.shape != o.shape:
            raise ValueError(
                f"{kind} #{i} differs in shape between target and online: "
                f"{list(t.shape)} vs {list(o.shape)}"
            )


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """Moves ``target``'s parameters towards ``online``'s, in place.

    For each parameter pair: ``t <- momentum * t + (1 - momentum) * o``.
    Buffers (e.g. BatchNorm running statistics) are copied from ``online``.
    Parameters and buffers are matched by position, so both modules must
    have the same structure.

    Args:
        target: The averaged (momentum) module; updated in place.
        online: The module being trained.
        momentum: In ``[0, 1]``; 1 leaves ``target`` unchanged, 0 copies
            ``online``.

    Raises:
        ValueError: If the parameter or buffer lists differ in length or
            shape, or ``momentum`` is outside ``[0, 1]``.
    """
    momentum = float(momentum)
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")

    t_params = list(target.parameters())
    o_params = list(online.parameters())
    _check_pairs("parameters", t_params, o_params)
    t_bufs = list(target.buffers())
    o_bufs = list(online.buffers())
    _check_pairs("buffers", t_bufs, o_bufs)

    t_float: List[torch.Tensor] = []
    o_float: List[torch.Tensor] = []
    for t, o in zip(t_params, o_params):
        if t.is_floating_point():
            t_float.append(t)
            o_float.append(o.detach().to(device=t.device, dtype=t.dtype))
        else:  # integer parameters cannot be averaged; copy them
            t.copy_(o)
    if t_float and momentum != 1.0:
        # t + w * (o - t) with w = 1 - momentum
        torch._foreach_lerp_(t_float, o_float, 1.0 - momentum)

    for t, o in zip(t_bufs, o_bufs):
        t.copy_(o)


class ModelEMA:
    """Keeps an exponential moving average of a model's weights.

    ``module`` is a frozen deep copy of the model, put in eval mode; call
    :meth:`update` after each optimiser step.  Parameters are averaged with
    ``decay``; buffers are copied from the model.

    Args:
        model: The model to track.
        decay: EMA decay (the momentum of :func:`ema_update_`), in ``[0, 1]``.

    Attributes:
        module: The averaged model.
        decay: Current decay; may be changed between updates.
        num_updates: Number of :meth:`update` calls so far.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        self.module = frozen_copy(model).eval()
        self.decay = float(decay)
        self.num_updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Updates the average with the current weights of ``model``."""
        ema_update_(self.module, model, self.decay)
        self.num_updates += 1

    def __call__(self, *args, **kwargs):
        """Runs the averaged model."""
        return self.module(*args, **kwargs)

    def to(self, *args, **kwargs) -> "ModelEMA":
        """Moves/casts the averaged model like ``nn.Module.to``; returns self."""
        self.module.to(*args, **kwargs)
        return self

    def state_dict(self) -> Dict[str, Any]:
        """Returns ``{"module": <module state dict>, "decay": float, "num_updates": int}``."""
        return {
            "module": self.module.state_dict(),
            "decay": self.decay,
            "num_updates": self.num_updates,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> None:
        """Restores a dict produced by :meth:`state_dict`."""
        self.module.load_state_dict(state_dict["module"], strict=strict)
        self.decay = float(state_dict.get("decay", self.decay))
        self.num_updates = int(state_dict.get("num_updates", self.num_updates))
