"""Linear-probe speed and accuracy against scikit-learn, in one run.

The grid probe trains every (lr, weight decay) head in one pass over cached features; the
scikit-learn baseline fits one LogisticRegression per regularisation strength (what users would
otherwise write). Features: raw mnist5k pixels (784-d) and a 512-d random projection of them.

    python -m benchmarks.probe_speed
"""
from __future__ import annotations

import time

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

import data as D
from eval_probes import knn_probe, linear_probe


def _features():
    tr, te = D.build_dataset("mnist5k", "train"), D.build_dataset("mnist5k", "test")
    xtr = tr.images.flatten(1).float().numpy() / 255
    xte = te.images.flatten(1).float().numpy() / 255
    return xtr, tr.labels.numpy(), xte, te.labels.numpy()


def main() -> None:
    torch.manual_seed(0)
    xtr, ytr, xte, yte = _features()
    proj = np.random.default_rng(0).standard_normal((xtr.shape[1], 512)).astype(np.float32) / 28
    rows = []
    for name, a, b in (("pixels 784-d", xtr, xte), ("random proj 512-d", np.maximum(xtr @ proj, 0), np.maximum(xte @ proj, 0))):
        t = time.perf_counter()
        ours = linear_probe(a, ytr, b, yte)
        t_ours = time.perf_counter() - t
        n_grid = len(ours["grid"])
        t = time.perf_counter()
        sc = StandardScaler().fit(a)
        best = None
        for c in np.logspace(-3, 1, n_grid):  # as many fits as our grid has heads
            clf = LogisticRegression(C=c, max_iter=1000).fit(sc.transform(a), ytr)
            acc = clf.score(sc.transform(b), yte)
            best = acc if best is None else max(best, acc)
        t_sk = time.perf_counter() - t
        t = time.perf_counter()
        knn = knn_probe(a, ytr, b, yte)
        t_knn = time.perf_counter() - t
        rows.append((name, n_grid, t_ours, ours["test_acc"], t_sk, best, t_sk / t_ours, t_knn, knn["test_acc"]))
    print(f"torch threads: {torch.get_num_threads()}")
    print("| features | grid size | ours: time | ours: test acc | sklearn: time | sklearn: best test acc (oracle) | speed-up | k-NN time | k-NN acc |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.1f} s | {100 * r[3]:.1f}% | {r[4]:.1f} s | {100 * r[5]:.1f}% | {r[6]:.1f}x | {r[7]:.2f} s | {100 * r[8]:.1f}% |")


if __name__ == "__main__":
    main()
