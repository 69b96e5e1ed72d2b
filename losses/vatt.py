"""VATT's contrastive losses: NCE (video-audio) and MIL-NCE (video-text), negatives from all ranks."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .dist import gather_with_grad, rank

__all__ = ["nce_loss", "mil_nce_loss"]


def _joint_nce(video: torch.Tensor, texts: torch.Tensor, mask: Optional[torch.Tensor],
               temperature: float) -> torch.Tensor:
    """Shared body: ``video`` [B, D], ``texts`` [B, K, D], ``mask`` [B, K] bool or None."""
    b = video.shape[0]
    if mask is not None:
        # Zero padded captions before anything touches them: whatever they hold (even NaN) then
        # never reaches a product, and masked_fill sends no gradient back into them.
        texts = texts.masked_fill(~mask[..., None], 0.0)
    v = F.normalize(video, dim=-1)
    t = F.normalize(texts, dim=-1)
    all_v = gather_with_grad(v)  # [W*B, D]; the identity in one process
    all_t = gather_with_grad(t)  # [W*B, K, D]
    # Local clips against every clip of the global batch, in both roles:
    v2t = torch.einsum("id,ckd->ick", v, all_t) / temperature  # (v_i, t_ck): clip i's video
    t2v = torch.einsum("ikd,cd->ick", t, all_v) / temperature  # (v_c, t_ik): clip i's captions
    rows = torch.arange(b, device=video.device)
    own = rank() * b + rows  # global index of local clip i (every rank holds B clips)
    # The positives (c == own) sit in both blocks; keep them in v2t only, so that each positive
    # pair is counted once in the denominator, as in the papers' formula.
    drop_t2v = torch.zeros(b, all_v.shape[0], 1, dtype=torch.bool, device=video.device)
    drop_t2v[rows, own] = True
    if mask is not None:
        # A bool all_gather is not supported by every backend (gloo): gather a 0/1 float copy.
        all_mask = gather_with_grad(mask.to(v.dtype)) > 0.5  # [W*B, K]
        v2t = v2t.masked_fill(~all_mask, float("-inf"))
        drop_t2v = drop_t2v | ~mask[:, None, :]
    # -inf entries are exact zeros in every sum below (and in the softmax of the backward), and no
    # row is all -inf: each clip keeps at least one caption, so no NaN reaches a gradient.
    t2v = t2v.masked_fill(drop_t2v, float("-inf"))
    log_pos = torch.logsumexp(v2t[rows, own], dim=1)  # log sum_{t in P(i)} exp(v_i.t / tau)
    log_all = torch.logsumexp(torch.cat([v2t.flatten(1), t2v.flatten(1)], dim=1), dim=1)
    # Mean over local clips: with B clips on every rank the mean of the per-rank losses is the
    # one-process loss on the global batch, and gather_with_grad makes the averaged gradient its.
    return (log_all - log_pos).mean()


def _check_temperature(name: str, temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"{name}: temperature must be > 0; got {temperature}")


def nce_loss(video: torch.Tensor, audio: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """VATT's video-audio NCE loss, with negatives from every clip of the global batch.

    Akbari et al., "VATT: Transformers for Multimodal Self-Supervised Learning from Raw Video,
    Audio and Text", NeurIPS 2021, Eq. (2):
    ``NCE(z_v, z_a) = -log( exp(z_v.z_a / tau) / (exp(z_v.z_a / tau) + sum_{(z'_v, z'_a) in N}
    exp(z'_v.z'_a / tau)) )``, where N holds the non-matching pairs of the batch.

    For clip ``i`` (``z`` = L2-normalised embeddings, as in VATT's code and :func:`clip_loss`),
    N is every non-matching pair that involves clip ``i``, in both directions, in one softmax:
    video->audio ``(z_v_i, z_a_j)`` and audio->video ``(z_v_j, z_a_i)`` for every clip ``j != i``
    of the global batch, i.e. ``2 (W*B - 1)`` negatives; the positive counts once. This is VATT's
    released default (``asymmetric_nce``, shared with MIL-NCE), except that its code concatenates
    both blocks whole and so counts the positive twice. The CLIP-style alternative, two separate
    softmaxes averaged (``symmetric_nce`` up to a factor 2), is ``clip_loss(video, audio, 1 / tau)``.

    Equals ``mil_nce_loss(video, audio[:, None], temperature=temperature)`` (one caption a clip).

    Args:
        video: Video embeddings in the video-audio space, shape [B, D]. L2-normalised here.
            B must be equal on all ranks.
        audio: Audio embeddings, shape [B, D]; row ``i`` is the same clip as row ``i`` of video.
        temperature: tau > 0 (VATT: 0.07).

    Returns:
        Scalar tensor: the mean of ``NCE`` over this rank's B clips.

    Raises:
        ValueError: On mismatched or non-2-D embeddings, or a non-positive temperature.
    """
    if video.dim() != 2 or audio.dim() != 2 or video.shape != audio.shape:
        raise ValueError("nce_loss: video and audio must both be [B, D]; "
                         f"got {tuple(video.shape)} and {tuple(audio.shape)}")
    _check_temperature("nce_loss", temperature)
    return _joint_nce(video, audio[:, None, :], None, temperature)


def mil_nce_loss(video: torch.Tensor, texts: torch.Tensor, text_mask: Optional[torch.Tensor] = None,
                 temperature: float = 0.07) -> torch.Tensor:
    """MIL-NCE between clips and their K candidate captions, negatives from the global batch.

    Miech et al., "End-to-End Learning of Visual Representations from Uncurated Instructional
    Videos", CVPR 2020, Eq. (1); VATT (Akbari et al. 2021) Eq. (3) uses it for video-text with
    the K = 5 captions nearest in time as the positive set P(i):
    ``MIL-NCE_i = -log( sum_{t in P(i)} exp(v_i.t / tau) / (sum_{t in P(i)} exp(v_i.t / tau)
    + sum_{(v', t') in N(i)} exp(v'.t' / tau)) )``.

    As in MIL-NCE's and VATT's reference code (``asymmetric_nce``), N(i) is symmetric: the clip's
    video against every caption of every other clip, ``(v_i, t_jk)``, and every other clip's
    video against each of the clip's own captions, ``(v_j, t_ik)``, ``j != i`` over the global
    batch (all data-parallel ranks) and ``k`` over existing captions. Each positive pair counts
    once (the reference code concatenates the two blocks whole and counts it twice). Embeddings
    are L2-normalised here, like :func:`clip_loss` and VATT's code.

    Args:
        video: Video embeddings in the video-text space, shape [B, D]. B equal on all ranks.
        texts: Caption embeddings, shape [B, K, D]; ``texts[i]`` are clip ``i``'s candidates.
        text_mask: Optional bool [B, K], True where a caption exists; every clip needs one.
            A masked caption counts in neither P nor N, whatever ``texts`` holds there (even
            NaN), and receives a zero gradient.
        temperature: tau > 0 (VATT: 0.07).

    Returns:
        Scalar tensor: the mean of ``MIL-NCE_i`` over this rank's B clips.

    Raises:
        ValueError: On ill-shaped inputs, a clip without any caption, or a non-positive
            temperature.
    """
    if video.dim() != 2 or texts.dim() != 3 or texts.shape[0] != video.shape[0] \
            or texts.shape[2] != video.shape[1]:
        raise ValueError("mil_nce_loss: video must be [B, D] and texts [B, K, D]; "
                         f"got video {tuple(video.shape)} and texts {tuple(texts.shape)}")
    if text_mask is not None:
        if tuple(text_mask.shape) != tuple(texts.shape[:2]):
            raise ValueError(f"mil_nce_loss: text_mask must be [B, K] = {tuple(texts.shape[:2])}; "
                             f"got {tuple(text_mask.shape)}")
        text_mask = text_mask.to(torch.bool)
        empty = (~text_mask.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"mil_nce_loss: text_mask leaves clips {empty} without any caption")
    _check_temperature("mil_nce_loss", temperature)
    return _joint_nce(video, texts, text_mask, temperature)
