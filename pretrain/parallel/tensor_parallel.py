"""Tensor parallelism of the transformer blocks of :mod:`models.vit`, through DeepSpeed's AutoTP.

The layout is Megatron-LM's (Shoeybi et al. 2019, "Megatron-LM: Training Multi-Billion Parameter
Language Models Using Model Parallelism"): in each block the first linear layer of a pair is split
by output rows (column-parallel: attention's fused ``qkv``, the MLP's ``fc1``) and the second by
input columns (row-parallel: ``proj``, ``fc2``). Everything between the two (per-head attention,
GELU) is local to a rank, so a pair costs one all-reduce forward and one backward. LayerNorms,
residuals and the row layers' biases are replicated.

The cut itself is DeepSpeed's AutoTP training support (``tensor_parallel.autotp_size`` in the
engine's config): :func:`autotp_config` writes its ``partition_config``, one exact pattern per
layer of every :class:`models.vit.Block` (``qkv`` as three sub-parameters q, k and v, so that
a rank holds whole heads), and ``deepspeed.initialize`` swaps those layers for its
``LinearLayer`` / ``SubParamLinearLayer`` / ``LinearAllreduce``. Parameter names do not change,
so LLRD ids, optimizer groups and checkpoint keys do not depend on the layout.

After the cut :func:`mark_tensor_parallel_splits` records, per sharded tensor, a
:class:`TensorSplit` in the layer's ``tp_splits`` (and checks that DeepSpeed's shard has the shape
of that split); :func:`gather_tensor_parallel_state` and :func:`shard_full_state` read only those,
so a checkpoint written with one ``tp`` loads under another through the full (one-process) state dict.

The ranks of one tensor-parallel group must draw the same random numbers outside the pairs (drop
path), i.e. share their seed, since those tensors are replicated.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from data.common import UserError
from models.vit import Attention, Block, Mlp

__all__ = ["TensorSplit", "TensorParallelError", "check_tensor_parallel", "autotp_config", "plan_splits",
           "mark_tensor_parallel_splits", "tensor_parallel_splits", "gather_tensor_parallel_state",
           "shard_full_state", "splits_to_json", "unshard_from_json"]


def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


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


class TensorParallelError(UserError, ValueError):
    """A run asks for tensor parallelism its model cannot take (no transformer blocks, sizes that do not divide)."""


def _blocks(model: nn.Module) -> List[Tuple[str, Block]]:
    """The blocks tensor parallelism cuts: every :class:`models.vit.Block` with the plain attention and MLP."""
    return [(name, b) for name, b in model.named_modules()
            if isinstance(b, Block) and isinstance(b.attn, Attention) and isinstance(b.mlp, Mlp)]


def check_tensor_parallel(model: nn.Module, tp: int) -> int:
    """The number of blocks a cut ``tp`` ways would split; nothing is changed.

    Raises:
        TensorParallelError: when ``tp > 1`` and the model has no block to cut (ResNet towers), or a
            block's heads or MLP width do not divide by ``tp``; the message names the block.
    """
    if tp == 1:
        return 0
    blocks = _blocks(model)
    for name, b in blocks:
        where = name or type(model).__name__
        if b.attn.num_heads % tp:
            raise TensorParallelError(f"parallel.tp={tp}: {where}: num_heads={b.attn.num_heads} is not divisible by "
                                      f"the tensor-parallel size {tp}")
        if b.mlp.fc1.out_features % tp:
            raise TensorParallelError(f"parallel.tp={tp}: {where}: MLP hidden size {b.mlp.fc1.out_features} is not "
                                      f"divisible by the tensor-parallel size {tp}")
    if not blocks:
        raise TensorParallelError(f"parallel.tp={tp}: the model has no transformer blocks to split (tensor "
                                  f"parallelism cuts the attention and MLP of ViT and text-transformer blocks); "
                                  f"use a ViT tower or data parallelism")
    return len(blocks)


def _exact(names: List[str]) -> List[str]:
    return [f"^{re.escape(n)}$" for n in names]


def autotp_config(model: nn.Module, tp: int) -> dict:
    """The ``tensor_parallel`` section of a DeepSpeed config that cuts every block of ``model``
    ``tp`` ways (:func:`check_tensor_parallel` first): exact patterns, no default specs, so that no
    other linear layer (heads, projections, tokenisers) is touched."""
    check_tensor_parallel(model, tp)
    pre = [f"{name}." if name else "" for name, _ in _blocks(model)]
    specs = [
        # [q; k; v] stacked on dim 0: each cut T ways, so rank r holds q, k and v of heads r*H/T..
        {"patterns": _exact([f"{p}attn.qkv.weight" for p in pre]), "partition_type": "column",
         "shape": [3, -1], "partition_dim": 0},
        {"patterns": _exact([f"{p}mlp.fc1.weight" for p in pre]), "partition_type": "column"},
        {"patterns": _exact([f"{p}attn.proj.weight" for p in pre] + [f"{p}mlp.fc2.weight" for p in pre]),
         "partition_type": "row"},
    ]
    return {"autotp_size": tp, "partition_config": {"use_default_specs": False, "layer_specs": specs}}


def _block_splits(block: Block, rank: int, size: int) -> Dict[str, TensorSplit]:
    """How AutoTP cuts one block ``size`` ways, for ``rank``, by the block's state-dict keys: ``qkv``
    keeps rows ``j*D + r*D/T .. j*D + (r+1)*D/T`` of q, k and v (j = 0, 1, 2); ``fc1`` a block of
    rows; ``proj`` and ``fc2`` a block of input columns (their biases stay whole)."""
    dim = block.attn.qkv.in_features
    local = dim // size
    qkv = TensorSplit(0, rank, torch.stack([torch.cat([torch.arange(j * dim + r * local, j * dim + (r + 1) * local)
                                                       for j in range(3)]) for r in range(size)]))
    fc1 = TensorSplit(0, rank, _blocks_of(block.mlp.fc1.out_features, size))
    out = {"attn.qkv.weight": qkv, "mlp.fc1.weight": fc1,
           "attn.proj.weight": TensorSplit(1, rank, _blocks_of(block.attn.proj.in_features, size)),
           "mlp.fc2.weight": TensorSplit(1, rank, _blocks_of(block.mlp.fc2.in_features, size))}
    if block.attn.qkv.bias is not None:
        out["attn.qkv.bias"] = qkv
    if block.mlp.fc1.bias is not None:
        out["mlp.fc1.bias"] = fc1
    return out


def plan_splits(model: nn.Module, rank: int, size: int) -> Dict[str, TensorSplit]:
    """``{state-dict key: TensorSplit}`` of every tensor a cut of the (still whole) ``model`` shards."""
    return {f"{name}.{key}" if name else key: split
            for name, b in _blocks(model) for key, split in _block_splits(b, rank, size).items()}


def mark_tensor_parallel_splits(model: nn.Module, splits: Dict[str, TensorSplit]) -> None:
    """Records ``splits`` (from :func:`plan_splits` before the cut) in the ``tp_splits`` of the layers
    AutoTP replaced, after checking that each tensor now has its split's length along the cut dim.

    Raises:
        RuntimeError: naming the tensor, when DeepSpeed cut it otherwise (a DeepSpeed version that
            splits differently would otherwise corrupt consolidated checkpoints silently).
    """
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    for key, split in splits.items():
        p = params.get(key)
        shape = list(getattr(p, "ds_shape", p.shape)) if p is not None else None  # ZeRO-3: partitioned
        if shape is None or shape[split.dim] != split.index.shape[1]:
            raise RuntimeError(f"DeepSpeed AutoTP cut {key} to {shape}; expected length {split.index.shape[1]} "
                               f"along dim {split.dim}")
        owner, _, leaf = key.rpartition(".")
        if not hasattr(modules[owner], "tp_splits"):
            modules[owner].tp_splits = {}
        modules[owner].tp_splits[leaf] = split
        p.tensor_model_parallel, p.partition_dim = True, split.dim  # Megatron's marks, for other tools


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
