"""Command line: argument parsing, printing and exit codes. The only module that prints."""
from __future__ import annotations

import argparse
import logging
import math
import sys
import traceback
from pathlib import Path
from typing import Sequence

from . import __version__
from .errors import EXIT_INTERNAL, EXIT_OK, CaffeCompressError, UsageError
from .progress import Progress

PROG = "caffe-compress"

EPILOG = """\
exit codes: 0 ok, 2 usage error, 3 bad model input, 4 unreadable input,
5 cannot write output, 6 validation failed, 7 fetch failed,
8 ONNX export failed (the Caffe pair was written), 70 internal error.

other commands:
  caffe-compress plan DEPLOY WEIGHTS [options]    the same as --plan-only
  caffe-compress evaluate DEPLOY WEIGHTS --images DIR --labels SPEC [...]
                                                  top-1 accuracy of a classifier in OpenCV
  caffe-compress fetch {gendernet,agenet} [--cache DIR]
                                                  download a reference model (sha256-checked)
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        raise UsageError(message)


def _rank_option(text: str) -> tuple[str, int]:
    name, sep, value = text.rpartition("=")
    if not sep or not name:
        raise UsageError(f"--rank: '{text}' is not LAYER=R")
    try:
        rank = int(value)
    except ValueError:
        raise UsageError(f"--rank: '{value}' in '{text}' is not an integer") from None
    if rank < 1:
        raise UsageError(f"--rank: rank {rank} for layer '{name}' must be >= 1")
    return name, rank


def _floats(text: str, option: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.replace(",", " ").split())
    except ValueError:
        raise UsageError(f"{option}: '{text}' is not a list of numbers") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise UsageError(f"{option}: '{text}' is not a list of finite numbers")
    return values


def _size(text: str, option: str) -> tuple[int, int]:
    parts = text.lower().replace("x", " ").replace(",", " ").split()
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        raise UsageError(f"{option}: '{text}' is not W or WxH") from None
    if len(dims) == 1:
        dims = dims * 2
    if len(dims) != 2 or min(dims) < 1:
        raise UsageError(f"{option}: '{text}' is not W or WxH with positive sizes")
    return dims  # type: ignore[return-value]


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Compress a Caffe model (deploy.prototxt + weights.caffemodel) by SVD and CP decomposition.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("deploy", help="deploy prototxt (V0, V1 or V2)")
    p.add_argument("weights", help="trained caffemodel")
    p.add_argument("-o", "--output", metavar="PREFIX",
                   help="write PREFIX.prototxt and PREFIX.caffemodel (default: <weights-stem>-compressed)")
    p.add_argument("-t", "--tradeoff", default=None, metavar="T",
                   help="size/accuracy trade-off in [0, 1]: 0 lossless, 1 smallest "
                        "(default 0.95; 0 when --rank is given)")
    p.add_argument("--rank", action="append", default=[], metavar="LAYER=R", help="force a rank (repeatable)")
    p.add_argument("--form", dest="forms", action="append", default=[], metavar="LAYER=FORM",
                   help="factor LAYER only in FORM: cp, tucker2 or spatial-svd for a k x k convolution "
                        "(default: the fastest at equal error, measured); repeatable")
    p.add_argument("--keep", action="append", default=[], metavar="LAYER", help="never touch LAYER (repeatable)")
    p.add_argument("--no-validate", action="store_true", help="skip the OpenCV comparison")
    p.add_argument("--images", metavar="DIR", help="validate on images from DIR instead of random probes")
    p.add_argument("--calibration", metavar="DIR", help="choose ranks from activations of images in DIR")
    _label_options(p, required=False)
    _preprocessing_options(p)
    p.add_argument("--probes", type=int, default=None, metavar="N", help="natural-image probe inputs for planning (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed for probes and CP (default 0)")
    storage = p.add_mutually_exclusive_group()
    storage.add_argument("--fp16", dest="fp16", action="store_const", const=True, default=None,
                         help="store weights as half floats: half the file, OpenCV converts at load")
    storage.add_argument("--fp32", dest="fp16", action="store_const", const=False,
                         help="store weights as float32 (default: keep the input's storage)")
    p.add_argument("--kind", dest="kinds", action="append", default=[], metavar="NAME=KIND",
                   help="judge output NAME as KIND (class, scores, boxes, embedding, image, dense); repeatable")
    p.add_argument("--min-fidelity", metavar="T", default=None,
                   help="hold the fidelity targets of trade-off T (tighter than --tradeoff's)")
    p.add_argument("--objective", choices=["balanced", "speed", "size"], default="balanced",
                   help="balanced (default): never slower than the original in OpenCV on this machine; "
                        "speed: factored layers must be 1.1x faster; size: no speed checks")
    p.add_argument("--format", choices=["caffe", "onnx", "both"], default="caffe",
                   help="caffe (default): PREFIX.prototxt + PREFIX.caffemodel; onnx: PREFIX.onnx for OpenCV 5 / "
                        "onnxruntime (needs caffe-compress[onnx]); both")
    p.add_argument("--plan-only", action="store_true",
                   help="show (and with --json write) the plan -- layers, forms, ranks, size, predicted speed, "
                        "fidelity -- without writing any model")
    p.add_argument("--retime", action="store_true",
                   help="measure every OpenCV timing again (default: reuse this machine's timing cache)")
    p.add_argument("--force", action="store_true", help="write the model even when nothing was compressed")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("-v", "--verbose", action="store_true", help="log details on stderr")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return p


def _preprocessing_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mean", metavar="B,G,R", help="per-channel mean subtracted from images (default 0)")
    p.add_argument("--scale", metavar="S", help="multiply images by S after the mean (default 1)")
    p.add_argument("--size", metavar="WxH", help="network input size for images (default: the net's)")
    p.add_argument("--resize", metavar="WxH", help="resize images to WxH, then centre-crop to --size")
    p.add_argument("--swap-rb", action="store_true", help="swap red and blue (images are read as BGR)")


def _label_options(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument("--labels", metavar="SPEC", required=required,
                   help="labels of the --images: folder (a sub-folder per class), csv:FILE (rows image,label) or "
                        "regex:PATTERN (the label is the pattern's first group in each file name)"
                        + ("" if required else "; the report then gives both models' top-1 accuracy"))
    p.add_argument("--classes", metavar="A,B,...", help="class names in the network's output order (for named "
                                                        "labels; default: labels are output indices)")


def _preprocessing(args):
    from .validate import Preprocessing

    return Preprocessing(
        size=_size(args.size, "--size") if args.size else None,
        resize=_size(args.resize, "--resize") if args.resize else None,
        mean=_floats(args.mean, "--mean") if args.mean else (0.0, 0.0, 0.0),
        scale=_floats(args.scale, "--scale")[0] if args.scale else 1.0,
        swap_rb=args.swap_rb,
    )


def build_evaluate_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=f"{PROG} evaluate", description="Top-1 accuracy of a Caffe classifier (in OpenCV 4.x) on "
                                                      "labelled images.")
    p.add_argument("deploy", help="deploy prototxt")
    p.add_argument("weights", help="caffemodel")
    p.add_argument("--images", metavar="DIR", required=True, help="the images (searched recursively)")
    _label_options(p, required=True)
    _preprocessing_options(p)
    p.add_argument("--output", metavar="BLOB", help="the output to score (default: the net's only output)")
    p.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--debug", action="store_true")
    return p


def _run_evaluate(argv: Sequence[str]) -> int:
    import json

    from . import evaluate, io

    args = build_evaluate_parser().parse_args(argv)
    _setup_logging(args.verbose)
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    labelled = evaluate.read_labels(Path(args.images), args.labels, classes=classes)
    if args.json:
        io.check_report_path(args.json, inputs=(args.deploy, args.weights), outputs=())
    result = evaluate.accuracy_of_files(Path(args.deploy), Path(args.weights), labelled, _preprocessing(args),
                                        output=args.output)
    print(result.line(f"{args.weights}: "))
    if args.json:
        data = {"deploy": args.deploy, "weights": args.weights, "images": args.images, "labels": args.labels,
                "output": result.output, "count": result.images, "top1_accuracy": result.top1}
        io.write_atomically(Path(args.json), (json.dumps(data, indent=2) + "\n").encode())
    return EXIT_OK


def build_fetch_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=f"{PROG} fetch", description="Download a known model into the cache and verify it.")
    p.add_argument("model", choices=["gendernet", "agenet"])
    p.add_argument("--cache", metavar="DIR", help="cache directory (default $CAFFE_COMPRESS_CACHE or ~/.cache/caffe-compress)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--debug", action="store_true")
    return p


def _error(message: str) -> None:
    """One line on stderr: control characters in names or paths (a newline, say) are escaped."""
    text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in message)
    try:
        print(f"{PROG}: error: {text}", file=sys.stderr)
    except (OSError, ValueError):  # stderr closed or full: nothing more can be said
        pass


class Terminated(BaseException):
    """SIGTERM or SIGHUP: unwinds like KeyboardInterrupt, so every temp file and scratch directory goes."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum, frame):
    raise Terminated(signum)


def _install_signal_handlers() -> None:
    import signal

    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _raise_terminated)


def ignore_termination() -> None:
    """From here on SIGINT/SIGTERM/SIGHUP are ignored: the run's outcome is settled (its files published or
    nothing written), so a late signal may neither report "nothing published" nor kill the exiting process
    (the interpreter resets Python-level handlers to the default while it shuts down)."""
    import signal

    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


def _run_fetch(argv: Sequence[str]) -> int:
    from . import zoo

    args = build_fetch_parser().parse_args(argv)
    _setup_logging(args.verbose)
    fetched = zoo.fetch(args.model, root=Path(args.cache) if args.cache else None)
    print(f"{fetched.name}: {fetched.deploy}")
    print(f"{fetched.name}: {fetched.weights}")
    return EXIT_OK


class _CurrentStderr:
    """Whatever sys.stderr is now (rich swaps it while a progress display is live)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format=f"{PROG}: %(message)s", stream=_CurrentStderr())


def _progress_display(*, quiet: bool, verbose: bool):
    """-q: nothing; a terminal: a rich progress display; otherwise timestamped lines (logs, make, CI)."""
    if quiet:
        return Progress()
    if sys.stderr.isatty():
        try:
            return _RichProgress(verbose=verbose)
        except ImportError:  # rich is a dependency; a broken install still gets plain lines
            pass
    return _LineProgress(verbose=verbose)


class _LineProgress(Progress):
    """Timestamped lines on stderr for logs, make and CI: one as each stage ends (with its duration), and
    while a stage runs, a line about its current item every LINE_EVERY_S seconds (every item with -v). A
    run that fails in its first stage (most user errors) prints only its error line."""

    LINE_EVERY_S = 10.0

    def __init__(self, *, verbose: bool) -> None:
        import time

        self.clock, self.verbose = time.monotonic, verbose
        self.started = self.clock()
        self.name, self.total, self.count, self.stage_start, self.last = "", None, 0, self.started, 0.0

    def _line(self, text: str) -> None:
        import time

        try:
            print(f"{time.strftime('%H:%M:%S')} {PROG}: {text}", file=sys.stderr, flush=True)
        except (OSError, ValueError):
            pass

    def _end_stage(self) -> None:
        if self.name:
            count = f" ({min(self.count, self.total)}/{self.total})" if self.total else ""
            self._line(f"{self.name}{count}: {self.clock() - self.stage_start:.1f} s; "
                       f"{self.clock() - self.started:.0f} s elapsed")

    def stage(self, name: str, total: int | None = None) -> None:
        self._end_stage()
        self.name, self.total, self.count = name, total, 0
        self.stage_start = self.last = self.clock()

    def item(self, detail: str) -> None:
        self.count += 1
        now = self.clock()
        if not self.verbose and now - self.last < self.LINE_EVERY_S:
            return
        self.last = now
        where = f" {min(self.count, self.total)}/{self.total}" if self.total else ""
        eta = ""
        if self.total and 1 < self.count <= self.total:
            per = (now - self.stage_start) / (self.count - 1)
            eta = f", about {per * (self.total - self.count + 1):.0f} s left in this stage"
        self._line(f"{self.name}{where}: {detail}; {now - self.started:.0f} s elapsed{eta}")

    def close(self, *, failed: bool = False) -> None:
        if not failed:
            self._end_stage()
            self._line(f"done in {self.clock() - self.started:.1f} s")


class _RichProgress(Progress):
    """rich's live display: the stage, a bar with n/N, elapsed time and an estimate of the time left."""

    def __init__(self, *, verbose: bool, console=None) -> None:
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self.console = console or Console(stderr=True)
        self.verbose = verbose
        self.bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("elapsed"), TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(),
                            TextColumn("[dim]{task.fields[detail]}"), console=self.console)
        self.task = None
        self.bar.start()

    def _finish(self) -> None:
        if self.task is not None:
            task = self.bar.tasks[-1]
            self.bar.update(self.task, total=task.total or max(task.completed, 1),
                            completed=task.total or max(task.completed, 1), detail="")

    def stage(self, name: str, total: int | None = None) -> None:
        self._finish()
        self.task = self.bar.add_task(name, total=total, detail="")

    def item(self, detail: str) -> None:
        if self.task is None:
            self.stage("working")
        task = self.bar.tasks[-1]
        if task.total is None:  # no count to show: the item's name only
            self.bar.update(self.task, detail=detail)
        else:  # the item begins: the ones before it are done
            completed = task.completed + (1 if task.fields.get("detail") else 0)
            self.bar.update(self.task, completed=min(completed, task.total - 1 if task.total else 0), detail=detail)
        if self.verbose:
            self.console.log(detail)

    def close(self, *, failed: bool = False) -> None:
        if not failed:
            self._finish()
        self.bar.stop()


def _run_compress(argv: Sequence[str]) -> int:
    from .pipeline import DEFAULT_PROBES, DEFAULT_TRADEOFF, compress
    from .plan import check_tradeoff

    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    ranks: dict[str, int] = {}
    for text in args.rank:
        name, rank = _rank_option(text)
        if name in ranks:
            raise UsageError(f"--rank: layer '{name}' is given twice")
        ranks[name] = rank
    # --rank alone factors just those layers; with --tradeoff the planner also handles the rest.
    default = 0.0 if ranks else DEFAULT_TRADEOFF
    tradeoff = check_tradeoff(args.tradeoff) if args.tradeoff is not None else default
    pre = _preprocessing(args)
    forms: dict[str, str] = {}
    for text in args.forms:
        name, sep, form = text.rpartition("=")
        if not sep or not name:
            raise UsageError(f"--form: '{text}' is not LAYER=FORM")
        if name in forms:
            raise UsageError(f"--form: layer '{name}' is given twice")
        forms[name] = form
    kinds: dict[str, str] = {}
    for text in args.kinds:
        name, sep, kind = text.rpartition("=")
        if not sep or not name:
            raise UsageError(f"--kind: '{text}' is not NAME=KIND")
        kinds[name] = kind
    min_fidelity = check_tradeoff(args.min_fidelity, option="--min-fidelity") if args.min_fidelity is not None else None
    progress = _progress_display(quiet=args.quiet, verbose=args.verbose)
    import gc

    gc.freeze()  # (what is loaded by now lives as long as the run: the collections between stages skip it)
    report = compress(
        args.deploy, args.weights, tradeoff=tradeoff, output=args.output, ranks=ranks, forms=forms, keep=args.keep,
        validate_output=not args.no_validate, images=args.images, calibration=args.calibration,
        preprocessing=pre, probes=args.probes if args.probes is not None else DEFAULT_PROBES,
        seed=args.seed, fp16=args.fp16, outputs=kinds, min_fidelity=min_fidelity, force=args.force,
        objective=args.objective,
        progress=progress, report_path=args.json, format=args.format, plan_only=args.plan_only, retime=args.retime,
        labels=args.labels, classes=[c.strip() for c in args.classes.split(",")] if args.classes else None,
    )
    ignore_termination()  # published (or nothing to publish): only the report is left to print
    from .report import format_table

    try:
        print(format_table(report))
        sys.stdout.flush()
    except (OSError, ValueError) as exc:  # stdout closed or full (| true, > /dev/full)
        _quiet_stdout()
        from .errors import EXIT_CANNOT_WRITE

        done = f"the model was written to {report.output_prototxt}" if report.written else "nothing was written"
        _error(f"stdout: cannot print the report ({getattr(exc, 'strerror', None) or exc}); {done}")
        return EXIT_CANNOT_WRITE
    return EXIT_OK


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush does not fail again."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    _install_signal_handlers()
    try:
        if argv and argv[0] == "fetch":
            return _run_fetch(argv[1:])
        if argv and argv[0] == "evaluate":
            return _run_evaluate(argv[1:])
        if argv and argv[0] == "plan":  # caffe-compress plan DEPLOY WEIGHTS ... = --plan-only
            return _run_compress([*argv[1:], "--plan-only"])
        return _run_compress(argv)
    except CaffeCompressError as exc:
        if debug:
            traceback.print_exc()
        _error(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        _error("interrupted (SIGINT); temp files removed, nothing published")
        return 130
    except Terminated as exc:
        import signal

        _error(f"terminated ({signal.Signals(exc.signum).name}); temp files removed, nothing published")
        return 128 + exc.signum
    except MemoryError:
        _error("out of memory")
        return EXIT_INTERNAL
    except Exception as exc:  # noqa: BLE001 - last line of defence: one line, no traceback
        if debug:
            traceback.print_exc()
        _error(f"internal error: {type(exc).__name__}: {exc} (please report; rerun with --debug for details)")
        return EXIT_INTERNAL
