"""Distillation into a student classifier: SimCLRv2's third step as an objective.

Chen et al. 2020b, eq. 2: a student trained from scratch on unlabelled images minimises
``-sum_y p_T(y|x; tau) log p_S(y|x; tau)`` against a fixed, fine-tuned teacher
(:func:`losses.distillation_loss`), optionally plus ``alpha`` x cross-entropy on the labelled
subset: ``(1 - alpha) x distill + alpha x CE``. The teacher is the classifier a ``supervised`` or
``distill`` run exported (``distill.teacher``, read with :func:`load_classifier`). With
``alpha > 0`` the objective asks for a labelled stream (``batch["labelled"]``) beside its
unlabelled views of every train image.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from losses import distillation_loss

from ..config import ConfigError
from .base import register_objective
from .supervised import ClassifierObjective, check_classifier_options, load_classifier


@dataclass
class DistillConfig:
    teacher: str = ""  # a fine-tuned run directory (pretrain finetune or pretrain distill)
    temperature: float = 1.0  # tau of softmax(logits / tau), for teacher and student
    alpha: float = 0.0  # weight of the labelled cross-entropy: (1 - alpha) * distill + alpha * CE
    num_classes: int = 0  # 0 = the data's; must be the teacher's
    layer_decay: float = 1.0  # the student's LLRD; 1 = off
    ema_decay: float = 0.0  # EMA of the student's weights (evaluated and exported when > 0); 0 = off


@register_objective("distill", DistillConfig)
class Distill(ClassifierObjective):
    """The student (the image tower and a linear classifier) matches the frozen teacher's tempered
    predictions on unlabelled views (``batch["views"][0]``), plus ``alpha`` x cross-entropy on
    ``batch["labelled"]`` when ``alpha > 0``.

    Args:
        towers: the student's image tower.
        cfg: :class:`DistillConfig`.
        teacher: a classifier module (images -> logits) to use instead of loading ``cfg.teacher``.
    """

    # why it cannot run as pipeline stages (parallel.pp > 1); docs/parallel.md
    pipeline_refusal = ("the frozen teacher classifier runs beside the student on every image (not cut yet: use ZeRO, or tp "
                        "with a ViT)")

    kind = "distill"
    # the unlabelled stream draws with seed + 1, the labelled one (alpha > 0) with seed
    stream_seed_offset = 1

    @classmethod
    def fixed_modules(cls, cfg: DistillConfig) -> dict:
        """The teacher, loaded from ``distill.teacher`` before the student is initialised."""
        if not cfg.teacher:
            raise ConfigError("distill: no teacher given (distill.teacher=RUN_DIR, a fine-tuned run)")
        return {"teacher": load_classifier(cfg.teacher)[0]}

    def __init__(self, towers, cfg: DistillConfig, teacher: nn.Module | None = None):
        super().__init__(towers)
        self.cfg = cfg
        if not cfg.temperature > 0:
            raise ConfigError(f"config key 'distill.temperature': expected a value > 0, got {cfg.temperature}")
        if not 0.0 <= cfg.alpha <= 1.0:
            raise ConfigError(f"config key 'distill.alpha': expected a value in [0, 1], got {cfg.alpha}")
        if teacher is None:
            teacher = self.fixed_modules(cfg)["teacher"]
        teacher_classes = int(teacher.head.out_features)
        num_classes = cfg.num_classes or teacher_classes
        if num_classes != teacher_classes:
            raise ConfigError(f"distill: the data has {num_classes} classes, the teacher {teacher_classes}")
        check_classifier_options("distill", cfg.layer_decay, cfg.ema_decay, num_classes)
        self.build_classifier(nn.Sequential(), {"layers": 0}, self.backbone.embed_dim, num_classes, cfg.layer_decay,
                              cfg.ema_decay)
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.teacher = teacher.eval()
        self.temperature, self.alpha = cfg.temperature, cfg.alpha
        self.labelled_stream = cfg.alpha > 0

    def frozen_modules(self) -> list[nn.Module]:
        return [*super().frozen_modules(), self.teacher]

    def forward(self, batch: dict) -> dict:
        x = batch["views"][0]
        with torch.no_grad():
            t = self.teacher(x).float()
        s = self.logits(x).float()
        kd = distillation_loss(s, t, self.temperature)
        out = {"distill_loss": kd.detach(), "teacher_agreement": (s.argmax(1) == t.argmax(1)).float().mean()}
        loss = kd
        if self.alpha > 0:
            lab = batch["labelled"]
            ce = F.cross_entropy(self.logits(lab["views"][0]).float(), lab["label"])
            loss = (1 - self.alpha) * kd + self.alpha * ce
            out["ce_loss"] = ce.detach()
        out["loss"] = loss
        return out
