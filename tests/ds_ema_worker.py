"""A deepspeed-launched worker: BYOL's EMA teacher under ZeRO-3 against the formula on full tensors.

    deepspeed --num_gpus 2 tests/ds_ema_worker.py OUT.json

Each step computes ``m * teacher + (1 - m) * online`` from the rank's own shards, runs the
objective's own update, and checks the shards, the whole-tensor copies ZeRO-3 keeps of some
parameters between steps (which the next forward reads), and the gathered tensors. Rank 0 writes
the largest deviations.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import deepspeed  # noqa: E402
import torch  # noqa: E402

from models import create_backbone  # noqa: E402
from pretrain.engines import DeepSpeedEngine, ds_config, init_distributed, shutdown_distributed  # noqa: E402
from pretrain.objectives import create_objective  # noqa: E402
from pretrain.schedules import LRSchedule  # noqa: E402


def full(params):
    with deepspeed.zero.GatheredParameters(params):
        return [p.detach().clone() for p in params]


def main(out):
    rank, world = init_distributed("deepspeed")
    torch.manual_seed(0)
    obj = create_objective("byol", create_backbone("resnet18", in_chans=1, width=8), proj_hidden=64, proj_dim=16,
                           pred_hidden=64, base_momentum=0.7)
    opt = torch.optim.SGD(obj.param_groups(), lr=0.5)
    cfg = ds_config("", 3, 8, 1, world, 0.0)
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 2000  # some small params stay whole
    engine = DeepSpeedEngine(obj, opt, LRSchedule(opt, 0.5, 4, 0), cfg)
    online = list(obj.backbone.parameters()) + list(obj.projector.parameters())
    target = list(obj.target_backbone.parameters()) + list(obj.target_projector.parameters())
    g = torch.Generator().manual_seed(1)
    err, whole_err, moved, n_whole = 0.0, 0.0, 0.0, 0
    for step in range(3):
        views = [torch.randn(16, 1, 16, 16, generator=g) for _ in range(2)]
        res = engine({"views": [v[rank * 8:(rank + 1) * 8] for v in views]})
        engine.backward(res["loss"])
        engine.step()
        m = obj.momentum
        # expected values from this rank's own shards: no gather, so ZeRO-3's state is left as training leaves it
        expected = [m * t.ds_tensor.clone() + (1 - m) * o.ds_tensor.clone() for t, o in zip(target, online)]
        before = [t.ds_tensor.clone() for t in target]
        obj.on_step_end(step, 4)
        err = max(err, max(float((t.ds_tensor - e).abs().max()) for t, e in zip(target, expected)))
        moved = max(moved, max(float((t.ds_tensor - b).abs().max()) for t, b in zip(target, before)))
        for t, e in zip(target, expected):  # whole copies (what the next forward reads) hold the new values
            if t.data.numel() == t.ds_numel:
                n_whole += 1
                part = e.numel()
                lo = rank * part
                hi = min(lo + part, t.ds_numel)
                if hi > lo:
                    whole_err = max(whole_err, float((t.data.reshape(-1)[lo:hi] - e[:hi - lo]).abs().max()))
        gathered = full(target)  # and the gathered tensors agree with the shards
        for t, full_t in zip(target, gathered):
            part = t.ds_tensor.numel()
            lo, hi = rank * part, min(rank * part + part, t.ds_numel)
            if hi > lo:
                err = max(err, float((full_t.reshape(-1)[lo:hi] - t.ds_tensor[:hi - lo]).abs().max()))
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"err": err, "whole_err": whole_err, "moved": moved, "n_whole": n_whole,
                       "world": world, "ema_fn": obj.ema_update_fn.__name__}, f)
    shutdown_distributed()


if __name__ == "__main__":
    main([a for a in sys.argv[1:] if not a.startswith("--local_rank")][0])
