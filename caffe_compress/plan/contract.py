"""The fidelity contract: what a written model must keep of each output, as a function of T.

Every compared output gets a *kind*, inferred from the graph (or given with ``--kind NAME=KIND``),
and each kind one label-free metric of the compressed model's output against the original's on
validation inputs that the planner never saw:

=========  ====================================================  =========================
kind       metric                                                target for T <= 0.95
=========  ====================================================  =========================
class      top-1 agreement on the inputs where the original is     >= 98%
           confident (top-1 probability >= 0.9; the most
           confident half when fewer than 8 are)
scores     detection confidences: Jaccard of the positive sets   >= 0.9, and <= 0.5 nats
           (p > threshold, foreground classes; entries within 1 nat
           of the threshold in the original are ambiguous and left
           out), when there are >= 8; otherwise RMS logit change at the strongest foreground entries
           (logits capped 3 nats above the threshold)
boxes      location outputs paired with a scores output:         <= 5%
           relative error over the positives (or strongest)
embedding  smallest cosine similarity over the inputs            >= 0.99
image      PSNR against the original's output (peak = its range) >= 40 dB
dense      relative error ||y' - y|| / ||y|| over the inputs     <= 5%
=========  ====================================================  =========================

On synthetic probes (no user images) every allowed change is halved (SYNTHETIC_MARGIN): the probes are
a proxy for real inputs, and the contract is about real ones.

Above T = 0.95 the targets loosen smoothly by the factor ``f = 0.05 / (1 - T)`` (an error target
times f, a similarity target's distance to 1 times f, PSNR minus 20 log10 f); T = 1 has none. On synthetic
probes a detector's scores and boxes do not loosen (the pictures hold none of its objects): see targets().
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from ..errors import UsageError
from ..net import Net
from ..validate import row_blocks

KINDS = ("class", "scores", "boxes", "embedding", "image", "dense")
NO_LOSS_TRADEOFF = 0.95

# Targets in the no-loss range (T <= 0.95).
CONFIDENT_AGREEMENT = 0.98
CONFIDENT = 0.9
MIN_CONFIDENT = 8
SCORES_JACCARD = 0.9
SCORES_LOGIT_NATS = 0.5
RELATIVE_ERROR = 0.05
EMBEDDING_COSINE = 0.99
IMAGE_PSNR_DB = 40.0

SYNTHETIC_MARGIN = 0.5  # data-free validation: half the allowed change of each target
SATURATION_NATS = 3.0  # logit changes above threshold + 3 nats (p = 0.95 at 0.5) do not count
AMBIGUOUS_NATS = 1.0  # original scores within 1 nat of the threshold (0.27..0.73 at 0.5) are ambiguous
MIN_POSITIVES = 8  # fewer positives than this: the Jaccard says nothing, the logit check decides
STRONGEST_SHARE = 0.002  # the strongest 0.2% of foreground entries (at least MIN_POSITIVES)
EMBEDDING_MIN_DIM = 64

# Layers that move values around without changing them: look through them to find what made an output.
SHAPE_ONLY = frozenset({"Reshape", "Flatten", "Permute", "Split", "Squeeze", "Concat", "Crop", "Slice"})
ACTIVATIONS = frozenset({"Softmax", "Sigmoid"})


@dataclass(frozen=True)
class OutputSpec:
    """One compared output and how it is judged."""

    name: str
    kind: str
    classes: int = 0  # scores from a DetectionOutput: classes per prior (flat layout)
    background: int | None = None  # scores: the background class, when known
    pair: str | None = None  # boxes: the scores output whose positives select entries
    threshold: float = 0.5  # scores: a positive is p > threshold
    reason: str = ""  # how the kind was chosen, for the report


@dataclass(frozen=True)
class Check:
    """One metric of one output against its target."""

    output: str
    kind: str
    metric: str
    value: float
    target: float | None  # None: no target (T = 1)
    higher_is_better: bool
    counted: int = 0  # class: the inputs the agreement counts

    @property
    def flips_allowed(self) -> int | None:
        """class: how many counted inputs may change their answer within the target (None otherwise)."""
        if self.kind != "class" or self.target is None or not self.counted:
            return None
        return int(math.floor((1.0 - self.target) * self.counted + 1e-9))

    @property
    def passed(self) -> bool:
        if self.target is None:
            return True
        if math.isnan(self.value):
            return False
        # (an infinite PSNR -- outputs identical -- passes; an infinite error does not)
        return self.value >= self.target if self.higher_is_better else self.value <= self.target


def loosening(tradeoff: float) -> float:
    """1 up to T = 0.95, then 0.05 / (1 - T); inf at T = 1."""
    if tradeoff >= 1.0:
        return math.inf
    return max(1.0, (1.0 - NO_LOSS_TRADEOFF) / (1.0 - tradeoff))


def targets(tradeoff: float, *, min_fidelity: float | None = None, margin: float = 1.0,
            synthetic: bool = False) -> dict[str, float | None]:
    """Targets for trade-off T; ``min_fidelity`` (a T value) tightens them to that T's.

    ``margin`` < 1 scales every allowed change (errors, distances to a perfect similarity, the PSNR's
    allowed loss): synthetic probes are a proxy for real inputs, so they are held to a tighter target.
    ``synthetic``: detections (scores, and the boxes paired with them) keep the no-loss targets whatever T
    below 1: the pictures hold none of a detector's objects, and a plan judged looser on them lost most of
    the faces on real photos (res10 SSD at T = 0.99: 103 -> 21). Your images loosen them with T.
    """
    t = tradeoff if min_fidelity is None else min(tradeoff, min_fidelity)
    loose = loosening(t)
    f = loose * margin
    if math.isinf(f):
        return dict.fromkeys(("class", "jaccard", "logit", "relative", "boxes", "cosine", "psnr"))
    f_detect = (1.0 if detections_held(t, synthetic) else loose) * margin
    return {
        "class": max(0.0, 1.0 - (1.0 - CONFIDENT_AGREEMENT) * f),
        "jaccard": max(0.0, 1.0 - (1.0 - SCORES_JACCARD) * f_detect),
        "logit": SCORES_LOGIT_NATS * f_detect,
        "relative": RELATIVE_ERROR * f,
        "boxes": RELATIVE_ERROR * f_detect,
        "cosine": max(-1.0, 1.0 - (1.0 - EMBEDDING_COSINE) * f),
        "psnr": IMAGE_PSNR_DB - 20.0 * math.log10(f),
    }


def _error_target(spec: OutputSpec, t: Mapping[str, float | None]) -> float | None:
    """The relative-error target of an output: a detector's boxes have theirs (see targets)."""
    return t["boxes"] if spec.kind == "boxes" else t["relative"]


def detections_held(tradeoff: float, synthetic: bool) -> bool:
    """Whether detections keep stricter targets than T gives other outputs (see targets)."""
    return synthetic and 1.0 < loosening(tradeoff) < math.inf


# ------------------------------------------------------------------ kinds from the graph


def infer_outputs(net: Net, compared: Sequence[str], *, overrides: Mapping[str, str] | None = None,
                  shapes: Mapping[str, tuple[int, ...]] | None = None) -> list[OutputSpec]:
    """The kind of each compared blob. ``shapes``: the original's output shapes (from a forward pass)."""
    overrides = dict(overrides or {})
    for name, kind in overrides.items():
        if name not in compared:
            raise UsageError(f"--kind {name}={kind}: '{name}' is not an output of the model "
                             f"(outputs: {', '.join(compared) or 'none'})")
        if kind not in KINDS:
            raise UsageError(f"--kind {name}={kind}: unknown kind (one of {', '.join(KINDS)})")
    shapes = dict(shapes or {})
    producers = _producers(net)
    specs: dict[str, OutputSpec] = {}
    detection = _detection_inputs(net)
    for name in compared:
        if name in detection:
            specs[name] = detection[name]
            continue
        origin = _origin(producers, name)
        shape = shapes.get(name, ())
        per_sample = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        if origin is not None and origin.type in ACTIVATIONS:
            channels = _class_count(shape)
            if per_sample > channels:
                specs[name] = OutputSpec(name, "scores", reason=f"{origin.type} map")
            else:
                specs[name] = OutputSpec(name, "class", reason=f"{origin.type} over {channels} classes")
        elif origin is not None and origin.type == "Normalize":
            specs[name] = OutputSpec(name, "embedding", reason="L2-normalised vector")
        elif len(shape) == 4 and shape[2] * shape[3] >= 64 and shape[1] <= 4:
            specs[name] = OutputSpec(name, "image", reason=f"{shape[1]}-channel {shape[2]}x{shape[3]} map")
        elif per_sample >= EMBEDDING_MIN_DIM and (len(shape) <= 2 or int(np.prod(shape[2:])) == 1):
            specs[name] = OutputSpec(name, "embedding", reason=f"{per_sample}-value vector")
        else:
            specs[name] = OutputSpec(name, "dense", reason="regression or other values")
    _pair_boxes(specs, shapes)
    for name, kind in overrides.items():
        spec = specs[name]
        specs[name] = OutputSpec(name, kind, spec.classes, spec.background, spec.pair, spec.threshold,
                                 "given with --kind")
    return [specs[name] for name in compared]


def _producers(net: Net) -> dict:
    producers = {}
    for layer in net.layers:
        for top in layer.tops:
            producers[top] = layer
    return producers


def _origin(producers, name: str):
    """The layer that made the values of blob ``name``, looking through shape-only layers."""
    layer = producers.get(name)
    seen = 0
    while layer is not None and layer.type in SHAPE_ONLY and layer.bottoms and seen < 64:
        layer = producers.get(layer.bottoms[0])
        seen += 1
    return layer


def _class_count(shape: tuple[int, ...]) -> int:
    """Classes of a probability output: the last axis of (N, positions, C), else axis 1."""
    if len(shape) == 3 and shape[2] > 1:
        return int(shape[-1])
    return int(shape[1]) if len(shape) > 1 else 1


def _detection_inputs(net: Net) -> dict[str, OutputSpec]:
    specs = {}
    for layer in net.layers:
        if layer.type != "DetectionOutput" or len(layer.bottoms) < 3:
            continue
        p = layer.sub("detection_output_param")
        classes = int(p.get("num_classes", 2))
        background = int(p.get("background_label_id", 0))
        threshold = float(p.get("confidence_threshold", 0.5) or 0.5)
        loc, conf, prior = layer.bottoms[:3]
        specs[conf] = OutputSpec(conf, "scores", classes, background if 0 <= background < classes else None,
                                 None, max(threshold, 0.5), f"confidences of '{layer.name}'")
        specs[loc] = OutputSpec(loc, "boxes", pair=conf, reason=f"locations of '{layer.name}'")
        specs[prior] = OutputSpec(prior, "dense", reason=f"priors of '{layer.name}'")
    return specs


def _positions(shape: tuple[int, ...], classes: int = 0) -> int:
    if classes:
        return int(np.prod(shape[1:])) // classes
    if len(shape) == 4:
        return int(shape[2] * shape[3])
    if len(shape) == 3:
        return int(shape[1])
    return 1


def _pair_boxes(specs: dict[str, OutputSpec], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """A dense output with as many positions as exactly one scores output is that output's boxes."""
    scores = [s for s in specs.values() if s.kind == "scores"]
    for name, spec in list(specs.items()):
        if spec.kind not in ("dense", "image") or name not in shapes or not scores:
            continue
        shape = shapes[name]
        matches = [s for s in scores if s.name in shapes
                   and _positions(shapes[s.name], s.classes) == _positions(shape) > 1
                   and len(shapes[s.name]) == len(shape)]
        if len(matches) == 1:
            specs[name] = OutputSpec(name, "boxes", pair=matches[0].name,
                                     reason=f"same positions as scores '{matches[0].name}'")


# ------------------------------------------------------------------ metrics


def _by_position(y: np.ndarray, classes: int = 0) -> np.ndarray:
    """(N, positions, values) view of an output: channels last for maps."""
    n = y.shape[0]
    if classes:
        return y.reshape(n, -1, classes)
    if y.ndim == 4:
        return y.reshape(n, y.shape[1], -1).transpose(0, 2, 1)
    if y.ndim == 3:
        return y
    return y.reshape(n, 1, -1)


def _foreground_classes(spec: OutputSpec, p: np.ndarray) -> list[int]:
    """Foreground class indices of an (N, positions, classes) probability view of the original."""
    if spec.background is not None:
        return [c for c in range(p.shape[2]) if c != spec.background]
    # the background is the class that is usually on
    keep = [c for c in range(p.shape[2]) if float(np.median(p[:, :, c])) < 0.5]
    return keep or list(range(p.shape[2]))


def _selected_positions(spec: OutputSpec, original: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """(positive mask, strongest mask) over (N, positions, foreground), and the positive count."""
    view = _by_position(original, spec.classes)
    fg = view[:, :, _foreground_classes(spec, view)]
    positive = fg > spec.threshold
    count = int(positive.sum())
    k = max(MIN_POSITIVES, int(math.ceil(STRONGEST_SHARE * fg.size)), count)
    k = min(k, fg.size)
    flat = fg.reshape(-1)
    cut = np.partition(flat, flat.size - k)[flat.size - k]
    strongest = fg >= cut
    return positive, strongest, count


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
    return np.log(p) - np.log1p(-p)


def check_output(spec: OutputSpec, original: np.ndarray, compressed: np.ndarray, tradeoff: float, *,
                 outputs: Mapping[str, np.ndarray] | None = None, specs: Mapping[str, OutputSpec] | None = None,
                 min_fidelity: float | None = None, margin: float = 1.0, synthetic: bool = False) -> list[Check]:
    """The metrics of one output. ``outputs``/``specs``: every original output, for paired boxes."""
    t = targets(tradeoff, min_fidelity=min_fidelity, margin=margin, synthetic=synthetic)
    n = original.shape[0] if original.ndim > 1 else 1
    if spec.kind == "image":  # (a map per input: measured a few inputs at a time, see _squared_changes)
        psnr = _psnr_db(_peak(original), float(np.sum(_squared_changes(original, compressed, n))), original.size)
        return [Check(spec.name, spec.kind, "PSNR vs the original (dB)", psnr, t["psnr"], True)]
    pair = spec.kind == "boxes" and spec.pair and outputs is not None and specs is not None and spec.pair in outputs
    if spec.kind not in ("class", "scores", "embedding") and not pair:
        diff = float(np.sum(_squared_changes(original, compressed, n)))
        return [Check(spec.name, spec.kind, "relative error", _root(diff, _sum_of_squares(original, n)),
                      _error_target(spec, t), False)]
    a = original.astype(np.float64)
    b = compressed.astype(np.float64)
    if spec.kind == "class":
        pa = _probabilities(a.reshape(n, -1))
        pb = _probabilities(b.reshape(n, -1))
        old, new = pa.argmax(axis=1), pb.argmax(axis=1)
        confident, fallback = _counted(pa)
        what = (f"top-1 agreement on the more confident half ({int(confident.sum())} of {n})" if fallback else
                f"top-1 agreement where confident ({int(confident.sum())} of {n})")
        agreement = float(np.mean(old[confident] == new[confident]))
        return [Check(spec.name, spec.kind, what, agreement, t["class"], True, counted=int(confident.sum()))]
    if spec.kind == "scores":
        fa, fb, strongest, count = _foreground(spec, a, b)
        if count >= MIN_POSITIVES:  # objects present: the positives decide
            (sure_pos, sure_neg), now_pos = _sure(spec, fa), _positives(spec, fb)
            jac = int((sure_pos & now_pos).sum()) / max(int(sure_pos.sum()) + int((sure_neg & now_pos).sum()), 1)
            return [Check(spec.name, spec.kind, f"positives Jaccard ({int(sure_pos.sum())} positives)", jac,
                          t["jaccard"], True)]
        # No objects: the strongest entries are the ones that would become detections.
        d = _capped_logit_change(spec, fa[strongest], fb[strongest])
        return [Check(spec.name, spec.kind, "logit change at the strongest (RMS nats)",
                      float(np.sqrt(np.mean(d * d))) if d.size else 0.0, t["logit"], False)]
    if pair:
        rows, at_positives = _box_rows(specs[spec.pair], outputs[spec.pair])
        ya, yb = _positions_view(a, rows.shape[1])[rows], _positions_view(b, rows.shape[1])[rows]
        what = f"relative error at {int(rows.sum())} {'positive' if at_positives else 'strongest'} positions"
        return [Check(spec.name, spec.kind, what, _relative(ya, yb), t["boxes"], False)]
    cos = _cosines(a.reshape(n, -1), b.reshape(n, -1))  # (embedding)
    return [Check(spec.name, spec.kind, "smallest cosine similarity", float(cos.min()), t["cosine"], True)]


def _foreground(spec: OutputSpec, a: np.ndarray, b: np.ndarray):
    """(original, compressed) foreground scores as (N, positions, classes) views, the original's strongest
    entries and its positive count; ``b`` may hold only the first inputs."""
    _, strongest, count = _selected_positions(spec, a)
    va = _by_position(a, spec.classes)
    keep = _foreground_classes(spec, va)
    return va[:, :, keep], _by_position(b, spec.classes)[:, :, keep], strongest, count


def _sure(spec: OutputSpec, fa: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The original's sure positives and sure negatives. Entries within AMBIGUOUS_NATS of the threshold are
    nobody's positives: a 0.51 -> 0.49 anchor next to confident ones changes no detection after NMS."""
    cut = float(_logit(np.array(spec.threshold)))
    la = _logit(fa)
    return la > cut + AMBIGUOUS_NATS, la < cut - AMBIGUOUS_NATS


def _positives(spec: OutputSpec, f: np.ndarray) -> np.ndarray:
    return _logit(f) > float(_logit(np.array(spec.threshold)))


def _capped_logit_change(spec: OutputSpec, fa: np.ndarray, fb: np.ndarray) -> np.ndarray:
    """Logit changes, logits capped SATURATION_NATS above the threshold: above it a score only has to stay
    clearly positive."""
    cap = float(_logit(np.array(spec.threshold))) + SATURATION_NATS
    return np.minimum(_logit(fa), cap) - np.minimum(_logit(fb), cap)


def _box_rows(pair: OutputSpec, scores: np.ndarray) -> tuple[np.ndarray, bool]:
    """(N, positions) rows a paired boxes output is measured at: the positives of its scores output in the
    original, or its strongest entries when there are too few; and whether they are the positives."""
    positive, strongest, count = _selected_positions(pair, scores.astype(np.float64))
    at_positives = count >= MIN_POSITIVES
    return (positive if at_positives else strongest).any(axis=2), at_positives


def _counted(p: np.ndarray) -> tuple[np.ndarray, bool]:
    """The inputs a class agreement counts: those the original is confident on, or (too few of those) its
    more confident half; and whether it fell back to the half. p : (N, classes) probabilities."""
    top = p.max(axis=1)
    confident = top >= CONFIDENT
    if confident.sum() < MIN_CONFIDENT:
        return top >= np.median(top), True
    return confident, False


def _cosines(va: np.ndarray, vb: np.ndarray) -> np.ndarray:
    """Per-row cosine similarity (1 where a row is zero)."""
    denom = np.linalg.norm(va, axis=1) * np.linalg.norm(vb, axis=1)
    return np.where(denom > 0, np.sum(va * vb, axis=1) / np.where(denom > 0, denom, 1.0), 1.0)


def _positions_view(y: np.ndarray, positions: int) -> np.ndarray:
    """(N, positions, values): maps channels last, flat outputs position-major (SSD's layout)."""
    if y.ndim == 4 and y.shape[2] * y.shape[3] == positions:
        return _by_position(y)
    return y.reshape(y.shape[0], positions, -1)


def _squared_changes(a: np.ndarray, b: np.ndarray, count: int) -> np.ndarray:
    """(count,) per-input sums of squared changes between the first ``count`` inputs of ``a`` and ``b``,
    in float64, a few inputs at a time (a float64 copy of a whole dense output is not made)."""
    a2, b2 = a[:count].reshape(count, -1), b[:count].reshape(count, -1)
    out = np.empty(count)
    for rows in row_blocks(count, a2.shape[1]):
        d = a2[rows].astype(np.float64) - b2[rows]
        out[rows] = np.einsum("ij,ij->i", d, d)
    return out


def _peak(a: np.ndarray) -> float:
    """An image output's peak-to-peak range (1 for a constant one): PSNR's reference."""
    return (float(a.max()) - float(a.min())) or 1.0


def _psnr_db(peak: float, squared_changes: float, size: int) -> float:
    """PSNR (dB) of a change summing to ``squared_changes`` over an output of ``size`` entries and range
    ``peak`` (_peak)."""
    mse = squared_changes / size
    return math.inf if mse == 0 else 10.0 * math.log10(peak * peak / mse)


def _sum_of_squares(a: np.ndarray, count: int) -> float:
    """The sum of squares of ``a`` (``count`` inputs) in float64, a few inputs at a time."""
    a2 = a.reshape(count, -1)
    total = 0.0
    for rows in row_blocks(count, a2.shape[1]):
        x = a2[rows].astype(np.float64)
        total += float(np.einsum("ij,ij->", x, x))
    return total


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    ref = float(np.sum(a * a))
    diff = float(np.sum((a - b) ** 2))
    if ref == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return math.sqrt(diff / ref)


def _probabilities(v: np.ndarray) -> np.ndarray:
    """Rows that already are probabilities stay; logits go through a softmax."""
    if np.all(v >= -1e-6) and np.allclose(v.sum(axis=1), 1.0, atol=1e-3):
        return v
    z = v - v.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def check_all(specs: Sequence[OutputSpec], original: Mapping[str, np.ndarray], compressed: Mapping[str, np.ndarray],
              tradeoff: float, *, min_fidelity: float | None = None, margin: float = 1.0,
              synthetic: bool = False) -> list[Check]:
    """Every metric of every output; raises nothing: a failing Check has ``passed`` False."""
    by_name = {s.name: s for s in specs}
    checks: list[Check] = []
    for spec in specs:
        checks.extend(check_output(spec, original[spec.name], compressed[spec.name], tradeoff,
                                   outputs=original, specs=by_name, min_fidelity=min_fidelity, margin=margin,
                                   synthetic=synthetic))
    return checks


LIKELY_MIN_INPUTS = 8  # inputs with measured entries before a miss may be projected (certain_misses, likely)


def certain_misses(specs: Sequence[OutputSpec], original: Mapping[str, np.ndarray],
                   partial: Mapping[str, np.ndarray], count: int, tradeoff: float, *, total: int,
                   min_fidelity: float | None = None, margin: float = 1.0, likely: bool = False,
                   synthetic: bool = False) -> list[Check]:
    """Checks the compressed model has already lost on the first ``count`` validation inputs: the metric's
    best possible value is past its target, whatever the others give. ``original`` holds all inputs'
    outputs, ``partial`` the compressed model's first ``count``. Detection scores and paired boxes are
    bounded through the original's positives, known for every input in advance; outputs that are not one
    row per input (SSD priors) are never decided early. ``total`` is the number of inputs. A validation
    round that misses stops here, early.

    ``likely``: an error summed over inputs (PSNR, relative errors, RMS logit changes) is projected instead
    of bounded: the others are taken to change each of their entries no less than the least-changed input
    so far did (per entry), once LIKELY_MIN_INPUTS inputs are seen. For inputs in no particular order (not
    decisive_order's) a miss so projected is one the full check makes unless the rest would nearly all
    change less than the best input seen: a round may end on it (a plan rejected, never one published)."""
    t = targets(tradeoff, min_fidelity=min_fidelity, margin=margin, synthetic=synthetic)
    lost: list[Check] = []
    for spec in specs:
        raw = original[spec.name]
        n_all = raw.shape[0] if raw.ndim > 1 else 1
        if n_all != total or partial[spec.name].shape[0] != count:
            continue
        seen = f"after {count} of {n_all} inputs"
        check = _dense_bound(spec, raw, partial[spec.name], count, t, seen, likely,
                             paired=bool(spec.pair and spec.pair in original))
        if check is not None:
            if not check.passed:
                lost.append(check)
            continue
        a_all = raw.astype(np.float64)
        a, b = a_all[:count], partial[spec.name].astype(np.float64)
        if spec.kind == "class" and t["class"] is not None:
            confident, flipped = _flips(a_all, b, count)
            best = 1.0 - int(np.sum(flipped)) / max(int(confident.sum()), 1)
            check = Check(spec.name, spec.kind, f"top-1 agreement where confident, at best ({seen})", best,
                          t["class"], True)
        elif spec.kind == "embedding" and t["cosine"] is not None:
            cos = _cosines(a.reshape(count, -1), b.reshape(count, -1))
            check = Check(spec.name, spec.kind, f"smallest cosine similarity ({seen})", float(cos.min()),
                          t["cosine"], True)
        elif spec.kind == "scores" and t["jaccard"] is not None:
            check = _scores_bound(spec, a_all, b, count, t, seen, likely)
        elif spec.kind == "boxes" and spec.pair and spec.pair in original and t["boxes"] is not None:
            if original[spec.pair].shape[0] != total:
                continue
            check = _boxes_bound(spec, specs, original, a_all, b, count, t, seen, likely)
        else:
            continue
        if not check.passed:
            lost.append(check)
    return lost


def _dense_bound(spec: OutputSpec, a_all: np.ndarray, b: np.ndarray, count: int, t: dict, seen: str,
                 likely: bool, *, paired: bool) -> Check | None:
    """certain_misses' bound for a map or dense output (PSNR, relative error: sums of squared changes over
    every entry, measured a few inputs at a time; boxes without their scores count as dense), or None for
    the other kinds."""
    n_all = a_all.shape[0] if a_all.ndim > 1 else 1
    entries = np.full(n_all, a_all[0].size)
    if spec.kind == "image" and t["psnr"] is not None:
        peak = _peak(a_all)
        changes, how = _summed(_squared_changes(a_all, b, count), entries, likely, seen,
                               a_all.size * peak * peak / 10.0 ** (t["psnr"] / 10.0))
        best = _psnr_db(peak, changes, a_all.size)
        return Check(spec.name, spec.kind, f"PSNR vs the original, {how[0]}", best, t["psnr"], True)
    if (spec.kind == "dense" or (spec.kind == "boxes" and not paired)) and t["relative"] is not None:
        target = _error_target(spec, t)
        ref = _sum_of_squares(a_all, n_all)
        diff, how = _summed(_squared_changes(a_all, b, count), entries, likely, seen, target ** 2 * ref)
        return Check(spec.name, spec.kind, f"relative error, {how[1]}", _root(diff, ref), target, False)
    return None


def _summed(per_input: np.ndarray, entries: np.ndarray, likely: bool, seen: str,
            target_sum: float | None = None) -> tuple[float, tuple[str, str]]:
    """The total of a per-input sum of squared changes over all inputs, given the first ones' (``per_input``)
    and every input's entry count: at least theirs (the rest adding nothing), or (``likely``, enough inputs
    seen) projected, the rest changing each entry as little as the least-changed input seen did -- unless the
    inputs seen already exceed ``target_sum`` (a certain miss, reported as one); and how the value is meant
    ("at best ..." / "at least ..." or "projected ...")."""
    count = per_input.shape[0]
    total = float(np.sum(per_input))
    measured = entries[:count] > 0
    if not likely or count >= entries.shape[0] or int(measured.sum()) < LIKELY_MIN_INPUTS or \
            (target_sum is not None and total > target_sum):  # (a certain miss is reported as one)
        return total, (f"at best ({seen})", f"at least ({seen})")
    rate = float(np.min(per_input[measured] / entries[:count][measured]))
    projected = f"projected ({seen}: the rest changing no less than the least-changed so far)"
    return total + rate * float(np.sum(entries[count:])), (projected, projected)


def _root(diff: float, ref: float) -> float:
    """sqrt(diff / ref): a relative error (0 for no change of a zero reference, inf for a change of it)."""
    return math.sqrt(diff / ref) if ref > 0 else (0.0 if diff == 0 else math.inf)


def _scores_bound(spec: OutputSpec, a_all: np.ndarray, b: np.ndarray, count: int, t: dict, seen: str,
                  likely: bool = False) -> Check:
    """The best final value of check_output's scores metric given the first ``count`` inputs: the later
    inputs at best keep all their positives and add no new ones (Jaccard), or change nothing (RMS logit;
    ``likely``: see certain_misses)."""
    fa, fb, strongest, positives = _foreground(spec, a_all, b)
    if positives >= MIN_POSITIVES:
        (sure_pos, sure_neg), now_pos = _sure(spec, fa), _positives(spec, fb)
        kept = int((sure_pos[:count] & now_pos).sum()) + int(sure_pos[count:].sum())
        best = kept / max(int(sure_pos.sum()) + int((sure_neg[:count] & now_pos).sum()), 1)
        return Check(spec.name, spec.kind, f"positives Jaccard, at best ({seen})", best, t["jaccard"], True)
    d = np.where(strongest[:count], _capped_logit_change(spec, fa[:count], fb), 0.0)
    entries = strongest.reshape(strongest.shape[0], -1).sum(axis=1)
    strong = max(int(strongest.sum()), 1)
    diff, how = _summed((d * d).reshape(count, -1).sum(axis=1), entries, likely, seen, t["logit"] ** 2 * strong)
    value = math.sqrt(diff / strong)
    return Check(spec.name, spec.kind, f"logit change at the strongest, {how[1]}", value, t["logit"], False)


def _boxes_bound(spec: OutputSpec, specs: Sequence[OutputSpec], original: Mapping[str, np.ndarray],
                 a_all: np.ndarray, b: np.ndarray, count: int, t: dict, seen: str, likely: bool = False) -> Check:
    """The least final relative error of paired boxes given the first ``count`` inputs (the rows it is
    measured on come from the original's scores, known for every input; ``likely``: see certain_misses)."""
    rows, _ = _box_rows(next(s for s in specs if s.name == spec.pair), original[spec.pair])
    positions = rows.shape[1]
    va = _positions_view(a_all, positions)
    ref = float(np.sum(va[rows] ** 2))
    d = np.where(rows[:count, :, None], (va[:count] - _positions_view(b, positions)) ** 2, 0.0)
    entries = rows.sum(axis=1) * va.shape[2]
    diff, how = _summed(d.reshape(count, -1).sum(axis=1), entries, likely, seen, t["boxes"] ** 2 * ref)
    return Check(spec.name, spec.kind, f"relative error at the selected positions, {how[1]}", _root(diff, ref),
                 t["boxes"], False)


def decided_by_changes(specs: Sequence[OutputSpec]) -> bool:
    """Whether these outputs (one value per input) can miss only by changed answers: class outputs alone.
    A miss then measures no error (search.excess is 1 whichever inputs showed it), so the order the inputs
    are judged in decides only how soon a miss is seen."""
    return bool(specs) and all(spec.kind == "class" for spec in specs)


def changed_answers(specs: Sequence[OutputSpec], original: Mapping[str, np.ndarray],
                    partial: Mapping[str, np.ndarray], count: int) -> np.ndarray:
    """(count,) bool: the first ``count`` inputs a class check counts (see _counted, over all of
    ``original``) whose top-1 answer ``partial`` changed."""
    out = np.zeros(count, dtype=bool)
    for spec in specs:
        if spec.kind != "class" or spec.name not in partial or partial[spec.name].shape[0] < count:
            continue
        a = original[spec.name].astype(np.float64)
        if a.shape[0] < count:
            continue
        out |= _flips(a, partial[spec.name][:count].astype(np.float64), count)[1]
    return out


def _flips(a_all: np.ndarray, b: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """A class output's (counted, flipped): the inputs its check counts (_counted, over all of ``a_all``), and
    which of the first ``count`` -- ``b`` holds the compressed model's values there -- changed their top-1."""
    n = a_all.shape[0] if a_all.ndim > 1 else 1
    pa = _probabilities(a_all.reshape(n, -1))
    counted, _ = _counted(pa)
    changed = pa[:count].argmax(axis=1) != _probabilities(b.reshape(count, -1)).argmax(axis=1)
    return counted, counted[:count] & changed


def decisive_order(specs: Sequence[OutputSpec], original: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """An order of the validation inputs that decides a missing round soonest, or None: for a class
    output, the counted (confident) inputs the original is least sure of first -- where a compressed
    model flips its answer first -- and the uncounted ones last. The verdict does not depend on the order."""
    for spec in specs:
        if spec.kind != "class":
            continue
        a = original[spec.name].astype(np.float64)
        n = a.shape[0] if a.ndim > 1 else 1
        p = _probabilities(a.reshape(n, -1))
        top = p.max(axis=1)
        counted, _ = _counted(p)
        return np.argsort(np.where(counted, top, 2.0 + top), kind="stable")
    return None
