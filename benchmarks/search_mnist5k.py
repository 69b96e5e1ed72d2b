"""Text search on mnist5k: aligned embeddings against two baselines, with and without re-ranking.

The AION-Search pipeline end to end on the 4,000 mnist5k training digits:

1. caption a random 30% of them (``mnist`` captioner: label + measured thickness, slant, size);
2. embed every image with a frozen encoder (default: the packaged ImageNet EfficientNet-Lite0);
3. align image and caption embeddings with small heads (InfoNCE), MiniLM on the text side;
4. index the aligned image embeddings and answer the named queries of
   :func:`data.captions.digit_queries` (10 class queries, 6 rare-attribute queries
   whose ground truth is the measured attribute, e.g. the 5% thickest strokes).

Scored by nDCG@10 and recall@100 (AION-Search's metrics; recall capped: hits / min(relevant, 100))
against:

- class-name-only captions: the same images, the same subset, captions "the digit seven" only;
- image similarity: query by an example image instead of text (examples drawn from the test
  split that satisfy the same criterion; the mean over 5 examples per query);
- re-ranking: a compressed IVF-PQ index (no refine stage) with and without ``--rerank exact``.

    python -m benchmarks.search_mnist5k [--image-size 96] [--seed 0]

Embeddings are cached in ``--work-dir`` (resumable); results go to ``WORK_DIR/results_seed{SEED}.json``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import data as D
from eval_probes.search.align import AlignConfig
from pretrain.align import align_embeddings
from data.captions import caption_dataset, digit_queries, write_captions
from eval_probes.search.embed import EmbeddingStore, embed_dataset, load_encoder
from eval_probes.search.index import build_index
from eval_probes.search.metrics import ndcg_at_k, recall_at_k

TEST_OFFSET = 100_000  # test-split ids when train and test are ranked together


def _embed(enc, name: str, split: str, image_size: int, out: Path) -> EmbeddingStore:
    ds = D.build_dataset("mnist5k", split)
    meta = {"encoder": {"kind": "packaged", "name": name, "run_dir": None, "image_size": image_size},
            "data": {"spec": "mnist5k", "split": split, "image_size": image_size, "root": None}}
    return embed_dataset(enc.embed, ds, out, shard_size=1024, dtype="float16", batch_size=64, meta_extra=meta)


def _score(idx, qvecs: np.ndarray, relevant: list, rerank=None) -> dict:
    _, got = idx.search(qvecs, 100, rerank=rerank, candidates=400 if rerank else None)
    rel = [relevant] * len(got)
    # recall@100 is capped (hits / min(|relevant|, 100)): the class and rare sets hold 47-400 items
    return {"ndcg@10": ndcg_at_k(got, rel, 10), "recall@100": recall_at_k(got, rel, 100, capped=True)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--encoder", default="efficientnet_lite0")
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--fraction", type=float, default=0.3)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--examples", type=int, default=5, help="example images per query for the image baseline")
    ap.add_argument("--work-dir", default="runs/search_mnist5k")
    args = ap.parse_args(argv)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    times = {}

    t0 = time.time()
    enc = load_encoder(encoder_name=args.encoder, image_size=args.image_size)
    train_store = _embed(enc, args.encoder, "train", args.image_size, work / "emb_train")
    test_store = _embed(enc, args.encoder, "test", args.image_size, work / "emb_test")
    times["embed_s"] = round(time.time() - t0, 1)

    train, test = D.build_dataset("mnist5k", "train"), D.build_dataset("mnist5k", "test")
    t0 = time.time()
    for kind, captioner in (("attr", "mnist"), ("cls", "classname")):
        recs = caption_dataset(train, "mnist5k", "train", args.fraction, seed=args.seed, captioner=captioner)
        write_captions(recs, work / f"captions_{kind}.jsonl")
    times["caption_s"] = round(time.time() - t0, 1)

    heads, t0 = {}, time.time()
    for kind in ("attr", "cls"):
        cfg = AlignConfig(epochs=args.epochs, seed=args.seed)
        heads[kind] = align_embeddings(work / "emb_train", work / f"captions_{kind}.jsonl", work / f"heads_{kind}",
                                       cfg, progress=False)
    times["align_s"] = round(time.time() - t0, 1)

    ids, raw = train_store.load()
    t0 = time.time()
    common = {"embeddings": str((work / "emb_train").resolve())}
    indexes = {
        "aligned": build_index(heads["attr"].image(raw), ids, work / "index_aligned", kind="flat", progress=False,
                               meta_extra={**common, "heads": str((work / "heads_attr").resolve())}),
        "classname": build_index(heads["cls"].image(raw), ids, work / "index_classname", kind="flat",
                                 progress=False, meta_extra={**common, "heads": str((work / "heads_cls").resolve())}),
        "image": build_index(raw, ids, work / "index_image", kind="flat", progress=False, meta_extra=common),
        "aligned_ivfpq": build_index(heads["attr"].image(raw), ids, work / "index_aligned_ivfpq", kind="ivfpq",
                                     progress=False, params={"refine": "none", "m": 8},
                                     meta_extra={**common, "heads": str((work / "heads_attr").resolve())}),
    }
    times["index_s"] = round(time.time() - t0, 1)

    # ground truth on the indexed (train) digits; example images from the test split, selected
    # by the same criteria over train and test ranked together
    labels = train.labels.numpy()[ids]
    queries = digit_queries(train.images[ids], labels, ids)
    both = digit_queries(torch.cat([train.images, test.images]),
                         np.concatenate([train.labels.numpy(), test.labels.numpy()]),
                         np.concatenate([np.arange(len(train)), TEST_OFFSET + np.arange(len(test))]))
    examples = {q.name: q.relevant[q.relevant >= TEST_OFFSET] - TEST_OFFSET for q in both}
    _, test_raw = test_store.load()
    rng = np.random.default_rng(args.seed)

    t0 = time.time()
    rows = []
    for q in queries:
        row = {"name": q.name, "text": q.text, "rare": q.rare, "relevant": int(len(q.relevant))}
        row["aligned"] = _score(indexes["aligned"], heads["attr"].text([q.text]), q.relevant)
        row["classname"] = _score(indexes["classname"], heads["cls"].text([q.text]), q.relevant)
        ex = examples.get(q.name, np.zeros(0, np.int64))
        if len(ex):
            pick = rng.choice(ex, size=min(args.examples, len(ex)), replace=False)
            row["image"] = _score(indexes["image"], test_raw[pick].astype(np.float32), q.relevant)
            row["image_examples"] = [int(i) for i in pick]
        qv = heads["attr"].text([q.text])
        row["aligned_ivfpq"] = _score(indexes["aligned_ivfpq"], qv, q.relevant)
        row["aligned_ivfpq_rerank"] = _score(indexes["aligned_ivfpq"], qv, q.relevant, rerank="exact")
        rows.append(row)
    times["queries_s"] = round(time.time() - t0, 1)

    methods = ("aligned", "classname", "image", "aligned_ivfpq", "aligned_ivfpq_rerank")
    summary = {}
    for group, sel in (("class", [r for r in rows if not r["rare"]]), ("rare", [r for r in rows if r["rare"]])):
        summary[group] = {m: {metric: float(np.mean([r[m][metric] for r in sel if m in r]))
                              for metric in ("ndcg@10", "recall@100")} for m in methods}
    result = {"seed": args.seed, "encoder": args.encoder, "image_size": args.image_size, "fraction": args.fraction,
              "epochs": args.epochs, "captioned": int(round(args.fraction * len(train))), "indexed": int(len(ids)),
              "align_metrics": {k: h.info["metrics"] for k, h in heads.items()},
              "ivfpq_params": indexes["aligned_ivfpq"].meta["params"], "times": times,
              "torch_threads": torch.get_num_threads(), "summary": summary, "queries": rows}
    (work / f"results_seed{args.seed}.json").write_text(json.dumps(result, indent=1, default=float))
    print(format_tables(result))
    return result


def format_tables(res: dict) -> str:
    names = {"aligned": "aligned (attribute captions)", "classname": "aligned (class-name-only captions)",
             "image": "image similarity (example image)", "aligned_ivfpq": "aligned, IVF-PQ (compressed)",
             "aligned_ivfpq_rerank": "aligned, IVF-PQ + rerank exact"}
    out = ["| search | class queries nDCG@10 | class recall@100 | rare queries nDCG@10 | rare recall@100 |",
           "|---|---|---|---|---|"]
    for m, label in names.items():
        c, r = res["summary"]["class"][m], res["summary"]["rare"][m]
        out.append(f"| {label} | {c['ndcg@10']:.3f} | {c['recall@100']:.3f} | {r['ndcg@10']:.3f} | "
                   f"{r['recall@100']:.3f} |")
    out += ["", "| rare query | relevant | aligned | class-name-only | image similarity | IVF-PQ | IVF-PQ + rerank |",
            "|---|---|---|---|---|---|---|"]
    for q in res["queries"]:
        if not q["rare"]:
            continue
        cells = [f"{q[m]['ndcg@10']:.3f}" if m in q else "-" for m in names]
        out.append(f"| {q['text']} | {q['relevant']} | " + " | ".join(cells) + " |")
    t = res["times"]
    out.append(f"\nseed {res['seed']}, {res['encoder']} at {res['image_size']} px, {res['captioned']} captioned / "
               f"{res['indexed']} indexed, {res['epochs']} align epochs; wall time: embed {t['embed_s']} s, caption "
               f"{t['caption_s']} s, align {t['align_s']} s (both heads), index {t['index_s']} s, queries "
               f"{t['queries_s']} s (nDCG@10 per query shown for the rare ones)")
    return "\n".join(out)


if __name__ == "__main__":
    main()
