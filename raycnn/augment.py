"""Datasets held on the training device, and batched augmentation on that device.

A split is one uint8 tensor (N, C, H, W) plus int64 labels. Each epoch draws a permutation on
the device and every transform runs on whole batches with per-image random parameters, so the
hot path has no PIL, no DataLoader workers and no host round trip (the airbench approach).
The colour jitter comes in two modes: fast (float ops, op order per batch) and faithful (Pillow's
8-bit arithmetic and a per-image op order, as torchvision's ColorJitter on PIL images).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from raycnn.config import normalization
from raycnn.datafiles import Arrays


@dataclass
class DeviceData:
    """A dataset resident on one device."""
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    val_x: torch.Tensor | None = None
    val_y: torch.Tensor | None = None

    @classmethod
    def from_arrays(cls, arrays: Arrays, device: torch.device) -> "DeviceData":
        """Copy numpy arrays to `device` once (uint8 images: a quarter of float32's memory)."""
        return cls(*(None if a is None else torch.as_tensor(a).to(device) for a in
                     (arrays.train_x, arrays.train_y, arrays.test_x, arrays.test_y, arrays.val_x, arrays.val_y)))


def random_crop(x: torch.Tensor, padding: int, g: torch.Generator) -> torch.Tensor:
    """RandomCrop(size=H, padding) per image: zero-pad, then crop at a random offset each."""
    n, c, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n, 1, 1), device=x.device, generator=g)
    dx = torch.randint(0, 2 * padding + 1, (n, 1, 1), device=x.device, generator=g)
    rows = (dy + torch.arange(h, device=x.device).view(1, h, 1)).expand(n, h, w)
    cols = (dx + torch.arange(w, device=x.device).view(1, 1, w)).expand(n, h, w)
    flat = rows * (w + 2 * padding) + cols                    # index into each padded plane
    planes = padded.flatten(2)                                # (n, c, (h+2p)*(w+2p))
    return planes.gather(2, flat.flatten(1)[:, None].expand(n, c, h * w)).view(n, c, h, w)


def random_flip(x: torch.Tensor, g: torch.Generator, p: float) -> torch.Tensor:
    """RandomHorizontalFlip(p) per image."""
    flip = torch.rand(x.shape[0], 1, 1, 1, device=x.device, generator=g) < p
    return torch.where(flip, x.flip(-1), x)


_PLANE_INDEX: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _plane_index(h: int, w: int, padding: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices of an h x w window at offset (0, 0) of a padded plane, as is and mirrored."""
    key = (h, w, padding, str(device))
    if key not in _PLANE_INDEX:
        rows = torch.arange(h, device=device).view(h, 1) * (w + 2 * padding)
        cols = torch.arange(w, device=device)
        _PLANE_INDEX[key] = ((rows + cols).view(1, h * w), (rows + cols.flip(0)).view(1, h * w))
    return _PLANE_INDEX[key]


def random_crop_flip(x: torch.Tensor, padding: int, g: torch.Generator, p: float) -> torch.Tensor:
    """`random_flip(random_crop(x, padding, g), g, p)` in one gather: the same random draws in the
    same order, the same pixels, a fraction of the passes over the batch (a step of a small net
    on the CPU spends a third of its time in augmentation otherwise)."""
    n, c, h, w = x.shape
    planes = F.pad(x, (padding,) * 4).flatten(2)              # (n, c, (h+2p)*(w+2p))
    dy = torch.randint(0, 2 * padding + 1, (n, 1), device=x.device, generator=g)
    dx = torch.randint(0, 2 * padding + 1, (n, 1), device=x.device, generator=g)
    flip = torch.rand(n, 1, device=x.device, generator=g) < p
    straight, mirrored = _plane_index(h, w, padding, x.device)
    flat = torch.where(flip, mirrored, straight) + (dy * (w + 2 * padding) + dx)
    return planes.gather(2, flat[:, None].expand(n, c, h * w)).view(n, c, h, w)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)   # torchvision's weights


def adjust_brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_brightness with a factor per image (f: (N,))."""
    return (x * f.view(-1, 1, 1, 1)).clamp(0, 1)


def adjust_contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_contrast per image: blend with the image's mean gray level."""
    mean = _grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    f = f.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * mean).clamp(0, 1)


def adjust_saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_saturation per image: blend with the grayscale image."""
    f = f.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * _grayscale(x)).clamp(0, 1)


def adjust_hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_hue per image (f in [-0.5, 0.5]): rotate hue in HSV space."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    v = maxc
    s = delta / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    safe = torch.where(delta == 0, torch.ones_like(delta), delta)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta == 0, torch.zeros_like(h), h)
    h = ((h / 6.0) % 1.0 + f.view(-1, 1, 1)) % 1.0
    i = torch.floor(h * 6.0)
    frac = h * 6.0 - i
    i = i.to(torch.int64) % 6
    p, q, t = v * (1 - s), v * (1 - s * frac), v * (1 - s * (1 - frac))
    # The six sextants of the hue circle, as (r, g, b) choices.
    table = torch.stack([torch.stack(c) for c in
                         ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))])
    return table.gather(0, i[None, None].expand(1, 3, *i.shape)).squeeze(0).permute(1, 0, 2, 3).clamp(0, 1)


FAST_OPS = {"brightness": adjust_brightness, "contrast": adjust_contrast,
              "saturation": adjust_saturation, "hue": adjust_hue}


def color_jitter(x: torch.Tensor, ranges: dict[str, tuple[float, float]], g: torch.Generator,
                 order_g: torch.Generator) -> torch.Tensor:
    """ColorJitter with per-image factors drawn uniformly from `ranges` (name -> (lo, hi)).

    torchvision also shuffles the order of the four ops per call; here the order is shuffled
    once per batch (a per-image order would cost four times the work), drawn from the CPU
    generator `order_g` so that choosing it never waits on the device.
    """
    n = x.shape[0]
    items = list(ranges.items())
    for k in torch.randperm(len(items), generator=order_g).tolist():
        name, (lo, hi) = items[k]
        f = lo + (hi - lo) * torch.rand(n, device=x.device, generator=g)
        x = FAST_OPS[name](x, f)
    return x


# ---------------------------------------------------------------- ColorJitter as PIL computes it
# torchvision's ColorJitter on a PIL image (the report's path) works in 8 bits: every op ends in
# a uint8 image, Pillow's blends truncate toward zero, its luma is a rounded fixed-point sum, hue
# turns in 8-bit HSV, and the op order is drawn per image. These functions reproduce Pillow's C
# code (Blend.c, Convert.c) on whole batches of integer-valued float tensors (0..255). Float32
# where Pillow computes in float, float64 where its C expression is double.

def _blend_u8(degenerate: torch.Tensor, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Image.blend(degenerate, x, f) on uint8 values: float32 sum, truncated, clipped."""
    f = f.to(torch.float32).view(-1, 1, 1, 1)
    out = (x - degenerate) * f          # two roundings, as in C (no fused multiply-add)
    out = out + degenerate
    return out.clamp(0, 255).trunc()


def _luma_u8(x: torch.Tensor) -> torch.Tensor:
    """Pillow's RGB -> L: (R*19595 + G*38470 + B*7471 + 0x8000) >> 16."""
    xi = x.to(torch.int64)
    return ((xi[:, 0] * 19595 + xi[:, 1] * 38470 + xi[:, 2] * 7471 + 0x8000) >> 16).unsqueeze(1).to(x.dtype)


def pil_brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Brightness: blend with black."""
    return _blend_u8(torch.zeros_like(x), x, f)


def pil_contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Contrast: blend with the image's mean luma, rounded to an integer."""
    mean = _luma_u8(x).to(torch.float64).mean(dim=(1, 2, 3), keepdim=True)
    return _blend_u8(torch.floor(mean + 0.5).to(x.dtype), x, f)


def pil_saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Color: blend with the image's luma."""
    return _blend_u8(_luma_u8(x), x, f)


def _rgb_to_hsv_u8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pillow's rgb2hsv: 8-bit H, S, V (N, H, W) as int64."""
    xi = x.to(torch.int64)
    r, g, b = xi.unbind(1)
    maxc, minc = xi.max(1).values, xi.min(1).values
    gray = maxc == minc
    cr = (maxc - minc).clamp(min=1).to(torch.float32)
    s = cr / maxc.clamp(min=1).to(torch.float32)
    rc, gc, bc = ((maxc - c).to(torch.float32) / cr for c in (r, g, b))
    d = torch.float64
    h = torch.where(r == maxc, (bc - gc).to(d),
                    torch.where(g == maxc, 2.0 + rc.to(d) - bc.to(d), 4.0 + gc.to(d) - rc.to(d))).to(torch.float32)
    h = torch.fmod(h.to(d) / 6.0 + 1.0, 1.0).to(torch.float32)
    uh = (h.to(d) * 255.0).trunc().clamp(0, 255).to(torch.int64)
    us = (s.to(d) * 255.0).trunc().clamp(0, 255).to(torch.int64)
    return torch.where(gray, 0, uh), torch.where(gray, 0, us), maxc


def _hsv_to_rgb_u8(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Pillow's hsv2rgb on 8-bit H, S, V; returns (N, 3, H, W) float."""
    d = torch.float64
    i = torch.floor(h.to(d) * 6.0 / 255.0)
    f = (h.to(d) * 6.0 / 255.0 - i).to(torch.float32)
    fs = (s.to(d) / 255.0).to(torch.float32)
    vd = v.to(d)

    def rnd(y):                              # C's round(): half away from zero (y >= 0 here)
        return torch.floor(y + 0.5).clamp(0, 255)
    p = rnd(vd * (1.0 - fs.to(d)))
    q = rnd(vd * (1.0 - (fs * f).to(d)))
    t = rnd(vd * (1.0 - fs.to(d) * (1.0 - f.to(d))))
    table = torch.stack([torch.stack(c) for c in
                         ((vd, t, p), (q, vd, p), (p, vd, t), (p, q, vd), (t, p, vd), (vd, p, q))])
    k = (i.to(torch.int64) % 6)
    rgb = table.gather(0, k[None, None].expand(1, 3, *k.shape)).squeeze(0).permute(1, 0, 2, 3)
    return torch.where((s == 0).unsqueeze(1), vd.unsqueeze(1).expand_as(rgb), rgb).to(torch.float32)


def pil_hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """torchvision's F_pil.adjust_hue: shift 8-bit hue by int(f * 255), wrapping mod 256."""
    h, s, v = _rgb_to_hsv_u8(x)
    shift = (f.to(torch.float64) * 255.0).trunc().to(torch.int64).view(-1, 1, 1)
    return _hsv_to_rgb_u8((h + shift) % 256, s, v).to(x.dtype)


PIL_OPS = {"brightness": pil_brightness, "contrast": pil_contrast,
                  "saturation": pil_saturation, "hue": pil_hue}


def color_jitter_faithful(x: torch.Tensor, ranges: dict[str, tuple[float, float]],
                          g: torch.Generator) -> torch.Tensor:
    """ColorJitter as torchvision runs it on PIL images: factors and op order drawn per image,
    each op on 8-bit values (see PIL_OPS). `x` holds floats in [0, 1] that are multiples
    of 1/255 (an uint8 image, perhaps cropped or flipped); so is the result.

    Batched by position: at step k every image runs the op its own order puts k-th, so the
    work is four ops per image as in the fast mode, done in up to four slices per step."""
    n = x.shape[0]
    names = list(ranges)
    factors = torch.stack([lo + (hi - lo) * torch.rand(n, device=x.device, generator=g)
                           for lo, hi in ranges.values()], 1)                     # (n, ops)
    order = torch.rand(n, len(names), device=x.device, generator=g).argsort(1)    # a permutation per image
    u8 = (x * 255).round()
    for step in range(len(names)):
        for k, name in enumerate(names):
            idx = (order[:, step] == k).nonzero().flatten()
            if len(idx):
                u8[idx] = PIL_OPS[name](u8[idx], factors[idx, k])
    return u8 / 255


class Pipeline:
    """uint8 batch -> float batch for the model: scale to [0, 1], augment (training only: crop,
    flip, jitter, in the report's order), resize where the model needs it, normalize with the
    statistics `normalize` names (see config.NORMALIZATIONS). Built once per trial, so its constants
    live on the device."""

    def __init__(self, dataset: str, device: torch.device, crop_padding: int = 0, flip_p: float = 0.0,
                 jitter: dict[str, tuple[float, float]] | None = None, size: int | None = None,
                 jitter_mode: str = "fast", normalize: str = "dataset"):
        mean, std = normalization(normalize, dataset)
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)
        self.crop_padding, self.flip_p, self.jitter, self.size = crop_padding, flip_p, jitter or {}, size
        self.jitter_mode = jitter_mode

    def __call__(self, x_u8: torch.Tensor, train: bool = False, g: torch.Generator | None = None,
                 order_g: torch.Generator | None = None) -> torch.Tensor:
        # Crop and flip move pixels only, so they run on the uint8 batch (a quarter of the bytes)
        # and commute exactly with the scaling below.
        x = x_u8
        if train and self.crop_padding and self.flip_p:
            x = random_crop_flip(x, self.crop_padding, g, self.flip_p)
        elif train and self.crop_padding:
            x = random_crop(x, self.crop_padding, g)
        elif train and self.flip_p:
            x = random_flip(x, g, self.flip_p)
        x = x.float().div_(255)
        if train and self.jitter:
            x = (color_jitter_faithful(x, self.jitter, g) if self.jitter_mode == "faithful"
                 else color_jitter(x, self.jitter, g, order_g))
        if self.size and self.size != x.shape[-1]:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return x.sub_(self.mean).div_(self.std)   # in place: x is this call's own tensor here
