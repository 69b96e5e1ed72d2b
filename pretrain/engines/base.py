"""What every engine implements: one whole optimizer step over a list of micro-batches.

The loop calls only ``metrics = engine.train_step(micro_batches)``. A data-parallel engine runs
forward and backward on each micro-batch and steps the optimizer once; a pipeline engine hands
the same list to its schedule. Neither the loop nor the engine reads a key of a batch: a batch is
whatever the objective declared, and the engine only maps over its tensors (precision, memory
layout).
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Sequence

import torch
from torch import nn


class NonFiniteLossError(FloatingPointError):
    """A micro-batch's loss was NaN or infinite; raised before its backward pass, so no update is applied."""

    def __init__(self, value: float, micro_batch: int):
        super().__init__(f"loss became {value} (micro-batch {micro_batch})")
        self.value = value


def bf16_is_fast(device_type: str | None = None) -> bool:
    """Whether bf16 matmuls are native here: a CUDA device that supports bf16, or a CPU whose oneDNN
    has bf16 kernels (AVX-512 BF16 / AMX, or AVX-512 where oneDNN converts cheaply). On an AVX2-only
    CPU bf16 is emulated and 10-200x slower than fp32."""
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # an older or oneDNN-less build: judge by the instruction set
        return "AVX512" in torch.backends.cpu.get_cpu_capability()


def resolve_precision(precision: str, device_type: str | None = None) -> str:
    """``auto`` -> ``bf16`` where bf16 is fast here (:func:`bf16_is_fast`), else ``fp32``; others unchanged."""
    if precision == "auto":
        return "bf16" if bf16_is_fast(device_type) else "fp32"
    return precision


def autocast_context(precision: str, device_type: str = "cpu"):
    """bf16 autocast when asked (about 4x faster matmuls on CPUs with AVX512-BF16/AMX), else nothing."""
    precision = resolve_precision(precision, device_type)
    if precision == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    if precision == "fp32":
        return contextlib.nullcontext()
    raise ValueError(f"unknown precision '{precision}'; valid: auto, fp32, bf16")


def map_tensors(batch, fn: Callable[[torch.Tensor], torch.Tensor]):
    """``fn`` applied to every tensor of a (nested) batch of dicts, lists and tuples; other leaves kept."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, dict):
        return {k: map_tensors(v, fn) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(map_tensors(v, fn) for v in batch)
    return batch


def to_channels_last(batch):
    """Every 4-D floating-point tensor of a batch in channels_last layout (images, whatever their key)."""
    return map_tensors(batch, lambda t: t.contiguous(memory_format=torch.channels_last)
                       if t.dim() == 4 and t.is_floating_point() else t)


def mean_scalars(outs: Sequence[dict]) -> dict[str, float]:
    """Mean over micro-batches of every scalar an objective returned (tensors of one element or numbers)."""
    sums: dict[str, float] = {}
    for out in outs:
        for k, v in out.items():
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                v = float(v.detach())
            elif isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            sums[k] = sums.get(k, 0.0) + float(v)
    return {k: v / len(outs) for k, v in sums.items()}


def check_finite(loss: torch.Tensor, micro_batch: int) -> None:
    value = float(loss.detach())
    if not math.isfinite(value):
        raise NonFiniteLossError(value, micro_batch)


def projections_of(model: nn.Module) -> list:
    """The model's ``param_projections()`` (see :class:`pretrain.objectives.Objective`), or none."""
    fn = getattr(model, "param_projections", None)
    return list(fn()) if fn is not None else []


def tensor_names(module: nn.Module) -> dict[int, str]:
    """``id(tensor) -> name`` for every parameter and buffer of ``module``."""
    names = {id(t): n for n, t in module.named_buffers()}
    names.update({id(p): n for n, p in module.named_parameters()})
    return names


def optimizer_state_by_name(optimizer, names: dict[int, str]) -> dict[str, dict]:
    """The optimizer's per-parameter state (``exp_avg``, ``momentum_buffer``, ``step``, ...) keyed by
    parameter name instead of position, copied: state that does not depend on how parameters are
    grouped, ordered or cut."""
    out = {}
    for g in optimizer.param_groups:
        for p in g["params"]:
            if p in optimizer.state and id(p) in names:
                out[names[id(p)]] = {k: v.detach().clone() if torch.is_tensor(v) else v
                                     for k, v in optimizer.state[p].items()}
    return out


def load_optimizer_state_by_name(optimizer, names: dict[int, str], state: dict[str, dict],
                                 cut: Callable[[str, torch.Tensor], torch.Tensor] = lambda n, t: t) -> None:
    """Set the per-parameter state of ``optimizer`` from :func:`optimizer_state_by_name`'s dict;
    ``cut(name, full)`` maps a whole-parameter state tensor to this rank's piece (tensor
    parallelism). Scalars (``step``) are taken as they are."""
    for g in optimizer.param_groups:
        for p in g["params"]:
            name = names.get(id(p))
            if name is None or name not in state:
                continue
            optimizer.state[p] = {k: cut(name, v).to(p.device).clone() if torch.is_tensor(v) and v.dim() > 0
                                  else v for k, v in state[name].items()}


class Engine:
    """The interface of every engine.

    Attributes:
        module: the objective being trained (under DeepSpeed the unwrapped module).
        optimizer, schedule: the optimizer and the LR schedule (stepped once per ``train_step``).
        steps: optimizer steps taken.
    """

    name = "engine"
    world_size = 1
    rank = 0
    steps = 0
    module: nn.Module
    schedule = None
    channels_last = False
    _net: nn.Module

    grad_accum = 1

    def train_step(self, micro_batches: Sequence[dict]) -> dict[str, float]:
        """Forward and backward every micro-batch, then one optimizer step (clipping, LR schedule,
        parameter projections). Returns the mean over the micro-batches of each scalar the objective
        returned (``loss`` included), on this rank. Raises :class:`NonFiniteLossError` before any
        update when a loss is not finite.

        This default serves the data-parallel engines, which expose one micro-batch at a time
        (``engine(batch)``, :meth:`backward`, :meth:`step`, the last stepping the optimizer every
        ``grad_accum`` calls); a pipeline engine overrides it with its own schedule.
        """
        if len(micro_batches) != self.grad_accum:
            raise ValueError(f"train_step got {len(micro_batches)} micro-batches; this engine accumulates "
                             f"{self.grad_accum} per optimizer step")
        outs = []
        for i, batch in enumerate(micro_batches):
            out = self(self.prepare(batch))
            check_finite(out["loss"], i)
            self.backward(out["loss"])
            self.step()
            outs.append(out)
        return mean_scalars(outs)

    def __call__(self, batch: dict) -> dict:
        raise NotImplementedError

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError

    def prepare(self, batch: dict) -> dict:
        """The batch as the model takes it (memory layout); the keys are the objective's business."""
        return to_channels_last(batch) if self.channels_last else batch

    def train(self, mode: bool = True):
        self._net.train(mode)
        return self

    def eval(self):
        return self.train(False)

    @property
    def lr(self) -> float:
        return self.schedule.lr

    def run_evaluation(self, fn: Callable[[nn.Module], dict]) -> dict:
        """``fn(module)`` where the whole model is (every rank calls this together); every rank gets
        the result. Default: here, on the module. A pipeline engine restores the whole model on
        its first stage for the call."""
        return fn(self.module)

    def portable_state(self) -> dict | None:
        """The training state in the one-process layout, keyed by parameter name: ``{"model": state
        dict, "optimizer": per-parameter state, "schedule", "steps"}`` on rank 0 (None on other
        ranks, and from engines that cannot give it). Every rank calls it together. A checkpoint
        that holds it (``portable.pt``) resumes under another layout (:meth:`load_portable`)."""
        return None

    def load_portable(self, state: dict) -> None:
        """Restore :meth:`portable_state`'s dict, cutting it for this rank's layout."""
        raise NotImplementedError(f"engine {self.name} cannot resume from another layout's checkpoint")

    def save(self, directory, client_state: dict) -> None:
        raise NotImplementedError

    def load(self, directory) -> dict:
        raise NotImplementedError

    def full_state_dict(self, checkpoint_dir=None) -> dict | None:
        """The whole model's state dict on rank 0 (None on other ranks)."""
        raise NotImplementedError
