"""Probe inputs without user data: natural-image-like pictures in the input convention the model expects.

Pictures come from a *dead-leaves* model (occluding discs with power-law radii, correlated colours,
soft shading and fine texture): its edge, colour and 1/f spectrum statistics are close to those of
photographs, unlike white or smooth noise. Each picture is an 8-bit-range BGR image; a
:class:`Convention` maps it to network input units.

The convention is inferred from the weights (:func:`infer_convention`):
1. a BatchNorm reading the input directly gives the input's mean and spread per channel;
2. a BatchNorm after the first convolution gives that convolution's output statistics: the
   convention whose pictures reproduce them best wins;
3. otherwise, the first convolution's response: the convention under which its output units are
   most selective (neither always on nor always off, which is what training makes of them).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from ..net import Layer, Net, conv_geometry

IMAGENET_MEAN_BGR = (104.0, 117.0, 123.0)


@dataclass(frozen=True)
class Convention:
    """input = (picture - mean) * scale, per channel; picture in 0..255 (BGR or luma)."""

    name: str
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    description: str

    def apply(self, pictures: np.ndarray) -> np.ndarray:
        """pictures : (N, C, H, W) float in 0..255 -> network input, float32."""
        c = pictures.shape[1]
        mean = np.resize(np.asarray(self.mean, dtype=np.float64), c)[None, :, None, None]
        scale = np.resize(np.asarray(self.scale, dtype=np.float64), c)[None, :, None, None]
        return ((pictures - mean) * scale).astype(np.float32)


COMMON_CONVENTIONS = (
    Convention("pixels-mean", IMAGENET_MEAN_BGR, (1.0,), "0..255 minus a mean"),
    Convention("pixels", (0.0,), (1.0,), "0..255"),
    Convention("unit", (0.0,), (1.0 / 255.0,), "[0, 1]"),
    Convention("symmetric", (127.5,), (1.0 / 128.0,), "[-1, 1]"),
)


# ------------------------------------------------------------------ pictures


def dead_leaves(count: int, channels: int, height: int, width: int, *, seed: int) -> np.ndarray:
    """(count, channels, height, width) float64 pictures in 0..255, natural-image-like.

    channels 3 gives BGR; any other count gives luma replicated per channel.
    """
    rng = np.random.default_rng(seed)
    out = np.empty((count, channels, height, width))
    for i in range(count):
        rgb = _dead_leaves_picture(rng, height, width)
        if channels == 3:
            out[i] = rgb
        else:
            luma = 0.114 * rgb[0] + 0.587 * rgb[1] + 0.299 * rgb[2]
            out[i] = luma[None]
    return out


def _dead_leaves_picture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    size = max(h, w)
    r_min, r_max = max(1.0, size / 60.0), size / 1.5
    img = np.empty((3, h, w))
    img[:] = _natural_colour(rng)[:, None, None]
    yy, xx = np.mgrid[0:h, 0:w]
    # back to front: later discs occlude earlier ones
    for _ in range(400):
        u = rng.random()
        # radius density ~ r^-3 between r_min and r_max (scale invariance)
        r = 1.0 / math.sqrt(u / r_max ** 2 + (1.0 - u) / r_min ** 2)
        cy, cx = rng.uniform(-r, h + r), rng.uniform(-r, w + r)
        y0, y1 = max(int(cy - r), 0), min(int(cy + r) + 1, h)
        x0, x1 = max(int(cx - r), 0), min(int(cx + r) + 1, w)
        if y0 >= y1 or x0 >= x1:
            continue
        sy, sx = yy[y0:y1, x0:x1], xx[y0:y1, x0:x1]
        inside = (sy - cy) ** 2 + (sx - cx) ** 2 <= r * r
        if not inside.any():
            continue
        colour = _natural_colour(rng)
        shade = 1.0 + 0.3 * ((sy - cy) * rng.normal() + (sx - cx) * rng.normal()) / max(r, 1.0) / 2
        region = img[:, y0:y1, x0:x1]
        region[:, inside] = (colour[:, None, None] * shade[None])[:, inside]
    img += rng.normal(0.0, 3.0, size=(1, h, w))  # fine texture, shared by the channels (luminance)
    img = _blur(img)
    return np.clip(img, 0.0, 255.0)


def _natural_colour(rng: np.random.Generator) -> np.ndarray:
    """A BGR colour: mostly unsaturated, correlated channels, luminance spread over the range."""
    lum = rng.beta(2.0, 2.0) * 255.0
    tint = rng.normal(0.0, 0.25, size=3)
    return np.clip(lum * (1.0 + tint), 0.0, 255.0)


def _blur(img: np.ndarray) -> np.ndarray:
    """A 3-tap [1, 2, 1]/4 blur along both spatial axes (anti-aliased edges, as a camera gives)."""
    padded = np.pad(img, ((0, 0), (1, 1), (1, 1)), mode="edge")
    v = (padded[:, :-2] + 2 * padded[:, 1:-1] + padded[:, 2:]) / 4.0
    return (v[:, :, :-2] + 2 * v[:, :, 1:-1] + v[:, :, 2:]) / 4.0
