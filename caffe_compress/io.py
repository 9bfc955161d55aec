"""Model I/O: the only module that touches protobuf.

``load(deploy, weights) -> Net`` reads a deploy prototxt (V0, V1 or V2) and a
caffemodel, upgrades legacy formats, applies Caffe's TEST-phase filtering and
matches weights to layers by name. ``save(net, prefix)`` writes a clean V2
``PREFIX.prototxt`` + ``PREFIX.caffemodel`` pair atomically.

Blobs never pass through Python float lists: they are converted with numpy
buffers over the protobuf wire format (``blob_to_array`` / ``array_to_blob``).
"""
from __future__ import annotations

import logging
import os
import stat
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from google.protobuf import json_format, text_format
from google.protobuf.message import DecodeError

from ._proto import caffe_pb2 as pb
from .errors import ModelError, UnreadableInputError, WriteError
from .net import OPTIONALLY_WEIGHTED_TYPES, WEIGHTED_TYPES, Layer, Net, fp16_storable

log = logging.getLogger(__name__)

MAX_PROTOTXT_BYTES = 16 * 1024 * 1024
MAX_CAFFEMODEL_BYTES = 2 * 1024**3 - 1
MAX_BLOB_AXES = 32
MAX_CAFFEMODEL_LAYERS = 100_000
MAX_LAYERS = 10_000  # the largest real Caffe nets have a few thousand; bounds the time of every pass

# ------------------------------------------------------------------ reading files


def read_input(path: str | os.PathLike, *, what: str, max_bytes: int) -> bytes:
    """Read a whole input file after checking that it is a regular file under the cap."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise UnreadableInputError(f"{p}: {what} not found") from None
    except OSError as exc:
        raise UnreadableInputError(f"{p}: cannot read {what}: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise UnreadableInputError(f"{p}: {what} is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise UnreadableInputError(f"{p}: {what} is not a regular file")
    if st.st_size > max_bytes:
        raise ModelError(f"{p}: {what} is {st.st_size} bytes, more than the {max_bytes}-byte limit")
    try:
        with open(p, "rb") as fh:
            # read(n) allocates n bytes up front: ask for the file's size (+1 to see it grow), never for the
            # cap (2 GB of address space: a MemoryError on a 32-bit device or under ulimit -v)
            data = fh.read(st.st_size + 1)
            if len(data) > st.st_size:  # it grew since stat(): read on, up to the cap
                data += fh.read(max_bytes + 1 - len(data))
    except OSError as exc:
        raise UnreadableInputError(f"{p}: cannot read {what}: {exc.strerror}") from None
    if len(data) > max_bytes:
        raise ModelError(f"{p}: {what} is more than the {max_bytes}-byte limit")
    return data


def parse_prototxt(data: bytes, path: str | os.PathLike) -> pb.NetParameter:
    """Parse deploy text; errors name the file and line:col."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if _looks_like_caffemodel(data):
            raise ModelError(
                f"{path}: this is a binary caffemodel, not a prototxt; are DEPLOY and WEIGHTS swapped?"
            ) from None
        raise ModelError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    if "\x00" in text:
        if _looks_like_caffemodel(data):
            raise ModelError(
                f"{path}: this is a binary caffemodel, not a prototxt; are DEPLOY and WEIGHTS swapped?"
            )
        raise ModelError(f"{path}: not a text prototxt (contains NUL bytes)")
    _check_structure(text, path)
    msg = pb.NetParameter()
    try:
        text_format.Parse(text, msg)
    except text_format.ParseError as exc:
        raise ModelError(f"{path}:{exc}".replace(" : ", ": ", 1)) from None
    except (ValueError, RecursionError) as exc:  # pathological nesting or numbers
        raise ModelError(f"{path}: cannot parse prototxt: {exc}") from None
    return msg


MAX_PROTOTXT_FIELDS = 300_000  # ':' and '{' in a deploy text: real nets have tens of thousands
MAX_PROTOTXT_DEPTH = 64  # nesting of { } (a deploy net needs 4 or 5)


def _check_structure(text: str, path) -> None:
    """Refuse, in milliseconds, a text whose parse would take minutes: too many fields, or deep nesting."""
    fields = text.count(":") + text.count("{")
    if fields > MAX_PROTOTXT_FIELDS:
        raise ModelError(f"{path}: has about {fields} fields, more than the {MAX_PROTOTXT_FIELDS} a deploy "
                         "prototxt can need")
    if "{" in text:
        raw = np.frombuffer(text.encode("utf-8", "replace"), dtype=np.uint8)
        depth = int(np.max(np.cumsum((raw == ord("{")).astype(np.int32) - (raw == ord("}")).astype(np.int32))))
        if depth > MAX_PROTOTXT_DEPTH:
            raise ModelError(f"{path}: nested {depth} levels deep (at most {MAX_PROTOTXT_DEPTH})")


def _looks_like_caffemodel(data: bytes) -> bool:
    if len(data) < 16:
        return False
    msg = pb.NetParameter()
    try:
        msg.ParseFromString(data)
    except (DecodeError, RecursionError, ValueError):
        return False
    return any(len(l.blobs) for l in msg.layer) or any(len(l.blobs) for l in msg.layers)


def _is_text_prototxt(data: bytes) -> bool:
    """Whether ``data`` parses as a (small) text prototxt: the 'swapped arguments' hint."""
    if len(data) > MAX_PROTOTXT_BYTES or not data.strip():
        return False
    try:
        text = data.decode("utf-8")
        _check_structure(text, "")
        text_format.Parse(text, pb.NetParameter())
        return True
    except Exception:  # noqa: BLE001 - any failure just means "no hint"
        return False


def parse_caffemodel(data: bytes, path: str | os.PathLike) -> pb.NetParameter:
    if not data:
        raise ModelError(f"{path}: caffemodel is empty (0 bytes)")
    msg = pb.NetParameter()
    try:
        msg.ParseFromString(data)
    except MemoryError:
        raise ModelError(f"{path}: out of memory parsing a {len(data) / 1e6:.0f} MB caffemodel") from None
    except (DecodeError, RecursionError, ValueError):
        hint = "; it is a text prototxt: are DEPLOY and WEIGHTS swapped?" if _is_text_prototxt(data) else ""
        raise ModelError(f"{path}: not a valid caffemodel (truncated or corrupt protobuf){hint}") from None
    if len(msg.layer) + len(msg.layers) > MAX_CAFFEMODEL_LAYERS:
        raise ModelError(f"{path}: holds {len(msg.layer) + len(msg.layers)} layers, more than the "
                         f"{MAX_CAFFEMODEL_LAYERS} this tool accepts")
    if not msg.layer and not msg.layers:
        if _is_text_prototxt(data):
            raise ModelError(f"{path}: this is a text prototxt, not a caffemodel; are DEPLOY and WEIGHTS swapped?")
        raise ModelError(f"{path}: caffemodel holds no layers")
    return msg


# ------------------------------------------------------------------ blob <-> numpy


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ModelError("truncated varint in blob")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ModelError("varint too long in blob")


def _packed_payload(wire: bytes, field_number: int) -> bytes:
    """Concatenated payloads of a packed (length-delimited) field in a serialized message."""
    buf = memoryview(wire)
    pos = 0
    parts: list[memoryview] = []
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, pos = _read_varint(buf, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 2:
            length, pos = _read_varint(buf, pos)
            if number == field_number:
                parts.append(buf[pos : pos + length])
            pos += length
        elif wire_type == 5:
            pos += 4
        else:
            raise ModelError(f"unsupported wire type {wire_type} in blob")
    if len(parts) == 1:
        return parts[0]
    return b"".join(parts)


def _blob_shape(blob: pb.BlobProto, where: str) -> tuple[int, ...]:
    if blob.HasField("shape"):
        dims = tuple(int(d) for d in blob.shape.dim)
    elif blob.num or blob.channels or blob.height or blob.width:
        dims = (blob.num, blob.channels, blob.height, blob.width)
    else:
        return ()  # no shape at all: a flat vector of whatever is stored
    if len(dims) > MAX_BLOB_AXES:
        raise ModelError(f"{where}: blob has {len(dims)} axes (at most {MAX_BLOB_AXES})")
    if any(d < 0 for d in dims):
        raise ModelError(f"{where}: blob has a negative dimension {dims}")
    if any(d >= 1 << 31 for d in dims):
        raise ModelError(f"{where}: blob has an impossible dimension {dims} (at most 2^31 - 1 per axis)")
    return dims


def blob_to_array(blob: pb.BlobProto, *, where: str = "blob") -> np.ndarray:
    """Convert a BlobProto to a float32 array of its declared shape.

    Reads packed ``data`` (float32), ``double_data`` (float64) or ``raw_data``
    (fp16/fp32/fp64 by ``raw_data_type``) through numpy buffers.
    """
    dims = _blob_shape(blob, where)
    count = 1
    for d in dims:
        count *= d  # Python int: no overflow
    n_float, n_double = len(blob.data), len(blob.double_data)
    if n_float:
        values = np.frombuffer(_packed_payload(blob.SerializeToString(), 5), dtype="<f4")
    elif n_double:
        values = np.frombuffer(_packed_payload(blob.SerializeToString(), 8), dtype="<f8")
    elif blob.HasField("raw_data"):
        if not blob.HasField("raw_data_type"):  # absent, or a value this schema does not know (kept unknown)
            raise ModelError(f"{where}: raw_data without a known raw_data_type (FLOAT16, FLOAT or DOUBLE)")
        dtype = {pb.FLOAT16: "<f2", pb.FLOAT: "<f4", pb.DOUBLE: "<f8"}.get(blob.raw_data_type)
        if dtype is None:
            raise ModelError(f"{where}: raw_data of type {pb.Type.Name(blob.raw_data_type)} is not supported")
        raw = blob.raw_data
        itemsize = np.dtype(dtype).itemsize
        if len(raw) % itemsize:
            raise ModelError(f"{where}: raw_data length {len(raw)} is not a multiple of {itemsize}")
        values = np.frombuffer(raw, dtype=dtype)
    else:
        values = np.zeros(0, dtype="<f4")
    if not dims:
        dims = (values.size,)
        count = values.size
    if values.size != count:
        raise ModelError(f"{where}: blob shape {dims} needs {count} values but {values.size} are stored")
    # float32 payloads are used in place (read-only views of one serialized blob):
    # no second copy of a 38 MB weight.
    try:
        return values.astype(np.float32, copy=False).reshape(dims)
    except (ValueError, MemoryError):
        raise ModelError(f"{where}: blob shape {dims} cannot be held in memory") from None


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(number: int, wire_type: int) -> bytes:
    return _varint((number << 3) | wire_type)


def _len_field(number: int, payload: bytes) -> list[bytes]:
    return [_key(number, 2), _varint(len(payload)), payload]


def _blob_wire(array: np.ndarray) -> bytes:
    """Serialized BlobProto: BlobShape + packed float32 data (field 5); the streaming writer's encoding."""
    _, _, header, _ = _blob_header(array)
    return header + np.ascontiguousarray(array, dtype="<f4").tobytes()


def array_to_blob(array: np.ndarray) -> pb.BlobProto:
    """Convert an array to a BlobProto with a BlobShape and packed float data."""
    blob = pb.BlobProto()
    blob.MergeFromString(_blob_wire(array))
    return blob


# ------------------------------------------------------------------ dict <-> message


def _to_dict(msg, skip: Iterable[str] = ()) -> dict:
    out: dict = {}
    skip = set(skip)
    for fd, value in msg.ListFields():
        if fd.name in skip:
            continue

        def convert(v, fd=fd):
            if fd.message_type is not None:
                return _to_dict(v)
            if fd.enum_type is not None:
                ev = fd.enum_type.values_by_number.get(v)
                return ev.name if ev is not None else v
            return v

        out[fd.name] = [convert(v) for v in value] if _is_repeated(fd) else convert(value)
    return out


def _is_repeated(fd) -> bool:
    """protobuf >= 6 has FieldDescriptor.is_repeated (and deprecates label); older ones only label."""
    flag = getattr(fd, "is_repeated", None)
    return bool(flag) if flag is not None else fd.label == fd.LABEL_REPEATED


def _layer_message(layer: Layer) -> pb.LayerParameter:
    msg = pb.LayerParameter()
    try:
        json_format.ParseDict(dict(layer.params), msg)
    except json_format.ParseError as exc:
        raise ModelError(f"layer '{layer.name}': invalid parameters: {exc}") from None
    msg.name = layer.name
    msg.type = layer.type
    msg.bottom.extend(layer.bottoms)
    msg.top.extend(layer.tops)
    return msg


# ------------------------------------------------------------------ upgrades

_V1_TYPE_NAMES = {
    "NONE": "", "ABSVAL": "AbsVal", "ACCURACY": "Accuracy", "ARGMAX": "ArgMax", "BNLL": "BNLL",
    "CONCAT": "Concat", "CONTRASTIVE_LOSS": "ContrastiveLoss", "CONVOLUTION": "Convolution",
    "DATA": "Data", "DECONVOLUTION": "Deconvolution", "DROPOUT": "Dropout", "DUMMY_DATA": "DummyData",
    "EUCLIDEAN_LOSS": "EuclideanLoss", "ELTWISE": "Eltwise", "EXP": "Exp", "FLATTEN": "Flatten",
    "HDF5_DATA": "HDF5Data", "HDF5_OUTPUT": "HDF5Output", "HINGE_LOSS": "HingeLoss", "IM2COL": "Im2col",
    "IMAGE_DATA": "ImageData", "INFOGAIN_LOSS": "InfogainLoss", "INNER_PRODUCT": "InnerProduct",
    "LRN": "LRN", "MEMORY_DATA": "MemoryData", "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss",
    "MVN": "MVN", "POOLING": "Pooling", "POWER": "Power", "RELU": "ReLU", "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss", "SILENCE": "Silence", "SOFTMAX": "Softmax",
    "SOFTMAX_LOSS": "SoftmaxWithLoss", "SPLIT": "Split", "SLICE": "Slice", "TANH": "TanH",
    "WINDOW_DATA": "WindowData", "THRESHOLD": "Threshold",
}

# V1 fields that are not copied by name into the V2 layer.
_V1_SPECIAL = {"name", "type", "bottom", "top", "blobs", "blobs_lr", "weight_decay", "param",
               "blob_share_mode", "layer"}


def _upgrade_v1(v1: pb.V1LayerParameter, index: int) -> pb.LayerParameter:
    if v1.HasField("layer"):
        return _upgrade_v0(v1, index)
    out = pb.LayerParameter()
    out.name = v1.name
    out.type = _V1_TYPE_NAMES.get(pb.V1LayerParameter.LayerType.Name(v1.type), "")
    if not out.type:
        raise ModelError(f"layers #{index + 1} ('{v1.name}'): no layer type")
    out.bottom.extend(v1.bottom)
    out.top.extend(v1.top)
    for fd, value in v1.ListFields():
        if fd.name in _V1_SPECIAL:
            continue
        target = out.DESCRIPTOR.fields_by_name.get(fd.name)
        if target is None:
            continue
        if _is_repeated(fd):
            getattr(out, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(out, fd.name).CopyFrom(value)
        else:
            setattr(out, fd.name, value)
    n_params = max(len(v1.blobs_lr), len(v1.weight_decay), len(v1.param), len(v1.blob_share_mode))
    for i in range(n_params):
        spec = out.param.add()
        if i < len(v1.param):
            spec.name = v1.param[i]
        if i < len(v1.blob_share_mode):
            spec.share_mode = v1.blob_share_mode[i]
        if i < len(v1.blobs_lr):
            spec.lr_mult = v1.blobs_lr[i]
        if i < len(v1.weight_decay):
            spec.decay_mult = v1.weight_decay[i]
    out.blobs.extend(v1.blobs)
    return out


_V0_TYPES = {
    "conv": "Convolution", "innerproduct": "InnerProduct", "relu": "ReLU", "pool": "Pooling",
    "lrn": "LRN", "dropout": "Dropout", "softmax": "Softmax", "softmax_loss": "SoftmaxWithLoss",
    "concat": "Concat", "flatten": "Flatten", "split": "Split", "tanh": "TanH", "sigmoid": "Sigmoid",
    "accuracy": "Accuracy", "data": "Data", "bnll": "BNLL", "euclidean_loss": "EuclideanLoss",
    "infogain_loss": "InfogainLoss", "multinomial_logistic_loss": "MultinomialLogisticLoss",
    "im2col": "Im2col", "images": "ImageData", "hdf5_data": "HDF5Data", "window_data": "WindowData",
}


def _upgrade_v0(v1: pb.V1LayerParameter, index: int) -> pb.LayerParameter:
    v0 = v1.layer
    out = pb.LayerParameter()
    out.name = v0.name or v1.name
    out.type = _V0_TYPES.get(v0.type, "")
    if not out.type:
        raise ModelError(f"layers #{index + 1} ('{out.name}'): V0 layer type '{v0.type}' is not supported")
    out.bottom.extend(v1.bottom)
    out.top.extend(v1.top)
    if out.type == "Convolution":
        p = out.convolution_param
        p.num_output = v0.num_output
        p.bias_term = v0.biasterm
        if v0.pad:
            p.pad.append(v0.pad)
        p.kernel_size.append(v0.kernelsize)
        if v0.stride != 1:
            p.stride.append(v0.stride)
        p.group = v0.group
    elif out.type == "InnerProduct":
        out.inner_product_param.num_output = v0.num_output
        out.inner_product_param.bias_term = v0.biasterm
    elif out.type == "Pooling":
        p = out.pooling_param
        p.pool = v0.pool
        p.kernel_size = v0.kernelsize
        p.stride = v0.stride
        p.pad = v0.pad
    elif out.type == "LRN":
        p = out.lrn_param
        p.local_size, p.alpha, p.beta, p.k = v0.local_size, v0.alpha, v0.beta, v0.k
    elif out.type == "Dropout":
        out.dropout_param.dropout_ratio = v0.dropout_ratio
    elif out.type == "Concat":
        out.concat_param.concat_dim = v0.concat_dim
    out.blobs.extend(v0.blobs)
    return out


def _legacy_input_layers(msg: pb.NetParameter, path) -> list[pb.LayerParameter]:
    """Turn ``input:`` + ``input_dim``/``input_shape`` headers into Input layers."""
    if not msg.input:
        if msg.input_dim or msg.input_shape:
            raise ModelError(f"{path}: input_dim/input_shape given without any 'input' name")
        return []
    n = len(msg.input)
    shapes: list[list[int]] = []
    if msg.input_shape:
        if len(msg.input_shape) != n:
            raise ModelError(f"{path}: {n} inputs but {len(msg.input_shape)} input_shape entries")
        shapes = [list(s.dim) for s in msg.input_shape]
    elif msg.input_dim:
        if len(msg.input_dim) != 4 * n:
            raise ModelError(f"{path}: {n} inputs need {4 * n} input_dim values, got {len(msg.input_dim)}")
        shapes = [list(msg.input_dim[4 * i : 4 * i + 4]) for i in range(n)]
    layers = []
    for i, name in enumerate(msg.input):
        layer = pb.LayerParameter(name=name, type="Input")
        layer.top.append(name)
        if shapes:
            if any(d < 0 for d in shapes[i]):
                raise ModelError(f"{path}: input '{name}' has a negative dimension {shapes[i]}")
            layer.input_param.shape.add().dim.extend(shapes[i])
        layers.append(layer)
    return layers


def _state_meets_rule(state: pb.NetState, rule: pb.NetStateRule) -> bool:
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    stages = set(state.stage)
    if any(s not in stages for s in rule.stage):
        return False
    if any(s in stages for s in rule.not_stage):
        return False
    return True


def _included(state: pb.NetState, layer: pb.LayerParameter) -> bool:
    """Caffe's Net::FilterNet: include rules OR-ed, exclude rules OR-ed."""
    if layer.include and layer.exclude:
        raise ModelError(f"layer '{layer.name}': has both include and exclude rules")
    if layer.include:
        return any(_state_meets_rule(state, r) for r in layer.include)
    if layer.exclude:
        return not any(_state_meets_rule(state, r) for r in layer.exclude)
    return True


def upgrade(msg: pb.NetParameter, path) -> list[pb.LayerParameter]:
    """V0/V1/V2 deploy -> filtered V2 LayerParameters (legacy inputs become Input layers)."""
    if msg.layer and msg.layers:
        raise ModelError(f"{path}: has both 'layer' and legacy 'layers' entries; use one format")
    count = len(msg.layer) + len(msg.layers) + len(msg.input)
    if count > MAX_LAYERS:
        raise ModelError(f"{path}: has {count} layers, more than the {MAX_LAYERS} this tool accepts")
    layers = _legacy_input_layers(msg, path)
    if msg.layers:
        layers += [_upgrade_v1(v1, i) for i, v1 in enumerate(msg.layers)]
    else:
        layers += list(msg.layer)
    state = pb.NetState()
    state.CopyFrom(msg.state)
    state.phase = pb.TEST  # deploy: Caffe's TEST phase
    kept = []
    for layer in layers:
        if _included(state, layer):
            kept.append(layer)
        else:
            log.info("dropping layer '%s' (%s): not in the TEST phase", layer.name, layer.type)
    return kept


# ------------------------------------------------------------------ weights


def _weights_by_name(msg: pb.NetParameter) -> dict[str, list[pb.BlobProto]]:
    found: dict[str, list[pb.BlobProto]] = {}
    for layer in msg.layer:
        if layer.blobs:
            found.setdefault(layer.name, list(layer.blobs))
    for v1 in msg.layers:
        blobs = v1.blobs or (v1.layer.blobs if v1.HasField("layer") else [])
        name = v1.name or (v1.layer.name if v1.HasField("layer") else "")
        if blobs:
            found.setdefault(name, list(blobs))
    return found


def _canonical(layer_type: str, index: int, array: np.ndarray) -> np.ndarray:
    """Drop legacy leading unit axes from InnerProduct weights and 1-D biases."""
    if layer_type in ("Convolution", "Deconvolution", "InnerProduct") and index == 1:
        return array.reshape(-1)
    if layer_type == "InnerProduct" and index == 0 and array.ndim > 2:
        lead = array.shape[:-2]
        if all(d == 1 for d in lead):
            return array.reshape(array.shape[-2:])
    return array


def _needs_weights(layer: pb.LayerParameter) -> bool:
    if layer.type in WEIGHTED_TYPES:
        return True
    return layer.type in OPTIONALLY_WEIGHTED_TYPES and len(layer.bottom) == 1


_LAYER_SKIP = ("name", "type", "bottom", "top", "blobs", "include", "exclude", "phase")


def build_net(deploy: pb.NetParameter, weights: pb.NetParameter | None, deploy_path, weights_path) -> Net:
    """Combine parsed deploy + caffemodel messages into a checked Net."""
    layers_pb = upgrade(deploy, deploy_path)
    if not layers_pb:
        raise ModelError(f"{deploy_path}: defines no layers")
    stored = _weights_by_name(weights) if weights is not None else {}
    used: set[str] = set()
    layers: list[Layer] = []
    for lp in layers_pb:
        blobs_pb = stored.get(lp.name)
        if blobs_pb is not None:
            used.add(lp.name)
        elif lp.blobs:
            blobs_pb = list(lp.blobs)
        else:
            blobs_pb = []
        if not blobs_pb and _needs_weights(lp):
            raise ModelError(f"{weights_path}: no weights for layer '{lp.name}' ({lp.type})")
        blobs = tuple(
            _canonical(lp.type, i, blob_to_array(b, where=f"{weights_path}: layer '{lp.name}' blob {i}"))
            for i, b in enumerate(blobs_pb)
        )
        layers.append(
            Layer(
                name=lp.name,
                type=lp.type,
                bottoms=tuple(lp.bottom),
                tops=tuple(lp.top),
                params=_to_dict(lp, skip=_LAYER_SKIP),
                blobs=blobs,
            )
        )
    for name in stored:
        if name not in used:
            log.info("ignoring weights of layer '%s': not in the deploy net", name)
    if weights is not None and not used:
        raise ModelError(f"{weights_path}: no layer name matches the deploy file {deploy_path}")
    any_half = any(b.HasField("raw_data") and b.raw_data_type == pb.FLOAT16 for name in used for b in stored[name])
    try:
        return Net(name=deploy.name, layers=tuple(layers), stored_fp16=any_half).check()
    except ModelError as exc:
        raise ModelError(f"{deploy_path}: {exc}") from None


def load(deploy: str | os.PathLike, weights: str | os.PathLike) -> Net:
    """Read a deploy prototxt and its caffemodel into a checked :class:`Net`."""
    deploy_msg = parse_prototxt(read_input(deploy, what="prototxt", max_bytes=MAX_PROTOTXT_BYTES), deploy)
    # The raw bytes are dropped as soon as they are parsed (peak memory).
    weights_msg = parse_caffemodel(
        read_input(weights, what="caffemodel", max_bytes=MAX_CAFFEMODEL_BYTES), weights
    )
    return build_net(deploy_msg, weights_msg, deploy, weights)


# ------------------------------------------------------------------ writing


# The text of each layer, made once per Layer (they are immutable, and the rewritten nets, the rounds' and the
# timing nets share most of them): res10 SSD's 289 deploy texts took 1.9 s, mostly in ParseDict.
_LAYER_TEXT: "weakref.WeakKeyDictionary[Layer, str]" = weakref.WeakKeyDictionary()


def prototxt_bytes(net: Net) -> bytes:
    """The V2 deploy text of ``net`` (no weights): text_format's, one layer's text at a time."""
    head = text_format.MessageToString(pb.NetParameter(name=net.name)) if net.name else ""
    return (head + "".join(f"layer {{\n{_layer_text(layer)}}}\n" for layer in net.layers)).encode("utf-8")


def _layer_text(layer: Layer) -> str:
    text = _LAYER_TEXT.get(layer)
    if text is None:
        text = _LAYER_TEXT[layer] = text_format.MessageToString(_layer_message(layer), indent=2)
    return text


def _stored_as_fp16(layer: Layer, array: np.ndarray, fp16: bool) -> bool:
    return fp16 and fp16_storable(layer.type, array)


def caffemodel_chunks(net: Net, *, fp16: bool = False) -> Iterator[bytes | memoryview]:
    """The caffemodel of ``net`` as a stream of chunks: only the weighted layers (name, type, blobs).

    Written directly in the wire format (NetParameter.layer = 100, LayerParameter
    name = 1, type = 2, blobs = 7): weights go from the arrays to the output
    without any copy through protobuf. With ``fp16`` the blobs are stored as
    half floats (BlobProto.raw_data_type = FLOAT16, raw_data), which OpenCV reads.
    """
    if net.name:
        yield b"".join(_len_field(1, net.name.encode("utf-8")))
    for layer in net.layers:
        if not layer.blobs:
            continue
        head = b"".join(_len_field(1, layer.name.encode("utf-8")) + _len_field(2, layer.type.encode("utf-8")))
        halves = [_stored_as_fp16(layer, blob, fp16) for blob in layer.blobs]
        blobs = [_blob_header(blob, fp16=half) for blob, half in zip(layer.blobs, halves)]
        size = len(head) + sum(len(k) + len(n) + len(h) + nbytes for k, n, h, nbytes in blobs)
        yield _key(100, 2) + _varint(size) + head
        for (key, length, header, _), blob, half in zip(blobs, layer.blobs, halves):
            yield key + length + header
            yield np.ascontiguousarray(blob, dtype="<f2" if half else "<f4").data


def write_files(net: Net, prototxt: Path, caffemodel: Path, *, fp16: bool = False) -> None:
    """Plain (non-atomic) write of a pair, streaming the weights: for scratch files."""
    prototxt.write_bytes(prototxt_bytes(net))
    with open(caffemodel, "wb") as fh:
        for chunk in caffemodel_chunks(net, fp16=fp16):
            fh.write(chunk)


def _blob_header(array: np.ndarray, *, fp16: bool = False) -> tuple[bytes, bytes, bytes, int]:
    """(key, length, everything before the payload, payload bytes) of a blob field 7, for streaming."""
    dims = b"".join(_varint(int(d)) for d in array.shape)
    shape_msg = b"".join(_len_field(1, dims)) if array.shape else b""
    if fp16:
        nbytes = array.size * 2
        payload_key = _key(10, 0) + _varint(pb.FLOAT16) + _key(12, 2) + _varint(nbytes)
    else:
        nbytes = array.size * 4
        payload_key = _key(5, 2) + _varint(nbytes)
    header = b"".join(_len_field(7, shape_msg)) + payload_key
    return _key(7, 2), _varint(len(header) + nbytes), header, nbytes


@dataclass
class StagedModel:
    """A written-but-not-published model pair (and optional extra files such as the JSON report): temp files
    beside the targets, named ``.<target name>.<pid>-<token>.tmp``.

    ``commit()`` publishes them as a unit: under an exclusive lock on the output directory (so two runs
    never interleave their renames), it first repairs any commit a killed run left half-done on this
    prefix, then renames the caffemodel, the prototxt and the extras, in that order. A crash between the
    renames leaves the prototxt temp without its caffemodel temp, which the next run on the prefix
    completes (see sweep_leftovers).
    """

    prototxt: Path
    caffemodel: Path
    temp_prototxt: Path
    temp_caffemodel: Path
    committed: bool = field(default=False)
    extras: list = field(default_factory=list)  # [(temp, target)]

    def add(self, target: Path, data: bytes) -> None:
        """Stage one more file, published with the pair (e.g. the JSON report)."""
        directory = target.parent if str(target.parent) else Path(".")
        try:
            temp = _write_temp(directory, target.name, [data], token=_token_of(self.temp_prototxt))
        except OSError as exc:
            raise WriteError(f"{target}: cannot write: {exc.strerror}") from None
        self.extras.append((temp, target))

    def commit(self, *, pair: bool = True) -> list[str]:
        """Rename the temp files into place; returns what was swept or repaired first (one line each).

        pair=False publishes only the extras (--format onnx): the pair's temps are removed.
        """
        directory = self.prototxt.parent if str(self.prototxt.parent) else Path(".")
        with directory_lock(directory):
            notes = sweep_leftovers(self.prototxt, self.caffemodel, locked=True)
            try:
                if pair:
                    os.replace(self.temp_caffemodel, self.caffemodel)
                    os.replace(self.temp_prototxt, self.prototxt)
                else:
                    self.temp_prototxt.unlink(missing_ok=True)
                    self.temp_caffemodel.unlink(missing_ok=True)
                for temp, target in self.extras:
                    os.replace(temp, target)
            except OSError as exc:
                self.discard()
                raise WriteError(f"{self.prototxt.parent}: cannot publish output: {exc.strerror}") from None
            _fsync_dir(directory)
        self.committed = True
        return notes

    def discard(self) -> None:
        # the prototxt temp goes first: a prototxt temp without its caffemodel temp means "commit in progress"
        for p in (self.temp_prototxt, self.temp_caffemodel, *(t for t, _ in self.extras)):
            try:
                p.unlink()
            except FileNotFoundError:
                pass


class directory_lock:
    """An exclusive advisory lock (flock) on a directory, held for a commit; a no-op where flock is missing."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.fd: int | None = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # not POSIX
            return self
        try:
            self.fd = os.open(self.directory, os.O_RDONLY)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except OSError as exc:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None
            raise WriteError(f"{self.directory}: cannot lock the output directory: {exc.strerror}") from None
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the flock
            self.fd = None


def _token_of(temp: Path) -> str:
    return temp.name.rsplit(".", 2)[-2]


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's live process
        return True
    return True


def _dead_temps(directory: Path, name: str) -> dict[str, Path]:
    """{token: temp} of ``.<name>.<pid>-<hex>.tmp`` files whose process is gone."""
    found = {}
    prefix = f".{name}."
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return found
    for entry in entries:
        if not (entry.name.startswith(prefix) and entry.name.endswith(".tmp")):
            continue
        token = entry.name[len(prefix):-len(".tmp")]
        pid, sep, rest = token.partition("-")
        if sep and pid.isdigit() and rest and not _pid_alive(int(pid)):
            found[token] = Path(entry.path)
    return found


def sweep_leftovers(prototxt: Path, caffemodel: Path, *, locked: bool = False) -> list[str]:
    """Remove the temp files a killed run left for this output pair, completing its commit when it died
    between the two renames; one line per action (for the run's output)."""
    directory = prototxt.parent if str(prototxt.parent) else Path(".")
    if not locked:
        with directory_lock(directory):
            return sweep_leftovers(prototxt, caffemodel, locked=True)
    notes = []
    protos = _dead_temps(directory, prototxt.name)
    models = _dead_temps(directory, caffemodel.name)
    for token, temp in protos.items():
        if token in models:  # staged, never committed: remove both
            continue
        try:
            os.replace(temp, prototxt)
            notes.append(f"{prototxt}: completed a commit an earlier run (pid {token.split('-')[0]}) left half-done")
        except OSError:
            pass
    for temp in [*models.values(), *(t for k, t in protos.items() if k in models)]:
        try:
            temp.unlink()
            notes.append(f"{temp}: removed a temp file an earlier run (pid {_token_of(temp).split('-')[0]}) left")
        except OSError:
            pass
    return notes


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def output_paths(prefix: str | os.PathLike) -> tuple[Path, Path]:
    prefix = str(prefix)
    for ext in (".prototxt", ".caffemodel"):
        if prefix.endswith(ext):
            prefix = prefix[: -len(ext)]
    return Path(prefix + ".prototxt"), Path(prefix + ".caffemodel")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def new_token() -> str:
    """``<pid>-<random hex>``: names one run's temp files, so a later run can tell whether their owner lives."""
    import secrets

    return f"{os.getpid()}-{secrets.token_hex(4)}"


def _write_temp(directory: Path, stem: str, chunks: Iterable[bytes | memoryview], *, token: str) -> Path:
    """A new ``.<stem>.<token>.tmp`` file with the usual mode under the user's umask (0666 & ~umask)."""
    name = str(directory / f".{stem}.{token}.tmp")
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        try:
            os.unlink(name)
        except OSError:
            pass
        raise
    return Path(name)


def check_outputs(prefix: str | os.PathLike, *, protect: Iterable[str | os.PathLike] = ()) -> Path:
    """Refuse, before any work, an output pair that would replace an input or a non-regular file.

    Returns the directory the pair goes to.
    """
    proto_path, model_path = output_paths(prefix)
    for out in (proto_path, model_path):
        for inp in protect:
            if _same_file(out, Path(inp)):
                raise WriteError(f"{out}: output would overwrite the input {inp}; choose another -o PREFIX")
    directory = proto_path.parent if str(proto_path.parent) else Path(".")
    if not directory.is_dir():
        raise WriteError(f"{directory}: output directory does not exist")
    for out in (proto_path, model_path):
        if out.exists() and not out.is_file():
            raise WriteError(f"{out}: exists and is not a regular file")
    return directory


def check_report_path(path: str | os.PathLike, *, inputs: Iterable[str | os.PathLike],
                      outputs: Iterable[str | os.PathLike], option: str = "--json") -> Path:
    """Refuse, before any work, a report path that is an input or an output, not a regular file, or in a
    directory that does not exist or cannot be written."""
    report = Path(path)
    directory = report.parent if str(report.parent) else Path(".")
    for other, what in [*((Path(p), "an input") for p in inputs), *((Path(p), "an output") for p in outputs)]:
        if _same_file(report, other) or os.path.abspath(report) == os.path.abspath(other):
            raise WriteError(f"{option}: {report} is {what} of this run ({other}); choose another name")
    if not directory.is_dir():
        raise WriteError(f"{option}: directory {directory} does not exist")
    if report.is_dir():
        raise WriteError(f"{option}: {report} is a directory")
    if os.path.lexists(report) and not report.is_file():
        raise WriteError(f"{option}: {report} exists and is not a regular file (it is never replaced)")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise WriteError(f"{option}: directory {directory} is not writable")
    return report


def write_atomically(path: Path, data: bytes, *, option: str = "--json") -> None:
    """A small file written to a temp beside it and renamed into place (never replacing a non-regular file)."""
    directory = path.parent if str(path.parent) else Path(".")
    try:
        temp = _write_temp(directory, path.name, [data], token=new_token())
    except OSError as exc:
        raise WriteError(f"{option}: {path}: {exc.strerror}") from None
    try:
        if os.path.lexists(path) and not path.is_file():
            raise WriteError(f"{option}: {path} exists and is not a regular file (it is never replaced)")
        os.replace(temp, path)
    except OSError as exc:
        raise WriteError(f"{option}: {path}: {exc.strerror}") from None
    finally:
        temp.unlink(missing_ok=True)


def sweep_temps(path: Path) -> list[str]:
    """Remove temp files of ``path`` whose run is gone (a killed run's report, say)."""
    directory = path.parent if str(path.parent) else Path(".")
    notes = []
    for temp in _dead_temps(directory, path.name).values():
        try:
            temp.unlink()
            notes.append(f"{temp}: removed a temp file an earlier run left")
        except OSError:
            pass
    return notes


def stage(net: Net, prefix: str | os.PathLike, *, protect: Iterable[str | os.PathLike] = (),
          fp16: bool = False) -> StagedModel:
    """Write ``net`` to temp files beside ``PREFIX.prototxt``/``PREFIX.caffemodel``.

    ``protect`` lists input paths that an output must never replace (compared
    with samefile, so links are followed). Call ``commit()`` to publish or
    ``discard()`` to remove the temp files.
    """
    proto_path, model_path = output_paths(prefix)
    directory = check_outputs(prefix, protect=protect)
    proto_data = prototxt_bytes(net)
    temps: list[Path] = []
    token = new_token()
    try:  # the caffemodel first: a prototxt temp alone means a commit was in progress (sweep_leftovers)
        temps.append(_write_temp(directory, model_path.name, caffemodel_chunks(net, fp16=fp16), token=token))
        temps.append(_write_temp(directory, proto_path.name, [proto_data], token=token))
    except OSError as exc:
        for t in temps:
            t.unlink(missing_ok=True)
        raise WriteError(f"{directory}: cannot write output: {exc.strerror}") from None
    return StagedModel(proto_path, model_path, temps[1], temps[0])


def save(net: Net, prefix: str | os.PathLike, *, protect: Iterable[str | os.PathLike] = (),
         fp16: bool = False) -> tuple[Path, Path]:
    """Write ``net`` as a V2 pair atomically (fp16 blobs with ``fp16``); returns (prototxt, caffemodel)."""
    staged = stage(net, prefix, protect=protect, fp16=fp16)
    staged.commit()
    return staged.prototxt, staged.caffemodel
