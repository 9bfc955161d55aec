"""What a run did: a Report, its stdout table and its JSON form (stable keys, see README)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

from .plan import LayerPlan
from .plan.contract import Check, detections_held
from .validate import OutputAgreement

JSON_SCHEMA_VERSION = 2


@dataclass(frozen=True)
class Report:
    deploy: str
    weights: str
    output_prototxt: str
    output_caffemodel: str
    tradeoff: float
    error_budget: float
    predicted_error: float
    layers: tuple[LayerPlan, ...]
    params_before: int
    params_after: int
    bytes_before: int  # size of the input caffemodel file
    bytes_after: int  # size of the written caffemodel file
    macs_before: int
    macs_after: int
    validation: tuple[OutputAgreement, ...]
    validation_inputs: str  # "random" or "images:<dir>" or "none"
    layers_before: int = 0  # layer count of the deploy net (after phase filtering)
    layers_after: int = 0
    storage: str = "float32"  # how the written caffemodel stores weights
    timings: dict = field(default_factory=dict)  # stage -> seconds
    contract: tuple[Check, ...] = ()  # the fidelity verdict of the written model, per output metric
    convention: str = ""  # the input convention the probes assumed (empty with --images/--calibration)
    rounds: int = 0  # closed-loop rounds (plans written and measured)
    note: str = ""  # why nothing was written, when nothing was
    latency_ms: dict = field(default_factory=dict)  # measured OpenCV latency, original/compressed, 1 thread
    output_onnx: str = ""  # the ONNX file written (--format onnx|both)
    onnx_bytes: int = 0
    onnx_validation: tuple[OutputAgreement, ...] = ()  # the ONNX model in onnxruntime vs the original
    onnx_contract: tuple[Check, ...] = ()
    accuracy: dict = field(default_factory=dict)  # --labels: top-1 of both models on the labelled images
    metric: dict = field(default_factory=dict)  # compress(metric=fn): fn on both models' validation outputs
    timing_cache: dict = field(default_factory=dict)  # path, timings reused from earlier runs, measured now
    plan_only: bool = False  # --plan-only: the plan was validated in scratch files, nothing was written
    onnx_parity: float | None = None  # max |onnxruntime - OpenCV (Caffe)| / max |OpenCV|, over outputs

    @property
    def written(self) -> bool:
        return bool(self.output_caffemodel or self.output_onnx)

    @property
    def ratio(self) -> float:
        return self.bytes_before / self.bytes_after if self.bytes_after else float("inf")

    def predicted_layer_ms(self) -> dict | None:
        """The factored layers' summed 1-thread times alone, measured before and predicted after, or None."""
        timed = [lp for lp in self.layers if lp.rank and lp.time_before and lp.time_after]
        if not timed:
            return None
        return {"before": sum(lp.time_before for lp in timed), "after": sum(lp.time_after for lp in timed),
                "layers": len(timed)}

    def to_json(self) -> dict:
        return {
            "schema_version": JSON_SCHEMA_VERSION,
            "input": {"prototxt": self.deploy, "caffemodel": self.weights, "bytes": self.bytes_before},
            "output": {
                "prototxt": self.output_prototxt,
                "caffemodel": self.output_caffemodel,
                "bytes": self.bytes_after,
                "storage": self.storage,
            },
            "tradeoff": self.tradeoff,
            "error_budget": None if self.error_budget == float("inf") else self.error_budget,
            "predicted_output_error": self.predicted_error,
            "totals": {
                "layers_before": self.layers_before,
                "layers_after": self.layers_after,
                "params_before": self.params_before,
                "params_after": self.params_after,
                "bytes_before": self.bytes_before,
                "bytes_after": self.bytes_after,
                "ratio": self.ratio,
                "macs_before": self.macs_before,
                "macs_after": self.macs_after,
            },
            "layers": [_layer_json(lp) for lp in self.layers],
            "validation": {
                "inputs": self.validation_inputs,
                "convention": self.convention,
                "outputs": [asdict(v) for v in self.validation],
            },
            "contract": self._contract_json(),
            "onnx": self._onnx_json(),
            "note": self.note,
            "plan_only": self.plan_only,
            "accuracy": self.accuracy or None,
            "metric": self.metric or None,
            "predicted_factored_layers_ms": self.predicted_layer_ms(),
            "latency_ms": self.latency_ms,
            "timing_cache": self.timing_cache or None,
            "timings_s": {k: v for k, v in self.timings.items() if not k.startswith("_")},
            "peak_rss_mb": self.timings.get("_peak_rss_mb"),
        }

    def _contract_json(self) -> dict:
        return {
            "passed": all(c.passed for c in self.contract) if self.contract else None,
            "rounds": self.rounds,
            "checks": [
                {"output": c.output, "kind": c.kind, "metric": c.metric, "value": _finite(c.value),
                 "target": c.target, "passed": c.passed}
                for c in self.contract
            ],
        }

    def _onnx_json(self) -> dict | None:
        if not self.output_onnx:
            return None
        return {
            "path": self.output_onnx,
            "bytes": self.onnx_bytes,
            "runtime": "onnxruntime" if self.onnx_contract else None,
            "contract_passed": all(c.passed for c in self.onnx_contract) if self.onnx_contract else None,
            "max_relative_difference_to_caffe": self.onnx_parity,
            "outputs": [asdict(v) for v in self.onnx_validation],
        }

    def json_text(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n"


def _layer_json(lp: LayerPlan) -> dict:
    return {
        "name": lp.layer,
        "type": lp.type,
        "weight_shape": list(lp.weight_shape),
        "method": lp.method,
        "rank": lp.rank,
        "params_before": lp.params_before,
        "params_after": lp.params_after,
        "macs_before": lp.macs_before,
        "macs_after": lp.macs_after,
        "weight_error": lp.weight_error,
        "output_error": lp.output_error,
        "time_ms_before": lp.time_before,
        "time_ms_after_predicted": lp.time_after if lp.rank else lp.time_before,
        "note": lp.reason,
    }


def _finite(v: float):
    return v if v == v and abs(v) != float("inf") else str(v)


def _si(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _layer_ms(lp: LayerPlan) -> str:
    if lp.time_before is None:
        return "-"
    if lp.rank and lp.time_after is not None:
        return f"{lp.time_before:.2f} -> {lp.time_after:.2f} (pred.)"
    return f"{lp.time_before:.2f}"


def format_table(report: Report) -> str:
    """The report as the CLI prints it: the layer table, then the summary, the contract and validation, the
    measurements and what was written."""
    lines = _layer_table(report)
    lines.append("")
    lines += _summary_lines(report) + _contract_lines(report) + _measured_lines(report)
    lines.append(_outcome_line(report))
    return "\n".join(lines)


def _layer_table(report: Report) -> list[str]:
    header = ("layer", "type", "weight shape", "method", "rank", "params", "weight err", "layer out err",
              "1-thread ms (alone)")
    rows: list[Sequence[str]] = []
    for lp in report.layers:
        params = (
            f"{_si(lp.params_before)} -> {_si(lp.params_after)}"
            if lp.params_after != lp.params_before
            else _si(lp.params_before)
        )
        rows.append((
            lp.layer,
            lp.type,
            "x".join(str(d) for d in lp.weight_shape),
            lp.method if lp.method != "keep" else ("keep: " + lp.reason if lp.reason else "keep"),
            str(lp.rank) if lp.rank else "-",
            params,
            f"{lp.weight_error:.3f}" if lp.rank else "-",
            f"{lp.output_error:.3f}" if lp.rank else "-",
            _layer_ms(lp),
        ))
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines += [f"{lp.layer}: {lp.method} -- {lp.reason}" for lp in report.layers if lp.rank and lp.reason]
    return lines


def _summary_lines(report: Report) -> list[str]:
    """Sizes, the predicted error against the budget, the input convention the probes assumed."""
    lines = [
        f"layers {report.layers_before} -> {report.layers_after}, "
        f"parameters {_si(report.params_before)} -> {_si(report.params_after)}, "
        f"caffemodel {_mb(report.bytes_before)} -> {_mb(report.bytes_after)} ({report.ratio:.2f}x smaller"
        f"{', fp16' if report.storage == 'float16' else ''}), "
        f"MACs {_si(report.macs_before)} -> {_si(report.macs_after)}"
    ]
    budget = "unlimited" if report.error_budget == float("inf") else f"{report.error_budget:.4f}"
    lines.append(
        f"trade-off {report.tradeoff:g}: predicted output error {report.predicted_error:.4f} (budget {budget})"
    )
    if report.convention:
        lines.append(f"probes assumed the input convention {report.convention}")
    return lines


def _contract_lines(report: Report) -> list[str]:
    """The fidelity contract's checks, the validation figures, and the labelled accuracy or user metric."""
    lines = []
    if report.contract and report.validation_inputs.startswith("natural-image probes"):
        lines.append("contract on synthetic probes: each target allows half the change it allows on your images "
                     "(--images DIR or --calibration DIR measure on real ones)")
        if detections_held(report.tradeoff, True) and any(c.kind in ("scores", "boxes") for c in report.contract):
            lines.append(f"  detections keep the targets of T = 0.95 at T = {report.tradeoff:g}: the pictures hold none "
                         "of a detector's objects (--calibration DIR or --images DIR loosen them with T)")
    for c in report.contract:
        target = "none" if c.target is None else f"{'>=' if c.higher_is_better else '<='} {c.target:.4g}"
        lines.append(f"contract '{c.output}' ({c.kind}): {c.metric} {c.value:.4g}, target {target}: "
                     f"{'pass' if c.passed else 'FAIL'}")
        if c.flips_allowed == 0:
            lines.append(f"  (with {c.counted} counted inputs this target allows no changed answer: whether a plan "
                         "near it passes depends on which inputs were drawn (--seed); more inputs, real ones with "
                         "--images/--calibration, decide it better)")
    kinds = {c.output: c.kind for c in report.contract}
    for v in report.validation:
        # (top-1 is a class output's figure: the arg-max of a box, score or image map is one position of it, and
        # its "agreement" -- 0% on an edge map, 87% on SSD box offsets -- says nothing; the JSON keeps it)
        top1 = f"top-1 agreement {100 * v.top1_agreement:.1f}%, " if kinds.get(v.name, "class") == "class" else ""
        lines.append(
            f"validation ({report.validation_inputs}) output '{v.name}': {top1}relative error mean "
            f"{v.mean_relative_error:.2e} max {v.max_relative_error:.2e}, cosine {v.cosine_similarity:.6f}"
        )
    if not report.validation and report.written:
        lines.append("validation: skipped (--no-validate)")
    if report.accuracy:
        acc = report.accuracy
        agree = next((f", top-1 agreement {100 * v.top1_agreement:.1f}% on the validation images"
                      for v in report.validation if v.name == acc["output"]), "")
        lines.append(f"top-1 accuracy on {acc['images']} labelled images (output '{acc['output']}'): original "
                     f"{100 * acc['original']:.2f}% -> compressed {100 * acc['compressed']:.2f}% "
                     f"({100 * (acc['compressed'] - acc['original']):+.2f} points){agree}")
    if report.metric:
        lines.append(f"metric on the validation inputs: original {report.metric['original']:.6g} -> compressed "
                     f"{report.metric['compressed']:.6g}")
    return lines


def _measured_lines(report: Report) -> list[str]:
    """Latency, the timing cache, the closed loop's rounds, the stage times and peak memory, ONNX parity."""
    lines = []
    if report.latency_ms:
        a, b = report.latency_ms["original_1t"], report.latency_ms["compressed_1t"]
        line = f"measured OpenCV latency, 1 thread: {a:.1f} ms -> {b:.1f} ms ({a / b:.2f}x)"
        if "original_default" in report.latency_ms:
            c, d = report.latency_ms["original_default"], report.latency_ms["compressed_default"]
            line += f"; {report.latency_ms['default_threads']} threads: {c:.1f} ms -> {d:.1f} ms ({c / d:.2f}x)"
        lines.append(line + _latency_input(report.latency_ms))
    if report.timing_cache.get("reused"):
        lines.append(f"timings: {report.timing_cache['reused']} reused from earlier runs on this machine "
                     f"({report.timing_cache['path']}), {report.timing_cache['measured']} measured now "
                     "(--retime measures all again)")
    if report.rounds > 1:
        lines.append(f"closed loop: {report.rounds} plans measured to find the cheapest that meets the contract "
                     "(budget search, then one-layer moves)")
    timing = ", ".join(f"{k} {v:.2f}s" for k, v in report.timings.items() if not k.startswith("_") and "/" not in k)
    lines.append(f"time: {timing}; peak memory {report.timings.get('_peak_rss_mb', 0):.0f} MB")
    if report.onnx_parity is not None:
        verdict = ("meets the contract" if all(c.passed for c in report.onnx_contract) else
                   "contract not enforced (--rank at T = 0)")
        lines.append(f"ONNX in onnxruntime: within {report.onnx_parity:.1e} of the Caffe model in OpenCV "
                     f"(largest difference / largest value); against the original: {verdict}")
    return lines


def _outcome_line(report: Report) -> str:
    """What the run wrote (or, --plan-only, would write), or why nothing."""
    if report.plan_only and report.note:
        return f"plan only: {report.note}; nothing written"
    if report.plan_only:
        predicted = report.predicted_layer_ms()
        speed = (f"; the {predicted['layers']} factored layers, timed alone: {predicted['before']:.1f} ms -> "
                 f"{predicted['after']:.1f} ms predicted ({predicted['before'] / predicted['after']:.2f}x)"
                 if predicted else "")
        return (f"plan only: this plan gives a {_mb(report.bytes_after)} caffemodel ({report.ratio:.2f}x smaller)"
                f"{speed}; " + ("its fidelity verdict on the validation inputs is above; "
                                if report.contract else "") + "nothing written")
    if report.written:
        files = [f for f in (report.output_prototxt, report.output_caffemodel) if f]
        if report.output_onnx:
            files.append(f"{report.output_onnx} ({_mb(report.onnx_bytes)})")
        return "wrote " + " and ".join(files)
    return f"{report.note}; nothing written"


def _latency_input(latency: Mapping) -> str:
    """Where the latency was measured, when that is not the declared input shape (a fully convolutional net
    whose forward at the declared size is long is timed on a smaller input: its ratio there can differ)."""
    shown, declared = latency.get("input_shapes") or {}, latency.get("declared_shapes") or {}
    if not shown or all(list(v) == list(declared.get(k, v)) for k, v in shown.items()):
        return ""
    def shapes(by_input: Mapping) -> str:
        return ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in by_input.items())

    return (f" (on a smaller input than declared, {shapes(shown)}; declared: {shapes(declared)}; "
            "the ratio at another size can differ)")
