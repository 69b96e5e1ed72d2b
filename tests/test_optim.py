import math

import pytest
import torch

from pretrain.objectives import list_objectives
from pretrain.optim import LAMB, LARS, build_optimizer
from pretrain.schedules import LRSchedule, warmup_cosine


def test_lars_matches_formula():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5, 3))
    b = torch.nn.Parameter(torch.randn(5))
    opt = LARS([{"params": [w]}, {"params": [b], "lars_exclude": True, "weight_decay": 0.0}],
               lr=0.1, momentum=0.9, weight_decay=0.01, eta=0.02)
    w0, b0 = w.detach().clone(), b.detach().clone()
    gw, gb = torch.randn(5, 3), torch.randn(5)
    w.grad, b.grad = gw.clone(), gb.clone()
    opt.step()
    g = gw + 0.01 * w0
    trust = 0.02 * w0.norm() / g.norm()
    assert torch.allclose(w, w0 - 0.1 * trust * g, atol=1e-6)
    assert torch.allclose(b, b0 - 0.1 * gb, atol=1e-6)  # excluded: no trust ratio, no decay
    # second step uses momentum
    w1 = w.detach().clone()
    w.grad = gw.clone()
    opt.step()
    g2 = gw + 0.01 * w1
    buf = 0.9 * (trust * g) + 0.02 * w1.norm() / g2.norm() * g2
    assert torch.allclose(w, w1 - 0.1 * buf, atol=1e-6)


def test_lamb_matches_formula():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    lr, b1, b2, eps, wd = 0.01, 0.9, 0.98, 1e-6, 0.1
    opt = LAMB([{"params": [w]}, {"params": [b], "lars_exclude": True, "weight_decay": 0.0}],
               lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    m, v, mb, vb = torch.zeros_like(w), torch.zeros_like(w), torch.zeros_like(b), torch.zeros_like(b)
    for t in (1, 2, 3):
        gw, gb = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
        w0, b0 = w.detach().clone(), b.detach().clone()
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
        m, v = b1 * m + (1 - b1) * gw, b2 * v + (1 - b2) * gw ** 2
        r = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps) + wd * w0
        assert torch.allclose(w, w0 - lr * (w0.norm() / r.norm()) * r, atol=1e-12)
        mb, vb = b1 * mb + (1 - b1) * gb, b2 * vb + (1 - b2) * gb ** 2
        rb = (mb / (1 - b1 ** t)) / ((vb / (1 - b2 ** t)).sqrt() + eps)
        assert torch.allclose(b, b0 - lr * rb, atol=1e-12)  # excluded: no trust ratio, no decay
    z = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))  # ||p|| = 0: the ratio is 1
    opt = LAMB([z], lr=0.1, weight_decay=0.0)
    z.grad = torch.ones(3, dtype=torch.float64)
    opt.step()
    assert torch.allclose(z, torch.full((3,), -0.1, dtype=torch.float64), atol=1e-6)


def test_build_optimizer_names():
    p = [torch.nn.Parameter(torch.zeros(2))]
    assert isinstance(build_optimizer([{"params": p}], "adamw", 1e-3, 0.05), torch.optim.AdamW)
    assert isinstance(build_optimizer([{"params": p, "lars_exclude": True}], "sgd", 0.1, 0.0), torch.optim.SGD)
    assert isinstance(build_optimizer([{"params": p, "lars_exclude": True}], "lamb", 1e-3, 0.05), LAMB)
    with pytest.raises(ValueError, match="unknown optimizer 'adam'; valid: sgd, adamw, lars, lamb"):
        build_optimizer([{"params": p}], "adam", 0.1, 0.0)


def test_warmup_cosine():
    assert warmup_cosine(0, 100, 10) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(10, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10) == pytest.approx(0.5)
    assert warmup_cosine(100, 100, 10, min_ratio=0.1) == pytest.approx(0.1)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    s = LRSchedule(opt, 2.0, 20, 0)
    for _ in range(5):
        s.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 5 / 20)))
    s2 = LRSchedule(opt, 2.0, 20, 0)
    s2.load_state_dict(s.state_dict())
    assert s2.lr == pytest.approx(s.lr)


@pytest.mark.parametrize("name", list_objectives())
def test_lars_for_every_objective_excludes_biases_and_norms(name):
    """LARS works with any objective's param groups: 1-d parameters (biases, norm scales) get neither
    the trust ratio nor weight decay, matrices and kernels get both."""
    from test_objectives import _tiny_objective

    torch.manual_seed(0)
    obj = _tiny_objective(name)
    opt = build_optimizer(obj.param_groups(), "lars", lr=0.1, weight_decay=0.5, momentum=0.9, lars_eta=0.01)
    assert isinstance(opt, LARS)
    # towers' own exemptions (position embeddings, class tokens) are excluded too, whatever their shape
    exempt = {id(p) for m in obj.modules() if hasattr(m, "no_weight_decay")
              for n, p in m.named_parameters() if n in m.no_weight_decay()}
    for g in opt.param_groups:
        for p in g["params"]:
            if p.ndim <= 1 or id(p) in exempt:
                assert g["lars_exclude"] and g["weight_decay"] == 0.0
            else:
                assert not g["lars_exclude"] and g["weight_decay"] == 0.5
    before = {id(p): p.detach().clone() for g in opt.param_groups for p in g["params"]}
    for g in opt.param_groups:
        for p in g["params"]:
            p.grad = torch.full_like(p, 0.01)
    opt.step()
    for g in opt.param_groups:
        for p in g["params"]:
            step = before[id(p)] - p.detach()
            if g["lars_exclude"]:  # plain SGD: first momentum buffer is the gradient
                assert torch.allclose(step, torch.full_like(p, 0.1 * 0.01), atol=1e-7)
            else:
                grad = 0.01 + 0.5 * before[id(p)]
                pn, gn = before[id(p)].norm(), grad.norm()
                trust = 0.01 * pn / gn if pn > 0 and gn > 0 else 1.0
                assert torch.allclose(step, 0.1 * trust * grad, atol=1e-6)
