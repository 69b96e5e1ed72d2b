"""Engines: one object that owns the model, optimizer and LR schedule, with the same methods for
every backend, so the loop never branches per engine::

    out = engine(batch); engine.backward(out["loss"]); engine.step()
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn


def autocast_context(precision: str, device_type: str = "cpu"):
    """bf16 autocast when asked (about 4x faster matmuls on CPUs with AVX512-BF16/AMX), else nothing."""
    if precision == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    if precision == "fp32":
        return contextlib.nullcontext()
    raise ValueError(f"unknown precision '{precision}'; valid: fp32, bf16")


class PlainEngine:
    """Single-process engine with gradient accumulation, clipping and bf16 autocast.

    ``step()`` is called after every micro-batch; the optimizer and the LR schedule advance only
    every ``grad_accum`` micro-batches (``is_boundary`` tells the caller when that happened).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, schedule, precision: str = "fp32",
                 grad_accum: int = 1, grad_clip: float = 0.0, device: str = "cpu"):
        if grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
        self.module, self.optimizer, self.schedule = model, optimizer, schedule
        self.precision, self.grad_accum, self.grad_clip = precision, grad_accum, grad_clip
        self.device = torch.device(device)
        self.micro_step = 0
        self.is_boundary = False
        self.last_grad_norm: float | None = None
        autocast_context(precision)  # validate early

    world_size = 1
    rank = 0

    def __call__(self, batch: dict) -> dict:
        with autocast_context(self.precision, self.device.type):
            return self.module(batch)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum if self.grad_accum > 1 else loss).backward()

    def step(self) -> None:
        self.micro_step += 1
        self.is_boundary = self.micro_step % self.grad_accum == 0
        if not self.is_boundary:
            return
        if self.grad_clip > 0:
            params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            self.last_grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.grad_clip))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()

    def train(self, mode: bool = True):
        self.module.train(mode)
        return self

    def eval(self):
        return self.train(False)

    @property
    def lr(self) -> float:
        return self.schedule.lr

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(), "micro_step": self.micro_step}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.micro_step = int(state.get("micro_step", 0))
