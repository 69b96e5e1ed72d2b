"""Training-step throughput and peak memory: this project against the same method built from
lightly's building blocks, in one run.

Both sides train the same ResNet-18 (CIFAR stem, 3x32x32 inputs) with the same heads, batch,
dtype, optimizer (SGD) and thread count; only the objective code differs. SwAV uses multi-crop:
2 x 32 px global plus 4 x 16 px local crops, 512 prototypes. Each case runs in a fresh
subprocess so that peak RSS belongs to that case alone.

    python -m benchmarks.step_throughput                  # full table (several minutes on 2 cores)
    python -m benchmarks.step_throughput --quick          # batch 64 only, fewer steps
    python -m benchmarks.step_throughput --methods swav   # only the named methods (byol, simclr, swav)
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


METHODS = ("byol", "simclr", "swav")
SWAV_LOCAL_VIEWS, SWAV_LOCAL_SIZE, SWAV_PROTOTYPES = 4, 16, 512


def _views(batch: int, method: str = "simclr"):
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(batch, 3, 32, 32, generator=g), torch.randn(batch, 3, 32, 32, generator=g)]
    if method == "swav":  # multi-crop: the local crops at their own, smaller size
        views += [torch.randn(batch, 3, SWAV_LOCAL_SIZE, SWAV_LOCAL_SIZE, generator=g)
                  for _ in range(SWAV_LOCAL_VIEWS)]
    return views


def _ours(method: str, batch: int, precision: str):
    from pretrain.config import load_config
    from pretrain.engines import PlainEngine
    from pretrain.loop import build_model, uses_channels_last
    from pretrain.optim import build_optimizer
    from pretrain.schedules import LRSchedule
    from data import DatasetInfo

    swav = ["swav.proj_hidden=512", f"swav.num_prototypes={SWAV_PROTOTYPES}", "swav.freeze_prototypes_steps=0"]
    cfg = load_config(None, [f"objective={method}", f"precision={precision}", "optim.name=sgd", *swav])
    info = DatasetInfo("bench", 3, 32, 10, (0.5,) * 3, (0.5,) * 3)
    obj = build_model(cfg, info)
    opt = build_optimizer(obj.param_groups(), "sgd", 0.05, 1e-5)
    cl = uses_channels_last(cfg, 3)
    engine = PlainEngine(obj, opt, LRSchedule(opt, 0.05, 1000, 0), precision, channels_last=cl)
    views = [v.contiguous(memory_format=torch.channels_last) if cl else v for v in _views(batch, method)]

    def step(i):  # what the loop does per optimizer step
        engine.train_step([{"views": views}])
        obj.on_step_end(i, 1000)

    return step


def _lightly(method: str, batch: int, precision: str):
    import copy

    from lightly.loss import NegativeCosineSimilarity, NTXentLoss
    from lightly.models.modules.heads import BYOLPredictionHead, BYOLProjectionHead, SimCLRProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.utils.scheduler import cosine_schedule

    from models import create_backbone

    backbone = create_backbone("resnet18", in_chans=3, stem="cifar")
    views = _views(batch, method)
    ac = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else None
    if method == "byol":
        proj = BYOLProjectionHead(512, 4096, 256)
        pred = BYOLPredictionHead(256, 4096, 256)
        bb_m, proj_m = copy.deepcopy(backbone), copy.deepcopy(proj)
        deactivate_requires_grad(bb_m)
        deactivate_requires_grad(proj_m)
        params = [*backbone.parameters(), *proj.parameters(), *pred.parameters()]
        crit = NegativeCosineSimilarity()

        def loss_fn():
            x0, x1 = views
            p0 = pred(proj(backbone(x0).flatten(1)))
            p1 = pred(proj(backbone(x1).flatten(1)))
            with torch.no_grad():
                z0 = proj_m(bb_m(x0).flatten(1))
                z1 = proj_m(bb_m(x1).flatten(1))
            return 0.5 * (crit(p0, z1.detach()) + crit(p1, z0.detach()))

        def after(i):
            m = cosine_schedule(i, 1000, 0.996, 1.0)
            update_momentum(backbone, bb_m, m)
            update_momentum(proj, proj_m, m)
    elif method == "swav":
        from lightly.loss import SwaVLoss
        from lightly.models.modules.heads import SwaVProjectionHead, SwaVPrototypes

        proj = SwaVProjectionHead(512, 512, 128)
        protos = SwaVPrototypes(128, SWAV_PROTOTYPES)
        params = [*backbone.parameters(), *proj.parameters(), *protos.parameters()]
        crit = SwaVLoss(temperature=0.1, sinkhorn_iterations=3, sinkhorn_epsilon=0.05)

        def loss_fn():  # as lightly's SwaV example: prototypes normalised, then one pass per crop
            protos.normalize()
            out = [protos(torch.nn.functional.normalize(proj(backbone(v).flatten(1)), dim=1)) for v in views]
            return crit(out[:2], out[2:])

        def after(i):
            pass
    else:
        proj = SimCLRProjectionHead(512, 512, 128, num_layers=3)
        params = [*backbone.parameters(), *proj.parameters()]
        crit = NTXentLoss(temperature=0.2)

        def loss_fn():
            x0, x1 = views
            return crit(proj(backbone(x0).flatten(1)), proj(backbone(x1).flatten(1)))

        def after(i):
            pass

    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-5)

    def step(i):
        if ac:
            with ac():
                loss = loss_fn()
        else:
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        after(i)

    return step


def run_case(impl: str, method: str, batch: int, precision: str, steps: int) -> dict:
    """Time ``steps`` training steps after one warm-up step; returns images/s and peak RSS."""
    torch.manual_seed(0)
    step = (_ours if impl == "ours" else _lightly)(method, batch, precision)
    step(0)
    flops = None
    if impl == "ours":
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as fc:
            step(1)
        flops = fc.get_total_flops()
    t = time.perf_counter()
    for i in range(steps):
        step(i + 2)
    dt = (time.perf_counter() - t) / steps
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
    return {"impl": impl, "method": method, "batch": batch, "precision": precision, "step_s": dt,
            "images_per_s": batch / dt, "peak_rss_mib": rss, "flops_per_step": flops}


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=f"comma-separated methods to time (default: all of {', '.join(METHODS)})")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:  # child process: one case, JSON on stdout
        impl, method, batch, precision, steps = args.case.split(",")
        print(json.dumps(run_case(impl, method, int(batch), precision, int(steps))))
        return
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        ap.error(f"--methods: unknown method {bad[0]!r}; valid: {', '.join(METHODS)}" if bad
                 else f"--methods: name at least one of {', '.join(METHODS)}")
    batches = (64,) if args.quick else (64, 256)
    peak = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; matmul peak: "
          f"fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s")
    rows = []
    for method in methods:
        for batch in batches:
            for precision in ("fp32", "bf16"):
                steps = 2 if args.quick else (3 if batch >= 256 else 5)
                res = {}
                for impl in ("ours", "lightly"):
                    out = subprocess.run([sys.executable, "-m", "benchmarks.step_throughput", "--case",
                                          f"{impl},{method},{batch},{precision},{steps}"],
                                         capture_output=True, text=True, check=True)
                    res[impl] = json.loads(out.stdout.strip().splitlines()[-1])
                o, lt = res["ours"], res["lightly"]
                util = o["flops_per_step"] / o["step_s"] / peak[precision]
                rows.append((method, batch, precision, o["images_per_s"], lt["images_per_s"],
                             o["images_per_s"] / lt["images_per_s"], o["peak_rss_mib"], lt["peak_rss_mib"],
                             o["flops_per_step"] / o["step_s"] / 1e9, util))
                print(f"  {method} b{batch} {precision}: ours {o['images_per_s']:.1f} img/s, "
                      f"lightly {lt['images_per_s']:.1f} img/s", flush=True)
    print("\n| method | batch | dtype | ours img/s | lightly img/s | ratio | ours peak RSS | lightly peak RSS "
          "| ours GFLOP/s | of matmul peak |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.1f} | {r[4]:.1f} | {r[5]:.2f}x | {r[6]:.0f} MiB | {r[7]:.0f} MiB "
              f"| {r[8]:.0f} | {100 * r[9]:.0f}% |")


if __name__ == "__main__":
    main()
