"""SwAV: Sinkhorn-Knopp equipartitioned codes and the swapped-prediction loss over multi-crop views."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .dist import all_reduce_max_, all_reduce_sum_, is_distributed

__all__ = ["sinkhorn", "swav_loss"]


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """Soft, equipartitioned assignments of samples to prototypes (Sinkhorn-Knopp).

    Caron et al., "Unsupervised Learning of Visual Features by Contrasting Cluster
    Assignments" (SwAV), NeurIPS 2020, section 3.1 and Algorithm 1.

    ``Q = exp(scores / epsilon)`` is seen as a K x B transport plan and alternately rescaled so
    that every prototype receives total mass 1/K and every sample total mass 1/B; the result is
    multiplied by B so that each sample's code is a distribution over the K prototypes. The
    last rescaling is the per-sample one, so after any number of iterations:

    * every row of the result sums to 1 (exactly, up to rounding);
    * column k sums to ``B / K`` only in the limit of many iterations. After ``iterations``
      rounds the column sums are off by an amount that shrinks geometrically with the rounds
      (slower for a smaller ``epsilon``); SwAV uses 3 rounds, where they are close but not
      equal to ``B / K``. A single round (``iterations=1``) already balances them to the
      extent one prototype-then-sample rescaling can.

    Under ``torch.distributed`` the plan spans the global batch: B is the sum of the ranks'
    batch sizes, and the per-prototype sums (and the global maximum subtracted before ``exp``,
    a constant that cancels) are all-reduced, so that each rank gets exactly its rows of the
    single-process result on the concatenated batch. Ranks may hold different batch sizes.

    Computed in float64 without gradient, whatever the input dtype (bf16 scores under autocast
    included).

    Args:
        scores: Prototype scores (cosine similarities of embeddings and prototypes), [B, K].
        epsilon: Entropy regularisation; smaller gives sharper codes.
        iterations: Number of Sinkhorn-Knopp rounds (each one rescales prototypes, then samples).

    Returns:
        Codes [B, K] in ``float32`` (``float64`` for a float64 input); rows sum to 1.

    Raises:
        ValueError: On a non-2-D input, a non-positive ``epsilon`` or ``iterations < 1``.
    """
    if scores.dim() != 2:
        raise ValueError(f"sinkhorn: scores must be [B, K]; got {tuple(scores.shape)}")
    if not epsilon > 0:
        raise ValueError(f"sinkhorn: epsilon must be > 0; got {epsilon}")
    if iterations < 1:
        raise ValueError(f"sinkhorn: iterations must be >= 1; got {iterations}")
    out_dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    s = scores.detach().to(torch.float64)
    k = s.shape[1]
    # Subtracting one constant before exp changes nothing after the first normalisation; it
    # only keeps exp in range. It must be the same constant on every rank, hence the MAX.
    m = s.max() if s.numel() else s.new_zeros(())
    b = torch.tensor(float(s.shape[0]), dtype=torch.float64, device=s.device)
    if is_distributed():
        all_reduce_max_(m)
        all_reduce_sum_(b)
    q = torch.exp((s - m) / epsilon).T  # [K, B]: prototypes x samples
    total = all_reduce_sum_(q.sum().reshape(1))
    q /= total
    for _ in range(iterations):
        # each prototype (row) gets mass 1/K over the global batch
        row = all_reduce_sum_(q.sum(dim=1, keepdim=True))
        q /= row
        q /= k
        # each sample (column) gets mass 1/B; local, since a sample lives on one rank
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    q *= b  # columns (samples) sum to 1: each sample's code is a distribution
    return q.T.to(out_dtype)


def swav_loss(scores: Sequence[torch.Tensor], temperature: float = 0.1, epsilon: float = 0.05,
              iterations: int = 3, num_global: int = 2,
              queue_scores: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
    """Swapped prediction of cluster assignments across crops.

    Caron et al., "Unsupervised Learning of Visual Features by Contrasting Cluster
    Assignments" (SwAV), NeurIPS 2020, equations (1)-(3) and section 3.2 (multi-crop).

    Codes are computed only for the ``num_global`` high-resolution crops, with
    :func:`sinkhorn` on their detached scores. The code ``q_i`` of global crop ``i`` is
    predicted from every other crop ``v != i`` (global and local) by
    ``p_v = softmax(scores_v / temperature)``; the loss is

        L = 1/num_global * sum_i 1/(V - 1) * sum_{v != i} mean_b [ -sum_k q_i[b, k] log p_v[b, k] ]

    with V crops in all, i.e. the mean cross-entropy over all (code, prediction) pairs of
    different crops, as in the reference implementation.

    With ``queue_scores[i]`` ([L, K], scores of embeddings stored from previous batches) the
    code of crop ``i`` comes from sinkhorn over ``[queue_scores[i]; scores[i]]`` and only the
    last B rows (the current batch) are used; the queue only enlarges the batch over which
    the prototypes are equipartitioned.

    Under ``torch.distributed`` the equipartition spans all ranks (see :func:`sinkhorn`) and the
    value is the mean over this rank's samples; with equal batch sizes on all ranks, averaged
    data-parallel gradients equal the gradient of the single-process loss on the global batch.

    Args:
        scores: One [B, K] tensor per crop (same B), global crops first: prototype scores
            (cosine similarities of normalised embeddings and unit-norm prototypes).
        temperature: Softmax temperature of the predictions (0.1 in the paper).
        epsilon: Sinkhorn entropy regularisation (0.05 in the paper).
        iterations: Sinkhorn-Knopp rounds (3 in the paper).
        num_global: How many leading crops get codes (2 in the paper).
        queue_scores: Optional per-global-crop [L_i, K] scores of queued embeddings (or None
            entries); they take no gradient.

    Returns:
        Scalar tensor (float32 or wider).

    Raises:
        ValueError: On fewer than 2 crops, ``num_global`` outside ``[1, len(scores)]``,
            mismatched shapes or a non-positive temperature.
    """
    scores = list(scores)
    n_crops = len(scores)
    if n_crops < 2:
        raise ValueError(f"swav_loss: needs at least 2 crops; got {n_crops}")
    if not 1 <= num_global <= n_crops:
        raise ValueError(f"swav_loss: num_global must be in [1, {n_crops}]; got {num_global}")
    if not temperature > 0:
        raise ValueError(f"swav_loss: temperature must be > 0; got {temperature}")
    shape = scores[0].shape
    if len(shape) != 2 or any(s.shape != shape for s in scores):
        raise ValueError("swav_loss: every crop's scores must be [B, K] with the same B and K; got "
                         + ", ".join(str(tuple(s.shape)) for s in scores))
    if queue_scores is not None and len(queue_scores) != num_global:
        raise ValueError(f"swav_loss: queue_scores needs one entry per global crop ({num_global}); "
                         f"got {len(queue_scores)}")
    bsz = shape[0]
    log_p = [F.log_softmax(s.float() / temperature, dim=1) for s in scores]
    loss = log_p[0].new_zeros(())
    for i in range(num_global):
        s = scores[i].detach()
        queued = None if queue_scores is None else queue_scores[i]
        if queued is not None and queued.shape[0] > 0:
            if queued.dim() != 2 or queued.shape[1] != shape[1]:
                raise ValueError(f"swav_loss: queue_scores[{i}] must be [L, {shape[1]}]; got {tuple(queued.shape)}")
            s = torch.cat([queued.detach().to(s.dtype), s])
        q = sinkhorn(s, epsilon, iterations)[-bsz:]
        sub = log_p[0].new_zeros(())
        for v in range(n_crops):
            if v != i:
                sub = sub - (q * log_p[v]).sum(dim=1).mean()
        loss = loss + sub / (n_crops - 1)
    return loss / num_global
