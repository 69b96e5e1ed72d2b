"""Parallelism applied to models from outside: the parallel layout (data / tensor / pipeline groups)
and global batch norm over the data-parallel ranks."""
from .global_bn import GlobalBatchNorm, all_reduce_sum_with_grad, convert_to_global_bn
from .layout import LayoutError, ParallelLayout

__all__ = ["GlobalBatchNorm", "all_reduce_sum_with_grad", "convert_to_global_bn", "LayoutError", "ParallelLayout"]
