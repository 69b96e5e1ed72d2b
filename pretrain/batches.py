"""Batch schemas: what the data yields for an objective, and what it fixes about the towers.

An objective declares its schema by name (``Objective.batch``); the loop asks the schema for the
towers' data-given sizes and for the collate function, and never reads a key of a batch:

* ``views``: ``{"views": [global_1, global_2, local_1, ...], "label", "index"}``, augmented
  views of each image for joint-embedding methods (BYOL, SimCLR, SwAV with multi-crop);
* ``pairs``: ``{"image", "text" (token ids [B, context_length]), "label", "index"}``, images with
  their captions, for two-tower contrastive objectives.

A new schema is a :class:`BatchSchema` subclass registered in ``SCHEMAS``.
"""
from __future__ import annotations

import data as data_lib
from data.common import Registry

from .config import ConfigError, RunConfig
from .towers import factory_keywords

SCHEMAS: Registry = Registry("batch schema")


class BatchSchema:
    """How the data feeds one kind of objective."""

    def tower_sizes(self, cfg: RunConfig, info: data_lib.DatasetInfo) -> dict[str, dict]:
        """``{tower: {keyword: size}}``: what the data fixes about each tower (channels, vocabulary)."""
        raise NotImplementedError

    def collate(self, cfg: RunConfig, objective, info: data_lib.DatasetInfo, rank: int, world: int):
        """The collate function of this rank's training batches (``rank`` / ``world``: data-parallel)."""
        raise NotImplementedError


def image_size(cfg: RunConfig, info: data_lib.DatasetInfo) -> int:
    return cfg.image_size or info.image_size


def image_sizes(cfg: RunConfig, info: data_lib.DatasetInfo) -> dict:
    return {"in_chans": info.channels, "image_size": image_size(cfg, info)}


def size_multiple(cfg: RunConfig) -> int:
    """Image sides the image tower takes are multiples of this: its patch size where its factory
    takes one (a ViT resamples its positions to any such grid), else 1."""
    tower = cfg.model.image
    keywords = factory_keywords(tower.backbone) if tower.backbone else set()
    return tower.patch_size if tower.patch_size and (keywords is None or "patch_size" in keywords) else 1


@SCHEMAS.register("views")
class ViewsSchema(BatchSchema):
    """Augmented views of each image: the objective's two views (``view_recipe``), plus
    ``aug.local_views`` small local views for objectives with multi-crop."""

    def tower_sizes(self, cfg, info):
        return {"image": image_sizes(cfg, info)}

    def augments(self, cfg: RunConfig, objective, info) -> list[data_lib.ViewAugment]:
        size = image_size(cfg, info)
        kind = cfg.aug.views or objective.view_recipe
        a = cfg.aug
        n_local = objective.local_views if a.local_views < 0 else a.local_views
        if not objective.multi_crop:
            if n_local > 0:
                raise ConfigError(f"aug.local_views={n_local}: objective '{cfg.objective}' does not take local "
                                  f"views (multi-crop); set aug.local_views=0 or -1")
            specs = data_lib.view_specs(kind, size, crop_scale=a.crop_scale, color=info.color, flip=info.flip,
                                        jitter_strength=a.jitter_strength)
        else:
            multiple = size_multiple(cfg)
            if n_local > 0 and a.local_size % multiple:
                raise ConfigError(f"aug.local_size={a.local_size} must be a multiple of model.patch_size={multiple} "
                                  f"(the image tower's patch size)")
            try:
                specs = data_lib.multicrop_specs(kind, size, n_local, a.local_size, crop_scale=a.crop_scale,
                                                 local_crop_scale=a.local_crop_scale, color=info.color,
                                                 flip=info.flip, jitter_strength=a.jitter_strength,
                                                 size_multiple=multiple)
            except ValueError as exc:
                raise ConfigError(f"aug.{exc}") from None  # the message names the field
        return [data_lib.ViewAugment(s, info.mean, info.std) for s in specs]

    def collate(self, cfg, objective, info, rank, world):
        return data_lib.ViewCollate(self.augments(cfg, objective, info), cfg.seed, rank, world, cfg.batch_size)


@SCHEMAS.register("pairs")
class PairsSchema(BatchSchema):
    """Images with captions: the image resized and normalised, the caption as token ids of
    ``tokenizer.name`` (``tokenizer.context_length`` ids, end-of-text kept on truncation)."""

    def tokenizer(self, cfg: RunConfig):
        return data_lib.create_tokenizer(cfg.tokenizer.name, cfg.tokenizer.context_length)

    def tower_sizes(self, cfg, info):
        tok = self.tokenizer(cfg)
        return {"image": image_sizes(cfg, info),
                "text": {"vocab_size": tok.vocab_size, "context_length": tok.context_length,
                         "pad_id": tok.pad_id, "eot_id": tok.eot_id}}

    def collate(self, cfg, objective, info, rank, world):
        return data_lib.PairCollate(image_size(cfg, info), info.mean, info.std, self.tokenizer(cfg), seed=cfg.seed,
                                    rank=rank, world_size=world, batch_size=cfg.batch_size)


def schema_of(objective) -> BatchSchema:
    """The schema instance an objective declares (``objective.batch``)."""
    return SCHEMAS.get(objective.batch)()
