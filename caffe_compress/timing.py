"""OpenCV timings on this machine: whole nets and single layers, original against factored.

Fewer multiply-adds is not faster (OpenCV runs k x 1 / 1 x k depthwise layers slowly on large maps,
and every extra layer is another pass over memory), so the tool measures instead of modelling.
Timings are medians of alternating runs in one process with one thread, and the number of runs adapts
to a time budget so that a slow model does not make the compression slow.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from .memory import heap_for_passes, release_memory
from .net import Layer, Net

log = logging.getLogger(__name__)

MIN_RUNS, MAX_RUNS = 3, 15
NET_MAX_RUNS = 101  # whole-net pairs: a small net gets many alternating runs within the budget (noise)
BIG_NET_RUNS = 9  # a big net (BIG_NET_BYTES), timed alone: tens of ms per run, steady enough for a median of 9
TIMING_SIDE = 128  # layers are timed on maps at most this high and wide
SPEED_MARGIN = 1.1  # --objective speed: a factored layer must be at least this much faster
LATENCY_TOLERANCE = 0.97  # a speed ratio below this is "slower" (noise allowance)
NET_BUDGET_S = 1.5  # seconds spent timing one pair of whole nets (median of up to MAX_RUNS each)
LAYER_BUDGET_S = 0.6  # seconds spent timing one pair of layers (the check of a chosen factorization)
MICRO_BUDGET_S = 0.03  # seconds spent on one planning micro-benchmark (min of 3..20 runs)
BIG_LAYER_BYTES = 8 << 20  # a layer with more weight bytes is timed one net at a time, not alternating
CHECK_BAND = 1.3  # a chosen factorization predicted at least this much faster is not timed again
# A whole net with more weight bytes is timed one net at a time, the original early while little else is held:
# two loaded together would add the model to the run's peak memory (GenderNet: +65 MB), and its latency (tens
# of ms) is steady enough for medians taken apart. Smaller nets are timed alternating with the original.
BIG_NET_BYTES = 16 << 20


@dataclass(frozen=True)
class Latency:
    original_ms: float
    compressed_ms: float

    @property
    def speedup(self) -> float:
        return self.original_ms / self.compressed_ms if self.compressed_ms > 0 else float("inf")


@contextmanager
def _threads(count: int):
    """OpenCV with ``count`` threads for the block, the previous setting restored after, and the passes'
    temporaries kept in the heap between runs (memory.heap_for_passes: mapped, each run faulted them in)."""
    from .validate import cv2_module

    cv2 = cv2_module()
    previous = cv2.getNumThreads()
    cv2.setNumThreads(int(count))
    try:
        with heap_for_passes():
            yield
    finally:
        cv2.setNumThreads(previous)


def _forward_once(cv_net, inputs: Mapping[str, np.ndarray]) -> float:
    start = time.perf_counter()
    for name, value in inputs.items():
        cv_net.setInput(value, name)
    cv_net.forward()
    return time.perf_counter() - start


def median_ms(load: Callable[[Net], object], net: Net, inputs: Mapping[str, np.ndarray], *,
              budget_s: float = NET_BUDGET_S / 2, threads: int = 1, max_runs: int = MAX_RUNS) -> float:
    """Median latency (ms) of one net, loaded alone (one OpenCV network alive: peak memory)."""
    with _threads(threads):
        cv_net = load(net)
        feed = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in inputs.items()}
        _forward_once(cv_net, feed)  # warm-up (allocation, fusion)
        times = [_forward_once(cv_net, feed)]
        runs = int(np.clip(budget_s / max(times[0], 1e-6), MIN_RUNS, max_runs))
        times += [_forward_once(cv_net, feed) for _ in range(runs - 1)]
        del cv_net
    return 1000.0 * float(np.median(times))


def compare(load: Callable[[Net], object], original: Net, compressed: Net, inputs: Mapping[str, np.ndarray], *,
            budget_s: float = NET_BUDGET_S, threads: int = 1, max_runs: int = MAX_RUNS) -> Latency:
    """Median latency (ms) of two nets on ``inputs``, alternating runs after a warm-up (both nets see the
    same machine state: a median of one taken early and one taken late can differ by 30% on a small net)."""
    with _threads(threads):
        nets = [load(original), load(compressed)]
        feed = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in inputs.items()}
        first = [_forward_once(n, feed) for n in nets]  # warm-up (allocation, fusion)
        first = [_forward_once(n, feed) for n in nets]
        runs = int(np.clip(budget_s / max(sum(first), 1e-6), MIN_RUNS, max_runs))
        times: list[list[float]] = [[first[0]], [first[1]]]
        for _ in range(runs - 1):
            for i, n in enumerate(nets):
                times[i].append(_forward_once(n, feed))
    return Latency(1000.0 * float(np.median(times[0])), 1000.0 * float(np.median(times[1])))


def big_net(net: Net) -> bool:
    """Whether ``net`` is timed one net at a time (BIG_NET_BYTES)."""
    return 4 * net.param_count > BIG_NET_BYTES


def big_layers(layers: Sequence[Layer]) -> bool:
    """Whether ``layers`` hold more than BIG_LAYER_BYTES of weights (a trial net that weighs on the peak)."""
    return sum(layer.weight_bytes for layer in layers) > BIG_LAYER_BYTES


def default_threads() -> int:
    """OpenCV's default thread count on this machine."""
    from .validate import cv2_module

    return int(cv2_module().getNumThreads())


def min_ms(load: Callable[[Net], object], net: Net, inputs: Mapping[str, np.ndarray], *,
           budget_s: float = MICRO_BUDGET_S) -> float:
    """Fastest of a few runs (ms), one thread: a planning micro-benchmark (noise only ever adds time)."""
    with _threads(1):
        cv_net = load(net)
        feed = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in inputs.items()}
        _forward_once(cv_net, feed)  # warm-up
        times = [_forward_once(cv_net, feed)]
        runs = int(np.clip(budget_s / max(times[0], 1e-6), MIN_RUNS, 20))
        times += [_forward_once(cv_net, feed) for _ in range(runs - 1)]
        del cv_net
    return 1000.0 * min(times)


def signature(layers: Sequence[Layer]) -> str:
    """The structure of a chain of layers (types, parameters, blob shapes), without names: equal
    signatures at equal input shapes run at the same speed, so their timings are shared."""
    return json.dumps([(layer.type, layer.params, [list(b.shape) for b in layer.blobs]) for layer in layers],
                      sort_keys=True, default=str)


def replacement_layers(new_net: Net, name: str) -> tuple[Layer, ...]:
    """The layers that replaced layer ``name`` in a rewritten net (``name_cp1..3``/``_svd1``/``_tk1..2``/``_sp1``
    + ``name``)."""
    names = [layer.name for layer in new_net.layers]
    end = names.index(name)
    start = end
    while start > 0 and names[start - 1].startswith(f"{name}_") and names[start - 1][len(name) + 1:] in (
            "cp1", "cp2", "cp3", "svd1", "tk1", "tk2", "sp1"):
        start -= 1
    return new_net.layers[start:end + 1]


def layer_net(layers: Sequence[Layer], bottom: str, shape: tuple[int, ...]) -> Net:
    """A net of just ``layers`` fed by an Input of ``shape`` named ``bottom``."""
    data = Layer("input__", "Input", (), (bottom,), {"input_param": {"shape": [{"dim": [int(d) for d in shape]}]}})
    return Net("timing", (data, *layers))


TIMING_CACHE_ENV = "CAFFE_COMPRESS_TIMING_CACHE"  # a directory, or "off"
MAX_CACHED = 50_000  # timings kept in the file (the oldest go first)


class DiskCache:
    """Layer micro-benchmarks kept between runs on this machine, keyed by the layers' structure and input
    shape, in one JSON file per (OpenCV version, CPU, core count): a rerun, or --plan-only then the real run,
    plans from the same timings (so the same plan) and skips the measuring. ``$CAFFE_COMPRESS_TIMING_CACHE``
    names another directory, or ``off``. Unreadable or unwritable files are ignored (timings are then
    measured again)."""

    def __init__(self, path: "os.PathLike | None", *, reuse: bool = True) -> None:
        self.path = path
        self.data: dict[str, float] = {}
        self.dirty = False
        self.reuse = reuse  # False (--retime): measure everything again, and store the new values
        self.hits = self.stored = 0
        self.measured_now: set[str] = set()  # keys measured in this run (reused within it even with --retime)
        if path is not None:
            try:
                with open(path, encoding="utf-8") as fh:
                    loaded = json.load(fh)
                self.data = {str(k): float(v) for k, v in loaded.items()} if isinstance(loaded, dict) else {}
            except (OSError, ValueError, TypeError, AttributeError):
                self.data = {}

    @classmethod
    def default(cls, *, reuse: bool = True) -> "DiskCache":
        from pathlib import Path

        setting = os.environ.get(TIMING_CACHE_ENV, "")
        if setting.lower() in ("off", "0", "no", "none"):
            return cls(None)
        from .validate import cpu_model, cv2_module
        from .zoo import cache_dir

        machine = f"{cv2_module().__version__}|{cpu_model()}|{os.cpu_count()}"
        tag = hashlib.sha1(machine.encode()).hexdigest()[:12]
        return cls((Path(setting) if setting else cache_dir()) / f"timings-{tag}.json", reuse=reuse)

    @staticmethod
    def key(*parts) -> str:
        return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    def get(self, key: str) -> float | None:
        if key in self.measured_now:
            return self.data[key]
        value = self.data.get(key) if self.reuse else None
        self.hits += value is not None
        return value

    def put(self, key: str, value: float) -> None:
        self.data.pop(key, None)  # re-inserted last: the newest entries are the ones kept
        self.data[key] = float(value)
        self.measured_now.add(key)
        self.dirty = True
        self.stored += 1

    def save(self) -> None:
        if self.path is None or not self.dirty:
            return
        items = list(self.data.items())[-MAX_CACHED:]
        temp = f"{self.path}.{os.getpid()}.tmp"
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            with open(temp, "w", encoding="utf-8") as fh:
                json.dump(dict(items), fh)
            os.replace(temp, self.path)
            self.dirty = False
        except OSError as exc:
            log.info("timing cache %s not written: %s", self.path, exc.strerror)
            try:
                os.unlink(temp)
            except OSError:
                pass


@dataclass
class SpeedGuard:
    """Measured speed: a factorization that runs slower than its layer is dropped (objective balanced/speed).

    Layers are timed alone in OpenCV, one thread, at their real input shape (spatial size capped at
    TIMING_SIDE: the ratio is what matters), original against replacement; results are cached.
    """

    objective: str
    cv: object  # runner.OpenCVRunner: load(net, what=...), run(net, feed, sources, what=...)
    net: Net
    first_input: Mapping  # layer -> runner.Source of its first input
    shapes: Mapping[str, tuple[int, ...]]  # declared input shapes
    say: Callable[[str], None]
    stage: Callable = lambda name: nullcontext()  # noqa: E731 - the pipeline's timer: stage(name) times a block
    layer_shapes: dict = field(default_factory=dict)
    speedups: dict = field(default_factory=dict)  # (layer, (method, rank)) -> original / factored time
    micro: dict = field(default_factory=dict)  # (signature, input shape) -> ms
    disk: DiskCache | None = None  # timings from earlier runs on this machine (DiskCache.default())

    def layer_ms(self, name: str, layers: Sequence[Layer]) -> float:
        """Micro-benchmark of ``layers`` (the original layer ``name`` or its replacement) at its input shape."""
        shape = self._input_shape(name)
        bottom = self.net.layer(name).bottoms[0]
        key = (signature(layers), shape)
        if key not in self.micro:
            stored = DiskCache.key("micro", *key)
            cached = self.disk.get(stored) if self.disk else None
            if cached is not None:
                self.micro[key] = cached
                return cached
            if big_layers(layers):
                release_memory()  # (freed heap the small timings left goes back first: this one adds to the peak)
            with self.stage("timing"):
                self.micro[key] = min_ms(lambda model: self.cv.load(model, what=f"timing of {name}"),
                                         layer_net(layers, bottom, shape),
                                         {bottom: np.random.default_rng(0).standard_normal(shape).astype(np.float32)})
            if self.disk:
                self.disk.put(stored, self.micro[key])
        return self.micro[key]

    @property
    def required(self) -> float:
        return {"size": 0.0, "balanced": LATENCY_TOLERANCE, "speed": SPEED_MARGIN}[self.objective]

    def slow_layers(self, new_net: Net, chosen: Mapping[str, tuple], forced: Mapping[str, tuple],
                    predicted: Mapping[str, float | None]) -> dict[str, str]:
        """{layer: reason} for chosen factorizations that are not fast enough (forced ranks are kept).

        A factorization predicted (by the planning micro-benchmarks) to be CHECK_BAND x faster is trusted;
        the others are timed again, alternating with the original layer."""
        if self.objective == "size":
            return {}
        slow = {}
        for name, choice in chosen.items():
            if name in forced or (predicted.get(name) or 0.0) >= max(CHECK_BAND, self.required):
                continue
            speedup = self.speedup(new_net, name, choice)
            if speedup < self.required:
                slow[name] = f"factored form measured {1 / speedup:.2f}x slower in OpenCV" if speedup < 1 else \
                    f"factored form only {speedup:.2f}x faster (--objective speed)"
        return slow

    def speedup(self, new_net: Net, name: str, choice: tuple) -> float:
        key = (name, choice)
        if key not in self.speedups:
            shape = self._input_shape(name)
            layer = self.net.layer(name)
            replacement = replacement_layers(new_net, name)
            stored = DiskCache.key("pair", signature((layer,)), signature(replacement), shape)
            cached = self.disk.get(stored) if self.disk else None
            if cached is not None:
                self.speedups[key] = cached
                return cached
            bottom = layer.bottoms[0]
            self.say(f"timing {name}")
            load = lambda model: self.cv.load(model, what=f"timing of {name}")  # noqa: E731
            nets = (layer_net((layer,), bottom, shape), layer_net(replacement, bottom, shape))
            feed = {bottom: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
            with self.stage("timing"):
                if big_layers((layer,)):  # one big net alive at a time (memory)
                    latency = Latency(*(median_ms(load, n, feed, budget_s=LAYER_BUDGET_S / 2) for n in nets))
                else:
                    latency = compare(load, *nets, feed, budget_s=LAYER_BUDGET_S)
            self.speedups[key] = latency.speedup
            if self.disk:
                self.disk.put(stored, latency.speedup)
        return self.speedups[key]

    def infer_shapes(self) -> None:
        """Every layer's input shape, now: best while the original stays loaded in OpenCV (runner.keep), or
        it is loaded once more for it later -- the whole model, beside the planner's data (peak memory)."""
        if not self.layer_shapes:
            self.layer_shapes = self._layer_input_shapes()

    def _input_shape(self, name: str) -> tuple[int, ...]:
        self.infer_shapes()
        shape = self.layer_shapes[name]
        if len(shape) == 4:
            shape = shape[:2] + tuple(min(int(d), TIMING_SIDE) for d in shape[2:])
        return shape

    def _layer_input_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every layer's first input shape at the declared input size, from OpenCV's shape inference."""
        cv_net = self.cv.load_kept(self.net, what="timing shapes")
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
