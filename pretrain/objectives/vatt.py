"""VATT (Akbari et al. 2021): video, audio and text from raw signals, aligned in common spaces.

One backbone (:class:`models.vatt.Vatt`, ``model.video.backbone=vatt_tiny`` / ``vatt_small`` /
``vatt_base``) tokenises the three modalities and runs them through one modality-agnostic
transformer (``vatt.shared=true``, the paper's main model) or one transformer per modality
(``vatt.shared=false``). Each modality's aggregation-token output is projected into the paper's
two common spaces (its Section 3.2, after Alayrac et al.'s "fine and coarse" spaces):

* video -> video-audio space by ``g_v->va`` and audio -> the same space by ``g_a->va`` (two-layer
  MLPs, ``va_dim`` wide, batch norm between the layers);
* the video's video-audio embedding -> video-text space by ``g_va->vt``, text -> the same space by
  ``g_t->vt`` (linear, ``vt_dim`` wide).

The loss is ``NCE(video, audio) + vt_weight * MIL-NCE(video, captions)`` (:func:`losses.nce_loss`,
:func:`losses.mil_nce_loss`, temperature 0.07, negatives from every data-parallel rank), where a
clip's captions (up to ``clips.max_captions``) are all positives. In training, DropToken keeps a
random ``1 - drop_token`` of each clip's video and audio tokens (:func:`models.vatt.drop_tokens`),
drawn from the clip's step and index: the same on any number of ranks and after a resume.

Evaluation (``eval_split=test``, held-out clips): video->text and text->video recall@1/5/10 in the
video-text space (a caption is a positive of every clip with the same text), video->audio and
audio->video recall@1/5/10 in the video-audio space (a clip's own sound), and, per source with
classes, zero-shot top-1 of the videos by the class names' text prompts and, where the source has
class recordings (spoken digits), by the nearest class's mean recording.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from losses import mil_nce_loss, nce_loss
from models.heads import MLPHead

from ..config import ConfigError
from .base import Objective, register_objective
from .clip import zero_shot_accuracy, zero_shot_classifier
from .vqkd import mim_param_groups

__all__ = ["VattConfig", "VattObjective"]


@dataclass
class VattConfig:
    shared: bool = True  # one modality-agnostic transformer (the paper's main model) or one per modality
    drop_token: float = 0.5  # DropToken: the fraction of video and audio tokens dropped in training
    va_dim: int = 512  # video-audio space (the paper: 512)
    vt_dim: int = 256  # video-text space (the paper: 256)
    head_norm: str = "bn"  # between the two layers of g_v->va and g_a->va: bn | ln | none
    temperature: float = 0.07
    vt_weight: float = 1.0  # weight of the video-text MIL-NCE beside the video-audio NCE
    templates: tuple[str, ...] = ()  # zero-shot prompts ("the number {}."); empty = each source's own
    audio_frontend: str = "waveform"  # raw-waveform patches (the paper's) | logmel (a log-mel spectrogram's frames)


@register_objective("vatt", VattConfig)
class VattObjective(Objective):
    """VATT on one multimodal backbone (the ``video`` tower) and four projection heads."""

    towers = ("video",)
    batch = "clips"
    eval_split = "test"
    pipeline_refusal = ("three modalities go through the transformer separately and meet only in the contrastive "
                        "losses; a chain of stages carries one (use ZeRO or tp)")

    def __init__(self, towers, cfg: VattConfig):
        super().__init__(towers)
        check_config(cfg)
        self.cfg = cfg
        model = self.tower("video")
        for attr in ("modalities", "forward_pooled"):
            if not hasattr(model, attr):
                raise ConfigError(f"objective 'vatt' needs a video-audio-text backbone (model.video.backbone=vatt_tiny, "
                                  f"vatt_small or vatt_base); got {type(model).__name__}")
        d = model.embed_dim
        self.video_va = MLPHead(d, cfg.va_dim, cfg.va_dim, num_layers=2, norm=cfg.head_norm)
        self.audio_va = MLPHead(d, cfg.va_dim, cfg.va_dim, num_layers=2, norm=cfg.head_norm)
        self.va_vt = nn.Linear(cfg.va_dim, cfg.vt_dim)
        self.text_vt = nn.Linear(d, cfg.vt_dim)

    @classmethod
    def tower_options(cls, cfg: VattConfig) -> dict[str, dict]:
        return {"video": {"shared": bool(cfg.shared), "audio_frontend": cfg.audio_frontend}}

    # ------------------------------------------------------------------ embeddings

    def pooled(self, x: Tensor, modality: str, drop_seeds: Tensor | None = None) -> Tensor:
        """The backbone's pooled output; with ``drop_seeds`` (in training) after DropToken."""
        if drop_seeds is None or not self.training or self.cfg.drop_token == 0:
            return self.tower("video").forward_pooled(x, modality)
        return self.tower("video").forward_pooled(x, modality, self.cfg.drop_token, drop_seeds)

    def encode_texts(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        """Video-text-space embeddings of captions: ids ``[B, K, L]`` -> ``[B, K, vt_dim]`` (rows where
        ``mask`` [B, K] is False are zeros and cost nothing), or ids ``[N, L]`` -> ``[N, vt_dim]``."""
        if ids.ndim == 2:
            return self.text_vt(self.pooled(ids, "text"))
        b, k, _ = ids.shape
        if mask is None:
            mask = torch.ones(b, k, dtype=torch.bool, device=ids.device)
        real = self.text_vt(self.pooled(ids[mask], "text"))
        out = real.new_zeros(b, k, real.shape[-1])
        out[mask] = real
        return out

    def encode_video(self, video: Tensor, drop_seeds: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(video-audio, video-text)`` embeddings ``[B, va_dim]``, ``[B, vt_dim]`` of clips ``[B, C, T, H, W]``."""
        va = self.video_va(self.pooled(video, "video", drop_seeds))
        return va, self.va_vt(va)

    def encode_audio(self, audio: Tensor, drop_seeds: Tensor | None = None) -> Tensor:
        """Video-audio-space embeddings ``[B, va_dim]`` of waveforms ``[B, S]``."""
        return self.audio_va(self.pooled(audio, "audio", drop_seeds))

    @staticmethod
    def drop_seeds(batch: dict, modality: int) -> Tensor:
        """DropToken's seed of each clip: its (micro-)step and dataset index, so that a clip drops the
        same tokens on any number of ranks and after a resume (``modality``: 0 video, 1 audio)."""
        step = max(int(batch.get("step", 0)), 0)
        return (step * 1_000_003 + batch["index"].long()) * 2 + modality

    def forward(self, batch: dict) -> dict[str, Tensor]:
        v_va, v_vt = self.encode_video(batch["video"], self.drop_seeds(batch, 0))
        a_va = self.encode_audio(batch["audio"], self.drop_seeds(batch, 1))
        mask = batch["text_mask"]
        t_vt = self.encode_texts(batch["text"], mask)
        tau = self.cfg.temperature
        va = nce_loss(v_va.float(), a_va.float(), tau)
        vt = mil_nce_loss(v_vt.float(), t_vt.float(), mask, tau)
        return {"loss": va + self.cfg.vt_weight * vt, "va_loss": va.detach(), "vt_loss": vt.detach()}

    def param_groups(self) -> list[dict]:
        """Weights with decay; biases, norms, positions and aggregation tokens without decay or LARS."""
        return mim_param_groups(self)

    @torch.no_grad()
    def embed(self, batch: dict) -> Tensor:
        """Features for probes and search indexes: the pooled backbone output of the batch's
        ``video`` (else its ``audio``, else its ``text`` ids [B, L])."""
        for modality in ("video", "audio", "text"):
            if modality in batch:
                return self.pooled(batch[modality], modality).float()
        raise KeyError("vatt embeds a batch with 'video', 'audio' or 'text'; got keys " + ", ".join(batch))

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, loader, final: bool = False) -> dict[str, float]:
        was_training = self.training
        self.eval()
        v_va, v_vt, a_va, t_vt, t_ids, owners, labels, sources = [], [], [], [], [], [], [], []
        offset = 0
        for batch in loader:
            n = batch["video"].shape[0]
            if n == 0:
                continue
            va, vt = self.encode_video(batch["video"])
            v_va.append(F.normalize(va.float(), dim=1))
            v_vt.append(F.normalize(vt.float(), dim=1))
            a_va.append(F.normalize(self.encode_audio(batch["audio"]).float(), dim=1))
            mask = batch["text_mask"]
            t_vt.append(F.normalize(self.encode_texts(batch["text"], mask)[mask].float(), dim=1))
            t_ids.append(batch["text"][mask])
            owners.append(mask.nonzero()[:, 0] + offset)
            labels.append(batch["label"])
            sources.append(batch.get("source", torch.zeros(n, dtype=torch.long)))
            offset += n
        if not v_va:
            self.train(was_training)
            return {}
        v_va, v_vt, a_va, t_vt = torch.cat(v_va), torch.cat(v_vt), torch.cat(a_va), torch.cat(t_vt)
        label, source = torch.cat(labels), torch.cat(sources)
        # a caption is a positive of every clip that has the same text (clips of one stamp, or of one
        # digit, share theirs), so that retrieval does not hinge on ties between identical texts
        _, text_id = torch.unique(torch.cat(t_ids), dim=0, return_inverse=True)
        owner = torch.cat(owners)
        has = torch.zeros(v_vt.shape[0], int(text_id.max()) + 1, dtype=torch.bool, device=v_vt.device)
        has[owner, text_id] = True
        pos = has[:, text_id]  # [clips, captions]
        out = {**retrieval_recalls(v_vt, t_vt, pos, "v2t"), **retrieval_recalls(t_vt, v_vt, pos.T, "t2v")}
        eye = torch.eye(v_va.shape[0], dtype=torch.bool, device=v_va.device)
        out.update({**retrieval_recalls(v_va, a_va, eye, "v2a"), **retrieval_recalls(a_va, v_va, eye, "a2v")})
        out["retrieval_clips"], out["retrieval_texts"] = float(v_va.shape[0]), float(t_vt.shape[0])
        templates = list(self.cfg.templates)
        device = v_vt.device
        class_audio = getattr(loader, "class_audio", None) or {}
        for si, src in enumerate(getattr(loader, "sources", [])):
            classes = src["classes"]
            rows = (source == si) & (label >= 0)
            if len(classes) < 2 or not rows.any():
                continue
            target = label[rows] - classes[0]  # a source's classes are consecutive ids
            names = [loader.class_names[c] for c in classes]
            weights = zero_shot_classifier(lambda ids: self.encode_texts(ids.to(device)).float(), loader.tokenizer,
                                           names, templates or src["templates"])
            key = "".join(ch if ch.isalnum() else "_" for ch in src["name"]).strip("_")
            out[f"zeroshot_text_{key}_top1"] = zero_shot_accuracy(v_vt[rows], weights, target)["top1"]
            if all(c in class_audio for c in classes):
                protos = torch.stack([F.normalize(F.normalize(self.encode_audio(class_audio[c].to(device)).float(),
                                                              dim=1).mean(0), dim=0) for c in classes])
                out[f"zeroshot_audio_{key}_top1"] = zero_shot_accuracy(v_va[rows], protos, target)["top1"]
        self.train(was_training)
        return out


def retrieval_recalls(queries: Tensor, keys: Tensor, positive: Tensor, name: str, ks=(1, 5, 10)) -> dict[str, float]:
    """Recall@k and mean rank of normalised ``queries`` [Q, D] against ``keys`` [K, D], where
    ``positive`` [Q, K] marks each query's positives: a query's rank is the number of non-positive
    keys scoring above its best positive (ties in its favour); queries without a positive are left
    out. Keys ``{name}_r{k}`` and ``{name}_mean_rank`` (1 = first)."""
    sims = queries @ keys.T
    best = sims.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)
    rank = (sims.masked_fill(positive, float("-inf")) > best).sum(1)[positive.any(dim=1)]
    out = {f"{name}_r{k}": float((rank < k).float().mean()) for k in ks}
    out[f"{name}_mean_rank"] = float((rank + 1).float().mean())
    return out


def check_config(cfg: VattConfig) -> None:
    from models.vatt import AUDIO_FRONTENDS

    if cfg.audio_frontend not in AUDIO_FRONTENDS:
        raise ConfigError(f"config key 'vatt.audio_frontend': expected one of {', '.join(AUDIO_FRONTENDS)}, "
                          f"got {cfg.audio_frontend!r}")
    if not 0.0 <= cfg.drop_token < 1.0:
        raise ConfigError(f"config key 'vatt.drop_token': expected a fraction in [0, 1), got {cfg.drop_token}")
    for key in ("va_dim", "vt_dim"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"config key 'vatt.{key}': expected an integer >= 1, got {getattr(cfg, key)}")
    if cfg.head_norm not in ("bn", "ln", "none"):
        raise ConfigError(f"config key 'vatt.head_norm': expected one of bn, ln, none, got '{cfg.head_norm}'")
    if cfg.temperature <= 0:
        raise ConfigError(f"config key 'vatt.temperature': expected a value > 0, got {cfg.temperature}")
    if cfg.vt_weight < 0:
        raise ConfigError(f"config key 'vatt.vt_weight': expected a value >= 0, got {cfg.vt_weight}")
    for t in cfg.templates:
        if "{}" not in t:
            raise ConfigError(f"config key 'vatt.templates': each template needs a '{{}}' for the class name, got {t!r}")
