"""Pipeline bubble and parameter memory per rank: ``parallel.pp=2`` against one process, and ``parallel.tp=2``.

1. Bubble. A supervised ViT on ``data=digits`` (real images, upsampled) trained through the project's
   own engines, built as ``pretrain.loop.fit`` builds them (``load_config``, ``build_model``,
   ``check_tensor_parallel``, ``make_engine``, the schema's loader). For each number of
   micro-batches m (``optim.grad_accum``, micro-batch size fixed) one optimizer step is timed as
   ``engine.train_step(m micro-batches)``:

   - pp=2: :class:`pretrain.engines.pipeline.PipelineEngine` (DeepSpeed's 1F1B ``train_batch``,
     parameter-balanced stages, ZeRO-0), both stages in one 2-rank ``deepspeed`` launch, one thread
     per rank. The ranks meet at a barrier before each step (outside the timing); a step's time
     is the slower rank's.
   - one process: :class:`pretrain.engines.PlainEngine`, the same m micro-batches per step (same
     global batch, same data), in a plain subprocess with ``--ref-threads`` torch threads (default
     1: one core, the counterpart of one device, which speed-up and efficiency are measured against;
     ``--ref-threads 1,2`` adds the whole machine, the practical alternative on a 2-core CPU).

   Times are medians over ``--steps`` steps after ``--warmup`` untimed ones. The ideal step time of
   GPipe/1F1B with p stages is ``(m + p - 1) / m`` times that of a bubble-free pipeline
   (``T_one / p``); the measured ratio is ``p * T_pp / T_one`` and the efficiency its inverse.
2. Parameter memory per rank, measured on the live engines after the timed steps: the sum of
   ``numel * element_size`` over the objective's parameters each rank holds (the pipeline engine
   frees the other stage's tensors, ``t.data = torch.empty(0)``; under tp=2 the blocks' linear
   layers hold shards) and over the optimizer's state tensors (AdamW moments), for one process,
   pp=2 and tp=2 (a tp=2 DeepSpeed engine built in the same launch, stepped twice).

The tables, with the machine, command and date, are printed and written to
``benchmarks/results/pipeline_bubble.md`` (``--json FILE``: the raw numbers too, every step's time).

    python -m benchmarks.pipeline_bubble                        # ViT depth 8, width 128, 32 px / 4, micro-batch 16
    python -m benchmarks.pipeline_bubble --micro-batches 1,2,4,8,16 --ref-threads 1,2   # more m, a 2-thread column
    python -m benchmarks.pipeline_bubble --depth 2 --dim 32 --heads 2 --image-size 16 --micro-batch 8 \\
        --steps 2 --warmup 1 --ref-threads 1 --out /tmp/pb.md     # a smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # started as a script by the deepspeed launcher
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.mim_step import cpu_model  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "pipeline_bubble.md"
P = 2  # pipeline stages (and tensor-parallel ranks): the 2 ranks of the launch


# -- the worker: builds engines as pretrain.loop.fit does and times train_step --------------------------

def _overrides(a: dict, m: int, engine: str, tp: int = 1, pp: int = 1) -> list[str]:
    return ["objective=supervised", "data=digits", f"image_size={a['image_size']}",
            "model.image.backbone=vit_tiny", f"model.image.patch_size={a['patch']}", f"model.image.depth={a['depth']}",
            f"model.image.embed_dim={a['dim']}", f"model.image.num_heads={a['heads']}", "supervised.head_layers=0",
            f"batch_size={a['micro_batch']}", f"optim.grad_accum={m}", "optim.name=adamw", "optim.lr=0.001",
            "optim.warmup_steps=0", f"max_steps={a['warmup'] + a['steps']}", "precision=fp32", "progress=false",
            f"engine={engine}", f"parallel.tp={tp}", f"parallel.pp={pp}", "run_dir=/tmp/unused"]


def _build(a: dict, m: int, engine: str, tp: int = 1, pp: int = 1):
    """Objective, engine and batch stream of a run config, the way :func:`pretrain.loop.fit` builds them."""
    import data as data_lib
    from pretrain.batches import schema_of
    from pretrain.config import load_config
    from pretrain.loop import build_model, make_engine
    from pretrain.objectives import objective_class
    from pretrain.parallel import ParallelLayout, check_tensor_parallel

    cfg = load_config(None, _overrides(a, m, engine, tp, pp))
    layout = ParallelLayout.from_world(tp=tp, pp=pp).install()
    torch.manual_seed(cfg.seed)
    schema = schema_of(objective_class(cfg.objective))
    ds = schema.dataset(cfg, "train")
    objective = build_model(cfg, ds.info)
    check_tensor_parallel(objective, layout.tp)  # DeepSpeed's AutoTP cuts the blocks in make_engine
    images = data_lib.labelled_split(ds, cfg.labels, cfg.label_seed) if objective.labelled_only else ds
    objective.on_data(images)
    eng = make_engine(cfg, objective, layout)
    objective.on_train_start(steps_per_epoch=len(images) // (cfg.batch_size * layout.dp) / m)
    loader = schema.loader(cfg, objective, ds.info, images, layout.dp_rank, layout.dp)
    eng.train()
    return objective, eng, loader


def _time_steps(a: dict, objective, eng, loader, m: int, distributed: bool) -> list[float]:
    """Every step's ``train_step`` time (warm-up steps included, first); batches are drawn beforehand."""
    import torch.distributed as dist

    it = iter(loader)
    steps = [[next(it) for _ in range(m)] for _ in range(a["warmup"] + a["steps"])]
    times = []
    for i, micro in enumerate(steps):
        if distributed:
            dist.barrier()  # both stages start the step together
        t = time.perf_counter()
        eng.train_step(micro)
        times.append(time.perf_counter() - t)
        objective.on_step_end(i, len(steps))
    return times


def _memory(objective, eng) -> dict:
    """Bytes of the parameters this rank holds and of its optimizer's state tensors."""
    params = {id(p): p for p in objective.parameters()}.values()
    opt = eng.optimizer
    while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
        opt = opt.optimizer  # DeepSpeed's wrappers, if any
    state = {t.data_ptr(): t for s in opt.state.values() for t in s.values()
             if torch.is_tensor(t) and t.numel() > 1}  # AdamW's moments (not its scalar step counts)
    return {"param_numel": sum(p.numel() for p in params),
            "param_bytes": sum(p.numel() * p.element_size() for p in params),
            "opt_bytes": sum(t.numel() * t.element_size() for t in state.values())}


def worker(a: dict, out: str) -> None:
    """One process (no launcher): the plain engine per m and thread count. Under the deepspeed
    launcher (2 ranks): the pipeline engine per m, then a tensor-parallel engine for its memory."""
    ms = a["micro_batches"]
    if "WORLD_SIZE" not in os.environ:
        res: dict = {"one": {}}
        for threads in a["ref_threads"]:
            torch.set_num_threads(threads)
            for m in ms:
                objective, eng, loader = _build(a, m, "plain")
                res["one"][f"{threads}:{m}"] = _time_steps(a, objective, eng, loader, m, False)
        res["memory"] = {"one": [_memory(objective, eng)]}
        Path(out).write_text(json.dumps(res))
        return

    import torch.distributed as dist

    from pretrain.engines import init_distributed, shutdown_distributed

    init_distributed("deepspeed")
    torch.set_num_threads(1)
    ok = False
    try:
        res = {"pp": {}, "memory": {}}
        for m in ms:
            objective, eng, loader = _build(a, m, "deepspeed", pp=P)
            res["pp"][str(m)] = _time_steps(a, objective, eng, loader, m, True)
            res["parts"] = [int(x) for x in eng.parts]
        res["memory"]["pp"] = _memory(objective, eng)
        del objective, eng, loader
        objective, eng, loader = _build(dict(a, warmup=0, steps=2), 1, "deepspeed", tp=P)
        _time_steps(dict(a, warmup=0, steps=2), objective, eng, loader, 1, True)
        res["memory"]["tp"] = _memory(objective, eng)
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, res)
        if dist.get_rank() == 0:
            Path(out).write_text(json.dumps({"pp": {m: [r["pp"][m] for r in ranks] for m in ranks[0]["pp"]},
                                             "parts": ranks[0]["parts"],
                                             "memory": {k: [r["memory"][k] for r in ranks] for k in ("pp", "tp")}}))
        ok = True
    finally:
        shutdown_distributed(wait=ok)


# -- the driver ------------------------------------------------------------------------------------------

def _run(cmd: list[str], env: dict, what: str) -> None:
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{what} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-4000:]}")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _med(times: list[float], warmup: int) -> float:
    return statistics.median(times[warmup:])


def _cell(times: list[float], warmup: int) -> str:
    """The median step time, and the fastest and slowest timed step (how noisy the run was)."""
    t = times[warmup:]
    return f"{statistics.median(t):.3f} s ({min(t):.3f}-{max(t):.3f})"


def _mib(b: int) -> str:
    return f"{b / 2**20:.2f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=8, help="ViT blocks (default 8)")
    ap.add_argument("--dim", type=int, default=128, help="ViT width (default 128)")
    ap.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    ap.add_argument("--image-size", type=int, default=32, help="image side in px (default 32)")
    ap.add_argument("--patch", type=int, default=4, help="patch side in px (default 4)")
    ap.add_argument("--micro-batch", type=int, default=16, help="images per micro-batch (default 16)")
    ap.add_argument("--micro-batches", default="1,2,4,8", help="values of m, comma-separated (default 1,2,4,8)")
    ap.add_argument("--ref-threads", default="1",
                    help="torch threads of the one-process reference, comma-separated (default 1; e.g. 1,2 adds a "
                         "whole-machine column); the first is the reference of speed-up and efficiency")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per m; the median is reported (default 8)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before timing (default 2)")
    ap.add_argument("--out", default=str(RESULTS), help="markdown results file (default "
                    "benchmarks/results/pipeline_bubble.md)")
    ap.add_argument("--json", help="also write the raw numbers (every step's time) to this JSON file")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args, _ = ap.parse_known_args()  # the deepspeed launcher adds --local_rank
    if args.worker:
        worker(json.loads(Path(args.worker[0]).read_text()), args.worker[1])
        return
    try:
        ms = [int(x) for x in args.micro_batches.split(",") if x.strip()]
        threads = [int(x) for x in args.ref_threads.split(",") if x.strip()]
    except ValueError:
        ms = threads = []
    if not ms or not threads or min(*ms, *threads, args.steps, args.micro_batch) < 1 or args.warmup < 0:
        ap.error("--micro-batches and --ref-threads: integers >= 1; --steps, --micro-batch >= 1, --warmup >= 0")
    if args.image_size % args.patch or args.dim % args.heads or args.heads % P or args.depth < P:
        ap.error(f"need --image-size divisible by --patch, --dim by --heads, --heads by {P} (tp={P} splits heads) "
                 f"and --depth >= {P}")
    a = {k: getattr(args, k) for k in ("depth", "dim", "heads", "image_size", "patch", "micro_batch", "steps",
                                       "warmup")}
    a.update(micro_batches=ms, ref_threads=threads)

    t_start, load_start = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="pipeline_bubble_") as tmp:
        spec, one_out, ds_out = Path(tmp) / "args.json", Path(tmp) / "one.json", Path(tmp) / "ds.json"
        spec.write_text(json.dumps(a))
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        print("one process ...", flush=True)
        _run([sys.executable, "-m", "benchmarks.pipeline_bubble", "--worker", str(spec), str(one_out)],
             {**env, "OMP_NUM_THREADS": str(max(threads))}, "the one-process reference")
        print("pp=2 and tp=2: a 2-rank deepspeed launch ...", flush=True)
        deepspeed = str(Path(sys.executable).with_name("deepspeed"))
        _run([deepspeed, "--num_gpus", str(P), "--master_port", str(_free_port()), str(Path(__file__).resolve()),
              "--worker", str(spec), str(ds_out)], env, "the deepspeed launch")
        one, ds = json.loads(one_out.read_text()), json.loads(ds_out.read_text())
    total, load_end = time.perf_counter() - t_start, os.getloadavg()[0]

    lines: list[str] = []

    def emit(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    import deepspeed as ds_lib

    w = args.warmup
    emit("# Pipeline bubble and parameter memory per rank (`python -m benchmarks.pipeline_bubble`)")
    emit()
    emit(f"- date: {time.strftime('%Y-%m-%d %H:%M')}")
    emit(f"- machine: {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}, deepspeed "
         f"{ds_lib.__version__} (gloo), python {platform.python_version()}; 1-minute load average {load_start:.1f} "
         f"at the start, {load_end:.1f} at the end (other jobs on the same cores stretch step times)")
    emit(f"- model: supervised ViT (`vit_tiny` with depth {args.depth}, width {args.dim}, {args.heads} heads), "
         f"{args.image_size} px `data=digits`, patches of {args.patch}; AdamW, fp32; micro-batch "
         f"{args.micro_batch} images; median of {args.steps} timed steps after {w} warm-up per case")
    layers = ["embedding", *(f"block {i}" for i in range(args.depth)), "pool", "head"]
    stages = [f"{layers[lo]} to {layers[hi - 1]}" for lo, hi in zip(ds["parts"], ds["parts"][1:])]
    emit(f"- pp=2 stages (`parallel.partition=parameters`): {'; '.join(stages)}; one thread per rank")
    emit(f"- command: `{' '.join(['python -m benchmarks.pipeline_bubble', *sys.argv[1:]])}`")
    emit()
    emit(f"## Step time against the number of micro-batches m (p = {P})")
    emit()
    t1 = threads[0]
    ref_cols = " | ".join(f"one process, {t} thread{'s' * (t > 1)}: median (min-max)" for t in threads)
    emit(f"| m | images/step | pp=2 step: median (min-max) | {ref_cols} | speed-up (one process, {t1} thr. / pp=2) "
         f"| pp=2 time per micro-batch | ideal bubble (p-1)/(m+p-1) | ideal time ratio (m+p-1)/m "
         f"| measured ratio p·T_pp/T_one | efficiency T_one/(p·T_pp) |")
    emit("|" + "---|" * (9 + len(threads)))
    rows = []
    for m in ms:
        per_step = [max(r[i] for r in ds["pp"][str(m)]) for i in range(w + args.steps)]  # the slower rank
        t_pp = _med(per_step, w)
        refs = [_med(one["one"][f"{t}:{m}"], w) for t in threads]
        ratio = P * t_pp / refs[0]
        rows.append({"m": m, "pp_step_s": t_pp, "pp_step_times_s": per_step,
                     "one_step_s": dict(zip(map(str, threads), refs)),
                     "one_step_times_s": {str(t): one["one"][f"{t}:{m}"] for t in threads}})
        emit(f"| {m} | {m * args.micro_batch} | {_cell(per_step, w)} | " +
             " | ".join(_cell(one["one"][f"{t}:{m}"], w) for t in threads) +
             f" | {refs[0] / t_pp:.2f}x | {1000 * t_pp / m:.0f} ms | {(P - 1) / (m + P - 1):.0%} "
             f"| {(m + P - 1) / m:.2f} | {ratio:.2f} | {1 / ratio:.0%} |")
    emit()
    emit("## Parameter and optimizer-state bytes per rank")
    emit()
    base = one["memory"]["one"][0]
    emit("| layout | rank | parameters held | parameter bytes | of one process | AdamW state bytes | of one process |")
    emit("|---|---|---|---|---|---|---|")
    emit(f"| one process | 0 | {base['param_numel']:,} | {_mib(base['param_bytes'])} | 100% "
         f"| {_mib(base['opt_bytes'])} | 100% |")
    for name, key in (("pp=2", "pp"), ("tp=2", "tp")):
        for r, x in enumerate(ds["memory"][key]):
            emit(f"| {name} | {r} | {x['param_numel']:,} | {_mib(x['param_bytes'])} "
                 f"| {x['param_bytes'] / base['param_bytes']:.1%} | {_mib(x['opt_bytes'])} "
                 f"| {x['opt_bytes'] / base['opt_bytes']:.1%} |")
    emit()
    emit(f"Total wall time {total:.0f} s (deepspeed launch and imports included).")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"\nwrote {out}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": a, "bubble": rows, "parts": ds["parts"],
                                               "memory": {"one": base, **ds["memory"]}}, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
