"""Pure-numpy decompositions: no protobuf, no I/O, deterministic for a given seed."""
from .cp import ConvFactors, cp_conv, cp_reconstruct
from .svd import LinearFactors, SpectralBasis, spectral_basis, truncated_svd

__all__ = [
    "ConvFactors",
    "LinearFactors",
    "SpectralBasis",
    "cp_conv",
    "cp_reconstruct",
    "spectral_basis",
    "truncated_svd",
]
