"""Patch masks for masked image modelling: BEiT's blockwise masks and data2vec 2.0's inverse block masks.

A mask is a bool array over the ViT's patch grid, ``True`` = masked. :class:`MaskGenerator` turns
it into the batch form the ViT takes (``[B, H * W]``, patches in row-major order, as
``PatchEmbed`` flattens them):

- :func:`beit_block_mask` (BEiT, Bao et al. 2021, https://arxiv.org/abs/2106.08254): rectangles
  of random area and log-uniform aspect ratio are masked one after another until the count is
  reached.
- :func:`inverse_block_mask` (data2vec 2.0, Baevski et al. 2022, https://arxiv.org/abs/2212.07525):
  the *kept* patches are drawn as ``block_width x block_width`` blocks around random seeds and the
  mask is their complement, so the encoder sees a few contiguous regions.

Both hit their count exactly (every row of a batch has the same number of masked patches, which
the ViT's drop mode needs); how is described on each function. Every draw comes from the
``numpy.random.Generator`` passed in, and :class:`MaskGenerator` seeds one per mask from
``(seed, step, the sample's index in the global batch, clone)``, so a resumed run draws the same
masks, and N ranks draw what one process with the whole batch draws.
"""
from __future__ import annotations

import math
import operator
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .common.errors import UserError

__all__ = ["MaskError", "MaskGenerator", "MASK_KINDS", "beit_block_mask", "beit_num_masked", "inverse_block_mask"]

MASK_KINDS = ("beit", "inverse_block")

Grid = Union[int, Sequence[int]]
Block = Tuple[int, int, int, int]  # (top, left, height, width)
Patch = Tuple[int, int]  # (row, col)

# A block is drawn up to this many times before BEiT's masking gives up and fills the rest (as in BEiT).
_BLOCK_ATTEMPTS = 10
# data2vec 2.0 clones of one sample are redrawn up to this many times while they equal an earlier clone.
_CLONE_REDRAWS = 100


class MaskError(UserError, ValueError):
    """A bad masking argument (grid, count, ratio, kind, ...); the message names the argument."""


def _int(value, name: str) -> int:
    if isinstance(value, bool):
        raise MaskError(f"{name}: expected an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise MaskError(f"{name}: expected an integer, got {value!r}") from None


def _grid(grid: Grid) -> Tuple[int, int]:
    """``grid`` as ``(H, W)`` (an int ``g`` is ``(g, g)``), or a MaskError naming ``grid``."""
    bad = MaskError(f"grid: expected an int or (H, W) of positive ints, got {grid!r}")
    if isinstance(grid, (bool, str, bytes)):
        raise bad
    try:
        dims = [operator.index(grid)] * 2
    except TypeError:
        try:
            dims = list(grid)
        except TypeError:
            raise bad from None
    if len(dims) != 2 or any(isinstance(d, bool) for d in dims):
        raise bad
    try:
        h, w = (operator.index(d) for d in dims)
    except TypeError:
        raise bad from None
    if h < 1 or w < 1:
        raise bad
    return h, w


def _ratio(mask_ratio, name: str = "mask_ratio") -> float:
    try:
        r = float(mask_ratio)
    except (TypeError, ValueError):
        r = float("nan")
    if isinstance(mask_ratio, bool) or not 0.0 < r < 1.0:
        raise MaskError(f"{name}: expected a fraction of the patches in (0, 1), e.g. 0.8; got {mask_ratio!r}")
    return r


def _count(num_masked, n: int, grid: Tuple[int, int], name: str = "num_masked") -> int:
    k = _int(num_masked, name)
    if not 1 <= k <= n:
        raise MaskError(f"{name}: expected 1 <= {name} <= {n} (the patches of a {grid[0]}x{grid[1]} grid), got {k}")
    return k


def beit_num_masked(num_patches: int) -> int:
    """BEiT's number of masked patches, 75 of 196 (a 14x14 grid at 224 px), scaled to ``num_patches``.

    Returns ``max(1, round(num_patches * 75 / 196))``.
    """
    n = _int(num_patches, "num_patches")
    if n < 1:
        raise MaskError(f"num_patches: expected a positive number of patches, got {n}")
    return max(1, round(n * 75 / 196))


def _fill(mask: np.ndarray, count: int, value: bool, rng: np.random.Generator) -> List[Patch]:
    """Set ``count`` patches of ``mask`` that are ``not value``, drawn uniformly, to ``value``."""
    if count <= 0:
        return []
    rows, cols = np.nonzero(mask != value)
    pick = np.sort(rng.choice(rows.size, size=count, replace=False))
    mask[rows[pick], cols[pick]] = value
    return [(int(r), int(c)) for r, c in zip(rows[pick], cols[pick])]


def beit_block_mask(
    grid: Grid,
    num_masked: int,
    rng: np.random.Generator,
    min_num_patches: int = 4,
    max_num_patches: Optional[int] = None,
    min_aspect: float = 0.3,
    max_aspect: Optional[float] = None,
    return_blocks: bool = False,
):
    """BEiT's blockwise mask with exactly ``num_masked`` masked patches.

    Blocks are placed one after another. Each has a target area drawn uniformly between
    ``min_num_patches`` and ``min(max_num_patches, remaining)`` (``remaining`` = patches still to mask)
    and an aspect ratio ``height / width`` drawn log-uniformly from ``[min_aspect, max_aspect]``;
    its sides are the rounded ``sqrt(area * aspect)`` and ``sqrt(area / aspect)``, it must be
    smaller than the grid on both sides (as in BEiT) and sits at a uniform position. A block is
    kept only if it masks between 1 and ``remaining`` new patches, so the count never overshoots.

    Exact-count rule: when ``10`` draws in a row give no block that can be kept (the few patches
    still to mask are fewer than a block would add), the remaining patches are masked one by one,
    drawn uniformly from the unmasked ones. (BEiT's original stops there and can fall short;
    BEiT v2's code fills the rest the same way.)

    Args:
        grid: ``(H, W)`` patches, or an int for a square grid.
        num_masked: Patches to mask, in ``[1, H * W]``; BEiT masks :func:`beit_num_masked`.
        rng: The generator every draw comes from.
        min_num_patches: Smallest target area of a block (BEiT's default 4; its recipes use 16).
        max_num_patches: Largest target area of a block; ``None`` means ``num_masked``.
        min_aspect: Smallest aspect ratio, > 0.
        max_aspect: Largest aspect ratio; ``None`` means ``1 / min_aspect``.
        return_blocks: Also return the rectangles placed and the patches filled one by one.

    Returns:
        ``bool [H, W]`` (``True`` = masked), or with ``return_blocks``
        ``(mask, blocks, filled)``: ``blocks`` the ``(top, left, height, width)`` of every kept
        block in order, ``filled`` the ``(row, col)`` masked one by one; the mask is exactly their
        union.
    """
    h, w = _grid(grid)
    n = h * w
    k = _count(num_masked, n, (h, w))
    lo_area = _int(min_num_patches, "min_num_patches")
    if lo_area < 1:
        raise MaskError(f"min_num_patches: expected a positive number of patches, got {lo_area}")
    hi_area = k if max_num_patches is None else _int(max_num_patches, "max_num_patches")
    if max_num_patches is not None and hi_area < lo_area:
        raise MaskError(f"max_num_patches: expected None or >= min_num_patches ({lo_area}), got {hi_area}")
    try:
        lo_aspect = float(min_aspect)
        hi_aspect = 1.0 / lo_aspect if max_aspect is None else float(max_aspect)
    except (TypeError, ValueError, ZeroDivisionError):
        lo_aspect = hi_aspect = float("nan")
    if not (math.isfinite(lo_aspect) and lo_aspect > 0):
        raise MaskError(f"min_aspect: expected a positive aspect ratio (height / width), got {min_aspect!r}")
    if not (math.isfinite(hi_aspect) and hi_aspect >= lo_aspect):
        raise MaskError(f"max_aspect: expected None or an aspect ratio >= min_aspect ({lo_aspect}), got {max_aspect!r}")
    log_aspect = (math.log(lo_aspect), math.log(hi_aspect))

    mask = np.zeros((h, w), dtype=bool)
    blocks: List[Block] = []
    count = 0
    while count < k:
        remaining = k - count
        max_area = min(remaining, hi_area)
        added = 0
        for _ in range(_BLOCK_ATTEMPTS):
            area = rng.uniform(min(lo_area, max_area), max(lo_area, max_area))
            aspect = math.exp(rng.uniform(*log_aspect))
            bh = int(round(math.sqrt(area * aspect)))
            bw = int(round(math.sqrt(area / aspect)))
            if not (1 <= bh < h and 1 <= bw < w):
                continue
            top = int(rng.integers(0, h - bh + 1))
            left = int(rng.integers(0, w - bw + 1))
            window = mask[top:top + bh, left:left + bw]
            new = bh * bw - int(window.sum())
            if 0 < new <= remaining:
                window[...] = True
                blocks.append((top, left, bh, bw))
                added = new
                break
        if added == 0:
            break
        count += added
    filled = _fill(mask, k - count, True, rng)
    return (mask, blocks, filled) if return_blocks else mask


def _kept_count(n: int, mask_ratio: float, grid: Tuple[int, int]) -> int:
    kept = round(n * (1.0 - mask_ratio))
    if not 1 <= kept <= n - 1:
        raise MaskError(f"mask_ratio: {mask_ratio} on a {grid[0]}x{grid[1]} grid keeps round({n} * (1 - {mask_ratio}))"
                        f" = {kept} patches; at least 1 must be kept and 1 masked")
    return kept


def _inverse_block_mask(h: int, w: int, kept: int, rng: np.random.Generator, block_width: int, adjust: float):
    n = h * w
    num_seeds = max(1, int(n * (kept / n + adjust) / block_width**2))
    seeds = rng.integers(0, n, size=num_seeds)
    keep = np.zeros((h, w), dtype=bool)
    blocks: List[Block] = []
    off = block_width // 2
    for s in np.unique(seeds):  # a seed drawn twice is one block
        r, c = divmod(int(s), w)
        top, left = max(0, r - off), max(0, c - off)
        bottom, right = min(h, r - off + block_width), min(w, c - off + block_width)
        keep[top:bottom, left:right] = True
        blocks.append((top, left, bottom - top, right - left))
    have = int(keep.sum())
    changed = _fill(keep, have - kept, False, rng) + _fill(keep, kept - have, True, rng)
    return ~keep, blocks, changed


def inverse_block_mask(
    grid: Grid,
    mask_ratio: float,
    rng: np.random.Generator,
    block_width: int = 3,
    adjust: float = 0.07,
    return_blocks: bool = False,
):
    """data2vec 2.0's inverse block mask: exactly ``H * W - round(H * W * (1 - mask_ratio))`` masked.

    The kept part is drawn, the mask is its complement. ``int(N * (1 - mask_ratio + adjust) /
    block_width**2)`` seeds (at least one) are drawn uniformly with replacement among the ``N``
    patches; each keeps the ``block_width x block_width`` block around it (rows ``r - block_width
    // 2`` to ``r - block_width // 2 + block_width - 1``, columns likewise), clipped at the borders.
    ``adjust`` over-provisions seeds because blocks overlap (data2vec 2.0's ``mask_prob_adjust``).

    Exact-count rule: the kept count is then forced to ``round(N * (1 - mask_ratio))`` by
    un-keeping random kept patches (too many) or keeping random other patches (too few), drawn
    uniformly; so exactly ``N - kept`` patches are masked.

    data2vec 2.0's image recipe: ``mask_ratio=0.8`` (``mask_prob``, with ``inverse_mask``),
    ``block_width=3`` (``mask_length``), ``adjust=0.07`` (``mask_prob_adjust``).

    Args:
        grid: ``(H, W)`` patches, or an int for a square grid.
        mask_ratio: Fraction masked, in ``(0, 1)``; it must leave at least one patch kept and one masked.
        rng: The generator every draw comes from.
        block_width: Side of a kept block, >= 1.
        adjust: Extra kept fraction for the number of seeds, >= 0.
        return_blocks: Also return the kept blocks and the patches the count adjustment changed.

    Returns:
        ``bool [H, W]`` (``True`` = masked), or with ``return_blocks`` ``(mask, blocks, changed)``:
        ``blocks`` the clipped kept blocks ``(top, left, height, width)``, ``changed`` the
        ``(row, col)`` whose kept state the count adjustment flipped; the kept part is exactly the
        union of the blocks with the changed patches flipped.
    """
    h, w = _grid(grid)
    kept = _kept_count(h * w, _ratio(mask_ratio), (h, w))
    bw = _block_width(block_width)
    mask, blocks, changed = _inverse_block_mask(h, w, kept, rng, bw, _adjust(adjust))
    return (mask, blocks, changed) if return_blocks else mask


def _block_width(block_width) -> int:
    bw = _int(block_width, "block_width")
    if bw < 1:
        raise MaskError(f"block_width: expected a positive block side in patches, got {bw}")
    return bw


def _adjust(adjust) -> float:
    try:
        a = float(adjust)
    except (TypeError, ValueError):
        a = float("nan")
    if not (math.isfinite(a) and a >= 0):
        raise MaskError(f"adjust: expected a fraction >= 0 (data2vec 2.0 uses 0.07), got {adjust!r}")
    return a


def _non_negative(value, name: str) -> int:
    v = _int(value, name)
    if v < 0:
        raise MaskError(f"{name}: expected an integer >= 0, got {v}")
    return v


class MaskGenerator:
    """Deterministic batches of masks: ``gen(batch_size, step, rank, clones) -> bool [batch_size * clones, H * W]``.

    Row ``b * clones + m`` is clone ``m`` of sample ``b`` (sample-major: sample 0's clones come
    first), ``True`` = masked, patches in row-major order (the ViT's patch tokens). Every row has
    exactly :attr:`num_masked` masked patches. The mask of that row is drawn with
    ``np.random.default_rng([seed, step, rank * batch_size + b, m, redraw])``: it depends on the
    sample's index in the global batch, not on how that batch is split over ranks (N ranks with
    batch B draw the masks one process draws with batch N * B, as the loaders give them the same
    images), nor on other calls or any global random state.

    With ``clones > 1`` (data2vec 2.0's multi-masking: each sample is encoded ``clones`` times
    under different masks) a clone equal to an earlier clone of the same sample is redrawn
    (``redraw = 1, 2, ...``, up to 100 times), so the clones differ whenever the grid allows
    that many different masks.

    Args:
        kind: ``"beit"`` (:func:`beit_block_mask`) or ``"inverse_block"`` (:func:`inverse_block_mask`).
        grid: ``(H, W)`` patches, or an int for a square grid.
        mask_ratio: Fraction masked (``"inverse_block"``: kept count ``round(N * (1 - mask_ratio))``;
            ``"beit"``: ``round(N * mask_ratio)`` masked). Give this or ``num_masked``, not both.
            Default: BEiT's :func:`beit_num_masked`; data2vec 2.0's 0.8.
        num_masked: Exact number of masked patches per row, in ``[1, N]`` (``"inverse_block"``: in
            ``[1, N - 1]``).
        seed: Base seed, >= 0.
        min_num_patches, max_num_patches, min_aspect, max_aspect: ``"beit"`` block shape.
        block_width, adjust: ``"inverse_block"`` blocks.
    """

    def __init__(
        self,
        kind: str = "beit",
        grid: Grid = (14, 14),
        mask_ratio: Optional[float] = None,
        num_masked: Optional[int] = None,
        seed: int = 0,
        *,
        min_num_patches: int = 4,
        max_num_patches: Optional[int] = None,
        min_aspect: float = 0.3,
        max_aspect: Optional[float] = None,
        block_width: int = 3,
        adjust: float = 0.07,
    ) -> None:
        if kind not in MASK_KINDS:
            raise MaskError(f"kind: unknown mask kind {kind!r}; valid kinds: {', '.join(MASK_KINDS)}")
        self.kind = kind
        self.grid = _grid(grid)
        h, w = self.grid
        n = h * w
        self.seed = _non_negative(seed, "seed")
        if mask_ratio is not None and num_masked is not None:
            raise MaskError(f"mask_ratio / num_masked: give one of them, not both "
                            f"(got {mask_ratio!r} and {num_masked!r})")
        if kind == "beit":
            if num_masked is not None:
                k = _count(num_masked, n, self.grid)
            elif mask_ratio is not None:
                r = _ratio(mask_ratio)
                k = round(n * r)
                if not 1 <= k <= n:
                    raise MaskError(f"mask_ratio: {mask_ratio} on a {h}x{w} grid masks round({n} * {mask_ratio}) = {k}"
                                    " patches; at least 1 must be masked")
            else:
                k = beit_num_masked(n)
            self._options = dict(min_num_patches=min_num_patches, max_num_patches=max_num_patches,
                                 min_aspect=min_aspect, max_aspect=max_aspect)
            beit_block_mask(self.grid, k, np.random.default_rng(0), **self._options)  # checks the options now
        else:
            if num_masked is not None:
                k = _count(num_masked, n, self.grid)
                if k == n:
                    raise MaskError(f"num_masked: inverse block masks keep at least 1 patch; expected "
                                    f"1 <= num_masked <= {n - 1} on a {h}x{w} grid, got {k}")
            else:
                k = n - _kept_count(n, 0.8 if mask_ratio is None else _ratio(mask_ratio), self.grid)
            self._options = dict(block_width=_block_width(block_width), adjust=_adjust(adjust))
        self.num_masked = k
        self.num_patches = n

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self._options.items())
        return (f"MaskGenerator(kind={self.kind!r}, grid={self.grid}, num_masked={self.num_masked}, "
                f"seed={self.seed}, {opts})")

    def mask(self, rng: np.random.Generator) -> np.ndarray:
        """One ``bool [H, W]`` mask with exactly :attr:`num_masked` patches masked, drawn from ``rng``."""
        h, w = self.grid
        if self.kind == "beit":
            return beit_block_mask(self.grid, self.num_masked, rng, **self._options)
        mask, _, _ = _inverse_block_mask(h, w, self.num_patches - self.num_masked, rng, **self._options)
        return mask

    def __call__(self, batch_size: int, step: int, rank: int = 0, clones: int = 1) -> torch.Tensor:
        """``bool [batch_size * clones, H * W]`` masks for ``step`` on ``rank``; row ``b * clones + m``
        is clone ``m`` of sample ``b``."""
        b = _int(batch_size, "batch_size")
        if b < 1:
            raise MaskError(f"batch_size: expected a positive number of samples, got {b}")
        step = _non_negative(step, "step")
        rank = _non_negative(rank, "rank")
        m = _int(clones, "clones")
        if m < 1:
            raise MaskError(f"clones: expected a positive number of masks per sample, got {m}")
        out = np.empty((b * m, self.num_patches), dtype=bool)
        for i in range(b):
            drawn: List[bytes] = []
            for j in range(m):
                for redraw in range(_CLONE_REDRAWS + 1):
                    flat = self.mask(np.random.default_rng([self.seed, step, rank * b + i, j, redraw])).reshape(-1)
                    key = np.packbits(flat).tobytes()
                    if key not in drawn:
                        break
                drawn.append(key)
                out[i * m + j] = flat
        return torch.from_numpy(out)
