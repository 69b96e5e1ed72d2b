"""Tests for losses/vatt.py: VATT's NCE and MIL-NCE against naive loops (values and gradients),
masking, temperature, shape errors, and a real two-process gloo run against one process."""

from __future__ import annotations

import math

import pytest
import torch

from losses import mil_nce_loss, nce_loss

try:
    from dist_helpers import run_distributed
except ImportError:  # tests/ turned into a package
    from tests.dist_helpers import run_distributed

TOL = 1e-6
F64 = torch.float64
MASK = torch.tensor([[1, 0, 1], [1, 1, 1], [0, 1, 0], [1, 0, 0], [0, 0, 1]], dtype=torch.bool)


def _randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(seed))


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt((x * x).sum())


# ---------------------------------------------------------------------------
# Naive references: the papers' formulas, one anchor clip at a time, on 0-dim tensors so that
# autograd gives reference gradients too.
# ---------------------------------------------------------------------------


def ref_nce(video, audio, tau):
    """VATT Eq. (2): positive (v_i, a_i); N = (v_i, a_j) and (v_j, a_i) for j != i."""
    b = video.shape[0]
    v, a = [_unit(x) for x in video], [_unit(x) for x in audio]
    total = 0.0
    for i in range(b):
        pos = torch.exp(v[i] @ a[i] / tau)
        neg = sum(torch.exp(v[i] @ a[j] / tau) + torch.exp(v[j] @ a[i] / tau) for j in range(b) if j != i)
        total = total - torch.log(pos / (pos + neg))
    return total / b


def ref_mil_nce(video, texts, mask, tau):
    """MIL-NCE Eq. (1): P(i) = clip i's captions; N(i) = (v_i, t_jk) and (v_j, t_ik), j != i."""
    b, k = texts.shape[:2]
    ok = (lambda i, m: True) if mask is None else (lambda i, m: bool(mask[i, m]))
    v = [_unit(x) for x in video]
    t = [[_unit(texts[i, m]) for m in range(k)] for i in range(b)]
    total = 0.0
    for i in range(b):
        pos = sum(torch.exp(v[i] @ t[i][m] / tau) for m in range(k) if ok(i, m))
        neg = 0.0
        for j in range(b):
            if j == i:
                continue
            neg = neg + sum(torch.exp(v[i] @ t[j][m] / tau) for m in range(k) if ok(j, m))  # v->t
            neg = neg + sum(torch.exp(v[j] @ t[i][m] / tau) for m in range(k) if ok(i, m))  # t->v
        total = total - torch.log(pos / (pos + neg))
    return total / b


def _value_and_grads(fn, *leaves):
    leaves = [x.clone().requires_grad_() for x in leaves]
    out = fn(*leaves)
    return out.detach(), torch.autograd.grad(out, leaves)


def _assert_same(a, b):
    (va, ga), (vb, gb) = a, b
    assert abs(va.item() - vb.item()) < TOL, (va.item(), vb.item())
    for x, y in zip(ga, gb):
        assert torch.allclose(x, y, rtol=0, atol=TOL)


# ---------------------------------------------------------------------------
# Single process.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [0.07, 0.5, 1.0])
def test_nce_matches_reference(tau):
    v, a = _randn(5, 4, seed=1), _randn(5, 4, seed=2)
    got = _value_and_grads(lambda x, y: nce_loss(x, y, tau), v, a)
    assert got[0].dim() == 0
    _assert_same(got, _value_and_grads(lambda x, y: ref_nce(x, y, tau), v, a))
    # The video->audio and audio->video negatives share one softmax: swapping roles is a no-op.
    assert abs(nce_loss(a, v, tau).item() - got[0].item()) < TOL


@pytest.mark.parametrize("tau", [0.07, 0.3])
@pytest.mark.parametrize("masked", [False, True])
def test_mil_nce_matches_reference(tau, masked):
    v, t = _randn(5, 4, seed=3), _randn(5, 3, 4, seed=4)
    mask = MASK if masked else None
    got = _value_and_grads(lambda x, y: mil_nce_loss(x, y, mask, tau), v, t)
    _assert_same(got, _value_and_grads(lambda x, y: ref_mil_nce(x, y, mask, tau), v, t))


def test_mil_nce_k1_equals_nce_and_gradcheck():
    v, a = _randn(6, 4, seed=5), _randn(6, 4, seed=6)
    _assert_same(_value_and_grads(lambda x, y: mil_nce_loss(x, y[:, None], temperature=0.2), v, a),
                 _value_and_grads(lambda x, y: nce_loss(x, y, 0.2), v, a))
    t = _randn(5, 3, 4, seed=7).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, y: mil_nce_loss(x, y, MASK, 0.3),
                                    (v[:5].clone().requires_grad_(), t))


def test_masked_captions_equal_dropping_them():
    v, t = _randn(5, 4, seed=8), _randn(5, 3, 4, seed=9)
    # Mask caption 1 of every clip == a K=2 batch without it (values and gradients).
    mask = torch.tensor([True, False, True]).expand(5, 3)
    keep = [0, 2]
    masked = _value_and_grads(lambda x, y: mil_nce_loss(x, y, mask), v, t)
    dropped = _value_and_grads(lambda x, y: mil_nce_loss(x, y[:, keep]), v, t)
    assert abs(masked[0].item() - dropped[0].item()) < TOL
    assert torch.allclose(masked[1][0], dropped[1][0], rtol=0, atol=TOL)
    assert torch.allclose(masked[1][1][:, keep], dropped[1][1][:, keep], rtol=0, atol=TOL)
    assert torch.equal(masked[1][1][:, 1], torch.zeros(5, 4, dtype=F64))
    # Ragged mask, padding full of NaN/inf: same value, finite gradients, zero on the padding.
    poisoned = t.clone()
    poisoned[~MASK] = float("nan")
    poisoned[0, 1, 0] = float("inf")
    clean = _value_and_grads(lambda x, y: mil_nce_loss(x, y, MASK), v, t)
    dirty = _value_and_grads(lambda x, y: mil_nce_loss(x, y, MASK), v, poisoned)
    _assert_same(dirty, clean)
    assert torch.equal(dirty[1][1][~MASK], torch.zeros(int((~MASK).sum()), 4, dtype=F64))


@pytest.mark.parametrize("tau", [0.07, 0.5, 2.0])
def test_temperature_closed_form(tau):
    # One-hot clips: positives score 1/tau, every negative 0, and there are 2(B-1) negatives per
    # positive (both directions, positive counted once): loss = log(1 + 2(B-1) exp(-1/tau)).
    b = 4
    eye = torch.eye(b, dtype=F64)
    expected = math.log1p(2 * (b - 1) * math.exp(-1.0 / tau))
    assert abs(nce_loss(eye, 3.0 * eye, tau).item() - expected) < TOL
    # K copies of the clip's direction (any lengths): same, as every term scales by K.
    texts = eye[:, None, :] * torch.tensor([0.5, 2.0, 7.0], dtype=F64)[None, :, None]
    assert abs(mil_nce_loss(eye, texts, temperature=tau).item() - expected) < TOL
    # One clip: nothing to contrast against.
    assert abs(nce_loss(_randn(1, 3, seed=10), _randn(1, 3, seed=11), tau).item()) < TOL


def _r(*shape):
    return torch.randn(*shape)


_BAD_CALLS = {
    "nce_dim": (lambda: nce_loss(_r(4, 8), _r(4, 9)),
                r"nce_loss: video and audio must both be \[B, D\]; got \(4, 8\) and \(4, 9\)"),
    "nce_3d": (lambda: nce_loss(_r(4, 1, 8), _r(4, 1, 8)), r"nce_loss: video and audio .*\(4, 1, 8\)"),
    "nce_temp": (lambda: nce_loss(_r(4, 8), _r(4, 8), 0.0), r"nce_loss: temperature must be > 0; got 0.0"),
    "mil_2d_texts": (lambda: mil_nce_loss(_r(4, 8), _r(4, 8)),
                     r"mil_nce_loss: video must be \[B, D\] and texts \[B, K, D\]; "
                     r"got video \(4, 8\) and texts \(4, 8\)"),
    "mil_batch": (lambda: mil_nce_loss(_r(4, 8), _r(3, 2, 8)), r"got video \(4, 8\) and texts \(3, 2, 8\)"),
    "mil_dim": (lambda: mil_nce_loss(_r(4, 8), _r(4, 2, 9)), r"got video \(4, 8\) and texts \(4, 2, 9\)"),
    "mil_mask": (lambda: mil_nce_loss(_r(4, 8), _r(4, 2, 8), torch.ones(4, 3, dtype=torch.bool)),
                 r"mil_nce_loss: text_mask must be \[B, K\] = \(4, 2\); got \(4, 3\)"),
    "mil_empty": (lambda: mil_nce_loss(_r(3, 8), _r(3, 2, 8), torch.tensor([[1, 0], [0, 0], [0, 0]]) > 0),
                  r"mil_nce_loss: text_mask leaves clips \[1, 2\] without any caption"),
    "mil_temp": (lambda: mil_nce_loss(_r(4, 8), _r(4, 2, 8), temperature=-1.0),
                 r"mil_nce_loss: temperature must be > 0; got -1.0"),
}


@pytest.mark.parametrize("call, match", list(_BAD_CALLS.values()), ids=list(_BAD_CALLS))
def test_shape_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------------
# Real two-process gloo run: 2 ranks x B clips against one process on the 2B clips.
# ---------------------------------------------------------------------------

WS, B_LOCAL, K, D_IN, D_OUT, TAU = 2, 3, 3, 5, 4, 0.1


def _global_problem():
    mask = torch.tensor([[1, 1, 0], [0, 1, 0], [1, 1, 1], [0, 0, 1], [1, 0, 1], [1, 0, 0]], dtype=torch.bool)
    return {"x_v": _randn(WS * B_LOCAL, D_IN, seed=20), "x_a": _randn(WS * B_LOCAL, D_IN, seed=21),
            "x_t": _randn(WS * B_LOCAL, K, D_IN, seed=22), "mask": mask,
            "w_v": _randn(D_OUT, D_IN, seed=23), "w_a": _randn(D_OUT, D_IN, seed=24),
            "w_t": _randn(D_OUT, D_IN, seed=25)}


def _losses_and_grads(prob, sl):
    """Both losses with gradients w.r.t. shared "tower" weights; identical code on one process
    (sl = everything) and on each rank (sl = its clips)."""
    w = {k: prob[k].clone().requires_grad_() for k in ("w_v", "w_a", "w_t")}
    lin = torch.nn.functional.linear
    v, a, t = lin(prob["x_v"][sl], w["w_v"]), lin(prob["x_a"][sl], w["w_a"]), lin(prob["x_t"][sl], w["w_t"])
    nce = nce_loss(v, a, TAU)
    g_nce = torch.autograd.grad(nce, (w["w_v"], w["w_a"]))
    v = lin(prob["x_v"][sl], w["w_v"])
    mil = mil_nce_loss(v, t, prob["mask"][sl], TAU)
    g_mil = torch.autograd.grad(mil, (w["w_v"], w["w_t"]))
    return {"nce": nce.detach(), "g_nce": torch.stack(g_nce), "mil": mil.detach(), "g_mil": torch.stack(g_mil)}


def _dist_worker(rk, ws):
    return _losses_and_grads(_global_problem(), slice(rk * B_LOCAL, (rk + 1) * B_LOCAL))


@pytest.fixture(scope="module")
def dist_results():
    return run_distributed(_dist_worker, world_size=WS)


@pytest.mark.parametrize("loss", ["nce", "mil"])
def test_distributed_matches_single_process(dist_results, loss):
    full = _losses_and_grads(_global_problem(), slice(None))
    per_rank = torch.stack([res[loss] for res in dist_results])
    assert abs(per_rank[0] - per_rank[1]) > TOL  # the ranks really hold different anchors
    # Mean of per-rank losses == one-process loss; average of per-rank gradients (what DDP and
    # DeepSpeed apply) == its gradient.
    assert abs(per_rank.mean() - full[loss]) < TOL
    avg = torch.stack([res["g_" + loss] for res in dist_results]).mean(0)
    assert torch.allclose(avg, full["g_" + loss], rtol=0, atol=TOL)
