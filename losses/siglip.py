"""SigLIP's pairwise sigmoid loss, with columns gathered across ranks."""

from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F

from .dist import gather_with_grad, rank

__all__ = ["siglip_loss"]

Scalar = Union[float, torch.Tensor]


def _scalar(x: Scalar, name: str) -> Scalar:
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"siglip_loss: {name} must be a float or a single-element tensor; "
                             f"got a tensor of shape {tuple(x.shape)}")
        return x.reshape(())
    return x


def siglip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: Scalar,
                logit_bias: Scalar) -> torch.Tensor:
    """Sigmoid loss for image-text pre-training (SigLIP).

    Zhai et al., "Sigmoid Loss for Language Image Pre-Training", ICCV 2023: every
    (image, text) pair of the batch is an independent binary problem,

        ``loss = -1/B * sum_i sum_j log sigmoid(y_ij * (s * cos(img_i, txt_j) + b))``

    with ``y_ij = +1`` for the matching pair (``i == j``) and ``-1`` otherwise, ``s``
    the scale (not its log) and ``b`` the bias (the paper starts them at 10 and -10).

    Under ``torch.distributed`` this rank's N images are scored against the W*N
    gathered texts (matching pair of local row i in global column ``rank * N + i``).
    The per-rank losses, each divided by the local N, average to the loss of the
    global batch, and the averaged gradients equal its gradient.

    Args:
        image_emb: Image embeddings, shape [N, D] (L2-normalised inside). N equal on
            all ranks.
        text_emb: Text embeddings, shape [N, D]; row ``i`` pairs with image row ``i``.
        logit_scale: ``s``, a float or single-element tensor (gradients flow into it).
        logit_bias: ``b``, a float or single-element tensor (gradients flow into it).

    Returns:
        Scalar tensor.

    Raises:
        ValueError: On mismatched or non-2-D embeddings, or a scale / bias tensor with
            more than one element.
    """
    if image_emb.dim() != 2 or text_emb.dim() != 2 or image_emb.shape != text_emb.shape:
        raise ValueError("siglip_loss: image_emb and text_emb must both be [N, D]; "
                         f"got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    scale, bias = _scalar(logit_scale, "logit_scale"), _scalar(logit_bias, "logit_bias")
    n = image_emb.shape[0]
    img = F.normalize(image_emb, dim=1)
    all_txt = gather_with_grad(F.normalize(text_emb, dim=1))
    logits = scale * (img @ all_txt.T) + bias  # [N, W*N]
    labels = -torch.ones_like(logits)
    cols = rank() * n + torch.arange(n, device=logits.device)
    labels[torch.arange(n, device=logits.device), cols] = 1.0
    return -F.logsigmoid(labels * logits).sum() / n
