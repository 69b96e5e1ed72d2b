"""Gradient caching (BASIC): a contrastive step computed in chunks has the one-pass gradient."""
import math

import pytest
import torch

from losses import blockwise_info_nce, clip_loss
from models import create_backbone
from pretrain.config import ConfigError, load_config
from pretrain.objectives import create_objective


def _clip_towers():
    torch.manual_seed(0)
    image = create_backbone("vit_tiny", image_size=8, patch_size=4, in_chans=3, depth=2, embed_dim=16, num_heads=2)
    text = create_backbone("text_tiny", vocab_size=60, context_length=7, width=16, depth=2, heads=2, eot_id=2)
    return {"image": image, "text": text}


def _grads(model, batch, chunks):
    model.zero_grad(set_to_none=True)
    model.grad_chunks = chunks
    out = model(batch)
    out["loss"].backward()
    return out["loss"].item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(a, b, tol=1e-5):
    assert a.keys() == b.keys()
    for name in a:
        err = (a[name] - b[name]).abs().max().item()
        assert err <= tol * max(1.0, a[name].abs().max().item()), (name, err)


@pytest.mark.parametrize("loss,chunks", [("clip", 4), ("clip", 5), ("siglip", 3)])
def test_clip_gradient_in_chunks_equals_one_pass(loss, chunks):
    model = create_objective("clip", _clip_towers(), embed_dim=8, loss=loss).train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 60, (22, 7), generator=g)
    ids[:, -1] = 2
    batch = {"image": torch.randn(22, 3, 8, 8, generator=g), "text": ids}
    loss1, one = _grads(model, batch, 1)
    loss_k, chunked = _grads(model, batch, chunks)
    assert loss_k == pytest.approx(loss1, rel=1e-6)
    assert "logit_scale" in one and one["logit_scale"].abs().item() > 0
    _assert_same(one, chunked)


def test_simclr_gradient_in_chunks_equals_one_pass():
    torch.manual_seed(0)
    vit = create_backbone("vit_tiny", image_size=8, patch_size=4, in_chans=3, depth=2, embed_dim=16, num_heads=2)
    model = create_objective("simclr", vit, proj_hidden=32, proj_dim=8, head_norm="ln").train()
    g = torch.Generator().manual_seed(2)
    batch = {"views": [torch.randn(12, 3, 8, 8, generator=g), torch.randn(12, 3, 8, 8, generator=g)]}
    loss1, one = _grads(model, batch, 1)
    loss_k, chunked = _grads(model, batch, 6)
    assert loss_k == pytest.approx(loss1, rel=1e-6)
    _assert_same(one, chunked)


def test_batch_norm_statistics_are_updated_once_per_chunk():
    torch.manual_seed(0)
    net = create_backbone("resnet18", stem="cifar", width=8)
    model = create_objective("simclr", net, proj_hidden=32, proj_dim=8).train()
    g = torch.Generator().manual_seed(3)
    batch = {"views": [torch.randn(8, 3, 16, 16, generator=g), torch.randn(8, 3, 16, 16, generator=g)]}
    model.grad_chunks = 4
    model(batch)["loss"].backward()
    bn = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert int(bn.num_batches_tracked) == 4  # the first pass only: recomputing a chunk does not count it again
    assert all(p.grad is not None for p in model.backbone.parameters())


def test_blockwise_info_nce_equals_cross_entropy():
    g = torch.Generator().manual_seed(4)
    q = torch.randn(9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(13, 5, generator=g, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 3, 5, 1, 12, 7, 7, 2, 9])
    ref = torch.nn.functional.cross_entropy(s * q @ k.T, t)
    got = blockwise_info_nce(q, k, s, t, block=2)
    assert got.item() == pytest.approx(ref.item(), rel=1e-12)
    for a, b in zip(torch.autograd.grad(ref, (q, k, s)), torch.autograd.grad(got, (q, k, s))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    a, b = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    assert clip_loss(a, b, math.e, block=4).item() == pytest.approx(clip_loss(a, b, math.e).item(), rel=1e-12)
    with pytest.raises(ValueError, match="block must be >= 1"):
        blockwise_info_nce(q, k, s, t, block=0)


def test_grad_chunks_config_errors():
    with pytest.raises(ConfigError, match="objective 'byol' has no batch-coupled contrastive loss.*clip, simclr"):
        load_config(None, ["objective=byol", "grad_chunks=2"])
    with pytest.raises(ConfigError, match="config key 'grad_chunks': expected an integer from 1 .* got 0"):
        load_config(None, ["objective=simclr", "grad_chunks=0"])
    assert load_config(None, ["objective=clip", "grad_chunks=8"]).grad_chunks == 8
