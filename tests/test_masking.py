import itertools
import math

import numpy as np
import pytest
import torch

from data.masking import (MaskError, MaskGenerator, beit_block_mask, beit_num_masked, inverse_block_mask)

GRIDS = [((14, 14), 75), ((8, 8), 24), ((4, 6), 9), ((1, 7), 3), ((5, 3), 15), ((3, 3), 1)]


def rect_union(shape, blocks):
    m = np.zeros(shape, dtype=bool)
    for top, left, h, w in blocks:
        m[top:top + h, left:left + w] = True
    return m


def test_beit_num_masked():
    assert beit_num_masked(196) == 75  # BEiT: 75 of 14x14 at 224 px
    assert beit_num_masked(64) == 24  # 64 * 75 / 196 = 24.49
    assert beit_num_masked(16) == 6
    assert beit_num_masked(1) == 1 and beit_num_masked(2) == 1
    with pytest.raises(MaskError, match="num_patches"):
        beit_num_masked(0)


@pytest.mark.parametrize("grid, k", GRIDS)
def test_beit_exact_count(grid, k):
    for s in range(60):
        m = beit_block_mask(grid, k, np.random.default_rng(s))
        assert m.dtype == bool and m.shape == grid
        assert int(m.sum()) == k
    n = grid[0] * grid[1]
    for k2 in (1, n):  # the extremes, and large blocks
        for s in range(10):
            m = beit_block_mask(grid, k2, np.random.default_rng(s), min_num_patches=16)
            assert int(m.sum()) == k2


def test_beit_square_int_grid():
    a = beit_block_mask(6, 10, np.random.default_rng(3))
    b = beit_block_mask((6, 6), 10, np.random.default_rng(3))
    assert a.shape == (6, 6) and np.array_equal(a, b)


@pytest.mark.parametrize("grid, k, opts", [
    ((14, 14), 75, {}),
    ((16, 16), 100, dict(min_num_patches=9, min_aspect=0.5)),
    ((8, 12), 40, dict(min_num_patches=6, max_num_patches=12, min_aspect=0.4, max_aspect=1.5)),
    ((4, 6), 9, {}),
])
def test_beit_mask_is_union_of_blocks_within_bounds(grid, k, opts):
    lo_area = opts.get("min_num_patches", 4)
    hi_area = opts.get("max_num_patches", k)
    lo_a = opts.get("min_aspect", 0.3)
    hi_a = opts.get("max_aspect", 1 / lo_a)
    n_blocks = n_filled = 0
    for s in range(60):
        m, blocks, filled = beit_block_mask(grid, k, np.random.default_rng(s), return_blocks=True, **opts)
        union = rect_union(grid, blocks)
        for r, c in filled:
            assert not union[r, c]  # a filled patch was not masked by a block
            union[r, c] = True
        assert np.array_equal(union, m)
        assert len(set(filled)) == len(filled)
        seen = np.zeros(grid, dtype=bool)
        for top, left, h, w in blocks:
            rem = k - int(seen.sum())  # patches still to mask when this block was drawn
            # inside the grid and smaller than it on both sides (as in BEiT)
            assert 0 <= top and top + h <= grid[0] and 0 <= left and left + w <= grid[1]
            assert 1 <= h < grid[0] and 1 <= w < grid[1]
            # sides are rounded sqrt(A * a), sqrt(A / a): undo the rounding by at most 1/2 a side
            assert (h + 0.5) / (w - 0.5) >= lo_a - 1e-9 and (h - 0.5) / (w + 0.5) <= hi_a + 1e-9
            # area drawn between min_num_patches and min(max_num_patches, rem); a block never overshoots
            assert (h + 0.5) * (w + 0.5) >= min(lo_area, rem)
            assert (h - 0.5) * (w - 0.5) <= max(lo_area, min(hi_area, rem))
            assert h * w - int(seen[top:top + h, left:left + w].sum()) <= rem
            # every block masks at least one new patch
            assert not seen[top:top + h, left:left + w].all()
            seen[top:top + h, left:left + w] = True
        n_blocks += len(blocks)
        n_filled += len(filled)
    if grid[0] >= 8:  # on real grids nearly everything comes from blocks
        assert n_blocks > 60 and n_filled < 60 * k * 0.05


def test_beit_block_shapes_follow_the_constraints():
    # aspect ratio fixed at 1 and area fixed at 16: every block is 4x4 while 16 or more are left to mask
    for s in range(30):
        m, blocks, filled = beit_block_mask((14, 14), 80, np.random.default_rng(s), min_num_patches=16,
                                            max_num_patches=16, min_aspect=1.0, return_blocks=True)
        assert int(m.sum()) == 80
        assert all(h == w for _, _, h, w in blocks)
        assert blocks[0][2:] == (4, 4)
    # a narrow aspect range: tall blocks only (h / w in [2, 4])
    shapes = set()
    for s in range(30):
        _, blocks, _ = beit_block_mask((14, 14), 60, np.random.default_rng(s), min_num_patches=8,
                                       min_aspect=2.0, max_aspect=4.0, return_blocks=True)
        shapes.update((h, w) for _, _, h, w in blocks)
    assert shapes and all(h > w for h, w in shapes)


def test_beit_fills_only_when_blocks_cannot_fit():
    # on a 1-row grid no block is smaller than the grid in height: every patch is filled singly
    m, blocks, filled = beit_block_mask((1, 7), 3, np.random.default_rng(0), return_blocks=True)
    assert blocks == [] and len(filled) == 3 and int(m.sum()) == 3


@pytest.mark.parametrize("grid, ratio, bw", [((14, 14), 0.8, 3), ((8, 8), 0.8, 3), ((4, 6), 0.5, 3),
                                            ((7, 5), 0.6, 2), ((16, 16), 0.75, 4), ((3, 3), 0.9, 3)])
def test_inverse_block_exact_count_and_structure(grid, ratio, bw):
    n = grid[0] * grid[1]
    kept = round(n * (1 - ratio))
    off = bw // 2
    for s in range(60):
        m, blocks, changed = inverse_block_mask(grid, ratio, np.random.default_rng(s), block_width=bw,
                                                return_blocks=True)
        assert m.dtype == bool and m.shape == grid
        assert int(m.sum()) == n - kept
        # the kept part is the union of the blocks, with the adjusted patches flipped
        keep = rect_union(grid, blocks)
        for r, c in changed:
            keep[r, c] = not keep[r, c]
        assert np.array_equal(keep, ~m)
        assert len(set(changed)) == len(changed)
        assert 1 <= len(blocks) <= max(1, int(n * (kept / n + 0.07) / bw**2))
        for top, left, h, w in blocks:
            # a bw x bw window around a seed (r - bw//2 .. r - bw//2 + bw - 1), clipped at the borders
            assert 1 <= h <= bw and 1 <= w <= bw
            assert h == bw or top == 0 or top + h == grid[0]
            assert w == bw or left == 0 or left + w == grid[1]
            if h < bw and top == 0 and top + h < grid[0]:
                assert h >= bw - off  # clipped on top only: the seed row is still inside
            if w < bw and left == 0 and left + w < grid[1]:
                assert w >= bw - off


def test_inverse_block_kept_part_is_squares_without_adjustment():
    # 6x6 grid, 25% kept = 9 patches, one seed: an interior seed keeps one full 3x3 square, no adjustment
    exact = 0
    for s in range(40):
        m, blocks, changed = inverse_block_mask((6, 6), 0.75, np.random.default_rng(s), adjust=0.0,
                                                return_blocks=True)
        assert int((~m).sum()) == 9 and len(blocks) == 1
        top, left, h, w = blocks[0]
        if (h, w) == (3, 3):
            exact += 1
            assert changed == []
            expected = np.ones((6, 6), dtype=bool)
            expected[top:top + 3, left:left + 3] = False
            assert np.array_equal(m, expected)
        else:  # a border seed keeps a clipped block; the count is topped up
            assert len(changed) == 9 - h * w
    assert exact >= 5
    # data2vec 2.0's setting: when no adjustment was needed, every kept patch lies in a fully kept
    # clipped 3x3 window around some patch
    unadjusted = 0
    for s in range(80):
        m, blocks, changed = inverse_block_mask((14, 14), 0.8, np.random.default_rng(s), return_blocks=True)
        if changed:
            continue
        unadjusted += 1
        keep = ~m
        windows = np.zeros_like(keep)
        for r, c in itertools.product(range(14), range(14)):
            sl = np.s_[max(0, r - 1):r + 2, max(0, c - 1):c + 2]
            if keep[sl].all():
                windows[sl] = True
        assert np.array_equal(windows, keep)
    assert unadjusted >= 3


def _gen_cases():
    return [MaskGenerator("beit", (14, 14), seed=5), MaskGenerator("inverse_block", (8, 8), seed=5),
            MaskGenerator("beit", (4, 6), mask_ratio=0.5, seed=1), MaskGenerator("inverse_block", 6, num_masked=20)]


@pytest.mark.parametrize("gen", _gen_cases(), ids=repr)
def test_generator_shape_counts_and_determinism(gen):
    n = gen.num_patches
    out = gen(8, step=3, rank=1)
    assert out.dtype == torch.bool and out.shape == (8, n)
    assert out.sum(1).tolist() == [gen.num_masked] * 8
    assert torch.equal(out, gen(8, step=3, rank=1))
    # a generator built the same way, after the global RNGs moved, draws the same
    np.random.seed(123)
    torch.manual_seed(123)
    twin = MaskGenerator(gen.kind, gen.grid, num_masked=gen.num_masked, seed=gen.seed, **gen._options)
    assert torch.equal(out, twin(8, step=3, rank=1))
    # another step, rank or seed changes the masks
    assert not torch.equal(out, gen(8, step=4, rank=1))
    assert not torch.equal(out, gen(8, step=3, rank=0))
    other = MaskGenerator(gen.kind, gen.grid, num_masked=gen.num_masked, seed=gen.seed + 1, **gen._options)
    assert not torch.equal(out, other(8, step=3, rank=1))
    # samples differ from each other; a row depends on its index in the global batch, so two
    # ranks of 8 draw what one process of 16 draws
    assert len({bytes(r.numpy()) for r in out}) > 4
    assert torch.equal(gen(16, step=3, rank=0), torch.cat([gen(8, step=3, rank=0), out]))
    # rows are the [H, W] masks flattened row-major, drawn from (seed, step, global index, clone, redraw)
    row2 = gen.mask(np.random.default_rng([gen.seed, 3, 8 + 2, 0, 0]))
    assert row2.shape == gen.grid and torch.equal(out[2], torch.from_numpy(row2.reshape(-1)))


def test_generator_defaults():
    assert MaskGenerator("beit", (14, 14)).num_masked == 75
    assert MaskGenerator("beit", (14, 14), mask_ratio=0.4).num_masked == round(196 * 0.4)
    assert MaskGenerator("inverse_block", (14, 14)).num_masked == 196 - 39  # data2vec 2.0: 80 %
    assert MaskGenerator("inverse_block", (8, 8), mask_ratio=0.6).num_masked == 64 - round(64 * 0.4)


@pytest.mark.parametrize("kind", ["beit", "inverse_block"])
def test_generator_clones_are_sample_major_and_different(kind):
    gen = MaskGenerator(kind, (14, 14), seed=2)
    b, m = 4, 8
    out = gen(b, step=7, clones=m)
    assert out.shape == (b * m, 196) and out.sum(1).tolist() == [gen.num_masked] * (b * m)
    single = gen(b, step=7)
    for i in range(b):
        rows = out[i * m:(i + 1) * m]
        assert torch.equal(rows[0], single[i])  # clone 0 of sample i is row i * clones
        assert len({bytes(r.numpy()) for r in rows}) == m
    assert torch.equal(out, gen(b, step=7, clones=m))


def test_generator_clones_redraw_duplicates_on_tiny_grids():
    # a 2x2 grid with 2 masked has 6 possible masks: 6 clones must be exactly those 6
    gen = MaskGenerator("beit", (2, 2), num_masked=2)
    for step in range(5):
        out = gen(2, step=step, clones=6)
        for i in range(2):
            rows = {tuple(r.tolist()) for r in out[i * 6:(i + 1) * 6]}
            assert len(rows) == 6 and all(sum(r) == 2 for r in rows)


def test_generator_masks_feed_the_vit_drop_mode():
    from models import create_backbone

    torch.manual_seed(0)
    vit = create_backbone("vit_small", image_size=16, patch_size=4, depth=1).eval()
    gen = MaskGenerator("inverse_block", (4, 4), mask_ratio=0.75)
    mask = gen(2, step=0, clones=3)
    x = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        out = vit.forward_features(x, mask=mask, drop_masked=True)
    assert out.shape == (6, 1 + 16 - gen.num_masked, vit.embed_dim)


@pytest.mark.parametrize("make, name", [
    (lambda: beit_block_mask((4, 4), 17, np.random.default_rng(0)), "num_masked"),
    (lambda: beit_block_mask((4, 4), 0, np.random.default_rng(0)), "num_masked"),
    (lambda: beit_block_mask((4, 4), 2.5, np.random.default_rng(0)), "num_masked"),
    (lambda: beit_block_mask((0, 4), 1, np.random.default_rng(0)), "grid"),
    (lambda: beit_block_mask((4, 4, 4), 1, np.random.default_rng(0)), "grid"),
    (lambda: beit_block_mask("14", 1, np.random.default_rng(0)), "grid"),
    (lambda: beit_block_mask((4, 4), 4, np.random.default_rng(0), min_num_patches=0), "min_num_patches"),
    (lambda: beit_block_mask((4, 4), 4, np.random.default_rng(0), max_num_patches=2), "max_num_patches"),
    (lambda: beit_block_mask((4, 4), 4, np.random.default_rng(0), min_aspect=0), "min_aspect"),
    (lambda: beit_block_mask((4, 4), 4, np.random.default_rng(0), max_aspect=0.1), "max_aspect"),
    (lambda: inverse_block_mask((4, 4), 1.0, np.random.default_rng(0)), "mask_ratio"),
    (lambda: inverse_block_mask((4, 4), 0.0, np.random.default_rng(0)), "mask_ratio"),
    (lambda: inverse_block_mask((4, 4), 0.99, np.random.default_rng(0)), "mask_ratio"),  # keeps 0
    (lambda: inverse_block_mask((4, 4), 0.8, np.random.default_rng(0), block_width=0), "block_width"),
    (lambda: inverse_block_mask((4, 4), 0.8, np.random.default_rng(0), adjust=-1), "adjust"),
    (lambda: MaskGenerator("mae", (4, 4)), "kind"),
    (lambda: MaskGenerator("beit", (4, -4)), "grid"),
    (lambda: MaskGenerator("beit", (4, 4), num_masked=17), "num_masked"),
    (lambda: MaskGenerator("beit", (4, 4), mask_ratio=1.5), "mask_ratio"),
    (lambda: MaskGenerator("beit", (4, 4), mask_ratio=0.5, num_masked=3), "mask_ratio / num_masked"),
    (lambda: MaskGenerator("inverse_block", (4, 4), num_masked=16), "num_masked"),
    (lambda: MaskGenerator("beit", (4, 4), seed=-1), "seed"),
    (lambda: MaskGenerator("beit", (4, 4), min_aspect=-1.0), "min_aspect"),
    (lambda: MaskGenerator("beit", (4, 4))(4, 0, clones=0), "clones"),
    (lambda: MaskGenerator("beit", (4, 4))(0, 0), "batch_size"),
    (lambda: MaskGenerator("beit", (4, 4))(4, -1), "step"),
    (lambda: MaskGenerator("beit", (4, 4))(4, 0, rank=-2), "rank"),
])
def test_errors_name_the_argument(make, name):
    with pytest.raises(ValueError, match="^" + name.replace("/", "\\/") + ":") as info:
        make()
    assert isinstance(info.value, MaskError)


def test_kinds_and_errors_are_exported():
    import data

    assert data.MaskGenerator is MaskGenerator and data.MASK_KINDS == ("beit", "inverse_block")
    assert issubclass(data.MaskError, ValueError)
    assert math.isclose(MaskGenerator("inverse_block", 14)._options["adjust"], 0.07)
