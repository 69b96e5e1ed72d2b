"""Tensor parallelism of the transformer blocks through DeepSpeed's AutoTP, on two gloo ranks.

Each two-rank check builds the project's DeepSpeed engine (``pretrain.engines.zero.DeepSpeedEngine``,
ZeRO-0) around a whole module, so the cut is the one a run gets: the ``tensor_parallel`` section
written by :func:`pretrain.parallel.autotp_config`, applied by ``deepspeed.initialize``, and the
splits recorded afterwards. References: the same module run whole in one process on each rank, and
PyTorch's own ``parallelize_module`` (ColwiseParallel / RowwiseParallel) on the same MLP. One
spawn runs every check and returns the largest differences; the tests below read them.
"""
import copy

import pytest
import torch
import torch.nn as nn

from dist_helpers import run_distributed
from models.vit import Block, Mlp, VisionTransformer
from pretrain.parallel import (ParallelLayout, TensorParallelError, autotp_config, check_tensor_parallel,
                               gather_tensor_parallel_state, plan_splits, shard_full_state, tensor_parallel_splits)

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


def _cut(module, layout):
    """``module`` cut over ``layout.tp_group`` the way a run cuts it: the project's DeepSpeed engine."""
    from pretrain.engines.zero import DeepSpeedEngine

    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": layout.dp,
              "zero_optimization": {"stage": 0}, "gradient_clipping": 0.0, "steps_per_print": 10**9}
    return DeepSpeedEngine(module, None, None, config, layout=layout).module


def _block_checks(layout, causal):
    torch.manual_seed(0)
    block = Block(D, HEADS, mlp_ratio=HIDDEN / D, causal=causal)
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(B, N, D, generator=g), torch.randn(B, N, D, generator=g)
    ref_out, ref_xgrad, ref_grads = _fwd_bwd(block, x, w)

    tp = _cut(copy.deepcopy(block), layout)
    out, xgrad, grads = _fwd_bwd(tp, x, w)
    params = dict(tp.named_parameters())
    group = layout.tp_group
    return {
        "layers": sorted(f"{n}:{type(m).__name__}" for n, m in tp.named_modules()
                         if n.count(".") == 1 and n != "mlp.act"),
        "qkv_shape": tuple(params["attn.qkv.weight"].shape),
        "num_heads": tp.attn.num_heads,
        "splits": sorted(tensor_parallel_splits(tp)),
        "partition_dims": {n: p.partition_dim for n, p in params.items() if hasattr(p, "partition_dim")},
        "out": float((out - ref_out).abs().max()),
        "xgrad": float((xgrad - ref_xgrad).abs().max()),
        "grads": _maxdiff(gather_tensor_parallel_state(tp, group, grads), ref_grads),
        "state": _maxdiff(gather_tensor_parallel_state(tp, group), block.state_dict()),
    }


class _MlpOnly(nn.Module):
    """An MLP inside a block-shaped module (the cut selects :class:`models.vit.Block`)."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block.mlp(x)


def _torch_tp_checks(layout):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.manual_seed(0)
    block = Block(D, HEADS, mlp_ratio=HIDDEN / D)
    theirs = parallelize_module(copy.deepcopy(block.mlp), init_device_mesh("cpu", (2,)),
                                {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
    ours = _cut(_MlpOnly(copy.deepcopy(block)), layout)
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(B, N, D, generator=g), torch.randn(B, N, D, generator=g)
    out_t, xgrad_t, grads_t = _fwd_bwd(theirs, x, w)
    out_o, xgrad_o, grads_o = _fwd_bwd(ours, x, w)
    # contiguous splits: torch's local shards are exactly AutoTP's
    local = {f"block.mlp.{n}": t.to_local() if hasattr(t, "to_local") else t for n, t in grads_t.items()}
    grads_o = {n: t for n, t in grads_o.items() if n.startswith("block.mlp.")}
    return {"out": float((out_t - out_o).abs().max()), "xgrad": float((xgrad_t - xgrad_o).abs().max()),
            "grads": _maxdiff(local, grads_o)}


def _roundtrip_checks(layout):
    def vit(seed):
        torch.manual_seed(seed)
        return VisionTransformer(image_size=8, patch_size=4, embed_dim=D, depth=2, num_heads=HEADS,
                                 mlp_ratio=HIDDEN / D).eval()

    full = vit(0)
    full_state = full.state_dict()
    tp = _cut(vit(5), layout)  # other weights: everything below comes from full_state
    tp.load_state_dict(shard_full_state(full_state, tp))
    images = torch.randn(B, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = float((tp.forward_features(images) - full.forward_features(images)).abs().max())
    gathered = gather_tensor_parallel_state(tp, layout.tp_group)
    reshard = shard_full_state(gathered, tp)
    own = tp.state_dict()
    return {"sharded": len(tensor_parallel_splits(tp)), "out": out,
            "gather_exact": gathered.keys() == full_state.keys()
            and all(torch.equal(gathered[k], full_state[k]) for k in full_state),
            "reshard_exact": reshard.keys() == own.keys() and all(torch.equal(reshard[k], own[k]) for k in own)}


def _worker(rank, world):
    import os

    import deepspeed
    import torch.distributed as dist

    os.environ["LOCAL_RANK"] = str(rank)  # what the launcher sets; DeepSpeed's engine asks for it
    deepspeed.init_distributed(dist_backend="gloo")  # DeepSpeed's comm over the spawn's process group
    lay = ParallelLayout.build(dp=1, tp=world)
    assert lay.tp_rank == rank and dist.get_world_size(lay.tp_group) == world
    return {"block": _block_checks(lay, causal=False), "causal": _block_checks(lay, causal=True),
            "torch": _torch_tp_checks(lay), "roundtrip": _roundtrip_checks(lay), "batches": _batch_checks(lay, rank)}


def _batch_checks(layout, rank):
    """The engine's first-batch check: the same batch passes, a rank with other samples is named an error."""
    from pretrain.engines.zero import _check_same_batch

    same = {"images": torch.ones(2, 3), "labels": [torch.arange(2)]}
    _check_same_batch(same, layout.tp_group, layout.tp)
    try:
        _check_same_batch({**same, "labels": [torch.arange(2) + rank]}, layout.tp_group, layout.tp)
    except RuntimeError as exc:
        return str(exc)
    return None


@pytest.fixture(scope="module")
def results():
    return run_distributed(_worker, world_size=2)


@pytest.mark.parametrize("kind", ["block", "causal"])
def test_autotp_block_matches_one_process(results, kind):
    for r in results:
        res = r[kind]
        # DeepSpeed's own layers: column-parallel qkv (three sub-parameters) and fc1, row-parallel proj and fc2
        assert res["layers"] == ["attn.proj:LinearAllreduce", "attn.qkv:SubParamLinearLayer",
                                 "mlp.fc1:LinearLayer", "mlp.fc2:LinearAllreduce"], res["layers"]
        assert res["qkv_shape"] == (3 * D // 2, D) and res["num_heads"] == HEADS // 2
        assert res["splits"] == ["attn.proj.weight", "attn.qkv.bias", "attn.qkv.weight", "mlp.fc1.bias",
                                 "mlp.fc1.weight", "mlp.fc2.weight"]
        assert res["partition_dims"] == {"attn.qkv.weight": 0, "attn.qkv.bias": 0, "attn.proj.weight": 1,
                                         "mlp.fc1.weight": 0, "mlp.fc1.bias": 0, "mlp.fc2.weight": 1}
        for key in ("out", "xgrad", "grads", "state"):
            assert res[key] < 1e-5, (kind, key, res[key])


def test_matches_torch_tensor_parallel_api(results):
    for r in results:
        for key, diff in r["torch"].items():
            assert diff < 1e-5, (key, diff)


def test_full_state_round_trip(results):
    for r in results:
        res = r["roundtrip"]
        assert res["sharded"] == 12 and res["out"] < 1e-5
        assert res["gather_exact"] and res["reshard_exact"]


def test_tensor_parallel_ranks_must_read_the_same_batch(results):
    for r in results:
        assert "read different batches" in (r["batches"] or "")


def test_autotp_config_names_only_the_blocks_layers():
    model = nn.Sequential(nn.Linear(D, D), nn.Sequential(Block(D, HEADS, mlp_ratio=2.0)), nn.Linear(D, 3))
    section = autotp_config(model, 2)
    assert section["autotp_size"] == 2 and section["partition_config"]["use_default_specs"] is False
    patterns = [p for spec in section["partition_config"]["layer_specs"] for p in spec["patterns"]]
    assert sorted(patterns) == [r"^1\.0\.attn\.proj\.weight$", r"^1\.0\.attn\.qkv\.weight$",
                                r"^1\.0\.mlp\.fc1\.weight$", r"^1\.0\.mlp\.fc2\.weight$"]
    qkv = next(s for s in section["partition_config"]["layer_specs"] if "qkv" in s["patterns"][0])
    assert qkv["shape"] == [3, -1] and qkv["partition_type"] == "column"
    # rank 1 of 2 holds q, k and v of heads 2-3: rows 16-31, 48-63 and 80-95 of the fused [96, 32] weight
    rows = plan_splits(model, 1, 2)["1.0.attn.qkv.weight"].index[1].tolist()
    assert rows == [*range(16, 32), *range(48, 64), *range(80, 96)]


def test_indivisible_sizes_name_the_block():
    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(Block(8, 2, mlp_ratio=1.0), Block(8, 2, mlp_ratio=1.125)))
    with pytest.raises(TensorParallelError, match=r"parallel\.tp=2: 1\.1: MLP hidden size 9 is not divisible"):
        check_tensor_parallel(model, 2)
    with pytest.raises(TensorParallelError, match=r"parallel\.tp=4: 1\.0: num_heads=2 is not divisible"):
        check_tensor_parallel(model, 4)
    assert check_tensor_parallel(model, 1) == 0
    with pytest.raises(TensorParallelError, match="no transformer blocks"):
        check_tensor_parallel(nn.Linear(8, 8), 2)
