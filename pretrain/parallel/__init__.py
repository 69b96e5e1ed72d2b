"""Parallelism applied to models from outside: the parallel layout (data / tensor / pipeline groups),
Megatron-style tensor parallelism of the transformer blocks and global batch norm over the
data-parallel ranks."""
from .global_bn import GlobalBatchNorm, all_reduce_sum_with_grad, convert_to_global_bn
from .layout import LayoutError, ParallelLayout
from .tensor_parallel import (TensorParallelError, apply_tensor_parallel, ColumnParallelLinear, RowParallelLinear, TensorParallelAttention, TensorParallelMlp,
                              TensorSplit, copy_to_tp, gather_tensor_parallel_state, parallelize_blocks,
                              reduce_from_tp, shard_full_state, tensor_parallel_splits)

__all__ = ["TensorParallelError", "apply_tensor_parallel", "GlobalBatchNorm", "all_reduce_sum_with_grad", "convert_to_global_bn", "LayoutError", "ParallelLayout",
           "ColumnParallelLinear", "RowParallelLinear", "TensorParallelAttention", "TensorParallelMlp", "TensorSplit",
           "copy_to_tp", "reduce_from_tp", "parallelize_blocks", "tensor_parallel_splits",
           "gather_tensor_parallel_state", "shard_full_state"]
