"""Truncated SVD of a weight matrix into two balanced factors.

The spectrum comes from the Gram matrix of the shorter side (an N x N eigh
instead of an N x K SVD), computed in float64: for GenderNet's fc6
(512 x 18816) that is ~30x faster than ``numpy.linalg.svd`` and as accurate
for the leading singular triplets that truncation keeps.

A wide layer (AlexNet's fc6, 4096 x 9216) makes even the Gram eigh slow
(~12 s on a 2-core machine): when only the leading ``keep`` triplets are
wanted, they come from a few block power iterations on the Gram matrix and a
Rayleigh-Ritz step instead (~3x faster). The factors then span an orthonormal
basis that is a near-optimal, not the optimal, subspace at high ranks, and
their errors are exact for the factors actually produced.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import NumericalError, RankError


@dataclass(frozen=True)
class LinearFactors:
    """W (N, K) ~= second @ first.

    first : ndarray, shape (r, K), float32  -- sqrt(S) V^T
    second : ndarray, shape (N, r), float32 -- U sqrt(S)
    relative_error : float -- ||W - second @ first||_F / ||W||_F
    """

    first: np.ndarray
    second: np.ndarray
    relative_error: float

    @property
    def rank(self) -> int:
        return self.first.shape[0]


PARTIAL_ABOVE = 2048  # a Gram matrix larger than this: only the wanted leading triplets are computed
POWER_ITERATIONS = 2


@dataclass(frozen=True)
class SpectralBasis:
    """The singular triplets of W, largest first, so any rank is cheap to cut: all of them, or (``complete``
    False) the leading ones only -- then ``s.size`` is the largest rank it can cut.

    u : (N, m); s : (m,) float64; vt : (m, K); m = min(N, K) when complete. u and vt are float32
    for large matrices (memory), float64 otherwise.
    """

    u: np.ndarray
    s: np.ndarray
    vt: np.ndarray
    frobenius: float
    complete: bool = True

    def relative_error(self, rank: int) -> float:
        """||W - W_rank||_F / ||W||_F: from the discarded singular values, or (a partial basis) from the
        energy the kept ones leave of ||W||_F^2."""
        if self.frobenius == 0.0:
            return 0.0
        if self.complete:
            tail = float(np.sum(self.s[rank:] ** 2))
        else:
            tail = self.frobenius ** 2 - float(np.sum(self.s[:rank] ** 2))
        return float(np.sqrt(max(tail, 0.0)) / self.frobenius)

    def leading(self, count: int) -> "SpectralBasis":
        """This basis with only its ``count`` leading vectors, float32 copies (the rest's memory is freed):
        every singular value is kept, so ``relative_error`` stays exact, and ``factors`` cuts ranks up to
        ``count``, the same factors to float32 rounding."""
        count = max(1, min(int(count), self.vt.shape[0]))
        return SpectralBasis(u=np.array(self.u[:, :count], dtype=np.float32),
                             s=self.s, vt=np.array(self.vt[:count], dtype=np.float32),
                             frobenius=self.frobenius, complete=self.complete)

    def factors(self, rank: int) -> LinearFactors:
        m = min(self.s.size, self.vt.shape[0])
        if not 1 <= rank <= m:
            raise RankError(f"rank {rank} out of range 1..{m}")
        root = np.sqrt(self.s[:rank])
        # in the bases' own precision: a float64 copy of a large factor would double the peak memory
        first = (self.vt[:rank] * root[:, None].astype(self.vt.dtype)).astype(np.float32, copy=False)
        second = (self.u[:, :rank] * root[None, :].astype(self.u.dtype)).astype(np.float32, copy=False)
        return LinearFactors(first, second, self.relative_error(rank))


def spectral_basis(weight: np.ndarray, keep: int | None = None) -> SpectralBasis:
    """Singular-value decomposition of ``weight`` (N, K), via the smaller Gram matrix: all of it, or at least
    the ``keep`` leading triplets (only those, when the Gram matrix is large and ``keep`` well below it)."""
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D, got shape {weight.shape}")
    n, k = weight.shape
    transposed = n > k
    # Big matrices stay float32 (memory: GenderNet's fc6 is 38 MB as float32);
    # the small Gram matrix and its eigenproblem are float64.
    big = weight.size > 4_000_000
    w = np.asarray(weight, dtype=np.float32 if big else np.float64)
    if transposed:
        w = w.T
    gram = (w @ w.T).astype(np.float64)
    m = gram.shape[0]
    if keep is not None and m > PARTIAL_ABOVE and 0 < keep <= m // 2:
        evals, u = _leading_eigenpairs(gram, keep)
        return _basis(w, evals, u, float(np.sqrt(max(np.trace(gram), 0.0))), transposed, complete=False)
    try:
        evals, evecs = np.linalg.eigh(gram)
        order = np.argsort(evals)[::-1]
        evals = np.clip(evals[order], 0.0, None)
        u = evecs[:, order]
    except np.linalg.LinAlgError:
        # Fallback: a direct SVD of the (short, wide) matrix; LAPACK's gesdd then gesvd.
        try:
            u, sv, _ = np.linalg.svd(w.astype(np.float64), full_matrices=False)
        except np.linalg.LinAlgError:
            raise NumericalError(f"SVD of a {weight.shape[0]}x{weight.shape[1]} weight did not converge") from None
        evals = sv**2
    return _basis(w, evals, u, float(np.sqrt(np.sum(evals))), transposed, complete=True)


def _basis(w: np.ndarray, evals: np.ndarray, u: np.ndarray, frob: float, transposed: bool, *,
           complete: bool) -> SpectralBasis:
    """The triplets from the Gram eigenpairs (largest first) of ``w`` (the short side first)."""
    s = np.sqrt(evals)
    # V^T = S^-1 U^T W; singular values that are ~0 give arbitrary (zeroed) rows.
    tiny = s <= s[0] * 1e-12 if s.size and s[0] > 0 else np.ones_like(s, dtype=bool)
    inv = np.where(tiny, 0.0, 1.0 / np.where(tiny, 1.0, s))
    vt = u.T.astype(w.dtype) @ w
    vt *= inv[:, None].astype(w.dtype)  # in place: vt can be tens of MB
    if transposed:
        u, vt = vt.T, u.T
    return SpectralBasis(u=u, s=s, vt=vt, frobenius=frob, complete=complete)


def _leading_eigenpairs(gram: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``count`` largest eigenvalues (clipped at 0, descending) and their orthonormal eigenvectors of
    a symmetric PSD ``gram`` (float64), by block power iteration and Rayleigh-Ritz (Halko et al. 2011,
    algorithm 4.4). Eigenvalue i of the result is exactly ||u_i^T W||^2 for the vectors returned, so the
    errors computed from them are those of the factors made from them. Deterministic (a fixed start)."""
    n = gram.shape[0]
    width = min(n, count + max(16, count // 8))  # oversampling: the last wanted vectors converge too
    g32 = gram.astype(np.float32)  # the power iterations only find the subspace: float32 BLAS is enough
    y = g32 @ np.random.default_rng(0).standard_normal((n, width)).astype(np.float32)
    for _ in range(POWER_ITERATIONS):
        y = g32 @ _normalised_columns(y)
    del g32
    q, _ = np.linalg.qr(y.astype(np.float64))  # orthonormal even when y is rank deficient
    small = q.T @ (gram @ q)
    evals, vecs = np.linalg.eigh((small + small.T) / 2)
    order = np.argsort(evals)[::-1][:count]
    return np.clip(evals[order], 0.0, None), q @ vecs[:, order]


def _normalised_columns(y: np.ndarray) -> np.ndarray:
    """A well-conditioned basis of y's column span (between power iterations; not orthonormal to the last
    digit, which only the final QR needs): y V L^-1/2 from the eigenpairs of y^T y, floored for rank loss."""
    evals, vecs = np.linalg.eigh(y.T @ y)
    floor = max(float(evals[-1]), 1e-30) * 1e-6
    return (y @ vecs) / np.sqrt(np.maximum(evals, floor)).astype(y.dtype)


def truncated_svd(weight: np.ndarray, rank: int) -> LinearFactors:
    """Best rank-``rank`` factors of ``weight`` (N, K), balanced as U sqrt(S), sqrt(S) V^T."""
    m = min(weight.shape)
    if not 1 <= rank <= m:
        raise RankError(f"rank {rank} out of range 1..{m} for a {weight.shape[0]}x{weight.shape[1]} weight")
    return spectral_basis(weight).factors(rank)
