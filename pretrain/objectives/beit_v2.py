"""BEiT v2: masked image modelling of a VQ-KD tokenizer's codes, with a patch-aggregation head.

Peng et al., "BEiT v2: Masked Image Modeling with Vector-Quantized Visual Tokenizers" (2022,
https://arxiv.org/abs/2208.06366), Sec. 2.3 and 2.4. A frozen tokenizer (a finished ``vqkd`` run,
``beit_v2.tokenizer``, :func:`~pretrain.objectives.vqkd.load_tokenizer`) gives every patch of the
unmasked image a code ``c_i`` in ``[0, K)``. The student ViT (the run's image tower) sees the
image with a BEiT blockwise mask ``M`` (:class:`data.masking.MaskGenerator`, kind ``beit``):
masked patch embeddings are replaced by the tower's mask token. A linear LM head predicts the code
of each masked patch from the final layer:

    mim_loss  = - mean_{(b, i) in M} log softmax(W h^L_{b,i} + w)[c_{b,i}]

The patch-aggregation head (Sec. 2.4) concatenates the final layer's class token ``h^L_CLS`` with
the patch tokens of an early layer ``l`` (``beit_v2.early_layer``), runs ``beit_v2.head_depth``
extra transformer blocks and the student's final norm over them, and predicts the same codes with
the same (shared) LM head:

    head_loss = - mean_{(b, i) in M} log softmax(W s_{b,i} + w)[c_{b,i}],   s = norm(blocks([h^L_CLS; h^l_1..N]))
    loss      = mim_loss + head_loss

so the class token must gather what the early patch tokens lack. The objective runs the tower's
blocks itself (``prepare_tokens``, ``blocks``, ``norm``) to read the early layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data import MaskGenerator, beit_num_masked
from losses import rank as dp_rank
from models.vit import Block, ViTEmbed, init_transformer_weights

from ..config import ConfigError
from .base import Objective, PipelineSpec, register_objective
from .vqkd import VqkdTokenizer, _data_stats, check_vit, load_tokenizer, mim_param_groups, patch_grid

__all__ = ["BeitV2Config", "BeitV2", "default_early_layer", "default_min_block_patches"]


@dataclass
class BeitV2Config:
    tokenizer: str = ""  # the run directory of a finished vqkd run
    num_masked: int = 0  # masked patches per image; 0 = BEiT's 75 of 196, scaled: beit_num_masked(N)
    # smallest target area of a mask block in patches; 0 = BEiT v2's 16 of 196, scaled: max(1, round(16 N / 196))
    min_block_patches: int = 0
    mask_seed: int = 0  # masks depend on (mask_seed, step, global sample index) only
    early_layer: int = 0  # the block whose patch tokens feed the aggregation head; 0 = max(1, 3 * depth // 4)
    head_depth: int = 2  # transformer blocks of the patch-aggregation head; 0 = no head (mim_loss alone)
    # how the run's images are normalised, filled in from the data (converted to the tokenizer's)
    data_mean: tuple[float, ...] = ()
    data_std: tuple[float, ...] = ()


def default_early_layer(depth: int) -> int:
    """``max(1, 3 * depth // 4)``: 9 of 12 blocks, as the reference's ViT-B recipe."""
    return max(1, 3 * depth // 4)


def default_min_block_patches(num_patches: int) -> int:
    """BEiT v2's smallest mask block (16 patches of a 14x14 grid) scaled to ``num_patches``."""
    return max(1, round(16 * num_patches / 196))


@register_objective("beit_v2", BeitV2Config)
class BeitV2(Objective):
    """Predict a frozen VQ-KD tokenizer's codes at masked patches, from the final layer and from the
    patch-aggregation head.

    Args:
        towers: the student image tower (a ViT).
        cfg: :class:`BeitV2Config`.
        tokenizer: a :class:`~pretrain.objectives.vqkd.VqkdTokenizer` to use instead of loading
            ``cfg.tokenizer``.
    """

    view_recipe = "light"
    num_views = 1

    @classmethod
    def resolve_config(cls, cfg: BeitV2Config, info) -> BeitV2Config:
        """``data_mean`` / ``data_std`` become the data's (the tokenizer converts from them)."""
        return _data_stats(cfg, info)

    @classmethod
    def fixed_modules(cls, cfg: BeitV2Config) -> dict:
        """The frozen tokenizer of ``beit_v2.tokenizer``, before the towers draw their initial weights."""
        with torch.random.fork_rng(devices=[]):
            return {"tokenizer": load_tokenizer(cfg.tokenizer, cfg.data_mean, cfg.data_std)}

    def __init__(self, towers, cfg: BeitV2Config, tokenizer: VqkdTokenizer | None = None):
        super().__init__(towers)
        self.cfg = cfg
        vit = self.backbone
        check_vit(vit, "beit_v2")
        depth = len(vit.blocks)
        n = vit.num_patches
        for key in ("num_masked", "min_block_patches", "early_layer", "head_depth", "mask_seed"):
            if getattr(cfg, key) < 0:
                raise ConfigError(f"config key 'beit_v2.{key}': expected an integer >= 0, got {getattr(cfg, key)}")
        if cfg.num_masked > n:
            raise ConfigError(f"config key 'beit_v2.num_masked': at most the {n} patches of the "
                              f"{vit.grid_size}x{vit.grid_size} grid, got {cfg.num_masked}")
        if cfg.early_layer > depth:
            raise ConfigError(f"config key 'beit_v2.early_layer': the tower has {depth} blocks, got {cfg.early_layer}")
        if tokenizer is None:
            tokenizer = self.fixed_modules(cfg)["tokenizer"]
        self._fixed = {"tokenizer": tokenizer}  # not trained, not saved, not wrapped by the engine
        self.num_masked = cfg.num_masked or beit_num_masked(n)
        self.early_layer = cfg.early_layer or default_early_layer(depth)
        self.masks = MaskGenerator("beit", vit.grid_size, num_masked=self.num_masked, seed=cfg.mask_seed,
                                   min_num_patches=cfg.min_block_patches or default_min_block_patches(n))
        dim = vit.embed_dim
        mlp_ratio = vit.blocks[0].mlp.fc1.out_features / dim
        # stochastic depth of head block j: that of block early_layer + j where the tower has one, else its last
        rates = [getattr(vit.blocks[min(self.early_layer + j, depth - 1)].drop_path, "p", 0.0)
                 for j in range(cfg.head_depth)]
        self.head_blocks = nn.Sequential(*[Block(dim, vit.num_heads, mlp_ratio, r) for r in rates])
        init_transformer_weights(self.head_blocks)
        self.lm_head = nn.Linear(dim, tokenizer.num_codes)
        nn.init.trunc_normal_(self.lm_head.weight, std=0.02)
        nn.init.zeros_(self.lm_head.bias)

    @property
    def tokenizer(self) -> VqkdTokenizer:
        return self._fixed["tokenizer"]

    def param_groups(self) -> list[dict]:
        return mim_param_groups(self)

    def mask_for(self, batch: dict, x: Tensor) -> Tensor:
        """This rank's masks ``bool [B, N]`` for the batch: a function of (``mask_seed``,
        ``batch["step"]``, each sample's index in the global batch) only."""
        step = max(int(batch.get("step", 0)), 0)
        return self.masks(x.shape[0], step, dp_rank()).to(x.device)

    def features(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor | None]:
        """The student's normalised tokens ``[B, 1 + N, D]`` of the final layer, and those of the
        aggregation head (None without one)."""
        vit = self.backbone
        h = vit.prepare_tokens(x, mask)  # replace mode: masked patches become the mask token
        early = None
        for i, blk in enumerate(vit.blocks):
            h = blk(h)
            if i + 1 == self.early_layer:
                early = h[:, vit.num_prefix_tokens:]
        final = vit.norm(h)
        if len(self.head_blocks) == 0:
            return final, None
        agg = torch.cat([h[:, :1], early], dim=1)  # the last layer's class token, the early patch tokens
        return final, vit.norm(self.head_blocks(agg))  # the shared LM head comes after the shared norm

    def forward(self, batch: dict) -> dict:
        x = batch["views"][0]
        mask = self.mask_for(batch, x)
        labels = self.tokenizer.tokens(x, patch_grid(self.backbone, x))[mask]  # [M]
        final, agg = self.features(x, mask)
        p = self.backbone.num_prefix_tokens
        logits = self.lm_head(final[:, p:][mask]).float()  # [M, K]
        mim = F.cross_entropy(logits, labels)
        out = {"mim_loss": mim.detach(), "mim_acc": (logits.argmax(1) == labels).float().mean()}
        loss = mim
        if agg is not None:
            head_logits = self.lm_head(agg[:, p:][mask]).float()
            head = F.cross_entropy(head_logits, labels)
            loss = mim + head
            out.update(head_loss=head.detach(), head_acc=(head_logits.argmax(1) == labels).float().mean())
        out["loss"] = loss
        out["tokenizer_codes"] = float(labels.unique().numel())  # distinct codes among this rank's targets
        return out

    pipeline_refusal = None

    def pipeline_spec(self) -> PipelineSpec:
        """``[masked embedding, block_1, ..., block_N, top]``; the tuple between layers is
        ``(tokens,)`` up to the early layer and ``(tokens, early patch tokens)`` after it (both
        carry gradients back: the early tokens feed the aggregation head). The top layer (final
        norm, head blocks, LM head) returns the logits at the masked patches; the last stage draws
        the same masks and runs the tokenizer for the targets."""
        vit, p = self.backbone, self.backbone.num_prefix_tokens
        layers = [_MaskedEmbed(vit), *[_TapBlock(b, p if i + 1 == self.early_layer and len(self.head_blocks) else None)
                                      for i, b in enumerate(vit.blocks)],
                  _BeitTop(vit.norm, self.head_blocks, self.lm_head, p)]

        def inputs(batch):
            x = batch["views"][0]
            return x, self.mask_for(batch, x).to(torch.uint8)

        def labels(batch):
            x = batch["views"][0]
            mask = self.mask_for(batch, x)
            return self.tokenizer.tokens(x, patch_grid(vit, x))[mask], mask.to(torch.uint8)

        def loss(outputs, targets):
            codes, mask = targets
            final, agg = outputs if isinstance(outputs, tuple) else (outputs, None)
            mask = mask.bool()
            logits = final[mask].float()
            mim = F.cross_entropy(logits, codes)
            out = {"mim_loss": mim.detach(), "mim_acc": (logits.argmax(1) == codes).float().mean(), "loss": mim}
            if agg is not None:
                head_logits = agg[mask].float()
                head = F.cross_entropy(head_logits, codes)
                out.update(loss=mim + head, head_loss=head.detach(),
                           head_acc=(head_logits.argmax(1) == codes).float().mean())
            return out

        names = ("mim_loss", "mim_acc") + (("head_loss", "head_acc") if len(self.head_blocks) else ())
        return PipelineSpec(layers=layers, inputs=inputs, labels=labels, loss=loss, metrics=names)

    def export_state(self, state: dict, run: dict):
        """Every tensor: the student ViT under ``backbone.*`` (without the head blocks, so that
        ``model.image.init`` / ``supervised.init`` take it as a plain ViT), the aggregation head under
        ``head_blocks.*`` and the LM head under ``lm_head.*`` (kept so that ``load_run`` / ``pretrain
        probe`` rebuild the run); the tokenizer is not part of it, its directory is named in the
        metadata."""
        return state, {"tokenizer": self.cfg.tokenizer, "early_layer": str(self.early_layer),
                       "num_masked": str(self.num_masked)}


class _MaskedEmbed(ViTEmbed):
    """First pipeline layer: ``(images, uint8 masks) -> (tokens,)``, masked patches replaced by the mask token."""

    def forward(self, inputs):
        x, mask = inputs
        return (super().forward(x, mask.bool()),)


class _TapBlock(nn.Module):
    """A student block in the pipeline: applies to the tokens and passes on what else the tuple
    holds; the early-layer block (``tap`` = prefix tokens to skip) also passes on its patch tokens."""

    def __init__(self, block: nn.Module, tap: int | None = None):
        super().__init__()
        self.block, self.tap = block, tap

    def forward(self, inputs):
        h = self.block(inputs[0])
        if self.tap is not None:
            return (h, h[:, self.tap:].contiguous(), *inputs[1:])
        return (h, *inputs[1:])


class _BeitTop(nn.Module):
    """Last pipeline layer: the shared final norm and LM head over the last layer's patch tokens and,
    with an aggregation head, over its output on [last class token, early patch tokens]; returns
    logits ``[B, N, K]`` (one or two)."""

    def __init__(self, norm: nn.Module, head_blocks: nn.Sequential, lm_head: nn.Module, prefix: int):
        super().__init__()
        self.norm, self.head_blocks, self.lm_head, self.prefix = norm, head_blocks, lm_head, prefix

    def forward(self, inputs):
        h, p = inputs[0], self.prefix
        final = self.lm_head(self.norm(h)[:, p:])
        if len(self.head_blocks) == 0:
            return final
        agg = self.norm(self.head_blocks(torch.cat([h[:, :1], inputs[1]], dim=1)))
        return final, self.lm_head(agg[:, p:])
