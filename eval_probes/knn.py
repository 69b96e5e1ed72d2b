"""Weighted k-nearest-neighbour probe on frozen features.

This is the weighted k-NN classifier of Wu et al. (2018), also used by DINO:
features are L2-normalised, the ``k`` training samples with the highest
cosine similarity to a query are retrieved (here with an exact
:class:`faiss.IndexFlatIP`), and each neighbour ``i`` votes for its class with
weight ``exp(s_i / T)``. The predicted class is the argmax of the summed
votes.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import faiss
import numpy as np

from .features import as_feature_array, as_label_array, check_probe_inputs

__all__ = ["knn_predict", "knn_probe"]


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    """Returns a float32 copy of ``x`` with unit-norm rows (zero rows stay zero)."""
    x = np.array(x, dtype=np.float32, copy=True)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x /= np.maximum(norms, 1e-12)
    return np.ascontiguousarray(x)


def knn_predict(
    train_x: Any,
    train_y: Any,
    test_x: Any,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: Optional[int] = None,
    chunk_size: int = 8192,
) -> np.ndarray:
    """Predicts classes with a temperature-weighted cosine k-NN vote.

    Args:
        train_x: Train (memory bank) features ``[N_train, D]``.
        train_y: Integer train labels ``[N_train]``.
        test_x: Query features ``[N_test, D]``.
        k: Number of neighbours; clamped to ``N_train``.
        temperature: Temperature ``T`` of the vote weights ``exp(sim / T)``.
        num_classes: Number of classes; defaults to ``max(train_y) + 1``.
        chunk_size: Queries searched and voted per chunk (bounds memory).

    Returns:
        int64 array ``[N_test]`` of predicted classes. Ties between classes
        go to the smallest class index.

    Raises:
        ValueError: On inconsistent shapes, NaN/inf features, ``k < 1``,
            ``temperature <= 0`` or labels outside ``[0, num_classes)``.

    Note:
        Weights are computed as ``exp((s_i - s_max) / T)`` in float64, where
        ``s_max`` is the query's highest similarity. This rescales all of a
        query's votes by the same positive factor, so the argmax is that of
        ``exp(s_i / T)``, while avoiding overflow at small temperatures.
    """
    train_x = as_feature_array(train_x, "train_x")
    test_x = as_feature_array(test_x, "test_x")
    train_y = as_label_array(train_y, "train_y")
    if train_x.shape[0] != train_y.shape[0]:
        raise ValueError(
            f"train_x and train_y disagree on the number of samples: "
            f"train_x has shape {tuple(train_x.shape)}, train_y has shape {tuple(train_y.shape)}"
        )
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(
            f"train_x and test_x disagree on the feature dimension: "
            f"train_x has shape {tuple(train_x.shape)}, test_x has shape {tuple(test_x.shape)}"
        )
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if num_classes is None:
        num_classes = int(train_y.max()) + 1
    elif int(train_y.max()) >= num_classes:
        raise ValueError(
            f"train_y holds label {int(train_y.max())}, which is >= num_classes={num_classes}"
        )
    k = min(int(k), train_x.shape[0])

    bank = _l2_normalize(train_x)
    queries = _l2_normalize(test_x)
    index = faiss.IndexFlatIP(bank.shape[1])
    index.add(bank)

    preds = np.empty(queries.shape[0], dtype=np.int64)
    for start in range(0, queries.shape[0], chunk_size):
        q = queries[start : start + chunk_size]
        sims, nbrs = index.search(q, k)  # [n, k], sorted by decreasing similarity
        sims = sims.astype(np.float64)
        weights = np.exp((sims - sims.max(axis=1, keepdims=True)) / temperature)
        nbr_labels = train_y[nbrs]
        votes = np.zeros((q.shape[0], num_classes), dtype=np.float64)
        rows = np.arange(q.shape[0])
        for j in range(k):  # each row receives exactly one vote per column j
            votes[rows, nbr_labels[:, j]] += weights[:, j]
        preds[start : start + q.shape[0]] = votes.argmax(axis=1)
    return preds


def knn_probe(
    train_x: Any,
    train_y: Any,
    test_x: Any,
    test_y: Any,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: Optional[int] = None,
) -> Dict[str, Any]:
    """Weighted k-NN accuracy of frozen features.

    Args:
        train_x: Train features ``[N_train, D]``.
        train_y: Integer train labels ``[N_train]``.
        test_x: Test features ``[N_test, D]``.
        test_y: Integer test labels ``[N_test]``.
        k: Number of neighbours (clamped to ``N_train``).
        temperature: Vote temperature ``T`` in ``exp(sim / T)``.
        num_classes: Number of classes; defaults to
            ``max(train_y, test_y) + 1``.

    Returns:
        ``{"test_acc": float in [0, 1], "k": effective k, "temperature": T}``.

    Raises:
        ValueError: On inconsistent shapes (the message names the arrays and
            shapes), NaN/inf features or invalid ``k`` / ``temperature``.
    """
    train_x, train_y, test_x, test_y = check_probe_inputs(train_x, train_y, test_x, test_y)
    if num_classes is None:
        num_classes = int(max(train_y.max(), test_y.max())) + 1
    preds = knn_predict(
        train_x, train_y, test_x, k=k, temperature=temperature, num_classes=num_classes
    )
    return {
        "test_acc": float(np.mean(preds == test_y)),
        "k": min(int(k), train_x.shape[0]),
        "temperature": float(temperature),
    }
