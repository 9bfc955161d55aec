"""caffe-compress: shrink Caffe models for OpenCV DNN by SVD and CP decomposition, on the device."""
from .errors import CaffeCompressError
from .io import load, save
from .net import Layer, Net
from .pipeline import DEFAULT_TRADEOFF, compress
from .report import Report
from .validate import Preprocessing

__version__ = "0.1.0"

__all__ = [
    "CaffeCompressError",
    "DEFAULT_TRADEOFF",
    "Layer",
    "Net",
    "Preprocessing",
    "Report",
    "compress",
    "load",
    "save",
    "__version__",
]
