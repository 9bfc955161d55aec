"""Net -> ONNX through the ``onnx`` package (the optional extra ``caffe-compress[onnx]``).

OpenCV 5 and onnxruntime read ONNX, not Caffe. Every Caffe layer type the tool meets in the dev zoo and in
its tests maps to standard ONNX operators (opset 13), the factored forms included (they are plain
convolutions and InnerProducts). Values that depend only on the input size are baked in as constants:
PriorBox outputs, Crop windows, Reshape targets. DetectionOutput becomes a decode + per-class top-k +
NonMaxSuppression + global top-k subgraph that writes OpenCV's layout: [1, 1, keep_top_k, 7] rows of
(image, label, score, xmin, ymin, xmax, ymax), best first, zero rows after the last detection.

The converter needs every blob's shape (and the PriorBox values) at the export input size; the pipeline
takes them from one OpenCV forward pass of the Caffe model (see :class:`Shapes`). A layer that cannot be
expressed raises ExportError naming it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import logging

import numpy as np

from .errors import ExportError, MissingDependencyError
from .export_detection import detection_output
from .net import Layer, Net, conv_geometry, fp16_storable, inner_product_geometry

log = logging.getLogger(__name__)

OPSET = 13
# Layers that work at any spatial size: a net of only these gets dynamic height and width in ONNX.
SIZE_FREE = frozenset({
    "Input", "Convolution", "Deconvolution", "ReLU", "PReLU", "ELU", "TanH", "Sigmoid", "AbsVal", "BNLL", "Power",
    "BatchNorm", "Scale", "Bias", "Eltwise", "Concat", "Split", "Dropout", "LRN", "Clip", "Swish", "Exp", "Log",
    "Silence",
})


def onnx_module():
    try:
        import onnx  # noqa: PLC0415 - optional extra, imported where needed
    except ImportError:
        raise MissingDependencyError("--format onnx: cannot import onnx; install caffe-compress[onnx] "
                                     "(pip install 'onnx>=1.16' 'onnxruntime>=1.19')") from None
    return onnx


@dataclass(frozen=True)
class Shapes:
    """What the export needs to know of the net at its export input size.

    blobs : {(layer name, top index): shape} of every layer output (inputs under (blob, -1)).
    values : {(layer name, top index): array} of outputs baked in as constants (PriorBox).
    """

    blobs: Mapping[tuple[str, int], tuple[int, ...]]
    values: Mapping[tuple[str, int], np.ndarray] = field(default_factory=dict)


def constant_sources(net: Net) -> list[tuple[str, int]]:
    """(layer, top index) of the values the export bakes in: PriorBox outputs and DetectionOutput priors."""
    producer: dict[str, tuple[str, int]] = {}
    wanted: list[tuple[str, int]] = []
    for layer in net.layers:
        if layer.type == "DetectionOutput" and len(layer.bottoms) > 2 and layer.bottoms[2] in producer:
            wanted.append(producer[layer.bottoms[2]])
        for k, top in enumerate(layer.tops):
            producer[top] = (layer.name, k)
        if layer.type == "PriorBox":
            wanted.append((layer.name, 0))
    return list(dict.fromkeys(wanted))


def dynamic_size(net: Net) -> bool:
    return all(layer.type in SIZE_FREE for layer in net.layers)


def to_onnx(net: Net, shapes: Shapes, *, fp16: bool = False, extra_outputs: Sequence[str] = ()) -> bytes:
    """The serialized ONNX model of ``net``; graph outputs are the net outputs (then ``extra_outputs``)."""
    return build_onnx(net, shapes, fp16=fp16, extra_outputs=extra_outputs).SerializeToString()


def net_outputs_only(model, net: Net) -> None:
    """Drop the ``extra_outputs`` of a model from build_onnx (they follow the net outputs), in place."""
    del model.graph.output[len(net.output_names()):]


def build_onnx(net: Net, shapes: Shapes, *, fp16: bool = False, extra_outputs: Sequence[str] = ()):
    """The checked onnx.ModelProto of ``net``; graph outputs are the net outputs, then ``extra_outputs``.

    fp16 : store the weights as float16 initializers (Cast to float32 in the graph): half the file.
    """
    onnx = onnx_module()
    builder = _Builder(onnx, net, shapes, fp16=fp16)
    for layer in net.layers:
        convert = _CONVERTERS.get(layer.type)
        if convert is None:
            raise ExportError(f"layer '{layer.name}' ({layer.type}): no ONNX equivalent in this exporter")
        try:
            convert(builder, layer)
        except ExportError:
            raise
        except (KeyError, ValueError, IndexError, TypeError) as exc:
            raise ExportError(f"layer '{layer.name}' ({layer.type}): cannot export: {exc}") from None
    model = builder.model(list(net.output_names()) + [b for b in extra_outputs if b not in net.output_names()])
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # noqa: BLE001 - onnx raises several types; one line names the problem
        raise ExportError(f"the exported graph fails onnx.checker: {str(exc).splitlines()[0]}") from None
    return model


class _Builder:
    """Accumulates nodes and initializers; maps each Caffe blob to its current ONNX value name."""

    def __init__(self, onnx, net: Net, shapes: Shapes, *, fp16: bool) -> None:
        self.onnx, self.helper, self.net, self.shapes, self.fp16 = onnx, onnx.helper, net, shapes, fp16
        self.nodes: list = []
        self.initializers: list = []
        self.inputs: list = []
        self.value: dict[str, str] = {}  # Caffe blob -> ONNX value holding its current value
        self.shape_of: dict[str, tuple[int, ...]] = {}  # ONNX value -> shape at the export size
        self.producer: dict[str, tuple[str, int]] = {}  # ONNX value -> (Caffe layer, top index)
        self.used: set[str] = set()
        self._defs = _definition_counts(net)
        self._seen: dict[str, int] = {}
        self.batch_fixed = any(layer.type == "DetectionOutput" for layer in net.layers)
        self.dynamic_size = dynamic_size(net)

    # -- names and constants
    def fresh(self, base: str) -> str:
        name, k = base, 0
        while name in self.used:
            k += 1
            name = f"{base}_{k}"
        self.used.add(name)
        return name

    def const(self, base: str, array: np.ndarray, *, weight: bool = False) -> str:
        """An initializer; ``weight`` (a blob the Caffe writer stores as fp16) goes to fp16 with a Cast under
        --fp16. Returns the float32 value's name."""
        array = np.asarray(array)
        if weight and self.fp16 and array.dtype == np.float32:
            stored = self.fresh(base + "_fp16")
            self.initializers.append(self.onnx.numpy_helper.from_array(array.astype(np.float16), stored))
            return self.node("Cast", [stored], base, to=self.onnx.TensorProto.FLOAT)
        name = self.fresh(base)
        self.initializers.append(self.onnx.numpy_helper.from_array(array, name))
        self.shape_of[name] = tuple(array.shape)
        return name

    def ints(self, base: str, values: Sequence[int]) -> str:
        return self.const(base, np.asarray(list(values), dtype=np.int64))

    def node(self, op: str, inputs: Sequence[str], base: str, *, outputs: int = 1, **attrs) -> str | list[str]:
        names = [self.fresh(base if i == 0 else f"{base}_{i}") for i in range(outputs)]
        self.nodes.append(self.helper.make_node(op, list(inputs), names, name=self.fresh("n_" + base), **attrs))
        return names[0] if outputs == 1 else names

    # -- Caffe blobs
    def bottom(self, layer: Layer, i: int = 0) -> str:
        return self.value[layer.bottoms[i]]

    def bottom_shape(self, layer: Layer, i: int = 0) -> tuple[int, ...]:
        return self.shape_of[self.bottom(layer, i)]

    def top_shape(self, layer: Layer, k: int = 0) -> tuple[int, ...]:
        return tuple(self.shapes.blobs[(layer.name, k)])

    def top_name(self, layer: Layer, k: int = 0) -> str:
        """The ONNX name for this layer's k-th top: the Caffe blob name on its last definition."""
        blob = layer.tops[k]
        self._seen[blob] = self._seen.get(blob, 0) + 1
        final = self._seen[blob] == self._defs[blob] and blob not in self.used
        return blob if final else f"{blob}/{layer.name}"

    def define(self, layer: Layer, op: str, inputs: Sequence[str], *, k: int = 0, **attrs) -> str:
        """Emit ``op`` producing top k of ``layer``."""
        name = self.top_name(layer, k)
        if name in self.used:
            name = self.fresh(name)
        else:
            self.used.add(name)
        self.nodes.append(self.helper.make_node(op, list(inputs), [name], name=self.fresh("n_" + layer.name), **attrs))
        self.bind(layer, k, name)
        return name

    def bind(self, layer: Layer, k: int, value: str) -> None:
        self.value[layer.tops[k]] = value
        self.shape_of[value] = self.top_shape(layer, k)
        self.producer[value] = (layer.name, k)

    def constant_value(self, blob: str) -> np.ndarray | None:
        """The blob's current value at the export size, when the export knows it (see constant_sources)."""
        return self.shapes.values.get(self.producer.get(self.value[blob], ("", -1)))

    def _output_dims(self, blob: str, value: str) -> list:
        """The output's shape at the export size, with the dimensions that follow the input left symbolic."""
        dims: list = list(self.shape_of.get(self.value[blob], ()))
        if dims and not self.batch_fixed:
            dims[0] = "N"
        if self.dynamic_size and len(dims) == 4:
            dims[2], dims[3] = f"{value}_h", f"{value}_w"
        return dims

    def model(self, outputs: Sequence[str]):
        h, tp = self.helper, self.onnx.TensorProto
        graph_outputs = []
        for blob in outputs:
            value = self.value[blob]
            if value != blob and blob not in self.used:  # an output renamed by an in-place layer
                value = self.node("Identity", [value], blob)
            graph_outputs.append(h.make_tensor_value_info(value, tp.FLOAT, self._output_dims(blob, value)))
        graph = h.make_graph(self.nodes, self.net.name or "caffe-compress", self.inputs, graph_outputs,
                             initializer=self.initializers)
        model = h.make_model(graph, opset_imports=[h.make_opsetid("", OPSET)], producer_name="caffe-compress")
        model.ir_version = min(model.ir_version, 8)  # readable by onnxruntime >= 1.14 and OpenCV 4.8+/5
        return model


def _definition_counts(net: Net) -> dict[str, int]:
    counts: dict[str, int] = {}
    for layer in net.layers:
        if layer.type == "Input":
            continue
        for top in layer.tops:
            counts[top] = counts.get(top, 0) + 1
    return counts


def _channel_shape(values: np.ndarray, rank: int, axis: int = 1) -> np.ndarray:
    """Reshape per-axis parameters (shape s) to broadcast against a rank-``rank`` tensor from ``axis``."""
    values = np.asarray(values, dtype=np.float32)
    return values.reshape(values.shape + (1,) * max(rank - axis - values.ndim, 0))


# ------------------------------------------------------------------ converters


def _input(b: _Builder, layer: Layer) -> None:
    for k, top in enumerate(layer.tops):
        shape = list(b.shapes.blobs[(top, -1)])
        dims: list = list(shape)
        if not b.batch_fixed:
            dims[0] = "N"
        if b.dynamic_size and len(dims) == 4:
            dims[2], dims[3] = "H", "W"
        b.inputs.append(b.helper.make_tensor_value_info(top, b.onnx.TensorProto.FLOAT, dims))
        b.used.add(top)
        b.value[top] = top
        b.shape_of[top] = tuple(shape)


def _convolution(b: _Builder, layer: Layer) -> None:
    geo = conv_geometry(layer)
    if geo.axis != 1:
        raise ExportError(f"layer '{layer.name}' (Convolution): axis {geo.axis} (only 1 is exported)")
    inputs = [b.bottom(layer), b.const(layer.name + "_W", layer.blobs[0], weight=_half(layer, 0))]
    if geo.bias_term:
        inputs.append(b.const(layer.name + "_B", layer.blobs[1].reshape(-1), weight=_half(layer, 1)))
    op = "Conv" if layer.type == "Convolution" else "ConvTranspose"
    b.define(layer, op, inputs, kernel_shape=list(geo.kernel), strides=list(geo.stride),
             pads=[geo.pad[0], geo.pad[1], geo.pad[0], geo.pad[1]], dilations=list(geo.dilation), group=geo.group)


def _inner_product(b: _Builder, layer: Layer) -> None:
    geo = inner_product_geometry(layer)
    x, shape = b.bottom(layer), b.bottom_shape(layer)
    axis = geo.axis % len(shape)
    flat = b.node("Flatten", [x], layer.name + "_flat", axis=axis)
    inputs = [flat, b.const(layer.name + "_W", layer.blobs[0], weight=_half(layer, 0))]
    if geo.bias_term:
        inputs.append(b.const(layer.name + "_B", layer.blobs[1].reshape(-1), weight=_half(layer, 1)))
    out_shape = b.top_shape(layer)
    if axis == 1 and len(out_shape) == 2:
        b.define(layer, "Gemm", inputs, transB=0 if geo.transpose else 1)
        return
    y = b.node("Gemm", inputs, layer.name + "_gemm", transB=0 if geo.transpose else 1)
    b.define(layer, "Reshape", [y, b.ints(layer.name + "_shape", _batch_free(out_shape, shape))])


def _half(layer: Layer, i: int) -> bool:
    """Blob i goes to fp16 with --fp16 exactly when the Caffe writer stores it so (the same values)."""
    return fp16_storable(layer.type, layer.blobs[i])


def _batch_free(out_shape: Sequence[int], in_shape: Sequence[int]) -> list[int]:
    """A Reshape target that copies the batch dimension (0) when it is the input's."""
    target = [int(d) for d in out_shape]
    if target and in_shape and target[0] == in_shape[0]:
        target[0] = 0
    return target


def _unary(op: str, **fixed) -> Callable[[_Builder, Layer], None]:
    def convert(b: _Builder, layer: Layer) -> None:
        b.define(layer, op, [b.bottom(layer)], **fixed)
    return convert


def _relu(b: _Builder, layer: Layer) -> None:
    slope = float(layer.sub("relu_param").get("negative_slope", 0.0))
    if slope:
        b.define(layer, "LeakyRelu", [b.bottom(layer)], alpha=slope)
    else:
        b.define(layer, "Relu", [b.bottom(layer)])


def _prelu(b: _Builder, layer: Layer) -> None:
    rank = len(b.bottom_shape(layer))
    slope = layer.blobs[0].reshape(-1)
    slope = slope if slope.size == 1 else _channel_shape(slope, rank)
    b.define(layer, "PRelu", [b.bottom(layer), b.const(layer.name + "_slope", slope)])


def _elu(b: _Builder, layer: Layer) -> None:
    b.define(layer, "Elu", [b.bottom(layer)], alpha=float(layer.sub("elu_param").get("alpha", 1.0)))


def _power(b: _Builder, layer: Layer) -> None:
    p = layer.sub("power_param")
    power, scale, shift = float(p.get("power", 1.0)), float(p.get("scale", 1.0)), float(p.get("shift", 0.0))
    x = b.bottom(layer)
    steps = []
    if scale != 1.0:
        steps.append(("Mul", scale))
    if shift != 0.0:
        steps.append(("Add", shift))
    if power != 1.0:
        steps.append(("Pow", power))
    if not steps:
        b.define(layer, "Identity", [x])
        return
    for i, (op, value) in enumerate(steps):
        c = b.const(f"{layer.name}_{op.lower()}", np.asarray(value, dtype=np.float32))
        if i == len(steps) - 1:
            b.define(layer, op, [x, c])
        else:
            x = b.node(op, [x, c], f"{layer.name}_{op.lower()}")


def _exp(b: _Builder, layer: Layer) -> None:
    p = layer.sub("exp_param")
    base, scale, shift = float(p.get("base", -1.0)), float(p.get("scale", 1.0)), float(p.get("shift", 0.0))
    x = b.bottom(layer)
    if scale != 1.0:
        x = b.node("Mul", [x, b.const(layer.name + "_scale", np.float32(scale))], layer.name + "_scaled")
    if shift != 0.0:
        x = b.node("Add", [x, b.const(layer.name + "_shift", np.float32(shift))], layer.name + "_shifted")
    if base != -1.0:  # base ** x = e ** (x ln base)
        x = b.node("Mul", [x, b.const(layer.name + "_lnb", np.float32(np.log(base)))], layer.name + "_lnb")
    b.define(layer, "Exp", [x])


def _log(b: _Builder, layer: Layer) -> None:
    p = layer.sub("log_param")
    if any(k in p for k in ("base", "scale", "shift")):
        log.warning("layer '%s' (Log): base/scale/shift, which OpenCV 4.x's Caffe importer ignores (natural log "
                    "of the input); the ONNX model computes what OpenCV does", layer.name)
    b.define(layer, "Log", [b.bottom(layer)])


def _clip(b: _Builder, layer: Layer) -> None:
    p = layer.sub("clip_param")
    lo = b.const(layer.name + "_min", np.float32(p.get("min", 0.0)))
    hi = b.const(layer.name + "_max", np.float32(p.get("max", 0.0)))
    b.define(layer, "Clip", [b.bottom(layer), lo, hi])


def _swish(b: _Builder, layer: Layer) -> None:
    beta = float(layer.sub("swish_param").get("beta", 1.0))
    x = b.bottom(layer)
    z = x if beta == 1.0 else b.node("Mul", [x, b.const(layer.name + "_beta", np.float32(beta))], layer.name + "_bx")
    b.define(layer, "Mul", [x, b.node("Sigmoid", [z], layer.name + "_sig")])


def _identity(b: _Builder, layer: Layer) -> None:
    for k in range(len(layer.tops)):
        b.define(layer, "Identity", [b.bottom(layer)], k=k)


def _silence(b: _Builder, layer: Layer) -> None:
    pass


def _pooling(b: _Builder, layer: Layer) -> None:
    p = layer.sub("pooling_param")
    pool = p.get("pool", "MAX")
    if pool not in ("MAX", "AVE"):
        raise ExportError(f"layer '{layer.name}' (Pooling): {pool} pooling has no ONNX equivalent")
    x, shape = b.bottom(layer), b.bottom_shape(layer)
    if p.get("global_pooling"):
        b.define(layer, "GlobalMaxPool" if pool == "MAX" else "GlobalAveragePool", [x])
        return
    kernel = _pool_pair(p, "kernel", 0)
    stride = _pool_pair(p, "stride", 1)
    pad = _pool_pair(p, "pad", 0)
    out = b.top_shape(layer)[2:]
    # Caffe rounds the output size up; ONNX (floor) gets the same windows from extra end padding.
    extra = [max((o - 1) * s + k - (n + 2 * q), 0) for o, s, k, n, q in zip(out, stride, kernel, shape[2:], pad)]
    if pool == "MAX":
        b.define(layer, "MaxPool", [x], kernel_shape=list(kernel), strides=list(stride),
                 pads=[pad[0], pad[1], pad[0] + extra[0], pad[1] + extra[1]])
        return
    # Caffe divides by the window clipped to the padded input: the pad counts, the overhang does not.
    if not any(pad):  # only overhang: ONNX excludes it
        b.define(layer, "AveragePool", [x], kernel_shape=list(kernel), strides=list(stride),
                 pads=[0, 0, extra[0], extra[1]], count_include_pad=0)
        return
    pads = [pad[0], pad[1], pad[0] + extra[0], pad[1] + extra[1]]
    if not any(extra):  # only pad: ONNX counts it
        b.define(layer, "AveragePool", [x], kernel_shape=list(kernel), strides=list(stride), pads=pads,
                 count_include_pad=1)
        return
    # both: average over the whole window, then rescale each position to Caffe's divisor (static sizes)
    y = b.node("AveragePool", [x], layer.name + "_avg", kernel_shape=list(kernel), strides=list(stride),
               pads=pads, count_include_pad=1)
    sizes = [np.array([min(o * s_ - p + k, n + p) - (o * s_ - p) for o in range(count)], dtype=np.float64)
             for count, s_, k, n, p in zip(out, stride, kernel, shape[2:], pad)]
    factor = (kernel[0] * kernel[1]) / np.outer(sizes[0], sizes[1])
    b.define(layer, "Mul", [y, b.const(layer.name + "_divisor", factor.astype(np.float32)[None, None])])


def _pool_pair(p: Mapping, what: str, default: int) -> tuple[int, int]:
    h, w = p.get(f"{what}_h"), p.get(f"{what}_w")
    if h is not None or w is not None:
        return int(default if h is None else h), int(default if w is None else w)
    value = p.get("kernel_size" if what == "kernel" else what)
    if isinstance(value, list):
        value = value[0] if value else None
    v = default if value is None else int(value)
    return v, v


def _lrn(b: _Builder, layer: Layer) -> None:
    p = layer.sub("lrn_param")
    if p.get("norm_region", "ACROSS_CHANNELS") != "ACROSS_CHANNELS":
        raise ExportError(f"layer '{layer.name}' (LRN): WITHIN_CHANNEL normalisation has no ONNX equivalent")
    if float(p.get("k", 1.0)) != 1.0:
        log.warning("layer '%s' (LRN): k = %g, which OpenCV 4.x's Caffe importer ignores (it uses 1); the ONNX "
                    "model computes what OpenCV does", layer.name, float(p["k"]))
    # bias 1, not k: the ONNX model must compute what the Caffe model computes in OpenCV 4.x
    b.define(layer, "LRN", [b.bottom(layer)], size=int(p.get("local_size", 5)), alpha=float(p.get("alpha", 1.0)),
             beta=float(p.get("beta", 0.75)), bias=1.0)


def _softmax(b: _Builder, layer: Layer) -> None:
    axis = int(layer.sub("softmax_param").get("axis", 1))
    b.define(layer, "Softmax", [b.bottom(layer)], axis=axis)


def _concat(b: _Builder, layer: Layer) -> None:
    p = layer.sub("concat_param")
    axis = int(p.get("axis", p.get("concat_dim", 1)))
    b.define(layer, "Concat", [b.value[name] for name in layer.bottoms], axis=axis)


def _slice(b: _Builder, layer: Layer) -> None:
    p = layer.sub("slice_param")
    axis = int(p.get("axis", p.get("slice_dim", 1)))
    sizes = [b.top_shape(layer, k)[axis] for k in range(len(layer.tops))]
    outs = b.node("Split", [b.bottom(layer), b.ints(layer.name + "_split", sizes)], layer.name + "_part",
                  outputs=len(sizes), axis=axis)
    for k, value in enumerate(outs if isinstance(outs, list) else [outs]):
        b.define(layer, "Identity", [value], k=k)


def _eltwise(b: _Builder, layer: Layer) -> None:
    p = layer.sub("eltwise_param")
    op = p.get("operation", "SUM")
    xs = [b.value[name] for name in layer.bottoms]
    if op == "PROD":
        b.define(layer, "Mul", xs) if len(xs) == 2 else _chain(b, layer, "Mul", xs)
    elif op == "MAX":
        b.define(layer, "Max", xs)
    else:
        coeff = [float(c) for c in p.get("coeff", [])] or [1.0] * len(xs)
        xs = [x if c == 1.0 else b.node("Mul", [x, b.const(f"{layer.name}_c{i}", np.float32(c))], f"{layer.name}_c{i}")
              for i, (x, c) in enumerate(zip(xs, coeff))]
        b.define(layer, "Sum", xs)


def _chain(b: _Builder, layer: Layer, op: str, xs: Sequence[str]) -> None:
    acc = xs[0]
    for x in xs[1:-1]:
        acc = b.node(op, [acc, x], layer.name + "_acc")
    b.define(layer, op, [acc, xs[-1]])


def _batch_norm(b: _Builder, layer: Layer) -> None:
    mean, var = layer.blobs[0].reshape(-1), layer.blobs[1].reshape(-1)
    factor = float(layer.blobs[2].reshape(-1)[0]) if len(layer.blobs) > 2 else 1.0
    factor = 0.0 if factor == 0 else 1.0 / factor
    eps = float(layer.sub("batch_norm_param").get("eps", 1e-5))
    scale = (1.0 / np.sqrt(var.astype(np.float64) * factor + eps)).astype(np.float32)
    shift = (-mean.astype(np.float64) * factor * scale).astype(np.float32)
    rank = len(b.bottom_shape(layer))
    y = b.node("Mul", [b.bottom(layer), b.const(layer.name + "_scale", _channel_shape(scale, rank))],
               layer.name + "_scaled")
    b.define(layer, "Add", [y, b.const(layer.name + "_shift", _channel_shape(shift, rank))])


def _scale_bias(b: _Builder, layer: Layer) -> None:
    is_scale = layer.type == "Scale"
    p = layer.sub("scale_param" if is_scale else "bias_param")
    rank = len(b.bottom_shape(layer))
    axis = int(p.get("axis", 1)) % max(rank, 1)
    op = "Mul" if is_scale else "Add"
    with_bias = is_scale and bool(p.get("bias_term"))
    if len(layer.bottoms) > 1:  # the operand is the second input, aligned from ``axis``
        other = b.bottom_shape(layer, 1)
        target = list(other) + [1] * (rank - axis - len(other))
        if axis == 0:
            target[0] = 0
        operand = b.node("Reshape", [b.bottom(layer, 1), b.ints(layer.name + "_bshape", target)], layer.name + "_b")
        bias = layer.blobs[0] if with_bias and layer.blobs else None
    else:
        operand = b.const(layer.name + "_w", _channel_shape(layer.blobs[0], rank, axis))
        bias = layer.blobs[1] if with_bias and len(layer.blobs) > 1 else None
    if bias is None:
        b.define(layer, op, [b.bottom(layer), operand])
        return
    y = b.node(op, [b.bottom(layer), operand], layer.name + "_op")
    b.define(layer, "Add", [y, b.const(layer.name + "_bias", _channel_shape(bias, rank, axis))])


def _reshape_to_top(b: _Builder, layer: Layer) -> None:
    shape = b.bottom_shape(layer)
    p = layer.sub("flatten_param")
    axis = int(p.get("axis", 1)) % len(shape)
    end = int(p.get("end_axis", -1)) % len(shape)
    if layer.type == "Flatten" and end == len(shape) - 1:
        b.define(layer, "Flatten", [b.bottom(layer)], axis=axis)
        return
    target = _batch_free(b.top_shape(layer), shape)
    b.define(layer, "Reshape", [b.bottom(layer), b.ints(layer.name + "_shape", target)])


def _permute(b: _Builder, layer: Layer) -> None:
    rank = len(b.bottom_shape(layer))
    order = [int(o) for o in layer.sub("permute_param").get("order", [])]
    order += [i for i in range(rank) if i not in order]
    b.define(layer, "Transpose", [b.bottom(layer)], perm=order)


def _normalize(b: _Builder, layer: Layer) -> None:
    p = layer.sub("norm_param")
    rank = len(b.bottom_shape(layer))
    axes = list(range(1, rank)) if p.get("across_spatial", True) else [1]
    eps = float(p.get("eps", 1e-10))
    x = b.bottom(layer)
    ss = b.node("ReduceSumSquare", [x], layer.name + "_ss", axes=axes, keepdims=1)
    ss = b.node("Add", [ss, b.const(layer.name + "_eps", np.float32(eps))], layer.name + "_sse")
    y = b.node("Div", [x, b.node("Sqrt", [ss], layer.name + "_norm")], layer.name + "_unit")
    if not layer.blobs:
        b.define(layer, "Identity", [y])
        return
    scale = layer.blobs[0].reshape(-1)
    scale = scale.reshape(()) if scale.size == 1 else _channel_shape(scale, rank)
    b.define(layer, "Mul", [y, b.const(layer.name + "_scale", scale)])


def _crop(b: _Builder, layer: Layer) -> None:
    p = layer.sub("crop_param")
    shape, ref = b.bottom_shape(layer), b.bottom_shape(layer, 1)
    axis = int(p.get("axis", 2)) % len(shape)
    offsets = [int(o) for o in p.get("offset", [])] or [0]
    axes = list(range(axis, len(shape)))
    offs = offsets * len(axes) if len(offsets) == 1 else offsets
    ends = [o + ref[a] for o, a in zip(offs, axes)]
    b.define(layer, "Slice", [b.bottom(layer), b.ints(layer.name + "_starts", offs), b.ints(layer.name + "_ends", ends),
                              b.ints(layer.name + "_axes", axes)])


def _constant(b: _Builder, layer: Layer) -> None:
    value = b.shapes.values.get((layer.name, 0))
    if value is None:
        raise ExportError(f"layer '{layer.name}' ({layer.type}): its value at the export size is unknown")
    b.define(layer, "Identity", [b.const(layer.name + "_value", np.asarray(value, dtype=np.float32))])


_CONVERTERS: dict[str, Callable[[_Builder, Layer], None]] = {
    "Input": _input, "Convolution": _convolution, "Deconvolution": _convolution, "InnerProduct": _inner_product,
    "ReLU": _relu, "PReLU": _prelu, "ELU": _elu, "Sigmoid": _unary("Sigmoid"), "TanH": _unary("Tanh"),
    "AbsVal": _unary("Abs"), "BNLL": _unary("Softplus"), "Power": _power, "Exp": _exp, "Log": _log,
    "Clip": _clip, "Swish": _swish, "Dropout": _identity, "Split": _identity, "Silence": _silence,
    "Pooling": _pooling, "LRN": _lrn, "Softmax": _softmax, "Concat": _concat, "Slice": _slice, "Eltwise": _eltwise,
    "BatchNorm": _batch_norm, "Scale": _scale_bias, "Bias": _scale_bias, "Flatten": _reshape_to_top,
    "Reshape": _reshape_to_top, "Permute": _permute, "Normalize": _normalize, "Crop": _crop, "PriorBox": _constant,
    "DetectionOutput": detection_output,
}


def onnxruntime_session(model: bytes, *, threads: int = 0):
    try:
        import onnxruntime as ort  # noqa: PLC0415 - optional extra
    except ImportError:
        raise MissingDependencyError("--format onnx: cannot import onnxruntime (it validates the ONNX model); "
                                     "install caffe-compress[onnx]") from None
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own hierarchy
        raise ExportError(f"onnxruntime cannot load the exported model: {str(exc).splitlines()[0]}") from None


RUN_CHUNK = 8


def run_onnxruntime(model: bytes, inputs: Mapping[str, np.ndarray], outputs: Sequence[str], *,
                    batch_fixed: bool) -> dict[str, np.ndarray]:
    """{output: array} over all samples of ``inputs`` (one at a time when the model's batch is fixed at 1)."""
    session = onnxruntime_session(model)
    count = next(iter(inputs.values())).shape[0]
    step = 1 if batch_fixed else RUN_CHUNK
    parts: dict[str, list] = {name: [] for name in outputs}
    for start in range(0, count, step):
        feed = {k: np.ascontiguousarray(v[start:start + step], dtype=np.float32) for k, v in inputs.items()}
        try:
            values = session.run(list(outputs), feed)
        except Exception as exc:  # noqa: BLE001
            raise ExportError(f"onnxruntime cannot run the exported model: {str(exc).splitlines()[0]}") from None
        for name, value in zip(outputs, values):
            parts[name].append(np.asarray(value, dtype=np.float32))
    return {name: np.concatenate(v, axis=0) for name, v in parts.items()}
