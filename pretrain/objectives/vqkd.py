"""VQ-KD: BEiT v2's visual tokenizer, trained by distilling a frozen teacher's patch features.

Peng et al., "BEiT v2: Masked Image Modeling with Vector-Quantized Visual Tokenizers" (2022,
https://arxiv.org/abs/2208.06366), Sec. 2.2. A ViT encoder (the run's image tower) turns each
patch into a token; a small task layer maps it into the codebook space (``code_dim``); a
:class:`models.NormEMAQuantizer` replaces it by the nearest unit-norm code (cosine similarity,
straight-through gradient, EMA codebook, k-means initialisation, dead-code restarts); a small
decoder (transformer blocks over the code grid, then a Linear-Tanh-Linear head) regresses the
teacher's feature of the same patch. Per patch ``i`` of image ``b``:

    rec_loss    = mean_{b,i} (1 - cos(pred_{b,i}, t_{b,i}))
    commit_loss = mean_{b,i,d} (q_{b,i,d} - zn_{b,i,d})^2      (zn = z / |z|, q its code; q carries no gradient)
    loss        = rec_loss + commit_weight * commit_loss

The teacher (``vqkd.teacher``) is frozen and loaded through :meth:`Vqkd.fixed_modules`: the
string ``efficientnet_lite0`` (the packaged ImageNet EfficientNet-Lite0, its last feature map) or
a run directory of this project (its image tower: a ViT's patch tokens, a CNN's last feature map).
Its features are brought to the student's patch grid by adaptive average pooling
(:func:`resize_features`). The teacher is kept out of the module tree: it is not in the state
dict, the checkpoints, the optimizer or the engine's wrapper; it is reloaded from its source on
resume.

The trained tokenizer is what ``beit_v2`` needs: :func:`load_tokenizer` rebuilds the encoder, the
task layer and the quantizer (:class:`VqkdTokenizer`) from a finished vqkd run's
``weights.safetensors``.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from losses import data_parallel_group
from models import NormEMAQuantizer, create_backbone
from models.vit import block_stack, init_transformer_weights

from ..config import ConfigError
from .base import Objective, register_objective

__all__ = ["VqkdConfig", "Vqkd", "VqkdTokenizer", "TeacherFeatures", "PixelAdapter", "load_teacher",
           "load_tokenizer", "resize_features", "reconstruction_loss", "make_task_layer", "VqkdDecoder",
           "mim_param_groups", "TASK_LAYERS", "PACKAGED_TEACHERS"]

TASK_LAYERS = ("mlp", "linear")
#: Teachers named by a string rather than a run directory.
PACKAGED_TEACHERS = ("efficientnet_lite0",)


@dataclass
class VqkdConfig:
    # efficientnet_lite0 (the packaged ImageNet EfficientNet-Lite0) or a run directory of this project
    teacher: str = "efficientnet_lite0"
    # side (px) the images are resized to for the teacher; 0 = the side at which the teacher's
    # feature grid equals the student's patch grid (grid x the teacher's stride: 224 px for a 7x7
    # grid and EfficientNet's stride 32; grid x patch size for a ViT teacher)
    teacher_image_size: int = 0
    num_codes: int = 8192  # codebook size K
    code_dim: int = 32  # code vector size
    decay: float = 0.99  # EMA decay of the codebook statistics
    kmeans_init: bool = True  # initialise the codebook by spherical k-means on the first batch
    kmeans_iters: int = 10
    # a code unassigned for this many steps counts as dead (logged as dead_codes); 0 = no count, no restart
    dead_code_steps: int = 200
    restart_dead_codes: bool = True  # replace dead codes by encoder outputs of the current batch
    commit_weight: float = 1.0  # weight of the commitment loss (the reference's beta = 1)
    task_layer: str = "mlp"  # encoder -> code space: mlp (Linear-Tanh-Linear, the reference) | linear
    decoder_depth: int = 1  # transformer blocks of the decoder (reference: 1 or 3); 0 = a per-patch MLP
    decoder_dim: int = 0  # 0 = the encoder's embed_dim
    decoder_heads: int = 0  # 0 = the encoder's num_heads
    # how the run's images are normalised, filled in from the data (the teacher converts from it)
    data_mean: tuple[float, ...] = ()
    data_std: tuple[float, ...] = ()


# ----------------------------------------------------------------------------------------------
# Frozen image towers as patch-feature extractors


class PixelAdapter(nn.Module):
    """Images normalised one way -> normalised as a frozen model expects, with its channels.

    ``x * src_std + src_mean`` gives pixels, ``(pixels - dst_mean) / dst_std`` the model's input
    (both only when both pairs of statistics are given; otherwise the input is taken as it is).
    Grey images are repeated to ``dst_chans`` channels, colour ones averaged to one. Optionally
    resized (bilinear) to the side the model should see.
    """

    def __init__(self, src_mean: Sequence[float] = (), src_std: Sequence[float] = (), dst_mean: Sequence[float] = (),
                 dst_std: Sequence[float] = (), dst_chans: int = 0):
        super().__init__()
        self.convert = bool(src_mean) and bool(dst_mean)
        self.dst_chans = int(dst_chans)

        def col(v):
            return torch.tensor([float(a) for a in v] or [0.0]).view(1, -1, 1, 1)

        self.register_buffer("src_mean", col(src_mean), persistent=False)
        self.register_buffer("src_std", col(src_std or [1.0]), persistent=False)
        self.register_buffer("dst_mean", col(dst_mean), persistent=False)
        self.register_buffer("dst_std", col(dst_std or [1.0]), persistent=False)

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        """``x [B, C, H, W]`` -> ``[B, dst_chans, *size]`` (``size`` None: keep the side)."""
        if self.convert:
            x = x * self.src_std.to(x.dtype) + self.src_mean.to(x.dtype)
        c = x.shape[1]
        if self.dst_chans and c != self.dst_chans:
            if c == 1:
                x = x.expand(-1, self.dst_chans, -1, -1)
            elif self.dst_chans == 1:
                x = x.mean(dim=1, keepdim=True)
            else:
                raise ValueError(f"cannot convert {c}-channel images to {self.dst_chans} channels")
        if self.convert:
            x = (x - self.dst_mean.to(x.dtype)) / self.dst_std.to(x.dtype)
        if size is not None and tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
        return x


def resize_features(fmap: Tensor, grid: tuple[int, int]) -> Tensor:
    """A feature map ``[B, C, h, w]`` on the patch grid ``(gh, gw)``: ``[B, gh * gw, C]`` (row-major).

    Adaptive average pooling: output cell ``(i, j)`` is the mean of the input cells whose rows lie
    in ``[floor(i h / gh), ceil((i + 1) h / gh))`` (columns likewise). A smaller map (e.g. 2x2 to
    4x4) is thus replicated, a larger one averaged over (possibly overlapping) windows.
    """
    if fmap.dim() != 4:
        raise ValueError(f"expected a feature map [B, C, h, w], got {list(fmap.shape)}")
    pooled = F.adaptive_avg_pool2d(fmap.float(), tuple(grid))
    return pooled.flatten(2).transpose(1, 2)


def _to_device(module: nn.Module, device: torch.device) -> None:
    """Moves a module kept out of the module tree to ``device`` (engines move only the tree)."""
    t = next(iter(module.parameters()), None)
    if t is None:
        t = next(iter(module.buffers()), None)
    if t is not None and t.device != device:
        module.to(device)


class TeacherFeatures(nn.Module):
    """A frozen image tower as a source of per-patch target features.

    ``forward(x, grid)``: images normalised as the run's data -> ``[B, gh * gw, C]`` float features
    on the student's patch grid. The images are converted by ``adapter``, resized to
    ``image_size`` (0: ``grid x stride``, so that the teacher's own grid is the student's), fed to
    ``tower.forward_features``; tokens ``[B, P + n, D]`` (a ViT: the ``P = num_prefix_tokens``
    class tokens dropped) are laid out on their grid, a feature map ``[B, C, h, w]`` (a CNN) is
    taken as it is; then :func:`resize_features` pools to the student's grid.

    Attributes:
        dim: the feature size ``C``.
        stride: input pixels per feature cell (a ViT's patch size; a CNN's total stride, measured).
    """

    def __init__(self, tower: nn.Module, adapter: PixelAdapter | None = None, image_size: int = 0, name: str = ""):
        super().__init__()
        for p in tower.parameters():
            p.requires_grad_(False)
        self.tower = tower.eval()
        self.adapter = adapter if adapter is not None else PixelAdapter()
        self.image_size = int(image_size)
        self.name = name
        self.tokens = False
        with torch.no_grad():
            patch = getattr(tower, "patch_size", 0)
            side = 4 * patch if patch else 64
            chans = getattr(getattr(getattr(tower, "patch_embed", None), "proj", None), "in_channels", None)
            chans = chans or getattr(tower, "in_chans", None) or self.adapter.dst_chans or 3
            out = tower.forward_features(torch.zeros(1, chans, side, side))
        if out.dim() == 3:
            if not patch:
                raise ValueError(f"teacher {name!r}: its forward_features gives tokens but it has no patch_size")
            self.tokens, self.stride, self.dim = True, int(patch), int(out.shape[-1])
        elif out.dim() == 4:
            self.stride, self.dim = max(1, round(side / out.shape[-1])), int(out.shape[1])
        else:
            raise ValueError(f"teacher {name!r}: forward_features gave {list(out.shape)}; expected tokens "
                             f"[B, N, D] or a feature map [B, C, h, w]")

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: batch-norm statistics stay, no dropout

    def side(self, grid: tuple[int, int]) -> tuple[int, int]:
        """The ``(H, W)`` the teacher sees for a student grid ``(gh, gw)``."""
        if self.image_size:
            return self.image_size, self.image_size
        return grid[0] * self.stride, grid[1] * self.stride

    @torch.no_grad()
    def feature_map(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        """The teacher's own feature map ``[B, C, h, w]`` of images ``x`` (before pooling to ``grid``)."""
        _to_device(self, x.device)
        p = next(iter(self.tower.parameters()))
        x = self.adapter(x.to(p.dtype), self.side(grid))  # bf16 inputs (DeepSpeed's bf16 mode) to its dtype
        out = self.tower.forward_features(x)
        if self.tokens:
            h, w = x.shape[-2] // self.stride, x.shape[-1] // self.stride
            prefix = int(getattr(self.tower, "num_prefix_tokens", 0))
            tok = out[:, prefix:]
            if tok.shape[1] != h * w:
                raise ValueError(f"teacher {self.name!r}: {tok.shape[1]} patch tokens for a {h}x{w} grid")
            out = tok.transpose(1, 2).reshape(tok.shape[0], tok.shape[2], h, w)
        return out

    @torch.no_grad()
    def forward(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        return resize_features(self.feature_map(x, grid), grid)


def _run_image_tower(run_dir: str, key: str):
    """``(image tower, its data's mean, std, channels)`` of a finished run of this project."""
    from ..batches import schema_of
    from ..probe import load_run, read_run_config  # the probe module imports the loop, which imports us
    from . import objective_class

    run = Path(run_dir)
    if not run.is_dir():
        raise ConfigError(f"config key '{key}': '{run_dir}' is neither a packaged teacher "
                          f"({', '.join(PACKAGED_TEACHERS)}) nor an existing run directory")
    if not (run / "config.yaml").is_file() or not (run / "weights.safetensors").is_file():
        raise ConfigError(f"config key '{key}': '{run_dir}' is not a finished run of this project (expected "
                          f"config.yaml and weights.safetensors there)")
    cfg = read_run_config(run)
    cls = objective_class(cfg.objective)
    if "image" not in cls.towers:
        raise ConfigError(f"config key '{key}': the run '{run_dir}' (objective '{cfg.objective}') has no image tower")
    info = schema_of(cls).dataset(cfg, "test").info
    _, model = load_run(run, cfg, info)
    return model.tower("image"), tuple(info.mean), tuple(info.std), info.channels


def load_teacher(spec: str, data_mean: Sequence[float] = (), data_std: Sequence[float] = (), image_size: int = 0,
                 key: str = "vqkd.teacher") -> TeacherFeatures:
    """The frozen teacher named by ``spec``: ``efficientnet_lite0`` or a run directory.

    ``data_mean`` / ``data_std``: how the images it will get are normalised (empty: already as the
    teacher expects). EfficientNet-Lite0 converts them itself (:mod:`models.efficientnet`); a run's
    tower gets them converted to its own data's normalisation and channels.
    """
    if not spec:
        raise ConfigError(f"config key '{key}': no teacher given (efficientnet_lite0, or a run directory)")
    with torch.random.fork_rng(devices=[]):  # the towers' initial weights do not depend on the teacher
        if spec == "efficientnet_lite0":
            chans = len(data_mean) or 3
            try:
                tower = create_backbone("efficientnet_lite0", in_chans=chans, data_mean=list(data_mean) or None,
                                        data_std=list(data_std) or None)
            except ImportError as exc:
                raise ConfigError(f"config key '{key}': {exc}") from None
            return TeacherFeatures(tower, PixelAdapter(), image_size, name=spec)
        tower, mean, std, chans = _run_image_tower(spec, key)
        teacher = TeacherFeatures(tower, PixelAdapter(data_mean, data_std, mean, std, chans), image_size, name=spec)
    if teacher.tokens and image_size % teacher.stride:
        raise ConfigError(f"config key 'vqkd.teacher_image_size': the teacher '{spec}' is a ViT of patch size "
                          f"{teacher.stride}; {image_size} px is not a multiple of it (0 picks one)")
    return teacher


# ----------------------------------------------------------------------------------------------
# The tokenizer's parts


def make_task_layer(kind: str, dim: int, code_dim: int) -> nn.Sequential:
    """``mlp``: ``Linear(dim, dim) -> Tanh -> Linear(dim, code_dim)`` (the reference); ``linear``:
    ``Linear(dim, code_dim)``. Truncated-normal weights (std 0.02), zero biases."""
    if kind == "mlp":
        layer = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, code_dim))
    elif kind == "linear":
        layer = nn.Sequential(nn.Linear(dim, code_dim))
    else:
        raise ValueError(f"unknown task layer {kind!r}; valid: {', '.join(TASK_LAYERS)}")
    init_transformer_weights(layer)
    return layer


def check_vit(tower: nn.Module, objective: str) -> None:
    """Refuses an image tower without the ViT parts an MIM objective uses."""
    needed = ("patch_size", "num_prefix_tokens", "prepare_tokens", "blocks", "norm")
    missing = [a for a in needed if not hasattr(tower, a)]
    if missing:
        raise ConfigError(f"objective '{objective}' needs a ViT image tower (model.image.backbone=vit_tiny, vit_small "
                          f"or vit_base, with model.image.patch_size); {type(tower).__name__} has no "
                          f"{', '.join(missing)}")


def patch_grid(tower: nn.Module, x: Tensor) -> tuple[int, int]:
    return x.shape[-2] // tower.patch_size, x.shape[-1] // tower.patch_size


class TokenizerParts:
    """Encoder -> task layer -> quantizer, on a module with ``backbone``, ``encode_task`` and ``quantizer``."""

    def encode(self, x: Tensor) -> Tensor:
        """Images ``[B, C, H, W]`` -> code-space vectors ``[B, N, code_dim]`` (before normalisation),
        from the encoder's patch tokens (after its final norm, class token dropped)."""
        tokens = self.backbone.forward_features(x)[:, self.backbone.num_prefix_tokens:]
        return self.encode_task(tokens)

    @torch.no_grad()
    def codes(self, x: Tensor) -> Tensor:
        """Code indices ``[B, N]`` (int64): the code of largest cosine similarity to each patch's
        vector; changes no state."""
        return self.quantizer.lookup(self.encode(x).float())


class VqkdTokenizer(TokenizerParts, nn.Module):
    """A trained tokenizer, frozen: ``tokens(x, grid) -> [B, gh * gw]`` code indices.

    ``adapter`` converts the images of the run that uses it to the tokenizer's normalisation and
    channels; the images are resized (bilinear) to ``grid x patch size`` when that is not their side,
    so that the tokenizer gives one code per patch of the student's grid.
    """

    def __init__(self, backbone: nn.Module, encode_task: nn.Module, quantizer: NormEMAQuantizer,
                 adapter: PixelAdapter | None = None, source: str = ""):
        super().__init__()
        self.backbone, self.encode_task, self.quantizer = backbone, encode_task, quantizer
        self.adapter = adapter if adapter is not None else PixelAdapter()
        self.source = source
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)

    @property
    def num_codes(self) -> int:
        return self.quantizer.num_codes

    @torch.no_grad()
    def tokens(self, x: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        _to_device(self, x.device)
        p = self.backbone.patch_size
        size = (grid[0] * p, grid[1] * p) if grid is not None else None
        w = next(iter(self.parameters()))
        x = self.adapter(x.to(w.dtype), size)
        return self.codes(x)


class VqkdDecoder(nn.Module):
    """Quantized codes ``[B, N, code_dim]`` -> predicted teacher features ``[B, N, out_dim]``.

    A linear embedding plus learned positions, ``depth`` pre-norm transformer blocks over the code
    grid (0: none, a per-patch MLP), a LayerNorm and the reference's Linear-Tanh-Linear head.
    """

    def __init__(self, code_dim: int, num_patches: int, dim: int, depth: int, num_heads: int, mlp_ratio: float,
                 out_dim: int):
        super().__init__()
        self.embed = nn.Linear(code_dim, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, dim))
        self.blocks = block_stack(dim, num_heads, mlp_ratio, depth) if depth > 0 else nn.Sequential()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, out_dim))
        init_transformer_weights(self)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    def forward(self, q: Tensor) -> Tensor:
        if q.shape[1] != self.pos_embed.shape[1]:
            raise ValueError(f"the decoder was built for {self.pos_embed.shape[1]} patches, got {q.shape[1]}")
        h = self.embed(q) + self.pos_embed.to(q.dtype)
        return self.head(self.norm(self.blocks(h)))


def mim_param_groups(objective: nn.Module) -> list[dict]:
    """Weights with decay; norms, biases and what a module lists in ``no_weight_decay()``
    (position embeddings, class and mask tokens) without decay or LARS adaptation. Frozen
    parameters are left out."""
    exempt = set()
    for m in objective.modules():
        names = getattr(m, "no_weight_decay", None)
        if callable(names):
            wanted = names()
            exempt |= {id(p) for n, p in m.named_parameters() if n in wanted}
    decay, plain = [], []
    for p in objective.parameters():
        if p.requires_grad:
            (plain if p.ndim <= 1 or id(p) in exempt else decay).append(p)
    groups = [{"params": decay, "name": "decay"}]
    if plain:
        groups.append({"params": plain, "name": "no_decay", "weight_decay": 0.0, "lars_exclude": True})
    return groups


def _positive(section: str, cfg, *names: str) -> None:
    for n in names:
        v = getattr(cfg, n)
        if v < 1:
            raise ConfigError(f"config key '{section}.{n}': expected an integer >= 1, got {v}")


def _non_negative(section: str, cfg, *names: str) -> None:
    for n in names:
        v = getattr(cfg, n)
        if v < 0:
            raise ConfigError(f"config key '{section}.{n}': expected an integer >= 0, got {v}")


def _data_stats(cfg, info):
    return replace(cfg, data_mean=tuple(float(m) for m in info.mean), data_std=tuple(float(s) for s in info.std))


def _seed_from_rng() -> int:
    """A seed drawn from torch's generator: every rank draws the same (the loop seeds it with the
    run's ``seed`` before building the objective), and a resumed run draws it again."""
    return int(torch.randint(0, 2**31 - 1, (1,)))


# ----------------------------------------------------------------------------------------------
# The objective


@register_objective("vqkd", VqkdConfig)
class Vqkd(TokenizerParts, Objective):
    """Train a VQ-KD tokenizer: encoder, task layer, quantizer and decoder on one light view.

    Args:
        towers: the image tower (a ViT), the tokenizer's encoder.
        cfg: :class:`VqkdConfig`.
        teacher: a :class:`TeacherFeatures` to use instead of loading ``cfg.teacher``.
    """

    # why it cannot run as pipeline stages (parallel.pp > 1); docs/parallel.md
    pipeline_refusal = ("the codebook's k-means initialisation and EMA update run inside forward, on the encoder's output of "
                        "the whole batch")

    view_recipe = "light"
    num_views = 1
    eval_split = "test"

    @classmethod
    def resolve_config(cls, cfg: VqkdConfig, info) -> VqkdConfig:
        """``data_mean`` / ``data_std`` become the data's (the teacher converts from them)."""
        return _data_stats(cfg, info)

    @classmethod
    def fixed_modules(cls, cfg: VqkdConfig) -> dict:
        """The teacher (:func:`load_teacher`), before the towers draw their initial weights."""
        return {"teacher": load_teacher(cfg.teacher, cfg.data_mean, cfg.data_std, cfg.teacher_image_size)}

    def __init__(self, towers, cfg: VqkdConfig, teacher: TeacherFeatures | None = None):
        super().__init__(towers)
        check_config(cfg)
        self.cfg = cfg
        vit = self.backbone
        check_vit(vit, "vqkd")
        if teacher is None:
            teacher = self.fixed_modules(cfg)["teacher"]
        # kept out of the module tree: not trained, not saved, not wrapped by the engine
        self._fixed = {"teacher": teacher}
        # the tokenizer never masks: its mask token gets no gradient, so it is not trained
        if isinstance(getattr(vit, "mask_token", None), nn.Parameter):
            vit.mask_token.requires_grad_(False)
        dim = vit.embed_dim
        self.encode_task = make_task_layer(cfg.task_layer, dim, cfg.code_dim)
        self.quantizer = NormEMAQuantizer(cfg.num_codes, cfg.code_dim, decay=cfg.decay, kmeans_init=cfg.kmeans_init,
                                          kmeans_iters=cfg.kmeans_iters,
                                          dead_code_steps=cfg.dead_code_steps if cfg.restart_dead_codes else 0,
                                          seed=_seed_from_rng())
        heads = cfg.decoder_heads or getattr(vit, "num_heads", 1)
        ddim = cfg.decoder_dim or dim
        if cfg.decoder_depth > 0 and ddim % heads:
            raise ConfigError(f"config key 'vqkd.decoder_heads': {heads} heads do not divide the decoder width {ddim}")
        mlp_ratio = vit.blocks[0].mlp.fc1.out_features / dim if len(vit.blocks) else 4.0
        self.decoder = VqkdDecoder(cfg.code_dim, vit.num_patches, ddim, cfg.decoder_depth, heads, mlp_ratio,
                                   teacher.dim)

    @property
    def teacher(self) -> TeacherFeatures:
        return self._fixed["teacher"]

    def trainable_modules(self) -> list[nn.Module]:
        return [self.backbone, self.encode_task, self.decoder]

    def param_groups(self) -> list[dict]:
        return mim_param_groups(self)

    def forward(self, batch: dict) -> dict:
        x = batch["views"][0]
        grid = patch_grid(self.backbone, x)
        target = self.teacher(x, grid)  # [B, N, C], no gradient
        self.quantizer.process_group = data_parallel_group()
        z = self.encode(x).float()
        z_q, _, info = self.quantizer(z)
        pred = self.decoder(z_q)
        rec = reconstruction_loss(pred.float(), target)
        commit = info["commit_loss"]
        loss = rec + self.cfg.commit_weight * commit
        out = {"loss": loss, "rec_loss": rec.detach(), "commit_loss": commit.detach()}
        out.update(self.codebook_stats())
        return out

    @torch.no_grad()
    def evaluate(self, loader, final: bool = False) -> dict[str, float]:
        """The tokenizer on the held-out images (no augmentation, the codebook unchanged):
        ``rec_loss`` (mean 1 - cosine to the teacher's features), ``codes_used`` (codes assigned to
        at least one patch), ``codebook_usage`` (that over ``num_codes``) and
        ``codebook_perplexity`` (``exp`` of the entropy of the assignment frequencies: the number of
        equally used codes that would give the same entropy)."""
        was_training = self.training
        self.eval()
        counts = torch.zeros(self.quantizer.num_codes, dtype=torch.float64)
        rec_sum, n_patches = 0.0, 0
        for batch in loader:
            x = batch["image"]
            if x.shape[0] == 0:
                continue
            grid = patch_grid(self.backbone, x)
            target = self.teacher(x, grid)
            idx = self.codes(x)
            pred = self.decoder(self.quantizer.get_codes(idx))
            n = idx.numel()
            rec_sum += float(reconstruction_loss(pred.float(), target)) * n
            n_patches += n
            counts += torch.bincount(idx.reshape(-1).cpu(), minlength=counts.numel()).double()
        self.train(was_training)
        if n_patches == 0:
            return {}
        p = counts / counts.sum()
        used = int((counts > 0).sum())
        return {"rec_loss": rec_sum / n_patches, "codes_used": float(used),
                "codebook_usage": used / counts.numel(),
                "codebook_perplexity": float(torch.exp(-torch.special.xlogy(p, p).sum()))}

    @torch.no_grad()
    def codebook_stats(self) -> dict[str, float]:
        """The codebook's health (global over the data-parallel ranks): ``codebook_usage`` (fraction
        of codes used by the last batch), ``codebook_perplexity`` (of the last batch's assignments),
        ``codebook_running_usage`` (perplexity of the EMA usage / K), ``dead_codes`` (unused for
        ``dead_code_steps`` steps) and ``codebook_restarts`` (codes restarted so far)."""
        q = self.quantizer
        s = q.stats()
        out = {"codebook_usage": s["usage"], "codebook_perplexity": s["perplexity"],
               "codebook_running_usage": s["running_usage"], "codebook_restarts": s["num_restarts"]}
        if self.cfg.dead_code_steps > 0:
            out["dead_codes"] = float((q.steps_unused >= self.cfg.dead_code_steps).sum())
        return out

    def export_state(self, state: dict, run: dict):
        """Every tensor of the model (encoder ``backbone.*``, task layer ``encode_task.*``, quantizer
        ``quantizer.*``, decoder ``decoder.*``; the teacher is not part of it), and ``vqkd``
        metadata: what ``beit_v2`` reads (:func:`load_tokenizer` uses only the encoder, the task
        layer and the codebook; the decoder is kept so that ``load_run`` / ``pretrain probe``
        rebuild the run)."""
        image = run["towers"]["image"]
        c = self.cfg
        meta = {"in_chans": image["in_chans"], "image_size": image["image_size"], "data_mean": list(c.data_mean),
                "data_std": list(c.data_std), "num_codes": c.num_codes, "code_dim": c.code_dim,
                "task_layer": c.task_layer, "teacher": c.teacher}
        return state, {"vqkd": json.dumps(meta)}


def reconstruction_loss(pred: Tensor, target: Tensor) -> Tensor:
    """``mean(1 - cos(pred, target))`` over every patch: ``[..., C]`` each (BEiT v2, eq. in Sec. 2.2)."""
    p = F.normalize(pred, dim=-1, eps=1e-6)
    t = F.normalize(target, dim=-1, eps=1e-6)
    return (1 - (p * t).sum(-1)).mean()


def check_config(cfg: VqkdConfig) -> None:
    if cfg.task_layer not in TASK_LAYERS:
        raise ConfigError(f"config key 'vqkd.task_layer': expected {' or '.join(TASK_LAYERS)}, got {cfg.task_layer!r}")
    _positive("vqkd", cfg, "num_codes", "code_dim")
    _non_negative("vqkd", cfg, "kmeans_iters", "dead_code_steps", "decoder_depth", "decoder_dim", "decoder_heads",
                  "teacher_image_size")
    if not 0.0 <= cfg.decay < 1.0:
        raise ConfigError(f"config key 'vqkd.decay': expected a value in [0, 1), got {cfg.decay}")
    if not cfg.commit_weight >= 0:
        raise ConfigError(f"config key 'vqkd.commit_weight': expected a value >= 0, got {cfg.commit_weight}")
    if len(cfg.data_mean) != len(cfg.data_std):
        raise ConfigError(f"config keys 'vqkd.data_mean' / 'vqkd.data_std': one value per channel each, got "
                          f"{len(cfg.data_mean)} and {len(cfg.data_std)}")


# ----------------------------------------------------------------------------------------------
# Loading a trained tokenizer


def load_tokenizer(run_dir: str, data_mean: Sequence[float] = (), data_std: Sequence[float] = (),
                   key: str = "beit_v2.tokenizer") -> VqkdTokenizer:
    """The frozen tokenizer of a finished ``vqkd`` run (its ``weights.safetensors``).

    The encoder is rebuilt from the run's ``model.image`` config, sized by the weights (channels
    and patch size from the patch embedding, the native grid from the position embeddings); the
    task layer and the quantizer's codebook are loaded as they were trained. ``data_mean`` /
    ``data_std``: how the images it will get are normalised (converted to the vqkd run's own).

    Raises:
        ConfigError: naming ``key`` and the path, when it is missing or not a vqkd run.
    """
    from ..checkpoint import load_weights
    from ..config import model_config
    from ..towers import build_tower

    if not run_dir:
        raise ConfigError(f"config key '{key}': no tokenizer given ({key}=RUN_DIR, a finished vqkd run)")
    run = Path(run_dir)
    if not run.is_dir():
        raise ConfigError(f"config key '{key}': '{run_dir}' does not exist (expected the directory of a finished "
                          f"vqkd run)")
    path = run / "weights.safetensors"
    if not path.is_file():
        raise ConfigError(f"config key '{key}': '{run_dir}' has no weights.safetensors (expected a finished vqkd run; "
                          f"'pretrain export --run {run_dir}' writes one from its last checkpoint)")
    state, meta = load_weights(path)
    objective = meta.get("objective", "unknown")
    if objective != "vqkd":
        raise ConfigError(f"config key '{key}': '{run_dir}' is a run of objective '{objective}', not a vqkd tokenizer "
                          f"(train one with objective=vqkd)")
    run_cfg = json.loads(meta.get("config", "{}"))
    vq = run_cfg.get("vqkd", {})
    try:
        pw, pos = state["backbone.patch_embed.proj.weight"], state["backbone.pos_embed"]
        num_codes, code_dim = state["quantizer.codebook"].shape
    except KeyError as exc:
        raise ConfigError(f"config key '{key}': the weights of '{run_dir}' lack {exc.args[0]} (not a ViT vqkd "
                          f"tokenizer)") from None
    in_chans, patch = int(pw.shape[1]), int(pw.shape[-1])
    grid = math.isqrt(int(pos.shape[1]) - 1)
    model = model_config(run_cfg.get("model"))
    model.image.init = ""  # the weights below are the tokenizer's; its own starting point is not needed
    encoder = build_tower(model, "image", in_chans=in_chans, image_size=grid * patch)
    task = make_task_layer(vq.get("task_layer", "mlp"), encoder.embed_dim, code_dim)
    quantizer = NormEMAQuantizer(num_codes, code_dim, decay=vq.get("decay", 0.99), kmeans_init=False)
    adapter = PixelAdapter(data_mean, data_std, vq.get("data_mean", ()), vq.get("data_std", ()), in_chans)
    tok = VqkdTokenizer(encoder, task, quantizer, adapter, source=str(run_dir))
    parts = ("backbone.", "encode_task.", "quantizer.")
    wanted = {k: v for k, v in state.items() if k.startswith(parts)}
    missing, unexpected = tok.load_state_dict(wanted, strict=False)
    if missing or unexpected:
        raise ConfigError(f"config key '{key}': the weights of '{run_dir}' do not fit its recorded tokenizer: "
                          f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    return tok.eval()
