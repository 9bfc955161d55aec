"""SSD's DetectionOutput as ONNX operators, in OpenCV 4.x's semantics.

OpenCV: decode each prior's box (CORNER or CENTER_SIZE, variances), optionally clip to [0, 1]; per
non-background class keep scores > confidence_threshold, the top_k best, then greedy NMS (IoU >
nms_threshold suppresses; a single class stops at keep_top_k); over all classes keep the keep_top_k best;
write [1, 1, keep_top_k, 7] rows (image, label, score, xmin, ymin, xmax, ymax), best first, then zeros.

Here: the priors are constants (their values at the export size), the decode is arithmetic, the per-class
top_k is TopK, NMS is NonMaxSuppression with one "batch" per class, then a global TopK and a Pad.
Supported: batch 1, share_location, normalized boxes (the SSD deploy nets OpenCV ships).
"""
from __future__ import annotations

import numpy as np

from .errors import ExportError
from .net import Layer


def _params(layer: Layer) -> dict:
    p = layer.sub("detection_output_param")
    nms = p.get("nms_param", {}) if isinstance(p.get("nms_param"), dict) else {}
    out = {
        "num_classes": int(p.get("num_classes", 0)),
        "share_location": bool(p.get("share_location", True)),
        "background": int(p.get("background_label_id", 0)),
        "nms_threshold": float(nms.get("nms_threshold", 0.3)),
        "top_k": int(nms.get("top_k", -1)),
        "code_type": str(p.get("code_type", "CORNER")).upper(),
        "variance_in_target": bool(p.get("variance_encoded_in_target", False)),
        "keep_top_k": int(p.get("keep_top_k", -1)),
        "confidence_threshold": float(p.get("confidence_threshold", 0.0)),
        "normalized": bool(p.get("normalized_bbox", True)),
        "clip": bool(p.get("clip", False)),
        "group_by_classes": bool(p.get("group_by_classes", False)),
    }
    why = None
    if not out["share_location"]:
        why = "share_location: false"
    elif not out["normalized"]:
        why = "normalized_bbox: false"
    elif out["keep_top_k"] <= 0:
        why = f"keep_top_k {out['keep_top_k']} (OpenCV needs a positive value)"
    elif out["code_type"] not in ("CORNER", "CENTER_SIZE"):
        why = f"code_type {out['code_type']}"
    elif out["group_by_classes"]:
        why = "group_by_classes: true"
    if why:
        raise ExportError(f"layer '{layer.name}' (DetectionOutput): {why} is not exported")
    return out


def _decode_terms(priors: np.ndarray, p: dict) -> dict[str, np.ndarray]:
    """Per-prior constants of the decode, shape (P, 1) each, float32."""
    priors = np.asarray(priors, dtype=np.float32).reshape(priors.shape[0], priors.shape[1], -1)
    boxes = priors[0, 0].reshape(-1, 4)
    var = np.ones_like(boxes) if p["variance_in_target"] else priors[0, 1].reshape(-1, 4)
    col = lambda a: np.ascontiguousarray(a.reshape(-1, 1), dtype=np.float32)  # noqa: E731
    if p["code_type"] == "CORNER":
        return {"v": var, "corner": boxes}
    width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return {"v": var, "w": col(width), "h": col(height), "cx": col(boxes[:, 0] + width * np.float32(0.5)),
            "cy": col(boxes[:, 1] + height * np.float32(0.5))}


def _decoded_boxes(b, layer: Layer, p: dict, priors: np.ndarray) -> str:
    """(P, 4) decoded boxes xmin, ymin, xmax, ymax."""
    t = _decode_terms(priors, p)
    n = layer.name
    loc = b.node("Reshape", [b.bottom(layer, 0), b.ints(n + "_locshape", [-1, 4])], n + "_loc")
    scaled = loc if p["variance_in_target"] else b.node("Mul", [loc, b.const(n + "_var", t["v"])], n + "_vloc")
    if p["code_type"] == "CORNER":
        boxes = b.node("Add", [scaled, b.const(n + "_prior", t["corner"])], n + "_boxes")
    else:
        cols = b.node("Split", [scaled, b.ints(n + "_four", [1, 1, 1, 1])], n + "_d", outputs=4, axis=1)
        w, h = b.const(n + "_pw", t["w"]), b.const(n + "_ph", t["h"])
        cx = b.node("Add", [b.node("Mul", [cols[0], w], n + "_dx"), b.const(n + "_pcx", t["cx"])], n + "_cx")
        cy = b.node("Add", [b.node("Mul", [cols[1], h], n + "_dy"), b.const(n + "_pcy", t["cy"])], n + "_cy")
        half = b.const(n + "_half", np.float32(0.5))
        hw = b.node("Mul", [b.node("Mul", [b.node("Exp", [cols[2]], n + "_ew"), w], n + "_bw"), half], n + "_hw")
        hh = b.node("Mul", [b.node("Mul", [b.node("Exp", [cols[3]], n + "_eh"), h], n + "_bh"), half], n + "_hh")
        corners = [b.node("Sub", [cx, hw], n + "_x0"), b.node("Sub", [cy, hh], n + "_y0"),
                   b.node("Add", [cx, hw], n + "_x1"), b.node("Add", [cy, hh], n + "_y1")]
        boxes = b.node("Concat", corners, n + "_boxes", axis=1)
    if p["clip"]:
        boxes = b.node("Clip", [boxes, b.const(n + "_lo", np.float32(0)), b.const(n + "_hi", np.float32(1))],
                       n + "_clipped")
    return boxes


def detection_output(b, layer: Layer) -> None:
    p = _params(layer)
    if not b.batch_fixed or b.shape_of[b.bottom(layer, 0)][0] != 1:
        raise ExportError(f"layer '{layer.name}' (DetectionOutput): only batch 1 is exported")
    priors = b.constant_value(layer.bottoms[2])
    if priors is None:
        raise ExportError(f"layer '{layer.name}' (DetectionOutput): its priors are not constant at the export size")
    n = layer.name
    boxes = _decoded_boxes(b, layer, p, priors)
    count = int(np.asarray(priors).shape[-1] // 4)
    classes = [c for c in range(p["num_classes"]) if c != p["background"]]
    conf = b.node("Reshape", [b.bottom(layer, 1), b.ints(n + "_confshape", [count, p["num_classes"]])], n + "_conf")
    scores = b.node("Gather", [b.node("Transpose", [conf], n + "_confT", perm=[1, 0]), b.ints(n + "_cls", classes)],
                    n + "_scores", axis=0)  # (C', P)
    keep = min(p["top_k"], count) if p["top_k"] > 0 else count
    values, index = b.node("TopK", [scores, b.ints(n + "_topk", [keep])], n + "_cand", outputs=2, axis=1)
    cand_boxes = b.node("Gather", [boxes, index], n + "_cboxes", axis=0)  # (C', K, 4)
    limit = p["keep_top_k"] if len(classes) == 1 else keep
    selected = b.node("NonMaxSuppression", [
        cand_boxes, b.node("Unsqueeze", [values, b.ints(n + "_ax1", [1])], n + "_nmsscores"),
        b.ints(n + "_limit", [limit]), b.const(n + "_iou", np.asarray([p["nms_threshold"]], dtype=np.float32)),
        b.const(n + "_thr", np.asarray([p["confidence_threshold"]], dtype=np.float32))], n + "_sel")
    pick = b.node("Gather", [selected, b.ints(n + "_cols", [0, 2])], n + "_pick", axis=1)  # (M, 2): class, k
    kept_scores = b.node("GatherND", [values, pick], n + "_kscores")  # (M,)
    _write_rows(b, layer, p, classes, pick, kept_scores, cand_boxes)


def _write_rows(b, layer: Layer, p: dict, classes: list, pick: str, scores: str, cand_boxes: str) -> None:
    n = layer.name
    k = b.node("Min", [b.node("Shape", [scores], n + "_m"), b.ints(n + "_keep", [p["keep_top_k"]])], n + "_k")
    best, order = b.node("TopK", [scores, k], n + "_best", outputs=2, axis=0)
    chosen = b.node("Gather", [pick, order], n + "_chosen", axis=0)  # (M', 2)
    kept_boxes = b.node("GatherND", [cand_boxes, chosen], n + "_kboxes")  # (M', 4)
    cls = b.node("Gather", [chosen, b.ints(n + "_c0", [0])], n + "_ci", axis=1)  # (M', 1)
    labels = b.node("Cast", [b.node("Gather", [b.ints(n + "_labels", classes), cls], n + "_lab")], n + "_labf", to=1)
    column = b.node("Unsqueeze", [best, b.ints(n + "_ax1b", [1])], n + "_scol")
    image = b.node("Mul", [column, b.const(n + "_zero", np.float32(0))], n + "_img")
    rows = b.node("Concat", [image, labels, column, kept_boxes], n + "_rows", axis=1)  # (M', 7)
    missing = b.node("Sub", [b.ints(n + "_keep2", [p["keep_top_k"]]), k], n + "_missing")
    pads = b.node("Concat", [b.ints(n + "_p0", [0, 0]), missing, b.ints(n + "_p1", [0])], n + "_pads", axis=0)
    padded = b.node("Pad", [rows, pads], n + "_padded")
    b.define(layer, "Reshape", [padded, b.ints(n + "_outshape", [1, 1, p["keep_top_k"], 7])])
