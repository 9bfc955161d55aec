"""Tiny Caffe models built in code, with known ground truth, for the tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from caffe_compress import io
from caffe_compress._proto import caffe_pb2 as pb


def write_model(tmp: Path, stem: str, prototxt: str, weights: dict[str, list[np.ndarray]], *, v1: bool = False,
                extra_layers: dict[str, list[np.ndarray]] | None = None) -> tuple[Path, Path]:
    """Write STEM.prototxt (given text) and STEM.caffemodel (blobs per layer name)."""
    deploy = tmp / f"{stem}.prototxt"
    deploy.write_text(prototxt)
    msg = pb.NetParameter(name=stem)
    for name, blobs in {**weights, **(extra_layers or {})}.items():
        if v1:
            layer = msg.layers.add(name=name, type=pb.V1LayerParameter.CONVOLUTION)
            for b in blobs:
                blob = layer.blobs.add()
                shape = (1,) * (4 - b.ndim) + b.shape if b.ndim <= 4 else b.shape
                blob.num, blob.channels, blob.height, blob.width = shape
                blob.data.extend(b.astype(np.float32).ravel().tolist())
        else:
            layer = msg.layer.add(name=name, type="Unknown")
            for b in blobs:
                layer.blobs.append(io.array_to_blob(b.astype(np.float32)))
    model = tmp / f"{stem}.caffemodel"
    model.write_bytes(msg.SerializeToString())
    return deploy, model


def gaussian_weights(seed: int, scale: float = 0.3):
    """r(*shape, scale=...) -> float32 N(0, scale^2) arrays, drawn in call order from one seeded stream."""
    rng = np.random.default_rng(seed)

    def r(*shape, scale: float = scale) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    return r


def cp_kernel(t: int, s: int, kh: int, kw: int, rank: int, seed: int = 0) -> np.ndarray:
    """A (t, s, kh, kw) kernel of exact CP rank ``rank``."""
    rng = np.random.default_rng(seed)
    a, b, c, d = (rng.standard_normal((n, rank)) for n in (t, s, kh, kw))
    return np.einsum("tr,sr,ir,jr->tsij", a, b, c, d).astype(np.float32) / np.sqrt(rank * s)


def low_rank_matrix(n: int, k: int, rank: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, rank)) @ rng.standard_normal((rank, k)) / np.sqrt(rank * k)).astype(np.float32)


def opencv_outputs(deploy: Path, weights: Path, inputs: dict[str, np.ndarray], outputs: list[str] | None = None):
    import cv2

    net = cv2.dnn.readNetFromCaffe(str(deploy), str(weights))
    for name, value in inputs.items():
        net.setInput(value.astype(np.float32), name)
    if outputs is None:
        return [net.forward().copy()]
    return [o.copy() for o in net.forward(outputs)]


def max_relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(a))), 1e-30))


PROGRESS_LINE = __import__("re").compile(r"^\d\d:\d\d:\d\d caffe-compress: ")


def message_lines(stderr: str | bytes) -> list[str]:
    """stderr without the timestamped progress lines (stderr is not a terminal in tests): what must be
    exactly one line when a run fails."""
    text = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr
    return [line for line in text.strip().splitlines() if not PROGRESS_LINE.match(line)]
