"""Frozen-feature extraction and input checks shared by the probes.

The probes in this package never see a training objective. They consume a
frozen ``embed(batch) -> Tensor`` callable, turn a data loader into cached
NumPy arrays with :func:`extract_features`, and fit cheap classifiers on top.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Optional, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

__all__ = ["extract_features", "as_feature_array", "as_label_array", "check_probe_inputs"]


def _to_numpy(value: Any) -> np.ndarray:
    """Converts a tensor, array or sequence to a NumPy array (no copy if possible)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def extract_features(
    embed: Callable[[Mapping[str, Any]], torch.Tensor],
    loader: Iterable[Mapping[str, Any]],
    desc: str = "features",
    progress: bool = True,
    max_batches: Optional[int] = None,
) -> Tuple[np.ndarray, np.ndarray]:
    """Runs a frozen embedding function over a loader and caches the outputs.

    Every batch is passed unchanged to ``embed`` under :func:`torch.no_grad`,
    so ``embed`` may read any key it needs (usually ``"image"``). Putting a
    model into eval mode and moving inputs to its device is the caller's job
    (it belongs inside ``embed``).

    Args:
        embed: Callable mapping a dict batch to a ``[B, D]`` tensor.
        loader: Iterable of dict batches with keys ``"image"`` (float tensor
            ``[B, C, H, W]``) and ``"label"`` (integer tensor ``[B]``), e.g. a
            :class:`torch.utils.data.DataLoader` over a dict-returning dataset.
        desc: Label of the progress bar.
        progress: Whether to show a tqdm progress bar.
        max_batches: If given, stop after this many batches (useful for smoke
            tests and quick evaluations).

    Returns:
        A pair ``(feats, labels)`` where ``feats`` is a float32 array of shape
        ``[N, D]`` and ``labels`` an int64 array of shape ``[N]``, both in
        loader order.

    Raises:
        ValueError: If a batch lacks ``"label"``, if ``embed`` does not return
            a 2-D output with one row per label, if the feature width changes
            between batches, if ``max_batches`` is not positive, or if the
            loader yields no batches.
    """
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be a positive integer or None, got {max_batches!r}")

    total = None
    try:
        total = len(loader)  # type: ignore[arg-type]
    except TypeError:
        pass
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)

    feats_chunks = []
    label_chunks = []
    width = None
    with torch.no_grad():
        bar = tqdm(loader, desc=desc, total=total, disable=not progress, leave=False)
        try:
            for step, batch in enumerate(bar):
                if max_batches is not None and step >= max_batches:
                    break
                if not isinstance(batch, Mapping) or "label" not in batch:
                    keys = list(batch.keys()) if isinstance(batch, Mapping) else type(batch).__name__
                    raise ValueError(
                        f"extract_features expects dict batches with keys 'image' and 'label'; "
                        f"batch {step} has {keys}"
                    )
                labels = _to_numpy(batch["label"]).reshape(-1)
                out = _to_numpy(embed(batch))
                if out.ndim != 2 or out.shape[0] != labels.shape[0]:
                    raise ValueError(
                        f"embed(batch) must return a [B, D] tensor with B={labels.shape[0]} "
                        f"(the number of labels); batch {step} gave shape {tuple(out.shape)}"
                    )
                if width is None:
                    width = out.shape[1]
                elif out.shape[1] != width:
                    raise ValueError(
                        f"embed(batch) changed feature width from {width} to {out.shape[1]} "
                        f"at batch {step}"
                    )
                feats_chunks.append(out.astype(np.float32, copy=False))
                label_chunks.append(labels.astype(np.int64, copy=False))
        finally:
            bar.close()

    if not feats_chunks:
        raise ValueError("extract_features: the loader yielded no batches")
    feats = np.ascontiguousarray(np.concatenate(feats_chunks, axis=0), dtype=np.float32)
    labels = np.ascontiguousarray(np.concatenate(label_chunks, axis=0), dtype=np.int64)
    return feats, labels


def as_feature_array(x: Any, name: str) -> np.ndarray:
    """Converts features to a finite float32 ``[N, D]`` array.

    Args:
        x: Array-like or tensor of features.
        name: Name used in error messages (e.g. ``"train_x"``).

    Returns:
        A C-contiguous float32 array of shape ``[N, D]``.

    Raises:
        ValueError: If ``x`` is not 2-D, is empty, or contains NaN/inf.
    """
    arr = _to_numpy(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [N, D] feature array, got shape {tuple(arr.shape)}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(arr.shape)}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    finite = np.isfinite(arr)
    if not finite.all():
        bad_rows = np.flatnonzero(~finite.all(axis=1))
        raise ValueError(
            f"{name} contains NaN or inf values in {bad_rows.size} row(s) "
            f"(first offending rows: {bad_rows[:5].tolist()})"
        )
    return arr


def as_label_array(y: Any, name: str) -> np.ndarray:
    """Converts labels to a non-negative int64 ``[N]`` array.

    Args:
        y: Array-like or tensor of integer class labels.
        name: Name used in error messages (e.g. ``"train_y"``).

    Returns:
        A C-contiguous int64 array of shape ``[N]``.

    Raises:
        ValueError: If ``y`` is not 1-D, holds non-integer values, or holds
            negative labels.
    """
    arr = _to_numpy(y)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D [N] label array, got shape {tuple(arr.shape)}")
    if arr.dtype.kind not in "iub":
        if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            pass  # integral floats are accepted
        else:
            raise ValueError(f"{name} must hold integer class labels, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.int64)
    if arr.size and arr.min() < 0:
        raise ValueError(f"{name} must hold non-negative class labels, found {int(arr.min())}")
    return arr


def check_probe_inputs(
    train_x: Any, train_y: Any, test_x: Any, test_y: Any
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Validates and converts the four arrays every probe consumes.

    Args:
        train_x: Train features ``[N_train, D]``.
        train_y: Train labels ``[N_train]``.
        test_x: Test features ``[N_test, D]``.
        test_y: Test labels ``[N_test]``.

    Returns:
        ``(train_x, train_y, test_x, test_y)`` as float32 / int64 arrays.

    Raises:
        ValueError: If a shape is wrong or inconsistent (the message names the
            arrays and their shapes), or if features contain NaN/inf.
    """
    train_x = as_feature_array(train_x, "train_x")
    test_x = as_feature_array(test_x, "test_x")
    train_y = as_label_array(train_y, "train_y")
    test_y = as_label_array(test_y, "test_y")
    if train_x.shape[0] != train_y.shape[0]:
        raise ValueError(
            f"train_x and train_y disagree on the number of samples: "
            f"train_x has shape {tuple(train_x.shape)}, train_y has shape {tuple(train_y.shape)}"
        )
    if test_x.shape[0] != test_y.shape[0]:
        raise ValueError(
            f"test_x and test_y disagree on the number of samples: "
            f"test_x has shape {tuple(test_x.shape)}, test_y has shape {tuple(test_y.shape)}"
        )
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(
            f"train_x and test_x disagree on the feature dimension: "
            f"train_x has shape {tuple(train_x.shape)}, test_x has shape {tuple(test_x.shape)}"
        )
    return train_x, train_y, test_x, test_y
