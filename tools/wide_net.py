#!/usr/bin/env python3
"""Write a CaffeNet-shaped model (AlexNet's layers: 61M parameters, fc6 4096x9216, fc7 4096x4096) with random
weights whose spectra decay like trained ones, to measure caffe-compress on wide InnerProducts:

    python tools/wide_net.py DIR
    python -m caffe_compress DIR/caffenet.prototxt DIR/caffenet.caffemodel --tradeoff 0.95 -v

No trained weights are involved: the outputs mean nothing, only the sizes and times do.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from caffe_compress import io
from caffe_compress._proto import caffe_pb2 as pb

PROTOTXT = """name: "CaffeNetLike"
input: "data"
input_shape { dim: 1 dim: 3 dim: 227 dim: 227 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 96 kernel_size: 11 stride: 4 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "norm1" type: "LRN" bottom: "pool1" top: "norm1" lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 } }
layer { name: "conv2" type: "Convolution" bottom: "norm1" top: "conv2" convolution_param { num_output: 256 pad: 2 kernel_size: 5 group: 2 } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "norm2" type: "LRN" bottom: "pool2" top: "norm2" lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 } }
layer { name: "conv3" type: "Convolution" bottom: "norm2" top: "conv3" convolution_param { num_output: 384 pad: 1 kernel_size: 3 } }
layer { name: "relu3" type: "ReLU" bottom: "conv3" top: "conv3" }
layer { name: "conv4" type: "Convolution" bottom: "conv3" top: "conv4" convolution_param { num_output: 384 pad: 1 kernel_size: 3 group: 2 } }
layer { name: "relu4" type: "ReLU" bottom: "conv4" top: "conv4" }
layer { name: "conv5" type: "Convolution" bottom: "conv4" top: "conv5" convolution_param { num_output: 256 pad: 1 kernel_size: 3 group: 2 } }
layer { name: "relu5" type: "ReLU" bottom: "conv5" top: "conv5" }
layer { name: "pool5" type: "Pooling" bottom: "conv5" top: "pool5" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "fc6" type: "InnerProduct" bottom: "pool5" top: "fc6" inner_product_param { num_output: 4096 } }
layer { name: "relu6" type: "ReLU" bottom: "fc6" top: "fc6" }
layer { name: "fc7" type: "InnerProduct" bottom: "fc6" top: "fc7" inner_product_param { num_output: 4096 } }
layer { name: "relu7" type: "ReLU" bottom: "fc7" top: "fc7" }
layer { name: "fc8" type: "InnerProduct" bottom: "fc7" top: "fc8" inner_product_param { num_output: 1000 } }
layer { name: "prob" type: "Softmax" bottom: "fc8" top: "prob" }
"""


def decaying(rng, rows: int, fan_in: int, shape: tuple, alpha: float = 0.7) -> np.ndarray:
    """(rows, fan_in) weights with singular values i^-alpha and random singular vectors, He-scaled rows."""
    k = min(rows, fan_in)
    u, _ = np.linalg.qr(rng.standard_normal((rows, k)).astype(np.float32))
    v, _ = np.linalg.qr(rng.standard_normal((fan_in, k)).astype(np.float32))
    s = (np.arange(1, k + 1) ** -alpha).astype(np.float32)
    w = (u * s) @ v.T
    return (w * np.sqrt(2.0 * rows) / np.linalg.norm(s)).reshape(shape).astype(np.float32)


def weights(seed: int = 0) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(seed)

    def conv(t, s, k, g=1):
        w = np.concatenate([decaying(rng, t // g, s // g * k * k, (t // g, s // g, k, k)) for _ in range(g)])
        return [w, (0.01 * rng.standard_normal(t)).astype(np.float32)]

    def fc(t, n):
        return [decaying(rng, t, n, (t, n)), (0.01 * rng.standard_normal(t)).astype(np.float32)]

    out = {"conv1": conv(96, 3, 11), "conv2": conv(256, 96, 5, 2), "conv3": conv(384, 256, 3),
           "conv4": conv(384, 384, 3, 2), "conv5": conv(256, 384, 3, 2),
           "fc6": fc(4096, 9216), "fc7": fc(4096, 4096), "fc8": fc(1000, 4096)}
    out["conv1"][0] /= 60.0  # inputs in pixel units (0..255 minus a mean)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    args = parser.parse_args()
    args.directory.mkdir(parents=True, exist_ok=True)
    (args.directory / "caffenet.prototxt").write_text(PROTOTXT)
    msg = pb.NetParameter(name="CaffeNetLike")
    for name, blobs in weights().items():
        layer = msg.layer.add(name=name, type="Unknown")
        for b in blobs:
            layer.blobs.append(io.array_to_blob(b))
    (args.directory / "caffenet.caffemodel").write_bytes(msg.SerializeToString())
    print(f"wrote {args.directory / 'caffenet.prototxt'} and {args.directory / 'caffenet.caffemodel'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
