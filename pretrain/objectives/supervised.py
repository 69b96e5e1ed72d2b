"""Supervised training of a classifier on few labels: SimCLRv2's fine-tuning step as an objective.

Chen et al. 2020b ("Big Self-Supervised Models are Strong Semi-Supervised Learners", section 2)
fine-tune not from the backbone output but from the first layer of the 3-layer projection head:
``logits = head(neck(backbone.forward_pooled(x)))`` with ``neck = projector.truncate(1)``
(``Linear -> BN -> ReLU``) and a zero-initialised linear ``head``.

The objective *is* that classifier: its parameters are named ``backbone.*``, ``neck.*`` and
``head.*`` as in :class:`Classifier`, so ``weights.safetensors`` holds a classifier
(``ssl-pretrain-classifier/1``, its architecture in the ``arch`` metadata) that
:func:`load_classifier` rebuilds. ``supervised.init`` names a pretrained run (any objective of
this project; where it has no projection head, or ``head_layers=0``, the classifier sits on the
backbone); ``""`` trains from scratch. It trains with cross-entropy on one lightly augmented view
(``view_recipe = "light"``) of the class-balanced labelled subset of the train split (``labels``,
``label_seed``; ``labelled_only``), with layer-wise LR decay (:func:`param_groups`) and an optional
EMA of the weights (the weights evaluated and exported when on), and reports its test accuracy
(``eval_split = "test"``).
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models import MLPHead, ema_update_, frozen_copy, layer_ids, num_layers

from ..checkpoint import RunDirError, load_weights
from ..config import ConfigError, model_config
from ..towers import build_tower
from .base import Objective, PipelineSpec, PipelineUnsupportedError, register_objective

WEIGHTS_FORMAT = "ssl-pretrain-classifier/1"


# ----------------------------------------------------------------------------------------------
# The classifier, its layer ids and parameter groups


class ClassifierParts:
    """``logits = head(neck(backbone.forward_pooled(x)))`` and the layer ids of its parameters, for a
    module with ``backbone``, ``neck`` (``nn.Sequential`` of kept head layers) and ``head``."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W] -> [B, feat_dim]``: pooled backbone output through the neck."""
        return self.neck(self.backbone.forward_pooled(x))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W] -> [B, num_classes]``."""
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


def zero_head(feat_dim: int, num_classes: int) -> nn.Linear:
    """The classifier layer, started at zero as in SimCLRv2."""
    head = nn.Linear(feat_dim, num_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


class Classifier(ClassifierParts, nn.Module):
    """Backbone, optional neck (the first projection-head layers) and a linear classifier.

    Args:
        backbone: Any backbone of :mod:`models` (``forward_pooled``, ``embed_dim``).
        neck: ``nn.Sequential`` of kept head layers (empty: fine-tune from the backbone).
        feat_dim: Output dimension of the neck (``backbone.embed_dim`` when empty).
        num_classes: Number of classes.
        head: An existing classifier layer to use instead of a new zero one.

    Shapes:
        ``forward``: ``[B, C, H, W] -> [B, num_classes]``.
    """

    def __init__(self, backbone: nn.Module, neck: nn.Sequential, feat_dim: int, num_classes: int,
                 head: nn.Linear | None = None):
        super().__init__()
        self.backbone, self.neck = backbone, neck
        self.head = head if head is not None else zero_head(feat_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x)


def param_groups(model, layer_decay: float = 1.0) -> list[dict]:
    """Optimizer groups with layer-wise LR decay, for a :class:`Classifier` or a classifier objective.

    A parameter at layer id ``i`` gets ``lr_scale = layer_decay ** (model.depth - i)``, which
    :class:`~pretrain.schedules.LRSchedule` multiplies into its LR. Norm parameters, biases and
    ViT tokens / position embeddings get no weight decay and no LARS adaptation. Frozen parameters
    (an EMA copy, a teacher) are left out.

    Returns:
        One group per (layer id, decay or not), each with ``params``, ``names``, ``name``,
        ``layer_id`` and ``lr_scale``.
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


@torch.no_grad()
def accuracy(nets, batches) -> list[float]:
    """Top-1 accuracy of each of ``nets`` (images -> logits) over ``batches`` (``{"image", "label"}``),
    in one pass over the batches; empty batches (unreadable files) are skipped."""
    correct, total = [0] * len(nets), 0
    for batch in batches:
        x, y = batch["image"], batch["label"]
        if x.numel() == 0:
            continue
        for i, net in enumerate(nets):
            correct[i] += int((net(x).float().argmax(1) == y).sum())
        total += len(y)
    return [c / max(total, 1) for c in correct]


# ----------------------------------------------------------------------------------------------
# Classifiers on disk and pretrained starting points


def neck_from_spec(spec: dict) -> tuple[nn.Sequential, int]:
    """Rebuild the kept head layers from ``{"layers", "in_dim", "hidden_dim", "norm"}``; returns the
    neck and its output dimension."""
    k = int(spec.get("layers", 0))
    if k == 0:
        return nn.Sequential(), int(spec["in_dim"])
    head = MLPHead(spec["in_dim"], spec["hidden_dim"], spec["hidden_dim"], num_layers=k + 1, norm=spec["norm"])
    return head.truncate(k), int(spec["hidden_dim"])


def classifier_from_arch(arch: dict) -> Classifier:
    """A freshly initialised :class:`Classifier` of the architecture recorded in a weights file."""
    m = model_config(arch["model"])  # the nested form, or the flat one of older weights files
    backbone = build_tower(m, "image", in_chans=arch["in_chans"], image_size=arch["image_size"])
    neck, dim = neck_from_spec({"in_dim": backbone.embed_dim, **arch["neck"]})
    return Classifier(backbone, neck, dim, arch["num_classes"])


def load_classifier(run_dir: str | Path) -> tuple[Classifier, dict]:
    """Load the classifier a ``supervised`` or ``distill`` run (``pretrain finetune`` / ``distill``)
    saved; returns it (eval mode) and the weights' metadata (``arch``, ``config``, ``kind``, ``ema``)."""
    from ..loop import RunError  # the loop imports the objectives

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


def pretrained_parts(run_dir: str | Path, head_layers: int):
    """A pretrained run's backbone and its first ``head_layers`` projection layers (copies).

    The run's objective is rebuilt from its ``config.yaml`` and ``weights.safetensors``; its
    ``projector`` (an :class:`~models.MLPHead`) gives the neck. Runs whose objective has no such
    head, or a head of one layer, give an empty neck; ``head_layers`` is capped at the head's
    hidden layers.

    Returns:
        ``(backbone, neck, neck spec, feature dimension, the run's RunConfig)``.
    """
    from ..probe import load_run  # the probe module imports the loop, which imports the objectives

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
    return copy.deepcopy(backbone), neck, spec, dim, run_cfg


def init_from_run(run_dir: str | Path, head_layers: int, num_classes: int) -> tuple[Classifier, dict, object]:
    """A :class:`Classifier` on a pretrained run's backbone and first ``head_layers`` projection layers
    (see :func:`pretrained_parts`). Returns ``(classifier, neck spec, the run's RunConfig)``."""
    backbone, neck, spec, dim, run_cfg = pretrained_parts(run_dir, head_layers)
    return Classifier(backbone, neck, dim, num_classes), spec, run_cfg


# ----------------------------------------------------------------------------------------------
# The objectives


def check_classifier_options(section: str, layer_decay: float, ema_decay: float, num_classes: int) -> None:
    if not 0.0 < layer_decay <= 1.0:
        raise ConfigError(f"config key '{section}.layer_decay': expected a value in (0, 1], got {layer_decay}")
    if not 0.0 <= ema_decay < 1.0:
        raise ConfigError(f"config key '{section}.ema_decay': expected a value in [0, 1) (0 = off), got {ema_decay}")
    if num_classes < 1:
        raise ConfigError(f"config key '{section}.num_classes': expected an integer >= 1 (0 = the data's, filled in "
                          f"by the training loop), got {num_classes}")


class ClassifierObjective(ClassifierParts, Objective):
    """What the objectives that train a :class:`Classifier` share: the classifier's parameters
    (``backbone``, ``neck``, ``head``), layer-wise LR decay, an EMA of the weights (``ema``, a frozen
    :class:`Classifier`, updated after every step with decay ``min(ema_decay, (1 + n) / (10 + n))``
    after ``n`` updates), test accuracy, and the classifier weights format on export.

    A subclass calls :meth:`build_classifier` in its constructor and implements ``forward``.
    """

    pretraining = False
    view_recipe = "light"
    num_views = 1
    eval_split = "test"
    kind = "classifier"  # the ``kind`` of the exported weights
    # the EMA copy is a teacher-like frozen module: an engine that partitions parameters (ZeRO-3)
    # replaces ema_update_fn with an update of the local shards
    has_ema_teacher = True
    ema_update_fn = staticmethod(ema_update_)

    def build_classifier(self, neck: nn.Sequential, neck_spec: dict, feat_dim: int, num_classes: int,
                         layer_decay: float, ema_decay: float) -> None:
        self.neck, self.head = neck, zero_head(feat_dim, num_classes)
        self.neck_spec, self.num_classes = dict(neck_spec), num_classes
        self.layer_decay, self.ema_decay = layer_decay, ema_decay
        self.ema = None
        if ema_decay > 0:
            self.ema = frozen_copy(Classifier(self.backbone, self.neck, feat_dim, num_classes, head=self.head)).eval()
        self.ema_updates = 0

    @classmethod
    def resolve_config(cls, cfg, info):
        """``num_classes=0`` becomes the data's number of classes."""
        return replace(cfg, num_classes=cfg.num_classes or info.num_classes)

    def frozen_modules(self) -> list[nn.Module]:
        """Modules that never train and stay in eval mode (the EMA copy, a teacher)."""
        return [self.ema] if self.ema is not None else []

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.frozen_modules():
            m.eval()  # fixed weights: BN running statistics, no dropout
        return self

    def trainable_modules(self) -> list[nn.Module]:
        return [self.backbone, self.neck, self.head]

    def param_groups(self) -> list[dict]:
        """One group per (layer id, decay or not), LRs scaled by ``layer_decay ** (depth - id)``."""
        groups = param_groups(self, self.layer_decay)
        for g in groups:
            g.pop("names")
        return groups

    @torch.no_grad()
    def on_step_end(self, step: int, max_steps: int) -> None:
        if self.ema is None:
            return
        n = self.ema_updates
        decay = min(self.ema_decay, (1 + n) / (10 + n))  # warm-up: short runs do not keep the initial weights
        for target, online in ((self.ema.backbone, self.backbone), (self.ema.neck, self.neck),
                               (self.ema.head, self.head)):
            self.ema_update_fn(target, online, decay)
        self.ema_updates = n + 1

    def state_dict_extra(self) -> dict:
        return {"ema_updates": self.ema_updates}

    def load_state_dict_extra(self, d: dict) -> None:
        self.ema_updates = int(d.get("ema_updates", self.ema_updates))

    def evaluated(self):
        """images -> logits of the weights that are evaluated and exported: the EMA's when on."""
        return self.ema if self.ema is not None else self.logits

    @torch.no_grad()
    def evaluate(self, loader, final: bool = False) -> dict[str, float]:
        """Top-1 accuracy (``acc``) of the evaluated weights; at the end also ``acc_raw_weights``, the
        trained weights' (the same number when there is no EMA)."""
        was = self.training
        self.eval()
        nets = [self.evaluated()] + ([self.logits] if final and self.ema is not None else [])
        acc = accuracy(nets, loader)
        self.train(was)
        out = {"acc": acc[0]}
        if final:
            out["acc_raw_weights"] = acc[-1]
        return out

    def export_state(self, state: dict, run: dict):
        """The evaluated classifier (EMA weights when on) in the classifier format, once the run has
        reached ``max_steps`` (a planned stop exports nothing: its checkpoint is the output)."""
        if not run["final"]:
            return None
        prefix = "ema." if self.ema is not None else ""
        parts = ("backbone.", "neck.", "head.")
        tensors = {k[len(prefix):]: v for k, v in state.items()
                   if k.startswith(prefix) and k[len(prefix):].startswith(parts)}
        image = run["towers"]["image"]
        arch = {"model": run["config"]["model"], "in_chans": image["in_chans"], "image_size": image["image_size"],
                "num_classes": self.num_classes, "neck": self.neck_spec}
        return tensors, {"format": WEIGHTS_FORMAT, "kind": self.kind, "arch": json.dumps(arch),
                         "ema": str(self.ema is not None)}


@dataclass
class SupervisedConfig:
    init: str = ""  # pretrained run directory whose backbone (and projection layers) start the classifier; "" = scratch
    head_layers: int = 1  # projection-head layers kept under the classifier (SimCLRv2: 1; 0 = the backbone)
    num_classes: int = 0  # 0 = the data's
    layer_decay: float = 1.0  # LLRD: lr * layer_decay ** (depth - layer_id); 1 = off
    ema_decay: float = 0.0  # EMA of the weights (evaluated and exported when > 0); 0 = off


@register_objective("supervised", SupervisedConfig)
class Supervised(ClassifierObjective):
    """Cross-entropy of the classifier on one light view of each labelled image."""

    labelled_only = True
    kind = "finetune"

    def __init__(self, towers, cfg: SupervisedConfig):
        super().__init__(towers)
        self.cfg = cfg
        check_classifier_options("supervised", cfg.layer_decay, cfg.ema_decay, cfg.num_classes)
        if cfg.head_layers < 0:
            raise ConfigError(f"config key 'supervised.head_layers': expected an integer >= 0, got {cfg.head_layers}")
        neck, spec, dim = nn.Sequential(), {"layers": 0}, self.backbone.embed_dim
        if cfg.init:
            backbone, neck, spec, dim, _ = pretrained_parts(cfg.init, cfg.head_layers)
            try:
                self.backbone.load_state_dict(backbone.state_dict())
            except RuntimeError as exc:
                raise ConfigError(f"supervised.init={cfg.init}: the pretrained image tower does not fit model.image "
                                  f"of this run (give the pretrained run's model.* settings): "
                                  f"{str(exc).splitlines()[0]}") from None
        self.build_classifier(neck, spec, dim, cfg.num_classes, cfg.layer_decay, cfg.ema_decay)

    pipeline_refusal = None

    def forward(self, batch: dict) -> dict:
        return _cross_entropy(self.logits(batch["views"][0]), batch["label"])

    def pipeline_spec(self) -> PipelineSpec:
        """``backbone.pipeline_layers()`` then the neck and head as one last layer; the cross-entropy
        on the last stage. Not with ``ema_decay`` (the EMA copy would have to be cut alike) nor with
        FLIP's patch dropout (the ViT's first pipeline layer keeps every patch)."""
        if self.ema is not None:
            raise PipelineUnsupportedError("objective 'supervised' with supervised.ema_decay > 0 cannot run as "
                                           "pipeline stages (the EMA copy is not cut into stages); set "
                                           "supervised.ema_decay=0")
        if getattr(self.backbone, "patch_dropout", 0.0) > 0:
            raise PipelineUnsupportedError("model.image.patch_dropout > 0 cannot run as pipeline stages (the "
                                           "first stage embeds every patch); set it to 0")
        return PipelineSpec(layers=[*self.backbone.pipeline_layers(), ClassifierTop(self.neck, self.head)],
                            inputs=lambda b: b["views"][0], labels=lambda b: b["label"], loss=_cross_entropy,
                            metrics=("train_acc",))


class ClassifierTop(nn.Module):
    """The last pipeline layer of a classifier: ``head(neck(pooled))`` (the modules shared, not copied)."""

    def __init__(self, neck: nn.Module, head: nn.Module):
        super().__init__()
        self.neck, self.head = neck, head

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.head(self.neck(pooled))


def _cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> dict:
    logits = logits.float()
    return {"loss": F.cross_entropy(logits, y), "train_acc": (logits.argmax(1) == y).float().mean()}
