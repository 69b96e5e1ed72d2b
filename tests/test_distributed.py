"""Global batch norm over gloo ranks equals one process with the whole batch."""
import torch
from torch import nn

from dist_helpers import run_distributed
from pretrain.parallel import GlobalBatchNorm, convert_to_global_bn


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3),
                         nn.BatchNorm1d(3))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 2, 6, 6, generator=g), torch.randn(8, 3, generator=g)


def _loss(net, x, t):
    return ((net(x) - t) ** 2).sum(1).mean()


def _worker(rank, world):
    net = convert_to_global_bn(_net())
    x, t = _data()
    n = x.shape[0] // world
    loss = _loss(net, x[rank * n:(rank + 1) * n], t[rank * n:(rank + 1) * n])
    loss.backward()
    grads = [p.grad.clone() for p in net.parameters()]
    for g in grads:
        torch.distributed.all_reduce(g)
        g /= world
    return {"loss": loss.detach(), "grads": grads, "running": net[1].running_var.clone()}


def test_global_bn_matches_one_process():
    net = _net()
    x, t = _data()
    loss = _loss(net, x, t)
    loss.backward()
    ref = [p.grad for p in net.parameters()]
    res = run_distributed(_worker, world_size=2)
    assert torch.allclose((res[0]["loss"] + res[1]["loss"]) / 2, loss.detach(), atol=1e-6)
    for r in res:
        for g, gr in zip(r["grads"], ref):
            assert torch.allclose(g, gr, atol=1e-5), (g - gr).abs().max()
        assert torch.allclose(r["running"], net[1].running_var, atol=1e-5)


def test_global_bn_single_process_is_batch_norm():
    torch.manual_seed(0)
    bn, gbn = nn.BatchNorm2d(3), GlobalBatchNorm(3)
    x = torch.randn(5, 3, 4, 4, requires_grad=True)
    y1, y2 = bn(x), gbn(x)
    assert torch.allclose(y1, y2, atol=1e-5)
    assert torch.allclose(bn.running_var, gbn.running_var, atol=1e-6)
    bn.eval(), gbn.eval()
    assert torch.allclose(bn(x), gbn(x), atol=1e-5)
