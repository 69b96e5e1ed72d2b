"""Re-rankers: a second stage that re-scores the candidates an approximate index returns.

AION-Search (Parker et al., 2025) found that re-ranking the candidates of the first stage nearly
doubled the recall of the rarest objects in the top 100. Here a re-ranker is any object with
``rerank(queries, cand_ids, index, k) -> (scores, ids)``; register one with
:func:`register_reranker` and select it by name (``SearchIndex.search(..., rerank="name")``,
``pretrain search query --rerank name``).

``exact`` re-scores the candidates with the uncompressed vectors (``index.vectors``): the
compressed codes of IVF-PQ / SQ only choose the candidates, the final order is exact.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional, Tuple, Type

import numpy as np

from data.common import Registry

from . import UnknownSearchNameError

__all__ = ["Reranker", "ExactReranker", "RERANKERS", "register_reranker", "get_reranker", "list_rerankers"]


class Reranker(ABC):
    """Re-scores candidate ids for a batch of queries."""

    name = "base"

    @abstractmethod
    def rerank(self, queries: np.ndarray, cand_ids: np.ndarray, index, k: Optional[int] = None
               ) -> Tuple[np.ndarray, np.ndarray]:
        """Re-order candidates.

        Args:
            queries: ``[n, D]`` normalised query vectors.
            cand_ids: ``[n, c]`` candidate dataset ids from the first stage (-1 = none).
            index: The :class:`~eval_probes.search.index.SearchIndex` (for ``index.vectors``).
            k: Results to keep per query (default: all ``c``).

        Returns:
            ``(scores [n, k] float32, ids [n, k] int64)``, best first; -1 / ``-inf`` pad.
        """


#: Re-ranker name -> class (or zero-argument factory).
RERANKERS: Registry = Registry("re-ranker", error=UnknownSearchNameError)


def register_reranker(name: str):
    """Class (or factory) decorator: ``@register_reranker("exact")``."""

    def deco(cls: Type[Reranker]):
        return RERANKERS.register(name, cls)

    return deco


def list_rerankers() -> list[str]:
    return RERANKERS.names()


def get_reranker(name: str) -> Reranker:
    """A new re-ranker by registered name.

    Raises:
        SearchError: If the name is unknown (the message lists the valid ones).
    """
    return RERANKERS.get(name)()


def _top_k(scores: np.ndarray, ids: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return (np.take_along_axis(scores, order, 1).astype(np.float32),
            np.take_along_axis(ids, order, 1).astype(np.int64))


@register_reranker("exact")
class ExactReranker(Reranker):
    """Cosine similarity of each query with the uncompressed vectors of its candidates."""

    name = "exact"

    def rerank(self, queries, cand_ids, index, k=None):
        queries = np.asarray(queries, dtype=np.float32)
        cand_ids = np.asarray(cand_ids, dtype=np.int64)
        k = cand_ids.shape[1] if k is None else min(int(k), cand_ids.shape[1])
        valid = cand_ids >= 0
        uniq, inv = np.unique(cand_ids[valid], return_inverse=True)
        scores = np.full(cand_ids.shape, -np.inf, dtype=np.float32)
        if len(uniq):
            vecs = index.vectors(uniq)  # [u, D], normalised
            rows = np.nonzero(valid)[0]
            scores[valid] = np.einsum("ij,ij->i", queries[rows], vecs[inv])
        return _top_k(scores, np.where(valid, cand_ids, -1), k)
