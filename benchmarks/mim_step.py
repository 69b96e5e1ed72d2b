"""Masked-image-modelling step time and peak memory: this project's ``beit_v2`` objective against
``transformers.BeitForMaskedImageModeling``, and ``data2vec2`` against a plain full-sequence step.

1. BEiT v2. One training step (forward, backward, AdamW step) of our ``beit_v2`` objective through
   the plain engine's ``train_step`` (as the loop runs it), with and without its patch-aggregation
   head (``head_depth`` 2 and 0), against ``BeitForMaskedImageModeling`` built offline from a
   ``BeitConfig`` set to the same ViT: absolute position embeddings, no relative position bias, no
   layer scale, no dropout or stochastic depth, LayerNorm eps 1e-6, SDPA attention. Same images,
   batch, masks (our BEiT blockwise masks, 75 of 196 patches at 224/16), vocabulary (8192 codes),
   the same code targets, the same thread count and dtype (fp32, or bf16 autocast for both). The
   tokenizer is excluded from both: HF's model takes the targets as ``labels``, and ours gets a
   stub in place of the frozen VQ-KD tokenizer that returns the same precomputed random codes (a
   stub only because this is a benchmark; the objective's code is otherwise unchanged). Our step
   still draws its masks in ``forward`` (a few ms per batch); HF gets them precomputed. The two
   models hold the same tensors except our attention's key bias (``depth x dim`` more parameters);
   HF's head scores all N patch tokens and then selects the masked ones, ours only the masked ones.
2. data2vec 2.0. One step of our ``data2vec2`` objective with M = 1, 4, 8 clones (teacher once per
   image, student on the visible ~20% of the patches of each clone, the conv decoder, AdamW, the
   teacher's EMA update) against one full-sequence forward and backward of the same ViT (every
   patch, no mask, a mean-squared loss on the output tokens, AdamW) on the same batch of images.

Each case runs in a fresh subprocess, so its peak RSS is its own; step times are the median of
``--steps`` timed steps after ``--warmup`` untimed ones. The tables are printed and written to
``benchmarks/results/mim_step.md``, the raw numbers to ``benchmarks/results/mim_step.json``.

    python -m benchmarks.mim_step                      # ViT-S/16 at 224 px, batch 8, fp32
    python -m benchmarks.mim_step --precision bf16     # bf16 autocast on both sides
    python -m benchmarks.mim_step --dim 64 --depth 2 --heads 2 --image-size 32 --patch 8 --batch 4 \\
        --steps 2 --warmup 1 --out /tmp/mim_step.md    # a smoke run of a few seconds
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from pretrain.engines.base import autocast_context, bf16_is_fast

RESULTS = Path(__file__).resolve().parent / "results" / "mim_step.md"
LR, WEIGHT_DECAY = 1e-3, 0.05


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)


def _grid(a: dict) -> int:
    return a["image_size"] // a["patch"]


def _num_masked(a: dict) -> int:
    from data import beit_num_masked

    return a["num_masked"] or beit_num_masked(_grid(a) ** 2)


def _inputs(a: dict, batch: int | None = None):
    g = torch.Generator().manual_seed(0)
    b = batch or a["batch"]
    images = torch.randn(b, 3, a["image_size"], a["image_size"], generator=g)
    codes = torch.randint(0, a["vocab"], (b, _grid(a) ** 2), generator=g)
    return images, codes


def _vit(a: dict):
    from models import create_backbone

    return create_backbone("vit_small", in_chans=3, image_size=a["image_size"], patch_size=a["patch"],
                           depth=a["depth"], embed_dim=a["dim"], num_heads=a["heads"])


def _engine(obj, precision: str):
    from pretrain.engines import PlainEngine
    from pretrain.optim import build_optimizer
    from pretrain.schedules import LRSchedule

    opt = build_optimizer(obj.param_groups(), "adamw", LR, WEIGHT_DECAY)
    return PlainEngine(obj, opt, LRSchedule(opt, LR, 1000, 0), precision)


class FixedCodes:
    """Stands in for the frozen VQ-KD tokenizer: the same precomputed codes ``[B, N]`` every call,
    so that neither side of the comparison pays for a tokenizer."""

    def __init__(self, codes: torch.Tensor, num_codes: int):
        self.codes, self.num_codes = codes, num_codes

    def tokens(self, x, grid=None):
        return self.codes


def _beit_ours(a: dict, head_depth: int):
    from pretrain.objectives.beit_v2 import BeitV2, BeitV2Config

    images, codes = _inputs(a)
    obj = BeitV2(_vit(a), BeitV2Config(num_masked=_num_masked(a), head_depth=head_depth),
                 tokenizer=FixedCodes(codes, a["vocab"])).train()
    engine = _engine(obj, a["precision"])
    batch = {"views": [images]}
    return (lambda i: engine.train_step([batch])), sum(p.numel() for p in obj.parameters())


def _beit_masks(a: dict) -> torch.Tensor:
    """The masks our objective draws for this batch (step 0, rank 0): BEiT blockwise, exact count."""
    from data import MaskGenerator
    from pretrain.objectives.beit_v2 import default_min_block_patches

    n = _grid(a) ** 2
    gen = MaskGenerator("beit", _grid(a), num_masked=_num_masked(a), seed=0,
                        min_num_patches=default_min_block_patches(n))
    return gen(a["batch"], 0, 0)


def _beit_hf(a: dict):
    from transformers import BeitConfig, BeitForMaskedImageModeling

    cfg = BeitConfig(vocab_size=a["vocab"], hidden_size=a["dim"], num_hidden_layers=a["depth"],
                     num_attention_heads=a["heads"], intermediate_size=4 * a["dim"], hidden_act="gelu",
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layer_norm_eps=1e-6,
                     image_size=a["image_size"], patch_size=a["patch"], num_channels=3, use_mask_token=True,
                     use_absolute_position_embeddings=True, use_relative_position_bias=False,
                     use_shared_relative_position_bias=False, layer_scale_init_value=0.0, drop_path_rate=0.0,
                     use_mean_pooling=True, attn_implementation="sdpa")
    model = BeitForMaskedImageModeling(cfg).train()
    if model.config._attn_implementation != "sdpa":
        raise SystemExit(f"HF BEiT: expected SDPA attention, got {model.config._attn_implementation!r}")
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    images, codes = _inputs(a)
    mask = _beit_masks(a)
    labels = codes[mask]

    def step(i):
        with autocast_context(a["precision"]):
            loss = model(pixel_values=images, bool_masked_pos=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in model.parameters())


def _data2vec2(a: dict, clones: int):
    from pretrain.objectives.data2vec2 import Data2Vec2, Data2Vec2Config

    images, _ = _inputs(a)
    # the reference's 16 decoder groups, fewer where they do not divide a small width
    obj = Data2Vec2(_vit(a), Data2Vec2Config(clones=clones, decoder_groups=math.gcd(16, a["dim"]))).train()
    engine = _engine(obj, a["precision"])
    batch = {"views": [images]}

    def step(i):  # what the loop does per optimizer step
        engine.train_step([batch])
        obj.on_step_end(i, 1000)

    trainable = sum(p.numel() for p in obj.parameters() if p.requires_grad)
    return step, trainable


def _full_step(a: dict):
    """One full-sequence forward and backward of the same ViT: every patch, no mask, a mean-squared
    loss on the output tokens against fixed targets, AdamW."""
    vit = _vit(a).train()
    images, _ = _inputs(a)
    target = torch.randn(a["batch"], 1 + _grid(a) ** 2, a["dim"], generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(vit.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)

    def step(i):
        with autocast_context(a["precision"]):
            loss = torch.nn.functional.mse_loss(vit.forward_features(images).float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in vit.parameters() if p.requires_grad)


def run_case(a: dict, case: str) -> dict:
    """Build the case's model, run ``warmup`` untimed steps, then time ``steps`` steps one by one."""
    torch.manual_seed(0)
    if case == "hf_beit":
        step, params = _beit_hf(a)
    elif case.startswith("ours_beit_h"):
        step, params = _beit_ours(a, int(case.removeprefix("ours_beit_h")))
    elif case == "full_fwd_bwd":
        step, params = _full_step(a)
    elif case.startswith("data2vec2_m"):
        step, params = _data2vec2(a, int(case.removeprefix("data2vec2_m")))
    else:
        raise ValueError(f"unknown case {case!r}")
    rss_built = _rss_mib()
    for i in range(a["warmup"]):
        step(i)
    times = []
    for i in range(a["steps"]):
        t = time.perf_counter()
        step(a["warmup"] + i)
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return {"case": case, "params": params, "step_s": med, "step_times_s": times, "images_per_s": a["batch"] / med,
            "s_per_image": med / a["batch"], "peak_rss_mib": _rss_mib(), "rss_before_steps_mib": rss_built}


def cpu_model() -> str:
    """The CPU's model name (for a benchmark's machine line)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _bf16_kernels() -> str:
    """What ``precision=auto`` decides from (:func:`pretrain.engines.base.bf16_is_fast`)."""
    return "native" if bf16_is_fast("cpu") else "none (bf16 is emulated: slow on both sides)"


def _step_cell(r: dict) -> str:
    """The median step time, and the fastest and slowest timed step (how noisy the run was)."""
    t = r["step_times_s"]
    return f"{r['step_s']:.3f} s ({min(t):.3f}-{max(t):.3f})"


def _child(args, case: str) -> dict:
    cfg = json.dumps(vars(args))
    out = subprocess.run([sys.executable, "-m", "benchmarks.mim_step", "--case", case, "--case-args", cfg],
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"case {case} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=384, help="ViT width (default 384: ViT-S)")
    ap.add_argument("--depth", type=int, default=12, help="ViT blocks (default 12)")
    ap.add_argument("--heads", type=int, default=6, help="attention heads (default 6)")
    ap.add_argument("--image-size", type=int, default=224, help="image side in px (default 224)")
    ap.add_argument("--patch", type=int, default=16, help="patch side in px (default 16)")
    ap.add_argument("--batch", type=int, default=8, help="images per step (default 8)")
    ap.add_argument("--vocab", type=int, default=8192, help="BEiT code vocabulary (default 8192)")
    ap.add_argument("--num-masked", type=int, default=0,
                    help="BEiT masked patches per image; 0 = BEiT's 75 of 196, scaled to the grid")
    ap.add_argument("--clones", default="1,4,8", help="data2vec2 clone counts M, comma-separated (default 1,4,8)")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                    help="fp32, or bf16 autocast on both sides (fast only on CPUs with AVX-512 BF16 or AMX)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per case; the median is reported (default 5)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps before timing (default 1)")
    ap.add_argument("--parts", default="beit,data2vec2", help="which comparisons: beit, data2vec2 (default both)")
    ap.add_argument("--out", default=str(RESULTS),
                    help="markdown results file; the JSON goes next to it with .json (default benchmarks/results/"
                         "mim_step.md)")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--case-args", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:  # child process: one case, JSON on stdout
        print(json.dumps(run_case(json.loads(args.case_args), args.case)))
        return

    if args.image_size % args.patch or args.dim % args.heads or min(args.steps, args.batch, args.depth) < 1:
        ap.error("need --image-size divisible by --patch, --dim by --heads, and --steps, --batch, --depth >= 1")
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if not parts or set(parts) - {"beit", "data2vec2"}:
        ap.error(f"--parts: expected beit and/or data2vec2, got {args.parts!r}")
    try:
        clones = [int(m) for m in args.clones.split(",") if m.strip()]
    except ValueError:
        clones = []
    if not clones or min(clones) < 1:
        ap.error(f"--clones: expected comma-separated integers >= 1, got {args.clones!r}")
    a = vars(args)
    n = _grid(a) ** 2
    import transformers

    lines = []

    def emit(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    t_start = time.perf_counter()
    emit("# MIM step benchmark (`python -m benchmarks.mim_step`)")
    emit()
    emit(f"- date: {time.strftime('%Y-%m-%d %H:%M')}")
    emit(f"- machine: {cpu_model()}, {torch.get_num_threads()} torch threads; bf16 matmul kernels: {_bf16_kernels()}")
    emit(f"- torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}")
    emit(f"- dtype: {args.precision}{' (autocast, fp32 weights)' if args.precision == 'bf16' else ''}")
    emit(f"- ViT: width {args.dim}, {args.depth} blocks, {args.heads} heads, {args.image_size} px, patches of "
         f"{args.patch} ({n} patches); batch {args.batch}; AdamW; median of {args.steps} timed steps after "
         f"{args.warmup} warm-up")
    emit(f"- command: `{' '.join(['python -m benchmarks.mim_step', *sys.argv[1:]])}`")
    rows: dict = {"args": {k: v for k, v in a.items() if k not in ("case", "case_args")},
                  "machine": {"cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                              "transformers": transformers.__version__, "bf16_kernels": _bf16_kernels()}}

    if "beit" in parts:
        k = _num_masked(a)
        emit()
        emit("## BEiT v2 step: ours (`beit_v2`) against `transformers.BeitForMaskedImageModeling`")
        emit()
        emit(f"{k} of {n} patches masked, {args.vocab} codes. Tokenizer excluded from both: the same precomputed "
             f"random codes are the targets (HF: `labels`; ours: a tokenizer stub returning them). Ours draws its "
             f"masks in the step; HF gets the same masks precomputed. HF scores all {n} patch tokens with its LM "
             f"head, ours the {k} masked ones. Ours has `depth x dim` more parameters (attention key bias).")
        emit()
        emit("| case | params | step: median (min-max) | images/s | ratio (HF time / ours) | peak RSS "
             "| of which after build |")
        emit("|---|---|---|---|---|---|---|")
        res = {c: _child(args, c) for c in ("hf_beit", "ours_beit_h0", "ours_beit_h2")}
        hf, h0 = res["hf_beit"], res["ours_beit_h0"]
        if h0["params"] - hf["params"] != args.depth * args.dim:
            raise SystemExit(f"the models differ by more than the key biases: ours (no head) {h0['params']:,}, "
                             f"HF {hf['params']:,} parameters")
        names = {"hf_beit": "HF BeitForMaskedImageModeling (no aggregation head)",
                 "ours_beit_h0": "ours, head_depth=0 (no aggregation head)",
                 "ours_beit_h2": "ours, head_depth=2 (default: 2-block aggregation head)"}
        for c, r in res.items():
            ratio = "-" if c == "hf_beit" else f"{hf['step_s'] / r['step_s']:.2f}x"
            emit(f"| {names[c]} | {r['params']:,} | {_step_cell(r)} | {r['images_per_s']:.1f} | {ratio} | "
                 f"{r['peak_rss_mib']:,.0f} MiB | {r['peak_rss_mib'] - r['rss_before_steps_mib']:,.0f} MiB |")
        rows["beit"] = res

    if "data2vec2" in parts:
        from data import MaskGenerator

        vis = n - MaskGenerator("inverse_block", _grid(a), mask_ratio=0.8).num_masked
        emit()
        emit("## data2vec 2.0: cost per image against one full-sequence forward/backward")
        emit()
        emit(f"Ours (`data2vec2`, defaults but `clones`: teacher once per image on all {n} patches, student on "
             f"{vis} visible patches of each of M clones, 6-layer conv decoder, EMA update) against one forward and "
             f"backward of the same ViT over all {n} patches (MSE on the output tokens), both with AdamW, batch "
             f"{args.batch}.")
        emit()
        emit("| case | student sequences x tokens | step: median (min-max) | time per image | ratio to full fwd/bwd "
             "| peak RSS | of which after build |")
        emit("|---|---|---|---|---|---|---|")
        res = {"full_fwd_bwd": _child(args, "full_fwd_bwd")}
        for m in clones:
            res[f"data2vec2_m{m}"] = _child(args, f"data2vec2_m{m}")
        base = res["full_fwd_bwd"]["step_s"]
        for c, r in res.items():
            if c == "full_fwd_bwd":
                name, shape = "full forward/backward (no mask)", f"{args.batch} x {1 + n}"
            else:
                m = int(c.removeprefix("data2vec2_m"))
                name, shape = f"data2vec2, M = {m}", f"{args.batch * m} x {1 + vis}"
            emit(f"| {name} | {shape} | {_step_cell(r)} | {1000 * r['s_per_image']:.1f} ms | "
                 f"{r['step_s'] / base:.2f}x | {r['peak_rss_mib']:,.0f} MiB | "
                 f"{r['peak_rss_mib'] - r['rss_before_steps_mib']:,.0f} MiB |")
        rows["data2vec2"] = res

    emit()
    emit(f"Total wall time {time.perf_counter() - t_start:.0f} s. Peak RSS is each case's own process (imports "
         f"included: the HF case imports transformers); 'of which after build' is what the steps added to the "
         f"peak reached once the model and inputs were built.")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    print(f"\nwrote {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
