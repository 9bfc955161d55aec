"""The trade-off knob: monotone file size, JSON report keys, exit codes, validation figures."""
import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from nets import write_model

TRADEOFFS = [0, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1]

SMALL_NET = """
name: "small"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 24 dim: 24 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 16 kernel_size: 5 stride: 2 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2" convolution_param { num_output: 32 kernel_size: 3 pad: 1 } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "pool" type: "Pooling" bottom: "conv2" top: "pool" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "fc1" type: "InnerProduct" bottom: "pool" top: "fc1" inner_product_param { num_output: 64 } }
layer { name: "relu3" type: "ReLU" bottom: "fc1" top: "fc1" }
layer { name: "fc2" type: "InnerProduct" bottom: "fc1" top: "fc2" inner_product_param { num_output: 10 } }
layer { name: "prob" type: "Softmax" bottom: "fc2" top: "prob" }
"""


def small_model(tmp_path):
    rng = np.random.default_rng(11)

    def he(*shape):
        fan_in = int(np.prod(shape[1:]))
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    weights = {
        "conv1": [he(16, 3, 5, 5), np.zeros(16, np.float32)],
        "conv2": [he(32, 16, 3, 3), np.full(32, 0.01, np.float32)],
        "fc1": [he(64, 32 * 5 * 5), np.zeros(64, np.float32)],
        "fc2": [he(10, 64), np.zeros(10, np.float32)],
    }
    return write_model(tmp_path, "small", SMALL_NET, weights)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "caffe_compress", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


def _sizes(deploy, model, tmp_path, extra=()):
    sizes = []
    for t in TRADEOFFS:
        out = tmp_path / f"t{t}"
        # timings vary from run to run: sizes are compared with the speed checks off
        result = run_cli(deploy, model, "--tradeoff", t, "-o", out, "--force", "--objective", "size", *extra)
        assert result.returncode == 0, result.stderr
        sizes.append((tmp_path / f"t{t}.caffemodel").stat().st_size)
    return sizes


@pytest.mark.slow
def test_file_size_is_monotone_in_tradeoff(tmp_path):
    deploy, model = small_model(tmp_path)
    sizes = _sizes(deploy, model, tmp_path)
    assert all(a >= b for a, b in zip(sizes, sizes[1:])), sizes
    assert sizes[0] >= model.stat().st_size - 64  # T = 0 is lossless
    assert sizes[-1] < sizes[0] / 2  # T = 1 is really smaller


@pytest.mark.slow
def test_gendernet_size_is_monotone(tmp_path, gendernet):
    sizes = _sizes(gendernet.deploy, gendernet.weights, tmp_path, extra=("--no-validate",))
    assert all(a >= b for a, b in zip(sizes, sizes[1:])), sizes
    assert gendernet.weights.stat().st_size / sizes[TRADEOFFS.index(0.95)] >= 5


def test_json_report_keys_and_validation_figures(tmp_path):
    deploy, model = small_model(tmp_path)
    result = run_cli(deploy, model, "--tradeoff", "0.9", "-o", tmp_path / "o", "--json", tmp_path / "r.json", "--force")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report) >= {"schema_version", "input", "output", "tradeoff", "error_budget",
                           "predicted_output_error", "totals", "layers", "validation", "timings_s", "peak_rss_mb"}
    assert set(report["totals"]) == {"layers_before", "layers_after", "params_before", "params_after", "bytes_before", "bytes_after", "ratio",
                                     "macs_before", "macs_after"}
    assert report["totals"]["bytes_after"] == (tmp_path / "o.caffemodel").stat().st_size
    for layer in report["layers"]:
        assert set(layer) == {"name", "type", "weight_shape", "method", "rank", "params_before", "params_after",
                              "macs_before", "macs_after", "weight_error", "output_error", "time_ms_before",
                              "time_ms_after_predicted", "note"}
    (out,) = report["validation"]["outputs"]
    assert out["name"] == "prob"
    assert 0.0 <= out["top1_agreement"] <= 1.0
    assert 0.0 <= out["mean_relative_error"] <= out["max_relative_error"]
    assert -1.0 <= out["cosine_similarity"] <= 1.0 + 1e-9
    assert "validation" in result.stdout and "top-1 agreement" in result.stdout


def test_lossless_validation_is_exact(tmp_path):
    deploy, model = small_model(tmp_path)
    result = run_cli(deploy, model, "--tradeoff", "0", "-o", tmp_path / "o", "--json", tmp_path / "r.json")
    assert result.returncode == 0, result.stderr
    (out,) = json.loads((tmp_path / "r.json").read_text())["validation"]["outputs"]
    assert out["top1_agreement"] == 1.0 and out["max_relative_error"] <= 1e-6


@pytest.mark.parametrize("args,code,message", [
    (["--tradeoff", "1.5"], 2, "--tradeoff"),
    (["--tradeoff", "nan"], 2, "--tradeoff"),
    (["--tradeoff", "abc"], 2, "--tradeoff"),
    (["--rank", "nosuch=4"], 2, "no layer named 'nosuch'"),
    (["--rank", "fc1=0"], 2, "--rank"),
    (["--rank", "fc1=9999"], 2, "out of range"),
    (["--rank", "fc1"], 2, "LAYER=R"),
    (["--keep", "nosuch"], 2, "no layer named 'nosuch'"),
    (["--bogus"], 2, "unrecognized"),
])
def test_usage_errors(tmp_path, args, code, message):
    deploy, model = small_model(tmp_path)
    result = run_cli(deploy, model, *args, "-o", tmp_path / "o")
    assert result.returncode == code, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "o.caffemodel").exists()


def test_model_and_io_exit_codes(tmp_path):
    deploy, model = small_model(tmp_path)
    assert run_cli(tmp_path / "missing.prototxt", model).returncode == 4
    assert run_cli(deploy, tmp_path).returncode == 4
    bad = tmp_path / "bad.prototxt"
    bad.write_text('layer { name: "x" type: "ReLU" foo: 1 }')
    r = run_cli(bad, model)
    assert r.returncode == 3 and "1:" in r.stderr and "foo" in r.stderr
    r = run_cli(model, deploy, "-o", tmp_path / "o")
    assert r.returncode == 3 and "swapped" in r.stderr
    r = run_cli(deploy, model, "-o", tmp_path / "nodir" / "o")
    assert r.returncode == 5
    r = run_cli(deploy, model, "-o", tmp_path / "small")  # would overwrite the inputs
    assert r.returncode == 5 and "overwrite" in r.stderr
    r = run_cli(deploy, model, "-o", f"{tmp_path / 'new' / 'dir'}/", "--force")  # a directory that does not exist
    assert r.returncode == 5 and "does not exist" in r.stderr
    assert not (tmp_path / "new").exists() and not list(tmp_path.glob("**/dir.*"))
    r = run_cli(deploy, model, "-o", f"{tmp_path / 'dir2'}/", "--force")  # its parent exists: still no dir2.*
    assert r.returncode == 5 and "does not exist" in r.stderr and not list(tmp_path.glob("dir2*"))


def _images(directory, count=6):
    import cv2

    directory.mkdir()
    rng = np.random.default_rng(5)
    for i in range(count):
        img = cv2.GaussianBlur(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8), (7, 7), 3)
        cv2.imwrite(str(directory / f"img{i}.png"), img)
    return directory


def test_images_and_calibration_with_preprocessing(tmp_path):
    deploy, model = small_model(tmp_path)
    images = _images(tmp_path / "imgs")
    result = run_cli(deploy, model, "--tradeoff", "0.9", "-o", tmp_path / "o", "--json", tmp_path / "r.json",
                     "--images", images, "--calibration", images, "--mean", "104,117,123", "--scale", "0.017",
                     "--resize", "28x28", "--size", "24x24", "--swap-rb")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["validation"]["inputs"].startswith("images:") and "(6)" in report["validation"]["inputs"]
    result = run_cli(deploy, model, "-o", tmp_path / "o2", "--images", tmp_path / "nope")
    assert result.returncode == 2 and "--images" in result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli(deploy, model, "-o", tmp_path / "o3", "--calibration", empty)
    assert result.returncode == 2 and "no images" in result.stderr


def test_rich_model_size_is_monotone(tmp_path):
    from test_zoo_layers import RICH, rich_weights

    deploy, model = write_model(tmp_path, "rich", RICH, rich_weights())
    sizes = _sizes(deploy, model, tmp_path, extra=("--no-validate",))
    assert all(a >= b for a, b in zip(sizes, sizes[1:])), sizes


def test_a_held_out_calibration_split_draws_no_probes(tmp_path, monkeypatch):
    """With enough calibration images, half plan and half validate: no synthetic probes are drawn (they
    were, and thrown away: ~1 s and ~70 MB on GenderNet), and no probe decides the input convention."""
    from caffe_compress import io
    from caffe_compress.plan import inputs as plan_inputs, probe
    from caffe_compress.validate import Preprocessing

    deploy, model = small_model(tmp_path)
    net = io.load(deploy, model)
    images = _images(tmp_path / "imgs", count=2 * plan_inputs.MIN_HELD_OUT)
    monkeypatch.setattr(probe, "natural_probes", lambda *a, **k: pytest.fail("probes drawn"))
    got = plan_inputs.make_inputs(net, wants_plan=True, validate_output=True, images=None, calibration=images,
                                  pre=Preprocessing(), probes=8, seed=0)
    assert got.validation_label.startswith("held-out") and not got.synthetic
    assert got.planning["data"].shape == got.validation["data"].shape == (plan_inputs.MIN_HELD_OUT, 3, 24, 24)
    assert not np.array_equal(got.planning["data"], got.validation["data"])
    monkeypatch.undo()
    few = _images(tmp_path / "few", count=4)  # too few to split: all plan, probes validate
    got = plan_inputs.make_inputs(net, wants_plan=True, validate_output=True, images=None, calibration=few,
                                  pre=Preprocessing(), probes=8, seed=0)
    assert got.synthetic and got.planning["data"].shape[0] == 4


def _one_thread_latency(monkeypatch, compressed_ms):
    """Whole-model 1-thread timings faked: the original 10 ms, the k-th timed plan compressed_ms(k) ms (the
    default-thread ones stay real). Returns the timed plans, in order."""
    from caffe_compress import pipeline, timing

    timed, real = [], pipeline._Run.latency

    def latency(self, net, new_net, inputs, *, threads=1, **budget):
        if threads != 1:
            return real(self, net, new_net, inputs, threads=threads, **budget)
        timed.append(new_net)
        return timing.Latency(10.0, compressed_ms(len(timed)))

    monkeypatch.setattr(pipeline._Run, "latency", latency)
    return timed


def test_the_plan_after_the_last_speed_drop_is_timed_itself(tmp_path, monkeypatch):
    """The whole model measured slower three times: three factorizations are dropped, and the latency the
    report shows is the published plan's own, timed once more (it used to show the previous plan's)."""
    from caffe_compress import compress, pipeline

    deploy, model = small_model(tmp_path)
    one_thread = _one_thread_latency(monkeypatch, lambda k: 12.0 if k <= pipeline.MAX_SPEED_ROUNDS else 9.0 + 0.001 * k)
    report = compress(deploy, model, tradeoff=1.0, output=tmp_path / "o", force=True, seed=0, progress=None)
    assert len(one_thread) == pipeline.MAX_SPEED_ROUNDS + 1
    assert report.latency_ms["compressed_1t"] == 9.0 + 0.001 * len(one_thread)
    assert one_thread[-1] is not one_thread[-2]  # the last drop's plan, not the one before


def test_a_speed_drop_keeps_the_rest_of_the_plan_as_it_passed(tmp_path, monkeypatch):
    """The whole model measured slower once: the factorization measured slowest is dropped and every other
    layer keeps its form and rank (the plan is not chosen anew at the budget, which could miss the contract
    and leave nothing to publish)."""
    from caffe_compress import compress, pipeline

    deploy, model = small_model(tmp_path)
    plans = _one_thread_latency(monkeypatch, lambda k: 12.0 if k == 1 else 9.0)
    choices = []  # the number of whole-model timings at each choice of ranks for a budget
    choose = pipeline.planner.choose_ranks
    monkeypatch.setattr(pipeline.planner, "choose_ranks", lambda *a, **k: choices.append(len(plans)) or choose(*a, **k))
    report = compress(deploy, model, tradeoff=1.0, output=tmp_path / "o", force=True, seed=0, progress=None)
    assert choices and max(choices) == 0  # not chosen anew after the drop
    first = {layer.name for layer in plans[0].layers}
    last = {layer.name for layer in plans[-1].layers}
    dropped = [lp for lp in report.layers if lp.reason.startswith("dropped")]
    assert len(dropped) == 1 and not dropped[0].rank
    factored = {lp.layer for lp in report.layers if lp.rank}
    assert factored and all(any(n.startswith(f"{name}_") for n in last) for name in factored)
    assert first - last and last - first <= set()  # only the dropped layer's factors went


def test_nothing_faster_is_said_as_such_and_writes_nothing(tmp_path, monkeypatch):
    """Every plan that passes measures slower as a whole: its factorizations are dropped until none is left,
    nothing is written, and the report says why (not "nothing to compress within the fidelity contract")."""
    from caffe_compress import compress, pipeline

    deploy, model = small_model(tmp_path)
    _one_thread_latency(monkeypatch, lambda k: 12.0)
    monkeypatch.setattr(pipeline, "MAX_SPEED_ROUNDS", 10)
    report = compress(deploy, model, tradeoff=1.0, output=tmp_path / "o", seed=0, progress=None)
    assert report.note == pipeline.NOTHING_FASTER
    assert not list(tmp_path.glob("o.*"))
    assert any(lp.reason.startswith("dropped") for lp in report.layers)


def test_a_plan_still_slower_after_the_last_drop_is_not_published(tmp_path, monkeypatch):
    """Every plan measures slower and the drops are bounded (one here): after the last drop the model is still
    slower, so nothing is written (it used to be published, slower, with exit 0) and the report says why."""
    from caffe_compress import compress, io, pipeline

    deploy, model = small_model(tmp_path)
    timed = _one_thread_latency(monkeypatch, lambda k: 12.0)
    monkeypatch.setattr(pipeline, "MAX_SPEED_ROUNDS", 1)
    report = compress(deploy, model, tradeoff=1.0, output=tmp_path / "o", seed=0, progress=None)
    assert len(timed) == 2  # the plan, and the plan after the one drop
    assert len(timed[-1].layers) > len(io.load(deploy, model).layers)  # factors were left: the bound stopped it
    assert report.note == pipeline.NOTHING_FASTER
    assert not list(tmp_path.glob("o.*"))


def test_whole_model_latency_alternates_the_two_nets_and_is_cached_per_pair(tmp_path, monkeypatch):
    """The guard's and the report's whole-model latencies: the original and the compressed model run
    alternately in one process (an early median of one against a late median of the other read a 0.4 ms
    net as 0.71x slower with 2 threads; alternating gave 1.06x), and a rerun with the same timing cache
    (the real run after --plan-only) measures no pair again and reports the same figures."""
    from caffe_compress import compress, timing

    deploy, model = small_model(tmp_path)
    monkeypatch.setenv("CAFFE_COMPRESS_TIMING_CACHE", str(tmp_path / "cache"))
    runs: list[list[int]] = []
    real_compare, real_once = timing.compare, timing._forward_once

    def compare(load, original, compressed, inputs, **kw):
        if original.name == "timing":  # a layer pair the guard re-times (when micro-benchmarks were close)
            return real_compare(load, original, compressed, inputs, **kw)
        runs.append([])
        monkeypatch.setattr(timing, "_forward_once", lambda net, feed: runs[-1].append(id(net)) or real_once(net, feed))
        try:
            return real_compare(load, original, compressed, inputs, **kw)
        finally:
            monkeypatch.setattr(timing, "_forward_once", real_once)

    monkeypatch.setattr(timing, "compare", compare)
    first = compress(deploy, model, tradeoff=1.0, output=tmp_path / "o", force=True, seed=0, progress=None)
    assert first.latency_ms and len(runs) == 2  # 1 thread (the guard), default threads (the report)
    for seq in runs:
        assert len(seq) >= 2 * timing.MIN_RUNS and len(set(seq)) == 2
        assert len(set(seq[0::2])) == 1 and len(set(seq[1::2])) == 1  # original, compressed, original, ...
    again = compress(deploy, model, tradeoff=1.0, output=tmp_path / "p", force=True, seed=0, progress=None)
    assert len(runs) == 2 and again.latency_ms == first.latency_ms


def test_a_big_model_is_timed_one_net_at_a_time_the_original_early(tmp_path, monkeypatch):
    """Above timing.BIG_NET_BYTES the two nets are not loaded together (that would add the model to the run's
    peak memory): the original is timed before planning, while little else is held, and the plan alone."""
    from caffe_compress import compress, pipeline, timing

    deploy, model = small_model(tmp_path)
    monkeypatch.setattr(timing, "BIG_NET_BYTES", 0)  # every net is big
    events = []
    real_net_ms, real_write, real_compare = pipeline._Run.net_ms, pipeline._Run.write_and_verify, timing.compare

    def net_ms(self, net, *a, **k):
        events.append("original" if net is self.net else "plan")
        return real_net_ms(self, net, *a, **k)

    def write_and_verify(self, *a, **k):
        events.append("round")
        return real_write(self, *a, **k)

    def compare(*a, max_runs=timing.MAX_RUNS, **k):
        assert max_runs != timing.NET_MAX_RUNS, "whole nets timed together"
        return real_compare(*a, max_runs=max_runs, **k)

    monkeypatch.setattr(pipeline._Run, "net_ms", net_ms)
    monkeypatch.setattr(pipeline._Run, "write_and_verify", write_and_verify)
    monkeypatch.setattr(timing, "compare", compare)
    report = compress(deploy, model, tradeoff=1.0, output=tmp_path / "o", force=True, seed=0, progress=None)
    assert report.latency_ms and "plan" in events
    assert events.index("original") < events.index("round")  # before planning and validation


def test_a_big_original_cached_on_another_day_is_not_set_against_a_plan_measured_now(tmp_path, monkeypatch):
    """A big net's two sides are timed apart: the timing cache keeps them as a pair. An original cached by an
    earlier run (the machine twice as fast that day) must not be compared with a plan measured now: the
    plan (0.9x the original's time today) would read 0.56x slower and lose every factorization. A rerun
    reuses the pair and reports the same figures."""
    from caffe_compress import compress, io, timing

    deploy, model = small_model(tmp_path)
    layers = len(io.load(deploy, model).layers)
    monkeypatch.setattr(timing, "BIG_NET_BYTES", 0)  # every net is big: timed one at a time
    monkeypatch.setenv("CAFFE_COMPRESS_TIMING_CACHE", str(tmp_path / "cache"))
    day = {"scale": 0.5}
    timed = []

    def median_ms(load, net, inputs, *, threads=1, **kw):
        timed.append(net)
        original = len(net.layers) == layers
        return day["scale"] * (10.0 if original else 9.0) * threads

    monkeypatch.setattr(timing, "median_ms", median_ms)
    compress(deploy, model, tradeoff=1.0, output=tmp_path / "o", force=True, seed=0, progress=None)
    day["scale"] = 1.0  # a slower day, and a new plan (conv1 kept): a new pair
    report = compress(deploy, model, tradeoff=1.0, output=tmp_path / "p", force=True, seed=0, progress=None,
                      keep=["conv1"])
    assert report.written and not any(lp.reason.startswith("dropped") for lp in report.layers)
    assert report.latency_ms["original_1t"] == 10.0 and report.latency_ms["compressed_1t"] == 9.0
    count = len(timed)
    again = compress(deploy, model, tradeoff=1.0, output=tmp_path / "q", force=True, seed=0, progress=None,
                     keep=["conv1"])
    assert again.latency_ms == report.latency_ms
    assert all(len(net.layers) == layers for net in timed[count:])  # (this run's original only)


def test_a_forms_times_come_from_its_small_ranks_and_extend_the_line():
    """Planning times: both ends of the rank grid are timed, but never a factored form above TIMED_BYTES
    (a trial net that costs more to load than to run); the rest follows the measured line, above it too."""
    from caffe_compress.plan import search
    from caffe_compress.plan.analyse import Candidate

    ranks = (1024, 512, 256, 128, 64, 32, 16)
    n, k = 4096, 16384  # rank r: r * (n + k) parameters; 4 bytes each
    cand = Candidate("fc", "InnerProduct", "svd", (n, k), 1, n * k, n * k, ranks,
                     {r: r * (n + k) for r in ranks}, {r: r * (n + k) for r in ranks},
                     {r: 0.5 for r in ranks}, {r: 0.5 for r in ranks})
    timed = search.timing_ranks(cand)
    assert timed[0] == 16 and all(4 * cand.params_at[r] <= search.TIMED_BYTES for r in timed)
    assert timed[-1] == max(r for r in ranks if 4 * cand.params_at[r] <= search.TIMED_BYTES) < 1024
    asked = []

    def factored_ms(c, r):
        asked.append(r)
        return 0.1 + 0.01 * r

    out, = search.measure_times([cand], original_ms=lambda name: 50.0, factored_ms=factored_ms, say=lambda m: None)
    assert sorted(asked) == sorted(timed)
    assert out.time_before == 50.0
    for r in ranks:
        assert out.time_at[r] == pytest.approx(0.1 + 0.01 * r)
    # a grid whose every factored form is big still gets a line (its two smallest ranks)
    huge = dataclasses.replace(cand, params_at={r: 10 ** 9 for r in ranks})
    assert search.timing_ranks(huge) == (16, 32)


SR_NET = """
name: "sr"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 1 dim: 160 dim: 160 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 32 kernel_size: 3 pad: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2" convolution_param { num_output: 32 kernel_size: 3 pad: 1 } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "conv3" type: "Convolution" bottom: "conv2" top: "out" convolution_param { num_output: 1 kernel_size: 3 pad: 1 } }
"""


def test_the_latency_of_a_net_timed_on_probes_smaller_than_declared_says_so(tmp_path, monkeypatch):
    """A fully convolutional net is probed and validated on pictures smaller than its declared input, and
    timed on them when a forward at the declared size would be long (here: any): the report says on which
    input the latency was measured, and the JSON gives both shapes."""
    from caffe_compress import compress, pipeline, report as report_text
    from caffe_compress.plan.inputs import PROBE_SIDE

    monkeypatch.setattr(pipeline, "LATENCY_SAMPLE_MS", 1e-9)

    rng = np.random.default_rng(3)
    weights = {"conv1": [rng.standard_normal((32, 1, 3, 3)).astype(np.float32) * 0.3, np.zeros(32, np.float32)],
               "conv2": [rng.standard_normal((32, 32, 3, 3)).astype(np.float32) * 0.08, np.zeros(32, np.float32)],
               "conv3": [rng.standard_normal((1, 32, 3, 3)).astype(np.float32) * 0.08, np.zeros(1, np.float32)]}
    deploy, model = write_model(tmp_path, "sr", SR_NET, weights)
    _one_thread_latency(monkeypatch, lambda k: 5.0)
    report = compress(deploy, model, tradeoff=1.0, output=tmp_path / "o", seed=0, progress=None)
    assert report.latency_ms["declared_shapes"] == {"data": [1, 1, 160, 160]}
    assert report.latency_ms["input_shapes"] == {"data": [1, 1, PROBE_SIDE, PROBE_SIDE]}
    text = report_text.format_table(report)
    assert f"on a smaller input than declared, data 1x1x{PROBE_SIDE}x{PROBE_SIDE}; declared: data 1x1x160x160" \
        in text
    same = dict(report.latency_ms, input_shapes={"data": [1, 1, 160, 160]})
    assert report_text._latency_input(same) == ""
    # an image output's validation line has no top-1 figure (the arg-max of a map is one pixel of it)
    assert {c.kind for c in report.contract} & {"image", "dense"}
    assert "output 'out': relative error mean" in text and "top-1" not in text


def test_a_big_plan_that_reads_slower_is_set_against_the_original_timed_again(tmp_path, monkeypatch):
    """One net at a time, the original's median is taken early; when the plan reads slower than the tolerance
    against it, the original is timed again right after the plan and that median decides (a drift of the
    machine, not the plan, made GenderNet T = 0.5 lose every factorization in a bench). A plan still slower
    against the fresh median is dropped as before."""
    from caffe_compress import compress, io, timing

    deploy, model = small_model(tmp_path)
    layers = len(io.load(deploy, model).layers)
    monkeypatch.setattr(timing, "BIG_NET_BYTES", 0)  # every net is big: timed one at a time
    monkeypatch.setenv("CAFFE_COMPRESS_TIMING_CACHE", "off")
    for fresh, written in ((11.0, True), (10.0, False)):
        originals = iter([10.0, fresh])  # early, then again (the machine drifted, or not)
        timed = []

        def median_ms(load, net, inputs, *, threads=1, **kw):
            original = len(net.layers) == layers
            if threads != 1:
                return 5.0
            timed.append("original" if original else "plan")
            return next(originals, fresh) if original else 10.5

        monkeypatch.setattr(timing, "median_ms", median_ms)
        report = compress(deploy, model, tradeoff=1.0, output=tmp_path / f"o{fresh}", force=True, seed=0,
                          progress=None)
        assert timed[:3] == ["original", "plan", "original"]
        if written:
            assert report.latency_ms["original_1t"] == 11.0 and report.latency_ms["compressed_1t"] == 10.5
            assert not any(lp.reason.startswith("dropped") for lp in report.layers)
        else:
            assert any(lp.reason.startswith("dropped") for lp in report.layers)
