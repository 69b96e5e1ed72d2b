"""The training loop. It never branches per objective nor per engine."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

import data as data_lib
from models import create_backbone

from losses import all_reduce_mean

from .checkpoint import latest_checkpoint, read_meta, rng_state, save_checkpoint, save_weights, set_rng_state
from .config import ConfigError, RunConfig, save_config, to_dict
from .distributed import convert_to_global_bn
from .engine import DeepSpeedEngine, PlainEngine, ds_config, init_distributed, zero_stage_of
from .objectives import create_objective
from .optim import build_optimizer
from .schedules import LRSchedule


class RunError(RuntimeError):
    """A run cannot go on (diverged loss, bad resume directory); the message says why."""


def build_backbone(cfg: RunConfig, in_chans: int, image_size: int):
    """The backbone of a run, from ``cfg.model`` and the data's channels and size."""
    m = cfg.model
    if m.backbone.startswith("resnet"):
        return create_backbone(m.backbone, in_chans=in_chans, stem=m.stem, norm=m.norm, width=m.width)
    if m.backbone.startswith("vit"):
        return create_backbone(m.backbone, in_chans=in_chans, image_size=image_size, patch_size=m.patch_size)
    return create_backbone(m.backbone)


def uses_channels_last(cfg: RunConfig, channels: int) -> bool:
    """Whether the run keeps model and inputs in channels_last layout.

    Only for plain-engine runs on multi-channel images: DeepSpeed broadcasts and flattens
    contiguous parameter buffers, and with torch 2.14 on the CPU a 1-channel channels_last
    ResNet gets wrong weight gradients (up to 16% off an fp64 reference; see
    tests/test_models_numerics.py), so single-channel data stays contiguous.
    """
    return cfg.model.channels_last and cfg.engine == "plain" and channels > 1


def build_model(cfg: RunConfig, info: data_lib.DatasetInfo):
    """Backbone plus objective for a run config and dataset."""
    size = cfg.image_size or info.image_size
    backbone = build_backbone(cfg, info.channels, size)
    objective = create_objective(cfg.objective, backbone, cfg.objective_config)
    if uses_channels_last(cfg, info.channels):
        objective = objective.to(memory_format=torch.channels_last)
    return objective


def view_augments(cfg: RunConfig, objective, info: data_lib.DatasetInfo) -> list[data_lib.ViewAugment]:
    """The augmentation of each view the objective takes: its two views, plus local views
    (``aug.local_views``, default the objective's own count) for objectives with multi-crop."""
    size = cfg.image_size or info.image_size
    kind = cfg.aug.views or objective.view_recipe
    a = cfg.aug
    n_local = objective.local_views if a.local_views < 0 else a.local_views
    if not objective.multi_crop:
        if n_local > 0:
            raise ConfigError(f"aug.local_views={n_local}: objective '{cfg.objective}' does not take local views "
                              f"(multi-crop); set aug.local_views=0 or -1")
        specs = data_lib.view_specs(kind, size, crop_scale=a.crop_scale, color=info.color, flip=info.flip,
                                    jitter_strength=a.jitter_strength)
    else:
        # a ViT takes any multiple of its patch size (its positions are resampled)
        multiple = cfg.model.patch_size if cfg.model.backbone.startswith("vit") else 1
        if n_local > 0 and a.local_size % multiple:
            raise ConfigError(f"aug.local_size={a.local_size} must be a multiple of model.patch_size={multiple} "
                              f"for a ViT backbone")
        try:
            specs = data_lib.multicrop_specs(kind, size, n_local, a.local_size, crop_scale=a.crop_scale,
                                             local_crop_scale=a.local_crop_scale, color=info.color, flip=info.flip,
                                             jitter_strength=a.jitter_strength, size_multiple=multiple)
        except ValueError as exc:
            raise ConfigError(f"aug.{exc}") from None  # the message names the field
    return [data_lib.ViewAugment(s, info.mean, info.std) for s in specs]


def effective_lr(cfg: RunConfig, world_size: int = 1) -> float:
    """Base LR, linearly scaled with the global batch (lr * B / 256) when ``optim.scale_lr``."""
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


def _scalars(out: dict, world: int = 1) -> dict:
    """Scalar outputs as floats, averaged over ranks (every rank must call this together)."""
    keys = sorted(k for k, v in out.items() if (isinstance(v, torch.Tensor) and v.numel() == 1)
                  or isinstance(v, (int, float)))
    vals = torch.tensor([float(out[k].detach()) if isinstance(out[k], torch.Tensor) else float(out[k])
                         for k in keys], dtype=torch.float64)
    if world > 1:
        vals = all_reduce_mean(vals)
    return {k: float(v) for k, v in zip(keys, vals)}


def build_engine(cfg: RunConfig, objective, world_size: int):
    """Optimizer, LR schedule and the engine named by ``cfg.engine``."""
    lr = effective_lr(cfg, world_size)
    optimizer = build_optimizer(objective.param_groups(), cfg.optim.name, lr, cfg.optim.weight_decay,
                                cfg.optim.momentum, cfg.optim.betas, cfg.optim.lars_eta)
    schedule = LRSchedule(optimizer, lr, cfg.max_steps, cfg.optim.warmup_steps, cfg.optim.min_lr_ratio)
    if cfg.engine == "plain":
        return PlainEngine(objective, optimizer, schedule, cfg.precision, cfg.optim.grad_accum, cfg.optim.grad_clip)
    stage = None if cfg.deepspeed.zero_stage < 0 else cfg.deepspeed.zero_stage
    ds_cfg = ds_config(cfg.deepspeed.config, stage, cfg.batch_size, cfg.optim.grad_accum, world_size,
                       cfg.optim.grad_clip)
    stage = zero_stage_of(ds_cfg)
    if stage >= 1 and cfg.optim.name == "lars":
        raise ConfigError(f"optim.name=lars computes a trust ratio per layer, but ZeRO stage {stage} hands the "
                          f"optimizer flattened partitions; use deepspeed.zero_stage=0, or optim.name=sgd|adamw")
    return DeepSpeedEngine(objective, optimizer, schedule, ds_cfg, cfg.precision)


def fit(cfg: RunConfig, resume: bool = False) -> Path:
    """Train ``cfg.objective`` and leave a run directory; returns its path.

    With ``resume=True`` the latest checkpoint under ``cfg.run_dir`` is restored (model,
    optimizer, LR schedule, EMA teacher, RNG states and data position) and training goes on
    to ``cfg.max_steps``; the losses continue exactly as in an uninterrupted run.
    Under ``engine=deepspeed`` every rank runs this function (started by the deepspeed launcher).
    """
    run_dir = Path(cfg.run_dir)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    rank, world = init_distributed(cfg.engine)
    main = rank == 0
    barrier = _barrier if world > 1 else None
    torch.manual_seed(cfg.seed)
    train_ds = data_lib.build_dataset(cfg.data, "train", image_size=cfg.image_size or None, seed=cfg.seed)
    info = train_ds.info
    objective = build_model(cfg, info)
    if world > 1 and cfg.model.global_bn:
        objective = convert_to_global_bn(objective)
    engine = build_engine(cfg, objective, world)
    accum = cfg.optim.grad_accum
    objective.on_train_start(steps_per_epoch=len(train_ds) // (cfg.batch_size * world) / accum)

    start = 0
    if resume:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise RunError(f"--resume: no checkpoint found under '{run_dir / 'checkpoints'}'")
        meta = read_meta(ckpt)
        if meta.get("engine", "plain") != cfg.engine:
            raise RunError(f"--resume: checkpoint '{ckpt}' was written by engine={meta.get('engine')}, "
                           f"this run uses engine={cfg.engine}")
        client = engine.load(ckpt)
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

    loader = data_lib.train_loader(train_ds, cfg.batch_size, view_augments(cfg, objective, info), seed=cfg.seed,
                                   rank=rank, world_size=world, start_step=start * accum,
                                   num_workers=cfg.num_workers)
    logger = MetricsLogger(run_dir, resume_step=start) if main else None
    skips = data_lib.SkipCounter()
    channels_last = uses_channels_last(cfg, info.channels)

    def checkpoint(step: int) -> Path:
        rngs = _gather_objects(rng_state(), world)
        # only rank 0's client state is written under DeepSpeed, so per-rank objective state is gathered
        extras = _gather_objects(objective.state_dict_extra() if hasattr(objective, "state_dict_extra") else {},
                                 world)
        client = {"rng": {str(r): s for r, s in enumerate(rngs)}, "objective_extra": extras[0],
                  "objective_extra_by_rank": {str(r): e for r, e in enumerate(extras)}}
        return save_checkpoint(run_dir, step, lambda d: engine.save(d, client),
                               {"config": to_dict(cfg), "world_size": world, "engine": cfg.engine,
                                "objective": cfg.objective}, keep_last=cfg.keep_last, rank=rank, barrier=barrier)

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.max_steps, initial=start, desc=f"{cfg.objective}", disable=not (cfg.progress and main),
               dynamic_ncols=True)
    engine.train()
    it = iter(loader)
    t0, seen = time.perf_counter(), 0
    end = min(cfg.max_steps, cfg.stop_at) if cfg.stop_at > 0 else cfg.max_steps
    last_ckpt = None
    warned = False  # an objective's warning about its metrics is printed once per run
    try:
        for step in range(start, end):
            for _ in range(accum):
                batch = next(it)
                skips.update(batch)
                drawn = 1
                while not batch["views"] or batch["views"][0].shape[0] < 2:  # (nearly) all files unreadable
                    if drawn >= 100:
                        raise RunError(f"step {step}: 100 batches in a row had fewer than 2 readable images "
                                       f"({skips.count} unreadable files so far); check the data")
                    batch = next(it)
                    skips.update(batch)
                    drawn += 1
                if channels_last:
                    batch["views"] = [v.contiguous(memory_format=torch.channels_last) for v in batch["views"]]
                out = engine(batch)
                loss = out["loss"]
                if not torch.isfinite(loss):
                    raise RunError(f"loss became {float(loss)} at step {step}; lower optim.lr "
                                   f"(now {cfg.optim.lr}) or use precision=fp32")
                engine.backward(loss)
                engine.step()
                seen += batch["views"][0].shape[0] * world
            objective.on_step_end(step, cfg.max_steps)
            done = step + 1
            bar.update(1)
            if done % cfg.log_every == 0 or done == end or done == start + 1:
                rec = _scalars(out, world)
                if main:
                    dt = time.perf_counter() - t0
                    rec = {"step": done, **rec, "lr": engine.lr, "images_per_s": seen / max(dt, 1e-9),
                           "skipped_files": skips.count}
                    logger.log(rec)
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.3g}")
                    msg = None if warned else objective.check_metrics(rec)
                    if msg:
                        warned = True
                        tqdm.write(f"warning: {msg}", file=sys.stderr)
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done != end:
                last_ckpt = checkpoint(done)
        last_ckpt = checkpoint(end)
    finally:
        bar.close()
        if logger is not None:
            logger.close()
    state = engine.full_state_dict(last_ckpt)
    if main:
        save_weights(run_dir / "weights.safetensors", state,
                     {"objective": cfg.objective, "backbone": cfg.model.backbone, "format": "ssl-pretrain/1",
                      "config": json.dumps(to_dict(cfg))})
        plot_metrics(run_dir, "loss")
        summary = {"steps": end, "max_steps": cfg.max_steps, "world_size": world, "engine": cfg.engine,
                   "skipped_files": skips.count, "skipped": sorted(skips.files),
                   "wall_s": round(time.perf_counter() - t0, 2)}
        (run_dir / "train_summary.json").write_text(json.dumps(summary, indent=1))
        if skips.count:
            print(f"skipped {skips.count} unreadable file(s); see {run_dir / 'train_summary.json'}")
    if barrier:
        barrier()
    return run_dir


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
