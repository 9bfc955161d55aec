"""The layers are analysed side by side on worker threads: the same candidates as one layer at a time, the
CP caps (OpenCV timings) asked before any analysis runs, layers analysed at once only while their weights
allow (fc1 never beside conv2), never a core idle while one waits, and a convolution's patches dropped
once its last form is analysed."""
import threading
import time

import numpy as np
import pytest

from caffe_compress import io
from caffe_compress.runner import OpenCVRunner, blob_sources
from test_tradeoff import small_model


def _analysis(tmp_path, monkeypatch, workers: int, events: list):
    from caffe_compress.plan import analyse as planner, search

    tmp_path.mkdir()
    deploy, model = small_model(tmp_path)
    net = io.load(deploy, model)
    first_input, out_sources = blob_sources(net)
    decomposable = [(layer, planner.describe_layer(layer, keep=False)[0]) for layer in net.layers
                    if layer.name in ("conv1", "conv2", "fc1", "fc2")]
    cv = OpenCVRunner(tmp_path)
    x = np.random.default_rng(3).standard_normal((8, 3, 24, 24)).astype(np.float32)
    layer_inputs, _ = search.collect_inputs(lambda m, f, s: cv.run(m, f, s), net, {"data": x},
                                            {l.name: first_input[l.name] for l, _ in decomposable}, out_sources,
                                            seed=0)
    monkeypatch.setattr(search, "ANALYSIS_WORKERS", workers)
    # at once at most fc1's 205 kB (64 x 800 floats) + 10 kB: conv2 (18.6 kB) never beside fc1, the others may
    monkeypatch.setattr(search, "BESIDE_BYTES", 10_000)
    for name in ("analyse_convolution", "analyse_inner_product"):
        real = getattr(search, name)

        def traced(layer, *args, _real=real, **kwargs):
            events.append(("analyse", layer.name, threading.current_thread().name))
            if layer.name.startswith("conv"):  # (its patches are still there for each of its forms)
                assert args[0] is not None
            if layer.name in ("conv2", "fc1"):  # (long enough that big jobs would overlap without the rule)
                time.sleep(0.05)
            out = _real(layer, *args, **kwargs)
            events.append(("end", layer.name, threading.current_thread().name))
            return out

        monkeypatch.setattr(search, name, traced)

    def cap(layer, ranks):  # a cap that times OpenCV would run here: before any ALS
        events.append(("cap", layer.name, threading.current_thread().name))
        return sorted(ranks)[len(ranks) // 2]

    said = []
    candidates, skipped = search.analyse_layers(decomposable, layer_inputs, ranks={}, forms={},
                                                ws=planner.Workspace(), seed=0, timings={}, say=said.append,
                                                cp_rank_cap=cap)
    # each convolution's patches are dropped once its forms are analysed (peak memory); InnerProduct rows stay
    # (the sensitivity trials of the plain head use them)
    assert all(layer_inputs[name].patches is None for name in ("conv1", "conv2"))
    assert all(layer_inputs[name].rows is not None for name in ("fc1", "fc2"))
    return candidates, skipped, said


def _summary(candidates):
    return [(c.layer, c.method, c.ranks, c.output_error, c.weight_error) for c in candidates]


def test_layers_analysed_side_by_side_give_what_one_at_a_time_gives(tmp_path, monkeypatch):
    one, two = [], []
    alone, skipped_alone, said_alone = _analysis(tmp_path / "a", monkeypatch, 1, one)
    pooled, skipped_pooled, said_pooled = _analysis(tmp_path / "b", monkeypatch, 2, two)

    assert skipped_alone == skipped_pooled and sorted(said_alone) == sorted(said_pooled)  # (one line a layer)
    assert [s[:3] for s in _summary(pooled)] == [s[:3] for s in _summary(alone)]  # forms and ranks
    for a, b in zip(_summary(alone), _summary(pooled)):
        for r in a[2]:
            assert b[3][r] == pytest.approx(a[3][r], rel=1e-5, abs=1e-9)
            assert b[4][r] == pytest.approx(a[4][r], rel=1e-5, abs=1e-9)
    assert {c.layer for c in pooled if c.method == "cp"} == {"conv1", "conv2"}
    assert max(r for c in pooled if c.method == "cp" for r in c.ranks) < 16  # the cap applied

    caps = [i for i, e in enumerate(two) if e[0] == "cap"]
    runs = [e for e in two if e[0] == "analyse"]
    assert caps and max(caps) < min(i for i, e in enumerate(two) if e[0] == "analyse")
    threads = {name: {t for _, n, t in runs if n == name} for name in ("conv1", "conv2", "fc1", "fc2")}
    assert all(t.startswith("analyse") for name in ("conv1", "conv2", "fc1", "fc2") for t in threads[name])
    assert len(set().union(*threads.values())) == 2
    running, beside_heavy, order = {name: 0 for name in threads}, False, []
    for kind, name, _ in two[max(caps) + 1:]:
        running[name] += (kind == "analyse") - (kind == "end")
        assert not (running["fc1"] and running["conv2"])  # together: more than fc1's weight + 10 kB
        beside_heavy |= kind == "analyse" and sum(running.values()) > 1 and bool(running["fc1"] or running["conv2"])
        order += [name] if kind == "analyse" else []
    assert beside_heavy  # (conv2's forms side by side: within the budget)
    # the layers over 10 kB last: what they keep is not held while the others run
    first_heavy = min(order.index("conv2"), order.index("fc1"))
    assert set(order[:first_heavy]) == {"conv1", "fc2"} and set(order[first_heavy:]) == {"conv2", "fc1"}


def _written(tmp_path, monkeypatch, workers: int, threads: list):
    from caffe_compress import pipeline
    from caffe_compress.decompose import cp
    from caffe_compress.plan import search

    tmp_path.mkdir()
    deploy, model = small_model(tmp_path)
    monkeypatch.setattr(search, "ANALYSIS_WORKERS", workers)
    real = cp.cp_conv

    def traced(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "cp_conv", traced)
    pipeline.compress(deploy, model, tradeoff=0.0, ranks={"conv1": 6, "conv2": 8, "fc1": 16},
                      forms={"conv1": "cp", "conv2": "cp"}, objective="size", output=tmp_path / "o")
    return {layer.name: layer.blobs for layer in io.load(tmp_path / "o.prototxt", tmp_path / "o.caffemodel").layers}


def test_a_rounds_factorizations_computed_side_by_side_are_the_ones_computed_one_at_a_time(tmp_path, monkeypatch):
    """The CP polishes (and the other forms) of one round run on worker threads: the same written weights."""
    one, two = [], []
    alone = _written(tmp_path / "a", monkeypatch, 1, one)
    pooled = _written(tmp_path / "b", monkeypatch, 2, two)
    assert one == [threading.main_thread().name] * 2
    assert len(two) == 2 and all(t.startswith("analyse") for t in two)
    assert alone.keys() == pooled.keys() and {"conv1_cp1", "conv2_cp3", "fc1_svd1"} <= alone.keys()
    for name, blobs in alone.items():
        for a, b in zip(blobs, pooled[name]):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_rounds_hold_no_earlier_net_and_only_the_polished_factors(tmp_path, monkeypatch):
    """Memory: between rounds the staged best plan is held without its Net, and only the factors refined by
    iterations (CP, Tucker-2) are kept for later rounds; the Net built again from a plan is the one written."""
    from caffe_compress import pipeline
    from caffe_compress.net import Net

    deploy, model = small_model(tmp_path)
    seen, loops = [], []
    real_attempt, real_execute = pipeline._ClosedLoop.attempt, pipeline._ClosedLoop.execute

    def attempt(self, *args, **kwargs):
        out = real_attempt(self, *args, **kwargs)
        seen.append((self.state.best, dict(self.run.factorizer.cache)))
        return out

    def execute(self):
        loops.append(self)
        return real_execute(self)

    monkeypatch.setattr(pipeline._ClosedLoop, "attempt", attempt)
    monkeypatch.setattr(pipeline._ClosedLoop, "execute", execute)
    pipeline.compress(deploy, model, tradeoff=0.0, ranks={"conv1": 6, "conv2": 8, "fc1": 16},
                      forms={"conv1": "cp", "conv2": "spatial-svd"}, objective="size", output=tmp_path / "o")
    assert seen and any(best is not None for best, _ in seen)
    for best, cache in seen:
        assert best is None or not any(isinstance(part, Net) for part in best)
        assert all(method in pipeline.POLISHED_FORMS for _, method, _ in cache)
    plan = loops[0].state.best[1]
    assert any(lp.rank and lp.method == "svd" for lp in plan.layers)  # (a form no longer cached is in it)
    written = {layer.name: layer.blobs for layer in io.load(tmp_path / "o.prototxt", tmp_path / "o.caffemodel").layers}
    rebuilt = {layer.name: layer.blobs for layer in loops[0].net_of(plan).layers}
    assert written.keys() == rebuilt.keys()
    for name, blobs in written.items():
        for a, b in zip(blobs, rebuilt[name]):
            np.testing.assert_array_equal(a, b)


def _blas_threads() -> int:
    from threadpoolctl import threadpool_info

    return max((info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"), default=1)


def test_every_opencv_pass_of_a_run_has_blas_on_one_thread(tmp_path, monkeypatch):
    """OpenBLAS's idle workers spin after each multi-threaded call and take a core from the OpenCV pass that
    follows (a 2-thread latency read as slow as 1 thread): the whole run keeps numpy's BLAS on one thread,
    and gives the caller's setting back after."""
    from threadpoolctl import threadpool_limits

    from caffe_compress import pipeline, timing, validate

    seen = []
    real_forward, real_once = validate.forward, timing._forward_once

    def forward(*args, **kwargs):
        seen.append(("validation", _blas_threads()))
        return real_forward(*args, **kwargs)

    def once(*args, **kwargs):
        seen.append(("timing", _blas_threads()))
        return real_once(*args, **kwargs)

    monkeypatch.setattr(validate, "forward", forward)
    monkeypatch.setattr(timing, "_forward_once", once)
    deploy, model = small_model(tmp_path)
    with threadpool_limits(limits=2, user_api="blas"):
        if _blas_threads() < 2:
            pytest.skip("numpy's BLAS here has no threads to limit")
        pipeline.compress(deploy, model, tradeoff=0.95, output=tmp_path / "o", retime=True)
        assert _blas_threads() == 2
    assert {kind for kind, _ in seen} == {"validation", "timing"}
    assert {threads for _, threads in seen} == {1}


def test_side_by_side_keeps_the_order_raises_a_jobs_error_and_holds_the_weight_budget(monkeypatch):
    """The scheduler alone: results in the jobs' order, announced in that order on the caller's thread; jobs
    at once never hold more than the heaviest one's weight + BESIDE_BYTES; a job's error is raised to the
    caller (and no job starts after it)."""
    from caffe_compress.plan import search

    monkeypatch.setattr(search, "ANALYSIS_WORKERS", 2)
    monkeypatch.setattr(search, "BESIDE_BYTES", 10)
    weights = {"a": 100, "b": 95, "c": 5, "d": 5, "e": 60, "f": 40}  # at once: at most 110
    lock, held, peak, said = threading.Lock(), [0], [0], []

    def work(job):
        with lock:
            held[0] += weights[job]
            peak[0] = max(peak[0], held[0])
        time.sleep(0.2 if job == "a" else 0.02)  # (the heaviest runs long: the other worker starts beside it)
        with lock:
            held[0] -= weights[job]
        return job.upper()

    def announce(job):
        said.append((job, threading.current_thread().name))

    jobs = list(weights)
    assert search.side_by_side(work, jobs, weight=weights.get, announce=announce) == [j.upper() for j in jobs]
    assert said == [(j, threading.main_thread().name) for j in jobs]
    assert 100 < peak[0] <= 110  # a small job beside the heaviest, never two heavy ones

    started = []

    def failing(job):
        started.append(job)
        if job == "b":
            raise ValueError("job b failed")
        time.sleep(0.05)
        return job

    with pytest.raises(ValueError, match="job b failed"):
        search.side_by_side(failing, jobs, weight=lambda job: 1, announce=lambda job: None)
    assert "f" not in started  # (a, b started; c maybe beside a; nothing after the error)


def test_recording_in_chunks_never_holds_two_copies_of_the_patches(tmp_path, monkeypatch):
    """The layer inputs recorded over several chunks are joined one layer at a time, each layer's chunks released
    as it is joined: the recording's peak is the patches once plus one layer's, not twice the patches."""
    import tracemalloc

    from caffe_compress.plan import analyse as planner, search

    deploy, model = small_model(tmp_path)
    net = io.load(deploy, model)
    first_input, out_sources = blob_sources(net)
    names = ("conv1", "conv2", "fc1", "fc2")
    cv = OpenCVRunner(tmp_path)
    x = np.random.default_rng(3).standard_normal((64, 3, 24, 24)).astype(np.float32)
    monkeypatch.setattr(search, "ACTIVATION_BYTES", 8 * 3 * 24 * 24 * 4 * 4)  # a few samples a chunk

    sources = {name: first_input[name] for name in names}
    cv.run(net, {"data": x[:1]}, [*sources.values(), *out_sources])  # (OpenCV's first load outside the trace)
    tracemalloc.start()
    try:
        layer_inputs, outputs = search.collect_inputs(cv.run, net, {"data": x}, sources, out_sources, seed=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    kept = [v.patches if v.patches is not None else v.rows for v in layer_inputs.values()] + list(outputs.values())
    total, largest = sum(a.nbytes for a in kept), max(a.nbytes for a in kept)
    assert layer_inputs["conv1"].patches.shape[0] == planner.PATCH_SAMPLES  # (several chunks' patches joined)
    assert peak < total + 1.5 * largest, (peak, total, largest)
