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
from typing import Mapping, Sequence

import numpy as np

from ..decompose import ConvFactors, LinearFactors, SpectralBasis, cp_conv, cp_reconstruct, spectral_basis
from ..errors import UsageError
from ..net import Layer, Net, conv_geometry, inner_product_geometry
from ..rewrite import conv_group_kernels, inner_product_matrix

log = logging.getLogger(__name__)

# Budget scale: a predicted relative output error of 0.13 * ln(1 / (1 - T)), i.e.
# 0.09 at T = 0.5, 0.30 at 0.9, 0.39 at 0.95, 0.60 at 0.99. Calibrated once
# against GenderNet's measured accuracy (RMS output changes up to ~0.4 cost it no
# accuracy on UTKFace); see gendernet/README.md.
ERROR_SCALE = 0.13
MIN_RANK_DIVISOR = 64  # the minimal sensible rank is min(dims) / 64 (at least 1)
PATCH_SAMPLES = 1024

METHOD_SVD = "svd"
METHOD_CP = "cp"
METHOD_POINTWISE = "svd-1x1"
METHOD_KEEP = "keep"


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
class Candidate:
    """A decomposable layer and everything the planner knows about it."""

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

    def cost(self, rank: int | None, totals: tuple[int, int]) -> float:
        params = self.params_before if rank is None else self.params_at[rank]
        macs = self.macs_before if rank is None else self.macs_at[rank]
        return params / max(totals[0], 1) + macs / max(totals[1], 1)


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
    reason: str = ""


@dataclass(frozen=True)
class Plan:
    tradeoff: float
    error_budget: float
    predicted_error: float
    layers: tuple[LayerPlan, ...]


@dataclass
class Workspace:
    """Per-layer state the planner builds once and the rewrite reuses (bases, CP factors)."""

    bases: dict[str, list[SpectralBasis]] = field(default_factory=dict)
    cp: dict[str, dict[int, list[ConvFactors]]] = field(default_factory=dict)

    def linear_factors(self, name: str, rank_total: int) -> list[LinearFactors]:
        bases = self.bases[name]
        return [b.factors(rank_total // len(bases)) for b in bases]


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


def _params_at(method: str, shape: tuple[int, ...], groups: int, rank: int, bias: int) -> int:
    if method == METHOD_SVD:
        n, k = shape
        return rank * (n + k) + bias
    t, sg, kh, kw = shape
    if method == METHOD_POINTWISE:
        return rank * sg + t * (rank // groups) + bias
    return rank * (sg + kh + kw) + t * (rank // groups) + bias


def _macs_at(method: str, shape, groups, rank, in_spatial: int, out_spatial: int, rows: int) -> int:
    if method == METHOD_SVD:
        n, k = shape
        return rows * rank * (n + k)
    t, sg, kh, kw = shape
    if method == METHOD_POINTWISE:
        return out_spatial * (rank * sg + t * (rank // groups))
    # 1x1 on the input grid, kh x 1 on (rows of output, cols of input) ~ input grid, 1 x kw and 1x1 on output grid
    return in_spatial * rank * sg + in_spatial * rank * kh + out_spatial * rank * kw + out_spatial * t * (rank // groups)


def max_rank(layer: Layer, method: str) -> int:
    """The largest rank a user may force (full rank of one group's matrix / tensor bound)."""
    if method == METHOD_SVD:
        return min(inner_product_matrix(layer).shape)
    t, sg, kh, kw = layer.blobs[0].shape
    groups = conv_geometry(layer).group
    if method == METHOD_POINTWISE:
        return min(t // groups, sg) * groups
    return min(t // groups * sg, sg * kh * kw, t // groups * kh * kw) * groups


# ------------------------------------------------------------------ per-layer analysis


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
    basis = spectral_basis(w)
    ws.bases[layer.name] = [basis]
    bias = layer.blobs[1].astype(np.float64) if geo.bias_term else np.zeros(n)
    rows = _ip_rows(x, geo.axis)
    if rows.shape[1] != k:
        raise UsageError(f"layer '{layer.name}': input has {rows.shape[1]} features but the weight expects {k}")
    y = (rows @ w.T).astype(np.float64) + bias
    ref = float(np.sum(y * y))
    proj = (rows @ basis.vt.T).astype(np.float64)  # (M, m): inputs along the right singular vectors
    energy = (basis.s ** 2) * np.sum(proj * proj, axis=0)  # output energy each component carries
    tail = np.concatenate([np.cumsum(energy[::-1])[::-1], [0.0]])
    m = basis.s.size
    break_even = (n * k - 1) // (n + k)
    high = min(break_even, m)
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


def analyse_convolution(
    layer: Layer, patches: np.ndarray, in_shape: tuple[int, ...], out_shape: tuple[int, ...], method: str, *,
    min_rank_divisor: int, seed: int, ws: Workspace, cp_iterations: int, forced_rank: int | None = None,
) -> Candidate:
    """patches : (P, C, kh, kw) float32 input patches at sampled output positions (see sample_patches)."""
    geo = conv_geometry(layer)
    g = geo.group
    w = layer.blobs[0]
    t, sg, kh, kw = w.shape
    bias_count = t if geo.bias_term else 0
    patches = patches.astype(np.float32)
    kernels = conv_group_kernels(layer)
    group_patches = [patches[:, i * sg : (i + 1) * sg].reshape(patches.shape[0], -1) for i in range(g)]
    ys = [gp @ k.reshape(k.shape[0], -1).T for gp, k in zip(group_patches, kernels)]
    y = np.concatenate(ys, axis=1).astype(np.float64)
    if geo.bias_term:
        y = y + layer.blobs[1].astype(np.float64)[None, :]
    ref = float(np.sum(y * y))
    in_spatial = _spatial_size(in_shape)
    out_spatial = _spatial_size(out_shape)
    if method == METHOD_POINTWISE:
        bases = [spectral_basis(k.reshape(k.shape[0], -1)) for k in kernels]
        ws.bases[layer.name] = bases
        m = min(t // g, sg)
        full = t * sg
        break_even_group = (full // g - 1) // (sg + t // g)  # per group
        high = min(break_even_group, m)
        low = max(1, m // min_rank_divisor)
        group_ranks = _rank_grid(low, high, 1) if high >= 1 else ()
        if forced_rank is not None:
            group_ranks = (forced_rank // g,)
        out_err = {}
        w_err = {}
        for rg in group_ranks:
            d_sq = 0.0
            w_sq = 0.0
            for gp, basis in zip(group_patches, bases):
                f = basis.factors(rg)
                approx = f.second @ f.first
                resid = ((basis.u * basis.s) @ basis.vt).astype(np.float32) - approx
                d = (gp @ resid.T).astype(np.float64)
                d_sq += float(np.sum(d * d))
                w_sq += float(np.sum(resid * resid))
            out_err[rg * g] = _relative(d_sq, ref)
            w_err[rg * g] = _relative(w_sq, float(np.sum(w.astype(np.float64) ** 2)))
        ranks = tuple(rg * g for rg in group_ranks)
    else:
        per_group_cost = sg + kh + kw + t // g
        break_even_group = (t // g * sg * kh * kw - 1) // per_group_cost
        # CP beyond the channel counts costs much and rarely pays; the grid's top is
        # the largest power of two within them (ALS time grows with the rank).
        cap = 1 << (max(t // g, sg).bit_length() - 1)
        high = min(break_even_group, cap)
        low = max(1, min(t // g, sg) // min_rank_divisor)
        # CP costs one ALS run per rank: a coarser (power-of-two) grid.
        group_ranks = _rank_grid(low, high, 1, fine=False) if high >= 1 else ()
        if forced_rank is not None:
            group_ranks = (forced_rank // g,)
        store: dict[int, list[ConvFactors]] = {}
        out_err, w_err = {}, {}
        w_norm_sq = float(np.sum(w.astype(np.float64) ** 2))
        prev: list[ConvFactors | None] = [None] * g
        for idx, rg in enumerate(group_ranks):
            iters = cp_iterations if idx == 0 or forced_rank else max(cp_iterations // 3, 8)
            facs = [
                cp_conv(k, rg, seed=seed, n_iter_max=iters, tol=1e-6, init=prev[i])
                for i, k in enumerate(kernels)
            ]
            prev = list(facs)
            store[rg * g] = facs
            d_sq = 0.0
            wr_sq = 0.0
            for gp, k, f in zip(group_patches, kernels, facs):
                resid = k - cp_reconstruct(f)
                d = (gp @ resid.reshape(resid.shape[0], -1).T).astype(np.float64)
                d_sq += float(np.sum(d * d))
                wr_sq += float(np.sum(np.square(resid, dtype=np.float64)))
            out_err[rg * g] = _relative(d_sq, ref)
            w_err[rg * g] = _relative(wr_sq, w_norm_sq)
        ws.cp[layer.name] = store
        ranks = tuple(rg * g for rg in group_ranks)
    return Candidate(
        layer=layer.name, type=layer.type, method=method, weight_shape=tuple(w.shape), groups=g,
        params_before=w.size + bias_count,
        macs_before=out_spatial * w.size,
        ranks=ranks,
        params_at={r: _params_at(method, tuple(w.shape), g, r, bias_count) for r in ranks},
        macs_at={r: _macs_at(method, tuple(w.shape), g, r, in_spatial, out_spatial, 1) for r in ranks},
        weight_error=w_err,
        output_error=out_err,
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
    parts = [cp_reconstruct(f) for f in ws.cp[layer.name][rank]]
    return np.concatenate(parts, axis=0).astype(np.float32)


# ------------------------------------------------------------------ choosing ranks


def _lambda_grid() -> list[float]:
    """Prices of squared error, from 'error is free' (0) to 'error is forbidden' (inf)."""
    return [0.0] + [10.0 ** (e / 8.0) for e in range(-64, 129)] + [math.inf]


def choose_ranks(
    candidates: Sequence[Candidate], tradeoff: float, *, forced: Mapping[str, int] | None = None,
    budget: float | None = None,
) -> tuple[dict[str, int], float]:
    """Pick ranks for the error budget of ``tradeoff``. Returns ({layer: rank}, predicted error).

    For a price lambda on squared output error, every layer independently takes
    the option (unfactored or a grid rank) minimising cost + lambda * (g e)^2;
    a higher price never lowers any layer's rank. T picks the lowest price
    whose predicted error fits the budget, and a larger budget can only lower
    that price -- so a larger T never gives a larger file, for any model.
    """
    forced = dict(forced or {})
    budget = error_budget(tradeoff) if budget is None else budget
    totals = (sum(c.params_before for c in candidates), sum(c.macs_before for c in candidates))
    free = [c for c in candidates if c.layer not in forced]
    by_name = {c.layer: c for c in candidates}

    def contribution(c: Candidate, rank: int | None) -> float:
        return 0.0 if rank is None else (c.gain * c.output_error[rank]) ** 2

    base_sq = sum(contribution(by_name[n], r) for n, r in forced.items() if n in by_name and r in by_name[n].output_error)

    def pick(price: float) -> tuple[dict[str, int | None], float]:
        state: dict[str, int | None] = {}
        err_sq = base_sq
        for c in free:
            options: list[int | None] = [None, *c.ranks]
            if math.isinf(price):
                best = None
            else:
                best = min(options, key=lambda r: (c.cost(r, totals) + price * contribution(c, r),
                                                   -(r or 10**9)))
            state[c.layer] = best
            err_sq += contribution(c, best)
        return state, math.sqrt(max(err_sq, 0.0))

    chosen_state: dict[str, int | None] = {}
    predicted = math.sqrt(base_sq)
    if budget <= 0:  # lossless: nothing but the forced ranks
        return dict(forced), predicted
    for price in _lambda_grid():
        state, err = pick(price)
        if err <= budget or math.isinf(price):
            chosen_state, predicted = state, err
            break
    chosen = {n: r for n, r in chosen_state.items() if r is not None}
    chosen.update(forced)
    return chosen, predicted


def build_plan(
    net: Net,
    candidates: Sequence[Candidate],
    chosen: Mapping[str, int],
    skipped: Mapping[str, str],
    tradeoff: float,
    predicted: float,
) -> Plan:
    by_name = {c.layer: c for c in candidates}
    rows = []
    for layer in net.layers:
        if not layer.blobs:
            continue
        shape = tuple(layer.blobs[0].shape)
        params = layer.param_count
        if layer.name in by_name:
            c = by_name[layer.name]
            rank = chosen.get(layer.name)
            if rank is not None:
                rows.append(LayerPlan(
                    layer.name, layer.type, shape, c.method, rank, params, c.params_at[rank],
                    c.macs_before, c.macs_at[rank], c.weight_error[rank], c.output_error[rank],
                ))
                continue
            reason = skipped.get(layer.name) or "not worth its error at this trade-off"
            rows.append(LayerPlan(layer.name, layer.type, shape, METHOD_KEEP, None, params, params,
                                  c.macs_before, c.macs_before, 0.0, 0.0, reason))
        else:
            rows.append(LayerPlan(layer.name, layer.type, shape, METHOD_KEEP, None, params, params,
                                  0, 0, 0.0, 0.0, skipped.get(layer.name, "")))
    return Plan(tradeoff, error_budget(tradeoff), predicted, tuple(rows))
