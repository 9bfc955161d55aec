"""compress(): files -> load -> net -> plan -> decompose -> rewrite -> check -> save -> validate -> report."""
from __future__ import annotations

import logging
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from . import io, plan as planner, rewrite, tail, validate
from .errors import ModelError, RankError, UsageError, ValidationError
from .decompose import cp_conv, cp_reconstruct
from .net import Layer, Net, conv_geometry
from .report import Report

log = logging.getLogger(__name__)

DEFAULT_TRADEOFF = 0.95
DEFAULT_PROBES = 8
CP_ITERATIONS = 20  # ALS sweeps at the top of a layer's rank grid (fewer further down)
POLISH_CP_ITERATIONS = 30  # extra sweeps for the rank the planner picks
FORCED_CP_ITERATIONS = 1000  # a rank given with --rank: run to convergence
MAX_PROBE_ELEMENTS = 1 << 24  # 64 MB of float32 per probe input (3 x 2048 x 2048 fits)
MAX_PROBES = 256
NEGLIGIBLE_COST_SHARE = 0.005  # a layer below 0.5% of params+MACs gets no sensitivity trial

ProgressFn = Callable[[str], None]
INPUT_PREFIX = "\x00input:"


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


@dataclass(frozen=True)
class _OpenCVNames:
    """How OpenCV names the blobs the pipeline reads: 'layer' or 'layer.k' (k-th top)."""

    first_input: dict[str, str]  # layer name -> OpenCV name of the blob its first bottom reads
    compared: list[str]  # OpenCV names of the compared outputs, in _compared_blobs order


def _opencv_names(net: Net) -> _OpenCVNames:
    last_producer: dict[str, str] = {}
    first_input: dict[str, str] = {}
    for layer in net.layers:
        if layer.bottoms and layer.bottoms[0] in last_producer:
            first_input[layer.name] = last_producer[layer.bottoms[0]]
        for k, top in enumerate(layer.tops):
            if layer.type == "Input":
                last_producer[top] = f"{INPUT_PREFIX}{top}"  # fed by us, not an OpenCV layer output
            else:
                last_producer[top] = layer.name if k == 0 else f"{layer.name}.{k}"
    return _OpenCVNames(first_input, [last_producer[name] for name in _compared_blobs(net)])


# Outputs whose shape depends on the values (a detection count): compare their inputs instead.
VALUE_SHAPED_TYPES = frozenset({"DetectionOutput"})


def _compared_blobs(net: Net) -> list[str]:
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


def _check_layer_options(net: Net, ranks: Mapping[str, int], keep: Iterable[str]) -> None:
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


def _probe_inputs(net: Net, *, images: Path | None, preprocessing: validate.Preprocessing,
                  count: int, seed: int, option: str) -> tuple[dict[str, np.ndarray], str]:
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
        count = max(1, min(count, MAX_PROBE_ELEMENTS // max(elements, 1)))
    inputs = {}
    if images is not None:
        if len(shapes) != 1:
            raise UsageError(f"{option}: the model has {len(shapes)} inputs; images can feed only a single-input model")
        (name, shape), = shapes.items()
        files = validate.list_images(images, option=option)
        inputs[name] = validate.image_batch(files[:64], shape, preprocessing, option=option)
        return inputs, f"images:{images} ({min(len(files), 64)})"
    for i, (name, shape) in enumerate(shapes.items()):
        inputs[name] = validate.random_probes(shape, count, seed=seed + i)
    return inputs, f"random ({count})"


def _relative_output_error(original: Mapping[str, np.ndarray], other: Mapping[str, np.ndarray]) -> float:
    """RMS over samples and outputs of ||y' - y|| / ||y||."""
    errs = []
    for name, y in original.items():
        z = other[name]
        n = y.shape[0] if y.ndim > 1 else 1
        a, b = y.reshape(n, -1).astype(np.float64), z.reshape(n, -1).astype(np.float64)
        ref = np.linalg.norm(a, axis=1)
        errs.extend(np.linalg.norm(a - b, axis=1) / np.maximum(ref, 1e-30))
    return float(np.sqrt(np.mean(np.square(errs)))) if errs else 0.0


def _with_weight(net: Net, name: str, weight: np.ndarray) -> Net:
    layers = tuple(
        replace(layer, blobs=(weight,) + layer.blobs[1:]) if layer.name == name else layer for layer in net.layers
    )
    return replace(net, layers=layers)


def _conv_out_shape(layer: Layer, in_shape: tuple[int, ...]) -> tuple[int, ...]:
    geo = conv_geometry(layer)
    b, _, h, w = in_shape
    oh = (h + 2 * geo.pad[0] - (geo.dilation[0] * (geo.kernel[0] - 1) + 1)) // geo.stride[0] + 1
    ow = (w + 2 * geo.pad[1] - (geo.dilation[1] * (geo.kernel[1] - 1) + 1)) // geo.stride[1] + 1
    return (b, geo.num_output, oh, ow)


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
    progress: ProgressFn | None = None,
) -> Report:
    """Compress a Caffe model; write ``PREFIX.prototxt``/``PREFIX.caffemodel``; return a Report.

    tradeoff : float in [0, 1] -- 0 lossless, 1 smallest (default 0.95; see README).
    output : prefix of the written pair (default ``<weights-stem>-compressed`` in the cwd).
    ranks : {layer: rank} forced ranks; keep : layers never touched.
    validate_output : compare original and written model in OpenCV before publishing.
    images : directory of images for validation (default: random probes).
    calibration : directory of images whose activations drive the rank choice.
    preprocessing : how image files become inputs (mean, scale, size, resize, swap_rb).
    probes : number of random probe inputs; seed : for probes and CP.
    fp16 : store weights as half floats (half the file); None keeps the input's storage.
    progress : callable receiving one-line progress messages.
    """
    with tempfile.TemporaryDirectory(prefix="caffe-compress-") as scratch:
        return _compress(
            deploy, weights, tradeoff=tradeoff, output=output, ranks=ranks, keep=keep,
            validate_output=validate_output, images=images, calibration=calibration,
            preprocessing=preprocessing, probes=probes, seed=seed, fp16=fp16, progress=progress,
            scratch_dir=Path(scratch),
        )


def _compress(
    deploy, weights, *, tradeoff, output, ranks, keep, validate_output, images, calibration, preprocessing,
    probes, seed, fp16, progress, scratch_dir: Path,
) -> Report:
    say = progress or (lambda message: None)
    preprocessing = preprocessing or validate.Preprocessing()
    tradeoff = planner.check_tradeoff(tradeoff)
    ranks = dict(ranks or {})
    keep = tuple(keep)
    if not 1 <= probes <= MAX_PROBES:
        raise UsageError(f"--probes: {probes} must be between 1 and {MAX_PROBES}")
    timer = _Timer()
    total_start = time.perf_counter()
    prefix = Path(output) if output is not None else default_prefix(weights)
    if prefix.is_dir():  # -o DIR: write DIR/<weights-stem>-compressed.*
        prefix = prefix / default_prefix(weights).name

    say("loading model")
    with timer.stage("load"):
        net = io.load(deploy, weights)
    _check_layer_options(net, ranks, keep)
    val_inputs: dict[str, np.ndarray] = {}
    validation_label = "none"
    if validate_output:  # read --images now: a bad option fails before any real work
        val_inputs, validation_label = _probe_inputs(
            net, images=Path(images) if images is not None else None, preprocessing=preprocessing,
            count=probes, seed=seed + 1000, option="--images")

    candidates: list[planner.Candidate] = []
    skipped: dict[str, str] = {}
    chosen: dict[str, int] = {}
    predicted = 0.0
    ws = planner.Workspace()
    probe_inputs: dict[str, np.ndarray] | None = None
    wants_plan = tradeoff > 0 or bool(ranks)

    def opencv_net_of(model: Net, what: str, error=ModelError):
        # OpenCV reads a streamed scratch file: no in-memory copy of the caffemodel.
        proto, weights_file = scratch_dir / "m.prototxt", scratch_dir / "m.caffemodel"
        io.write_files(model, proto, weights_file)
        try:
            return validate.load_opencv_net(proto, weights_file, what=what, error=error)
        finally:
            weights_file.unlink(missing_ok=True)

    def opencv_original():
        # OpenCV reads our lossless V2 rewrite of the input (phase-filtered, upgraded).
        return opencv_net_of(net, str(deploy))

    names = _opencv_names(net)
    decomposable = []
    for layer in net.layers:
        method, reason = planner.describe_layer(layer, keep=layer.name in keep)
        if method == planner.METHOD_KEEP:
            if reason:
                skipped[layer.name] = reason
            continue
        if layer.name not in names.first_input:
            skipped[layer.name] = "its input blob is not produced by a layer"
            continue
        if not wants_plan:
            skipped[layer.name] = "nothing is factored at T = 0"
        decomposable.append((layer, method))

    if wants_plan:
        with timer.stage("probe"):
            say("probing the original model in OpenCV")
            calib = Path(calibration) if calibration is not None else None
            probe_inputs, _ = _probe_inputs(net, images=calib, preprocessing=preprocessing, count=probes,
                                            seed=seed, option="--calibration")
            original_cv = opencv_original()
            wanted = sorted({names.first_input[layer.name] for layer, _ in decomposable} - {
                INPUT_PREFIX + name for name in probe_inputs})
            out_names = names.compared
            acts = validate.forward(original_cv, probe_inputs, wanted + out_names, what=str(deploy), error=ModelError)
            acts.update({INPUT_PREFIX + name: value for name, value in probe_inputs.items()})
            reference = {name: acts[name] for name in out_names}
            del original_cv  # peak memory: validation builds a fresh reference net

        with timer.stage("analyse"):
            for layer, method in decomposable:
                say(f"analysing {layer.name}")
                x = acts[names.first_input[layer.name]]
                start = time.perf_counter()
                if method == planner.METHOD_SVD:
                    cand = planner.analyse_inner_product(
                        layer, x, min_rank_divisor=planner.MIN_RANK_DIVISOR, ws=ws, forced_rank=ranks.get(layer.name))
                else:
                    if x.ndim != 4:
                        skipped[layer.name] = f"input is {x.ndim}-D; only 2-D convolutions are decomposed"
                        continue
                    cand = planner.analyse_convolution(
                        layer, x, _conv_out_shape(layer, x.shape), method,
                        min_rank_divisor=planner.MIN_RANK_DIVISOR, seed=seed, ws=ws,
                        cp_iterations=CP_ITERATIONS, forced_rank=ranks.get(layer.name))
                timer.timings[f"analyse/{layer.name}"] = time.perf_counter() - start
                if not cand.ranks:
                    skipped[layer.name] = "no rank reduces its parameter count (break-even)"
                    continue
                forced = ranks.get(layer.name)
                if forced is not None and cand.params_at[forced] >= cand.params_before:
                    skipped[layer.name] = (f"--rank {forced} would not reduce its parameters "
                                           f"({cand.params_at[forced]} >= {cand.params_before}); left alone")
                    ranks.pop(layer.name)
                    continue
                candidates.append(cand)

        # Layers in a plain classifier head get their sensitivity trial in numpy (tail.py).
        compared = _compared_blobs(net)
        tails = {}
        if len(compared) == 1:
            for cand in candidates:
                chain = tail.tail_chain(net, cand.layer, compared[0])
                if chain is not None:
                    tails[cand.layer] = (chain, acts[names.first_input[cand.layer]])
        del acts  # peak memory: not needed while the trial nets are built
        with timer.stage("sensitivity"):
            # One OpenCV run per layer with only that layer approximated, at a mid-grid rank.
            totals = (sum(c.params_before for c in candidates), sum(c.macs_before for c in candidates))
            for i, cand in enumerate(candidates):
                if cand.layer in ranks or tradeoff in (0.0, 1.0):
                    continue
                if cand.cost(None, totals) < NEGLIGIBLE_COST_SHARE:
                    continue  # too small to matter either way: keep the conservative gain of 1
                say(f"measuring the sensitivity of {cand.layer}")
                probe_rank = cand.ranks[len(cand.ranks) // 2]
                layer_err = cand.output_error[probe_rank]
                if layer_err <= 1e-9:
                    continue
                layer = net.layer(cand.layer)
                approx = planner.approximate_weight(layer, cand, probe_rank, ws)
                if cand.layer in tails:
                    chain, x = tails[cand.layer]
                    end_err = _relative_output_error({"y": tail.run_tail(chain, x)},
                                                     {"y": tail.run_tail(chain, x, {cand.layer: approx})})
                else:
                    trial = _with_weight(net, cand.layer, approx)
                    trial_cv = opencv_net_of(trial, f"trial of {cand.layer}", error=ValidationError)
                    trial_out = validate.forward(trial_cv, probe_inputs, out_names, what=f"trial of {cand.layer}")
                    del trial, trial_cv  # one trial net alive at a time (peak memory)
                    end_err = _relative_output_error(reference, trial_out)
                candidates[i] = replace(cand, gain=end_err / layer_err)

        with timer.stage("plan"):
            chosen, predicted = planner.choose_ranks(candidates, tradeoff, forced=ranks)

    plan = planner.build_plan(net, candidates, chosen, skipped, tradeoff, predicted)

    say("rewriting the network")
    with timer.stage("decompose"):
        replacements: dict[str, tuple[Layer, ...]] = {}
        polished: dict[str, float] = {}
        for lp in plan.layers:
            if lp.method == planner.METHOD_KEEP or not lp.rank:
                continue
            layer = net.layer(lp.layer)
            if lp.method == planner.METHOD_SVD:
                factors = ws.linear_factors(lp.layer, lp.rank)[0]
                replacements[lp.layer] = rewrite.decompose_inner_product(net, layer, factors)
            elif lp.method == planner.METHOD_POINTWISE:
                replacements[lp.layer] = rewrite.decompose_pointwise(net, layer, ws.linear_factors(lp.layer, lp.rank))
            else:
                # Polish the chosen rank's CP (the sweep ran few iterations per rank); a rank the
                # user forced gets a full run, so exact low-rank kernels come out exact.
                say(f"decomposing {lp.layer}")
                forced = lp.layer in ranks
                start = time.perf_counter()
                kernels = rewrite.conv_group_kernels(layer)
                factors = [
                    cp_conv(k, lp.rank // len(kernels), seed=seed, init=f,
                            n_iter_max=FORCED_CP_ITERATIONS if forced else POLISH_CP_ITERATIONS,
                            tol=1e-10 if forced else 1e-6)
                    for k, f in zip(kernels, ws.cp[lp.layer][lp.rank])
                ]
                timer.timings[f"decompose/{lp.layer}"] = time.perf_counter() - start
                w = layer.blobs[0].astype(np.float64)
                residual = sum(float(np.sum((k - cp_reconstruct(f)).astype(np.float64) ** 2))
                               for k, f in zip(kernels, factors))
                polished[lp.layer] = float(np.sqrt(residual / max(float(np.sum(w * w)), 1e-300)))
                replacements[lp.layer] = rewrite.decompose_convolution(net, layer, factors)
        new_net = rewrite.replace_layers(net, replacements)
        plan = replace(plan, layers=tuple(
            replace(lp, weight_error=polished[lp.layer]) if lp.layer in polished else lp for lp in plan.layers))
        del replacements, ws  # the factors now live in new_net only

    say("writing the model")
    deploy_path, weights_path = Path(deploy), Path(weights)
    with timer.stage("write"):
        store_fp16 = net.stored_fp16 if fp16 is None else bool(fp16)
        staged = io.stage(new_net, prefix, protect=(deploy_path, weights_path), fp16=store_fp16)
    try:
        agreements: tuple[validate.OutputAgreement, ...] = ()
        if validate_output:
            say("validating with OpenCV")
            with timer.stage("validate"):
                outs_old = names.compared
                outs_new = _opencv_names(new_net).compared
                a = validate.forward(opencv_original(), val_inputs, outs_old, what=str(deploy), error=ModelError)
                # one OpenCV net alive at a time (peak memory)
                compressed_cv = validate.load_opencv_net(staged.temp_prototxt, staged.temp_caffemodel,
                                                         what=f"compressed model {staged.prototxt}")
                b = validate.forward(compressed_cv, val_inputs, outs_new, what=f"compressed model {staged.prototxt}")
                keyed_b = {old: b[new] for old, new in zip(outs_old, outs_new)}
                agreements = tuple(validate.compare_outputs(a, keyed_b))
        staged.commit()
    except BaseException:
        staged.discard()
        raise

    timer.timings["total"] = time.perf_counter() - total_start
    timer.timings["_peak_rss_mb"] = peak_rss_mb()
    macs_before = sum(lp.macs_before for lp in plan.layers)
    macs_after = sum(lp.macs_after for lp in plan.layers)
    return Report(
        deploy=str(deploy),
        weights=str(weights),
        output_prototxt=str(staged.prototxt),
        output_caffemodel=str(staged.caffemodel),
        tradeoff=tradeoff,
        error_budget=plan.error_budget,
        predicted_error=predicted,
        layers=plan.layers,
        params_before=net.param_count,
        params_after=new_net.param_count,
        bytes_before=weights_path.stat().st_size,
        bytes_after=staged.caffemodel.stat().st_size,
        macs_before=macs_before,
        macs_after=macs_after,
        validation=agreements,
        validation_inputs=validation_label,
        timings=timer.timings,
        layers_before=len(net.layers),
        layers_after=len(new_net.layers),
        storage="float16" if store_fp16 else "float32",
    )
