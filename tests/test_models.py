"""Tests for models/: registry, ResNet, ViT, text tower, heads and EMA utilities.

All models are tiny (ResNet width 8, ViT depth 2 / dim 32 on 16x16 images, text tower
depth 2 / width 32 on 12 tokens) so the file runs in a few seconds on CPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import (
    MLPHead,
    ModelEMA,
    ResNet,
    TextTransformer,
    VisionTransformer,
    WSConv2d,
    WSLinear,
    create_backbone,
    ema_update_,
    frozen_copy,
    list_backbones,
    register_backbone,
)
from models.registry import BACKBONES
from models.resnet import num_groups_for

TINY_VIT = dict(image_size=16, patch_size=4, depth=2, embed_dim=32, num_heads=2)
N_PATCHES = (16 // 4) ** 2
TINY_TEXT = dict(vocab_size=64, context_length=16, width=32, depth=2, heads=2)
TINY_VATT = dict(frames=4, image_size=16, patch_size=8, audio_samples=1000, vocab_size=64, context_length=16, depth=2,
                 embed_dim=32, num_heads=2)
TEXT_LEN = 12


def tiny_kwargs(name: str) -> dict:
    if name.startswith("resnet"):
        return dict(width=8)
    if name.startswith("vit"):
        return dict(TINY_VIT)
    if name.startswith("text"):
        return dict(TINY_TEXT)
    if name.startswith("vatt"):
        return dict(TINY_VATT)
    return {}


def example_input(model: nn.Module) -> torch.Tensor:
    """Two inputs for ``model``: token ids for a text tower, clips for a multimodal one (VATT), images
    otherwise."""
    if hasattr(model, "modalities"):
        return torch.randn(2, model.in_chans, model.frames, model.image_size, model.image_size)
    if hasattr(model, "vocab_size"):  # text towers
        return torch.randint(1, model.vocab_size, (2, TEXT_LEN))
    size = getattr(model, "image_size", 16)
    return torch.randn(2, 3, size, size)


def tiny_vit(**kw) -> VisionTransformer:
    torch.manual_seed(0)
    cfg = dict(TINY_VIT)
    cfg.update(kw)
    return create_backbone("vit_tiny", **cfg).eval()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --------------------------------------------------------------------------- registry


def test_registry_lists_expected_backbones():
    names = list_backbones()
    for n in ("resnet18", "resnet50", "vit_tiny", "vit_small", "vit_base", "text_tiny", "text_small", "text_base"):
        assert n in names
    assert names == sorted(names)


def test_unknown_backbone_error_lists_valid_names_and_suggests():
    with pytest.raises(ValueError) as exc:
        create_backbone("resnet19")
    msg = str(exc.value)
    assert "\n" not in msg
    assert "unknown backbone 'resnet19'" in msg
    assert "did you mean 'resnet18'?" in msg
    for n in list_backbones():
        assert n in msg

    with pytest.raises(ValueError) as exc:
        create_backbone("xyz")
    assert "did you mean" not in str(exc.value)
    assert "valid backbones: " + ", ".join(list_backbones()) in str(exc.value)


@pytest.mark.parametrize("name, accepted", [("resnet18", "width"), ("vit_tiny", "patch_size")])
def test_unknown_kwarg_raises_type_error(name, accepted):
    with pytest.raises(TypeError) as exc:
        create_backbone(name, widht=8)
    msg = str(exc.value)
    assert "'widht'" in msg
    assert accepted in msg and "in_chans" in msg


def test_register_backbone_custom_and_duplicate():
    @register_backbone("_test_linear")
    def _factory(dim: int = 4):
        m = nn.Linear(dim, dim)
        m.embed_dim = dim
        return m

    try:
        assert "_test_linear" in list_backbones()
        assert create_backbone("_test_linear", dim=3).embed_dim == 3
        with pytest.raises(ValueError, match="already registered"):
            register_backbone("_test_linear")(_factory)
    finally:
        BACKBONES.pop("_test_linear", None)
    assert "_test_linear" not in list_backbones()


# --------------------------------------------------------------------------- contract


@pytest.mark.parametrize("name", list_backbones())
def test_backbone_contract(name):
    model = create_backbone(name, **tiny_kwargs(name))
    x = example_input(model)

    assert isinstance(model.embed_dim, int) and model.embed_dim > 0
    feats = model.forward_features(x)
    if isinstance(model, VisionTransformer):
        assert feats.shape == (2, 1 + model.num_patches, model.embed_dim)
    elif hasattr(model, "modalities"):
        pass  # checked below, with every modality
    elif hasattr(model, "vocab_size"):  # text towers: one feature per token
        assert feats.shape == (2, TEXT_LEN, model.embed_dim)
    else:
        assert feats.ndim == 4 and feats.shape[:2] == (2, model.embed_dim)

    pooled = model.forward_pooled(x)
    assert pooled.shape == (2, model.embed_dim)
    model.eval()
    assert torch.allclose(model(x), model.forward_pooled(x))

    model.train()
    model.zero_grad()
    if hasattr(model, "modalities"):  # every modality's tokeniser gets a gradient from its own input
        inputs = {"video": x, "audio": torch.randn(2, model.audio_samples),
                  "text": torch.randint(1, model.vocab_size, (2, TEXT_LEN))}
        assert feats.shape == (2, 1 + model.video_embed.num_tokens, model.embed_dim)
        sum((model.forward_pooled(v, m) ** 2).mean() for m, v in inputs.items()).backward()
    else:
        (model.forward_pooled(x) ** 2).mean().backward()
    for pname, p in model.named_parameters():
        if pname == "mask_token":  # only used when a mask is given
            continue
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if p.grad is not None)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "vit_tiny"])
def test_in_chans_1(name):
    model = create_backbone(name, in_chans=1, **tiny_kwargs(name))
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, model.embed_dim)
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 3, 16, 16))


# --------------------------------------------------------------------------- ResNet


@pytest.mark.parametrize("name, base", [("resnet18", 512), ("resnet50", 2048)])
@pytest.mark.parametrize("width", [8, 16])
def test_resnet_embed_dim(name, base, width):
    model = create_backbone(name, width=width)
    assert model.embed_dim == base * width // 64
    assert model.layer1[0].conv1.out_channels == width
    out = model.forward_features(torch.randn(2, 3, 16, 16))
    assert out.shape[1] == model.embed_dim


def test_resnet_stems_spatial_size():
    cifar = create_backbone("resnet18", width=8, stem="cifar").eval()
    imnet = create_backbone("resnet18", width=8, stem="imagenet").eval()
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1)
    assert isinstance(cifar.maxpool, nn.Identity)
    assert imnet.conv1.kernel_size == (7, 7) and imnet.conv1.stride == (2, 2)
    assert isinstance(imnet.maxpool, nn.MaxPool2d)

    x = torch.randn(1, 3, 32, 32)
    assert cifar.forward_features(x).shape[-2:] == (4, 4)  # total stride 8
    assert imnet.forward_features(x).shape[-2:] == (1, 1)  # total stride 32
    x = torch.randn(1, 3, 64, 64)
    assert cifar.forward_features(x).shape[-2:] == (8, 8)
    assert imnet.forward_features(x).shape[-2:] == (2, 2)


def test_resnet_bad_options():
    with pytest.raises(ValueError, match="stem"):
        create_backbone("resnet18", width=8, stem="tiny")
    with pytest.raises(ValueError, match="norm"):
        create_backbone("resnet18", width=8, norm="ln")


def test_resnet_channels_last_matches_contiguous():
    model = create_backbone("resnet18", width=8).eval()
    x = torch.randn(2, 3, 16, 16)
    ref = model(x)
    out = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    assert torch.allclose(ref, out, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_zero_init_residual(name):
    model = create_backbone(name, width=8, zero_init_residual=True)
    last = "bn3" if name == "resnet50" else "bn2"
    blocks = [b for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer]
    assert all(torch.all(getattr(b, last).weight == 0) for b in blocks)
    assert torch.all(blocks[0].bn1.weight == 1)
    default = create_backbone(name, width=8)
    assert all(torch.all(getattr(b, last).weight == 1) for layer in (default.layer1,) for b in layer)


def test_num_groups_for():
    assert num_groups_for(64) == 32
    assert num_groups_for(8) == 8
    assert num_groups_for(48) == 24
    assert num_groups_for(33) == 11
    assert num_groups_for(1) == 1


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_gn_ws_has_no_batchnorm(name):
    model = create_backbone(name, width=8, norm="gn_ws")
    mods = list(model.modules())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in mods)
    convs = [m for m in mods if isinstance(m, nn.Conv2d)]
    assert convs and all(isinstance(m, WSConv2d) for m in convs)
    gns = [m for m in mods if isinstance(m, nn.GroupNorm)]
    assert gns and all(m.num_channels % m.num_groups == 0 for m in gns)
    assert any(m.num_groups == 32 for m in gns)  # 256/512 channels in the last stages

    # No batch statistics: a sample's output does not depend on the rest of the batch.
    model.train()
    x = torch.randn(3, 3, 16, 16)
    assert torch.allclose(model(x)[:1], model(x[:1]), rtol=1e-3, atol=1e-4)
    bn_model = create_backbone(name, width=8).train()
    assert not torch.allclose(bn_model(x)[:1], bn_model(x[:1]), rtol=1e-3, atol=1e-4)


def test_wsconv_standardises_weight():
    conv = WSConv2d(4, 6, 3, padding=1, bias=True)
    with torch.no_grad():
        conv.weight.mul_(5.0).add_(2.0)
    w_hat = conv.standardized_weight()
    flat = w_hat.reshape(6, -1)
    assert torch.allclose(flat.mean(1), torch.zeros(6), atol=1e-5)
    assert torch.allclose(flat.std(1, unbiased=False), torch.ones(6), atol=1e-3)

    w = conv.weight
    manual = (w - w.mean((1, 2, 3), keepdim=True)) / torch.sqrt(
        w.var((1, 2, 3), unbiased=False, keepdim=True) + 1e-5
    )
    x = torch.randn(2, 4, 5, 5)
    assert torch.allclose(conv(x), F.conv2d(x, manual, conv.bias, padding=1), atol=1e-5)
    # Differs from a plain convolution with the raw weight.
    assert not torch.allclose(conv(x), F.conv2d(x, w, conv.bias, padding=1), atol=1e-3)
    # The stored parameter is not modified by forward.
    assert torch.equal(conv.weight, w)


# --------------------------------------------------------------------------- ViT


def test_vit_presets_and_overrides():
    m = create_backbone("vit_small", image_size=16, patch_size=4, depth=1)
    assert m.embed_dim == 384 and m.num_heads == 6 and len(m.blocks) == 1
    assert m.pos_embed.shape == (1, 1 + 16, 384)
    m = tiny_vit()
    assert m.embed_dim == 32 and len(m.blocks) == 2 and m.num_patches == N_PATCHES
    assert isinstance(m.blocks, (nn.Sequential, nn.ModuleList))
    assert m.cls_token.shape == m.mask_token.shape == (1, 1, 32)
    assert isinstance(m.patch_embed.proj, nn.Conv2d)


def test_vit_blocks_can_be_split_into_stages():
    m = tiny_vit()
    x = torch.randn(2, 3, 16, 16)
    tokens = m.prepare_tokens(x)
    staged = m.norm(m.blocks[1:](m.blocks[:1](tokens)))
    assert torch.allclose(staged, m.forward_features(x), atol=1e-6)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_vit_pooling(pool):
    m = tiny_vit(pool=pool)
    x = torch.randn(2, 3, 16, 16)
    tokens = m.forward_features(x)
    expected = tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(1)
    assert torch.allclose(m.forward_pooled(x), expected, atol=1e-6)


def _manual_tokens(m: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """Patch tokens computed by hand: unfold patches and apply the conv as a matmul."""
    p = m.patch_size
    b = x.shape[0]
    patches = x.unfold(2, p, p).unfold(3, p, p)  # [B, C, g, g, p, p]
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(b, -1, x.shape[1] * p * p)
    w = m.patch_embed.proj.weight.reshape(m.embed_dim, -1)
    return patches @ w.T + m.patch_embed.proj.bias


def _run_encoder(m: VisionTransformer, patch_tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    b = patch_tokens.shape[0]
    cls = (m.cls_token + m.pos_embed[:, :1]).expand(b, -1, -1)
    x = torch.cat([cls, patch_tokens + pos], dim=1)
    for blk in m.blocks:
        x = blk(x)
    return m.norm(x)


def test_vit_mask_replace_matches_explicit_computation():
    m = tiny_vit()
    with torch.no_grad():
        m.mask_token.normal_()
    x = torch.randn(2, 3, 16, 16)
    mask = torch.zeros(2, N_PATCHES, dtype=torch.bool)

    ref = m.forward_features(x)
    # All-False mask: identical to no mask.
    assert torch.equal(m.forward_features(x, mask=mask), ref)

    mask[0, 3] = True
    mask[1, [0, 5, 6]] = True
    out = m.forward_features(x, mask=mask)
    assert out.shape == ref.shape
    assert not torch.allclose(out, ref, atol=1e-4)

    tokens = _manual_tokens(m, x)
    tokens = torch.where(mask[..., None], m.mask_token.expand_as(tokens), tokens)
    expected = _run_encoder(m, tokens, m.pos_embed[:, 1:])
    assert torch.allclose(out, expected, atol=1e-5)

    # Pixels of masked patches no longer influence the output.
    x2 = x.clone()
    x2[0, :, 0:4, 12:16] += 10.0  # patch index 3 (row 0, col 3)
    assert torch.allclose(m.forward_features(x2, mask=mask), out, atol=1e-5)
    # ...but they do without a mask.
    assert not torch.allclose(m.forward_features(x2), ref, atol=1e-4)

    # The mask token gets a gradient only through masked positions.
    m.zero_grad()
    (m.forward_pooled(x, mask=mask) ** 2).sum().backward()
    assert m.mask_token.grad is not None and m.mask_token.grad.abs().sum() > 0


def test_vit_drop_masked_matches_running_on_kept_patches():
    m = tiny_vit(pool="mean")
    x = torch.randn(2, 3, 16, 16)
    mask = torch.zeros(2, N_PATCHES, dtype=torch.bool)
    mask[0, [1, 2, 7, 15]] = True
    mask[1, [0, 4, 8, 9]] = True
    n_vis = N_PATCHES - 4

    out = m.forward_features(x, mask=mask, drop_masked=True)
    assert out.shape == (2, 1 + n_vis, m.embed_dim)

    tokens = _manual_tokens(m, x)
    pos = m.pos_embed[:, 1:].expand(2, -1, -1)
    for i in range(2):
        keep = ~mask[i]
        expected = _run_encoder(m, tokens[i : i + 1, keep], pos[i : i + 1, keep])
        assert torch.allclose(out[i : i + 1], expected, atol=1e-5)

    pooled = m.forward_pooled(x, mask=mask, drop_masked=True)
    assert torch.allclose(pooled, out[:, 1:].mean(1), atol=1e-6)

    # No mask with drop_masked keeps all tokens.
    assert m.forward_features(x, drop_masked=True).shape == (2, 1 + N_PATCHES, m.embed_dim)


def test_vit_drop_masked_requires_equal_counts():
    m = tiny_vit()
    mask = torch.zeros(2, N_PATCHES, dtype=torch.bool)
    mask[0, :3] = True
    mask[1, :2] = True
    with pytest.raises(ValueError, match="same number"):
        m.forward_features(torch.randn(2, 3, 16, 16), mask=mask, drop_masked=True)


def test_vit_mask_shape_and_dtype_errors():
    m = tiny_vit()
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match=r"\[2, 16\]"):
        m.forward_features(x, mask=torch.zeros(2, 15, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\[2, 16\]"):
        m.forward_features(x, mask=torch.zeros(1, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        m.forward_features(x, mask=torch.zeros(2, 16))
    with pytest.raises(ValueError, match="multiples of patch_size 4"):
        m.forward_features(torch.randn(2, 3, 18, 18))
    with pytest.raises(ValueError, match=r"\[2, 4\]"):  # an 8x8 image has 4 patches
        m.forward_features(torch.randn(2, 3, 8, 8), mask=torch.zeros(2, 16, dtype=torch.bool))


def test_vit_other_sizes_resample_positions():
    """Inputs other than image_size (multi-crop's local views) get bicubically resampled positions;
    the native grid uses pos_embed unchanged, and gradients reach pos_embed from any size."""
    torch.manual_seed(0)
    m = tiny_vit()  # 16x16, patch 4: a 4x4 grid
    with torch.no_grad():
        m.pos_embed.normal_()
    assert torch.equal(m.patch_positions(4, 4), m.pos_embed[:, 1:])
    grid = m.pos_embed[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(2, 3), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 6, -1)
    assert torch.allclose(m.patch_positions(2, 3), want, atol=1e-6)
    for size, n in [(8, 4), (32, 64), (12, 9)]:
        x = torch.randn(2, 3, size, size)
        assert m.forward_features(x).shape == (2, 1 + n, m.embed_dim)
    m.zero_grad()
    m.forward_pooled(torch.randn(2, 3, 8, 8)).sum().backward()
    assert m.pos_embed.grad is not None and m.pos_embed.grad[:, 1:].abs().sum() > 0
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[:, 0] = True
    assert m.forward_features(torch.randn(2, 3, 8, 8), mask=mask, drop_masked=True).shape == (2, 1 + 3, m.embed_dim)


def test_vit_drop_path_only_in_training():
    m = tiny_vit(drop_path=0.5)
    assert isinstance(m.blocks[0].drop_path, nn.Identity)
    assert m.blocks[-1].drop_path.p == pytest.approx(0.5)
    x = torch.randn(8, 3, 16, 16)
    m.eval()
    assert torch.equal(m(x), m(x))
    m.train()
    torch.manual_seed(1)
    a = m(x)
    torch.manual_seed(2)
    b = m(x)
    assert not torch.allclose(a, b)


# --------------------------------------------------------------------------- heads


def test_mlp_head_byol_structure():
    head = MLPHead(16, 32, 8, num_layers=2, norm="bn")
    assert isinstance(head.layers, nn.ModuleList) and len(head.layers) == 2
    first, last = head.layers
    assert [type(m) for m in first] == [nn.Linear, nn.BatchNorm1d, nn.ReLU]
    assert first[0].bias is None and first[0].out_features == 32
    assert [type(m) for m in last] == [nn.Linear]
    assert last[0].bias is not None and last[0].out_features == 8
    assert head(torch.randn(4, 16)).shape == (4, 8)


def test_mlp_head_simclr_v2_last_norm_and_truncate():
    head = MLPHead(16, 32, 8, num_layers=3, norm="bn", last_norm=True)
    assert len(head.layers) == 3
    for blk in head.layers[:2]:
        assert [type(m) for m in blk] == [nn.Linear, nn.BatchNorm1d, nn.ReLU]
    last = head.layers[2]
    assert [type(m) for m in last] == [nn.Linear, nn.BatchNorm1d]
    assert last[0].bias is None and last[1].affine

    head.eval()
    x = torch.randn(4, 16)
    t1 = head.truncate(1)
    assert isinstance(t1, nn.Sequential) and len(t1) == 1 and t1[0] is head.layers[0]
    assert torch.allclose(t1(x), head.layers[0](x))
    assert t1(x).shape == (4, 32)
    assert torch.allclose(head.truncate(3)(x), head(x))
    assert len(head.truncate(0)) == 0
    with pytest.raises(ValueError):
        head.truncate(4)

    no_affine = MLPHead(16, 32, 8, num_layers=2, last_norm=True, last_norm_affine=False)
    assert not no_affine.layers[-1][1].affine


def test_mlp_head_other_norms():
    head = MLPHead(16, 32, 8, num_layers=3, norm="none")
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.LayerNorm)) for m in head.modules())
    assert all(blk[0].bias is not None for blk in head.layers)
    assert [type(m) for m in head.layers[0]] == [nn.Linear, nn.ReLU]

    ln = MLPHead(16, 32, 8, num_layers=2, norm="ln", last_norm=True)
    assert [type(m) for m in ln.layers[0]] == [nn.Linear, nn.LayerNorm, nn.ReLU]
    assert isinstance(ln.layers[1][1], nn.LayerNorm)
    x = torch.randn(2, 5, 16)  # token inputs
    out = ln(x)
    assert out.shape == (2, 5, 8)
    assert torch.allclose(out[1, 2], ln(x[1, 2][None])[0], atol=1e-6)

    single = MLPHead(16, 32, 8, num_layers=1)
    assert len(single.layers) == 1 and single(torch.randn(3, 16)).shape == (3, 8)
    with pytest.raises(ValueError):
        MLPHead(16, 32, 8, norm="none", last_norm=True)
    with pytest.raises(ValueError):
        MLPHead(16, 32, 8, norm="gn")


# --------------------------------------------------------------------------- EMA


def _small_net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))


def test_frozen_copy():
    online = _small_net()
    target = frozen_copy(online)
    assert target is not online
    assert all(not p.requires_grad for p in target.parameters())
    assert all(p.requires_grad for p in online.parameters())
    for t, o in zip(target.parameters(), online.parameters()):
        assert torch.equal(t, o) and t.data_ptr() != o.data_ptr()


@pytest.mark.parametrize("momentum", [0.0, 0.9, 0.996])
def test_ema_update_matches_formula(momentum):
    online = _small_net()
    target = frozen_copy(online)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    online.train()(torch.randn(8, 4))  # changes BN running stats and counter
    t_before = [p.clone() for p in target.parameters()]

    ema_update_(target, online, momentum)

    for t, t0, o in zip(target.parameters(), t_before, online.parameters()):
        assert torch.allclose(t, momentum * t0 + (1 - momentum) * o, atol=1e-6)
        assert not t.requires_grad
    for (name, tb), ob in zip(target.named_buffers(), online.buffers()):
        assert torch.equal(tb, ob), name
    assert target[1].num_batches_tracked.item() == 1
    assert not torch.equal(target[1].running_mean, torch.zeros(6))


def test_ema_update_momentum_one_keeps_parameters():
    online = _small_net()
    target = frozen_copy(online)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    t_before = [p.clone() for p in target.parameters()]
    ema_update_(target, online, 1.0)
    assert all(torch.equal(t, t0) for t, t0 in zip(target.parameters(), t_before))


def test_ema_update_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        ema_update_(nn.Linear(4, 3), nn.Linear(3, 4), 0.9)
    with pytest.raises(ValueError, match="numbers of parameters"):
        ema_update_(nn.Linear(4, 3), nn.Linear(4, 3, bias=False), 0.9)
    with pytest.raises(ValueError, match="momentum"):
        ema_update_(nn.Linear(4, 3), nn.Linear(4, 3), 1.5)


def test_ema_update_on_backbone():
    online = create_backbone("resnet18", width=8)
    target = frozen_copy(online)
    with torch.no_grad():
        for p in online.parameters():
            p.mul_(2.0)
    ema_update_(target, online, 0.5)
    for t, o in zip(target.parameters(), online.parameters()):
        assert torch.allclose(t, 0.75 * o, atol=1e-6)


def test_model_ema():
    model = _small_net()
    ema = ModelEMA(model, decay=0.9)
    assert not ema.module.training
    assert all(not p.requires_grad for p in ema.module.parameters())
    start = [p.clone() for p in ema.module.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    ema.update(model)
    assert ema.num_updates == 2
    for e, s, p in zip(ema.module.parameters(), start, model.parameters()):
        # two steps towards a fixed p: p + 0.81 * (s - p)
        assert torch.allclose(e, p + 0.81 * (s - p), atol=1e-6)

    x = torch.randn(3, 4)
    assert torch.allclose(ema(x), ema.module(x))

    sd = ema.state_dict()
    other = ModelEMA(_small_net(), decay=0.5)
    other.load_state_dict(sd)
    assert other.decay == 0.9 and other.num_updates == 2
    for a, b in zip(other.module.state_dict().values(), ema.module.state_dict().values()):
        assert torch.equal(a, b)


def test_wslinear_standardises_rows_and_drops_shared_component():
    torch.manual_seed(0)
    lin = WSLinear(16, 8)
    with torch.no_grad():
        lin.weight.mul_(7.0).add_(3.0)
    w = lin.weight
    manual = (w - w.mean(1, keepdim=True)) / torch.sqrt((w.var(1, unbiased=False, keepdim=True) + 1e-5) * 16)
    x = torch.randn(5, 16)
    assert torch.allclose(lin(x), F.linear(x, manual, lin.bias), atol=1e-5)
    assert not torch.allclose(lin(x), F.linear(x, w, lin.bias), atol=1e-3)
    # Rows sum to zero: a component shared by all input features does not reach the output.
    assert torch.allclose(lin(x + 4.0), lin(x), atol=1e-4)
    # Unit-variance inputs give unit-variance outputs, whatever the stored weight's scale.
    big = torch.randn(4096, 16)
    out = WSLinear(16, 64, bias=False)(big)
    assert 0.9 < out.var().item() < 1.1
    assert torch.equal(lin.weight, w)
    # Gradients reach the stored weight.
    lin(x).sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


def test_vit_patch_dropout_keeps_the_class_token_and_int_n_times_one_minus_p_patches():
    from models import create_backbone

    torch.manual_seed(0)
    vit = create_backbone("vit_tiny", image_size=16, patch_size=4, depth=1, embed_dim=16, num_heads=2,
                          patch_dropout=0.3)
    x = torch.randn(5, 3, 16, 16)
    vit.train()
    tokens = vit.forward_features(x)
    assert tokens.shape == (5, 1 + int(16 * 0.7), 16)  # 11 of 16 patches, plus the class token
    mask = vit.patch_dropout_mask(x)
    assert mask.shape == (5, 16) and ((~mask).sum(1) == 11).all()
    assert len({tuple(m.tolist()) for m in mask}) > 1  # each image draws its own patches
    # the class token is never dropped: it comes first, with the class embedding and position 0
    kept = vit.prepare_tokens(x)
    assert kept.shape[1] == 12
    torch.testing.assert_close(kept[:, 0], (vit.cls_token + vit.pos_embed[:, :1]).expand(5, 1, 16)[:, 0])
    vit.eval()  # evaluation sees every patch
    assert vit.forward_features(x).shape == (5, 17, 16)
    with pytest.raises(ValueError, match="patch_dropout must be in"):
        create_backbone("vit_tiny", image_size=16, patch_size=4, patch_dropout=1.0)


def test_pretrained_text_tower_is_the_packaged_minilm():
    """minilm_l6 over the minilm tokenizer, mean-pooled and normalised, is the package's sentence embedding."""
    from data.tokenize import create_tokenizer
    from eval_probes.search.text import get_text_encoder
    from models import create_backbone

    tok = create_tokenizer("minilm", 24)
    tower = create_backbone("minilm_l6", context_length=24).eval()
    texts = ["a frog.", "the digit seven, slanted to the right", "an icon of guitar acoustic " * 8]
    ids = tok(texts)
    assert ids.shape == (3, 24) and ids[0, 0] == 101 and (ids[:, -1] == 0).sum() == 2  # the long one ends in [SEP]
    assert ids[2, -1] == tok.eot_id == 102
    with torch.no_grad():
        ours = F.normalize(tower(ids), dim=1).numpy()
    ref = get_text_encoder("minilm").encode([tok._tok.decode(r, skip_special_tokens=True) for r in ids])
    assert abs(ours - ref).max() < 1e-5
    with pytest.raises(ValueError, match="tokenizer.name=minilm"):
        create_backbone("minilm_l6", vocab_size=49408)


def test_pretrained_image_tower_converts_the_data_normalisation():
    """efficientnet_lite0 with the packaged ImageNet weights gives the same features whatever
    normalisation the data uses (it converts to its own mean = std = 0.5)."""
    from models import create_backbone

    clip_mean, clip_std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    own = create_backbone("efficientnet_lite0").eval()
    other = create_backbone("efficientnet_lite0", data_mean=clip_mean, data_std=clip_std).eval()
    pixels = torch.rand(2, 3, 64, 64)
    m, s = torch.tensor(clip_mean).view(1, 3, 1, 1), torch.tensor(clip_std).view(1, 3, 1, 1)
    with torch.no_grad():
        a, b = own((pixels - 0.5) / 0.5), other((pixels - m) / s)
    assert a.shape == (2, 1280)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # ImageNet features, not random ones: a random-init network of the same shape differs
    rand = create_backbone("efficientnet_lite0", pretrained=False).eval()
    with torch.no_grad():
        assert not torch.allclose(rand((pixels - 0.5) / 0.5), a, atol=1e-2)
