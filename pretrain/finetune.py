"""Fine-tuning and distillation: steps 2 and 3 of SimCLRv2.

Chen et al. 2020, "Big Self-Supervised Models are Strong Semi-Supervised Learners" (SimCLRv2):

1. pretrain a big network without labels (``pretrain fit``, any objective);
2. **fine-tune** it on the few labelled images, not from the backbone output but from the first
   layer of the projection head (``Linear -> BN -> ReLU``), with a linear classifier on top
   (:func:`finetune`, ``pretrain finetune``);
3. **distil** the fine-tuned network into a student (of the same size or smaller) on the
   *unlabelled* images, with the teacher's softened predictions as targets, optionally plus the
   labelled cross-entropy (:func:`distill`, ``pretrain distill``).

The same code fine-tunes any run of this project (any objective and backbone; where there is no
projection head, from the backbone) or trains the same classifier from scratch (the supervised
baseline), with any optimizer of :mod:`pretrain.optim`, a warmup-cosine schedule, layer-wise LR
decay (:func:`param_groups`, depths from :mod:`models.layer_ids`) and an EMA of the weights.

A run directory holds ``config.yaml``, ``metrics.jsonl``, ``checkpoints/step_N/`` (resumable with
``--resume``), ``weights.safetensors`` (the evaluated classifier, EMA weights when the EMA is on;
self-describing, see :func:`load_classifier`) and ``summary.json`` (test accuracy, wall time,
seeds, label counts). Every file is written to a temporary name and renamed.
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
import torch.nn.functional as F
import yaml
from torch import nn

import data as data_lib
from data.common import write_text
from data.common.config import fill, load_values
from losses import distillation_loss
from models import MLPHead, ModelEMA, layer_ids, list_backbones, num_layers

from .checkpoint import (RunDirError, latest_checkpoint, load_weights, read_meta, rng_state, save_checkpoint,
                         save_weights, set_rng_state)
from .config import CHOICES, ConfigError, ModelConfig, OptimConfig, model_config
from .engines import PlainEngine, autocast_context
from .loop import MetricsLogger, RunError, build_backbone
from .optim import build_optimizer
from .schedules import LRSchedule
from .towers import factory_keywords

WEIGHTS_FORMAT = "ssl-pretrain-classifier/1"
SUMMARY = "summary.json"


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
    run_dir: str = ""  # "" = runs/<source>-ft<pct> (finetune) or runs/<teacher>-distill-<student>
    progress: bool = True
    model: ModelConfig = field(default_factory=ModelConfig)  # from scratch; else filled from the run
    student: ModelConfig = field(default_factory=ModelConfig)  # distill's student
    optim: OptimConfig = field(default_factory=_finetune_optim)
    distill: DistillConfig = field(default_factory=DistillConfig)

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


def check_fraction(value, key: str = "labels") -> float:
    """``value`` as a label fraction in (0, 1], or a ConfigError naming ``key``."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        f = float("nan")
    if not 0.0 < f <= 1.0:
        raise ConfigError(f"{key}: expected a fraction of the train labels in (0, 1], e.g. 0.01, 0.1 or 1.0; "
                          f"got {value!r}")
    return f


def config_dict(cfg: FinetuneConfig) -> dict:
    """Plain (YAML/JSON-safe) dict of a config."""

    def fix(x):
        if isinstance(x, (tuple, list)):
            return [fix(v) for v in x]
        if isinstance(x, dict):
            return {k: fix(v) for k, v in x.items()}
        return x

    return fix(dataclasses.asdict(cfg))


# ----------------------------------------------------------------------------------------------
# The labelled subset


def labelled_subset(labels, fraction: float, seed: int = 0) -> np.ndarray:
    """Indices of a class-balanced labelled subset.

    Every class ``c`` with ``n_c`` images keeps ``max(1, round(fraction * n_c))`` of them, drawn
    with a generator seeded by ``seed`` alone (same labels, fraction and seed: same subset).

    Args:
        labels: ``[N]`` integer class labels (tensor, array or list).
        fraction: In (0, 1].
        seed: Subset seed.

    Returns:
        Sorted int64 indices into ``labels``.
    """
    fraction = check_fraction(fraction)
    y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).astype(np.int64)
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        n = min(len(idx), max(1, int(round(fraction * len(idx)))))
        keep.append(idx[rng.permutation(len(idx))[:n]])
    return np.sort(np.concatenate(keep)).astype(np.int64)


class SubsetDataset(torch.utils.data.Dataset):
    """The items ``indices`` of a dataset, keeping its ``info``."""

    def __init__(self, ds, indices):
        self.ds, self.indices, self.info = ds, [int(i) for i in indices], ds.info

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return self.ds[self.indices[i]]


def _dataset_labels(ds) -> torch.Tensor:
    if hasattr(ds, "labels"):
        return torch.as_tensor(ds.labels)
    return torch.tensor([ds[i]["label"] for i in range(len(ds))])


# ----------------------------------------------------------------------------------------------
# The classifier and its parameter groups


class Classifier(nn.Module):
    """Backbone, optional neck (the first projection-head layers) and a linear classifier.

    SimCLRv2 (Chen et al. 2020b, section 2) fine-tunes from the first layer of the 3-layer
    projection head: ``logits = head(neck(backbone.forward_pooled(x)))`` with
    ``neck = projector.truncate(1)`` (``Linear -> BN -> ReLU``).

    Args:
        backbone: Any backbone of :mod:`models` (``forward_pooled``, ``embed_dim``).
        neck: ``nn.Sequential`` of kept head layers (empty: fine-tune from the backbone).
        feat_dim: Output dimension of the neck (``backbone.embed_dim`` when empty).
        num_classes: Number of classes.

    Shapes:
        ``forward``: ``[B, C, H, W] -> [B, num_classes]``.
    """

    def __init__(self, backbone: nn.Module, neck: nn.Sequential, feat_dim: int, num_classes: int):
        super().__init__()
        self.backbone, self.neck = backbone, neck
        self.head = nn.Linear(feat_dim, num_classes)
        nn.init.zeros_(self.head.weight)  # SimCLRv2 starts the fine-tuned classifier at zero
        nn.init.zeros_(self.head.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W] -> [B, feat_dim]``: pooled backbone output through the neck."""
        return self.neck(self.backbone.forward_pooled(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @property
    def depth(self) -> int:
        """The head's layer id: ``num_layers(backbone) + len(neck)``."""
        return num_layers(self.backbone) + len(self.neck)

    def layer_ids(self) -> dict[str, int]:
        """``{parameter name: layer id}``: backbone ids from :func:`models.layer_ids`, neck layer ``j``
        at ``num_layers(backbone) + j``, the classifier at :attr:`depth`."""
        top = num_layers(self.backbone)
        ids = {f"backbone.{k}": v for k, v in layer_ids(self.backbone).items()}
        for name, _ in self.neck.named_parameters():
            ids[f"neck.{name}"] = top + int(name.split(".")[0])
        for name, _ in self.head.named_parameters():
            ids[f"head.{name}"] = self.depth
        return ids


def param_groups(model: Classifier, layer_decay: float = 1.0) -> list[dict]:
    """Optimizer groups with layer-wise LR decay.

    A parameter at layer id ``i`` gets ``lr_scale = layer_decay ** (model.depth - i)``, which
    :class:`~pretrain.schedules.LRSchedule` multiplies into its LR. Norm parameters, biases and
    ViT tokens / position embeddings get no weight decay and no LARS adaptation.

    Returns:
        One group per (layer id, decay or not), each with ``params``, ``name``, ``layer_id`` and
        ``lr_scale``.
    """
    ids = model.layer_ids()
    no_wd = {f"backbone.{n}" for n in getattr(model.backbone, "no_weight_decay", lambda: set())()}
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid = ids[name]
        plain = p.ndim <= 1 or name in no_wd
        g = groups.get((lid, plain))
        if g is None:
            g = {"params": [], "names": [], "name": f"layer{lid}_{'no_decay' if plain else 'decay'}", "layer_id": lid,
                 "lr_scale": float(layer_decay) ** (model.depth - lid)}
            if plain:
                g.update(weight_decay=0.0, lars_exclude=True)
            groups[(lid, plain)] = g
        g["params"].append(p)
        g["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def _arch(model_cfg: ModelConfig, in_chans: int, image_size: int, num_classes: int, neck: dict) -> dict:
    return {"model": dataclasses.asdict(model_cfg), "in_chans": in_chans, "image_size": image_size,
            "num_classes": num_classes, "neck": neck}


@dataclass
class _ModelOnly:
    """The one field of a run config that :func:`pretrain.loop.build_backbone` reads."""

    model: ModelConfig


def _backbone(model_cfg: ModelConfig, in_chans: int, image_size: int) -> nn.Module:
    return build_backbone(_ModelOnly(model_cfg), in_chans, image_size)


def _neck(spec: dict) -> tuple[nn.Sequential, int]:
    """Rebuild the kept head layers from ``{"layers", "in_dim", "hidden_dim", "norm"}``."""
    k = int(spec.get("layers", 0))
    if k == 0:
        return nn.Sequential(), int(spec["in_dim"])
    head = MLPHead(spec["in_dim"], spec["hidden_dim"], spec["hidden_dim"], num_layers=k + 1, norm=spec["norm"])
    return head.truncate(k), int(spec["hidden_dim"])


def classifier_from_arch(arch: dict) -> Classifier:
    """A freshly initialised :class:`Classifier` of the architecture recorded in a weights file."""
    m = model_config(arch["model"])  # the nested form, or the flat one of older weights files
    backbone = _backbone(m, arch["in_chans"], arch["image_size"])
    neck, dim = _neck({"in_dim": backbone.embed_dim, **arch["neck"]})
    return Classifier(backbone, neck, dim, arch["num_classes"])


def load_classifier(run_dir: str | Path) -> tuple[Classifier, dict]:
    """Load the classifier a ``pretrain finetune`` / ``distill`` run saved; returns it (eval mode) and
    the weights' metadata (``arch``, ``config``, ``kind``)."""
    run_dir = Path(run_dir)
    path = run_dir / "weights.safetensors"
    if not path.is_file():
        raise RunDirError(f"'{run_dir}' has no weights.safetensors (did the fine-tuning finish?)")
    state, meta = load_weights(path)
    if meta.get("format") != WEIGHTS_FORMAT:
        raise RunError(f"'{run_dir}' is not a fine-tuned run: its weights.safetensors has format "
                       f"{meta.get('format', 'unknown')!r}, expected {WEIGHTS_FORMAT!r} (run pretrain finetune first)")
    arch = json.loads(meta["arch"])
    model = classifier_from_arch(arch)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.endswith("num_batches_tracked")]:
        raise RunError(f"weights.safetensors in '{run_dir}' do not fit the recorded architecture: "
                       f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval(), {**meta, "arch": arch}


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


def init_from_run(run_dir: str | Path, head_layers: int, num_classes: int) -> tuple[Classifier, dict, object]:
    """A :class:`Classifier` on a pretrained run's backbone and first ``head_layers`` projection layers.

    The run's objective is rebuilt from its ``config.yaml`` and ``weights.safetensors``; its
    ``projector`` (an :class:`~models.MLPHead`) gives the neck. Runs whose objective has no such
    head, or a head of one layer, are fine-tuned from the backbone; ``head_layers`` is capped at
    the head's hidden layers.

    Returns:
        ``(classifier, neck spec, the run's RunConfig)``.
    """
    from .probe import load_run

    run_cfg, model = load_run(run_dir)
    backbone = model.backbone
    proj = getattr(model, "projector", None)
    k = min(head_layers, proj.num_layers - 1) if isinstance(proj, MLPHead) else 0
    if k > 0:
        neck = copy.deepcopy(proj.truncate(k))
        spec = {"layers": k, "hidden_dim": proj.hidden_dim, "norm": proj.norm}
        dim = proj.hidden_dim
    else:
        neck, spec, dim = nn.Sequential(), {"layers": 0}, backbone.embed_dim
    backbone = copy.deepcopy(backbone)
    return Classifier(backbone, neck, dim, num_classes), spec, run_cfg


# ----------------------------------------------------------------------------------------------
# Training tasks (what the engine calls) and evaluation


class SupervisedTask(nn.Module):
    """Cross-entropy of a classifier on the labelled view: ``batch["views"][0]``, ``batch["label"]``."""

    def __init__(self, model: Classifier):
        super().__init__()
        self.model = model

    def forward(self, batch: dict) -> dict:
        logits = self.model(batch["views"][0]).float()
        y = batch["label"]
        return {"loss": F.cross_entropy(logits, y), "train_acc": (logits.argmax(1) == y).float().mean()}


class DistillTask(nn.Module):
    """SimCLRv2's distillation: the student matches the frozen teacher's tempered predictions on
    unlabelled views (``batch["views"][0]``), plus ``alpha`` x cross-entropy on a labelled batch
    (``batch["labelled"]``) when ``alpha > 0``: ``(1 - alpha) * distill + alpha * CE``."""

    def __init__(self, student: Classifier, teacher: Classifier, temperature: float, alpha: float):
        super().__init__()
        self.model, self.teacher = student, teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.temperature, self.alpha = temperature, alpha

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher is a fixed target: BN running statistics, no dropout
        return self

    def forward(self, batch: dict) -> dict:
        x = batch["views"][0]
        with torch.no_grad():
            t = self.teacher(x).float()
        s = self.model(x).float()
        kd = distillation_loss(s, t, self.temperature)
        out = {"distill_loss": kd.detach(), "teacher_agreement": (s.argmax(1) == t.argmax(1)).float().mean()}
        loss = kd
        if self.alpha > 0:
            lab = batch["labelled"]
            ls = self.model(lab["views"][0]).float()
            ce = F.cross_entropy(ls, lab["label"])
            loss = (1 - self.alpha) * kd + self.alpha * ce
            out["ce_loss"] = ce.detach()
        out["loss"] = loss
        return out


@torch.no_grad()
def evaluate(model: nn.Module, ds, size: int, precision: str = "fp32", channels_last: bool = False,
             progress: bool = False, desc: str = "test") -> float:
    """Top-1 accuracy of ``model`` (images -> logits) on ``ds``, in eval mode (resize only)."""
    from tqdm.auto import tqdm

    was = model.training
    model.eval()
    correct = total = 0
    for batch in tqdm(data_lib.eval_loader(ds, size, batch_size=256), desc=desc, disable=not progress,
                      leave=False, dynamic_ncols=True):
        x = batch["image"]
        if x.numel() == 0:
            continue
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_context(precision):
            logits = model(x)
        correct += int((logits.float().argmax(1) == batch["label"]).sum())
        total += len(batch["label"])
    model.train(was)
    return correct / max(total, 1)


# ----------------------------------------------------------------------------------------------
# The shared training loop


def _light_augment(info, size: int, crop_scale) -> data_lib.ViewAugment:
    """Fine-tuning's augmentation: random resized crop (and flips where they keep the meaning)."""
    spec = data_lib.ViewSpec(size=size, crop_scale=tuple(crop_scale), flip_p=0.5 if info.flip else 0.0,
                             jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)
    return data_lib.ViewAugment(spec, info.mean, info.std)


def _pct(f: float) -> str:
    return f"{100 * f:g}pct"


def _ema_decay(cfg_decay: float, n: int) -> float:
    """EMA decay with a warm-up, ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so that short
    runs are not dominated by the initial weights."""
    return min(cfg_decay, (1 + n) / (10 + n))


class _Run:
    """What :func:`_train` needs to know about one fine-tuning or distillation run."""

    def __init__(self, kind, cfg, run_dir, task, model, train_ds, test_ds, labelled_idx, size, channels_last,
                 arch, extra):
        self.kind, self.cfg, self.run_dir, self.task, self.model = kind, cfg, run_dir, task, model
        self.train_ds, self.test_ds, self.labelled_idx = train_ds, test_ds, labelled_idx
        self.size, self.channels_last, self.arch, self.extra = size, channels_last, arch, extra


def _train(r: _Run, resume: bool, t_start: float) -> dict:
    cfg = r.cfg
    torch.manual_seed(cfg.seed)
    groups = param_groups(r.model, cfg.layer_decay)
    for g in groups:
        g.pop("names")
    o = cfg.optim
    lab_batch = min(cfg.batch_size, len(r.labelled_idx))
    unl_batch = min(cfg.batch_size, len(r.train_ds))
    batch = lab_batch if r.kind == "finetune" else unl_batch
    lr = o.lr * batch * o.grad_accum / 256 if o.scale_lr else o.lr  # optim.scale_lr: linear scaling rule
    optimizer = build_optimizer(groups, o.name, lr, o.weight_decay, o.momentum, o.betas, o.lars_eta)
    schedule = LRSchedule(optimizer, lr, cfg.max_steps, o.warmup_steps, o.min_lr_ratio)
    engine = PlainEngine(r.task, optimizer, schedule, cfg.precision, o.grad_accum, o.grad_clip)
    ema = ModelEMA(r.model, cfg.ema_decay) if cfg.ema_decay > 0 else None

    start = 0
    if resume:
        ckpt = latest_checkpoint(r.run_dir)
        if ckpt is None:
            raise RunError(f"--resume: no checkpoint found under '{r.run_dir / 'checkpoints'}'")
        client = engine.load(ckpt)
        if ema is not None and client.get("ema"):
            ema.load_state_dict(client["ema"])
        set_rng_state(client["rng"])
        start = int(read_meta(ckpt)["step"])
    r.run_dir.mkdir(parents=True, exist_ok=True)
    write_text(r.run_dir / "config.yaml", yaml.safe_dump(config_dict(cfg), sort_keys=False))

    augment = _light_augment(r.train_ds.info, r.size, cfg.crop_scale)
    labelled = SubsetDataset(r.train_ds, r.labelled_idx)
    accum = o.grad_accum
    lab_loader = None
    if r.kind == "finetune" or cfg.distill.alpha > 0:
        lab_loader = iter(data_lib.train_loader(labelled, lab_batch, [augment], seed=cfg.seed,
                                                start_step=start * accum))
    unl_loader = None
    if r.kind == "distill":
        unl_loader = iter(data_lib.train_loader(r.train_ds, unl_batch, [augment], seed=cfg.seed + 1,
                                                start_step=start * accum))

    def next_batch() -> dict:
        if r.kind == "finetune":
            b = next(lab_loader)
        else:
            b = next(unl_loader)
            if lab_loader is not None:
                b["labelled"] = next(lab_loader)
        if r.channels_last:
            b["views"] = [v.contiguous(memory_format=torch.channels_last) for v in b["views"]]
            if "labelled" in b:
                b["labelled"]["views"] = [v.contiguous(memory_format=torch.channels_last)
                                          for v in b["labelled"]["views"]]
        return b

    def eval_model():
        return ema.module if ema is not None else r.model

    def checkpoint(step: int) -> None:
        client = {"rng": rng_state(), "ema": ema.state_dict() if ema is not None else None}
        save_checkpoint(r.run_dir, step, lambda d: engine.save(d, client),
                        {"config": config_dict(cfg), "engine": "plain", "kind": r.kind}, keep_last=cfg.keep_last)

    from tqdm.auto import tqdm

    logger = MetricsLogger(r.run_dir, resume_step=start)
    bar = tqdm(total=cfg.max_steps, initial=start, desc=r.kind, disable=not cfg.progress, dynamic_ncols=True)
    engine.train()
    t0 = time.perf_counter()
    end = min(cfg.max_steps, cfg.stop_at) if cfg.stop_at > 0 else cfg.max_steps
    try:
        for step in range(start, end):
            for _ in range(accum):
                out = engine(next_batch())
                if not torch.isfinite(out["loss"]):
                    raise RunError(f"loss became {float(out['loss'])} at step {step}; lower optim.lr "
                                   f"(now {o.lr}) or use precision=fp32")
                engine.backward(out["loss"])
                engine.step()
            if ema is not None:
                ema.decay = _ema_decay(cfg.ema_decay, ema.num_updates)
                ema.update(r.model)
            done = step + 1
            bar.update(1)
            rec = None
            if done % cfg.log_every == 0 or done == cfg.max_steps or done == start + 1:
                rec = {"step": done, **{k: float(v.detach()) for k, v in out.items()}, "lr": engine.lr}
                bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.3g}")
            if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.max_steps:
                rec = rec or {"step": done}
                rec["test_acc"] = evaluate(eval_model(), r.test_ds, r.size, cfg.precision, r.channels_last)
                engine.train()
            if rec is not None:
                logger.log(rec)
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done != end:
                checkpoint(done)
        train_s = time.perf_counter() - t0
        checkpoint(end)
        if end < cfg.max_steps:  # a planned stop: the checkpoint is the output; --resume goes on
            return {"kind": r.kind, "stopped_at": end, "max_steps": cfg.max_steps}
        acc = evaluate(eval_model(), r.test_ds, r.size, cfg.precision, r.channels_last, cfg.progress)
        raw_acc = evaluate(r.model, r.test_ds, r.size, cfg.precision, r.channels_last) if ema is not None else acc
        logger.log({"step": cfg.max_steps, "test_acc": acc})
    finally:
        bar.close()
        logger.close()

    save_weights(r.run_dir / "weights.safetensors", eval_model().state_dict(),
                 {"format": WEIGHTS_FORMAT, "kind": r.kind, "arch": json.dumps(r.arch),
                  "config": json.dumps(config_dict(cfg)), "ema": str(ema is not None)})
    labels = _dataset_labels(r.train_ds)[torch.as_tensor(r.labelled_idx)]
    summary = {
        "kind": r.kind, "test_acc": acc, "test_acc_raw_weights": raw_acc, "evaluated": "ema" if ema else "raw",
        "data": cfg.data, "image_size": r.size, "seed": cfg.seed, "label_seed": cfg.label_seed,
        "labels_fraction": cfg.labels, "num_labels": int(len(r.labelled_idx)),
        "labels_per_class": {str(int(c)): int(n) for c, n in zip(*np.unique(labels.numpy(), return_counts=True))},
        "num_train_images": len(r.train_ds), "num_test_images": len(r.test_ds),
        "steps": cfg.max_steps, "resumed_from_step": start or None,
        "train_wall_s": round(train_s, 2), "wall_s": round(time.time() - t_start, 2),
        "backbone": cfg.model.backbone, "params": sum(p.numel() for p in r.model.parameters()),
        "batch_size": batch, "lr": lr, "layer_decay": cfg.layer_decay, "ema_decay": cfg.ema_decay, "optimizer": o.name, "precision": cfg.precision,
        **r.extra,
    }
    write_text(r.run_dir / SUMMARY, json.dumps(summary, indent=1))
    return summary


def _dataset_pair(spec: str, image_size: int):
    size = image_size or None
    return (data_lib.build_dataset(spec, "train", image_size=size),
            data_lib.build_dataset(spec, "test", image_size=size))


def _channels_last(model_cfg: ModelConfig, channels: int) -> bool:
    # the same rule as pretraining (pretrain.loop.uses_channels_last): never for 1-channel ResNets
    return model_cfg.channels_last and channels > 1


# ----------------------------------------------------------------------------------------------
# Entry points


def finetune(cfg: FinetuneConfig, resume: bool = False) -> dict:
    """Fine-tune a pretrained run (``cfg.run``) or train from scratch on a labelled subset.

    Returns the summary written to ``RUN_DIR/summary.json``.
    """
    t_start = time.time()
    check_config(cfg)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    extra: dict = {}
    if cfg.from_scratch:
        cfg.run = "none"
        cfg.data = cfg.data or "mnist5k"
        train_ds, test_ds = _dataset_pair(cfg.data, cfg.image_size)
        info = train_ds.info
        size = cfg.image_size or info.image_size
        backbone = _backbone(cfg.model, info.channels, size)
        model = Classifier(backbone, nn.Sequential(), backbone.embed_dim, info.num_classes)
        neck = {"layers": 0}
        extra.update(source="scratch", head_layers_used=0)
    else:
        run = _check_run_dir(cfg.run, "--run")
        from .probe import read_run_config

        run_cfg = read_run_config(run)
        cfg.data = cfg.data or run_cfg.data
        run_info = data_lib.build_dataset(run_cfg.data, "test", image_size=run_cfg.image_size or None).info
        run_size = run_cfg.image_size or run_info.image_size
        cfg.image_size = cfg.image_size or run_size
        if cfg.image_size != run_size and "image_size" in (factory_keywords(run_cfg.model.image.backbone) or ()):
            # backbones built for an image size (ViTs: position embeddings) fine-tune at that size
            raise ConfigError(f"image_size={cfg.image_size}: backbone '{run_cfg.model.image.backbone}' fine-tunes at "
                              f"its pretraining size ({run_size})")
        train_ds, test_ds = _dataset_pair(cfg.data, cfg.image_size)
        info = train_ds.info
        if run_info.channels != info.channels:
            raise ConfigError(f"data={cfg.data} has {info.channels} channel(s) but run '{cfg.run}' was pretrained "
                              f"on {run_cfg.data} with {run_info.channels}")
        model, neck, run_cfg = init_from_run(run, cfg.head_layers, info.num_classes)
        cfg.model = copy.deepcopy(run_cfg.model)  # the resolved config names the architecture used
        size = cfg.image_size
        extra.update(source=str(cfg.run), source_objective=run_cfg.objective, head_layers_used=neck["layers"])
    cfg.image_size = size
    if not cfg.run_dir:
        src = "scratch-" + cfg.model.backbone if cfg.from_scratch else Path(cfg.run).name
        cfg.run_dir = f"runs/{src}-ft{_pct(cfg.labels)}"
    cl = _channels_last(cfg.model, info.channels)
    if cl:
        model = model.to(memory_format=torch.channels_last)
    idx = labelled_subset(_dataset_labels(train_ds), cfg.labels, cfg.label_seed)
    neck_spec = dict(neck)
    arch = _arch(cfg.model, info.channels, size, info.num_classes, neck_spec)
    r = _Run("finetune", cfg, Path(cfg.run_dir), SupervisedTask(model), model, train_ds, test_ds, idx, size, cl,
             arch, extra)
    return _train(r, resume, t_start)


def distill(cfg: FinetuneConfig, resume: bool = False) -> dict:
    """Distil the fine-tuned run ``cfg.distill.teacher`` into a student ``cfg.student`` trained from
    scratch on all (unlabelled) train images of the teacher's data.

    Returns the summary written to ``RUN_DIR/summary.json``.
    """
    t_start = time.time()
    check_config(cfg)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    if not cfg.distill.teacher:
        raise ConfigError("distill: no teacher given (--teacher RUN_DIR or distill.teacher=RUN_DIR)")
    tdir = _check_run_dir(cfg.distill.teacher, "--teacher")
    teacher, tmeta = load_classifier(tdir)
    tarch = tmeta["arch"]
    tcfg = json.loads(tmeta.get("config", "{}"))
    cfg.data = cfg.data or tcfg.get("data", "")
    if tcfg.get("data") and cfg.data != tcfg["data"]:
        raise ConfigError(f"data={cfg.data}: the teacher was fine-tuned on {tcfg['data']}; distil on the same data")
    cfg.image_size = tarch["image_size"]
    train_ds, test_ds = _dataset_pair(cfg.data, cfg.image_size)
    info = train_ds.info
    size = cfg.image_size
    if info.num_classes != tarch["num_classes"]:
        raise ConfigError(f"data={cfg.data} has {info.num_classes} classes, the teacher {tarch['num_classes']}")
    cfg.model = copy.deepcopy(cfg.student)
    backbone = _backbone(cfg.student, info.channels, size)
    student = Classifier(backbone, nn.Sequential(), backbone.embed_dim, info.num_classes)
    cl = _channels_last(cfg.student, info.channels)
    if cl:
        student = student.to(memory_format=torch.channels_last)
        teacher = teacher.to(memory_format=torch.channels_last)
    if not cfg.run_dir:
        cfg.run_dir = f"runs/{tdir.name}-distill-{cfg.student.backbone}"
    idx = labelled_subset(_dataset_labels(train_ds), cfg.labels, cfg.label_seed)
    teacher_summary = {}
    if (tdir / SUMMARY).is_file():
        teacher_summary = json.loads((tdir / SUMMARY).read_text())
    extra = {"source": "distill", "teacher": str(tdir), "teacher_test_acc": teacher_summary.get("test_acc"),
             "teacher_params": sum(p.numel() for p in teacher.parameters()),
             "teacher_backbone": model_config(tarch["model"]).backbone, "temperature": cfg.distill.temperature,
             "alpha": cfg.distill.alpha, "head_layers_used": 0}
    arch = _arch(cfg.student, info.channels, size, info.num_classes, {"layers": 0})
    task = DistillTask(student, teacher, cfg.distill.temperature, cfg.distill.alpha)
    r = _Run("distill", cfg, Path(cfg.run_dir), task, student, train_ds, test_ds, idx, size, cl, arch, extra)
    return _train(r, resume, t_start)


# ----------------------------------------------------------------------------------------------
# Configs of resumed runs and of distillation


def resume_config(run: str | Path, overrides: list[str] | None = None) -> FinetuneConfig:
    """The config of a stopped fine-tuning or distillation run (its ``config.yaml``) with
    ``overrides`` applied, to run it on to ``max_steps`` with ``resume=True``."""
    path = Path(run)
    if not (path / "config.yaml").is_file():
        raise RunDirError(f"--resume: '{run}' is not a run directory (no config.yaml)")
    base = yaml.safe_load((path / "config.yaml").read_text()) or {}
    return load_finetune_config(None, ["stop_at=0", *(overrides or []), f"run_dir={run}"], base=base)


def teacher_labels(teacher: str | Path) -> dict:
    """``labels`` and ``label_seed`` of a fine-tuned teacher (the lowest-priority defaults of distill)."""
    path = Path(teacher) / "config.yaml"
    if not path.is_file():
        return {}
    tcfg = yaml.safe_load(path.read_text()) or {}
    return {k: tcfg[k] for k in ("labels", "label_seed") if isinstance(tcfg, dict) and k in tcfg}
