"""``pretrain search`` sub-commands for text search: caption, align, queries, serve.

The work happens in ``eval_probes.search`` (captions, text, align, serve); this module parses
arguments and prints. ``pretrain.search_cli`` adds these parsers to the ``search`` group.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


class TextCliError(ValueError):
    """A command-line mistake of the text-search commands; printed as one line."""


def _fraction(name):
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            v = float("nan")
        if not 0.0 < v <= 1.0:
            raise argparse.ArgumentTypeError(f"{name} must be a number in (0, 1], got '{text}'")
        return v

    return parse


def _positive(kind, name):
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a positive {kind.__name__}, got '{text}'") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be a positive {kind.__name__}, got '{text}'")
        return v

    return parse


def _port(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = -1
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"--port must be an integer in [0, 65535], got '{text}'")
    return v


def _need_dir(flag: str, path) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise TextCliError(f"{flag}: directory '{p}' does not exist")
    return p


# ----------------------------------------------------------------------------------------------
# commands


def _cmd_caption(args) -> int:
    import data as data_lib
    from eval_probes.search.captions import caption_dataset, write_captions

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


def _cmd_align(args) -> int:
    from eval_probes.search.align import AlignConfig, align_embeddings

    _need_dir("--embeddings", args.embeddings)
    if not Path(args.captions).is_file():
        raise TextCliError(f"--captions: file '{args.captions}' does not exist")
    cfg = AlignConfig(text_encoder=args.text_encoder, out_dim=args.out_dim, hidden_dim=args.hidden_dim,
                      epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    t0 = time.time()
    heads = align_embeddings(args.embeddings, args.captions, args.out, cfg, progress=not args.quiet)
    m = heads.info["metrics"]
    val = (f", validation loss {m['val_loss']:.3f}, caption accuracy {100 * m['val_caption_acc']:.1f}%"
           if "val_loss" in m else "")
    print(f"trained alignment heads ({heads.image_dim} -> {heads.out_dim} <- {heads.text_dim}, "
          f"text encoder '{heads.text_encoder_name}') on {m['pairs']} pairs: loss {m['train_loss_first_epoch']:.3f} "
          f"-> {m['train_loss']:.3f}{val}; wrote {args.out}  ({time.time() - t0:.1f} s)")
    return 0


def _cmd_queries(args) -> int:
    import data as data_lib
    from eval_probes.search.captions import DIGIT_DATASETS, digit_queries
    from eval_probes.search.embed import EmbeddingStore

    store = EmbeddingStore(_need_dir("--embeddings", args.embeddings))
    spec, split = store.meta["data"].get("spec"), store.meta["data"].get("split", "train")
    if spec not in DIGIT_DATASETS:
        raise TextCliError(f"--embeddings: named queries with measured ground truth exist for "
                           f"{', '.join(DIGIT_DATASETS)}; these embeddings are of '{spec}'")
    ds = data_lib.build_dataset(spec, split)
    ids, _ = store.load(np.float16)
    queries = digit_queries(ds.images[ids], ds.labels.numpy()[ids], ids, rare_fraction=args.rare_fraction)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "w") as fh:
        for q in queries:
            fh.write(json.dumps({"name": q.name, "text": q.text, "rare": q.rare,
                                 "relevant": [int(i) for i in q.relevant]}) + "\n")
    tmp.replace(out)
    print(f"wrote {len(queries)} named queries ({sum(q.rare for q in queries)} rare) for {spec} {split} to {out}")
    return 0


def _cmd_serve(args) -> int:
    from eval_probes.search.serve import serve

    from eval_probes.search.serve import make_server

    index = _need_dir("--index", args.index)
    try:  # bind first, so that a busy port is a one-line error
        server = make_server(index, host=args.host, port=args.port, max_k=args.max_k, candidates=args.candidates,
                             quiet=args.quiet)
    except OSError as exc:
        raise TextCliError(f"--port: cannot listen on {args.host}:{args.port} ({exc.strerror or exc})") from None
    serve(server=server)
    return 0


# ----------------------------------------------------------------------------------------------
# parsers


def add_parsers(ss) -> None:
    """Add caption, align, queries and serve to the ``search`` sub-parsers ``ss``."""
    from eval_probes.search.captions import list_captioners
    from eval_probes.search.text import list_text_encoders

    c = ss.add_parser("caption", help="caption a random subset of a dataset (JSONL), as AION-Search's "
                                      "vision-language model did",
                      description="Example: pretrain search caption --data mnist5k --fraction 0.3 "
                                  "--out captions.jsonl --seed 0")
    c.add_argument("--data", required=True, help="dataset spec: mnist5k, digits or folder:PATH")
    c.add_argument("--split", default="train", choices=["train", "test"])
    c.add_argument("--fraction", type=_fraction("--fraction"), default=0.3, help="fraction of the images to caption")
    c.add_argument("--out", required=True, metavar="CAPTIONS.jsonl")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--captioner", default="auto", choices=["auto", *list_captioners()],
                   help="auto: measured-attribute captions for digit sets, class names otherwise")
    c.set_defaults(fn=_cmd_caption, label="search caption")

    a = ss.add_parser("align", help="train heads that align image embeddings with caption embeddings (InfoNCE)",
                      description="Example: pretrain search align --embeddings emb/ --captions captions.jsonl "
                                  "--out heads/")
    a.add_argument("--embeddings", required=True, metavar="EMB_DIR")
    a.add_argument("--captions", required=True, metavar="CAPTIONS.jsonl")
    a.add_argument("--out", required=True, metavar="HEAD_DIR")
    a.add_argument("--text-encoder", default="minilm", choices=list_text_encoders())
    a.add_argument("--epochs", type=_positive(int, "--epochs"), default=20)
    a.add_argument("--out-dim", type=_positive(int, "--out-dim"), default=128)
    a.add_argument("--hidden-dim", type=_positive(int, "--hidden-dim"), default=512)
    a.add_argument("--batch-size", type=_positive(int, "--batch-size"), default=256)
    a.add_argument("--lr", type=_positive(float, "--lr"), default=1e-3)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--quiet", action="store_true", help="no progress bar")
    a.set_defaults(fn=_cmd_align, label="search align")

    q = ss.add_parser("queries", help="named class and rare-attribute queries with measured ground truth "
                                      "(digit sets), for 'search eval --phenomena'")
    q.add_argument("--embeddings", required=True, metavar="EMB_DIR")
    q.add_argument("--out", required=True, metavar="FILE.jsonl")
    q.add_argument("--rare-fraction", type=_fraction("--rare-fraction"), default=0.05,
                   help="each rare query's relevant set: this fraction of the most extreme items")
    q.set_defaults(fn=_cmd_queries, label="search queries")

    s = ss.add_parser("serve", help="JSON search API and a web page with a query box and a grid of thumbnails",
                      description="Example: pretrain search serve --index index/ --port 8000, then open "
                                  "http://127.0.0.1:8000/")
    s.add_argument("--index", required=True, metavar="INDEX_DIR")
    s.add_argument("--port", type=_port, default=8000)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    s.add_argument("--max-k", type=_positive(int, "--max-k"), default=100, help="largest k a client may ask for")
    s.add_argument("--candidates", type=_positive(int, "--candidates"), default=None,
                   help="candidates handed to the re-ranker")
    s.add_argument("--quiet", action="store_true", help="no access log")
    s.set_defaults(fn=_cmd_serve, label="search serve")


def load_heads_for_build(heads_dir, vecs: np.ndarray):
    """``search build --heads``: the aligned image vectors and the absolute HEAD_DIR."""
    from eval_probes.search.align import AlignmentHeads

    _need_dir("--heads", heads_dir)
    heads = AlignmentHeads.load(heads_dir)
    if vecs.shape[1] != heads.image_dim:
        raise TextCliError(f"--heads: the heads in '{heads_dir}' take {heads.image_dim}-d image embeddings, "
                           f"these embeddings are {vecs.shape[1]}-d")
    return heads.image(vecs), str(Path(heads_dir).resolve())
