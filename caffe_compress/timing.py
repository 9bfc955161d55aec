"""OpenCV timings on this machine: whole nets and single layers, original against factored.

Fewer multiply-adds is not faster (OpenCV runs k x 1 / 1 x k depthwise layers slowly on large maps,
and every extra layer is another pass over memory), so the tool measures instead of modelling.
Timings are medians of alternating runs in one process with one thread, and the number of runs adapts
to a time budget so that a slow model does not make the compression slow.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

from .net import Layer, Net

MIN_RUNS, MAX_RUNS = 3, 15
NET_BUDGET_S = 6.0  # seconds spent timing one pair of whole nets
LAYER_BUDGET_S = 1.5  # seconds spent timing one pair of layers


@dataclass(frozen=True)
class Latency:
    original_ms: float
    compressed_ms: float

    @property
    def speedup(self) -> float:
        return self.original_ms / self.compressed_ms if self.compressed_ms > 0 else float("inf")


def _forward_once(cv_net, inputs: Mapping[str, np.ndarray]) -> float:
    start = time.perf_counter()
    for name, value in inputs.items():
        cv_net.setInput(value, name)
    cv_net.forward()
    return time.perf_counter() - start


def median_ms(load: Callable[[Net], object], net: Net, inputs: Mapping[str, np.ndarray], *,
              budget_s: float = NET_BUDGET_S / 2, threads: int = 1) -> float:
    """Median latency (ms) of one net, loaded alone (one OpenCV network alive: peak memory)."""
    from .validate import cv2_module

    cv2 = cv2_module()
    previous = cv2.getNumThreads()
    cv2.setNumThreads(int(threads))
    try:
        cv_net = load(net)
        feed = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in inputs.items()}
        _forward_once(cv_net, feed)  # warm-up (allocation, fusion)
        times = [_forward_once(cv_net, feed)]
        runs = int(np.clip(budget_s / max(times[0], 1e-6), MIN_RUNS, MAX_RUNS))
        times += [_forward_once(cv_net, feed) for _ in range(runs - 1)]
        del cv_net
    finally:
        cv2.setNumThreads(previous)
    return 1000.0 * float(np.median(times))


def compare(load: Callable[[Net], object], original: Net, compressed: Net, inputs: Mapping[str, np.ndarray], *,
            budget_s: float = NET_BUDGET_S, threads: int = 1) -> Latency:
    """Median latency (ms) of two nets on ``inputs``, alternating runs after a warm-up."""
    from .validate import cv2_module

    cv2 = cv2_module()
    previous = cv2.getNumThreads()
    cv2.setNumThreads(int(threads))
    try:
        nets = [load(original), load(compressed)]
        feed = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in inputs.items()}
        first = [_forward_once(n, feed) for n in nets]  # warm-up (allocation, fusion)
        first = [_forward_once(n, feed) for n in nets]
        runs = int(np.clip(budget_s / max(sum(first), 1e-6), MIN_RUNS, MAX_RUNS))
        times: list[list[float]] = [[first[0]], [first[1]]]
        for _ in range(runs - 1):
            for i, n in enumerate(nets):
                times[i].append(_forward_once(n, feed))
    finally:
        cv2.setNumThreads(previous)
    return Latency(1000.0 * float(np.median(times[0])), 1000.0 * float(np.median(times[1])))


def replacement_layers(new_net: Net, name: str) -> tuple[Layer, ...]:
    """The layers that replaced layer ``name`` in a rewritten net (``name_cp1..3``/``name_svd1`` + ``name``)."""
    names = [layer.name for layer in new_net.layers]
    end = names.index(name)
    start = end
    while start > 0 and names[start - 1].startswith(f"{name}_") and names[start - 1][len(name) + 1:] in (
            "cp1", "cp2", "cp3", "svd1"):
        start -= 1
    return new_net.layers[start:end + 1]


def layer_net(layers: Sequence[Layer], bottom: str, shape: tuple[int, ...]) -> Net:
    """A net of just ``layers`` fed by an Input of ``shape`` named ``bottom``."""
    data = Layer("input__", "Input", (), (bottom,), {"input_param": {"shape": [{"dim": [int(d) for d in shape]}]}})
    return Net("timing", (data, *layers))
