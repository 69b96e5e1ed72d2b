"""A CLIP-style text tower: a causal transformer over token ids.

The encoder follows CLIP's text transformer (Radford et al. 2021): token embedding plus a learned
absolute position embedding, a stack of pre-norm blocks with causal self-attention (token ``i``
sees tokens ``0..i``), a final LayerNorm, and pooling at the end-of-text token.  The linear
projection into a joint embedding space is not part of the tower; objectives add their heads.

Pooling picks one position per sequence:

* with ``eot_id`` set, the first position holding ``eot_id`` (CLIP's tokenizer ends every text
  with it); a row without it falls back to the rule below;
* otherwise the last position that is not ``pad_id``; a row of padding only pools position 0.

Because attention is causal, padding after the pooled position never changes the pooled output.
Padding before it is attended like any other token (as in CLIP, there is no padding mask).

The blocks are :class:`models.vit.Block` with ``causal=True``, so attention runs through
``F.scaled_dot_product_attention(..., is_causal=True)``.
"""

from __future__ import annotations

from typing import Callable, List, Optional

import torch
import torch.nn as nn

from .registry import register_backbone
from .vit import BlockStackEncoder, ModelPart, block_stack, init_transformer_weights

__all__ = [
    "TextTransformer",
    "TextEmbed",
    "TextBlock",
    "TextPool",
    "text_tiny",
    "text_small",
    "text_base",
]


def _check_ids(ids: torch.Tensor, context_length: int) -> None:
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2:
        got = list(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"expected token ids [B, L], got {got}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"token ids must be an integer tensor, got dtype {ids.dtype}")
    length = ids.shape[1]
    if length > context_length:
        raise ValueError(f"sequence length {length} exceeds the context length {context_length} of this text tower")
    if length == 0:
        raise ValueError("token ids must hold at least one position per sequence, got length 0")


def _pool_positions(ids: torch.Tensor, pad_id: int, eot_id: Optional[int]) -> torch.Tensor:
    """``[B]`` long: the pooled position of each row (see the module docstring)."""
    length = ids.shape[1]
    pos = torch.arange(length, device=ids.device).expand_as(ids)
    last = torch.where(ids != pad_id, pos, torch.zeros_like(pos)).amax(dim=1)
    if eot_id is None:
        return last
    first_eot = torch.where(ids == eot_id, pos, torch.full_like(pos, length)).amin(dim=1)
    return torch.where(first_eot < length, first_eot, last)


def _embed(token_embed: nn.Embedding, pos_embed: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    x = token_embed(ids)
    return x + pos_embed[:, : ids.shape[1]].to(x.dtype)


class TextEmbed(ModelPart):
    """First pipeline layer of a :class:`TextTransformer`: ids ``[B, L]`` -> ``[B, L, D + 1]``.

    Channels ``:D`` are the embedded tokens (token plus position embedding); channel ``D`` is a
    one-hot marker of the pooled position, carried through the blocks by :class:`TextBlock` and
    read by :class:`TextPool`, so that every pipeline layer takes and returns one tensor.  Holds
    the model's own ``token_embed`` and ``pos_embed`` (shared, not copied).
    """

    shared = ("token_embed", "pos_embed", "context_length", "pad_id", "eot_id")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        _check_ids(ids, self.context_length)
        x = _embed(self.token_embed, self.pos_embed, ids)
        at = _pool_positions(ids, self.pad_id, self.eot_id)
        marker = torch.zeros(ids.shape, dtype=x.dtype, device=x.device)
        marker[torch.arange(ids.shape[0], device=ids.device), at] = 1
        return torch.cat([x, marker.unsqueeze(-1)], dim=-1)


class TextBlock(nn.Module):
    """A transformer block in a :class:`TextTransformer` pipeline: ``[B, L, D + 1] -> [B, L, D + 1]``.

    Runs the model's own block (shared) on channels ``:D`` and passes the pooling marker in
    channel ``D`` through unchanged.
    """

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.block(x[..., :-1]), x[..., -1:]], dim=-1)


class TextPool(ModelPart):
    """Last pipeline layer of a :class:`TextTransformer`: final norm, then the marked position, ``[B, L, D + 1] -> [B, D]``.

    Holds the model's own final ``norm``.
    """

    shared = ("norm",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        at = x[..., -1].argmax(dim=1)
        tokens = self.norm(x[..., :-1])
        return tokens[torch.arange(x.shape[0], device=x.device), at]


class TextTransformer(BlockStackEncoder):
    """CLIP-style causal text transformer over token ids, pooled at the end-of-text token.

    Args:
        vocab_size: Number of token ids.
        context_length: Longest accepted sequence; fixes the size of ``pos_embed``.
        width: Token dimension ``D``.
        depth: Number of transformer blocks.
        heads: Number of attention heads; must divide ``width``.
        mlp_ratio: MLP hidden size as a multiple of ``D``.
        pad_id: Id of the padding token (used to find the last real token).
        eot_id: Id of the end-of-text token, or None to pool at the last non-pad position.

    Attributes:
        embed_dim: ``D`` (= ``width``).
        num_features: Alias of ``embed_dim``.
        token_embed: ``nn.Embedding(vocab_size, D)``.
        pos_embed: ``[1, context_length, D]`` learned position embeddings.
        blocks: ``nn.Sequential`` of causal :class:`models.vit.Block`.
        norm: Final ``nn.LayerNorm``.

    Shapes:
        ``forward_features``: ids ``[B, L]`` (integer, ``L <= context_length``) -> ``[B, L, D]``.
        ``forward_pooled`` / ``forward``: ids ``[B, L]`` -> ``[B, D]``.

    Layer ids (see :meth:`layer_ids`): the token and position embeddings are 0, block ``j``
    (from 1) is ``j``, the final norm is ``depth + 1`` (= :meth:`num_layers`).  ``pos_embed`` is
    kept out of weight decay (:meth:`no_weight_decay`).
    """

    stem_params = ("token_embed", "pos_embed")
    no_decay_params = ("pos_embed",)

    def __init__(self, vocab_size: int, context_length: int, width: int, depth: int, heads: int,
                 mlp_ratio: float = 4.0, pad_id: int = 0, eot_id: Optional[int] = None) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("context_length", context_length), ("depth", depth)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if heads < 1 or width % heads != 0:
            raise ValueError(f"width ({width}) must be divisible by heads ({heads})")
        for name, value in (("pad_id", pad_id), ("eot_id", eot_id)):
            if value is not None and not 0 <= value < vocab_size:
                raise ValueError(f"{name} must be in [0, vocab_size) = [0, {vocab_size}), got {value}")

        self.vocab_size, self.context_length = vocab_size, context_length
        self.width, self.depth, self.heads = width, depth, heads
        self.pad_id, self.eot_id = pad_id, eot_id
        self.embed_dim: int = width
        self.num_features: int = width

        self.token_embed = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, context_length, width))
        self.blocks = block_stack(width, heads, mlp_ratio, depth, causal=True)
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        init_transformer_weights(self)

    def pipeline_layers(self) -> List[nn.Module]:
        """The model as a flat chain of modules, e.g. to cut it into pipeline stages.

        Returns:
            ``[TextEmbed, TextBlock(block_1), ..., TextBlock(block_N), TextPool]``: each takes one
            tensor and returns one (between layers, ``[B, L, D + 1]``: the tokens plus a one-hot
            channel marking the pooled position), they share this model's parameters (each
            parameter in exactly one of them) and ``ids -> layers[-1](...layers[0](ids))`` equals
            :meth:`forward_pooled`.
        """
        return [TextEmbed(self), *[TextBlock(b) for b in self.blocks], TextPool(self)]

    def pool_positions(self, ids: torch.Tensor) -> torch.Tensor:
        """The position :meth:`forward_pooled` reads in each row of ``ids`` ``[B, L]``: ``[B]`` long.

        With ``eot_id`` set, the first position holding it (rows without it: as below);
        otherwise the last position that is not ``pad_id`` (0 for a row of padding only).
        """
        _check_ids(ids, self.context_length)
        return _pool_positions(ids, self.pad_id, self.eot_id)

    def forward_features(self, ids: torch.Tensor) -> torch.Tensor:
        """Encodes token ids into normalised tokens.

        Args:
            ids: Integer token ids ``[B, L]`` with ``1 <= L <= context_length``.

        Returns:
            ``[B, L, D]`` after the final norm; position ``t`` depends only on ``ids[:, :t + 1]``.

        Raises:
            ValueError: If ``ids`` is not an integer ``[B, L]`` tensor, or ``L`` exceeds
                ``context_length`` (the message names both lengths).
        """
        _check_ids(ids, self.context_length)
        x = _embed(self.token_embed, self.pos_embed, ids)
        return self.norm(self.blocks(x))

    def forward_pooled(self, ids: torch.Tensor) -> torch.Tensor:
        """Pooled embedding at the end-of-text position (see :meth:`pool_positions`).

        Args:
            ids: Integer token ids ``[B, L]``, ``L <= context_length``.

        Returns:
            ``[B, embed_dim]``.
        """
        tokens = self.forward_features(ids)
        at = _pool_positions(ids, self.pad_id, self.eot_id)
        return tokens[torch.arange(ids.shape[0], device=ids.device), at]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`forward_pooled`: ``[B, L] -> [B, embed_dim]``."""
        return self.forward_pooled(ids)

    def extra_repr(self) -> str:
        return (f"vocab_size={self.vocab_size}, context_length={self.context_length}, "
                f"pad_id={self.pad_id}, eot_id={self.eot_id}")


def _text_factory(name: str, width: int, depth: int, heads: int, doc: str) -> Callable[..., TextTransformer]:
    """Registers under ``name`` a factory of :class:`TextTransformer` whose ``width/depth/heads``
    default to the given sizes (explicit values override them), and returns it."""
    defaults = {"width": width, "depth": depth, "heads": heads}

    def factory(vocab_size: int = 49408, context_length: int = 77, width: Optional[int] = None,
                depth: Optional[int] = None, heads: Optional[int] = None, mlp_ratio: float = 4.0, pad_id: int = 0,
                eot_id: Optional[int] = None) -> TextTransformer:
        given = {"width": width, "depth": depth, "heads": heads}
        sizes = {key: defaults[key] if value is None else value for key, value in given.items()}
        return TextTransformer(vocab_size=vocab_size, context_length=context_length, mlp_ratio=mlp_ratio,
                               pad_id=pad_id, eot_id=eot_id, **sizes)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = doc + "\n\n    See :class:`TextTransformer` for the arguments.\n    "
    return register_backbone(name)(factory)


text_tiny = _text_factory(
    "text_tiny", 128, 4, 4,
    """Tiny text tower (width 128, depth 4, 4 heads); explicit ``width/depth/heads`` override it.""",
)
text_small = _text_factory(
    "text_small", 384, 6, 6,
    """Small text tower (width 384, depth 6, 6 heads); explicit ``width/depth/heads`` override it.""",
)
text_base = _text_factory(
    "text_base", 512, 12, 8,
    """CLIP's text tower (width 512, depth 12, 8 heads, 77 tokens, 49,408 ids); explicit
    ``width/depth/heads`` override it.

    With CLIP's tokenizer pass ``eot_id=49407``: its padding id 0 is also the id of a real token
    ("!"), so the last-non-pad rule would misplace the pooled position of a text ending in "!".""",
)
