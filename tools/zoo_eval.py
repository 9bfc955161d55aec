#!/usr/bin/env python3
"""`make zoo`: the fidelity contract on real models and real held-out inputs.

For every model of the dev zoo (../shared/data/zoo) plus GenderNet and AgeNet, and every T, this
compresses the model data-free and with --calibration (real images of its domain), then runs the
original and the compressed model in OpenCV on real images that planning never saw and reports:
size ratio, the contract verdict per output (plan/contract.py, measured on those real images), a task
metric, the 1-thread latency ratio and the compression time. Writes zoo/results.md and .json.

The images stay in ../shared: calibration uses the first images of a set, evaluation the others.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402

from caffe_compress import io, pipeline, validate, zoo  # noqa: E402
from caffe_compress.errors import CaffeCompressError  # noqa: E402
from caffe_compress.plan import contract  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
ZOO = SHARED / "zoo"
FACES = SHARED / "utkface-dev"
OBJECTS = ZOO / "images" / "objects"
CALIBRATION_COUNT = 48
EVAL_COUNT = 96


def ycbcr_y(img):
    b, g, r = [img[:, :, i].astype(np.float64) for i in range(3)]
    return np.clip(np.round(16.0 + (65.481 * r + 128.553 * g + 24.966 * b) / 255.0), 0, 255).astype(np.uint8)


def sr_picture(img, size=(256, 256), scale=3):
    y = cv2.resize(ycbcr_y(img), size, interpolation=cv2.INTER_AREA)
    lr = cv2.resize(y, (size[0] // scale, size[1] // scale), interpolation=cv2.INTER_AREA)
    return cv2.resize(lr, size, interpolation=cv2.INTER_CUBIC)


def face_scene(face, background, size, rng):
    """A face pasted at a random place and scale on a photo: a detector's real input."""
    canvas = cv2.resize(background, (size, size), interpolation=cv2.INTER_AREA)
    side = int(size * rng.uniform(0.3, 0.6))
    f = cv2.resize(face, (side, side), interpolation=cv2.INTER_AREA)
    y, x = rng.integers(0, size - side + 1, size=2)
    canvas[y:y + side, x:x + side] = f
    return canvas


@dataclass(frozen=True)
class Model:
    name: str
    deploy: Path
    weights: Path
    source: str  # "faces", "objects" or "scenes" (faces on photos)
    picture: Callable  # BGR image, rng -> the 8-bit picture the flags turn into the input
    flags: dict  # preprocessing for --calibration / --images (compress's Preprocessing)
    blob: Callable  # picture -> network input (the upstream preprocessing)
    task: str
    eval_count: int = 96  # held-out inputs (fewer for the costly super-resolution passes)


def _vanilla_blob(pic):
    d = ZOO / "vanilla_cnn_landmarks"
    mean = cv2.imread(str(d / "trainMean.png")).astype(np.float32)
    std = cv2.imread(str(d / "trainSTD.png")).astype(np.float32)
    return cv2.dnn.blobFromImage((cv2.resize(pic, (40, 40)).astype(np.float32) - mean) / (1e-6 + std))


def _face_crop(pic, size, mean, resize=256):
    big = cv2.resize(pic, (resize, resize))
    o = (resize - size) // 2
    return cv2.dnn.blobFromImage(big[o:o + size, o:o + size], 1.0, (size, size), mean)


GENDER_MEAN = (78.4263377603, 87.7689143744, 114.895847746)


def models() -> list[Model]:
    z = lambda n: (ZOO / n / "deploy.prototxt", ZOO / n / "weights.caffemodel")  # noqa: E731
    out = [
        Model("res10-ssd", *z("opencv_face_res10_ssd_fp16"), "scenes",
              lambda img, rng: img, {"mean": (104.0, 177.0, 123.0)},
              lambda p: cv2.dnn.blobFromImage(p, 1.0, (300, 300), (104.0, 177.0, 123.0)), "detections"),
        Model("retinaface", *z("retinaface_mnet025"), "scenes",
              lambda img, rng: img, {"swap_rb": True},
              lambda p: cv2.dnn.blobFromImage(p, 1.0, (320, 320), (0, 0, 0), swapRB=True), "anchors"),
        Model("vdsr", *z("vdsr"), "objects", lambda img, rng: sr_picture(img), {"scale": 1 / 255.0},
              lambda p: cv2.dnn.blobFromImage(p, 1 / 255.0), "psnr", 24),
        Model("srcnn", *z("srcnn_915"), "objects", lambda img, rng: sr_picture(img), {"scale": 1 / 255.0},
              lambda p: cv2.dnn.blobFromImage(p, 1 / 255.0), "psnr", 48),
        Model("nin-cifar10", *z("nin_cifar10"), "objects", lambda img, rng: img,
              {"mean": (127.5, 127.5, 127.5), "scale": 1 / 255.0},
              lambda p: cv2.dnn.blobFromImage(p, 1 / 255.0, (32, 32), (127.5, 127.5, 127.5)), "top1"),
        # --calibration cannot express VanillaCNN's per-pixel normalisation: a global one stands in.
        Model("vanillacnn", *z("vanilla_cnn_landmarks"), "faces", lambda img, rng: img,
              {"mean": (127.5, 127.5, 127.5), "scale": 1 / 64.0}, _vanilla_blob, "landmarks"),
    ]
    for name in ("gendernet", "agenet"):
        fetched = zoo.fetch(name)
        out.append(Model(name, fetched.deploy, fetched.weights, "faces", lambda img, rng: img,
                         {"mean": GENDER_MEAN, "resize": (256, 256)},
                         lambda p: _face_crop(p, 227, GENDER_MEAN), "accuracy" if name == "gendernet" else "top1"))
    return out


def _images(source: str, rng) -> tuple[list, list, list]:
    """(calibration pictures, evaluation pictures, evaluation labels) for a source."""
    faces = sorted(FACES.glob("*.jpg"))
    objects = sorted(OBJECTS.glob("*.jpg"))
    if source == "objects":
        files = objects
        labels = [None] * len(files)
        pics = [cv2.imread(str(p)) for p in files]
    elif source == "faces":
        files = faces[:CALIBRATION_COUNT + EVAL_COUNT]
        pics = [cv2.imread(str(p)) for p in files]
        labels = [int(p.name.split("_")[1]) for p in files]
    else:
        files = faces[:CALIBRATION_COUNT + EVAL_COUNT]
        backgrounds = [cv2.imread(str(p)) for p in objects]
        pics = [face_scene(cv2.imread(str(f)), backgrounds[i % len(backgrounds)], 320, rng)
                for i, f in enumerate(files)]
        labels = [None] * len(files)
    cal = pics[:CALIBRATION_COUNT]
    ev = pics[CALIBRATION_COUNT:CALIBRATION_COUNT + EVAL_COUNT]
    return cal, ev, labels[CALIBRATION_COUNT:CALIBRATION_COUNT + EVAL_COUNT]


def _run(net, batch, names):
    out = {n: [] for n in names}
    for i in range(batch.shape[0]):
        net.setInput(batch[i:i + 1])
        for n, v in zip(names, net.forward(names)):
            out[n].append(np.array(v, copy=True))
    return {n: np.concatenate(v) for n, v in out.items()}


def _detections(out, threshold=0.5):
    d = out.reshape(-1, 7)
    return d[d[:, 2] > threshold]


def _iou(a, b):
    x1, y1 = max(a[3], b[3]), max(a[4], b[4])
    x2, y2 = min(a[5], b[5]), min(a[6], b[6])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[5] - a[3]) * (a[6] - a[4]) + (b[5] - b[3]) * (b[6] - b[4]) - inter
    return inter / union if union > 0 else 0.0


def _task_metric(model: Model, orig_cv, comp_cv, batch, labels, ref, comp) -> str:
    if model.task == "detections":
        matched = total_a = total_b = 0
        loc = []
        for i in range(batch.shape[0]):
            orig_cv.setInput(batch[i:i + 1])
            comp_cv.setInput(batch[i:i + 1])
            a, b = _detections(orig_cv.forward()), _detections(comp_cv.forward())
            total_a += len(a)
            total_b += len(b)
            used = set()
            for da in a:
                best = max(((j, _iou(da, db)) for j, db in enumerate(b) if j not in used), key=lambda t: t[1],
                           default=(None, 0.0))
                if best[0] is not None and best[1] >= 0.5:
                    used.add(best[0])
                    matched += 1
                    size = max(da[5] - da[3], da[6] - da[4], 1e-6)
                    loc.append(float(np.abs(da[3:7] - b[best[0]][3:7]).mean() / size))
        jac = matched / max(total_a + total_b - matched, 1)
        return (f"faces {total_a}->{total_b}, Jaccard {jac:.3f}, "
                f"box error {100 * (np.mean(loc) if loc else 0):.2f}% of size")
    if model.task == "psnr":
        (name, a), = ref.items()
        mse = float(np.mean((a - comp[name]) ** 2))
        return f"PSNR {10 * math.log10(1.0 / mse) if mse else math.inf:.1f} dB"
    if model.task in ("top1", "accuracy"):
        name = next(iter(ref))
        a, b = ref[name].reshape(len(labels), -1), comp[name].reshape(len(labels), -1)
        agree = float(np.mean(a.argmax(1) == b.argmax(1)))
        text = f"top-1 agreement {100 * agree:.1f}%"
        # where the original is confident (logits through a softmax), the inputs the class contract counts
        sure = contract._probabilities(a.astype(np.float64)).max(1) >= contract.CONFIDENT
        if sure.any():
            text += (f" ({100 * float(np.mean(a.argmax(1)[sure] == b.argmax(1)[sure])):.1f}% on the "
                     f"{int(sure.sum())} confident)")
        if model.task == "accuracy":
            y = np.array(labels)
            text += f", accuracy {100 * np.mean(a.argmax(1) == y):.1f}% -> {100 * np.mean(b.argmax(1) == y):.1f}%"
        return text
    if model.task == "landmarks":
        name = next(iter(ref))
        err = np.abs(ref[name] - comp[name]).mean()
        return f"landmark error {100 * err:.2f}% of the crop"
    if model.task == "anchors":
        return "see contract"
    return ""


def evaluate(model: Model, tradeoff: float, calibrated: bool, cal, ev, labels, work: Path) -> dict:
    pre = validate.Preprocessing(
        mean=tuple(model.flags.get("mean", (0.0, 0.0, 0.0))), scale=float(model.flags.get("scale", 1.0)),
        swap_rb=bool(model.flags.get("swap_rb", False)), resize=model.flags.get("resize"))
    cal_dir = work / "cal"
    if calibrated and not cal_dir.exists():
        cal_dir.mkdir()
        for i, pic in enumerate(cal):
            cv2.imwrite(str(cal_dir / f"{i:03d}.png"), pic)
    prefix = work / f"out-{tradeoff}-{int(calibrated)}"
    start = time.perf_counter()
    row = {"model": model.name, "T": tradeoff, "mode": "calibrated" if calibrated else "data-free"}
    try:
        report = pipeline.compress(model.deploy, model.weights, tradeoff=tradeoff, output=prefix,
                                   calibration=cal_dir if calibrated else None,
                                   preprocessing=pre if calibrated else None)
    except CaffeCompressError as exc:
        row.update(status=f"refused: {exc}", seconds=time.perf_counter() - start)
        return row
    row["seconds"] = time.perf_counter() - start
    row["ratio"] = report.ratio
    row["rounds"] = report.rounds
    row["convention"] = report.convention
    if not report.written:
        row.update(status="nothing to compress", verdict="pass (original kept)")
        return row
    net = io.load(model.deploy, model.weights)
    blobs = pipeline.compared_blobs(net)
    orig_cv = validate.load_opencv_net(model.deploy, model.weights)
    comp_cv = validate.load_opencv_net(Path(report.output_prototxt), Path(report.output_caffemodel))
    batch = np.concatenate([model.blob(p) for p in ev[:model.eval_count]]).astype(np.float32)
    labels = labels[:model.eval_count]
    ref = _run(orig_cv, batch, blobs)
    comp = _run(comp_cv, batch, blobs)
    specs = contract.infer_outputs(net, blobs, shapes={k: v.shape for k, v in ref.items()})
    checks = contract.check_all(specs, ref, comp, tradeoff)
    row["checks"] = [{"output": c.output, "kind": c.kind, "metric": c.metric, "value": c.value,
                      "target": c.target, "passed": c.passed} for c in checks]
    row["verdict"] = "pass" if all(c.passed for c in checks) else "FAIL"
    row["task"] = _task_metric(model, orig_cv, comp_cv, batch, labels, ref, comp)
    row["latency_1t"] = _latency_ratio(model, report, batch[:1])
    row["status"] = "ok"
    for p in (report.output_prototxt, report.output_caffemodel):
        Path(p).unlink(missing_ok=True)
    return row


def _latency_ratio(model: Model, report, sample) -> float:
    """original / compressed 1-thread latency: medians of 30 runs, alternating, same process."""
    cv2.setNumThreads(1)
    nets = [validate.load_opencv_net(model.deploy, model.weights),
            validate.load_opencv_net(Path(report.output_prototxt), Path(report.output_caffemodel))]
    times = [[], []]
    for _ in range(5):
        for n in nets:
            n.setInput(sample)
            n.forward()
    for _ in range(30):
        for i, n in enumerate(nets):
            t = time.perf_counter()
            n.setInput(sample)
            n.forward()
            times[i].append(time.perf_counter() - t)
    cv2.setNumThreads(os.cpu_count() or 1)
    return float(np.median(times[0]) / np.median(times[1]))


def _worst(row) -> str:
    fails = [c for c in row.get("checks", []) if not c["passed"]]
    pick = fails[0] if fails else (min(row["checks"], key=lambda c: _margin(c)) if row.get("checks") else None)
    if pick is None:
        return "-"
    tgt = "none" if pick["target"] is None else f"{pick['target']:.3g}"
    return f"{pick['output']} {pick['kind']}: {pick['metric']} {pick['value']:.3g} (target {tgt})"


def _margin(c) -> float:
    if c["target"] is None or not math.isfinite(c["value"]):
        return math.inf
    scale = max(abs(c["target"]), 1e-9)
    return (c["value"] - c["target"]) / scale * (1 if "PSNR" in c["metric"] or "Jaccard" in c["metric"]
                                                 or "cosine" in c["metric"] else -1)


def write_results(rows, out: Path, header: str) -> None:
    out.mkdir(exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1, default=str) + "\n")
    lines = [header, "", "| model | T | mode | ratio | verdict | tightest output check | task metric | "
             "1-thread speed | time | rounds |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['T']} | {r['mode']} | {r.get('ratio', 0):.2f}x | {r.get('verdict', r['status'])} | "
            f"{_worst(r)} | {r.get('task', r['status'] if r['status'] != 'ok' else '')} | "
            f"{r.get('latency_1t', float('nan')):.2f}x | {r.get('seconds', 0):.1f} s | {r.get('rounds', '-')} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")


def _ordered(rows: list) -> list:
    names = [m.name for m in models()]
    return sorted(rows, key=lambda r: (names.index(r["model"]) if r["model"] in names else 99,
                                       r["mode"] != "data-free", r["T"]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tradeoffs", default="0.5,0.9,0.95,0.99")
    parser.add_argument("--models", default="", help="comma-separated subset (default: all)")
    parser.add_argument("--modes", default="data-free,calibrated")
    parser.add_argument("--out", default=str(ROOT / "zoo"))
    parser.add_argument("--update", action="store_true",
                        help="replace only the rows of the models (and modes) run in an existing results.json")
    args = parser.parse_args()
    if not ZOO.is_dir() or not FACES.is_dir():
        print(f"zoo_eval: needs {ZOO} and {FACES}", file=sys.stderr)
        return 2
    ts = [float(t) for t in args.tradeoffs.split(",")]
    wanted = set(filter(None, args.models.split(",")))
    modes = args.modes.split(",")
    rows = []
    kept = []
    if args.update and (Path(args.out) / "results.json").exists():
        kept = [r for r in json.loads((Path(args.out) / "results.json").read_text())
                if wanted and (r["model"] not in wanted or r["mode"] not in modes)]
    header = (f"Zoo sweep (`make zoo`): {platform.machine()}, {os.cpu_count()} cores, OpenCV {cv2.__version__}, "
              f"numpy {np.__version__}; contract measured on {EVAL_COUNT} real held-out inputs per model "
              f"(24 for VDSR, 48 for SRCNN) "
              f"(calibration: {CALIBRATION_COUNT} others).")
    for model in models():
        if wanted and model.name not in wanted:
            continue
        rng = np.random.default_rng(0)
        cal, ev, labels = _images(model.source, rng)
        cal, ev = [model.picture(p, rng) for p in cal], [model.picture(p, rng) for p in ev]
        with tempfile.TemporaryDirectory() as work:
            for mode in modes:
                for t in ts:
                    row = evaluate(model, t, mode == "calibrated", cal, ev, labels, Path(work))
                    rows.append(row)
                    print(f"{row['model']:12s} T={t:<5} {row['mode']:10s} {row.get('ratio', 0):6.2f}x "
                          f"{row.get('verdict', row['status']):6s} {row.get('seconds', 0):6.1f}s "
                          f"{row.get('latency_1t', float('nan')):.2f}x  {_worst(row)} | {row.get('task', '')}",
                          flush=True)
                    write_results(_ordered(kept + rows), Path(args.out), header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
