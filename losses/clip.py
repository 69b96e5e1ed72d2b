"""CLIP's symmetric contrastive loss, with columns gathered across ranks."""

from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F

from .dist import gather_with_grad, rank, world_size

__all__ = ["clip_loss"]


def clip_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: Union[float, torch.Tensor],
) -> torch.Tensor:
    """Symmetric image-text InfoNCE loss of CLIP.

    Radford et al., "Learning Transferable Visual Models From Natural Language
    Supervision", ICML 2021.

    Both embeddings are L2-normalised, ``logits = logit_scale * img @ txt.T``
    and the loss is the mean of the image->text and text->image
    cross-entropies, with the matching pair (the diagonal) as the target.

    Under ``torch.distributed`` this rank's N rows are scored against the W*N
    gathered columns of the other modality (targets offset by ``rank * N``), in
    both directions. Because each rank owns the same number of rows, the mean
    of the per-rank losses equals the single-process loss on the global batch,
    and the average of per-rank gradients equals its gradient.

    Args:
        image_emb: Image embeddings, shape [N, D]. N equal on all ranks.
        text_emb: Text embeddings, shape [N, D]; row ``i`` pairs with row ``i``
            of ``image_emb``.
        logit_scale: The multiplier applied to cosine similarities, i.e.
            already ``exp`` of CLIP's learned log-temperature. A Python number
            or a 0-dim (or single-element) tensor; gradients flow into it when
            it requires grad.

    Returns:
        Scalar tensor: ``(CE(img->txt) + CE(txt->img)) / 2``.

    Raises:
        ValueError: On mismatched or non-2-D embeddings, or a ``logit_scale``
            tensor with more than one element.
    """
    if image_emb.dim() != 2 or text_emb.dim() != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(
            "clip_loss: image_emb and text_emb must both be [N, D]; "
            f"got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}"
        )
    if isinstance(logit_scale, torch.Tensor):
        if logit_scale.numel() != 1:
            raise ValueError(
                "clip_loss: logit_scale must be a float or a 0-dim tensor; "
                f"got a tensor of shape {tuple(logit_scale.shape)}"
            )
        logit_scale = logit_scale.reshape(())

    n = image_emb.shape[0]
    img = F.normalize(image_emb, dim=1)
    txt = F.normalize(text_emb, dim=1)

    # Local rows against global columns: each rank computes its N x (W*N)
    # slice of the global logit matrix in each direction. In one process the
    # gather is the identity and this is the usual N x N matrix.
    all_img = gather_with_grad(img)
    all_txt = gather_with_grad(txt)
    logits_i2t = logit_scale * (img @ all_txt.T)  # [N, W*N]
    logits_t2i = logit_scale * (txt @ all_img.T)  # [N, W*N]

    # The matching pair of local row i sits in global column rank*N + i.
    targets = rank() * n + torch.arange(n, device=image_emb.device)
    loss_i2t = F.cross_entropy(logits_i2t, targets)
    loss_t2i = F.cross_entropy(logits_t2i, targets)
    # Average (not sum) the two directions so the scale matches the paper's
    # pseudo-code and a single direction's loss.
    return 0.5 * (loss_i2t + loss_t2i)
