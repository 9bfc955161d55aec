"""Lossless rewrite (--tradeoff 0): OpenCV outputs identical, output is V2, parameters preserved."""
import subprocess
import sys

import numpy as np
import pytest

from caffe_compress import io
from nets import max_relative_difference, opencv_outputs, write_model

RNG = np.random.default_rng(0)


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "caffe_compress", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def _conv_ip_weights():
    return {
        "conv1": [RNG.standard_normal((4, 3, 3, 3)).astype(np.float32), RNG.standard_normal(4).astype(np.float32)],
        "fc1": [RNG.standard_normal((5, 4 * 6 * 6)).astype(np.float32), RNG.standard_normal(5).astype(np.float32)],
    }


V2_INPUT_LAYER = """
name: "tiny"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "fc1" type: "InnerProduct" bottom: "conv1" top: "fc1" inner_product_param { num_output: 5 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc1" bottom: "label" top: "loss" include { phase: TRAIN } }
layer { name: "prob" type: "Softmax" bottom: "fc1" top: "prob" }
"""

V2_INPUT_HEADER = """
name: "tiny"
input: "data"
input_dim: 2 input_dim: 3 input_dim: 8 input_dim: 8
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "fc1" type: "InnerProduct" bottom: "conv1" top: "fc1" inner_product_param { num_output: 5 } }
layer { name: "prob" type: "Softmax" bottom: "fc1" top: "prob" }
layer { name: "side" type: "Sigmoid" bottom: "conv1" top: "side" }
"""

V1_LAYERS = """
name: "tiny"
input: "data"
input_shape { dim: 2 dim: 3 dim: 8 dim: 8 }
layers { name: "conv1" type: CONVOLUTION bottom: "data" top: "conv1" blobs_lr: 1 blobs_lr: 2
         convolution_param { num_output: 4 kernel_size: 3 } }
layers { name: "relu1" type: RELU bottom: "conv1" top: "conv1" }
layers { name: "drop" type: DROPOUT bottom: "conv1" top: "conv1" include { phase: TRAIN } }
layers { name: "fc1" type: INNER_PRODUCT bottom: "conv1" top: "fc1" inner_product_param { num_output: 5 } }
layers { name: "prob" type: SOFTMAX bottom: "fc1" top: "prob" }
"""


@pytest.mark.parametrize("text,v1", [(V2_INPUT_LAYER, False), (V2_INPUT_HEADER, False), (V1_LAYERS, True)],
                         ids=["v2-input-layer", "v2-input-header-two-outputs", "v1"])
def test_lossless_round_trip(tmp_path, text, v1):
    weights = _conv_ip_weights()
    deploy, model = write_model(tmp_path, "tiny", text, weights, v1=v1,
                                extra_layers={"train_only": [np.ones(3, np.float32)]})
    result = run_cli(deploy, model, "--tradeoff", "0", "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    out_proto, out_model = tmp_path / "out.prototxt", tmp_path / "out.caffemodel"
    text_out = out_proto.read_text()
    assert "layers {" not in text_out and "layer {" in text_out  # V2
    assert "SoftmaxWithLoss" not in text_out and "phase: TRAIN" not in text_out
    x = {"data": RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)}
    names = io.load(deploy, model).output_names()
    outs = ["prob", "side"] if "side" in names else ["prob"]
    # OpenCV itself does not filter phases: the reference is the same text without TRAIN layers.
    reference = tmp_path / "reference.prototxt"
    reference.write_text("\n".join(l for l in text.splitlines() if "phase: TRAIN" not in l))
    a = opencv_outputs(reference, model, x, outs)
    b = opencv_outputs(out_proto, out_model, x, outs)
    for ya, yb in zip(a, b):
        assert max_relative_difference(ya, yb) <= 1e-6
    # parameters preserved
    orig, new = io.load(deploy, model), io.load(out_proto, out_model)
    assert [(l.name, l.type, l.bottoms, l.tops, dict(l.params).get("convolution_param"))
            for l in orig.layers] == [(l.name, l.type, l.bottoms, l.tops, dict(l.params).get("convolution_param"))
                                      for l in new.layers]
    for la, lb in zip(orig.layers, new.layers):
        assert all(np.array_equal(p, q) for p, q in zip(la.blobs, lb.blobs))
    # only the deploy layers' weights are written
    assert b"train_only" not in out_model.read_bytes()
    assert "parameters" in result.stdout and "caffemodel" in result.stdout


@pytest.mark.slow
def test_gendernet_round_trip(tmp_path, gendernet):
    result = run_cli(gendernet.deploy, gendernet.weights, "--tradeoff", "0", "-o", tmp_path / "g")
    assert result.returncode == 0, result.stderr
    x = {"data": np.random.default_rng(1).uniform(-120, 120, (2, 3, 227, 227)).astype(np.float32)}
    a = opencv_outputs(gendernet.deploy, gendernet.weights, x)[0]
    b = opencv_outputs(tmp_path / "g.prototxt", tmp_path / "g.caffemodel", x)[0]
    assert max_relative_difference(a, b) <= 1e-6
    assert "layers {" not in (tmp_path / "g.prototxt").read_text()
