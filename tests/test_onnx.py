"""--format onnx: the ONNX model runs in onnxruntime and gives what the Caffe model gives in OpenCV 4.x."""
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from caffe_compress import export, export_onnx, io  # noqa: E402
from caffe_compress.pipeline import compress  # noqa: E402
from caffe_compress.runner import OpenCVRunner, Source  # noqa: E402
from nets import max_relative_difference, opencv_outputs, write_model  # noqa: E402
from onnx_nets import OPS, ops_weights  # noqa: E402
from test_forms import form_chain_model  # noqa: E402
from test_zoo_layers import MULTI_SIZE_SSD, RICH, multi_size_weights, rich_weights  # noqa: E402

TOLERANCE = 1e-4  # relative to the largest magnitude of the output, fp32


def caffe_values(tmp_path: Path, net, x: dict, blobs: list[str]) -> dict:
    """The blobs' final values in OpenCV 4.x (through the tool's runner, which can name every blob)."""
    producer = {}
    for layer in net.layers:
        for k, top in enumerate(layer.tops):
            producer[top] = Source(top, 0, True) if layer.type == "Input" else Source(layer.name, k)
    values = OpenCVRunner(tmp_path).run(net, x, [producer[b] for b in blobs])
    return {b: values[producer[b]] for b in blobs}


def onnx_values(model: bytes, x: dict, blobs: list[str]) -> dict:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return dict(zip(blobs, session.run(blobs, x)))


def exported(tmp_path: Path, net, x: dict, blobs: list[str]) -> bytes:
    sample = {k: v[:1] for k, v in x.items()}
    shapes = export.export_shapes(net, OpenCVRunner(tmp_path), sample)
    return export_onnx.to_onnx(net, shapes, extra_outputs=blobs)


def test_every_mapped_layer_type_matches_opencv(tmp_path):
    deploy, model = write_model(tmp_path, "ops", OPS, ops_weights())
    net = io.load(deploy, model)
    blobs = ["prob", "up", "crop", "pool_ave", "pool_max", "pool_ave0", "lrn", "log", "exp", "gated", "s1", "norm"]
    x = {"data": np.random.default_rng(0).standard_normal((3, 3, 24, 22)).astype(np.float32)}  # batch 3
    data = exported(tmp_path, net, x, blobs)
    a, b = caffe_values(tmp_path, net, x, blobs), onnx_values(data, x, blobs)
    for name in blobs:
        assert a[name].shape == b[name].shape, name
        assert max_relative_difference(a[name], b[name]) <= TOLERANCE, name
    model_proto = onnx.load_from_string(data)
    onnx.checker.check_model(model_proto, full_check=True)
    ops = Counter(node.op_type for node in model_proto.graph.node)
    for op in ("Conv", "ConvTranspose", "Gemm", "MaxPool", "AveragePool", "LRN", "Slice", "Split", "Softmax", "Elu"):
        assert ops[op] >= 1, op
    assert model_proto.opset_import[0].version == export_onnx.OPSET


@pytest.mark.parametrize("which", ["rich", "multi_size_ssd"])
def test_ssd_heads_and_detections_match_opencv(tmp_path, which):
    """PriorBox baked in, DetectionOutput as decode + TopK + NMS: OpenCV's rows, order and zero padding."""
    text, weights = (RICH, rich_weights()) if which == "rich" else (MULTI_SIZE_SSD, multi_size_weights())
    text = "\n".join(line for line in text.splitlines() if "phase: TRAIN" not in line)
    deploy, model = write_model(tmp_path, which, text, weights)
    net = io.load(deploy, model)
    blobs = list(net.output_names())
    shape = net.input_shapes()["data"]
    found = 0
    for seed in range(3):
        x = {"data": np.random.default_rng(seed).uniform(-2, 2, shape).astype(np.float32)}
        data = exported(tmp_path, net, x, blobs)
        a, b = caffe_values(tmp_path, net, x, blobs), onnx_values(data, x, blobs)
        for name in blobs:
            assert a[name].shape == b[name].shape, name
            assert max_relative_difference(a[name], b[name]) <= TOLERANCE, name
        det = next(layer.tops[0] for layer in net.layers if layer.type == "DetectionOutput")
        found += int(np.count_nonzero(a[det][0, 0, :, 2]))
    assert found > 0  # the comparison saw real detections, not only zero rows


def test_factored_forms_export_exactly(tmp_path):
    """CP, Tucker-2, spatial SVD and SVD layers, written by the pipeline with --format both."""
    rng = np.random.default_rng(3)
    deploy, model, ranks, forms, shape = form_chain_model(tmp_path, rng)
    report = compress(deploy, model, tradeoff=0.0, ranks=ranks, forms=forms, output=tmp_path / "o", format="both")
    assert Path(report.output_onnx).is_file() and report.onnx_contract and all(c.passed for c in report.onnx_contract)
    x = {"data": rng.standard_normal((2,) + shape[1:]).astype(np.float32)}
    a = opencv_outputs(tmp_path / "o.prototxt", tmp_path / "o.caffemodel", x)[0]
    b = ort.InferenceSession(str(tmp_path / "o.onnx"), providers=["CPUExecutionProvider"]).run(None, x)[0]
    assert max_relative_difference(a, b) <= TOLERANCE
    ops = Counter(node.op_type for node in onnx.load(str(tmp_path / "o.onnx")).graph.node)
    assert ops["Conv"] == 4 + 3 + 2  # cp: 4 layers, tucker2: 3, spatial-svd: 2


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "caffe_compress", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_format_onnx_writes_only_onnx_and_fp16_halves_it(tmp_path):
    deploy, model = write_model(tmp_path, "ops", OPS, ops_weights())
    rank = ["--rank", "fc=2", "--rank", "conv1=2"]
    r32 = run_cli(deploy, model, *rank, "-o", tmp_path / "a", "--format", "onnx", "--fp32", "--json", tmp_path / "a.json")
    assert r32.returncode == 0, r32.stderr
    assert (tmp_path / "a.onnx").is_file()
    assert not (tmp_path / "a.prototxt").exists() and not (tmp_path / "a.caffemodel").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp left
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["onnx"]["path"].endswith("a.onnx")
    assert report["onnx"]["contract_passed"] == report["contract"]["passed"]  # --rank at T = 0: measured alike
    assert report["onnx"]["max_relative_difference_to_caffe"] <= 1e-4
    r16 = run_cli(deploy, model, *rank, "-o", tmp_path / "h", "--format", "both", "--fp16")
    assert r16.returncode == 0, r16.stderr
    half = onnx.load(str(tmp_path / "h.onnx"))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in half.graph.initializer)
    weight_bytes = {name: sum(len(t.raw_data) for t in onnx.load(str(tmp_path / name)).graph.initializer)
                    for name in ("a.onnx", "h.onnx")}
    assert weight_bytes["h.onnx"] < 0.6 * weight_bytes["a.onnx"]
    x = {"data": np.random.default_rng(1).standard_normal((1, 3, 24, 22)).astype(np.float32)}
    a = opencv_outputs(tmp_path / "h.prototxt", tmp_path / "h.caffemodel", x, ["prob"])[0]
    b = ort.InferenceSession(str(tmp_path / "h.onnx"), providers=["CPUExecutionProvider"]).run(["prob"], x)[0]
    assert max_relative_difference(a, b) <= TOLERANCE  # the same fp16-rounded weights on both sides


def test_unexportable_layer_names_it_and_still_writes_caffe(tmp_path):
    text = OPS.replace("lrn_param { local_size: 3", "lrn_param { norm_region: WITHIN_CHANNEL local_size: 3")
    deploy, model = write_model(tmp_path, "ops", text, ops_weights())
    result = run_cli(deploy, model, "--rank", "fc=2", "-o", tmp_path / "o", "--format", "both")
    assert result.returncode == 8, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert "layer 'lrn' (LRN)" in line and "WITHIN_CHANNEL" in line and "o.prototxt" in line
    assert (tmp_path / "o.prototxt").is_file() and (tmp_path / "o.caffemodel").is_file()
    assert not (tmp_path / "o.onnx").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_missing_onnx_package_is_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    from caffe_compress import cli

    deploy, model = write_model(tmp_path, "ops", OPS, ops_weights())
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx raises ImportError
    code = cli.main([str(deploy), str(model), "-o", str(tmp_path / "o"), "--format", "onnx"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "caffe-compress[onnx]" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ops.caffemodel", "ops.prototxt"]


def test_a_dead_runs_onnx_temp_is_swept(tmp_path):
    deploy, model = write_model(tmp_path, "ops", OPS, ops_weights())
    out = tmp_path / "out"
    out.mkdir()
    stale = out / ".o.onnx.4194000-deadbeef.tmp"  # a run with that pid is gone
    stale.write_bytes(b"half an onnx file")
    result = run_cli(deploy, model, "--rank", "fc=2", "-o", out / "o", "--format", "onnx")
    assert result.returncode == 0, result.stderr
    assert not stale.exists() and "removed a temp file" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["o.onnx"]
