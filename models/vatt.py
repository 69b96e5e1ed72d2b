"""VATT's backbone: video, audio and text from raw signals on one modality-agnostic transformer.

Akbari et al., "VATT: Transformers for Multimodal Self-Supervised Learning from Raw Video, Audio
and Text", NeurIPS 2021. Each modality has its own tokeniser, learned positions and aggregation
token; the tokens then go through a transformer that is either shared by the three modalities
(``shared=True``, the paper's modality-agnostic model) or one per modality (``shared=False``):

* video ``[B, C, T, H, W]``: non-overlapping ``tubelet x patch_size x patch_size`` patches (the paper
  uses 4 x 16 x 16 on 32 frames of 224 px), projected linearly; positions are factorised into
  learned time, row and column embeddings, summed (as the paper's 3-D positional encoding);
* audio ``[B, S]`` (raw waveform): non-overlapping patches of ``audio_patch`` samples (the paper:
  128), projected linearly, with learned 1-D positions; a waveform whose length is not a multiple
  of the patch is zero-padded at the end;
* text ``[B, L]`` (token ids): an embedding table (word-piece or BPE ids), learned positions;
  padding tokens (``pad_id``) are never attended to.

A modality's representation is the output of its aggregation token (prepended, like a class
token) after the final norm: :meth:`Vatt.forward_pooled`.

**DropToken** (Section 3.3 of the paper): in training, only a random subset of the video and audio
tokens enters the transformer, ``keep = max(1, int(N * (1 - rate)))`` of each clip's ``N`` tokens.
``N`` is the full sequence length of the configured input size, so every clip of every batch keeps
the same count (the attention cost falls by about ``(1 - rate) ** 2``). The text is never dropped.
"""
from __future__ import annotations

import math

from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layer_ids import ids_by_prefix
from .registry import register_backbone
from .vit import ModelPart, block_stack, init_transformer_weights

__all__ = ["MODALITIES", "Vatt", "VideoTokenizer", "AudioTokenizer", "TextTokenizer", "drop_tokens", "kept_tokens",
           "vatt_tiny", "vatt_small", "vatt_base"]

MODALITIES = ("video", "audio", "text")
AUDIO_FRONTENDS = ("waveform", "logmel")


def kept_tokens(n: int, rate: float) -> int:
    """How many of ``n`` tokens DropToken keeps at ``rate``: ``max(1, int(n * (1 - rate)))``."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"DropToken rate must be in [0, 1), got {rate}")
    return max(1, int(n * (1.0 - rate)))


def drop_tokens(tokens: torch.Tensor, rate: float, seeds: Optional[torch.Tensor] = None) -> torch.Tensor:
    """DropToken: a random ``kept_tokens(N, rate)`` of each row's ``N`` tokens ``[B, N, D]``, drawn
    independently per row (uniformly, without replacement), in their original order.

    ``seeds`` (int ``[B]``, optional): row ``i`` draws from a generator seeded with ``seeds[i]``, so
    that what a clip keeps depends on its seed alone, not on the batch it sits in or the rank that
    holds it (the objective seeds by step and clip index); without them, from torch's generator."""
    b, n, d = tokens.shape
    keep = kept_tokens(n, rate)
    if keep == n:
        return tokens
    if seeds is None:
        scores = torch.rand(b, n, device=tokens.device)
    else:
        if tuple(seeds.shape) != (b,):
            raise ValueError(f"DropToken seeds must be [B] = [{b}], got {list(seeds.shape)}")
        scores = torch.stack([torch.rand(n, generator=torch.Generator().manual_seed(int(s)))
                              for s in seeds.tolist()]).to(tokens.device)
    idx = scores.topk(keep, dim=1).indices.sort(dim=1).values  # [B, keep]
    return tokens.gather(1, idx.unsqueeze(-1).expand(b, keep, d))


class VideoTokenizer(nn.Module):
    """Video ``[B, C, T, H, W]`` -> tokens ``[B, T' * H' * W', D]`` (time-major), positions added.

    A 3-D convolution with kernel = stride = ``(tubelet, patch_size, patch_size)`` is the linear
    projection of each flattened patch. ``T``, ``H`` and ``W`` must be multiples of the patch sides;
    a grid other than the native one (``frames / tubelet`` x ``image_size / patch_size`` squared) takes
    the first ``T'`` time embeddings and resamples the row and column ones linearly.
    """

    def __init__(self, frames: int, image_size: int, in_chans: int, tubelet: int, patch_size: int, dim: int) -> None:
        super().__init__()
        for name, v, side in (("frames", frames, tubelet), ("image_size", image_size, patch_size)):
            if v < 1 or side < 1 or v % side:
                raise ValueError(f"video {name} ({v}) must be a positive multiple of its patch side ({side})")
        self.frames, self.image_size, self.in_chans = frames, image_size, in_chans
        self.tubelet, self.patch_size = tubelet, patch_size
        self.grid = (frames // tubelet, image_size // patch_size, image_size // patch_size)
        self.num_tokens = self.grid[0] * self.grid[1] * self.grid[2]
        self.proj = nn.Conv3d(in_chans, dim, kernel_size=(tubelet, patch_size, patch_size),
                              stride=(tubelet, patch_size, patch_size))
        self.pos_t = nn.Parameter(torch.zeros(1, self.grid[0], 1, 1, dim))
        self.pos_h = nn.Parameter(torch.zeros(1, 1, self.grid[1], 1, dim))
        self.pos_w = nn.Parameter(torch.zeros(1, 1, 1, self.grid[2], dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.ndim != 5 or x.shape[1] != self.in_chans or x.shape[2] % self.tubelet or x.shape[3] % self.patch_size
                or x.shape[4] % self.patch_size or 0 in x.shape[2:]):
            raise ValueError(f"expected video [B, C={self.in_chans}, T, H, W] with T a multiple of the tubelet "
                             f"{self.tubelet} and H, W multiples of patch_size {self.patch_size} (native "
                             f"{self.frames}x{self.image_size}x{self.image_size}), got {list(x.shape)}")
        tok = self.proj(x).permute(0, 2, 3, 4, 1)  # [B, T', H', W', D]
        t, h, w = tok.shape[1:4]
        if t > self.grid[0]:
            raise ValueError(f"video of {x.shape[2]} frames is longer than the {self.frames} frames the positions cover")
        pos = self.pos_t[:, :t] + _resample(self.pos_h, h, 2) + _resample(self.pos_w, w, 3)
        return (tok + pos.to(tok.dtype)).flatten(1, 3)


def _resample(pos: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """Learned 1-D positions ``pos`` (length on axis ``dim``) linearly resampled to ``size``."""
    if pos.shape[dim] == size:
        return pos
    moved = pos.movedim(dim, -1)  # [..., L]
    flat = moved.reshape(-1, 1, moved.shape[-1]).float()
    out = F.interpolate(flat, size=size, mode="linear", align_corners=False)
    return out.reshape(*moved.shape[:-1], size).movedim(-1, dim).to(pos.dtype)


def mel_filterbank(n_fft: int, n_mels: int, sample_rate: int) -> torch.Tensor:
    """Triangular filters on the mel scale (HTK: ``2595 log10(1 + f / 700)``), ``[n_mels, n_fft // 2 + 1]``,
    from 0 Hz to the Nyquist frequency, each 1 at its centre frequency (sampled at the FFT bins)."""
    mel = lambda f: 2595.0 * math.log10(1.0 + f / 700.0)  # noqa: E731
    edges = torch.linspace(mel(0.0), mel(sample_rate / 2), n_mels + 2, dtype=torch.float64)
    hz = 700.0 * (10.0 ** (edges / 2595.0) - 1.0)
    f = torch.linspace(0.0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    lo, mid, hi = hz[:-2, None], hz[1:-1, None], hz[2:, None]
    return torch.minimum((f - lo) / (mid - lo), (hi - f) / (hi - mid)).clamp(min=0).float()


class AudioTokenizer(nn.Module):
    """Audio ``[B, S]`` -> tokens ``[B, N, D]``, positions added.

    ``frontend="waveform"`` (the paper's): non-overlapping raw-waveform patches of ``audio_patch``
    samples, linearly projected; ``N = ceil(S / audio_patch)``. ``frontend="logmel"``: a log-mel
    spectrogram (``2 * audio_patch``-sample Hann windows every ``audio_patch`` samples, ``n_mels``
    bands up to ``sample_rate / 2``), each frame layer-normalised and projected, so one token again
    covers ``audio_patch`` samples; ``N = S // audio_patch + 1``.
    """

    def __init__(self, samples: int, audio_patch: int, dim: int, frontend: str = "waveform",
                 sample_rate: int = 8000, n_mels: int = 40) -> None:
        super().__init__()
        if samples < 1 or audio_patch < 1:
            raise ValueError(f"audio samples ({samples}) and audio_patch ({audio_patch}) must be >= 1")
        if frontend not in AUDIO_FRONTENDS:
            raise ValueError(f"audio frontend must be one of {', '.join(AUDIO_FRONTENDS)}; got {frontend!r}")
        self.samples, self.audio_patch, self.frontend = samples, audio_patch, frontend
        if frontend == "waveform":
            self.num_tokens = -(-samples // audio_patch)
            self.proj = nn.Linear(audio_patch, dim)
        else:
            if n_mels < 1 or sample_rate < 1:
                raise ValueError(f"n_mels ({n_mels}) and sample_rate ({sample_rate}) must be >= 1")
            self.num_tokens = samples // audio_patch + 1
            self.register_buffer("window", torch.hann_window(2 * audio_patch), persistent=False)
            self.register_buffer("mel", mel_filterbank(2 * audio_patch, n_mels, sample_rate), persistent=False)
            self.norm = nn.LayerNorm(n_mels)
            self.proj = nn.Linear(n_mels, dim)
        self.pos = nn.Parameter(torch.zeros(1, self.num_tokens, dim))

    def log_mel(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, S]`` -> ``[B, S // audio_patch + 1, n_mels]`` (natural log of the band powers + 1e-6), in fp32."""
        p = self.audio_patch
        spec = torch.stft(x.float(), 2 * p, hop_length=p, window=self.window, center=True, pad_mode="constant",
                          return_complex=True).abs().pow(2)
        return torch.log(torch.matmul(self.mel, spec) + 1e-6).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        limit = self.num_tokens * self.audio_patch if self.frontend == "waveform" else self.samples
        if x.ndim != 2 or x.shape[1] == 0 or x.shape[1] > limit:
            raise ValueError(f"expected a waveform [B, S] with 1 <= S <= {limit} samples "
                             f"(native {self.samples}), got {list(x.shape)}")
        if self.frontend == "logmel":
            tok = self.proj(self.norm(self.log_mel(x)).to(self.proj.weight.dtype))
        else:
            pad = -x.shape[1] % self.audio_patch
            if pad:
                x = F.pad(x, (0, pad))
            tok = self.proj(x.reshape(x.shape[0], -1, self.audio_patch).to(self.proj.weight.dtype))
        return tok + self.pos[:, :tok.shape[1]].to(tok.dtype)


class TextTokenizer(nn.Module):
    """Token ids ``[B, L]`` -> tokens ``[B, L, D]`` (embedding table plus learned positions)."""

    def __init__(self, vocab_size: int, context_length: int, dim: int, pad_id: int = 0) -> None:
        super().__init__()
        if vocab_size < 1 or context_length < 1:
            raise ValueError(f"vocab_size ({vocab_size}) and context_length ({context_length}) must be >= 1")
        if not 0 <= pad_id < vocab_size:
            raise ValueError(f"pad_id must be in [0, vocab_size) = [0, {vocab_size}), got {pad_id}")
        self.vocab_size, self.context_length, self.pad_id = vocab_size, context_length, pad_id
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.zeros(1, context_length, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.ndim != 2 or ids.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool):
            raise ValueError(f"expected integer token ids [B, L], got {ids.dtype} {list(ids.shape)}")
        if ids.shape[1] > self.context_length or ids.shape[1] == 0:
            raise ValueError(f"text of {ids.shape[1]} tokens; this tower takes 1 to {self.context_length} "
                             f"(its context_length)")
        return self.embed(ids) + self.pos[:, :ids.shape[1]]


class VattEncoder(nn.Module):
    """A stack of pre-norm blocks and a final norm, over tokens with an optional key mask."""

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float, drop_path: float) -> None:
        super().__init__()
        self.blocks = block_stack(dim, num_heads, mlp_ratio, depth, drop_path)
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor, key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, key_mask)
        return self.norm(x)


class Vatt(nn.Module):
    """Video, audio and text tokenisers with one shared transformer, or one per modality.

    Args:
        frames, image_size, in_chans: the video clips (``[B, in_chans, frames, image_size, image_size]``).
        tubelet, patch_size: the video patch (``tubelet`` frames x ``patch_size`` pixels squared).
        audio_samples, audio_patch: the waveform length and its patch (samples per token).
        vocab_size, context_length, pad_id: the text token ids.
        embed_dim, depth, num_heads, mlp_ratio, drop_path: the transformer(s).
        shared: one transformer for the three modalities (True, the paper's modality-agnostic
            VATT) or one per modality (False, the paper's modality-specific variant).

    Attributes:
        embed_dim: ``D``, the width of every pooled output.
        video_embed, audio_embed, text_embed: the tokenisers (:class:`VideoTokenizer`, ...).
        agg_tokens: ``[3, D]`` aggregation tokens, one per modality (video, audio, text).
        encoder: the shared :class:`VattEncoder` (``shared=True``), else ``encoders[modality]``.

    Shapes:
        ``forward_features(x, modality)``: ``[B, 1 + N', D]``, the aggregation token first (``N'``:
        the tokens kept by DropToken); ``forward_pooled(x, modality)``: ``[B, D]``.
    """

    modalities = MODALITIES

    def __init__(self, frames: int = 8, image_size: int = 32, in_chans: int = 3, tubelet: int = 2,
                 patch_size: int = 8, audio_samples: int = 4096, audio_patch: int = 128, vocab_size: int = 512,
                 context_length: int = 16, pad_id: int = 0, embed_dim: int = 192, depth: int = 12,
                 num_heads: int = 3, mlp_ratio: float = 4.0, drop_path: float = 0.0, shared: bool = True,
                 audio_frontend: str = "waveform", sample_rate: int = 8000, n_mels: int = 40) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.embed_dim = self.num_features = embed_dim
        self.depth, self.num_heads, self.shared = depth, num_heads, bool(shared)
        self.frames, self.image_size, self.in_chans = frames, image_size, in_chans
        self.audio_samples, self.vocab_size, self.context_length, self.pad_id = (audio_samples, vocab_size,
                                                                                  context_length, pad_id)
        self.video_embed = VideoTokenizer(frames, image_size, in_chans, tubelet, patch_size, embed_dim)
        self.audio_embed = AudioTokenizer(audio_samples, audio_patch, embed_dim, audio_frontend, sample_rate, n_mels)
        self.text_embed = TextTokenizer(vocab_size, context_length, embed_dim, pad_id)
        self.agg_tokens = nn.Parameter(torch.zeros(len(MODALITIES), embed_dim))
        if self.shared:
            self.encoder = VattEncoder(embed_dim, depth, num_heads, mlp_ratio, drop_path)
        else:
            self.encoders = nn.ModuleDict({m: VattEncoder(embed_dim, depth, num_heads, mlp_ratio, drop_path)
                                           for m in MODALITIES})
        self._init_weights()

    def _init_weights(self) -> None:
        init_transformer_weights(self)
        w = self.video_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.video_embed.proj.bias)
        nn.init.normal_(self.text_embed.embed.weight, std=0.02)
        for p in (self.agg_tokens, self.video_embed.pos_t, self.video_embed.pos_h, self.video_embed.pos_w,
                  self.audio_embed.pos, self.text_embed.pos):
            nn.init.trunc_normal_(p, std=0.02)

    # ------------------------------------------------------------------ encoding

    def encoder_of(self, modality: str) -> VattEncoder:
        _check_modality(modality)
        return self.encoder if self.shared else self.encoders[modality]

    def tokens(self, x: torch.Tensor, modality: str, drop_rate: float = 0.0,
               drop_seeds: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Tokeniser output with DropToken (video and audio, ``drop_rate > 0``; ``drop_seeds``: see
        :func:`drop_tokens`) and the aggregation token prepended: ``([B, 1 + N', D], key mask
        [B, 1 + N'] or None)``."""
        _check_modality(modality)
        key_mask = None
        if modality == "video":
            tok = self.video_embed(x)
        elif modality == "audio":
            tok = self.audio_embed(x)
        else:
            tok = self.text_embed(x)
            pad = x == self.pad_id
            if bool(pad.any()):
                key_mask = torch.cat([torch.ones_like(pad[:, :1]), ~pad], dim=1)
        if drop_rate > 0 and modality != "text":
            tok = drop_tokens(tok, drop_rate, drop_seeds)
        agg = self.agg_tokens[MODALITIES.index(modality)].to(tok.dtype).expand(tok.shape[0], 1, -1)
        return torch.cat([agg, tok], dim=1), key_mask

    def forward_features(self, x: torch.Tensor, modality: str = "video", drop_rate: float = 0.0,
                         drop_seeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Normalised tokens ``[B, 1 + N', D]`` of one modality, the aggregation token first."""
        tok, key_mask = self.tokens(x, modality, drop_rate, drop_seeds)
        return self.encoder_of(modality)(tok, key_mask)

    def forward_pooled(self, x: torch.Tensor, modality: str = "video", drop_rate: float = 0.0,
                       drop_seeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The modality's aggregation-token output ``[B, D]``."""
        return self.forward_features(x, modality, drop_rate, drop_seeds)[:, 0]

    def forward(self, x: torch.Tensor, modality: str = "video") -> torch.Tensor:
        return self.forward_pooled(x, modality)

    # ------------------------------------------------------------------ the backbone contract

    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if n == "agg_tokens" or n.endswith(("pos", "pos_t", "pos_h", "pos_w"))}

    def num_layers(self) -> int:
        return self.depth + 1

    def layer_ids(self) -> Dict[str, int]:
        """Tokenisers and aggregation tokens 0, block ``j`` (from 1) of any encoder ``j``, final norms
        ``depth + 1``."""
        prefixes = [(p, 0) for p in ("video_embed", "audio_embed", "text_embed", "agg_tokens")]
        encoders = ["encoder"] if self.shared else [f"encoders.{m}" for m in MODALITIES]
        for e in encoders:
            prefixes += [(f"{e}.blocks.{i}", i + 1) for i in range(self.depth)]
            prefixes.append((f"{e}.norm", self.num_layers()))
        return ids_by_prefix(self, prefixes)

    def pipeline_layers(self) -> List[nn.Module]:
        """The video path as a chain: ``[VattVideoEmbed, block_1, ..., block_N, VattPool]``, composing
        to ``forward_pooled(video)``. The first layer also holds the audio and text tokenisers (and,
        with one transformer per modality, the last layer holds the other two), so that every
        parameter sits in exactly one layer; a pipeline of VATT itself is refused by its objective."""
        enc = self.encoder_of("video")
        return [_VideoEmbedLayer(self), *enc.blocks, _PoolLayer(self)]

    def extra_repr(self) -> str:
        return f"shared={self.shared}"


class _VideoEmbedLayer(ModelPart):
    shared = ("video_embed", "audio_embed", "text_embed", "agg_tokens")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tok = self.video_embed(x)
        return torch.cat([self.agg_tokens[0].to(tok.dtype).expand(tok.shape[0], 1, -1), tok], dim=1)


class _PoolLayer(nn.Module):
    def __init__(self, model: Vatt) -> None:
        super().__init__()
        self.norm = model.encoder_of("video").norm
        if not model.shared:
            self.others = nn.ModuleList([model.encoders[m] for m in ("audio", "text")])

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.norm(tokens)[:, 0]


def _check_modality(modality: str) -> None:
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; valid: {', '.join(MODALITIES)}")


_PRESETS = {"vatt_tiny": dict(embed_dim=192, depth=12, num_heads=3),
            "vatt_small": dict(embed_dim=384, depth=12, num_heads=6),
            "vatt_base": dict(embed_dim=768, depth=12, num_heads=12)}


def _factory(preset: str):
    sizes = _PRESETS[preset]

    def factory(frames: int = 8, image_size: int = 32, in_chans: int = 3, tubelet: int = 2, patch_size: int = 8,
                audio_samples: int = 4096, audio_patch: int = 128, vocab_size: int = 512, context_length: int = 16,
                pad_id: int = 0, depth: Optional[int] = None, embed_dim: Optional[int] = None,
                num_heads: Optional[int] = None, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                shared: bool = True, audio_frontend: str = "waveform", sample_rate: int = 8000,
                n_mels: int = 40) -> Vatt:
        kw = {k: v if v is not None else sizes[k] for k, v in
              (("depth", depth), ("embed_dim", embed_dim), ("num_heads", num_heads))}
        return Vatt(frames, image_size, in_chans, tubelet, patch_size, audio_samples, audio_patch, vocab_size,
                    context_length, pad_id, mlp_ratio=mlp_ratio, drop_path=drop_path, shared=shared,
                    audio_frontend=audio_frontend, sample_rate=sample_rate, n_mels=n_mels, **kw)

    factory.__name__ = preset
    factory.__doc__ = (f"VATT ({sizes['embed_dim']} wide, {sizes['depth']} blocks, {sizes['num_heads']} heads; "
                       f"depth / embed_dim / num_heads override): video, audio and text on one shared transformer "
                       f"(``shared=False``: one per modality).")
    return register_backbone(preset)(factory)


vatt_tiny = _factory("vatt_tiny")
vatt_small = _factory("vatt_small")
vatt_base = _factory("vatt_base")
