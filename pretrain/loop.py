"""The training loop. It never branches per objective nor per engine."""
from __future__ import annotations

import dataclasses

import json
import sys
import time
from pathlib import Path

import torch

import data as data_lib
from data.common import UserError
from losses import all_reduce_mean

from .batches import schema_of
from .checkpoint import latest_checkpoint, read_meta, rng_state, save_checkpoint, save_weights, set_rng_state
from .config import RunConfig, save_config, to_dict
from .engines import ENGINES, NonFiniteLossError, autocast_context, build_engine, init_distributed
from .engines.plain import portable_from_plain
from .objectives import create_objective, objective_class
from .optim import build_optimizer
from .parallel import ParallelLayout, check_tensor_parallel, convert_to_global_bn
from .schedules import LRSchedule
from .towers import build_tower, build_towers


class RunError(UserError, RuntimeError):
    """A run cannot go on (diverged loss, bad resume directory); the message says why."""


def build_backbone(cfg: RunConfig, in_chans: int, image_size: int):
    """The image tower of a run, from ``cfg.model.image`` and the data's channels and size."""
    return build_tower(cfg.model, "image", in_chans=in_chans, image_size=image_size)


def uses_channels_last(cfg: RunConfig, channels: int) -> bool:
    """Whether the run keeps model and image inputs in channels_last layout.

    Only for plain-engine runs on multi-channel images: DeepSpeed broadcasts and flattens
    contiguous parameter buffers, and with torch 2.14 on the CPU a 1-channel channels_last
    ResNet gets wrong weight gradients (up to 16% off an fp64 reference; see
    tests/test_models_numerics.py), so single-channel data stays contiguous. Only for objectives
    whose batches are images (``BatchSchema.image_batches``; not video clips, whose 3-D
    convolutions have no such layout).
    """
    return (cfg.model.channels_last and cfg.engine == "plain" and channels > 1
            and schema_of(objective_class(cfg.objective)).image_batches)


def build_model(cfg: RunConfig, info: data_lib.DatasetInfo):
    """The objective of a run config with the towers it declares, sized by the data (what the data
    fixes in the objective's own config is filled into ``cfg``: :meth:`Objective.resolve_config`)."""
    cls = objective_class(cfg.objective)
    cfg.objectives[cfg.objective] = cls.resolve_config(cfg.objective_config, info)
    fixed = cls.fixed_modules(cfg.objective_config)  # before the towers draw their initial weights
    sizes = schema_of(cls).tower_sizes(cfg, info)
    for tower, options in cls.tower_options(cfg.objective_config).items():
        sizes[tower] = {**sizes.get(tower, {}), **options}
    towers = build_towers(cfg.model, cls.towers, sizes)
    objective = create_objective(cfg.objective, towers, cfg.objective_config, fixed=fixed)
    if uses_channels_last(cfg, info.channels):
        objective = objective.to(memory_format=torch.channels_last)
    return objective


def view_augments(cfg: RunConfig, objective, info: data_lib.DatasetInfo) -> list[data_lib.ViewAugment]:
    """The augmentation of each view a ``views`` objective takes (see :mod:`pretrain.batches`)."""
    from .batches import ViewsSchema

    return ViewsSchema().augments(cfg, objective, info)


def launcher_world_size(engine: str) -> int:
    """Data-parallel ranks a job of ``engine`` will have, before :func:`fit` starts them: the
    launcher's ``WORLD_SIZE`` for a distributed engine, 1 for the plain one."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1")) if ENGINES.meta(engine).get("distributed") else 1


def process_rank() -> int:
    """This process's global rank (0 outside a distributed job); drivers around :func:`fit` report
    on rank 0."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def effective_lr(cfg: RunConfig, world_size: int = 1) -> float:
    """Base LR, linearly scaled with the global batch (lr * B / 256) when ``optim.scale_lr``;
    ``world_size`` is the number of data-parallel ranks."""
    o = cfg.optim
    global_batch = cfg.batch_size * o.grad_accum * world_size
    return o.lr * global_batch / 256 if o.scale_lr else o.lr


class MetricsLogger:
    """metrics.jsonl (one JSON object per logged step) plus TensorBoard event files."""

    def __init__(self, run_dir: Path, resume_step: int = 0):
        self.path = run_dir / "metrics.jsonl"
        if resume_step and self.path.exists():  # drop lines past the checkpoint we resume from
            lines = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
            kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        elif not resume_step and self.path.exists():
            self.path.unlink()
        self.fh = open(self.path, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step or None)
        except Exception:  # tensorboard missing: the JSON log is the source of truth anyway
            self.tb = None

    def log(self, record: dict) -> None:
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, record["step"])

    def close(self) -> None:
        self.fh.close()
        if self.tb is not None:
            self.tb.close()


def plot_metrics(run_dir: str | Path, key: str = "loss") -> Path | None:
    """PNG of ``key`` against step from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    rows = [r for r in rows if key in r]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot([r["step"] for r in rows], [r[key] for r in rows], lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_title(f"{run_dir.name}: training {key}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = run_dir / f"{key}_curve.png"
    fig.savefig(out)
    plt.close(fig)
    return out


def _scalars(metrics: dict, dp_size: int = 1) -> dict:
    """An engine's metrics averaged over the data-parallel ranks (every rank must call this together)."""
    keys = sorted(metrics)
    vals = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
    if dp_size > 1:
        vals = all_reduce_mean(vals)
    return {k: float(v) for k, v in zip(keys, vals)}


#: a checkpoint's one-process copy of the training state (model, per-parameter optimizer state by
#: name, schedule, step, client state), written by the DeepSpeed engines that can give it (ZeRO 0-2;
#: pipelines ZeRO-0); a plain run's state.pt is read as one
PORTABLE = "portable.pt"


def same_layout(meta: dict, engine: str, layout: ParallelLayout) -> bool:
    """Whether a checkpoint was written by this engine with the layout of now (``dp``, ``tp`` and
    ``pp``), so the engine's own files resume it. DeepSpeed reloads its ZeRO partitions only on the
    data-parallel size they were written with; another size goes through the one-process copy."""
    saved = ParallelLayout.parse(meta.get("layout", "dp=1 x tp=1 x pp=1"))
    return meta.get("engine", "plain") == engine and (saved.dp, saved.tp, saved.pp) == (layout.dp, layout.tp, layout.pp)


def check_resume_layout(meta: dict, layout: ParallelLayout, ckpt) -> None:
    """Raises when a checkpoint without a one-process copy (:data:`PORTABLE`) would resume with the
    model cut differently than it was saved, or on another data-parallel size."""
    saved = ParallelLayout.parse(meta.get("layout", "dp=1 x tp=1 x pp=1"))
    if (saved.tp, saved.pp) == (layout.tp, layout.pp) and saved.dp != layout.dp:
        raise RunError(f"--resume: checkpoint '{ckpt}' was written by {saved.dp} data-parallel replicas, this run has "
                       f"{layout.dp}; DeepSpeed reloads its ZeRO partitions only on the data-parallel size they were "
                       f"written with, and this checkpoint has no {PORTABLE} (ZeRO-3 and pipelines under ZeRO-1 "
                       f"write none): resume on {saved.dp * saved.tp * saved.pp} ranks, or start a new run from the "
                       f"exported weights (model.image.init=RUN_DIR)")
    if (saved.tp, saved.pp) != (layout.tp, layout.pp):
        raise RunError(f"--resume: checkpoint '{ckpt}' was written with parallel.tp={saved.tp} parallel.pp={saved.pp}, "
                       f"this run has tp={layout.tp} pp={layout.pp}; resuming with the model cut differently needs "
                       f"the checkpoint's {PORTABLE}, which DeepSpeed runs under ZeRO 0-2 write (pipelines: "
                       f"ZeRO-0): resume with the same parallel.* settings, or start a new run from the exported "
                       f"weights (model.image.init=RUN_DIR)")


def make_engine(cfg: RunConfig, objective, layout: ParallelLayout, channels_last: bool = False):
    """Optimizer, LR schedule and the engine named by ``cfg.engine`` (see :mod:`pretrain.engines`)."""
    lr = effective_lr(cfg, layout.dp)
    optimizer = build_optimizer(objective.param_groups(), cfg.optim.name, lr, cfg.optim.weight_decay,
                                cfg.optim.momentum, cfg.optim.betas, cfg.optim.lars_eta)
    schedule = LRSchedule(optimizer, lr, cfg.max_steps, cfg.optim.warmup_steps, cfg.optim.min_lr_ratio)
    return build_engine(cfg, objective, optimizer, schedule, layout, channels_last=channels_last)


def fit(cfg: RunConfig, resume: bool = False) -> Path:
    """Train ``cfg.objective`` and leave a run directory; returns its path.

    With ``resume=True`` the latest checkpoint under ``cfg.run_dir`` is restored (model,
    optimizer, LR schedule, EMA teacher, RNG states and data position) and training goes on
    to ``cfg.max_steps``; the losses continue exactly as in an uninterrupted run.
    Under ``engine=deepspeed`` every rank runs this function (started by the deepspeed launcher).

    The loop reads no key of a batch and asks no model its type: the objective declares its
    towers and batch schema (:mod:`pretrain.batches`), which images it learns from (all of the
    train split, or its labelled subset, ``labels`` / ``label_seed``), whether it evaluates
    (``eval_split``: :meth:`~pretrain.objectives.Objective.evaluate` every ``eval_every`` steps and
    at the end) and what ``weights.safetensors`` holds
    (:meth:`~pretrain.objectives.Objective.export_state`); the engine takes whole optimizer steps.
    """
    run_dir = Path(cfg.run_dir)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    if ENGINES.meta(cfg.engine).get("distributed"):
        init_distributed(cfg.engine)
    layout = ParallelLayout.from_world(tp=cfg.parallel.tp, pp=cfg.parallel.pp).install()
    rank, world = layout.rank, layout.world
    dp_rank, dp = layout.dp_rank, layout.dp
    main = rank == 0
    barrier = _barrier if world > 1 else None
    torch.manual_seed(cfg.seed)
    schema = schema_of(objective_class(cfg.objective))
    train_ds = schema.dataset(cfg, "train")
    info = train_ds.info
    objective = build_model(cfg, info)
    # parallel.tp > 1: refused here, before any data is read, when the blocks cannot be cut; DeepSpeed's
    # AutoTP cuts them when the engine is built
    check_tensor_parallel(objective, layout.tp)
    objective.grad_chunks = cfg.grad_chunks
    if dp > 1 and cfg.model.global_bn:
        objective = convert_to_global_bn(objective)
    labelled = None
    if objective.labelled_only or objective.labelled_stream:
        labelled = data_lib.labelled_split(train_ds, cfg.labels, cfg.label_seed)
    images = labelled if objective.labelled_only else train_ds  # what the main stream draws from
    objective.on_data(images)
    eval_cfg = dataclasses.replace(cfg, data=cfg.eval_data) if cfg.eval_data else cfg
    eval_split = (cfg.eval_split or objective.eval_split) if objective.eval_split else None
    eval_ds = schema.dataset(eval_cfg, eval_split) if eval_split else None
    channels_last = uses_channels_last(cfg, info.channels)
    engine = make_engine(cfg, objective, layout, channels_last=channels_last)
    accum = cfg.optim.grad_accum
    objective.on_train_start(steps_per_epoch=len(images) // (cfg.batch_size * dp) / accum)

    start = 0
    if resume:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise RunError(f"--resume: no checkpoint found under '{run_dir / 'checkpoints'}'")
        meta = read_meta(ckpt)
        if same_layout(meta, cfg.engine, layout):
            client = engine.load(ckpt)
        else:  # another engine or model cut: the checkpoint's one-process copy, cut for this layout
            if (ckpt / PORTABLE).is_file():
                portable = torch.load(ckpt / PORTABLE, map_location="cpu", weights_only=False)
            elif meta.get("engine", "plain") == "plain":
                portable = portable_from_plain(ckpt, objective)
            else:
                check_resume_layout(meta, layout, ckpt)  # names the difference
                raise RunError(f"--resume: checkpoint '{ckpt}' was written by engine={meta.get('engine')}, "
                               f"this run uses engine={cfg.engine}; resuming under another engine or layout needs "
                               f"the checkpoint's {PORTABLE}, which DeepSpeed runs under ZeRO 0-2 write (pipelines: ZeRO-0)")
            engine.load_portable(portable)
            client = portable["client"]
        if hasattr(objective, "load_state_dict_extra"):
            # per-rank state (e.g. SwAV's queue) where saved; older checkpoints hold rank 0's only
            extra = client.get("objective_extra_by_rank", {}).get(str(rank), client.get("objective_extra", {}))
            objective.load_state_dict_extra(extra)
        rngs = client.get("rng", {})
        if str(rank) in rngs:
            set_rng_state(rngs[str(rank)])
        start = int(meta["step"])
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")

    loader = schema.loader(cfg, objective, info, images, dp_rank, dp, start_step=start * accum,
                           labelled=labelled if objective.labelled_stream else None)
    logger = MetricsLogger(run_dir, resume_step=start) if main else None
    skips = data_lib.SkipCounter()
    skips.record(getattr(train_ds, "skipped", ()))  # what the dataset dropped when it was built (it warned)

    def checkpoint(step: int) -> Path:
        rngs = _gather_objects(rng_state(), world)
        # only rank 0's client state is written under DeepSpeed, so per-rank objective state is gathered
        extras = _gather_objects(objective.state_dict_extra() if hasattr(objective, "state_dict_extra") else {},
                                 world)
        client = {"rng": {str(r): s for r, s in enumerate(rngs)}, "objective_extra": extras[0],
                  "objective_extra_by_rank": {str(r): e for r, e in enumerate(extras)}}
        def write(d: Path) -> None:
            engine.save(d, client)
            portable = engine.portable_state()  # every rank takes part; rank 0 gets it (None where not possible)
            if portable is not None:
                torch.save({**portable, "client": client}, Path(d) / PORTABLE)

        return save_checkpoint(run_dir, step, write,
                               {"config": to_dict(cfg), "world_size": world, "engine": cfg.engine,
                                "objective": cfg.objective, "layout": layout.describe()},
                               keep_last=cfg.keep_last, rank=rank, barrier=barrier)

    def next_batch(step: int) -> dict:
        """The next batch with at least 2 readable samples (unreadable files are counted and named)."""
        for _ in range(100):
            batch = next(it)
            skips.update(batch)
            if data_lib.batch_len(batch) >= 2:
                return batch
        raise RunError(f"step {step}: 100 batches in a row had fewer than 2 readable samples "
                       f"({skips.count} unreadable files so far); check the data")

    def evaluate(final: bool) -> dict:
        """The objective's numbers on its eval split, as ``{"<split>_<name>": value}`` (every rank runs it)."""
        batches = EvalBatches(schema.eval_loader(cfg, info, eval_ds), engine.prepare)

        def run(module) -> dict:
            with autocast_context(cfg.precision):
                return {k: float(v) for k, v in module.evaluate(batches, final=final).items()}

        res = engine.run_evaluation(run)
        engine.train()
        return {f"{eval_split}_{k}": v for k, v in res.items()}

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.max_steps, initial=start, desc=f"{cfg.objective}", disable=not (cfg.progress and main),
               dynamic_ncols=True)
    engine.train()
    it = iter(loader)
    t0, seen = time.perf_counter(), 0
    end = min(cfg.max_steps, cfg.stop_at) if cfg.stop_at > 0 else cfg.max_steps
    last_ckpt = None
    evaluated: dict = {}  # the numbers of the final evaluation
    warned = False  # an objective's warning about its metrics is printed once per run
    try:
        for step in range(start, end):
            micro_batches = [next_batch(step) for _ in range(accum)]
            try:
                metrics = engine.train_step(micro_batches)
            except NonFiniteLossError as exc:
                raise RunError(f"loss became {exc.value} at step {step}; lower optim.lr (now {cfg.optim.lr}) "
                               f"or use precision=fp32") from None
            seen += sum(data_lib.batch_len(b) for b in micro_batches) * dp
            objective.on_step_end(step, cfg.max_steps)
            done = step + 1
            bar.update(1)
            numbers = {}
            if eval_ds is not None and cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.max_steps:
                numbers = evaluate(final=False)
            if done % cfg.log_every == 0 or done == end or done == start + 1 or numbers:
                rec = _scalars(metrics, dp)
                if main:
                    dt = time.perf_counter() - t0
                    rec = {"step": done, **rec, "lr": engine.lr, "images_per_s": seen / max(dt, 1e-9),
                           "skipped_files": skips.count, **numbers}
                    logger.log(rec)
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.3g}")
                    msg = None if warned else objective.check_metrics(rec)
                    if msg:
                        warned = True
                        tqdm.write(f"warning: {msg}", file=sys.stderr)
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done != end:
                last_ckpt = checkpoint(done)
        train_s = time.perf_counter() - t0
        last_ckpt = checkpoint(end)
        if eval_ds is not None and end == cfg.max_steps:
            evaluated = evaluate(final=True)
            if main:
                logger.log({"step": end, **evaluated})
    finally:
        bar.close()
        if logger is not None:
            logger.close()
    state = engine.full_state_dict(last_ckpt)
    if main:
        towers = {t: getattr(cfg.model, t).backbone for t in objective.towers}
        run = {"config": to_dict(cfg), "towers": schema.tower_sizes(cfg, info), "final": end == cfg.max_steps}
        exported = objective.export_state(state, run)
        if exported is not None:
            tensors, extra_meta = exported
            save_weights(run_dir / "weights.safetensors", tensors,
                         {"objective": cfg.objective, "backbone": cfg.model.image.backbone, "format": "ssl-pretrain/1",
                          "towers": json.dumps(towers), "config": json.dumps(run["config"]), **extra_meta})
        plot_metrics(run_dir, "loss")
        summary = {"steps": end, "max_steps": cfg.max_steps, "start_step": start, "world_size": world,
                   "layout": layout.describe(), "engine": cfg.engine, "skipped_files": skips.count,
                   "skipped": sorted(skips.files), "train_wall_s": round(train_s, 2),
                   "wall_s": round(time.perf_counter() - t0, 2), **evaluated}
        (run_dir / "train_summary.json").write_text(json.dumps(summary, indent=1))
        if skips.count:
            print(f"skipped {skips.count} unreadable or unusable file(s); see {run_dir / 'train_summary.json'}")
    if barrier:
        barrier()
    return run_dir


class EvalBatches:
    """One evaluation pass: iterating yields the schema's evaluation batches moved to the engine's
    device (``prepare``); every other attribute is the schema loader's (e.g. the tokenizer and
    zero-shot classes of image-text pairs), and ``prepare`` moves a tensor or batch the objective
    makes itself."""

    def __init__(self, loader, prepare):
        self.loader, self.prepare = loader, prepare

    def __iter__(self):
        return (self.prepare(b) for b in self.loader)

    def __getattr__(self, name):
        return getattr(self.__dict__["loader"], name)


def _barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def _gather_objects(obj, world: int) -> list:
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * world
    dist.all_gather_object(out, obj)
    return out
