"""Truncated SVD of a weight matrix into two balanced factors.

The spectrum comes from the Gram matrix of the shorter side (an N x N eigh
instead of an N x K SVD), computed in float64: for GenderNet's fc6
(512 x 18816) that is ~30x faster than ``numpy.linalg.svd`` and as accurate
for the leading singular triplets that truncation keeps.
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


@dataclass(frozen=True)
class SpectralBasis:
    """All singular triplets of W, largest first, so any rank is cheap to cut.

    u : (N, m); s : (m,) float64; vt : (m, K); m = min(N, K). u and vt are float32
    for large matrices (memory), float64 otherwise.
    """

    u: np.ndarray
    s: np.ndarray
    vt: np.ndarray
    frobenius: float

    def relative_error(self, rank: int) -> float:
        """||W - W_rank||_F / ||W||_F from the discarded singular values."""
        if self.frobenius == 0.0:
            return 0.0
        tail = float(np.sum(self.s[rank:] ** 2))
        return float(np.sqrt(max(tail, 0.0)) / self.frobenius)

    def factors(self, rank: int) -> LinearFactors:
        m = self.s.size
        if not 1 <= rank <= m:
            raise RankError(f"rank {rank} out of range 1..{m}")
        root = np.sqrt(self.s[:rank])
        # in the bases' own precision: a float64 copy of a large factor would double the peak memory
        first = (self.vt[:rank] * root[:, None].astype(self.vt.dtype)).astype(np.float32, copy=False)
        second = (self.u[:, :rank] * root[None, :].astype(self.u.dtype)).astype(np.float32, copy=False)
        return LinearFactors(first, second, self.relative_error(rank))


def spectral_basis(weight: np.ndarray) -> SpectralBasis:
    """Full singular-value decomposition of ``weight`` (N, K), via the smaller Gram matrix."""
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
    s = np.sqrt(evals)
    # V^T = S^-1 U^T W; singular values that are ~0 give arbitrary (zeroed) rows.
    tiny = s <= s[0] * 1e-12 if s.size and s[0] > 0 else np.ones_like(s, dtype=bool)
    inv = np.where(tiny, 0.0, 1.0 / np.where(tiny, 1.0, s))
    vt = u.T.astype(w.dtype) @ w
    vt *= inv[:, None].astype(w.dtype)  # in place: vt can be tens of MB
    frob = float(np.sqrt(np.sum(evals)))
    if transposed:
        u, vt = vt.T, u.T
    return SpectralBasis(u=u, s=s, vt=vt, frobenius=frob)


def truncated_svd(weight: np.ndarray, rank: int) -> LinearFactors:
    """Best rank-``rank`` factors of ``weight`` (N, K), balanced as U sqrt(S), sqrt(S) V^T."""
    m = min(weight.shape)
    if not 1 <= rank <= m:
        raise RankError(f"rank {rank} out of range 1..{m} for a {weight.shape[0]}x{weight.shape[1]} weight")
    return spectral_basis(weight).factors(rank)
