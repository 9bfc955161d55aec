"""The planning stage: activations -> per-layer candidates -> per-layer gains -> a ladder of budgets.

OpenCV is reached only through a ``run(net, inputs, sources) -> {source: array}`` callable that the
pipeline provides, so this module never touches files or protobuf.
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import Callable, Hashable, Mapping, MutableMapping, Sequence

import numpy as np
from threadpoolctl import threadpool_limits

from .. import tail
from ..memory import one_heap
from ..runner import Source, blob_sources
from ..net import Layer, Net, conv_geometry
from .analyse import (
    METHOD_CP, METHOD_SVD, METHOD_TUCKER, MIN_RANK_DIVISOR, PATCH_SAMPLES, Candidate, ConvData, RankCap, Workspace,
    conv_data, analyse_convolution, cp_grid,
    analyse_inner_product, approximate_weight, error_budget, layer_forms, sample_patches, totals_of,
)

log = logging.getLogger(__name__)

Run = Callable[[Net, Mapping[str, np.ndarray], Sequence[Hashable]], dict]
Say = Callable[[str], None]

CP_ITERATIONS = 20  # ALS sweeps at the top of a layer's rank grid (fewer further down)
NEGLIGIBLE_COST_SHARE = 0.005  # a layer below 0.5% of params+MACs gets no sensitivity trial
TIMED_BYTES = 8 << 20  # the largest factored form a planning micro-benchmark loads (see timing_ranks)
ACTIVATION_BYTES = 64 << 20  # activations held at once while probing (samples run in chunks)
GAIN_SAMPLES = 4  # planning samples a sensitivity trial runs (the gain is a ratio: a few samples settle it)
MAX_ROUNDS = 12  # distinct plans the closed loop writes and measures at most
ANALYSIS_WORKERS = min(os.cpu_count() or 1, 4)  # layers analysed side by side
BESIDE_BYTES = 8 << 20  # layers analysed at once hold at most the heaviest one's weight bytes plus this (peak memory)
HALF_RUNG_ERROR = 2.0 ** 0.25  # an error ratio of half a rung of the budget ladder (sqrt 2 a rung)
MIN_BUDGET_EXPONENT = -7  # the smallest budget tried is 2^-7 (a 0.8% predicted output change)


@dataclass(frozen=True)
class LayerInput:
    """What the analysis keeps of one layer's input: sampled conv patches, or InnerProduct rows."""

    shape: tuple[int, ...]  # the full input shape (all probe samples)
    patches: np.ndarray | None = None  # (P, C, kh, kw) for convolutions
    rows: np.ndarray | None = None  # the whole input, for InnerProduct (small)


def conv_out_shape(layer: Layer, in_shape: tuple[int, ...]) -> tuple[int, ...]:
    geo = conv_geometry(layer)
    b, _, h, w = in_shape
    oh = (h + 2 * geo.pad[0] - (geo.dilation[0] * (geo.kernel[0] - 1) + 1)) // geo.stride[0] + 1
    ow = (w + 2 * geo.pad[1] - (geo.dilation[1] * (geo.kernel[1] - 1) + 1)) // geo.stride[1] + 1
    return (b, geo.num_output, oh, ow)


def collect_inputs(run: Run, net: Net, inputs: Mapping[str, np.ndarray], sources: Mapping[str, Hashable],
                   outputs: Sequence[Hashable], *, seed: int,
                   measured: Callable[[int], None] | None = None) -> tuple[dict[str, LayerInput], dict]:
    """Run the original net on ``inputs`` in chunks; keep sampled patches per layer and the outputs.

    sources : {layer name: source of its input blob}; outputs : sources of the compared outputs.
    measured : called with the bytes the recorded blobs take over all samples, once one sample has measured
        them (the caller may release a network it kept loaded, before large activations add to the peak).
    """
    count = next(iter(inputs.values())).shape[0]
    rng = np.random.default_rng(seed)
    wanted = list(dict.fromkeys([*sources.values(), *outputs]))
    first = run(net, {k: v[:1] for k, v in inputs.items()}, wanted)
    per_sample = sum(v.nbytes for v in first.values())
    if measured is not None:
        measured(per_sample * count)
    chunk = max(1, min(count, ACTIVATION_BYTES // max(per_sample, 1)))
    pieces: dict[str, list] = {name: [] for name in sources}
    shapes: dict[str, tuple[int, ...]] = {}
    out_parts: dict = {o: [] for o in outputs}
    for start in range(0, count, chunk):
        part = first if start == 0 and chunk == 1 else run(
            net, {k: v[start:start + chunk] for k, v in inputs.items()}, wanted)
        n = next(iter(part.values())).shape[0] if part else 0
        for name, source in sources.items():
            x = part[source]
            shapes[name] = (count,) + tuple(x.shape[1:])
            layer = net.layer(name)
            if layer.type == "Convolution" and x.ndim == 4:
                want = max(1, round(PATCH_SAMPLES * n / count))
                pieces[name].append(sample_patches(x, layer, conv_out_shape(layer, x.shape), rng, want))
            else:
                pieces[name].append(x)
        for o in outputs:
            out_parts[o].append(part[o])
        del part
    layer_inputs = {}
    for name in list(pieces):
        # each layer's chunks are released as they are joined: a second copy of every layer's patches is never
        # held at once (OpenPose-sized nets record 1.5 GB of them)
        parts = pieces.pop(name)
        layer = net.layer(name)
        joined = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        del parts
        if layer.type == "Convolution" and len(shapes[name]) == 4:
            layer_inputs[name] = LayerInput(shapes[name], patches=joined)
        else:
            layer_inputs[name] = LayerInput(shapes[name], rows=joined)
    return layer_inputs, {o: np.concatenate(out_parts.pop(o), axis=0) for o in list(out_parts)}


def analyse_layers(decomposable: Sequence[tuple[Layer, str]], layer_inputs: MutableMapping[str, LayerInput], *,
                   ranks: dict[str, int], forms: Mapping[str, str], ws: Workspace, seed: int, timings: dict,
                   say: Say, cp_rank_cap: RankCap | None = None) -> tuple[list[Candidate], dict[str, str]]:
    """Candidates for every decomposable layer in each of its exact forms (``forms`` restricts a layer to
    one; a forced rank without a form means the layer's primary form), and the reasons of those left alone.
    ``cp_rank_cap``: the largest CP rank of a layer worth analysing (see analyse.RankCap).

    The layers' forms are analysed side by side on the machine's cores (ANALYSIS_WORKERS, BLAS one thread
    each: the small kernels' ALS is per-call overhead, one core each), the most work first (_task_work), as
    many at once as their weights allow (side_by_side); each form's result is its own, whatever ran beside it.
    The CP caps time OpenCV first, one layer after the other.
    A forced rank that would not reduce the layer's parameters is dropped from ``ranks``. A convolution's
    patches are dropped from ``layer_inputs`` once its last form is analysed (peak memory: an OpenPose-sized
    net records 1.5 GB of them, 7x its weights).
    """
    jobs = []
    for layer, method in decomposable:
        forced = ranks.get(layer.name)
        if layer.name in forms:
            methods = (forms[layer.name],)
        else:
            methods = (method,) if forced is not None else layer_forms(layer, method)
        jobs.append((layer, method, methods, forced))
    caps = _cp_caps(jobs, layer_inputs, cp_rank_cap)  # (OpenCV timings: nothing else runs meanwhile)
    fixed_cap = (lambda layer, _ranks: caps.get(layer.name)) if caps else None
    prepared: dict[str, ConvData] = {}
    left = Counter(layer.name for layer, _, methods, _ in jobs for _ in methods)  # forms not yet analysed
    lock = threading.Lock()  # (the layer's prepared patches, made once for its forms; the timings; left)

    def analyse(task) -> Candidate | str:
        layer, method, form, forced = task
        start = time.perf_counter()
        data = layer_inputs[layer.name]
        if method == METHOD_SVD:
            cand = analyse_inner_product(layer, data.rows, min_rank_divisor=MIN_RANK_DIVISOR, ws=ws, forced_rank=forced)
        elif data.patches is None:
            return f"input is {len(data.shape)}-D; only 2-D convolutions are decomposed"
        else:
            with lock:
                if layer.name not in prepared:
                    prepared[layer.name] = conv_data(layer, data.patches)
            cand = analyse_convolution(layer, data.patches, data.shape, conv_out_shape(layer, data.shape), form,
                                       min_rank_divisor=MIN_RANK_DIVISOR, seed=seed, ws=ws, cp_iterations=CP_ITERATIONS,
                                       forced_rank=forced, data=prepared[layer.name], cp_rank_cap=fixed_cap)
        with lock:
            timings[f"analyse/{layer.name}"] = timings.get(f"analyse/{layer.name}", 0.0) + time.perf_counter() - start
            left[layer.name] -= 1
            if not left[layer.name] and data.patches is not None:  # its last form: the patches are not needed again
                prepared.pop(layer.name, None)
                layer_inputs[layer.name] = replace(data, patches=None)
        return cand

    # One task a form, the most work first (a layer's CP grid is most of its analysis): the workers finish
    # together instead of one waiting on a big layer's forms one after the other. The layers of more than
    # BESIDE_BYTES go last: what they keep (GenderNet's fc6: a 38 MB basis) is then not held while the others
    # run (started first, it raised a calibrated run's peak from 322 to 339 MB).
    tasks = sorted(((layer, method, form, forced) for layer, method, methods, forced in jobs for form in methods),
                   key=lambda task: (_job_bytes(task) > BESIDE_BYTES, -_task_work(task, caps)))
    announced: set[str] = set()

    def announce(task) -> None:  # (one line a layer, as its first task's result is awaited)
        if task[0].name not in announced:
            announced.add(task[0].name)
            say(f"analysing {task[0].name}")

    results = side_by_side(analyse, tasks, weight=_job_bytes, announce=announce)
    done = {(task[0].name, task[2]): result for task, result in zip(tasks, results)}
    candidates, skipped = [], {}
    for layer, method, methods, forced in jobs:
        cands = [done[(layer.name, form)] for form in methods]
        if isinstance(cands[0], str):
            skipped[layer.name] = cands[0]
            continue
        cands = [c for c in cands if c.ranks]
        if not cands:
            skipped[layer.name] = "no rank reduces its parameter count (break-even)"
            continue
        if forced is not None and cands[0].params_at[forced] >= cands[0].params_before:
            skipped[layer.name] = (f"--rank {forced} would not reduce its parameters "
                                   f"({cands[0].params_at[forced]} >= {cands[0].params_before}); left alone")
            ranks.pop(layer.name)
            continue
        candidates.extend(cands)
    return candidates, skipped


def _cp_caps(jobs, layer_inputs: Mapping[str, LayerInput], cp_rank_cap: RankCap | None) -> dict[str, int | None]:
    """Each CP grid's cap, before the analysis (the cap times OpenCV: measured alone, not beside an ALS)."""
    if cp_rank_cap is None:
        return {}
    caps = {}
    for layer, _, methods, forced in jobs:
        if METHOD_CP in methods and forced is None and layer_inputs[layer.name].patches is not None:
            grid = cp_grid(layer, min_rank_divisor=MIN_RANK_DIVISOR)
            caps[layer.name] = cp_rank_cap(layer, grid) if grid else None
    return caps


def _task_work(task, caps: Mapping[str, int | None]) -> float:
    """A rough measure of an analysis task's work, to start the biggest first: an ALS sweep per CP rank (a
    kernel-sized product per component), one SVD-like pass over the weight for the other forms."""
    layer, method, form, forced = task
    size = float(layer.blobs[0].size)
    if form != METHOD_CP:
        return size * min(layer.blobs[0].shape[0], size / layer.blobs[0].shape[0])
    top = forced or caps.get(layer.name) or max(cp_grid(layer, min_rank_divisor=MIN_RANK_DIVISOR), default=1)
    return size * top * CP_ITERATIONS


def _job_bytes(job) -> int:
    """A layer's weight bytes: side_by_side keeps the sum of those analysed at once near the heaviest one's
    (GenderNet's fc6: a 38 MB weight and its SVD's workspace; peak memory)."""
    return job[0].weight_bytes


def side_by_side(work: Callable, jobs: Sequence, *, weight: Callable, announce: Callable) -> list:
    """[work(job) for job in jobs] on ANALYSIS_WORKERS threads with BLAS limited to one thread each (numpy
    releases the GIL in its kernels), started in the order given when they fit: the jobs running at once hold
    weights (``weight(job)``, bytes) that add up to at most the heaviest job's plus BESIDE_BYTES. A job's
    workspace grows with its weight, so the peak stays near the heaviest job's own, while no core waits on a
    big layer alone (GenderNet's fc6: 0.2 s of a 1.2 s analysis with a core idle; a VGG-16-shaped net's five
    9.4 MB convolutions one at a time). ``announce(job)`` runs on this thread as a job's result is awaited, in the
    order given. The first error a job raises is raised here, once the jobs running then have ended."""
    if len(jobs) < 2 or ANALYSIS_WORKERS < 2:
        results = []
        for job in jobs:
            announce(job)
            results.append(work(job))
        return results
    one_heap()
    queue = _Queue(jobs, [int(weight(job)) for job in jobs])
    with threadpool_limits(limits=1, user_api="blas"):
        threads = [threading.Thread(target=queue.serve, args=(work,), name=f"analyse_{i}", daemon=True)
                   for i in range(min(ANALYSIS_WORKERS, len(jobs)))]
        for thread in threads:
            thread.start()
        try:
            for i, job in enumerate(jobs):
                announce(job)
                queue.wait_for(i)
        finally:
            queue.stop()
            for thread in threads:
                thread.join()
    return [queue.results[i] for i in range(len(jobs))]


class _Queue:
    """side_by_side's jobs: a free worker takes the first pending job that fits beside those running, and
    leaves its result or the first error."""

    def __init__(self, jobs: Sequence, weights: Sequence[int]) -> None:
        self.jobs, self.weights, self.pending = jobs, weights, list(range(len(jobs)))
        self.budget = max(weights) + BESIDE_BYTES
        self.running, self.held, self.stopped = 0, 0, False
        self.results: dict[int, object] = {}
        self.error: BaseException | None = None
        self.cond = threading.Condition()

    def take(self) -> int | None:
        with self.cond:
            while True:
                if self.stopped or self.error is not None or not self.pending:
                    return None
                fits = next((p for p, i in enumerate(self.pending)
                             if not self.running or self.held + self.weights[i] <= self.budget), None)
                if fits is not None:
                    i = self.pending.pop(fits)
                    self.running, self.held = self.running + 1, self.held + self.weights[i]
                    return i
                self.cond.wait()

    def serve(self, work: Callable) -> None:
        while (i := self.take()) is not None:
            try:
                result, error = work(self.jobs[i]), None
            except BaseException as exc:  # (raised on the caller's thread)
                result, error = None, exc
            with self.cond:
                if error is None:
                    self.results[i] = result
                elif self.error is None:
                    self.error = error
                self.running, self.held = self.running - 1, self.held - self.weights[i]
                self.cond.notify_all()

    def wait_for(self, i: int) -> None:
        with self.cond:
            while i not in self.results and self.error is None:
                self.cond.wait()
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()


def relative_output_error(original: Mapping, other: Mapping) -> float:
    """RMS over samples and outputs of ||y' - y|| / ||y||."""
    errs = []
    for name, y in original.items():
        z = other[name]
        if y.shape != z.shape:  # not one row per input (SSD priors: one per run): nothing that weights change
            continue
        n = y.shape[0] if y.ndim > 1 else 1
        a, b = y.reshape(n, -1).astype(np.float64), z.reshape(n, -1).astype(np.float64)
        ref = np.linalg.norm(a, axis=1)
        errs.extend(np.linalg.norm(a - b, axis=1) / np.maximum(ref, 1e-30))
    return float(np.sqrt(np.mean(np.square(errs)))) if errs else 0.0


def with_weight(net: Net, name: str, weight: np.ndarray) -> Net:
    layers = tuple(
        replace(layer, blobs=(weight,) + layer.blobs[1:]) if layer.name == name else layer for layer in net.layers
    )
    return replace(net, layers=layers)


def measure_gains(run: Run, net: Net, candidates: list[Candidate], *, inputs: Mapping[str, np.ndarray],
                  reference: Mapping, layer_inputs: Mapping[str, LayerInput], compared_blobs: Sequence[str],
                  skip: set[str], ws: Workspace, say: Say) -> list[Candidate]:
    """Each candidate with its gain: network-output error / layer-output error, with only it approximated.

    A layer at the start of the network's plain head (InnerProduct/ReLU/Dropout/Softmax chain to the one
    output, see tail.py) runs the head in numpy from its recorded input. A layer before the head runs in
    OpenCV only up to the head's input -- a network without the head's weights (GenderNet's fc6 is 85%
    of them: the trial loads 2 MB instead of 46) -- and the head in numpy. Every OpenCV trial starts at
    the layer's own input (see _Cuts): the layers before it are the original's, run once for all trials.
    """
    head = _head(net, compared_blobs)
    totals = totals_of(candidates)
    out = list(candidates)
    gains: dict[str, float] = {}
    feed = {k: v[:GAIN_SAMPLES] for k, v in inputs.items()}
    head_input = None  # the head's input in the original, for the trials before the head (run once)
    cuts = _Cuts(net, run, feed)
    for i, cand in enumerate(candidates):
        if cand.layer in gains:  # the gain is the layer's, whatever its form
            out[i] = replace(cand, gain=gains[cand.layer])
            continue
        if cand.layer in skip or negligible(cand, totals):
            continue  # too small to matter either way: keep the conservative gain of 1
        probe_rank = cand.ranks[len(cand.ranks) // 2]
        layer_err = cand.output_error[probe_rank]
        if layer_err <= 1e-9:
            continue
        say(f"measuring the sensitivity of {cand.layer}")
        layer = net.layer(cand.layer)
        approx = approximate_weight(layer, cand, probe_rank, ws)
        own = tail.tail_chain(net, cand.layer, compared_blobs[0]) if len(compared_blobs) == 1 else None
        if own is not None and layer_inputs[cand.layer].rows is not None:
            x = layer_inputs[cand.layer].rows
            end_err = relative_output_error({"y": tail.run_tail(own, x)},
                                            {"y": tail.run_tail(own, x, {cand.layer: approx})})
        elif head is not None and head.before(cand.layer):
            if head_input is None:  # (recorded already when the head's first layer is a candidate)
                recorded = layer_inputs.get(head.chain[0].name)
                head_input = recorded.rows[:GAIN_SAMPLES] if recorded is not None and recorded.rows is not None \
                    else run(head.prefix, feed, [head.source])[head.source]
            x = cuts.trial(cand.layer, approx, [head.source], end=len(head.prefix.layers))[head.source]
            end_err = relative_output_error({"y": tail.run_tail(head.chain, head_input)},
                                            {"y": tail.run_tail(head.chain, x)})
        else:
            trial_out = cuts.trial(cand.layer, approx, list(reference), original=reference)
            end_err = relative_output_error({k: v[:GAIN_SAMPLES] for k, v in reference.items()}, trial_out)
        gains[cand.layer] = end_err / layer_err
        out[i] = replace(cand, gain=gains[cand.layer])
    return out


class _Cuts:
    """Sensitivity trials that run only from the approximated layer onwards.

    The network is cut just before the layer: a trial net is an Input per blob that crosses the cut (its
    value in the original on the trial samples) and the layers from there on. The crossing values are
    found walking forward through the original, one segment between consecutive cuts at a time, so the
    layers before all the cuts run once in all instead of once per trial (trials come in network order;
    an earlier cut starts the walk again).
    """

    def __init__(self, net: Net, run: Run, feed: Mapping[str, np.ndarray]) -> None:
        self.net, self.run, self.feed = net, run, dict(feed)
        self.index = {layer.name: k for k, layer in enumerate(net.layers)}
        self.taken = set(self.index) | {t for layer in net.layers for t in layer.tops}  # names in use
        self.at, self.live = 0, dict(feed)  # the cut's position and the values crossing it

    def trial(self, name: str, approx: np.ndarray, sources: Sequence[Hashable], *, end: int | None = None,
              original: Mapping | None = None) -> dict:
        """{source: value} of ``sources`` with layer ``name``'s weight replaced by ``approx``, running the
        layers from ``name`` up to ``end``. A source the layers after the cut do not write keeps its value
        in ``original`` (the reference outputs)."""
        k = self.index[name]
        self._walk_to(k)
        stop = len(self.net.layers) if end is None else end
        segment, feed = self._segment(k, stop)
        written = {layer.name for layer in self.net.layers[k:stop]}
        asked = [s for s in sources if not s.is_input and s.layer in written]
        out = self.run(with_weight(segment, name, approx), feed, asked) if asked else {}
        return {s: out[s] if s in out else original[s][:GAIN_SAMPLES] for s in sources}

    def _walk_to(self, k: int) -> None:
        if k < self.at:
            self.at, self.live = 0, dict(self.feed)
        if k == self.at:
            return
        crossing = _crossing(self.net, k)
        last = {}  # blob -> the source of its value at the cut, for blobs layers between the two cuts write
        for layer in self.net.layers[self.at:k]:
            for i, top in enumerate(layer.tops):
                if layer.type == "Input":
                    last.pop(top, None)  # (a net input: its value is in the feed)
                else:
                    last[top] = Source(layer.name, i)
        wanted = {blob: last[blob] for blob in crossing if blob in last}
        values = self.run(*self._segment(self.at, k), list(dict.fromkeys(wanted.values()))) if wanted else {}
        self.live = {blob: values[wanted[blob]] if blob in wanted else self.live[blob] for blob in crossing}
        self.at = k

    def _segment(self, start: int, stop: int) -> tuple[Net, dict[str, np.ndarray]]:
        """Layers [start, stop), fed by an Input for each blob crossing the cut at ``start`` that they read;
        and its feed (the values at that cut)."""
        layers = self.net.layers[start:stop]
        if start == 0:
            return replace(self.net, layers=layers), self.live
        read = {b for layer in layers for b in layer.bottoms}
        feed = {blob: value for blob, value in self.live.items() if blob in read}
        inputs = []
        for blob, value in feed.items():
            name = f"{blob}__cut"
            while name in self.taken:
                name += "_"
            shape = [1, *(int(d) for d in value.shape[1:])]
            inputs.append(Layer(name, "Input", (), (blob,), {"input_param": {"shape": [{"dim": shape}]}}))
        return replace(self.net, layers=(*inputs, *layers)), feed


def _crossing(net: Net, k: int) -> list[str]:
    """The blobs written before layer k that layer k or a later layer reads, in order of first reading."""
    written = {top for layer in net.layers[:k] for top in layer.tops}
    return list(dict.fromkeys(b for layer in net.layers[k:] for b in layer.bottoms if b in written))


@dataclass(frozen=True)
class _Head:
    """The network's plain head: its layers (run in numpy), the network before it (run in OpenCV) and the
    source of the head's input in that network."""

    chain: tuple[Layer, ...]
    prefix: Net
    source: Hashable

    def before(self, name: str) -> bool:
        return any(layer.name == name for layer in self.prefix.layers)


def _head(net: Net, compared_blobs: Sequence[str]) -> _Head | None:
    """The longest plain head ending at the single compared output, or None."""
    if len(compared_blobs) != 1:
        return None
    first_input, _ = blob_sources(net)
    for k, layer in enumerate(net.layers):
        if layer.type != "InnerProduct" or layer.name not in first_input:
            continue
        chain = tail.tail_chain(net, layer.name, compared_blobs[0])
        if chain is not None:
            return _Head(chain, replace(net, layers=net.layers[:k]), first_input[layer.name])
    return None


def negligible(cand: Candidate, totals) -> bool:
    """A layer below NEGLIGIBLE_COST_SHARE of the parameters + MACs: not worth a trial or a timing."""
    return cand.cost(None, replace(totals, time_ms=0.0)) < NEGLIGIBLE_COST_SHARE


def timing_ranks(cand: Candidate) -> tuple[int, ...]:
    """The grid ranks that are timed: both ends (every layer of a form is linear in the rank), and the
    middle for Tucker-2, whose core is quadratic (times in between are interpolated). The top end is the
    largest rank whose factored weights take at most TIMED_BYTES: a bigger trial net costs more to load
    than to run (GenderNet's fc6 at its top rank: 37 MB), and above it the line is extended."""
    ordered = sorted(set(cand.ranks))
    small = [r for r in ordered if 4 * cand.params_at[r] <= TIMED_BYTES]
    if len(small) < 2:  # (two points make the line)
        small = ordered[:2]
    middle = (small[len(small) // 2],) if cand.method == METHOD_TUCKER else ()
    return tuple(sorted({small[0], *middle, small[-1]}))


def fast_enough_cap(ranks: Sequence[int], original_ms: float, points: Mapping[int, float], required: float) -> int:
    """The largest of ``ranks`` whose time -- from the ``points`` measured, as measure_times interpolates --
    is within ``required`` x faster than the layer's ``original_ms`` (the planner offers no slower one); the
    lowest rank when none is."""
    times = _times_at(ranks, points)
    fast = [r for r in ranks if original_ms / max(times[r], 1e-9) >= required]
    return max(fast) if fast else min(ranks)


def _times_at(ranks: Sequence[int], points: Mapping[int, float]) -> dict[int, float]:
    """Times at ``ranks`` from measured ``points``: linear between them, the last segment extended above."""
    xs = sorted(points)
    ys = [points[x] for x in xs]
    out = {}
    for r in ranks:
        if r > xs[-1] and len(xs) > 1:
            slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
            out[r] = float(ys[-1] + slope * (r - xs[-1]))
        else:
            out[r] = float(np.interp(r, xs, ys))
    return out


def measure_times(candidates: list[Candidate], *, original_ms: Callable[[str], float],
                  factored_ms: Callable[[Candidate, int], float], say: Say) -> list[Candidate]:
    """Each candidate with its layer's measured time, and its form's time at every grid rank: measured at
    timing_ranks, linear in between and beyond (every layer of a form is linear in the rank, Tucker-2's core
    quadratic: the chord over-estimates it, on the safe side). Negligible layers are not timed."""
    totals = totals_of(candidates)
    out = []
    for cand in candidates:
        if negligible(cand, totals):
            out.append(cand)
            continue
        say(f"timing {cand.layer} ({cand.method})")
        base = original_ms(cand.layer)
        points = {r: factored_ms(cand, r) for r in timing_ranks(cand)}
        out.append(replace(cand, time_before=base, time_at=_times_at(cand.ranks, points)))
    return out


def excess(checks: Sequence) -> float:
    """How far a plan missed: the largest error / its target over the missed checks that measure an error
    (relative errors, logit changes; a PSNR is an RMS error in dB: a miss by D dB is an error 10^(D/20)
    times its target); 1 when none missed that way (an agreement, a similarity). An early-stopped check's
    value is a bound on the way to its final value, so this is a lower bound too."""
    ratios = [r for r in map(_error_ratio, checks) if r is not None]
    return max(ratios, default=1.0)


def _error_ratio(check) -> float | None:
    if check.passed or not check.target or not math.isfinite(check.value):
        return None
    if not check.higher_is_better:
        return check.value / check.target if check.target > 0 else None
    if check.kind == "image":  # PSNR (dB)
        return 10.0 ** ((check.target - check.value) / 20.0)
    return None


def fitting_budget(top: float, missed_predicted: float | None, missed_excess: float) -> float:
    """The predicted error a refinement's move of a kept layer may reach: T's own budget ``top``, or less
    where the plan that missed on the rung above measured how far its error went -- ``missed_excess`` times
    its target (search.excess) at ``missed_predicted``: with the error taken to follow the prediction (as
    rungs_to_skip takes it), a plan passes only below missed_predicted / excess. A miss that measures no
    error ratio (a changed answer, a similarity: excess 1) says nothing of the scale, so T's budget stays
    (GenderNet calibrated: plans predicted at 0.29 and 0.25 changed one answer, one at 0.35 passed)."""
    if missed_predicted is None or not missed_excess > 1.0:
        return top
    return min(top, missed_predicted / missed_excess)


def rungs_to_skip(excess_ratio: float) -> int:
    """Rungs to skip below a missed one: if the output error falls in proportion to the budget (by sqrt 2
    per rung), the first rung that passes is ceil(2 log2(excess)) down; the search lands one short of it,
    on the last rung predicted to miss, so that a skip rarely passes over a rung that would pass."""
    if not excess_ratio > 1.0:
        return 0
    return max(0, int(math.ceil(2.0 * math.log2(min(excess_ratio, 2.0 ** 16)) - 1e-9)) - 2)


def not_steering(before: tuple[float, float] | None, after: tuple[float, float]) -> bool:
    """Whether two misses in a row, each ``(excess, predicted error)``, show the measured error not following
    the prediction: both missed by more than half a rung's error (excess above 2^(1/4), as if the error fell
    in proportion to the budget), the prediction fell by more than half a rung between them, and the
    measured error by less than a quarter as much (in ratio) -- one layer's error is under-predicted and the
    plans that keep it all miss alike. Walking on a rung at a time then learns nothing; the search goes to the
    lowest rung instead (where nothing can be gained, that says so at once) and bisects from there."""
    if before is None or after is None:
        return False
    (x0, p0), (x1, p1) = before, after
    if None in (p0, p1) or not (min(x0, x1) > HALF_RUNG_ERROR and min(p0, p1) > 0):
        return False
    fell = p0 / p1
    return fell > HALF_RUNG_ERROR and math.log(x0 / x1) < 0.25 * math.log(fell)


def budget_ladder(tradeoff: float) -> list[float]:
    """The error budgets the closed loop walks down: a fixed grid (steps of sqrt 2), from the largest rung
    within budget(T) = ERROR_SCALE * ln(1 / (1 - T)) down to 2^MIN_BUDGET_EXPONENT.

    The grid is the same for every T, so a larger T starts on a higher rung of the same ladder and, walking
    down, meets the rungs a smaller T starts from: it stops no lower, and the size stays monotone in T.
    """
    start = error_budget(tradeoff)
    if math.isinf(start):
        return [start]
    if start <= 0:
        return [0.0]
    top = math.floor(2 * math.log2(start) + 1e-9)
    return [2.0 ** (k / 2) for k in range(top, 2 * MIN_BUDGET_EXPONENT - 1, -1)]
