"""A training run of this project as a frozen image encoder for ``eval_probes.search``.

Importing this module registers :func:`run_encoder` as the search code's loader of runs, so that
``eval_probes.search.embed.load_encoder(run_dir=...)`` (``pretrain embed --run``, image queries
against embeddings of a run) can load one; ``eval_probes`` never imports ``pretrain`` itself.
"""
from __future__ import annotations

from pathlib import Path

import torch

import data as data_lib
from data.common import PathNotFoundError
from eval_probes.search.embed import LoadedEncoder, prepare_images, register_run_loader
from .config import ConfigError

__all__ = ["run_encoder", "register_run_encoder"]


def run_encoder(run_dir, image_size=None, modality: str = "image") -> LoadedEncoder:
    """A run of this project as a frozen encoder: ``embed(uint8 [B, C, H, W]) -> [B, D]`` (the
    objective's ``embed``), at the run's image size unless ``image_size`` is given.

    An image-text run (an objective with ``encode_image`` and ``encode_text``: ``clip``) embeds
    images into its joint space instead, and also text (``embed_text``, through the run's own
    tokenizer and text tower), so that its embeddings answer text queries without alignment heads.

    A video-audio-text run (an objective with ``encode_video``: ``vatt``) embeds clips instead:
    ``modality="video"`` takes uint8 videos ``[B, T, C, H, W]`` into its video-text space (with
    ``embed_text``, so that text finds videos), ``modality="audio"`` waveforms ``[B, S]`` into its
    video-audio space; ``build_data(spec, split)`` builds clips with the run's clip settings.

    Raises:
        PathNotFoundError: If ``run_dir`` does not exist or has no ``weights.safetensors``.
        ConfigError: If ``modality`` is not one the run embeds.
    """
    from data.tokenize import create_tokenizer

    from .batches import schema_of
    from .engines import autocast_context
    from .loop import uses_channels_last
    from .objectives import objective_class
    from .probe import load_run, read_run_config

    run = Path(run_dir)
    if not run.is_dir():
        raise PathNotFoundError(f"run directory '{run}' does not exist")
    if not (run / "weights.safetensors").is_file():
        raise PathNotFoundError(f"'{run}' has no weights.safetensors (finish the run or 'pretrain export' it)")
    cfg = read_run_config(run)
    info = schema_of(objective_class(cfg.objective)).dataset(cfg, "test").info
    cfg, model = load_run(run, cfg, info)
    model.eval()
    size = int(image_size or cfg.image_size or info.image_size)
    mean, std = tuple(info.mean), tuple(info.std)
    channels_last = uses_channels_last(cfg, info.channels)
    if hasattr(model, "encode_video"):
        return _clip_encoder(run, cfg, model, info, modality)
    if modality != "image":
        raise ConfigError(f"--modality {modality}: run '{run}' (objective '{cfg.objective}') embeds images; video "
                          f"and audio need a video-audio-text run (objective=vatt)")
    joint = hasattr(model, "encode_image") and hasattr(model, "encode_text")

    def embed(images):
        x = prepare_images(images, size, info.channels, mean, std)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), autocast_context(cfg.precision):
            return (model.encode_image(x) if joint else model.embed({"image": x})).float()

    embed_text = None
    if joint:
        tokenizer = create_tokenizer(cfg.tokenizer.name, cfg.tokenizer.context_length)

        def embed_text(texts):
            with torch.no_grad(), autocast_context(cfg.precision):
                return model.encode_text(tokenizer(list(texts))).float()

    return LoadedEncoder(embed, size, (mean, std), embed_text)


def _clip_encoder(run: Path, cfg, model, info, modality: str) -> LoadedEncoder:
    """A video-audio-text run as an encoder of clips' ``video`` or ``audio`` (see :func:`run_encoder`)."""
    import dataclasses

    from data.clips import normalise_video
    from data.tokenize import create_tokenizer

    from .batches import schema_of
    from .engines import autocast_context

    if modality not in ("video", "audio"):
        raise ConfigError(f"--modality {modality}: run '{run}' (objective '{cfg.objective}') embeds clips; give "
                          f"--modality video (found by text queries) or --modality audio")
    def embed(x):
        with torch.no_grad(), autocast_context(cfg.precision):
            if modality == "audio":
                return model.encode_audio(x.float()).float()
            return model.encode_video(normalise_video(x, info.mean, info.std))[1].float()

    embed_text = None
    if modality == "video":
        tokenizer = create_tokenizer(cfg.tokenizer.name, cfg.tokenizer.context_length)

        def embed_text(texts):
            with torch.no_grad(), autocast_context(cfg.precision):
                return model.encode_texts(tokenizer(list(texts))).float()

    def build_data(spec: str, split: str):
        return schema_of(model).dataset(dataclasses.replace(cfg, data=spec), split)

    return LoadedEncoder(embed, int(cfg.image_size or info.image_size), (tuple(info.mean), tuple(info.std)),
                         embed_text, modality, build_data)


def register_run_encoder() -> None:
    """Let ``eval_probes.search.embed.load_encoder(run_dir=...)`` load runs of this project (done on import)."""
    register_run_loader(run_encoder)


register_run_encoder()
