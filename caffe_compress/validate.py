"""OpenCV DNN: run the original and the compressed model on the same inputs and compare.

OpenCV is imported lazily so that ``import caffe_compress`` has no side effects;
a missing or too-new OpenCV (5.x has no Caffe importer) gives one clear error.
"""
from __future__ import annotations

import os

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .errors import MissingDependencyError, UsageError, ValidationError
from .memory import heap_for_passes

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def cv2_module():
    try:
        import cv2  # noqa: PLC0415 - deliberate lazy import
    except ImportError:
        raise MissingDependencyError(
            "opencv: cannot import cv2; install opencv-python-headless>=4.5,<5"
        ) from None
    if not hasattr(cv2, "dnn") or not hasattr(cv2.dnn, "readNetFromCaffe"):
        raise MissingDependencyError(
            f"opencv {getattr(cv2, '__version__', '?')}: no Caffe importer (removed in OpenCV 5); "
            "install opencv-python-headless>=4.5,<5"
        )
    try:  # OpenCV's own log lines would break the one-line error contract
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    except AttributeError:
        pass
    return cv2


def load_opencv_net(prototxt: bytes | Path, caffemodel: bytes | Path, *, what: str = "model",
                    error: type[Exception] = ValidationError):
    """A cv2.dnn.Net from files or in-memory bytes; ``error`` (ValidationError) if OpenCV refuses it."""
    cv2 = cv2_module()
    try:
        if isinstance(prototxt, (bytes, bytearray)):
            net = cv2.dnn.readNetFromCaffe(
                np.frombuffer(prototxt, dtype=np.uint8), np.frombuffer(caffemodel, dtype=np.uint8)
            )
        else:
            net = cv2.dnn.readNetFromCaffe(str(prototxt), str(caffemodel))
    except cv2.error as exc:
        raise error(f"{what}: OpenCV cannot load it: {_cv_message(exc)}") from None
    if net.empty():
        raise error(f"{what}: OpenCV loaded an empty network")
    return net


def _cv_message(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    for line in reversed(text):
        if "error:" in line:
            return line.split("error:", 1)[1].strip()
    return text[-1] if text else type(exc).__name__


def forward(cv_net, inputs: Mapping[str, np.ndarray], outputs: Sequence[str], *, what: str = "model",
            error: type[Exception] = ValidationError) -> dict[str, np.ndarray]:
    """Run the net; returns {blob name: array} for the requested blobs."""
    cv2 = cv2_module()
    try:
        with heap_for_passes():  # (the pass's temporaries: see memory.heap_for_passes)
            for name, value in inputs.items():
                cv_net.setInput(np.ascontiguousarray(value, dtype=np.float32), name)
            values = cv_net.forward(list(outputs))
    except cv2.error as exc:
        raise error(f"{what}: OpenCV forward pass failed: {_cv_message(exc)}") from None
    return {name: np.array(v, dtype=np.float32, copy=True) for name, v in zip(outputs, values)}


# ------------------------------------------------------------------ probe inputs


@dataclass(frozen=True)
class Preprocessing:
    """How image files become network inputs (OpenCV blobFromImage semantics)."""

    size: tuple[int, int] | None = None  # (width, height) of the network input; None = from the net
    resize: tuple[int, int] | None = None  # resize to (w, h) then centre-crop to size
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    scale: float = 1.0
    swap_rb: bool = False


def list_images(directory: Path, *, option: str) -> list[Path]:
    if not directory.is_dir():
        raise UsageError(f"{option}: {directory} is not a directory")
    files = sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise UsageError(f"{option}: {directory} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


MAX_IMAGE_BYTES = 64 << 20  # an image file larger than this is refused before it is read
MAX_IMAGE_PIXELS = 1 << 26  # and a decoded image larger than this (a decompression bomb) too


def _decode_image(cv2, path: Path, channels: int, option: str) -> np.ndarray:
    """Decode an image from bytes read by Python (OpenCV never sees the user's path, whatever its bytes)."""
    try:
        if path.stat().st_size > MAX_IMAGE_BYTES:
            raise UsageError(f"{option}: {path}: image file larger than {MAX_IMAGE_BYTES >> 20} MB")
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise UsageError(f"{option}: {path}: cannot read image: {exc.strerror}") from None
    os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(MAX_IMAGE_PIXELS))
    try:
        img = cv2.imdecode(data, cv2.IMREAD_COLOR if channels == 3 else cv2.IMREAD_GRAYSCALE)
    except cv2.error:
        img = None
    except MemoryError:
        raise UsageError(f"{option}: {path}: image too large to decode") from None
    if img is None:
        raise UsageError(f"{option}: {path}: cannot decode image (corrupt, unsupported or too large)")
    return img


def image_batch(paths: Sequence[Path], shape: tuple[int, ...], pre: Preprocessing, *, option: str) -> np.ndarray:
    """Read and preprocess images into an (N, C, H, W) float32 batch."""
    cv2 = cv2_module()
    if len(shape) != 4:
        raise UsageError(f"{option}: the network input has shape {shape}; images need a 4-D (N, C, H, W) input")
    _, channels, height, width = shape
    size = pre.size or (width, height)
    batch = []
    for p in paths:
        img = _decode_image(cv2, Path(p), channels, option)
        if pre.resize:
            img = cv2.resize(img, pre.resize)
            y0 = (img.shape[0] - size[1]) // 2
            x0 = (img.shape[1] - size[0]) // 2
            if y0 < 0 or x0 < 0:
                raise UsageError(f"{option}: --resize {pre.resize} is smaller than the input size {size}")
            img = img[y0 : y0 + size[1], x0 : x0 + size[0]]
        batch.append(
            cv2.dnn.blobFromImage(img, pre.scale, size, pre.mean, swapRB=pre.swap_rb, crop=False)
        )
    return np.concatenate(batch, axis=0).astype(np.float32)


# ------------------------------------------------------------------ comparison


@dataclass(frozen=True)
class OutputAgreement:
    """How close one output blob of the compressed model is to the original's."""

    name: str
    top1_agreement: float  # fraction of samples (rows) with the same argmax
    max_relative_error: float  # max over samples of ||y' - y|| / ||y||
    mean_relative_error: float
    cosine_similarity: float  # mean over samples


WORK_BYTES = 4 << 20  # float64 working copies of an output are made this many bytes at a time


def row_blocks(rows: int, row_size: int):
    """Slices of ``rows`` rows of ``row_size`` entries each, at most WORK_BYTES a slice in float64: a float64
    copy of a whole output (an SR net's 288 x 288 map for 128 inputs: 85 MB) is never made."""
    step = max(1, WORK_BYTES // (8 * max(row_size, 1)))
    return (slice(i, min(i + step, rows)) for i in range(0, rows, step))


def compare_outputs(original: Mapping[str, np.ndarray], compressed: Mapping[str, np.ndarray]) -> list[OutputAgreement]:
    rows = []
    for name, y in original.items():
        z = compressed[name]
        if y.shape != z.shape:
            raise ValidationError(f"output '{name}': shape {z.shape} differs from the original {y.shape}")
        n = y.shape[0] if y.ndim > 1 else 1
        rel, cos, same = np.empty(n), np.empty(n), np.empty(n, dtype=bool)
        for block in row_blocks(n, y.size // max(n, 1)):
            a = y.reshape(n, -1)[block].astype(np.float64)
            b = z.reshape(n, -1)[block].astype(np.float64)
            if not np.all(np.isfinite(b)):
                raise ValidationError(f"output '{name}': the compressed model produces NaN/Inf")
            d = a - b
            diff = np.sqrt(np.einsum("ij,ij->i", d, d))
            del d
            ref = np.sqrt(np.einsum("ij,ij->i", a, a))
            rel[block] = np.where(ref > 0, diff / np.where(ref > 0, ref, 1.0), diff)
            denom = ref * np.sqrt(np.einsum("ij,ij->i", b, b))
            cos[block] = np.where(denom > 0, np.einsum("ij,ij->i", a, b) / np.where(denom > 0, denom, 1.0), 1.0)
            same[block] = np.argmax(a, axis=1) == np.argmax(b, axis=1)
        top1 = float(np.mean(same)) if y.size // max(n, 1) > 1 else 1.0
        rows.append(OutputAgreement(name, top1, float(rel.max()), float(rel.mean()), float(cos.mean())))
    return rows


def median_latency_ms(prototxt: Path, caffemodel: Path, sample: np.ndarray, *, threads: int,
                      runs: int = 20, warmup: int = 5) -> float:
    """Median single-input OpenCV forward time in ms, after ``warmup`` runs, with ``threads`` threads."""
    cv2 = cv2_module()
    cv2.setNumThreads(int(threads))
    net = load_opencv_net(Path(prototxt), Path(caffemodel), what=str(prototxt))
    x = np.ascontiguousarray(sample, dtype=np.float32)
    for _ in range(warmup):
        net.setInput(x)
        net.forward()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        net.setInput(x)
        net.forward()
        times.append(time.perf_counter() - start)
    return 1000.0 * float(np.median(times))


def cpu_model() -> str:
    """A human-readable CPU name for reports (from /proc/cpuinfo where available)."""
    import platform

    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
