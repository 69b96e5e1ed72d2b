"""Fine-tuning and distillation: steps 2 and 3 of SimCLRv2, trained by :func:`pretrain.loop.fit`.

Chen et al. 2020, "Big Self-Supervised Models are Strong Semi-Supervised Learners" (SimCLRv2):

1. pretrain a big network without labels (``pretrain fit``, any objective);
2. **fine-tune** it on the few labelled images, not from the backbone output but from the first
   layer of the projection head (``Linear -> BN -> ReLU``), with a linear classifier on top
   (:func:`finetune`, ``pretrain finetune``: the ``supervised`` objective);
3. **distil** the fine-tuned network into a student (of the same size or smaller) on the
   *unlabelled* images, with the teacher's softened predictions as targets, optionally plus the
   labelled cross-entropy (:func:`distill`, ``pretrain distill``: the ``distill`` objective).

Both are objectives (:mod:`pretrain.objectives.supervised`, :mod:`pretrain.objectives.distill`)
trained by the one loop, so they run on every engine (plain, DeepSpeed ZeRO 0-2), resume exactly,
and log metrics.jsonl, TensorBoard and the progress bar like any run. This module keeps the
command's own configuration (:class:`FinetuneConfig`: recipe keys and overrides of ``pretrain
finetune`` / ``distill``), resolves it against the pretrained run or the teacher into a
:class:`~pretrain.config.RunConfig`, calls :func:`~pretrain.loop.fit`, and writes ``summary.json``.

A run directory holds ``config.yaml`` (the resolved RunConfig), ``metrics.jsonl`` (with
``test_acc``), ``checkpoints/step_N/`` (resumable with ``--resume``), ``weights.safetensors`` (the
evaluated classifier, EMA weights when the EMA is on; self-describing, see
:func:`load_classifier`) and ``summary.json`` (test accuracy, wall time, seeds, label counts).
Every file is written to a temporary name and renamed.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

import data as data_lib
from data import SubsetDataset, check_fraction, dataset_labels, labelled_subset
from data.common import write_text
from data.common.config import fill, load_values
from models import list_backbones

from .checkpoint import RunDirError
from .config import (CHOICES, ConfigError, DeepSpeedConfig, ModelConfig, OptimConfig, RunConfig, build_config,
                     load_config, model_config)
from .engines import autocast_context, to_channels_last
from .loop import effective_lr, fit, launcher_world_size, process_rank
from .objectives import objective_class
from .objectives.supervised import (WEIGHTS_FORMAT, Classifier, accuracy, classifier_from_arch, init_from_run,
                                    load_classifier, param_groups)
from .towers import factory_keywords

SUMMARY = "summary.json"
#: the objectives behind the two commands
OBJECTIVES = ("supervised", "distill")

__all__ = ["FinetuneConfig", "DistillConfig", "load_finetune_config", "check_config", "check_fraction",
           "config_dict", "run_config", "finetune", "distill", "resume", "resume_config", "teacher_labels",
           "evaluate", "labelled_subset", "SubsetDataset", "Classifier", "param_groups", "classifier_from_arch",
           "load_classifier", "init_from_run", "WEIGHTS_FORMAT", "SUMMARY"]


# ----------------------------------------------------------------------------------------------
# Configuration


@dataclass
class DistillConfig:
    """``pretrain distill``: the teacher and how its predictions are matched."""

    teacher: str = ""  # a fine-tuned run directory (pretrain finetune or pretrain distill)
    temperature: float = 1.0  # tau of softmax(logits / tau), for teacher and student
    alpha: float = 0.0  # weight of the labelled cross-entropy: (1 - alpha) * distill + alpha * CE


def _finetune_optim() -> OptimConfig:
    return OptimConfig(name="sgd", lr=0.05, scale_lr=False, weight_decay=0.0, warmup_steps=10)


@dataclass
class FinetuneConfig:
    """Everything ``pretrain finetune`` and ``pretrain distill`` read (recipe keys and overrides)."""

    run: str = ""  # pretrained run directory; "" or "none" = from scratch with model.*
    data: str = ""  # "" = the pretrained run's (teacher's) data; mnist5k from scratch
    image_size: int = 0  # 0 = the pretrained run's size, else the dataset's native size
    labels: float = 0.1  # fraction of each class's train images that keep their label
    label_seed: int = 0  # which images: same seed, same subset
    head_layers: int = 1  # projection-head layers kept under the classifier (SimCLRv2: 1; 0 = backbone)
    batch_size: int = 64  # labelled batch (capped at the number of labels); distill: unlabelled batch
    max_steps: int = 300
    seed: int = 0
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    crop_scale: tuple[float, float] = (0.5, 1.0)  # the light augmentation: random resized crop (+ flip)
    layer_decay: float = 1.0  # LLRD: lr * layer_decay ** (depth - layer_id); 1 = off
    ema_decay: float = 0.0  # EMA of the weights (evaluated and saved when > 0); 0 = off
    eval_every: int = 0  # test accuracy every N steps into metrics.jsonl; 0 = only at the end
    log_every: int = 10
    checkpoint_every: int = 0  # 0 = only at the end
    stop_at: int = 0  # stop after this step with a checkpoint (continue with --resume); 0 = run to max_steps
    keep_last: int = 1
    threads: int = 0
    num_workers: int = 0
    engine: str = "plain"  # plain | deepspeed (under the deepspeed launcher; see docs/engines.md)
    run_dir: str = ""  # "" = runs/<source>-ft<pct> (finetune) or runs/<teacher>-distill-<student>
    progress: bool = True
    model: ModelConfig = field(default_factory=ModelConfig)  # from scratch; else filled from the run
    student: ModelConfig = field(default_factory=ModelConfig)  # distill's student
    optim: OptimConfig = field(default_factory=_finetune_optim)
    distill: DistillConfig = field(default_factory=DistillConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    @property
    def from_scratch(self) -> bool:
        return self.run in ("", "none")


def load_finetune_config(recipe: str | Path | None = None, overrides: list[str] | None = None,
                         base: dict | None = None) -> FinetuneConfig:
    """Fill a :class:`FinetuneConfig` from ``base``, a YAML recipe and ``key=value`` overrides.

    Unknown keys and bad values raise :class:`~pretrain.config.ConfigError` naming them.
    """
    values = load_values(recipe, overrides, base)
    cfg = FinetuneConfig()
    fill(cfg, values, "", CHOICES)
    check_config(cfg)
    return cfg


def check_config(cfg: FinetuneConfig) -> None:
    """Value checks the dataclass types cannot express; raises ConfigError naming the key."""
    check_fraction(cfg.labels, "labels")
    if cfg.head_layers < 0:
        raise ConfigError(f"config key 'head_layers': expected an integer >= 0, got {cfg.head_layers}")
    if cfg.stop_at < 0:
        raise ConfigError(f"config key 'stop_at': expected an integer >= 0 (0 = off), got {cfg.stop_at}")
    for key in ("batch_size", "max_steps", "log_every"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"config key '{key}': expected an integer >= 1, got {getattr(cfg, key)}")
    if not 0.0 < cfg.layer_decay <= 1.0:
        raise ConfigError(f"config key 'layer_decay': expected a value in (0, 1], got {cfg.layer_decay}")
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise ConfigError(f"config key 'ema_decay': expected a value in [0, 1) (0 = off), got {cfg.ema_decay}")
    lo, hi = cfg.crop_scale
    if not 0.0 < lo <= hi <= 1.0:
        raise ConfigError(f"config key 'crop_scale': expected 0 < low <= high <= 1, got {list(cfg.crop_scale)}")
    if not cfg.distill.temperature > 0:
        raise ConfigError(f"config key 'distill.temperature': expected a value > 0, got {cfg.distill.temperature}")
    if not 0.0 <= cfg.distill.alpha <= 1.0:
        raise ConfigError(f"config key 'distill.alpha': expected a value in [0, 1], got {cfg.distill.alpha}")
    for section in ("model", "student"):
        name = getattr(cfg, section).backbone
        if name not in list_backbones():
            raise ConfigError(f"unknown {section} backbone '{name}'; valid backbones: {', '.join(list_backbones())}")


def _plain(x):
    """A (YAML/JSON-safe) copy of nested dicts, lists and tuples (tuples become lists)."""
    if isinstance(x, (tuple, list)):
        return [_plain(v) for v in x]
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return x


def config_dict(cfg) -> dict:
    """Plain (YAML/JSON-safe) dict of a config dataclass."""
    return _plain(dataclasses.asdict(cfg))


# ----------------------------------------------------------------------------------------------
# Evaluation of a classifier outside training


@torch.no_grad()
def evaluate(model, ds, size: int, precision: str = "fp32", channels_last: bool = False,
             progress: bool = False, desc: str = "test") -> float:
    """Top-1 accuracy of ``model`` (images -> logits) on ``ds``, in eval mode (resize only)."""
    from tqdm.auto import tqdm

    was = model.training
    model.eval()
    batches = tqdm(data_lib.eval_loader(ds, size, batch_size=256), desc=desc, disable=not progress, leave=False,
                   dynamic_ncols=True)
    if channels_last:
        batches = (to_channels_last(b) for b in batches)
    with autocast_context(precision):
        acc = accuracy([model], batches)[0]
    model.train(was)
    return acc


# ----------------------------------------------------------------------------------------------
# From the command's config to a run config, and the summary of a finished run


def _pct(f: float) -> str:
    return f"{100 * f:g}pct"


def run_config(cfg: FinetuneConfig, objective: str, model: ModelConfig, batch_size: int, section: dict) -> RunConfig:
    """The :class:`~pretrain.config.RunConfig` that trains ``objective`` for a resolved
    :class:`FinetuneConfig`: its run keys, ``model``, the light augmentation with ``crop_scale``,
    and the objective's section ``section``."""
    values = {
        "objective": objective, "data": cfg.data, "image_size": cfg.image_size, "batch_size": batch_size,
        "max_steps": cfg.max_steps, "seed": cfg.seed, "precision": cfg.precision, "engine": cfg.engine,
        "log_every": cfg.log_every, "checkpoint_every": cfg.checkpoint_every, "stop_at": cfg.stop_at,
        "keep_last": cfg.keep_last, "num_workers": cfg.num_workers, "threads": cfg.threads, "run_dir": cfg.run_dir,
        "progress": cfg.progress, "labels": cfg.labels, "label_seed": cfg.label_seed, "eval_every": cfg.eval_every,
        "model": config_dict(model), "optim": config_dict(cfg.optim), "deepspeed": config_dict(cfg.deepspeed),
        "aug": {"views": "light", "crop_scale": list(cfg.crop_scale)},
        objective: section,
    }
    return build_config(values)


def _fit(run_cfg: RunConfig, resume: bool, t_start: float) -> dict:
    """Train ``run_cfg`` with :func:`~pretrain.loop.fit`; on rank 0 write and return the summary of a
    finished run (a planned stop returns where it stopped)."""
    run_dir = fit(run_cfg, resume=resume)
    kind = objective_class(run_cfg.objective).kind
    if process_rank() != 0:
        return {"kind": kind, "rank": process_rank()}
    trained = json.loads((run_dir / "train_summary.json").read_text())
    if trained["steps"] < run_cfg.max_steps:  # a planned stop: the checkpoint is the output; --resume goes on
        return {"kind": kind, "stopped_at": trained["steps"], "max_steps": run_cfg.max_steps}
    summary = run_summary(run_cfg, run_dir, trained, t_start)
    write_text(run_dir / SUMMARY, json.dumps(summary, indent=1))
    return summary


def run_summary(run_cfg: RunConfig, run_dir: Path, trained: dict, t_start: float) -> dict:
    """``summary.json`` of a finished fine-tuning or distillation run: test accuracy of the evaluated
    and of the raw weights, data, seeds, labels per class, sizes, wall time and the recipe's numbers."""
    ocfg = run_cfg.objective_config
    kind = objective_class(run_cfg.objective).kind
    size = run_cfg.image_size or None
    train_ds = data_lib.build_dataset(run_cfg.data, "train", image_size=size)
    test_ds = data_lib.build_dataset(run_cfg.data, "test", image_size=size)
    y = dataset_labels(train_ds)
    idx = labelled_subset(y, run_cfg.labels, run_cfg.label_seed)
    classes, counts = np.unique(y[torch.as_tensor(idx)].numpy(), return_counts=True)
    model, meta = load_classifier(run_dir)
    arch = meta["arch"]
    summary = {
        "kind": kind, "test_acc": trained["test_acc"], "test_acc_raw_weights": trained["test_acc_raw_weights"],
        "evaluated": "ema" if ocfg.ema_decay > 0 else "raw",
        "data": run_cfg.data, "image_size": arch["image_size"], "seed": run_cfg.seed, "label_seed": run_cfg.label_seed,
        "labels_fraction": run_cfg.labels, "num_labels": int(len(idx)),
        "labels_per_class": {str(int(c)): int(n) for c, n in zip(classes, counts)},
        "num_train_images": len(train_ds), "num_test_images": len(test_ds),
        "steps": run_cfg.max_steps, "resumed_from_step": trained.get("start_step") or None,
        "train_wall_s": trained["train_wall_s"], "wall_s": round(time.time() - t_start, 2),
        "backbone": run_cfg.model.backbone, "params": sum(p.numel() for p in model.parameters()),
        "batch_size": run_cfg.batch_size, "lr": effective_lr(run_cfg, trained["world_size"]),
        "layer_decay": ocfg.layer_decay, "ema_decay": ocfg.ema_decay, "optimizer": run_cfg.optim.name,
        "precision": run_cfg.precision, "engine": run_cfg.engine, "world_size": trained["world_size"],
        "head_layers_used": int(arch["neck"].get("layers", 0)),
    }
    if run_cfg.objective == "distill":
        teacher, tmeta = load_classifier(ocfg.teacher)
        tsummary = Path(ocfg.teacher) / SUMMARY
        summary.update(source="distill", teacher=ocfg.teacher,
                       teacher_test_acc=json.loads(tsummary.read_text()).get("test_acc") if tsummary.is_file() else None,
                       teacher_params=sum(p.numel() for p in teacher.parameters()),
                       teacher_backbone=model_config(tmeta["arch"]["model"]).backbone,
                       temperature=ocfg.temperature, alpha=ocfg.alpha)
    elif ocfg.init:
        from .probe import read_run_config

        summary.update(source=ocfg.init, source_objective=read_run_config(ocfg.init).objective)
    else:
        summary.update(source="scratch")
    return summary


def _check_run_dir(run: str, flag: str) -> Path:
    path = Path(run)
    if not path.is_dir():
        raise RunDirError(f"{flag}: run directory '{run}' does not exist")
    if not (path / "config.yaml").is_file():
        raise RunDirError(f"{flag}: '{run}' is not a run directory (no config.yaml)")
    if not (path / "weights.safetensors").is_file():
        raise RunDirError(f"{flag}: '{run}' has no weights.safetensors; export it first with "
                          f"`pretrain export --run {run}`")
    return path


def _start(cfg: FinetuneConfig) -> float:
    t_start = time.time()
    check_config(cfg)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    return t_start


# ----------------------------------------------------------------------------------------------
# Entry points


def finetune(cfg: FinetuneConfig, resume: bool = False) -> dict:
    """Fine-tune a pretrained run (``cfg.run``) or train from scratch on a labelled subset: the
    ``supervised`` objective, trained by :func:`~pretrain.loop.fit`.

    Returns the summary written to ``RUN_DIR/summary.json`` (after a planned stop, where it stopped).
    """
    t_start = _start(cfg)
    if cfg.from_scratch:
        cfg.run = "none"
        cfg.data = cfg.data or "mnist5k"
        train_ds = data_lib.build_dataset(cfg.data, "train", image_size=cfg.image_size or None)
        cfg.image_size = cfg.image_size or train_ds.info.image_size
    else:
        run = _check_run_dir(cfg.run, "--run")
        from .probe import read_run_config

        pre = read_run_config(run)
        cfg.data = cfg.data or pre.data
        run_info = data_lib.build_dataset(pre.data, "test", image_size=pre.image_size or None).info
        run_size = pre.image_size or run_info.image_size
        cfg.image_size = cfg.image_size or run_size
        if cfg.image_size != run_size and "image_size" in (factory_keywords(pre.model.image.backbone) or ()):
            # backbones built for an image size (ViTs: position embeddings) fine-tune at that size
            raise ConfigError(f"image_size={cfg.image_size}: backbone '{pre.model.image.backbone}' fine-tunes at "
                              f"its pretraining size ({run_size})")
        train_ds = data_lib.build_dataset(cfg.data, "train", image_size=cfg.image_size)
        if run_info.channels != train_ds.info.channels:
            raise ConfigError(f"data={cfg.data} has {train_ds.info.channels} channel(s) but run '{cfg.run}' was "
                              f"pretrained on {pre.data} with {run_info.channels}")
        cfg.model = copy.deepcopy(pre.model)  # the resolved config names the architecture used
    if not cfg.run_dir:
        src = "scratch-" + cfg.model.backbone if cfg.from_scratch else Path(cfg.run).name
        cfg.run_dir = f"runs/{src}-ft{_pct(cfg.labels)}"
    num_labels = len(labelled_subset(dataset_labels(train_ds), cfg.labels, cfg.label_seed))
    # the labelled batch is capped at the labels
    batch = max(1, min(cfg.batch_size, num_labels // launcher_world_size(cfg.engine)))
    section = {"init": "" if cfg.from_scratch else str(cfg.run), "head_layers": cfg.head_layers,
               "num_classes": train_ds.info.num_classes, "layer_decay": cfg.layer_decay, "ema_decay": cfg.ema_decay}
    return _fit(run_config(cfg, "supervised", cfg.model, batch, section), resume, t_start)


def distill(cfg: FinetuneConfig, resume: bool = False) -> dict:
    """Distil the fine-tuned run ``cfg.distill.teacher`` into a student ``cfg.student`` trained from
    scratch on all (unlabelled) train images of the teacher's data: the ``distill`` objective,
    trained by :func:`~pretrain.loop.fit`.

    Returns the summary written to ``RUN_DIR/summary.json`` (after a planned stop, where it stopped).
    """
    t_start = _start(cfg)
    if not cfg.distill.teacher:
        raise ConfigError("distill: no teacher given (--teacher RUN_DIR or distill.teacher=RUN_DIR)")
    tdir = _check_run_dir(cfg.distill.teacher, "--teacher")
    _, tmeta = load_classifier(tdir)
    tarch = tmeta["arch"]
    tcfg = json.loads(tmeta.get("config", "{}"))
    cfg.data = cfg.data or tcfg.get("data", "")
    if tcfg.get("data") and cfg.data != tcfg["data"]:
        raise ConfigError(f"data={cfg.data}: the teacher was fine-tuned on {tcfg['data']}; distil on the same data")
    cfg.image_size = tarch["image_size"]
    train_ds = data_lib.build_dataset(cfg.data, "train", image_size=cfg.image_size)
    info = train_ds.info
    if info.num_classes != tarch["num_classes"]:
        raise ConfigError(f"data={cfg.data} has {info.num_classes} classes, the teacher {tarch['num_classes']}")
    cfg.model = copy.deepcopy(cfg.student)
    if not cfg.run_dir:
        cfg.run_dir = f"runs/{tdir.name}-distill-{cfg.student.backbone}"
    batch = max(1, min(cfg.batch_size, len(train_ds) // launcher_world_size(cfg.engine)))
    section = {"teacher": str(tdir), "temperature": cfg.distill.temperature, "alpha": cfg.distill.alpha,
               "num_classes": info.num_classes, "layer_decay": cfg.layer_decay, "ema_decay": cfg.ema_decay}
    return _fit(run_config(cfg, "distill", cfg.student, batch, section), resume, t_start)


# ----------------------------------------------------------------------------------------------
# Resumed runs, and the defaults distillation takes from its teacher


def resume_config(run: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """The run config of a stopped fine-tuning or distillation run (its ``config.yaml``) with
    ``overrides`` (run config keys, e.g. ``max_steps=600``) applied, to run on to ``max_steps``."""
    path = Path(run)
    if not (path / "config.yaml").is_file():
        raise RunDirError(f"--resume: '{run}' is not a run directory (no config.yaml)")
    cfg = load_config(path / "config.yaml", ["stop_at=0", *(overrides or []), f"run_dir={run}"])
    if cfg.objective not in OBJECTIVES:
        raise ConfigError(f"--resume: '{run}' is a {cfg.objective} run, not a fine-tuning or distillation run; "
                          f"continue it with `pretrain fit --resume {run}`")
    return cfg


def resume(run: str | Path, overrides: list[str] | None = None) -> dict:
    """Continue a stopped fine-tuning or distillation run to ``max_steps`` (exactly as an
    uninterrupted run); returns its summary."""
    cfg = resume_config(run, overrides)
    t_start = time.time()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    return _fit(cfg, True, t_start)


def teacher_labels(teacher: str | Path) -> dict:
    """``labels`` and ``label_seed`` of a fine-tuned teacher (the lowest-priority defaults of distill)."""
    path = Path(teacher) / "config.yaml"
    if not path.is_file():
        return {}
    tcfg = yaml.safe_load(path.read_text()) or {}
    return {k: tcfg[k] for k in ("labels", "label_seed") if isinstance(tcfg, dict) and k in tcfg}
