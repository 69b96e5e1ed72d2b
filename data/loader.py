"""Loaders: a resumable, rank-sharded step sampler and collate functions that build batch dicts.

Batches are dicts whose schema the objective declares (see :mod:`pretrain.batches`):
``views`` batches are ``{"views": [view_1, view_2, ...], "label", "index", "skipped"}``, ``pairs``
batches ``{"image", "text" (token ids), "label", "index", "skipped"}``; evaluation batches are
``{"image", "label", "index", "skipped"}``. Every batch carries ``index``, so
:func:`batch_len` answers its number of samples whatever the schema. ``skipped`` lists the files
that could not be read (the run counts them and names them once).

Randomness is a function of ``(seed, step)`` only: the order of samples comes from a per-epoch
permutation, and the augmentation generator is seeded from the step number carried with the
batch. Every rank draws the augmentation parameters of the whole global batch and keeps its own
slice. A run resumed at step k therefore sees exactly the batches and views that an
uninterrupted run sees, whatever the number of loader workers, and N ranks with micro-batch B
see exactly the views that one process with batch N*B sees.
"""
from __future__ import annotations

import warnings
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .augment import ViewAugment, eval_transform
from .datasets import DataError


class StepBatchSampler(Sampler):
    """Yields ``[(step, index), ...]`` batches forever, from ``start_step`` on.

    Epoch e uses ``randperm(n)`` seeded with ``seed + e``, or, with ``epoch_generator``, the e-th
    successive ``randperm(n)`` drawn from a copy of that generator (a dataset that was split with a
    generator can go on shuffling with it). Each global batch of ``batch_size * world_size``
    indices is cut into per-rank slices (rank r takes the r-th). Incomplete last batches of an
    epoch are dropped.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1, start_step: int = 0,
                 epoch_generator: torch.Generator | None = None):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size, self.start_step = rank, world_size, start_step
        self.global_batch = batch_size * world_size
        self.steps_per_epoch = n // self.global_batch
        self.epoch_state = epoch_generator.get_state() if epoch_generator is not None else None
        if self.steps_per_epoch == 0:
            raise DataError(f"batch_size {batch_size} x {world_size} data-parallel rank(s) is larger than the dataset "
                            f"({n} samples)")

    def _perms(self, first_epoch: int) -> Iterator[torch.Tensor]:
        """The orders of epochs ``first_epoch, first_epoch + 1, ...``."""
        if self.epoch_state is None:
            epoch = first_epoch
            while True:
                yield torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
                epoch += 1
        g = torch.Generator()
        g.set_state(self.epoch_state)
        for _ in range(first_epoch):  # replay the epochs before a resume
            torch.randperm(self.n, generator=g)
        while True:
            yield torch.randperm(self.n, generator=g)

    def __iter__(self) -> Iterator[list]:
        step = self.start_step
        epoch, k = divmod(step, self.steps_per_epoch)
        for perm in self._perms(epoch):
            while k < self.steps_per_epoch:
                lo = k * self.global_batch + self.rank * self.batch_size
                yield [(step, int(i)) for i in perm[lo:lo + self.batch_size]]
                step += 1
                k += 1
            k = 0

    def __len__(self) -> int:  # infinite; a large number keeps DataLoader happy
        return 2**62


class _StepKeyed(Dataset):
    """Accepts ``(step, index)`` keys and adds the step to the item."""

    def __init__(self, ds: Dataset):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, key):
        step, i = key if isinstance(key, tuple) else (-1, key)
        item = self.ds[i]
        item["step"] = step
        return item


def _split_items(items: Sequence[dict]):
    good = [it for it in items if "skip" not in it]
    skipped = [(it["skip"], it.get("reason", "")) for it in items if "skip" in it]
    return good, skipped


class ViewCollate:
    """Collate for training: stack the images, then draw each view with its own augmentation."""

    def __init__(self, augments: Sequence[ViewAugment], seed: int = 0, rank: int = 0, world_size: int = 1,
                 batch_size: int | None = None):
        self.augments, self.seed, self.rank, self.world_size = list(augments), seed, rank, world_size
        self.batch_size = batch_size

    def __call__(self, items: Sequence[dict]) -> dict:
        good, skipped = _split_items(items)
        step = items[0].get("step", -1)
        if not good:
            return {"views": [], "label": torch.empty(0, dtype=torch.long), "index": torch.empty(0, dtype=torch.long),
                    "skipped": skipped, "step": step}
        images = torch.stack([it["image"] for it in good])
        # one reproducible stream per (seed, step), shared by all ranks; each keeps its slice
        bs = self.batch_size or len(items)
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + step) % (2**63))
        views = [aug(images, g, offset=self.rank * bs, total=bs * self.world_size) for aug in self.augments]
        return {"views": views,
                "label": torch.tensor([it["label"] for it in good]),
                "index": torch.tensor([it["index"] for it in good]),
                "skipped": skipped, "step": step}


class EvalCollate:
    """Collate for evaluation: resize and normalise only."""

    def __init__(self, size: int, mean, std):
        self.size, self.mean, self.std = size, mean, std

    def __call__(self, items: Sequence[dict]) -> dict:
        good, skipped = _split_items(items)
        if not good:
            return {"image": torch.empty(0), "label": torch.empty(0, dtype=torch.long),
                    "index": torch.empty(0, dtype=torch.long), "skipped": skipped}
        images = torch.stack([it["image"] for it in good])
        return {"image": eval_transform(images, self.size, self.mean, self.std),
                "label": torch.tensor([it["label"] for it in good]),
                "index": torch.tensor([it["index"] for it in good]),
                "skipped": skipped}


class PairCollate:
    """Collate for image-text pairs: images resized and normalised (``augment``: an optional
    :class:`ViewAugment` drawn per (seed, step) like a view), captions tokenized to ids.

    Items must carry ``text``: a caption, or a list of captions of which each step uses one, drawn
    from ``(seed, step, index)`` only (the same on any number of ranks and after a resume).
    """

    def __init__(self, size: int, mean, std, tokenizer, augment: ViewAugment | None = None, seed: int = 0,
                 rank: int = 0, world_size: int = 1, batch_size: int | None = None):
        self.size, self.mean, self.std, self.tokenizer, self.augment = size, mean, std, tokenizer, augment
        self.seed, self.rank, self.world_size, self.batch_size = seed, rank, world_size, batch_size

    def __call__(self, items: Sequence[dict]) -> dict:
        good, skipped = _split_items(items)
        step = items[0].get("step", -1)
        missing = [it.get("path", it.get("index")) for it in good if not it.get("text")]
        if missing:
            raise DataError(f"image-text batch: item {missing[0]!r} has no caption ('text'); this dataset does not "
                            f"hold image-text pairs")
        ctx = self.tokenizer.context_length
        if not good:
            return {"image": torch.empty(0), "text": torch.empty(0, ctx, dtype=torch.long),
                    "label": torch.empty(0, dtype=torch.long), "index": torch.empty(0, dtype=torch.long),
                    "skipped": skipped, "step": step}
        images = torch.stack([it["image"] for it in good])
        if self.augment is not None:
            bs = self.batch_size or len(items)
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + step) % (2**63))
            image = self.augment(images, g, offset=self.rank * bs, total=bs * self.world_size)
        else:
            image = eval_transform(images, self.size, self.mean, self.std)
        texts = [self.pick(it["text"], step, it["index"]) for it in good]
        return {"image": image, "text": self.tokenizer(texts),
                "label": torch.tensor([it.get("label", -1) for it in good]),
                "index": torch.tensor([it["index"] for it in good]),
                "skipped": skipped, "step": step}


    def pick(self, text, step: int, index: int) -> str:
        if isinstance(text, str) or len(text) == 1:
            return text if isinstance(text, str) else text[0]
        return text[int(np.random.default_rng([self.seed, max(step, 0), index]).integers(len(text)))]


def batch_len(batch: dict) -> int:
    """Number of (readable) samples in a batch built by this package, whatever its schema."""
    return int(batch["index"].shape[0])


def step_loader(ds: Dataset, batch_size: int, collate, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                start_step: int = 0, num_workers: int = 0, epoch_generator: torch.Generator | None = None) -> DataLoader:
    """An endless, resumable loader of this rank's slice of each global batch, collated by ``collate``
    (any of this module's collates, or an objective's own); ``epoch_generator``: see
    :class:`StepBatchSampler` (default: ``ds.shuffle_generator()`` where the dataset has one, e.g.
    a dataset split with a generator that goes on shuffling with it)."""
    if epoch_generator is None and hasattr(ds, "shuffle_generator"):
        epoch_generator = ds.shuffle_generator()
    sampler = StepBatchSampler(len(ds), batch_size, seed, rank, world_size, start_step, epoch_generator)
    return DataLoader(_StepKeyed(ds), batch_sampler=sampler, collate_fn=collate,
                      num_workers=num_workers, persistent_workers=num_workers > 0, generator=own_generator(seed))


def own_generator(seed: int = 0) -> torch.Generator:
    """A generator for a DataLoader's base seed. Without one, starting to iterate a DataLoader draws
    from torch's global RNG, so a resumed run (which starts iterating after restoring that RNG)
    would see other dropout masks than the uninterrupted run; the loaders of this package never
    touch the global RNG (their randomness is keyed by seed and step)."""
    return torch.Generator().manual_seed(int(seed))


def train_loader(ds: Dataset, batch_size: int, augments: Sequence[ViewAugment], *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, start_step: int = 0, num_workers: int = 0) -> DataLoader:
    """An endless loader of augmented multi-view batches (see module docstring)."""
    return step_loader(ds, batch_size, ViewCollate(augments, seed, rank, world_size, batch_size), seed=seed,
                       rank=rank, world_size=world_size, start_step=start_step, num_workers=num_workers)


class ZippedLoader:
    """Batches of ``main``, each with the next batch of every other stream under that stream's name.

    ``ZippedLoader(unlabelled, labelled=labelled_loader)`` yields ``{**unlabelled batch, "labelled":
    labelled batch}``; the files a stream could not read are added to the batch's ``skipped``. Each
    stream keeps its own (seed, step) randomness, so resuming every stream at the same step gives
    the batches an uninterrupted run sees.
    """

    def __init__(self, main, **streams):
        self.main, self.streams = main, streams

    def __iter__(self) -> Iterator[dict]:
        its = {name: iter(loader) for name, loader in self.streams.items()}
        for batch in self.main:
            batch = dict(batch)
            for name, it in its.items():
                other = next(it)
                batch[name] = other
                batch["skipped"] = list(batch.get("skipped", [])) + list(other.get("skipped", []))
            yield batch


def eval_loader(ds: Dataset, size: int, batch_size: int = 512, num_workers: int = 0) -> DataLoader:
    """A single ordered pass over a dataset, for features and probes."""
    info = ds.info
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=EvalCollate(size, info.mean, info.std), generator=own_generator())


class SkipCounter:
    """Counts unreadable or unusable files (a corrupt image, a silent recording) seen in batches and
    warns once per file, naming it and the reason."""

    def __init__(self):
        self.files: dict[str, str] = {}

    def record(self, skipped) -> None:
        """Count ``(path, reason)`` pairs already reported (e.g. by a dataset when it was built)."""
        for path, reason in skipped:
            self.files.setdefault(path, reason)

    def update(self, batch: dict) -> None:
        for path, reason in batch.get("skipped", ()):
            if path not in self.files:
                self.files[path] = reason
                warnings.warn(f"skipping unreadable or unusable file '{path}' ({reason})", stacklevel=2)

    @property
    def count(self) -> int:
        return len(self.files)
