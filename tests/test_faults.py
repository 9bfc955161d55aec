"""Faults round two: the pair is published as a unit, the report never lands on an output or a device,
signals clean up, OpenCV sees only ASCII scratch paths, and user-caused conditions get their exit code."""
from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest

from caffe_compress import io
from caffe_compress.net import Layer, Net
from nets import message_lines, write_model
from test_hostile import GOOD, TIME_LIMIT, _digest, good_weights, run_case


@pytest.fixture()
def model(tmp_path):
    return write_model(tmp_path, "victim", GOOD, good_weights())


def _cli(*args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "caffe_compress", *map(os.fsdecode, args)],
                          capture_output=True, timeout=TIME_LIMIT, env=env, **kw)


def _one_error_line(proc) -> str:
    lines = message_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("caffe-compress: error: "), proc.stderr
    assert b"Traceback" not in proc.stderr
    return lines[0]


def test_json_never_names_an_output(tmp_path, model):
    deploy, weights = model
    out = tmp_path / "out"
    out.mkdir()
    for target in ("res.prototxt", "res.caffemodel"):
        proc = _cli(deploy, weights, "-o", out / "res", "--json", out / target, "--force")
        assert proc.returncode == 5 and "is an output" in _one_error_line(proc)
        assert os.listdir(out) == []


def test_json_never_replaces_a_non_regular_file(tmp_path, model):
    deploy, weights = model
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    proc = _cli(deploy, weights, "-o", tmp_path / "res", "--json", fifo, "--force")
    assert proc.returncode == 5 and "not a regular file" in _one_error_line(proc)
    assert fifo.is_fifo() and not (tmp_path / "res.caffemodel").exists()
    proc = _cli(deploy, weights, "-o", tmp_path / "res", "--json", tmp_path / "nodir" / "r.json", "--force")
    assert proc.returncode == 5 and "does not exist" in _one_error_line(proc)
    assert not (tmp_path / "res.caffemodel").exists()


def test_json_published_with_the_pair_and_modes_follow_the_umask(tmp_path, model):
    deploy, weights = model
    proc = _cli(deploy, weights, "-o", tmp_path / "res", "--json", tmp_path / "r.json", "--force")
    assert proc.returncode == 0, proc.stderr
    mask = os.umask(0)
    os.umask(mask)
    for name in ("res.prototxt", "res.caffemodel", "r.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~mask
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def _net(name: str, width: int) -> Net:
    data = Layer("data", "Input", (), ("data",), {"input_param": {"shape": [{"dim": [1, width]}]}})
    fc = Layer("fc", "InnerProduct", ("data",), ("fc",), {"inner_product_param": {"num_output": width, "bias_term": False}},
               (np.eye(width, dtype=np.float32),))
    return Net(name, (data, fc))


def test_concurrent_commits_never_mix_a_pair(tmp_path, monkeypatch):
    """Run A is delayed between its two renames; run B commits meanwhile: the pair is one run's, not both."""
    prefix = tmp_path / "shared"
    a = io.stage(_net("a", 3), prefix)
    b = io.stage(_net("b", 5), prefix)
    real_replace = os.replace
    started = threading.Event()

    def slow_replace(src, dst, *args, **kw):
        real_replace(src, dst, *args, **kw)
        if str(src) == str(a.temp_caffemodel):
            started.set()
            time.sleep(0.5)  # the forced delay between A's two renames

    monkeypatch.setattr(io.os, "replace", slow_replace)
    thread = threading.Thread(target=a.commit)
    thread.start()
    started.wait(5)
    b.commit()
    thread.join()
    net = io.load(tmp_path / "shared.prototxt", tmp_path / "shared.caffemodel")  # a mixed pair fails to load
    assert net.name == "b" and net.layer("fc").blobs[0].shape == (5, 5)
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_a_killed_run_are_swept_and_named(tmp_path, model):
    deploy, weights = model
    out = tmp_path / "out"
    out.mkdir()
    pid = _dead_pid()
    # run 1 was killed while staging: both temps; run 2 between its renames: only the prototxt temp
    (out / f".res.caffemodel.{pid}-aaaa.tmp").write_bytes(b"partial")
    (out / f".res.prototxt.{pid}-aaaa.tmp").write_bytes(b"partial")
    staged = io.stage(io.load(deploy, weights), out / "res")
    os.replace(staged.temp_caffemodel, staged.caffemodel)
    orphan = out / f".res.prototxt.{pid}-bbbb.tmp"
    os.replace(staged.temp_prototxt, orphan)
    notes = io.sweep_leftovers(out / "res.prototxt", out / "res.caffemodel")
    assert sorted(os.listdir(out)) == ["res.caffemodel", "res.prototxt"]
    assert any("completed a commit" in n for n in notes) and sum("removed" in n for n in notes) == 2
    io.load(out / "res.prototxt", out / "res.caffemodel")
    # a live run's temps are never touched
    live = out / f".res.caffemodel.{os.getpid()}-cccc.tmp"
    live.write_bytes(b"in progress")
    assert io.sweep_leftovers(out / "res.prototxt", out / "res.caffemodel") == [] and live.exists()
    live.unlink()
    # the next run on the prefix names what it swept
    (out / f".res.caffemodel.{pid}-dddd.tmp").write_bytes(b"x")
    proc = _cli(deploy, weights, "-o", out / "res", "--force", "-q")
    assert proc.returncode == 0 and b"removed a temp file" in proc.stderr
    assert sorted(os.listdir(out)) == ["res.caffemodel", "res.prototxt"]


BIG = """
name: "slow"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 16 dim: 96 dim: 96 } } }
""" + "".join(
    f'layer {{ name: "c{i}" type: "Convolution" bottom: "{"data" if i == 0 else f"c{i - 1}"}" top: "c{i}" '
    f'convolution_param {{ num_output: 16 kernel_size: 3 pad: 1 }} }}\n' for i in range(8))


@pytest.mark.parametrize("sig,code,delay", [(signal.SIGTERM, 143, 0.3), (signal.SIGTERM, 143, 2.5),
                                            (signal.SIGHUP, 129, 1.5), (signal.SIGINT, 130, 2.0)])
def test_signals_clean_up(tmp_path, sig, code, delay):
    rng = np.random.default_rng(0)
    weights = {f"c{i}": [rng.standard_normal((16, 16, 3, 3)).astype(np.float32) * 0.1, np.zeros(16, np.float32)]
               for i in range(8)}
    deploy, model = write_model(tmp_path, "slow", BIG, weights)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, TMPDIR=str(scratch))
    before = _digest([deploy, model])
    proc = subprocess.Popen([sys.executable, "-m", "caffe_compress", str(deploy), str(model), "-o", str(out / "r"),
                             "--tradeoff", "0.99", "--objective", "speed"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    time.sleep(delay)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=TIME_LIMIT)
    if proc.returncode == 0:  # finished before the signal: nothing to check but the usual
        return
    if proc.returncode == -sig:  # (a loaded machine: the signal came while the interpreter started, before
        # the CLI installed its handlers -- the default action, before any work: nothing may be there either)
        assert err == b"" and os.listdir(out) == [] and os.listdir(scratch) == []
        assert _digest([deploy, model]) == before
        return
    assert proc.returncode == code, err
    assert len(message_lines(err)) == 1 and b"Traceback" not in err, err
    assert os.listdir(out) == [] and os.listdir(scratch) == []
    assert _digest([deploy, model]) == before



def test_a_signal_after_publishing_does_not_undo_the_run(tmp_path, model, monkeypatch):
    """SIGTERM while the report prints (the model already published): exit 0 with the files, not "terminated,
    nothing published" (once seen in CI: a signal during the interpreter's exit killed a finished run)."""
    from caffe_compress import cli, report

    deploy, weights = model
    printed = []

    def table_then_signal(rep):
        os.kill(os.getpid(), signal.SIGTERM)
        printed.append(rep)
        return ""

    monkeypatch.setattr(report, "format_table", table_then_signal)
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        code = cli.main([str(deploy), str(weights), "-o", str(tmp_path / "r"), "-q", "--force"])
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    assert code == 0 and printed
    assert (tmp_path / "r.prototxt").exists() and (tmp_path / "r.caffemodel").exists()


def test_non_ascii_and_newline_names(tmp_path, model):
    deploy, weights = model
    out = tmp_path / "out"
    out.mkdir()
    proc = _cli(deploy, weights, "-o", os.fsencode(out) + b"/r\xff", "--force", "-q")
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(os.fsencode(out))) == [b"r\xff.caffemodel", b"r\xff.prototxt"]
    proc = _cli(deploy, weights, "-o", out / "x", "--keep", "two\nlines")
    assert proc.returncode == 2 and "two\\nlines" in _one_error_line(proc)


def test_closed_stdout_is_exit_5_after_the_pair(tmp_path, model):
    deploy, weights = model
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "caffe_compress", str(deploy), str(weights), "-o",
                               str(tmp_path / "res"), "--force"], stdout=full, stderr=subprocess.PIPE,
                              timeout=TIME_LIMIT)
    assert proc.returncode == 5 and "stdout" in _one_error_line(proc)
    assert (tmp_path / "res.caffemodel").is_file()


def test_scratch_write_failure_is_exit_5(tmp_path, model):
    import resource

    deploy, weights = model

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))

    run = subprocess.run([sys.executable, "-m", "caffe_compress", str(deploy), str(weights), "-o",
                          str(tmp_path / "out" / "res"), "--force"], capture_output=True, timeout=TIME_LIMIT,
                         preexec_fn=limit)
    assert run.returncode == 5, run.stderr
    _one_error_line(run)


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def test_decompression_bomb_image_is_a_usage_error(tmp_path, model):
    deploy, weights = model
    images = tmp_path / "imgs"
    images.mkdir()
    (images / "bomb.png").write_bytes(_png_header_only(60000, 60000))
    proc = run_case(tmp_path, deploy, weights, "--images", images, expect=(2,))
    assert "bomb.png" in proc.stderr


def test_structural_caps_refuse_fast(tmp_path, model):
    """A prototxt at the size cap made of millions of tiny fields is refused in about a second, not minutes."""
    _, weights = model
    bad = tmp_path / "dims.prototxt"
    bad.write_text('layer { name: "data" type: "Input" top: "data" input_param { shape {\n'
                   + "dim: 1\n" * 2_000_000 + "} } }\n")
    start = time.perf_counter()
    proc = run_case(tmp_path, bad, weights, expect=(3,), message="fields")
    assert time.perf_counter() - start < 10, "the refusal must not parse the whole file"
    assert proc.returncode == 3


def test_empty_and_newline_caffemodels(tmp_path, model):
    deploy, _ = model
    empty = tmp_path / "empty.caffemodel"
    empty.write_bytes(b"")
    run_case(tmp_path, deploy, empty, expect=(3,), message="empty (0 bytes)")
    lines = tmp_path / "lines.caffemodel"
    lines.write_bytes(b"\n" * (20 << 20))
    start = time.perf_counter()
    run_case(tmp_path, deploy, lines, expect=(3,))
    assert time.perf_counter() - start < 20


def test_kernel_larger_than_input_names_the_layer(tmp_path, model):
    _, weights = model
    text = GOOD.replace("dim: 12 dim: 12", "dim: 2 dim: 2")
    bad = tmp_path / "small.prototxt"
    bad.write_text(text)
    run_case(tmp_path, bad, weights, expect=(3,), message="layer 'conv1': kernel 3x3")
    pooled = GOOD.replace('layer { name: "fc1"', 'layer { name: "pool" type: "Pooling" bottom: "conv1" top: "conv1p" '
                          'pooling_param { pool: MAX kernel_size: 20 } }\nlayer { name: "fc1"')
    bad.write_text(pooled.replace('bottom: "conv1" top: "fc1"', 'bottom: "conv1p" top: "fc1"'))
    run_case(tmp_path, bad, weights, expect=(3,), message="layer 'pool': pooling kernel 20x20")


def test_overflowing_weights_are_one_line(tmp_path, model):
    deploy, _ = model
    w = good_weights()
    w["conv1"][0][:] = 3e38  # finite, but every activation overflows
    _, heavy = write_model(tmp_path, "heavy", GOOD, w)
    proc = run_case(tmp_path, deploy, heavy, expect=(3,))
    assert "NaN/Inf" in proc.stderr


def test_a_model_loads_in_a_small_address_space(tmp_path, model):
    """A 32-bit device (or ulimit -v) has no 2 GB of address space to spare: reading a caffemodel must not ask
    for its size cap up front (read(cap + 1) allocated 2 GB and failed as out of memory on every model)."""
    import resource

    def limit():  # 1.2 GB: the run needs ~0.9 GB of address space (libraries, thread stacks)
        resource.setrlimit(resource.RLIMIT_AS, (1200 << 20, 1200 << 20))

    deploy, weights = model
    proc = _cli(deploy, weights, "-o", tmp_path / "small", "--force", preexec_fn=limit)
    assert proc.returncode == 0, proc.stderr.decode()[-500:]
    assert (tmp_path / "small.caffemodel").is_file()
