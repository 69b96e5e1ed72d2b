"""A deepspeed-launched worker for the engine tests: a linear-regression model stepped through
:class:`pretrain.engines.DeepSpeedEngine` with gradient accumulation and clipping.

    deepspeed --num_gpus 2 tests/ds_engine_worker.py OUT.json ZERO_STAGE GRAD_ACCUM GRAD_CLIP STEPS

Every rank reads its own slice of a fixed global batch per optimizer step, so the result can be
compared with one process that sees the whole global batch at once. Rank 0 writes the final
weights, the LR after every optimizer step, and the boundary flags to OUT.json.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from pretrain.engines import DeepSpeedEngine, ds_config, init_distributed, shutdown_distributed  # noqa: E402
from pretrain.schedules import LRSchedule  # noqa: E402

MICRO, DIM = 4, 6


class Regression(nn.Module):
    """The objective interface on a toy problem: batch -> {"loss": mean squared error}."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(DIM, 1)

    def forward(self, batch):
        return {"loss": ((self.lin(batch["x"]).squeeze(1) - batch["y"]) ** 2).mean()}


def global_batches(steps: int, global_batch: int):
    g = torch.Generator().manual_seed(123)
    w = torch.randn(DIM, generator=g)
    for _ in range(steps):
        x = torch.randn(global_batch, DIM, generator=g) * 3
        yield x, x @ w + 0.1 * torch.randn(global_batch, generator=g)


def main(out, stage, accum, clip, steps):
    rank, world = init_distributed("deepspeed")
    model = Regression()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = LRSchedule(opt, 0.05, steps, 2, 0.1)
    cfg = ds_config("", stage, MICRO, accum, world, clip)
    engine = DeepSpeedEngine(model, opt, sched, cfg)
    lrs, losses = [], []
    for x, y in global_batches(steps, MICRO * accum * world):
        # rank r takes micro-batches r, r + world, ... so the union over ranks is the global batch
        micro = [{"x": x[i:i + MICRO], "y": y[i:i + MICRO]} for i in ((a * world + rank) * MICRO for a in range(accum))]
        losses.append(engine.train_step(micro)["loss"])
        lrs.append(engine.lr)
    boundaries = [engine.steps]
    state = engine.full_state_dict()
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"weight": state["lin.weight"].flatten().tolist(), "bias": state["lin.bias"].tolist(),
                       "lrs": lrs, "boundaries": boundaries, "world": world}, f)
    shutdown_distributed()


if __name__ == "__main__":
    a = [x for x in sys.argv[1:] if not x.startswith("--local_rank")]
    main(a[0], int(a[1]), int(a[2]), float(a[3]), int(a[4]))
