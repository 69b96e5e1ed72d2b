"""FAISS indexes over embeddings: chosen by size and memory budget, built in batches, written
atomically, and queried with optional re-ranking.

An index directory (``INDEX_DIR``) holds ``index.faiss``, ``ids.npy`` (FAISS row -> dataset id)
and ``index.json`` (``{"format": 1, "kind", "metric": "ip", "normalized": true, "dim", "count",
"params", "embeddings", "heads"}``). Vectors are L2-normalised before indexing, so inner product is
cosine similarity. The directory is written under a temporary name beside ``INDEX_DIR`` and
renamed into place only when complete: a build that fails leaves the previous index as it was.

Index kinds (Jegou et al., "Product Quantization for Nearest Neighbor Search", TPAMI 2011;
Malkov & Yashunin, "Efficient and robust approximate nearest neighbor search using Hierarchical
Navigable Small World graphs", TPAMI 2018; Johnson et al., "Billion-scale similarity search with
GPUs", 2017):

==========  =====================================================  ===========================
kind        FAISS structure                                        bytes per vector (D dims)
==========  =====================================================  ===========================
flat        exact inner product                                    4 D
ivf         inverted lists of full vectors (IVF-Flat)              4 D
ivfsq       inverted lists of 8-bit scalar-quantised vectors       D
ivfpq       inverted lists of PQ codes, + optional refine stage    m (+ D for SQ8, 4 D for flat)
hnsw        HNSW graph over full vectors                           4 D + 8 M
==========  =====================================================  ===========================

``auto`` (:func:`choose_index`) picks exact search up to :data:`EXACT_MAX` vectors (when they fit
the budget); above it, IVF-PQ whose refine stage re-scores ``k_factor * k`` candidates with the
most precise vectors the budget holds: full floats, else 8-bit scalar quantisation, else none.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Union

import faiss
import numpy as np
from tqdm.auto import tqdm

from data.common import atomic_dir

from . import SearchError, SearchPathError

__all__ = ["KINDS", "EXACT_MAX", "IndexPlan", "choose_index", "parse_memory", "IndexBuilder", "build_index",
           "SearchIndex", "l2_normalize", "default_params", "format_bytes"]

FORMAT = 1
KINDS = ("flat", "ivf", "ivfsq", "ivfpq", "hnsw")
#: Up to this many vectors ``auto`` keeps exact search (a flat scan of 100k x 1280 floats takes
#: about 10 ms a query on two cores).
EXACT_MAX = 100_000
#: Fewer vectors than this cannot train an inverted file usefully; ``auto`` then stays exact.
IVF_MIN = 10_000
_HEADROOM = 1.15  # inverted-list overhead, quantizer, ids
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20,
          "MIB": 1 << 20, "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30, "T": 1 << 40, "TB": 1 << 40, "TIB": 1 << 40}


def parse_memory(text: Union[str, int]) -> int:
    """``"4GB"``, ``"512MiB"``, ``"2.5G"`` or a byte count -> bytes (binary units).

    Raises:
        SearchError: If the text is not a positive size.
    """
    if isinstance(text, (int, np.integer)):
        value = int(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
        if not m or m.group(2).upper() not in _UNITS:
            raise SearchError(f"memory budget '{text}' is not a size; expected e.g. 4GB, 512MB or 2.5G")
        value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value <= 0:
        raise SearchError(f"memory budget must be positive, got '{text}'")
    return value


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """float32 copy of ``x`` ``[N, D]`` with unit-norm rows (zero rows stay zero)."""
    x = np.array(x, dtype=np.float32, copy=True, ndmin=2)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(x)


def _pq_m(dim: int) -> int:
    """Sub-quantizers of the PQ: one byte per 8 dimensions (a divisor of ``dim``)."""
    target = max(1, dim // 8)
    for m in range(target, 0, -1):
        if dim % m == 0:
            return m
    return 1


def _nlist(n: int) -> int:
    """Inverted lists: a power of two near sqrt(n), with at least 39 training points per list."""
    nl = 2 ** int(round(math.log2(max(1.0, math.sqrt(n)))))
    nl = max(16, min(nl, 65536))
    while nl > 16 and nl * 39 > n:
        nl //= 2
    return nl


def default_params(kind: str, n: int, dim: int, refine: Optional[str] = None) -> Dict[str, Any]:
    """Build and search parameters of ``kind`` for ``n`` vectors of ``dim`` dimensions."""
    if kind not in KINDS:
        raise SearchError(f"unknown index kind '{kind}'; valid kinds: auto, {', '.join(KINDS)}")
    if kind == "flat":
        return {}
    if kind == "hnsw":
        return {"M": 32, "ef_construction": 80, "ef_search": 128}
    nl = _nlist(n)
    # nprobe ~ nlist / 128 and k_factor 16: on 1M and 10M clustered 256-d vectors
    # (benchmarks/search_scale.py) recall@10 stopped rising beyond nprobe 16 but needed k_factor 16
    p: Dict[str, Any] = {"nlist": nl, "nprobe": max(8, min(nl, nl // 128))}
    if kind == "ivfpq":
        # 8-bit codebooks want ~39 x 256 training vectors; small sets get smaller codebooks
        nbits = int(min(8, max(4, math.floor(math.log2(max(n, 16) / 39)))))
        p.update({"m": _pq_m(dim), "nbits": nbits, "refine": refine or "sq8", "k_factor": 16})
    return p


def _bytes_per_vector(kind: str, dim: int, params: Dict[str, Any]) -> float:
    if kind in ("flat", "ivf"):
        b = 4 * dim
    elif kind == "ivfsq":
        b = dim
    elif kind == "hnsw":
        b = 4 * dim + 8 * params.get("M", 32)
    else:
        b = params["m"] * params.get("nbits", 8) / 8
        b += {"flat": 4 * dim, "sq8": dim, "none": 0}[params.get("refine", "sq8")]
    return b + 8  # the id in ids.npy


@dataclass
class IndexPlan:
    """What :func:`choose_index` decided: the kind, its parameters, the estimated memory and why."""

    kind: str
    params: Dict[str, Any]
    est_bytes: int
    reason: str


def estimate_bytes(kind: str, n: int, dim: int, params: Dict[str, Any]) -> int:
    """Estimated resident size of an index of ``n`` vectors."""
    base = n * _bytes_per_vector(kind, dim, params)
    if kind.startswith("ivf"):
        base = base * _HEADROOM + params["nlist"] * dim * 4
    return int(base)


def choose_index(n: int, dim: int, memory_budget_bytes: int = 4 << 30) -> IndexPlan:
    """The ``auto`` rule: pick an index kind from the number of vectors, dimension and budget.

    - ``n <= EXACT_MAX`` (or too few vectors to train lists) and the float vectors fit: ``flat``.
    - Otherwise IVF-PQ (about ``sqrt(n)`` lists, one PQ byte per 8 dims) with a refine stage that
      re-scores candidates with full floats if they fit the budget, else with 8-bit
      scalar-quantised vectors, else with none (PQ codes only).

    Raises:
        SearchError: If even PQ codes alone do not fit the budget.
    """
    budget = int(memory_budget_bytes)
    flat = estimate_bytes("flat", n, dim, {})
    if (n <= EXACT_MAX or n < IVF_MIN) and flat <= budget:
        return IndexPlan("flat", {}, flat, f"{n} vectors <= {EXACT_MAX}: exact search "
                                           f"({format_bytes(flat)} of {format_bytes(budget)})")
    if n < IVF_MIN:
        raise SearchError(f"memory budget {format_bytes(budget)} is too small for {n} vectors of dim {dim} "
                          f"(exact search needs {format_bytes(flat)})")
    for refine, why in (("flat", "full floats"), ("sq8", "8-bit scalar-quantised vectors"),
                        ("none", "no refine stage: PQ codes only")):
        p = default_params("ivfpq", n, dim, refine=refine)
        if refine == "none":
            p["k_factor"] = 1
        est = estimate_bytes("ivfpq", n, dim, p)
        if est <= budget:
            return IndexPlan("ivfpq", p, est, f"{n} vectors > {EXACT_MAX}: IVF{p['nlist']}-PQ{p['m']}, refine "
                                              f"with {why} ({format_bytes(est)} of {format_bytes(budget)})")
    need = estimate_bytes("ivfpq", n, dim, {**default_params("ivfpq", n, dim), "refine": "none"})
    raise SearchError(f"memory budget {format_bytes(budget)} is too small for {n} vectors of dim {dim} "
                      f"(IVF-PQ codes alone need {format_bytes(need)})")


def _factory_string(kind: str, params: Dict[str, Any]) -> str:
    if kind == "flat":
        return "Flat"
    if kind == "hnsw":
        return f"HNSW{params['M']},Flat"
    s = f"IVF{params['nlist']},"
    if kind == "ivf":
        return s + "Flat"
    if kind == "ivfsq":
        return s + "SQ8"
    s += f"PQ{params['m']}x{params.get('nbits', 8)}"
    refine = params.get("refine", "sq8")
    return s + {"none": "", "flat": ",RFlat", "sq8": ",Refine(SQ8)"}[refine]


def apply_search_params(index: faiss.Index, kind: str, params: Dict[str, Any]) -> None:
    """Set the query-time knobs (``nprobe``, ``k_factor``, ``ef_search``) on a FAISS index."""
    if kind.startswith("ivf"):
        faiss.extract_index_ivf(index).nprobe = int(params["nprobe"])
        if kind == "ivfpq" and params.get("refine", "sq8") != "none":
            faiss.downcast_index(index).k_factor = float(params.get("k_factor", 1))
    elif kind == "hnsw":
        faiss.downcast_index(index).hnsw.efSearch = int(params["ef_search"])


class IndexBuilder:
    """Builds one index in steps, so that vectors can be streamed: ``train`` on a sample, ``add``
    batches (normalised here), then ``write``.

    Args:
        dim: Vector dimension.
        kind: One of :data:`KINDS`.
        params: Parameters (defaults from :func:`default_params` for ``expected_count`` vectors).
        expected_count: Number of vectors the index will hold (sets the default parameters).
    """

    def __init__(self, dim: int, kind: str, params: Optional[Dict[str, Any]] = None, expected_count: int = 0):
        if kind not in KINDS:
            raise SearchError(f"unknown index kind '{kind}'; valid kinds: auto, {', '.join(KINDS)}")
        self.dim, self.kind = int(dim), kind
        self.params = {**default_params(kind, max(expected_count, 1), dim), **(params or {})}
        if kind == "ivfpq" and self.dim % int(self.params["m"]):
            raise SearchError(f"PQ sub-quantizers m={self.params['m']} must divide the dimension {dim}")
        if kind == "hnsw":
            self.index = faiss.IndexHNSWFlat(self.dim, int(self.params["M"]), faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efConstruction = int(self.params["ef_construction"])
        else:
            self.index = faiss.index_factory(self.dim, _factory_string(kind, self.params), faiss.METRIC_INNER_PRODUCT)
        self.ids: list[np.ndarray] = []
        self.train_seconds = 0.0
        self.add_seconds = 0.0

    @property
    def needs_training(self) -> bool:
        return not self.index.is_trained

    def train_size(self, n: int) -> int:
        """How many vectors to train on (out of ``n``)."""
        if not self.needs_training:
            return 0
        want = 256 * 64  # the PQ / SQ codebooks
        if self.kind.startswith("ivf"):
            want = max(want, 64 * int(self.params["nlist"]))
        return int(min(n, want, 500_000))

    def train(self, sample: np.ndarray, seed: int = 0) -> None:
        if not self.needs_training:
            return
        x = l2_normalize(sample)
        min_n = int(self.params.get("nlist", 1)) * 39 if self.kind.startswith("ivf") else 1
        if len(x) < min_n:
            raise SearchError(f"{self.kind} with nlist={self.params.get('nlist')} needs at least {min_n} training "
                              f"vectors, got {len(x)}; use fewer lists or --index flat")
        ivf = faiss.downcast_index(faiss.extract_index_ivf(self.index)) if self.kind.startswith("ivf") else None
        if ivf is not None:
            ivf.cp.seed = seed
            ivf.cp.niter = 10
            if self.kind == "ivfpq":
                # polysemous code re-ordering (for Hamming filtering, unused here) takes minutes at large m
                ivf.do_polysemous_training = False
                ivf.pq.cp.seed = seed
        t0 = time.perf_counter()
        self.index.train(x)
        self.train_seconds += time.perf_counter() - t0

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim or len(ids) != vectors.shape[0]:
            raise SearchError(f"vectors must be [N, {self.dim}] with one id each; got {tuple(vectors.shape)} "
                              f"and {len(ids)} ids")
        if self.needs_training:
            raise SearchError("the index must be trained before vectors are added")
        t0 = time.perf_counter()
        self.index.add(l2_normalize(vectors))
        self.add_seconds += time.perf_counter() - t0
        self.ids.append(ids)

    def write(self, out_dir: str | os.PathLike, meta_extra: Optional[dict] = None) -> Path:
        """Write ``INDEX_DIR`` atomically (temporary directory, then rename)."""
        out = Path(out_dir)
        ids = np.concatenate(self.ids) if self.ids else np.zeros(0, np.int64)
        if len(ids) != self.index.ntotal:
            raise SearchError(f"internal: {len(ids)} ids for {self.index.ntotal} vectors")
        if len(np.unique(ids)) != len(ids):
            raise SearchError("ids must be unique")
        meta = {"format": FORMAT, "kind": self.kind, "metric": "ip", "normalized": True, "dim": self.dim,
                "count": int(self.index.ntotal), "params": self.params, "embeddings": None, "heads": None,
                "factory": _factory_string(self.kind, self.params) if self.kind != "hnsw" else
                f"HNSW{self.params['M']},Flat", "train_seconds": round(self.train_seconds, 3),
                "add_seconds": round(self.add_seconds, 3)}
        meta.update(meta_extra or {})
        with atomic_dir(out) as tmp:
            apply_search_params(self.index, self.kind, self.params)
            faiss.write_index(self.index, str(tmp / "index.faiss"))
            np.save(tmp / "ids.npy", ids)
            (tmp / "index.json").write_text(json.dumps(meta, indent=1, default=str))
        return out


def build_index(
    vectors: np.ndarray,
    ids: np.ndarray,
    out_dir: str | os.PathLike,
    kind: str = "auto",
    memory_budget_bytes: int = 4 << 30,
    meta_extra: Optional[dict] = None,
    progress: bool = True,
    params: Optional[Dict[str, Any]] = None,
    seed: int = 0,
    batch_size: int = 65536,
) -> "SearchIndex":
    """Build, write and load an index over ``vectors``.

    Args:
        vectors: ``[N, D]`` embeddings (any float dtype; a memory map works: batches are
            normalised one at a time).
        ids: ``[N]`` int64 dataset ids (FAISS row ``i`` -> ``ids[i]``).
        out_dir: The ``INDEX_DIR``; written atomically.
        kind: ``"auto"`` (see :func:`choose_index`) or one of :data:`KINDS`.
        memory_budget_bytes: Budget for ``auto``.
        meta_extra: Merged into ``index.json`` (e.g. ``embeddings``, ``heads``).
        progress: Show a tqdm bar while adding.
        params: Overrides of the default parameters.
        seed: Seed of the training sample and k-means.
        batch_size: Vectors added per batch.

    Returns:
        The written index, loaded.
    """
    n, dim = vectors.shape
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if len(ids) != n:
        raise SearchError(f"{len(ids)} ids for {n} vectors")
    if n == 0:
        raise SearchError("no vectors to index")
    if kind == "auto":
        plan = choose_index(n, dim, memory_budget_bytes)
        kind, base = plan.kind, plan.params
        params = {**base, **(params or {})}
    builder = IndexBuilder(dim, kind, params, expected_count=n)
    if builder.needs_training:
        rng = np.random.default_rng(seed)
        m = builder.train_size(n)
        sample = np.sort(rng.choice(n, size=m, replace=False)) if m < n else np.arange(n)
        builder.train(np.asarray(vectors[sample], dtype=np.float32), seed=seed)
    bar = tqdm(total=n, desc=f"index ({kind})", unit="vec", disable=not progress)
    for lo in range(0, n, batch_size):
        builder.add(np.asarray(vectors[lo:lo + batch_size], dtype=np.float32), ids[lo:lo + batch_size])
        bar.update(min(batch_size, n - lo))
    bar.close()
    builder.write(out_dir, meta_extra)
    return SearchIndex.load(out_dir)


class SearchIndex:
    """A loaded ``INDEX_DIR``.

    ``search`` normalises the queries, asks FAISS for the top ``k`` (or, with a re-ranker, the top
    ``candidates``) and maps FAISS rows to dataset ids. ``vectors(ids)`` returns the uncompressed,
    normalised vectors of dataset ids: from the embeddings directory, through the alignment heads
    when the index was built on aligned embeddings.
    """

    def __init__(self, index: faiss.Index, ids: np.ndarray, meta: dict, path: Optional[Path] = None):
        self.index, self.row_ids, self.meta, self.path = index, ids, meta, path
        self._store = None
        self._heads = None
        self._vector_source: Optional[Callable[[np.ndarray], np.ndarray]] = None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SearchIndex":
        path = Path(path)
        if not path.is_dir():
            raise SearchPathError(f"index directory '{path}' does not exist")
        for name in ("index.faiss", "ids.npy", "index.json"):
            if not (path / name).is_file():
                raise SearchError(f"'{path}' is not an index directory (no {name}; build one with "
                                  f"'pretrain search build')")
        meta = json.loads((path / "index.json").read_text())
        if meta.get("format") != FORMAT:
            raise SearchError(f"'{path / 'index.json'}' has format {meta.get('format')!r}; expected {FORMAT}")
        index = faiss.read_index(str(path / "index.faiss"))
        apply_search_params(index, meta["kind"], meta.get("params", {}))
        return cls(index, np.load(path / "ids.npy"), meta, path)

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def set_params(self, **params) -> None:
        """Change query-time knobs (``nprobe``, ``k_factor``, ``ef_search``) of the loaded index."""
        self.meta["params"] = {**self.meta.get("params", {}), **{k: v for k, v in params.items() if v is not None}}
        apply_search_params(self.index, self.kind, self.meta["params"])

    # -- the uncompressed vectors ---------------------------------------------------------------
    def set_vector_source(self, fn: Callable[[np.ndarray], np.ndarray]) -> None:
        """Use ``fn(ids) -> [n, D]`` for :meth:`vectors` instead of the embeddings directory."""
        self._vector_source = fn

    @property
    def store(self):
        if self._store is None:
            from .embed import EmbeddingStore

            if not self.meta.get("embeddings"):
                raise SearchError(f"index '{self.path}' records no embeddings directory: the uncompressed "
                                  f"vectors are not available")
            self._store = EmbeddingStore(self.meta["embeddings"])
        return self._store

    @property
    def heads(self):
        """What embeds text queries into this index's space: the alignment heads it was built with,
        or, for embeddings of an image-text encoder (a CLIP run), that encoder's text tower; None
        when text queries are not possible."""
        if self._heads is None and self.meta.get("heads"):
            from .align import AlignmentHeads

            self._heads = AlignmentHeads.load(self.meta["heads"])
        elif self._heads is None and self.meta.get("embeddings"):
            enc = self.store.meta.get("encoder", {})
            if enc.get("text"):
                from .embed import EncoderTextQueries

                self._heads = EncoderTextQueries(enc)
        return self._heads

    def embed_raw(self, raw: np.ndarray) -> np.ndarray:
        """Raw encoder embeddings -> the normalised vectors this index holds (through the heads, if any)."""
        x = np.asarray(raw, dtype=np.float32)
        if self.heads is not None:
            x = np.asarray(self.heads.image(x), dtype=np.float32)
        return l2_normalize(x)

    def vectors(self, ids) -> np.ndarray:
        """Uncompressed, normalised vectors ``[n, D]`` of dataset ``ids``.

        Raises:
            SearchError: If an id is not in the embeddings.
        """
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if self._vector_source is not None:
            return l2_normalize(self._vector_source(ids))
        return self.embed_raw(self.store.lookup(ids))

    def has_id(self, i: int) -> bool:
        return bool(np.isin(int(i), self.row_ids))

    # -- search ------------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int, rerank=None, candidates: Optional[int] = None
               ) -> Tuple[np.ndarray, np.ndarray]:
        """Top-``k`` dataset ids by cosine similarity.

        Args:
            queries: ``[n, D]`` query vectors (normalised here).
            k: Results per query (at least 1; clamped to the index size).
            rerank: ``None``, a registered re-ranker name (``"exact"``) or a
                :class:`~.rerank.Reranker`: FAISS returns ``candidates`` per query, which the
                re-ranker re-scores.
            candidates: Candidates handed to the re-ranker (default ``max(10 k, 100)``).

        Returns:
            ``(scores [n, k] float32, ids [n, k] int64)``, best first; missing results (fewer
            than ``k`` found) are id -1 with score ``-inf``.
        """
        if int(k) < 1:
            raise SearchError(f"k must be >= 1, got {k}")
        q = l2_normalize(queries)
        if q.shape[1] != self.dim:
            raise SearchError(f"queries have dimension {q.shape[1]}, the index {self.dim}")
        k = min(int(k), len(self))
        if rerank is None:
            return self._faiss_search(q, k)
        from .rerank import get_reranker

        rr = get_reranker(rerank) if isinstance(rerank, str) else rerank
        c = min(len(self), max(k, int(candidates) if candidates else max(10 * k, 100)))
        _, cand = self._faiss_search(q, c)
        return rr.rerank(q, cand, self, k=k)

    def _faiss_search(self, q: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        scores, rows = self.index.search(q, k)
        ids = np.where(rows >= 0, self.row_ids[np.maximum(rows, 0)], -1).astype(np.int64)
        scores = np.where(rows >= 0, scores, -np.inf).astype(np.float32)
        return scores, ids

    def size_bytes(self) -> int:
        """Size of ``index.faiss`` on disk (about its size in memory)."""
        if self.path is not None and (self.path / "index.faiss").is_file():
            return (self.path / "index.faiss").stat().st_size
        return int(faiss.serialize_index(self.index).nbytes)
