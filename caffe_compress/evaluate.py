"""Accuracy on the user's labelled images: labels from folders, a CSV file or a file-name pattern; top-1
of a classifier's output in OpenCV, images streamed in chunks (a thousand faces never sit in memory).

``caffe-compress evaluate`` and ``compress --images DIR --labels SPEC`` use it, and so does the GenderNet
reproduction (gendernet/reproduce.py).
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from . import validate
from .errors import UsageError

CHUNK = 64  # images decoded and run at a time
LABEL_FORMS = "folder, csv:FILE or regex:PATTERN"


@dataclass(frozen=True)
class Labelled:
    """Images with class indices (the index of the network output that is right for them)."""

    paths: tuple[Path, ...]
    labels: np.ndarray  # (N,) int
    source: str  # how the labels were read, for reports


def _class_index(name: str, classes: Sequence[str] | None, option: str) -> int:
    if classes:
        lowered = [c.lower() for c in classes]
        if name.lower() in lowered:
            return lowered.index(name.lower())
    if re.fullmatch(r"\d+", name.strip()):
        return int(name)
    known = f"; --classes lists {', '.join(classes)}" if classes else "; name the output order with --classes A,B,.."
    raise UsageError(f"{option}: label '{name}' is not a class index{known}")


def read_labels(images: Path, spec: str, *, classes: Sequence[str] | None = None,
                option: str = "--labels") -> Labelled:
    """Labelled images under ``images``.

    spec : ``folder`` -- each sub-folder is a class (named by its index, or by a name in ``classes``);
        ``csv:FILE`` -- rows ``image,label`` (path relative to ``images``; a header row is skipped);
        ``regex:PATTERN`` -- the label is the first group of PATTERN searched in each file name.
    classes : the class names in the network's output order (index 0 first).
    """
    files = validate.list_images(images, option="--images")
    if spec == "folder":
        pairs = [(p, _class_index(p.relative_to(images).parts[0], classes, option)) for p in files
                 if len(p.relative_to(images).parts) > 1]
    elif spec.startswith("csv:"):
        pairs = _csv_pairs(images, Path(spec[4:]), classes, option)
    elif spec.startswith("regex:"):
        try:
            pattern = re.compile(spec[6:])
        except re.error as exc:
            raise UsageError(f"{option}: bad pattern '{spec[6:]}': {exc}") from None
        if pattern.groups < 1:
            raise UsageError(f"{option}: the pattern needs a group around the label, e.g. regex:'^\\d+_(\\d)_'")
        pairs = []
        for p in files:
            m = pattern.search(p.name)
            if m:
                pairs.append((p, _class_index(m.group(1), classes, option)))
    else:
        raise UsageError(f"{option}: '{spec}' is not one of {LABEL_FORMS}")
    if not pairs:
        raise UsageError(f"{option}: no labelled image found in {images} with '{spec}'")
    return Labelled(tuple(p for p, _ in pairs), np.array([lab for _, lab in pairs], dtype=np.int64), spec)


def _csv_pairs(images: Path, path: Path, classes, option: str) -> list[tuple[Path, int]]:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = [r for r in csv.reader(fh) if r and not r[0].startswith("#")]
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{option}: cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    pairs = []
    for i, row in enumerate(rows):
        if len(row) < 2:
            raise UsageError(f"{option}: {path} line {i + 1}: expected 'image,label'")
        image = images / row[0].strip()
        if i == 0 and not image.is_file():
            continue  # a header row
        if not image.is_file():
            raise UsageError(f"{option}: {path} line {i + 1}: no image {image}")
        pairs.append((image, _class_index(row[1].strip(), classes, option)))
    return pairs


def run_batches(run: Callable[[np.ndarray], np.ndarray], batch: np.ndarray) -> np.ndarray:
    """(N, K) outputs of ``run`` on an already decoded (N, C, H, W) batch, CHUNK samples at a time."""
    out = [run(batch[start:start + CHUNK]) for start in range(0, len(batch), CHUNK)]
    return np.concatenate([v.reshape(v.shape[0], -1) for v in out], axis=0)


@dataclass(frozen=True)
class Classifier:
    """A Caffe classifier loaded in OpenCV 4.x: ``run`` maps an (n, C, H, W) batch to its scored output."""

    run: Callable[[np.ndarray], np.ndarray]
    input_shape: tuple[int, ...]
    output: str


def classifier(deploy: Path, weights: Path, *, output: str | None = None) -> Classifier:
    """The pair in OpenCV (read from bytes: no user file name reaches it), scoring ``output`` (default: the
    net's only output); a single-input model."""
    from . import io

    net = io.load(deploy, weights)
    shapes = net.input_shapes()
    if len(shapes) != 1:
        raise UsageError(f"{deploy}: evaluate needs a single-input model, this one has {len(shapes)}")
    (name, shape), = shapes.items()
    outputs = net.output_names()
    chosen = output or (outputs[0] if len(outputs) == 1 else None)
    if chosen is None or chosen not in outputs:
        raise UsageError(f"--output: name one of the outputs {', '.join(outputs)}")
    producer = [layer.name for layer in net.layers if chosen in layer.tops][-1]
    try:
        proto, model = Path(deploy).read_bytes(), Path(weights).read_bytes()
    except OSError as exc:
        raise UsageError(f"{exc.filename}: cannot read: {exc.strerror}") from None
    cv_net = validate.load_opencv_net(proto, model, what=str(deploy), error=UsageError)
    return Classifier(opencv_runner(cv_net, name, producer), tuple(shape), chosen)


def predict(run: Callable[[np.ndarray], np.ndarray], paths: Sequence[Path], shape: tuple[int, ...],
            pre: validate.Preprocessing) -> np.ndarray:
    """(N, K) outputs of ``run`` (a batch -> (n, ...) outputs) on the images, decoded CHUNK at a time."""
    out = []
    for start in range(0, len(paths), CHUNK):
        batch = validate.image_batch(paths[start:start + CHUNK], shape, pre, option="--images")
        value = run(batch)
        out.append(value.reshape(value.shape[0], -1))
    return np.concatenate(out, axis=0)


def top1(scores: np.ndarray, labels: np.ndarray) -> float:
    if scores.shape[1] <= int(labels.max()):
        raise UsageError(f"--labels: class index {int(labels.max())} but the output has {scores.shape[1]} values")
    return float(np.mean(np.argmax(scores, axis=1) == labels))


def opencv_runner(cv_net, input_name: str, output: str) -> Callable[[np.ndarray], np.ndarray]:
    """A batch -> output function over a loaded cv2.dnn.Net."""
    def run(batch: np.ndarray) -> np.ndarray:
        return validate.forward(cv_net, {input_name: batch}, [output], what="evaluation")[output]
    return run


@dataclass(frozen=True)
class Accuracy:
    top1: float
    images: int
    output: str
    labels: str

    def line(self, what: str = "") -> str:
        return (f"{what}top-1 accuracy {100 * self.top1:.2f}% on {self.images} labelled images "
                f"(output '{self.output}', labels {self.labels})")


def accuracy_of_files(deploy: Path, weights: Path, labelled: Labelled, pre: validate.Preprocessing, *,
                      output: str | None = None) -> Accuracy:
    """Top-1 accuracy of a Caffe model (read by OpenCV 4.x) on labelled images."""
    model = classifier(deploy, weights, output=output)
    scores = predict(model.run, labelled.paths, model.input_shape, pre)
    return Accuracy(top1(scores, labelled.labels), len(labelled.paths), model.output, labelled.source)
