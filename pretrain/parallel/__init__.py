"""Parallelism applied to models from outside: the parallel layout (data / tensor / pipeline groups),
the tensor-parallel cut of the transformer blocks (through DeepSpeed's AutoTP) and global batch norm
over the data-parallel ranks."""
from .global_bn import GlobalBatchNorm, all_reduce_sum_with_grad, convert_to_global_bn
from .layout import LayoutError, ParallelLayout
from .tensor_parallel import (TensorParallelError, TensorSplit, autotp_config, check_tensor_parallel,
                              gather_tensor_parallel_state, mark_tensor_parallel_splits, plan_splits,
                              shard_full_state, tensor_parallel_splits)

__all__ = ["GlobalBatchNorm", "all_reduce_sum_with_grad", "convert_to_global_bn", "LayoutError", "ParallelLayout",
           "TensorParallelError", "TensorSplit", "autotp_config", "check_tensor_parallel",
           "gather_tensor_parallel_state", "mark_tensor_parallel_splits", "plan_splits", "shard_full_state",
           "tensor_parallel_splits"]
