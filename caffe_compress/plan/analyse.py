"""The trade-off: which layers to factor, at which rank, from one knob T in [0, 1].

Criterion (data-free by default, output-aware, global):

1. For every decomposable layer and a grid of candidate ranks, the relative
   error of that layer's *output* on probe activations (random smooth images,
   or calibration images, propagated through the original net in OpenCV):
   ``e_L(r) = ||Y_L - Y_L(r)|| / ||Y_L||``. For SVD this is exact for every
   rank from one projection; for CP it comes from sampled im2col patches.
2. A per-layer gain ``g_L``: how much of a layer's output error reaches the
   network output, measured once per layer in OpenCV by running the net with
   only that layer approximated. Layers whose errors are washed out (e.g. a
   wide fc6 feeding a 2-way classifier) get a small gain and are cut harder.
3. The predicted network-output error of a plan is
   ``E = sqrt(sum_L (g_L e_L(r_L))^2)``.
4. A price lambda on squared error: each layer takes the option (unfactored
   or a grid rank) that minimises its cost (file bytes and MACs, as fractions
   of the decomposable layers' totals, equally weighted) + lambda * (g e)^2.
5. T sets the budget ``budget(T) = ERROR_SCALE * ln(1 / (1 - T))`` and picks the
   lowest lambda whose predicted error fits it. So T = 0 is lossless
   (lambda = inf), T = 1 takes every layer to its minimal rank (lambda = 0),
   and since a larger budget only lowers lambda, and a lower lambda never
   raises a rank, the file size never grows with T.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from ..decompose import (
    ConvFactors, CPKernel, LinearFactors, SpatialFactors, SpectralBasis, TuckerFactors, cp_conv, cp_reconstruct,
    spatial_basis, spatial_factors, spatial_reconstruct, spectral_basis, tucker2_conv, tucker_ranks, tucker_reconstruct,
)
from ..decompose.svd import PARTIAL_ABOVE
from ..decompose.tucker import HOOI_SWEEPS, hosvd_bases
from ..errors import UsageError
from ..net import Layer, Net, conv_geometry, inner_product_geometry
from ..rewrite import conv_group_kernels, inner_product_matrix

log = logging.getLogger(__name__)

# Budget scale: a predicted relative output error of 0.13 * ln(1 / (1 - T)), i.e.
# 0.09 at T = 0.5, 0.30 at 0.9, 0.39 at 0.95, 0.60 at 0.99. Calibrated once
# against GenderNet's measured accuracy (RMS output changes up to ~0.4 cost it no
# accuracy on UTKFace); see gendernet/README.md.
ERROR_SCALE = 0.13
# (layer, its CP grid's total ranks, descending) -> the largest worth analysing, or None for all: CP-ALS is the
# analysis' costliest part, and ranks whose form the planner will never be offered (measured slower) are skipped
RankCap = Callable[[Layer, Sequence[int]], "int | None"]
MIN_RANK_DIVISOR = 64  # the minimal sensible rank is min(dims) / 64 (at least 1)
PATCH_SAMPLES = 1024

METHOD_SVD = "svd"
METHOD_CP = "cp"
METHOD_POINTWISE = "svd-1x1"
METHOD_TUCKER = "tucker2"
METHOD_SPATIAL = "spatial-svd"
METHOD_KEEP = "keep"
CONV_FORMS = (METHOD_CP, METHOD_TUCKER, METHOD_SPATIAL)  # the exact forms of a k x k convolution
FORMS = (METHOD_SVD, METHOD_POINTWISE, *CONV_FORMS)

Choice = tuple  # (method, rank): what the plan does with one factored layer


def error_budget(tradeoff: float) -> float:
    """Allowed predicted relative output error for trade-off T: 0 at T = 0, inf at T = 1."""
    if tradeoff >= 1.0:
        return math.inf
    return ERROR_SCALE * math.log(1.0 / (1.0 - tradeoff))


def check_tradeoff(tradeoff: float, *, option: str = "--tradeoff") -> float:
    try:
        value = float(tradeoff)
    except (TypeError, ValueError):
        raise UsageError(f"{option}: '{tradeoff}' is not a number") from None
    if not (0.0 <= value <= 1.0):  # also rejects NaN
        raise UsageError(f"{option}: {tradeoff} is outside [0, 1]")
    return value


# ------------------------------------------------------------------ costs


@dataclass(frozen=True)
class Totals:
    """The decomposable layers' original totals, the denominators of a plan's cost."""

    params: int
    macs: int
    time_ms: float  # sum of the measured original times of the layers that were timed


@dataclass(frozen=True)
class Candidate:
    """A decomposable layer in one exact form, and everything the planner knows about it."""

    layer: str
    type: str
    method: str
    weight_shape: tuple[int, ...]
    groups: int
    params_before: int
    macs_before: int
    ranks: tuple[int, ...]  # descending, all below break-even
    params_at: Mapping[int, int]
    macs_at: Mapping[int, int]
    weight_error: Mapping[int, float]
    output_error: Mapping[int, float]
    gain: float = 1.0
    time_before: float | None = None  # measured ms of the original layer alone in OpenCV (None: not timed)
    time_at: Mapping[int, float] = field(default_factory=dict)  # measured/interpolated ms of the factored form

    def cost(self, rank: int | None, totals: Totals, weights: tuple[float, float] = (1.0, 1.0)) -> float:
        """Weighted share of the totals: bytes (parameters) and time (measured, else MACs)."""
        params = self.params_before if rank is None else self.params_at[rank]
        size = params / max(totals.params, 1)
        if self.time_before is not None and totals.time_ms > 0:
            speed = (self.time_before if rank is None else self.time_at[rank]) / totals.time_ms
        else:
            macs = self.macs_before if rank is None else self.macs_at[rank]
            speed = macs / max(totals.macs, 1)
        return weights[0] * size + weights[1] * speed

    def speedup(self, rank: int) -> float | None:
        """Predicted original/factored layer time (None when the layer was not timed)."""
        if self.time_before is None or rank not in self.time_at:
            return None
        return self.time_before / max(self.time_at[rank], 1e-9)


def totals_of(candidates: Sequence[Candidate]) -> Totals:
    """Totals over layers (a layer with several forms counts once)."""
    first = {}
    for c in candidates:
        first.setdefault(c.layer, c)
    return Totals(sum(c.params_before for c in first.values()), sum(c.macs_before for c in first.values()),
                  sum(c.time_before or 0.0 for c in first.values()))


@dataclass(frozen=True)
class LayerPlan:
    """What the plan does with one layer (decomposable or not)."""

    layer: str
    type: str
    weight_shape: tuple[int, ...]
    method: str
    rank: int | None
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    weight_error: float
    output_error: float  # estimated relative error of this layer's output
    reason: str = ""  # why it is kept, or why this form
    time_before: float | None = None  # measured ms of the layer alone (1 thread, capped map size)
    time_after: float | None = None  # predicted ms of the factored form (measured at the grid ends)


@dataclass(frozen=True)
class Plan:
    tradeoff: float
    error_budget: float
    predicted_error: float
    layers: tuple[LayerPlan, ...]


@dataclass
class Workspace:
    """Per-layer state the planner builds once and the rewrite reuses (bases and factors per form)."""

    bases: dict[str, list[SpectralBasis]] = field(default_factory=dict)  # svd / svd-1x1, per group
    cp: dict[str, dict[int, list[ConvFactors]]] = field(default_factory=dict)
    tucker: dict[str, dict[tuple, list[TuckerFactors]]] = field(default_factory=dict)
    hosvd: dict[str, list[tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)  # per group
    spatial: dict[str, list[SpectralBasis]] = field(default_factory=dict)  # per group

    def linear_factors(self, name: str, rank_total: int) -> list[LinearFactors]:
        bases = self.bases[name]
        return [b.factors(rank_total // len(bases)) for b in bases]

    def spatial_factors(self, name: str, shape: tuple[int, ...], rank_total: int) -> list[SpatialFactors]:
        bases = self.spatial[name]
        g = len(bases)
        return [spatial_factors(b, (shape[0] // g, *shape[1:]), rank_total // g) for b in bases]

    def tucker_factors(self, name: str, kernels: Sequence[np.ndarray], rank_total: int, *,
                       polish: bool = False) -> list[TuckerFactors]:
        """HOSVD factors for the analysis (an error estimate on the safe side), HOOI-polished for the model."""
        store = self.tucker.setdefault(name, {})
        key = (rank_total, polish)
        if key not in store:
            sweeps = HOOI_SWEEPS if polish else 0
            if name not in self.hosvd:
                self.hosvd[name] = [hosvd_bases(k) for k in kernels]
            bases = self.hosvd[name]
            store[key] = [tucker2_conv(k, rank_total // len(kernels), sweeps=sweeps, bases=b)
                          for k, b in zip(kernels, bases)]
        return store[key]


def _rank_grid(low: int, high: int, step: int, *, fine: bool = True) -> tuple[int, ...]:
    """Descending candidate ranks between low and high: 1, (1.5,) 2, (3,) 4, (6,) 8, ... (multiples of step)."""
    values = set()
    r = 1
    while r <= high:
        for v in ((r, (3 * r) // 2) if fine else (r,)):
            if low <= v <= high:
                values.add(v)
        r *= 2
    values.add(high)
    grid = sorted({max(step, (v // step) * step) for v in values if v >= low}, reverse=True)
    return tuple(v for v in grid if low <= v <= high)


def _spatial_size(acts_shape: tuple[int, ...] | None) -> int:
    if not acts_shape or len(acts_shape) < 3:
        return 1
    return int(np.prod(acts_shape[2:]))


def describe_layer(layer: Layer, *, keep: bool) -> tuple[str, str]:
    """(method, reason-if-left-alone) for one layer."""
    if layer.type == "InnerProduct":
        method = METHOD_SVD
    elif layer.type == "Convolution":
        geo = conv_geometry(layer)
        s_group = layer.blobs[0].shape[1]
        if s_group == 1 and geo.group > 1:  # one input channel per group, several groups
            return METHOD_KEEP, "depthwise convolution: already separable"
        if geo.axis != 1:
            return METHOD_KEEP, f"convolution over axis {geo.axis} is not supported"
        method = METHOD_POINTWISE if geo.kernel == (1, 1) else METHOD_CP
    elif layer.type == "Deconvolution":
        return METHOD_KEEP, "deconvolution is not decomposed"
    else:
        return METHOD_KEEP, ""
    if keep:
        return METHOD_KEEP, "kept (--keep)"
    return method, ""


def layer_forms(layer: Layer, method: str) -> tuple[str, ...]:
    """The exact forms a layer of primary ``method`` can take: CP, Tucker-2 and (k x k) spatial SVD for a
    k x k convolution, the one SVD otherwise."""
    if method != METHOD_CP:
        return (method,)
    kh, kw = conv_geometry(layer).kernel
    return CONV_FORMS if kh > 1 and kw > 1 else (METHOD_CP, METHOD_TUCKER)


def _params_at(method: str, shape: tuple[int, ...], groups: int, rank: int, bias: int) -> int:
    if method == METHOD_SVD:
        n, k = shape
        return rank * (n + k) + bias
    t, sg, kh, kw = shape
    tg, rg = t // groups, rank // groups
    if method == METHOD_POINTWISE:
        return rank * sg + t * rg + bias
    if method == METHOD_TUCKER:
        r_in, r_out = tucker_ranks(rg, tg, sg)
        return groups * (r_in * sg + r_out * r_in * kh * kw + tg * r_out) + bias
    if method == METHOD_SPATIAL:
        return groups * (rg * sg * kh + tg * rg * kw) + bias
    return rank * (sg + kh + kw) + t * rg + bias


def _macs_at(method: str, shape, groups, rank, in_spatial: int, out_spatial: int, rows: int) -> int:
    if method == METHOD_SVD:
        n, k = shape
        return rows * rank * (n + k)
    t, sg, kh, kw = shape
    tg, rg = t // groups, rank // groups
    if method == METHOD_POINTWISE:
        return out_spatial * (rank * sg + t * rg)
    if method == METHOD_TUCKER:
        r_in, r_out = tucker_ranks(rg, tg, sg)
        return groups * (in_spatial * r_in * sg + out_spatial * r_out * (r_in * kh * kw + tg))
    if method == METHOD_SPATIAL:  # the kh x 1 layer runs on (output rows x input columns) <= the input grid
        return groups * (in_spatial * rg * sg * kh + out_spatial * tg * rg * kw)
    # 1x1 on the input grid, kh x 1 on (rows of output, cols of input) ~ input grid, 1 x kw and 1x1 on output grid
    return in_spatial * rank * sg + in_spatial * rank * kh + out_spatial * rank * kw + out_spatial * t * rg


def max_rank(layer: Layer, method: str) -> int:
    """The largest rank a user may force (full rank of one group's matrix / tensor bound)."""
    if method == METHOD_SVD:
        return min(inner_product_matrix(layer).shape)
    t, sg, kh, kw = layer.blobs[0].shape
    groups = conv_geometry(layer).group
    tg = t // groups
    if method == METHOD_POINTWISE:
        return min(tg, sg) * groups
    if method == METHOD_TUCKER:
        return max(tg, sg) * groups
    if method == METHOD_SPATIAL:
        return min(sg * kh, tg * kw) * groups
    return min(tg * sg, sg * kh * kw, tg * kh * kw) * groups


# ------------------------------------------------------------------ per-layer analysis


def wide_rank_cap(m: int) -> int:
    """The highest rank the planner considers for an SVD whose shorter side is ``m``: all of it up to
    PARTIAL_ABOVE, past it (where a complete spectrum costs seconds) 1024 or a quarter of the side, whichever
    is larger -- for a 4096-wide layer a quarter, which still keeps at least 2x fewer weights."""
    return m if m <= PARTIAL_ABOVE else max(PARTIAL_ABOVE // 2, m // 4)


def _ip_rows(x: np.ndarray, axis: int) -> np.ndarray:
    axis = axis if axis >= 0 else x.ndim + axis
    lead = int(np.prod(x.shape[:axis])) if axis > 0 else 1
    return x.reshape(lead, -1).astype(np.float32)


def sample_patches(x: np.ndarray, layer: Layer, out_shape: tuple[int, ...], rng, count: int = PATCH_SAMPLES) -> np.ndarray:
    """(P, C, kh, kw) input patches at ``count`` random output positions of a convolution."""
    geo = conv_geometry(layer)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geo.kernel, geo.stride, geo.pad, geo.dilation
    b, c, h, w = x.shape
    oh, ow = out_shape[2], out_shape[3]
    total = b * oh * ow
    count = min(count, total)
    flat = rng.choice(total, size=count, replace=False) if total > count else np.arange(total)
    bi, rem = np.divmod(flat, oh * ow)
    oy, ox = np.divmod(rem, ow)
    rows = oy[:, None] * sh + np.arange(kh)[None, :] * dh - ph  # (P, kh), in unpadded coordinates
    cols = ox[:, None] * sw + np.arange(kw)[None, :] * dw - pw  # (P, kw)
    # Zero padding without materialising a padded copy (a huge pad must not allocate a huge map).
    valid = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    patches = x[bi[:, None, None], :, np.clip(rows, 0, h - 1)[:, :, None], np.clip(cols, 0, w - 1)[:, None, :]]
    patches = np.where(valid[..., None], patches, 0).astype(np.float32)  # (P, kh, kw, C)
    return np.ascontiguousarray(patches.transpose(0, 3, 1, 2))


def _relative(delta_sq: float, ref_sq: float) -> float:
    if not (math.isfinite(delta_sq) and math.isfinite(ref_sq)):
        return math.inf  # overflowing activations: no rank is known to be safe
    return float(math.sqrt(max(delta_sq, 0.0) / ref_sq)) if ref_sq > 0 else 0.0


def analyse_inner_product(
    layer: Layer, x: np.ndarray, *, min_rank_divisor: int, ws: Workspace, forced_rank: int | None = None
) -> Candidate:
    geo = inner_product_geometry(layer)
    w = inner_product_matrix(layer)
    n, k = w.shape
    m = min(n, k)
    break_even = (n * k - 1) // (n + k)
    high = min(break_even, m, wide_rank_cap(m))
    basis = spectral_basis(w, keep=max(high, forced_rank or 0) or None)
    ws.bases[layer.name] = [basis]
    bias = layer.blobs[1].astype(np.float64) if geo.bias_term else np.zeros(n)
    rows = _ip_rows(x, geo.axis)
    if rows.shape[1] != k:
        raise UsageError(f"layer '{layer.name}': input has {rows.shape[1]} features but the weight expects {k}")
    y0 = (rows @ w.T).astype(np.float64)
    y = y0 + bias
    ref = float(np.sum(y * y))
    proj = (rows @ basis.vt.T).astype(np.float64)  # (M, m): inputs along the right singular vectors
    energy = (basis.s ** 2) * np.sum(proj * proj, axis=0)  # output energy each component carries
    if basis.complete:
        tail = np.concatenate([np.cumsum(energy[::-1])[::-1], [0.0]])
    else:  # what the leading components leave of the whole output (the rest of the basis is not computed)
        tail = np.maximum(float(np.sum(y0 * y0)) - np.concatenate([[0.0], np.cumsum(energy)]), 0.0)
    low = max(1, m // min_rank_divisor)
    ranks = _rank_grid(low, high, 1) if high >= 1 else ()
    if forced_rank is not None:
        ranks = (forced_rank,)
    bias_count = n if geo.bias_term else 0
    lead = rows.shape[0] // max(x.shape[0], 1)
    return Candidate(
        layer=layer.name, type=layer.type, method=METHOD_SVD, weight_shape=(n, k), groups=1,
        params_before=n * k + bias_count, macs_before=lead * n * k,
        ranks=ranks,
        params_at={r: _params_at(METHOD_SVD, (n, k), 1, r, bias_count) for r in ranks},
        macs_at={r: _macs_at(METHOD_SVD, (n, k), 1, r, 0, 0, lead) for r in ranks},
        weight_error={r: basis.relative_error(r) for r in ranks},
        output_error={r: _relative(float(tail[r]), ref) for r in ranks},
    )


@dataclass(frozen=True)
class ConvData:
    """One convolution's analysis inputs: per-group kernels and patch matrices, and its reference output."""

    kernels: list
    group_patches: list  # (P, S/g * kh * kw) per group
    ref: float  # ||Y||^2 over the sampled positions (bias included)
    weight_sq: float

    def errors(self, approximations: Sequence[np.ndarray]) -> tuple[float, float]:
        """(layer-output error, weight error) of per-group approximate kernels."""
        d_sq = w_sq = 0.0
        for gp, k, a in zip(self.group_patches, self.kernels, approximations):
            resid = (k - a).reshape(k.shape[0], -1)
            d = (gp @ resid.T).astype(np.float64)
            d_sq += float(np.sum(d * d))
            w_sq += float(np.sum(np.square(resid, dtype=np.float64)))
        return _relative(d_sq, self.ref), _relative(w_sq, self.weight_sq)


def conv_data(layer: Layer, patches: np.ndarray) -> ConvData:
    geo = conv_geometry(layer)
    g = geo.group
    sg = layer.blobs[0].shape[1]
    patches = np.asarray(patches, dtype=np.float32)  # (no copy: the recorded patches are float32)
    kernels = conv_group_kernels(layer)
    group_patches = [patches[:, i * sg : (i + 1) * sg].reshape(patches.shape[0], -1) for i in range(g)]
    y = np.concatenate([gp @ k.reshape(k.shape[0], -1).T for gp, k in zip(group_patches, kernels)],
                       axis=1).astype(np.float64)
    if geo.bias_term:
        y = y + layer.blobs[1].astype(np.float64)[None, :]
    return ConvData(kernels, group_patches, float(np.sum(y * y)),
                     float(np.sum(layer.blobs[0].astype(np.float64) ** 2)))


def _grid_below_break_even(method: str, shape, groups: int, bias: int, low: int, cap: int, *, fine: bool,
                           forced: int | None = None) -> tuple:
    """Per-group ranks of the grid in [low, cap] whose form has fewer parameters than the layer (a forced
    total rank: its per-group rank alone)."""
    if forced is not None:
        return (forced // groups,)
    before = int(np.prod(shape)) + bias
    grid = _rank_grid(low, cap, 1, fine=fine) if cap >= max(low, 1) else ()
    return tuple(r for r in grid if _params_at(method, shape, groups, r * groups, bias) < before)


def _errors_at(group_ranks: Sequence[int], g: int, data: ConvData, approximate) -> dict:
    """{total rank: (output error, weight error)} for per-group ranks; ``approximate(total rank)`` gives the
    per-group approximate kernels."""
    return {rg * g: data.errors(approximate(rg * g)) for rg in group_ranks}


def _pointwise_errors(layer, data: ConvData, ws: Workspace, low: int, bias: int, forced: int | None):
    t, sg = layer.blobs[0].shape[:2]
    g = len(data.kernels)
    cap = wide_rank_cap(min(t // g, sg))
    keep = max(cap, (forced or 0) // g)
    ws.bases[layer.name] = [spectral_basis(k.reshape(k.shape[0], -1), keep=keep) for k in data.kernels]
    group_ranks = _grid_below_break_even(METHOD_POINTWISE, layer.blobs[0].shape, g, bias, low, cap,
                                         fine=True, forced=forced)
    return _errors_at(group_ranks, g, data, lambda r: [
        (f.second @ f.first).reshape(k.shape) for f, k in zip(ws.linear_factors(layer.name, r), data.kernels)])


def _cp_group_ranks(shape, g: int, bias: int, low: int, forced: int | None) -> tuple:
    t, sg = shape[:2]
    # CP beyond the channel counts costs much and rarely pays; the grid's top is
    # the largest power of two within them (ALS time grows with the rank).
    cap = 1 << (max(t // g, sg).bit_length() - 1)
    # CP costs one ALS run per rank: a coarser (power-of-two) grid.
    return _grid_below_break_even(METHOD_CP, shape, g, bias, low, cap, fine=False, forced=forced)


def _lowest_rank(t: int, sg: int, g: int, min_rank_divisor: int) -> int:
    """A convolution's lowest per-group grid rank: the smaller side / min_rank_divisor, at least 1."""
    return max(1, min(t // g, sg) // min_rank_divisor)


def cp_grid(layer: Layer, *, min_rank_divisor: int, forced: int | None = None) -> tuple[int, ...]:
    """The total ranks of a convolution's CP grid before any RankCap (what analyse_convolution passes one)."""
    geo = conv_geometry(layer)
    t, sg = layer.blobs[0].shape[:2]
    low = _lowest_rank(t, sg, geo.group, min_rank_divisor)
    ranks = _cp_group_ranks(layer.blobs[0].shape, geo.group, t if geo.bias_term else 0, low, forced)
    return tuple(r * geo.group for r in ranks)


def _cp_errors(layer, data: ConvData, ws: Workspace, low: int, bias: int, forced: int | None, *,
               seed: int, cp_iterations: int, rank_cap: RankCap | None = None):
    g = len(data.kernels)
    group_ranks = _cp_group_ranks(layer.blobs[0].shape, g, bias, low, forced)
    if rank_cap is not None and forced is None and group_ranks:
        top = rank_cap(layer, tuple(r * g for r in group_ranks))
        if top is not None:  # (the lowest rank stays: the form keeps a row in the report)
            group_ranks = tuple(r for r in group_ranks if r * g <= top) or group_ranks[-1:]
    store: dict[int, list[ConvFactors]] = {}
    tails: list[dict] = [{} for _ in range(g)]
    prev: list[ConvFactors | None] = [None] * g
    exact = [gp @ k.reshape(k.shape[0], -1).T for gp, k in zip(data.group_patches, data.kernels)]  # (no bias)
    prepared = [CPKernel(k) for k in data.kernels]  # (one preparation for the whole grid)
    for idx, rg in enumerate(group_ranks):
        iters = cp_iterations if idx == 0 or forced else max(cp_iterations // 3, 8)
        facs = [cp_conv(k, rg, seed=seed, n_iter_max=iters, tol=1e-6, init=prev[i]) for i, k in enumerate(prepared)]
        prev = list(facs)
        store[rg * g] = facs
        for tail, gp, y, k, f in zip(tails, data.group_patches, exact, prepared, facs):
            tail[rg] = _cp_residual(gp, y, k, f)
    ws.cp[layer.name] = store
    return _summed_tails(data, group_ranks, tails)


def _cp_residual(patches: np.ndarray, exact: np.ndarray, kernel: CPKernel, f: ConvFactors) -> tuple[float, float]:
    """(||output error||^2, ||weight error||^2) of one group's CP factors on the patches, from the factors:
    the patches through the 1x1 then the two spatial factors (a weighted sum over the taps) then the last
    1x1, against ``exact`` (the patches through the kernel, no bias) -- the approximate kernel is never
    formed."""
    t, s, kh, kw = kernel.shape
    p, r = patches.shape[0], f.rank
    through_first = patches.reshape(p, s, kh * kw).transpose(0, 2, 1) @ f.first[:, :, 0, 0].T  # (P, kh*kw, R)
    taps = (f.vertical[:, 0, :, 0].T[:, None, :] * f.horizontal[:, 0, 0, :].T[None, :, :]).reshape(kh * kw, r)
    approx = np.einsum("pkr,kr->pr", through_first, taps) @ f.last[:, :, 0, 0].T
    d = exact.astype(np.float64) - approx
    return float(np.sum(d * d)), (f.relative_error * kernel.norm) ** 2


def _tucker_errors(layer, data: ConvData, ws: Workspace, low: int, bias: int, forced: int | None):
    t, sg = layer.blobs[0].shape[:2]
    g = len(data.kernels)
    group_ranks = _grid_below_break_even(METHOD_TUCKER, layer.blobs[0].shape, g, bias, low, max(t // g, sg),
                                         fine=False, forced=forced)
    if layer.name not in ws.hosvd:
        ws.hosvd[layer.name] = [hosvd_bases(k) for k in data.kernels]
    return _summed_tails(data, group_ranks, [
        _tucker_tails(gp, k, bases, group_ranks) for gp, k, bases in zip(data.group_patches, data.kernels,
                                                                           ws.hosvd[layer.name])])


def _summed_tails(data: ConvData, group_ranks: Sequence[int], per_group: Sequence[Mapping]) -> dict:
    """{total rank: (layer-output error, weight error)} from each group's {rank: (output, weight) tail energies}."""
    g = len(per_group)
    return {r * g: (_relative(sum(tails[r][0] for tails in per_group), data.ref),
                    _relative(sum(tails[r][1] for tails in per_group), data.weight_sq)) for r in group_ranks}


def _tucker_tails(patches: np.ndarray, kernel: np.ndarray, bases, ranks: Sequence[int]) -> dict:
    """{rank: (||output of what the truncation drops||^2, its weight energy)} of one group's HOSVD Tucker-2.

    In the channel bases (U_out, U_in) the kernel is K' = U_out^T K U_in and the patches X' = X U_in; at
    ranks (R_in, R_out) (tucker_ranks) the approximation keeps K'[:R_out, :R_in]. What it drops, on the
    patches: the whole rotated output a >= R_out, and the inputs b >= R_in of the outputs a < R_out
    (U_out is orthogonal: norms carry over). The b blocks are added from the last one down: the grid costs
    about one product of the patches with the kernel, not one per rank."""
    t, s, kh, kw = kernel.shape
    k2 = kh * kw
    u_out, u_in = bases
    p = patches.shape[0]
    x = (patches.reshape(p, s, k2).transpose(0, 2, 1) @ u_in.astype(np.float32)).reshape(p, k2, s)  # X'
    rotated = np.einsum("tsk,ta,sb->kba", kernel.reshape(t, s, k2).astype(np.float64), u_out, u_in,
                        optimize=True)  # K' as (k2, S, T)
    full = (x.reshape(p, k2 * s) @ rotated.astype(np.float32).reshape(k2 * s, t)).astype(np.float64)
    out_energy = np.sum(full * full, axis=0)  # per rotated output
    weight_energy = np.sum(rotated * rotated, axis=0)  # (S, T)
    tail = np.zeros((p, t))
    out = {}
    end = s
    for r in sorted(set(ranks), reverse=True):
        r_in, r_out = tucker_ranks(r, t, s)
        if r_in < end:
            block = x[:, :, r_in:end].reshape(p, k2 * (end - r_in))
            tail += block @ rotated[:, r_in:end].astype(np.float32).reshape(k2 * (end - r_in), t)
            end = r_in
        d_sq = float(np.sum(out_energy[r_out:])) + float(np.sum(tail[:, :r_out] ** 2))
        w_sq = float(np.sum(weight_energy)) - float(np.sum(weight_energy[:r_in, :r_out]))
        out[r] = (d_sq, w_sq)
    return out


def _spatial_errors(layer, data: ConvData, ws: Workspace, low: int, bias: int, forced: int | None):
    t, sg, kh, kw = layer.blobs[0].shape
    g = len(data.kernels)
    bases = [spatial_basis(k) for k in data.kernels]
    group_ranks = _grid_below_break_even(METHOD_SPATIAL, layer.blobs[0].shape, g, bias, low,
                                         min(sg * kh, t // g * kw), fine=True, forced=forced)
    errors = _summed_tails(data, group_ranks, [
        _spatial_tails(gp, basis, (sg, kh, kw), group_ranks) for gp, basis in zip(data.group_patches, bases)])
    # kept for the rewrite up to the grid's top rank, in float32 (the factors' precision): a 512 x 512 3 x 3
    # kernel's whole basis is 38 MB, and a ResNet-style net has a dozen of them
    ws.spatial[layer.name] = [b.leading(max(group_ranks, default=1)) for b in bases]
    return errors


def _spatial_tails(patches: np.ndarray, basis, in_shape: tuple[int, int, int], ranks: Sequence[int]) -> dict:
    """{rank: (||output of the discarded components||^2, their weight energy)} of one group's spatial SVD.

    Truncation at rank r discards the components r.. of the basis (M = U S V^T, M[(s, i), (t, j)] =
    kernel[t, s, i, j]); on patches X their output is sum_j Q_j[:, r:] (S V^T)_j[r:] with Q_j = X[.., j] U.
    One projection of the patches onto U, then the components in blocks from the last one down: the
    whole grid costs about two products of the patches with the kernel, not one per rank."""
    sg, kh, kw = in_shape
    m = basis.s.size
    p = patches.shape[0]
    x = patches.reshape(p, sg * kh, kw).transpose(0, 2, 1).reshape(p * kw, sg * kh)
    q = (x @ basis.u.astype(np.float32, copy=False)).reshape(p, kw, m)  # (P, kw, m)
    t = basis.vt.shape[1] // kw
    h = (basis.s[:, None] * basis.vt).astype(np.float32).reshape(m, t, kw)  # (m, T, kw): S V^T per tap
    tail = np.zeros((p, t))
    out = {}
    end = m
    for r in sorted(set(ranks), reverse=True):
        if r < end:
            block_q = q[:, :, r:end].reshape(p, kw * (end - r))
            block_h = h[r:end].transpose(2, 0, 1).reshape(kw * (end - r), t)
            tail += block_q @ block_h
            end = r
        out[r] = (float(np.sum(tail * tail)), float(np.sum(basis.s[r:] ** 2)))
    return out


def analyse_convolution(
    layer: Layer, patches: np.ndarray, in_shape: tuple[int, ...], out_shape: tuple[int, ...], method: str, *,
    min_rank_divisor: int, seed: int, ws: Workspace, cp_iterations: int, forced_rank: int | None = None,
    data: ConvData | None = None, cp_rank_cap: RankCap | None = None,
) -> Candidate:
    """One form of a convolution. patches : (P, C, kh, kw) float32 input patches at sampled output positions
    (see sample_patches); ``data`` reuses another form's prepared patches."""
    geo = conv_geometry(layer)
    g = geo.group
    w = layer.blobs[0]
    t, sg = w.shape[:2]
    bias_count = t if geo.bias_term else 0
    data = data or conv_data(layer, patches)
    low = _lowest_rank(t, sg, g, min_rank_divisor)
    if method == METHOD_POINTWISE:
        errs = _pointwise_errors(layer, data, ws, low, bias_count, forced_rank)
    elif method == METHOD_TUCKER:
        errs = _tucker_errors(layer, data, ws, low, bias_count, forced_rank)
    elif method == METHOD_SPATIAL:
        errs = _spatial_errors(layer, data, ws, low, bias_count, forced_rank)
    else:
        errs = _cp_errors(layer, data, ws, low, bias_count, forced_rank, seed=seed, cp_iterations=cp_iterations,
                          rank_cap=cp_rank_cap)
    ranks = tuple(errs)
    in_spatial, out_spatial = _spatial_size(in_shape), _spatial_size(out_shape)
    return Candidate(
        layer=layer.name, type=layer.type, method=method, weight_shape=tuple(w.shape), groups=g,
        params_before=w.size + bias_count,
        macs_before=out_spatial * w.size,
        ranks=ranks,
        params_at={r: _params_at(method, tuple(w.shape), g, r, bias_count) for r in ranks},
        macs_at={r: _macs_at(method, tuple(w.shape), g, r, in_spatial, out_spatial, 1) for r in ranks},
        weight_error={r: e[1] for r, e in errs.items()},
        output_error={r: e[0] for r, e in errs.items()},
    )


def approximate_weight(layer: Layer, candidate: Candidate, rank: int, ws: Workspace) -> np.ndarray:
    """The layer's weight blob as the factored layers would compute it (same shape)."""
    if candidate.method == METHOD_SVD:
        f = ws.linear_factors(layer.name, rank)[0]
        approx = f.second @ f.first  # float32: the weight can be tens of MB
        return approx.T.copy() if inner_product_geometry(layer).transpose else approx
    if candidate.method == METHOD_POINTWISE:
        parts = [f.second @ f.first for f in ws.linear_factors(layer.name, rank)]
        return np.concatenate(parts, axis=0).astype(np.float32).reshape(layer.blobs[0].shape)
    if candidate.method == METHOD_TUCKER:
        parts = [tucker_reconstruct(f) for f in ws.tucker_factors(layer.name, conv_group_kernels(layer), rank)]
    elif candidate.method == METHOD_SPATIAL:
        parts = [spatial_reconstruct(f) for f in ws.spatial_factors(layer.name, layer.blobs[0].shape, rank)]
    else:
        parts = [cp_reconstruct(f) for f in ws.cp[layer.name][rank]]
    return np.concatenate(parts, axis=0).astype(np.float32)


# ------------------------------------------------------------------ choosing ranks


def _lambda_grid() -> list[float]:
    """Prices of squared error, from 'error is free' (0) to 'error is forbidden' (inf)."""
    return [0.0] + [10.0 ** (e / 8.0) for e in range(-64, 129)] + [math.inf]


OBJECTIVE_WEIGHTS = {"balanced": (1.0, 0.5), "speed": (0.25, 1.0), "size": (1.0, 0.0)}  # (bytes, time)


def _options(cands: Sequence[Candidate], min_speedup: float) -> list[tuple[Candidate | None, int | None]]:
    """Keep (None) and every (form, rank) not predicted slower than the layer by more than allowed."""
    out: list[tuple[Candidate | None, int | None]] = [(None, None)]
    for c in cands:
        for r in c.ranks:
            speedup = c.speedup(r)
            if speedup is None or speedup >= min_speedup:
                out.append((c, r))
    return out


def choose_ranks(
    candidates: Sequence[Candidate], tradeoff: float, *, forced: Mapping[str, Choice] | None = None,
    budget: float | None = None, objective: str = "size", min_speedup: float = 0.0,
) -> tuple[dict[str, Choice], float]:
    """Pick a form and rank per layer for the error budget of ``tradeoff``: ({layer: (method, rank)}, error).

    For a price lambda on squared output error, every layer independently takes the option (unfactored,
    or a form at a grid rank) minimising cost + lambda * (g e)^2, where the cost weighs bytes and measured
    time by ``objective`` and options predicted slower than ``min_speedup`` x the layer are not offered.
    A higher price never raises any layer's error or lowers its cost; T picks the lowest price whose
    predicted error fits the budget, and a larger budget can only lower that price -- so with the "size"
    objective (cost = bytes) a larger T never gives a larger file, for any model.
    """
    forced = dict(forced or {})
    budget = error_budget(tradeoff) if budget is None else budget
    totals = totals_of(candidates)
    weights = OBJECTIVE_WEIGHTS[objective]
    by_layer = _by_layer(candidates)

    def contribution(c: Candidate | None, rank: int | None) -> float:
        return 0.0 if c is None else (c.gain * c.output_error[rank]) ** 2

    base_sq = _error_sq(candidates, forced)
    # per free layer, each option's (cost, error contribution, tie-break: the higher rank, option), computed
    # once for the whole price grid
    free = {name: [((o[0] or cands[0]).cost(o[1], totals, weights), contribution(*o), -(o[1] or 10**9), o)
                   for o in _options(cands, min_speedup)]
            for name, cands in by_layer.items() if name not in forced}

    def pick(price: float) -> tuple[dict[str, Choice], float]:
        state: dict[str, Choice] = {}
        err_sq = base_sq
        for name, options in free.items():
            if math.isinf(price):
                continue
            _, added, _, (c, r) = min(options, key=lambda o: (o[0] + price * o[1], o[2]))
            if c is not None:
                state[name] = (c.method, r)
            err_sq += added
        return state, math.sqrt(max(err_sq, 0.0))

    chosen: dict[str, Choice] = {}
    predicted = math.sqrt(base_sq)
    if budget <= 0:  # lossless: nothing but the forced ranks
        return dict(forced), predicted
    for price in _lambda_grid():
        state, err = pick(price)
        if err <= budget or math.isinf(price):
            chosen, predicted = state, err
            break
    chosen.update(forced)
    return chosen, predicted


def _by_layer(candidates: Sequence[Candidate]) -> dict[str, list[Candidate]]:
    """The candidates (one per exact form) of each layer, in order."""
    out: dict[str, list[Candidate]] = {}
    for c in candidates:
        out.setdefault(c.layer, []).append(c)
    return out


def _error_sq(candidates: Sequence[Candidate], chosen: Mapping[str, Choice]) -> float:
    """Sum over the chosen layers of (gain * layer output error)^2 (a form or rank not analysed adds 0)."""
    by_form = {(c.layer, c.method): c for c in candidates}
    err_sq = 0.0
    for name, (method, rank) in chosen.items():
        c = by_form.get((name, method))
        if c is not None and rank in c.output_error:
            err_sq += (c.gain * c.output_error[rank]) ** 2
    return err_sq


def predicted_error(candidates: Sequence[Candidate], chosen: Mapping[str, Choice]) -> float:
    """The planner's predicted network-output error of a choice: sqrt of the sum of (gain * layer error)^2."""
    return math.sqrt(_error_sq(candidates, chosen))


def _option_cost(candidates: Sequence[Candidate], objective: str):
    """cost(layer, choice or None): the objective's cost of one layer's option (None, or a form the
    candidates do not have: the layer unfactored); and the layers, one candidate each."""
    totals, weights = totals_of(candidates), OBJECTIVE_WEIGHTS[objective]
    by_form = {(c.layer, c.method): c for c in candidates}
    first: dict[str, Candidate] = {}
    for c in candidates:
        first.setdefault(c.layer, c)

    def cost(name: str, choice: Choice | None) -> float:
        c = by_form.get((name, choice[0])) if choice is not None else None
        return first[name].cost(None, totals, weights) if c is None else c.cost(choice[1], totals, weights)

    return cost, first


def cheaper_steps(candidates: Sequence[Candidate], current: Mapping[str, Choice], target: Mapping[str, Choice],
                  objective: str) -> list[tuple[str, Choice]]:
    """The one-layer moves from ``current`` to ``target``'s choice that lower the objective's cost, the
    largest saving first: (layer, its choice in ``target``)."""
    cost, layers = _option_cost(candidates, objective)
    forms = {(c.layer, c.method) for c in candidates}
    steps = []
    for name, choice in target.items():
        if name in layers and current.get(name) != choice and (name, choice[0]) in forms:
            saving = cost(name, current.get(name)) - cost(name, choice)
            if saving > 0:
                steps.append((saving, name, choice))
    return [(name, choice) for _, name, choice in sorted(steps, key=lambda s: -s[0])]


def fitting_moves(candidates: Sequence[Candidate], current: Mapping[str, Choice], budget: float, objective: str,
                  min_speedup: float = 0.0) -> dict[str, Choice]:
    """For each layer ``current`` leaves unfactored, its cheapest option (by the objective's cost) that keeps
    the predicted error of ``current`` plus that one move within ``budget``, where one is cheaper than the
    layer as it is. choose_ranks prices error the same for every layer, so it never takes what lies off the
    lower hull of cost against error: a layer whose error costs more than the others' (GenderNet's conv3
    when calibrated, gain 1.16 against fc6's 0.35) stays whole at every price, although a plan with it
    factored fits the budget."""
    cost, _ = _option_cost(candidates, objective)
    room = budget ** 2 - _error_sq(candidates, current)
    moves: dict[str, Choice] = {}
    for name, cands in _by_layer(candidates).items():
        fits = [(cost(name, (c.method, r)), -r, (c.method, r)) for c, r in _options(cands, min_speedup)
                if c is not None and (c.gain * c.output_error[r]) ** 2 <= room]
        cheapest = min(fits, default=None)
        if name not in current and cheapest is not None and cheapest[0] < cost(name, None):
            moves[name] = cheapest[2]
    return moves


def objective_cost(candidates: Sequence[Candidate], chosen: Mapping[str, Choice], objective: str) -> float:
    """The objective's cost of a choice over the decomposable layers: 0 (free) .. sum of the weights (all
    layers unfactored)."""
    cost, layers = _option_cost(candidates, objective)
    return sum(cost(name, chosen.get(name)) for name in layers)


def halfway(candidates: Sequence[Candidate], name: str, current: Choice | None, target: Choice) -> Choice | None:
    """A choice for layer ``name`` between ``current`` and ``target`` (same form as ``target``): the middle
    of the form's grid ranks above ``target``'s and below ``current``'s (every rank above when ``current``
    is another form or the layer unfactored); None when there is none."""
    c = next((c for c in candidates if c.layer == name and c.method == target[0]), None)
    if c is None:
        return None
    top = current[1] if current is not None and current[0] == target[0] else math.inf
    between = sorted(r for r in c.ranks if target[1] < r < top)
    return (target[0], between[len(between) // 2]) if between else None


def _form_reason(c: Candidate, rank: int, others: Sequence[Candidate]) -> str:
    """Why this form: its measured speed against the layer, and what the other forms offered."""
    speedup = c.speedup(rank)
    parts = [f"pred. {speedup:.2f}x the layer's speed" if speedup is not None else "layer not timed"]
    alternatives = [o.method for o in others if o is not c and o.ranks]
    if alternatives:
        parts.append("cheapest at its error among " + ", ".join([c.method, *alternatives]))
    return "; ".join(parts)


def build_plan(
    net: Net,
    candidates: Sequence[Candidate],
    chosen: Mapping[str, Choice],
    skipped: Mapping[str, str],
    tradeoff: float,
    predicted: float,
) -> Plan:
    by_layer: dict[str, list[Candidate]] = {}
    for c in candidates:
        by_layer.setdefault(c.layer, []).append(c)
    rows = []
    for layer in net.layers:
        if not layer.blobs:
            continue
        shape = tuple(layer.blobs[0].shape)
        params = layer.param_count
        cands = by_layer.get(layer.name)
        if cands:
            first = cands[0]
            choice = chosen.get(layer.name)
            if choice is not None:
                method, rank = choice
                c = next(c for c in cands if c.method == method)
                rows.append(LayerPlan(
                    layer.name, layer.type, shape, c.method, rank, params, c.params_at[rank],
                    c.macs_before, c.macs_at[rank], c.weight_error[rank], c.output_error[rank],
                    _form_reason(c, rank, cands), c.time_before, c.time_at.get(rank),
                ))
                continue
            reason = skipped.get(layer.name) or "not worth its error at this trade-off"
            rows.append(LayerPlan(layer.name, layer.type, shape, METHOD_KEEP, None, params, params,
                                  first.macs_before, first.macs_before, 0.0, 0.0, reason, first.time_before,
                                  first.time_before))
        else:
            rows.append(LayerPlan(layer.name, layer.type, shape, METHOD_KEEP, None, params, params,
                                  0, 0, 0.0, 0.0, skipped.get(layer.name, "")))
    return Plan(tradeoff, error_budget(tradeoff), predicted, tuple(rows))
