"""Vision Transformer backbones with token masking support.

The encoder is a plain pre-norm ViT (Dosovitskiy et al. 2021): a strided
convolution turns the image into patch tokens, a class token is prepended,
learnable absolute position embeddings are added and a stack of transformer
blocks follows, then a final LayerNorm.

Masking (for masked-image-modelling objectives) is built into
:meth:`VisionTransformer.forward_features`:

* replace mode (default, BEiT / SimMIM / iBOT style): masked patch embeddings
  are swapped for a learnable ``mask_token`` before positions are added, so
  the sequence length is unchanged;
* drop mode (``drop_masked=True``, MAE / data2vec 2.0 style): masked tokens are
  removed, so the encoder only sees visible patches.

``blocks`` is a plain ``nn.Sequential`` of :class:`Block` modules, which can be
sliced (``model.blocks[:6]``).  :meth:`VisionTransformer.pipeline_layers` lists the whole
model as a flat chain of one-tensor modules (token embedding, the blocks, final norm and
pooling), e.g. to cut it into pipeline stages, and :meth:`VisionTransformer.layer_ids` gives
each parameter's depth for layer-wise LR decay.

:class:`Block` and :class:`Attention` take ``causal=True`` for causal self-attention; the
text tower of :mod:`models.text` is built from them.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layer_ids import ids_by_prefix
from .registry import register_backbone

__all__ = [
    "DropPath",
    "Attention",
    "attend",
    "Mlp",
    "Block",
    "block_stack",
    "init_transformer_weights",
    "ModelPart",
    "BlockStackEncoder",
    "PatchEmbed",
    "VisionTransformer",
    "ViTEmbed",
    "ViTPool",
    "vit_tiny",
    "vit_small",
    "vit_base",
]

_POOLS = ("cls", "mean")


class DropPath(nn.Module):
    """Stochastic depth: zeroes whole samples of a residual branch during training.

    Kept samples are scaled by ``1 / (1 - p)`` so that the expectation is
    unchanged.  Identity in eval mode or when ``p == 0``.

    Args:
        p: Probability of dropping the branch for a sample.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, ...]`` -> same shape."""
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        scale = x.new_empty(shape).bernoulli_(keep).div_(keep)
        return x * scale

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Attention(nn.Module):
    """Multi-head self-attention using ``F.scaled_dot_product_attention``.

    Args:
        dim: Token dimension ``D``; must be divisible by ``num_heads``.
        num_heads: Number of attention heads.
        qkv_bias: Whether the fused q/k/v projection has a bias.
        causal: If True, token ``i`` attends only to tokens ``0..i`` (``is_causal=True``).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, causal: bool = False) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed_dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.causal = causal
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x``: ``[B, N, D]`` -> ``[B, N, D]``; ``key_mask``: optional bool ``[B, N]``, True on the
        tokens others may attend to (padding False); see :func:`attend`."""
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, H, N, Dh]
        out = attend(q, k, v, self.causal, key_mask)
        # -1, not d: under tensor parallelism this rank holds num_heads / T heads
        out = out.transpose(1, 2).reshape(b, n, -1)
        return self.proj(out)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
           key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Scaled dot-product attention of ``[B, H, N, Dh]`` heads; ``key_mask`` (bool ``[B, N]``, True =
    may be attended to) keeps queries off padding tokens. A causal mask and a key mask together are
    not supported (no caller needs both)."""
    if key_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    if causal:
        raise ValueError("Attention: causal=True with a key_mask is not supported")
    if key_mask.dtype != torch.bool or tuple(key_mask.shape) != (q.shape[0], k.shape[2]):
        raise ValueError(f"key_mask must be a bool tensor [B, N] = {[q.shape[0], k.shape[2]]}, got "
                         f"{key_mask.dtype} {list(key_mask.shape)}")
    return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])


class Mlp(nn.Module):
    """Two-layer feed-forward network ``Linear -> GELU -> Linear``.

    Args:
        dim: Input and output dimension.
        hidden_dim: Hidden dimension.
    """

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[..., dim]`` -> ``[..., dim]``."""
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``.

    Args:
        dim: Token dimension.
        num_heads: Number of attention heads.
        mlp_ratio: MLP hidden size as a multiple of ``dim``.
        drop_path: Stochastic depth probability for both residual branches.
        causal: Causal self-attention (token ``i`` sees tokens ``0..i``), for text towers.
    """

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0, causal: bool = False
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, causal=causal)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x``: ``[B, N, D]`` -> ``[B, N, D]``; ``key_mask``: see :class:`Attention`."""
        x = x + self.drop_path(self.attn(self.norm1(x), key_mask))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


def block_stack(
    dim: int, num_heads: int, mlp_ratio: float, depth: int, drop_path: float = 0.0, causal: bool = False
) -> nn.Sequential:
    """``depth`` :class:`Block` modules in an ``nn.Sequential``; block ``i`` has stochastic depth
    ``drop_path * i / (depth - 1)``."""
    rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
    return nn.Sequential(*[Block(dim, num_heads, mlp_ratio, r, causal=causal) for r in rates])


def init_transformer_weights(model: nn.Module) -> None:
    """Initialises every ``nn.Linear`` (truncated normal, std 0.02; zero bias) and ``nn.LayerNorm``
    (unit weight, zero bias) in ``model``, in ``model.modules()`` order."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ModelPart(nn.Module):
    """A module that holds some attributes of a model (modules and parameters shared, not copied).

    Subclasses name the attributes in ``shared``; e.g. the first and last layers of
    ``pipeline_layers()``.
    """

    shared: tuple = ()

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        for name in self.shared:
            setattr(self, name, getattr(model, name))


class BlockStackEncoder(nn.Module):
    """Base of encoders made of a stem, a stack of ``blocks`` and a final ``norm``.

    Subclasses set ``stem_params`` (the parameter-name prefixes of the stem, layer id 0) and
    ``no_decay_params`` (names usually kept out of weight decay), and build ``blocks`` and
    ``norm``.  Block ``j`` (from 1) has layer id ``j`` and the final norm ``len(blocks) + 1``.
    """

    stem_params: tuple = ()
    no_decay_params: tuple = ()

    def no_weight_decay(self) -> set[str]:
        """Parameter names that optimisers usually exclude from weight decay."""
        return set(self.no_decay_params)

    def num_layers(self) -> int:
        """``depth + 1``: the layer id of the final norm, just above the last block."""
        return len(self.blocks) + 1

    def layer_ids(self) -> Dict[str, int]:
        """Depth id of every parameter, for layer-wise LR decay.

        Returns:
            ``{name: id}`` for every name of ``named_parameters()``: the stem (``stem_params``)
            is 0, ``blocks.i`` is ``i + 1``, the final ``norm`` is ``num_layers()``.
        """
        prefixes = [(p, 0) for p in self.stem_params]
        prefixes += [(f"blocks.{i}", i + 1) for i in range(len(self.blocks))]
        prefixes.append(("norm", self.num_layers()))
        return ids_by_prefix(self, prefixes)


class PatchEmbed(nn.Module):
    """Splits an image into non-overlapping patches and embeds each linearly.

    Args:
        image_size: Expected input height and width (square images).
        patch_size: Patch height and width; must divide ``image_size``.
        in_chans: Number of input channels.
        embed_dim: Output token dimension.

    Attributes:
        grid_size: Patches per side, ``image_size // patch_size``.
        num_patches: ``grid_size ** 2``.
    """

    def __init__(self, image_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        if image_size % patch_size != 0:
            raise ValueError(f"image_size ({image_size}) must be divisible by patch_size ({patch_size})")
        self.image_size = image_size
        self.patch_size = patch_size
        self.grid_size = image_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, C, H, W]`` -> tokens ``[B, (H / p) * (W / p), D]`` (row-major).

        ``H`` and ``W`` may differ from ``image_size`` (e.g. multi-crop's small local views) but
        must be multiples of the patch size ``p``.
        """
        if x.ndim != 4 or x.shape[-2] % self.patch_size or x.shape[-1] % self.patch_size or 0 in x.shape[-2:]:
            raise ValueError(
                f"expected images [B, C, H, W] with H and W multiples of patch_size {self.patch_size} "
                f"(native size {self.image_size}x{self.image_size}), got {list(x.shape)}"
            )
        return self.proj(x).flatten(2).transpose(1, 2)


def _check_mask(mask: torch.Tensor, batch: int, num_patches: int) -> None:
    expected = [batch, num_patches]
    if not isinstance(mask, torch.Tensor) or list(mask.shape) != expected:
        got = list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must have shape [B, N] = {expected} (True = masked), got {got}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (True = masked), got dtype {mask.dtype}")


def _patch_positions(pos_embed: torch.Tensor, grid_size: int, rows: int, cols: int) -> torch.Tensor:
    """Patch part of ``pos_embed`` for a ``rows x cols`` grid (bicubic resampling off the native grid)."""
    pos = pos_embed[:, 1:]
    if rows == cols == grid_size:
        return pos
    g, d = grid_size, pos.shape[-1]
    grid = pos.reshape(1, g, g, d).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(rows, cols), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, rows * cols, d).to(pos.dtype)


def _embed_tokens(
    patch_embed: "PatchEmbed",
    cls_token: torch.Tensor,
    pos_embed: torch.Tensor,
    mask_token: torch.Tensor,
    x: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    drop_masked: bool = False,
) -> torch.Tensor:
    """Images -> ``[B, 1 + N, D]`` tokens: see :meth:`VisionTransformer.prepare_tokens`."""
    tokens = patch_embed(x)  # [B, N, D]
    b, n, d = tokens.shape
    if mask is not None:
        _check_mask(mask, b, n)
    p = patch_embed.patch_size
    pos = _patch_positions(pos_embed, patch_embed.grid_size, x.shape[-2] // p, x.shape[-1] // p).to(tokens.dtype)
    if mask is not None and not drop_masked:
        tokens = torch.where(mask.unsqueeze(-1), mask_token.to(tokens.dtype), tokens)
    tokens = tokens + pos
    if mask is not None and drop_masked:
        counts = mask.sum(dim=1)
        if b > 0 and bool((counts != counts[0]).any()):
            raise ValueError(
                "drop_masked=True needs the same number of masked patches in every row, "
                f"got per-row counts {counts.tolist()}"
            )
        n_visible = n - (int(counts[0]) if b > 0 else 0)
        tokens = tokens[~mask].reshape(b, n_visible, d)
    cls = (cls_token + pos_embed[:, :1]).to(tokens.dtype).expand(b, -1, -1)
    return torch.cat([cls, tokens], dim=1)


def _pool_tokens(tokens: torch.Tensor, pool: str, num_prefix_tokens: int) -> torch.Tensor:
    if pool == "cls":
        return tokens[:, 0]
    return tokens[:, num_prefix_tokens:].mean(dim=1)


class ViTEmbed(ModelPart):
    """First pipeline layer of a :class:`VisionTransformer`: images ``[B, C, H, W]`` -> tokens ``[B, 1 + N, D]``.

    Equal to ``vit.prepare_tokens(x)`` without a mask (same resampled positions for other
    grids).  It holds the model's own ``patch_embed``, ``cls_token``, ``pos_embed`` and
    ``mask_token`` (shared, not copied); the mask token is unused on this path and is held
    so that the pipeline layers together own every parameter of the model.
    """

    shared = ("patch_embed", "cls_token", "pos_embed", "mask_token")

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, drop_masked: bool = False) -> torch.Tensor:
        """``vit.prepare_tokens(x, mask, drop_masked)`` (without FLIP's patch dropout)."""
        return _embed_tokens(self.patch_embed, self.cls_token, self.pos_embed, self.mask_token, x, mask, drop_masked)


class ViTPool(ModelPart):
    """Last pipeline layer of a :class:`VisionTransformer`: final norm, then pooling, ``[B, 1 + N, D] -> [B, D]``.

    Holds the model's own ``norm``; ``pool`` and ``num_prefix_tokens`` are copied from it.
    """

    shared = ("norm", "pool", "num_prefix_tokens")

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return _pool_tokens(self.norm(tokens), self.pool, self.num_prefix_tokens)

    def extra_repr(self) -> str:
        return f"pool={self.pool!r}"


class VisionTransformer(BlockStackEncoder):
    """Pre-norm ViT encoder with class token and optional patch masking.

    Args:
        image_size: Input height/width; fixes the size of ``pos_embed``.
        patch_size: Patch height/width.
        in_chans: Number of input channels.
        embed_dim: Token dimension ``D``.
        depth: Number of transformer blocks.
        num_heads: Number of attention heads.
        mlp_ratio: MLP hidden size as a multiple of ``D``.
        pool: ``"cls"`` (class token) or ``"mean"`` (mean of patch tokens) for
            :meth:`forward_pooled`.
        drop_path: Maximum stochastic depth rate; block ``i`` uses
            ``drop_path * i / (depth - 1)``.

    Attributes:
        embed_dim: ``D``.
        num_features: Alias of ``embed_dim``.
        num_patches: ``N = (image_size // patch_size) ** 2``.
        grid_size: ``image_size // patch_size``.
        num_prefix_tokens: 1 (the class token).
        patch_embed: :class:`PatchEmbed` (a strided convolution).
        cls_token: ``[1, 1, D]`` learnable class token.
        pos_embed: ``[1, 1 + N, D]`` learnable position embeddings (index 0 is
            for the class token).
        mask_token: ``[1, 1, D]`` learnable token that replaces masked patches.
        blocks: ``nn.Sequential`` of :class:`Block`.
        norm: Final ``nn.LayerNorm``.

    Layer ids (see :meth:`layer_ids`): patch embedding, class / mask tokens and position
    embeddings are 0, block ``j`` (from 1) is ``j``, the final norm is ``depth + 1``
    (= :meth:`num_layers`).  ``cls_token``, ``pos_embed`` and ``mask_token`` are kept out of
    weight decay (:meth:`no_weight_decay`).
    """

    stem_params = ("patch_embed", "cls_token", "pos_embed", "mask_token")
    no_decay_params = ("cls_token", "pos_embed", "mask_token")

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        pool: str = "cls",
        drop_path: float = 0.0,
        patch_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= patch_dropout < 1.0:
            raise ValueError(f"patch_dropout must be in [0, 1), got {patch_dropout}")
        if pool not in _POOLS:
            raise ValueError(f"pool must be one of {', '.join(_POOLS)}; got {pool!r}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")

        self.embed_dim: int = embed_dim
        self.num_features: int = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.pool = pool
        self.num_prefix_tokens = 1
        self.patch_dropout = patch_dropout

        self.patch_embed = PatchEmbed(image_size, patch_size, in_chans, embed_dim)
        self.image_size = image_size
        self.patch_size = patch_size
        self.grid_size = self.patch_embed.grid_size
        self.num_patches = self.patch_embed.num_patches

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))

        self.blocks = block_stack(embed_dim, num_heads, mlp_ratio, depth, drop_path)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

        self._init_weights()

    def _init_weights(self) -> None:
        for p in (self.cls_token, self.pos_embed, self.mask_token):
            nn.init.trunc_normal_(p, std=0.02)
        # Patch projection: initialise like a linear layer on the flattened patch.
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        init_transformer_weights(self)

    def pipeline_layers(self) -> List[nn.Module]:
        """The model as a flat chain of modules, e.g. to cut it into pipeline stages.

        Returns:
            ``[ViTEmbed, block_1, ..., block_N, ViTPool]``: each takes one tensor and returns one,
            they share this model's parameters (each parameter in exactly one of them) and
            ``x -> layers[-1](...layers[0](x))`` equals :meth:`forward_pooled` without a mask, at
            any image size :meth:`forward_pooled` accepts.
        """
        return [ViTEmbed(self), *self.blocks, ViTPool(self)]

    def patch_positions(self, rows: int, cols: int) -> torch.Tensor:
        """Position embeddings ``[1, rows * cols, D]`` of a ``rows x cols`` patch grid.

        The native grid (``grid_size x grid_size``) uses ``pos_embed`` as it is; any other grid
        resamples the learned grid bicubically (as DINO does for multi-crop's small views and
        for evaluation at other resolutions), so gradients still reach ``pos_embed``.
        """
        return _patch_positions(self.pos_embed, self.grid_size, rows, cols)

    def prepare_tokens(
        self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, drop_masked: bool = False
    ) -> torch.Tensor:
        """Embeds patches, applies the mask and adds the class token and positions.

        This is everything :meth:`forward_features` does before the blocks.

        Args:
            x: Images ``[B, in_chans, H, W]`` (``image_size`` square, or any multiple of the patch size).
            mask: Optional bool ``[B, N]``, True = masked.
            drop_masked: Remove masked tokens instead of replacing them.

        Returns:
            Tokens ``[B, 1 + N, D]`` or, with ``drop_masked``, ``[B, 1 + N_visible, D]``.

        With ``patch_dropout = p > 0``, in training mode and without a mask, each image keeps
        ``int(N * (1 - p))`` of its patch tokens, drawn at random (FLIP, Li et al. 2023), and
        always its class token: ``[B, 1 + int(N * (1 - p)), D]``.
        """
        if mask is None and self.training and self.patch_dropout > 0:
            mask, drop_masked = self.patch_dropout_mask(x), True
        return _embed_tokens(self.patch_embed, self.cls_token, self.pos_embed, self.mask_token, x, mask, drop_masked)

    def patch_dropout_mask(self, x: torch.Tensor) -> torch.Tensor:
        """Bool ``[B, N]``, True on the patches FLIP's patch dropout removes: all but
        ``int(N * (1 - patch_dropout))`` per row (at least one), drawn from torch's generator."""
        b = x.shape[0]
        n = (x.shape[-2] // self.patch_size) * (x.shape[-1] // self.patch_size)
        keep = max(1, int(n * (1.0 - self.patch_dropout)))
        order = torch.rand(b, n, device=x.device).argsort(dim=1)
        return torch.ones(b, n, dtype=torch.bool, device=x.device).scatter_(1, order[:, :keep], False)

    def forward_features(
        self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, drop_masked: bool = False
    ) -> torch.Tensor:
        """Encodes images into normalised tokens.

        Args:
            x: Images ``[B, in_chans, H, W]`` (``image_size`` square, or any multiple of the patch size).
            mask: Optional bool tensor ``[B, N]`` (``N`` = patches of ``x``, ``num_patches`` at ``image_size``, patches
                in row-major order), True = masked.
            drop_masked: If False (default), masked patch embeddings are
                replaced by ``mask_token`` before positions are added and the
                output keeps all tokens.  If True, masked tokens are removed
                (their order among the visible ones is kept); every row must
                mask the same number of patches.

        Returns:
            Tokens after the final norm, class token first: ``[B, 1 + N, D]``,
            or ``[B, 1 + N_visible, D]`` with ``drop_masked=True``.

        Raises:
            ValueError: If ``mask`` is not a bool tensor of shape ``[B, N]``, if
                rows mask different counts with ``drop_masked=True``, or if the
                image height or width is not a multiple of ``patch_size``.
        """
        tokens = self.prepare_tokens(x, mask, drop_masked)
        tokens = self.blocks(tokens)
        return self.norm(tokens)

    def pool_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Pools normalised tokens ``[B, 1 + M, D]`` into ``[B, D]`` according to ``pool``."""
        return _pool_tokens(tokens, self.pool, self.num_prefix_tokens)

    def forward_pooled(
        self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, drop_masked: bool = False
    ) -> torch.Tensor:
        """Pooled embedding: class token, or mean of the (visible) patch tokens.

        Args:
            x: Images ``[B, in_chans, H, W]`` (``image_size`` square, or any multiple of the patch size).
            mask: Optional bool ``[B, N]``, see :meth:`forward_features`.
            drop_masked: See :meth:`forward_features`.

        Returns:
            ``[B, embed_dim]``.
        """
        return self.pool_tokens(self.forward_features(x, mask, drop_masked))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Same as :meth:`forward_pooled`: ``[B, C, H, W] -> [B, embed_dim]``."""
        return self.forward_pooled(x, mask)


_PRESETS = {
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
}


def _build_vit(
    preset: str,
    image_size: int,
    patch_size: int,
    in_chans: int,
    depth: Optional[int],
    embed_dim: Optional[int],
    num_heads: Optional[int],
    mlp_ratio: float,
    pool: str,
    drop_path: float,
    patch_dropout: float = 0.0,
) -> VisionTransformer:
    cfg = dict(_PRESETS[preset])
    for key, value in (("depth", depth), ("embed_dim", embed_dim), ("num_heads", num_heads)):
        if value is not None:
            cfg[key] = value
    return VisionTransformer(
        image_size=image_size,
        patch_size=patch_size,
        in_chans=in_chans,
        mlp_ratio=mlp_ratio,
        pool=pool,
        drop_path=drop_path,
        patch_dropout=patch_dropout,
        **cfg,
    )


@register_backbone("vit_tiny")
def vit_tiny(
    image_size: int = 224,
    patch_size: int = 16,
    in_chans: int = 3,
    depth: Optional[int] = None,
    embed_dim: Optional[int] = None,
    num_heads: Optional[int] = None,
    mlp_ratio: float = 4.0,
    pool: str = "cls",
    drop_path: float = 0.0,
    patch_dropout: float = 0.0,
) -> VisionTransformer:
    """ViT-Tiny (D=192, depth 12, 3 heads); explicit ``depth/embed_dim/num_heads`` override it."""
    return _build_vit("vit_tiny", image_size, patch_size, in_chans, depth, embed_dim, num_heads,
                      mlp_ratio, pool, drop_path, patch_dropout)


@register_backbone("vit_small")
def vit_small(
    image_size: int = 224,
    patch_size: int = 16,
    in_chans: int = 3,
    depth: Optional[int] = None,
    embed_dim: Optional[int] = None,
    num_heads: Optional[int] = None,
    mlp_ratio: float = 4.0,
    pool: str = "cls",
    drop_path: float = 0.0,
    patch_dropout: float = 0.0,
) -> VisionTransformer:
    """ViT-Small (D=384, depth 12, 6 heads); explicit ``depth/embed_dim/num_heads`` override it."""
    return _build_vit("vit_small", image_size, patch_size, in_chans, depth, embed_dim, num_heads,
                      mlp_ratio, pool, drop_path, patch_dropout)


@register_backbone("vit_base")
def vit_base(
    image_size: int = 224,
    patch_size: int = 16,
    in_chans: int = 3,
    depth: Optional[int] = None,
    embed_dim: Optional[int] = None,
    num_heads: Optional[int] = None,
    mlp_ratio: float = 4.0,
    pool: str = "cls",
    drop_path: float = 0.0,
    patch_dropout: float = 0.0,
) -> VisionTransformer:
    """ViT-Base (D=768, depth 12, 12 heads); explicit ``depth/embed_dim/num_heads`` override it."""
    return _build_vit("vit_base", image_size, patch_size, in_chans, depth, embed_dim, num_heads,
                      mlp_ratio, pool, drop_path, patch_dropout)
