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

__all__ = ["run_encoder", "register_run_encoder"]


def run_encoder(run_dir, image_size=None) -> LoadedEncoder:
    """A run of this project as a frozen encoder: ``embed(uint8 [B, C, H, W]) -> [B, D]`` (the
    objective's ``embed``), at the run's image size unless ``image_size`` is given.

    An image-text run (an objective with ``encode_image`` and ``encode_text``: ``clip``) embeds
    images into its joint space instead, and also text (``embed_text``, through the run's own
    tokenizer and text tower), so that its embeddings answer text queries without alignment heads.

    Raises:
        PathNotFoundError: If ``run_dir`` does not exist or has no ``weights.safetensors``.
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


def register_run_encoder() -> None:
    """Let ``eval_probes.search.embed.load_encoder(run_dir=...)`` load runs of this project (done on import)."""
    register_run_loader(run_encoder)


register_run_encoder()
