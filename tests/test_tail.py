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
    guard = timing.SpeedGuard("balanced", cv, net, runner.blob_sources(net)[0], net.input_shapes(), lambda _: None, {})
    guard.infer_shapes()
    assert len(loads) == 1
    assert guard.layer_shapes["conv2"] == (1, 16, 10, 10) and guard.layer_shapes["fc1"][:2] == (1, 32)
