"""data2vec 2.0 for images (Baevski et al., "Efficient Self-supervised Learning with Contextualized
Target Representations for Vision, Speech and Language", ICML 2023).

An EMA teacher (a frozen copy of the student ViT) encodes each unmasked image once. Its targets are
the feed-forward outputs of the top ``top_k`` blocks (the MLP's output before the residual add), each
instance-normalised over the patch tokens, averaged over the layers and layer-normalised. The student
encodes only the visible patches of ``clones`` differently masked copies of each image (inverse
block masks, :class:`data.MaskGenerator`); a light convolutional decoder puts the visible tokens back
on the patch grid, fills the masked cells, and regresses the targets of the masked patches. The
student's class token regresses the mean of the image's targets.

Everything here is one objective on the project's ViT: the targets are read with forward hooks on the
teacher's ``blocks[i].mlp`` (the model is not edited), the teacher is averaged through
``ema_update_fn`` (replaced by the DeepSpeed engine under ZeRO-3 by an update of the local shards),
and masks depend only on ``(mask_seed, step, global sample index, clone)``, so N ranks train as one
process with the global batch. See docs/mim.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data import MaskError, MaskGenerator
from losses import rank as dp_rank
from models import ema_update_, frozen_copy
from models.vit import ViTEmbed

from ..config import ConfigError
from .base import Objective, PipelineSpec, PipelineUnsupportedError, register_objective
from .byol import cosine_momentum
from .vqkd import check_vit, mim_param_groups

LOSSES = ("mse", "smooth_l1")
MASK_FILLS = ("noise", "learned", "zeros")
EMA_SCHEDULES = ("linear", "cosine")


@dataclass
class Data2Vec2Config:
    # multi-masking: each image is encoded by the student this many times under different masks
    # (the reference's clone_batch: 16 for images)
    clones: int = 16
    # inverse block masks (data.MaskGenerator kind "inverse_block"): the fraction masked, the side of
    # a kept block in patches and the extra kept fraction that offsets overlapping blocks
    mask_ratio: float = 0.8
    mask_block_width: int = 3
    mask_adjust: float = 0.07
    mask_seed: int = 0  # masks depend on (mask_seed, step, global sample index, clone) only
    # targets: the teacher's FFN outputs of the top_k blocks (0 = all blocks; the reference's ViT-B
    # averages the top 10 of its 12 blocks, ViT-L 18 of 24)
    top_k: int = 0
    # decoder: decoder_depth x (grouped conv k x k, LayerNorm without affine, GELU, residual), then a
    # linear projection to the target width (0 = the ViT's width, as the reference's 768 for ViT-B)
    decoder_dim: int = 0
    decoder_depth: int = 6
    decoder_kernel: int = 3
    decoder_groups: int = 16
    # what the decoder sees at masked cells: noise (the reference: fresh N(0, mask_noise_std^2)
    # values), learned (the ViT's own mask_token, which drop mode leaves unused) or zeros
    mask_fill: str = "noise"
    mask_noise_std: float = 0.01
    # per-element loss: mse (the reference for images) or smooth_l1 with loss_beta; summed over the
    # target channels, times loss_scale (0 = 1 / sqrt(channels)), averaged over masked tokens
    loss: str = "mse"
    loss_beta: float = 1.0
    loss_scale: float = 0.0
    # weight of the class-token loss (student class token vs the mean of the image's targets),
    # averaged over the clones. The reference's cls_loss=0.01 multiplies a sum over the rank's
    # B x clones sequences: 0.01 x 16 images x 16 clones = 2.56 times a mean at its batch
    cls_weight: float = 2.56
    # teacher momentum: ema_start at step 0 to ema_end at ema_anneal_steps (0 = max_steps), linear
    # as in the reference, or cosine
    ema_start: float = 0.9998
    ema_end: float = 0.99999
    ema_anneal_steps: int = 100000
    ema_schedule: str = "linear"


def check_config(cfg: Data2Vec2Config) -> None:
    """Raise ConfigError naming the ``data2vec2.*`` key of a value the objective cannot use."""

    def bad(key: str, expected: str):
        raise ConfigError(f"config key 'data2vec2.{key}': expected {expected}, got {getattr(cfg, key)!r}")

    for key, valid in (("loss", LOSSES), ("mask_fill", MASK_FILLS), ("ema_schedule", EMA_SCHEDULES)):
        if getattr(cfg, key) not in valid:
            bad(key, "one of " + ", ".join(valid))
    for key in ("clones", "mask_block_width", "decoder_depth", "decoder_groups"):
        if not getattr(cfg, key) >= 1:
            bad(key, "an integer >= 1")
    for key in ("top_k", "decoder_dim", "ema_anneal_steps", "mask_seed"):
        if not getattr(cfg, key) >= 0:
            bad(key, "an integer >= 0")
    if not (cfg.decoder_kernel >= 1 and cfg.decoder_kernel % 2 == 1):
        bad("decoder_kernel", "an odd integer >= 1 (the grid keeps its size)")
    if not 0.0 < cfg.mask_ratio < 1.0:
        bad("mask_ratio", "a fraction in (0, 1)")
    for key in ("mask_adjust", "mask_noise_std", "loss_scale", "cls_weight"):
        if not getattr(cfg, key) >= 0.0:
            bad(key, "a number >= 0")
    if cfg.loss == "smooth_l1" and not cfg.loss_beta > 0.0:
        bad("loss_beta", "a number > 0 with loss=smooth_l1")
    for key in ("ema_start", "ema_end"):
        if not 0.0 <= getattr(cfg, key) <= 1.0:
            bad(key, "a momentum in [0, 1]")


def ema_momentum(step: int, anneal_steps: int, start: float, end: float, schedule: str = "linear") -> float:
    """The teacher's momentum after ``step`` optimizer steps: ``start`` at 0, ``end`` from
    ``anneal_steps`` on. linear (the reference's ``get_annealed_rate``):
    ``end - (end - start) * (1 - step / anneal_steps)``; cosine:
    ``end - (end - start) * (cos(pi * step / anneal_steps) + 1) / 2``."""
    if anneal_steps <= 0 or step >= anneal_steps:
        return float(end)
    t = max(step, 0) / anneal_steps
    if schedule == "linear":
        return float(end - (end - start) * (1.0 - t))
    if schedule == "cosine":  # BYOL's target-decay schedule, over anneal_steps
        return cosine_momentum(step, anneal_steps, start, end)
    raise ValueError(f"unknown momentum schedule {schedule!r}; valid: {', '.join(EMA_SCHEDULES)}")


@torch.no_grad()
def ffn_outputs(vit: nn.Module, x: Tensor, layers: list[int]) -> list[Tensor]:
    """The outputs of ``vit.blocks[i].mlp`` for ``i`` in ``layers`` while ``vit`` encodes ``x``:
    ``mlp(norm2(h))`` of the pre-norm block, before the residual add (data2vec 2.0's
    ``ffn_targets``), each ``[B, 1 + N, D]`` with the class token first.

    The ViT is run through its ``__call__`` (so engines that hook modules, such as ZeRO-3, see a
    normal forward) with temporary forward hooks on the MLPs.
    """
    outs: dict[int, Tensor] = {}

    def keep(i):
        def hook(module, args, output):
            outs[i] = output
        return hook

    handles = [vit.blocks[i].mlp.register_forward_hook(keep(i)) for i in layers]
    try:
        vit(x)
    finally:
        for h in handles:
            h.remove()
    return [outs[i] for i in layers]


def make_targets(layer_outputs: list[Tensor]) -> Tensor:
    """data2vec 2.0's targets from per-layer patch-token outputs ``[B, N, C]`` (class token removed):
    each instance-normalised (per sample and channel, over the N tokens, no affine, eps 1e-5),
    averaged over the layers, then layer-normalised over the C channels (no affine, eps 1e-5).
    Returns float32 ``[B, N, C]``."""
    y = None
    for out in layer_outputs:
        z = F.instance_norm(out.float().transpose(1, 2)).transpose(1, 2)
        y = z if y is None else y + z
    y = y / len(layer_outputs)
    return F.layer_norm(y, y.shape[-1:])


def regression_loss(pred: Tensor, target: Tensor, kind: str = "mse", beta: float = 1.0,
                    scale: float | None = None) -> Tensor:
    """Mean over rows of the per-row loss ``scale * sum_c l(pred, target)``, with ``l`` the squared
    error (``mse``) or the smooth L1 loss with ``beta``, and ``scale = 1 / sqrt(C)`` unless given.

    Args:
        pred, target: ``[M, C]`` (any leading shape; rows are everything but the last axis).
    """
    pred, target = pred.float(), target.float()
    if kind == "mse":
        per = (pred - target).pow(2)
    else:
        per = F.smooth_l1_loss(pred, target, reduction="none", beta=beta)
    c = pred.shape[-1]
    s = 1.0 / math.sqrt(c) if not scale else scale
    return per.sum(-1).mean() * s


class ConvDecoder(nn.Module):
    """data2vec 2.0's image decoder: tokens ``[B, N, C]`` on an ``H x W`` grid -> ``[B, N, out_dim]``.

    ``depth`` layers of ``Conv2d(kernel, padding kernel // 2, groups)`` -> LayerNorm over channels
    (no affine) -> GELU, each added to its input when the widths agree (every layer when
    ``dim == in_dim``), then a linear projection to ``out_dim``.
    """

    def __init__(self, in_dim: int, dim: int, out_dim: int, depth: int, kernel: int, groups: int,
                 grid: tuple[int, int]) -> None:
        super().__init__()
        self.grid = tuple(grid)
        self.convs = nn.ModuleList(nn.Conv2d(in_dim if i == 0 else dim, dim, kernel, padding=kernel // 2,
                                             groups=groups) for i in range(depth))
        self.proj = nn.Linear(dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        h, w = self.grid
        if n != h * w:
            raise ValueError(f"decoder: expected {h}x{w} = {h * w} tokens, got {n}")
        x = x.transpose(1, 2).reshape(b, c, h, w)
        for conv in self.convs:
            y = conv(x)
            y = F.layer_norm(y.permute(0, 2, 3, 1), (y.shape[1],)).permute(0, 3, 1, 2)
            y = F.gelu(y)
            x = y + x if y.shape[1] == x.shape[1] else y
        return self.proj(x.flatten(2).transpose(1, 2))


@register_objective("data2vec2", Data2Vec2Config)
class Data2Vec2(Objective):
    """data2vec 2.0 on images: a ViT student regresses an EMA teacher's contextualised targets at
    the masked patches of several masked copies of each image (see the module docstring)."""

    view_recipe = "light"
    num_views = 1
    has_ema_teacher = True
    # models.ema_update_ on whole tensors; the DeepSpeed engine replaces it under ZeRO-3
    ema_update_fn = staticmethod(ema_update_)

    def __init__(self, towers, cfg: Data2Vec2Config):
        super().__init__(towers)
        check_config(cfg)
        self.cfg = cfg
        vit = self.backbone
        check_vit(vit, "data2vec2")
        depth, dim = len(vit.blocks), vit.embed_dim
        k = cfg.top_k or depth
        if k > depth:
            raise ConfigError(f"config key 'data2vec2.top_k': expected at most the ViT's {depth} blocks (0 = all), "
                              f"got {cfg.top_k}")
        self.target_layers = list(range(depth - k, depth))
        dec_dim = cfg.decoder_dim or dim
        for width, what in ((dim, "the ViT's width"), (dec_dim, "data2vec2.decoder_dim")):
            if width % cfg.decoder_groups:
                raise ConfigError(f"config key 'data2vec2.decoder_groups': {cfg.decoder_groups} must divide {what} "
                                  f"({width})")
        grid = (vit.grid_size, vit.grid_size)
        try:
            self.masks = MaskGenerator("inverse_block", grid, mask_ratio=cfg.mask_ratio, seed=cfg.mask_seed,
                                       block_width=cfg.mask_block_width, adjust=cfg.mask_adjust)
        except MaskError as exc:
            raise ConfigError(f"config key 'data2vec2.mask_*': {exc}") from None
        self.decoder = ConvDecoder(dim, dec_dim, dim, cfg.decoder_depth, cfg.decoder_kernel, cfg.decoder_groups, grid)
        self.target_backbone = frozen_copy(vit).eval()
        self.momentum = float(cfg.ema_start)

    @classmethod
    def resolve_config(cls, cfg, info):
        check_config(cfg)  # before any model is built
        return cfg

    def train(self, mode: bool = True):
        """The teacher always encodes in eval mode (no stochastic depth), as in the reference."""
        super().train(mode)
        self.target_backbone.eval()
        return self

    def trainable_modules(self):
        return [self.backbone, self.decoder]

    def param_groups(self) -> list[dict]:
        """Weights with decay; biases, norms, and the ViT's class token, positions and mask token
        without (the teacher is frozen, so it is left out)."""
        return mim_param_groups(self)

    # -- the pieces of forward, each testable on its own ----------------------------------------------

    @torch.no_grad()
    def teacher_targets(self, x: Tensor) -> Tensor:
        """Targets ``[B, N, D]`` (float32) of images ``x`` from one teacher pass over the whole image."""
        outs = ffn_outputs(self.target_backbone, x, self.target_layers)
        return make_targets([o[:, 1:] for o in outs])  # patch tokens; the class token is no target

    def batch_masks(self, batch_size: int, step: int, device) -> Tensor:
        """``bool [batch_size * clones, N]`` (True = masked), clone ``m`` of sample ``b`` at row
        ``b * clones + m``, for this data-parallel rank's samples of ``step``."""
        m = self.masks(batch_size, max(int(step), 0), dp_rank(), self.cfg.clones)
        return m.to(device, non_blocking=True)

    def decoder_input(self, visible: Tensor, mask: Tensor) -> Tensor:
        """The visible tokens ``[R, N_visible, D]`` back on the full ``[R, N, D]`` grid of ``mask``
        ``[R, N]``, with the ``mask_fill`` at masked cells."""
        r, n = mask.shape
        d = visible.shape[-1]
        grid = visible.new_zeros(r, n, d)
        grid[~mask] = visible.reshape(-1, d)
        fill = self.cfg.mask_fill
        if fill == "zeros" or (fill == "noise" and self.cfg.mask_noise_std == 0):
            return grid
        if fill == "learned":
            value = self.backbone.mask_token.reshape(1, 1, d).to(grid.dtype)
        else:
            value = torch.randn_like(grid) * self.cfg.mask_noise_std
        return torch.where(mask.unsqueeze(-1), value, grid)

    def forward(self, batch: dict) -> dict:
        x = batch["views"][0]
        b = x.shape[0]
        clones = self.cfg.clones
        grid = tuple(s // self.backbone.patch_size for s in x.shape[-2:])
        if grid != self.masks.grid:
            raise ValueError(f"data2vec2: images of {tuple(x.shape[-2:])} px give a {grid} patch grid; the masks and "
                             f"the decoder are built for the ViT's native {self.masks.grid}")
        y = self.teacher_targets(x)  # [B, N, D], once per image
        mask = self.batch_masks(b, batch.get("step", 0), x.device)  # [B * clones, N]
        tokens = self.backbone.forward_features(x.repeat_interleave(clones, 0), mask, drop_masked=True)
        pred = self.decoder(self.decoder_input(tokens[:, 1:], mask))  # [B * clones, N, D]
        return self.loss_terms(pred, tokens[:, 0], y, mask)

    def loss_terms(self, pred: Tensor, cls_token: Tensor, y: Tensor, mask: Tensor) -> dict:
        """The loss and its parts from the decoder's predictions ``[B * clones, N, D]``, the student's
        class tokens ``[B * clones, D]``, the targets ``[B, N, D]`` and the masks ``[B * clones, N]``."""
        clones = self.cfg.clones
        y_rep = y.repeat_interleave(clones, 0)  # sample-major, as the mask rows
        cfg = self.cfg
        scale = cfg.loss_scale or None
        reg = regression_loss(pred[mask], y_rep[mask], cfg.loss, cfg.loss_beta, scale)
        out = {"reg_loss": reg.detach()}
        loss = reg
        if cfg.cls_weight > 0:
            cls_target = y.mean(1).repeat_interleave(clones, 0)
            cls = regression_loss(cls_token, cls_target, cfg.loss, cfg.loss_beta, scale)
            loss = loss + cfg.cls_weight * cls
            out["cls_loss"] = cls.detach()
        with torch.no_grad():
            out["target_std"] = y_rep[mask].float().std(0).mean()
            out["pred_std"] = pred[mask].detach().float().std(0).mean()
        out["ema_decay"] = torch.tensor(self.momentum)
        return {"loss": loss, **out}

    pipeline_refusal = None

    def pipeline_spec(self) -> PipelineSpec:
        """``[embedding, block_1, ..., block_N, top]``, each student block beside its teacher block
        (so the EMA update pairs tensors within a stage). Between layers: ``(student tokens,
        teacher tokens, running sum of the instance-normalised target-layer FFN outputs, masks)``;
        the teacher's tensors carry no gradient, so they cross stages as the int32 bits of their
        float32 values (DeepSpeed sends a gradient back for every floating-point tensor it passes)."""
        if self.cfg.mask_fill == "learned":
            raise PipelineUnsupportedError("data2vec2.mask_fill=learned cannot run as pipeline stages (the decoder on "
                                           "the last stage would read the mask token of the first); use noise or zeros")
        vit, teacher, k = self.backbone, self.target_backbone, len(self.target_layers)
        layers = [_D2vEmbed(vit, teacher, self.cfg.clones),
                  *[_D2vBlock(b, t, i in self.target_layers) for i, (b, t) in enumerate(zip(vit.blocks, teacher.blocks))],
                  _D2vTop(vit.norm, self.decoder, teacher.norm, self.decoder_input, k)]
        def inputs(batch):
            x = batch["views"][0]
            return x, self.batch_masks(x.shape[0], batch.get("step", 0), x.device).to(torch.uint8)

        def loss(outputs, _labels):
            pred, cls_token, y, mask = outputs
            return self.loss_terms(pred, cls_token, y, mask.bool())

        names = ("reg_loss", "target_std", "pred_std", "ema_decay") + (("cls_loss",) if self.cfg.cls_weight > 0 else ())
        return PipelineSpec(layers=layers, inputs=inputs, labels=lambda b: torch.zeros(()), loss=loss, metrics=names)

    @torch.no_grad()
    def on_step_end(self, step: int, max_steps: int) -> None:
        """After optimizer step ``step`` (from 0): the teacher moves with the momentum of
        ``step + 1`` updates done (the reference anneals by its update count)."""
        c = self.cfg
        m = ema_momentum(step + 1, c.ema_anneal_steps or max_steps, c.ema_start, c.ema_end, c.ema_schedule)
        if m < 1.0:
            self.ema_update_fn(self.target_backbone, self.backbone, m)
        self.momentum = m

    def state_dict_extra(self) -> dict:
        return {"momentum": self.momentum}

    def load_state_dict_extra(self, d: dict) -> None:
        self.momentum = float(d.get("momentum", self.momentum))

    @torch.no_grad()
    def embed(self, batch: dict) -> Tensor:
        """The student's pooled output (class token by default) of the whole, unmasked image."""
        return self.backbone.forward_pooled(batch["image"]).float()


def _bits(t: Tensor) -> Tensor:
    """A gradient-free float tensor as the int32 bits of its float32 values (exact, crosses stages without a gradient)."""
    return t.float().contiguous().view(torch.int32)


def _unbits(t: Tensor) -> Tensor:
    return t.view(torch.float32)


class _D2vEmbed(nn.Module):
    """First pipeline layer: ``(images [B, ...], uint8 masks [B * clones, N]) -> (student tokens of
    the visible patches of every clone, teacher tokens of the whole images, zero target sum, masks)``."""

    def __init__(self, student: nn.Module, teacher: nn.Module, clones: int):
        super().__init__()
        self.student, self.teacher, self.clones = ViTEmbed(student), ViTEmbed(teacher), clones

    def forward(self, inputs):
        x, mask = inputs
        s = self.student(x.repeat_interleave(self.clones, 0), mask.bool(), drop_masked=True)
        with torch.no_grad():
            t = self.teacher(x)
        return s, _bits(t), _bits(torch.zeros_like(t[:, 1:], dtype=torch.float32)), mask


class _D2vBlock(nn.Module):
    """A student block and its teacher block; a target layer adds its instance-normalised FFN output
    (patch tokens) to the running target sum, as :func:`make_targets` does."""

    def __init__(self, student: nn.Module, teacher: nn.Module, target: bool):
        super().__init__()
        self.student, self.teacher, self.target = student, teacher, target

    def forward(self, inputs):
        s, t, acc, mask = inputs
        s = self.student(s)
        with torch.no_grad():
            t = _unbits(t)
            if self.target:
                out = {}
                hook = self.teacher.mlp.register_forward_hook(lambda m, a, o: out.setdefault("ffn", o))
                try:
                    t = self.teacher(t)
                finally:
                    hook.remove()
                z = F.instance_norm(out["ffn"][:, 1:].float().transpose(1, 2)).transpose(1, 2)
                acc = _bits(_unbits(acc) + z)
            else:
                t = self.teacher(t)
        return s, _bits(t), acc, mask


class _D2vTop(nn.Module):
    """Last pipeline layer: the student's final norm, the decoder over the visible tokens put back
    on the grid, and the targets (the running sum averaged over ``k`` layers, layer-normalised).
    Holds the teacher's final norm too (unused) so that the EMA update pairs it with the student's
    on the same stage."""

    def __init__(self, norm: nn.Module, decoder: nn.Module, teacher_norm: nn.Module, fill, k: int):
        super().__init__()
        self.norm, self.decoder, self.teacher_norm, self.k = norm, decoder, teacher_norm, k
        self.fill = fill  # the objective's decoder_input (a bound method, not a submodule)

    def forward(self, inputs):
        s, _, acc, mask = inputs
        tokens = self.norm(s)
        pred = self.decoder(self.fill(tokens[:, 1:], mask.bool()))
        y = _unbits(acc) / self.k
        return pred, tokens[:, 0], F.layer_norm(y, y.shape[-1:]), mask
