"""CLIP / SigLIP objective, image-text pair sources, retrieval and zero-shot metrics."""
import csv
import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data as data_lib
from data.pairs import TUXPAINT_ROOT, build_pairs, is_pair_spec, tuxpaint_category
from pretrain.config import ConfigError, load_config
from pretrain.loop import fit
from pretrain.objectives import create_objective
from pretrain.objectives.clip import retrieval_metrics, zero_shot_accuracy, zero_shot_classifier

ROOT = Path(__file__).resolve().parents[1]
TINY = ["objective=clip", "data=mnist5k_captions", "image_size=16", "model.image.backbone=resnet18",
        "model.image.width=16", "model.image.stem=cifar", "model.text.backbone=text_tiny", "model.text.width=128",
        "model.text.depth=1", "model.text.heads=4", "tokenizer.name=clip_bpe", "tokenizer.context_length=24",
        "batch_size=64", "precision=fp32", "optim.name=adamw", "optim.lr=0.002", "optim.scale_lr=false",
        "optim.warmup_steps=5", "log_every=1", "progress=false", "threads=2", "clip.embed_dim=64"]


def _towers(img_dim=12, txt_dim=10):
    from models import create_backbone

    image = create_backbone("vit_tiny", image_size=8, patch_size=4, in_chans=3, depth=1, embed_dim=img_dim,
                            num_heads=2)
    text = create_backbone("text_tiny", vocab_size=50, context_length=6, width=txt_dim, depth=1, heads=2, eot_id=2)
    return {"image": image, "text": text}


def _batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 50, (n, 6), generator=g)
    ids[:, -1] = 2
    return {"image": torch.randn(n, 3, 8, 8, generator=g), "text": ids}


# ------------------------------------------------------------------ the objective against the paper's formulas


def test_clip_loss_is_the_symmetric_infonce_of_the_projected_embeddings():
    torch.manual_seed(0)
    model = create_objective("clip", _towers(), embed_dim=8)
    assert model.logit_scale.shape == (1,) and model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    batch = _batch()
    out = model(batch)
    img = F.normalize(model.image_proj(model.backbone.forward_pooled(batch["image"])), dim=1)
    txt = F.normalize(model.text_proj(model.text_tower.forward_pooled(batch["text"])), dim=1)
    logits = (1 / 0.07) * img @ txt.T
    n = logits.shape[0]
    ref = 0.0
    for i in range(n):  # -1/2N sum_i [log softmax_row(i)_i + log softmax_col(i)_i]
        ref -= torch.log_softmax(logits[i], 0)[i] + torch.log_softmax(logits[:, i], 0)[i]
    assert out["loss"].item() == pytest.approx(ref.item() / (2 * n), rel=1e-5)
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    out["loss"].backward()
    assert model.logit_scale.grad is not None and model.logit_scale.grad.abs().item() > 0


def test_siglip_objective_has_a_learned_bias_and_the_sigmoid_loss():
    torch.manual_seed(0)
    model = create_objective("clip", _towers(), embed_dim=8, loss="siglip", init_logit_scale=math.log(10))
    assert model.logit_bias.shape == (1,) and model.logit_bias.item() == -10.0
    batch = _batch()
    out = model(batch)
    img = F.normalize(model.encode_image(batch["image"]), dim=1)
    txt = F.normalize(model.encode_text(batch["text"]), dim=1)
    z = 10.0 * img @ txt.T - 10.0
    y = 2 * torch.eye(z.shape[0]) - 1
    ref = -F.logsigmoid(y * z).sum() / z.shape[0]
    assert out["loss"].item() == pytest.approx(ref.item(), rel=1e-5)
    out["loss"].backward()
    assert model.logit_bias.grad.abs().item() > 0


def test_logit_scale_is_clamped_at_ln_100_after_each_step():
    model = create_objective("clip", _towers(), embed_dim=8)
    (param, fn), = model.param_projections()
    assert param is model.logit_scale
    with torch.no_grad():
        model.logit_scale.fill_(7.0)
    assert fn(model.logit_scale).item() == pytest.approx(math.log(100))
    assert model.scale().item() == pytest.approx(100.0, rel=1e-5)  # the forward pass clamps too
    assert fn(torch.tensor([-1.0])).item() == 0.0


def test_locked_tower_is_not_trained_and_param_groups_scale_each_tower():
    model = create_objective("clip", _towers(), embed_dim=8, lock_image=True, text_lr_scale=0.5, layer_decay=0.5)
    groups = model.param_groups()
    in_groups = {id(p) for g in groups for p in g["params"]}
    assert not any(id(p) in in_groups for p in model.backbone.parameters())
    assert all(not p.requires_grad for p in model.backbone.parameters())
    scales = {g["name"]: g["lr_scale"] for g in groups}
    # the text tower has 1 block: ids 0 (embeddings), 1 (block), 2 (final norm) = num_layers
    assert scales["text_layer0_decay"] == pytest.approx(0.5 * 0.5 ** 2)
    assert scales["text_layer1_decay"] == pytest.approx(0.5 * 0.5)
    assert scales["heads_decay"] == 1.0 and scales["heads_no_decay"] == 1.0  # projections; logit scale
    assert {id(model.logit_scale), id(model.image_proj.weight)} <= in_groups
    model.train()
    assert not model.backbone.training and model.text_tower.training
    # a locked tower's outputs are cached: the same captions are encoded once, with the same result
    model.eval()
    batch = _batch(4)
    calls, pooled = [], model.backbone.forward_pooled
    model.backbone.forward_pooled = lambda x: calls.append(len(x)) or pooled(x)
    first = model.encode_image(batch["image"])
    again = model.encode_image(torch.cat([batch["image"], batch["image"][:1]]))
    assert calls == [4] and torch.equal(again[:4], first) and torch.equal(again[4], first[0])
    with torch.no_grad():
        torch.testing.assert_close(first, model.image_proj(pooled(batch["image"])))
    # both locked (the LiT-style baseline on frozen encoders): the projections and the scale train
    both = create_objective("clip", _towers(), embed_dim=8, lock_image=True, lock_text=True)
    names = {g["name"] for g in both.param_groups()}
    assert names == {"heads_decay", "heads_no_decay"}
    with pytest.raises(ConfigError, match="clip.loss"):
        create_objective("clip", _towers(), loss="softmax")
    with pytest.raises(ConfigError, match="clip.templates"):
        create_objective("clip", _towers(), templates=("a photo",))


# ------------------------------------------------------------------ metrics against naive loops


def test_retrieval_metrics_match_a_naive_ranking():
    g = torch.Generator().manual_seed(1)
    img = F.normalize(torch.randn(7, 5, generator=g), dim=1)
    txt = F.normalize(torch.randn(11, 5, generator=g), dim=1)
    owner = torch.tensor([0, 0, 1, 2, 3, 3, 3, 4, 5, 6, 6])
    got = retrieval_metrics(img, txt, owner, ks=(1, 3))
    sims = (img @ txt.T).tolist()
    i2t, t2i = [], []
    for i in range(7):
        order = sorted(range(11), key=lambda t: -sims[i][t])
        i2t.append(min(order.index(t) for t in range(11) if owner[t] == i))
    for t in range(11):
        order = sorted(range(7), key=lambda i: -sims[i][t])
        t2i.append(order.index(int(owner[t])))
    for k in (1, 3):
        assert got[f"i2t_r{k}"] == pytest.approx(np.mean([r < k for r in i2t]))
        assert got[f"t2i_r{k}"] == pytest.approx(np.mean([r < k for r in t2i]))
    assert got["i2t_mean_rank"] == pytest.approx(np.mean(i2t) + 1)
    assert got["t2i_mean_rank"] == pytest.approx(np.mean(t2i) + 1)
    # perfect alignment: every query first
    perfect = retrieval_metrics(img, img[owner], owner)
    assert perfect["i2t_r1"] == 1.0 and perfect["t2i_r1"] == 1.0 and perfect["t2i_mean_rank"] == 1.0


def test_zero_shot_classifier_averages_normalised_prompts():
    vecs = {"a cat": [3.0, 0.0], "the cat": [0.0, 1.0], "a dog": [-1.0, 0.0], "the dog": [-1.0, -1.0]}

    def tok(texts):
        return texts

    def enc(texts):
        return torch.tensor([vecs[t] for t in texts])

    w = zero_shot_classifier(enc, tok, ["cat", "dog"], ["a {}", "the {}"])
    assert torch.allclose(w[0], F.normalize(torch.tensor([1.0, 1.0]), dim=0))  # not [3, 1]: prompts normalised first
    dog = F.normalize(torch.tensor([-1.0, 0.0]) + F.normalize(torch.tensor([-1.0, -1.0]), dim=0), dim=0)
    assert torch.allclose(w[1], dog)
    acc = zero_shot_accuracy(F.normalize(torch.tensor([[1.0, 0.2], [-1.0, 0.0]]), dim=1), w, torch.tensor([0, 0]))
    assert acc == {"top1": 0.5}


# ------------------------------------------------------------------ data


def test_clip_bpe_tokenizer_truncates_keeping_end_of_text():
    tok = data_lib.create_tokenizer("clip_bpe", 6)
    ids = tok(["A frog.", "a very long caption that does not fit at all"])
    assert ids.shape == (2, 6) and tok.vocab_size == 49408
    assert ids[0, 0] == tok.sot_id and tok.eot_id in ids[0].tolist() and ids[0, -1] == tok.pad_id
    assert ids[1, -1] == tok.eot_id


needs_tuxpaint = pytest.mark.skipif(not os.path.isdir(TUXPAINT_ROOT),
                                    reason="apt-get install tuxpaint-stamps-default (.ci/run installs it)")


@needs_tuxpaint
def test_tuxpaint_stamps_are_captioned_pairs_with_zero_shot_classes():
    train, test = build_pairs("tuxpaint", "train", 32), build_pairs("tuxpaint", "test", 32)
    assert len(train) > 700 and len(test) > 150
    names = train.info.class_names
    assert {"bird", "fruit", "flower", "insect", "letter"} <= set(names) and len(names) >= 20
    frog = next(i for i in range(len(train)) if train.texts(i) == ["A frog."])
    item = train[frog]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.uint8
    assert "/animals/amphibians/frog" in item["path"]
    # every class has test images (stratified), and labels index the class list
    src = test.info.extra["sources"][0]
    assert src["name"] == "tuxpaint" and src["classes"] == list(range(len(names)))
    assert set(test.labels.tolist()) - {-1} == set(range(len(names)))
    assert tuxpaint_category("food/fruit/cartoon") == "fruit"
    assert tuxpaint_category("symbols/alphabets/english/filled/uppercase") == "letter"


def test_mnist5k_captions_and_pooled_specs():
    assert is_pair_spec("mnist5k_captions") and is_pair_spec("tuxpaint+pairs:x.jsonl")
    assert not is_pair_spec("mnist5k") and not is_pair_spec("folder:/x")
    ds = build_pairs("mnist5k_captions", "test")
    assert len(ds) == 1000 and ds.info.image_size == 28 and ds.info.channels == 3
    item = ds[0]
    word = ds.info.class_names[item["label"]]
    assert all(word in t or str(item["label"]) in t for t in item["text"])
    assert 1 <= len(item["text"]) <= 2 and item["image"].shape == (3, 28, 28)
    assert torch.equal(item["image"][0], item["image"][2])  # grey digits replicated to RGB
    with pytest.raises(data_lib.DataError, match="valid"):
        build_pairs("mnist5k_captions+nosuchsource", "train")


def _png(path, color=(200, 30, 30)):
    Image.new("RGB", (20, 12), color).save(path)
    return path


def test_jsonl_pairs_skip_bad_entries_with_a_count_and_name(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png", (0, 0, 255))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    lines = [{"image": "a.png", "text": "a red box", "split": "train"},
             {"image": "b.png", "text": ["a blue box", "blue"], "split": "train"},
             {"image": "missing.png", "text": "gone", "split": "train"},
             {"image": "a.png", "text": "   ", "split": "train"},
             {"image": "bad.png", "text": "corrupt", "split": "train"},
             {"image": "b.png", "text": "held out", "split": "test"}]
    f = tmp_path / "pairs.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    with pytest.warns(UserWarning, match="missing.png"):
        ds = build_pairs(f"pairs:{f}", "train", 16)
    assert len(ds) == 3 and len(ds.skipped) == 2
    assert {r for _, r in ds.skipped} == {"image file not found", "empty or missing caption (text='   ')"}
    assert ds[1]["text"] == ["a blue box", "blue"]
    bad = ds[2]
    assert bad["skip"].endswith("bad.png") and "reason" in bad  # a corrupt image is skipped when read
    assert len(build_pairs(f"pairs:{f}", "test", 16)) == 1
    # the collate drops the unreadable image and names it; the others train
    collate = data_lib.PairCollate(16, ds.info.mean, ds.info.std, data_lib.create_tokenizer("bytes", 16))
    batch = collate([{**ds[i], "step": 0} for i in range(3)])
    assert batch["image"].shape[0] == 2 and batch["skipped"][0][0].endswith("bad.png")
    f.write_text('{"image": "a.png", "text": "ok"}\n{not json\n')
    with pytest.raises(data_lib.DataError, match=r"pairs.jsonl:2: not valid JSON"):
        build_pairs(f"pairs:{f}", "train")
    with pytest.raises(data_lib.DataError, match="does not exist"):
        build_pairs(f"pairs:{tmp_path / 'nope.jsonl'}", "train")


def test_csv_pairs_use_open_clip_column_names(tmp_path):
    for i in range(10):
        _png(tmp_path / f"{i}.png", (i * 20, 0, 0))
    f = tmp_path / "train.csv"
    with open(f, "w", newline="") as fh:
        w = csv.writer(fh, delimiter="\t")
        w.writerow(["filepath", "title"])
        for i in range(10):
            w.writerow([f"{i}.png", f"red level {i}" if i != 3 else ""])
    ds = build_pairs(f"csv:{f}", "train", 16)
    test = build_pairs(f"csv:{f}", "test", 16)
    assert len(ds) + len(test) == 9 and len(ds.skipped) == 1  # the empty caption
    from data.pairs import CsvOptions

    with pytest.raises(data_lib.DataError, match="no column 'caption'.*csv.caption_key"):
        build_pairs(f"csv:{f}", "train", csv_options=CsvOptions(caption_key="caption"))


def test_pair_caption_choice_depends_on_seed_step_and_index_only():
    collate = data_lib.PairCollate(8, (0.5,), (0.5,), data_lib.create_tokenizer("bytes", 8), seed=3)
    caps = ["one", "two", "three", "four"]
    picks = {collate.pick(caps, step, 5) for step in range(40)}
    assert picks == set(caps)  # every caption gets used
    assert collate.pick(caps, 7, 5) == collate.pick(caps, 7, 5)


# ------------------------------------------------------------------ through fit()


def _losses(run):
    return [json.loads(ln)["loss"] for ln in (run / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(ln)]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """60 steps of the tiny CLIP on mnist5k's captioned digits."""
    return fit(load_config(None, [*TINY, "max_steps=60", f"run_dir={tmp_path_factory.mktemp('clip') / 'a'}"]))


def test_clip_trains_evaluates_and_resumes_exactly(tmp_path, trained_run):
    run = trained_run
    losses = _losses(run)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0, losses
    summary = json.loads((run / "train_summary.json").read_text())
    for key in ("test_i2t_r10", "test_t2i_r10", "test_i2t_mean_rank", "test_zeroshot_mnist5k_captions_top1",
                "test_zeroshot_mnist5k_captions_top5"):
        assert key in summary, key
    assert summary["test_retrieval_images"] == 1000
    assert summary["test_zeroshot_mnist5k_captions_top1"] > 0.2  # chance 0.1
    assert summary["test_t2i_r10"] > 0.02  # chance 0.01
    straight = _losses(fit(load_config(None, [*TINY, "max_steps=6", f"run_dir={tmp_path / 's'}"])))
    b = tmp_path / "b"
    fit(load_config(None, [*TINY, "max_steps=6", "stop_at=3", f"run_dir={b}"]))
    fit(load_config(b / "config.yaml", ["stop_at=0", f"run_dir={b}"]), resume=True)
    assert _losses(b) == pytest.approx(straight, abs=1e-6)


def test_clip_recipes_load():
    for name in ("clip_mnist5k", "clip_pairs", "clip_pairs_ft", "clip_lit", "clip_pairs_minilm"):
        cfg = load_config(ROOT / "launch" / "recipes" / f"{name}.yaml")
        assert cfg.objective == "clip" and cfg.tokenizer.name in ("clip_bpe", "minilm")
    cfg = load_config(ROOT / "launch" / "recipes" / "clip_pairs_minilm.yaml")
    assert cfg.objective_config.lock_text and not cfg.objective_config.lock_image
    assert cfg.model.text.backbone == "minilm_l6" and cfg.model.image.backbone == "resnet18"


VIT = ["model.image.backbone=vit_tiny", "model.image.patch_size=4", "model.image.depth=1",
       "model.image.embed_dim=32", "model.image.num_heads=2"]


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    """A short CLIP run with a ViT image tower."""
    return fit(load_config(None, [*TINY, *VIT, "batch_size=16", "max_steps=2",
                                  f"run_dir={tmp_path_factory.mktemp('vit') / 'run'}"]))


def test_image_tower_starts_from_another_run(tmp_path, vit_run):
    """EVA-CLIP's recipe: the image tower of a CLIP run starts from another run's image tower."""
    from pretrain.loop import build_model
    from pretrain.probe import load_run

    src = vit_run
    _, src_model = load_run(src)
    cfg = load_config(None, [*TINY, *VIT, "model.image.patch_dropout=0.5", f"model.image.init={src}"])
    info = build_pairs("mnist5k_captions", "test", image_size=16).info
    model = build_model(cfg, info)
    for (k, a), b in zip(src_model.backbone.state_dict().items(), model.backbone.state_dict().values()):
        assert torch.equal(a, b), k
    assert model.backbone.patch_dropout == 0.5
    wrong = load_config(None, [*TINY, *VIT, "model.image.embed_dim=64", f"model.image.init={src}"])
    with pytest.raises(ConfigError, match=r"model.image.init.*does not fit model.image.*shapes differ"):
        build_model(wrong, info)
    with pytest.raises(ConfigError, match=r"'model.image.init': '/no/run' is not a finished run"):
        build_model(load_config(None, [*TINY, "model.image.init=/no/run"]), info)
    digits = fit(load_config(None, ["objective=simclr", "data=digits", "image_size=16", *VIT, "batch_size=16",
                                    "max_steps=1", "precision=fp32", "progress=false", "simclr.proj_dim=8",
                                    f"run_dir={tmp_path / 'digits'}"]))
    with pytest.raises(ConfigError, match=r"has no text tower; its towers: image"):
        build_model(load_config(None, [*TINY, f"model.text.init={digits}"]), info)
    # a grey tower starts a colour one: a grey image repeated to RGB embeds as the grey image did
    _, grey = load_run(digits)
    colour = build_model(load_config(None, [*TINY, *VIT, f"model.image.init={digits}"]), info).backbone
    g = torch.randn(2, 1, 16, 16)
    assert colour.patch_embed.proj.weight.shape[1] == 3
    torch.testing.assert_close(colour.patch_embed(g.repeat(1, 3, 1, 1)), grey.backbone.patch_embed(g),
                               rtol=1e-5, atol=1e-6)


def test_export_to_open_clip_gives_the_same_embeddings(tmp_path, vit_run):
    import subprocess
    import sys

    import open_clip

    from data.tokenize import create_tokenizer
    from pretrain.probe import load_run

    r = subprocess.run([sys.executable, "-m", "launch", "export", "--run", str(vit_run), "--format", "open_clip",
                        "--out", str(tmp_path / "oc")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert {p.name for p in (tmp_path / "oc").iterdir()} == {"open_clip_config.json", "open_clip_model.safetensors"}
    oc = open_clip.create_model(f"local-dir:{tmp_path / 'oc'}").eval()
    _, ours = load_run(vit_run)
    ours.eval()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(6, 3, 16, 16, generator=g)
    tok = create_tokenizer("clip_bpe", 24)
    ids = tok(["a handwritten seven.", "the digit one, slanted to the left", "a frog.", "x", "", "a b c d e f"])
    with torch.no_grad():
        torch.testing.assert_close(oc.encode_image(images), ours.encode_image(images), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(oc.encode_text(ids), ours.encode_text(ids), rtol=1e-5, atol=1e-5)
        assert oc.logit_scale.exp().item() == pytest.approx(ours.scale().item(), rel=1e-6)
    # the same tokens from open_clip's own tokenizer
    assert torch.equal(open_clip.get_tokenizer(f"local-dir:{tmp_path / 'oc'}")(["a frog."]), tok(["a frog."]))


def test_export_to_open_clip_refuses_other_towers(tmp_path):
    from pretrain.export_open_clip import ExportFormatError, export_open_clip

    run = tmp_path / "rn"
    run.mkdir()
    from pretrain.config import save_config

    save_config(load_config(None, TINY), run / "config.yaml")
    with pytest.raises(ExportFormatError, match="supports ViT image towers .* model.image.backbone=resnet18"):
        export_open_clip(run)
    save_config(load_config(None, [*TINY, *VIT, "tokenizer.name=bytes"]), run / "config.yaml")
    with pytest.raises(ExportFormatError, match="tokenizer.name=bytes"):
        export_open_clip(run)
    save_config(load_config(None, ["objective=simclr"]), run / "config.yaml")
    with pytest.raises(ExportFormatError, match="exports clip runs.*'simclr'"):
        export_open_clip(run)
    assert not (run / "open_clip").exists()


def test_a_clip_run_is_a_search_encoder_for_text_queries(tmp_path, trained_run):
    """pretrain embed --run CLIP_RUN, then text queries through the run's own text tower: no align step."""
    import subprocess
    import sys

    from data.captions import DIGIT_WORDS
    from eval_probes.search.index import SearchIndex
    from eval_probes.search.query import text_query_vector
    from pretrain.encoders import run_encoder

    def cli(*args):
        r = subprocess.run([sys.executable, "-m", "launch", *args], cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout

    cli("embed", "--run", str(trained_run), "--data", "mnist5k", "--split", "test", "--dtype", "float32",
        "--out", str(tmp_path / "emb"), "--quiet")
    cli("search", "build", "--embeddings", str(tmp_path / "emb"), "--out", str(tmp_path / "idx"), "--quiet")
    out = json.loads(cli("search", "query", "--index", str(tmp_path / "idx"), "--text", "the digit seven.",
                         "-k", "5", "--json"))
    assert len(out["results"]) == 5
    idx = SearchIndex.load(tmp_path / "idx")
    enc = run_encoder(trained_run)
    # the query is the run's own normalised text embedding, the index holds its joint-space image embeddings
    want = F.normalize(enc.embed_text(["the digit seven."]), dim=1).numpy()
    np.testing.assert_allclose(text_query_vector(idx, "the digit seven."), want, atol=1e-5)
    ds = data_lib.build_dataset("mnist5k", "test")
    first = F.normalize(enc.embed(ds[int(idx.row_ids[0])]["image"][None]), dim=1).numpy()
    np.testing.assert_allclose(idx.vectors([int(idx.row_ids[0])]), first, atol=1e-4)
    # and the text tower finds digits: precision@20 of "the digit <name>." over the ten digits
    labels = np.asarray(ds.labels)
    hits = []
    for d, name in enumerate(DIGIT_WORDS):
        scores, ids = idx.search(text_query_vector(idx, f"the digit {name}."), 20)
        hits.append(float(np.mean(labels[np.asarray(ids[0])] == d)))
    assert np.mean(hits) > 0.2, hits  # chance 0.1


def test_icons_are_rendered_glyphs_captioned_by_their_names():
    from data.pairs import icon_caption

    train, test = build_pairs("icons", "train"), build_pairs("icons", "test")
    assert len(train) + len(test) > 7000 and len(test) > 1000  # about 7,400 Material Design icons, 80/20
    src = train.info.extra["sources"][0]
    assert src["name"] == "icons" and len(src["classes"]) >= 20
    assert {"account", "arrow", "battery"} <= set(train.info.class_names)
    item = train[0]
    img = item["image"].float()
    assert item["image"].shape == (3, 32, 32) and img.min() < 50 and img.max() > 250  # a black glyph on white
    assert item["text"][0] == icon_caption(item["text"][0].replace(" ", "-")) and len(item["text"]) == 2
    assert icon_caption("guitar-acoustic") == "guitar acoustic"
    names = {t for i in range(len(test)) for t in test.texts(i)}
    assert not names & {t for i in range(len(train)) for t in train.texts(i)}  # no icon in both splits
    with pytest.raises(data_lib.DataError, match="no Material Design Icons font"):
        build_pairs("icons:/tmp", "train")


def test_shard_pattern_braces():
    from data.pairs import expand_braces

    assert expand_braces("a/{000..002}.tar") == ["a/000.tar", "a/001.tar", "a/002.tar"]
    assert expand_braces("{x,y}-{8..10}") == ["x-8", "x-9", "x-10", "y-8", "y-9", "y-10"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(data_lib.DataError, match="needs two integers"):
        expand_braces("{a..b}.tar")


def test_pairs_round_trip_through_webdataset_shards(tmp_path):
    """pretrain shards writes img2dataset-style tars; data=wds:PATTERN reads the same pairs back."""
    import subprocess
    import sys
    import tarfile

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rows = []
    for i in range(12):
        _png(imgs / f"{i}.png", color=(20 * i, 100, 200 - 10 * i))
        rows.append({"image": f"imgs/{i}.png", "text": [f"picture number {i}", f"image {i}"],
                     "split": "test" if i % 4 == 0 else "train"})
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    r = subprocess.run([sys.executable, "-m", "launch", "shards", "--data", f"pairs:{tmp_path / 'p.jsonl'}", "--out",
                        str(tmp_path / "sh"), "--shard-size", "5", "--image-size", "16", "--quiet"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "sh").iterdir()) == ["00000.tar", "00001.tar", "00002.tar"]
    pattern = f"{tmp_path / 'sh'}/{{00000..00002}}.tar"
    assert f"data=wds:{pattern}" in r.stdout
    for split in ("train", "test"):
        src = build_pairs(f"pairs:{tmp_path / 'p.jsonl'}", split, image_size=16)
        got = build_pairs(f"wds:{pattern}", split, image_size=16)
        assert len(got) == len(src) == (9 if split == "train" else 3)
        for i in range(len(src)):
            assert got[i]["text"] == src[i]["text"]
            assert torch.equal(got[i]["image"], src[i]["image"])
            assert ".tar:" in got[i]["path"]
    # loader workers forked after the parent opened the shards read their own handles: same pairs
    loader = torch.utils.data.DataLoader(got, batch_size=2, num_workers=2, collate_fn=list,
                                         multiprocessing_context="fork")
    seen = {item["index"]: item for batch in loader for item in batch}
    assert sorted(seen) == list(range(len(src)))
    assert all(torch.equal(seen[i]["image"], src[i]["image"]) and seen[i]["text"] == src[i]["text"]
               for i in range(len(src)))
    # a shard with a caption but no image, an image without caption, an empty caption and a corrupt image
    bad = tmp_path / "bad-0.tar"  # and bad-1.tar is missing
    with tarfile.open(bad, "w") as tar:
        for name, payload in [("a.txt", b"only a caption"), ("b.png", (imgs / "1.png").read_bytes()),
                              ("c.png", (imgs / "2.png").read_bytes()), ("c.txt", b"   "),
                              ("d.png", b"\x89PNG not really"), ("d.txt", b"a broken image"),
                              ("e.jpg", (imgs / "3.png").read_bytes()), ("e.txt", b"a good one")]:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, __import__("io").BytesIO(payload))
    with pytest.warns(UserWarning) as record:
        ds = build_pairs(f"wds:{tmp_path}/bad-{{0..1}}.tar", "train", image_size=16)
    reasons = {reason for _, reason in ds.skipped}
    assert any("no image" in x for x in reasons) and any("no .txt caption" in x for x in reasons)
    assert any("empty or missing caption" in x for x in reasons)
    assert any("does not exist" in x for x in reasons)
    assert "bad-1.tar" in " ".join(str(w.message) for w in record)
    items = [ds[i] for i in range(len(ds))]  # the fixed 80/20 split keeps some of d and e in train
    assert all(("skip" in it and "d.png" in it["skip"]) or it["text"] == ["a good one"] for it in items)
    with pytest.raises(data_lib.DataError, match="none of its 2 shard"):
        build_pairs(f"wds:{tmp_path}/nope-{{0..1}}.tar", "train")


def test_holdout_moves_a_fixed_part_of_train_into_val():
    full = build_pairs("mnist5k_captions", "train")
    train = build_pairs("mnist5k_captions", "train", holdout=0.1)
    val = build_pairs("mnist5k_captions", "val", holdout=0.1, seed=7)  # the seed does not move it
    assert len(train) + len(val) == len(full) and len(val) == 400
    seen = {train[i]["image"].numpy().tobytes() for i in range(len(train))}
    assert not any(val[i]["image"].numpy().tobytes() in seen for i in range(len(val)))
    assert val.texts(0) == build_pairs("mnist5k_captions", "val", holdout=0.1).texts(0)
    with pytest.raises(data_lib.DataError, match="give holdout in"):
        build_pairs("mnist5k_captions", "val")
    with pytest.raises(ConfigError, match="'eval_split': 'val' needs"):
        load_config(None, [*TINY, "eval_split=val"])
    assert load_config(None, [*TINY, "eval_split=val", "holdout=0.1"]).holdout == 0.1


def test_eval_data_measures_a_source_never_trained_on(tmp_path):
    run = fit(load_config(None, [*TINY, "batch_size=16", "max_steps=1", "eval_data=icons",
                                 f"run_dir={tmp_path / 'r'}"]))
    summary = json.loads((run / "train_summary.json").read_text())
    assert "test_zeroshot_icons_top1" in summary and "test_zeroshot_mnist5k_captions_top1" not in summary
    assert summary["test_retrieval_images"] == len(build_pairs("icons", "test"))


def _clipart(root, rel, title, creator="Jane Doe", keywords=(), svg=True):
    png = root / "png" / rel
    png.parent.mkdir(parents=True, exist_ok=True)
    _png(png)
    if svg:
        path = (root / "svg" / rel).with_suffix(".svg")
        path.parent.mkdir(parents=True, exist_ok=True)
        lis = "".join(f"<rdf:li>{k}</rdf:li>" for k in keywords)
        path.write_text(f'<svg xmlns:cc="x" xmlns:dc="y" xmlns:rdf="z"><metadata><rdf:RDF><cc:Work rdf:about="">'
                        f'<dc:title>{title}</dc:title><dc:subject><rdf:Bag>{lis}</rdf:Bag></dc:subject>'
                        f'<dc:creator><cc:Agent><dc:title>{creator}</dc:title></cc:Agent></dc:creator>'
                        f'</cc:Work></rdf:RDF></metadata></svg>')


def test_openclipart_titles_are_filtered_with_file_names_as_fallback(tmp_path, monkeypatch):
    import data.pairs as pairs

    words = tmp_path / "words"
    words.write_text("\n".join("green frog animal amphibian folder open printer trash cat sleeping star "
                               "bird red fish tool hammer".split()))
    monkeypatch.setattr(pairs, "ENGLISH_WORDS", str(words))
    monkeypatch.setattr(pairs, "OPENCLIPART_MAX_PER_CAPTION", 2)
    monkeypatch.setattr(pairs, "OPENCLIPART_MIN_CLASS", 2)
    root = tmp_path / "oca"
    _clipart(root, "animals/frog_jane_doe_01.png", "Green Frog", keywords=["animal", "amphibian", "jane", "hash"])
    for stem in ("folder_open", "printer", "trash3", "folder_open_2", "cat", "red"):  # a collection's title
        _clipart(root, f"computer/icons/{stem}.png", "Lemon SVG theme")
    _clipart(root, "animals/rana_verde_mario_01.png", "Rana verde", creator="Mario Rossi")  # not English
    _clipart(root, "animals/cat_sleeping.png", "Jane Doe")  # the author's name as title
    _clipart(root, "animals/red_bird.png", "", svg=False)  # no SVG beside it
    for i in range(3):
        _clipart(root, f"shapes/star_{i}4pt0{i}step.png", "gramastar")
    _clipart(root, "tools/hammer_&amp;.png", "Hammer &amp; Tool")
    train, test = build_pairs(f"openclipart:{root}", "train"), build_pairs(f"openclipart:{root}", "test")
    texts = {tuple(train.texts(i)) for i in range(len(train))} | {tuple(test.texts(i)) for i in range(len(test))}
    assert ("green frog", "green frog, animal, amphibian") in texts  # title + keywords, author and 'hash' dropped
    assert {("folder open",), ("printer",), ("trash",), ("cat",), ("red",), ("cat sleeping",), ("red bird",),
            ("hammer tool",)} <= texts
    assert sum(t == ("star",) for t in texts) <= 1 and len(texts) == 10  # a set: "folder open" x2, "star" x2
    skipped = dict((n.split(" (")[0].rsplit("/", 1)[-1], r) for n, r in train.skipped)
    assert skipped["rana_verde_mario_01.png"] == "no English title or file name"
    assert "share the caption" in next(r for n, r in skipped.items() if n.startswith("star_"))
    assert len(train) + len(test) == 12 and len(train.skipped) == 2
    assert train.info.class_names == ["animal", "computer icon", "shape"]  # 'tools' has one image
    with pytest.raises(data_lib.DataError, match="openclipart-png openclipart-svg"):
        build_pairs(f"openclipart:{tmp_path}", "train")
    monkeypatch.setattr(pairs, "ENGLISH_WORDS", str(tmp_path / "none"))
    _clipart(tmp_path / "other", "animals/cat.png", "Cat")
    with pytest.raises(data_lib.DataError, match="wamerican"):
        build_pairs(f"openclipart:{tmp_path / 'other'}", "train")


needs_openclipart = pytest.mark.skipif(not os.path.isdir("/usr/share/openclipart/svg"),
                                       reason="apt-get install openclipart-png openclipart-svg wamerican (.ci/run does)")


@needs_openclipart
def test_openclipart_package_gives_english_captions_and_zero_shot_classes():
    train, test = build_pairs("openclipart", "train"), build_pairs("openclipart", "test")
    assert len(train) > 3000 and len(test) > 700  # about 4,000 of the 8,121 PNGs have an English caption
    assert {"animal", "food", "sign or symbol", "vehicle or road sign"} <= set(train.info.class_names)
    captions = [train.texts(i)[0] for i in range(len(train))] + [test.texts(i)[0] for i in range(len(test))]
    assert max(captions.count(c) for c in set(captions)) <= 20 and "emperor penguin" in captions
    assert not any("lemon svg theme" in c or "flat icon collection" in c for c in captions)
    i = next(i for i in range(len(test)) if test.texts(i)[0] == test.texts(i)[0] and test.labels[i] >= 0)
    item = test[i]
    assert item["image"].shape == (3, 64, 64) and item["path"].startswith("/usr/share/openclipart/png/")
