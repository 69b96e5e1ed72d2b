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
    with pytest.raises(ConfigError, match="clips.frames"):
        load_config(None, ["objective=vatt", "clips.frames=0"])
    with pytest.raises(ConfigError, match="clips.audio_seconds"):
        load_config(None, ["objective=vatt", "clips.audio_seconds=0"])
    from pretrain.objectives import create_objective

    with pytest.raises(ConfigError, match="model.video.backbone=vatt_tiny"):
        create_objective("vatt", {"video": create_backbone("vit_tiny", image_size=16, patch_size=8, depth=1)})
