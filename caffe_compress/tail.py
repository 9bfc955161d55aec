"""A numpy forward pass for the simple tail of a network (the classifier head).

The planner measures how much of a layer's error reaches the network output by
running the network with only that layer approximated. For layers in a plain
chain of InnerProduct / ReLU / Dropout / Softmax up to the single output (the
usual CNN head), that run is done here in numpy from the layer's recorded
input, instead of building another OpenCV network: the head holds most of the
weights (GenderNet's fc6 is 85% of them), so this saves a full model load per
layer. Anything else returns None and the caller uses OpenCV.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from .net import Layer, Net, inner_product_geometry

SUPPORTED = frozenset({"InnerProduct", "ReLU", "Dropout", "Softmax"})


def tail_chain(net: Net, start: str, output: str) -> tuple[Layer, ...] | None:
    """The layers from ``start`` to the end if they form a supported chain ending at ``output``."""
    names = [layer.name for layer in net.layers]
    if start not in names:
        return None
    chain = net.layers[names.index(start):]
    current = chain[0].bottoms[0] if len(chain[0].bottoms) == 1 else None
    for layer in chain:
        if layer.type not in SUPPORTED or layer.bottoms != (current,) or len(layer.tops) != 1:
            return None
        if layer.type == "InnerProduct":
            geo = inner_product_geometry(layer)
            if geo.axis != 1 or geo.transpose:
                return None
        if layer.type == "Softmax" and int(layer.sub("softmax_param").get("axis", 1)) != 1:
            return None
        current = layer.tops[0]
    return chain if current == output else None


def run_tail(chain: tuple[Layer, ...], x: np.ndarray, weights: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
    """Forward ``x`` (the first layer's input, (N, ...)) through ``chain``; float64 result (N, C).

    ``weights`` overrides the weight blob of named layers (the approximated layer).
    """
    weights = weights or {}
    y = x.reshape(x.shape[0], -1).astype(np.float64)
    for layer in chain:
        if layer.type == "InnerProduct":
            y = _product(y, weights.get(layer.name, layer.blobs[0]))
            if inner_product_geometry(layer).bias_term:
                y = y + layer.blobs[1].astype(np.float64)
        elif layer.type == "ReLU":
            slope = float(layer.sub("relu_param").get("negative_slope", 0.0))
            y = np.where(y > 0, y, y * slope)
        elif layer.type == "Softmax":
            e = np.exp(y - y.max(axis=1, keepdims=True))
            y = e / e.sum(axis=1, keepdims=True)
        # Dropout is the identity at test time
    return y


ROWS_AT_ONCE = 64  # weight rows converted to float64 at a time


def _product(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """y @ w.T in float64 (a saturated softmax's change can be below float32's resolution), converting the
    weight a few rows at a time: a float64 copy of a whole head weight (GenderNet's fc6: 77 MB) was the
    planner's peak memory."""
    out = np.empty((y.shape[0], w.shape[0]))
    for start in range(0, w.shape[0], ROWS_AT_ONCE):
        out[:, start:start + ROWS_AT_ONCE] = y @ np.asarray(w[start:start + ROWS_AT_ONCE], dtype=np.float64).T
    return out
