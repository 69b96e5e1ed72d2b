"""Typed run configuration: dataclasses filled from a YAML recipe plus ``key=value`` overrides.

The dataclasses are the source of truth. An unknown key anywhere is a :class:`ConfigError`
naming the key and the nearest valid ones. Each objective contributes its own nested
``Config`` dataclass under its name (``byol.proj_dim=256``).
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from data.common.config import ConfigError, fill, load_values, nearest

__all__ = ["ConfigError", "TowerConfig", "ModelConfig", "TokenizerConfig", "OptimConfig", "AugConfig", "ProbeConfig",
           "DeepSpeedConfig", "ParallelConfig", "RunConfig", "CHOICES", "build_config", "load_config", "model_config", "to_dict",
           "save_config"]


@dataclass
class TowerConfig:
    """One encoder of an objective (``model.image``, ``model.text``, ...), built through the backbone
    registry. Each field is passed to the backbone's factory when the factory takes a keyword of
    that name and the field is set (not 0 or ""); fields a backbone does not take are ignored, so
    one recipe switches between ResNets, ViTs and text transformers by ``backbone`` alone. Sizes
    that follow from the data (``in_chans``, ``image_size``, ``vocab_size``, ``context_length``)
    come from the data, not from here."""

    backbone: str = ""  # registry name (pretrain list); "" = this tower is not built
    stem: str = ""  # ResNets: cifar | imagenet
    norm: str = ""  # ResNets: bn | gn_ws
    width: int = 0  # ResNet base width (64 = standard); transformer width of text towers
    patch_size: int = 0  # ViTs
    depth: int = 0  # transformers: number of blocks (0 = the named size's)
    embed_dim: int = 0  # ViTs: token width (0 = the named size's)
    num_heads: int = 0  # ViTs
    heads: int = 0  # text transformers
    patch_dropout: float = 0.0  # ViTs: FLIP's patch dropout in training, the fraction of patch tokens dropped
    tubelet: int = 0  # video transformers (VATT): frames per video patch (0 = the backbone's own)
    init: str = ""  # a run directory of this project whose tower of this name starts this one ("" = random init)


def _image_tower() -> TowerConfig:
    return TowerConfig(backbone="resnet18", stem="cifar", norm="bn", width=64, patch_size=4)


@dataclass
class ModelConfig:
    """The towers an objective builds (each objective declares which: ``Objective.towers``), and
    how the model is laid out. ``model.backbone=...``, ``model.width=...`` (any tower field given
    directly under ``model``) are shorthand for the image tower: ``model.image.backbone=...``."""

    image: TowerConfig = field(default_factory=_image_tower)
    text: TowerConfig = field(default_factory=TowerConfig)
    audio: TowerConfig = field(default_factory=TowerConfig)
    video: TowerConfig = field(default_factory=TowerConfig)
    channels_last: bool = True
    global_bn: bool = True  # batch-norm statistics over all data-parallel ranks (SimCLR's global BN)

    # shorthand: model.<tower field> means model.image.<tower field>
    ALIASES: typing.ClassVar[dict] = {f: "image" for f in (
        "backbone", "stem", "norm", "width", "patch_size", "depth", "embed_dim", "num_heads", "heads")}

    def __getattr__(self, name):  # read access through the shorthand too: cfg.model.width
        if name in ModelConfig.ALIASES:
            return getattr(getattr(self, ModelConfig.ALIASES[name]), name)
        raise AttributeError(f"'ModelConfig' object has no attribute '{name}'")


@dataclass
class TokenizerConfig:
    """How captions become token ids for text towers (objectives whose batch holds text)."""

    name: str = "bytes"  # pretrain list shows the registered tokenizers
    context_length: int = 32


@dataclass
class ClipsConfig:
    """Audio-video-text clips (objectives whose batch holds clips: ``vatt``; data/clips.py). The
    frame side is ``image_size`` (0 = the source's own)."""

    frames: int = 8  # video frames per clip
    sample_rate: int = 8000  # audio resampled to this rate (Hz)
    audio_seconds: float = 1.0  # audio cropped or zero-padded to this length
    max_captions: int = 4  # captions a clip brings to a batch (MIL-NCE's positive set), at most
    per_item: int = 0  # clips made from each image or stamp (0 = the source's own: 1 per digit, 8 per stamp)


@dataclass
class CsvConfig:
    """Columns of ``data=csv:FILE`` image-text pairs (open_clip's ``--csv-img-key`` /
    ``--csv-caption-key`` / ``--csv-separator``)."""

    img_key: str = "filepath"
    caption_key: str = "title"
    separator: str = "\t"


@dataclass
class OptimConfig:
    name: str = "lars"  # sgd | adamw | lars | lamb
    lr: float = 1.0  # base LR, scaled by batch_size / 256 when scale_lr
    scale_lr: bool = True
    weight_decay: float = 1.5e-6
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 10
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 0.0  # max global grad norm, 0 = off
    grad_accum: int = 1
    lars_eta: float = 0.001


@dataclass
class AugConfig:
    views: str = ""  # byol | simclr | light (one view: crop and flips); empty = the objective's own recipe
    crop_scale: tuple[float, float] = (0.08, 1.0)  # of the (global) views
    jitter_strength: float = 1.0
    # multi-crop (SwAV): small local views after the 2 global ones, for objectives that use them
    local_views: int = -1  # -1 = the objective's default (0 for objectives without multi-crop)
    local_size: int = 0  # 0 = round(global size * 96 / 224)
    local_crop_scale: tuple[float, float] = (0.05, 0.14)


@dataclass
class ProbeConfig:
    probes: tuple[str, ...] = ("linear", "knn")
    epochs: int = 100
    knn_k: int = 20
    knn_temperature: float = 0.07
    baselines: bool = True  # also probe raw pixels and the random-init backbone


@dataclass
class DeepSpeedConfig:
    config: str = ""  # DeepSpeed JSON; empty = launch/ds_configs/zero{zero_stage}.json
    zero_stage: int = -1  # -1 = as the JSON says (0 when no JSON is given)


@dataclass
class ParallelConfig:
    """How the ranks of a ``deepspeed``-launched job share the model (:class:`pretrain.parallel.ParallelLayout`):
    ``dp = world / (tp * pp)`` data-parallel replicas, each cut into ``pp`` pipeline stages of
    ``tp`` tensor-parallel ranks. See docs/parallel.md for what each objective supports."""

    pp: int = 1  # pipeline stages (DeepSpeed PipelineModule, 1F1B over optim.grad_accum micro-batches)
    tp: int = 1  # tensor-parallel ranks (Megatron column/row-parallel attention and MLP of transformer blocks)
    partition: str = "parameters"  # pipeline stage boundaries: parameters (balance parameter counts) | uniform (layers)
    activation_checkpoint: int = 0  # pipeline: recompute activations in backward, every N layers; 0 = off


@dataclass
class RunConfig:
    objective: str = "byol"
    data: str = "mnist5k"
    image_size: int = 0  # 0 = the dataset's native size
    batch_size: int = 256  # per process (micro batch)
    max_steps: int = 1000
    seed: int = 0
    precision: str = "auto"  # auto (bf16 where its kernels are native, else fp32) | fp32 | bf16 (autocast)
    engine: str = "plain"  # plain | deepspeed
    log_every: int = 10
    checkpoint_every: int = 0  # 0 = only at the end
    stop_at: int = 0  # stop after this step with a checkpoint (a planned pre-emption); 0 = run to max_steps
    keep_last: int = 2
    num_workers: int = 0
    threads: int = 0  # torch intra-op threads, 0 = leave as is
    run_dir: str = "runs/default"
    progress: bool = True
    # the labels objectives that learn from labels see (Objective.labelled_only / labelled_stream): a
    # class-balanced subset of the train split, max(1, round(labels x n_class)) images per class
    labels: float = 1.0  # fraction of each class's train images that keep their label, in (0, 1]
    label_seed: int = 0  # which images: same seed, same subset
    # gradient caching (BASIC): each contrastive step's per-process batch in this many chunks, one
    # chunk's activations in memory at a time, the same gradient as one pass (pretrain.gradcache)
    grad_chunks: int = 1
    # objectives that evaluate: the data whose evaluation split they measure ("" = data's), e.g. a
    # source the model never trains on (data=tuxpaint+icons eval_data=mnist5k_captions)
    eval_data: str = ""
    # image-text pairs: hold this fraction of each source's train split out as split "val" (fixed,
    # whatever the seed); eval_split=val then evaluates there, to choose settings without the test split
    holdout: float = 0.0
    eval_split: str = ""  # "" = the objective's own (test) | val | test
    eval_every: int = 0  # objectives that evaluate (Objective.eval_split): every N steps; 0 = only at the end
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    csv: CsvConfig = field(default_factory=CsvConfig)
    clips: ClipsConfig = field(default_factory=ClipsConfig)
    # per-objective sections, filled from the objective registry (name -> Config instance)
    objectives: dict = field(default_factory=dict)

    @property
    def objective_config(self):
        return self.objectives[self.objective]


CHOICES = {
    "precision": ("auto", "fp32", "bf16"),
    "engine": ("plain", "deepspeed"),
    "deepspeed.zero_stage": (-1, 0, 1, 2, 3),
    "parallel.partition": ("parameters", "uniform"),
    "model.image.stem": ("", "cifar", "imagenet"),
    "model.image.norm": ("", "bn", "gn_ws"),
    "byol.head_norm": ("bn", "ln", "none"),
    "simclr.head_norm": ("bn", "ln", "none"),
    "optim.name": ("sgd", "adamw", "lars", "lamb"),
    "aug.views": ("", "byol", "simclr", "light"),
    "eval_split": ("", "test", "val"),
}


def model_config(values: dict | None) -> ModelConfig:
    """A :class:`ModelConfig` from a plain dict: the nested form ``to_dict`` writes, or the flat
    shorthand of older run directories (``{"backbone": ..., "width": ...}``)."""
    cfg = ModelConfig()
    fill(cfg, dict(values or {}), "model.", CHOICES)
    return cfg


def build_config(values: dict) -> RunConfig:
    """Fill a RunConfig from a nested dict, validating every key against the dataclasses."""
    from .objectives import list_objectives, objective_class, objective_config_class

    values = dict(values or {})
    cfg = RunConfig()
    objective_names = list_objectives()
    obj_sections = {k: values.pop(k) for k in list(values) if k in objective_names}
    fill(cfg, values, "", CHOICES)
    check_values(cfg)
    from .engines.base import resolve_precision

    cfg.precision = resolve_precision(cfg.precision)  # the run's config.yaml records what it ran in
    if cfg.objective in objective_names and cfg.grad_chunks > 1 \
            and not objective_class(cfg.objective).supports_grad_chunks:
        able = [n for n in objective_names if objective_class(n).supports_grad_chunks]
        raise ConfigError(f"config key 'grad_chunks': objective '{cfg.objective}' has no batch-coupled contrastive "
                          f"loss to cache gradients for; objectives that support it: {', '.join(able)}")
    if cfg.objective not in objective_names:
        # the pretraining objectives first, then those that train a classifier on labels or a teacher
        listed = sorted(objective_names, key=lambda n: not objective_class(n).pretraining)
        raise ConfigError(f"unknown objective '{cfg.objective}'{nearest(cfg.objective, objective_names)}; "
                          f"valid objectives: {', '.join(listed)}")
    for name in objective_names:
        ocfg = objective_config_class(name)()
        if name in obj_sections:
            fill(ocfg, obj_sections[name] or {}, name + ".", CHOICES)
        cfg.objectives[name] = ocfg
    return cfg


def check_values(cfg: RunConfig) -> None:
    """Value checks the dataclass types cannot express; raises ConfigError naming the key."""
    from data import check_fraction

    check_fraction(cfg.labels, "config key 'labels'")
    if not 1 <= cfg.grad_chunks <= max(cfg.batch_size, 1):
        raise ConfigError(f"config key 'grad_chunks': expected an integer from 1 (off) to batch_size "
                          f"({cfg.batch_size}), got {cfg.grad_chunks}")
    if not 0.0 <= cfg.holdout < 1.0:
        raise ConfigError(f"config key 'holdout': expected a fraction in [0, 1), got {cfg.holdout}")
    if cfg.eval_split == "val" and cfg.holdout <= 0:
        raise ConfigError("config key 'eval_split': 'val' needs a held-out part of the train split (holdout=0.1, say)")
    for key in ("pp", "tp"):
        if getattr(cfg.parallel, key) < 1:
            raise ConfigError(f"config key 'parallel.{key}': expected an integer >= 1, got {getattr(cfg.parallel, key)}")
    if cfg.parallel.pp * cfg.parallel.tp > 1 and cfg.engine != "deepspeed":
        raise ConfigError(f"config keys 'parallel.pp={cfg.parallel.pp}' / 'parallel.tp={cfg.parallel.tp}': model "
                          f"parallelism runs under engine=deepspeed (started by the deepspeed launcher)")
    if cfg.parallel.activation_checkpoint < 0:
        raise ConfigError(f"config key 'parallel.activation_checkpoint': expected an integer >= 0 (0 = off), "
                          f"got {cfg.parallel.activation_checkpoint}")
    if cfg.eval_every < 0:
        raise ConfigError(f"config key 'eval_every': expected an integer >= 0 (0 = off), got {cfg.eval_every}")
    if cfg.clips.per_item < 0:
        raise ConfigError(f"config key 'clips.per_item': expected an integer >= 0 (0 = the source's own), "
                          f"got {cfg.clips.per_item}")
    for key in ("frames", "sample_rate", "max_captions"):
        if getattr(cfg.clips, key) < 1:
            raise ConfigError(f"config key 'clips.{key}': expected an integer >= 1, got {getattr(cfg.clips, key)}")
    if cfg.clips.audio_seconds <= 0:
        raise ConfigError(f"config key 'clips.audio_seconds': expected a length > 0 in seconds, "
                          f"got {cfg.clips.audio_seconds}")


def load_config(recipe: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML recipe (optional), apply ``key=value`` overrides and validate everything."""
    return build_config(load_values(recipe, overrides))


def to_dict(cfg: RunConfig) -> dict:
    """Plain dict of the resolved config; only the active objective's section is kept."""
    d = dataclasses.asdict(cfg)
    objs = d.pop("objectives")
    d[cfg.objective] = objs.get(cfg.objective, {})

    def fix(x):
        if isinstance(x, tuple):
            return [fix(v) for v in x]
        if isinstance(x, dict):
            return {k: fix(v) for k, v in x.items()}
        return x

    return fix(d)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
