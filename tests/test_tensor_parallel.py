"""Megatron-style tensor parallelism of the transformer blocks on two gloo ranks.

References: the same block run whole in one process on each rank, and PyTorch's own
``parallelize_module`` (ColwiseParallel / RowwiseParallel) on the same MLP. One spawn runs every
two-rank check and returns the largest differences; the tests below read them.
"""
import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from dist_helpers import run_distributed
from models.vit import Block, Mlp, VisionTransformer
from pretrain.parallel import (ParallelLayout, TensorParallelMlp, gather_tensor_parallel_state, parallelize_blocks,
                               shard_full_state)

D, HEADS, HIDDEN, B, N = 32, 4, 64, 3, 5


def _maxdiff(a, b) -> float:
    if a.keys() != b.keys():
        return float("inf")
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _fwd_bwd(model, x, w):
    """Output, input gradient and parameter gradients of ``(model(x) * w).sum()``."""
    model.zero_grad()
    x = x.clone().requires_grad_(True)
    out = model(x)
    (out * w).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}


def _block_checks(group, causal):
    torch.manual_seed(0)
    block = Block(D, HEADS, mlp_ratio=HIDDEN / D, causal=causal)
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(B, N, D, generator=g), torch.randn(B, N, D, generator=g)
    ref_out, ref_xgrad, ref_grads = _fwd_bwd(block, x, w)

    tp = copy.deepcopy(block)
    changed = parallelize_blocks(tp, group)
    out, xgrad, grads = _fwd_bwd(tp, x, w)
    params = dict(tp.named_parameters())
    return {
        "changed": changed,
        "qkv_shape": tuple(params["attn.qkv.weight"].shape),
        "marked": sorted(n for n, p in params.items() if getattr(p, "model_parallel", False)
                         and getattr(p, "tensor_model_parallel", False)),
        "partition_dims": {n: p.partition_dim for n, p in params.items() if hasattr(p, "partition_dim")},
        "out": float((out - ref_out).abs().max()),
        "xgrad": float((xgrad - ref_xgrad).abs().max()),
        "grads": _maxdiff(gather_tensor_parallel_state(tp, group, grads), ref_grads),
        "state": _maxdiff(gather_tensor_parallel_state(tp, group), block.state_dict()),
        # a deep copy (an EMA teacher) shares the group and computes the same
        "copy": float((copy.deepcopy(tp)(x) - ref_out).abs().max()),
    }


def _torch_tp_checks(group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.manual_seed(0)
    mlp = Mlp(D, HIDDEN)
    theirs = parallelize_module(copy.deepcopy(mlp), init_device_mesh("cpu", (2,)),
                                {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
    ours = TensorParallelMlp(copy.deepcopy(mlp), group)
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(B, N, D, generator=g), torch.randn(B, N, D, generator=g)
    out_t, xgrad_t, grads_t = _fwd_bwd(theirs, x, w)
    out_o, xgrad_o, grads_o = _fwd_bwd(ours, x, w)
    # contiguous splits: torch's local shards are exactly ours
    local = {n: t.to_local() if hasattr(t, "to_local") else t for n, t in grads_t.items()}
    return {"out": float((out_t - out_o).abs().max()), "xgrad": float((xgrad_t - xgrad_o).abs().max()),
            "grads": _maxdiff(local, grads_o)}


def _roundtrip_checks(group):
    def vit(seed):
        torch.manual_seed(seed)
        return VisionTransformer(image_size=8, patch_size=4, embed_dim=D, depth=2, num_heads=HEADS,
                                 mlp_ratio=HIDDEN / D).eval()

    full = vit(0)
    full_state = full.state_dict()
    tp = vit(5)  # other weights: everything below comes from full_state
    changed = parallelize_blocks(tp, group)
    tp.load_state_dict(shard_full_state(full_state, tp))
    images = torch.randn(B, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = float((tp.forward_features(images) - full.forward_features(images)).abs().max())
    gathered = gather_tensor_parallel_state(tp, group)
    reshard = shard_full_state(gathered, tp)
    own = tp.state_dict()
    return {"changed": changed, "out": out,
            "gather_exact": gathered.keys() == full_state.keys()
            and all(torch.equal(gathered[k], full_state[k]) for k in full_state),
            "reshard_exact": reshard.keys() == own.keys() and all(torch.equal(reshard[k], own[k]) for k in own)}


def _worker(rank, world):
    lay = ParallelLayout.build(dp=1, tp=world)
    assert lay.tp_rank == rank and dist.get_world_size(lay.tp_group) == world
    return {"block": _block_checks(lay.tp_group, causal=False), "causal": _block_checks(lay.tp_group, causal=True),
            "torch": _torch_tp_checks(lay.tp_group), "roundtrip": _roundtrip_checks(lay.tp_group)}


@pytest.fixture(scope="module")
def results():
    return run_distributed(_worker, world_size=2)


@pytest.mark.parametrize("kind", ["block", "causal"])
def test_sharded_block_matches_one_process(results, kind):
    for r in results:
        res = r[kind]
        assert res["changed"] == 1 and res["qkv_shape"] == (3 * D // 2, D)
        assert res["marked"] == ["attn.proj.weight", "attn.qkv.bias", "attn.qkv.weight", "mlp.fc1.bias",
                                 "mlp.fc1.weight", "mlp.fc2.weight"]
        assert res["partition_dims"] == {"attn.qkv.weight": 0, "attn.qkv.bias": 0, "attn.proj.weight": 1,
                                         "mlp.fc1.weight": 0, "mlp.fc1.bias": 0, "mlp.fc2.weight": 1}
        for key in ("out", "xgrad", "grads", "state", "copy"):
            assert res[key] < 1e-5, (kind, key, res[key])


def test_matches_torch_tensor_parallel_api(results):
    for r in results:
        for key, diff in r["torch"].items():
            assert diff < 1e-5, (key, diff)


def test_full_state_round_trip(results):
    for r in results:
        res = r["roundtrip"]
        assert res["changed"] == 2 and res["out"] < 1e-5
        assert res["gather_exact"] and res["reshard_exact"]


def test_size_one_is_the_plain_block():
    torch.manual_seed(0)
    block = Block(D, HEADS, mlp_ratio=HIDDEN / D, causal=True)
    tp = copy.deepcopy(block)
    assert parallelize_blocks(tp, None) == 1 and parallelize_blocks(tp, None) == 0  # already parallel
    x = torch.randn(B, N, D)
    assert torch.allclose(tp(x), block(x), atol=1e-6)
    assert all(torch.equal(v, block.state_dict()[k]) for k, v in gather_tensor_parallel_state(tp, None).items())


def test_indivisible_sizes_name_the_block_and_change_nothing():
    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(Block(8, 2, mlp_ratio=1.0), Block(8, 2, mlp_ratio=1.125)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"^1\.1: MLP hidden size 9 is not divisible by the tensor-parallel size 2"):
        parallelize_blocks(model, None, rank=0, size=2)
    with pytest.raises(ValueError, match=r"1\.0: num_heads=2 is not divisible by the tensor-parallel size 4"):
        parallelize_blocks(model, None, rank=1, size=4)
    assert isinstance(model[1][0].attn.qkv, nn.Linear) and model.state_dict().keys() == before.keys()
