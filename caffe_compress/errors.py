"""Errors a user can cause, each mapped to a documented exit code.

Every message names the offending file, option or layer first, so the CLI can
print it as one line: ``caffe-compress: error: <message>``.
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_BAD_MODEL = 3
EXIT_UNREADABLE = 4
EXIT_CANNOT_WRITE = 5
EXIT_VALIDATION = 6
EXIT_FETCH = 7
EXIT_EXPORT = 8
EXIT_INTERNAL = 70


class CaffeCompressError(Exception):
    """Base class: a failure with a one-line message and an exit code."""

    exit_code = EXIT_INTERNAL


class UsageError(CaffeCompressError):
    """A command-line option or API argument is invalid."""

    exit_code = EXIT_USAGE


class RankError(UsageError):
    """A requested rank is out of range for its layer."""


class ModelError(CaffeCompressError):
    """The prototxt or caffemodel is malformed or inconsistent."""

    exit_code = EXIT_BAD_MODEL


class NumericalError(ModelError):
    """A decomposition failed to converge on a layer's weights."""


class UnreadableInputError(CaffeCompressError):
    """An input path is missing, not a regular file, or cannot be read."""

    exit_code = EXIT_UNREADABLE


class WriteError(CaffeCompressError):
    """An output cannot be written (or would overwrite an input)."""

    exit_code = EXIT_CANNOT_WRITE


class ValidationError(CaffeCompressError):
    """The written model failed OpenCV validation."""

    exit_code = EXIT_VALIDATION


class ExportError(CaffeCompressError):
    """The ONNX export failed (a layer with no ONNX equivalent, or the ONNX model misses the contract);
    the Caffe model is still written."""

    exit_code = EXIT_EXPORT


class FetchError(CaffeCompressError):
    """A known model could not be fetched or failed its checksum."""

    exit_code = EXIT_FETCH


class MissingDependencyError(CaffeCompressError):
    """An optional dependency (OpenCV, matplotlib) is not installed."""

    exit_code = EXIT_USAGE
