"""Gradient caching: peak memory and step time of a CLIP step at global batch 512, 2,048 and
8,192, in one pass and in chunks of 256 (``grad_chunks = batch / 256``).

Tiny towers (a ViT with 2 blocks of width 64 on 16 x 16 images, patches of 4; a 2-block causal
text transformer of width 64 over 32 tokens; a 64-d joint space), AdamW, fp32 (--precision bf16 for autocast), through
the plain engine's ``train_step``, as the loop runs it. Inputs are random tensors of the real
shapes: memory and time do not depend on the pixels. Each case runs in a fresh subprocess, so its
peak RSS is its own.

    python -m benchmarks.grad_cache            # the table (a few minutes on 2 cores)
    python -m benchmarks.grad_cache --quick    # 512 and 2,048 only
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

CHUNK = 256
BATCHES = (512, 2048, 8192)


def _step(batch: int, chunks: int, precision: str):
    from data import DatasetInfo
    from pretrain.config import load_config
    from pretrain.engines import PlainEngine
    from pretrain.loop import build_model
    from pretrain.optim import build_optimizer
    from pretrain.schedules import LRSchedule

    cfg = load_config(None, ["objective=clip", "model.image.backbone=vit_tiny", "model.image.patch_size=4",
                             "model.image.depth=2", "model.image.embed_dim=64", "model.image.num_heads=2",
                             "model.text.backbone=text_tiny", "model.text.width=64", "model.text.depth=2",
                             "model.text.heads=2", "tokenizer.name=clip_bpe", "tokenizer.context_length=32",
                             "clip.embed_dim=64", f"batch_size={batch}", f"grad_chunks={chunks}",
                             f"precision={precision}"])
    info = DatasetInfo("bench", 3, 16, 10, (0.5,) * 3, (0.5,) * 3)
    obj = build_model(cfg, info)
    obj.grad_chunks = chunks
    opt = build_optimizer(obj.param_groups(), "adamw", 1e-4, 0.1)
    engine = PlainEngine(obj, opt, LRSchedule(opt, 1e-4, 1000, 0), precision)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 49000, (batch, 32), generator=g)
    ids[:, -1] = 49407
    data = {"image": torch.randn(batch, 3, 16, 16, generator=g), "text": ids}
    return lambda: engine.train_step([data])


def run_case(batch: int, chunks: int, precision: str, steps: int) -> dict:
    torch.manual_seed(0)
    step = _step(batch, chunks, precision)
    step()  # warm-up
    t = time.perf_counter()
    for _ in range(steps):
        step()
    dt = (time.perf_counter() - t) / steps
    return {"batch": batch, "chunks": chunks, "precision": precision, "step_s": dt,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        b, k, p, s = args.case.split(",")
        print(json.dumps(run_case(int(b), int(k), p, int(s))))
        return
    batches = BATCHES[:2] if args.quick else BATCHES
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.precision}, chunks of {CHUNK}")
    print("| global batch | one pass: step | one pass: peak RSS | chunks | chunked: step | chunked: peak RSS |")
    print("|---|---|---|---|---|---|")
    rows, base = [], None
    for batch in batches:
        res = {}
        for chunks in (1, batch // CHUNK):
            out = subprocess.run([sys.executable, "-m", "benchmarks.grad_cache", "--case",
                                  f"{batch},{chunks},{args.precision},2"], capture_output=True, text=True, check=True)
            res[chunks] = json.loads(out.stdout.strip().splitlines()[-1])
        one, chunked = res[1], res[batch // CHUNK]
        base = base or chunked["peak_rss_mib"]
        rows.append({"one_pass": one, "chunked": chunked})
        print(f"| {batch:,} | {one['step_s']:.2f} s | {one['peak_rss_mib']:,.0f} MiB | {batch // CHUNK} | "
              f"{chunked['step_s']:.2f} s | {chunked['peak_rss_mib']:,.0f} MiB "
              f"({chunked['peak_rss_mib'] / base:.2f}x that at {batches[0]:,}) |", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
