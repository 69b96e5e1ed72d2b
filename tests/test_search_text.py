"""Captions from measured digit attributes, the text-encoder registry (real MiniLM), alignment heads,
text queries through an index built on aligned embeddings, and the text-search CLI."""
import json
import os

import numpy as np
import pytest
import torch
from scipy import ndimage

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from data import build_dataset  # noqa: E402
from eval_probes.search import SearchError  # noqa: E402
from data.captions import (CaptionError, caption_dataset, digit_attributes, digit_queries,  # noqa: E402
                                         get_captioner, read_captions, skeletonize, write_captions)


@pytest.fixture(scope="module")
def mnist():
    return build_dataset("mnist5k", "train")


# ------------------------------------------------------------------ measured attributes


def test_thickness_grows_with_dilation(mnist):
    imgs = mnist.images[:200, 0].numpy()
    thick = np.stack([ndimage.grey_dilation(im, size=(2, 2)) for im in imgs])
    thicker = np.stack([ndimage.grey_dilation(im, size=(3, 3)) for im in imgs])
    t0 = digit_attributes(imgs)["thickness"]
    t1 = digit_attributes(thick)["thickness"]
    t2 = digit_attributes(thicker)["thickness"]
    assert (t1 > t0).mean() > 0.95 and (t2 > t1).mean() > 0.95
    assert np.median(t2) > np.median(t0) + 1.0  # a 3x3 dilation adds about two pixels of width
    # a clean synthetic stroke: width w -> thickness close to w
    for w in (2, 4, 6):
        im = np.zeros((28, 28), np.uint8)
        im[4:24, 14 - w // 2:14 - w // 2 + w] = 255
        assert abs(float(digit_attributes(im[None])["thickness"][0]) - w) < 0.6, w


def _shear(im: np.ndarray, s: float) -> np.ndarray:
    """Shift each row horizontally by s * (centre_row - row): the top moves right for s > 0."""
    h = im.shape[0]
    # output (r, c) samples input (r, c - s * (h/2 - r))
    matrix = np.array([[1.0, 0.0], [s, 1.0]])
    offset = np.array([0.0, -s * (h / 2)])
    return ndimage.affine_transform(im.astype(np.float32), matrix, offset=offset, order=1).clip(0, 255).astype(np.uint8)


def test_slant_follows_shear_sign(mnist):
    imgs = mnist.images[:200, 0].numpy()
    base = digit_attributes(imgs)["slant"]
    right = digit_attributes(np.stack([_shear(im, 0.4) for im in imgs]))["slant"]
    left = digit_attributes(np.stack([_shear(im, -0.4) for im in imgs]))["slant"]
    assert (right > base).mean() > 0.97 and (left < base).mean() > 0.97
    bar = np.zeros((28, 28), np.uint8)
    bar[4:24, 13:16] = 255
    a = digit_attributes(np.stack([bar, _shear(bar, 0.5), _shear(bar, -0.5)]))["slant"]
    assert abs(a[0]) < 1.0 and a[1] > 15 and a[2] < -15  # atan(0.5) = 26.6 degrees


def test_size_is_the_ink_bounding_box():
    im = np.zeros((2, 28, 28), np.uint8)
    im[0, 5:15, 10:14] = 200
    im[1, 2:26, 3:25] = 200
    a = digit_attributes(im)
    assert a["height"].tolist() == [10, 24] and a["width"].tolist() == [4, 22]
    assert a["area"][1] > a["area"][0]


def test_skeleton_is_thin_and_inside_the_mask():
    mask = np.zeros((1, 20, 20), bool)
    mask[0, 3:17, 8:13] = True  # a 5-pixel wide bar
    sk = skeletonize(mask)
    assert sk.sum() >= 8 and (sk & ~mask).sum() == 0
    assert sk[0].sum(axis=1).max() == 1  # one pixel wide


# ------------------------------------------------------------------ captions


def test_captions_are_varied_and_mention_label_and_attributes(mnist, tmp_path):
    recs = caption_dataset(mnist, "mnist5k", "train", 0.1, seed=0)
    assert len(recs) == 400 and len({r["id"] for r in recs}) == 400
    assert len({r["caption"] for r in recs}) > 150  # varied wording
    words = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    for r in recs:
        lab = int(mnist.labels[r["id"]])
        assert r["label"] == lab
        assert words[lab] in r["caption"] or str(lab) in r["caption"], r
    thick = [r for r in recs if r["attributes"]["thickness"] == "very thick"]
    left = [r for r in recs if r["attributes"]["slant"] == "strongly left"]
    assert thick and left
    assert all("thick" in r["caption"] or "heavy" in r["caption"] for r in thick)
    assert all("left" in r["caption"] or "backward" in r["caption"] for r in left)
    # the measured numbers behind the words are in the record, and ordered as the words say
    t_very = min(r["attributes"]["thickness_q"] for r in thick)
    assert t_very >= 0.95
    # same seed -> same subset and wording; another seed -> another subset
    again = caption_dataset(mnist, "mnist5k", "train", 0.1, seed=0)
    assert [r["caption"] for r in again] == [r["caption"] for r in recs]
    other = caption_dataset(mnist, "mnist5k", "train", 0.1, seed=1)
    assert [r["id"] for r in other] != [r["id"] for r in recs]
    path = write_captions(recs, tmp_path / "c.jsonl")
    back = read_captions(path)
    assert back[5]["caption"] == recs[5]["caption"] and back[5]["data"] == "mnist5k"


def test_classname_captions_hold_only_the_class(mnist):
    recs = caption_dataset(mnist, "mnist5k", "train", 0.05, seed=0, captioner="classname")
    assert {r["caption"] for r in recs} <= {f"the digit {w}" for w in ("zero", "one", "two", "three", "four", "five",
                                                                         "six", "seven", "eight", "nine")}


def test_folder_datasets_get_class_name_captions(tmp_path):
    from PIL import Image

    for c in ("cats", "dogs"):
        (tmp_path / c).mkdir()
        for i in range(5):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / c / f"{i}.png")
    ds = build_dataset(f"folder:{tmp_path}", "train", image_size=8)
    recs = caption_dataset(ds, f"folder:{tmp_path}", "train", 1.0, seed=0)  # auto -> classname
    assert len(recs) == len(ds) == 8
    assert {r["captioner"] for r in recs} == {"classname"}
    assert sorted({r["caption"] for r in recs}) == ["an image of cats", "an image of dogs"]
    with pytest.raises(CaptionError, match="--captioner classname for image folders"):
        caption_dataset(ds, f"folder:{tmp_path}", "train", 1.0, captioner="mnist")


def test_caption_errors(mnist, tmp_path):
    with pytest.raises(CaptionError, match="fraction"):
        caption_dataset(mnist, "mnist5k", "train", 1.5)
    with pytest.raises(CaptionError, match="unknown captioner 'mnst'.*did you mean 'mnist'"):
        get_captioner("mnst")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "caption": "a seven"}\n{"id": "x", "caption": "a one"}\n')
    with pytest.raises(CaptionError, match=r"bad.jsonl:2: expected an object with an integer 'id'"):
        read_captions(bad)


def test_rare_queries_have_measured_ground_truth(mnist):
    imgs, labels = mnist.images.numpy(), mnist.labels.numpy()
    qs = {q.name: q for q in digit_queries(imgs, labels)}
    assert len(qs["class_7"].relevant) == 400
    thick = qs["very_thick"].relevant
    assert len(thick) == 200  # 5% of 4000
    t = digit_attributes(imgs)["thickness"]
    assert t[thick].min() >= np.percentile(t, 94.9)
    assert set(qs["thick_seven"].relevant) <= set(np.flatnonzero(labels == 7))
    assert qs["very_thick"].rare and not qs["class_3"].rare


# ------------------------------------------------------------------ text encoder, heads, text queries


@pytest.fixture(scope="module")
def minilm():
    from eval_probes.search.text import get_text_encoder

    return get_text_encoder("minilm")


def test_minilm_registry_and_vectors(minilm):
    from eval_probes.search.text import get_text_encoder, list_text_encoders

    assert "minilm" in list_text_encoders()
    assert get_text_encoder("minilm") is minilm  # loaded once per process
    v = minilm.encode(["a handwritten seven", "a handwritten 7", "a photo of a red car"])
    assert v.shape == (3, 384) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-4)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2
    with pytest.raises(ValueError, match="unknown text encoder 'minlm'.*did you mean 'minilm'"):
        get_text_encoder("minlm")


@pytest.fixture(scope="module")
def aligned(mnist, minilm, tmp_path_factory):
    """Pixel embeddings of the 4,000 training digits, 600 of them captioned; heads trained on those."""
    from eval_probes.search.align import AlignConfig
    from pretrain.align import align_embeddings
    from eval_probes.search.embed import embed_dataset

    root = tmp_path_factory.mktemp("aligned")
    store = embed_dataset(lambda im: im.float().flatten(1) / 255.0, mnist, root / "emb", shard_size=1024,
                          dtype="float16", progress=False,
                          meta_extra={"encoder": {"kind": "packaged", "name": "pixels"},
                                      "data": {"spec": "mnist5k", "split": "train", "image_size": 28, "root": None}})
    recs = caption_dataset(mnist, "mnist5k", "train", 0.15, seed=0)
    write_captions(recs, root / "captions.jsonl")
    torch.manual_seed(0)
    heads = align_embeddings(root / "emb", root / "captions.jsonl", root / "heads",
                             AlignConfig(epochs=20, batch_size=128, out_dim=64, hidden_dim=256), progress=False)
    return {"root": root, "store": store, "heads": heads, "records": recs, "labels": mnist.labels.numpy()}


def test_align_trains_and_heads_round_trip(aligned):
    from eval_probes.search.align import AlignmentHeads

    heads = aligned["heads"]
    m = heads.info["metrics"]
    assert m["pairs"] == 600 and m["train_loss"] < 0.7 * m["train_loss_first_epoch"]
    assert m["val_caption_acc"] > 0.1  # 60 held-out pairs: chance is below 0.05
    meta = json.loads((aligned["root"] / "heads" / "heads.json").read_text())
    assert meta["text_encoder"] == "minilm" and meta["image_dim"] == 784 and meta["text_dim"] == 384
    assert meta["out_dim"] == 64 and meta["trained_on"]["pairs"] == 600
    back = AlignmentHeads.load(aligned["root"] / "heads")
    ids, vecs = aligned["store"].load()
    a, b = heads.image(vecs[:50]), back.image(vecs[:50])
    assert a.shape == (50, 64) and np.allclose(a, b, atol=1e-6)
    assert np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    assert np.allclose(heads.text(["a handwritten two"]), back.text(["a handwritten two"]), atol=1e-6)
    with pytest.raises(SearchError, match="take \\[N, 784\\] image embeddings"):
        back.image(vecs[:3, :10])


def test_heads_save_is_atomic(aligned, tmp_path, monkeypatch):
    """A failed save leaves the previous HEAD_DIR intact and no temporary folder behind."""
    import shutil

    from eval_probes.search.align import AlignmentHeads

    target = tmp_path / "heads"
    shutil.copytree(aligned["root"] / "heads", target)
    before = (target / "weights.safetensors").read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        aligned["heads"].save(target)
    assert (target / "weights.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heads"]
    assert AlignmentHeads.load(target).out_dim == 64


def test_align_is_a_run_that_resumes_exactly(aligned, tmp_path, capsys):
    """The heads train through the training loop: HEAD_DIR is a run directory, and stop_at + --resume
    gives the weights and losses of the uninterrupted run."""
    from safetensors.torch import load_file

    from eval_probes.search.align import AlignConfig, AlignmentHeads
    from pretrain.align import align_embeddings

    root = aligned["root"]
    cfg = dict(epochs=3, batch_size=128, out_dim=32, hidden_dim=64, seed=1)
    whole = align_embeddings(root / "emb", root / "captions.jsonl", tmp_path / "whole", AlignConfig(**cfg),
                             progress=False)
    assert whole.info["metrics"]["steps"] == 12  # 3 epochs x (540 train pairs // 128)
    for name in ("config.yaml", "metrics.jsonl", "train_summary.json", "weights.safetensors", "heads.json"):
        assert (tmp_path / "whole" / name).is_file(), name
    stopped = align_embeddings(root / "emb", root / "captions.jsonl", tmp_path / "split",
                               AlignConfig(**cfg, stop_at=5), progress=False)
    assert stopped == {"stopped_at": 5, "max_steps": 12}
    assert not (tmp_path / "split" / "heads.json").exists()  # not a complete HEAD_DIR yet
    rc, out, err = _run(["search", "align", "--resume", str(tmp_path / "split"), "--quiet"], capsys)
    assert rc == 0, err
    assert "trained alignment heads (784 -> 32 <- 384" in out
    a, b = load_file(str(tmp_path / "whole" / "weights.safetensors")), \
        load_file(str(tmp_path / "split" / "weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def losses(run):
        rows = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in rows if "loss" in r]

    assert losses("whole") == losses("split") and len(losses("whole")) == 12
    back = AlignmentHeads.load(tmp_path / "split")
    assert back.info["metrics"]["resumed_from_step"] == 5
    assert back.info["config"]["epochs"] == 3 and back.info["config"]["batch_size"] == 128
    assert back.info["metrics"]["val_caption_acc"] == whole.info["metrics"]["val_caption_acc"]
    rc, out, err = _run(["probe", "--run", str(tmp_path / "whole")], capsys)  # no image tower to probe
    assert rc == 2 and "is a run of objective 'align', which trains no image tower" in err
    assert len(err.strip().splitlines()) == 1


def test_align_runs_under_deepspeed_on_two_ranks(aligned, tmp_path):
    """``pretrain search align`` under the deepspeed launcher: 2 ranks of 64 pairs (InfoNCE over the
    gathered 128) give the per-step losses of one process with batches of 128, and a loadable HEAD_DIR."""
    import subprocess
    import sys
    from pathlib import Path

    from dist_helpers import find_free_port
    from eval_probes.search.align import AlignmentHeads

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["search", "align", "--embeddings", str(aligned["root"] / "emb"), "--captions",
              str(aligned["root"] / "captions.jsonl"), "--epochs", "2", "--batch-size", "128", "--out-dim", "16",
              "--hidden-dim", "32", "--quiet"]
    one = subprocess.run([sys.executable, "-m", "launch", *common, "--out", str(tmp_path / "one"), "dropout=0"],
                         cwd=root, env=env,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port",
                          str(find_free_port()), "--module", "--no_local_rank", "launch", *common,
                          "--out", str(tmp_path / "two"), "dropout=0", "engine=deepspeed"],
                         cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    rows = [[json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("one", "two")]
    losses = [[r["loss"] for r in rs if "loss" in r] for rs in rows]
    assert len(losses[0]) == len(losses[1]) == 8  # 2 epochs x (540 // 128)
    for a, b in zip(*losses):
        assert b == pytest.approx(a, rel=1e-4)
    heads = AlignmentHeads.load(tmp_path / "two")
    assert heads.info["config"]["engine"] == "deepspeed" and heads.info["config"]["batch_size"] == 128
    ids, vecs = aligned["store"].load()
    assert np.allclose(heads.image(vecs[:20]), AlignmentHeads.load(tmp_path / "one").image(vecs[:20]), atol=1e-4)


def test_text_query_for_a_digit_class_returns_that_class(aligned):
    from eval_probes.search.index import build_index

    ids, vecs = aligned["store"].load()
    heads = aligned["heads"]
    idx = build_index(heads.image(vecs), ids, aligned["root"] / "index", kind="flat", progress=False,
                      meta_extra={"embeddings": str(aligned["root"] / "emb"), "heads": str(aligned["root"] / "heads")})
    labels = aligned["labels"]
    words = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    hits = []
    for digit, word in enumerate(words):
        _, got = idx.search(heads.text([f"a handwritten {word}"]), 10)
        hits.append((labels[got[0]] == digit).mean())
    assert np.mean(hits) >= 0.8 and min(hits) >= 0.5, hits
    # the loaded index goes through the same heads for its uncompressed vectors
    from eval_probes.search.index import SearchIndex

    loaded = SearchIndex.load(aligned["root"] / "index")
    assert loaded.heads is not None
    assert np.allclose(loaded.vectors(ids[:5]), heads.image(vecs[:5]), atol=1e-5)


# ------------------------------------------------------------------ CLI


def _run(argv, capsys):
    from launch.cli import main

    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse errors
        rc = exc.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_caption_align_build_query(aligned, tmp_path, capsys):
    root = aligned["root"]
    rc, out, err = _run(["search", "caption", "--data", "mnist5k", "--fraction", "0.02", "--seed", "3",
                         "--out", str(tmp_path / "cap.jsonl")], capsys)
    assert rc == 0, err
    assert "wrote 80 captions" in out and len(read_captions(tmp_path / "cap.jsonl")) == 80
    rc, out, err = _run(["search", "align", "--embeddings", str(root / "emb"), "--captions",
                         str(root / "captions.jsonl"), "--out", str(tmp_path / "heads"), "--epochs", "2",
                         "--out-dim", "32", "--quiet"], capsys)
    assert rc == 0, err
    assert "trained alignment heads (784 -> 32 <- 384" in out
    rc, out, err = _run(["search", "build", "--embeddings", str(root / "emb"), "--heads", str(tmp_path / "heads"),
                         "--out", str(tmp_path / "index"), "--index", "flat", "--quiet"], capsys)
    assert rc == 0, err
    meta = json.loads((tmp_path / "index" / "index.json").read_text())
    assert meta["heads"] == str((tmp_path / "heads").resolve()) and meta["dim"] == 32
    rc, out, err = _run(["search", "query", "--index", str(tmp_path / "index"), "--text", "a handwritten seven",
                         "-k", "5", "--json"], capsys)
    assert rc == 0, err
    res = json.loads(out)
    assert len(res["results"]) == 5 and all("label" in r for r in res["results"])
    rc, out, err = _run(["search", "queries", "--embeddings", str(root / "emb"), "--out",
                         str(tmp_path / "q.jsonl")], capsys)
    assert rc == 0, err
    lines = [json.loads(x) for x in (tmp_path / "q.jsonl").read_text().splitlines()]
    assert {q["name"] for q in lines} >= {"class_7", "very_thick", "slant_left"}
    assert len(next(q for q in lines if q["name"] == "very_thick")["relevant"]) == 200  # 5% of 4,000


@pytest.mark.parametrize("argv, needle", [
    (["search", "caption", "--data", "mnist5k", "--fraction", "0", "--out", "x.jsonl"],
     "argument --fraction: --fraction must be a number in (0, 1], got '0'"),
    (["search", "caption", "--data", "mnist9k", "--out", "x.jsonl"], "unknown dataset 'mnist9k'"),
    (["search", "align", "--embeddings", "/nonexistent/emb", "--captions", "c.jsonl", "--out", "h"],
     "--embeddings: directory '/nonexistent/emb' does not exist"),
    (["search", "align", "--embeddings", "EMB", "--captions", "/nonexistent.jsonl", "--out", "h"],
     "--captions: file '/nonexistent.jsonl' does not exist"),
    (["search", "align", "--embeddings", "EMB", "--captions", "BADCAP", "--out", "h"], "expected a non-empty string 'caption'"),
    (["search", "align", "--embeddings", "EMB", "--captions", "OTHERCAP", "--out", "h"],
     "captions are for data ['digits'] but the embeddings"),
    (["search", "align", "--embeddings", "EMB", "--captions", "c.jsonl", "--out", "h", "--epochs", "-1"],
     "argument --epochs: --epochs must be a positive int, got '-1'"),
    (["search", "align", "--embeddings", "EMB", "--captions", "c.jsonl"],
     "the following arguments are required: --out (or --resume HEAD_DIR)"),
    (["search", "align", "--resume", "I", "--out", "h"], "--resume takes the run's own config.yaml; drop --out"),
    (["search", "align", "--resume", "I"], "is not a heads run directory (no config.yaml)"),
    (["search", "build", "--embeddings", "EMB", "--heads", "/nonexistent/heads", "--out", "i"],
     "--heads: directory '/nonexistent/heads' does not exist"),
    (["search", "serve", "--index", "I", "--port", "99999"], "--port must be an integer in [0, 65535]"),
    (["search", "serve", "--index", "/nonexistent/index"], "--index: directory '/nonexistent/index' does not exist"),
])
def test_cli_bad_input_is_one_line(aligned, tmp_path, capsys, argv, needle):
    emb = str(aligned["root"] / "emb")
    (tmp_path / "bad.jsonl").write_text('{"id": 3, "caption": ""}\n')
    (tmp_path / "other.jsonl").write_text('{"id": 3, "caption": "a three", "data": "digits", "split": "train"}\n')
    subst = {"EMB": emb, "BADCAP": str(tmp_path / "bad.jsonl"), "OTHERCAP": str(tmp_path / "other.jsonl"),
             "I": str(tmp_path)}
    argv = [subst.get(a, a) for a in argv]
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        rc, out, err = _run(argv, capsys)
    finally:
        os.chdir(cwd)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], err
    assert lines[0].startswith("pretrain")
