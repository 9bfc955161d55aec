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
import multiprocessing as mp
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from threadpoolctl import threadpool_limits

from ..memory import one_heap
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
    # Drawn at most 128 px wide and resized: the statistics are scale invariant, the drawing is not free.
    step = max(1.0, max(height, width) / 128.0)
    h0, w0 = max(2, round(height / step)), max(2, round(width / step))
    for i in range(count):
        rgb = _dead_leaves_picture(rng, h0, w0)
        if (h0, w0) != (height, width):
            rgb = _resize(rgb, height, width)
        if channels == 3:
            out[i] = rgb
        else:
            luma = 0.114 * rgb[0] + 0.587 * rgb[1] + 0.299 * rgb[2]
            out[i] = luma[None]
    return out


def _dead_leaves_picture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    size = max(h, w)
    r_min, r_max = max(1.0, size / 60.0), size / 1.5
    background = _natural_colour(rng)
    img = np.empty((3, h, w))
    img[:] = np.asarray(background)[:, None, None]
    discs = _discs(rng, h, w, r_min, r_max)
    if discs:
        _paint(img, np.array(discs))
    img += rng.normal(0.0, 3.0, size=(1, h, w))  # fine texture, shared by the channels (luminance)
    img = _blur(img)
    return np.clip(img, 0.0, 255.0)


def _discs(rng: np.random.Generator, h: int, w: int, r_min: float, r_max: float, count: int = 400) -> list:
    """The discs of one picture, back to front (later discs occlude earlier ones): box, centre, radius,
    colour and tilts, one tuple each, for the ones that cover a pixel.

    The hot loop of the probes (48,000 discs a GenderNet run), written out: the same draws in the same
    order as rng.uniform(lo, hi) (= lo + (hi - lo) * random()), the same arithmetic."""
    random, beta, gauss = rng.random, rng.beta, rng.standard_normal  # (bound once)
    max_sq, min_sq = r_max ** 2, r_min ** 2
    sqrt = math.sqrt
    discs = []
    for _ in range(count):
        u, at_y, at_x = random(3).tolist()  # (one call: the same draws as three)
        # radius density ~ r^-3 between r_min and r_max (scale invariance)
        r = 1.0 / sqrt(u / max_sq + (1.0 - u) / min_sq)
        cy = -r + ((h + r) + r) * at_y
        cx = -r + ((w + r) + r) * at_x
        y0, y1 = int(cy - r), int(cy + r) + 1
        x0, x1 = int(cx - r), int(cx + r) + 1
        y0, x0 = (y0 if y0 > 0 else 0), (x0 if x0 > 0 else 0)
        y1, x1 = (y1 if y1 < h else h), (x1 if x1 < w else w)
        if y0 >= y1 or x0 >= x1:
            continue
        # a pixel centre of the box in the disc? Surely when the centre is within the box's pixel
        # centres (the nearest lies within sqrt(0.5) < r_min); else test the box's nearest lattice point
        if not (y0 <= cy <= y1 - 1 and x0 <= cx <= x1 - 1) and not _covers_a_pixel(cy, cx, r, y0, y1, x0, x1):
            continue
        # the colour (a beta, three normals) and the two tilts: one call for the five normals
        lum = beta(2.0, 2.0) * 255.0
        b, g, red, tilt_y, tilt_x = gauss(5).tolist()
        discs.append((y0, y1, x0, x1, cy, cx, r, *_colour(lum, 0.25 * b, 0.25 * g, 0.25 * red), tilt_y, tilt_x))
    return discs


def _nearest_square(c: float, lo: int, hi: int) -> float:
    """(k - c)^2 for the integer k in [lo, hi) nearest to c (as numpy's (k - c) ** 2)."""
    floor = math.floor(c)
    below = min(max(floor, lo), hi - 1)
    above = min(max(floor + 1, lo), hi - 1)
    return min((below - c) * (below - c), (above - c) * (above - c))


def _covers_a_pixel(cy: float, cx: float, r: float, y0: int, y1: int, x0: int, x1: int) -> bool:
    """Whether a pixel centre of the box lies in the disc: the box's nearest lattice point to the centre
    (per axis, the integer in range nearest the centre coordinate) is the one to test."""
    return _nearest_square(cy, y0, y1) + _nearest_square(cx, x0, x1) <= r * r


def _paint(img: np.ndarray, discs: np.ndarray) -> None:
    """Paint the discs in order (the last one covering a pixel wins), all at once: every disc's box
    pixels are listed, the ones inside kept, and each pixel takes the last (largest-index) disc covering it."""
    y0, y1, x0, x1 = discs[:, :4].astype(np.int64).T  # one row per disc: box, centre, radius, colour, tilts
    cy, cx, r = discs[:, 4:7].T
    colour, (tilt_y, tilt_x) = discs[:, 7:10], discs[:, 10:12].T
    _, h, w = img.shape
    widths = x1 - x0
    areas = (y1 - y0) * widths
    disc = np.repeat(np.arange(len(areas)), areas)
    local = np.arange(int(areas.sum())) - np.repeat(np.cumsum(areas) - areas, areas)
    yy = y0[disc] + local // widths[disc]
    xx = x0[disc] + local % widths[disc]
    inside = (yy - cy[disc]) ** 2 + (xx - cx[disc]) ** 2 <= (r * r)[disc]
    top = np.full(h * w, -1, dtype=np.int64)
    np.maximum.at(top, (yy * w + xx)[inside], disc[inside])  # the last disc painted over each pixel
    pixel = np.flatnonzero(top >= 0)
    k = top[pixel]
    py, px = pixel // w, pixel % w
    shade = 1.0 + 0.3 * ((py - cy[k]) * tilt_y[k] + (px - cx[k]) * tilt_x[k]) / np.maximum(r[k], 1.0) / 2
    flat = img.reshape(3, -1)
    flat[:, pixel] = colour[k].T * shade[None]


def _resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize (corners aligned) of a (C, h, w) picture to (C, height, width): two small matrix products."""
    _, h, w = img.shape
    return _interpolation(h, height) @ img @ _interpolation(w, width).T


def _interpolation(n: int, size: int) -> np.ndarray:
    """(size, n) linear interpolation weights from n samples to size samples, ends aligned."""
    at = np.linspace(0, n - 1, size)
    below = np.floor(at).astype(np.int64)
    above = np.minimum(below + 1, n - 1)
    frac = at - below
    matrix = np.zeros((size, n))
    rows = np.arange(size)
    matrix[rows, below] += 1 - frac
    matrix[rows, above] += frac
    return matrix


def _natural_colour(rng: np.random.Generator) -> tuple[float, float, float]:
    """A BGR colour: mostly unsaturated, correlated channels, luminance spread over the range."""
    lum = rng.beta(2.0, 2.0) * 255.0
    b, g, r = rng.normal(0.0, 0.25, size=3).tolist()
    return _colour(lum, b, g, r)


def _colour(lum: float, b: float, g: float, r: float) -> tuple[float, float, float]:
    """The channels of luminance ``lum`` tinted by (b, g, r), clipped in plain floats (np.clip's overhead,
    47,000 times a run, was a tenth of the probes' time)."""
    return _byte_range(lum * (1.0 + b)), _byte_range(lum * (1.0 + g)), _byte_range(lum * (1.0 + r))


def _byte_range(v: float) -> float:
    return 0.0 if v < 0.0 else 255.0 if v > 255.0 else v


def _blur(img: np.ndarray) -> np.ndarray:
    """A 3-tap [1, 2, 1]/4 blur along both spatial axes (anti-aliased edges, as a camera gives)."""
    padded = np.pad(img, ((0, 0), (1, 1), (1, 1)), mode="edge")
    v = (padded[:, :-2] + 2 * padded[:, 1:-1] + padded[:, 2:]) / 4.0
    return (v[:, :, :-2] + 2 * v[:, :, 1:-1] + v[:, :, 2:]) / 4.0


# ------------------------------------------------------------------ the input convention

# Natural photographs: mean and spread of 8-bit pixel values (what an input BatchNorm was fed).
PICTURE_MEAN, PICTURE_STD = 115.0, 65.0
# Trained biases are a sizeable fraction of the first layer's response in the units it was trained
# in (measured on the dev zoo, 4 probe draws each: VDSR 0.27-0.32, SRCNN 0.27-0.29, NIN 0.37-0.41,
# VanillaCNN 0.92-0.96 under their own conventions); below this under every convention they carry no
# information about the scale. Half the smallest trained ratio: a ratio estimated on 4 pictures varies
# by ~10% with the draw, and GenderNet's near-zero biases reach 0.018-0.021 under [0, 1] (at 0.02 the
# inferred convention, and the whole plan, flipped with --seed).
UNINFORMATIVE_BIAS_RATIO = 0.05
TYPICAL_BIAS_RATIO = 0.3


@dataclass(frozen=True)
class InferredConvention:
    convention: Convention
    evidence: str  # how it was chosen, for the report


def _consumers(net: Net, blob: str) -> list[Layer]:
    return [layer for layer in net.layers if blob in layer.bottoms]


def _batchnorm_stats(layer: Layer) -> tuple[np.ndarray, np.ndarray] | None:
    if layer.type != "BatchNorm" or len(layer.blobs) < 2:
        return None
    factor = float(layer.blobs[2].reshape(-1)[0]) if len(layer.blobs) > 2 and layer.blobs[2].size else 1.0
    factor = 1.0 / factor if factor != 0 else 0.0
    mean = layer.blobs[0].astype(np.float64) * factor
    var = layer.blobs[1].astype(np.float64) * factor
    return mean, np.sqrt(np.maximum(var, 1e-12))


def _first_conv_response(layer: Layer, x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(responses without bias, bias) of a convolution at sampled positions: ((P, T), (T,))."""
    from .analyse import sample_patches

    geo = conv_geometry(layer)
    oh = (x.shape[2] + 2 * geo.pad[0] - (geo.dilation[0] * (geo.kernel[0] - 1) + 1)) // geo.stride[0] + 1
    ow = (x.shape[3] + 2 * geo.pad[1] - (geo.dilation[1] * (geo.kernel[1] - 1) + 1)) // geo.stride[1] + 1
    patches = sample_patches(x, layer, (x.shape[0], geo.num_output, oh, ow), rng)
    w = layer.blobs[0]
    g = geo.group
    sg = w.shape[1]
    t_g = w.shape[0] // g
    parts = [
        patches[:, i * sg:(i + 1) * sg].reshape(len(patches), -1) @ w[i * t_g:(i + 1) * t_g].reshape(t_g, -1).T
        for i in range(g)
    ]
    bias = layer.blobs[1].astype(np.float64) if geo.bias_term and len(layer.blobs) > 1 else np.zeros(w.shape[0])
    return np.concatenate(parts, axis=1).astype(np.float64), bias


def infer_convention(net: Net, input_name: str, shape: Sequence[int], *, seed: int = 0) -> InferredConvention:
    """The input convention the model was most likely trained with (see the module docstring)."""
    consumers = _consumers(net, input_name)
    for layer in consumers:
        stats = _batchnorm_stats(layer)
        if stats is not None:
            mean, std = stats
            scale = tuple(float(s) / PICTURE_STD for s in std)
            offset = tuple(PICTURE_MEAN - float(m) / s for m, s in zip(mean, scale))
            return InferredConvention(
                Convention("batchnorm", offset, scale, f"mean/std of the input BatchNorm '{layer.name}'"),
                f"input BatchNorm '{layer.name}'")
    convs = [layer for layer in consumers if layer.type == "Convolution" and layer.blobs]
    if len(shape) != 4 or not convs:
        return InferredConvention(COMMON_CONVENTIONS[0], "default (no first convolution to read)")
    conv = convs[0]
    h, w = min(int(shape[2]), 96), min(int(shape[3]), 96)
    geo = conv_geometry(conv)
    if h < geo.kernel[0] or w < geo.kernel[1]:
        h, w = int(shape[2]), int(shape[3])
    pictures = dead_leaves(4, int(shape[1]), h, w, seed=seed)
    bn = next((s for s in map(_batchnorm_stats, _consumers(net, conv.tops[0])) if s is not None), None)
    scores = {}
    for convention in COMMON_CONVENTIONS:
        rng = np.random.default_rng(seed)
        response, bias = _first_conv_response(conv, convention.apply(pictures), rng)
        if bn is not None:  # the BatchNorm after it saw this convolution's output during training
            bn_mean, bn_std = bn
            z = response + bias
            spread = np.log(np.maximum(z.std(axis=0), 1e-12) / bn_std)
            shift = (z.mean(axis=0) - bn_mean) / bn_std
            scores[convention.name] = float(np.median(spread ** 2 + np.minimum(shift ** 2, 25.0)))
        else:
            ratio = float(np.mean(np.abs(bias)) / max(float(np.mean(response.std(axis=0))), 1e-30))
            scores[convention.name] = ratio
    if bn is not None:
        best = min(scores, key=scores.get)
        return InferredConvention(_named(best), f"statistics of the BatchNorm after '{conv.name}'")
    informative = {name: r for name, r in scores.items() if r >= UNINFORMATIVE_BIAS_RATIO}
    if not informative:
        return InferredConvention(COMMON_CONVENTIONS[0], f"default ('{conv.name}' biases are negligible)")
    best = min(informative, key=lambda name: abs(math.log(informative[name] / TYPICAL_BIAS_RATIO)))
    return InferredConvention(_named(best), f"bias-to-response ratio of '{conv.name}'")


def ranked_conventions(net: Net, input_name: str, shape: Sequence[int], *, seed: int = 0) -> list[InferredConvention]:
    """The inferred convention first, then the other common ones (tried when the first leaves the
    network's outputs constant, i.e. the probes do not exercise it)."""
    first = infer_convention(net, input_name, shape, seed=seed)
    rest = [InferredConvention(c, f"fallback: under '{first.convention.name}' the outputs did not vary")
            for c in COMMON_CONVENTIONS if c.name != first.convention.name]
    return [first, *rest]


def _named(name: str) -> Convention:
    return next(c for c in COMMON_CONVENTIONS if c.name == name)


class Pictures:
    """Probe inputs kept as 8-bit pictures and converted to the convention per slice (a quarter of the memory).

    Behaves like a read-only (N, C, H, W) float32 array for ``shape``, ``len`` and slicing.
    """

    def __init__(self, pictures: np.ndarray, convention: Convention) -> None:
        self.pictures = pictures
        self.convention = convention
        self._lut: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.pictures.shape

    def __len__(self) -> int:
        return self.pictures.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        part = self.pictures[index]
        part = part if part.ndim == 4 else part[None]
        table = self._table(part.shape[1])
        out = np.empty(part.shape, dtype=np.float32)
        for c in range(part.shape[1]):
            np.take(table[c], part[:, c], out=out[:, c])
        return out

    def _table(self, channels: int) -> np.ndarray:
        """(channels, 256) float32: each byte value in the convention (Convention.apply of it, to the bit),
        so a slice is one lookup, not a float64 pass over every pixel."""
        if self._lut is None or self._lut.shape[0] != channels:
            values = np.broadcast_to(np.arange(256, dtype=np.float32)[None, :, None, None], (1, 256, channels, 1))
            self._lut = np.ascontiguousarray(self.convention.apply(values.transpose(0, 2, 1, 3))[0, :, :, 0])
        return self._lut

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self[:] if dtype is None else self[:].astype(dtype)


class PictureSource:
    """Probe pictures drawn once per (shape, seed): a later request reuses the pictures already drawn for
    that seed and continues its stream for more (so the 8 probes that test a convention are the first 8
    planning probes, and every convention tried sees the same pictures)."""

    def __init__(self) -> None:
        self._drawn: dict[tuple, tuple[np.random.Generator, list[np.ndarray]]] = {}

    def pictures(self, dims: tuple[int, ...], count: int, seed: int) -> np.ndarray:
        """(count, C, H, W) uint8 pictures."""
        if (dims, seed) not in self._drawn:
            self._drawn[(dims, seed)] = (np.random.default_rng(seed), [])
        rng, drawn = self._drawn[(dims, seed)]
        seeds = [int(rng.integers(1 << 31)) for _ in range(count - len(drawn))]  # (one seed per picture)
        drawn.extend(_draw_pictures(dims, seeds))
        return np.stack(drawn[:count])


PARALLEL_PICTURES = 16  # from this many pictures on, half are drawn by a forked worker on the other core


def _picture(dims: tuple[int, ...], seed: int) -> np.ndarray:
    """One (C, H, W) uint8 probe picture; each depends only on its own seed."""
    pic = dead_leaves(1, dims[1], dims[2], dims[3], seed=seed)[0]
    return np.clip(np.rint(pic), 0, 255).astype(np.uint8)


def _pictures(dims: tuple[int, ...], seeds: Sequence[int]) -> list[np.ndarray]:
    return [_picture(dims, s) for s in seeds]


def _draw_pictures(dims: tuple[int, ...], seeds: Sequence[int]) -> list[np.ndarray]:
    """The pictures of ``seeds``, in order: the second half drawn by a forked worker process while this one
    draws the first (the drawing is Python, one core each; the same pictures either way). Off Linux (where
    forking a process that has threads is not safe), with one core or with a few pictures, all here."""
    with threadpool_limits(limits=1, user_api="blas"):  # (small products: a second BLAS thread only spins)
        if len(seeds) < PARALLEL_PICTURES or (os.cpu_count() or 1) < 2 or not sys.platform.startswith("linux"):
            return _pictures(dims, seeds)
        return _forked_halves(dims, seeds)


def _forked_halves(dims: tuple[int, ...], seeds: Sequence[int]) -> list[np.ndarray]:
    half = len(seeds) // 2
    one_heap()  # (the pool's result thread would otherwise take an arena of its own for the pictures it receives)
    try:
        pool = ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("fork"))
    except (OSError, ValueError):  # (no processes to be had here: draw them all in this one)
        return _pictures(dims, seeds)
    try:
        later = pool.submit(_pictures, dims, seeds[half:])
        first = _pictures(dims, seeds[:half])
        try:
            return first + later.result()
        except (OSError, BrokenProcessPool):  # (the worker could not start or died: draw its half here)
            return first + _pictures(dims, seeds[half:])
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def natural_probes(shape: Sequence[int], count: int, convention: Convention, *, seed: int,
                   source: PictureSource | None = None):
    """(count, C, H, W) natural-image-like inputs in ``convention`` (as :class:`Pictures`);
    a non-image input gets N(0, 1) values (an ndarray)."""
    dims = tuple(int(d) for d in shape)
    if len(dims) != 4 or min(dims[2:]) < 4:
        return np.random.default_rng(seed).standard_normal((count,) + dims[1:]).astype(np.float32)
    return Pictures((source or PictureSource()).pictures(dims, count, seed), convention)
