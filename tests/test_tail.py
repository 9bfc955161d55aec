"""The numpy classifier-head forward used for sensitivity trials matches OpenCV."""
import cv2
import numpy as np

from caffe_compress import io, tail
from test_tradeoff import small_model


def test_tail_matches_opencv(tmp_path):
    deploy, model = small_model(tmp_path)
    net = io.load(deploy, model)
    chain = tail.tail_chain(net, "fc1", "prob")
    assert [l.name for l in chain] == ["fc1", "relu3", "fc2", "prob"]
    assert tail.tail_chain(net, "conv2", "prob") is None  # convolutions are not a plain head
    cv = cv2.dnn.readNetFromCaffe(str(deploy), str(model))
    x = np.random.default_rng(0).standard_normal((3, 3, 24, 24)).astype(np.float32)
    cv.setInput(x)
    pool, prob = cv.forward(["pool", "prob"])
    assert np.allclose(tail.run_tail(chain, pool), prob, rtol=1e-4, atol=1e-6)
    w = np.zeros_like(net.layer("fc2").blobs[0])
    uniform = tail.run_tail(chain, pool, {"fc2": w})
    assert np.allclose(uniform, 1.0 / 10)  # zero weights, zero bias: a flat softmax


def _gains(net, cv, x, ws_seed=0):
    """Every decomposable layer's gain, and the layer names of each model OpenCV ran for the trials."""
    from caffe_compress.plan import analyse as planner, search
    from caffe_compress.runner import blob_sources, compared_blobs

    first_input, out_sources = blob_sources(net)
    decomposable = [(layer, planner.describe_layer(layer, keep=False)[0]) for layer in net.layers
                    if layer.name in ("conv1", "conv2", "fc1", "fc2")]
    ws = planner.Workspace()
    run = lambda model, feed, sources: cv.run(model, feed, sources)  # noqa: E731
    layer_inputs, reference = search.collect_inputs(run, net, {"data": x}, {l.name: first_input[l.name] for l, _ in
                                                                           decomposable}, out_sources, seed=ws_seed)
    candidates, _ = search.analyse_layers(decomposable, layer_inputs, ranks={}, forms={}, ws=ws, seed=ws_seed,
                                          timings={}, say=lambda _: None)
    models = []

    def trial(model, feed, sources):
        models.append([layer.name for layer in model.layers])
        return cv.run(model, feed, sources)

    out = search.measure_gains(trial, net, candidates, inputs={"data": x}, reference=reference,
                               layer_inputs=layer_inputs, compared_blobs=compared_blobs(net), skip=set(), ws=ws,
                               say=lambda _: None)
    return {c.layer: c.gain for c in out}, models


def test_trials_before_the_head_run_opencv_only_up_to_it(tmp_path, monkeypatch):
    """A convolution's sensitivity trial runs the layers before the classifier head in OpenCV (not the
    head's weights: GenderNet's fc6 is 85% of the model) and the head in numpy, and gives the gain a run
    of the whole model gives."""
    from caffe_compress import runner
    from caffe_compress.plan import search

    deploy, model = small_model(tmp_path)
    net = io.load(deploy, model)
    x = np.random.default_rng(3).standard_normal((8, 3, 24, 24)).astype(np.float32)
    cv = runner.OpenCVRunner(tmp_path)
    split, models = _gains(net, cv, x)
    assert models and all("fc1" not in names and "fc2" not in names for names in models)
    monkeypatch.setattr(search, "_head", lambda *a: None)
    whole, models = _gains(net, cv, x)
    assert any("fc1" in names for names in models)  # (the comparison runs the whole model)
    assert set(split) == set(whole) and split["conv1"] != 1.0 and split["conv2"] != 1.0
    for name in split:
        assert abs(split[name] - whole[name]) <= 1e-3 * max(abs(whole[name]), 1e-6), (name, split, whole)


def test_layer_shapes_for_timing_come_from_the_kept_original(tmp_path, monkeypatch):
    """The timing guard reads every layer's input shape from the original already loaded in OpenCV: no
    second load of the whole model beside the planner's data (its peak memory)."""
    from caffe_compress import runner, timing, validate

    deploy, model = small_model(tmp_path)
    net = io.load(deploy, model)
    loads = []
    real = validate.load_opencv_net
    monkeypatch.setattr(validate, "load_opencv_net", lambda *a, **k: loads.append(1) or real(*a, **k))
    cv = runner.OpenCVRunner(tmp_path)
    cv.keep(net)
    cv.run(net, {"data": np.zeros((1, 3, 24, 24), np.float32)}, [runner.Source("prob")])
    guard = timing.SpeedGuard("balanced", cv, net, runner.blob_sources(net)[0], net.input_shapes(), lambda _: None)
    guard.infer_shapes()
    assert len(loads) == 1
    assert guard.layer_shapes["conv2"] == (1, 16, 10, 10) and guard.layer_shapes["fc1"][:2] == (1, 32)



def test_layer_timings_are_counted_once_in_the_timing_stage(tmp_path):
    """The guard times its micro-benchmarks through the pipeline's stage timer: inside the planner's own
    'timing' stage they are not added a second time (they once were: res10 showed 5.8 s for 3 s)."""
    import time

    from caffe_compress import pipeline, runner, timing

    deploy, model = small_model(tmp_path)
    net = io.load(deploy, model)
    timer = pipeline._Timer()
    cv = runner.OpenCVRunner(tmp_path)
    guard = timing.SpeedGuard("balanced", cv, net, runner.blob_sources(net)[0], net.input_shapes(),
                              lambda _: None, timer.stage)
    start = time.perf_counter()
    with timer.stage("timing"):
        guard.layer_ms("conv2", (net.layer("conv2"),))
    assert timer.timings["timing"] <= time.perf_counter() - start
    before = timer.timings["timing"]
    guard.layer_ms("fc1", (net.layer("fc1"),))  # outside any stage: counted in 'timing' too
    assert timer.timings["timing"] > before


RESIDUAL = """
name: "residual"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 16 dim: 16 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 8 kernel_size: 3 pad: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "slice" type: "Slice" bottom: "conv1" top: "a" top: "b" slice_param { slice_point: 4 } }
layer { name: "early" type: "Convolution" bottom: "a" top: "early" convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
        convolution_param { num_output: 8 kernel_size: 3 pad: 1 } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "conv3" type: "Convolution" bottom: "conv2" top: "conv3"
        convolution_param { num_output: 8 kernel_size: 3 pad: 1 } }
layer { name: "side" type: "Convolution" bottom: "b" top: "side" convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "sum" type: "Eltwise" bottom: "conv3" bottom: "conv1" top: "sum" }
layer { name: "relu3" type: "ReLU" bottom: "sum" top: "sum" }
layer { name: "fc1" type: "InnerProduct" bottom: "sum" top: "fc1" inner_product_param { num_output: 10 } }
layer { name: "prob" type: "Softmax" bottom: "fc1" top: "prob" }
"""


def test_trials_start_at_the_layer_and_give_the_whole_model_gain(tmp_path, monkeypatch):
    """A sensitivity trial runs only the layers from the approximated one on (the values crossing the cut
    -- a skip connection, an in-place ReLU's output, a Slice's second top -- come from the original), and
    gives the gain a run of the whole model gives, on a net with three outputs (one written before the
    cuts)."""
    from caffe_compress import runner
    from caffe_compress.plan import analyse as planner, search
    from nets import write_model

    rng = np.random.default_rng(5)
    blobs = {name: [rng.standard_normal(shape).astype(np.float32) * 0.3, rng.standard_normal(shape[0]).astype(
        np.float32) * 0.1] for name, shape in (("conv1", (8, 3, 3, 3)), ("early", (4, 4, 1, 1)), ("side", (4, 4, 1, 1)),
                                               ("conv2", (8, 8, 3, 3)), ("conv3", (8, 8, 3, 3)),
                                               ("fc1", (10, 8 * 16 * 16)))}
    deploy, model = write_model(tmp_path, "residual", RESIDUAL, blobs)
    net = io.load(deploy, model)
    x = np.random.default_rng(3).standard_normal((8, 3, 16, 16)).astype(np.float32)
    cv = runner.OpenCVRunner(tmp_path)
    names = ("conv2", "conv3", "fc1")
    first_input, out_sources = runner.blob_sources(net)
    decomposable = [(net.layer(n), planner.describe_layer(net.layer(n), keep=False)[0]) for n in names]
    run = lambda model, feed, sources: cv.run(model, feed, sources)  # noqa: E731

    def gains():
        ws = planner.Workspace()
        layer_inputs, reference = search.collect_inputs(run, net, {"data": x}, {n: first_input[n] for n in names},
                                                        out_sources, seed=0)
        candidates, _ = search.analyse_layers(decomposable, layer_inputs, ranks={}, forms={}, ws=ws, seed=0,
                                              timings={}, say=lambda _: None)
        models = []

        def trial(model, feed, sources):
            models.append({layer.name for layer in model.layers})
            return cv.run(model, feed, sources)

        out = search.measure_gains(trial, net, candidates, inputs={"data": x}, reference=reference,
                                   layer_inputs=layer_inputs, compared_blobs=runner.compared_blobs(net), skip=set(),
                                   ws=ws, say=lambda _: None)
        return {c.layer: c.gain for c in out}, models

    cut, models = gains()
    trials = [m for m in models if m & set(names) and not m & {"conv1"}]
    assert any("conv2" in m and "early" not in m and "side" in m for m in trials)  # conv2's starts at conv2
    assert any("conv3" in m and "conv2" not in m and "side" in m for m in trials)  # conv3's at conv3
    assert all("conv1" not in m or "conv3" not in m for m in models)  # no whole-model trial

    class Whole:  # the previous way: every trial runs the whole model
        def __init__(self, net, run, feed):
            self.net, self.run, self.feed = net, run, feed

        def trial(self, name, approx, sources, *, end=None, original=None):
            return self.run(search.with_weight(self.net, name, approx), self.feed, sources)

    monkeypatch.setattr(search, "_Cuts", Whole)
    whole, _ = gains()
    assert set(cut) == set(whole) and all(g != 1.0 for g in cut.values())
    for name in cut:
        assert abs(cut[name] - whole[name]) <= 1e-5 * abs(whole[name]), (name, cut, whole)
