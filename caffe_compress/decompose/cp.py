"""CP (canonical polyadic) decomposition of a convolution kernel, by ALS in numpy.

kernel[t, s, i, j] ~= sum_r last[t, r] * first[r, s] * vertical[r, i] * horizontal[r, j]

which runs as four layers: 1x1 (S->R), kh x 1 depthwise, 1 x kw depthwise,
1x1 (R->T). The ALS is organised around two BLAS calls per sweep (the MTTKRPs
of the two large modes); the other modes reuse a shared partial contraction
through batched matrix products (small kernels: per-call overhead, not flops,
is what a sweep costs). Gram solves are done in float64 with a tiny ridge, the
best iterate is kept, and a sweep whose factors blow up (degenerate, mutually
cancelling components) stops the run.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import RankError


@dataclass(frozen=True)
class ConvFactors:
    """The four CP factors of a (T, S, kh, kw) kernel, float32, in Caffe blob shapes.

    first : (R, S, 1, 1); vertical : (R, 1, kh, 1); horizontal : (R, 1, 1, kw);
    last : (T, R, 1, 1); relative_error : ||K - K_R||_F / ||K||_F; iterations run.
    """

    first: np.ndarray
    vertical: np.ndarray
    horizontal: np.ndarray
    last: np.ndarray
    relative_error: float
    iterations: int

    @property
    def rank(self) -> int:
        return self.first.shape[0]


def cp_reconstruct(factors: ConvFactors) -> np.ndarray:
    """The (T, S, kh, kw) kernel the factors represent, float32."""
    a = factors.last[:, :, 0, 0].astype(np.float64)
    b = factors.first[:, :, 0, 0].T.astype(np.float64)
    c = factors.vertical[:, 0, :, 0].T.astype(np.float64)
    d = factors.horizontal[:, 0, 0, :].T.astype(np.float64)
    return np.einsum("tr,sr,ir,jr->tsij", a, b, c, d, optimize=True).astype(np.float32)


def _leading_vectors(unfolded: np.ndarray, rank: int, rng: np.random.Generator) -> np.ndarray:
    """Leading left singular vectors of an unfolding, padded with random columns."""
    gram = unfolded @ unfolded.T
    try:
        evals, evecs = np.linalg.eigh(gram)
        evecs = evecs[:, ::-1]
    except np.linalg.LinAlgError:  # rare: fall back to a random orthonormal start
        evecs, _ = np.linalg.qr(rng.standard_normal(gram.shape))
    dim = unfolded.shape[0]
    k = min(rank, dim)
    cols = [evecs[:, :k]]
    if rank > dim:
        cols.append(rng.standard_normal((dim, rank - dim)) / np.sqrt(dim))
    return np.concatenate(cols, axis=1)


def _solve(gram: np.ndarray, mttkrp: np.ndarray) -> np.ndarray:
    """Factor = mttkrp @ gram^-1 with a relative ridge for stability (float64)."""
    ridge = 1e-12 * max(float(np.trace(gram)) / gram.shape[0], 1e-300)
    g = gram.copy()
    g.flat[:: g.shape[0] + 1] += ridge
    try:
        return np.linalg.solve(g, mttkrp.T).T
    except np.linalg.LinAlgError:
        return mttkrp @ np.linalg.pinv(g)


class CPKernel:
    """A kernel prepared once for CP-ALS at several ranks (a rank grid): its norm, the unit-norm kernel in
    float64 and its mode-S unfolding in each working precision (made on first use)."""

    def __init__(self, kernel: np.ndarray) -> None:
        if kernel.ndim != 4:
            raise ValueError(f"kernel must be 4-D (T, S, kh, kw), got shape {kernel.shape}")
        self.shape = kernel.shape
        self.x64 = np.asarray(kernel, dtype=np.float64)
        self.norm = float(np.linalg.norm(self.x64))
        self.finite = self.norm != 0.0 and np.isfinite(self.norm)
        self.unit = self.x64 / self.norm if self.finite else None
        self._unfolded: dict = {}

    def unfolded(self, work) -> np.ndarray:
        """(S, T*kh*kw) mode-S unfolding of the unit kernel in ``work`` precision."""
        if work not in self._unfolded:
            t, s, kh, kw = self.shape
            x = self.unit.astype(work)  # unit norm: keeps float32 BLAS well scaled
            self._unfolded[work] = np.ascontiguousarray(x.transpose(1, 0, 2, 3).reshape(s, t * kh * kw))
        return self._unfolded[work]


def cp_conv(
    kernel: np.ndarray | CPKernel,
    rank: int,
    *,
    seed: int = 0,
    n_iter_max: int = 200,
    tol: float = 1e-9,
    init: ConvFactors | None = None,
) -> ConvFactors:
    """CP-ALS of ``kernel`` (T, S, kh, kw) at ``rank`` (a :class:`CPKernel` when several ranks are run).

    Deterministic for a given ``seed`` and thread count. ``init`` warm-starts
    from other factors (extra components are drawn at random, surplus ones are
    dropped, the largest kept). Stops when the relative error improves by less
    than ``tol`` in a sweep.
    """
    prepared = kernel if isinstance(kernel, CPKernel) else CPKernel(kernel)
    t, s, kh, kw = prepared.shape
    if rank < 1:
        raise RankError(f"rank {rank} must be >= 1")
    norm_x = prepared.norm
    rng = np.random.default_rng(seed)
    if not prepared.finite:
        zeros = np.zeros
        return _pack(zeros((t, rank)), zeros((s, rank)), zeros((kh, rank)), zeros((kw, rank)), 0.0, 0)
    # float64 where it is cheap (and exact recovery needs the digits); float32
    # BLAS for large kernels, where the two GEMMs per sweep dominate.
    work = np.float64 if t * s * kh * kw * rank <= 2e7 else np.float32
    x_s = prepared.unfolded(work)  # (S, T*kh*kw)

    a, b, c, d = _start(prepared, rank, init, rng)

    k = kh * kw
    best = None
    best_err = np.inf
    prev_err = np.inf
    iterations = 0
    ga, gc, gd = a.T @ a, c.T @ c, d.T @ d
    for iterations in range(1, n_iter_max + 1):
        # Mode S: MTTKRP with the Khatri-Rao product of (A, C, D) -- one GEMM.
        cd = (c[:, None, :] * d[None, :, :]).reshape(k, rank)  # (kh*kw, R): the spatial components
        krp = (a[:, None, :] * cd[None, :, :]).reshape(t * k, rank)
        b = _solve(ga * gc * gd, (x_s @ krp.astype(work)).astype(np.float64))
        gb = b.T @ b
        # Shared partial contraction Z[r, t, ij] = sum_s b[s, r] x[t, s, i, j] -- one GEMM -- and
        # Y[r, i, j] = sum_t a[t, r] Z[r, t, i, j], which both spatial modes contract further.
        z = (b.T.astype(work) @ x_s).astype(np.float64).reshape(rank, t, k)
        y = np.matmul(a.T[:, None, :], z).reshape(rank, kh, kw)
        c = _solve(ga * gb * gd, np.matmul(y, d.T[:, :, None])[:, :, 0].T)
        gc = c.T @ c
        d = _solve(ga * gb * gc, np.matmul(c.T[:, None, :], y)[:, 0, :].T)
        gd = d.T @ d
        cd = (c[:, None, :] * d[None, :, :]).reshape(k, rank)
        m_a = np.matmul(z, cd.T[:, :, None])[:, :, 0].T
        a = _solve(gb * gc * gd, m_a)
        ga = a.T @ a
        # ||X - Xhat||^2 = 1 - 2 <X, Xhat> + ||Xhat||^2 (X has unit norm).
        fit_sq = 1.0 - 2.0 * float(np.sum(a * m_a)) + float(np.sum(ga * gb * gc * gd))
        err = float(np.sqrt(max(fit_sq, 0.0)))
        scale = max(float(np.max(np.abs(f))) for f in (a, b, c, d))
        if not np.isfinite(err) or not np.isfinite(scale) or scale > 1e6:
            break  # degenerate: components diverge while cancelling each other
        if err < best_err:
            best_err = err
            best = (a.copy(), b.copy(), c.copy(), d.copy())
        if prev_err - err < tol * max(prev_err, 1e-12) and iterations > 2:
            break
        prev_err = err
    if best is None:
        raise RankError(f"CP-ALS at rank {rank} diverged on a {kernel.shape} kernel")
    a, b, c, d = best
    # Exact error of the kept iterate (the running estimate loses digits near 0).
    approx = np.einsum("tr,sr,ir,jr->tsij", a, b, c, d, optimize=True)
    rel = float(np.linalg.norm(prepared.unit - approx))
    return _pack(a * norm_x, b, c, d, rel, iterations)


def _start(prepared: CPKernel, rank: int, init: ConvFactors | None, rng: np.random.Generator) -> tuple:
    """The factors ALS starts from, at the unit kernel's scale: ``init``'s largest components (surplus ones
    dropped, missing ones drawn small at random), or each unfolding's leading singular vectors."""
    t, s, kh, kw = prepared.shape
    if init is not None and init.rank > 0:
        root = prepared.norm ** 0.25
        a, b, c, d = (f / root for f in _unpack(init))
        weight = np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=0) * np.linalg.norm(c, axis=0) * np.linalg.norm(d, axis=0)
        keep = np.argsort(weight)[::-1][:rank]
        a, b, c, d = (f[:, keep] for f in (a, b, c, d))
        extra = rank - a.shape[1]
        if extra > 0:
            scale = 0.1 * float(np.median(weight)) ** 0.25 if weight.size else 0.1
            a, b, c, d = (np.concatenate([f, scale * rng.standard_normal((f.shape[0], extra))], axis=1)
                          for f in (a, b, c, d))
        return a, b, c, d
    unit = prepared.unit
    return (_leading_vectors(unit.reshape(t, -1), rank, rng),
            _leading_vectors(unit.transpose(1, 0, 2, 3).reshape(s, -1), rank, rng),
            _leading_vectors(unit.transpose(2, 0, 1, 3).reshape(kh, -1), rank, rng),
            _leading_vectors(unit.transpose(3, 0, 1, 2).reshape(kw, -1), rank, rng))


def _balanced(a, b, c, d):
    """Give every factor column the same norm (the 4th root of the component weight)."""
    norms = [np.linalg.norm(f, axis=0) for f in (a, b, c, d)]
    weight = norms[0] * norms[1] * norms[2] * norms[3]
    root = weight ** 0.25
    out = []
    for f, n in zip((a, b, c, d), norms):
        safe = np.where(n > 0, n, 1.0)
        out.append(f / safe * root)
    return out


def _pack(a, b, c, d, rel: float, iterations: int) -> ConvFactors:
    a, b, c, d = _balanced(a, b, c, d)
    rank = a.shape[1]
    return ConvFactors(
        first=np.ascontiguousarray(b.T.reshape(rank, -1, 1, 1), dtype=np.float32),
        vertical=np.ascontiguousarray(c.T.reshape(rank, 1, -1, 1), dtype=np.float32),
        horizontal=np.ascontiguousarray(d.T.reshape(rank, 1, 1, -1), dtype=np.float32),
        last=np.ascontiguousarray(a.reshape(a.shape[0], rank, 1, 1), dtype=np.float32),
        relative_error=float(rel),
        iterations=int(iterations),
    )


def _unpack(f: ConvFactors):
    a = f.last[:, :, 0, 0].astype(np.float64)
    b = f.first[:, :, 0, 0].T.astype(np.float64)
    c = f.vertical[:, 0, :, 0].T.astype(np.float64)
    d = f.horizontal[:, 0, 0, :].T.astype(np.float64)
    return a, b, c, d
