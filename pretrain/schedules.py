"""Learning-rate schedule: linear warmup, then cosine decay to ``min_ratio`` of the peak."""
from __future__ import annotations

import math


def warmup_cosine(step: int, max_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the base LR at ``step`` (0-based; the first step already gets a non-zero LR)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(max_steps - warmup_steps, 1)
    t = min(max(step - warmup_steps, 0) / span, 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


class LRSchedule:
    """Sets every param group's ``lr`` to ``base_lr * group.get('lr_scale', 1) * warmup_cosine(step)``.

    Its whole state is the step counter, so resuming only needs :meth:`state_dict`.
    """

    def __init__(self, optimizer, base_lr: float, max_steps: int, warmup_steps: int, min_ratio: float = 0.0):
        self.optimizer, self.base_lr = optimizer, base_lr
        self.max_steps, self.warmup_steps, self.min_ratio = max_steps, warmup_steps, min_ratio
        self.step_num = 0
        self._apply()

    def _apply(self) -> None:
        m = warmup_cosine(self.step_num, self.max_steps, self.warmup_steps, self.min_ratio)
        for g in self.optimizer.param_groups:
            g["lr"] = self.base_lr * g.get("lr_scale", 1.0) * m

    def step(self) -> None:
        self.step_num += 1
        self._apply()

    @property
    def lr(self) -> float:
        return self.base_lr * warmup_cosine(self.step_num, self.max_steps, self.warmup_steps, self.min_ratio)

    def state_dict(self) -> dict:
        return {"step_num": self.step_num}

    def load_state_dict(self, d: dict) -> None:
        self.step_num = int(d["step_num"])
        self._apply()
