"""Acceptance checks on real models, determinism, failure paths and the face-set loaders."""
import contextlib
import hashlib
import io as stdio
import json
import os
import subprocess
import sys
from collections import Counter
from unittest import mock

import numpy as np
import pytest

from caffe_compress import cli, io, validate
from caffe_compress.decompose import svd
from caffe_compress.errors import ValidationError
from nets import low_rank_matrix, max_relative_difference, opencv_outputs, write_model
from test_tradeoff import small_model


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "caffe_compress", *map(str, args)], capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_gendernet_forced_ranks(tmp_path, gendernet):
    result = run_cli(gendernet.deploy, gendernet.weights, "--rank", "fc6=16", "--rank", "conv2=64",
                     "-o", tmp_path / "g", "--json", tmp_path / "g.json")
    assert result.returncode == 0, result.stderr
    net = io.load(tmp_path / "g.prototxt", tmp_path / "g.caffemodel")
    original = io.load(gendernet.deploy, gendernet.weights)
    assert len(net.layers) == len(original.layers) + 1 + 3
    counts = Counter(layer.type for layer in net.layers)
    assert counts["Convolution"] == 3 + 3 and counts["InnerProduct"] == 3 + 1
    names = [layer.name for layer in net.layers]
    assert names[names.index("conv2_cp1"):names.index("conv2_cp1") + 4] == ["conv2_cp1", "conv2_cp2", "conv2_cp3", "conv2"]
    assert names[names.index("fc6_svd1"):names.index("fc6_svd1") + 2] == ["fc6_svd1", "fc6"]
    report = json.loads((tmp_path / "g.json").read_text())
    rows = {l["name"]: l for l in report["layers"]}
    assert rows["fc6"]["params_after"] == 16 * (512 + 18816) + 512
    assert rows["conv2"]["params_after"] == 64 * (96 + 5 + 5 + 256) + 256
    assert rows["conv1"]["method"] == "keep" and rows["fc7"]["method"] == "keep"
    assert "fc6" in result.stdout and "9.63M -> 309.76k" in result.stdout
    # OpenCV loads it and computes the same kind of output
    x = {"data": np.random.default_rng(0).uniform(-100, 100, (1, 3, 227, 227)).astype(np.float32)}
    out = opencv_outputs(tmp_path / "g.prototxt", tmp_path / "g.caffemodel", x)[0]
    assert out.shape == (1, 2) and abs(float(out.sum()) - 1.0) < 1e-4


@pytest.mark.slow
def test_agenet_round_trip(tmp_path, gendernet):
    from caffe_compress import zoo

    agenet = zoo.fetch("agenet")
    result = run_cli(agenet.deploy, agenet.weights, "--tradeoff", "0", "-o", tmp_path / "a")
    assert result.returncode == 0, result.stderr
    x = {"data": np.random.default_rng(2).uniform(-120, 120, (2, 3, 227, 227)).astype(np.float32)}
    a = opencv_outputs(agenet.deploy, agenet.weights, x)[0]
    b = opencv_outputs(tmp_path / "a.prototxt", tmp_path / "a.caffemodel", x)[0]
    assert a.shape == (2, 8) and max_relative_difference(a, b) <= 1e-6


def test_transposed_inner_product(tmp_path):
    text = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 30 } } }
layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" inner_product_param { num_output: 20 transpose: true } }
"""
    w = low_rank_matrix(20, 30, 4, seed=5)
    deploy, model = write_model(tmp_path, "t", text, {"fc": [np.ascontiguousarray(w.T), np.ones(20, np.float32)]})
    result = run_cli(deploy, model, "--rank", "fc=4", "-o", tmp_path / "o")
    assert result.returncode == 0, result.stderr
    x = np.random.default_rng(0).standard_normal((2, 30)).astype(np.float32)
    # Caffe semantics (y = x W with W stored K x N). OpenCV 4.x ignores `transpose` and reads
    # the blob as N x K, so the reference is computed here, not by OpenCV on the original.
    caffe = x @ w.T + 1.0
    b = opencv_outputs(tmp_path / "o.prototxt", tmp_path / "o.caffemodel", {"data": x})[0]
    assert max_relative_difference(caffe, b) <= 1e-4
    assert "transpose" in result.stderr  # the user is told


def test_forced_rank_past_break_even_is_left_alone(tmp_path):
    deploy, model = small_model(tmp_path)
    result = run_cli(deploy, model, "--rank", "fc2=9", "-o", tmp_path / "o")  # 9 * (10 + 64) > 640
    assert result.returncode == 0, result.stderr
    assert "would not reduce its parameters" in result.stdout
    assert [l.name for l in io.load(tmp_path / "o.prototxt", tmp_path / "o.caffemodel").layers].count("fc2") == 1


def test_same_inputs_same_bytes(tmp_path):
    deploy, model = small_model(tmp_path)
    digests = []
    for i in range(2):
        result = run_cli(deploy, model, "--tradeoff", "0.9", "-o", tmp_path / f"o{i}", "--force", "--objective", "size")
        assert result.returncode == 0, result.stderr
        digests.append(hashlib.sha256((tmp_path / f"o{i}.caffemodel").read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    assert (tmp_path / "o0.prototxt").read_text() == (tmp_path / "o1.prototxt").read_text()


def test_unloadable_output_fails_cleanly(tmp_path):
    deploy, model = small_model(tmp_path)
    real = validate.load_opencv_net

    def refuse_compressed(prototxt, caffemodel, *, what="model", error=ValidationError):
        if "compressed model" in what:
            raise ValidationError(f"{what}: OpenCV cannot load it: simulated")
        return real(prototxt, caffemodel, what=what, error=error)

    err = stdio.StringIO()
    with mock.patch.object(validate, "load_opencv_net", refuse_compressed), contextlib.redirect_stderr(err), \
            contextlib.redirect_stdout(stdio.StringIO()):
        code = cli.main([str(deploy), str(model), "--rank", "fc1=16", "-o", str(tmp_path / "out")])  # (a plan to write)
    assert code == 6 and "OpenCV cannot load it" in err.getvalue()
    assert not [p for p in os.listdir(tmp_path) if "out" in p]


def test_svd_fallback_when_eigh_fails():
    w = np.random.default_rng(0).standard_normal((20, 30)).astype(np.float32)
    with mock.patch("numpy.linalg.eigh", side_effect=np.linalg.LinAlgError("no convergence")):
        f = svd.spectral_basis(w).factors(20)
    assert np.linalg.norm(f.second @ f.first - w) / np.linalg.norm(w) < 1e-5


def _jpeg(path):
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((40, 40, 3), 128, np.uint8))


def test_face_set_layouts(tmp_path):
    from gendernet.reproduce import load_faces

    utk = tmp_path / "utk"
    _jpeg(utk / "25_0_1_2017.jpg.chip.jpg")
    _jpeg(utk / "31_1_2_2017.jpg.chip.jpg")
    assert sorted(lab for _, lab in load_faces(utk)) == [0, 1]
    classes = tmp_path / "classes"
    _jpeg(classes / "male" / "a.jpg")
    _jpeg(classes / "female" / "b.jpg")
    _jpeg(classes / "female" / "c.png")
    assert sorted(lab for _, lab in load_faces(classes)) == [0, 1, 1]
    adience = tmp_path / "adience"
    _jpeg(adience / "aligned" / "u1" / "landmark_aligned_face.7.img1.jpg")
    _jpeg(adience / "aligned" / "u2" / "landmark_aligned_face.9.img2.jpg")
    header = "user_id\toriginal_image\tface_id\tage\tgender\tx\ty\tdx\tdy\ttilt_ang\tfiducial_yaw_angle\tfiducial_score"
    (adience / "fold_0_data.txt").write_text(
        header + "\nu1\timg1.jpg\t7\t(25, 32)\tm\t0\t0\t1\t1\t0\t0\t0\nu2\timg2.jpg\t9\t(8, 12)\tf\t0\t0\t1\t1\t0\t0\t0\n"
        "u3\timg3.jpg\t1\t(8, 12)\tu\t0\t0\t1\t1\t0\t0\t0\n")
    assert sorted(lab for _, lab in load_faces(adience)) == [0, 1]
    # the same sets with age labels (Adience groups) for AgeNet
    assert sorted(lab for _, lab in load_faces(utk, "age")) == [4, 4]  # ages 25 and 31: group (25, 32)
    assert sorted(lab for _, lab in load_faces(adience, "age")) == [2, 4]  # (8, 12) and (25, 32); u3 has no image


def test_fetch_without_any_source_says_where_to_put_files(tmp_path, monkeypatch):
    from caffe_compress import zoo

    monkeypatch.setattr(zoo, "UPSTREAM", "http://127.0.0.1:9/")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    err = stdio.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(stdio.StringIO()):
        code = cli.main(["fetch", "gendernet", "--cache", str(tmp_path / "cache")])
    assert code == 7
    message = err.getvalue()
    assert message.count("\n") == 1 and "by hand" in message and str(tmp_path / "cache" / "gendernet") in message


def test_cp_matches_tensorly_quality():
    tl = pytest.importorskip("tensorly")
    from tensorly.decomposition import parafac

    from caffe_compress.decompose import cp_conv, cp_reconstruct

    kernel = np.random.default_rng(4).standard_normal((24, 12, 3, 3)).astype(np.float32)
    ours = cp_conv(kernel, 16, n_iter_max=200)
    cp = parafac(tl.tensor(kernel.astype(np.float64)), rank=16, n_iter_max=200, init="svd", random_state=0)
    theirs = np.linalg.norm(tl.cp_to_tensor(cp) - kernel) / np.linalg.norm(kernel)
    assert np.linalg.norm(cp_reconstruct(ours) - kernel) / np.linalg.norm(kernel) <= theirs * 1.05


@pytest.mark.slow
def test_fp16_storage(tmp_path):
    import cv2

    deploy, model = small_model(tmp_path)
    assert run_cli(deploy, model, "--tradeoff", "0", "-o", tmp_path / "base").returncode == 0  # typed layers
    deploy, model = tmp_path / "base.prototxt", tmp_path / "base.caffemodel"
    half = tmp_path / "half.caffemodel"
    cv2.dnn.shrinkCaffeModel(str(model), str(half))  # OpenCV's own fp16 writer
    # an fp16 input stays fp16, losslessly
    result = run_cli(deploy, half, "--tradeoff", "0", "-o", tmp_path / "h", "--json", tmp_path / "h.json")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "h.json").read_text())["output"]["storage"] == "float16"
    assert abs((tmp_path / "h.caffemodel").stat().st_size - half.stat().st_size) < 0.05 * half.stat().st_size
    x = {"data": np.random.default_rng(0).standard_normal((1, 3, 24, 24)).astype(np.float32)}
    a = opencv_outputs(deploy, half, x)[0]
    b = opencv_outputs(tmp_path / "h.prototxt", tmp_path / "h.caffemodel", x)[0]
    assert max_relative_difference(a, b) <= 1e-6
    # --fp16 halves a float32 model; --fp32 widens an fp16 one
    result = run_cli(deploy, model, "--tradeoff", "0", "--fp16", "-o", tmp_path / "f")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "f.caffemodel").stat().st_size < 0.55 * model.stat().st_size
    c = opencv_outputs(tmp_path / "f.prototxt", tmp_path / "f.caffemodel", x)[0]
    assert max_relative_difference(opencv_outputs(deploy, model, x)[0], c) <= 1e-2
    result = run_cli(deploy, half, "--tradeoff", "0", "--fp32", "-o", tmp_path / "w")
    assert result.returncode == 0 and (tmp_path / "w.caffemodel").stat().st_size > 1.8 * half.stat().st_size
    assert run_cli(deploy, model, "--fp16", "--fp32").returncode == 2
