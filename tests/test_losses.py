"""Tests for losses/: naive loop references, gradients, shape checks, and a
real two-process gloo run checking that distributed losses/gradients match
the single-process ones on the global batch."""

from __future__ import annotations

import math

import pytest
import torch

from losses import (
    all_reduce_mean,
    byol_loss,
    clip_loss,
    gather_with_grad,
    nt_xent_loss,
    rank,
    siglip_loss,
    world_size,
)
from losses.dist import all_reduce_sum_

try:
    from dist_helpers import run_distributed
except ImportError:  # tests/ turned into a package
    from tests.dist_helpers import run_distributed

TOL = 1e-6
F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=F64, generator=_gen(seed))


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / math.sqrt(float((v * v).sum()))


# ---------------------------------------------------------------------------
# Naive references: explicit Python loops over anchors.
# ---------------------------------------------------------------------------


def ref_byol(p: torch.Tensor, z: torch.Tensor) -> float:
    total = 0.0
    for i in range(p.shape[0]):
        total += 2.0 - 2.0 * float(_unit(p[i]) @ _unit(z[i]))
    return total / p.shape[0]


def ref_nt_xent(z_a: torch.Tensor, z_b: torch.Tensor, t: float) -> float:
    n = z_a.shape[0]
    zs = [_unit(v) for v in list(z_a) + list(z_b)]
    total = 0.0
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        s_pos = float(zs[i] @ zs[pos])
        denom = sum(math.exp(float(zs[i] @ zs[k]) / t) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(s_pos / t) / denom)
    return total / (2 * n)


def ref_clip(img: torch.Tensor, txt: torch.Tensor, scale: float) -> float:
    n = img.shape[0]
    im = [_unit(v) for v in img]
    tx = [_unit(v) for v in txt]
    i2t = t2i = 0.0
    for i in range(n):
        row = [scale * float(im[i] @ tx[j]) for j in range(n)]
        i2t += -math.log(math.exp(row[i]) / sum(math.exp(r) for r in row))
        col = [scale * float(tx[i] @ im[j]) for j in range(n)]
        t2i += -math.log(math.exp(col[i]) / sum(math.exp(c) for c in col))
    return 0.5 * (i2t / n + t2i / n)


def ref_siglip(img: torch.Tensor, txt: torch.Tensor, scale: float, bias: float) -> float:
    """-1/B sum_ij log sigmoid(y_ij (s cos_ij + b)), y = +1 on the diagonal, -1 elsewhere."""
    n = img.shape[0]
    im = [_unit(v) for v in img]
    tx = [_unit(v) for v in txt]
    total = 0.0
    for i in range(n):
        for j in range(n):
            y = 1.0 if i == j else -1.0
            z = y * (scale * float(im[i] @ tx[j]) + bias)
            total += -math.log(1.0 / (1.0 + math.exp(-z)))
    return total / n


# ---------------------------------------------------------------------------
# Single-process tests.
# ---------------------------------------------------------------------------


def test_dist_helpers_single_process():
    assert world_size() == 1
    assert rank() == 0
    x = _randn(3, 4, seed=0)
    assert gather_with_grad(x) is x
    m = all_reduce_mean(x)
    assert m is not x and torch.equal(m, x) and not m.requires_grad
    assert all_reduce_sum_(x) is x


def test_byol_matches_reference():
    p, z = _randn(6, 5, seed=1), _randn(6, 5, seed=2)
    assert byol_loss(p, z).dim() == 0
    assert abs(byol_loss(p, z).item() - ref_byol(p, z)) < TOL


def test_byol_extremes():
    x = _randn(4, 3, seed=3)
    assert abs(byol_loss(x, 2.5 * x).item()) < TOL  # same direction -> 0
    assert abs(byol_loss(x, -x).item() - 4.0) < TOL  # opposite -> 4


def test_byol_no_grad_into_z():
    p = _randn(5, 4, seed=4).requires_grad_()
    z = _randn(5, 4, seed=5).requires_grad_()
    byol_loss(p, z).backward()
    assert z.grad is None
    assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("temperature", [0.5, 0.1, 1.0])
def test_nt_xent_matches_reference(temperature):
    z_a, z_b = _randn(5, 7, seed=6), _randn(5, 7, seed=7)
    loss = nt_xent_loss(z_a, z_b, temperature=temperature)
    assert loss.dim() == 0
    assert abs(loss.item() - ref_nt_xent(z_a, z_b, temperature)) < TOL


def test_nt_xent_scale_invariant_and_gradcheck():
    z_a = _randn(4, 3, seed=8).requires_grad_()
    z_b = _randn(4, 3, seed=9).requires_grad_()
    # L2-normalised inside: rescaling rows changes nothing.
    scaled = nt_xent_loss(3.0 * z_a, 0.2 * z_b)
    assert abs(scaled.item() - nt_xent_loss(z_a, z_b).item()) < TOL
    assert torch.autograd.gradcheck(lambda a, b: nt_xent_loss(a, b, 0.3), (z_a, z_b))


@pytest.mark.parametrize("scale", [1.0, 14.3])
def test_clip_matches_reference_and_is_symmetric(scale):
    img, txt = _randn(6, 5, seed=10), _randn(6, 5, seed=11)
    loss = clip_loss(img, txt, scale)
    assert loss.dim() == 0
    assert abs(loss.item() - ref_clip(img, txt, scale)) < TOL
    assert abs(clip_loss(txt, img, scale).item() - loss.item()) < TOL
    # A 0-dim tensor scale gives the same value as the float.
    assert abs(clip_loss(img, txt, torch.tensor(scale, dtype=F64)).item() - loss.item()) < TOL


def test_clip_grad_flows_to_logit_scale():
    img = _randn(4, 3, seed=12).requires_grad_()
    txt = _randn(4, 3, seed=13).requires_grad_()
    log_t = torch.tensor(math.log(10.0), dtype=F64, requires_grad=True)
    clip_loss(img, txt, log_t.exp()).backward()
    assert log_t.grad is not None and log_t.grad.abs() > 0
    assert img.grad is not None and txt.grad is not None
    scale = log_t.detach().exp().requires_grad_()
    assert torch.autograd.gradcheck(clip_loss, (img, txt, scale))


@pytest.mark.parametrize("scale, bias", [(10.0, -10.0), (1.0, 0.0), (3.7, 2.5)])
def test_siglip_matches_reference(scale, bias):
    img, txt = _randn(6, 5, seed=14), _randn(6, 5, seed=15)
    loss = siglip_loss(img, txt, scale, bias)
    assert loss.dim() == 0
    assert abs(loss.item() - ref_siglip(img, txt, scale, bias)) < TOL
    # scale and bias as single-element tensors give the same value
    t = siglip_loss(img, txt, torch.tensor([scale], dtype=F64), torch.tensor(bias, dtype=F64))
    assert abs(t.item() - loss.item()) < TOL


def test_siglip_gradients():
    img = _randn(4, 3, seed=16).requires_grad_()
    txt = _randn(4, 3, seed=17).requires_grad_()
    scale = torch.tensor(10.0, dtype=F64, requires_grad=True)
    bias = torch.tensor(-10.0, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(siglip_loss, (img, txt, scale, bias))
    # at the paper's start (s = 10, b = -10) the negatives already have near-zero loss and the
    # positive pairs dominate: raising b lowers the loss
    siglip_loss(img, txt, scale, bias).backward()
    assert bias.grad < 0 and scale.grad is not None


def _r(*shape):
    return torch.randn(*shape)


_BAD_CALLS = {
    "byol_mismatch": (
        lambda: byol_loss(_r(4, 8), _r(4, 9)),
        r"byol_loss: p and z .*got \(4, 8\) and \(4, 9\)",
    ),
    "byol_1d": (
        lambda: byol_loss(_r(8), _r(8)),
        r"byol_loss: p and z must both be \[B, D\]",
    ),
    "nt_xent_dim": (
        lambda: nt_xent_loss(_r(4, 8), _r(4, 9)),
        r"nt_xent_loss: z_a and z_b must both be \[N, D\]; got \(4, 8\) and \(4, 9\)",
    ),
    "nt_xent_batch": (
        lambda: nt_xent_loss(_r(4, 8), _r(3, 8)),
        r"nt_xent_loss: z_a and z_b",
    ),
    "nt_xent_3d": (
        lambda: nt_xent_loss(_r(2, 4, 8), _r(2, 4, 8)),
        r"nt_xent_loss: z_a and z_b",
    ),
    "nt_xent_temp": (
        lambda: nt_xent_loss(_r(4, 8), _r(4, 8), 0.0),
        r"nt_xent_loss: temperature",
    ),
    "clip_batch": (
        lambda: clip_loss(_r(4, 8), _r(5, 8), 1.0),
        r"clip_loss: image_emb and text_emb must both be \[N, D\]; got \(4, 8\) and \(5, 8\)",
    ),
    "siglip_batch": (
        lambda: siglip_loss(_r(4, 8), _r(5, 8), 10.0, -10.0),
        r"siglip_loss: image_emb and text_emb must both be \[N, D\]; got \(4, 8\) and \(5, 8\)",
    ),
    "siglip_bias": (
        lambda: siglip_loss(_r(4, 8), _r(4, 8), 10.0, torch.zeros(2)),
        r"siglip_loss: logit_bias must be a float or a single-element tensor",
    ),
    "clip_scale": (
        lambda: clip_loss(_r(4, 8), _r(4, 8), torch.ones(2)),
        r"clip_loss: logit_scale",
    ),
}


@pytest.mark.parametrize("call, match", list(_BAD_CALLS.values()), ids=list(_BAD_CALLS))
def test_shape_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------------
# Real two-process gloo run.
# ---------------------------------------------------------------------------

WS, N_LOCAL, D_IN, D_OUT, TEMP = 2, 3, 5, 4, 0.3


def _global_problem():
    """Global batch and shared weights, identical in every process."""
    return {
        "x_a": _randn(WS * N_LOCAL, D_IN, seed=20),
        "x_b": _randn(WS * N_LOCAL, D_IN, seed=21),
        "x_img": _randn(WS * N_LOCAL, D_IN, seed=22),
        "x_txt": _randn(WS * N_LOCAL, D_IN, seed=23),
        "w": _randn(D_OUT, D_IN, seed=24),  # shared "linear layer" weight
        "w_txt": _randn(D_OUT, D_IN, seed=25),  # text tower for CLIP
        "log_scale": torch.tensor(math.log(7.0), dtype=F64),
        "bias": torch.tensor(-2.0, dtype=F64),
    }


def _losses_and_grads(prob, sl):
    """nt_xent and clip losses with grads w.r.t. the shared weights.

    Runs identically in one process (sl = whole batch) and on each rank
    (sl = that rank's rows), so the two are directly comparable.
    """
    w = prob["w"].clone().requires_grad_()
    w_txt = prob["w_txt"].clone().requires_grad_()
    log_scale = prob["log_scale"].clone().requires_grad_()

    z_a = torch.nn.functional.linear(prob["x_a"][sl], w)
    z_b = torch.nn.functional.linear(prob["x_b"][sl], w)
    nt = nt_xent_loss(z_a, z_b, temperature=TEMP)
    (g_nt,) = torch.autograd.grad(nt, w)

    img = torch.nn.functional.linear(prob["x_img"][sl], w)
    txt = torch.nn.functional.linear(prob["x_txt"][sl], w_txt)
    cl = clip_loss(img, txt, log_scale.exp())
    g_img, g_txt, g_scale = torch.autograd.grad(cl, (w, w_txt, log_scale))

    bias = prob["bias"].clone().requires_grad_()
    img = torch.nn.functional.linear(prob["x_img"][sl], w)
    txt = torch.nn.functional.linear(prob["x_txt"][sl], w_txt)
    sg = siglip_loss(img, txt, log_scale.exp(), bias)
    s_img, s_txt, s_scale, s_bias = torch.autograd.grad(sg, (w, w_txt, log_scale, bias))
    return {
        "nt": nt.detach(), "g_nt": g_nt,
        "clip": cl.detach(), "g_img": g_img, "g_txt": g_txt, "g_scale": g_scale,
        "siglip": sg.detach(), "s_img": s_img, "s_txt": s_txt, "s_scale": s_scale, "s_bias": s_bias,
    }


def _dist_worker(rk, ws):
    assert (rank(), world_size()) == (rk, ws)
    prob = _global_problem()
    sl = slice(rk * N_LOCAL, (rk + 1) * N_LOCAL)
    out = _losses_and_grads(prob, sl)

    # gather_with_grad itself: rank-ordered concatenation, and the backward
    # sums incoming gradients over ranks before slicing.
    x = torch.full((2, 3), float(rk), dtype=F64, requires_grad=True)
    g = gather_with_grad(x)
    ((g * (rk + 1)).sum()).backward()  # rank r weights everything by r+1
    out["gathered"] = g.detach()
    out["gather_grad"] = x.grad

    out["mean"] = all_reduce_mean(torch.tensor([float(rk), 10.0 * rk]))
    out["sum_"] = all_reduce_sum_(torch.tensor([1.0 + rk]))
    return out


@pytest.fixture(scope="module")
def dist_results():
    return run_distributed(_dist_worker, world_size=WS)


def _close(a, b):
    return torch.allclose(a, b, rtol=0, atol=TOL)


def test_distributed_collectives(dist_results):
    assert len(dist_results) == WS
    expected_gather = torch.cat([torch.full((2, 3), float(r), dtype=F64) for r in range(WS)])
    for r, res in enumerate(dist_results):
        assert torch.equal(res["gathered"], expected_gather)
        # Sum over ranks of weights (1 + 2) reaches every rank's slice.
        assert torch.equal(res["gather_grad"], torch.full((2, 3), 3.0, dtype=F64))
        assert torch.allclose(res["mean"], torch.tensor([0.5, 5.0]))
        assert torch.equal(res["sum_"], torch.tensor([3.0]))


@pytest.mark.parametrize("loss, grads", [("nt", ["g_nt"]), ("clip", ["g_img", "g_txt", "g_scale"]),
                                         ("siglip", ["s_img", "s_txt", "s_scale", "s_bias"])])
def test_distributed_matches_single_process(dist_results, loss, grads):
    full = _losses_and_grads(_global_problem(), slice(None))
    per_rank = torch.stack([res[loss] for res in dist_results])
    # Ranks see different anchors: the per-rank losses genuinely differ.
    assert not _close(per_rank[0], per_rank[1])
    # (a) mean of per-rank losses == 1-process loss on the global batch.
    assert _close(per_rank.mean(), full[loss])
    # (b) average of per-rank grads (what DDP/DeepSpeed compute) == 1-process grad.
    for name in grads:
        avg = torch.stack([res[name] for res in dist_results]).mean(0)
        assert _close(avg, full[name]), name
