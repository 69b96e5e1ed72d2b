"""Class-balanced labelled subsets of a dataset: the few labels of semi-supervised training.

:func:`labelled_subset` picks, in every class, ``max(1, round(fraction x n_class))`` images with a
generator seeded by the subset seed alone (same labels, fraction and seed: same subset, whatever
the global RNG); :func:`labelled_split` wraps the picked items as a dataset that keeps ``info``.
"""
from __future__ import annotations

import numpy as np
import torch

from .common.config import ConfigError


def check_fraction(value, key: str = "labels") -> float:
    """``value`` as a label fraction in (0, 1], or a ConfigError naming ``key``."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        f = float("nan")
    if not 0.0 < f <= 1.0:
        raise ConfigError(f"{key}: expected a fraction of the train labels in (0, 1], e.g. 0.01, 0.1 or 1.0; "
                          f"got {value!r}")
    return f


def labelled_subset(labels, fraction: float, seed: int = 0) -> np.ndarray:
    """Indices of a class-balanced labelled subset.

    Every class ``c`` with ``n_c`` images keeps ``max(1, round(fraction * n_c))`` of them, drawn
    with a generator seeded by ``seed`` alone (same labels, fraction and seed: same subset).

    Args:
        labels: ``[N]`` integer class labels (tensor, array or list).
        fraction: In (0, 1].
        seed: Subset seed.

    Returns:
        Sorted int64 indices into ``labels``.
    """
    fraction = check_fraction(fraction)
    y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).astype(np.int64)
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        n = min(len(idx), max(1, int(round(fraction * len(idx)))))
        keep.append(idx[rng.permutation(len(idx))[:n]])
    return np.sort(np.concatenate(keep)).astype(np.int64)


class SubsetDataset(torch.utils.data.Dataset):
    """The items ``indices`` of a dataset, keeping its ``info`` (and its labels, as ``labels``)."""

    def __init__(self, ds, indices):
        self.ds, self.indices, self.info = ds, [int(i) for i in indices], ds.info

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return self.ds[self.indices[i]]

    @property
    def labels(self) -> torch.Tensor:
        return dataset_labels(self.ds)[torch.as_tensor(self.indices, dtype=torch.long)]


def dataset_labels(ds) -> torch.Tensor:
    """``[N]`` class labels of a dataset: its ``labels`` where it has them, else read item by item."""
    if hasattr(ds, "labels"):
        return torch.as_tensor(ds.labels)
    return torch.tensor([ds[i]["label"] for i in range(len(ds))])


def labelled_split(ds, fraction: float, seed: int = 0) -> SubsetDataset:
    """The class-balanced labelled subset of ``ds`` (see :func:`labelled_subset`) as a dataset."""
    return SubsetDataset(ds, labelled_subset(dataset_labels(ds), fraction, seed))
