"""Linear probe on frozen features with a one-pass hyper-parameter grid.

Following DINOv2's linear evaluation, features are extracted once and cached,
and *all* candidate classifiers of the (learning rate, weight decay) grid are
trained together in a single pass over the mini-batches:

* the ``G = len(lrs) * len(weight_decays)`` heads share one weight tensor
  ``W`` of shape ``[G, D, C]`` and one bias ``b`` of shape ``[G, C]``;
* logits for a batch are ``einsum("bd,gdc->gbc", x, W) + b[:, None]``;
* the loss is the *sum* over heads of each head's mean cross-entropy. Heads do
  not share parameters, so the gradient of the sum w.r.t. head ``g`` is
  exactly the gradient of head ``g``'s own loss;
* the optimiser (AdamW by default, or SGD with momentum) is applied with a
  per-head learning rate and weight decay held in ``[G, 1, 1]`` tensors, with
  the same element-wise update rule as :class:`torch.optim.AdamW` /
  :class:`torch.optim.SGD`, so each head follows exactly the trajectory it
  would follow if it were trained alone on the same batches.

A stratified validation split of the training set selects the best
configuration, which is then retrained on the full training set and evaluated
on the test set.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .features import check_probe_inputs

__all__ = ["linear_probe", "train_linear_heads", "stratified_split", "predict_linear_heads"]

_OPTIMIZERS = ("adamw", "sgd")


def stratified_split(
    labels: np.ndarray, val_fraction: float, seed: int
) -> Tuple[np.ndarray, np.ndarray]:
    """Splits sample indices into fit/validation parts, class by class.

    For every class present in ``labels`` with ``n_c`` samples,
    ``round(val_fraction * n_c)`` of them (clamped to ``[1, n_c - 1]``) go to
    the validation part, chosen by a permutation drawn from
    ``numpy.random.default_rng(seed)``. The split is therefore deterministic
    for a given seed, and every class appears in both parts.

    Args:
        labels: int64 array ``[N]`` of class labels.
        val_fraction: Fraction of each class to hold out, in ``(0, 1)``.
        seed: Seed of the permutation.

    Returns:
        ``(fit_idx, val_idx)``: sorted int64 index arrays.

    Raises:
        ValueError: If ``val_fraction`` is outside ``(0, 1)`` or a class has
            fewer than 2 samples (it could not appear in both parts).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    classes, counts = np.unique(labels, return_counts=True)
    too_few = classes[counts < 2]
    if too_few.size:
        detail = ", ".join(
            f"class {int(c)}: {int(n)}" for c, n in zip(classes[counts < 2][:10], counts[counts < 2][:10])
        )
        raise ValueError(
            f"stratified validation split needs at least 2 train samples per class "
            f"(one to fit, one to validate); {too_few.size} class(es) have fewer ({detail})"
        )
    rng = np.random.default_rng(seed)
    fit_parts: List[np.ndarray] = []
    val_parts: List[np.ndarray] = []
    for cls, count in zip(classes, counts):
        idx = np.flatnonzero(labels == cls)
        idx = idx[rng.permutation(idx.size)]
        n_val = int(min(max(round(val_fraction * count), 1), count - 1))
        val_parts.append(idx[:n_val])
        fit_parts.append(idx[n_val:])
    fit_idx = np.sort(np.concatenate(fit_parts)).astype(np.int64)
    val_idx = np.sort(np.concatenate(val_parts)).astype(np.int64)
    return fit_idx, val_idx


def _standardizer(x: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Returns per-feature mean and std of ``x`` (std of constant features -> 1)."""
    mean = x.mean(axis=0, dtype=np.float64)
    std = x.std(axis=0, dtype=np.float64)
    std = np.where(std < 1e-8, 1.0, std)
    return mean.astype(np.float32), std.astype(np.float32)


def _cosine_factor(step: int, total_steps: int) -> float:
    """Cosine decay multiplier ``0.5 * (1 + cos(pi * step / total_steps))``."""
    return 0.5 * (1.0 + math.cos(math.pi * step / total_steps))


def train_linear_heads(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    lrs: Sequence[float],
    weight_decays: Sequence[float],
    *,
    epochs: int = 100,
    batch_size: Optional[int] = 256,
    seed: int = 0,
    optimizer: str = "adamw",
    momentum: float = 0.9,
    betas: Tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    progress: bool = False,
    desc: str = "linear heads",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Trains ``G`` independent softmax-regression heads in one pass.

    Head ``g`` uses learning rate ``lrs[g]`` and weight decay
    ``weight_decays[g]`` (the two sequences are paired, not crossed). All
    heads start from zero, see the same shuffled mini-batches (drawn from a
    :class:`torch.Generator` seeded with ``seed``; the last, smaller batch of
    an epoch is kept) and follow a per-step cosine learning-rate decay from
    the base rate to zero over ``epochs``. Weight decay applies to the weights
    only, not to the biases.

    The update is the element-wise rule of :class:`torch.optim.AdamW`
    (decoupled decay) or :class:`torch.optim.SGD` (momentum, L2 decay added to
    the gradient, no dampening, no Nesterov), evaluated with per-head
    ``[G, 1, 1]`` rate tensors. Because the heads share no parameters, head
    ``g`` ends with the same weights as if it were trained alone.

    Args:
        x: float32 features ``[N, D]`` (already standardised if desired).
        y: int64 labels ``[N]`` in ``[0, num_classes)``.
        num_classes: Number of output classes ``C``.
        lrs: Per-head base learning rates, length ``G``.
        weight_decays: Per-head weight decays, length ``G``.
        epochs: Number of passes over ``x``.
        batch_size: Mini-batch size; ``None`` or ``>= N`` means full batch.
        seed: Seed of the batch shuffling.
        optimizer: ``"adamw"`` or ``"sgd"``.
        momentum: SGD momentum (ignored by AdamW).
        betas: AdamW moment coefficients (ignored by SGD).
        eps: AdamW denominator epsilon (ignored by SGD).
        progress: Whether to show a tqdm bar over epochs.
        desc: Label of the progress bar.

    Returns:
        ``(W, b)``: detached weights ``[G, D, C]`` and biases ``[G, C]``.

    Raises:
        ValueError: On mismatched per-head sequences, an unknown optimiser or
            non-positive ``epochs`` / ``batch_size``.
    """
    if len(lrs) != len(weight_decays) or len(lrs) == 0:
        raise ValueError(
            f"lrs and weight_decays must be non-empty and of equal length (one entry per head), "
            f"got {len(lrs)} and {len(weight_decays)}"
        )
    optimizer = optimizer.lower()
    if optimizer not in _OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {_OPTIMIZERS}, got {optimizer!r}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs!r}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 or None, got {batch_size!r}")

    n, dim = x.shape
    heads = len(lrs)
    device = x.device
    bs = n if batch_size is None else min(int(batch_size), n)
    steps_per_epoch = math.ceil(n / bs)
    total_steps = epochs * steps_per_epoch

    base_lr = torch.tensor(list(lrs), dtype=torch.float32, device=device)
    wd = torch.tensor(list(weight_decays), dtype=torch.float32, device=device)

    weight = torch.zeros(heads, dim, num_classes, dtype=torch.float32, device=device, requires_grad=True)
    bias = torch.zeros(heads, num_classes, dtype=torch.float32, device=device, requires_grad=True)
    params = (weight, bias)
    decays = (wd, torch.zeros_like(wd))  # no decay on biases
    buf1 = [torch.zeros_like(p) for p in params]  # AdamW exp_avg / SGD momentum buffer
    buf2 = [torch.zeros_like(p) for p in params]  # AdamW exp_avg_sq
    beta1, beta2 = betas

    gen = torch.Generator().manual_seed(int(seed))
    step = 0
    for _ in tqdm(range(epochs), desc=desc, disable=not progress, leave=False):
        perm = torch.randperm(n, generator=gen).to(device)
        for start in range(0, n, bs):
            idx = perm[start : start + bs]
            xb, yb = x[idx], y[idx]
            logits = torch.einsum("bd,gdc->gbc", xb, weight) + bias[:, None, :]
            per_sample = F.cross_entropy(
                logits.reshape(-1, num_classes), yb.repeat(heads), reduction="none"
            )
            loss = per_sample.view(heads, -1).mean(dim=1).sum()
            grads = torch.autograd.grad(loss, params)

            lr_t = base_lr * _cosine_factor(step, total_steps)  # [G]
            step += 1
            with torch.no_grad():
                for p, g, d, m1, m2 in zip(params, grads, decays, buf1, buf2):
                    shape = (heads,) + (1,) * (p.dim() - 1)
                    lr_g = lr_t.view(shape)
                    d_g = d.view(shape)
                    if optimizer == "adamw":
                        p.mul_(1.0 - lr_g * d_g)
                        m1.lerp_(g, 1.0 - beta1)
                        m2.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
                        bc1 = 1.0 - beta1**step
                        bc2_sqrt = math.sqrt(1.0 - beta2**step)
                        denom = (m2.sqrt() / bc2_sqrt).add_(eps)
                        p.sub_((lr_g / bc1) * (m1 / denom))
                    else:
                        g = g + d_g * p
                        if step == 1:
                            m1.copy_(g)
                        else:
                            m1.mul_(momentum).add_(g)
                        p.sub_(lr_g * m1)
    return weight.detach(), bias.detach()


def predict_linear_heads(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, chunk_size: int = 8192
) -> torch.Tensor:
    """Returns the argmax class of every head for every sample.

    Args:
        x: float32 features ``[N, D]``.
        weight: Head weights ``[G, D, C]``.
        bias: Head biases ``[G, C]``.
        chunk_size: Samples per forward chunk (bounds memory).

    Returns:
        int64 tensor ``[G, N]`` of predicted classes.
    """
    preds = []
    with torch.no_grad():
        for start in range(0, x.shape[0], chunk_size):
            xb = x[start : start + chunk_size]
            logits = torch.einsum("bd,gdc->gbc", xb, weight) + bias[:, None, :]
            preds.append(logits.argmax(dim=-1))
    return torch.cat(preds, dim=1)


def linear_probe(
    train_x: Any,
    train_y: Any,
    test_x: Any,
    test_y: Any,
    *,
    lrs: Sequence[float] = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
    weight_decays: Sequence[float] = (0.0, 1e-4, 1e-3),
    epochs: int = 100,
    batch_size: Optional[int] = 256,
    val_fraction: float = 0.1,
    seed: int = 0,
    standardize: bool = True,
    progress: bool = False,
    optimizer: str = "adamw",
    device: Optional[torch.device | str] = None,
) -> Dict[str, Any]:
    """Linear-probe accuracy of frozen features, with a validated grid search.

    Steps:
      1. Validate the arrays; ``num_classes`` is ``max(train_y, test_y) + 1``.
      2. Split the training set into fit/validation parts, stratified by
         class (see :func:`stratified_split`).
      3. If ``standardize``, normalise features with the mean/std of the fit
         part.
      4. Train every (lr, weight decay) pair of the grid at once with
         :func:`train_linear_heads` and score each head on the validation
         part. The best validation accuracy wins; ties go to the earliest
         grid entry (lrs outer, weight decays inner).
      5. Retrain the selected configuration on the full training set
         (standardised with full-train statistics) and report its test
         accuracy.

    The result is deterministic for a given ``seed`` (split, shuffling and
    zero initialisation are all fixed).

    Args:
        train_x: Train features ``[N_train, D]`` (array or tensor).
        train_y: Integer train labels ``[N_train]``.
        test_x: Test features ``[N_test, D]``.
        test_y: Integer test labels ``[N_test]``.
        lrs: Candidate base learning rates.
        weight_decays: Candidate weight decays.
        epochs: Training epochs (for the search and for the final retrain).
        batch_size: Mini-batch size; ``None`` means full batch.
        val_fraction: Fraction of each class held out for selection (unused when the grid
            is a single configuration: nothing to select, every train sample is used).
        seed: Seed of the split and of batch shuffling.
        standardize: Whether to z-score features with train statistics.
        progress: Whether to show tqdm bars over epochs.
        optimizer: ``"adamw"`` (default) or ``"sgd"`` (momentum 0.9).
        device: Torch device for training (default CPU).

    Returns:
        A dict with ``test_acc`` (float in ``[0, 1]``), ``val_acc`` (best
        validation accuracy), ``best_lr``, ``best_weight_decay``, ``grid``
        (list of ``{"lr", "weight_decay", "val_acc"}`` in grid order) and
        ``num_classes``.

    Raises:
        ValueError: On inconsistent shapes (the message names the arrays and
            shapes), NaN/inf features, a class with fewer than 2 train samples
            (only when the grid has more than one configuration to choose from),
            or invalid hyper-parameters.
    """
    train_x, train_y, test_x, test_y = check_probe_inputs(train_x, train_y, test_x, test_y)
    lrs = [float(v) for v in lrs]
    weight_decays = [float(v) for v in weight_decays]
    if not lrs or any(not (v > 0 and math.isfinite(v)) for v in lrs):
        raise ValueError(f"lrs must be a non-empty sequence of positive numbers, got {lrs}")
    if not weight_decays or any(not (v >= 0 and math.isfinite(v)) for v in weight_decays):
        raise ValueError(
            f"weight_decays must be a non-empty sequence of non-negative numbers, got {weight_decays}"
        )
    device = torch.device("cpu") if device is None else torch.device(device)
    num_classes = int(max(train_y.max(), test_y.max())) + 1

    def prepare(x_fit: np.ndarray, *others: np.ndarray) -> List[torch.Tensor]:
        arrays = [x_fit, *others]
        if standardize:
            mean, std = _standardizer(x_fit)
            arrays = [(a - mean) / std for a in arrays]
        return [torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(device) for a in arrays]

    common = dict(
        epochs=epochs, batch_size=batch_size, seed=seed, optimizer=optimizer, progress=progress
    )

    # Grid search: every (lr, wd) pair trained at once on the fit split. A grid of one needs no
    # selection, so no validation split either (a class may then have a single train sample).
    grid = [(lr, wd) for lr in lrs for wd in weight_decays]
    if len(grid) == 1:
        val_accs = [float("nan")]
        best_lr, best_wd = grid[0]
        return _final_fit(train_x, train_y, test_x, test_y, num_classes, best_lr, best_wd, prepare, common, device,
                          grid, val_accs)
    fit_idx, val_idx = stratified_split(train_y, val_fraction, seed)
    x_fit, x_val = prepare(train_x[fit_idx], train_x[val_idx])
    y_fit = torch.from_numpy(train_y[fit_idx]).to(device)
    y_val = torch.from_numpy(train_y[val_idx]).to(device)
    weight, bias = train_linear_heads(
        x_fit,
        y_fit,
        num_classes,
        [lr for lr, _ in grid],
        [wd for _, wd in grid],
        desc="linear grid",
        **common,
    )
    val_accs = (predict_linear_heads(x_val, weight, bias) == y_val[None]).float().mean(dim=1)
    val_accs = val_accs.cpu().tolist()
    best = int(np.argmax(val_accs))
    best_lr, best_wd = grid[best]

    return _final_fit(train_x, train_y, test_x, test_y, num_classes, best_lr, best_wd, prepare, common, device,
                      grid, val_accs)


def _final_fit(train_x, train_y, test_x, test_y, num_classes, best_lr, best_wd, prepare, common, device, grid,
               val_accs) -> Dict[str, Any]:
    """Retrain the selected configuration on the full train set and score it on the test set."""
    best = grid.index((best_lr, best_wd))
    x_train, x_test = prepare(train_x, test_x)
    y_train = torch.from_numpy(train_y).to(device)
    y_test = torch.from_numpy(test_y).to(device)
    weight, bias = train_linear_heads(
        x_train, y_train, num_classes, [best_lr], [best_wd], desc="linear final", **common
    )
    test_acc = float((predict_linear_heads(x_test, weight, bias)[0] == y_test).float().mean())

    return {
        "test_acc": test_acc,
        "val_acc": float(val_accs[best]),
        "best_lr": best_lr,
        "best_weight_decay": best_wd,
        "grid": [
            {"lr": lr, "weight_decay": wd, "val_acc": float(acc)}
            for (lr, wd), acc in zip(grid, val_accs)
        ],
        "num_classes": num_classes,
    }
