"""The ONNX stage of a run: shapes from OpenCV, Net -> ONNX, the same fidelity verdict in onnxruntime.

The exported graph bakes in values that depend on the input size (PriorBox, Crop windows, Reshape
targets), so one OpenCV forward pass of the Caffe model at the export size supplies every blob's shape and
those values. The model is then run in onnxruntime on the validation inputs and judged against the
original's outputs with the contract the Caffe model met.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from . import export_onnx
from .errors import ExportError
from .net import Net
from .runner import OpenCVRunner, Source, compared_blobs

FORMATS = ("caffe", "onnx", "both")


def onnx_path(prefix: str | Path) -> Path:
    text = str(prefix)
    for ext in (".prototxt", ".caffemodel", ".onnx"):
        if text.endswith(ext):
            text = text[: -len(ext)]
    return Path(text + ".onnx")


@dataclass(frozen=True)
class Exported:
    data: bytes  # the serialized ONNX model (net outputs only)
    verdict: object  # the pipeline's verdict of the ONNX model in onnxruntime (None with --no-validate)
    parity: float | None = None  # max over outputs of max |onnxruntime - OpenCV| / max |OpenCV|


def export_shapes(net: Net, cv: OpenCVRunner, sample: Mapping[str, np.ndarray]) -> export_onnx.Shapes:
    """Every blob's shape, and the baked-in values, from one OpenCV forward pass of ``net`` on ``sample``."""
    sources = [Source(layer.name, k) for layer in net.layers if layer.type not in ("Input", "DetectionOutput", "Silence")
               for k in range(len(layer.tops))]
    values = cv.run(net, sample, sources, what="ONNX export", error=ExportError)
    blobs: dict[tuple[str, int], tuple[int, ...]] = {(s.layer, s.index): tuple(v.shape) for s, v in values.items()}
    for name, value in sample.items():
        blobs[(name, -1)] = tuple(value.shape)
    for layer in net.layers:
        if layer.type == "DetectionOutput":
            keep = int(layer.sub("detection_output_param").get("keep_top_k", -1))
            blobs[(layer.name, 0)] = (1, 1, keep, 7)
    constants = {src: values[Source(*src)] for src in export_onnx.constant_sources(net) if Source(*src) in values}
    return export_onnx.Shapes(blobs, constants)


PARITY = 1e-3  # the ONNX model vs the Caffe model in OpenCV: max |difference| / max |value|, per output


def export_and_judge(original: Net, new_net: Net, cv: OpenCVRunner, validation: Mapping[str, np.ndarray] | None,
                     *, fp16: bool, judge: Callable[[dict], object] | None = None,
                     caffe_outputs: Mapping[str, np.ndarray] | None = None, enforce: bool = True) -> Exported:
    """The ONNX model of ``new_net``, checked in onnxruntime on ``validation`` when given.

    caffe_outputs : the compared outputs of the Caffe model in OpenCV on ``validation``: the ONNX model must
        give them within PARITY (an exporter fault otherwise).
    judge : the contract against the original; its miss raises ExportError when ``enforce``.
    Compared blobs whose value the export baked in from OpenCV (SSD priors) are the Caffe values by
    construction and are taken from ``caffe_outputs``.
    """
    sample = {k: v[:1] for k, v in validation.items()} if validation else _zeros(new_net)
    shapes = export_shapes(new_net, cv, sample)
    if not validation:
        return Exported(export_onnx.to_onnx(new_net, shapes, fp16=fp16), None)
    compared = compared_blobs(original)
    model = export_onnx.build_onnx(new_net, shapes, fp16=fp16, extra_outputs=compared)  # built once
    checked = model.SerializeToString()
    export_onnx.net_outputs_only(model, new_net)
    data = model.SerializeToString()
    batch_fixed = any(layer.type == "DetectionOutput" for layer in new_net.layers)
    constant = _constant_blobs(new_net, export_onnx.constant_sources(new_net))
    varying = [b for b in compared if b not in constant or not caffe_outputs]
    values = export_onnx.run_onnxruntime(checked, validation, varying, batch_fixed=batch_fixed)
    parity = None
    if caffe_outputs:
        values.update({b: caffe_outputs[b] for b in compared if b not in values})
        parity = _check_parity(values, caffe_outputs)
    verdict = judge(values) if judge is not None else None
    if verdict is not None and enforce and not verdict.passed:
        raise ExportError(f"the ONNX model in onnxruntime misses the fidelity contract: {verdict.first_miss()}")
    return Exported(data, verdict, parity)


def _check_parity(values: Mapping[str, np.ndarray], caffe: Mapping[str, np.ndarray]) -> float:
    worst = 0.0
    for name, want in caffe.items():
        got = values[name]
        if got.shape != want.shape:
            raise ExportError(f"output '{name}': onnxruntime gives shape {got.shape}, OpenCV {want.shape}")
        scale = float(np.max(np.abs(want))) if want.size else 0.0
        diff = float(np.max(np.abs(got - want))) if want.size else 0.0
        if not diff <= PARITY * max(scale, 1e-30):
            raise ExportError(f"output '{name}': onnxruntime differs from the Caffe model in OpenCV by "
                              f"{diff / max(scale, 1e-30):.2e} of its largest value (allowed {PARITY:g})")
        worst = max(worst, diff / max(scale, 1e-30))
    return worst


def _constant_blobs(net: Net, sources: list[tuple[str, int]]) -> set[str]:
    wanted = set(sources)
    out: set[str] = set()
    for layer in net.layers:
        for k, top in enumerate(layer.tops):
            if (layer.name, k) in wanted:
                out.add(top)
            else:
                out.discard(top)  # redefined later by a layer whose value is not baked in
    return out


def _zeros(net: Net) -> dict[str, np.ndarray]:
    return {name: np.zeros((1,) + tuple(shape[1:]), dtype=np.float32) for name, shape in net.input_shapes().items()}
