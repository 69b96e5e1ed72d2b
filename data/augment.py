"""View augmentations for joint-embedding methods (SimCLR, BYOL), applied to whole batches.

Each sample of a batch gets its own random parameters, but every operation runs as one
vectorised tensor op over the batch (one ``grid_sample`` for crop + flip + resize, one grouped
convolution for blur), which is far cheaper on a 2-core CPU than per-image PIL transforms.

Parameters follow the papers: SimCLR (Chen et al. 2020, appendix A) and BYOL (Grill et al.
2020, table 6: view 1 always blurred and never solarised, view 2 blurred with p=0.1 and
solarised with p=0.2).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class ViewSpec:
    """Random augmentation parameters for one view."""

    size: int = 32
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0


def view_specs(kind: str, size: int, crop_scale=(0.08, 1.0), color: bool = True, flip: bool = True,
               jitter_strength: float = 1.0) -> list[ViewSpec]:
    """The view recipes of a method: two views for ``byol`` and ``simclr``, one for ``light``.

    Args:
        kind: ``byol`` (asymmetric blur / solarize), ``simclr`` (symmetric), or ``light`` (one view:
            random resized crop and flips only, no colour, blur or solarize; supervised training).
        size: output side in pixels.
        crop_scale: area fraction range of the random resized crop.
        color: whether colour jitter and greyscale apply (False for grey digits).
        flip: whether horizontal flips keep the meaning (False for digits).
        jitter_strength: multiplies the colour-jitter strengths (SimCLR's s).
    """
    s = jitter_strength
    common = dict(size=size, crop_scale=tuple(crop_scale), flip_p=0.5 if flip else 0.0)
    if kind == "light":
        return [ViewSpec(**common, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)]
    if kind == "byol":
        jit = dict(brightness=0.4 * s, contrast=0.4 * s, saturation=0.2 * s, hue=0.1 * s)
        a = ViewSpec(**common, **jit, blur_p=1.0, solarize_p=0.0)
        b = ViewSpec(**common, **jit, blur_p=0.1, solarize_p=0.2)
    elif kind == "simclr":
        jit = dict(brightness=0.8 * s, contrast=0.8 * s, saturation=0.8 * s, hue=0.2 * s)
        a = ViewSpec(**common, **jit, blur_p=0.5)
        b = ViewSpec(**common, **jit, blur_p=0.5)
    else:
        raise ValueError(f"unknown view recipe '{kind}'; valid: byol, simclr, light")
    for v in (a, b):
        if not color:  # brightness and contrast still make sense on grey images
            v.saturation, v.hue, v.grayscale_p = 0.0, 0.0, 0.0
    return [a, b]


def multicrop_specs(kind: str, size: int, num_local: int, local_size: int = 0, crop_scale=(0.14, 1.0),
                    local_crop_scale=(0.05, 0.14), color: bool = True, flip: bool = True,
                    jitter_strength: float = 1.0, size_multiple: int = 1) -> list[ViewSpec]:
    """Multi-crop views (Caron et al. 2020, SwAV, section 3.2): 2 global views plus local ones.

    The two global views are ``view_specs(kind, size, crop_scale, ...)``; each of the
    ``num_local`` local views copies a global view's recipe (alternating between the two)
    with a smaller side and a smaller crop area. The paper's ImageNet setting is 2 x 224 px
    with scale (0.14, 1) and 6 x 96 px with scale (0.05, 0.14).

    Args:
        kind: ``byol`` or ``simclr`` (the recipe of colour, blur and solarize, see :func:`view_specs`).
        size: side of the global views in pixels.
        num_local: number of local views (0 gives the two global views only).
        local_size: side of the local views; 0 = ``round(size * 96 / 224)`` (at least 4), rounded to
            the nearest multiple of ``size_multiple``.
        crop_scale: area fraction range of the global crops.
        local_crop_scale: area fraction range of the local crops.
        color, flip, jitter_strength: as in :func:`view_specs`.
        size_multiple: the default local side is a multiple of it (a ViT's patch size).

    Returns:
        ``[global_1, global_2, local_1, ..., local_num_local]``.
    """
    if num_local < 0:
        raise ValueError(f"local_views must be >= 0; got {num_local}")
    m = max(1, size_multiple)
    local_size = local_size or max(4 if m == 1 else m, round(size * 96 / 224 / m) * m)
    if not 0 < local_size <= size:
        raise ValueError(f"local_size must be in [1, {size}] (the global views' size); got {local_size}")
    for name, sc in (("crop_scale", crop_scale), ("local_crop_scale", local_crop_scale)):
        if len(sc) != 2 or not 0 < sc[0] <= sc[1] <= 1:
            raise ValueError(f"{name} must be (lo, hi) with 0 < lo <= hi <= 1; got {tuple(sc)}")
    glob = view_specs(kind, size, crop_scale=crop_scale, color=color, flip=flip, jitter_strength=jitter_strength)
    if len(glob) < 2:
        raise ValueError(f"views={kind} gives one view; multi-crop takes the two global views of byol or simclr")
    local = [dataclasses.replace(glob[i % 2], size=local_size, crop_scale=tuple(local_crop_scale))
             for i in range(num_local)]
    return glob + local


class _Draw:
    """Random draws for the samples ``[offset, offset + n)`` of a global batch of ``total``.

    Every rank draws the parameters of the whole global batch from the same generator and keeps
    its own slice, so a sample's augmentation does not depend on how the batch is split over ranks.
    """

    def __init__(self, g: torch.Generator, n: int, offset: int = 0, total: int | None = None):
        self.g, self.n, self.offset = g, n, offset
        self.total = n if total is None else total
        if self.offset + n > self.total:
            raise ValueError(f"samples [{offset}, {offset + n}) do not fit a global batch of {self.total}")

    def uniform(self, lo: float, hi: float, *extra: int) -> torch.Tensor:
        r = torch.empty(self.total, *extra).uniform_(lo, hi, generator=self.g)
        return r[self.offset:self.offset + self.n]

    def bernoulli(self, p: float) -> torch.Tensor:
        return (self.uniform(0.0, 1.0) < p).view(self.n, 1, 1, 1)


def _crop_boxes(n: int, h: int, w: int, scale, ratio, d: "_Draw") -> torch.Tensor:
    """Random-resized-crop boxes [n, 4] as (cx, cy, cw, ch) fractions of the image.

    Ten proposals per sample as in torchvision; the first valid one wins, else the full image.
    """
    tries = 10
    area = h * w * d.uniform(scale[0], scale[1], tries)
    logr = d.uniform(math.log(ratio[0]), math.log(ratio[1]), tries)
    r = torch.exp(logr)
    cw = torch.sqrt(area * r).round()
    ch = torch.sqrt(area / r).round()
    ok = (cw <= w) & (ch <= h) & (cw > 0) & (ch > 0)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
    sel = first.clamp(min=0)
    cw = torch.where(first >= 0, cw.gather(1, sel[:, None])[:, 0], torch.full((n,), float(w)))
    ch = torch.where(first >= 0, ch.gather(1, sel[:, None])[:, 0], torch.full((n,), float(h)))
    x0 = torch.floor(d.uniform(0.0, 1.0) * (w - cw + 1))
    y0 = torch.floor(d.uniform(0.0, 1.0) * (h - ch + 1))
    return torch.stack([(x0 + cw / 2) / w, (y0 + ch / 2) / h, cw / w, ch / h], 1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _hue_shift(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``shift`` (fraction of a turn, [B]) in YIQ space (a linear hue rotation)."""
    to_yiq = x.new_tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    from_yiq = torch.linalg.inv(to_yiq)
    theta = shift * 2 * math.pi
    c, s = torch.cos(theta), torch.sin(theta)
    rot = torch.zeros(x.shape[0], 3, 3, dtype=x.dtype)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = c, -s, s, c
    m = from_yiq @ rot @ to_yiq  # [B, 3, 3]
    return torch.einsum("bij,bjhw->bihw", m, x)


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample Gaussian blur, kernel about 10% of the image side (odd), reflect padding."""
    b, c, h, w = x.shape
    k = max(3, int(0.1 * min(h, w)) | 1)
    half = k // 2
    t = torch.arange(k, dtype=x.dtype) - half
    kern = torch.exp(-(t[None] ** 2) / (2 * sigma[:, None] ** 2))
    kern = kern / kern.sum(1, keepdim=True)  # [B, k]
    kern = kern.repeat_interleave(c, 0)  # [B*C, k]
    y = x.reshape(1, b * c, h, w)
    y = F.pad(y, (half, half, half, half), mode="reflect")
    y = F.conv2d(y, kern[:, None, None, :], groups=b * c)
    y = F.conv2d(y, kern[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


class ViewAugment:
    """Turn a uint8 batch [B, C, H, W] into one normalised float view [B, C, size, size]."""

    def __init__(self, spec: ViewSpec, mean, std):
        self.spec = spec
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor, g: torch.Generator, offset: int = 0, total: int | None = None
                 ) -> torch.Tensor:
        """Augment ``images``, which are samples ``[offset, offset + B)`` of a global batch of ``total``."""
        s = self.spec
        x = images.float().div_(255.0)
        b, c, h, w = x.shape
        d = _Draw(g, b, offset, total)
        # crop + flip + resize in one bilinear resample
        box = _crop_boxes(b, h, w, s.crop_scale, s.crop_ratio, d)
        flip = torch.where(d.uniform(0.0, 1.0) < s.flip_p, -1.0, 1.0)
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0] = box[:, 2] * flip
        theta[:, 1, 1] = box[:, 3]
        theta[:, 0, 2] = box[:, 0] * 2 - 1
        theta[:, 1, 2] = box[:, 1] * 2 - 1
        grid = F.affine_grid(theta, [b, c, s.size, s.size], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        # colour jitter, applied with probability jitter_p, in a random order per batch
        if s.jitter_p > 0 and (s.brightness or s.contrast or s.saturation or s.hue):
            y = x
            for op in torch.randperm(4, generator=g).tolist():
                if op == 0 and s.brightness:
                    f = d.uniform(1 - s.brightness, 1 + s.brightness)
                    y = y * f.view(b, 1, 1, 1)
                elif op == 1 and s.contrast:
                    f = d.uniform(1 - s.contrast, 1 + s.contrast).view(b, 1, 1, 1)
                    m = _gray(y).mean((1, 2, 3), keepdim=True)
                    y = (y - m) * f + m
                elif op == 2 and s.saturation and c == 3:
                    f = d.uniform(1 - s.saturation, 1 + s.saturation).view(b, 1, 1, 1)
                    gr = _gray(y)
                    y = (y - gr) * f + gr
                elif op == 3 and s.hue and c == 3:
                    y = _hue_shift(y, d.uniform(-s.hue, s.hue))
                y = y.clamp(0, 1)
            x = torch.where(d.bernoulli(s.jitter_p), y, x)
        if s.grayscale_p > 0 and c == 3:
            x = torch.where(d.bernoulli(s.grayscale_p), _gray(x).expand_as(x), x)
        if s.blur_p > 0:
            sigma = d.uniform(s.blur_sigma[0], s.blur_sigma[1])
            x = torch.where(d.bernoulli(s.blur_p), _blur(x, sigma), x)
        if s.solarize_p > 0:
            x = torch.where(d.bernoulli(s.solarize_p), torch.where(x < 0.5, x, 1.0 - x), x)
        return (x - self.mean) / self.std


def eval_transform(images: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """uint8 [B, C, H, W] -> normalised float [B, C, size, size] (resize only)."""
    x = images.float().div_(255.0)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    sd = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x - m) / sd
