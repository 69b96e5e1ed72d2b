"""Gradients of the backbones as the training loop runs them, against an fp64 reference.

This guards the memory-layout choice of ``pretrain.loop.uses_channels_last``: with torch 2.14 on
the CPU, a 1-channel ResNet in channels_last layout gets weight gradients up to ~16% off.
"""
import copy

import pytest
import torch

from models import create_backbone
from pretrain.config import load_config
from pretrain.loop import uses_channels_last


def _max_rel_grad_error(model, x, channels_last):
    torch.manual_seed(0)
    proj = torch.randn(x.shape[0], model.embed_dim, dtype=torch.float64)

    def grads(m, inp):
        m.zero_grad()
        y = m(inp)
        ((y * proj.to(y.dtype)) ** 2).mean().backward()
        return {n: p.grad.double().clone() for n, p in m.named_parameters()}

    ref = grads(copy.deepcopy(model).double(), x.double())
    m32 = copy.deepcopy(model).float()
    xin = x.float()
    if channels_last:
        m32 = m32.to(memory_format=torch.channels_last)
        xin = xin.contiguous(memory_format=torch.channels_last)
    got = grads(m32, xin)
    return max(float((got[n] - ref[n]).abs().max() / ref[n].abs().max().clamp_min(1e-12)) for n in ref)


@pytest.mark.parametrize("in_chans", [1, 3])
def test_layout_used_by_the_loop_gives_correct_gradients(in_chans):
    torch.manual_seed(0)
    model = create_backbone("resnet18", in_chans=in_chans, width=8)
    x = torch.randn(32, in_chans, 16, 16)
    cfg = load_config(None, [])
    err = _max_rel_grad_error(model, x, uses_channels_last(cfg, in_chans))
    assert err < 1e-3, f"fp32 gradients {err:.2e} off the fp64 reference"
