"""compress(): files -> load -> net -> plan -> decompose -> rewrite -> check -> save -> verify -> report.

The closed loop: the planner proposes ranks for an error budget; the model is rewritten, staged in temp
files and measured in OpenCV against the fidelity contract (plan/contract.py) on validation inputs that
planning never saw. A miss lowers the budget (raising ranks, dropping the factorizations that cost the
most error) and tries again, a bounded number of times; nothing is published before a round passes.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Hashable, Mapping, Sequence

import numpy as np

from . import io, rewrite, timing, validate
from .decompose import cp_conv, cp_reconstruct
from .errors import ModelError, RankError, UsageError, ValidationError, WriteError
from .net import Layer, Net, conv_geometry
from .plan import analyse as planner, contract, probe, search
from .report import Report

log = logging.getLogger(__name__)

DEFAULT_TRADEOFF = 0.95
DEFAULT_PROBES = 8
VALIDATION_PROBES = 128  # class decisions need many inputs for a 98% agreement to mean anything
VALIDATION_PROBES_DENSE = 32  # fully convolutional (image-to-image) nets: dense outputs, costly passes
VALIDATION_ELEMENTS = 1 << 24  # values per input over all validation samples (64 MB of float32)
PROBE_SIDE = 96
TIMING_SIDE = 128  # layers are timed on maps at most this high and wide
SPEED_MARGIN = 1.1  # --objective speed: a factored layer must be at least this much faster
OBJECTIVES = ("balanced", "speed", "size")
MAX_SPEED_ROUNDS = 3  # factorizations dropped one at a time while the whole model is slower
LATENCY_TOLERANCE = 0.97  # whole-model 1-thread speed ratio below this is "slower" (noise allowance)  # fully convolutional nets are probed on pictures at most this high and wide
# Layers that work at any spatial size: a net made only of these is probed on smaller pictures.
SIZE_FREE_TYPES = frozenset({
    "Input", "Convolution", "Deconvolution", "ReLU", "PReLU", "ELU", "TanH", "Sigmoid", "AbsVal", "BNLL", "Power",
    "BatchNorm", "Scale", "Bias", "Eltwise", "Concat", "Split", "Slice", "Dropout", "Pooling", "LRN", "Clip",
    "Swish", "Crop", "Exp", "Log", "Threshold",
})
POLISH_CP_ITERATIONS = 30  # extra sweeps for the rank the planner picks
FORCED_CP_ITERATIONS = 1000  # a rank given with --rank: run to convergence
MAX_PROBE_ELEMENTS = 1 << 24  # 64 MB of float32 per probe input (3 x 2048 x 2048 fits)
MAX_PROBES = 256
MAX_IMAGES = 64
RUN_CHUNK = 8  # samples per OpenCV forward pass
MIN_HELD_OUT = 8  # a calibration set of at least 2x this is split: even files plan, odd files validate
NOTHING_TO_COMPRESS = "nothing to compress within the fidelity contract at this trade-off; try a higher T"

ProgressFn = Callable[[str], None]


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (0 where unknown).

    Linux: VmHWM of this program image. getrusage's ru_maxrss is avoided there
    because it also counts the parent's memory at fork time, before exec.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:  # not on POSIX
        return 0.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class _Timer:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start
            log.debug("stage %s: %.2fs, peak RSS %.0f MB", name, self.timings[name], peak_rss_mb())


def default_prefix(weights: str | os.PathLike) -> Path:
    return Path.cwd() / f"{Path(weights).stem}-compressed"


# ------------------------------------------------------------------ reading blobs in OpenCV


@dataclass(frozen=True)
class Source:
    """A blob value at one point of the graph: top ``index`` of layer ``layer`` (or a net input)."""

    layer: str
    index: int = 0
    is_input: bool = False


def _sources(net: Net) -> tuple[dict[str, Source], list[Source]]:
    """{layer: source of its first bottom} for every layer, and the sources of the compared outputs."""
    last: dict[str, Source] = {}
    first_input: dict[str, Source] = {}
    for layer in net.layers:
        if layer.bottoms and layer.bottoms[0] in last:
            first_input[layer.name] = last[layer.bottoms[0]]
        for k, top in enumerate(layer.tops):
            last[top] = Source(top, 0, True) if layer.type == "Input" else Source(layer.name, k)
    return first_input, [last[name] for name in compared_blobs(net)]


# Outputs whose shape depends on the values (a detection count): compare their inputs instead.
VALUE_SHAPED_TYPES = frozenset({"DetectionOutput"})


def compared_blobs(net: Net) -> list[str]:
    """The blobs on which original and compressed nets are compared: the net outputs,
    with a value-shaped output (DetectionOutput) replaced by its inputs."""
    producer = {}
    for layer in net.layers:
        for top in layer.tops:
            producer[top] = layer
    blobs: list[str] = []
    for name in net.output_names():
        layer = producer.get(name)
        if layer is not None and layer.type in VALUE_SHAPED_TYPES:
            blobs.extend(b for b in layer.bottoms if b not in blobs)
        elif name not in blobs:
            blobs.append(name)
    return blobs


def _tap_name(net: Net, source: Source) -> str:
    taken = {layer.name for layer in net.layers} | {t for layer in net.layers for t in layer.tops}
    name = f"{source.layer}__top{source.index}"
    while name in taken:
        name += "_"
    return name


def _with_taps(net: Net, sources: Sequence[Source], *, every: bool = False) -> tuple[Net, dict[Source, str]]:
    """The net with an identity (Power) layer after every k > 0 top that is asked for.

    OpenCV 4.x cannot return the k-th top of a multi-top layer by name ("layer.k" is not resolved),
    so such a blob is copied by a layer of its own, right after its producer (before any in-place
    layer changes it). Other sources map to their producer's name.
    """
    names: dict[Source, str] = {}
    taps: dict[str, list[Layer]] = {}
    for s in dict.fromkeys(sources):
        if s.is_input or (s.index == 0 and not every):
            names[s] = s.layer
            continue
        producer = net.layer(s.layer)
        tap = _tap_name(net, s)
        taps.setdefault(s.layer, []).append(Layer(tap, "Power", (producer.tops[s.index],), (tap,)))
        names[s] = tap
    if not taps:
        return net, names
    layers: list[Layer] = []
    for layer in net.layers:
        layers.append(layer)
        layers.extend(taps.get(layer.name, ()))
    return replace(net, layers=tuple(layers)), names


class _OpenCV:
    """Runs Nets in OpenCV through scratch files (ASCII paths we own); one network alive at a time."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch

    def load(self, net: Net, *, what: str, error=ValidationError):
        proto, weights = self.scratch / "m.prototxt", self.scratch / "m.caffemodel"
        io.write_files(net, proto, weights)
        try:
            return validate.load_opencv_net(proto, weights, what=what, error=error)
        finally:
            weights.unlink(missing_ok=True)

    def run(self, net: Net, inputs: Mapping[str, np.ndarray], sources: Sequence[Hashable], *,
            what: str = "model", error=ValidationError, files: tuple[Path, Path] | None = None) -> dict:
        """{source: array} of ``sources`` for ``inputs``; ``files``: run these (the staged pair) instead."""
        try:
            return self._run(net, inputs, sources, what=what, error=error, files=files, every=False)
        except error:
            # OpenCV cannot return some layer outputs by name (a convolution whose output it writes
            # straight into a Concat's buffer): copy every asked-for blob with a layer of its own.
            return self._run(net, inputs, sources, what=what, error=error, files=None, every=True)

    def _run(self, net, inputs, sources, *, what, error, files, every) -> dict:
        tapped, names = _with_taps(net, list(sources), every=every)
        if files is not None and tapped is net:
            cv_net = validate.load_opencv_net(files[0], files[1], what=what, error=error)
        else:
            cv_net = self.load(tapped, what=what, error=error)
        wanted = list(dict.fromkeys(names[s] for s in sources if not s.is_input))
        values: dict = {}
        count = next(iter(inputs.values())).shape[0] if inputs else 0
        for start in range(0, count, RUN_CHUNK) if wanted else ():
            # in chunks: OpenCV keeps every intermediate blob of a batch alive (peak memory)
            part = validate.forward(cv_net, {k: v[start:start + RUN_CHUNK] for k, v in inputs.items()}, wanted,
                                    what=what, error=error)
            for k, v in part.items():
                values.setdefault(k, []).append(v)
        values = {k: np.concatenate(v, axis=0) for k, v in values.items()}
        del cv_net
        return {s: (np.asarray(inputs[s.layer], dtype=np.float32) if s.is_input else values[names[s]]) for s in sources}


# ------------------------------------------------------------------ options and inputs


def _check_layer_options(net: Net, ranks: Mapping[str, int], keep: Sequence[str]) -> None:
    names = {layer.name for layer in net.layers}
    for name in keep:
        if name not in names:
            raise UsageError(f"--keep: no layer named '{name}' in the model")
    for name, rank in ranks.items():
        if name not in names:
            raise UsageError(f"--rank: no layer named '{name}' in the model")
        if name in keep:
            raise UsageError(f"--rank {name}={rank}: the layer is also given to --keep")
        layer = net.layer(name)
        method, reason = planner.describe_layer(layer, keep=False)
        if method == planner.METHOD_KEEP:
            raise UsageError(f"--rank {name}={rank}: a {layer.type} layer cannot be decomposed"
                             + (f" ({reason})" if reason else ""))
        limit = planner.max_rank(layer, method)
        groups = conv_geometry(layer).group if layer.type == "Convolution" else 1
        if not 1 <= rank <= limit:
            raise RankError(f"--rank {name}={rank}: out of range 1..{limit} for weight shape "
                            f"{'x'.join(map(str, layer.blobs[0].shape))}")
        if rank % groups:
            raise RankError(f"--rank {name}={rank}: must be a multiple of the layer's group count {groups}")


def _probe_shapes(net: Net, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
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


def _checked_shapes(net: Net) -> dict[str, tuple[int, ...]]:
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
class _Inputs:
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


def _natural_inputs(net: Net, shapes, count: int, seed: int, pre: validate.Preprocessing) -> tuple[dict, str]:
    inputs, used = {}, []
    for i, (name, shape) in enumerate(shapes.items()):
        elements = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        n = max(1, min(count, MAX_PROBE_ELEMENTS // max(elements, 1)))
        given = _given_convention(pre)
        inferred = probe.InferredConvention(given, "--mean/--scale") if given else \
            probe.infer_convention(net, name, shape, seed=seed)
        inputs[name] = probe.natural_probes(shape, n, inferred.convention, seed=seed + 17 * i)
        used.append(f"{name}: {inferred.convention.name} {inferred.convention.description} ({inferred.evidence})")
    return inputs, "; ".join(used)


def _make_inputs(net: Net, *, wants_plan: bool, validate_output: bool, images, calibration,
                 pre: validate.Preprocessing, probes: int, seed: int) -> _Inputs:
    """Planning inputs (calibration images or natural probes) and separate validation inputs."""
    shapes = _checked_shapes(net) if (wants_plan or validate_output) else {}
    probe_shapes = _probe_shapes(net, shapes)
    validation: dict[str, np.ndarray] = {}
    label, convention = "none", ""
    if validate_output:  # read --images first: a bad option fails before any real work
        if images is not None:
            validation, label = _image_inputs(shapes, Path(images), pre, "--images")
        else:
            elements = max(int(np.prod(s[1:])) for s in probe_shapes.values())
            most = VALIDATION_PROBES_DENSE if probe_shapes != shapes else VALIDATION_PROBES
            count = max(probes, min(most, VALIDATION_ELEMENTS // max(elements, 1)))
            validation, convention = _natural_inputs(net, probe_shapes, count, seed + 1000, pre)
            label = f"natural-image probes ({next(iter(validation.values())).shape[0]})"
    planning = None
    if wants_plan and calibration is not None:
        files = validate.list_images(Path(calibration), option="--calibration")
        if validate_output and images is None and len(files) >= 2 * MIN_HELD_OUT:
            # validate on the calibration images that planning does not see
            planning, _ = _image_inputs(shapes, Path(calibration), pre, "--calibration", files=files[0::2],
                                        crop=probe_shapes)
            validation, label = _image_inputs(shapes, Path(calibration), pre, "--calibration", files=files[1::2],
                                              crop=probe_shapes)
            label = f"held-out {label}"
            convention = ""
        else:
            planning, _ = _image_inputs(shapes, Path(calibration), pre, "--calibration", files=files,
                                        crop=probe_shapes)
    elif wants_plan:
        planning, convention = _natural_inputs(net, probe_shapes, probes, seed, pre)
    return _Inputs(planning, validation, label, convention)


# ------------------------------------------------------------------ the rewrite for one plan


@dataclass
class _Factorizer:
    """Builds the compressed Net for a plan; factors of a (layer, rank) are computed once per run."""

    net: Net
    ws: planner.Workspace
    forced: Mapping[str, int]
    seed: int
    timings: dict
    say: ProgressFn
    cache: dict = field(default_factory=dict)

    def build(self, plan: planner.Plan) -> tuple[Net, planner.Plan]:
        replacements: dict[str, tuple[Layer, ...]] = {}
        errors: dict[str, float] = {}
        for lp in plan.layers:
            if lp.method == planner.METHOD_KEEP or not lp.rank:
                continue
            key = (lp.layer, lp.rank)
            if key not in self.cache:
                self.cache[key] = self._factor(lp)
            replacements[lp.layer], err = self.cache[key]
            if err is not None:
                errors[lp.layer] = err
        new_net = rewrite.replace_layers(self.net, replacements)
        plan = replace(plan, layers=tuple(
            replace(lp, weight_error=errors[lp.layer]) if lp.layer in errors else lp for lp in plan.layers))
        return new_net, plan

    def _factor(self, lp: planner.LayerPlan) -> tuple[tuple[Layer, ...], float | None]:
        layer = self.net.layer(lp.layer)
        if lp.method == planner.METHOD_SVD:
            return rewrite.decompose_inner_product(self.net, layer, self.ws.linear_factors(lp.layer, lp.rank)[0]), None
        if lp.method == planner.METHOD_POINTWISE:
            return rewrite.decompose_pointwise(self.net, layer, self.ws.linear_factors(lp.layer, lp.rank)), None
        # Polish the chosen rank's CP (the sweep ran few iterations per rank); a rank the user
        # forced gets a full run, so exact low-rank kernels come out exact.
        self.say(f"decomposing {lp.layer}")
        forced = lp.layer in self.forced
        start = time.perf_counter()
        kernels = rewrite.conv_group_kernels(layer)
        factors = [
            cp_conv(k, lp.rank // len(kernels), seed=self.seed, init=f,
                    n_iter_max=FORCED_CP_ITERATIONS if forced else POLISH_CP_ITERATIONS,
                    tol=1e-10 if forced else 1e-6)
            for k, f in zip(kernels, self.ws.cp[lp.layer][lp.rank])
        ]
        self.timings[f"decompose/{lp.layer}"] = self.timings.get(f"decompose/{lp.layer}", 0.0) + \
            time.perf_counter() - start
        w = layer.blobs[0].astype(np.float64)
        residual = sum(float(np.sum((k - cp_reconstruct(f)).astype(np.float64) ** 2))
                       for k, f in zip(kernels, factors))
        return rewrite.decompose_convolution(self.net, layer, factors), \
            float(np.sqrt(residual / max(float(np.sum(w * w)), 1e-300)))


# ------------------------------------------------------------------ compress


@dataclass
class _SpeedGuard:
    """Measured speed: a factorization that runs slower than its layer is dropped (objective balanced/speed).

    Layers are timed alone in OpenCV, one thread, at their real input shape (spatial size capped at
    TIMING_SIDE: the ratio is what matters), original against replacement; results are cached.
    """

    objective: str
    cv: "_OpenCV"
    net: Net
    first_input: Mapping[str, "Source"]
    shapes: Mapping[str, tuple[int, ...]]  # declared input shapes
    say: ProgressFn
    timings: dict
    layer_shapes: dict = field(default_factory=dict)
    speedups: dict = field(default_factory=dict)  # (layer, rank) -> original / factored time

    @property
    def required(self) -> float:
        return {"size": 0.0, "balanced": LATENCY_TOLERANCE, "speed": SPEED_MARGIN}[self.objective]

    def slow_layers(self, new_net: Net, chosen: Mapping[str, int], forced: Mapping[str, int]) -> dict[str, str]:
        """{layer: reason} for chosen factorizations that are not fast enough (forced ranks are kept)."""
        if self.objective == "size":
            return {}
        slow = {}
        for name, rank in chosen.items():
            if name in forced:
                continue
            speedup = self.speedup(new_net, name, rank)
            if speedup < self.required:
                slow[name] = f"factored form measured {1 / speedup:.2f}x slower in OpenCV" if speedup < 1 else \
                    f"factored form only {speedup:.2f}x faster (--objective speed)"
        return slow

    def speedup(self, new_net: Net, name: str, rank: int) -> float:
        key = (name, rank)
        if key not in self.speedups:
            start = time.perf_counter()
            shape = self._input_shape(name)
            layer = self.net.layer(name)
            bottom = layer.bottoms[0]
            self.say(f"timing {name}")
            latency = timing.compare(
                lambda model: self.cv.load(model, what=f"timing of {name}"),
                timing.layer_net((layer,), bottom, shape),
                timing.layer_net(timing.replacement_layers(new_net, name), bottom, shape),
                {bottom: np.random.default_rng(0).standard_normal(shape).astype(np.float32)},
                budget_s=timing.LAYER_BUDGET_S)
            self.speedups[key] = latency.speedup
            self.timings["timing"] = self.timings.get("timing", 0.0) + time.perf_counter() - start
        return self.speedups[key]

    def _input_shape(self, name: str) -> tuple[int, ...]:
        if not self.layer_shapes:
            self.layer_shapes = self._layer_input_shapes()
        shape = self.layer_shapes[name]
        if len(shape) == 4:
            shape = shape[:2] + tuple(min(int(d), TIMING_SIDE) for d in shape[2:])
        return shape

    def _layer_input_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every layer's first input shape at the declared input size, from OpenCV's shape inference."""
        cv_net = self.cv.load(self.net, what="timing shapes")
        shapes = [tuple([1] + [int(d) for d in s[1:]]) for s in self.shapes.values()]
        try:
            ids, ins, _ = cv_net.getLayersShapes(shapes)
            names = cv_net.getLayerNames()
            found = {names[i - 1]: tuple(int(d) for d in shape[0]) for i, shape in zip(ids, ins) if i > 0 and shape}
        except Exception:  # noqa: BLE001 - an older OpenCV without it: run one sample instead
            found = {}
        del cv_net
        missing = [n for n in self.first_input if n not in found]
        if missing:
            feed = {k: np.zeros((1,) + tuple(v[1:]), np.float32) for k, v in self.shapes.items()}
            sources = list(dict.fromkeys(self.first_input[n] for n in missing if not self.first_input[n].is_input))
            values = self.cv.run(self.net, feed, sources, what="timing shapes") if sources else {}
            for n in missing:
                s = self.first_input[n]
                found[n] = tuple((feed[s.layer] if s.is_input else values[s]).shape)
        return found


@dataclass
class _LoopState:
    """The closed loop's rounds: the best passing plan so far stays staged, the others are discarded."""

    best: tuple | None = None  # (staged, new_net, plan, verdict)
    tried: dict = field(default_factory=dict)  # chosen ranks -> passed
    slow: dict = field(default_factory=dict)  # (layer, rank) -> why its factored form is not used
    misses: list = field(default_factory=list)
    rounds: int = 0
    empty_plan: planner.Plan | None = None
    best_budget: float = 0.0
    latency: timing.Latency | None = None

    def keep(self, staged, new_net, plan, verdict) -> None:
        # bisection only ever finds larger passing budgets after a pass... or smaller ones after a miss;
        # the latest pass has the smaller index, i.e. the larger budget
        self.discard()
        self.best = (staged, new_net, plan, verdict)

    def discard(self) -> None:
        if self.best is not None:
            self.best[0].discard()
            self.best = None


@dataclass(frozen=True)
class _Verdict:
    checks: tuple[contract.Check, ...]
    agreements: tuple[validate.OutputAgreement, ...]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def first_miss(self) -> str:
        for c in self.checks:
            if not c.passed:
                op = "<" if c.higher_is_better else ">"
                return f"output '{c.output}' ({c.kind}): {c.metric} {c.value:.4g} {op} target {c.target:.4g}"
        return ""


def compress(
    deploy: str | os.PathLike,
    weights: str | os.PathLike,
    *,
    tradeoff: float = DEFAULT_TRADEOFF,
    output: str | os.PathLike | None = None,
    ranks: Mapping[str, int] | None = None,
    keep: Sequence[str] = (),
    validate_output: bool = True,
    images: str | os.PathLike | None = None,
    calibration: str | os.PathLike | None = None,
    preprocessing: validate.Preprocessing | None = None,
    probes: int = DEFAULT_PROBES,
    seed: int = 0,
    fp16: bool | None = None,
    outputs: Mapping[str, str] | None = None,
    min_fidelity: float | None = None,
    force: bool = False,
    objective: str = "balanced",
    progress: ProgressFn | None = None,
) -> Report:
    """Compress a Caffe model; write ``PREFIX.prototxt``/``PREFIX.caffemodel``; return a Report.

    tradeoff : float in [0, 1] -- 0 lossless, 1 smallest (default 0.95; see README).
    output : prefix of the written pair (default ``<weights-stem>-compressed`` in the cwd).
    ranks : {layer: rank} forced ranks; keep : layers never touched.
    validate_output : measure the written model against the fidelity contract before publishing.
    images : directory of images for validation (default: natural-image probes in the inferred convention).
    calibration : directory of images whose activations drive the rank choice.
    preprocessing : how image files become inputs (mean, scale, size, resize, swap_rb).
    probes : number of planning probe inputs; seed : for probes and CP.
    fp16 : store weights as half floats (half the file); None keeps the input's storage.
    outputs : {output blob: kind} overriding the inferred output kinds (plan/contract.py KINDS).
    min_fidelity : hold the contract of this (lower) T instead of the one T implies.
    force : write the model even when nothing was compressed at T > 0.
    objective : "balanced" (default: no factored layer and no written model slower than the original in
        OpenCV on this machine), "speed" (a factored layer must be 1.1x faster) or "size" (no speed checks).
    progress : callable receiving one-line progress messages.
    """
    with tempfile.TemporaryDirectory(prefix="caffe-compress-") as scratch:
        run = _Run(deploy, weights, tradeoff=planner.check_tradeoff(tradeoff), output=output,
                   ranks=dict(ranks or {}), keep=tuple(keep), validate_output=validate_output,
                   preprocessing=preprocessing or validate.Preprocessing(), probes=probes, seed=seed, fp16=fp16,
                   outputs=dict(outputs or {}), min_fidelity=min_fidelity, force=force, objective=objective,
                   say=progress or (lambda message: None), cv=_OpenCV(Path(scratch)))
        return run.execute(images=images, calibration=calibration)


def _output_prefix(output, weights) -> Path:
    if output is None:
        return default_prefix(weights)
    prefix = Path(output)
    if prefix.is_dir():  # -o DIR: write DIR/<weights-stem>-compressed.*
        return prefix / default_prefix(weights).name
    if str(output).endswith(("/", os.sep)):
        raise WriteError(f"-o {output}: directory does not exist")
    return prefix


@dataclass
class _Run:
    deploy: str | os.PathLike
    weights: str | os.PathLike
    tradeoff: float
    output: str | os.PathLike | None
    ranks: dict[str, int]
    keep: tuple[str, ...]
    validate_output: bool
    preprocessing: validate.Preprocessing
    probes: int
    seed: int
    fp16: bool | None
    outputs: dict[str, str]
    min_fidelity: float | None
    force: bool
    objective: str
    say: ProgressFn
    cv: _OpenCV
    timer: _Timer = field(default_factory=_Timer)
    _original_ms: float | None = None

    def execute(self, *, images, calibration) -> Report:
        start = time.perf_counter()
        if not 1 <= self.probes <= MAX_PROBES:
            raise UsageError(f"--probes: {self.probes} must be between 1 and {MAX_PROBES}")
        if self.min_fidelity is not None:
            planner.check_tradeoff(self.min_fidelity, option="--min-fidelity")
        if self.objective not in OBJECTIVES:
            raise UsageError(f"--objective: '{self.objective}' is not one of {', '.join(OBJECTIVES)}")
        prefix = _output_prefix(self.output, self.weights)
        io.check_outputs(prefix, protect=(Path(self.deploy), Path(self.weights)))
        net = self.load()
        wants_plan = self.tradeoff > 0 or bool(self.ranks)
        inputs = _make_inputs(net, wants_plan=wants_plan, validate_output=self.validate_output, images=images,
                              calibration=calibration, pre=self.preprocessing, probes=self.probes, seed=self.seed)
        specs, reference = self.reference(net, inputs)
        candidates, skipped, ws = self.plan(net, inputs, wants_plan)
        report = self.closed_loop(net, prefix, candidates, skipped, ws, specs, reference, inputs)
        self.timer.timings["total"] = time.perf_counter() - start
        self.timer.timings["_peak_rss_mb"] = peak_rss_mb()
        return replace(report, timings=self.timer.timings)

    # -- files -> load -> net
    def load(self) -> Net:
        self.say("loading model")
        with self.timer.stage("load"):
            net = io.load(self.deploy, self.weights)
        _check_layer_options(net, self.ranks, self.keep)
        return net

    # -- the original's outputs on the validation inputs, and their kinds
    def reference(self, net: Net, inputs: _Inputs):
        if not self.validate_output:
            return [], {}
        blobs = compared_blobs(net)
        if not blobs:
            raise ValidationError(f"{self.deploy}: the model has no output to compare (every blob is consumed)")
        with self.timer.stage("validate"):
            _, sources = _sources(net)
            values = self.cv.run(net, inputs.validation, sources, what=str(self.deploy), error=ModelError)
        reference = {name: values[s] for name, s in zip(blobs, sources)}
        for name, value in reference.items():
            if not np.all(np.isfinite(value)):
                raise ModelError(f"{self.deploy}: the original model outputs NaN/Inf in '{name}' on the "
                                 f"validation inputs ({inputs.validation_label})")
        specs = contract.infer_outputs(net, blobs, overrides=self.outputs,
                                       shapes={k: tuple(v.shape) for k, v in reference.items()})
        return specs, reference

    # -- probe -> analyse -> sensitivity
    def plan(self, net: Net, inputs: _Inputs, wants_plan: bool):
        ws = planner.Workspace()
        first_input, out_sources = _sources(net)
        decomposable, skipped = [], {}
        for layer in net.layers:
            method, reason = planner.describe_layer(layer, keep=layer.name in self.keep)
            if method == planner.METHOD_KEEP:
                if reason:
                    skipped[layer.name] = reason
                continue
            if layer.name not in first_input:
                skipped[layer.name] = "its input blob is not produced by a layer"
                continue
            if not wants_plan:
                skipped[layer.name] = "nothing is factored at T = 0"
            decomposable.append((layer, method))
        if not wants_plan or not decomposable:
            return [], skipped, ws

        def run(model: Net, feed, sources):
            return self.cv.run(model, feed, sources, what=f"{self.deploy} (probing)", error=ModelError)

        with self.timer.stage("probe"):
            self.say("probing the original model in OpenCV")
            sources = {layer.name: first_input[layer.name] for layer, _ in decomposable}
            layer_inputs, reference = search.collect_inputs(run, net, inputs.planning, sources, out_sources,
                                                            seed=self.seed)
        with self.timer.stage("analyse"):
            candidates, more = search.analyse_layers(decomposable, layer_inputs, ranks=self.ranks, ws=ws,
                                                     seed=self.seed, timings=self.timer.timings, say=self.say)
            skipped.update(more)
        with self.timer.stage("sensitivity"):
            skip = set(self.ranks) if self.tradeoff not in (0.0, 1.0) else {c.layer for c in candidates}
            candidates = search.measure_gains(
                lambda model, feed, srcs: self.cv.run(model, feed, srcs, what="sensitivity trial"),
                net, candidates, inputs=inputs.planning, reference=reference, layer_inputs=layer_inputs,
                compared_blobs=compared_blobs(net), skip=skip, ws=ws, say=self.say)
        return candidates, skipped, ws

    # -- choose -> decompose -> rewrite -> write -> verify, backing off on a miss
    def closed_loop(self, net, prefix, candidates, skipped, ws, specs, reference, inputs) -> Report:
        """The largest budget on the ladder whose plan meets the contract: budget(T) first, then bisection.

        Meeting the contract is (nearly) monotone in the budget, so bisection over the fixed ladder finds
        the same rung whatever T the walk started from: a larger T never gives a larger file.
        """
        factorizer = _Factorizer(net, ws, self.ranks, self.seed, self.timer.timings, self.say)
        guard = _SpeedGuard(self.objective, self.cv, net, _sources(net)[0], net.input_shapes(), self.say,
                            self.timer.timings)
        store_fp16 = net.stored_fp16 if self.fp16 is None else bool(self.fp16)
        ladder = search.budget_ladder(self.tradeoff) if candidates else [0.0]
        state = _LoopState()

        def attempt(budget: float) -> bool | None:
            """True: the plan passed (and is kept staged); False: missed; None: nothing to factor."""
            with self.timer.stage("plan"):
                chosen, predicted = planner.choose_ranks(candidates, self.tradeoff, forced=self.ranks, budget=budget)
            reasons = dict(skipped)
            for name in [n for n in chosen if (n, chosen[n]) in state.slow]:
                reasons[name] = state.slow[(name, chosen.pop(name))]
            while True:
                plan = replace(planner.build_plan(net, candidates, chosen, reasons, self.tradeoff, predicted),
                               error_budget=budget)
                if not chosen and self.tradeoff > 0 and not self.force:
                    state.empty_plan = plan
                    return None
                key = tuple(sorted(chosen.items()))
                if key in state.tried:
                    return state.tried[key]
                with self.timer.stage("decompose"):
                    self.say("rewriting the network")
                    new_net, plan = factorizer.build(plan)
                    new_net.check()
                with self.timer.stage("timing"):
                    slow = guard.slow_layers(new_net, chosen, self.ranks)
                if not slow:
                    break
                for name, why in slow.items():
                    state.slow[(name, chosen.pop(name))] = why
                    reasons[name] = why
            verdict, staged = self.write_and_verify(net, new_net, prefix, store_fp16, specs, reference, inputs)
            state.rounds += 1
            # --rank alone (T = 0) is the user's own choice of loss: measured and reported, not enforced.
            passed = verdict.passed or bool(self.ranks and self.tradeoff == 0)
            state.tried[key] = passed
            if passed:
                state.keep(staged, new_net, plan, verdict)
                state.best_budget = budget
                return True
            staged.discard()
            if not chosen:
                raise ValidationError(f"{self.deploy}: the model's outputs are not reproducible in OpenCV (an "
                                      f"unchanged copy misses the contract: {verdict.first_miss()})")
            state.misses.append(verdict.first_miss())
            log.info("round %d (budget %.4g) misses the contract: %s", state.rounds, budget, state.misses[-1])
            if self.ranks:
                raise ValidationError(f"the forced ranks break the fidelity contract at T = {self.tradeoff:g}: "
                                      f"{state.misses[-1]}; raise the ranks or the trade-off")
            self.say(f"backing off: {state.misses[-1]}")
            return False

        def not_slower() -> None:
            """Drop the slowest factorizations until the whole model is not slower (bounded)."""
            for _ in range(MAX_SPEED_ROUNDS):
                staged, new_net, plan, verdict = state.best
                with self.timer.stage("timing"):
                    state.latency = self.latency(net, new_net, inputs)
                if self.objective == "size" or state.latency.speedup >= LATENCY_TOLERANCE:
                    return
                chosen = {lp.layer: lp.rank for lp in plan.layers if lp.rank and lp.layer not in self.ranks}
                if not chosen:
                    return
                worst = min(chosen, key=lambda n: guard.speedup(new_net, n, chosen[n]))
                state.slow[(worst, chosen[worst])] = (f"dropped: the model with it measured "
                                                      f"{1 / state.latency.speedup:.2f}x slower in OpenCV")
                budget = state.best_budget
                state.discard()
                if attempt(budget) is not True:
                    return

        try:
            if attempt(ladder[0]) is False:
                lo, hi = 1, len(ladder) - 1
                while lo <= hi and state.rounds < search.MAX_ROUNDS:
                    mid = (lo + hi) // 2
                    if attempt(ladder[mid]) is False:
                        lo = mid + 1
                    else:
                        hi = mid - 1
            if state.best is not None:
                not_slower()
            if state.best is None and self.force:
                attempt(0.0)  # --force: an unchanged copy when every plan misses
        except BaseException:
            state.discard()
            raise
        if state.best is None:
            return self._nothing(net, state.empty_plan, specs, state.misses, inputs, state.rounds)
        staged, new_net, plan, verdict = state.best
        staged.commit()
        report = self._report(net, new_net, plan, verdict, staged, inputs, store_fp16, state.misses, state.rounds)
        if state.latency is not None and new_net is not net:
            report = replace(report, latency_ms={
                "original_1t": state.latency.original_ms, "compressed_1t": state.latency.compressed_ms})
        return report

    def latency(self, net: Net, new_net: Net, inputs: _Inputs) -> timing.Latency:
        """1-thread latency of the original and the rewritten net on one input of the declared shape."""
        self.say("timing the written model against the original")
        feed = {}
        for i, (name, shape) in enumerate(net.input_shapes().items()):
            sample = inputs.validation.get(name)
            if sample is not None:  # (a fully convolutional net's probes may be smaller than declared)
                feed[name] = sample[:1]
            else:
                feed[name] = np.random.default_rng(i).standard_normal((1,) + tuple(shape[1:])).astype(np.float32)
        # one network at a time (peak memory); the original's time is measured once per run
        load = lambda model: self.cv.load(model, what="timing")  # noqa: E731
        if self._original_ms is None:
            self._original_ms = timing.median_ms(load, net, feed)
        return timing.Latency(self._original_ms, timing.median_ms(load, new_net, feed))

    def write_and_verify(self, net, new_net, prefix, store_fp16, specs, reference, inputs):
        self.say("writing the model")
        with self.timer.stage("write"):
            staged = io.stage(new_net, prefix, protect=(Path(self.deploy), Path(self.weights)), fp16=store_fp16)
        try:
            if not self.validate_output:
                return _Verdict((), ()), staged
            self.say("validating with OpenCV")
            with self.timer.stage("validate"):
                _, sources = _sources(new_net)
                what = f"compressed model {staged.prototxt}"
                values = self.cv.run(new_net, inputs.validation, sources, what=what,
                                     files=(staged.temp_prototxt, staged.temp_caffemodel))
                compressed = {name: values[s] for name, s in zip(compared_blobs(net), sources)}
                agreements = tuple(validate.compare_outputs(reference, compressed))
                judged_at = DEFAULT_TRADEOFF if (self.ranks and self.tradeoff == 0) else self.tradeoff
                margin = contract.SYNTHETIC_MARGIN if inputs.synthetic else 1.0
                checks = tuple(contract.check_all(specs, reference, compressed, judged_at,
                                                  min_fidelity=self.min_fidelity, margin=margin))
            if not checks:
                raise ValidationError(f"{self.deploy}: validation compared no output")
            return _Verdict(checks, agreements), staged
        except BaseException:
            staged.discard()
            raise

    def _nothing(self, net, plan, specs, misses, inputs, rounds) -> Report:
        if plan is None:
            plan = planner.build_plan(net, [], {}, {}, self.tradeoff, 0.0)
        note = NOTHING_TO_COMPRESS
        if misses:
            note += f" (the smallest plan tried missed it: {misses[-1]})"
        return self._report(net, net, plan, _Verdict((), ()), None, inputs, net.stored_fp16, misses, rounds,
                            note=note)

    def _report(self, net, new_net, plan, verdict, staged, inputs, store_fp16, misses, rounds,
                note: str = "") -> Report:
        weights_path = Path(self.weights)
        return Report(
            deploy=str(self.deploy),
            weights=str(self.weights),
            output_prototxt=str(staged.prototxt) if staged else "",
            output_caffemodel=str(staged.caffemodel) if staged else "",
            tradeoff=self.tradeoff,
            error_budget=plan.error_budget,
            predicted_error=plan.predicted_error,
            layers=plan.layers,
            params_before=net.param_count,
            params_after=new_net.param_count,
            bytes_before=weights_path.stat().st_size,
            bytes_after=staged.caffemodel.stat().st_size if staged else weights_path.stat().st_size,
            macs_before=sum(lp.macs_before for lp in plan.layers),
            macs_after=sum(lp.macs_after for lp in plan.layers),
            validation=verdict.agreements,
            validation_inputs=inputs.validation_label,
            layers_before=len(net.layers),
            layers_after=len(new_net.layers),
            storage="float16" if store_fp16 else "float32",
            contract=verdict.checks,
            convention=inputs.convention,
            rounds=rounds,
            note=note,
        )
