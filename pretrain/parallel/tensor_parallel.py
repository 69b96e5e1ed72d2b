"""Tensor parallelism for the transformer blocks of :mod:`models.vit`, applied from outside the model.

The layout follows Megatron-LM (Shoeybi et al. 2019, "Megatron-LM: Training Multi-Billion
Parameter Language Models Using Model Parallelism"): in each block the first linear layer of a
pair is split by output rows (:class:`ColumnParallelLinear`: attention's fused ``qkv``, the
MLP's ``fc1``) and the second by input columns (:class:`RowParallelLinear`: ``proj``, ``fc2``).
Everything between the two (per-head attention, GELU) is local to a rank, so a block costs one
all-reduce forward (``g``: :func:`reduce_from_tp`) and one backward (``f``: :func:`copy_to_tp`)
per pair. LayerNorms, residuals and the row layers' biases are replicated: every rank of the
tensor-parallel group sees the full activations outside the pairs.

Models stay single-device code; :func:`parallelize_blocks` swaps the ``attn`` / ``mlp`` of every
:class:`models.vit.Block` for sharded versions with the same parameter names, so names (LLRD
ids, optimizer groups, checkpoints keys) do not depend on the layout. Every sharded linear keeps
a :class:`TensorSplit` per sharded tensor in ``tp_splits``; :func:`gather_tensor_parallel_state`
and :func:`shard_full_state` read only that, so a checkpoint written with one ``tp`` loads under
another through the full (one-process) state dict.

A ``group`` of None means no tensor parallelism (size 1), as in ``ParallelLayout.tp_group``.
The ranks of one group must draw the same random numbers outside the pairs (drop path), i.e.
share their seed, since those tensors are replicated.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from data.common import UserError
from models.vit import Attention, Block, Mlp, attend

__all__ = ["copy_to_tp", "reduce_from_tp", "TensorSplit", "ColumnParallelLinear", "RowParallelLinear",
           "TensorParallelAttention", "TensorParallelMlp", "parallelize_blocks", "tensor_parallel_splits",
           "gather_tensor_parallel_state", "shard_full_state", "TensorParallelError", "apply_tensor_parallel",
           "splits_to_json", "unshard_from_json"]


def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _rank_size(group, rank: Optional[int], size: Optional[int]) -> Tuple[int, int]:
    """``(rank, size)`` in ``group``; explicit values serve offline (re)sharding without a group."""
    if group is not None:
        real = (dist.get_rank(group), dist.get_world_size(group))
        if (rank is not None and rank != real[0]) or (size is not None and size != real[1]):
            raise ValueError(f"rank={rank}, size={size} disagree with the tensor-parallel group "
                             f"(rank {real[0]} of {real[1]})")
        return real
    rank, size = (0 if rank is None else rank), (1 if size is None else size)
    if not 0 <= rank < size:
        raise ValueError(f"tensor-parallel rank {rank} is not in [0, {size})")
    return rank, size


class _CopyToTP(torch.autograd.Function):
    """Megatron's ``f``: each rank's sharded layer consumes the same replicated input, so the
    input's gradient is the sum of the ranks' partial gradients."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)  # autograd may still hold grad_output
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """Megatron's ``g``: each rank holds a partial sum of the row layer's product; the gradient
    of a sum reaches every term unchanged."""

    @staticmethod
    def forward(ctx, x, group):
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Identity forward, all-reduce (sum) of the gradient over ``group`` backward."""
    return x if _size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """All-reduce (sum) over ``group`` forward, identity backward."""
    return x if _size(group) == 1 else _ReduceFromTP.apply(x, group)


@dataclass(frozen=True, eq=False)
class TensorSplit:
    """How one tensor was cut: rank ``r`` holds ``full.index_select(dim, index[r])``.

    Attributes:
        dim: The partition dim (0: output rows, 1: input columns).
        rank: This rank's row of ``index``.
        index: ``[T, n]`` long, the full tensor's indices along ``dim`` held by each rank; every
            rank keeps the whole table so that shards can be put back without asking the model.
    """

    dim: int
    rank: int
    index: torch.Tensor

    @property
    def size(self) -> int:
        return self.index.shape[0]

    def shard(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's shard of ``full`` (length ``T * n`` along ``dim``)."""
        if full.shape[self.dim] != self.index.numel():
            raise ValueError(f"expected a full tensor of length {self.index.numel()} along dim {self.dim}, "
                             f"got shape {list(full.shape)}")
        return full.index_select(self.dim, self.index[self.rank].to(full.device))

    def unshard(self, shards: List[torch.Tensor]) -> torch.Tensor:
        """The full tensor from all ranks' shards, in rank order."""
        cat = torch.cat(shards, self.dim)
        return torch.empty_like(cat).index_copy_(self.dim, self.index.flatten().to(cat.device), cat)


def _blocks_of(length: int, size: int) -> torch.Tensor:
    return torch.arange(length).view(size, length // size)


class _Group:
    """Holds a process group; deep copies share it (a ProcessGroup cannot be copied, and an EMA
    teacher copied from a sharded student must talk over the same group)."""

    __slots__ = ("pg",)

    def __init__(self, pg) -> None:
        self.pg = pg

    def __deepcopy__(self, memo) -> "_Group":
        return self


class _ShardedLinear(nn.Module):
    def _set(self, name: str, tensor: Optional[torch.Tensor], split: Optional[TensorSplit], grad: bool) -> None:
        if tensor is None:
            self.register_parameter(name, None)
            return
        p = nn.Parameter((split.shard(tensor.detach()) if split else tensor.detach()).clone(), requires_grad=grad)
        if split is not None:
            # DeepSpeed's gradient norm / clipping counts a parameter on every model-parallel rank only
            # when it is marked (deepspeed.runtime.utils.is_model_parallel_parameter); Megatron reads
            # tensor_model_parallel / partition_dim. Parameter deep copies drop these attributes, so the
            # splits themselves live in the module's tp_splits.
            p.tensor_model_parallel, p.model_parallel, p.partition_dim = True, True, split.dim
            self.tp_splits[name] = split
        setattr(self, name, p)

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}, tp={self.tp_size}"


class ColumnParallelLinear(_ShardedLinear):
    """``y_r = x W_r^T + b_r``: this rank's output rows of ``full``; ``[..., in] -> [..., out / T]``.

    The input passes through :func:`copy_to_tp`; the output stays split across ranks.

    Args:
        full: The full layer (same weights on every rank).
        group: The tensor-parallel process group (None: size 1).
        rank, size: This rank and ``T``; default from ``group``.
        rows: ``[T, out / T]`` rows of ``full.weight`` held by each rank (default: contiguous blocks).
    """

    def __init__(self, full: nn.Linear, group, rank: Optional[int] = None, size: Optional[int] = None,
                 rows: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        rank, size = _rank_size(group, rank, size)
        if rows is None:
            if full.out_features % size:
                raise ValueError(f"out_features {full.out_features} is not divisible by the tensor-parallel size {size}")
            rows = _blocks_of(full.out_features, size)
        rows = torch.as_tensor(rows, dtype=torch.long).cpu()
        if rows.shape[0] != size or not torch.equal(rows.flatten().sort().values, torch.arange(full.out_features)):
            raise ValueError(f"rows must split the {full.out_features} output rows into {size} equal parts")
        self._group, self.tp_size, self.tp_splits = _Group(group), size, {}
        split = TensorSplit(0, rank, rows)
        self._set("weight", full.weight, split, full.weight.requires_grad)
        self._set("bias", full.bias, split, full.bias is not None and full.bias.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_tp(x, self._group.pg), self.weight, self.bias)


class RowParallelLinear(_ShardedLinear):
    """``y = sum_r x_r W_r^T + b``: this rank's input columns of ``full``; ``[..., in / T] -> [..., out]``.

    The partial products are summed by :func:`reduce_from_tp`; the full bias is added after the
    sum so that it counts once (it is replicated, hence not marked as sharded).

    Args:
        full: The full layer (same weights on every rank).
        group: The tensor-parallel process group (None: size 1).
        rank, size: This rank and ``T``; default from ``group``.
    """

    def __init__(self, full: nn.Linear, group, rank: Optional[int] = None, size: Optional[int] = None) -> None:
        super().__init__()
        rank, size = _rank_size(group, rank, size)
        if full.in_features % size:
            raise ValueError(f"in_features {full.in_features} is not divisible by the tensor-parallel size {size}")
        self._group, self.tp_size, self.tp_splits = _Group(group), size, {}
        self._set("weight", full.weight, TensorSplit(1, rank, _blocks_of(full.in_features, size)),
                  full.weight.requires_grad)
        self._set("bias", full.bias, None, full.bias is not None and full.bias.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = reduce_from_tp(F.linear(x, self.weight), self._group.pg)
        return y if self.bias is None else y + self.bias


class TensorParallelAttention(nn.Module):
    """:class:`models.vit.Attention` over this rank's ``H / T`` heads; ``[B, N, D] -> [B, N, D]``.

    ``qkv`` holds the q, k and v rows of heads ``r*H/T .. (r+1)*H/T - 1`` (so the local
    ``[B, N, 3, H/T, Dh]`` view is the original one restricted to those heads); ``proj`` holds the
    matching input columns.
    """

    def __init__(self, attn: Attention, group, rank: Optional[int] = None, size: Optional[int] = None) -> None:
        super().__init__()
        rank, size = _rank_size(group, rank, size)
        if attn.num_heads % size:
            raise ValueError(f"num_heads {attn.num_heads} is not divisible by the tensor-parallel size {size}")
        dim, local = attn.qkv.in_features, attn.qkv.in_features // size
        rows = torch.stack([torch.cat([torch.arange(j * dim + r * local, j * dim + (r + 1) * local) for j in range(3)])
                            for r in range(size)])
        self.num_heads, self.head_dim, self.causal = attn.num_heads // size, attn.head_dim, attn.causal
        self.qkv = ColumnParallelLinear(attn.qkv, group, rank, size, rows=rows)
        self.proj = RowParallelLinear(attn.proj, group, rank, size)

    def forward(self, x: torch.Tensor, key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, H/T, N, Dh]
        out = attend(q, k, v, self.causal, key_mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))


class TensorParallelMlp(nn.Module):
    """:class:`models.vit.Mlp` over this rank's ``hidden / T`` units; ``[..., D] -> [..., D]``."""

    def __init__(self, mlp: Mlp, group, rank: Optional[int] = None, size: Optional[int] = None) -> None:
        super().__init__()
        rank, size = _rank_size(group, rank, size)
        if mlp.fc1.out_features % size:
            raise ValueError(f"MLP hidden size {mlp.fc1.out_features} is not divisible by the tensor-parallel "
                             f"size {size}")
        self.fc1 = ColumnParallelLinear(mlp.fc1, group, rank, size)
        self.act = mlp.act
        self.fc2 = RowParallelLinear(mlp.fc2, group, rank, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def parallelize_blocks(module: nn.Module, group, rank: Optional[int] = None, size: Optional[int] = None) -> int:
    """Replaces, in place, ``attn`` and ``mlp`` of every :class:`models.vit.Block` in ``module`` by
    their tensor-parallel versions, cut from the block's current full weights.

    Every rank of ``group`` must hold the same full weights first (same seed or same checkpoint).
    All blocks are checked before any is changed, so a failure leaves ``module`` as it was.

    Returns:
        The number of blocks changed (blocks already parallel are skipped).

    Raises:
        ValueError: naming the block, when its heads or MLP hidden size do not divide by ``T``.
    """
    rank, size = _rank_size(group, rank, size)
    todo = [(name or type(module).__name__, b) for name, b in module.named_modules()
            if isinstance(b, Block) and (isinstance(b.attn, Attention) or isinstance(b.mlp, Mlp))]
    for name, b in todo:
        if isinstance(b.attn, Attention) and b.attn.num_heads % size:
            raise ValueError(f"{name}: num_heads={b.attn.num_heads} is not divisible by the tensor-parallel size {size}")
        if isinstance(b.mlp, Mlp) and b.mlp.fc1.out_features % size:
            raise ValueError(f"{name}: MLP hidden size {b.mlp.fc1.out_features} is not divisible by the "
                             f"tensor-parallel size {size}")
    for _, b in todo:
        if isinstance(b.attn, Attention):
            b.attn = TensorParallelAttention(b.attn, group, rank, size)
        if isinstance(b.mlp, Mlp):
            b.mlp = TensorParallelMlp(b.mlp, group, rank, size)
    return len(todo)


def tensor_parallel_splits(module: nn.Module) -> Dict[str, TensorSplit]:
    """``{state-dict key: TensorSplit}`` for every sharded tensor in ``module``."""
    return {f"{prefix}.{key}" if prefix else key: split
            for prefix, m in module.named_modules(remove_duplicate=False)
            for key, split in getattr(m, "tp_splits", {}).items()}


def gather_tensor_parallel_state(module: nn.Module, group,
                                 tensors: Optional[Dict[str, Optional[torch.Tensor]]] = None) -> Dict[str, torch.Tensor]:
    """The full (one-process) state dict of a sharded ``module``; a collective over ``group``.

    Args:
        module: The sharded module; only its ``tp_splits`` are read.
        group: The tensor-parallel group it was sharded over (every rank must call).
        tensors: Tensors keyed like ``module.state_dict()`` to gather instead, e.g. the parameters'
            ``.grad``; None values pass through.

    Returns:
        Sharded tensors all-gathered and put back in the original layout (``qkv.weight`` is the
        original ``[3D, D]``); other tensors as they are.
    """
    splits, size = tensor_parallel_splits(module), _size(group)
    out = {}
    for key, t in (module.state_dict() if tensors is None else tensors).items():
        split = splits.get(key)
        if split is None or t is None:
            out[key] = t
            continue
        if split.size != size:
            raise ValueError(f"{key} was split {split.size} ways, but the group has {size} ranks")
        shards = [t]
        if size > 1:
            shards = [torch.empty_like(t) for _ in range(size)]
            dist.all_gather(shards, t.detach().contiguous(), group=group)
        out[key] = split.unshard(shards)
    return out


def shard_full_state(full_state: Dict[str, torch.Tensor], module: nn.Module) -> Dict[str, torch.Tensor]:
    """The state dict this rank's sharded ``module`` loads from a full (one-process) one; no collectives."""
    splits = tensor_parallel_splits(module)
    return {k: splits[k].shard(v) if k in splits else v for k, v in full_state.items()}


class TensorParallelError(UserError, ValueError):
    """A run asks for tensor parallelism its model cannot take (no transformer blocks, sizes that do not divide)."""


def apply_tensor_parallel(model: nn.Module, layout) -> int:
    """Cuts every transformer block of ``model`` over ``layout.tp_group`` (:func:`parallelize_blocks`);
    nothing at ``layout.tp == 1``. Returns the number of blocks cut.

    Raises:
        TensorParallelError: when ``layout.tp > 1`` and the model has no block to cut (ResNet towers),
            or a block's heads or MLP width do not divide by ``tp``; the message names the block.
    """
    if layout.tp == 1:
        return 0
    try:
        n = parallelize_blocks(model, layout.tp_group)
    except ValueError as exc:
        raise TensorParallelError(f"parallel.tp={layout.tp}: {exc}") from None
    if n == 0:
        raise TensorParallelError(f"parallel.tp={layout.tp}: the model has no transformer blocks to split (tensor "
                                  f"parallelism cuts the attention and MLP of ViT and text-transformer blocks); "
                                  f"use a ViT tower or data parallelism")
    return n


def splits_to_json(module: nn.Module) -> dict:
    """``{state-dict key: {"dim", "index"}}`` of every sharded tensor, for offline consolidation."""
    return {k: {"dim": s.dim, "index": s.index.tolist()} for k, s in tensor_parallel_splits(module).items()}


def unshard_from_json(splits: dict, shards: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """The full state dict from every tensor-parallel rank's state dict (in rank order) and
    :func:`splits_to_json`'s description; tensors not split are taken from rank 0."""
    out = {}
    for k, v in shards[0].items():
        if k in splits:
            s = TensorSplit(splits[k]["dim"], 0, torch.tensor(splits[k]["index"]))
            out[k] = s.unshard([sd[k] for sd in shards])
        else:
            out[k] = v
    return out
