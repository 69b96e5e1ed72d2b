"""Queries against an index: query vectors (text, image file, indexed id), result rows, evaluation
against exact search, and named queries with known relevant ids ("phenomena").

Image queries are embedded with the encoder recorded in the index's embeddings: a packaged one,
or a training run of this project, which needs the run loader (``import pretrain.encoders``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from data.common.atomic import read_jsonl, write_jsonl

from . import SearchError, SearchPathError

__all__ = ["image_query_vector", "text_query_vector", "id_query_vector", "query_vector", "result_rows",
           "read_phenomena", "evaluate_index", "format_eval", "load_heads_for_build", "embedding_queries",
           "write_queries"]


# ----------------------------------------------------------------------------------------------
# query vectors


def image_query_vector(idx, path: str | os.PathLike) -> np.ndarray:
    """Embed an image file with the encoder that made the index's embeddings -> ``[1, D]``.

    Raises:
        SearchPathError: If the file does not exist.
        SearchError: If it cannot be decoded as an image.
    """
    from data import load_image

    from .embed import load_encoder

    p = Path(path)
    if not p.is_file():
        raise SearchPathError(f"image file '{p}' does not exist")
    enc_meta = idx.store.meta.get("encoder", {})
    if enc_meta.get("kind") == "run":
        enc = load_encoder(run_dir=enc_meta["run_dir"], image_size=enc_meta.get("image_size"))
    else:
        enc = load_encoder(encoder_name=enc_meta.get("name"), image_size=enc_meta.get("image_size"))
    try:
        image = load_image(str(p), enc.image_size, channels=3)
    except Exception as exc:  # any decoder error: the file is not an image we can read
        raise SearchError(f"cannot read '{p}' as an image ({type(exc).__name__}: {exc})") from None
    raw = enc.embed(image.unsqueeze(0)).detach().cpu().numpy()
    return idx.embed_raw(raw)


def text_query_vector(idx, text: str) -> np.ndarray:
    """Embed a text query through the index's alignment heads, or the text tower of the CLIP run
    that made its embeddings -> ``[1, D]``.

    Raises:
        SearchError: If the index holds unaligned image embeddings (no heads, no text tower).
    """
    if idx.heads is None:
        raise SearchError("this index holds unaligned image embeddings; train heads with "
                          "'pretrain search align' and build the index with --heads (or embed the images "
                          "with a CLIP run: pretrain embed --run CLIP_RUN)")
    return np.asarray(idx.heads.text([text]), dtype=np.float32)


def id_query_vector(idx, item_id: int) -> np.ndarray:
    """The stored vector of an indexed item -> ``[1, D]``.

    Raises:
        SearchError: If the id has no embedding.
    """
    return idx.vectors([int(item_id)])


def query_vector(idx, text: Optional[str] = None, image: Optional[str | os.PathLike] = None,
                 item_id: Optional[int] = None) -> np.ndarray:
    """``[1, D]`` vector of one query: an indexed id, an image file or a text (the first given)."""
    if item_id is not None:
        return id_query_vector(idx, item_id)
    if image is not None:
        return image_query_vector(idx, image)
    if text is None:
        raise SearchError("a query needs a text, an image or an id")
    return text_query_vector(idx, text)


def result_rows(idx, scores: Sequence[float], ids: Sequence[int]) -> list[dict]:
    """``[{"rank", "id", "score", "label", "path"}]`` for one query's results."""
    try:
        items = idx.store.items()
    except Exception:  # an index without its embeddings directory still answers with ids
        items = {}
    rows = []
    for r, (s, i) in enumerate(zip(scores, ids)):
        if i < 0:
            continue
        it = items.get(int(i), {})
        rows.append({"rank": r + 1, "id": int(i), "score": float(s), "label": it.get("label"),
                     "path": it.get("path")})
    return rows


# ----------------------------------------------------------------------------------------------
# evaluation


def read_phenomena(path: str | os.PathLike, idx) -> list[dict]:
    """Named queries with known relevant ids, one JSON object per line:
    ``{"name": ..., "text" | "id" | "image": ..., "relevant": [ids...]}``.

    Returns the objects with their query ``vector`` added (and a default ``name``).
    """
    p = Path(path)
    if not p.is_file():
        raise SearchPathError(f"phenomena file '{p}' does not exist")
    out = []
    for n, q in read_jsonl(p, lambda n, exc: SearchError(f"line {n} of '{p}' is not JSON ({exc.msg})")):
        if not isinstance(q, dict) or "relevant" not in q or not any(key in q for key in ("text", "id", "image")):
            raise SearchError(f"line {n} of '{p}' needs 'relevant' and one of 'text', 'id', 'image'")
        q["vector"] = query_vector(idx, text=q.get("text"), image=q.get("image"), item_id=q.get("id"))[0]
        q.setdefault("name", f"query {n}")
        out.append(q)
    return out


def evaluate_index(idx, n_queries: int = 200, k: int = 10, rerank: Optional[str] = None,
                   candidates: Optional[int] = None, seed: int = 0, phenomena: Iterable[dict] = (),
                   progress: bool = False) -> dict:
    """Recall@k of an index against exact search over its uncompressed vectors, latency and QPS,
    and nDCG@10 / recall@100 of named phenomena queries (see :func:`read_phenomena`)."""
    import faiss

    from .metrics import ndcg_at_k, recall_at_k, time_queries

    all_ids = idx.row_ids
    exact_vecs = idx.vectors(all_ids)  # uncompressed, normalised, in FAISS row order
    flat = faiss.IndexFlatIP(exact_vecs.shape[1])
    flat.add(exact_vecs)
    rng = np.random.default_rng(seed)
    sel = np.sort(rng.choice(len(all_ids), size=min(n_queries, len(all_ids)), replace=False))
    queries = exact_vecs[sel]
    ks = sorted({1, min(k, len(idx)), min(100, len(idx))})
    kmax = ks[-1]
    _, truth_rows = flat.search(queries, kmax)
    truth = all_ids[truth_rows]
    res = {"index": str(idx.path), "kind": idx.kind, "count": len(idx), "dim": idx.dim,
           "params": idx.meta.get("params", {}), "queries": len(queries), "seed": seed, "modes": {}}
    modes = {"index": None}
    if rerank:
        modes[f"index+rerank:{rerank}"] = rerank
    for name, rr in modes.items():
        _, got = idx.search(queries, kmax, rerank=rr, candidates=candidates)
        row = {f"recall@{kk}": recall_at_k(got, truth[:, :kk], kk) for kk in ks}
        t = time_queries(lambda q: idx.search(q, k, rerank=rr, candidates=candidates), queries, single=50)
        row.update({"qps": t["qps"], "latency_ms_p50": t.get("latency_ms_p50"),
                    "latency_ms_p95": t.get("latency_ms_p95")})
        res["modes"][name] = row
    t = time_queries(lambda q: flat.search(q, k), queries, single=50)
    res["modes"]["exact (flat, uncompressed)"] = {**{f"recall@{kk}": 1.0 for kk in ks}, "qps": t["qps"],
                                                  "latency_ms_p50": t.get("latency_ms_p50"),
                                                  "latency_ms_p95": t.get("latency_ms_p95")}
    res["phenomena"] = []
    for q in phenomena:
        entry = {"name": q["name"], "relevant": len(q["relevant"])}
        for name, rr in modes.items():
            _, got = idx.search(q["vector"][None], min(100, len(idx)), rerank=rr, candidates=candidates)
            entry[name] = {"ndcg@10": ndcg_at_k(got, [q["relevant"]], 10),
                           # capped (hits / min(relevant, 100)), as in benchmarks/search_mnist5k.py, so a
                           # query with more than 100 relevant items can still reach 1
                           "recall@100": recall_at_k(got, [q["relevant"]], 100, capped=True)}
        res["phenomena"].append(entry)
    return res


def format_eval(res: dict) -> str:
    """Markdown tables of :func:`evaluate_index`'s result."""
    ks = [c for c in next(iter(res["modes"].values())) if c.startswith("recall@")]
    lines = [f"'{res['kind']}' index of {res['count']} vectors (dim {res['dim']}), {res['queries']} queries "
             f"drawn from the indexed items (seed {res['seed']}); recall against exact search",
             "| search | " + " | ".join(ks) + " | QPS (batched) | latency p50 | latency p95 |",
             "|---|" + "---|" * (len(ks) + 3)]
    for name, row in res["modes"].items():
        cells = [f"{row[c]:.3f}" for c in ks]
        lat = [f"{row[c]:.2f} ms" if row.get(c) is not None else "-" for c in ("latency_ms_p50", "latency_ms_p95")]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {row['qps']:.0f} | " + " | ".join(lat) + " |")
    if res["phenomena"]:
        modes = [m for m in res["modes"] if not m.startswith("exact")]
        lines += ["", "named queries; recall@100 is capped: hits / min(relevant, 100)",
                  "| phenomenon | relevant | " + " | ".join(f"{m}: nDCG@10 | {m}: recall@100" for m in modes)
                  + " |", "|---|---|" + "---|---|" * len(modes)]
        for e in res["phenomena"]:
            cells = [f"{e[m]['ndcg@10']:.3f} | {e[m]['recall@100']:.3f}" for m in modes]
            lines.append(f"| {e['name']} | {e['relevant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# building on aligned embeddings; named queries of digit sets


def load_heads_for_build(heads_dir: str | os.PathLike, vecs: np.ndarray) -> tuple[np.ndarray, str]:
    """The aligned image vectors of ``vecs`` (raw embeddings ``[N, D]``) and the absolute HEAD_DIR,
    for an index that answers text queries (``index.json``'s ``heads``).

    Raises:
        SearchPathError: If HEAD_DIR does not exist.
        SearchError: If it is not a heads directory or its heads take another dimension.
    """
    from .align import AlignmentHeads

    if not Path(heads_dir).is_dir():
        raise SearchPathError(f"heads directory '{heads_dir}' does not exist")
    heads = AlignmentHeads.load(heads_dir)
    if vecs.shape[1] != heads.image_dim:
        raise SearchError(f"the heads in '{heads_dir}' take {heads.image_dim}-d image embeddings, "
                          f"these embeddings are {vecs.shape[1]}-d")
    return heads.image(vecs), str(Path(heads_dir).resolve())


def embedding_queries(store, rare_fraction: float = 0.05) -> tuple[list, str, str]:
    """Named class and rare-attribute queries with measured ground truth for the items of an
    embeddings directory of a digit set: ``(queries, data spec, split)``.

    Raises:
        SearchError: If the embeddings are not of a digit set (mnist5k, digits).
    """
    import data as data_lib

    from data.captions import DIGIT_DATASETS, digit_queries

    spec, split = store.meta["data"].get("spec"), store.meta["data"].get("split", "train")
    if spec not in DIGIT_DATASETS:
        raise SearchError(f"named queries with measured ground truth exist for {', '.join(DIGIT_DATASETS)}; "
                          f"the embeddings in '{store.path}' are of '{spec}'")
    ds = data_lib.build_dataset(spec, split)
    ids, _ = store.load(np.float16)
    return digit_queries(ds.images[ids], ds.labels.numpy()[ids], ids, rare_fraction=rare_fraction), spec, split


def write_queries(queries, path: str | os.PathLike) -> Path:
    """Write named queries as JSONL (``{"name", "text", "rare", "relevant"}`` per line), atomically;
    the file :func:`read_phenomena` reads."""
    return write_jsonl(path, ({"name": q.name, "text": q.text, "rare": q.rare, "relevant": [int(i) for i in q.relevant]}
                              for q in queries))
