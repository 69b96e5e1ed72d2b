"""Small, single-process-safe wrappers around ``torch.distributed`` over the data-parallel group.

Every helper here degrades gracefully when ``torch.distributed`` is not
available or no process group has been initialised: the world is then a
single rank and the collectives are identities. This lets every loss in
this package be written once and used both in plain single-process code
(tests, notebooks, evaluation) and under data-parallel training.

The collectives run over the **data-parallel group**: the ranks that hold
different samples of the same model. With tensor or pipeline parallelism the
world is not that group, so the parallel layout of a run
(:mod:`pretrain.parallel`) installs it with :func:`set_data_parallel_group`;
until then (and in plain data-parallel jobs) it is the whole world.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = [
    "set_data_parallel_group",
    "data_parallel_group",
    "is_distributed",
    "world_size",
    "rank",
    "gather_with_grad",
    "all_reduce_mean",
    "all_reduce_sum_",
    "all_reduce_max_",
]


_DP_GROUP = None  # None: the default (world) group


def set_data_parallel_group(group) -> None:
    """Make ``group`` (a ``torch.distributed`` process group, or None for the world) the group
    that every collective of this package runs over. Called by the run's parallel layout."""
    global _DP_GROUP
    _DP_GROUP = group


def data_parallel_group():
    """The group collectives run over (None means the default, world group)."""
    return _DP_GROUP


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_distributed() -> bool:
    """Returns True when the data-parallel group has more than one rank."""
    return world_size() > 1


def world_size() -> int:
    """Number of ranks in the data-parallel group (1 when not distributed)."""
    if _initialized():
        return dist.get_world_size(group=_DP_GROUP)
    return 1


def rank() -> int:
    """Rank of this process in the data-parallel group (0 when not distributed)."""
    if _initialized():
        return dist.get_rank(group=_DP_GROUP)
    return 0


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward routes gradients back to the owning rank.

    ``torch.distributed.all_gather`` on its own is not differentiable: the
    gathered copies are fresh tensors, so anything computed from another
    rank's embeddings would silently contribute no gradient to them.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ws = world_size()
        ctx.rank = rank()
        ctx.local_n = x.shape[0]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(ws)]
        dist.all_gather(parts, x, group=_DP_GROUP)
        # Rank order along dim 0: rows [r*N, (r+1)*N) belong to rank r.
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        # Every rank's loss may depend on every rank's rows, so the gradient
        # w.r.t. this rank's rows is the SUM over ranks of the incoming
        # gradients for that slice. Each rank then backpropagates only its own
        # slice into its own parameters. Data-parallel engines average the
        # resulting parameter gradients over ranks, and
        #   (1/W) * sum_r dL_r/dtheta  ==  d/dtheta [ (1/W) * sum_r L_r ],
        # i.e. they obtain the gradient of the global mean loss.
        # Clone: grad_output may be shared with other autograd consumers and
        # all_reduce works in place.
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=_DP_GROUP)
        start = ctx.rank * ctx.local_n
        return grad[start : start + ctx.local_n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenates ``x`` from all ranks along dim 0, differentiably.

    Args:
        x: Local tensor of shape [N, ...]. Every rank must pass the same shape
            (same N), dtype and device.

    Returns:
        Tensor of shape [W*N, ...] whose rows ``[r*N, (r+1)*N)`` come from rank
        ``r``. Gradients flowing into any slice are summed over ranks
        (all_reduce SUM) and delivered to the rank that owns the slice. With a
        single process (or no initialised process group) ``x`` itself is
        returned unchanged.
    """
    if not is_distributed():
        return x
    return _GatherWithGrad.apply(x)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over ranks, without gradient (intended for logging).

    Args:
        t: Tensor (or Python number) with the same shape on every rank.

    Returns:
        A new detached tensor holding the element-wise mean over ranks; ``t``
        is not modified. In one process this is a detached copy of ``t``.
    """
    with torch.no_grad():
        out = torch.as_tensor(t).detach().clone()
        if is_distributed():
            # Integer tensors would truncate on division; logging wants floats.
            if not out.is_floating_point():
                out = out.to(torch.get_default_dtype())
            dist.all_reduce(out, op=dist.ReduceOp.SUM, group=_DP_GROUP)
            out /= world_size()
        return out


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """In-place sum of ``t`` over ranks, without gradient.

    Intended for non-differentiable statistics such as the row/column sums in
    Sinkhorn-Knopp iterations.

    Args:
        t: Tensor with the same shape on every rank; overwritten in place.

    Returns:
        ``t`` itself (after the reduction). In one process ``t`` is untouched.
    """
    if is_distributed():
        with torch.no_grad():
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=_DP_GROUP)
    return t


def all_reduce_max_(t: torch.Tensor) -> torch.Tensor:
    """In-place element-wise maximum of ``t`` over the data-parallel ranks, without gradient.

    Args:
        t: Tensor with the same shape on every rank; overwritten in place.

    Returns:
        ``t`` itself. In one process ``t`` is untouched.
    """
    if is_distributed():
        with torch.no_grad():
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_DP_GROUP)
    return t
