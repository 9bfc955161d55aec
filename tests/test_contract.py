"""The fidelity contract: output kinds, metrics that catch broken outputs, the closed loop, the graph bugs
(in-place final layer, multi-top producer) and the input-convention choice. Small nets built in code."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from caffe_compress import io, pipeline, runner
from caffe_compress.net import Layer, Net
from caffe_compress.plan import contract, probe, search
from nets import cp_kernel, low_rank_matrix, max_relative_difference, message_lines, opencv_outputs, write_model


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "caffe_compress", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


# ------------------------------------------------------------------ the two graph bugs

EMBEDDER = """
name: "embedder"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 16 dim: 16 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 16 kernel_size: 3 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "fc" type: "InnerProduct" bottom: "conv1" top: "emb" inner_product_param { num_output: 128 } }
layer { name: "bn" type: "BatchNorm" bottom: "emb" top: "emb" }
layer { name: "sc" type: "Scale" bottom: "emb" top: "emb" scale_param { bias_term: true } }
"""


def embedder(tmp_path):
    rng = np.random.default_rng(0)
    weights = {
        "conv1": [cp_kernel(16, 3, 3, 3, 3, seed=1) * 0.02, np.zeros(16, np.float32)],
        "fc": [low_rank_matrix(128, 16 * 14 * 14, 6, seed=2), rng.standard_normal(128).astype(np.float32) * 0.01],
        "bn": [np.zeros(128, np.float32), np.ones(128, np.float32), np.ones(1, np.float32)],
        "sc": [rng.uniform(0.5, 2, 128).astype(np.float32), np.zeros(128, np.float32)],
    }
    return write_model(tmp_path, "embedder", EMBEDDER, weights)


def test_in_place_final_layer_is_an_output(tmp_path):
    deploy, model = embedder(tmp_path)
    net = io.load(deploy, model)
    assert net.output_names() == ["emb"]
    assert pipeline.compared_blobs(net) == ["emb"]
    result = run_cli(deploy, model, "-o", tmp_path / "o", "--json", tmp_path / "r.json")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    checks = report["contract"]["checks"]
    assert [c["output"] for c in checks] == ["emb"] and checks[0]["kind"] == "embedding"
    assert report["contract"]["passed"] is True
    methods = {l["name"]: l["method"] for l in report["layers"]}
    assert methods["fc"] == "svd"  # the exact rank-6 weight is factored, not left alone
    x = {"data": np.random.default_rng(5).uniform(-100, 100, (4, 3, 16, 16)).astype(np.float32)}
    (a,), (b,) = opencv_outputs(deploy, model, x, ["sc"]), opencv_outputs(tmp_path / "o.prototxt",
                                                                          tmp_path / "o.caffemodel", x, ["sc"])
    cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() >= 0.99


SLICED = """
name: "sliced"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 6 dim: 12 dim: 12 } } }
layer { name: "split" type: "Slice" bottom: "data" top: "a" top: "b" top: "c" slice_param { axis: 1 slice_point: 2 slice_point: 4 } }
layer { name: "conv_a" type: "Convolution" bottom: "a" top: "fa" convolution_param { num_output: 16 kernel_size: 3 } }
layer { name: "conv_b" type: "Convolution" bottom: "b" top: "fb" convolution_param { num_output: 16 kernel_size: 3 } }
layer { name: "conv_c" type: "Convolution" bottom: "c" top: "fc" convolution_param { num_output: 16 kernel_size: 3 } }
layer { name: "cat" type: "Concat" bottom: "fa" bottom: "fb" bottom: "fc" top: "out" }
"""


def test_multi_top_producer_feeds_decomposable_layers(tmp_path):
    weights = {f"conv_{k}": [cp_kernel(16, 2, 3, 3, 2, seed=i), np.zeros(16, np.float32)]
               for i, k in enumerate("abc")}
    deploy, model = write_model(tmp_path, "sliced", SLICED, weights)
    result = run_cli(deploy, model, "--rank", "conv_b=2", "--rank", "conv_c=2", "-o", tmp_path / "o",
                     "--json", tmp_path / "r.json")
    assert result.returncode == 0, result.stderr
    net = io.load(tmp_path / "o.prototxt", tmp_path / "o.caffemodel")
    types = [layer.type for layer in net.layers]
    assert types.count("Convolution") == 3 + 2 * 3 and "Power" not in types  # taps never reach the output
    x = {"data": np.random.default_rng(1).standard_normal((2, 6, 12, 12)).astype(np.float32)}
    (a,), (b,) = opencv_outputs(deploy, model, x), opencv_outputs(tmp_path / "o.prototxt", tmp_path / "o.caffemodel", x)
    assert max_relative_difference(a, b) <= 1e-4
    # and with the planner choosing (T > 0), which reads every branch's input through the taps
    result = run_cli(deploy, model, "--tradeoff", "0.95", "-o", tmp_path / "p", "--force")
    assert result.returncode == 0, result.stderr


def test_taps_copy_the_kth_top_before_in_place_layers():
    net = Net("t", (
        Layer("data", "Input", (), ("x",)),
        Layer("s", "Slice", ("x",), ("a", "b")),
        Layer("r", "ReLU", ("b",), ("b",)),
    ))
    tapped, names = runner.with_taps(net, [runner.Source("s", 1), runner.Source("s", 0)])
    assert [layer.name for layer in tapped.layers] == ["data", "s", names[runner.Source("s", 1)], "r"]
    assert names[runner.Source("s", 0)] == "s"


def test_big_maps_run_in_smaller_passes_with_the_values_of_one_pass(tmp_path, monkeypatch):
    """A step of RUN_CHUNK samples whose maps are big runs in passes of a few samples (cache): per-sample
    outputs are joined across the passes, a PriorBox's (not per sample) is the one-pass value, and a stop
    is still asked after each step."""
    rng = np.random.default_rng(0)
    net = Net("big", (
        Layer("data", "Input", (), ("data",), {"input_param": {"shape": [{"dim": [1, 1, 96, 96]}]}}),
        Layer("conv", "Convolution", ("data",), ("conv",), {"convolution_param": {"num_output": 64, "kernel_size": [3], "pad": [1]}},
              (rng.standard_normal((64, 1, 3, 3)).astype(np.float32), np.zeros(64, np.float32))),
        Layer("out", "Convolution", ("conv",), ("out",), {"convolution_param": {"num_output": 2, "kernel_size": [1]}},
              (rng.standard_normal((2, 64, 1, 1)).astype(np.float32), np.zeros(2, np.float32))),
        Layer("prior", "PriorBox", ("out", "data"), ("prior",),
              {"prior_box_param": {"min_size": [30.0], "aspect_ratio": [2.0], "flip": True, "variance": [0.1]}}),
    ))
    x = {"data": rng.uniform(0, 1, (11, 1, 96, 96)).astype(np.float32)}
    sources = [runner.Source("out"), runner.Source("prior")]
    cv = runner.OpenCVRunner(tmp_path)
    assert runner._pass_size(cv.load(net, what="t"), x) == 2  # 64 x 96 x 96 floats a sample
    order = np.array([3, 10, 0, 7, 1, 9, 2, 8, 4, 6, 5])
    steps = []
    split = cv.run(net, x, sources, order=order, stop=lambda values, done: steps.append(done) and False)
    monkeypatch.setattr(runner, "PASS_BYTES", 1 << 40)  # one pass per step
    whole = cv.run(net, x, sources, order=order)
    assert steps == [8]
    assert split[sources[0]].shape == (11, 2, 96, 96) and np.array_equal(split[sources[0]], whole[sources[0]])
    assert split[sources[1]].shape == whole[sources[1]].shape and np.array_equal(split[sources[1]], whole[sources[1]])
    alone = np.concatenate([cv.run(net, {"data": x["data"][i:i + 1]}, sources[:1])[sources[0]] for i in order])
    assert np.array_equal(split[sources[0]], alone)


# ------------------------------------------------------------------ the closed loop


def test_over_aggressive_plan_is_backed_off(tmp_path, monkeypatch):
    deploy, model = embedder(tmp_path)
    # Plant a first round that takes every layer to its minimal rank (budget inf).
    real = search.budget_ladder
    monkeypatch.setattr(search, "budget_ladder", lambda t: [math.inf] + real(t))
    report = pipeline.compress(deploy, model, tradeoff=0.95, output=tmp_path / "o")
    assert report.rounds >= 2
    assert report.contract and all(c.passed for c in report.contract)
    x = {"data": np.random.default_rng(7).uniform(-100, 100, (4, 3, 16, 16)).astype(np.float32)}
    (a,), (b,) = opencv_outputs(deploy, model, x, ["sc"]), opencv_outputs(tmp_path / "o.prototxt",
                                                                          tmp_path / "o.caffemodel", x, ["sc"])
    cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() >= 0.98


def test_contract_that_cannot_be_met_writes_nothing(tmp_path, monkeypatch):
    deploy, model = embedder(tmp_path)
    monkeypatch.setattr(search, "budget_ladder", lambda t: [math.inf])  # only the smallest plan is tried
    report = pipeline.compress(deploy, model, tradeoff=0.95, output=tmp_path / "o")
    assert not report.written and "nothing to compress" in report.note
    # every plan missed: the report still shows the layers as the analysis found them
    assert report.macs_before > 0 and report.macs_after == report.macs_before
    assert {lp.layer for lp in report.layers if lp.params_before} >= {"conv1", "fc"}
    assert not (tmp_path / "o.caffemodel").exists() and not (tmp_path / "o.prototxt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["embedder.caffemodel", "embedder.prototxt"]


def test_forced_ranks_that_break_the_contract_exit_6(tmp_path):
    deploy, model = embedder(tmp_path)
    result = run_cli(deploy, model, "--rank", "fc=1", "--tradeoff", "0.5", "-o", tmp_path / "o")
    assert result.returncode == 6, result.stderr
    assert "contract" in result.stderr and len(message_lines(result.stderr)) == 1
    assert not (tmp_path / "o.caffemodel").exists()


def test_validation_that_compares_nothing_is_an_error(tmp_path):
    text = EMBEDDER + 'layer { name: "sink" type: "Silence" bottom: "emb" }\n'
    deploy, model = embedder(tmp_path)
    deploy.write_text(text)
    result = run_cli(deploy, model, "-o", tmp_path / "o")
    assert result.returncode == 6 and "no output to compare" in result.stderr, result.stderr
    assert not (tmp_path / "o.caffemodel").exists()


# ------------------------------------------------------------------ kinds and metrics


def _net(*layers):
    return Net("n", tuple(layers))


def test_output_kinds_from_the_graph():
    net = _net(
        Layer("data", "Input", (), ("data",)),
        Layer("fc", "InnerProduct", ("data",), ("logits",)),
        Layer("prob", "Softmax", ("logits",), ("prob",)),
        Layer("map", "Convolution", ("data",), ("cls",)),
        Layer("cls_prob", "Softmax", ("cls",), ("cls_prob",)),
        Layer("box", "Convolution", ("data",), ("bbox",)),
        Layer("img", "Convolution", ("data",), ("sr",)),
        Layer("emb", "InnerProduct", ("data",), ("emb",)),
        Layer("reg", "InnerProduct", ("data",), ("reg",)),
    )
    shapes = {"prob": (4, 2), "cls_prob": (4, 4, 10, 10), "bbox": (4, 8, 10, 10), "sr": (4, 1, 32, 32),
              "emb": (4, 128), "reg": (4, 10)}
    specs = {s.name: s for s in contract.infer_outputs(net, list(shapes), shapes=shapes)}
    assert {k: v.kind for k, v in specs.items()} == {
        "prob": "class", "cls_prob": "scores", "bbox": "boxes", "sr": "image", "emb": "embedding", "reg": "dense"}
    assert specs["bbox"].pair == "cls_prob"
    over = contract.infer_outputs(net, list(shapes), shapes=shapes, overrides={"reg": "embedding"})
    assert over[-1].kind == "embedding"
    with pytest.raises(Exception, match="unknown kind"):
        contract.infer_outputs(net, list(shapes), shapes=shapes, overrides={"reg": "banana"})


def test_detection_output_inputs_are_scores_and_boxes():
    net = _net(
        Layer("data", "Input", (), ("data",)),
        Layer("loc", "Convolution", ("data",), ("loc",)),
        Layer("conf", "Softmax", ("data",), ("conf",)),
        Layer("prior", "PriorBox", ("data",), ("prior",)),
        Layer("det", "DetectionOutput", ("loc", "conf", "prior"), ("det",),
              {"detection_output_param": {"num_classes": 2, "confidence_threshold": 0.3}}),
    )
    specs = {s.name: s for s in contract.infer_outputs(net, ["loc", "conf", "prior"])}
    assert specs["conf"].kind == "scores" and specs["conf"].classes == 2 and specs["conf"].background == 0
    assert specs["loc"].kind == "boxes" and specs["loc"].pair == "conf"
    assert specs["prior"].kind == "dense"


def _scores(rng, n=8, positions=400, faces=6):
    fg = np.full((n, positions), 0.01)
    for i in range(n):
        fg[i, rng.choice(positions, faces, replace=False)] = 0.999
    return np.stack([1 - fg, fg], axis=2).reshape(n, -1).astype(np.float32)  # SSD's flat (N, P*C)


def test_scores_metric_catches_a_detector_that_lost_its_faces():
    rng = np.random.default_rng(0)
    a = _scores(rng)
    spec = contract.OutputSpec("conf", "scores", classes=2, background=0)
    good = contract.check_output(spec, a, a * 0.999 + 0.0005, 0.95)
    assert all(c.passed for c in good)
    broken = a.copy().reshape(8, -1, 2)
    broken[:, :, 1] = np.minimum(broken[:, :, 1], 0.31)  # best face score 0.31: nothing detected
    broken[:, :, 0] = 1 - broken[:, :, 1]
    checks = contract.check_output(spec, a, broken.reshape(8, -1), 0.95)
    assert not all(c.passed for c in checks)
    jaccard = [c for c in checks if "Jaccard" in c.metric][0]
    assert jaccard.value == 0.0
    # a global figure like the cosine would have said 0.998: the metric looks at the positives
    assert np.sum(a * broken.reshape(8, -1)) / np.linalg.norm(a) / np.linalg.norm(broken) > 0.99


def test_boxes_metric_looks_at_the_positives():
    rng = np.random.default_rng(1)
    conf = _scores(rng)
    loc = rng.standard_normal((8, 400 * 4)).astype(np.float32)
    specs = {"conf": contract.OutputSpec("conf", "scores", classes=2, background=0),
             "loc": contract.OutputSpec("loc", "boxes", pair="conf")}
    positives = conf.reshape(8, 400, 2)[:, :, 1] > 0.5
    bad = loc.reshape(8, 400, 4).copy()
    bad[positives] *= 1.5  # wrong boxes exactly where the faces are; 1.5% of all values
    check, = contract.check_output(specs["loc"], loc, bad.reshape(8, -1), 0.95, outputs={"conf": conf}, specs=specs)
    assert not check.passed and check.value == pytest.approx(0.5, rel=1e-3)
    assert contract.check_output(specs["loc"], loc, loc, 0.95, outputs={"conf": conf}, specs=specs)[0].passed


def test_class_metric_counts_confident_flips_and_forgives_unsure_ones():

    confident = np.tile([0.97, 0.03], (90, 1))
    unsure = np.tile([0.55, 0.45], (10, 1))
    a = np.vstack([confident, unsure]).astype(np.float32)
    unsure_flips = a.copy()
    unsure_flips[90:] = [0.45, 0.55]
    spec = contract.OutputSpec("prob", "class")
    assert contract.check_output(spec, a, unsure_flips, 0.95)[0].passed
    confident_flips = a.copy()
    confident_flips[:18] = [0.3, 0.7]  # 20% of the confident predictions change: a broken stage
    assert not contract.check_output(spec, a, confident_flips, 0.95)[0].passed


def test_image_and_embedding_metrics():
    rng = np.random.default_rng(3)
    img = rng.uniform(0, 1, (4, 1, 32, 32)).astype(np.float32)
    spec = contract.OutputSpec("sr", "image")
    assert contract.check_output(spec, img, img + 0.001, 0.95)[0].passed  # 60 dB
    assert not contract.check_output(spec, img, img + 0.05, 0.95)[0].passed  # 26 dB
    emb = rng.standard_normal((4, 128)).astype(np.float32)
    collapsed = np.tile(emb[:1], (4, 1))  # all embeddings identical
    assert not contract.check_output(contract.OutputSpec("e", "embedding"), emb, collapsed, 0.95)[0].passed


def test_map_metrics_are_exact_without_a_float64_copy_of_the_outputs():
    """PSNR, relative error, the early-miss bounds and the report's agreement on a big map output (an SR
    net's 256 x 256 map for 64 inputs: 16 MB in float32) give the float64 values, measured a few inputs at a
    time: a whole float64 copy (32 MB each for the original, the compressed and their difference) put a
    50 KB SR net's compression at 550 MB."""
    import tracemalloc

    from caffe_compress import validate

    rng = np.random.default_rng(5)
    a = rng.uniform(0, 1, (64, 1, 256, 256)).astype(np.float32)
    b = a + rng.normal(0, 0.03, a.shape).astype(np.float32)  # (30 dB: a miss at any T)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    mse, ref = float(np.mean((a64 - b64) ** 2)), float(np.sum(a64 * a64))
    peak_sq = float(a64.max() - a64.min()) ** 2
    psnr, psnr_48 = 10 * math.log10(peak_sq / mse), 10 * math.log10(peak_sq * a.size / np.sum((a64 - b64)[:48] ** 2))
    rel = math.sqrt(float(np.sum((a64 - b64) ** 2)) / ref)
    row_rel = np.linalg.norm((a64 - b64).reshape(64, -1), axis=1) / np.linalg.norm(a64.reshape(64, -1), axis=1)
    del a64, b64
    image, dense = contract.OutputSpec("sr", "image"), contract.OutputSpec("sr", "dense")
    tracemalloc.start()
    try:
        got_psnr = contract.check_output(image, a, b, 0.5)[0].value
        got_rel = contract.check_output(dense, a, b, 0.5)[0].value
        missed = contract.certain_misses([image], {"sr": a}, {"sr": b[:48]}, 48, 0.5, total=64)
        agreement = validate.compare_outputs({"sr": a}, {"sr": b})[0]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got_psnr == pytest.approx(psnr, rel=1e-9) and got_rel == pytest.approx(rel, rel=1e-9)
    assert [c.value for c in missed] == [pytest.approx(psnr_48, rel=1e-9)]  # (at best: the rest unchanged)
    assert agreement.max_relative_error == pytest.approx(float(row_rel.max()), rel=1e-9)
    assert agreement.mean_relative_error == pytest.approx(float(row_rel.mean()), rel=1e-9)
    assert peak < 4 * validate.WORK_BYTES + (1 << 20), peak  # (a few working blocks, not 32 MB copies)


def test_targets_loosen_above_095_and_vanish_at_1():
    t95, t99 = contract.targets(0.95), contract.targets(0.99)
    assert contract.targets(0.5) == t95
    assert t99["relative"] > t95["relative"] and t99["psnr"] < t95["psnr"] and t99["cosine"] < t95["cosine"]
    assert all(v is None for v in contract.targets(1.0).values())
    assert contract.targets(0.99, min_fidelity=0.5) == t95


def test_detections_on_synthetic_probes_keep_the_no_loss_targets():
    """Synthetic pictures hold none of a detector's objects: beyond T = 0.95 its scores and boxes keep
    T = 0.95's (halved) targets there while every other kind loosens; real images loosen them all; T = 1 has
    no target; the report says when the detections are held."""
    from caffe_compress.report import _contract_lines

    half = contract.SYNTHETIC_MARGIN
    t95, t99 = (contract.targets(t, margin=half, synthetic=True) for t in (0.95, 0.99))
    for key in ("jaccard", "logit", "boxes"):
        assert t99[key] == t95[key]
        assert contract.targets(0.99, margin=half)[key] != t95[key]  # (what the probes no longer allow)
    for key in ("class", "relative", "cosine", "psnr"):
        assert t99[key] != t95[key]
    assert contract.targets(0.99)["boxes"] == contract.targets(0.99)["relative"]
    assert all(v is None for v in contract.targets(1.0, margin=half, synthetic=True).values())
    assert contract.detections_held(0.99, True) and not contract.detections_held(0.95, True)
    assert not contract.detections_held(0.99, False) and not contract.detections_held(1.0, True)

    a = np.full((4, 10), -6.0)
    a[:, :3] = 6.0
    scores = contract.OutputSpec("conf", "scores")
    logits = a + 3.0
    pa, pb = 1 / (1 + np.exp(-a)), 1 / (1 + np.exp(-logits))
    loose, held = (contract.check_output(scores, pa, pb, 0.99, margin=half, synthetic=s)[0] for s in (False, True))
    assert held.target == t95["logit"] < loose.target  # (the RMS logit change: lower is stricter)

    class R:  # (the report's fields the contract lines read)
        tradeoff, validation_inputs, contract, validation = 0.99, "natural-image probes (62)", (held,), ()
        accuracy = metric = onnx_contract = None
        written = True
    assert any("detections keep the targets of T = 0.95" in line for line in _contract_lines(R))
    R.tradeoff = 0.95
    assert not any("detections keep" in line for line in _contract_lines(R))


# ------------------------------------------------------------------ the input convention


def _conv_net(weight, bias, *, bn=None, input_bn=None):
    layers = [Layer("data", "Input", (), ("data",), {"input_param": {"shape": [{"dim": [1, 3, 32, 32]}]}})]
    bottom = "data"
    if input_bn is not None:
        layers.append(Layer("bn0", "BatchNorm", ("data",), ("data",), blobs=input_bn))
    layers.append(Layer("conv1", "Convolution", (bottom,), ("conv1",),
                        {"convolution_param": {"num_output": weight.shape[0], "kernel_size": [3]}},
                        (weight, bias)))
    if bn is not None:
        layers.append(Layer("bn1", "BatchNorm", ("conv1",), ("conv1",), blobs=bn))
    return Net("c", tuple(layers))


def _stats_under(convention, weight):
    pictures = probe.dead_leaves(4, 3, 32, 32, seed=9)
    zero = np.zeros(weight.shape[0], np.float32)
    response, _ = probe._first_conv_response(_conv_net(weight, zero).layers[1], convention.apply(pictures),
                                             np.random.default_rng(0))
    return response.mean(axis=0), response.std(axis=0)


@pytest.mark.parametrize("truth", ["pixels", "unit", "symmetric", "pixels-mean"])
def test_convention_from_the_batchnorm_after_the_first_convolution(truth):
    weight = np.random.default_rng(4).standard_normal((16, 3, 3, 3)).astype(np.float32) * 0.1
    convention = probe._named(truth)
    mean, std = _stats_under(convention, weight)
    bn = (mean.astype(np.float32), (std ** 2).astype(np.float32), np.ones(1, np.float32))
    inferred = probe.infer_convention(_conv_net(weight, np.zeros(16, np.float32), bn=bn), "data", (1, 3, 32, 32))
    assert inferred.convention.name == truth, inferred


@pytest.mark.parametrize("truth", ["unit", "symmetric"])
def test_convention_from_the_first_layer_biases(truth):
    weight = np.random.default_rng(5).standard_normal((16, 3, 3, 3)).astype(np.float32) * 0.1
    _, std = _stats_under(probe._named(truth), weight)
    bias = (probe.TYPICAL_BIAS_RATIO * std * np.random.default_rng(6).choice([-1, 1], 16)).astype(np.float32)
    inferred = probe.infer_convention(_conv_net(weight, bias), "data", (1, 3, 32, 32))
    assert inferred.convention.name == truth, inferred


def test_convention_from_an_input_batchnorm_and_the_default():
    weight = np.random.default_rng(7).standard_normal((16, 3, 3, 3)).astype(np.float32)
    bn = (np.array([0.5, 0.4, 0.3], np.float32), np.array([0.04, 0.04, 0.04], np.float32), np.ones(1, np.float32))
    inferred = probe.infer_convention(_conv_net(weight, np.zeros(16, np.float32), input_bn=bn), "data", (1, 3, 32, 32))
    x = inferred.convention.apply(probe.dead_leaves(8, 3, 32, 32, seed=1))
    assert inferred.convention.name == "batchnorm"
    assert np.allclose(x.mean(axis=(0, 2, 3)), [0.5, 0.4, 0.3], atol=0.1)
    assert np.allclose(x.std(axis=(0, 2, 3)), 0.2, rtol=0.35)
    tiny = probe.infer_convention(_conv_net(weight, np.full(16, 1e-6, np.float32)), "data", (1, 3, 32, 32))
    assert tiny.convention.name == "pixels-mean" and "default" in tiny.evidence


def test_natural_probes_look_like_pictures():
    x = probe.dead_leaves(4, 3, 64, 64, seed=0)
    assert x.min() >= 0 and x.max() <= 255 and 40 < x.std() < 100
    # neighbouring pixels are strongly correlated, unlike white noise
    a, b = x[:, :, :, :-1].ravel(), x[:, :, :, 1:].ravel()
    assert np.corrcoef(a, b)[0, 1] > 0.8


def _discs_as_drawn_before(rng, h, w, r_min, r_max):
    """The disc loop as first written (rng.uniform, _natural_colour, _covers_a_pixel on every disc)."""
    discs = []
    for _ in range(400):
        u = rng.random()
        r = 1.0 / math.sqrt(u / r_max ** 2 + (1.0 - u) / r_min ** 2)
        cy, cx = rng.uniform(-r, h + r), rng.uniform(-r, w + r)
        y0, y1 = max(int(cy - r), 0), min(int(cy + r) + 1, h)
        x0, x1 = max(int(cx - r), 0), min(int(cx + r) + 1, w)
        if y0 >= y1 or x0 >= x1 or not probe._covers_a_pixel(cy, cx, r, y0, y1, x0, x1):
            continue
        colour = probe._natural_colour(rng)
        tilt_y = rng.normal()
        discs.append((y0, y1, x0, x1, cy, cx, r, *colour, tilt_y, rng.normal()))
    return discs


@pytest.mark.parametrize("seed,h,w", [(0, 128, 128), (1, 37, 90), (2, 8, 8)])
def test_the_written_out_disc_loop_draws_the_same_discs(seed, h, w):
    # probes (and so every plan) depend on the exact random stream: the fast loop must not change it
    size = max(h, w)
    r_min, r_max = max(1.0, size / 60.0), size / 1.5
    fast = probe._discs(np.random.default_rng(seed), h, w, r_min, r_max)
    slow = _discs_as_drawn_before(np.random.default_rng(seed), h, w, r_min, r_max)
    assert len(fast) > 50 and fast == slow


def test_a_convention_that_leaves_the_outputs_constant_is_not_believed():
    from caffe_compress import validate
    from caffe_compress.errors import ValidationError
    from caffe_compress.plan import inputs as plan_inputs

    weight = np.random.default_rng(8).standard_normal((16, 3, 3, 3)).astype(np.float32)
    net = _conv_net(weight, np.zeros(16, np.float32))
    first = probe.ranked_conventions(net, "data", (1, 3, 32, 32))[0].convention
    seen = []

    def responds(feed):  # the stub model ignores inputs in the first convention it is offered
        x = feed["data"]
        seen.append(float(np.abs(x).max()))
        return len(seen) > 1

    shapes = {"data": (1, 3, 32, 32)}
    chosen = plan_inputs.choose_conventions(net, shapes, 0, validate.Preprocessing(), responds)
    made, label = plan_inputs._natural_inputs(shapes, 4, 0, chosen)
    assert first.name not in label.split()[1] and "fallback" in label
    # every convention tried saw the same pictures (drawn once)
    assert len(seen) == 2 and made["data"].shape == (4, 3, 32, 32)
    with pytest.raises(ValidationError, match="do not vary"):
        plan_inputs.choose_conventions(net, shapes, 0, validate.Preprocessing(), lambda feed: False)


def test_probe_pictures_are_drawn_once_per_seed_and_extend_their_stream():
    source = probe.PictureSource()
    few = source.pictures((1, 3, 24, 24), 3, 5)
    more = source.pictures((1, 3, 24, 24), 6, 5)
    fresh = probe.PictureSource().pictures((1, 3, 24, 24), 6, 5)
    assert np.array_equal(few, more[:3]) and np.array_equal(more, fresh)
    assert not np.array_equal(more, probe.PictureSource().pictures((1, 3, 24, 24), 6, 6))


def test_probe_pictures_drawn_by_the_forked_worker_are_the_pictures_drawn_here(monkeypatch):
    """Half of a big draw goes to a forked worker (the other core): the pictures, their order and the seed
    stream's continuation are the same as one process drawing them all, and so when no worker can start."""
    count = probe.PARALLEL_PICTURES + 3
    forked = probe.PictureSource()
    split = forked.pictures((1, 3, 24, 24), count, 7)
    assert np.array_equal(split[:5], forked.pictures((1, 3, 24, 24), 5, 7))
    monkeypatch.setattr(probe, "PARALLEL_PICTURES", 10 ** 9)
    here = probe.PictureSource()
    assert np.array_equal(split, here.pictures((1, 3, 24, 24), count, 7))
    assert np.array_equal(forked.pictures((1, 3, 24, 24), count + 2, 7), here.pictures((1, 3, 24, 24), count + 2, 7))

    def no_processes(*args, **kwargs):
        raise OSError("Resource temporarily unavailable")

    monkeypatch.setattr(probe, "PARALLEL_PICTURES", 2)
    monkeypatch.setattr(probe, "ProcessPoolExecutor", no_processes)
    assert np.array_equal(split, probe.PictureSource().pictures((1, 3, 24, 24), count, 7))


@pytest.mark.parametrize("channels", [3, 1])
def test_probe_slices_are_the_convention_applied_to_the_pictures_bit_for_bit(channels):
    """Probes convert their 8-bit pictures by table lookup: every slice must equal Convention.apply."""
    pictures = probe.PictureSource().pictures((1, channels, 20, 17), 9, 2)
    odd = probe.Convention("odd", (10.5, 131.25, -3.0), (0.013, 0.5, 1.0 / 3.0), "uneven channels")
    for convention in (*probe.COMMON_CONVENTIONS, odd):
        probes = probe.Pictures(pictures, convention)
        for index in (slice(None), slice(2, 7), 4, np.array([8, 0, 3])):
            part = pictures[index]
            want = convention.apply((part if part.ndim == 4 else part[None]).astype(np.float32))
            got = probes[index]
            assert got.dtype == np.float32 and np.array_equal(got, want)


def test_near_zero_first_layer_biases_give_the_default_under_every_probe_draw():
    """Biases ~10x below a trained net's under the most favourable convention are no evidence: the
    inferred convention must not depend on which pictures were drawn (it decided GenderNet's plan)."""
    weight = np.random.default_rng(12).standard_normal((16, 3, 3, 3)).astype(np.float32) * 0.1
    _, std = _stats_under(probe._named("unit"), weight)
    sign = np.random.default_rng(13).choice([-1, 1], 16)
    bias = (probe.TYPICAL_BIAS_RATIO / 10 * std * sign).astype(np.float32)
    picks = {probe.infer_convention(_conv_net(weight, bias), "data", (1, 3, 32, 32), seed=s).convention.name
             for s in range(8)}
    assert picks == {"pixels-mean"}


def test_a_class_check_says_how_many_changed_answers_its_target_allows():
    def verdict(n, margin):
        p = np.tile([[0.95, 0.05]], (n, 1))
        return contract.check_output(contract.OutputSpec("prob", "class"), p, p, 0.95, margin=margin)[0]

    assert verdict(81, 0.5).flips_allowed == 0  # target 0.99: 0.81 of an input
    assert verdict(300, 0.5).flips_allowed == 3
    assert verdict(81, 1.0).flips_allowed == 1  # target 0.98 on real images
    assert contract.Check("y", "dense", "relative error", 0.0, 0.05, False).flips_allowed is None


def _walk(passes_from: int, error_at, ladder_length: int = 12, predicted_at=None):
    """The rungs the closed loop tries on a ladder where rungs >= passes_from pass; error_at(rung) is
    the measured error / target of a missing rung, predicted_at(rung) its plan's predicted error (default: the
    rung's budget)."""
    from types import SimpleNamespace

    from caffe_compress import pipeline
    from caffe_compress.plan.contract import Check

    tried = []

    class Loop(pipeline._ClosedLoop):
        def attempt(self, budget):
            rung = ladder.index(budget)
            tried.append(rung)
            self.state.rounds += 1
            passed = rung >= passes_from
            self.state.excess = 1.0 if passed else pipeline.search.excess(
                [Check("y", "dense", "relative error", 0.05 * error_at(rung), 0.05, False)])
            self.state.predicted = (predicted_at or (lambda k: budget))(rung)
            return passed

    ladder = [2.0 ** (-k / 2) for k in range(ladder_length)]
    loop = Loop(SimpleNamespace(ranks={}, progress=SimpleNamespace(stage=lambda *a: None), say=lambda *a: None),
                None, None, [], {}, [], {}, None)
    loop.search(ladder)
    return tried


def test_a_wide_miss_skips_the_rungs_that_would_still_miss():
    """The closed loop skips the rungs below a wide miss (its error falling with the budget, sqrt 2 a
    rung, would still miss there), and still finds the highest passing rung a walk down finds."""
    from caffe_compress.plan.search import excess, rungs_to_skip
    from caffe_compress.plan.contract import Check

    assert [rungs_to_skip(x) for x in (0.9, 1.0, 1.3, 2.0, 2.9, 5.5, float("nan"))] == [0, 0, 0, 0, 2, 3, 0]
    agreement = Check("p", "class", "top-1 agreement", 0.5, 0.99, True)  # no error scale: walks one rung
    assert excess([agreement, Check("y", "dense", "relative error", 0.2, 0.05, False)]) == pytest.approx(4.0)
    assert excess([agreement]) == 1.0
    psnr = Check("sr", "image", "PSNR vs the original (dB)", 34.0, 46.0, True)  # 12 dB short: error 10^0.6 x
    assert excess([agreement, psnr]) == pytest.approx(10 ** 0.6)
    assert excess([Check("sr", "image", "PSNR vs the original (dB)", 47.0, 46.0, True)]) == 1.0
    proportional = lambda rung: 8.0 / 2 ** (rung / 2)  # noqa: E731 -- passes from rung 6 (8 / 2^3 = 1)
    tried = _walk(6, proportional)
    assert tried == [0, 5, 6]  # lands on the last predicted miss, then the pass next to it
    # errors that fall faster than proportionally: a skip lands on a pass, and the search bisects back up
    tried = _walk(2, lambda rung: 6.0)
    assert 1 in tried and 2 in tried and max(r for r in tried if r < 2) == 1
    assert min(r for r in tried if r >= 2) == 2  # the highest passing rung was found
    assert _walk(1, lambda rung: 1.2) == [0, 1]  # a narrow miss walks one rung


def test_misses_that_do_not_follow_the_prediction_send_the_search_to_the_lowest_rung():
    """Two misses by the same measured error while the prediction fell a rung: the walk learns nothing one
    rung at a time, so the search tries the lowest rung next and bisects from there -- and still finds the
    highest passing rung. Misses that do follow the prediction, or narrow ones, walk on as before."""
    from caffe_compress.plan.search import HALF_RUNG_ERROR, not_steering

    assert not_steering((1.43, 0.48), (1.43, 0.34))  # VDSR T = 0.99: 28.9 dB twice against 32.0
    assert not_steering((1.43, 0.48), (1.6, 0.24))  # the error even rose
    assert not not_steering((1.43, 0.48), (1.2, 0.34))  # it fell with the prediction (1.19 of 1.41)
    assert not not_steering((1.43, 0.48), (1.43, 0.42))  # the prediction fell less than half a rung
    assert not not_steering((1.1, 0.48), (1.1, 0.34))  # narrow misses: the next rung may well pass
    assert not not_steering(None, (1.43, 0.34)) and not not_steering((1.43, None), (1.43, 0.34))
    assert HALF_RUNG_ERROR == pytest.approx(2 ** 0.25)
    stuck = lambda rung: 1.5  # noqa: E731 -- the same miss on every rung above the passing ones
    tried = _walk(7, stuck, ladder_length=14)
    assert tried[:3] == [0, 1, 13]  # two misses alike, then the lowest rung
    assert 7 in tried and 6 in tried and max(r for r in tried if r < 7) == 6  # the highest pass still found
    assert len(tried) < len(_walk(7, stuck, ladder_length=14, predicted_at=lambda rung: 0.5))  # (no steer test)
    following = lambda rung: 8.0 / 2 ** (rung / 2)  # noqa: E731
    assert _walk(6, following) == [0, 5, 6]  # unchanged when the error follows the prediction


def _candidate(layer: str, params: int, ranks=(64, 32, 16, 8, 4), params_at=None, error=None, **timed):
    from caffe_compress.plan.analyse import Candidate

    params_at = params_at or {r: r * 110 for r in ranks}
    error = error or {r: 1.0 / r for r in ranks}
    return Candidate(layer, "InnerProduct", "svd", (params // 100, 100), 1, params, params, tuple(ranks),
                     params_at, params_at, error, error, **timed)


def _refine(candidates, best, missed, passes, missed_by=None):
    """The refinement after a search that passed with ``best`` at budget 1 and missed with ``missed`` on the
    rung above (budget 2); ``passes(chosen)`` is the verdict of a plan. Returns the plans it tried and the
    plan it kept."""
    from types import SimpleNamespace

    from caffe_compress import pipeline
    from caffe_compress.plan import analyse

    tried = []

    def plan_of(chosen):
        return SimpleNamespace(layers=[SimpleNamespace(layer=n, method=m, rank=r) for n, (m, r) in chosen.items()])

    class Loop(pipeline._ClosedLoop):
        def attempt(self, budget, chosen=None, *, optional=False):
            assert budget == 2.0 and chosen is not None and optional  # (a move: its screened miss is final)
            key = tuple(sorted(chosen.items()))
            if key in self.state.tried:
                return self.state.tried[key]
            tried.append(dict(chosen))
            self.state.rounds += 1
            self.state.tried[key] = passes(chosen)
            if self.state.tried[key]:
                self.state.best = (None, plan_of(chosen), None)
            return self.state.tried[key]

    run = SimpleNamespace(ranks={}, objective="size", tradeoff=0.95, guard=SimpleNamespace(required=0.0))
    loop = Loop(run, None, None, list(candidates), {}, [], {}, None)
    loop.state.best, loop.state.best_budget = (None, plan_of(best), None), 1.0
    loop.state.missed_at = {2.0: dict(missed), 0.5: {}}
    loop.state.missed_by = {2.0: missed_by} if missed_by else {}
    loop.refine()
    assert analyse.objective_cost(candidates, pipeline._chosen_of(loop.state.best[1]), "size") <= \
        analyse.objective_cost(candidates, best, "size")
    return tried, pipeline._chosen_of(loop.state.best[1])


def test_refinement_moves_one_layer_at_a_time_toward_the_plan_that_missed():
    """After the budget search, each layer is moved alone to its choice in the plan that missed just above,
    the largest saving first; a move that misses is tried again half as far; at most REFINE_ROUNDS plans."""
    from caffe_compress import pipeline

    cands = [_candidate("big", 100_000), _candidate("small", 10_000)]
    best = {"big": ("svd", 64), "small": ("svd", 64)}
    missed = {"big": ("svd", 4), "small": ("svd", 8)}
    # the small layer's move is harmless, the big one's only down to rank 16
    passes = lambda chosen: chosen["big"][1] >= 16  # noqa: E731
    tried, kept = _refine(cands, best, missed, passes)
    assert tried[0] == {"big": ("svd", 4), "small": ("svd", 64)}  # the largest saving first
    assert tried[1] == {"big": ("svd", 64), "small": ("svd", 8)}  # now the largest saving
    assert tried[2] == {"big": ("svd", 16), "small": ("svd", 8)}  # half as far: the middle rank of 32, 16, 8
    assert len(tried) == pipeline.REFINE_ROUNDS
    assert kept == {"big": ("svd", 16), "small": ("svd", 8)}


def test_a_layer_off_the_planners_hull_is_offered_where_it_fits_the_budget():
    """choose_ranks prices error alike in every layer: a layer whose saving per unit of error is below the
    next step of another layer that no longer fits stays whole, although factoring it fits the budget and
    is cheaper. fitting_moves offers that option (the cheapest that fits), and nothing where none fits or
    where the option is predicted slower than the speed check allows."""
    from caffe_compress.plan import analyse

    cands = [_candidate("big", 100_000),
             _candidate("x", 10_000, ranks=(64,), params_at={64: 9_900}, error={64: 0.14})]
    chosen, predicted = analyse.choose_ranks(cands, 0.95, budget=0.2)
    assert chosen == {"big": ("svd", 8)} and predicted == pytest.approx(0.125)  # x kept: the Lagrangian gap
    moves = analyse.fitting_moves(cands, chosen, 0.2, "size")
    assert moves == {"x": ("svd", 64)}
    with_x = {**chosen, **moves}
    assert analyse.predicted_error(cands, with_x) <= 0.2
    assert analyse.objective_cost(cands, with_x, "size") < analyse.objective_cost(cands, chosen, "size")
    assert analyse.fitting_moves(cands, chosen, 0.18, "size") == {}  # 0.125 and 0.14 together exceed 0.18
    slow = [cands[0], _candidate("x", 10_000, ranks=(64,), params_at={64: 9_900}, error={64: 0.14},
                                 time_before=1.0, time_at={64: 1.2})]
    assert analyse.fitting_moves(slow, chosen, 0.2, "size", min_speedup=0.97) == {}
    assert analyse.fitting_moves(slow, chosen, 0.2, "size") == {"x": ("svd", 64)}  # (--objective size)


def test_refinement_tries_a_layer_both_plans_keep_within_the_tradeoffs_budget():
    """A layer kept by the plan that passed and by the one that missed is moved too, once the moves
    toward the missed plan are made, to its cheapest option that fits T's own budget with the plan as it
    then is; no plan tried goes beyond that budget (T = 0.95: the rung 2^-1.5)."""
    from caffe_compress.plan import analyse

    top = 2 ** -1.5
    best = {"big": ("svd", 64), "small": ("svd", 64)}
    missed = {"big": ("svd", 4), "small": ("svd", 8)}
    cands = [_candidate("big", 100_000), _candidate("small", 10_000),
             _candidate("x", 10_000, ranks=(64,), params_at={64: 9_900}, error={64: 0.14})]
    tried, kept = _refine(cands, best, missed, lambda chosen: True)
    assert tried[2] == {**missed, "x": ("svd", 64)} and kept == tried[2]
    assert all(analyse.predicted_error(cands, plan) <= top for plan in tried)
    # x fits beside the plan that passed, but no longer once the other moves are made: never tried
    cands[2] = _candidate("x", 10_000, ranks=(64,), params_at={64: 9_900}, error={64: 0.3})
    assert analyse.fitting_moves(cands, best, top, "size") == {"x": ("svd", 64)}
    tried, kept = _refine(cands, best, missed, lambda chosen: True)
    assert "x" not in kept and all(analyse.predicted_error(cands, plan) <= top for plan in tried)


def test_a_measured_miss_above_bounds_the_moves_of_kept_layers():
    """Where the plan that missed on the rung above measured how far its error went (an error ratio over
    its target), a kept layer's move must fit that plan's predicted error over the ratio, not T's budget:
    VDSR T = 0.5 tried three such moves, predicted near T's budget, after a plan at 0.041 missed its PSNR.
    A miss without an error ratio (a changed answer) leaves T's budget."""
    from caffe_compress.plan import analyse, search

    top = 2 ** -1.5
    assert search.fitting_budget(top, 0.25, 1.0) == top  # a changed answer: no scale measured
    assert search.fitting_budget(top, None, 3.0) == top
    assert search.fitting_budget(top, 0.25, 2.0) == pytest.approx(0.125)
    assert search.fitting_budget(top, 0.5, 1.1) == top  # never beyond T's own budget
    best = {"big": ("svd", 64), "small": ("svd", 64)}
    missed = {"big": ("svd", 4), "small": ("svd", 8)}
    cands = [_candidate("big", 100_000), _candidate("small", 10_000),
             _candidate("x", 10_000, ranks=(64,), params_at={64: 9_900}, error={64: 0.14})]
    predicted_missed = analyse.predicted_error(cands, missed)  # 0.28
    tried, kept = _refine(cands, best, missed, lambda chosen: True, missed_by=(predicted_missed, 1.0))
    assert "x" in kept  # as in the test above
    tried, kept = _refine(cands, best, missed, lambda chosen: True, missed_by=(predicted_missed, 2.5))
    assert all("x" not in plan for plan in tried)  # 0.14 alone exceeds 0.28 / 2.5


def test_refinement_is_skipped_when_the_plan_above_is_barely_cheaper():
    cands = [_candidate("big", 100_000), _candidate("small", 10_000)]
    best = {"big": ("svd", 64), "small": ("svd", 8)}  # 7,040 + 880 parameters
    tried, kept = _refine(cands, best, {"big": ("svd", 64), "small": ("svd", 4)}, lambda chosen: True)  # -440
    assert tried == [] and kept == best
    # nothing missed above the plan that passed: nothing to refine either
    tried, kept = _refine(cands, best, {}, lambda chosen: True)
    assert tried == [] and kept == best


def _plain_discs(rng, h, w, r_min, r_max, count=400):
    """probe._discs written with the plain Generator API, and the coverage test done by brute force over the
    box's pixel centres: what the fast loop must reproduce draw for draw (plans depend on the probe stream)."""
    discs = []
    for _ in range(count):
        u = rng.random()
        r = 1.0 / math.sqrt(u / r_max ** 2 + (1.0 - u) / r_min ** 2)
        cy, cx = rng.uniform(-r, h + r), rng.uniform(-r, w + r)
        y0, y1 = max(int(cy - r), 0), min(int(cy + r) + 1, h)
        x0, x1 = max(int(cx - r), 0), min(int(cx + r) + 1, w)
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        if not np.any((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r):
            continue
        lum = rng.beta(2.0, 2.0) * 255.0
        tint = rng.normal(0.0, 0.25, size=3)
        colour = tuple(float(np.clip(lum * (1.0 + t), 0.0, 255.0)) for t in tint)
        discs.append((y0, y1, x0, x1, cy, cx, r, *colour, rng.normal(), rng.normal()))
    return discs


@pytest.mark.parametrize("h, w", [(40, 56), (128, 128), (7, 3)])
def test_the_probe_discs_are_the_draws_of_the_plain_generator_api(h, w):
    size = max(h, w)
    got = probe._discs(np.random.default_rng(h * w), h, w, max(1.0, size / 60.0), size / 1.5)
    want = _plain_discs(np.random.default_rng(h * w), h, w, max(1.0, size / 60.0), size / 1.5)
    assert len(got) > 50 and got == want
