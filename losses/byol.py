"""BYOL regression loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["byol_loss"]


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Normalised-MSE loss of BYOL.

    Grill et al., "Bootstrap Your Own Latent: A New Approach to
    Self-Supervised Learning", NeurIPS 2020.

    For each sample the online prediction ``p`` regresses the target projection
    ``z``; both are L2-normalised so that
    ``||p/|p| - z/|z|||^2 = 2 - 2 * cos(p, z)``. The paper symmetrises the loss
    by swapping the two views; callers do that by summing two calls.

    Args:
        p: Online-network predictions, shape [B, D].
        z: Target-network projections, shape [B, D]. Treated as a constant:
            it is detached here, so no gradient ever reaches the target branch
            (the target network is updated by EMA, not by backprop).

    Returns:
        Scalar tensor: mean over the B samples of ``2 - 2 * cos(p_i, z_i)``,
        in [0, 4].

    Raises:
        ValueError: If ``p`` and ``z`` are not both 2-D with the same shape.
    """
    if p.dim() != 2 or z.dim() != 2 or p.shape != z.shape:
        raise ValueError(
            "byol_loss: p and z must both be [B, D] with the same shape; "
            f"got {tuple(p.shape)} and {tuple(z.shape)}"
        )
    p = F.normalize(p, dim=1)
    z = F.normalize(z.detach(), dim=1)
    cos = (p * z).sum(dim=1)
    # Squared distance between unit vectors: |a|^2 + |b|^2 - 2<a,b> = 2 - 2cos.
    return (2.0 - 2.0 * cos).mean()
