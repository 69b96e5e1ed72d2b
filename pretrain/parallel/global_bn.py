"""Global batch norm over the data-parallel ranks, applied to models from outside.

SimCLR and BYOL normalise with statistics of the global batch (SimCLR calls it global BN). torch's
``SyncBatchNorm`` runs only on GPUs, so this module provides a small equivalent that works with
any backend, gloo on the CPU included. With one process it computes exactly what
``nn.BatchNorm*d`` computes.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from losses import data_parallel_group, world_size


class _AllReduceSum(torch.autograd.Function):
    """Sum over the data-parallel ranks; the gradient of each rank's input is the sum of all ranks'
    output gradients."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=data_parallel_group())
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=data_parallel_group())
        return grad


def all_reduce_sum_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Differentiable sum over the data-parallel group (identity in one process)."""
    return _AllReduceSum.apply(x) if world_size() > 1 else x


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics are the mean and variance of the global batch.

    Per-rank sums (and counts), then per-rank sums of squared deviations from the global mean, are
    all-reduced with autograd, so gradients flow through the shared statistics exactly as in one
    process with the whole batch.
    Evaluation mode uses the running statistics like ``nn.BatchNorm*d``.
    """

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"GlobalBatchNorm expects [N, C, ...] input, got {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training and self.track_running_stats:
            return nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                            False, 0.0, self.eps)
        dims = [0] + list(range(2, x.dim()))
        xf = x.float()
        c = x.shape[1]
        shape = [1, c] + [1] * (x.dim() - 2)
        count = torch.tensor([xf.numel() / c], dtype=torch.float32)
        # two passes, as torch's own batch norm: the global mean first, then the global sum of squared
        # deviations from it (sum(x^2)/n - mean^2 loses digits where the mean is large against the
        # spread, and ranks would then disagree with one process by more than the order of sums)
        stats = all_reduce_sum_with_grad(torch.cat([xf.sum(dims), count]))
        n = stats[-1]
        mean = stats[:c] / n
        centred = xf - mean.view(shape)
        var = all_reduce_sum_with_grad((centred * centred).sum(dims)) / n
        if self.training and self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * (n / (n - 1)).clamp_min(0) if n > 1 else var
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.detach(), alpha=m)
        y = centred * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_to_global_bn(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm1d/2d/3d`` in ``module`` by a :class:`GlobalBatchNorm` with the same state."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        with torch.no_grad():
            if module.affine:
                new.weight.copy_(module.weight)
                new.bias.copy_(module.bias)
                new.weight.requires_grad_(module.weight.requires_grad)
                new.bias.requires_grad_(module.bias.requires_grad)
            if module.track_running_stats:
                new.running_mean.copy_(module.running_mean)
                new.running_var.copy_(module.running_var)
                new.num_batches_tracked.copy_(module.num_batches_tracked)
        new.train(module.training)
        return new
    for name, child in module.named_children():
        setattr(module, name, convert_to_global_bn(child))
    return module
