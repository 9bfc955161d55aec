"""Exact low-rank layers in every geometry: rewritten outputs match the original in OpenCV."""
import json
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from caffe_compress import io
from nets import cp_kernel, low_rank_matrix, max_relative_difference, opencv_outputs, write_model

CASES = {
    # id: (kernel (kh, kw), conv_param text, group, rank)
    "k1x1": ((1, 1), "kernel_size: 1", 1, 3),
    "k3x3": ((3, 3), "kernel_size: 3 pad: 1", 1, 4),
    "k5x5": ((5, 5), "kernel_size: 5 pad: 2", 1, 5),
    "k7x7-stride4": ((7, 7), "kernel_size: 7 stride: 4", 1, 4),
    "k5x3": ((5, 3), "kernel_h: 5 kernel_w: 3", 1, 4),
    "stride2": ((3, 3), "kernel_size: 3 stride: 2", 1, 4),
    "stride2x1": ((3, 3), "kernel_size: 3 stride_h: 2 stride_w: 1", 1, 4),
    "pad-h-ne-w": ((3, 3), "kernel_size: 3 pad_h: 2 pad_w: 1", 1, 4),
    "dilation2": ((3, 3), "kernel_size: 3 dilation: 2 pad: 2", 1, 4),
    "no-bias": ((3, 3), "kernel_size: 3 bias_term: false", 1, 4),
    "group2": ((3, 3), "kernel_size: 3 pad: 1 group: 2", 2, 6),
    "k1x1-stride2-pad1": ((1, 1), "kernel_size: 1 stride: 2 pad: 1", 1, 3),
    "k1x1-group2": ((1, 1), "kernel_size: 1 group: 2", 2, 4),
    "k3x3-stride2-dilation2-pad-h-ne-w": ((3, 3), "kernel_size: 3 stride: 2 dilation: 2 pad_h: 1 pad_w: 3", 1, 4),
}

S, T = 8, 16


def _net_text(conv_param: str, with_ip: bool, ip_param: str = "") -> str:
    text = f"""
name: "geo"
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 2 dim: {S} dim: 19 dim: 17 }} }} }}
layer {{ name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param {{ num_output: {T} {conv_param} }} }}
layer {{ name: "relu" type: "ReLU" bottom: "conv" top: "conv" }}
"""
    if with_ip:
        text += f"""layer {{ name: "fc" type: "InnerProduct" bottom: "conv" top: "fc"
        inner_product_param {{ num_output: 24 {ip_param} }} }}
"""
    return text


def _run(*args):
    return subprocess.run([sys.executable, "-m", "caffe_compress", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def assert_rewrite_matches(tmp_path, deploy, model, rng, *, conv_layers: int) -> None:
    """out.prototxt/out.caffemodel give the original's outputs in OpenCV, with ``conv_layers`` convolutions."""
    x = {"data": rng.standard_normal((2, S, 19, 17)).astype(np.float32)}
    a = opencv_outputs(deploy, model, x)[0]
    b = opencv_outputs(tmp_path / "out.prototxt", tmp_path / "out.caffemodel", x)[0]
    assert a.shape == b.shape
    assert max_relative_difference(a, b) <= 1e-4
    types = Counter(l.type for l in io.load(tmp_path / "out.prototxt", tmp_path / "out.caffemodel").layers)
    assert types["Convolution"] == conv_layers


@pytest.mark.parametrize("case", list(CASES))
def test_conv_geometry_exact_rank(tmp_path, case):
    (kh, kw), param, group, rank = CASES[case]
    rng = np.random.default_rng(5)
    kernels = [cp_kernel(T // group, S // group, kh, kw, rank // group, seed=g) for g in range(group)]
    weight = np.concatenate(kernels, axis=0)
    blobs = [weight] if "bias_term: false" in param else [weight, rng.standard_normal(T).astype(np.float32)]
    deploy, model = write_model(tmp_path, "geo", _net_text(param, False), {"conv": blobs})
    out = tmp_path / "out"
    result = _run(deploy, model, "--rank", f"conv={rank}", "-o", out, "--json", tmp_path / "r.json")
    assert result.returncode == 0, result.stderr
    assert_rewrite_matches(tmp_path, deploy, model, rng, conv_layers=2 if (kh, kw) == (1, 1) else 4)
    report = json.loads((tmp_path / "r.json").read_text())
    conv = next(l for l in report["layers"] if l["name"] == "conv")
    assert conv["rank"] == rank and conv["params_after"] < conv["params_before"]


@pytest.mark.parametrize("ip_param,bias", [("", True), ("bias_term: false", False), ("axis: 1", True)])
def test_inner_product_exact_rank(tmp_path, ip_param, bias):
    rng = np.random.default_rng(6)
    k = T * 19 * 17
    w = low_rank_matrix(24, k, 5, seed=1)
    conv_w = rng.standard_normal((T, S, 1, 1)).astype(np.float32)
    blobs = {"conv": [conv_w, np.zeros(T, np.float32)], "fc": [w] + ([rng.standard_normal(24).astype(np.float32)] if bias else [])}
    deploy, model = write_model(tmp_path, "ip", _net_text("kernel_size: 1", True, ip_param), blobs)
    result = _run(deploy, model, "--rank", "fc=5", "--keep", "conv", "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    x = {"data": rng.standard_normal((2, S, 19, 17)).astype(np.float32)}
    a = opencv_outputs(deploy, model, x)[0]
    b = opencv_outputs(tmp_path / "out.prototxt", tmp_path / "out.caffemodel", x)[0]
    assert max_relative_difference(a, b) <= 1e-4
    names = [l.name for l in io.load(tmp_path / "out.prototxt", tmp_path / "out.caffemodel").layers]
    assert names == ["data", "conv", "relu", "fc_svd1", "fc"]  # the last keeps the name


def test_depthwise_left_alone_and_break_even(tmp_path):
    rng = np.random.default_rng(7)
    text = f"""
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 1 dim: {S} dim: 9 dim: 9 }} }} }}
layer {{ name: "dw" type: "Convolution" bottom: "data" top: "dw" convolution_param {{ num_output: {S} kernel_size: 3 group: {S} }} }}
"""
    deploy, model = write_model(tmp_path, "dw", text, {"dw": [rng.standard_normal((S, 1, 3, 3)).astype(np.float32),
                                                             np.zeros(S, np.float32)]})
    result = _run(deploy, model, "--tradeoff", "1", "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "depthwise" in result.stdout
    result = _run(deploy, model, "--rank", "dw=2", "-o", tmp_path / "out2")
    assert result.returncode == 2 and "depthwise" in result.stderr


def test_every_geometry_in_one_network_at_true_ranks(tmp_path):
    """A held-out-style net: all geometries chained, each compressed with --rank at its true rank."""
    rng = np.random.default_rng(9)
    layers, weights, ranks = [], {}, []
    channels, bottom = S, "data"
    for i, ((kh, kw), param, group, rank) in enumerate(CASES.values()):
        name = f"c{i}"
        kernels = [cp_kernel(T // group, channels // group, kh, kw, rank // group, seed=i * 10 + g) for g in range(group)]
        blobs = [np.concatenate(kernels, axis=0)]
        if "bias_term: false" not in param:
            blobs.append(rng.standard_normal(T).astype(np.float32) * 0.1)
        weights[name] = blobs
        layers.append(f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}" '
                      f'convolution_param {{ num_output: {T} {param} }} }}')
        ranks += ["--rank", f"{name}={rank}"]
        channels, bottom = T, name
    text = (f'layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 1 dim: {S} dim: 400 dim: 300 }} }} }}\n'
            + "\n".join(layers) + "\n"
            + f'layer {{ name: "fc" type: "InnerProduct" bottom: "{bottom}" top: "fc" inner_product_param {{ num_output: 12 }} }}\n')
    # the spatial size left at the end decides the fc width: ask OpenCV
    import cv2
    probe_deploy, probe_model = write_model(tmp_path, "probe", text.replace("InnerProduct", "Flatten")
                                            .replace("inner_product_param { num_output: 12 }", ""), weights)
    net = cv2.dnn.readNetFromCaffe(str(probe_deploy), str(probe_model))
    net.setInput(np.zeros((1, S, 400, 300), np.float32))
    k = net.forward().size
    weights["fc"] = [low_rank_matrix(12, k, 3, seed=1), np.zeros(12, np.float32)]
    deploy, model = write_model(tmp_path, "all", text, weights)
    result = _run(deploy, model, *ranks, "--rank", "fc=3", "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    x = {"data": rng.standard_normal((1, S, 400, 300)).astype(np.float32)}
    a = opencv_outputs(deploy, model, x)[0]
    b = opencv_outputs(tmp_path / "out.prototxt", tmp_path / "out.caffemodel", x)[0]
    assert max_relative_difference(a, b) <= 1e-3


def test_inner_product_axis_2(tmp_path):
    text = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 4 dim: 30 } } }
layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" inner_product_param { num_output: 20 axis: 2 } }
"""
    w = low_rank_matrix(20, 30, 4, seed=2)
    deploy, model = write_model(tmp_path, "ax", text, {"fc": [w, np.ones(20, np.float32)]})
    try:
        opencv_outputs(deploy, model, {"data": np.zeros((2, 4, 30), np.float32)})
    except Exception as exc:  # OpenCV < 4.6 cannot feed a 3-D input: then the tool rightly refuses it
        pytest.skip(f"this OpenCV cannot run a 3-D input: {exc}")
    result = _run(deploy, model, "--rank", "fc=4", "-o", tmp_path / "o")
    assert result.returncode == 0, result.stderr
    x = {"data": np.random.default_rng(1).standard_normal((2, 4, 30)).astype(np.float32)}
    a = opencv_outputs(deploy, model, x)[0]
    b = opencv_outputs(tmp_path / "o.prototxt", tmp_path / "o.caffemodel", x)[0]
    assert a.shape == b.shape == (2, 4, 20)
    assert max_relative_difference(a, b) <= 1e-4
