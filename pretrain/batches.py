"""Batch schemas: what the data yields for an objective, and what it fixes about the towers.

An objective declares its schema by name (``Objective.batch``); the loop asks the schema for the
towers' data-given sizes and for the collate function, and never reads a key of a batch:

* ``views``: ``{"views": [global_1, global_2, local_1, ...], "label", "index"}``, augmented
  views of each image for joint-embedding methods (BYOL, SimCLR, SwAV with multi-crop);
* ``pairs``: ``{"image", "text" (token ids [B, context_length]), "label", "index"}``, images with
  their captions, for two-tower contrastive objectives;
* ``clips``: ``{"video" [B, 3, T, H, W], "audio" [B, S], "text" [B, K, L], "text_mask" [B, K],
  "label", "index"}``, audio-video-text clips with several captions each (VATT);
* ``embedded_pairs``: ``{"image_vec" [B, D], "text_vec" [B, T], "caption_id", "index"}``, frozen
  image embeddings with the embeddings of their captions, for heads trained on top of frozen
  encoders (the ``align`` objective of ``pretrain search align``).

A schema also says where the data comes from (:meth:`BatchSchema.dataset`: by default the
``data`` spec) and how its evaluation batches are made (:meth:`BatchSchema.eval_loader`).

Objectives that ask for a labelled stream (``Objective.labelled_stream``) get, under ``views``,
each batch with ``"labelled"``: a ``views`` batch of the labelled subset (see :meth:`BatchSchema.loader`).

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

    #: whether the towers take images [B, C, H, W] (the channels_last memory layout applies to them)
    image_batches: bool = True

    def dataset(self, cfg: RunConfig, split: str):
        """The ``split`` of the run's data (default: the ``data`` spec, :func:`data.build_dataset`)."""
        return data_lib.build_dataset(cfg.data, split, image_size=cfg.image_size or None, seed=cfg.seed)

    def eval_loader(self, cfg: RunConfig, info: data_lib.DatasetInfo, ds):
        """One ordered pass over an evaluation split (default: images resized and normalised,
        ``{"image", "label", "index"}``)."""
        return data_lib.eval_loader(ds, image_size(cfg, info), batch_size=256)

    def tower_sizes(self, cfg: RunConfig, info: data_lib.DatasetInfo) -> dict[str, dict]:
        """``{tower: {keyword: size}}``: what the data fixes about each tower (channels, vocabulary)."""
        raise NotImplementedError

    def collate(self, cfg: RunConfig, objective, info: data_lib.DatasetInfo, rank: int, world: int):
        """The collate function of this rank's training batches (``rank`` / ``world``: data-parallel)."""
        raise NotImplementedError

    def loader(self, cfg: RunConfig, objective, info: data_lib.DatasetInfo, ds, rank: int, world: int,
               start_step: int = 0, labelled=None):
        """This rank's endless, resumable stream of training batches over ``ds``, from micro-step
        ``start_step`` on. ``labelled``: the labelled subset, for an objective that asks for a
        labelled stream (``Objective.labelled_stream``); a schema that cannot add one says so."""
        if labelled is not None:
            raise ConfigError(f"objective '{cfg.objective}' asks for a labelled stream, which the "
                              f"'{objective.batch}' batch schema does not provide")
        return data_lib.step_loader(ds, cfg.batch_size, self.collate(cfg, objective, info, rank, world),
                                    seed=cfg.seed, rank=rank, world_size=world, start_step=start_step,
                                    num_workers=cfg.num_workers)


def image_size(cfg: RunConfig, info: data_lib.DatasetInfo) -> int:
    return cfg.image_size or info.image_size


def image_sizes(cfg: RunConfig, info: data_lib.DatasetInfo) -> dict:
    """What the data fixes about an image tower: channels, side, and how its pixels are normalised
    (``data_mean`` / ``data_std``: a pretrained tower converts its input to its own normalisation)."""
    return {"in_chans": info.channels, "image_size": image_size(cfg, info), "data_mean": list(info.mean),
            "data_std": list(info.std)}


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
            if len(specs) < objective.num_views:
                raise ConfigError(f"aug.views={kind} gives {len(specs)} view(s); objective '{cfg.objective}' takes "
                                  f"{objective.num_views}")
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

    def collate(self, cfg, objective, info, rank, world, seed: int | None = None, batch_size: int | None = None):
        seed = cfg.seed if seed is None else seed
        batch_size = batch_size or cfg.batch_size
        return data_lib.ViewCollate(self.augments(cfg, objective, info), seed, rank, world, batch_size)

    def loader(self, cfg, objective, info, ds, rank, world, start_step=0, labelled=None):
        """With a labelled subset, each batch of ``ds`` carries a ``views`` batch of the subset under
        ``"labelled"`` (at most ``batch_size`` images, fewer where the subset is smaller). The
        labelled stream draws with ``seed`` (the stream a supervised run on the subset sees), the main
        stream with ``seed + objective.stream_seed_offset``; both resume at ``start_step``."""
        seed = cfg.seed + objective.stream_seed_offset
        if labelled is None:
            collate = self.collate(cfg, objective, info, rank, world, seed=seed)
            return data_lib.step_loader(ds, cfg.batch_size, collate, seed=seed, rank=rank, world_size=world,
                                        start_step=start_step, num_workers=cfg.num_workers)

        def stream(images, batch_size, seed):
            collate = self.collate(cfg, objective, info, rank, world, seed=seed, batch_size=batch_size)
            return data_lib.step_loader(images, batch_size, collate, seed=seed, rank=rank, world_size=world,
                                        start_step=start_step, num_workers=cfg.num_workers)

        lab_batch = max(1, min(cfg.batch_size, len(labelled) // world))
        return data_lib.ZippedLoader(stream(ds, cfg.batch_size, seed), labelled=stream(labelled, lab_batch, cfg.seed))


@SCHEMAS.register("pairs")
class PairsSchema(BatchSchema):
    """Images with captions: the image resized and normalised (with ``aug.views=light``, a random
    resized crop of ``aug.crop_scale`` and, where the data allows, flips), one of its captions (drawn
    per step) as token ids of ``tokenizer.name`` (``tokenizer.context_length`` ids, end-of-text kept
    on truncation). The data is a pair spec (:mod:`data.pairs`: ``tuxpaint``, ``mnist5k_captions``,
    ``pairs:FILE.jsonl``, ``csv:FILE``, joined with ``+``) or any registered dataset whose items
    carry ``text``. Evaluation batches hold every caption of each image
    (:class:`data.pairs.PairEvalCollate`)."""

    def dataset(self, cfg, split):
        from data.pairs import CsvOptions, build_pairs, is_pair_spec

        if is_pair_spec(cfg.data):
            return build_pairs(cfg.data, split, image_size=cfg.image_size or None, seed=cfg.seed,
                               csv_options=CsvOptions(cfg.csv.img_key, cfg.csv.caption_key, cfg.csv.separator),
                               holdout=cfg.holdout)
        return super().dataset(cfg, split)

    def eval_loader(self, cfg, info, ds):
        from data.pairs import pair_eval_loader

        return pair_eval_loader(ds, image_size(cfg, info), self.tokenizer(cfg))

    def tokenizer(self, cfg: RunConfig):
        return data_lib.create_tokenizer(cfg.tokenizer.name, cfg.tokenizer.context_length)

    def tower_sizes(self, cfg, info):
        tok = self.tokenizer(cfg)
        return {"image": image_sizes(cfg, info),
                "text": {"vocab_size": tok.vocab_size, "context_length": tok.context_length,
                         "pad_id": tok.pad_id, "eot_id": tok.eot_id}}

    def collate(self, cfg, objective, info, rank, world):
        augment = None
        if cfg.aug.views:
            if cfg.aug.views != "light":
                raise ConfigError(f"aug.views={cfg.aug.views}: image-text pairs take aug.views=light (random resized "
                                  f"crop and flips) or no augmentation (aug.views='')")
            spec = data_lib.view_specs("light", image_size(cfg, info), crop_scale=cfg.aug.crop_scale,
                                       color=info.color, flip=info.flip)[0]
            augment = data_lib.ViewAugment(spec, info.mean, info.std)
        return data_lib.PairCollate(image_size(cfg, info), info.mean, info.std, self.tokenizer(cfg), augment=augment,
                                    seed=cfg.seed, rank=rank, world_size=world, batch_size=cfg.batch_size)


@SCHEMAS.register("embedded_pairs")
class EmbeddedPairsSchema(BatchSchema):
    """Frozen image embeddings (an embeddings directory, ``data=EMB_DIR``) paired by id with the
    embeddings of their captions (:class:`eval_probes.search.align.CaptionedEmbeddings`). The
    objective's config names the captions file (``captions``), the text encoder
    (``text_encoder``) and the held-out fraction (``val_fraction``); the splits are ``train`` and
    ``val``; the training epochs' orders continue the generator that drew the split
    (:meth:`~eval_probes.search.align.CaptionedEmbeddings.shuffle_generator`). No tower is built:
    the objective's heads are its whole model."""

    def dataset(self, cfg, split):
        from eval_probes.search.align import CaptionedEmbeddings

        ocfg = cfg.objective_config
        for key in ("captions", "text_encoder", "val_fraction"):
            if not hasattr(ocfg, key):
                raise ConfigError(f"objective '{cfg.objective}' trains on embedded pairs but its config has no "
                                  f"'{key}' (the '{cfg.objective}.{key}' key the embedded_pairs schema reads)")
        if not ocfg.captions:
            raise ConfigError(f"config key '{cfg.objective}.captions': expected a captions file (CAPTIONS.jsonl)")
        return CaptionedEmbeddings(cfg.data, ocfg.captions, split, ocfg.val_fraction, cfg.seed, ocfg.text_encoder)

    def eval_loader(self, cfg, info, ds):
        from torch.utils.data import DataLoader

        return DataLoader(ds, batch_size=1024, shuffle=False, generator=data_lib.own_generator())

    def tower_sizes(self, cfg, info):
        return {}

    def collate(self, cfg, objective, info, rank, world):
        from torch.utils.data import default_collate

        def collate(items):
            step = items[0].pop("step", -1) if items else -1
            for it in items[1:]:
                it.pop("step", None)
            batch = default_collate(items)
            batch.update(step=step, skipped=[])
            return batch

        return collate


@SCHEMAS.register("clips")
class ClipsSchema(BatchSchema):
    """Audio-video-text clips (:mod:`data.clips`: ``moving_digits``, ``tuxpaint_clips``,
    ``clips:MANIFEST.jsonl``): ``{"video" [B, 3, T, H, W] normalised, "audio" [B, S] waveform,
    "text" [B, K, L] ids of up to ``clips.max_captions`` captions, "text_mask" [B, K], "label",
    "index"}``. ``clips.frames`` frames of ``image_size`` pixels (0: 32), audio at
    ``clips.sample_rate`` Hz cropped or padded to ``clips.audio_seconds``; evaluation batches hold
    every clip of the split in order."""

    image_batches = False

    def dataset(self, cfg, split):
        from data.clips import build_clips

        return build_clips(cfg.data, split, image_size=cfg.image_size or 32, frames=cfg.clips.frames,
                           sample_rate=cfg.clips.sample_rate, audio_samples=audio_samples(cfg),
                           clips_per_item=cfg.clips.per_item or None, seed=cfg.seed)

    def eval_loader(self, cfg, info, ds):
        from data.clips import clip_eval_loader

        return clip_eval_loader(ds, self.tokenizer(cfg), max_captions=cfg.clips.max_captions)

    def tokenizer(self, cfg: RunConfig):
        return data_lib.create_tokenizer(cfg.tokenizer.name, cfg.tokenizer.context_length)

    def tower_sizes(self, cfg, info):
        tok = self.tokenizer(cfg)
        return {"video": {"in_chans": info.channels, "image_size": image_size(cfg, info),
                          "frames": info.extra["frames"], "audio_samples": info.extra["audio_samples"],
                          "sample_rate": info.extra["sample_rate"],
                          "vocab_size": tok.vocab_size, "context_length": tok.context_length, "pad_id": tok.pad_id}}

    def collate(self, cfg, objective, info, rank, world):
        from data.clips import ClipCollate

        return ClipCollate(self.tokenizer(cfg), info.mean, info.std, max_captions=cfg.clips.max_captions,
                           seed=cfg.seed, rank=rank, world_size=world)


def audio_samples(cfg: RunConfig) -> int:
    """Samples of a clip's waveform: ``clips.audio_seconds`` at ``clips.sample_rate``."""
    return max(1, round(cfg.clips.audio_seconds * cfg.clips.sample_rate))


def schema_of(objective) -> BatchSchema:
    """The schema instance an objective declares (``objective.batch``)."""
    return SCHEMAS.get(objective.batch)()
