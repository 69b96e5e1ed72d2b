"""VATT: the backbone (tokenisers, DropToken, shared or per-modality transformer) and the objective."""
import pytest
import torch

from models import create_backbone
from models.vatt import Vatt, drop_tokens, kept_tokens

TINY = dict(frames=4, image_size=16, patch_size=8, tubelet=2, audio_samples=1000, audio_patch=100, vocab_size=50,
            context_length=8, depth=2, embed_dim=32, num_heads=2)


def tiny(**kw) -> Vatt:
    torch.manual_seed(0)
    return create_backbone("vatt_tiny", **{**TINY, **kw})


def clips(b=3):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(b, 3, 4, 16, 16, generator=g), torch.randn(b, 1000, generator=g),
            torch.randint(1, 50, (b, 8), generator=g))


def test_token_counts_and_shapes():
    m = tiny()
    video, audio, text = clips()
    assert m.video_embed.num_tokens == 2 * 2 * 2 and m.audio_embed.num_tokens == 10
    assert m.forward_features(video, "video").shape == (3, 1 + 8, 32)
    assert m.forward_features(audio, "audio").shape == (3, 1 + 10, 32)
    assert m.forward_features(text, "text").shape == (3, 1 + 8, 32)
    for x, mod in ((video, "video"), (audio, "audio"), (text, "text")):
        assert m.forward_pooled(x, mod).shape == (3, 32)
    # a waveform that is not a multiple of the patch is zero-padded at the end
    short = audio[:, :950]
    torch.testing.assert_close(m.forward_pooled(short, "audio"),
                               m.forward_pooled(torch.cat([short, torch.zeros(3, 50)], 1), "audio"))


def test_mel_filterbank_and_log_mel_frontend():
    from models.vatt import mel_filterbank

    fb = mel_filterbank(256, 40, 8000)
    # triangles 1 at their centre frequency, sampled at the FFT bins: every band reaches at least half
    assert fb.shape == (40, 129) and fb.min() >= 0 and bool(((fb.max(1).values > 0.5) & (fb.max(1).values <= 1)).all())
    centres = fb.argmax(1)
    assert torch.all(centres[1:] >= centres[:-1]) and (centres[1:] - centres[:-1]).float().mean() > 2
    m = tiny(audio_frontend="logmel", sample_rate=8000, n_mels=16)
    assert m.audio_embed.num_tokens == 1000 // 100 + 1
    t = torch.arange(1000) / 8000
    tone = torch.sin(2 * torch.pi * 1000 * t)[None]  # 1 kHz: the loudest band is the one centred nearest
    spec = m.audio_embed.log_mel(tone)
    assert spec.shape == (1, 11, 16)
    band_hz = m.audio_embed.mel.argmax(1).float() * 8000 / 200
    assert abs(band_hz[spec[0, 5].argmax()] - 1000) < 250
    _, audio, _ = clips()
    assert m.forward_features(audio, "audio").shape == (3, 1 + 11, 32)
    kept = m.forward_features(audio, "audio", drop_rate=0.5, drop_seeds=torch.arange(3))
    assert kept.shape == (3, 1 + 5, 32)
    assert m.forward_pooled(audio * 0.1, "audio").shape == (3, 32)
    with pytest.raises(ValueError, match="audio frontend must be one of waveform, logmel"):
        tiny(audio_frontend="cqt")


@pytest.mark.parametrize("n,rate,keep", [(100, 0.0, 100), (100, 0.25, 75), (100, 0.5, 50), (100, 0.75, 25),
                                         (10, 0.5, 5), (7, 0.5, 3), (3, 0.9, 1)])
def test_drop_token_kept_counts(n, rate, keep):
    assert kept_tokens(n, rate) == keep
    x = torch.arange(2 * n, dtype=torch.float32).reshape(2, n, 1).expand(2, n, 4).contiguous()
    y = drop_tokens(x, rate)
    assert y.shape == (2, keep, 4)
    for row in range(2):
        got = y[row, :, 0]
        assert torch.all(got[1:] > got[:-1])  # kept tokens in their original order, no repeats
        assert set(got.tolist()) <= set(x[row, :, 0].tolist())


def test_drop_token_in_the_model_fixes_the_length_and_varies_per_clip():
    m = tiny()
    video, audio, text = clips(b=4)
    torch.manual_seed(0)
    tok, _ = m.tokens(video, "video", drop_rate=0.5)
    assert tok.shape == (4, 1 + kept_tokens(8, 0.5), 32)
    tok, _ = m.tokens(audio, "audio", drop_rate=0.75)
    assert tok.shape == (4, 1 + kept_tokens(10, 0.75), 32)
    tok, _ = m.tokens(text, "text", drop_rate=0.5)  # text is never dropped
    assert tok.shape == (4, 1 + 8, 32)
    # the same clip repeated keeps different tokens in different rows
    same = audio[:1].expand(4, -1)
    torch.manual_seed(1)
    kept, _ = m.tokens(same, "audio", drop_rate=0.5)
    assert not all(torch.equal(kept[0], kept[i]) for i in range(1, 4))
    with pytest.raises(ValueError, match=r"DropToken rate must be in \[0, 1\)"):
        m.tokens(audio, "audio", drop_rate=1.0)


def test_text_padding_is_never_attended_to():
    m = tiny().eval()
    ids = torch.randint(1, 50, (2, 8))
    ids[:, 5:] = m.pad_id
    before = m.forward_pooled(ids, "text")
    unpadded_before = m.forward_pooled(ids[:, :5], "text")
    m.text_embed.pos.data[:, 5:] += 10.0  # what the padding positions carry changes...
    m.text_embed.embed.weight.data[m.pad_id] += 5.0
    torch.testing.assert_close(m.forward_pooled(ids, "text"), before)  # ...and nothing sees it
    torch.testing.assert_close(before, unpadded_before, atol=1e-5, rtol=1e-5)
    full = torch.randint(1, 50, (2, 8))  # the real tokens' embeddings do matter
    assert not torch.allclose(m.forward_pooled(full, "text"), m.forward_pooled(full.flip(1), "text"))
    with pytest.raises(ValueError, match="context_length"):
        m.forward_pooled(torch.ones(2, 9, dtype=torch.long), "text")


def test_shared_and_separate_transformers():
    shared, separate = tiny(shared=True), tiny(shared=False)
    n_shared = sum(p.numel() for p in shared.parameters())
    n_sep = sum(p.numel() for p in separate.parameters())
    n_enc = sum(p.numel() for p in shared.encoder.parameters())
    assert n_sep - n_shared == 2 * n_enc  # two more transformers of the same size
    # shared: the three modalities go through the same blocks
    video, audio, text = clips()
    shared.zero_grad()
    shared.forward_pooled(audio, "audio").sum().backward()
    assert shared.encoder.blocks[0].attn.qkv.weight.grad is not None
    separate.zero_grad()
    separate.forward_pooled(audio, "audio").sum().backward()
    assert separate.encoders["audio"].blocks[0].attn.qkv.weight.grad is not None
    assert separate.encoders["video"].blocks[0].attn.qkv.weight.grad is None
    ids = separate.layer_ids()
    assert ids["encoders.text.blocks.1.mlp.fc1.weight"] == 2 and ids["encoders.audio.norm.weight"] == 3
    with pytest.raises(ValueError, match="unknown modality 'image'"):
        shared.forward_pooled(video, "image")


def test_video_input_checks_and_other_grids():
    m = tiny()
    with pytest.raises(ValueError, match=r"expected video \[B, C=3, T, H, W\]"):
        m.forward_pooled(torch.randn(2, 3, 3, 16, 16), "video")  # 3 frames, tubelet 2
    with pytest.raises(ValueError, match="longer than the 4 frames"):
        m.forward_pooled(torch.randn(2, 3, 6, 16, 16), "video")
    # a larger frame side resamples the row and column positions
    assert m.forward_pooled(torch.randn(2, 3, 2, 32, 32), "video").shape == (2, 32)


# ------------------------------------------------------------------------------------------ the objective


def tiny_objective(**cfg):
    from pretrain.objectives import create_objective
    from pretrain.objectives.vatt import VattConfig

    model = tiny(shared=cfg.pop("shared", True))
    return create_objective("vatt", {"video": model}, VattConfig(va_dim=16, vt_dim=8, **cfg))


def synthetic_batch(b=4, k=3):
    video, audio, _ = clips(b)
    text = torch.randint(1, 50, (b, k, 8), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(b, k, dtype=torch.bool)
    mask[0, 1:] = False
    mask[2, k - 1] = False
    text[~mask] = 0
    return {"video": video, "audio": audio, "text": text, "text_mask": mask, "label": torch.arange(b) % 2,
            "index": torch.arange(b)}


def test_vatt_loss_is_nce_plus_mil_nce_of_the_heads():
    from losses import mil_nce_loss, nce_loss

    obj = tiny_objective(vt_weight=0.5).eval()  # eval: no DropToken, batch norm with running statistics
    batch = synthetic_batch()
    out = obj(batch)
    m = obj.tower("video")
    v_va = obj.video_va(m.forward_pooled(batch["video"], "video"))
    a_va = obj.audio_va(m.forward_pooled(batch["audio"], "audio"))
    t = torch.stack([obj.text_vt(m.forward_pooled(batch["text"][:, j], "text")) for j in range(3)], 1)
    want_va = nce_loss(v_va, a_va, 0.07)
    want_vt = mil_nce_loss(obj.va_vt(v_va), t, batch["text_mask"], 0.07)
    torch.testing.assert_close(out["va_loss"], want_va)
    torch.testing.assert_close(out["vt_loss"], want_vt)
    torch.testing.assert_close(out["loss"], want_va + 0.5 * want_vt)


def test_vatt_trains_every_part_and_drops_tokens_only_in_training():
    obj = tiny_objective(drop_token=0.5)
    batch = synthetic_batch()
    obj.train()
    out = obj(batch)
    out["loss"].backward()
    for name, p in obj.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    seen = []
    handle = obj.tower("video").encoder.blocks[0].register_forward_hook(
        lambda mod, args, res: seen.append(res.shape[1]) and None)
    obj(batch)
    obj.eval()
    obj(batch)
    handle.remove()
    # training: video 1 + 4 of 8 tokens, audio 1 + 5 of 10, text 1 + 8; evaluation: all tokens
    assert seen == [5, 6, 9, 9, 11, 9]


def test_vatt_learns_on_synthetic_pairs():
    """A few AdamW steps on a fixed batch lower the loss (the heads and the backbone train together)."""
    torch.manual_seed(0)
    obj = tiny_objective(drop_token=0.0, head_norm="ln")
    batch = synthetic_batch(b=8, k=2)
    opt = torch.optim.AdamW(obj.parameters(), lr=1e-3)
    first = None
    for _ in range(50):
        loss = obj(batch)["loss"]
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.5 * first


def test_vatt_config_errors():
    from pretrain.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"vatt.drop_token': expected a fraction in \[0, 1\)"):
        tiny_objective(drop_token=1.0)
    with pytest.raises(ConfigError, match="vatt.head_norm"):
        tiny_objective(head_norm="gn")
    with pytest.raises(ConfigError, match="vatt.audio_frontend': expected one of waveform, logmel, got 'mfcc'"):
        tiny_objective(audio_frontend="mfcc")
    with pytest.raises(ConfigError, match="clips.frames"):
        load_config(None, ["objective=vatt", "clips.frames=0"])
    with pytest.raises(ConfigError, match="clips.audio_seconds"):
        load_config(None, ["objective=vatt", "clips.audio_seconds=0"])
    from pretrain.objectives import create_objective

    with pytest.raises(ConfigError, match="model.video.backbone=vatt_tiny"):
        create_objective("vatt", {"video": create_backbone("vit_tiny", image_size=16, patch_size=8, depth=1)})


def test_retrieval_recalls_against_a_loop():
    from pretrain.objectives.vatt import retrieval_recalls

    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(7, 5, generator=g), dim=1)
    k = torch.nn.functional.normalize(torch.randn(9, 5, generator=g), dim=1)
    pos = torch.rand(7, 9, generator=g) < 0.25
    pos[3] = False  # a query without positives is left out
    out = retrieval_recalls(q, k, pos, "x", ks=(1, 2, 5))
    ranks = []
    for i in range(7):
        if not pos[i].any():
            continue
        s = q[i] @ k.T
        best = max(float(s[j]) for j in range(9) if pos[i, j])
        ranks.append(sum(1 for j in range(9) if not pos[i, j] and float(s[j]) > best))
    for kk in (1, 2, 5):
        assert out[f"x_r{kk}"] == pytest.approx(sum(r < kk for r in ranks) / len(ranks))
    assert out["x_mean_rank"] == pytest.approx(sum(r + 1 for r in ranks) / len(ranks))


def test_drop_token_seeded_per_clip_does_not_depend_on_the_batch():
    """With seeds (the objective's: step and clip index) a clip keeps the same tokens alone, in any
    batch and on any rank; the same seed twice keeps the same tokens."""
    x = torch.randn(4, 10, 3)
    seeds = torch.tensor([11, 12, 13, 14])
    whole = drop_tokens(x, 0.5, seeds)
    halves = torch.cat([drop_tokens(x[:2], 0.5, seeds[:2]), drop_tokens(x[2:], 0.5, seeds[2:])])
    assert torch.equal(whole, halves)
    assert torch.equal(drop_tokens(x[1:2], 0.5, seeds[1:2]), whole[1:2])
    assert not torch.equal(drop_tokens(x, 0.5, seeds + 100), whole)
    from pretrain.objectives.vatt import VattObjective

    a = VattObjective.drop_seeds({"index": torch.tensor([5, 6]), "step": 3}, 0)
    b = VattObjective.drop_seeds({"index": torch.tensor([6]), "step": 3}, 0)
    assert a[1] == b[0] and a[0] != a[1]
    assert VattObjective.drop_seeds({"index": torch.tensor([5]), "step": 4}, 0)[0] != a[0]
    assert VattObjective.drop_seeds({"index": torch.tensor([5]), "step": 3}, 1)[0] != a[0]


# ------------------------------------------------------------------------------------------ real clips, end to end

RECIPE = "launch/recipes/vatt_moving_digits.yaml"
# the recipe at test size: 16 px, 4 frames, half a second of sound, one block 32 wide
FIT = ["model.video.depth=1", "model.video.embed_dim=32", "vatt.va_dim=32", "vatt.vt_dim=16", "batch_size=16",
       "precision=fp32", "log_every=1", "progress=false", "eval_every=0", "optim.warmup_steps=2"]


def _losses(run):
    import json

    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.fixture(scope="module")
def vatt_run(tmp_path_factory):
    from pretrain.config import load_config
    from pretrain.loop import fit

    return fit(load_config(RECIPE, [*FIT, "max_steps=6", f"run_dir={tmp_path_factory.mktemp('vatt') / 'run'}"]))


def test_vatt_fits_evaluates_and_resumes_exactly(tmp_path, vatt_run):
    import json

    from pretrain.config import load_config
    from pretrain.loop import fit

    summary = json.loads((vatt_run / "train_summary.json").read_text())
    for key in ("v2t_r1", "v2t_r10", "t2v_r5", "v2a_r1", "a2v_r10", "v2a_mean_rank", "zeroshot_text_moving_digits_top1",
                "zeroshot_audio_moving_digits_top1"):
        assert 0 <= summary[f"test_{key}"] <= (1000 if "rank" in key else 1), key
    assert summary["test_retrieval_clips"] == 1000 and summary["test_retrieval_texts"] == 4000
    b = tmp_path / "b"
    fit(load_config(RECIPE, [*FIT, "max_steps=6", "stop_at=3", f"run_dir={b}"]))
    fit(load_config(b / "config.yaml", ["stop_at=0", f"run_dir={b}"]), resume=True)
    assert _losses(b) == pytest.approx(_losses(vatt_run), abs=1e-6)  # DropToken too: drawn from step and clip


def test_a_vatt_run_finds_videos_by_text(tmp_path, vatt_run):
    """pretrain embed --run VATT_RUN --modality video, then search query --text through the run's own
    text path: the query is the run's video-text embedding of the text, the index its video ones."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np
    import torch.nn.functional as F

    from eval_probes.search.index import SearchIndex
    from eval_probes.search.query import text_query_vector
    from pretrain.encoders import run_encoder

    root = Path(__file__).resolve().parents[1]

    def cli(*args, ok=True):
        r = subprocess.run([sys.executable, "-m", "launch", *args], cwd=root, capture_output=True, text=True,
                           timeout=600)
        assert (r.returncode == 0) == ok, r.stderr[-2000:]
        return r

    cli("embed", "--run", str(vatt_run), "--modality", "video", "--data", "moving_digits", "--split", "test",
        "--limit", "200", "--dtype", "float32", "--out", str(tmp_path / "emb"), "--quiet")
    cli("search", "build", "--embeddings", str(tmp_path / "emb"), "--out", str(tmp_path / "idx"), "--quiet")
    out = json.loads(cli("search", "query", "--index", str(tmp_path / "idx"), "--text", "seven", "-k", "5",
                         "--json").stdout)
    assert len(out["results"]) == 5
    idx = SearchIndex.load(tmp_path / "idx")
    enc = run_encoder(vatt_run, modality="video")
    np.testing.assert_allclose(text_query_vector(idx, "seven"), F.normalize(enc.embed_text(["seven"]), dim=1).numpy(),
                               atol=1e-5)
    ds = enc.build_data("moving_digits", "test")
    first = int(idx.row_ids[0])
    np.testing.assert_allclose(idx.vectors([first]), F.normalize(enc.embed(ds[first]["video"][None]), dim=1).numpy(),
                               atol=1e-4)
    # audio into the video-audio space; an image run has no video, an image modality no clips
    audio = run_encoder(vatt_run, modality="audio")
    assert audio.embed(ds[0]["audio"][None]).shape == (1, 32) and audio.embed_text is None
    r = cli("embed", "--run", str(vatt_run), "--data", "moving_digits", "--out", str(tmp_path / "e2"), ok=False)
    assert "--modality image" in r.stderr and "give --modality video" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("tokenizer", ["clip_bpe", "minilm"])
def test_vatt_reads_bpe_and_word_piece_ids(tokenizer):
    """The text tokeniser embeds open_clip's BPE ids or MiniLM's word pieces (the vocabulary size and
    padding id come from the tokenizer), and a step trains on them."""
    from pretrain.batches import schema_of
    from pretrain.config import load_config
    from pretrain.loop import build_model
    from pretrain.objectives import objective_class

    cfg = load_config(RECIPE, [*FIT, f"tokenizer.name={tokenizer}", "tokenizer.context_length=16"])
    schema = schema_of(objective_class("vatt"))
    ds = schema.dataset(cfg, "test")
    sizes = schema.tower_sizes(cfg, ds.info)["video"]
    model = build_model(cfg, ds.info)
    assert model.tower("video").text_embed.embed.num_embeddings == sizes["vocab_size"] > 30000
    batch = schema.collate(cfg, model, ds.info, 0, 1)([dict(ds[i], step=0) for i in range(4)])
    assert batch["text"].shape[-1] == 16 and (batch["text"] == sizes["pad_id"]).any()
    out = model(batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and model.tower("video").text_embed.embed.weight.grad.abs().sum() > 0
