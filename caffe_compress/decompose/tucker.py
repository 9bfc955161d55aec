"""Tucker-2 decomposition of a convolution kernel over its two channel modes (HOSVD + a few HOOI sweeps).

kernel[t, s, i, j] ~= sum_{a, b} last[t, a] * core[a, b, i, j] * first[b, s]

which runs as three layers: 1x1 (S->R_in), kh x kw (R_in->R_out, the original stride, pad and dilation),
1x1 (R_out->T). The 1x1 layers carry no geometry, so zero padding commutes with the first one (it has no
bias). Exact whenever the kernel's channel-mode ranks are within (R_in, R_out).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import RankError

HOOI_SWEEPS = 3  # alternating refinements after the HOSVD start (each: two small eighs)


@dataclass(frozen=True)
class TuckerFactors:
    """first : (R_in, S, 1, 1); core : (R_out, R_in, kh, kw); last : (T, R_out, 1, 1); float32."""

    first: np.ndarray
    core: np.ndarray
    last: np.ndarray
    relative_error: float

    @property
    def ranks(self) -> tuple[int, int]:
        return self.first.shape[0], self.last.shape[1]


def tucker_ranks(rank: int, t: int, s: int) -> tuple[int, int]:
    """(R_in, R_out) for one rank knob: the same number on both sides, capped at the channel counts."""
    return min(rank, s), min(rank, t)


def _leading(gram: np.ndarray, k: int) -> np.ndarray:
    evals, evecs = np.linalg.eigh(gram)
    return evecs[:, ::-1][:, :k]


def tucker_reconstruct(f: TuckerFactors) -> np.ndarray:
    u_out = f.last[:, :, 0, 0].astype(np.float64)
    u_in = f.first[:, :, 0, 0].astype(np.float64)
    return np.einsum("ta,abij,bs->tsij", u_out, f.core.astype(np.float64), u_in, optimize=True).astype(np.float32)


def hosvd_bases(kernel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every leading vector of the two channel modes, (T, T) and (S, S), largest first: the HOSVD start of
    any rank is their first columns, so a rank grid computes them once."""
    t, s = kernel.shape[:2]
    x = np.asarray(kernel, dtype=np.float64)
    x_t = x.reshape(t, -1)
    x_s = x.transpose(1, 0, 2, 3).reshape(s, -1)
    return _leading(x_t @ x_t.T, t), _leading(x_s @ x_s.T, s)


def tucker2_conv(kernel: np.ndarray, rank: int, *, sweeps: int = HOOI_SWEEPS,
                 bases: tuple[np.ndarray, np.ndarray] | None = None) -> TuckerFactors:
    """Tucker-2 of ``kernel`` (T, S, kh, kw) at ``rank`` (see tucker_ranks), float64 inside, deterministic.
    ``bases``: the kernel's hosvd_bases, when several ranks are cut from them."""
    if kernel.ndim != 4:
        raise ValueError(f"kernel must be 4-D (T, S, kh, kw), got shape {kernel.shape}")
    t, s, kh, kw = kernel.shape
    if rank < 1:
        raise RankError(f"rank {rank} must be >= 1")
    r_in, r_out = tucker_ranks(rank, t, s)
    x = np.asarray(kernel, dtype=np.float64)
    norm = float(np.linalg.norm(x))
    full_out, full_in = bases if bases is not None else hosvd_bases(x)
    u_out, u_in = full_out[:, :r_out], full_in[:, :r_in]
    for _ in range(sweeps):  # HOOI: each side's subspace given the other's projection
        y = np.einsum("tsij,ta->asij", x, u_out, optimize=True).reshape(r_out, s, kh * kw)
        y_s = y.transpose(1, 0, 2).reshape(s, -1)
        u_in = _leading(y_s @ y_s.T, r_in)
        z = np.einsum("tsij,sb->tbij", x, u_in, optimize=True).reshape(t, -1)
        u_out = _leading(z @ z.T, r_out)
    core = np.einsum("tsij,ta,sb->abij", x, u_out, u_in, optimize=True)
    approx = np.einsum("ta,abij,sb->tsij", u_out, core, u_in, optimize=True)
    rel = float(np.linalg.norm(x - approx) / norm) if norm > 0 and np.isfinite(norm) else 0.0
    return TuckerFactors(
        first=np.ascontiguousarray(u_in.T.reshape(r_in, s, 1, 1), dtype=np.float32),
        core=np.ascontiguousarray(core, dtype=np.float32),
        last=np.ascontiguousarray(u_out.reshape(t, r_out, 1, 1), dtype=np.float32),
        relative_error=rel,
    )
