"""caffe-compress: shrink Caffe models for OpenCV DNN by SVD and CP decomposition, on the device.

The public names are imported on first use (PEP 562), so ``python -m caffe_compress`` starts without
loading numpy, protobuf or OpenCV until the command line has been read: a SIGINT that early ends with
one line, not a traceback from deep inside an import.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "CaffeCompressError": "errors",
    "DEFAULT_TRADEOFF": "pipeline",
    "Layer": "net",
    "Net": "net",
    "Preprocessing": "validate",
    "Report": "report",
    "compress": "pipeline",
    "load": "io",
    "save": "io",
}

__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'caffe_compress' has no attribute '{name}'")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
