"""The user's own measures and views of a run: evaluate + --labels, metric=, --plan-only, progress, the
timing cache."""
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from caffe_compress import evaluate
from caffe_compress.errors import UsageError
from caffe_compress.pipeline import compress
from nets import low_rank_matrix, write_model

CLASSES = ("red", "green", "blue")
# A colour classifier: 3 x side x side input -> fc1 (64, rank 4) -> fc2 (3 classes) -> softmax. fc1 is built so
# that its first rows measure each channel's mean: class = the dominant colour.
CLASSIFIER = """
name: "colours"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: SIDE dim: SIDE } } }
layer { name: "fc1" type: "InnerProduct" bottom: "data" top: "fc1" inner_product_param { num_output: 64 } }
layer { name: "fc2" type: "InnerProduct" bottom: "fc1" top: "fc2" inner_product_param { num_output: 3 } }
layer { name: "prob" type: "Softmax" bottom: "fc2" top: "prob" }
"""


def classifier(tmp_path, side=8):
    """At side 8 fc1 runs in a few microseconds: whether its factored form is faster is then a coin toss
    on a busy machine (the default objective keeps it when measured slower). side=32 makes it ~16x bigger."""
    area = side * side
    fc1 = low_rank_matrix(64, 3 * area, 4, seed=1) * (0.01 * 8 / side)
    for c in range(3):  # rows 0..2: the mean of channel c (BGR order in the blob)
        fc1[c] = 0.0
        fc1[c, c * area:(c + 1) * area] = 1.0 / area
    fc2 = np.zeros((3, 64), np.float32)
    for k, channel in enumerate((2, 1, 0)):  # red = channel 2 of BGR, green 1, blue 0
        fc2[k, channel] = 1.0
    return write_model(tmp_path, "colours", CLASSIFIER.replace("SIDE", str(side)), {"fc1": [fc1, np.zeros(64, np.float32)],
                                                          "fc2": [fc2, np.zeros(3, np.float32)]})


def write_images(root, count=12, wrong=()):
    """count pictures per colour class in root/<class>/; returns {file name: true class index}. Files
    listed in ``wrong`` are drawn in another class's colour (the classifier then misses them)."""
    truth = {}
    rng = np.random.default_rng(0)
    for k, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(count):
            file = f"{name}_{i}.png"
            shown = (k + 1) % 3 if file in wrong else k
            bgr = rng.uniform(0, 60, (8, 8, 3))
            bgr[:, :, 2 - shown] += 150
            cv2.imwrite(str(root / name / file), bgr.astype(np.uint8))
            truth[file] = k
    return truth


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "caffe_compress", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_evaluate_reads_each_label_form_and_scores_top1(tmp_path):
    deploy, model = classifier(tmp_path)
    wrong = {"red_0.png", "green_3.png", "blue_5.png", "blue_6.png"}
    truth = write_images(tmp_path / "img", wrong=wrong)
    expected = 1 - len(wrong) / len(truth)
    (tmp_path / "labels.csv").write_text("image,label\n" + "".join(
        f"{f.split('_')[0]}/{f},{CLASSES[k]}\n" for f, k in truth.items()))
    for spec in ("folder", f"csv:{tmp_path / 'labels.csv'}", r"regex:^([a-z]+)_\d+\.png$"):
        result = run_cli("evaluate", deploy, model, "--images", tmp_path / "img", "--labels", spec,
                         "--classes", ",".join(CLASSES), "--json", tmp_path / "e.json")
        assert result.returncode == 0, result.stderr
        data = json.loads((tmp_path / "e.json").read_text())
        assert data["count"] == len(truth)
        assert data["top1_accuracy"] == pytest.approx(expected), spec
        assert f"{100 * expected:.2f}%" in result.stdout


def test_label_errors_are_one_line(tmp_path):
    deploy, model = classifier(tmp_path)
    write_images(tmp_path / "img", count=2)
    cases = [("folder", "not a class index"), ("regex:nogroup", "needs a group"), ("regex:(", "bad pattern"),
             ("csv:/nonexistent.csv", "cannot read"), ("jsonl", "is not one of")]
    for spec, message in cases:
        result = run_cli("evaluate", deploy, model, "--images", tmp_path / "img", "--labels", spec)
        assert result.returncode == 2, (spec, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, (spec, result.stderr)
    result = run_cli(deploy, model, "--labels", "folder", "-o", tmp_path / "o")
    assert result.returncode == 2 and "needs --images" in result.stderr
    (tmp_path / "img" / "purple").mkdir()
    cv2.imwrite(str(tmp_path / "img" / "purple" / "p.png"), np.zeros((8, 8, 3), np.uint8))
    result = run_cli("evaluate", deploy, model, "--images", tmp_path / "img", "--labels", "folder",
                     "--classes", "red,green,blue,purple")
    assert result.returncode == 2 and "class index 3 but the output has 3 values" in result.stderr


def test_compress_reports_accuracy_of_both_models_and_the_metric(tmp_path):
    deploy, model = classifier(tmp_path)
    truth = write_images(tmp_path / "img", wrong={"green_1.png"})
    labelled = evaluate.read_labels(tmp_path / "img", "folder", classes=CLASSES)
    seen = []

    def mean_max_prob(outputs):
        seen.append(sorted(outputs))
        return float(np.mean(outputs["prob"].max(axis=1)))

    report = compress(deploy, model, tradeoff=0.0, ranks={"fc1": 4}, output=tmp_path / "o", images=tmp_path / "img",
                      labels="folder", classes=CLASSES, metric=mean_max_prob)
    assert report.accuracy["images"] == len(truth) == len(labelled.paths)
    assert report.accuracy["original"] == pytest.approx(1 - 1 / len(truth))
    # rank 4 keeps fc1's measuring rows only approximately: the compressed accuracy is measured, not copied
    direct = evaluate.accuracy_of_files(tmp_path / "o.prototxt", tmp_path / "o.caffemodel", labelled,
                                        report_preprocessing())
    assert report.accuracy["compressed"] == pytest.approx(direct.top1)
    assert seen == [["prob"], ["prob"]]
    assert 0.3 < report.metric["original"] <= 1.0 and 0.3 < report.metric["compressed"] <= 1.0
    with pytest.raises(UsageError, match="metric: ZeroDivisionError"):
        compress(deploy, model, tradeoff=0.0, ranks={"fc1": 4}, output=tmp_path / "p", images=tmp_path / "img",
                 metric=lambda outputs: 1 / 0)
    assert not (tmp_path / "p.prototxt").exists()


def report_preprocessing():
    from caffe_compress.validate import Preprocessing

    return Preprocessing()


def test_plan_only_writes_nothing_and_predicts_the_real_run(tmp_path):
    deploy, model = classifier(tmp_path, side=32)  # big enough that factoring fc1 is measurably faster
    env = {**os.environ, "CAFFE_COMPRESS_TIMING_CACHE": str(tmp_path / "cache")}
    plan = subprocess.run([sys.executable, "-m", "caffe_compress", "plan", deploy, model, "-t", "0.99", "-o",
                           tmp_path / "o", "--json", tmp_path / "plan.json"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert plan.returncode == 0, plan.stderr
    assert "plan only" in plan.stdout and "nothing written" in plan.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "colours.caffemodel", "colours.prototxt",
                                                           "plan.json"]
    assert list((tmp_path / "cache").glob("timings-*.json"))  # the timings a real run will reuse
    real = subprocess.run([sys.executable, "-m", "caffe_compress", deploy, model, "-t", "0.99", "-o", tmp_path / "o",
                           "--json", tmp_path / "real.json"], capture_output=True, text=True, env=env, timeout=300)
    assert real.returncode == 0, real.stderr
    planned, done = (json.loads((tmp_path / f).read_text()) for f in ("plan.json", "real.json"))
    assert planned["plan_only"] is True and done["plan_only"] is False
    assert planned["totals"]["ratio"] == done["totals"]["ratio"] > 1
    assert [(l["name"], l["method"], l["rank"]) for l in planned["layers"]] == \
        [(l["name"], l["method"], l["rank"]) for l in done["layers"]]


def test_plan_only_when_nothing_can_be_compressed(tmp_path):
    deploy, model = classifier(tmp_path)
    result = run_cli("plan", deploy, model, "-t", "0.001")
    assert result.returncode == 0, result.stderr
    assert "try a higher T" in result.stdout and "nothing written" in result.stdout


def test_progress_lines_when_stderr_is_not_a_terminal(tmp_path):
    deploy, model = classifier(tmp_path)
    loud = run_cli(deploy, model, "-t", "0.99", "-o", tmp_path / "o")
    assert loud.returncode == 0, loud.stderr
    lines = loud.stderr.strip().splitlines()
    stages = [line for line in lines if line[2:3] == ":" and "caffe-compress:" in line]
    assert len(stages) >= 4, loud.stderr  # HH:MM:SS caffe-compress: <stage>: N s; M s elapsed
    assert any("analysing layers (2/2): " in line for line in stages)
    assert "done in" in lines[-1]
    quiet = run_cli(deploy, model, "-t", "0.99", "-o", tmp_path / "q", "-q")
    assert quiet.returncode == 0 and quiet.stderr == ""
    verbose = run_cli(deploy, model, "-t", "0.99", "-o", tmp_path / "v", "-v")
    assert any("analysing layers 1/2: analysing fc1" in line for line in verbose.stderr.splitlines()), verbose.stderr


def test_terminal_display_shows_stages_counts_and_items():
    """The rich display (what a terminal gets), drawn into a recording console."""
    import io

    from rich.console import Console

    from caffe_compress.cli import _RichProgress

    console = Console(file=io.StringIO(), force_terminal=True, width=150, record=True)
    display = _RichProgress(verbose=True, console=console)
    display.stage("analysing layers", 3)
    for name in ("conv1", "conv2", "fc6"):
        display.item(f"analysing {name}")
    display.stage("searching the plan")
    display.item("round 1")
    display.close()
    text = console.export_text()
    assert "analysing layers" in text and "3/3" in text and "searching the plan" in text
    assert "analysing fc6" in text and "round 1" in text  # -v: one line per item
