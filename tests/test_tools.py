"""The developer tools' own behaviour (not their measurements), and the command line's list of commands."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def test_bench_report_prints_a_saved_run_and_exits_by_its_budgets(tmp_path):
    """`tools/bench.py --report FILE` prints a saved run's table and budgets (the README's form) without
    running anything, and exits 1 when a budget of that run was missed."""
    row = {"model": "gendernet", "tradeoff": 0.95, "ratio": 6.69, "written": True, "speedup_1t": 1.68,
           "speedup_default": 1.6, "wall_s": 15.4, "peak_rss_mb": 320.3,
           "latency_ms": {"original_1t": 38.4, "compressed_1t": 22.9, "original_default": 22.0,
                          "compressed_default": 13.7}}
    data = {"machine": {"cpu": "AMD EPYC", "cores": 2, "python": "3.11.7", "numpy": "2.4.6", "opencv": "4.14.0",
                        "opencv_default_threads": 2},
            "svd_reference_s": 4.11, "runs": [row], "seed_spread": {}, "plan_only": [],
            "budgets": {"gendernet_peak_rss_mb": {"value": 320.3, "budget": "<= 400.0", "ok": True},
                        "zoo_compress_s": {"value": 29.5, "where": "vdsr T=0.99", "budget": "<= 20.0", "ok": False}}}
    saved = tmp_path / "bench.json"
    saved.write_text(json.dumps(data))
    proc = subprocess.run([sys.executable, str(TOOLS / "bench.py"), "--report", str(saved)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    out = proc.stdout
    assert "reference: numpy.linalg.svd of a float32 512x18816 matrix: 4.11 s" in out
    assert "| gendernet | 0.95 | 6.69x | 1.68x (38.4 -> 22.9 ms) | 1.60x (22.0 -> 13.7 ms) | 15.4 s | 320 MB |" in out
    assert "budget zoo_compress_s: 29.50 (vdsr T=0.99) (limit <= 20.0) MISSED" in out
    assert "budget gendernet_peak_rss_mb: 320.30 (limit <= 400.0) OK" in out
    data["budgets"].pop("zoo_compress_s")
    saved.write_text(json.dumps(data))
    assert subprocess.run([sys.executable, str(TOOLS / "bench.py"), "--report", str(saved)],
                          capture_output=True, timeout=120).returncode == 0


def test_the_bench_memory_budget_is_the_largest_of_every_gendernet_run():
    """A seed, calibrated or plan-only GenderNet run over 400 MB misses the budget, not only the default one."""
    sys.path.insert(0, str(TOOLS))
    try:
        import bench
    finally:
        sys.path.remove(str(TOOLS))

    def row(model, peak):
        return {"model": model, "tradeoff": 0.95, "ratio": 6.0, "written": True, "speedup_1t": 1.5, "wall_s": 12.0,
                "peak_rss_mb": peak}

    plans = [{"what": "plan, empty timing cache (1/3)", "wall_s": 12.0, "peak_rss_mb": 350.0, "bytes_after": 6_823_787,
              "ratio": 6.0}]
    rows = [row("gendernet", 340.0), row("gendernet --seed 2", 445.0), row("vdsr", 900.0)]
    budget = bench.budgets_of(rows, 4.0, plans)["gendernet_peak_rss_mb"]
    assert budget["value"] == 445.0 and not budget["ok"] and "gendernet --seed 2" in budget["where"]
    rows[1]["peak_rss_mb"] = 330.0
    budget = bench.budgets_of(rows, 4.0, plans)["gendernet_peak_rss_mb"]
    assert budget["value"] == 350.0 and budget["ok"] and "plan, empty timing cache" in budget["where"]


def test_the_help_names_every_command():
    """--help lists every exit code and the commands besides compressing (plan, evaluate, fetch), and each
    command answers --help."""
    run = [sys.executable, "-m", "caffe_compress"]
    text = subprocess.run([*run, "--help"], capture_output=True, text=True, timeout=120).stdout
    from caffe_compress import errors

    codes = [v for k, v in vars(errors).items() if k.startswith("EXIT_")]
    assert all(f"{code} " in text for code in codes), text  # every exit code is explained
    for command in ("plan", "evaluate", "fetch"):
        assert f"caffe-compress {command} " in text
        proc = subprocess.run([*run, command, "--help"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and proc.stdout.startswith("usage: caffe-compress"), (command, proc.stderr)


def test_the_proxies_are_models_opencv_runs_with_trained_like_spectra(tmp_path):
    """tools/proxies.py writes every stand-in as a pair OpenCV loads and runs to finite outputs, and each
    ordinary layer's singular values decay as the module says (the property that makes them compressible)."""
    import cv2
    import numpy as np

    sys.path.insert(0, str(TOOLS))
    try:
        import proxies
    finally:
        sys.path.remove(str(TOOLS))
    from caffe_compress import io

    written = proxies.write_all(tmp_path)
    assert set(written) == set(proxies.PROXIES)
    for name, (deploy, weights) in written.items():
        net = io.load(deploy, weights)
        cv_net = cv2.dnn.readNetFromCaffe(str(deploy), str(weights))
        for input_name, shape in net.input_shapes().items():
            cv_net.setInput(np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32), input_name)
        outs = cv_net.forward(list(cv_net.getUnconnectedOutLayersNames()))
        assert outs and all(np.all(np.isfinite(o)) for o in outs), name
        for layer in net.layers:
            if layer.type in ("Convolution", "InnerProduct") and layer.params.get("convolution_param", {}).get(
                    "group", 1) == 1 and min(layer.blobs[0].shape[0], layer.blobs[0][0].size) >= 8:
                s = np.linalg.svd(layer.blobs[0].reshape(layer.blobs[0].shape[0], -1), compute_uv=False)
                assert s[7] / s[0] == pytest.approx(8 ** -proxies.DECAY, rel=1e-3), (name, layer.name)


def test_the_bench_holds_proxies_to_never_slower_but_not_to_the_zoo_time():
    sys.path.insert(0, str(TOOLS))
    try:
        import bench
    finally:
        sys.path.remove(str(TOOLS))

    def row(model, speed, wall):
        return {"model": model, "tradeoff": 0.95, "ratio": 2.0, "written": True, "speedup_1t": speed,
                "wall_s": wall, "peak_rss_mb": 100.0}

    budgets = bench.budgets_of([row("vdsr", 1.1, 15.0), row(bench.PROXY + "mtcnn-pnet", 0.9, 45.0)], 4.0)
    assert not budgets["no_slower_1t"]["ok"] and "mtcnn-pnet" in budgets["no_slower_1t"]["where"]
    assert budgets["zoo_compress_s"]["value"] == 15.0 and budgets["zoo_compress_s"]["ok"]


def test_the_large_proxies_have_the_published_models_layer_shapes(monkeypatch):
    """tools/proxies.py --large builds OpenPose (COCO: 52.31M parameters, its 209 MB) and CaffeNet (AlexNet's
    60,965,224) as graphs Net.check accepts (weights drawn as zeros here: drawing them takes 30 s)."""
    import numpy as np

    sys.path.insert(0, str(TOOLS))
    try:
        import proxies
    finally:
        sys.path.remove(str(TOOLS))
    monkeypatch.setattr(proxies._Builder, "weights", lambda self, shape: np.zeros(shape, np.float32))
    counts = {name: sum(b.size for layer in build().layers for b in layer.blobs)
              for name, build in proxies.LARGE.items()}
    assert counts == {"openpose": 52_311_446, "caffenet": 60_965_224}
    assert not set(proxies.LARGE) & set(proxies.PROXIES)  # (the bench's stand-ins stay the quick ones)
