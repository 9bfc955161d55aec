"""compress(): files -> load -> net -> plan -> decompose -> rewrite -> check -> save -> verify -> report.

The closed loop: the planner proposes ranks for an error budget; the model is rewritten, staged in temp
files and measured in OpenCV against the fidelity contract (plan/contract.py) on validation inputs that
planning never saw. A miss lowers the budget (raising ranks, dropping the factorizations that cost the
most error) and tries again, a bounded number of times; nothing is published before a round passes.
"""
from __future__ import annotations

import logging
import math
import os
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
from threadpoolctl import threadpool_limits

from . import export, io, rewrite, timing, validate
from .memory import big_blocks_mapped, peak_rss_mb, release_memory  # noqa: F401 (peak_rss_mb: the pipeline's report, and tools)
from .runner import RUN_CHUNK, OpenCVRunner, blob_sources, compared_blobs
from .decompose import ConvFactors, LinearFactors, cp_conv, cp_reconstruct, spatial_reconstruct, tucker_reconstruct
from .errors import ExportError, MissingDependencyError, ModelError, RankError, UsageError, ValidationError, WriteError
from .net import Layer, Net, conv_geometry
from .plan import analyse as planner, contract, inputs as plan_inputs, search
from .progress import Progress, as_progress
from .report import Report

log = logging.getLogger(__name__)

DEFAULT_TRADEOFF = 0.95
DEFAULT_PROBES = 8
OBJECTIVES = ("balanced", "speed", "size")
# budget rungs walked down one by one before the search jumps to the lowest and bisects: a miss on the way
# down usually ends its validation early, while the bisection's rounds are mostly passes (full validation)
WALK_FIRST = 6
REFINE_ROUNDS = 3  # one-layer moves tried after the budget search (_ClosedLoop.refine) ...
REFINE_MIN_GAIN = 0.1  # ... when they could make the plan at least this much cheaper (the objective's cost)
# A round is first judged on the first third of the validation inputs in the decisive order (where a plan
# that misses shows it): the plans that pass there are kept, and only the one finally chosen is judged on
# the rest (falling back to the one before when it misses there): a pass then costs a third of a full pass.
SCREEN_SHARE = 3
MAX_SPEED_ROUNDS = 3  # factorizations dropped one at a time while the whole model is slower
# A fully convolutional net (probed on small pictures) is timed whole at its declared input size when one
# 1-thread forward there is estimated within LATENCY_SAMPLE_MS (the original's validation run per input, on the
# default threads, times LATENCY_THREAD_FACTOR, times the area ratio), else at the largest size within it: a
# pair of timings takes a warm-up and at least 3 runs of each net, and VDSR at its 256 px takes 1.6 s a run.
LATENCY_SAMPLE_MS = 100.0
LATENCY_THREAD_FACTOR = 2.0
# The original stays loaded while the layer inputs are recorded when they take at most this much (GenderNet:
# 12 MB); larger activations (res10 SSD) are recorded after it is released, so as not to add to the peak.
KEEP_ORIGINAL_BYTES = 32 << 20
# A CP grid whose top-rank ALS is this much work (kernel size x rank) is cut at the largest rank measured fast
# enough first (_Run.cp_rank_cap): ~0.1 s of ALS and more, against two micro-benchmarks the planner needs anyway
PRETIMED_CP_WORK = 2e6
POLISH_CP_ITERATIONS = 30  # extra sweeps for the rank the planner picks
FORCED_CP_ITERATIONS = 1000  # a rank given with --rank: run to convergence
POLISHED_FORMS = (planner.METHOD_CP, planner.METHOD_TUCKER)  # factors refined by iterations: kept once made
MAX_PROBES = 256
# BLAS_THREADS: numpy's BLAS runs on one thread for the whole run. OpenBLAS's idle workers spin for ~0.1 s
# (2^28 cycles) after every multi-threaded call, even a 108 x 2 product, and so take a core from the OpenCV
# forward pass that follows: GenderNet's written model read 11-13 ms with 2 threads where it runs in 6.5 (the
# report said 0.86x, "slower"), and the validation passes ran slower too (`validate` 3.1-3.2 s -> 2.9 s). The
# run's numpy work is small products beside OpenCV's passes; the one big layer (fc6's analysis) takes 0.17 s
# instead of 0.09.
BLAS_THREADS = 1
NOTHING_TO_COMPRESS = "nothing to compress within the fidelity contract at this trade-off; try a higher T"
NOTHING_FASTER = ("nothing written: the plans that met the fidelity contract measured slower than the original in "
                  "OpenCV, and dropping their slowest factorizations left none that meets it (see the layers' reasons)")

ProgressFn = Callable[[str], None]


class _LargeActivations(Exception):
    """The layer inputs are too large to record before the validation inputs are made (record_early)."""


class _Timer:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self.current = ""
        self.active: list[str] = []  # the stages open, innermost last

    @contextmanager
    def stage(self, name: str):
        """Time a block as stage ``name``. A block inside one of the same name is counted once (the outer); one
        inside another stage is counted as its own, not the outer's too (the layers timed while the analysis
        runs count as timing): the stages' times add up to no more than the run's."""
        if name in self.active:
            yield
            return
        outer = self.active[-1] if self.active else None
        self.active.append(name)
        start = time.perf_counter()
        self.current = name
        try:
            yield
        finally:
            self.active.pop()
            spent = time.perf_counter() - start
            self.timings[name] = self.timings.get(name, 0.0) + spent
            if outer is not None:
                self.timings[outer] = self.timings.get(outer, 0.0) - spent  # (the outer adds it back at its end)
                self.current = outer
            log.debug("stage %s: %.2fs, peak RSS %.0f MB", name, self.timings[name], peak_rss_mb())


def default_prefix(weights: str | os.PathLike) -> Path:
    return Path.cwd() / f"{Path(weights).stem}-compressed"


# ------------------------------------------------------------------ options and inputs


def _check_layer_options(net: Net, ranks: Mapping[str, int], keep: Sequence[str], forms: Mapping[str, str]) -> None:
    names = {layer.name for layer in net.layers}
    for name in keep:
        if name not in names:
            raise UsageError(f"--keep: no layer named '{name}' in the model")
    def named(option: str, name: str, value) -> tuple[Layer, str, str]:
        if name not in names:
            raise UsageError(f"{option}: no layer named '{name}' in the model")
        if name in keep:
            raise UsageError(f"{option} {name}={value}: the layer is also given to --keep")
        layer = net.layer(name)
        return (layer, *planner.describe_layer(layer, keep=False))

    for name, form in forms.items():
        layer, method, reason = named("--form", name, form)
        allowed = planner.layer_forms(layer, method) if method != planner.METHOD_KEEP else ()
        if form not in allowed:
            raise UsageError(f"--form {name}={form}: a {layer.type} layer with weight shape "
                             f"{'x'.join(map(str, layer.blobs[0].shape)) if layer.blobs else '-'} takes "
                             + (", ".join(allowed) if allowed else f"no form ({reason or 'not decomposable'})"))
    for name, rank in ranks.items():
        layer, method, reason = named("--rank", name, rank)
        if method == planner.METHOD_KEEP:
            raise UsageError(f"--rank {name}={rank}: a {layer.type} layer cannot be decomposed"
                             + (f" ({reason})" if reason else ""))
        method = forms.get(name, method)
        limit = planner.max_rank(layer, method)
        groups = conv_geometry(layer).group if layer.type == "Convolution" else 1
        if not 1 <= rank <= limit:
            raise RankError(f"--rank {name}={rank}: out of range 1..{limit} for weight shape "
                            f"{'x'.join(map(str, layer.blobs[0].shape))}")
        if rank % groups:
            raise RankError(f"--rank {name}={rank}: must be a multiple of the layer's group count {groups}")


# ------------------------------------------------------------------ the rewrite for one plan


@dataclass
class _Factorizer:
    """Builds the compressed Net for a plan; the polished factors of a (layer, form, rank) are computed once
    per run."""

    net: Net
    ws: planner.Workspace
    forced: Mapping[str, tuple]
    seed: int
    timings: dict
    say: ProgressFn
    cache: dict = field(default_factory=dict)

    def build(self, plan: planner.Plan, *, again: bool = False) -> tuple[Net, planner.Plan]:
        """The Net of ``plan`` and the plan with its factors' errors; ``again``: a plan built before (quietly)."""
        replacements: dict[str, tuple[Layer, ...]] = {}
        errors: dict[str, float] = {}
        keys = [(lp.layer, lp.method, lp.rank) for lp in plan.layers if lp.method != planner.METHOD_KEEP and lp.rank]
        announce = (lambda key: None) if again else (lambda key: self.say(f"decomposing {key[0]}"))
        # The polished forms are computed once, side by side on the cores like the analysis (each factorization
        # is its own: the same either way), and kept for later rounds. The others are a scaled slice of a basis
        # the workspace holds, made again in milliseconds: kept, they would add up round after round (GenderNet's
        # fc6 at rank 357: 28 MB, held while a later round's plan without it ran in OpenCV).
        new = [key for key in keys if key[1] in POLISHED_FORMS and key not in self.cache]
        self.cache.update(zip(new, search.side_by_side(lambda key: self._factor(*key), new, weight=self._bytes,
                                                       announce=announce)))
        for key in keys:
            if key[1] in POLISHED_FORMS:
                replacements[key[0]], err = self.cache[key]
            else:
                announce(key)
                replacements[key[0]], err = self._factor(*key)
            if err is not None:
                errors[key[0]] = err
        new_net = rewrite.replace_layers(self.net, replacements)
        plan = replace(plan, layers=tuple(
            replace(lp, weight_error=errors[lp.layer]) if lp.layer in errors else lp for lp in plan.layers))
        return new_net, plan

    def _bytes(self, key: tuple) -> int:
        """The layer's weight bytes (factorizations computed at once: see search.side_by_side)."""
        return self.net.layer(key[0]).weight_bytes

    def draft(self, name: str, method: str, rank: int) -> tuple[Layer, ...]:
        """The factored layers from the planning factors as they are (no polishing): for timing."""
        layer = self.net.layer(name)
        if method == planner.METHOD_CP:
            return rewrite.decompose_convolution(self.net, layer, self.ws.cp[name][rank])
        if method == planner.METHOD_TUCKER:  # the analysis' HOSVD factors: same layers, no HOOI sweeps
            factors = self.ws.tucker_factors(name, rewrite.conv_group_kernels(layer), rank, polish=False)
            return rewrite.decompose_tucker(self.net, layer, factors)
        if method == planner.METHOD_SVD:  # the basis rows as they are: a big layer's scaled copy would add to the
            basis = self.ws.bases[name][0]  # peak (GenderNet's fc6 at its top rank: 37 MB), and speed needs shapes
            return rewrite.decompose_inner_product(
                self.net, layer, LinearFactors(basis.vt[:rank], basis.u[:, :rank].astype(np.float32), 0.0))
        return self._factor(name, method, rank)[0]

    def cp_shaped(self, name: str, rank: int) -> tuple[Layer, ...]:
        """CP's four layers at ``rank`` with random weights of the factors' shapes: what the form costs to run,
        timed before its ALS (the timing key is the layers' structure, so the draft of the real factors
        reuses the measurement)."""
        layer = self.net.layer(name)
        t, sg, kh, kw = layer.blobs[0].shape
        g = conv_geometry(layer).group
        rng = np.random.default_rng(0)
        shaped = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
        r = rank // g
        return rewrite.decompose_convolution(self.net, layer, [
            ConvFactors(shaped(r, sg, 1, 1), shaped(r, 1, kh, 1), shaped(r, 1, 1, kw), shaped(t // g, r, 1, 1), 0.0, 0)
            for _ in range(g)])

    def _factor(self, name: str, method: str, rank: int) -> tuple[tuple[Layer, ...], float | None]:
        layer = self.net.layer(name)
        ws = self.ws
        if method == planner.METHOD_SVD:
            return rewrite.decompose_inner_product(self.net, layer, ws.linear_factors(name, rank)[0]), None
        if method == planner.METHOD_POINTWISE:
            return rewrite.decompose_pointwise(self.net, layer, ws.linear_factors(name, rank)), None
        kernels = rewrite.conv_group_kernels(layer)
        if method == planner.METHOD_SPATIAL:
            factors = ws.spatial_factors(name, layer.blobs[0].shape, rank)
            return rewrite.decompose_spatial(self.net, layer, factors), _kernel_error(kernels, factors)
        if method == planner.METHOD_TUCKER:
            factors = ws.tucker_factors(name, kernels, rank, polish=True)
            return rewrite.decompose_tucker(self.net, layer, factors), _kernel_error(kernels, factors)
        # Polish the chosen rank's CP (the sweep ran few iterations per rank); a rank the user
        # forced gets a full run, so exact low-rank kernels come out exact.
        forced = name in self.forced
        start = time.perf_counter()
        factors = [
            cp_conv(k, rank // len(kernels), seed=self.seed, init=f,
                    n_iter_max=FORCED_CP_ITERATIONS if forced else POLISH_CP_ITERATIONS,
                    tol=1e-10 if forced else 1e-6)
            for k, f in zip(kernels, ws.cp[name][rank])
        ]
        self.timings[f"decompose/{name}"] = self.timings.get(f"decompose/{name}", 0.0) + \
            time.perf_counter() - start
        return rewrite.decompose_convolution(self.net, layer, factors), _kernel_error(kernels, factors)


def _kernel_error(kernels: Sequence[np.ndarray], factors: Sequence) -> float:
    """||K - K_approx||_F / ||K||_F over the groups' kernels, for any conv form's factors."""
    rebuild = {"ConvFactors": cp_reconstruct, "TuckerFactors": tucker_reconstruct,
               "SpatialFactors": spatial_reconstruct}
    residual = norm = 0.0
    for k, f in zip(kernels, factors):
        approx = rebuild[type(f).__name__](f)
        residual += float(np.sum((k - approx).astype(np.float64) ** 2))
        norm += float(np.sum(k.astype(np.float64) ** 2))
    return float(np.sqrt(residual / max(norm, 1e-300)))


# ------------------------------------------------------------------ compress


def _chosen_of(plan: planner.Plan) -> dict[str, tuple]:
    return {lp.layer: (lp.method, lp.rank) for lp in plan.layers if lp.rank}


@dataclass
class _LoopState:
    """The closed loop's rounds: the best passing plan so far stays staged, the others are discarded; while
    the best one's verdict is provisional (screened), the ones that passed before it stay staged too."""

    # (staged, plan, verdict): not the Net, which _ClosedLoop.net_of builds again when it is needed -- held, its
    # factors would add to every later round's peak (GenderNet's fc6 at rank 357: 28 MB)
    best: tuple | None = None
    best_key: tuple = ()  # its chosen ranks (the key of ``tried``)
    fallbacks: list = field(default_factory=list)  # (best, best_key, best_budget) of earlier passes
    tried: dict = field(default_factory=dict)  # chosen ranks -> passed
    slow: dict = field(default_factory=dict)  # (layer, rank) -> why its factored form is not used
    misses: list = field(default_factory=list)
    rounds: int = 0
    empty_plan: planner.Plan | None = None
    best_budget: float = 0.0
    latency: timing.Latency | None = None
    excess: float = 1.0  # the last round's worst error / its target (search.excess)
    predicted: float | None = None  # the last round's predicted error (None: no new round)
    missed_at: dict = field(default_factory=dict)  # budget -> the choice that missed there
    missed_by: dict = field(default_factory=dict)  # budget -> (its predicted error, search.excess of its miss)
    dropped: dict = field(default_factory=dict)  # layer -> why the whole-model speed check dropped it
    unworthy: str = ""  # why the plan that passed was not written (_ClosedLoop.worth_writing)

    def keep(self, staged, plan, verdict, key: tuple, budget: float) -> None:
        if verdict.screened and self.best is not None:  # (kept until the new one's verdict is complete)
            self.fallbacks.append((self.best, self.best_key, self.best_budget))
        elif not verdict.screened:
            self.discard()
        self.best, self.best_key, self.best_budget = (staged, plan, verdict), key, budget

    def forget_passes(self) -> None:
        """Plans that passed have no staged files any more (discarded): a repeat is written and judged again."""
        self.tried = {k: v for k, v in self.tried.items() if v is not True}

    def confirmed(self) -> None:
        """The best plan's verdict is complete: the earlier passes are no longer needed."""
        for best, _, _ in self.fallbacks:
            best[0].discard()
        self.fallbacks.clear()

    def fall_back(self) -> None:
        """The best plan missed after all: the one that passed before it (if any) is the best again."""
        if self.best is not None:
            self.best[0].discard()
        self.best = None
        if self.fallbacks:
            self.best, self.best_key, self.best_budget = self.fallbacks.pop()

    def discard(self) -> None:
        self.confirmed()
        if self.best is not None:
            self.best[0].discard()
            self.best = None


@dataclass(frozen=True)
class _Verdict:
    checks: tuple[contract.Check, ...]
    agreements: tuple[validate.OutputAgreement, ...]
    outputs: Mapping = field(default_factory=dict, compare=False)  # the judged model's compared outputs
    # a provisional verdict: the inputs judged so far (the first ones in the validation order; ``outputs``
    # then holds their values, in that order); 0 when every input was judged
    screened: int = 0

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
    forms: Mapping[str, str] | None = None,
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
    progress: "Progress | ProgressFn | None" = None,
    report_path: str | os.PathLike | None = None,
    format: str = "caffe",
    plan_only: bool = False,
    retime: bool = False,
    labels: str | None = None,
    classes: Sequence[str] | None = None,
    metric: Callable[[Mapping[str, np.ndarray]], float] | None = None,
) -> Report:
    """Compress a Caffe model; write ``PREFIX.prototxt``/``PREFIX.caffemodel``; return a Report.

    tradeoff : float in [0, 1] -- 0 lossless, 1 smallest (default 0.95; see README).
    output : prefix of the written pair (default ``<weights-stem>-compressed`` in the cwd).
    ranks : {layer: rank} forced ranks; keep : layers never touched.
    forms : {layer: form} restricts a layer to one exact form (plan.analyse.FORMS: cp, tucker2, spatial-svd
        for a k x k convolution); a forced rank without a form uses cp (svd for 1x1 and InnerProduct).
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
    progress : a progress.Progress (phases with item counts), or a callable receiving one-line messages.
    report_path : also write the report as JSON there, published with the pair (checked before any work).
    format : "caffe" (default), "onnx" (PREFIX.onnx only) or "both"; the ONNX model (extra
        caffe-compress[onnx]) is judged in onnxruntime by the same contract. An ONNX failure still publishes
        the Caffe pair and raises ExportError.
    plan_only : run the same search (each plan is written and validated in a scratch directory) and report
        it -- layers, forms, ranks, the file size it gives, layer and model times, the fidelity verdict --
        without writing any model (``report_path`` still gets the JSON). Timings are kept in the timing
        cache, so the real run that follows makes the same choices.
    retime : measure every timing again instead of reusing the timing cache of earlier runs on this machine.
    labels : with ``images``, how to read their labels (evaluate.read_labels: folder, csv:FILE, regex:PATTERN);
        the report gives the top-1 accuracy of both models on all the labelled images. classes : class
        names in output order, for named labels.
    metric : called with {output blob: (N, ...) array} of the original and of the compressed model on the
        validation inputs (``images`` in sorted file order, or the probes); both values are reported.
    """
    with big_blocks_mapped(), _scratch_directory() as scratch, np.errstate(all="ignore"), \
            warnings.catch_warnings(), threadpool_limits(limits=BLAS_THREADS, user_api="blas"):
        warnings.simplefilter("ignore", RuntimeWarning)  # overflow in hostile weights: the checks say it once
        run = _Run(deploy, weights, tradeoff=planner.check_tradeoff(tradeoff), output=output,
                   ranks=dict(ranks or {}), forms=dict(forms or {}), keep=tuple(keep), validate_output=validate_output,
                   preprocessing=preprocessing or validate.Preprocessing(), probes=probes, seed=seed, fp16=fp16,
                   outputs=dict(outputs or {}), min_fidelity=min_fidelity, force=force, objective=objective,
                   progress=as_progress(progress), cv=OpenCVRunner(Path(scratch)),
                   report_path=Path(report_path) if report_path is not None else None, format=format,
                   plan_only=plan_only, retime=retime, labels=labels, classes=tuple(classes or ()), metric=metric)
        try:
            return run.execute(images=images, calibration=calibration)
        except MemoryError:
            raise ModelError(f"{weights}: out of memory while in stage '{run.timer.current or 'setup'}': the "
                             "model, its input shape or an option asks for more memory than this machine has") from None


@contextmanager
def _scratch_directory():
    """A private scratch directory with an ASCII path (OpenCV reads its files), removed however the run ends."""
    base = tempfile.gettempdir()
    if not base.isascii():
        base = "/tmp" if os.path.isdir("/tmp") else None
    try:
        holder = tempfile.TemporaryDirectory(prefix="caffe-compress-", dir=base)
    except OSError as exc:
        raise WriteError(f"scratch directory in {base or tempfile.gettempdir()}: {exc.strerror} "
                         "(set TMPDIR to a writable directory)") from None
    with holder as scratch:
        yield scratch


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
    forms: dict[str, str]
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
    progress: Progress
    cv: OpenCVRunner
    timer: _Timer = field(default_factory=_Timer)
    _net_ms: dict = field(default_factory=dict)  # whole-net timings measured in this run (_measured)
    net: Net | None = None
    report_path: Path | None = None
    guard: timing.SpeedGuard | None = None
    factorizer: _Factorizer | None = None
    format: str = "caffe"
    plan_only: bool = False
    retime: bool = False
    labels: str | None = None
    classes: tuple[str, ...] = ()
    metric: Callable | None = None
    labelled: object = None  # evaluate.Labelled, read before any work
    validation_order: np.ndarray | None = None  # the order validation rounds run the inputs in
    reference_in_order: dict | None = None  # the original's outputs in that order
    # per position of that order: an earlier plan changed its answer (run_order); None: misses are not decided
    # by changed answers alone (contract.decided_by_changes)
    changed: np.ndarray | None = None
    written_net: Net | None = None  # the net of the staged model that passed
    written_outputs: Mapping | None = None  # its compared outputs in OpenCV
    plans_on_probes: bool = False  # something may be factored, planned on natural-image probes (no --calibration)
    early: tuple | None = None  # (planning feed, (layer inputs, outputs)) recorded while probing (record_early)
    reference_ms: float | None = None  # the original's validation run, ms per input (default threads)

    def say(self, detail: str) -> None:
        self.progress.item(detail)

    def execute(self, *, images, calibration) -> Report:
        failed = True
        try:
            report = self._execute(images=images, calibration=calibration)
            failed = False
            return report
        finally:
            if self.guard is not None and self.guard.disk is not None:
                self.guard.disk.save()
            self.progress.close(failed=failed)

    def _execute(self, *, images, calibration) -> Report:
        start = time.perf_counter()
        if not 1 <= self.probes <= MAX_PROBES:
            raise UsageError(f"--probes: {self.probes} must be between 1 and {MAX_PROBES}")
        if self.min_fidelity is not None:
            planner.check_tradeoff(self.min_fidelity, option="--min-fidelity")
        if self.objective not in OBJECTIVES:
            raise UsageError(f"--objective: '{self.objective}' is not one of {', '.join(OBJECTIVES)}")
        if self.labels is not None:
            from . import evaluate

            if images is None:
                raise UsageError("--labels: needs --images DIR (the labelled images)")
            self.labelled = evaluate.read_labels(Path(images), self.labels, classes=self.classes or None)
        prefix = self.cv.scratch / "plan" if self.plan_only else _output_prefix(self.output, self.weights)
        io.check_outputs(prefix, protect=(Path(self.deploy), Path(self.weights)))
        onnx_file = None if self.plan_only else self.check_format(prefix)
        if self.report_path is not None:
            io.check_report_path(self.report_path, inputs=(self.deploy, self.weights),
                                 outputs=(*io.output_paths(prefix), *([onnx_file] if onnx_file else [])))
        swept = (io.sweep_leftovers(*io.output_paths(prefix)) if not self.plan_only else []) + \
            (io.sweep_temps(self.report_path) if self.report_path is not None else []) + \
            (io.sweep_temps(onnx_file) if onnx_file is not None else [])
        for note in swept:
            log.warning("%s", note)
        net = self.net = self.load()
        ws = planner.Workspace()
        self.factorizer = _Factorizer(net, ws, self.ranks, self.seed, self.timer.timings, self.say)
        self.guard = timing.SpeedGuard(self.objective, self.cv, net, blob_sources(net)[0], net.input_shapes(),
                                       self.say, self.timer.stage, disk=timing.DiskCache.default(reuse=not self.retime))
        wants_plan = self.tradeoff > 0 or bool(self.ranks)
        self.plans_on_probes = wants_plan and calibration is None  # (record_early)
        self.progress.stage("probing the original model in OpenCV")
        self.cv.keep(net)  # loaded once for the response probes, the validation inputs and its timing
        try:
            with self.timer.stage("inputs"):
                inputs = plan_inputs.make_inputs(net, wants_plan=wants_plan, validate_output=self.validate_output,
                                                 images=images, responds=lambda feed: self.responds(net, feed),
                                                 calibration=calibration, pre=self.preprocessing,
                                                 probes=self.probes, seed=self.seed)
        except plan_inputs.NoResponseError:
            self.first_non_finite(net)  # overflowing weights are a bad model (3), not a validation failure
            raise
        specs, reference = self.reference(net, inputs)
        self.decisive_first(specs, reference)
        if wants_plan:  # (a big original is timed now, while little else is held)
            self.time_original(net, inputs)
            if self.objective != "size":
                self.guard.infer_shapes()  # (from the loaded original, for the layer timings)
        candidates, skipped = self.plan(net, inputs, wants_plan, ws)
        inputs = replace(inputs, planning=None)  # (planned: not held through the rounds, peak memory)
        release_memory()
        report, staged = _ClosedLoop(self, net, prefix, candidates, skipped, specs, reference, inputs).execute()
        if staged is not None:
            report = self.user_measures(report, staged, reference)
        if self.plan_only:
            return self.plan_report(report, staged, start)
        failure = None
        if staged is not None and onnx_file is not None:
            try:
                report, failure = self.export(report, staged, onnx_file, specs, reference, inputs)
            except BaseException:
                staged.discard()
                raise
        self.timer.timings["total"] = time.perf_counter() - start
        self.timer.timings["_peak_rss_mb"] = peak_rss_mb()
        report = replace(report, timings=self.timer.timings, timing_cache=self.cache_use())
        pair = self.format != "onnx" or failure is not None
        if not pair:
            report = replace(report, output_prototxt="", output_caffemodel="")
        self.publish(report, staged, pair=pair)
        if failure is not None:
            raise ExportError(f"ONNX export: {failure}; the Caffe model was written to {report.output_prototxt}")
        return report

    def decisive_first(self, specs, reference: dict) -> None:
        """The order validation rounds run their inputs in, so that a missing round ends soonest
        (contract.decisive_order), and the original's outputs in that order (the inputs are not copied)."""
        order = contract.decisive_order(specs, reference) if reference else None
        self.validation_order = order
        self.reference_in_order = reference if order is None else \
            {k: v[order] if v.shape[0] == len(order) else v for k, v in reference.items()}
        by_changes = order is not None and contract.decided_by_changes(self.per_input(specs, len(order)))
        self.changed = np.zeros(len(order), dtype=bool) if by_changes else None

    def in_input_order(self, values: Mapping[str, np.ndarray]) -> dict:
        """Outputs computed in validation_order, put back in the inputs' own order."""
        order = self.validation_order
        out = {}
        for k, v in values.items():
            if order is not None and v.shape[0] == len(order):
                w = np.empty_like(v)
                w[order] = v
                v = w
            out[k] = v
        return out

    def user_measures(self, report: Report, staged: io.StagedModel, reference: Mapping[str, np.ndarray]) -> Report:
        """The user's own measures of both models: accuracy on labelled images, the metric callable."""
        try:
            return self._user_measures(report, staged, reference)
        except BaseException:
            staged.discard()
            raise

    def _user_measures(self, report: Report, staged: io.StagedModel, reference) -> Report:
        if self.labelled is not None:
            from . import evaluate

            self.progress.stage("top-1 accuracy of both models on the labelled images", 2)
            self.say("original")
            before = evaluate.accuracy_of_files(Path(self.deploy), Path(self.weights), self.labelled,
                                                self.preprocessing)
            self.say("compressed")
            after = evaluate.accuracy_of_files(staged.temp_prototxt, staged.temp_caffemodel, self.labelled,
                                               self.preprocessing, output=before.output)
            report = replace(report, accuracy={"original": before.top1, "compressed": after.top1,
                                               "images": before.images, "output": before.output,
                                               "labels": self.labels})
        if self.metric is not None and reference and self.written_outputs:
            values = {}
            for which, outputs in (("original", reference), ("compressed", self.written_outputs)):
                try:
                    values[which] = float(self.metric(dict(outputs)))
                except Exception as exc:  # noqa: BLE001 - the user's code: one line naming it
                    raise UsageError(f"metric: {type(exc).__name__}: {exc} (on the {which} model's outputs)") from None
            report = replace(report, metric={**values, "inputs": report.validation_inputs})
        return report

    def cache_use(self) -> dict:
        disk = self.guard.disk if self.guard is not None else None
        if disk is None or disk.path is None:
            return {}
        return {"path": str(disk.path), "reused": disk.hits, "measured": disk.stored}

    def plan_report(self, report: Report, staged: io.StagedModel | None, start: float) -> Report:
        """--plan-only: the report of the plan (its scratch files removed), and its JSON when asked."""
        if staged is not None:
            staged.discard()
        self.timer.timings["total"] = time.perf_counter() - start
        self.timer.timings["_peak_rss_mb"] = peak_rss_mb()
        report = replace(report, output_prototxt="", output_caffemodel="", plan_only=True,
                         timings=self.timer.timings, timing_cache=self.cache_use())
        if self.report_path is not None:
            io.write_atomically(self.report_path, report.json_text().encode())
        return report

    def check_format(self, prefix: Path) -> Path | None:
        """The ONNX output path (checked before any work), or None for --format caffe."""
        if self.format not in export.FORMATS:
            raise UsageError(f"--format: '{self.format}' is not one of {', '.join(export.FORMATS)}")
        if self.format == "caffe":
            return None
        from . import export_onnx

        export_onnx.onnx_module()
        if self.validate_output:
            import importlib.util

            if importlib.util.find_spec("onnxruntime") is None:
                raise MissingDependencyError("--format onnx: cannot import onnxruntime (it validates the ONNX "
                                             "model); install caffe-compress[onnx] or pass --no-validate")
        path = export.onnx_path(prefix)
        io.check_report_path(path, inputs=(self.deploy, self.weights), outputs=io.output_paths(prefix),
                             option="--format onnx")
        return path

    def export(self, report: Report, staged: io.StagedModel, path: Path, specs, reference, inputs):
        """(report, None) with the ONNX model staged beside the pair, or (report, why it failed)."""
        self.progress.stage("exporting ONNX and checking it in onnxruntime")
        judge = (lambda values: self.judge(specs, reference, values, inputs)) if self.validate_output else None
        try:
            with self.timer.stage("export"):
                exported = export.export_and_judge(
                    self.net, self.written_net, self.cv, inputs.validation if self.validate_output else None,
                    fp16=report.storage == "float16", judge=judge, caffe_outputs=self.written_outputs,
                    enforce=self.enforced)
                staged.add(path, exported.data)
        except (ExportError, ValidationError) as exc:
            return report, str(exc)
        verdict = exported.verdict
        return replace(report, output_onnx=str(path), onnx_bytes=len(exported.data), onnx_parity=exported.parity,
                       onnx_validation=verdict.agreements if verdict else (),
                       onnx_contract=verdict.checks if verdict else ()), None

    def publish(self, report: Report, staged: io.StagedModel | None, *, pair: bool = True) -> None:
        """Commit the staged pair and the JSON report together (or the report alone when nothing was written)."""
        data = report.json_text().encode() if self.report_path is not None else None
        if staged is None:
            if data is not None:
                io.write_atomically(self.report_path, data)
            return
        try:
            if data is not None:
                staged.add(self.report_path, data)
            for note in staged.commit(pair=pair):
                log.warning("%s", note)
        except BaseException:
            staged.discard()
            raise

    # -- files -> load -> net
    def load(self) -> Net:
        self.progress.stage("loading the model")
        with self.timer.stage("load"):
            net = io.load(self.deploy, self.weights)
        _check_layer_options(net, self.ranks, self.keep, self.forms)
        return net

    @property
    def enforced(self) -> bool:
        """Whether the contract decides: --rank alone (T = 0) is the user's own choice of loss, measured on
        every input and reported, not enforced."""
        return not (self.ranks and self.tradeoff == 0)

    def forced(self) -> dict[str, tuple]:
        """The user's forced ranks as plan choices {layer: (form, rank)}."""
        out = {}
        for name, rank in self.ranks.items():
            method, _ = planner.describe_layer(self.net.layer(name), keep=False)
            out[name] = (self.forms.get(name, method), rank)
        return out

    def first_non_finite(self, net: Net) -> None:
        """Raise ModelError naming the first layer whose output overflows on one 0..255 picture, if any."""
        from .runner import Source

        shapes = plan_inputs.probe_shapes(net, net.input_shapes())
        rng = np.random.default_rng(0)
        feed = {k: rng.uniform(0, 255, (1,) + tuple(v[1:])).astype(np.float32) for k, v in shapes.items()}
        sources = [Source(layer.name, i) for layer in net.layers if layer.type != "Input"
                   for i in range(len(layer.tops))]
        values = self.cv.run(net, feed, sources, what=str(self.deploy), error=ModelError)
        for source in sources:
            if not np.all(np.isfinite(values[source])):
                raise ModelError(f"{self.deploy}: layer '{source.layer}' outputs NaN/Inf on an ordinary input "
                                 "(its weights or activations overflow)")

    def responds(self, net: Net, feed: Mapping[str, np.ndarray]) -> bool:
        """Whether some output of the original varies over the samples of ``feed`` (the first planning
        probes in a convention: their layer inputs are recorded on the way, see record_early)."""
        _, sources = blob_sources(net)
        if not sources:
            return True  # nothing to compare: reference() says so
        values = self.record_early(net, feed)
        if values is None:
            values = self.cv.run(net, feed, sources, what=str(self.deploy), error=ModelError)
        for source, value in values.items():
            if not np.all(np.isfinite(value)):
                raise ModelError(f"{self.deploy}: the original model outputs NaN/Inf in '{source.layer}' on probe "
                                 "inputs (its weights or activations overflow)")
        for value in values.values():
            v = value.reshape(value.shape[0], -1).astype(np.float64)
            if v.shape[0] > 1 and float(np.max(np.std(v, axis=0))) > 1e-6 * (float(np.max(np.abs(v))) + 1e-12):
                return True
        return False

    # -- the original's outputs on the validation inputs, and their kinds
    def reference(self, net: Net, inputs: plan_inputs.Inputs):
        if not self.validate_output:
            return [], {}
        blobs = compared_blobs(net)
        if not blobs:
            raise ValidationError(f"{self.deploy}: the model has no output to compare (every blob is consumed)")
        with self.timer.stage("validate"):
            _, sources = blob_sources(net)
            start = time.perf_counter()
            values = self.cv.run(net, inputs.validation, sources, what=str(self.deploy), error=ModelError)
            count = self.validation_count(inputs)
            self.reference_ms = 1000.0 * (time.perf_counter() - start) / max(count, 1)  # (per input: latency_side)
        reference = {name: values[s] for name, s in zip(blobs, sources)}
        for name, value in reference.items():
            if not np.all(np.isfinite(value)):
                raise ModelError(f"{self.deploy}: the original model outputs NaN/Inf in '{name}' on the "
                                 f"validation inputs ({inputs.validation_label})")
        specs = contract.infer_outputs(net, blobs, overrides=self.outputs,
                                       shapes={k: tuple(v.shape) for k, v in reference.items()})
        return specs, reference

    # -- probe -> analyse -> sensitivity
    def release_original(self) -> None:
        """Drop the kept original (not kept while the layer inputs are recorded: its buffers would add to that
        peak)."""
        self.cv.forget()
        release_memory()

    def recording(self, activation_bytes: int) -> None:
        """The layer inputs about to be recorded take ``activation_bytes``: the kept original stays loaded for
        them when they are small (one load fewer), else it goes first (peak memory)."""
        if activation_bytes > KEEP_ORIGINAL_BYTES:
            self.release_original()

    def decomposable(self, net: Net, wants_plan: bool) -> tuple[list[tuple[Layer, str]], dict[str, str]]:
        """The layers a plan may factor (with their primary form), and why the others are left alone."""
        first_input, _ = blob_sources(net)
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
        return decomposable, skipped

    def record(self, net: Net, feed: Mapping[str, np.ndarray], decomposable, *, measured) -> tuple[dict, dict]:
        """The decomposable layers' sampled inputs and the compared outputs of the original on ``feed``
        (search.collect_inputs)."""
        first_input, out_sources = blob_sources(net)

        def run(model: Net, part, sources):
            return self.cv.run(model, part, sources, what=f"{self.deploy} (probing)", error=ModelError)

        sources = {layer.name: first_input[layer.name] for layer, _ in decomposable}
        return search.collect_inputs(run, net, feed, sources, out_sources, seed=self.seed, measured=measured)

    def record_early(self, net: Net, feed: Mapping[str, np.ndarray]) -> dict | None:
        """The original's outputs on the convention probes, recording the layer inputs on the way when
        they are small (KEEP_ORIGINAL_BYTES): the probes that test a convention are the planning probes, so
        the recording is not run again (recorded_early); None when there is nothing to record, or too much."""
        if not self.plans_on_probes:
            return None
        decomposable, _ = self.decomposable(net, True)
        if not decomposable:
            return None

        def small(activation_bytes: int) -> None:
            if activation_bytes > KEEP_ORIGINAL_BYTES:
                raise _LargeActivations

        try:
            layer_inputs, outputs = self.record(net, feed, decomposable, measured=small)
        except _LargeActivations:
            return None
        self.early = ({k: np.array(v) for k, v in feed.items()}, (layer_inputs, outputs))
        return outputs

    def recorded_early(self, planning: Mapping[str, np.ndarray]) -> tuple[dict, dict] | None:
        """The early recording (record_early) when it was made on exactly these planning inputs."""
        early, self.early = self.early, None
        if early is None:
            return None
        feed, recorded = early
        same = feed.keys() == planning.keys() and all(
            np.array_equal(feed[k], np.asarray(planning[k][:])) for k in feed)
        return recorded if same else None

    def plan(self, net: Net, inputs: plan_inputs.Inputs, wants_plan: bool, ws: planner.Workspace):
        """The candidates (layer inputs recorded, forms analysed, sensitivity and times measured) and the
        layers left alone; the kept original is released on the way (release_original)."""
        decomposable, skipped = self.decomposable(net, wants_plan)
        if not wants_plan or not decomposable:
            self.early = None
            self.release_original()
            return [], skipped
        with self.timer.stage("probe"):
            recorded = self.recorded_early(inputs.planning)
            if recorded is None:
                self.say("recording layer inputs")
                recorded = self.record(net, inputs.planning, decomposable, measured=self.recording)
            layer_inputs, reference = recorded
            del recorded
            self.release_original()
        self.progress.stage("analysing layers", len(decomposable))
        with self.timer.stage("analyse"):
            candidates, more = search.analyse_layers(decomposable, layer_inputs, ranks=self.ranks, forms=self.forms, ws=ws,
                                                     seed=self.seed, timings=self.timer.timings, say=self.say,
                                                     cp_rank_cap=self.cp_rank_cap())
            skipped.update(more)
        release_memory()
        skip = set(self.ranks) if self.tradeoff not in (0.0, 1.0) else {c.layer for c in candidates}
        totals = planner.totals_of(candidates)
        measured = {c.layer for c in candidates if c.layer not in skip and not search.negligible(c, totals)}
        self.progress.stage("measuring each layer's effect on the outputs", len(measured))
        with self.timer.stage("sensitivity"):
            candidates = search.measure_gains(
                lambda model, feed, srcs: self.cv.run(model, feed, srcs, what="sensitivity trial"),
                net, candidates, inputs=inputs.planning, reference=reference, layer_inputs=layer_inputs,
                compared_blobs=compared_blobs(net), skip=skip, ws=ws, say=self.say)
        del layer_inputs, reference  # (not held while the layers are timed: a big layer's trial net adds to the peak)
        release_memory()
        if self.objective != "size":
            self.progress.stage("timing layers and factored forms in OpenCV",
                                sum(not search.negligible(c, totals) for c in candidates))
            with self.timer.stage("timing"):
                candidates = search.measure_times(
                    candidates, say=self.say,
                    original_ms=lambda name: self.guard.layer_ms(name, (net.layer(name),)),
                    factored_ms=lambda c, r: self.guard.layer_ms(c.layer, self.factorizer.draft(c.layer, c.method, r)))
        return candidates, skipped

    def cp_rank_cap(self) -> planner.RankCap | None:
        """For the balanced and speed objectives: a layer's CP grid ends at the largest rank not measured
        slower than the layer allows (SpeedGuard.required) -- the planner would offer no rank above it. The
        grid's two ends are timed before the ALS (the timings the planner then uses), for a layer whose
        ALS at the top rank is big work (PRETIMED_CP_WORK); forced ranks are analysed as given."""
        if self.objective == "size":
            return None

        def cap(layer: Layer, ranks: Sequence[int]) -> int | None:
            if layer.name in self.ranks or int(np.prod(layer.blobs[0].shape)) * max(ranks) < PRETIMED_CP_WORK:
                return None
            self.say(f"timing {layer.name} (cp)")
            points = {r: self.guard.layer_ms(layer.name, self.factorizer.cp_shaped(layer.name, r))
                      for r in {min(ranks), max(ranks)}}
            return search.fast_enough_cap(ranks, self.guard.layer_ms(layer.name, (layer,)), points,
                                          self.guard.required)

        return cap

    def _latency_feed(self, net: Net, inputs: plan_inputs.Inputs) -> dict:
        """One input per net input for the whole-model timings: a validation input, at the declared size (a
        fully convolutional net's probes are smaller: its speed ratio at the size it is deployed at is the one
        that counts -- RetinaFace's plan read 1.00x on 96-px probes, 0.94x at its 320 px -- unless one forward
        there would be long (latency_side), then at the largest size within LATENCY_SAMPLE_MS)."""
        feed, declared = {}, net.input_shapes()
        for i, (name, shape) in enumerate(declared.items()):
            sample = inputs.validation.get(name)
            if sample is not None:
                feed[name] = sample[:1]
            else:
                feed[name] = np.random.default_rng(i).standard_normal((1,) + tuple(shape[1:])).astype(np.float32)
        smaller = {k: v for k, v in feed.items() if v.ndim == 4 and len(declared[k]) == 4
                   and tuple(v.shape[2:]) != tuple(int(d) for d in declared[k][2:])}
        if not smaller:
            return feed
        side = self.latency_side(net, smaller)
        for name, value in smaller.items():
            h, w = (max(int(p), int(round(int(d) * side))) for p, d in zip(value.shape[2:], declared[name][2:]))
            rows = np.arange(h) * value.shape[2] // h  # (nearest neighbour: values do not change a timing)
            cols = np.arange(w) * value.shape[3] // w
            feed[name] = np.ascontiguousarray(value[:, :, rows][:, :, :, cols])
        return feed

    def latency_side(self, net: Net, probes: Mapping[str, np.ndarray]) -> float:
        """The fraction of its declared height and width a fully convolutional net is timed at: 1 when one
        1-thread forward there is estimated within LATENCY_SAMPLE_MS (from the original's validation run on
        the probes, per input, times LATENCY_THREAD_FACTOR for one thread, times the area ratio), else the
        fraction that brings it there (never below the probes'). Kept in the timing cache, so the plan and
        the run that follows it time the same size."""
        declared = net.input_shapes()
        area = max(float(np.prod([int(d) for d in declared[k][2:]])) / float(np.prod(v.shape[2:]))
                   for k, v in probes.items())
        key = timing.DiskCache.key("latency side", timing.signature(net.layers),
                                   {k: list(v) for k, v in declared.items()}, {k: list(v.shape) for k, v in probes.items()})

        def estimate() -> float:
            if not self.reference_ms:
                return 1.0 / math.sqrt(area)  # (not measured: the probes' size)
            full_ms = self.reference_ms * LATENCY_THREAD_FACTOR * area
            return float(np.clip(math.sqrt(LATENCY_SAMPLE_MS / full_ms), 1.0 / math.sqrt(area), 1.0))

        return self._measured(key, estimate)

    def _load_for_timing(self, model: Net):
        return self.cv.load_kept(model, what="timing")

    def time_original(self, net: Net, inputs: plan_inputs.Inputs) -> None:
        """A big original's latency (timing.BIG_NET_BYTES), 1 thread and default threads, measured early while
        little else is held; a smaller one is timed alternating with each plan (latency())."""
        if not timing.big_net(net):
            return
        with self.timer.stage("timing"):
            self.say("timing the original model")
            feed = self._latency_feed(net, inputs)
            self.net_ms(net, feed)
            if not self.plan_only:  # (the report's default-thread figure)
                self.net_ms(net, feed, threads=timing.default_threads(), budget_s=timing.NET_BUDGET_S / 4)

    def net_ms(self, model: Net, feed: Mapping[str, np.ndarray], *, threads: int = 1,
               budget_s: float = timing.NET_BUDGET_S / 2, again: bool = False) -> float:
        """A big net's median latency (timing.big_net), measured alone, once per run (``again``: measured anew,
        and kept; the network loaded for it is released at once, not kept loaded beside the next one -- peak
        memory): never taken from the timing cache alone, since the other side of its comparison is
        measured now (latency())."""
        key = timing.DiskCache.key("net", timing.signature(model.layers),
                                   {k: list(v.shape) for k, v in feed.items()}, threads)
        if again or key not in self._net_ms:
            load = (lambda m: self.cv.load(m, what="timing")) if again else self._load_for_timing
            self._net_ms[key] = timing.median_ms(load, model, feed, threads=threads, budget_s=budget_s,
                                                 max_runs=timing.BIG_NET_RUNS)
        return self._net_ms[key]

    def _measured(self, key: str, measure: Callable[[], float]) -> float:
        """A whole-net timing measured once per structure on this machine: kept for the run and in the timing
        cache (the real run after --plan-only, or a rerun, makes the same decisions)."""
        disk = self.guard.disk if self.guard is not None else None
        value = self._net_ms.get(key) or (disk.get(key) if disk else None)
        if value is None:
            value = measure()
            if disk:
                disk.put(key, value)
        self._net_ms[key] = value
        return value

    def latency(self, net: Net, new_net: Net, inputs: plan_inputs.Inputs, *, threads: int = 1,
                budget_s: float = timing.NET_BUDGET_S / 2) -> timing.Latency:
        """The original's and the rewritten net's median latency on one input of the declared shape, in
        alternating runs (both see the same machine state), or for a big original (timing.BIG_NET_BYTES) one
        net at a time. Both sides come from one run and are cached as a pair (_measured): a cached original
        measured on another day is never set against a plan measured now (GenderNet's T = 0.5 plan, 1.08x
        faster, read 0.93x against an original cached by an earlier run, and lost every factorization)."""
        self.say("timing the written model against the original")
        feed = self._latency_feed(net, inputs)
        apart = timing.big_net(net)
        key = timing.DiskCache.key("apart" if apart else "pair", timing.signature(net.layers),
                                   timing.signature(new_net.layers), {k: list(v.shape) for k, v in feed.items()},
                                   threads)
        pair: list[timing.Latency] = []

        def measured() -> timing.Latency:  # (both sides of this run, only when the pair is not cached)
            if not pair:
                pair.append(self._apart(net, new_net, feed, threads=threads, budget_s=budget_s) if apart else
                            timing.compare(self._load_for_timing, net, new_net, feed, threads=threads,
                                           budget_s=budget_s, max_runs=timing.NET_MAX_RUNS))
            return pair[0]

        return timing.Latency(self._measured(f"{key}:original", lambda: measured().original_ms),
                              self._measured(f"{key}:compressed", lambda: measured().compressed_ms))

    def _apart(self, net: Net, new_net: Net, feed: Mapping[str, np.ndarray], *, threads: int,
               budget_s: float) -> timing.Latency:
        """A big net's pair, one net at a time. The original's median was taken early (time_original), and a VM
        drifts by 10-20% within a run (GenderNet's original: 37-44 ms between runs minutes apart), so a plan
        that reads slower is set against the original timed again right after it: a near-neutral plan
        (GenderNet T = 0.5, 1.03-1.10x in single runs) otherwise lost every factorization on a drift."""
        original = self.net_ms(net, feed, threads=threads, budget_s=budget_s)
        compressed = self.net_ms(new_net, feed, threads=threads, budget_s=budget_s)
        if original < timing.LATENCY_TOLERANCE * compressed:
            original = self.net_ms(net, feed, threads=threads, budget_s=budget_s, again=True)
        return timing.Latency(original, compressed)

    def write_and_verify(self, net, new_net, prefix, store_fp16, specs, reference, inputs, *, screen: bool = False,
                         optional: bool = False):
        """Write the plan and validate it on every input, or (``screen``) on the first SCREEN_SHARE of them in
        the decisive order: a provisional verdict that complete() finishes. ``optional``: a plan the search
        can do without (a refinement), for which a miss on the screened share is final (see verify)."""
        self.say("writing the model")
        with self.timer.stage("write"):
            staged = io.stage(new_net, prefix, protect=(Path(self.deploy), Path(self.weights)), fp16=store_fp16)
        try:
            if not self.validate_output:
                return _Verdict((), ()), staged
            self.say("validating with OpenCV")
            with self.timer.stage("validate"):
                rows = self.screen_rows(specs, inputs) if screen else None
                return self.verify(net, new_net, staged, specs, reference, inputs, end=rows,
                                   optional=optional), staged
        except BaseException:
            staged.discard()
            raise

    def complete(self, net, new_net, staged: io.StagedModel, verdict: "_Verdict", specs, reference,
                 inputs) -> "_Verdict":
        """The full verdict of a provisional one: the inputs it has not judged yet (ending early at a certain
        miss), then every check on every input."""
        self.say("validating on the remaining inputs")
        with self.timer.stage("validate"):
            return self.verify(net, new_net, staged, specs, reference, inputs, before=verdict)

    @staticmethod
    def validation_count(inputs) -> int:
        return next(iter(inputs.validation.values())).shape[0]

    def per_input(self, specs, total: int) -> list:
        """The outputs with one value per validation input (not, e.g., SSD priors)."""
        return [s for s in specs if self.reference_in_order[s.name].shape[0] == total]

    def screen_rows(self, specs, inputs) -> int | None:
        """How many inputs a screened round judges (whole chunks), or None: all of them (few inputs, forced
        ranks measured in full, or no output with one value per input to judge on part of them)."""
        total = self.validation_count(inputs)
        rows = -(-total // SCREEN_SHARE)
        rows = -(-rows // RUN_CHUNK) * RUN_CHUNK
        if rows >= total or not self.per_input(specs, total) or not self.enforced:
            return None
        return rows

    def verify(self, net, new_net, staged: io.StagedModel, specs, reference, inputs, *, end: int | None = None,
               before: "_Verdict | None" = None, optional: bool = False) -> "_Verdict":
        """Run the staged model on the validation inputs in the decisive order, from where ``before`` (a
        provisional verdict) stopped, up to ``end`` (None: all); a certain miss ends the run early. A miss on
        the share up to ``end`` is an estimate, settled on the rest of the inputs -- unless the plan is
        ``optional``: a refinement that does not pass its screened share clearly is not worth the rest."""
        _, sources = blob_sources(new_net)
        names = compared_blobs(net)
        total = self.validation_count(inputs)
        order = self.validation_order if self.validation_order is not None else np.arange(total)
        start, end = (before.screened if before else 0), (end or total)
        earlier = dict(before.outputs) if before else {}
        lost: list = []
        segment = self.run_order(start, end)  # (positions in the decisive order, as run)
        positions = np.concatenate([np.arange(start), segment, np.arange(end, total)])
        reordered = bool(np.any(segment != np.arange(start, end)))
        reference_as_run = {k: v[positions] if v.shape[0] == total else v
                            for k, v in self.reference_in_order.items()} if reordered else self.reference_in_order

        def joined(partial) -> dict:
            return {n: np.concatenate([earlier[n], partial[s]]) if n in earlier else partial[s]
                    for n, s in zip(names, sources)}

        def stop(partial, count) -> bool:  # a miss already certain (or projected): the round ends early
            done = joined(partial)
            self.remember_changes(specs, reference_as_run, done, positions[:start + count])
            lost.extend(contract.certain_misses(specs, reference_as_run, done, start + count, total=total,
                                                likely=self.projects_misses(inputs), **self.judging(inputs)))
            return bool(lost)

        values = self.cv.run(new_net, inputs.validation, sources, what=f"compressed model {staged.prototxt}",
                             files=(staged.temp_prototxt, staged.temp_caffemodel),
                             stop=stop if self.enforced else None, order=order[segment])
        if lost:
            return _Verdict(tuple(lost), ())
        if reordered:  # (the segment's outputs in the decisive order again)
            back = np.argsort(segment, kind="stable")
            values = {k: v[back] if v.shape[0] == len(segment) else v for k, v in values.items()}
        got = joined(values)
        self.remember_changes(specs, self.reference_in_order, got, np.arange(end))
        if end < total:
            screened = self.screened(specs, got, end, inputs)
            if screened.passed or optional:
                return screened
            # (a miss on a share of the inputs is an estimate, unlike a certain one: the rest decide it now)
            return self.verify(net, new_net, staged, specs, reference, inputs, before=screened)
        compressed = self.in_input_order(got)
        return replace(self.judge(specs, reference, compressed, inputs), outputs=compressed)

    def projects_misses(self, inputs) -> bool:
        """Whether a round may end on a projected miss (contract.certain_misses, likely): on natural-image
        probes, drawn independently and judged in the order drawn (no decisive_order), and for a plan of the
        tool's own (a --rank the user gave is judged on every input, or ends on a certain miss)."""
        return inputs.synthetic and self.validation_order is None and not self.ranks

    def run_order(self, start: int, end: int) -> np.ndarray:
        """The positions start..end of the decisive order in the order to run them: where a miss can only be a
        changed class (contract.decided_by_changes), the inputs whose answer an earlier plan changed go first
        -- a plan near it tends to change the same ones, so a missing round ends after one chunk. The same
        inputs are run either way (a screened round's share is unchanged), so the verdict is too."""
        segment = np.arange(start, end)
        if self.changed is None:
            return segment
        first = self.changed[segment]
        return np.concatenate([segment[first], segment[~first]])

    def remember_changes(self, specs, reference: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray],
                         positions: np.ndarray) -> None:
        """Mark the counted inputs (decisive-order ``positions``, as ``got`` holds them) whose answer changed."""
        if self.changed is None:
            return
        changed = contract.changed_answers(specs, reference, got, len(positions))
        self.changed[positions[changed]] = True

    def screened(self, specs, got: Mapping[str, np.ndarray], count: int, inputs) -> "_Verdict":
        """The provisional verdict on the first ``count`` inputs in the validation order (``got`` in that
        order): every check of an output with one value per input, on those inputs alone."""
        total = self.validation_count(inputs)
        ref = {k: v[:count] if v.shape[0] == total else v for k, v in self.reference_in_order.items()}
        checks = tuple(contract.check_all(self.per_input(specs, total), ref, got, **self.judging(inputs)))
        return _Verdict(checks, (), outputs=dict(got), screened=count)

    def judge(self, specs, reference, compressed: Mapping[str, np.ndarray], inputs) -> "_Verdict":
        """The fidelity verdict of ``compressed`` outputs against the original's ``reference``."""
        agreements = tuple(validate.compare_outputs(reference, compressed))
        checks = tuple(contract.check_all(specs, reference, compressed, **self.judging(inputs)))
        if not checks:
            raise ValidationError(f"{self.deploy}: validation compared no output")
        return _Verdict(checks, agreements)

    def judging(self, inputs) -> dict:
        """The trade-off the contract is judged at, and its options."""
        return {"tradeoff": self.tradeoff if self.enforced else DEFAULT_TRADEOFF,
                "min_fidelity": self.min_fidelity,
                "margin": contract.SYNTHETIC_MARGIN if inputs.synthetic else 1.0, "synthetic": inputs.synthetic}

    def _nothing(self, net, plan, misses, inputs, rounds, *, slower: bool = False, why: str = "") -> Report:
        if plan is None:
            plan = planner.build_plan(net, [], {}, {}, self.tradeoff, 0.0)
        note = why or (NOTHING_FASTER if slower else NOTHING_TO_COMPRESS)
        if misses and not slower and not why:
            note += f" (the smallest plan tried missed it: {misses[-1]})"
        return self._report(net, net, plan, _Verdict((), ()), None, inputs, net.stored_fp16, rounds,
                            note=note)

    def _report(self, net, new_net, plan, verdict, staged, inputs, store_fp16, rounds,
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
            bytes_after=staged.temp_caffemodel.stat().st_size if staged else weights_path.stat().st_size,
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


@dataclass
class _ClosedLoop:
    """The largest budget on the ladder whose plan meets the contract, walking down from T's rung.

    Every T walks the same fixed ladder (search.budget_ladder), so a larger T starts higher and stops no
    lower; plans already judged are not written again, and at most MAX_ROUNDS distinct plans are (see
    search(): at most WALK_FIRST + 1 + log2 of the ladder's length rounds, WALK_FIRST + 1 when nothing passes),
    then at most REFINE_ROUNDS one-layer moves from the plan that passed (refine()).
    """

    run: "_Run"
    net: Net
    prefix: Path
    candidates: list
    skipped: dict
    specs: list
    reference: dict
    inputs: plan_inputs.Inputs
    state: _LoopState = field(default_factory=_LoopState)
    screening: bool = True  # rounds judged on a share of the inputs first (SCREEN_SHARE), then confirm()

    @property
    def store_fp16(self) -> bool:
        return self.net.stored_fp16 if self.run.fp16 is None else bool(self.run.fp16)

    def execute(self) -> tuple[Report, io.StagedModel | None]:
        """The report and the staged pair that passed (not yet published), or (report, None)."""
        r, state = self.run, self.state
        ladder = search.budget_ladder(r.tradeoff) if self.candidates else [0.0]
        default = None
        try:
            self.search(ladder)
            if self.unpredicted():
                self.search(ladder)
            if state.best is not None:
                self.refine()
            self.confirm(ladder)
            if state.best is not None:
                r.cv.keep(self.net)  # the original: loaded once for all its whole-model timings
                try:
                    self.not_slower()
                    default = self.default_latency()
                finally:
                    r.cv.forget()
            if state.best is None and r.force:
                self.attempt(0.0)  # --force: an unchanged copy when every plan misses
            if state.best is None:
                # (every plan missed: the layers' rows still show what the analysis found)
                plan = state.empty_plan or planner.build_plan(self.net, self.candidates, {}, self.skipped,
                                                              r.tradeoff, 0.0)
                return r._nothing(self.net, plan, state.misses, self.inputs, state.rounds,
                                  slower=bool(state.dropped), why=state.unworthy), None
            staged, plan, verdict = state.best
            new_net = self.net_of(plan)
            r.written_net, r.written_outputs = new_net, verdict.outputs
            report = r._report(self.net, new_net, plan, verdict, staged, self.inputs, self.store_fp16, state.rounds)
            if state.latency is not None and default is not None:
                report = replace(report, latency_ms={
                    "original_1t": state.latency.original_ms, "compressed_1t": state.latency.compressed_ms,
                    "original_default": default.original_ms, "compressed_default": default.compressed_ms,
                    "default_threads": timing.default_threads(),
                    "input_shapes": {k: list(v.shape) for k, v in r._latency_feed(self.net, self.inputs).items()},
                    "declared_shapes": {k: [1, *v[1:]] for k, v in self.net.input_shapes().items()}})
            return report, staged
        except BaseException:
            state.discard()
            raise

    def unpredicted(self) -> bool:
        """Whether to search again with conservative gains: every plan missed, down to the lowest rung, while
        some layer's measured gain is below 1 (its error predicted to fade before the outputs). The gains
        measured on the planning inputs then did not predict the contract -- a softmax saturated on them
        hides a layer's change there (a gain of 1e-80), and every rung plans the same cuts -- so the
        search runs once more with each gain at least 1 (a layer's whole error reaches the outputs: the
        assumption where a gain is not measured) rather than say that nothing can be gained."""
        r, state = self.run, self.state
        if state.best is not None or r.ranks or not state.misses or all(c.gain >= 1.0 for c in self.candidates):
            return False
        self.candidates = [replace(c, gain=max(c.gain, 1.0)) for c in self.candidates]
        r.say("the measured sensitivities did not predict the misses: planning again with each layer's whole "
              "error reaching the outputs")
        return True

    def confirm(self, ladder: Sequence[float]) -> None:
        """Judge the chosen plan on the validation inputs its screened round did not see; when it misses
        there, the plan that passed before it is judged in turn, and when none is left the search runs again
        with every round judged in full. Every plan published, and every later round, is judged on all."""
        r, state = self.run, self.state
        screened = False
        while state.best is not None and state.best[2].screened:
            screened = True
            staged, plan, verdict = state.best
            full = r.complete(self.net, self.net_of(plan), staged, verdict, self.specs, self.reference, self.inputs)
            if full.passed:
                state.best = (staged, plan, full)
                break
            state.tried[state.best_key] = False
            budget = state.best_budget
            state.fall_back()
            self.missed(full, _chosen_of(plan), budget)
        state.confirmed()
        self.screening = False
        if screened and state.best is None:
            state.forget_passes()
            self.search(ladder)

    def net_of(self, plan: planner.Plan) -> Net:
        """The Net of a plan that was built before (the staged best's: see _LoopState.best). Built again at each
        call, not kept: the rebuild is a few scaled slices (milliseconds), while a Net kept through the speed
        checks' loads added 20-25 MB to GenderNet --seed 2's peak."""
        return self.run.factorizer.build(plan, again=True)[0]

    def default_latency(self) -> timing.Latency | None:
        """The published plan's latency with OpenCV's default thread count, for the report (--plan-only
        skips it)."""
        r, state = self.run, self.state
        if state.best is None or state.latency is None or r.plan_only:
            return None
        with r.timer.stage("timing"):
            return r.latency(self.net, self.net_of(state.best[1]), self.inputs, threads=timing.default_threads(),
                             budget_s=timing.NET_BUDGET_S / 4)

    def search(self, ladder: Sequence[float]) -> None:
        """The largest rung whose plan passes: walk down WALK_FIRST rungs from T's own (the answer is
        usually near the top), then try the lowest (if even that most cautious plan misses, stop: nothing
        can be gained), then bisect between -- assuming a plan that passes at a budget passes at every
        smaller one, this finds the rung a walk down would. A miss by a wide margin skips the rungs that
        would still miss (search.rungs_to_skip); a pass after a skip bisects back up. Two misses whose
        measured error does not follow the prediction (search.not_steering) end the walk early."""
        self.run.progress.stage("searching the plan: write, validate in OpenCV")
        failing, i, last = -1, 0, None
        for _ in range(WALK_FIRST):
            if i >= len(ladder):
                break
            result = self.attempt(ladder[i])
            if self.run.ranks:
                return
            if result is not False:  # (right below a miss, nothing is left to bisect)
                return self.bisect(ladder, failing, i)
            failing, i = i, i + 1 + search.rungs_to_skip(self.state.excess)
            before, last = last, (self.state.excess, self.state.predicted)
            if search.not_steering(before, last):
                self.run.say("the measured error does not follow the predicted one: trying the lowest budget")
                break
        lowest = len(ladder) - 1
        if lowest <= failing or self.attempt(ladder[lowest]) is False:
            return  # (None, nothing factored at the lowest budget, says nothing of the rungs above: bisect)
        self.bisect(ladder, failing, lowest)

    def bisect(self, ladder: Sequence[float], failing: int, passing: int) -> None:
        """Between a rung that missed and a lower one that passed (or factored nothing)."""
        while passing - failing > 1 and self.state.rounds < search.MAX_ROUNDS:
            middle = (failing + passing) // 2
            result = self.attempt(ladder[middle])
            if result is False:
                failing = middle
            else:  # passed, or nothing factored (then nothing is below either): look above
                passing = middle

    def attempt(self, budget: float, chosen: Mapping[str, tuple] | None = None, *, optional: bool = False
                ) -> bool | None:
        """True: the plan passed (and is kept staged); False: missed; None: nothing to factor.
        The plan is the planner's for ``budget``, or ``chosen`` (a refinement: ``budget`` labels it;
        ``optional``: one the search can do without, see verify)."""
        release_memory()
        built = self.build(budget) if chosen is None else self.build_chosen(
            chosen, planner.predicted_error(self.candidates, chosen), budget)
        if built is None or isinstance(built, bool):
            # (a plan judged before, or none: no new measure of how far it missed)
            self.state.excess, self.state.predicted = 1.0, None
            return built
        key, chosen, new_net, plan = built
        r, state = self.run, self.state
        state.predicted = plan.predicted_error
        r.say(f"round {state.rounds + 1}: {len(chosen)} layers factored (budget {budget:.3g}, predicted error "
              f"{plan.predicted_error:.3g})")
        verdict, staged = r.write_and_verify(self.net, new_net, self.prefix, self.store_fp16, self.specs,
                                             self.reference, self.inputs, screen=self.screening, optional=optional)
        state.rounds += 1
        state.excess = search.excess(verdict.checks)
        passed = verdict.passed or not r.enforced
        state.tried[key] = passed
        if passed:
            state.keep(staged, plan, verdict, key, budget)
            return True
        staged.discard()
        state.missed_at.setdefault(budget, dict(chosen))
        state.missed_by.setdefault(budget, (plan.predicted_error, state.excess))
        self.missed(verdict, chosen, budget)
        return False

    def build(self, budget: float):
        """(key, chosen, new_net, plan) for a budget, without the factorizations measured slower;
        None when nothing is factored, a bool when this exact plan was already judged."""
        r = self.run
        with r.timer.stage("plan"):
            chosen, predicted = planner.choose_ranks(self.candidates, r.tradeoff, forced=r.forced(), budget=budget,
                                                     objective=r.objective, min_speedup=r.guard.required)
        return self.build_chosen(chosen, predicted, budget)

    def build_chosen(self, chosen: Mapping[str, tuple], predicted: float, budget: float):
        """build() for a given choice of forms and ranks."""
        r, state = self.run, self.state
        chosen, reasons = dict(chosen), {**self.skipped, **state.dropped}
        for name in [n for n in chosen if (n, chosen[n]) in state.slow]:
            reasons[name] = state.slow[(name, chosen.pop(name))]
        while True:
            plan = replace(planner.build_plan(self.net, self.candidates, chosen, reasons, r.tradeoff, predicted),
                           error_budget=budget)
            if not chosen and r.tradeoff > 0 and not r.force:
                state.empty_plan = plan
                return None
            key = tuple(sorted(chosen.items()))
            if key in state.tried:
                return state.tried[key]
            with r.timer.stage("decompose"):
                r.say("rewriting the network")
                new_net, plan = r.factorizer.build(plan)
                new_net.check()
            with r.timer.stage("timing"):
                predicted_speed = {lp.layer: lp.time_before / lp.time_after for lp in plan.layers
                                   if lp.rank and lp.time_before and lp.time_after}
                slow = self.guard_slow(new_net, chosen, predicted_speed)
            if not slow:
                return key, chosen, new_net, plan
            for name, why in slow.items():
                state.slow[(name, chosen.pop(name))] = why
                reasons[name] = why

    def refine(self) -> None:
        """From the plan that passed, one layer at a time toward the plan that missed on the rung above
        (and, for a layer both keep, toward its cheapest option that fits T's own budget with the plan as it
        then is -- or less, search.fitting_budget, where the miss above measured how far the error went:
        planner.fitting_moves; no move's predicted error goes beyond T's budget): the budget search
        moves every layer at once, and a class check that allows no changed answer can miss on one layer's
        account. Each move that lowers the objective's cost is tried, the largest saving first, at most
        REFINE_ROUNDS new plans; a move that passes is kept, one that misses is tried again half as far -- a
        miss on the screened share of the inputs counts as one (``optional``: not settled on the rest, which
        costs up to a whole validation pass for a move that is rarely taken after a narrow miss there). Only
        when all the moves together would make the plan REFINE_MIN_GAIN cheaper: a round costs a validation
        pass, and after a search that already ended close, little is left."""
        r, state = self.run, self.state
        above = [b for b in state.missed_at if b > state.best_budget]
        if state.best is None or r.ranks or not above:
            return
        label, spent, top = min(above), 0, search.budget_ladder(r.tradeoff)[0]
        tried_fits: set[str] = set()
        target = dict(state.missed_at[label])
        room = search.fitting_budget(top, *state.missed_by.get(label, (None, 1.0)))

        def steps_from(current: Mapping[str, tuple]) -> list:
            # (a kept layer's move is chosen again from each plan that passes, to fit the budget with it)
            fits = planner.fitting_moves(self.candidates, current, room, r.objective, r.guard.required)
            fits = {name: choice for name, choice in fits.items() if name not in tried_fits}
            return planner.cheaper_steps(self.candidates, current, {**fits, **target}, r.objective)

        best = _chosen_of(state.best[1])
        if (planner.objective_cost(self.candidates, {**best, **dict(steps_from(best))}, r.objective)
                > (1 - REFINE_MIN_GAIN) * planner.objective_cost(self.candidates, best, r.objective)):
            return  # (little to gain: not worth the rounds)
        while spent < REFINE_ROUNDS:
            current = _chosen_of(state.best[1])
            steps = steps_from(current)
            if not steps:
                return
            name, choice = steps[0]
            before, move = state.rounds, {**current, name: choice}
            # (a move beyond T's own budget counts as a miss, without a round)
            passed = planner.predicted_error(self.candidates, move) <= top and self.attempt(
                label, move, optional=True) is True
            spent += state.rounds - before  # (no round: a plan judged before, or one of slow layers only)
            if not (passed and state.rounds > before):  # a move that missed: next time half of it
                middle = planner.halfway(self.candidates, name, current.get(name), choice)
                tried_fits.add(name)
                if middle is None:
                    target.pop(name, None)
                else:
                    target[name] = middle

    def guard_slow(self, new_net: Net, chosen: Mapping[str, tuple], predicted: Mapping[str, float]) -> dict:
        return self.run.guard.slow_layers(new_net, chosen, self.run.forced(), predicted)

    def missed(self, verdict: "_Verdict", chosen: Mapping[str, int], budget: float) -> None:
        r, state = self.run, self.state
        if not chosen:
            raise ValidationError(f"{r.deploy}: the model's outputs are not reproducible in OpenCV (an "
                                  f"unchanged copy misses the contract: {verdict.first_miss()})")
        state.misses.append(verdict.first_miss())
        log.info("round %d (budget %.4g) misses the contract: %s", state.rounds, budget, state.misses[-1])
        if r.ranks:
            raise ValidationError(f"the forced ranks break the fidelity contract at T = {r.tradeoff:g}: "
                                  f"{state.misses[-1]}; raise the ranks or the trade-off")
        r.say(f"backing off: {state.misses[-1]}")

    def worth_writing(self, staged: io.StagedModel, latency: timing.Latency) -> None:
        """Discard a plan that gains on neither axis beyond the speed check's noise allowance (less than
        1 / LATENCY_TOLERANCE smaller and faster): measured within noise of the original's speed, it may run
        slower where it is deployed, for a file barely smaller (RetinaFace: 1.02x smaller, 0.98-1.02x in
        four timings of one plan, 0.94x in one bench). Not under --objective size, nor for --rank."""
        r = self.run
        clear = 1.0 / timing.LATENCY_TOLERANCE
        smaller = Path(r.weights).stat().st_size / max(staged.temp_caffemodel.stat().st_size, 1)
        if r.objective == "size" or r.ranks or smaller >= clear or latency.speedup >= clear:
            return
        self.state.unworthy = (f"not worth writing: the best plan that met the fidelity contract was only "
                               f"{smaller:.2f}x smaller and measured {latency.speedup:.2f}x the original's speed "
                               f"in OpenCV, within the {1 - timing.LATENCY_TOLERANCE:.0%} noise allowance: not "
                               "worth a model that may run slower; try a higher T or --objective size")
        self.state.discard()

    def not_slower(self) -> None:
        """Drop the slowest factorizations while the whole model measures slower than the original (at most
        MAX_SPEED_ROUNDS drops); a plan still slower after the last one is not published."""
        r, state = self.run, self.state
        r.progress.stage("timing the written model against the original")
        for drops in range(MAX_SPEED_ROUNDS + 1):
            staged, plan, verdict = state.best
            new_net = self.net_of(plan)
            with r.timer.stage("timing"):
                state.latency = r.latency(self.net, new_net, self.inputs)
            if r.objective == "size" or state.latency.speedup >= timing.LATENCY_TOLERANCE:
                if _chosen_of(plan):  # (an unchanged copy -- T = 0, --force -- is what was asked for)
                    self.worth_writing(staged, state.latency)
                return
            chosen = {name: choice for name, choice in _chosen_of(plan).items() if name not in r.ranks}
            if not chosen:
                return  # (forced ranks only: the user's choice)
            slower = f"dropped: the model with it measured {1 / state.latency.speedup:.2f}x slower in OpenCV"
            if drops == MAX_SPEED_ROUNDS:  # still slower: nothing is published rather than a slower model
                state.dropped.update({name: slower for name in chosen})
                state.discard()
                return
            worst = min(chosen, key=lambda n: r.guard.speedup(new_net, n, chosen[n]))
            state.slow[(worst, chosen[worst])] = state.dropped[worst] = slower
            rest = {name: choice for name, choice in _chosen_of(plan).items() if name != worst}
            state.discard()
            state.forget_passes()
            if self.attempt(state.best_budget, rest) is not True:  # (the same plan, but for that layer)
                return
