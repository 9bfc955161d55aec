"""Pure-numpy decompositions: no protobuf, no I/O, deterministic for a given seed."""
from .cp import ConvFactors, CPKernel, cp_conv, cp_reconstruct
from .spatial import SpatialFactors, spatial_basis, spatial_factors, spatial_reconstruct, spatial_svd_conv
from .svd import LinearFactors, SpectralBasis, spectral_basis, truncated_svd
from .tucker import TuckerFactors, tucker2_conv, tucker_ranks, tucker_reconstruct

__all__ = [
    "CPKernel",
    "ConvFactors",
    "LinearFactors",
    "SpatialFactors",
    "SpectralBasis",
    "TuckerFactors",
    "cp_conv",
    "cp_reconstruct",
    "spatial_basis",
    "spatial_factors",
    "spatial_reconstruct",
    "spatial_svd_conv",
    "spectral_basis",
    "truncated_svd",
    "tucker2_conv",
    "tucker_ranks",
    "tucker_reconstruct",
]
