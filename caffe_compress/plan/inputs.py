"""Planning and validation inputs: the user's images, or natural-image probes in the inferred convention.

Validation inputs are never the planning inputs: --images, or the odd files of --calibration (the even
ones plan), or probes drawn with another seed. A fully convolutional net is probed on pictures at most
PROBE_SIDE wide.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from .. import validate
from ..errors import ModelError, UsageError, ValidationError
from ..net import Net
from . import probe

class NoResponseError(ValidationError):
    """The original's outputs do not vary over probes in any convention (the pipeline looks for why)."""


VALIDATION_PROBES = 128  # class decisions need many inputs for a 98% agreement to mean anything
VALIDATION_PROBES_DENSE = 32  # fully convolutional (image-to-image) nets: dense outputs, costly passes
VALIDATION_ELEMENTS = 1 << 24  # values per input over all validation samples (64 MB of float32)
PROBE_SIDE = 96  # fully convolutional nets are probed on pictures at most this high and wide
MAX_PROBE_ELEMENTS = 1 << 24  # 64 MB of float32 per probe input (3 x 2048 x 2048 fits)
MAX_IMAGES = 64
MIN_HELD_OUT = 32  # a calibration set of at least 2x this is split: even files plan, odd files validate
# (fewer held-out images cannot show a 98% agreement: the natural-image probes validate instead)
RESPONSE_PROBES = 8  # probes that must make the outputs vary for a convention to be believed
# Layers that work at any spatial size: a net made only of these is probed on smaller pictures.
SIZE_FREE_TYPES = frozenset({
    "Input", "Convolution", "Deconvolution", "ReLU", "PReLU", "ELU", "TanH", "Sigmoid", "AbsVal", "BNLL", "Power",
    "BatchNorm", "Scale", "Bias", "Eltwise", "Concat", "Split", "Slice", "Dropout", "Pooling", "LRN", "Clip",
    "Swish", "Crop", "Exp", "Log", "Threshold",
})

def probe_shapes(net: Net, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Input shapes for probing: a fully convolutional net gets pictures at most PROBE_SIDE wide."""
    if not all(layer.type in SIZE_FREE_TYPES for layer in net.layers):
        return dict(shapes)
    if any(layer.type == "Pooling" and not layer.sub("pooling_param").get("global_pooling")
           and layer.sub("pooling_param").get("pool") not in (None, "MAX", "AVE") for layer in net.layers):
        return dict(shapes)
    out = {}
    for name, shape in shapes.items():
        if len(shape) == 4 and max(shape[2:]) > PROBE_SIDE:
            out[name] = (shape[0], shape[1], min(int(shape[2]), PROBE_SIDE), min(int(shape[3]), PROBE_SIDE))
        else:
            out[name] = tuple(shape)
    return out


def checked_shapes(net: Net) -> dict[str, tuple[int, ...]]:
    shapes = net.input_shapes()
    if not shapes:
        raise ModelError("the deploy net declares no Input layer or input: header, so it cannot be probed")
    for name, shape in shapes.items():
        if not shape:
            raise ModelError(f"input '{name}' has no declared shape, so OpenCV cannot run it here; add input_shape "
                             "or input_dim to the prototxt (or pass --no-validate with --tradeoff 0)")
        elements = int(np.prod([int(d) for d in shape[1:]], dtype=object)) if len(shape) > 1 else 1
        if elements > MAX_PROBE_ELEMENTS:
            raise ModelError(f"input '{name}': shape {tuple(shape)} is too large to probe "
                             f"({elements} values per sample, at most {MAX_PROBE_ELEMENTS})")
    return shapes


@dataclass(frozen=True)
class Inputs:
    planning: dict[str, np.ndarray] | None
    validation: dict[str, np.ndarray]
    validation_label: str
    convention: str

    @property
    def synthetic(self) -> bool:
        """Validation on natural-image probes, not on the user's images."""
        return self.validation_label.startswith("natural-image probes")


def _image_inputs(shapes, directory: Path, pre: validate.Preprocessing, option: str, *,
                  files: Sequence[Path] | None = None, crop: Mapping | None = None) -> tuple[dict, str]:
    """Preprocessed images; ``crop`` (probe shapes of a fully convolutional net) centre-crops them."""
    if len(shapes) != 1:
        raise UsageError(f"{option}: the model has {len(shapes)} inputs; images can feed only a single-input model")
    (name, shape), = shapes.items()
    files = list(files) if files is not None else validate.list_images(directory, option=option)
    batch = validate.image_batch(files[:MAX_IMAGES], shape, pre, option=option)
    if crop is not None and tuple(crop[name]) != tuple(shape) and batch.ndim == 4:
        h, w = int(crop[name][2]), int(crop[name][3])
        y0, x0 = (batch.shape[2] - h) // 2, (batch.shape[3] - w) // 2
        batch = np.ascontiguousarray(batch[:, :, y0:y0 + h, x0:x0 + w])
    return {name: batch}, f"images:{directory} ({min(len(files), MAX_IMAGES)})"


def _given_convention(pre: validate.Preprocessing) -> probe.Convention | None:
    """The convention the user's --mean/--scale/--swap-rb describe, if any differs from the default."""
    if pre == validate.Preprocessing() or (pre.mean == (0.0, 0.0, 0.0) and pre.scale == 1.0):
        return None
    return probe.Convention("given", tuple(pre.mean), (pre.scale,), f"(x - {pre.mean}) * {pre.scale:g}")


def choose_conventions(net: Net, shapes, seed: int, pre: validate.Preprocessing, responds: Callable | None = None,
                       source: probe.PictureSource | None = None) -> dict[str, probe.InferredConvention]:
    """The input convention of each input, decided once for planning and validation probes alike.

    ``responds(feed) -> bool`` says whether the net's outputs vary over a small batch (the first
    RESPONSE_PROBES planning probes): a convention under which they do not is not the one the net was
    trained with."""
    chosen = {}
    for name, shape in shapes.items():
        given = _given_convention(pre)
        candidates = [probe.InferredConvention(given, "--mean/--scale")] if given else \
            probe.ranked_conventions(net, name, shape, seed=seed)
        chosen[name] = candidates[0]
        if responds is not None and len(shapes) == 1:
            for candidate in candidates:
                feed = probe.natural_probes(shape, RESPONSE_PROBES, candidate.convention, seed=seed, source=source)
                if responds({name: feed[:]}):
                    chosen[name] = candidate
                    break
            else:
                raise NoResponseError(
                    f"input '{name}': the model's outputs do not vary over natural-image probes in any common "
                    "input convention; pass --calibration DIR or --images DIR (with --mean/--scale)")
    return chosen


def _natural_inputs(shapes, count: int, seed: int, conventions: Mapping[str, probe.InferredConvention],
                    source: probe.PictureSource | None = None) -> tuple[dict, str]:
    """``count`` probes per input (fewer for a large input) in its convention."""
    inputs, used = {}, []
    for i, (name, shape) in enumerate(shapes.items()):
        elements = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        n = max(1, min(count, MAX_PROBE_ELEMENTS // max(elements, 1)))
        chosen = conventions[name]
        inputs[name] = probe.natural_probes(shape, n, chosen.convention, seed=seed + 17 * i, source=source)
        used.append(f"{name}: {chosen.convention.name} {chosen.convention.description} ({chosen.evidence})")
    return inputs, "; ".join(used)


def make_inputs(net: Net, *, wants_plan: bool, validate_output: bool, images, calibration,
                 pre: validate.Preprocessing, probes: int, seed: int, responds: Callable | None = None) -> Inputs:
    """Planning inputs (calibration images or natural probes) and separate validation inputs."""
    shapes = checked_shapes(net) if (wants_plan or validate_output) else {}
    small = probe_shapes(net, shapes)
    validation: dict[str, np.ndarray] = {}
    label, convention = "none", ""
    source = probe.PictureSource()
    conventions: dict = {}

    def probes_of(count: int, probe_seed: int) -> tuple[dict, str]:
        if not conventions:  # decided once, on the first planning probes, when probes are needed at all
            conventions.update(choose_conventions(net, small, seed, pre, responds, source))
        return _natural_inputs(small, count, probe_seed, conventions, source)

    calibrated = wants_plan and calibration is not None
    files = validate.list_images(Path(calibration), option="--calibration") if calibrated else []
    # validate on the calibration images that planning does not see (no validation probes are drawn then)
    held_out = validate_output and images is None and len(files) >= 2 * MIN_HELD_OUT
    if validate_output and not held_out:  # read --images first: a bad option fails before any real work
        if images is not None:
            validation, label = _image_inputs(shapes, Path(images), pre, "--images")
        else:
            elements = max(int(np.prod(s[1:])) for s in small.values())
            most = VALIDATION_PROBES_DENSE if small != shapes else VALIDATION_PROBES
            count = max(probes, min(most, VALIDATION_ELEMENTS // max(elements, 1)))
            validation, convention = probes_of(count, seed + 1000)
            label = f"natural-image probes ({next(iter(validation.values())).shape[0]})"
    planning = None
    if held_out:
        planning, _ = _image_inputs(shapes, Path(calibration), pre, "--calibration", files=files[0::2], crop=small)
        validation, label = _image_inputs(shapes, Path(calibration), pre, "--calibration", files=files[1::2],
                                          crop=small)
        label = f"held-out {label}"
    elif calibrated:
        planning, _ = _image_inputs(shapes, Path(calibration), pre, "--calibration", files=files, crop=small)
    elif wants_plan:
        planning, convention = probes_of(probes, seed)
    return Inputs(planning, validation, label, convention)


