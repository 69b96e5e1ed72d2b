"""The backbone contract, checked on every registered backbone, and the text tower.

Every backbone describes itself: ``layer_ids()`` / ``num_layers()`` for layer-wise LR decay and
``pipeline_layers()`` for pipeline stages.  Backbones are built at their registered sizes and run
on small inputs (2 images of 32x32, ViTs with 8x8 patches; 2 sequences of 8 tokens).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import models
from models import ResNet, TextTransformer, VisionTransformer, create_backbone, list_backbones

TEXT_LEN = 8


def _build(name: str) -> tuple[nn.Module, torch.Tensor]:
    """A registered backbone (eval mode) and a small input for it."""
    torch.manual_seed(0)
    if name.startswith("vit"):
        model = create_backbone(name, image_size=32, patch_size=8)
    else:
        model = create_backbone(name)
    model.eval()
    if hasattr(model, "modalities"):  # multimodal backbones (VATT): their pipeline layers take video
        x = torch.randn(2, model.in_chans, model.frames, model.image_size, model.image_size)
    elif hasattr(model, "vocab_size"):  # text towers take token ids
        x = torch.randint(1, model.vocab_size, (2, TEXT_LEN))
        x[1, 5:] = model.pad_id  # a padded row
    else:
        size = getattr(model, "image_size", 32)
        x = torch.randn(2, 3, size, size)
    return model, x


def _run_pipeline(layers, x):
    for layer in layers:
        assert isinstance(layer, nn.Module)
        x = layer(x)
        assert isinstance(x, torch.Tensor), type(layer).__name__
    return x


# ------------------------------------------------------------------------------------------ every backbone


@pytest.mark.parametrize("name", list_backbones())
def test_backbone_describes_itself(name):
    model, x = _build(name)
    params = dict(model.named_parameters())
    name_of = {id(p): n for n, p in params.items()}

    # layer ids: every parameter, ids in [0, num_layers()], the module functions agree
    top = model.num_layers()
    ids = model.layer_ids()
    assert isinstance(top, int) and top >= 2
    assert sorted(ids) == sorted(params)
    assert all(isinstance(v, int) and 0 <= v <= top for v in ids.values())
    assert min(ids.values()) == 0 and len(set(ids.values())) >= top  # ids 0..num_blocks all in use
    assert models.layer_ids(model) == ids
    assert models.num_layers(model) == top and models.num_blocks(model) == top - 1

    # pipeline layers: the backbone's own parameters, each exactly once
    layers = model.pipeline_layers()
    assert isinstance(layers, list) and len(layers) >= 3
    seen = [id(p) for layer in layers for p in layer.parameters()]
    assert len(seen) == len(set(seen)), "a parameter sits in more than one pipeline layer"
    assert set(seen) == set(name_of), "pipeline layers do not hold exactly the backbone's parameters"
    # ...and ordered like the layer ids: depth never decreases along the pipeline
    depth_along = [ids[name_of[id(p)]] for layer in layers for p in layer.parameters()]
    assert depth_along == sorted(depth_along)

    # the composition is forward_pooled
    with torch.no_grad():
        want = model.forward_pooled(x)
        got = _run_pipeline(layers, x)
    assert want.shape == (2, model.embed_dim)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _reference_ids(model: nn.Module) -> dict[str, int]:
    """The numbering of the image backbones written out rule by rule."""
    ids = {}
    if isinstance(model, ResNet):
        block = {}
        j = 0
        for si, stage in enumerate([model.layer1, model.layer2, model.layer3, model.layer4], start=1):
            for bi in range(len(stage)):
                j += 1
                block[f"layer{si}.{bi}."] = j
        for n, _ in model.named_parameters():
            ids[n] = 0 if n.startswith(("conv1.", "bn1.")) else block[".".join(n.split(".")[:2]) + "."]
        return ids
    depth = len(model.blocks)
    for n, _ in model.named_parameters():
        if n.startswith(("patch_embed.", "cls_token", "pos_embed", "mask_token", "token_embed.")):
            ids[n] = 0
        elif n.startswith("blocks."):
            ids[n] = int(n.split(".")[1]) + 1
        else:
            assert n.startswith("norm.")
            ids[n] = depth + 1
    return ids


@pytest.mark.parametrize("name, blocks", [("resnet18", 8), ("resnet34", 16), ("resnet50", 16), ("resnet101", 33),
                                          ("resnet152", 50), ("vit_tiny", 12), ("vit_base", 12), ("text_tiny", 4),
                                          ("text_base", 12)])
def test_layer_id_numbering(name, blocks):
    kw = {"width": 8} if name.startswith("resnet") else {"image_size": 16, "patch_size": 8} if name.startswith("vit") \
        else {"vocab_size": 32, "context_length": 8}
    model = create_backbone(name, **kw)
    assert model.num_layers() == blocks + 1
    assert model.layer_ids() == _reference_ids(model)


def test_resnet_layer_ids_examples():
    m = create_backbone("resnet18", width=8)
    ids = m.layer_ids()
    assert ids["conv1.weight"] == ids["bn1.bias"] == 0
    assert ids["layer1.0.conv1.weight"] == 1 and ids["layer2.0.downsample.0.weight"] == 3
    assert ids["layer4.1.bn2.bias"] == 8 and m.num_layers() == 9


def test_vit_pipeline_at_other_image_sizes():
    """The embedding layer resamples positions for other grids exactly as forward_pooled does."""
    m = create_backbone("vit_tiny", image_size=16, patch_size=4, depth=2, embed_dim=32, num_heads=2, pool="mean").eval()
    with torch.no_grad():
        m.pos_embed.normal_()
        for size in (8, 12, 16, 24):
            x = torch.randn(2, 3, size, size)
            torch.testing.assert_close(_run_pipeline(m.pipeline_layers(), x), m.forward_pooled(x), atol=1e-5, rtol=1e-5)


def test_pipeline_layers_train_gradients_match():
    """Gradients through the pipeline layers are those of forward_pooled (text tower: the pooling marker)."""
    m = create_backbone("text_tiny", vocab_size=50, context_length=12, width=32, depth=2, heads=2, eot_id=7)
    ids = torch.randint(8, 50, (3, 10))
    ids[0, 4] = 7
    ids[0, 5:] = 0
    ids[2, 6] = 7

    def grads(fn):
        m.zero_grad()
        (fn(ids) ** 2).sum().backward()
        return {n: p.grad.clone() for n, p in m.named_parameters()}

    ref = grads(m.forward_pooled)
    got = grads(lambda t: _run_pipeline(m.pipeline_layers(), t))
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], atol=1e-5, rtol=1e-4, msg=n)


# ------------------------------------------------------------------------------------------ module functions


class _ToyNet(nn.Module):
    """A backbone defined outside this package: two linear layers and a norm."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.hidden = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.embed_dim = 8

    def forward(self, x):
        return self.norm(self.hidden(self.inp(x)))

    def num_layers(self):
        return 2

    def layer_ids(self):
        return {"inp.weight": 0, "inp.bias": 0, "hidden.weight": 1, "hidden.bias": 1, "norm.weight": 2, "norm.bias": 2}


class _NoIdsNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)


def test_module_functions_delegate_to_the_backbone():
    toy = _ToyNet()
    assert models.layer_ids(toy) == toy.layer_ids()
    assert list(models.layer_ids(toy)) == [n for n, _ in toy.named_parameters()]
    assert models.num_layers(toy) == 2 and models.num_blocks(toy) == 1


def test_module_without_layer_ids_gets_a_clear_error():
    for fn in (models.layer_ids, models.num_layers, models.num_blocks):
        with pytest.raises(ValueError) as exc:
            fn(_NoIdsNet())
        msg = str(exc.value)
        assert "_NoIdsNet" in msg and ("layer_ids()" in msg or "num_layers()" in msg)
    with pytest.raises(ValueError, match=r"_NoIdsNet.*implement its method layer_ids\(\)"):
        models.layer_ids(_NoIdsNet())


@pytest.mark.parametrize("change, match", [
    (lambda ids: ids.pop("hidden.bias"), "places no id on parameter.*hidden.bias"),
    (lambda ids: ids.update({"extra.weight": 1}), "unknown parameter.*extra.weight"),
    (lambda ids: ids.update({"norm.bias": 3}), r"'norm.bias' the id 3.*\[0, 2\]"),
    (lambda ids: ids.update({"inp.bias": -1}), r"'inp.bias' the id -1"),
])
def test_wrong_layer_ids_are_reported(change, match):
    toy = _ToyNet()
    ids = _ToyNet.layer_ids(toy)
    change(ids)
    toy.layer_ids = lambda: ids
    with pytest.raises(ValueError, match=match):
        models.layer_ids(toy)


# ------------------------------------------------------------------------------------------ text tower


def _tiny_text(**kw) -> TextTransformer:
    torch.manual_seed(0)
    cfg = dict(vocab_size=50, context_length=16, width=32, depth=2, heads=2)
    cfg.update(kw)
    return TextTransformer(**cfg).eval()


def test_text_registry_sizes_and_export():
    for name in ("text_tiny", "text_small", "text_base"):
        assert name in list_backbones()
    sizes = {"text_tiny": (128, 4, 4), "text_small": (384, 6, 6), "text_base": (512, 12, 8)}
    for name, (width, depth, heads) in sizes.items():
        m = create_backbone(name, vocab_size=100, context_length=20)
        assert (m.embed_dim, len(m.blocks), m.heads) == (width, depth, heads)
        assert m.pos_embed.shape == (1, 20, width) and m.token_embed.num_embeddings == 100
    clip = create_backbone("text_base")
    assert clip.vocab_size == 49408 and clip.context_length == 77 and clip.embed_dim == 512
    m = create_backbone("text_tiny", width=64, depth=2, heads=2, eot_id=3, pad_id=1, mlp_ratio=2.0)
    assert (m.embed_dim, len(m.blocks), m.heads, m.eot_id, m.pad_id) == (64, 2, 2, 3, 1)
    assert m.blocks[0].mlp.fc1.out_features == 128
    assert all(b.attn.causal for b in m.blocks)
    with pytest.raises(TypeError, match="image_size"):
        create_backbone("text_tiny", image_size=32)


def test_text_causality():
    m = _tiny_text()
    ids = torch.randint(1, 50, (2, 12))
    ref = m.forward_features(ids)
    assert ref.shape == (2, 12, 32)
    for t in (0, 5, 11):
        changed = ids.clone()
        changed[:, t] = (changed[:, t] % 49) + 1  # another non-pad token
        out = m.forward_features(changed)
        torch.testing.assert_close(out[:, :t], ref[:, :t], atol=1e-6, rtol=0)
        assert not torch.allclose(out[:, t], ref[:, t], atol=1e-4)
        if t + 1 < 12:
            assert not torch.allclose(out[:, t + 1:], ref[:, t + 1:], atol=1e-4)


def test_text_pools_at_last_non_pad_token():
    m = _tiny_text(pad_id=0)
    ids = torch.randint(1, 50, (4, 10))
    ids[0, 6:] = 0           # last real token at 5
    ids[1, 2] = 0            # a pad inside the text does not end it: last real token at 9
    ids[2, 3:] = 0
    ids[2, 7] = 5            # last real token at 7
    ids[3] = 0               # padding only: position 0
    want = torch.tensor([5, 9, 7, 0])
    assert torch.equal(m.pool_positions(ids), want)
    feats = m.forward_features(ids)
    torch.testing.assert_close(m.forward_pooled(ids), feats[torch.arange(4), want], atol=0, rtol=0)
    assert torch.equal(m(ids), m.forward_pooled(ids))


def test_text_pools_at_first_eot_token():
    eot = 49
    m = _tiny_text(pad_id=0, eot_id=eot)
    ids = torch.randint(1, 49, (3, 10))
    ids[0, 4] = eot
    ids[0, 5:] = 0           # EOT then padding: position 4
    ids[1, 2] = eot
    ids[1, 7] = eot          # two EOTs: the first one, 2
    ids[2, 8:] = 0           # no EOT: falls back to the last real token, 7
    want = torch.tensor([4, 2, 7])
    assert torch.equal(m.pool_positions(ids), want)
    feats = m.forward_features(ids)
    torch.testing.assert_close(m.forward_pooled(ids), feats[torch.arange(3), want], atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(_run_pipeline(m.pipeline_layers(), ids), m.forward_pooled(ids),
                                   atol=1e-5, rtol=1e-5)
    # a pad id equal to a real token id does not matter in EOT mode
    m0 = _tiny_text(pad_id=0, eot_id=eot)
    ids0 = ids.clone()
    ids0[0, 1] = 0
    assert m0.pool_positions(ids0)[0] == 4


@pytest.mark.parametrize("eot_id", [None, 49])
def test_text_padding_after_eot_does_not_change_pooled(eot_id):
    m = _tiny_text(pad_id=0, eot_id=eot_id)
    text = torch.randint(1, 49, (2, 6))
    if eot_id is not None:
        text[:, -1] = eot_id
    short = m.forward_pooled(text)
    for total in (7, 11, 16):
        padded = torch.zeros(2, total, dtype=torch.long)
        padded[:, :6] = text
        torch.testing.assert_close(m.forward_pooled(padded), short, atol=1e-5, rtol=1e-5)
    if eot_id is not None:  # in EOT mode, anything after the EOT is ignored
        tail = torch.cat([text, torch.randint(1, 50, (2, 5))], dim=1)
        torch.testing.assert_close(m.forward_pooled(tail), short, atol=1e-5, rtol=1e-5)


def test_text_input_checks():
    m = _tiny_text(context_length=16)
    m(torch.randint(1, 50, (2, 16)))  # exactly the context length is fine
    with pytest.raises(ValueError, match=r"sequence length 17 exceeds the context length 16"):
        m(torch.randint(1, 50, (2, 17)))
    with pytest.raises(ValueError, match=r"17.*16"):
        _run_pipeline(m.pipeline_layers(), torch.randint(1, 50, (2, 17)))
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        m(torch.randint(1, 50, (16,)))
    with pytest.raises(ValueError, match="integer"):
        m(torch.rand(2, 8))
    with pytest.raises(ValueError, match="divisible"):
        _tiny_text(width=30, heads=4)
    with pytest.raises(ValueError, match="eot_id"):
        _tiny_text(eot_id=50)


def test_text_tower_trains():
    m = _tiny_text().train()
    ids = torch.randint(1, 50, (3, 9))
    (m(ids) ** 2).mean().backward()
    for n, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert m.token_embed.weight.grad[ids.unique()].abs().sum() > 0
    assert m.no_weight_decay() <= {n for n, _ in m.named_parameters()}
