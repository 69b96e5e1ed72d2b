"""``pretrain embed`` and the ``pretrain search`` group: build, query, eval, caption, align, queries, serve.

The work happens in :mod:`eval_probes.search`; training runs become encoders through
:mod:`pretrain.encoders`, imported here so that ``--run`` works.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

import pretrain.encoders  # noqa: F401  (registers the loader of training runs with eval_probes.search)
from eval_probes.search import SearchError

from ._args import (CliError, OneLineParser, existing_dir, existing_file, for_flag, fraction, one_line_errors, port,
                    positive, positive_int)


# ----------------------------------------------------------------------------------------------
# embed


def _cmd_embed(args) -> int:
    import data as data_lib
    from eval_probes.search.embed import embed_dataset, embedding_meta, load_encoder

    if args.run is not None:
        existing_dir("--run", args.run)
    enc = load_encoder(run_dir=args.run, encoder_name=args.encoder, image_size=args.image_size,
                       modality=args.modality)
    if enc.build_data is not None:  # clips, with the run's frames and audio settings
        ds = enc.build_data(args.data, args.split)
    else:
        ds = data_lib.build_dataset(args.data, args.split, image_size=enc.image_size)
    meta = embedding_meta(encoder_name=args.encoder, run_dir=args.run, image_size=enc.image_size,
                          data_spec=args.data, split=args.split, text=enc.embed_text is not None,
                          modality=enc.modality)
    t0 = time.time()
    store = embed_dataset(enc.embed, ds, args.out, shard_size=args.shard_size, dtype=args.dtype,
                          batch_size=args.batch_size, progress=not args.quiet, meta_extra=meta, limit=args.limit,
                          key=enc.modality)
    print(f"wrote {store.count} embeddings of dim {store.dim} ({store.meta['dtype']}, "
          f"{store.meta['num_shards']} shard(s)) to {args.out}  ({time.time() - t0:.1f} s)")
    return 0


# ----------------------------------------------------------------------------------------------
# build, query, eval


def _cmd_build(args) -> int:
    from eval_probes.search.embed import EmbeddingStore
    from eval_probes.search.index import build_index, format_bytes, parse_memory
    from eval_probes.search.query import load_heads_for_build

    budget = parse_memory(args.memory_budget)
    store = EmbeddingStore(existing_dir("--embeddings", args.embeddings))
    ids, vecs = store.load(np.float32)
    meta_extra = {"embeddings": str(Path(args.embeddings).resolve()), "heads": None}
    if args.heads is not None:  # index the aligned image embeddings, so that text queries work
        existing_dir("--heads", args.heads)
        vecs, meta_extra["heads"] = for_flag("--heads", SearchError, load_heads_for_build, args.heads, vecs)
    params = {k: v for k, v in (("nprobe", args.nprobe), ("nlist", args.nlist)) if v is not None}
    t0 = time.time()
    idx = build_index(vecs, ids, args.out, kind=args.index, memory_budget_bytes=budget, meta_extra=meta_extra,
                      progress=not args.quiet, params=params or None, seed=args.seed)
    print(f"built a '{idx.kind}' index of {len(idx)} vectors (dim {idx.dim}, params {idx.meta['params']}, "
          f"{format_bytes(idx.size_bytes())}) in {time.time() - t0:.1f} s -> {args.out}")
    return 0


def _query_vector(idx, args) -> np.ndarray:
    from eval_probes.search.query import id_query_vector, image_query_vector, text_query_vector

    if args.id is not None:
        try:
            return id_query_vector(idx, args.id)
        except SearchError:
            raise CliError(f"--id: unknown id {args.id} (the index holds {len(idx)} items)") from None
    if args.image is not None:
        existing_file("--image", args.image)
        return for_flag("--image", SearchError, image_query_vector, idx, args.image)
    return for_flag("--text", SearchError, text_query_vector, idx, args.text)


def _cmd_query(args) -> int:
    from eval_probes.search.index import SearchIndex
    from eval_probes.search.query import result_rows

    idx = SearchIndex.load(existing_dir("--index", args.index))
    if args.nprobe is not None:
        idx.set_params(nprobe=args.nprobe)
    q = _query_vector(idx, args)
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


def _cmd_eval(args) -> int:
    from data.common import write_json
    from eval_probes.search.index import SearchIndex
    from eval_probes.search.query import evaluate_index, format_eval, read_phenomena

    idx = SearchIndex.load(existing_dir("--index", args.index))
    if args.nprobe is not None:
        idx.set_params(nprobe=args.nprobe)
    phen = []
    if args.phenomena:
        existing_file("--phenomena", args.phenomena)
        phen = for_flag("--phenomena", SearchError, read_phenomena, args.phenomena, idx)
    res = evaluate_index(idx, n_queries=args.queries, k=args.k, rerank=args.rerank, candidates=args.candidates,
                         seed=args.seed, phenomena=phen)
    if args.out:
        write_json(args.out, res)
    print(json.dumps(res, default=float) if args.json else format_eval(res))
    return 0


# ----------------------------------------------------------------------------------------------
# caption, align, queries, serve


def _cmd_caption(args) -> int:
    import data as data_lib
    from data.captions import caption_dataset, write_captions

    ds = data_lib.build_dataset(args.data, args.split)
    t0 = time.time()
    records = caption_dataset(ds, args.data, args.split, args.fraction, seed=args.seed, captioner=args.captioner)
    write_captions(records, args.out)
    distinct = len({r["caption"] for r in records})
    print(f"wrote {len(records)} captions ({distinct} distinct, captioner '{records[0]['captioner']}') of "
          f"{len(ds)} {args.data} {args.split} images to {args.out}  ({time.time() - t0:.1f} s)")
    for r in records[:3]:
        print(f"  {r['id']}: {r['caption']}")
    return 0


def _train_heads(args):
    """Train (or, with --resume, continue) alignment heads; returns ``(HEAD_DIR, heads or a status dict)``."""
    from eval_probes.search.align import AlignConfig, config_from_overrides
    from pretrain.align import align_embeddings, resume_alignment

    if args.resume:
        given = [f for f in ("embeddings", "captions", "out") if getattr(args, f)]
        if given:
            raise CliError(f"--resume takes the run's own config.yaml; drop --{given[0]} (key=value overrides "
                           f"of the run config may follow)")
        existing_dir("--resume", args.resume)
        return args.resume, resume_alignment(args.resume, args.overrides, progress=not args.quiet)
    missing = [f"--{f}" for f in ("embeddings", "captions", "out") if not getattr(args, f)]
    if missing:
        raise CliError(f"the following arguments are required: {', '.join(missing)} (or --resume HEAD_DIR)")
    existing_dir("--embeddings", args.embeddings)
    existing_file("--captions", args.captions)
    flags = AlignConfig(text_encoder=args.text_encoder, out_dim=args.out_dim, hidden_dim=args.hidden_dim,
                        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    cfg = config_from_overrides(args.overrides, base=flags)  # key=value for every other setting
    return args.out, align_embeddings(args.embeddings, args.captions, args.out, cfg, progress=not args.quiet)


def _cmd_align(args) -> int:
    from pretrain.engines import shutdown_distributed

    t0 = time.time()
    ok = False
    try:  # under the deepspeed launcher (engine=deepspeed) every rank runs this; rank 0 reports
        out, result = _train_heads(args)
        ok = True
    finally:
        shutdown_distributed(wait=ok)  # nothing to do outside a launcher job
    if isinstance(result, dict):
        if "stopped_at" in result:
            print(f"align: stopped after step {result['stopped_at']} of {result['max_steps']} with a checkpoint; "
                  f"continue with --resume {out}")
        return 0
    heads, m = result, result.info["metrics"]
    val = (f", validation loss {m['val_loss']:.3f}, caption accuracy {100 * m['val_caption_acc']:.1f}%"
           if "val_loss" in m else "")
    print(f"trained alignment heads ({heads.image_dim} -> {heads.out_dim} <- {heads.text_dim}, "
          f"text encoder '{heads.text_encoder_name}') on {m['pairs']} pairs: loss {m['train_loss_first_epoch']:.3f} "
          f"-> {m['train_loss']:.3f}{val}; wrote {out}  ({time.time() - t0:.1f} s)")
    return 0


def _cmd_queries(args) -> int:
    from eval_probes.search.embed import EmbeddingStore
    from eval_probes.search.query import embedding_queries, write_queries

    store = EmbeddingStore(existing_dir("--embeddings", args.embeddings))
    queries, spec, split = for_flag("--embeddings", SearchError, embedding_queries, store, args.rare_fraction)
    out = write_queries(queries, args.out)
    print(f"wrote {len(queries)} named queries ({sum(q.rare for q in queries)} rare) for {spec} {split} to {out}")
    return 0


def _cmd_serve(args) -> int:
    from eval_probes.search.serve import make_server, serve

    index = existing_dir("--index", args.index)
    try:  # bind first, so that a busy port is a one-line error
        server = make_server(index, host=args.host, port=args.port, max_k=args.max_k, candidates=args.candidates,
                             quiet=args.quiet)
    except OSError as exc:
        raise CliError(f"--port: cannot listen on {args.host}:{args.port} ({exc.strerror or exc})") from None
    serve(server=server)
    return 0


# ----------------------------------------------------------------------------------------------
# parsers


def _add_embed_parser(sub) -> None:
    e = one_line_errors(sub.add_parser(
        "embed", help="embed a dataset with a run or a packaged encoder, in resumable shards",
        description="Write embeddings of DATA to EMB_DIR (shard_*.npy, ids_*.npy, items.jsonl, meta.json). "
                    "Run again after an interruption: completed shards are kept."))
    who = e.add_mutually_exclusive_group(required=True)
    who.add_argument("--run", metavar="RUN_DIR", help="a training run of this project (weights.safetensors)")
    who.add_argument("--encoder", metavar="NAME", help="a packaged encoder: efficientnet_lite0 (ImageNet-pretrained)")
    e.add_argument("--data", required=True, help="dataset spec: mnist5k, digits or folder:PATH (clips for "
                                                 "--modality video/audio: moving_digits, tuxpaint_clips, clips:FILE)")
    e.add_argument("--modality", default="image", choices=["image", "video", "audio"],
                   help="what to embed: images, or a VATT run's clips (video: found by --text queries)")
    e.add_argument("--split", default="train", choices=["train", "test"])
    e.add_argument("--out", required=True, metavar="EMB_DIR")
    e.add_argument("--shard-size", type=positive_int("--shard-size"), default=4096)
    e.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    e.add_argument("--batch-size", type=positive_int("--batch-size"), default=128)
    e.add_argument("--image-size", type=positive_int("--image-size"), default=None,
                   help="side length fed to the encoder (default: the run's, or 224 for packaged models)")
    e.add_argument("--limit", type=positive_int("--limit"), default=None, help="embed only the first N items")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(fn=_cmd_embed, label="embed")


def _command(ss, name: str, fn, help: str, example: str | None = None):
    """Add ``pretrain search NAME`` (runs ``fn``); ``example``: the arguments of the example in its description."""
    description = None if example is None else f"Example: pretrain search {name} {example}"
    p = ss.add_parser(name, help=help, description=description)
    p.set_defaults(fn=fn, label=f"search {name}")
    return p


def _add_dirs(p, *flags: str) -> None:
    """Add the required directory arguments ``flags`` (``--embeddings``, ``--index``)."""
    for flag in flags:
        p.add_argument(flag, required=True, metavar={"--embeddings": "EMB_DIR", "--index": "INDEX_DIR"}[flag])


def _add_index_parsers(ss) -> None:
    from eval_probes.search.index import KINDS

    b = _command(ss, "build", _cmd_build, "build a FAISS index from an embeddings directory")
    _add_dirs(b, "--embeddings")
    b.add_argument("--out", required=True, metavar="INDEX_DIR")
    b.add_argument("--index", default="auto", choices=["auto", *KINDS],
                   help="auto: exact up to 100k vectors, else IVF-PQ with a refine stage fitted to the budget")
    b.add_argument("--memory-budget", default="4GB", help="memory the index may use, e.g. 4GB, 512MB")
    b.add_argument("--heads", metavar="HEAD_DIR", default=None,
                   help="alignment heads (pretrain search align): index the aligned embeddings, for text queries")
    b.add_argument("--nlist", type=positive_int("--nlist"), default=None, help="inverted lists (IVF kinds)")
    b.add_argument("--nprobe", type=positive_int("--nprobe"), default=None, help="lists visited per query")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--quiet", action="store_true")

    q = _command(ss, "query", _cmd_query, "top-k results for a text, an image file or an indexed id")
    _add_dirs(q, "--index")
    what = q.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="a text query (needs an index built with alignment heads)")
    what.add_argument("--image", metavar="PATH", help="an image file")
    what.add_argument("--id", type=int, metavar="N", help="an indexed item")
    q.add_argument("-k", type=positive_int("-k"), default=10)
    q.add_argument("--rerank", default=None, metavar="NAME", help="re-rank the candidates, e.g. 'exact'")
    q.add_argument("--candidates", type=positive_int("--candidates"), default=None,
                   help="candidates handed to the re-ranker (default max(10k, 100))")
    q.add_argument("--nprobe", type=positive_int("--nprobe"), default=None)
    q.add_argument("--json", action="store_true", help="one JSON object instead of a table")

    ev = _command(ss, "eval", _cmd_eval, "recall@k against exact search, latency and QPS; nDCG@10 and recall@100 "
                                         "of named phenomena")
    _add_dirs(ev, "--index")
    ev.add_argument("--queries", type=positive_int("--queries"), default=200,
                    help="indexed items used as queries for recall against exact search")
    ev.add_argument("-k", type=positive_int("-k"), default=10)
    ev.add_argument("--rerank", default=None, metavar="NAME")
    ev.add_argument("--candidates", type=positive_int("--candidates"), default=None)
    ev.add_argument("--nprobe", type=positive_int("--nprobe"), default=None)
    ev.add_argument("--phenomena", metavar="FILE.jsonl", help="named queries with relevant ids "
                    "(one {\"name\", \"text\"|\"id\"|\"image\", \"relevant\"} per line)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--json", action="store_true")
    ev.add_argument("--out", help="also write the results as JSON to this file")


def _add_text_parsers(ss) -> None:
    from data.captions import list_captioners
    from eval_probes.search.text import list_text_encoders

    c = _command(ss, "caption", _cmd_caption,
                 "caption a random subset of a dataset (JSONL), as AION-Search's vision-language model did",
                 "--data mnist5k --fraction 0.3 --out captions.jsonl --seed 0")
    c.add_argument("--data", required=True, help="dataset spec: mnist5k, digits or folder:PATH")
    c.add_argument("--split", default="train", choices=["train", "test"])
    c.add_argument("--fraction", type=fraction("--fraction"), default=0.3, help="fraction of the images to caption")
    c.add_argument("--out", required=True, metavar="CAPTIONS.jsonl")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--captioner", default="auto", choices=["auto", *list_captioners()],
                   help="auto: measured-attribute captions for digit sets, class names otherwise")

    a = _command(ss, "align", _cmd_align, "train heads that align image embeddings with caption embeddings (InfoNCE)",
                 "--embeddings emb/ --captions captions.jsonl --out heads/")
    a.add_argument("--embeddings", metavar="EMB_DIR")
    a.add_argument("--captions", metavar="CAPTIONS.jsonl")
    a.add_argument("--out", metavar="HEAD_DIR", help="the heads, and the directory of their training run")
    a.add_argument("--resume", metavar="HEAD_DIR", help="continue a run stopped with stop_at=N")
    a.add_argument("--text-encoder", default="minilm", choices=list_text_encoders())
    a.add_argument("--epochs", type=positive(int, "--epochs"), default=20)
    a.add_argument("--out-dim", type=positive(int, "--out-dim"), default=128)
    a.add_argument("--hidden-dim", type=positive(int, "--hidden-dim"), default=512)
    a.add_argument("--batch-size", type=positive(int, "--batch-size"), default=256)
    a.add_argument("--lr", type=positive(float, "--lr"), default=1e-3)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--quiet", action="store_true", help="no progress bar")
    a.add_argument("overrides", nargs="*", metavar="key=value",
                   help="any other AlignConfig setting, e.g. temperature=0.05 dropout=0.1 stop_at=40 "
                        "(with --resume: run config keys)")

    q = _command(ss, "queries", _cmd_queries, "named class and rare-attribute queries with measured ground truth "
                                              "(digit sets), for 'search eval --phenomena'")
    _add_dirs(q, "--embeddings")
    q.add_argument("--out", required=True, metavar="FILE.jsonl")
    q.add_argument("--rare-fraction", type=fraction("--rare-fraction"), default=0.05,
                   help="each rare query's relevant set: this fraction of the most extreme items")

    s = _command(ss, "serve", _cmd_serve, "JSON search API and a web page with a query box and a grid of thumbnails",
                 "--index index/ --port 8000, then open http://127.0.0.1:8000/")
    _add_dirs(s, "--index")
    s.add_argument("--port", type=port, default=8000)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    s.add_argument("--max-k", type=positive(int, "--max-k"), default=100, help="largest k a client may ask for")
    s.add_argument("--candidates", type=positive(int, "--candidates"), default=None,
                   help="candidates handed to the re-ranker")
    s.add_argument("--quiet", action="store_true", help="no access log")


def add_parsers(sub) -> None:
    """Add ``embed`` and the ``search`` group to the ``pretrain`` sub-command parser."""
    _add_embed_parser(sub)
    s = one_line_errors(sub.add_parser("search", help="semantic search: caption, align, build, query, serve, eval",
                                       description="Semantic search over embeddings (AION-Search style)."))
    ss = s.add_subparsers(dest="search_command", metavar="SUBCOMMAND", parser_class=OneLineParser)
    ss.required = True
    _add_index_parsers(ss)
    _add_text_parsers(ss)
