"""CLIP training-step time and peak memory: this project's ``clip`` objective against the same
model built with ``open_clip.create_model`` and trained with ``open_clip.loss.ClipLoss``, in one run.

Both sides: a ViT image tower (32 x 32 RGB inputs, patches of 4, width 192, 6 blocks, 3 heads,
class-token pooling, no LayerNorm before the blocks) and a causal text transformer (width 128, 4 blocks, 4 heads, 32 tokens of
CLIP's 49,408-token vocabulary, pooled at the end-of-text token), a 128-d joint space, the learned
temperature, AdamW (lr 5e-4, weight decay 0.1 on every parameter, as open_clip's simplest use),
batch 256, the same inputs, the same thread count, fp32 or bf16 autocast. Each case runs in a
fresh subprocess, so its peak RSS is its own.

    python -m benchmarks.clip_step            # fp32 and bf16, 4 timed steps each
    python -m benchmarks.clip_step --quick    # 2 timed steps
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

BATCH, IMAGE, PATCH, CONTEXT, VOCAB, EOT = 256, 32, 4, 32, 49408, 49407
VISION = dict(width=192, layers=6, heads=3)
TEXT = dict(width=128, layers=4, heads=4)
EMBED = 128


def _inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.zeros(BATCH, CONTEXT, dtype=torch.long)
    lengths = torch.randint(4, CONTEXT - 1, (BATCH,), generator=g)
    for i, n in enumerate(lengths.tolist()):  # start token, words, end-of-text, padding
        ids[i, 0] = 49406
        ids[i, 1:n] = torch.randint(1, 49000, (n - 1,), generator=g)
        ids[i, n] = EOT
    return torch.randn(BATCH, 3, IMAGE, IMAGE, generator=g), ids


def _ours(precision: str):
    from data import DatasetInfo
    from pretrain.config import load_config
    from pretrain.engines import PlainEngine
    from pretrain.loop import build_model
    from pretrain.schedules import LRSchedule

    cfg = load_config(None, [
        "objective=clip", f"precision={precision}", "model.image.backbone=vit_tiny", f"model.image.patch_size={PATCH}",
        f"model.image.embed_dim={VISION['width']}", f"model.image.depth={VISION['layers']}",
        f"model.image.num_heads={VISION['heads']}", "model.text.backbone=text_tiny",
        f"model.text.width={TEXT['width']}", f"model.text.depth={TEXT['layers']}", f"model.text.heads={TEXT['heads']}",
        "tokenizer.name=clip_bpe", f"tokenizer.context_length={CONTEXT}", f"clip.embed_dim={EMBED}"])
    obj = build_model(cfg, DatasetInfo("bench", 3, IMAGE, 10, (0.5,) * 3, (0.5,) * 3))
    opt = torch.optim.AdamW(obj.parameters(), lr=5e-4, weight_decay=0.1)
    engine = PlainEngine(obj, opt, LRSchedule(opt, 5e-4, 1000, 0), precision)
    images, ids = _inputs()
    batch = {"image": images, "text": ids}
    return lambda: engine.train_step([batch]), sum(p.numel() for p in obj.parameters())


def _open_clip(precision: str):
    import open_clip
    from open_clip.loss import ClipLoss

    open_clip.factory._MODEL_CONFIGS["bench-vit"] = {
        "embed_dim": EMBED,
        "vision_cfg": {"image_size": IMAGE, "patch_size": PATCH, "width": VISION["width"], "layers": VISION["layers"],
                       "head_width": VISION["width"] // VISION["heads"],
                       "no_ln_pre": True},  # our ViT has no LayerNorm before the blocks
        "text_cfg": {"context_length": CONTEXT, "vocab_size": VOCAB, **TEXT}}
    model = open_clip.create_model("bench-vit")
    model.train()
    loss_fn = ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.1)
    images, ids = _inputs()

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            img, txt, scale = model(images, ids)
            loss = loss_fn(img, txt, scale)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)

    return step, sum(p.numel() for p in model.parameters())


def run_case(impl: str, precision: str, steps: int) -> dict:
    torch.manual_seed(0)
    step, params = (_ours if impl == "ours" else _open_clip)(precision)
    step()  # warm-up
    t = time.perf_counter()
    for _ in range(steps):
        step()
    dt = (time.perf_counter() - t) / steps
    return {"impl": impl, "precision": precision, "params": params, "step_s": dt, "images_per_s": BATCH / dt,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--precisions", default="fp32,bf16",
                    help="comma-separated: fp32, bf16 (bf16 only where the CPU has bf16 matmul kernels, e.g. AVX-512 "
                         "BF16 or AMX; elsewhere torch emulates it and both sides crawl)")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        impl, precision, steps = args.case.split(",")
        print(json.dumps(run_case(impl, precision, int(steps))))
        return
    import open_clip

    steps = 2 if args.quick else 4
    print(f"torch {torch.__version__}, open_clip {open_clip.__version__}, {torch.get_num_threads()} threads, "
          f"batch {BATCH}, {steps} timed steps")
    print("| dtype | ours: step | open_clip: step | speed ratio (open_clip time / ours) | ours: peak RSS | "
          "open_clip: peak RSS |")
    print("|---|---|---|---|---|---|")
    rows = []
    for precision in [p.strip() for p in args.precisions.split(",") if p.strip()]:
        if precision not in ("fp32", "bf16"):
            ap.error(f"--precisions: unknown precision {precision!r}; valid: fp32, bf16")
        res = {}
        for impl in ("ours", "open_clip"):
            out = subprocess.run([sys.executable, "-m", "benchmarks.clip_step", "--case", f"{impl},{precision},{steps}"],
                                 capture_output=True, text=True, check=True)
            res[impl] = json.loads(out.stdout.strip().splitlines()[-1])
        a, b = res["ours"], res["open_clip"]
        # ours has a patch-embedding bias and an (unused) mask token: 2 x 192 more parameters
        if abs(a["params"] - b["params"]) > 0.001 * b["params"]:
            raise SystemExit(f"the two models differ in size: {a['params']:,} against {b['params']:,} parameters")
        rows.append(res)
        print(f"| {precision} | {a['step_s']:.3f} s | {b['step_s']:.3f} s | {b['step_s'] / a['step_s']:.2f}x | "
              f"{a['peak_rss_mib']:,.0f} MiB | {b['peak_rss_mib']:,.0f} MiB |", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
