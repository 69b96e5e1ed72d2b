"""Retrieval metrics: recall@k, nDCG@k (Jarvelin & Kekalainen, "Cumulated gain-based evaluation of
IR techniques", TOIS 2002), and query latency / throughput.

AION-Search reports nDCG@10 and recall@100 for rare phenomena; recall@k against exact search
measures an approximate index.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

__all__ = ["recall_at_k", "ndcg_at_k", "time_queries"]

Relevant = Union[np.ndarray, Sequence[Iterable[int]]]


def _rows(relevant: Relevant, n: int) -> list:
    if isinstance(relevant, np.ndarray) and relevant.ndim == 1 and n == 1:
        relevant = [relevant]
    rel = list(relevant)
    if len(rel) != n:
        raise ValueError(f"relevant has {len(rel)} rows for {n} queries")
    return rel


def recall_at_k(retrieved: np.ndarray, relevant: Relevant, k: int, capped: bool = False) -> float:
    """Mean over queries of ``|top-k retrieved ∩ relevant| / |relevant|``.

    Args:
        retrieved: ``[n, >=k]`` retrieved ids, best first (-1 = nothing).
        relevant: Per query, the relevant ids: a ``[n, m]`` array (e.g. the exact top-k, which
            gives the usual ANN recall@k when ``m = k``) or a list of id collections.
        k: Cut-off.
        capped: Divide by ``min(|relevant|, k)`` instead of ``|relevant|`` (1.0 is reachable
            when there are more relevant items than ``k``).

    Returns:
        The mean recall in ``[0, 1]``; queries without relevant ids are left out (NaN if all are).
    """
    retrieved = np.asarray(retrieved)
    if retrieved.ndim != 2:
        raise ValueError(f"retrieved must be [n, k], got shape {retrieved.shape}")
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    vals = []
    for row, rel in zip(retrieved[:, :k], _rows(relevant, len(retrieved))):
        rel = {int(r) for r in np.asarray(list(rel)).reshape(-1) if int(r) >= 0}
        if not rel:
            continue
        hits = len(rel.intersection(int(r) for r in row if r >= 0))
        vals.append(hits / (min(len(rel), k) if capped else len(rel)))
    return float(np.mean(vals)) if vals else float("nan")


def ndcg_at_k(retrieved: np.ndarray, relevant: Union[Relevant, Sequence[Mapping[int, float]]], k: int = 10) -> float:
    """Mean normalised discounted cumulative gain at ``k``.

    ``DCG = sum_i gain(r_i) / log2(i + 2)`` over the top ``k`` (``i`` from 0); the ideal DCG
    sorts all relevant gains in decreasing order.

    Args:
        retrieved: ``[n, >=k]`` retrieved ids, best first.
        relevant: Per query, relevant ids (binary gain 1) or a mapping id -> graded gain.
        k: Cut-off.

    Returns:
        Mean nDCG in ``[0, 1]`` over queries with at least one relevant id (NaN if none has).
    """
    retrieved = np.asarray(retrieved)
    if retrieved.ndim != 2:
        raise ValueError(f"retrieved must be [n, k], got shape {retrieved.shape}")
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    discounts = 1.0 / np.log2(np.arange(k) + 2.0)
    vals = []
    for row, rel in zip(retrieved[:, :k], _rows(relevant, len(retrieved))):
        gains = ({int(a): float(b) for a, b in rel.items()} if isinstance(rel, Mapping)
                 else {int(r): 1.0 for r in np.asarray(list(rel)).reshape(-1) if int(r) >= 0})
        gains = {a: g for a, g in gains.items() if g > 0}
        if not gains:
            continue
        dcg = sum(gains.get(int(r), 0.0) * discounts[i] for i, r in enumerate(row))
        ideal = sorted(gains.values(), reverse=True)[:k]
        idcg = float(np.sum(np.asarray(ideal) * discounts[:len(ideal)]))
        vals.append(dcg / idcg)
    return float(np.mean(vals)) if vals else float("nan")


def time_queries(search: Callable[[np.ndarray], Any], queries: np.ndarray, batch_size: Optional[int] = None,
                 single: int = 50, warmup: int = 1, repeats: int = 1) -> Dict[str, float]:
    """Latency of single queries and throughput of batched ones.

    Args:
        search: ``fn(queries [b, D])`` running one search (its result is ignored).
        queries: ``[n, D]`` queries.
        batch_size: Queries per call for the throughput figure (default: all at once).
        single: How many queries to time one at a time for the latency (0 skips it).
        warmup: Untimed warm-up calls (on the first query).
        repeats: Timed passes over all queries (the best pass counts).

    Returns:
        ``{"qps", "batch_seconds", "latency_ms_mean", "latency_ms_p50", "latency_ms_p95", "n"}``.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    n = len(queries)
    for _ in range(max(0, warmup)):
        search(queries[:1])
    bs = n if not batch_size else int(batch_size)
    best = float("inf")
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        for lo in range(0, n, bs):
            search(queries[lo:lo + bs])
        best = min(best, time.perf_counter() - t0)
    out = {"n": n, "batch_seconds": best, "qps": n / best if best > 0 else float("inf")}
    lat = []
    for i in range(min(single, n)):
        t0 = time.perf_counter()
        search(queries[i:i + 1])
        lat.append((time.perf_counter() - t0) * 1000.0)
    if lat:
        out.update({"latency_ms_mean": float(np.mean(lat)), "latency_ms_p50": float(np.percentile(lat, 50)),
                    "latency_ms_p95": float(np.percentile(lat, 95))})
    return out
