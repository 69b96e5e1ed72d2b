"""The single-process engine: gradient accumulation, clipping and bf16 autocast, no framework."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from data.common import UserError

from .base import Engine, autocast_context, load_optimizer_state_by_name, projections_of, tensor_names


class PlainEngine(Engine):
    """One process, plain PyTorch.

    :meth:`train_step` is the interface the loop uses. The per-micro-batch methods it is built
    from (``engine(batch)``, :meth:`backward`, :meth:`step`) stay public for code that drives a
    data-parallel engine by hand: ``step()`` is called after every micro-batch and the optimizer
    and LR schedule advance only every ``grad_accum`` micro-batches (``is_boundary`` says when).
    """

    name = "plain"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, schedule, precision: str = "fp32",
                 grad_accum: int = 1, grad_clip: float = 0.0, device: str = "cpu", channels_last: bool = False):
        if grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
        self.module, self.optimizer, self.schedule = model, optimizer, schedule
        self._net = model
        self.precision, self.grad_accum, self.grad_clip = precision, grad_accum, grad_clip
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.micro_step = 0
        self.steps = 0
        self.is_boundary = False
        self.last_grad_norm: float | None = None
        self.projections = projections_of(model)
        autocast_context(precision)  # validate early

    # -- per micro-batch -------------------------------------------------------------------------------

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
        self.steps += 1
        with torch.no_grad():
            for p, fn in self.projections:
                p.copy_(fn(p))

    # -- state -------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(), "micro_step": self.micro_step, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.micro_step = int(state.get("micro_step", 0))
        self.steps = int(state.get("steps", self.micro_step // self.grad_accum))

    def portable_state(self) -> None:
        """None: the plain checkpoint's state.pt is already the one-process layout
        (:func:`portable_from_plain` reads it by name), so no second copy is written."""
        return None

    def load_portable(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        load_optimizer_state_by_name(self.optimizer, tensor_names(self.module), state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.steps = int(state["steps"])
        self.micro_step = self.steps * self.grad_accum

    def save(self, directory, client_state: dict) -> None:
        """Write model, optimizer, schedule and ``client_state`` into ``directory/state.pt``."""
        torch.save({"engine": self.state_dict(), "client": client_state}, Path(directory) / "state.pt")

    def load(self, directory) -> dict:
        path = Path(directory) / "state.pt"
        if not path.is_file():
            raise CheckpointFormatError(f"checkpoint '{directory}' has no state.pt (was it written by another engine?)")
        state = torch.load(path, map_location="cpu", weights_only=False)
        self.load_state_dict(state["engine"])
        return state["client"]

    def full_state_dict(self, checkpoint_dir=None) -> dict:
        return self.module.state_dict()


def portable_from_plain(directory, objective: nn.Module) -> dict:
    """A plain checkpoint's state (``state.pt``) as :meth:`Engine.portable_state` gives it: the
    optimizer's positional state keyed by parameter name, positions numbered as the optimizer was
    built (``objective.param_groups()`` in order, which the same config reproduces)."""
    path = Path(directory) / "state.pt"
    if not path.is_file():
        raise CheckpointFormatError(f"checkpoint '{directory}' has no state.pt")
    saved = torch.load(path, map_location="cpu", weights_only=False)
    engine, client = saved["engine"], saved["client"]
    names = tensor_names(objective)
    order = [names[id(p)] for g in objective.param_groups() for p in g["params"]]
    opt = engine["optimizer"]
    held = sum(len(g["params"]) for g in opt["param_groups"])
    if held != len(order):
        raise CheckpointFormatError(f"checkpoint '{directory}': its optimizer holds {held} parameters, this "
                                    f"run's objective {len(order)}; resume with the config it was written with")
    state = {order[i]: v for i, v in opt["state"].items()}
    return {"model": engine["model"], "optimizer": state, "schedule": engine["schedule"],
            "steps": int(engine.get("steps", engine.get("micro_step", 0))), "client": client}


class CheckpointFormatError(UserError, FileNotFoundError):
    """A checkpoint directory does not hold what this engine writes."""


def build_plain(cfg, objective: nn.Module, optimizer, schedule, layout, channels_last: bool = False) -> PlainEngine:
    """The plain engine of a run config (one process; ``layout`` must be a single rank).
    ``channels_last``: the objective was put in channels_last layout, so image batches are too."""
    if layout.world != 1:
        raise UserError(f"engine=plain runs in one process, but this job has {layout.world} ranks; "
                        f"use engine=deepspeed under the deepspeed launcher")
    return PlainEngine(objective, optimizer, schedule, cfg.precision, cfg.optim.grad_accum, cfg.optim.grad_clip,
                       channels_last=channels_last)
