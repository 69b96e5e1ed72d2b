"""Semantic search over frozen embeddings, in the manner of AION-Search.

AION-Search (Parker et al., 2025) made unlabelled galaxy images searchable by text: a
vision-language model captioned a random subset, a text model embedded the captions, small heads
aligned the frozen image embeddings with the caption embeddings (InfoNCE), and FAISS served the
search, with a re-ranking stage for rare objects. This package is that pipeline for any image
collection:

- :mod:`.embed`: embeddings of a dataset, written in resumable shards (``EMB_DIR``), and the
  encoders that produce them (a run of this project or a packaged ImageNet model);
- :mod:`.index`: FAISS indexes chosen by size and memory budget, written atomically
  (``INDEX_DIR``), and :class:`~.index.SearchIndex` to query them;
- :mod:`.rerank`: pluggable re-rankers (``exact`` re-scores candidates with uncompressed vectors);
- :mod:`.metrics`: recall@k, nDCG@k, latency and queries per second;
- :mod:`.query`: query vectors (text, image file, indexed id), result rows, evaluation of an
  index against exact search and named queries with known relevant ids.

Like the rest of ``eval_probes`` it consumes frozen embedding functions, never an objective.
Submodules are imported on first use, so ``import eval_probes.search`` stays cheap.
"""
from __future__ import annotations

from data.common import PathNotFoundError, UnknownNameError, UserError


class SearchError(UserError, ValueError):
    """Bad search input (missing directory, wrong format, unknown id); the message names it."""


class UnknownSearchNameError(UnknownNameError, SearchError):
    """An unknown encoder or re-ranker name."""


class SearchPathError(SearchError, PathNotFoundError):
    """A directory or file the search was pointed at does not exist (also a FileNotFoundError)."""


__all__ = ["SearchError", "UnknownSearchNameError", "SearchPathError"]
