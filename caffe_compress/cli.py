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

PROG = "caffe-compress"

EPILOG = """\
exit codes: 0 ok, 2 usage error, 3 bad model input, 4 unreadable input,
5 cannot write output, 6 validation failed, 7 fetch failed, 70 internal error.

other command: caffe-compress fetch {gendernet,agenet} [--cache DIR]
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
    p.add_argument("--mean", metavar="B,G,R", help="per-channel mean subtracted from images (default 0)")
    p.add_argument("--scale", metavar="S", help="multiply images by S after the mean (default 1)")
    p.add_argument("--size", metavar="WxH", help="network input size for images (default: the net's)")
    p.add_argument("--resize", metavar="WxH", help="resize images to WxH, then centre-crop to --size")
    p.add_argument("--swap-rb", action="store_true", help="swap red and blue (images are read as BGR)")
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
    p.add_argument("--force", action="store_true", help="write the model even when nothing was compressed")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("-v", "--verbose", action="store_true", help="log details on stderr")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return p


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


def _run_fetch(argv: Sequence[str]) -> int:
    from . import zoo

    args = build_fetch_parser().parse_args(argv)
    _setup_logging(args.verbose)
    fetched = zoo.fetch(args.model, root=Path(args.cache) if args.cache else None)
    print(f"{fetched.name}: {fetched.deploy}")
    print(f"{fetched.name}: {fetched.weights}")
    return EXIT_OK


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format=f"{PROG}: %(message)s", stream=sys.stderr)


def _run_compress(argv: Sequence[str]) -> int:
    from .pipeline import DEFAULT_PROBES, DEFAULT_TRADEOFF, compress
    from .plan import check_tradeoff
    from .validate import Preprocessing

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
    pre = Preprocessing(
        size=_size(args.size, "--size") if args.size else None,
        resize=_size(args.resize, "--resize") if args.resize else None,
        mean=_floats(args.mean, "--mean") if args.mean else (0.0, 0.0, 0.0),
        scale=_floats(args.scale, "--scale")[0] if args.scale else 1.0,
        swap_rb=args.swap_rb,
    )
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
    show_progress = not args.quiet and sys.stderr.isatty()

    def progress(message: str) -> None:
        if show_progress:
            print(f"{PROG}: {message} ...", file=sys.stderr)

    report = compress(
        args.deploy, args.weights, tradeoff=tradeoff, output=args.output, ranks=ranks, forms=forms, keep=args.keep,
        validate_output=not args.no_validate, images=args.images, calibration=args.calibration,
        preprocessing=pre, probes=args.probes if args.probes is not None else DEFAULT_PROBES,
        seed=args.seed, fp16=args.fp16, outputs=kinds, min_fidelity=min_fidelity, force=args.force,
        objective=args.objective,
        progress=progress, report_path=args.json, format=args.format,
    )
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
