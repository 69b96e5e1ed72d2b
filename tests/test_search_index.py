"""Embeddings in resumable shards, index choice and build, re-ranking, metrics and the embed /
search build / query / eval commands, on real digits and small clustered vectors."""
import json
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

import data as data_lib
from eval_probes.search import SearchError
from eval_probes.search import embed as embed_mod
from eval_probes.search import index as index_mod
from eval_probes.search.embed import EmbeddingStore, embed_dataset, write_embeddings
from eval_probes.search.index import SearchIndex, build_index, choose_index, l2_normalize, parse_memory
from eval_probes.search.metrics import ndcg_at_k, recall_at_k, time_queries
from eval_probes.search.rerank import Reranker, get_reranker, register_reranker
from launch.cli import main as pretrain_main

ROOT = Path(__file__).resolve().parents[1]


def clustered(n, d, clusters=20, seed=0, spread=0.35):
    """Gaussian clusters with a low-dimensional spread inside each, like real embeddings."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, d)).astype(np.float32)
    basis = rng.standard_normal((clusters, 8, d)).astype(np.float32) / np.sqrt(8)
    lab = rng.integers(0, clusters, n)
    z = rng.standard_normal((n, 8)).astype(np.float32)
    x = centers[lab] + spread * np.einsum("nk,nkd->nd", z, basis[lab])
    return (x + 0.05 * rng.standard_normal((n, d))).astype(np.float32)


def exact_topk(x, q, k):
    s = l2_normalize(q) @ l2_normalize(x).T
    return np.argsort(-s, axis=1)[:, :k]


def cli(capsys, *argv):
    """Run ``pretrain ...`` in this process: (return code, stdout, stderr)."""
    try:
        rc = pretrain_main([str(a) for a in argv])
    except SystemExit as exc:  # argparse errors
        rc = exc.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def pixels_embed(images):
    """A cheap frozen encoder: a fixed projection of the pixels."""
    x = images.float().flatten(1) / 255.0
    w = torch.Generator().manual_seed(0)
    return x @ torch.randn(x.shape[1], 16, generator=w)


# ------------------------------------------------------------------------------------------------
# embeddings


def test_embed_shards_and_resume_after_interruption(tmp_path):
    ds = data_lib.build_dataset("digits", "train")
    meta = {"encoder": {"kind": "packaged", "name": "pixels"}, "data": {"spec": "digits", "split": "train"}}
    ref = embed_dataset(pixels_embed, ds, tmp_path / "ref", shard_size=300, dtype="float16", progress=False,
                        meta_extra=meta)

    real_save, calls = embed_mod._save_npy_atomic, []

    def failing_save(path, arr):  # fault injection: the process dies while writing shard 2
        calls.append(path.name)
        if path.name == "shard_00002.npy":
            path.with_name(f".{path.name}.tmp-123").write_bytes(b"half a shard")
            raise KeyboardInterrupt
        real_save(path, arr)

    out = tmp_path / "emb"
    with mock.patch.object(embed_mod, "_save_npy_atomic", failing_save), pytest.raises(KeyboardInterrupt):
        embed_dataset(pixels_embed, ds, out, shard_size=300, dtype="float16", progress=False, meta_extra=meta)
    assert sorted(p.name for p in out.glob("ids_*.npy")) == ["ids_00000.npy", "ids_00001.npy"]
    assert not (out / "shard_00002.npy").exists()
    assert json.loads((out / "meta.json").read_text())["complete"] is False
    with pytest.raises(SearchError, match="incomplete"):
        EmbeddingStore(out)
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("*_0000[01].npy")}

    seen = []

    def counting_embed(images):
        seen.append(len(images))
        return pixels_embed(images)

    store = embed_dataset(counting_embed, ds, out, shard_size=300, dtype="float16", progress=False, meta_extra=meta)
    assert sum(seen) == len(ds) - 600  # shards 0 and 1 were kept, not recomputed
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*_0000[01].npy")} == done
    assert not list(out.glob(".*tmp*")), "the half-written temporary shard was not cleaned up"
    m = store.meta
    assert m["complete"] and m["count"] == len(ds) and m["num_shards"] == 5 and m["dim"] == 16
    assert m["dtype"] == "float16" and m["data"]["spec"] == "digits" and m["encoder"]["name"] == "pixels"
    ids, vecs = store.load()
    rids, rvecs = ref.load()
    assert vecs.dtype == np.float32 and np.load(out / "shard_00000.npy").dtype == np.float16
    np.testing.assert_array_equal(ids, np.arange(len(ds)))
    np.testing.assert_array_equal(ids, rids)
    np.testing.assert_allclose(vecs, rvecs, rtol=1e-3, atol=1e-3)
    items = store.items()
    assert items[7] == {"id": 7, "path": None, "label": int(ds.labels[7])}
    np.testing.assert_array_equal(store.lookup([599, 3]), vecs[[599, 3]])
    with pytest.raises(SearchError, match="unknown id 99999"):
        store.lookup([99999])
    # a finished directory is left alone; a different job in it is refused
    assert embed_dataset(counting_embed, ds, out, shard_size=300, dtype="float16", progress=False,
                         meta_extra=meta).count == len(ds)
    with pytest.raises(SearchError, match="dtype"):
        embed_dataset(pixels_embed, ds, out, shard_size=300, dtype="float32", progress=False, meta_extra=meta)


# ------------------------------------------------------------------------------------------------
# index choice and build


def test_auto_index_choice_rules():
    gb = 1 << 30
    assert choose_index(5_000, 1280, 4 * gb).kind == "flat"
    assert choose_index(100_000, 256, 4 * gb).kind == "flat"
    p = choose_index(1_000_000, 256, 4 * gb)  # floats fit: PQ candidates re-scored with full floats
    assert p.kind == "ivfpq" and p.params["refine"] == "flat" and p.params["nlist"] == 1024
    assert p.params["m"] == 32 and p.params["nbits"] == 8 and p.est_bytes <= 4 * gb
    p = choose_index(10_000_000, 256, 8 * gb)  # 10 GB of floats do not fit: SQ8 refine
    assert p.kind == "ivfpq" and p.params["refine"] == "sq8" and p.params["nlist"] == 4096 and p.est_bytes <= 8 * gb
    p = choose_index(10_000_000, 256, 1 * gb)  # only PQ codes fit
    assert p.kind == "ivfpq" and p.params["refine"] == "none"
    p = choose_index(50_000, 1280, 100 << 20)  # small but over budget: compressed
    assert p.kind == "ivfpq" and p.est_bytes <= 100 << 20
    with pytest.raises(SearchError, match="too small"):
        choose_index(100_000_000, 256, 1 * gb)
    with pytest.raises(SearchError, match="too small"):
        choose_index(1_000, 256, 1000)
    assert parse_memory("4GB") == 4 * gb and parse_memory("512MiB") == 512 << 20 and parse_memory("1.5g") == 3 * gb // 2
    for bad in ("4XB", "-1GB", "lots", "0"):
        with pytest.raises(SearchError):
            parse_memory(bad)


@pytest.mark.parametrize("kind,params,min_recall", [
    ("flat", {}, 1.0),
    ("ivf", {"nlist": 32, "nprobe": 8}, 0.95),
    ("ivfsq", {"nlist": 32, "nprobe": 8}, 0.9),
    ("ivfpq", {"nlist": 32, "nprobe": 8, "m": 8, "nbits": 6, "refine": "sq8", "k_factor": 10}, 0.9),
    ("hnsw", {}, 0.9),
])
def test_each_index_kind_recall_against_exact(tmp_path, kind, params, min_recall):
    x = clustered(3000, 32)
    q = clustered(100, 32, seed=1)
    ids = np.arange(3000) * 7 + 5  # non-trivial ids: the row -> id mapping matters
    idx = build_index(x, ids, tmp_path / "idx", kind=kind, params=params, progress=False)
    assert idx.kind == kind and len(idx) == 3000
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert meta["metric"] == "ip" and meta["normalized"] and meta["dim"] == 32 and meta["count"] == 3000
    loaded = SearchIndex.load(tmp_path / "idx")
    scores, got = loaded.search(q, 10)
    assert got.shape == (100, 10) and np.all(np.diff(scores, axis=1) <= 1e-5)
    truth = ids[exact_topk(x, q, 10)]
    r = recall_at_k(got, truth, 10)
    assert r >= min_recall, (kind, r)
    assert set(np.unique(got)) <= set(ids)


def test_failed_build_leaves_the_previous_index_intact(tmp_path):
    x = clustered(500, 16)
    out = tmp_path / "idx"
    build_index(x, np.arange(500), out, kind="flat", progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with mock.patch.object(index_mod.faiss, "write_index", side_effect=OSError("disk full")), \
            pytest.raises(OSError, match="disk full"):
        build_index(clustered(200, 16, seed=3), np.arange(200), out, kind="flat", progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert len(SearchIndex.load(out)) == 500
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"], "temporary directory left behind"
    build_index(clustered(200, 16, seed=3), np.arange(200), out, kind="flat", progress=False)  # replaces it
    assert len(SearchIndex.load(out)) == 200
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_exact_rerank_improves_a_compressed_index(tmp_path):
    x = clustered(4000, 32, spread=0.5)
    q = clustered(100, 32, seed=2, spread=0.5)
    ids = np.arange(4000)
    emb = write_embeddings(tmp_path / "emb", ids, x)
    idx = build_index(x, ids, tmp_path / "idx", kind="ivfpq", progress=False,
                      params={"nlist": 16, "nprobe": 16, "m": 8, "nbits": 6, "refine": "none"},
                      meta_extra={"embeddings": str(emb.path)})
    truth = exact_topk(x, q, 10)
    _, plain = idx.search(q, 10)
    scores, rr = idx.search(q, 10, rerank="exact", candidates=200)
    _, rr50 = idx.search(q, 10, rerank="exact", candidates=50)
    r0, r50, r1 = recall_at_k(plain, truth, 10), recall_at_k(rr50, truth, 10), recall_at_k(rr, truth, 10)
    assert r1 >= r50 >= r0 and r1 >= 0.95 and r1 - r0 > 0.3, (r0, r50, r1)  # PQ codes alone: ~0.45
    # re-ranked scores are the exact cosine similarities
    np.testing.assert_allclose(scores[:, 0], np.sum(l2_normalize(q) * l2_normalize(x[rr[:, 0]]), axis=1), atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)

    @register_reranker("reverse-test")
    class Reverse(Reranker):  # a plug-in stage: worst candidates first
        def rerank(self, queries, cand_ids, index, k=None):
            s, i = get_reranker("exact").rerank(queries, cand_ids, index)
            return -s[:, ::-1][:, :k], i[:, ::-1][:, :k]

    _, rev = idx.search(q[:3], 5, rerank="reverse-test", candidates=50)
    assert rev.shape == (3, 5) and not np.array_equal(rev, rr[:3, :5])
    with pytest.raises(SearchError, match="unknown re-ranker 'exakt'.*did you mean 'exact'"):
        idx.search(q, 10, rerank="exakt")


def test_metrics_against_hand_computed_values():
    retrieved = np.array([[3, 1, 7, 9], [5, 6, 2, 8]])
    assert recall_at_k(retrieved, [[1, 2], [5, 8]], 2) == pytest.approx((0.5 + 0.5) / 2)
    assert recall_at_k(retrieved, [[1, 2], [5, 8]], 4) == pytest.approx((0.5 + 1.0) / 2)
    assert recall_at_k(retrieved[:1], [[1, 3, 7, 9, 11]], 2, capped=True) == pytest.approx(1.0)
    # binary gains: hits at ranks 2 and 3 of 2 relevant items
    dcg = 1 / np.log2(3) + 1 / np.log2(4)
    assert ndcg_at_k(retrieved[:1], [[1, 7]], 4) == pytest.approx(dcg / (1 + 1 / np.log2(3)))
    assert ndcg_at_k(retrieved[:1], [[3, 1]], 4) == pytest.approx(1.0)
    assert ndcg_at_k(retrieved[:1], [[42]], 4) == 0.0
    assert ndcg_at_k(retrieved[:1], [{7: 2.0, 3: 1.0}], 2) == pytest.approx(
        (1.0 + 0) / (2.0 + 1.0 / np.log2(3)))
    t = time_queries(lambda q: q @ q.T, np.ones((20, 4), np.float32), single=5)
    assert t["n"] == 20 and t["qps"] > 0 and t["latency_ms_p95"] >= t["latency_ms_p50"] > 0


# ------------------------------------------------------------------------------------------------
# the commands


def test_embed_build_query_eval_commands_with_both_encoders(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # a tiny run of this project
    run = tmp_path / "run"
    rc, out, err = cli(capsys, "fit", "--recipe", "launch/recipes/simclr_mnist5k.yaml", "data=digits", "image_size=16",
                       "model.width=8", "batch_size=32", "precision=fp32", "progress=false", "simclr.proj_dim=32",
                       "max_steps=1", f"run_dir={run}")
    assert rc == 0, err
    rc, out, err = cli(capsys, "embed", "--run", run, "--data", "digits", "--out", tmp_path / "emb_run",
                       "--limit", 200, "--shard-size", 64, "--quiet")
    assert rc == 0, err
    store = EmbeddingStore(tmp_path / "emb_run")
    assert store.count == 200 and store.meta["num_shards"] == 4 and store.meta["encoder"]["kind"] == "run"
    assert store.meta["encoder"]["run_dir"] == str(run.resolve()) and store.meta["dtype"] == "float16"

    rc, out, err = cli(capsys, "embed", "--encoder", "efficientnet_lite0", "--data", "digits", "--out",
                       tmp_path / "emb_eff", "--limit", 120, "--image-size", 64, "--dtype", "float32", "--quiet")
    assert rc == 0, err
    eff = EmbeddingStore(tmp_path / "emb_eff")
    ids, vecs = eff.load()
    assert vecs.shape == (120, 1280) and np.isfinite(vecs).all() and eff.meta["encoder"]["name"] == "efficientnet_lite0"
    labels = np.array([eff.items()[i]["label"] for i in ids])
    # ImageNet features already separate digit classes: nearest neighbours mostly share the label
    sims = l2_normalize(vecs) @ l2_normalize(vecs).T
    np.fill_diagonal(sims, -1)
    assert np.mean(labels[sims.argmax(1)] == labels) > 0.6

    rc, out, err = cli(capsys, "search", "build", "--embeddings", tmp_path / "emb_eff", "--out", tmp_path / "idx",
                       "--quiet")
    assert rc == 0 and "'flat' index of 120 vectors" in out, err
    rc, out, err = cli(capsys, "search", "query", "--index", tmp_path / "idx", "--id", 7, "-k", 5, "--json")
    res = json.loads(out)
    assert rc == 0 and len(res["results"]) == 5 and res["results"][0]["id"] == 7
    assert res["results"][0]["score"] == pytest.approx(1.0, abs=1e-4) and res["results"][0]["label"] == labels[7]
    # an image file finds the item it was made from
    ds = data_lib.build_dataset("digits", "train")
    png = tmp_path / "q.png"
    Image.fromarray(ds.images[11, 0].numpy()).save(png)
    rc, out, err = cli(capsys, "search", "query", "--index", tmp_path / "idx", "--image", png, "-k", 3)
    assert rc == 0, err
    first = out.splitlines()[2].split()
    assert first[1] == "11" and float(first[2]) > 0.98, out
    rc, out, err = cli(capsys, "search", "query", "--index", tmp_path / "idx", "--id", 3, "-k", 4, "--rerank", "exact")
    assert rc == 0 and "re-ranked: exact" in out and len(out.splitlines()) == 6

    rc, out, err = cli(capsys, "search", "build", "--embeddings", tmp_path / "emb_run", "--out", tmp_path / "idx2",
                       "--index", "hnsw", "--quiet")
    assert rc == 0, err
    phen = tmp_path / "phen.jsonl"
    # a query whose relevant set (every item) is larger than 100: capped recall@100 reaches 1
    phen.write_text(json.dumps({"name": "like item 3", "id": 3, "relevant": [3]}) + "\n"
                    + json.dumps({"name": "everything", "id": 3, "relevant": list(range(len(ds)))}) + "\n")
    rc, out, err = cli(capsys, "search", "eval", "--index", tmp_path / "idx2", "--queries", 50, "--rerank", "exact",
                       "--phenomena", phen, "--json", "--out", tmp_path / "eval.json")
    assert rc == 0, err
    res = json.loads(out)
    assert res["modes"]["index"]["recall@10"] > 0.8 and res["modes"]["index+rerank:exact"]["recall@10"] == 1.0
    assert res["modes"]["exact (flat, uncompressed)"]["qps"] > 0
    assert res["phenomena"][0]["index+rerank:exact"]["ndcg@10"] == pytest.approx(1.0)
    assert res["phenomena"][1]["relevant"] == len(ds) > 100
    assert res["phenomena"][1]["index"]["recall@100"] == pytest.approx(1.0)
    assert json.loads((tmp_path / "eval.json").read_text())["queries"] == 50


@pytest.mark.parametrize("argv,needle", [
    (["search", "build", "--embeddings", "{tmp}/nope", "--out", "{tmp}/i"], "--embeddings: directory"),
    (["search", "build", "--embeddings", "{emb}", "--out", "{tmp}/i", "--memory-budget", "4XB"],
     "memory budget '4XB' is not a size"),
    (["search", "build", "--embeddings", "{emb}", "--out", "{tmp}/i", "--index", "ivx"],
     "argument --index: invalid choice: 'ivx'"),
    (["search", "build", "--embeddings", "{tmp}", "--out", "{tmp}/i"], "is not an embeddings directory"),
    (["search", "query", "--index", "{tmp}/nope", "--id", "1"], "--index: directory"),
    (["search", "query", "--index", "{idx}", "--id", "1", "-k", "0"], "-k must be a positive integer, got '0'"),
    (["search", "query", "--index", "{idx}", "--id", "1", "-k", "-3"], "-k must be a positive integer"),
    (["search", "query", "--index", "{idx}", "--id", "123456"], "unknown id 123456"),
    (["search", "query", "--index", "{idx}", "--image", "{tmp}/no.png"], "--image: file"),
    (["search", "query", "--index", "{idx}", "--id", "1", "--rerank", "exakt"], "unknown re-ranker 'exakt'"),
    (["search", "eval", "--index", "{idx}", "-k", "0"], "-k must be a positive integer"),
    (["embed", "--encoder", "nonet", "--data", "digits", "--out", "{tmp}/e"], "unknown encoder 'nonet'"),
    (["embed", "--run", "{tmp}/norun", "--data", "digits", "--out", "{tmp}/e"], "--run: directory"),
    (["embed", "--encoder", "efficientnet_lite0", "--data", "digitz", "--out", "{tmp}/e"], "unknown dataset 'digitz'"),
])
def test_bad_input_is_one_line(tmp_path, capsys, argv, needle):
    emb = tmp_path / "emb"
    write_embeddings(emb, np.arange(50), clustered(50, 8))
    build_index(clustered(50, 8), np.arange(50), tmp_path / "idx", kind="flat", progress=False,
                meta_extra={"embeddings": str(emb)})
    argv = [a.format(tmp=tmp_path, emb=emb, idx=tmp_path / "idx") for a in argv]
    rc, out, err = cli(capsys, *argv)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1, err
    assert needle in lines[0] and lines[0].startswith("pretrain "), lines[0]
