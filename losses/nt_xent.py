"""SimCLR's NT-Xent loss, with negatives gathered across ranks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dist import gather_with_grad, rank, world_size

__all__ = ["nt_xent_loss"]


def nt_xent_loss(
    z_a: torch.Tensor, z_b: torch.Tensor, temperature: float = 0.5
) -> torch.Tensor:
    """Normalised temperature-scaled cross-entropy (NT-Xent).

    Chen et al., "A Simple Framework for Contrastive Learning of Visual
    Representations" (SimCLR), ICML 2020.

    The two views of the local batch give 2N anchors. For anchor ``i`` with
    cosine similarities ``s_ik`` to all candidates,
    ``l_i = -log( exp(s_ipos / T) / sum_{k != i} exp(s_ik / T) )``,
    where the positive is the other view of the same sample and every other
    candidate except the anchor itself is a negative.

    Under ``torch.distributed`` the candidates are the 2*W*N embeddings of the
    global batch (gathered with :func:`gather_with_grad`), the anchors are this
    rank's 2N embeddings, and the returned value is the mean over the local
    anchors. Because every rank has the same number of anchors, the mean of the
    per-rank losses equals the single-process loss on the global batch, and
    the average of per-rank gradients equals its gradient.

    Args:
        z_a: Embeddings of the first view, shape [N, D]. L2-normalised here.
        z_b: Embeddings of the second view, shape [N, D]; row ``i`` is the
            same sample as row ``i`` of ``z_a``. N must be equal on all ranks.
        temperature: Softmax temperature T > 0.

    Returns:
        Scalar tensor: mean of ``l_i`` over the 2N local anchors.

    Raises:
        ValueError: On mismatched or non-2-D inputs, or a non-positive
            temperature.
    """
    if z_a.dim() != 2 or z_b.dim() != 2 or z_a.shape != z_b.shape:
        raise ValueError(
            "nt_xent_loss: z_a and z_b must both be [N, D]; "
            f"got {tuple(z_a.shape)} and {tuple(z_b.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"nt_xent_loss: temperature must be > 0; got {temperature}")

    n = z_a.shape[0]
    ws, rk = world_size(), rank()

    z_a = F.normalize(z_a, dim=1)
    z_b = F.normalize(z_b, dim=1)

    # Anchors: this rank's 2N rows, view a first, then view b.
    anchors = torch.cat([z_a, z_b], dim=0)  # [2N, D]
    # Candidates: all 2*W*N rows, laid out as [all ranks' view a; all ranks'
    # view b], so this rank's view-a rows start at rk*N and its view-b rows at
    # W*N + rk*N. In one process gather_with_grad is the identity.
    big_n = ws * n
    candidates = torch.cat([gather_with_grad(z_a), gather_with_grad(z_b)], dim=0)

    logits = anchors @ candidates.T / temperature  # [2N, 2WN]

    local = torch.arange(n, device=z_a.device)
    idx_a = rk * n + local  # columns of this rank's view-a rows
    idx_b = big_n + rk * n + local  # columns of this rank's view-b rows
    self_cols = torch.cat([idx_a, idx_b])  # anchor j's own column
    pos_cols = torch.cat([idx_b, idx_a])  # the other view of the same sample

    rows = torch.arange(2 * n, device=z_a.device)
    # Excluding self-similarity (always 1/T after normalisation) from the
    # denominator: it is not a negative and would dominate the softmax.
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[rows, self_cols] = True
    logits = logits.masked_fill(self_mask, float("-inf"))

    # Cross-entropy with the positive column as target is exactly
    # -log(exp(s_pos/T) / sum_{k != i} exp(s_ik/T)), averaged over anchors.
    return F.cross_entropy(logits, pos_cols)
