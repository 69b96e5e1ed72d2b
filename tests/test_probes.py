"""Tests of eval_probes: feature extraction, linear probe and weighted k-NN."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from eval_probes import extract_features, knn_predict, knn_probe, linear_probe, run_probes
from eval_probes.linear import stratified_split, train_linear_heads


# --------------------------------------------------------------------------- helpers


def make_blobs(n_train, n_test, dim=16, num_classes=4, spread=0.5, seed=0):
    """Gaussian blobs around well-separated random centres."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(num_classes, dim)) * 3.0

    def draw(n):
        y = np.arange(n) % num_classes
        rng.shuffle(y)
        x = centers[y] + spread * rng.normal(size=(n, dim))
        return x.astype(np.float32), y.astype(np.int64)

    return (*draw(n_train), *draw(n_test))


def naive_knn(train_x, train_y, test_x, k, temperature, num_classes):
    """Reference weighted k-NN: full cosine matrix, argsort, weighted vote."""
    a = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    q = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
    sims = q.astype(np.float64) @ a.astype(np.float64).T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    preds = []
    for i in range(q.shape[0]):
        votes = np.zeros(num_classes)
        for j in order[i]:
            votes[train_y[j]] += math.exp(sims[i, j] / temperature)
        preds.append(int(np.argmax(votes)))
    return np.array(preds)


class DictDataset(Dataset):
    """Tiny dataset of dict samples with an image and an integer label."""

    def __init__(self, images, labels):
        self.images = torch.as_tensor(images, dtype=torch.float32)
        self.labels = torch.as_tensor(labels, dtype=torch.int64)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.labels[i]}


# --------------------------------------------------------------------------- features


def test_extract_features_shapes_dtypes_order_and_no_grad():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(10, 3, 4, 4)).astype(np.float32)
    labels = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3])
    loader = DataLoader(DictDataset(images, labels), batch_size=4, shuffle=False)
    proj = torch.nn.Linear(48, 7)
    grad_flags = []

    def embed(batch):
        grad_flags.append(torch.is_grad_enabled())
        return proj(batch["image"].flatten(1))

    feats, labs = extract_features(embed, loader, progress=False)
    assert feats.shape == (10, 7) and feats.dtype == np.float32
    assert labs.shape == (10,) and labs.dtype == np.int64
    np.testing.assert_array_equal(labs, labels)
    with torch.no_grad():
        expected = proj(torch.from_numpy(images).flatten(1)).numpy()
    np.testing.assert_allclose(feats, expected, rtol=1e-6, atol=1e-6)
    assert grad_flags == [False, False, False]  # 3 batches, all without autograd

    feats2, labs2 = extract_features(embed, loader, progress=True, max_batches=2)
    assert feats2.shape == (8, 7)
    np.testing.assert_array_equal(labs2, labels[:8])


def test_extract_features_rejects_bad_embed_output():
    loader = DataLoader(DictDataset(np.zeros((4, 1, 2, 2)), np.zeros(4)), batch_size=2)
    with pytest.raises(ValueError, match=r"\[B, D\].*B=2"):
        extract_features(lambda b: b["image"].flatten(), loader, progress=False)


# --------------------------------------------------------------------------- linear probe


def test_linear_probe_separable_blobs():
    tx, ty, vx, vy = make_blobs(400, 400)
    res = linear_probe(tx, ty, vx, vy, epochs=20, batch_size=128)
    assert res["test_acc"] > 0.97
    assert res["num_classes"] == 4
    assert len(res["grid"]) == 15
    assert res["val_acc"] == max(g["val_acc"] for g in res["grid"])
    assert (res["best_lr"], res["best_weight_decay"]) in {
        (g["lr"], g["weight_decay"]) for g in res["grid"]
    }


def test_linear_probe_with_one_configuration_needs_no_validation_split():
    """A grid of one (lr, weight decay) has nothing to select: every train sample is fitted, so a
    class may have a single labelled sample (the 1%-label tables)."""
    tx, ty, vx, vy = make_blobs(400, 400)
    one = np.concatenate([np.flatnonzero(ty == c)[:1] for c in range(4)])  # one sample per class
    res = linear_probe(tx[one], ty[one], vx, vy, lrs=(0.01,), weight_decays=(1e-4,), epochs=50)
    assert res["best_lr"] == 0.01 and np.isnan(res["val_acc"]) and len(res["grid"]) == 1
    assert res["test_acc"] > 0.9  # the blobs are far apart: one sample each suffices
    with pytest.raises(ValueError, match=r"at least 2 train samples per class"):
        linear_probe(tx[one], ty[one], vx, vy)  # a grid to choose from still needs the split


def test_linear_probe_random_labels_is_near_chance():
    tx, _, vx, _ = make_blobs(400, 400)
    rng = np.random.default_rng(1)
    ty = rng.integers(0, 4, size=400)
    vy = rng.integers(0, 4, size=400)
    res = linear_probe(tx, ty, vx, vy, epochs=20, batch_size=128)
    assert res["test_acc"] < 0.35


def test_linear_probe_matches_sklearn_on_digits():
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    tx, vx, ty, vy = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    ref = LogisticRegression(max_iter=2000).fit(tx, ty).score(vx, vy)
    res = linear_probe(tx.astype(np.float32), ty, vx.astype(np.float32), vy, epochs=50)
    assert abs(res["test_acc"] - ref) <= 0.03, (res["test_acc"], ref)
    assert res["num_classes"] == 10


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_grid_heads_equal_single_head_training(optimizer):
    """Head g of the one-pass grid ends exactly where head g trained alone ends."""
    tx, ty, _, _ = make_blobs(300, 1, dim=12, num_classes=5, spread=2.0)
    x, y = torch.from_numpy(tx), torch.from_numpy(ty)
    lrs = [1e-3, 1e-2, 1e-1]
    wds = [0.0, 1e-3, 1e-1]
    grid = [(lr, wd) for lr in lrs for wd in wds]
    kw = dict(epochs=6, batch_size=64, seed=3, optimizer=optimizer)
    w_all, b_all = train_linear_heads(x, y, 5, [g[0] for g in grid], [g[1] for g in grid], **kw)
    assert w_all.shape == (9, 12, 5) and b_all.shape == (9, 5)
    for g in (5, 8):  # (1e-2, 1e-1) and (1e-1, 1e-1): decay and lr both matter
        w_one, b_one = train_linear_heads(x, y, 5, [grid[g][0]], [grid[g][1]], **kw)
        torch.testing.assert_close(w_all[g], w_one[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(b_all[g], b_one[0], rtol=0, atol=1e-5)
    # Different configurations really produce different heads.
    assert (w_all[5] - w_all[8]).abs().max() > 1e-3


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_single_head_matches_torch_optimizer(optimizer):
    """The vectorised update is the torch.optim AdamW / SGD rule with cosine decay."""
    tx, ty, _, _ = make_blobs(200, 1, dim=10, num_classes=3, spread=2.0, seed=4)
    x, y = torch.from_numpy(tx), torch.from_numpy(ty)
    lr, wd, epochs, bs, seed = 3e-2, 1e-2, 5, 48, 7
    w_vec, b_vec = train_linear_heads(
        x, y, 3, [lr], [wd], epochs=epochs, batch_size=bs, seed=seed, optimizer=optimizer
    )

    weight = torch.zeros(10, 3, requires_grad=True)
    bias = torch.zeros(3, requires_grad=True)
    groups = [{"params": [weight], "weight_decay": wd}, {"params": [bias], "weight_decay": 0.0}]
    if optimizer == "adamw":
        opt = torch.optim.AdamW(groups, lr=lr, foreach=False)
    else:
        opt = torch.optim.SGD(groups, lr=lr, momentum=0.9, foreach=False)
    gen = torch.Generator().manual_seed(seed)
    total = epochs * math.ceil(200 / bs)
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(200, generator=gen)
        for start in range(0, 200, bs):
            idx = perm[start : start + bs]
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            step += 1
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(x[idx] @ weight + bias, y[idx])
            loss.backward()
            opt.step()
    torch.testing.assert_close(w_vec[0], weight.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(b_vec[0], bias.detach(), rtol=0, atol=1e-5)


def test_linear_probe_is_deterministic_for_a_seed():
    tx, ty, vx, vy = make_blobs(200, 100, spread=3.0, seed=5)
    kw = dict(epochs=5, batch_size=64, lrs=(1e-2, 1e-1), weight_decays=(0.0, 1e-3), seed=11)
    a = linear_probe(tx, ty, vx, vy, **kw)
    b = linear_probe(tx, ty, vx, vy, **kw)
    assert a == b


def test_stratified_split_is_stratified_and_seeded():
    y = np.repeat(np.arange(4), [10, 20, 30, 40])
    fit, val = stratified_split(y, 0.1, seed=0)
    assert np.intersect1d(fit, val).size == 0 and fit.size + val.size == y.size
    np.testing.assert_array_equal(np.bincount(y[val], minlength=4), [1, 2, 3, 4])
    fit2, val2 = stratified_split(y, 0.1, seed=0)
    np.testing.assert_array_equal(val, val2)
    _, val3 = stratified_split(y, 0.1, seed=1)
    assert not np.array_equal(val, val3)


def test_linear_probe_errors():
    tx, ty, vx, vy = make_blobs(40, 20)
    with pytest.raises(ValueError, match=r"train_x and train_y.*\(40, 16\).*\(39,\)"):
        linear_probe(tx, ty[:-1], vx, vy)
    with pytest.raises(ValueError, match=r"test_x and test_y.*\(20, 16\).*\(19,\)"):
        linear_probe(tx, ty, vx, vy[:-1])
    with pytest.raises(ValueError, match=r"feature dimension.*\(40, 16\).*\(20, 15\)"):
        linear_probe(tx, ty, vx[:, :-1], vy)
    with pytest.raises(ValueError, match=r"train_x must be a 2-D"):
        linear_probe(tx[0], ty, vx, vy)
    bad = tx.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match=r"train_x contains NaN or inf.*\[3\]"):
        linear_probe(bad, ty, vx, vy)
    bad = vx.copy()
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match=r"test_x contains NaN or inf"):
        linear_probe(tx, ty, bad, vy)
    lonely = ty.copy()
    lonely[0] = 7  # class 7 has a single train sample
    with pytest.raises(ValueError, match=r"at least 2 train samples per class.*class 7: 1"):
        linear_probe(tx, lonely, vx, vy)
    with pytest.raises(ValueError, match=r"val_fraction"):
        linear_probe(tx, ty, vx, vy, val_fraction=1.5)
    with pytest.raises(ValueError, match=r"non-negative class labels"):
        linear_probe(tx, ty - 1, vx, vy)


# --------------------------------------------------------------------------- k-NN


@pytest.mark.parametrize("k,temperature", [(10, 0.07), (25, 0.5), (1, 0.07)])
def test_knn_predict_matches_naive_numpy(k, temperature):
    rng = np.random.default_rng(k)
    train_x = rng.normal(size=(300, 8)).astype(np.float32)
    train_y = rng.integers(0, 5, size=300)
    test_x = rng.normal(size=(120, 8)).astype(np.float32)
    preds = knn_predict(train_x, train_y, test_x, k=k, temperature=temperature)
    expected = naive_knn(train_x, train_y, test_x, k, temperature, 5)
    assert preds.dtype == np.int64 and preds.shape == (120,)
    np.testing.assert_array_equal(preds, expected)


def test_knn_probe_on_blobs_and_k_clamp():
    tx, ty, vx, vy = make_blobs(400, 400, spread=1.0)
    res = knn_probe(tx, ty, vx, vy, k=20)
    assert res["test_acc"] > 0.95
    assert res["k"] == 20 and res["temperature"] == pytest.approx(0.07)
    assert knn_probe(tx[:8], ty[:8], vx, vy, k=20)["k"] == 8


def test_knn_errors():
    tx, ty, vx, vy = make_blobs(40, 20)
    with pytest.raises(ValueError, match=r"train_x and train_y.*\(40, 16\).*\(39,\)"):
        knn_probe(tx, ty[:-1], vx, vy)
    with pytest.raises(ValueError, match=r"feature dimension"):
        knn_predict(tx, ty, vx[:, :3])
    bad = tx.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match=r"train_x contains NaN or inf"):
        knn_probe(bad, ty, vx, vy)
    with pytest.raises(ValueError, match=r"k must be >= 1"):
        knn_probe(tx, ty, vx, vy, k=0)
    with pytest.raises(ValueError, match=r"temperature must be > 0"):
        knn_probe(tx, ty, vx, vy, temperature=0.0)
    with pytest.raises(ValueError, match=r"num_classes=2"):
        knn_predict(tx, ty, vx, num_classes=2)


# --------------------------------------------------------------------------- run_probes


def test_run_probes_end_to_end_and_errors():
    tx, ty, vx, vy = make_blobs(120, 60, dim=16)
    train_loader = DataLoader(DictDataset(tx.reshape(-1, 1, 4, 4), ty), batch_size=32)
    test_loader = DataLoader(DictDataset(vx.reshape(-1, 1, 4, 4), vy), batch_size=32)

    def embed(batch):
        return batch["image"].flatten(1)

    res = run_probes(
        embed,
        train_loader,
        test_loader,
        progress=False,
        epochs=10,
        lrs=(1e-1,),
        weight_decays=(0.0,),
        k=5,
    )
    assert set(res) == {"linear", "knn"}
    assert res["linear"]["test_acc"] > 0.95 and res["knn"]["test_acc"] > 0.95
    assert res["knn"]["k"] == 5 and len(res["linear"]["grid"]) == 1

    only_knn = run_probes(embed, train_loader, test_loader, probes=("knn",), progress=False)
    assert set(only_knn) == {"knn"}

    with pytest.raises(ValueError, match=r"unknown probe.*'svm'.*\['knn', 'linear'\]"):
        run_probes(embed, train_loader, test_loader, probes=("linear", "svm"))
    with pytest.raises(TypeError, match=r"epochs"):
        run_probes(embed, train_loader, test_loader, probes=("knn",), epochs=3)
