"""Reproduce the GenderNet result: accuracy, size and speed against the trade-off.

    python -m gendernet.reproduce --faces DIR [--out gendernet]

Face sets, detected from DIR's layout:
  * UTKFace file names ``AGE_GENDER_RACE_DATETIME...jpg`` (gender 0 = male, 1 = female);
  * Adience: ``fold_*_data.txt`` files next to the aligned faces
    (``<user_id>/landmark_aligned_face.<face_id>.<original_image>``), gender m/f;
  * one sub-folder per class: ``male/``, ``female/`` (or ``m``/``f``, ``0``/``1``).
GenderNet preprocessing: BGR, resize to 256x256, centre crop 227x227, subtract the
mean (78.4263377603, 87.7689143744, 114.895847746), no R/B swap.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

from caffe_compress import Preprocessing, compress, evaluate, zoo
from caffe_compress.validate import cpu_model, cv2_module, image_batch, median_latency_ms

MEAN = (78.4263377603, 87.7689143744, 114.895847746)
TRADEOFFS = (0.0, 0.5, 0.8, 0.9, 0.95, 0.99, 1.0)
GENDER_CLASSES = ("male", "female")  # GenderNet's output order
UTK_GENDER = r"regex:^\d+_([01])_"  # UTKFace names: <age>_<gender>_<race>_<date>.jpg, gender 0 = male
UTK = re.compile(r"^(\d+)_([01])_")


AGE_GROUPS = ((0, 2), (4, 6), (8, 12), (15, 20), (25, 32), (38, 43), (48, 53), (60, 100))  # AgeNet's outputs


def age_group(age: float) -> int:
    """Index of the Adience age group nearest to ``age`` (years)."""
    gaps = [0.0 if lo <= age <= hi else min(abs(age - lo), abs(age - hi)) for lo, hi in AGE_GROUPS]
    return int(np.argmin(gaps))


def _adience_age(text: str) -> int | None:
    numbers = [float(n) for n in re.findall(r"\d+", text)]
    if not numbers:
        return None
    return age_group(sum(numbers) / len(numbers))


def load_faces(directory: Path, task: str = "gender") -> list[tuple[Path, int]]:
    """(image path, label) pairs. gender: 0 = male, 1 = female; age: Adience group index 0..7."""
    folds = sorted(directory.glob("fold_*_data.txt"))
    if folds:
        items = []
        for fold in folds:
            lines = fold.read_text().splitlines()
            for line in lines[1:]:
                cols = line.split("\t")
                if len(cols) < 5:
                    continue
                if task == "gender":
                    if cols[4] not in ("m", "f"):
                        continue
                    label = 0 if cols[4] == "m" else 1
                else:
                    label = _adience_age(cols[3])
                    if label is None:
                        continue
                user, original, face_id = cols[0], cols[1], cols[2]
                path = directory / "aligned" / user / f"landmark_aligned_face.{face_id}.{original}"
                if not path.is_file():
                    path = directory / user / f"landmark_aligned_face.{face_id}.{original}"
                if path.is_file():
                    items.append((path, label))
        return items
    if task == "gender":  # the same label reading as `caffe-compress evaluate --labels`
        folders = any(d.is_dir() and d.name.lower() in GENDER_CLASSES for d in directory.iterdir())
        labelled = evaluate.read_labels(directory, "folder" if folders else UTK_GENDER, classes=GENDER_CLASSES)
        return list(zip(labelled.paths, labelled.labels.tolist()))
    items = []
    for p in sorted(directory.iterdir()):
        m = UTK.match(p.name)
        if m and p.suffix.lower() in (".jpg", ".jpeg", ".png"):
            items.append((p, int(m.group(2)) if task == "gender" else age_group(int(m.group(1)))))
    return items


def preprocess(paths: list[Path]) -> np.ndarray:
    """The faces as one (N, 3, 227, 227) batch: resize 256, centre crop 227, mean (as `evaluate` does)."""
    return image_batch(paths, (1, 3, 227, 227), GENDERNET_PRE, option="--faces")


def predict(deploy: Path, weights: Path, batch: np.ndarray) -> np.ndarray:
    """(N, classes) outputs in OpenCV 4.x, through the same code as `caffe-compress evaluate`."""
    return evaluate.run_batches(evaluate.classifier(deploy, weights).run, batch)


def latency_ms(deploy: Path, weights: Path, sample: np.ndarray, *, threads: int, runs: int = 20) -> float:
    return median_latency_ms(deploy, weights, sample[:1], threads=threads, runs=runs)


TASKS = {"gendernet": "gender", "agenet": "age"}
TITLES = {"gendernet": "GenderNet", "agenet": "AgeNet (8 age groups)"}


def run(faces_dir: Path, out_dir: Path, tradeoffs=TRADEOFFS, *, model_name: str = "gendernet",
        rank_configs: tuple[dict, ...] = (), fp16_tradeoffs: tuple[float, ...] = (),
        calibrated_tradeoffs: tuple[float, ...] = (), calibration_faces: int = 64,
        command: str = "make gendernet") -> list[dict]:
    cv2 = cv2_module()
    model = zoo.fetch(model_name)
    faces = load_faces(faces_dir, TASKS[model_name])
    if not faces:
        raise SystemExit(f"reproduce: no labelled faces found in {faces_dir}")
    labels = np.array([lab for _, lab in faces])
    batch = preprocess([p for p, _ in faces])
    default_threads = cv2.getNumThreads()
    ref_probs = predict(model.deploy, model.weights, batch)
    rows = [{
        "tradeoff": None, "label": "original", "bytes": model.weights.stat().st_size,
        "accuracy": evaluate.top1(ref_probs, labels), "agreement": 1.0,
        "latency_1t_ms": latency_ms(model.deploy, model.weights, batch, threads=1),
        "latency_default_ms": latency_ms(model.deploy, model.weights, batch, threads=default_threads),
        "compress_s": 0.0,
    }]
    runs = [(t, {}, f"T={t:g}", None) for t in tradeoffs]
    runs += [(None, cfg, "--rank " + " ".join(f"{k}={v}" for k, v in cfg.items()), None) for cfg in rank_configs]
    runs += [(t, {}, f"T={t:g} --fp16", True) for t in fp16_tradeoffs]
    with tempfile.TemporaryDirectory() as tmp:
        for i, (t, cfg, label, fp16) in enumerate(runs):
            prefix = Path(tmp) / f"g{i}"
            report = compress(model.deploy, model.weights, tradeoff=t or 0.0, ranks=cfg, output=prefix, fp16=fp16)
            deploy, weights = _written(report, model)
            probs = predict(deploy, weights, batch)
            rows.append({
                "tradeoff": t if fp16 is None else None, "label": label, "bytes": weights.stat().st_size,
                "accuracy": evaluate.top1(probs, labels),
                "agreement": float(np.mean(probs.argmax(1) == ref_probs.argmax(1))),
                "latency_1t_ms": latency_ms(deploy, weights, batch, threads=1),
                "latency_default_ms": latency_ms(deploy, weights, batch, threads=default_threads),
                "compress_s": report.timings.get("total", 0.0),
                "ranks": {lp.layer: lp.rank for lp in report.layers if lp.rank},
            })
            print(json.dumps(rows[-1]), file=sys.stderr)
    if calibrated_tradeoffs:
        rows += calibrated_rows(model, faces, batch, labels, ref_probs, calibrated_tradeoffs, calibration_faces)
    cv2.setNumThreads(default_threads)
    write_results(rows, faces_dir, len(faces), out_dir, title=TITLES[model_name], command=command)
    return rows


def _written(report, model) -> tuple[Path, Path]:
    """The written pair, or the original when the contract left nothing to compress (nothing written)."""
    if report.written:
        return Path(report.output_prototxt), Path(report.output_caffemodel)
    return model.deploy, model.weights


GENDERNET_PRE = Preprocessing(resize=(256, 256), size=(227, 227), mean=MEAN)


def calibrated_rows(model, faces, batch, labels, ref_probs, tradeoffs, count: int) -> list[dict]:
    """Rank choice driven by ``count`` unlabelled faces; accuracy on the *other* faces only."""
    step = max(1, len(faces) // count)
    chosen = np.zeros(len(faces), dtype=bool)
    chosen[::step] = True
    chosen[np.flatnonzero(chosen)[count:]] = False
    held = ~chosen
    reference = evaluate.top1(ref_probs[held], labels[held])
    rows = [{"tradeoff": None, "label": f"original, on the {int(held.sum())} faces not used for calibration",
             "bytes": model.weights.stat().st_size, "accuracy": reference, "reference_accuracy": reference,
             "agreement": 1.0, "latency_1t_ms": float("nan"), "latency_default_ms": float("nan"), "compress_s": 0.0}]
    with tempfile.TemporaryDirectory() as tmp:
        calib = Path(tmp) / "calibration"
        calib.mkdir()
        for i in np.flatnonzero(chosen):
            path = faces[i][0]
            (calib / path.name).symlink_to(path.resolve())
        for t in tradeoffs:
            report = compress(model.deploy, model.weights, tradeoff=t, output=Path(tmp) / f"c{t}",
                              calibration=calib, preprocessing=GENDERNET_PRE)
            deploy, weights = _written(report, model)
            probs = predict(deploy, weights, batch[held])
            rows.append({
                "tradeoff": None, "label": f"T={t:g} --calibration ({count} faces)", "bytes": weights.stat().st_size,
                "accuracy": evaluate.top1(probs, labels[held]), "reference_accuracy": reference,
                "agreement": float(np.mean(probs.argmax(1) == ref_probs[held].argmax(1))),
                "latency_1t_ms": latency_ms(deploy, weights, batch, threads=1),
                "latency_default_ms": latency_ms(deploy, weights, batch, threads=cv2_module().getNumThreads()),
                "compress_s": report.timings.get("total", 0.0),
                "ranks": {lp.layer: lp.rank for lp in report.layers if lp.rank},
            })
            print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def write_results(rows: list[dict], faces_dir: Path, n_faces: int, out_dir: Path, *, title: str = "GenderNet",
                  command: str = "make gendernet") -> None:
    cv2 = cv2_module()
    orig = rows[0]
    lines = [
        f"# {title}: accuracy, size and speed against the trade-off",
        "",
        f"Faces: {n_faces} from `{faces_dir.name}`. OpenCV {cv2.__version__}, "
        f"CPU: {cpu_model()} ({os.cpu_count()} cores), {cv2.getNumThreads()} default threads. "
        f"Generated by `{command}`.",
        "",
        "| model | caffemodel | ratio | accuracy | Δ accuracy | top-1 agreement | latency 1 thread | latency default | ranks |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    def ms(value: float) -> str:
        return "-" if value != value else f"{value:.1f} ms"  # NaN: not measured

    for r in rows:
        ranks = ", ".join(f"{k}:{v}" for k, v in r.get("ranks", {}).items()) or "-"
        base = r.get("reference_accuracy", orig["accuracy"])
        lines.append(
            f"| {r['label']} | {r['bytes'] / 1e6:.2f} MB | {orig['bytes'] / r['bytes']:.2f}x | "
            f"{100 * r['accuracy']:.1f}% | {100 * (r['accuracy'] - base):+.1f} | "
            f"{100 * r['agreement']:.1f}% | {ms(r['latency_1t_ms'])} | {ms(r['latency_default_ms'])} | {ranks} |"
        )
    ok = [r for r in rows[1:] if r["accuracy"] >= orig["accuracy"] - 0.01 and r["tradeoff"] is not None]
    if ok:
        best = min(ok, key=lambda r: r["bytes"])
        lines += ["", f"Best point with at most a 1-point accuracy drop: {best['label']}, "
                      f"{orig['bytes'] / best['bytes']:.2f}x smaller, accuracy {100 * best['accuracy']:.1f}%."]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")
    (out_dir / "results.json").write_text(json.dumps({"title": title, "rows": rows}, indent=2) + "\n")
    plot(rows, out_dir / "results.png", title=title)


def plot(rows: list[dict], path: Path, *, title: str = "GenderNet") -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("reproduce: matplotlib not installed, no plot", file=sys.stderr)
        return
    orig, comp = rows[0], [r for r in rows[1:] if r["tradeoff"] is not None]
    xs = list(range(len(comp)))
    acc = [100 * r["accuracy"] for r in comp]
    size = [r["bytes"] / 1e6 for r in comp]
    fig, (ax1, ax3) = plt.subplots(1, 2, figsize=(13, 5))
    # Left: one evenly spaced slot per T, so the points near T = 1 stay readable.
    ax1.plot(xs, acc, "o-", color="tab:blue", lw=2, label="accuracy")
    ax1.axhline(100 * orig["accuracy"], color="tab:blue", ls="--", lw=1, label="original accuracy")
    ax1.set_xticks(xs, [f"{r['tradeoff']:g}" for r in comp])
    ax1.set_xlabel("trade-off T")
    ax1.set_ylabel("accuracy on the face set (%)", color="tab:blue")
    ax1.set_ylim(min(acc + [100 * orig["accuracy"]]) - 5, max(acc + [100 * orig["accuracy"]]) + 5)
    for x, a in zip(xs, acc):
        ax1.annotate(f"{a:.1f}", (x, a), textcoords="offset points", xytext=(0, 8), ha="center",
                     fontsize=8, color="tab:blue")
    ax2 = ax1.twinx()
    ax2.plot(xs, size, "s-", color="tab:red", lw=2, label="caffemodel size")
    ax2.axhline(orig["bytes"] / 1e6, color="tab:red", ls="--", lw=1, label="original size")
    ax2.set_yscale("log")
    ax2.set_ylabel("caffemodel (MB, log scale)", color="tab:red")
    for x, r in zip(xs, comp):
        ax2.annotate(f"{orig['bytes'] / r['bytes']:.1f}x", (x, r["bytes"] / 1e6), textcoords="offset points",
                     xytext=(0, -14), ha="center", fontsize=8, color="tab:red")
    ax1.set_title(f"{title}: accuracy and file size against the trade-off")
    h1, l1 = ax1.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax1.legend(h1 + h2, l1 + l2, loc="lower left", fontsize=8, framealpha=0.9)
    # Right: the accuracy-vs-size front; points with the same model share one label.
    groups: dict[tuple, list[str]] = {}
    for r in comp:
        groups.setdefault((r["bytes"], r["accuracy"]), []).append(f"{r['tradeoff']:g}")
    ax3.plot(size, acc, "-", color="tab:green", lw=1, alpha=0.6)
    for (nbytes, accuracy), labels in groups.items():
        ax3.scatter([nbytes / 1e6], [100 * accuracy], color="tab:green", zorder=3)
        ax3.annotate("T=" + ", ".join(labels), (nbytes / 1e6, 100 * accuracy), fontsize=8,
                     textcoords="offset points", xytext=(5, -12))
    ax3.scatter([orig["bytes"] / 1e6], [100 * orig["accuracy"]], color="black", marker="*", s=120, zorder=4,
                label="original")
    ax3.axhline(100 * orig["accuracy"] - 1, color="gray", ls=":", lw=1, label="original - 1 point")
    ax3.set_xscale("log")
    ax3.set_xlabel("caffemodel (MB, log scale)")
    ax3.set_ylabel("accuracy on the face set (%)")
    ax3.set_ylim(ax1.get_ylim())
    ax3.set_title("accuracy vs size")
    ax3.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--faces", type=Path, help="labelled face directory (required unless --replot)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent, help="where results.md/png go")
    p.add_argument("--tradeoffs", default=",".join(map(str, TRADEOFFS)))
    p.add_argument("--model", choices=sorted(TASKS), default="gendernet",
                   help="gendernet (gender labels) or agenet (age labels, Adience groups)")
    p.add_argument("--rank", action="append", default=[], metavar="L=R[,L=R]",
                   help="also measure a forced-rank model (repeatable), e.g. --rank fc6=64")
    p.add_argument("--fp16", default="", metavar="T[,T]", help="also measure these trade-offs with --fp16 storage")
    p.add_argument("--calibrated", default="", metavar="T[,T]",
                   help="also measure these trade-offs with --calibration on some faces, accuracy on the rest")
    p.add_argument("--calibration-faces", type=int, default=64, metavar="N")
    p.add_argument("--replot", action="store_true", help="only redraw results.png from results.json")
    args = p.parse_args(argv)
    if args.replot:
        saved = json.loads((args.out / "results.json").read_text())
        plot(saved["rows"], args.out / "results.png", title=saved["title"])
        return 0
    if args.faces is None or not args.faces.is_dir():
        print(f"reproduce: error: --faces: {args.faces} is not a directory", file=sys.stderr)
        return 2
    configs = tuple({k: int(v) for k, v in (item.split("=") for item in text.split(","))} for text in args.rank)
    shown = ["python -m gendernet.reproduce"] + [a if not Path(a).is_absolute() else Path(a).name
                                                 for a in (argv if argv is not None else sys.argv[1:])]
    run(args.faces, args.out, tuple(float(t) for t in args.tradeoffs.split(",")), model_name=args.model,
        rank_configs=configs, fp16_tradeoffs=tuple(float(t) for t in args.fp16.split(",") if t),
        calibrated_tradeoffs=tuple(float(t) for t in args.calibrated.split(",") if t),
        calibration_faces=args.calibration_faces,
        command=" ".join(shown))
    print((args.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
