"""CLIP's symmetric contrastive loss, with columns gathered across ranks."""

from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F

from .dist import gather_with_grad, rank, world_size

__all__ = ["clip_loss", "blockwise_info_nce"]


class _BlockwiseInfoNCE(torch.autograd.Function):
    """Mean over the rows of ``q`` of ``logsumexp_j(s q_i.k_j) - s q_i.k_{t_i}``, computed ``block``
    rows at a time: neither pass holds more than ``block x M`` logits (the backward recomputes
    them), where the plain form holds several ``N x M`` matrices."""

    @staticmethod
    def forward(ctx, q, k, scale, targets, block: int, denom: int):
        total = q.new_zeros(())
        for i in range(0, q.shape[0], block):
            logits = scale * (q[i:i + block] @ k.T)
            pos = logits.gather(1, targets[i:i + block, None]).squeeze(1)
            total += (torch.logsumexp(logits, dim=1) - pos).sum()
        ctx.save_for_backward(q, k, scale, targets)
        ctx.block, ctx.denom = block, denom
        return total / denom

    @staticmethod
    def backward(ctx, grad):
        q, k, scale, targets = ctx.saved_tensors
        g = grad / ctx.denom
        dq, dk, ds = torch.empty_like(q), torch.zeros_like(k), q.new_zeros(())
        for i in range(0, q.shape[0], ctx.block):
            qb = q[i:i + ctx.block]
            sim = qb @ k.T
            dlogits = torch.softmax(scale * sim, dim=1)
            dlogits[torch.arange(qb.shape[0]), targets[i:i + ctx.block]] -= 1.0
            dlogits *= g  # d loss / d logits of this block
            ds += (dlogits * sim).sum()
            dlogits *= scale  # d loss / d sim
            dq[i:i + ctx.block] = dlogits @ k
            dk += dlogits.T @ qb
        return dq, dk, ds.reshape(scale.shape), None, None, None


def blockwise_info_nce(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, targets: torch.Tensor,
                       block: int) -> torch.Tensor:
    """``F.cross_entropy(scale * q @ k.T, targets)`` (mean over rows) in blocks of ``block`` rows,
    with the same value and gradients (``q``, ``k`` and ``scale``), in O(block x M) memory."""
    if block < 1:
        raise ValueError(f"blockwise_info_nce: block must be >= 1, got {block}")
    if not isinstance(scale, torch.Tensor):
        scale = torch.tensor(float(scale), dtype=q.dtype, device=q.device)
    return _BlockwiseInfoNCE.apply(q, k, scale.reshape(()).to(q.dtype), targets, block, q.shape[0])


def clip_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: Union[float, torch.Tensor],
    block: int = 0,
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
        block: 0 (default) builds the whole ``N x W*N`` logit matrices; ``block > 0`` computes the
            same loss and gradients ``block`` rows at a time (:func:`blockwise_info_nce`), never
            holding more than ``block x W*N`` logits: what a batch larger than memory needs.

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
    # The matching pair of local row i sits in global column rank*N + i.
    targets = rank() * n + torch.arange(n, device=image_emb.device)
    if block > 0:
        return 0.5 * (blockwise_info_nce(img, all_txt, logit_scale, targets, block)
                      + blockwise_info_nce(txt, all_img, logit_scale, targets, block))
    logits_i2t = logit_scale * (img @ all_txt.T)  # [N, W*N]
    logits_t2i = logit_scale * (txt @ all_img.T)  # [N, W*N]
    loss_i2t = F.cross_entropy(logits_i2t, targets)
    loss_t2i = F.cross_entropy(logits_t2i, targets)
    # Average (not sum) the two directions so the scale matches the paper's
    # pseudo-code and a single direction's loss.
    return 0.5 * (loss_i2t + loss_t2i)
