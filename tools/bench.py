#!/usr/bin/env python3
"""Benchmark: compression time, peak memory and inference speed on GenderNet.

    python tools/bench.py [--json bench.json] [--runs 30]

Budgets (checked as ratios within this run, since machines are noisy):
  1. compressing GenderNet at T = 0.95, validation included, takes at most 3x
     one numpy.linalg.svd(A, full_matrices=False) of a random float32 512 x 18816 A;
  2. peak RSS of that compression is at most 400 MB;
  3. the compressed model runs at least 2x faster than the original in OpenCV
     with 1 thread (median of --runs single-image forwards after warm-up).
Exits 1 when a budget is missed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from caffe_compress import zoo  # noqa: E402
from caffe_compress.validate import cpu_model, cv2_module, median_latency_ms  # noqa: E402

TIME_RATIO_BUDGET = 3.0
RSS_BUDGET_MB = 400.0
SPEEDUP_BUDGET = 2.0


def svd_reference_seconds(repeats: int = 3) -> float:
    a = np.random.default_rng(0).standard_normal((512, 18816)).astype(np.float32)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.linalg.svd(a, full_matrices=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compress_in_child(deploy: Path, weights: Path, tradeoff: float, prefix: Path) -> dict:
    """Run the CLI in a child process; wall time, peak RSS (wait4) and the JSON report."""
    report_path = prefix.with_suffix(".json")
    cmd = [sys.executable, "-m", "caffe_compress", str(deploy), str(weights), "--tradeoff", str(tradeoff),
           "-o", str(prefix), "--json", str(report_path), "-q"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"bench: compression failed: {stderr.strip()}")
    report = json.loads(report_path.read_text())
    # The child's own VmHWM (from its report): wait4's ru_maxrss would also count
    # this parent's memory at fork time.
    peak_mb = report.get("peak_rss_mb") or usage.ru_maxrss / 1024.0
    return {"tradeoff": tradeoff, "wall_s": wall, "peak_rss_mb": peak_mb, "report": report}


def latency_ms(deploy: Path, weights: Path, *, threads: int, runs: int) -> float:
    x = np.random.default_rng(0).uniform(-100, 100, (1, 3, 227, 227)).astype(np.float32)
    return median_latency_ms(deploy, weights, x, threads=threads, runs=runs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="bench.json")
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    cv2 = cv2_module()
    model = zoo.fetch("gendernet")
    default_threads = cv2.getNumThreads()
    svd_s = svd_reference_seconds()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for t in (0.95, 0.5):
            run = compress_in_child(model.deploy, model.weights, t, Path(tmp) / f"g{t}")
            out = run["report"]["output"]
            # nothing written (nothing to compress within the contract): the original is what the user keeps
            comp_deploy, comp_weights = (Path(out["prototxt"]), Path(out["caffemodel"])) if out["caffemodel"] \
                else (model.deploy, model.weights)
            run["latency_ms"] = {
                "original_1t": latency_ms(model.deploy, model.weights, threads=1, runs=args.runs),
                "compressed_1t": latency_ms(comp_deploy, comp_weights, threads=1, runs=args.runs),
                "original_default": latency_ms(model.deploy, model.weights, threads=default_threads, runs=args.runs),
                "compressed_default": latency_ms(comp_deploy, comp_weights, threads=default_threads, runs=args.runs),
            }
            results.append(run)
        svd_after = svd_reference_seconds()
    svd_s = statistics.median([svd_s, svd_after])
    main_run = results[0]
    time_ratio = main_run["wall_s"] / svd_s
    speedup = main_run["latency_ms"]["original_1t"] / main_run["latency_ms"]["compressed_1t"]
    budgets = {
        "time": {"value": time_ratio, "budget": TIME_RATIO_BUDGET, "ok": time_ratio <= TIME_RATIO_BUDGET},
        "peak_rss_mb": {"value": main_run["peak_rss_mb"], "budget": RSS_BUDGET_MB,
                        "ok": main_run["peak_rss_mb"] <= RSS_BUDGET_MB},
        "speedup_1t": {"value": speedup, "budget": SPEEDUP_BUDGET, "ok": speedup >= SPEEDUP_BUDGET},
    }
    machine = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "opencv": cv2.__version__,
        "opencv_default_threads": default_threads,
    }

    print(f"machine: {machine['cpu']}, {machine['cores']} cores, OpenCV {machine['opencv']}, numpy {machine['numpy']}")
    print(f"reference: numpy.linalg.svd of a float32 512x18816 matrix: {svd_s:.2f} s")
    print()
    print("| T | compress (wall) | ratio to SVD | peak RSS | size | load | probe | analyse | sensitivity | decompose "
          "| write | validate |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for run in results:
        tm = run["report"]["timings_s"]
        print(f"| {run['tradeoff']} | {run['wall_s']:.2f} s | {run['wall_s'] / svd_s:.2f}x | {run['peak_rss_mb']:.0f} MB | "
              f"{run['report']['totals']['ratio']:.2f}x smaller | {tm.get('load', 0):.2f} | {tm.get('probe', 0):.2f} | "
              f"{tm.get('analyse', 0):.2f} | {tm.get('sensitivity', 0):.2f} | {tm.get('decompose', 0):.2f} | "
              f"{tm.get('write', 0):.2f} | "
              f"{tm.get('validate', 0):.2f} |")
    print()
    for stage in ("analyse", "decompose"):
        per_layer = {k.split("/", 1)[1]: v for k, v in main_run["report"]["timings_s"].items()
                     if k.startswith(stage + "/")}
        print(f"{stage} per layer at T=0.95: " + ", ".join(f"{k} {v:.2f}s" for k, v in per_layer.items()))
    print()
    print("| T | original 1 thread | compressed 1 thread | speed-up | original default threads | compressed default threads |")
    print("| --- | --- | --- | --- | --- | --- |")
    for run in results:
        lat = run["latency_ms"]
        print(f"| {run['tradeoff']} | {lat['original_1t']:.1f} ms | {lat['compressed_1t']:.1f} ms | "
              f"{lat['original_1t'] / lat['compressed_1t']:.2f}x | {lat['original_default']:.1f} ms | "
              f"{lat['compressed_default']:.1f} ms |")
    print()
    for name, b in budgets.items():
        print(f"budget {name}: {b['value']:.2f} (limit {b['budget']}) {'OK' if b['ok'] else 'MISSED'}")
    for run in results:
        del run["report"]["layers"]
    Path(args.json).write_text(json.dumps({"machine": machine, "svd_reference_s": svd_s, "runs": results,
                                           "budgets": budgets}, indent=2) + "\n")
    return 0 if all(b["ok"] for b in budgets.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
