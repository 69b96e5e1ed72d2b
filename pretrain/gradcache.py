"""Gradient caching (Gao et al. 2021, used by BASIC, Pham et al. 2023): a contrastive step over a
batch larger than memory.

A contrastive loss couples every sample of the batch with every other, so the batch cannot simply
be split into accumulated micro-batches: the loss over chunks is not the loss over the batch.
Gradient caching computes it in two passes per tower:

1. the embeddings of all K chunks, without keeping any activations (only each chunk's input);
2. the loss over the whole batch on those embeddings, and its gradient with respect to each
   embedding (the cached gradient); then, chunk by chunk, the tower's forward again with its
   graph, back-propagated with that chunk's cached gradient, its activations freed before the
   next chunk.

The parameter gradients are those of the one-pass step (the loss is a function of the embeddings
only); peak activation memory is one chunk's. Here pass 2 is autograd's: each chunk's forward
runs under non-reentrant activation checkpointing, so the one ``backward()`` of the engine
(plain or DeepSpeed, whose gradient hooks then see each parameter's summed gradient once) delivers
the cached gradients and recomputes each chunk in turn. Batch norm inside a chunked tower
normalises with the chunk's statistics (over all data-parallel ranks with global BN), as in the
paper's TPU setting; the recomputation does not update the running statistics a second time.
Dropout and other random layers replay the same randomness in the recomputation.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = ["encode_in_chunks"]


@contextlib.contextmanager
def _frozen_norm_stats(module: nn.Module):
    """Batch norms still normalise with the batch's statistics but leave their running statistics
    (and counters) as they were: the recomputation of a chunk must not count it twice."""
    saved = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats:
            saved.append((m, m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()))
            m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, count in saved:
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)


def encode_in_chunks(fn: Callable[[Tensor], Tensor], x: Tensor, chunks: int, owner: nn.Module) -> Tensor:
    """``fn(x)`` for a batch ``x`` [B, ...], computed in ``chunks`` pieces along dim 0 with gradient
    caching when gradients are being recorded (plain ``fn(x)`` when ``chunks <= 1`` or under
    ``no_grad``). ``owner`` is the module whose batch norms ``fn`` runs (their running statistics
    are updated once per chunk, as in the first pass)."""
    if chunks <= 1 or not torch.is_grad_enabled() or x.shape[0] < 2:
        return fn(x)
    parts = x.chunk(min(chunks, x.shape[0]))

    def contexts():
        return contextlib.nullcontext(), _frozen_norm_stats(owner)

    return torch.cat([checkpoint(fn, p, use_reentrant=False, context_fn=contexts, preserve_rng_state=True)
                      for p in parts])
