"""Spatial SVD of a convolution kernel: a kh x 1 convolution into R channels, then a 1 x kw one.

kernel[t, s, i, j] ~= sum_r horizontal[t, r, j] * vertical[r, s, i], the truncated SVD of the kernel
unfolded as the (S*kh) x (T*kw) matrix M[(s, i), (t, j)]. The vertical layer takes the original
vertical stride, pad and dilation, the horizontal one the horizontal ones; the bias goes to the second.
Exact whenever rank(M) <= R.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .svd import SpectralBasis, spectral_basis


@dataclass(frozen=True)
class SpatialFactors:
    """vertical : (R, S, kh, 1); horizontal : (T, R, 1, kw); float32."""

    vertical: np.ndarray
    horizontal: np.ndarray
    relative_error: float

    @property
    def rank(self) -> int:
        return self.vertical.shape[0]


def spatial_matrix(kernel: np.ndarray) -> np.ndarray:
    """M[(s, i), (t, j)] = kernel[t, s, i, j]."""
    t, s, kh, kw = kernel.shape
    return np.ascontiguousarray(kernel.transpose(1, 2, 0, 3).reshape(s * kh, t * kw))


def spatial_basis(kernel: np.ndarray) -> SpectralBasis:
    return spectral_basis(spatial_matrix(kernel))


def spatial_factors(basis: SpectralBasis, kernel_shape: tuple[int, ...], rank: int) -> SpatialFactors:
    t, s, kh, kw = kernel_shape
    f = basis.factors(rank)  # M ~= second (S*kh, R) @ first (R, T*kw)
    vertical = f.second.T.reshape(rank, s, kh, 1)
    horizontal = f.first.reshape(rank, t, kw).transpose(1, 0, 2).reshape(t, rank, 1, kw)
    return SpatialFactors(np.ascontiguousarray(vertical, dtype=np.float32),
                          np.ascontiguousarray(horizontal, dtype=np.float32), f.relative_error)


def spatial_reconstruct(f: SpatialFactors) -> np.ndarray:
    return np.einsum("trj,rsi->tsij", f.horizontal[:, :, 0, :].astype(np.float64),
                     f.vertical[:, :, :, 0].astype(np.float64), optimize=True).astype(np.float32)


def spatial_svd_conv(kernel: np.ndarray, rank: int) -> SpatialFactors:
    """Best rank-``rank`` spatial factors of ``kernel`` (T, S, kh, kw)."""
    return spatial_factors(spatial_basis(kernel), kernel.shape, rank)
