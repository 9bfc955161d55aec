"""The in-memory network: ordered layers with numpy weights, free of protobuf.

A :class:`Net` is what ``io.load`` returns and ``io.save`` writes. Layer
parameters are kept as plain nested dicts keyed by the Caffe field names
(``{"convolution_param": {"num_output": 96, "kernel_size": [7]}}``), so the
maths and the planner never see protobuf. Passes never mutate a Net: they build
a new one with :func:`dataclasses.replace`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Mapping

import numpy as np

from .errors import ModelError

# Layer types whose blobs are learned weights that a deploy net cannot run without.
WEIGHTED_TYPES = frozenset(
    {"Convolution", "Deconvolution", "InnerProduct", "BatchNorm", "PReLU", "Embed", "Normalize"}
)
FP16_MAX = 65504.0
# Like OpenCV's shrinkCaffeModel: only convolution and inner-product blobs go to fp16;
# normalisation statistics and the like stay float32.
FP16_LAYER_TYPES = frozenset({"Convolution", "Deconvolution", "InnerProduct"})


def fp16_storable(layer_type: str, array: np.ndarray) -> bool:
    """Whether a blob is stored as fp16 when fp16 storage is asked for (conv/IP blobs whose values fit)."""
    return layer_type in FP16_LAYER_TYPES and array.size > 0 and float(np.max(np.abs(array))) <= FP16_MAX


# Scale and Bias carry weights only when they have a single bottom.
OPTIONALLY_WEIGHTED_TYPES = frozenset({"Scale", "Bias"})


@dataclass(frozen=True, eq=False)
class Layer:
    """One Caffe layer.

    params : dict
        Every LayerParameter field except name/type/bottom/top/blobs, as plain
        Python values (enums by name, messages as dicts, repeated as lists).
    blobs : tuple of ndarray
        The learned weights, float32, in Caffe's canonical shapes (convolution
        weight (T, S/group, kh, kw); InnerProduct weight (N, K); biases (N,)).
    """

    name: str
    type: str
    bottoms: tuple[str, ...] = ()
    tops: tuple[str, ...] = ()
    params: Mapping = field(default_factory=dict)
    blobs: tuple[np.ndarray, ...] = ()

    @property
    def param_count(self) -> int:
        return int(sum(b.size for b in self.blobs))

    @property
    def weight_bytes(self) -> int:
        return int(sum(b.nbytes for b in self.blobs))

    def sub(self, key: str) -> dict:
        """The ``key`` sub-message (e.g. ``convolution_param``), or {}."""
        value = self.params.get(key)
        return value if isinstance(value, dict) else {}


@dataclass(frozen=True)
class ConvGeometry:
    """Convolution hyper-parameters with Caffe's defaults applied (2-D only)."""

    num_output: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    pad: tuple[int, int]
    dilation: tuple[int, int]
    group: int
    bias_term: bool
    axis: int


def _pair(values: list, explicit_h, explicit_w, default: int, what: str, layer: str) -> tuple[int, int]:
    if explicit_h is not None or explicit_w is not None:
        if values:
            raise ModelError(f"layer '{layer}': both {what} and {what}_h/{what}_w are set")
        h = default if explicit_h is None else int(explicit_h)
        w = default if explicit_w is None else int(explicit_w)
        return h, w
    if not values:
        return default, default
    if len(values) == 1:
        return int(values[0]), int(values[0])
    if len(values) == 2:
        return int(values[0]), int(values[1])
    raise ModelError(f"layer '{layer}': {what} has {len(values)} values; only 2-D convolutions are supported")


def conv_geometry(layer: Layer) -> ConvGeometry:
    """Read a Convolution/Deconvolution layer's geometry, applying Caffe defaults."""
    p = layer.sub("convolution_param")
    kernel = _pair(p.get("kernel_size", []), p.get("kernel_h"), p.get("kernel_w"), 0, "kernel_size", layer.name)
    if kernel[0] <= 0 or kernel[1] <= 0:
        raise ModelError(f"layer '{layer.name}': kernel size must be positive, got {kernel}")
    stride = _pair(p.get("stride", []), p.get("stride_h"), p.get("stride_w"), 1, "stride", layer.name)
    pad_h = p.get("pad_h") if "pad_h" in p else None
    pad_w = p.get("pad_w") if "pad_w" in p else None
    pad = _pair(p.get("pad", []), pad_h, pad_w, 0, "pad", layer.name)
    dilation = _pair(p.get("dilation", []), None, None, 1, "dilation", layer.name)
    if min(stride) <= 0 or min(dilation) <= 0:
        raise ModelError(f"layer '{layer.name}': stride and dilation must be positive")
    num_output = int(p.get("num_output", 0))
    group = int(p.get("group", 1))
    if num_output <= 0:
        raise ModelError(f"layer '{layer.name}': num_output must be > 0, got {num_output}")
    if group <= 0 or num_output % group:
        raise ModelError(f"layer '{layer.name}': group {group} does not divide num_output {num_output}")
    return ConvGeometry(
        num_output=num_output,
        kernel=kernel,
        stride=stride,
        pad=pad,
        dilation=dilation,
        group=group,
        bias_term=bool(p.get("bias_term", True)),
        axis=int(p.get("axis", 1)),
    )


@dataclass(frozen=True)
class InnerProductGeometry:
    num_output: int
    bias_term: bool
    axis: int
    transpose: bool


def inner_product_geometry(layer: Layer) -> InnerProductGeometry:
    p = layer.sub("inner_product_param")
    num_output = int(p.get("num_output", 0))
    if num_output <= 0:
        raise ModelError(f"layer '{layer.name}': num_output must be > 0, got {num_output}")
    return InnerProductGeometry(
        num_output=num_output,
        bias_term=bool(p.get("bias_term", True)),
        axis=int(p.get("axis", 1)),
        transpose=bool(p.get("transpose", False)),
    )


@dataclass(frozen=True, eq=False)
class Net:
    """An ordered list of layers. Inputs are ``Input`` layers (legacy headers are upgraded)."""

    name: str
    layers: tuple[Layer, ...]
    stored_fp16: bool = False  # the caffemodel stored (some) weights as fp16

    def __iter__(self) -> Iterator[Layer]:
        return iter(self.layers)

    def layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    @property
    def param_count(self) -> int:
        return sum(layer.param_count for layer in self.layers)

    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes declared by Input layers (empty tuple when undeclared)."""
        shapes: dict[str, tuple[int, ...]] = {}
        for layer in self.layers:
            if layer.type != "Input":
                continue
            declared = layer.sub("input_param").get("shape", [])
            for i, top in enumerate(layer.tops):
                if not declared:
                    shapes[top] = ()
                else:
                    dims = declared[i if len(declared) > 1 else 0].get("dim", [])
                    shapes[top] = tuple(int(d) for d in dims)
        return shapes

    def output_names(self) -> list[str]:
        """Blobs whose final value no layer reads (the network outputs), in order of first production.

        An in-place layer (top == bottom) reads the blob and writes a new value of it: a net whose
        last layer is an in-place BatchNorm/Scale still outputs that blob.
        """
        unread: dict[str, bool] = {}  # ordered: O(1) membership for huge nets
        for layer in self.layers:
            for bottom in layer.bottoms:
                if bottom in unread:
                    unread[bottom] = False
            for top in layer.tops:
                unread[top] = True
        return [blob for blob, is_unread in unread.items() if is_unread]

    def check(self) -> "Net":
        """Verify graph structure and weight shapes; raise ModelError naming the offender.

        Returns self so that passes can write ``return new_net.check()``.
        """
        names: set[str] = set()
        available: set[str] = set()
        for layer in self.layers:
            if not layer.name:
                raise ModelError(f"a layer of type '{layer.type}' has no name")
            if layer.name in names:
                raise ModelError(f"layer '{layer.name}': duplicate layer name")
            names.add(layer.name)
            if not layer.type:
                raise ModelError(f"layer '{layer.name}': no type")
            for bottom in layer.bottoms:
                if bottom not in available:
                    raise ModelError(f"layer '{layer.name}': unknown bottom '{bottom}'")
            for top in layer.tops:
                if top in available and top not in layer.bottoms:
                    raise ModelError(
                        f"layer '{layer.name}': top '{top}' is already produced by an earlier layer "
                        "and this layer is not in-place"
                    )
            available.update(layer.tops)
            for i, blob in enumerate(layer.blobs):
                if blob.dtype != np.float32:
                    raise ModelError(f"layer '{layer.name}': blob {i} is {blob.dtype}, expected float32")
                bad = blob.size - int(np.count_nonzero(np.isfinite(blob)))
                if bad:
                    raise ModelError(f"layer '{layer.name}': blob {i} has {bad} NaN/Inf values")
            _check_weight_shapes(layer)
            if layer.type == "Input":
                _check_input_shapes(layer)
        _check_inner_products(self, _check_channels(self), _check_spatial(self))
        return self


def _check_weight_shapes(layer: Layer) -> None:
    if layer.type in ("Convolution", "Deconvolution"):
        geo = conv_geometry(layer)
        if not layer.blobs:
            raise ModelError(f"layer '{layer.name}': has no weights")
        w = layer.blobs[0]
        if w.ndim != 4 or w.shape[2:] != geo.kernel:
            raise ModelError(
                f"layer '{layer.name}': weight shape {w.shape} does not match kernel {geo.kernel}"
            )
        out_dim = w.shape[0] if layer.type == "Convolution" else w.shape[1] * geo.group
        if out_dim != geo.num_output:
            raise ModelError(
                f"layer '{layer.name}': weight shape {w.shape} does not match num_output {geo.num_output}"
            )
        _check_bias(layer, geo.bias_term, geo.num_output)
    elif layer.type == "InnerProduct":
        geo = inner_product_geometry(layer)
        if not layer.blobs:
            raise ModelError(f"layer '{layer.name}': has no weights")
        w = layer.blobs[0]
        n = w.shape[1] if geo.transpose and w.ndim == 2 else w.shape[0]
        if w.ndim != 2 or n != geo.num_output:
            raise ModelError(
                f"layer '{layer.name}': weight shape {w.shape} does not match num_output {geo.num_output}"
            )
        _check_bias(layer, geo.bias_term, geo.num_output)


MAX_AXES = 32

# Layers whose output has the channel count of their (first) input.
_CHANNEL_PRESERVING = frozenset({
    "ReLU", "PReLU", "ELU", "Sigmoid", "TanH", "AbsVal", "BNLL", "Power", "Exp", "Log", "Threshold",
    "Dropout", "LRN", "MVN", "BatchNorm", "Scale", "Bias", "Normalize", "Pooling", "Softmax", "Split",
    "Eltwise", "Clip", "Swish",
})


def _check_channels(net: "Net") -> dict[str, int | None]:
    """Propagate channel counts (axis 1) where they are certain; check convolutions against them.

    Unknown layer types stop the propagation for their outputs (no false alarms). Returns the counts by blob.
    """
    channels: dict[str, int | None] = {}
    for layer in net.layers:
        first = channels.get(layer.bottoms[0]) if layer.bottoms else None
        out: int | None = None
        if layer.type == "Input":
            for top, dims in zip(layer.tops, _declared_shapes(layer)):
                channels[top] = dims[1] if len(dims) > 1 else None
            continue
        if layer.type in ("Convolution", "Deconvolution"):
            geo = conv_geometry(layer)
            if first is not None and geo.axis == 1:
                expected = layer.blobs[0].shape[1] * geo.group if layer.type == "Convolution" else layer.blobs[0].shape[0]
                if first % geo.group:
                    raise ModelError(f"layer '{layer.name}': group {geo.group} does not divide its {first} input channels")
                if expected != first:
                    raise ModelError(
                        f"layer '{layer.name}': weight shape {tuple(layer.blobs[0].shape)} expects {expected} "
                        f"input channels but its input '{layer.bottoms[0]}' has {first}")
            out = geo.num_output if geo.axis == 1 else None
        elif layer.type in _CHANNEL_PRESERVING:
            out = first
        elif layer.type == "Concat" and int(layer.sub("concat_param").get("axis", 1)) == 1:
            parts = [channels.get(b) for b in layer.bottoms]
            out = sum(parts) if all(p is not None for p in parts) else None
        for top in layer.tops:
            channels[top] = out
    return channels


# Layers whose output has the spatial size of their (first) input.
_SIZE_PRESERVING = _CHANNEL_PRESERVING - {"Pooling"}


def _pool_out(size: int, kernel: int, stride: int, pad: int) -> int:
    out = -(-(size + 2 * pad - kernel) // stride) + 1  # Caffe rounds pooled sizes up
    if pad and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def _check_spatial(net: "Net") -> dict[str, tuple[int, int] | None]:
    """Propagate 4-D spatial sizes where they are certain, and name the convolution or pooling layer whose
    kernel does not fit its padded input (OpenCV would only say "getLayerShapesRecursively"). Returns the
    sizes by blob."""
    sizes: dict[str, tuple[int, int] | None] = {}
    for layer in net.layers:
        first = sizes.get(layer.bottoms[0]) if layer.bottoms else None
        out: tuple[int, int] | None = None
        if layer.type == "Input":
            for top, dims in zip(layer.tops, _declared_shapes(layer)):
                sizes[top] = (dims[2], dims[3]) if len(dims) == 4 and min(dims[2:]) > 0 else None
            continue
        if layer.type == "Convolution" and first is not None:
            geo = conv_geometry(layer)
            if geo.axis == 1:
                dims = []
                for size, k, s, p, d in zip(first, geo.kernel, geo.stride, geo.pad, geo.dilation):
                    span = d * (k - 1) + 1
                    if size + 2 * p < span:
                        raise ModelError(f"layer '{layer.name}': kernel {geo.kernel[0]}x{geo.kernel[1]} (spanning "
                                         f"{span} with dilation {d}) does not fit its {first[0]}x{first[1]} input "
                                         f"padded by {p}")
                    dims.append((size + 2 * p - span) // s + 1)
                out = (dims[0], dims[1])
        elif layer.type == "Pooling" and first is not None:
            pp = layer.sub("pooling_param")
            if pp.get("global_pooling"):
                out = (1, 1)
            else:
                k = _pair(list(pp.get("kernel_size", []) if isinstance(pp.get("kernel_size"), list)
                               else [pp["kernel_size"]] if "kernel_size" in pp else []),
                          pp.get("kernel_h"), pp.get("kernel_w"), 0, "kernel", layer.name)
                st = _pair([pp["stride"]] if "stride" in pp else [], pp.get("stride_h"), pp.get("stride_w"), 1,
                           "stride", layer.name)
                pd = _pair([pp["pad"]] if "pad" in pp else [], pp.get("pad_h"), pp.get("pad_w"), 0, "pad",
                           layer.name)
                if min(k) <= 0 or min(st) <= 0:
                    out = None
                else:
                    for size, kk, p in zip(first, k, pd):
                        if size + 2 * p < kk:
                            raise ModelError(f"layer '{layer.name}': pooling kernel {k[0]}x{k[1]} does not fit its "
                                             f"{first[0]}x{first[1]} input padded by {p}")
                    out = tuple(_pool_out(size, kk, ss, p) for size, kk, ss, p in zip(first, k, st, pd))
        elif layer.type in _SIZE_PRESERVING:
            out = first
        for top in layer.tops:
            sizes[top] = out
    return sizes


def _check_inner_products(net: "Net", channels: Mapping[str, int | None],
                          sizes: Mapping[str, tuple[int, int] | None]) -> None:
    """Name the InnerProduct layer whose weights take another number of inputs than its input blob holds per
    sample (a prototxt and caffemodel that do not belong together; OpenCV would only fail an assertion in its
    forward pass). The count per sample is certain for a blob whose channels and 4-D size are known, for an
    InnerProduct's output, and through layers that keep it; anything else is not checked (no false alarms)."""
    counts: dict[str, int | None] = {}
    for layer in net.layers:
        if layer.type == "Input":
            for top, dims in zip(layer.tops, _declared_shapes(layer)):
                counts[top] = int(np.prod(dims[1:])) if len(dims) > 1 else None
            continue
        first = layer.bottoms[0] if layer.bottoms else None
        c, hw = channels.get(first), sizes.get(first)
        known = c * hw[0] * hw[1] if c is not None and hw is not None else counts.get(first)
        out: int | None = None
        if layer.type == "InnerProduct":
            geo = inner_product_geometry(layer)
            w = layer.blobs[0]
            takes = int(w.shape[0] if geo.transpose else w.shape[1])
            if geo.axis == 1 and known is not None and known != takes:
                raise ModelError(f"layer '{layer.name}': weight shape {tuple(w.shape)} takes {takes} inputs but its "
                                 f"input '{first}' has {known} values per sample")
            out = geo.num_output if geo.axis == 1 else None
        elif layer.type in _SIZE_PRESERVING or (layer.type == "Flatten" and
                                                int(layer.sub("flatten_param").get("axis", 1)) >= 1):
            out = known
        for top in layer.tops:
            counts[top] = out


def _declared_shapes(layer: Layer) -> list[list[int]]:
    shapes = [[int(d) for d in s.get("dim", [])] for s in layer.sub("input_param").get("shape", [])]
    if len(shapes) == 1 and len(layer.tops) > 1:
        shapes = shapes * len(layer.tops)
    return shapes + [[]] * (len(layer.tops) - len(shapes))


def _check_input_shapes(layer: Layer) -> None:
    for shape in layer.sub("input_param").get("shape", []):
        dims = [int(d) for d in shape.get("dim", [])]
        if len(dims) > MAX_AXES:
            raise ModelError(f"input '{layer.name}': shape has {len(dims)} axes (at most {MAX_AXES})")
        if any(d <= 0 for d in dims):
            raise ModelError(f"input '{layer.name}': shape {dims} has a zero or negative dimension")


def _check_bias(layer: Layer, bias_term: bool, num_output: int) -> None:
    expected = 2 if bias_term else 1
    if len(layer.blobs) != expected:
        raise ModelError(
            f"layer '{layer.name}': has {len(layer.blobs)} blobs, expected {expected} "
            f"(bias_term: {str(bias_term).lower()})"
        )
    if bias_term and layer.blobs[1].size != num_output:
        raise ModelError(
            f"layer '{layer.name}': bias has {layer.blobs[1].size} values, expected {num_output}"
        )
