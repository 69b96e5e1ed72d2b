"""The parallel layout is the only source of the data-parallel group.

Two gloo ranks in one data-parallel group reproduce one process on the whole batch (contrastive
gather, Sinkhorn's sums, global batch norm); two ranks each in a data-parallel group of its own
(as tensor- or pipeline-parallel peers would be) each reproduce one process on their own data.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dist_helpers import run_distributed
from losses import data_parallel_group, nt_xent_loss, set_data_parallel_group, sinkhorn, world_size
from pretrain.parallel import GlobalBatchNorm, LayoutError, ParallelLayout

N, D, K = 6, 8, 5


def _data(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2 * N, D, generator=g), torch.randn(N, K, generator=g), torch.randn(N, 3, 4, 4, generator=g)


def _compute(z, scores, images):
    """Loss and gradient of a contrastive loss, Sinkhorn codes and global-BN outputs on this rank's data."""
    z = z.clone().requires_grad_(True)
    loss = nt_xent_loss(F.normalize(z[:len(z) // 2], dim=1), F.normalize(z[len(z) // 2:], dim=1), temperature=0.5)
    loss.backward()
    bn = GlobalBatchNorm(3)
    return {"loss": loss.detach(), "grad": z.grad, "codes": sinkhorn(scores, 0.05, 3), "bn": bn(images).detach(),
            "dp_size": world_size()}


def _worker(rank, world, sizes):
    lay = ParallelLayout.build(*sizes).install()
    if sizes[0] == world:  # one data-parallel group: each rank holds half of one global batch
        z, s, x = _data(0)
        half = lambda t: t.reshape(2, -1, *t.shape[1:])[:, rank * (len(t) // 4):(rank + 1) * (len(t) // 4)].reshape(  # noqa: E731
            -1, *t.shape[1:])
        out = _compute(half(z), s[rank * N // 2:(rank + 1) * N // 2], x[rank * N // 2:(rank + 1) * N // 2])
    else:  # each rank alone in its data-parallel group, with data of its own
        out = _compute(*_data(10 + rank))
    out.update(dp_rank=lay.dp_rank, tp_rank=lay.tp_rank, pp_rank=lay.pp_rank, dp_ranks=lay.dp_ranks,
               mpu_dp=lay.get_data_parallel_world_size(), mpu_mp=lay.get_model_parallel_world_size())
    set_data_parallel_group(None)
    return out


def test_two_ranks_in_one_data_parallel_group_match_one_process():
    z, s, x = _data(0)
    ref = _compute(z, s, x)
    res = run_distributed(_worker, world_size=2, args=((2, 1, 1),))
    assert [r["dp_size"] for r in res] == [2, 2] and [r["dp_rank"] for r in res] == [0, 1]
    # the mean of the ranks' losses is the global loss; each rank's slice of the gradient is exact
    assert float((res[0]["loss"] + res[1]["loss"]) / 2) == pytest.approx(float(ref["loss"]), abs=1e-6)
    grad = torch.cat([torch.cat([r["grad"][:N // 2] for r in res]), torch.cat([r["grad"][N // 2:] for r in res])])
    assert torch.allclose(grad / 2, ref["grad"], atol=1e-6)
    assert torch.allclose(torch.cat([r["codes"] for r in res]), ref["codes"], atol=1e-6)
    assert torch.allclose(torch.cat([r["bn"] for r in res]), ref["bn"], atol=1e-5)


@pytest.mark.parametrize("sizes", [(1, 2, 1), (1, 1, 2)], ids=["tp2", "pp2"])
def test_ranks_in_data_parallel_groups_of_one_match_one_process_each(sizes):
    res = run_distributed(_worker, world_size=2, args=(sizes,))
    for rank, r in enumerate(res):
        ref = _compute(*_data(10 + rank))
        assert r["dp_size"] == 1 and r["dp_ranks"] == [rank] and r["mpu_dp"] == 1 and r["mpu_mp"] == 2
        for key in ("loss", "grad", "codes", "bn"):
            assert torch.allclose(r[key], ref[key], atol=1e-6), key
    assert [r["tp_rank"] for r in res] == ([0, 1] if sizes[1] == 2 else [0, 0])
    assert [r["pp_rank"] for r in res] == ([0, 1] if sizes[2] == 2 else [0, 0])


def test_single_process_layout_and_errors():
    lay = ParallelLayout.from_world()
    assert (lay.dp, lay.tp, lay.pp, lay.dp_rank, lay.world) == (1, 1, 1, 0, 1)
    lay.install()
    assert data_parallel_group() is None and world_size() == 1
    with pytest.raises(LayoutError, match="needs 2 ranks"):
        ParallelLayout.from_world(tp=2)
    with pytest.raises(LayoutError, match="must be >= 1"):
        ParallelLayout.build(0)


def test_global_bn_in_one_process_is_batch_norm_under_a_layout():
    ParallelLayout.single().install()
    torch.manual_seed(0)
    bn, gbn = nn.BatchNorm2d(3), GlobalBatchNorm(3)
    x = torch.randn(5, 3, 4, 4)
    assert torch.allclose(bn(x), gbn(x), atol=1e-5)
