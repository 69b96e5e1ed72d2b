"""``pretrain embed`` and the ``pretrain search`` group (build, query, eval, ...).

The search code lives in ``eval_probes.search``; this module parses arguments, turns a training
run into a frozen encoder (the one place where the search code meets ``pretrain``) and prints.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


class SearchCliError(ValueError):
    """A command-line mistake of the search commands; printed as one line."""


class OneLineParser(argparse.ArgumentParser):
    """Argument errors as one line (``pretrain search query: error: argument -k: ...``), exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.error = OneLineParser.error.__get__(parser)
    return parser


# ----------------------------------------------------------------------------------------------
# encoders from runs


def run_encoder(run_dir, image_size=None):
    """A run of this project as a frozen encoder (``eval_probes.search.embed.LoadedEncoder``)."""
    import torch

    import data as data_lib
    from eval_probes.search.embed import LoadedEncoder, prepare_images

    from .engine import autocast_context
    from .probe import load_run, read_run_config

    run = Path(run_dir)
    if not run.is_dir():
        raise SearchCliError(f"--run: run directory '{run}' does not exist")
    if not (run / "weights.safetensors").is_file():
        raise SearchCliError(f"--run: '{run}' has no weights.safetensors (finish the run or 'pretrain export' it)")
    cfg = read_run_config(run)
    info = data_lib.build_dataset(cfg.data, "test", image_size=cfg.image_size or None).info
    cfg, model = load_run(run, cfg, info)
    model.eval()
    size = int(image_size or cfg.image_size or info.image_size)
    mean, std = tuple(info.mean), tuple(info.std)
    from .loop import uses_channels_last

    channels_last = uses_channels_last(cfg, info.channels)

    def embed(images):
        x = prepare_images(images, size, info.channels, mean, std)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), autocast_context(cfg.precision):
            return model.embed({"image": x}).float()

    return LoadedEncoder(embed, size, (mean, std))


def register_run_encoder() -> None:
    """Let ``eval_probes.search.embed.load_encoder(run_dir=...)`` load runs of this project."""
    from eval_probes.search.embed import register_run_loader

    register_run_loader(run_encoder)


# ----------------------------------------------------------------------------------------------
# argument helpers


def _positive_int(name):
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a positive integer, got '{text}'") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name} must be a positive integer, got '{text}'")
        return v

    return parse


def _existing_dir(flag, path):
    p = Path(path)
    if not p.is_dir():
        raise SearchCliError(f"{flag}: directory '{p}' does not exist")
    return p


# ----------------------------------------------------------------------------------------------
# embed


def _cmd_embed(args) -> int:
    import data as data_lib
    from eval_probes.search.embed import embed_dataset, load_encoder

    if args.run is not None:
        _existing_dir("--run", args.run)
    register_run_encoder()
    enc = load_encoder(run_dir=args.run, encoder_name=args.encoder, image_size=args.image_size)
    ds = data_lib.build_dataset(args.data, args.split, image_size=enc.image_size)
    root = str(Path(args.data[len("folder:"):]).expanduser().resolve()) if args.data.startswith("folder:") else None
    meta = {"encoder": {"kind": "run" if args.run else "packaged",
                        "name": args.encoder or Path(args.run).resolve().name,
                        "run_dir": str(Path(args.run).resolve()) if args.run else None,
                        "image_size": enc.image_size},
            "data": {"spec": args.data, "split": args.split, "image_size": enc.image_size, "root": root}}
    t0 = time.time()
    store = embed_dataset(enc.embed, ds, args.out, shard_size=args.shard_size, dtype=args.dtype,
                          batch_size=args.batch_size, progress=not args.quiet, meta_extra=meta, limit=args.limit)
    print(f"wrote {store.count} embeddings of dim {store.dim} ({store.meta['dtype']}, "
          f"{store.meta['num_shards']} shard(s)) to {args.out}  ({time.time() - t0:.1f} s)")
    return 0


# ----------------------------------------------------------------------------------------------
# search build


def _cmd_build(args) -> int:
    from eval_probes.search.embed import EmbeddingStore
    from eval_probes.search.index import build_index, format_bytes, parse_memory

    budget = parse_memory(args.memory_budget)
    store = EmbeddingStore(_existing_dir("--embeddings", args.embeddings))
    ids, vecs = store.load(np.float32)
    meta_extra = {"embeddings": str(Path(args.embeddings).resolve()), "heads": None}
    if args.heads is not None:  # index the aligned image embeddings, so that text queries work
        from .search_text_cli import load_heads_for_build

        vecs, meta_extra["heads"] = load_heads_for_build(args.heads, vecs)
    params = {k: v for k, v in (("nprobe", args.nprobe), ("nlist", args.nlist)) if v is not None}
    t0 = time.time()
    idx = build_index(vecs, ids, args.out, kind=args.index, memory_budget_bytes=budget, meta_extra=meta_extra,
                      progress=not args.quiet, params=params or None, seed=args.seed)
    print(f"built a '{idx.kind}' index of {len(idx)} vectors (dim {idx.dim}, params {idx.meta['params']}, "
          f"{format_bytes(idx.size_bytes())}) in {time.time() - t0:.1f} s -> {args.out}")
    return 0


# ----------------------------------------------------------------------------------------------
# search query


def image_query_vector(idx, path) -> np.ndarray:
    """Embed an image file with the encoder that made the index's embeddings -> ``[1, D]``."""
    from data import load_image
    from eval_probes.search.embed import load_encoder

    register_run_encoder()
    p = Path(path)
    if not p.is_file():
        raise SearchCliError(f"--image: file '{p}' does not exist")
    enc_meta = idx.store.meta.get("encoder", {})
    if enc_meta.get("kind") == "run":
        enc = load_encoder(run_dir=enc_meta["run_dir"], image_size=enc_meta.get("image_size"))
    else:
        enc = load_encoder(encoder_name=enc_meta.get("name"), image_size=enc_meta.get("image_size"))
    try:
        image = load_image(str(p), enc.image_size, channels=3)
    except Exception as exc:
        raise SearchCliError(f"--image: cannot read '{p}' as an image ({type(exc).__name__}: {exc})") from None
    raw = enc.embed(image.unsqueeze(0)).detach().cpu().numpy()
    return idx.embed_raw(raw)


def text_query_vector(idx, text: str) -> np.ndarray:
    """Embed a text query through the index's alignment heads -> ``[1, D]``."""
    if idx.heads is None:
        raise SearchCliError("--text: this index holds unaligned image embeddings; train heads with "
                             "'pretrain search align' and build the index with --heads")
    return np.asarray(idx.heads.text([text]), dtype=np.float32)


def query_vectors(idx, args) -> np.ndarray:
    from eval_probes.search import SearchError

    if args.id is not None:
        try:
            return idx.vectors([args.id])
        except SearchError:
            raise SearchCliError(f"--id: unknown id {args.id} (the index holds {len(idx)} items)") from None
    if args.image is not None:
        return image_query_vector(idx, args.image)
    return text_query_vector(idx, args.text)


def result_rows(idx, scores, ids) -> list[dict]:
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


def _cmd_query(args) -> int:
    from eval_probes.search.index import SearchIndex

    idx = SearchIndex.load(_existing_dir("--index", args.index))
    if args.nprobe is not None:
        idx.set_params(nprobe=args.nprobe)
    q = query_vectors(idx, args)
    t0 = time.perf_counter()
    scores, ids = idx.search(q, args.k, rerank=args.rerank, candidates=args.candidates)
    ms = (time.perf_counter() - t0) * 1000
    rows = result_rows(idx, scores[0], ids[0])
    if args.json:
        print(json.dumps({"query": {"text": args.text, "image": args.image, "id": args.id}, "k": args.k,
                          "rerank": args.rerank, "index": str(args.index), "kind": idx.kind,
                          "ms": round(ms, 3), "results": rows}))
        return 0
    print(f"{len(rows)} results from a '{idx.kind}' index of {len(idx)} items"
          f"{' (re-ranked: ' + args.rerank + ')' if args.rerank else ''} in {ms:.1f} ms")
    print(f"{'rank':>4}  {'id':>8}  {'score':>7}  {'label':>5}  path")
    for r in rows:
        lab = "" if r["label"] is None else str(r["label"])
        print(f"{r['rank']:>4}  {r['id']:>8}  {r['score']:>7.4f}  {lab:>5}  {r['path'] or '-'}")
    return 0


# ----------------------------------------------------------------------------------------------
# search eval


def _read_phenomena(path, idx) -> list[dict]:
    """Named queries with known relevant ids, one JSON object per line:
    ``{"name": ..., "text" | "id" | "image": ..., "relevant": [ids...]}``."""
    p = Path(path)
    if not p.is_file():
        raise SearchCliError(f"--phenomena: file '{p}' does not exist")
    out = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            q = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SearchCliError(f"--phenomena: line {n} of '{p}' is not JSON ({exc.msg})") from None
        if not isinstance(q, dict) or "relevant" not in q or not any(key in q for key in ("text", "id", "image")):
            raise SearchCliError(f"--phenomena: line {n} of '{p}' needs 'relevant' and one of 'text', 'id', 'image'")
        ns = argparse.Namespace(text=q.get("text"), id=q.get("id"), image=q.get("image"))
        q["vector"] = query_vectors(idx, ns)[0]
        q.setdefault("name", f"query {n}")
        out.append(q)
    return out


def evaluate_index(idx, n_queries=200, k=10, rerank=None, candidates=None, seed=0, phenomena=(),
                   progress=False) -> dict:
    """Recall@k of an index against exact search over its uncompressed vectors, latency and QPS,
    and nDCG@10 / recall@100 of named phenomena queries."""
    import faiss

    from eval_probes.search.metrics import ndcg_at_k, recall_at_k, time_queries

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


def _cmd_eval(args) -> int:
    from eval_probes.search.embed import write_json_atomic
    from eval_probes.search.index import SearchIndex

    idx = SearchIndex.load(_existing_dir("--index", args.index))
    if args.nprobe is not None:
        idx.set_params(nprobe=args.nprobe)
    phen = _read_phenomena(args.phenomena, idx) if args.phenomena else []
    res = evaluate_index(idx, n_queries=args.queries, k=args.k, rerank=args.rerank, candidates=args.candidates,
                         seed=args.seed, phenomena=phen)
    if args.out:
        write_json_atomic(Path(args.out), res)
    print(json.dumps(res, default=float) if args.json else format_eval(res))
    return 0


# ----------------------------------------------------------------------------------------------
# parsers


def add_embed_parser(sub) -> None:
    e = _one_line_errors(sub.add_parser(
        "embed", help="embed a dataset with a run or a packaged encoder, in resumable shards",
        description="Write embeddings of DATA to EMB_DIR (shard_*.npy, ids_*.npy, items.jsonl, meta.json). "
                    "Run again after an interruption: completed shards are kept."))
    who = e.add_mutually_exclusive_group(required=True)
    who.add_argument("--run", metavar="RUN_DIR", help="a training run of this project (weights.safetensors)")
    who.add_argument("--encoder", metavar="NAME", help="a packaged encoder: efficientnet_lite0 (ImageNet-pretrained)")
    e.add_argument("--data", required=True, help="dataset spec: mnist5k, digits or folder:PATH")
    e.add_argument("--split", default="train", choices=["train", "test"])
    e.add_argument("--out", required=True, metavar="EMB_DIR")
    e.add_argument("--shard-size", type=_positive_int("--shard-size"), default=4096)
    e.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    e.add_argument("--batch-size", type=_positive_int("--batch-size"), default=128)
    e.add_argument("--image-size", type=_positive_int("--image-size"), default=None,
                   help="side length fed to the encoder (default: the run's, or 224 for packaged models)")
    e.add_argument("--limit", type=_positive_int("--limit"), default=None, help="embed only the first N items")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(fn=_cmd_embed, label="embed")


def add_search_parser(sub) -> argparse.ArgumentParser:
    from eval_probes.search.index import KINDS

    s = _one_line_errors(sub.add_parser("search", help="semantic search: caption, align, build, query, serve, eval",
                                        description="Semantic search over embeddings (AION-Search style)."))
    ss = s.add_subparsers(dest="search_command", metavar="SUBCOMMAND", parser_class=OneLineParser)
    ss.required = True

    b = ss.add_parser("build", help="build a FAISS index from an embeddings directory")
    b.add_argument("--embeddings", required=True, metavar="EMB_DIR")
    b.add_argument("--out", required=True, metavar="INDEX_DIR")
    b.add_argument("--index", default="auto", choices=["auto", *KINDS],
                   help="auto: exact up to 100k vectors, else IVF-PQ with a refine stage fitted to the budget")
    b.add_argument("--memory-budget", default="4GB", help="memory the index may use, e.g. 4GB, 512MB")
    b.add_argument("--heads", metavar="HEAD_DIR", default=None,
                   help="alignment heads (pretrain search align): index the aligned embeddings, for text queries")
    b.add_argument("--nlist", type=_positive_int("--nlist"), default=None, help="inverted lists (IVF kinds)")
    b.add_argument("--nprobe", type=_positive_int("--nprobe"), default=None, help="lists visited per query")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(fn=_cmd_build, label="search build")

    q = ss.add_parser("query", help="top-k results for a text, an image file or an indexed id")
    q.add_argument("--index", required=True, metavar="INDEX_DIR")
    what = q.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="a text query (needs an index built with alignment heads)")
    what.add_argument("--image", metavar="PATH", help="an image file")
    what.add_argument("--id", type=int, metavar="N", help="an indexed item")
    q.add_argument("-k", type=_positive_int("-k"), default=10)
    q.add_argument("--rerank", default=None, metavar="NAME", help="re-rank the candidates, e.g. 'exact'")
    q.add_argument("--candidates", type=_positive_int("--candidates"), default=None,
                   help="candidates handed to the re-ranker (default max(10k, 100))")
    q.add_argument("--nprobe", type=_positive_int("--nprobe"), default=None)
    q.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    q.set_defaults(fn=_cmd_query, label="search query")

    ev = ss.add_parser("eval", help="recall@k against exact search, latency and QPS; nDCG@10 and recall@100 "
                                    "of named phenomena")
    ev.add_argument("--index", required=True, metavar="INDEX_DIR")
    ev.add_argument("--queries", type=_positive_int("--queries"), default=200,
                    help="indexed items used as queries for recall against exact search")
    ev.add_argument("-k", type=_positive_int("-k"), default=10)
    ev.add_argument("--rerank", default=None, metavar="NAME")
    ev.add_argument("--candidates", type=_positive_int("--candidates"), default=None)
    ev.add_argument("--nprobe", type=_positive_int("--nprobe"), default=None)
    ev.add_argument("--phenomena", metavar="FILE.jsonl", help="named queries with relevant ids "
                    "(one {\"name\", \"text\"|\"id\"|\"image\", \"relevant\"} per line)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--json", action="store_true")
    ev.add_argument("--out", help="also write the results as JSON to this file")
    ev.set_defaults(fn=_cmd_eval, label="search eval")

    from .search_text_cli import add_parsers as add_text_parsers

    add_text_parsers(ss)  # caption, align, queries, serve
    return ss


def add_parsers(sub) -> None:
    """Add ``embed`` and the ``search`` group to the ``pretrain`` sub-command parser."""
    add_embed_parser(sub)
    add_search_parser(sub)


if __name__ == "__main__":  # pragma: no cover
    from .cli import main

    sys.exit(main(["search", *sys.argv[1:]]))
