"""Running Nets in OpenCV: which blob value a name means, taps for the blobs OpenCV cannot name, chunked runs.

OpenCV names a blob by the layer that produced it; it cannot return the k-th top of a multi-top layer
("layer.k" is not resolved in 4.x), nor, sometimes, a convolution output it writes straight into a
Concat's buffer. A :class:`Source` says which value is wanted; :func:`with_taps` adds an identity layer
where a name is missing. Nets are run from scratch files (ASCII paths the tool owns).
"""
from __future__ import annotations

import os
import shutil

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Hashable, Mapping, Sequence

import numpy as np

from . import io, validate
from .errors import ValidationError, WriteError
from .net import Layer, Net

RUN_CHUNK = 8  # samples per step of a run (a stop is asked after each), and at most per OpenCV forward pass
# A forward pass runs fewer samples when one sample's largest blob is big: with the maps of 8 samples the
# layers no longer work in the cache (VDSR on 96 x 96 probes, 2.25 MB a map: 8 per pass cost 1.6-1.9x the
# time per sample of 1-2). The values are the same either way.
PASS_BYTES = 6 << 20
# A net with at most this many weight bytes is handed to OpenCV from memory; a bigger one is streamed to a
# scratch file (no second copy of its weights in memory).
MEMORY_LOAD_BYTES = 4 << 20


@dataclass(frozen=True)
class Source:
    """A blob value at one point of the graph: top ``index`` of layer ``layer`` (or a net input)."""

    layer: str
    index: int = 0
    is_input: bool = False


def blob_sources(net: Net) -> tuple[dict[str, Source], list[Source]]:
    """{layer: source of its first bottom} for every layer, and the sources of the compared outputs."""
    last: dict[str, Source] = {}
    first_input: dict[str, Source] = {}
    for layer in net.layers:
        if layer.bottoms and layer.bottoms[0] in last:
            first_input[layer.name] = last[layer.bottoms[0]]
        for k, top in enumerate(layer.tops):
            last[top] = Source(top, 0, True) if layer.type == "Input" else Source(layer.name, k)
    return first_input, [last[name] for name in compared_blobs(net)]


# Outputs whose shape depends on the values (a detection count): compare their inputs instead.
VALUE_SHAPED_TYPES = frozenset({"DetectionOutput"})


def compared_blobs(net: Net) -> list[str]:
    """The blobs on which original and compressed nets are compared: the net outputs,
    with a value-shaped output (DetectionOutput) replaced by its inputs."""
    producer = {}
    for layer in net.layers:
        for top in layer.tops:
            producer[top] = layer
    blobs: list[str] = []
    for name in net.output_names():
        layer = producer.get(name)
        if layer is not None and layer.type in VALUE_SHAPED_TYPES:
            blobs.extend(b for b in layer.bottoms if b not in blobs)
        elif name not in blobs:
            blobs.append(name)
    return blobs


def _tap_name(net: Net, source: Source) -> str:
    taken = {layer.name for layer in net.layers} | {t for layer in net.layers for t in layer.tops}
    name = f"{source.layer}__top{source.index}"
    while name in taken:
        name += "_"
    return name


def with_taps(net: Net, sources: Sequence[Source], *, every: bool = False) -> tuple[Net, dict[Source, str]]:
    """The net with an identity (Power) layer after every k > 0 top that is asked for.

    OpenCV 4.x cannot return the k-th top of a multi-top layer by name ("layer.k" is not resolved),
    so such a blob is copied by a layer of its own, right after its producer (before any in-place
    layer changes it). Other sources map to their producer's name.
    """
    names: dict[Source, str] = {}
    taps: dict[str, list[Layer]] = {}
    for s in dict.fromkeys(sources):
        if s.is_input or (s.index == 0 and not every):
            names[s] = s.layer
            continue
        producer = net.layer(s.layer)
        tap = _tap_name(net, s)
        taps.setdefault(s.layer, []).append(Layer(tap, "Power", (producer.tops[s.index],), (tap,)))
        names[s] = tap
    if not taps:
        return net, names
    layers: list[Layer] = []
    for layer in net.layers:
        layers.append(layer)
        layers.extend(taps.get(layer.name, ()))
    return replace(net, layers=tuple(layers)), names


def _pass_size(cv_net, inputs: Mapping[str, np.ndarray]) -> int:
    """Samples per OpenCV forward pass: RUN_CHUNK, or fewer (at least 2) when one sample's largest blob is
    big (PASS_BYTES); RUN_CHUNK for several inputs (their shapes' order is OpenCV's) or unknown shapes."""
    if len(inputs) != 1:
        return RUN_CHUNK
    (value,) = inputs.values()
    try:  # (OpenCV's shape inference: work the first forward pass then does not do again)
        _, _, outs = cv_net.getLayersShapes([(1, *(int(d) for d in value.shape[1:]))])
        largest = 4 * max(int(np.prod(shape)) for shapes in outs for shape in shapes)
    except Exception:  # noqa: BLE001 - an OpenCV without it, or a net it cannot infer: one pass per step
        return RUN_CHUNK
    return int(np.clip(PASS_BYTES // max(largest, 1), 2, RUN_CHUNK))


def _forward_step(cv_net, inputs: Mapping[str, np.ndarray], rows: slice | np.ndarray, passes: int, wanted, *,
                  what, error) -> dict:
    """The wanted blobs for the samples ``rows`` (a slice, or sample indices), ``passes`` samples per forward
    pass. A per-sample blob is joined across the passes; one that is not (a PriorBox's priors: the same for
    any batch, shape[0] not the pass's sample count) is the first pass's, as when the step runs in one pass."""
    count = rows.stop - rows.start if isinstance(rows, slice) else len(rows)
    if count <= passes:
        return validate.forward(cv_net, {k: v[rows] for k, v in inputs.items()}, wanted, what=what, error=error)
    cuts = [slice(rows.start + i, min(rows.start + i + passes, rows.stop)) if isinstance(rows, slice)
            else rows[i:i + passes] for i in range(0, count, passes)]
    parts = [validate.forward(cv_net, {k: v[cut] for k, v in inputs.items()}, wanted, what=what, error=error)
             for cut in cuts]
    return {k: np.concatenate([p[k] for p in parts]) if parts[0][k].shape[:1] == (passes,) else parts[0][k]
            for k in wanted}


class OpenCVRunner:
    """Runs Nets in OpenCV through scratch files (ASCII paths we own); one network alive at a time."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self._keep: Net | None = None  # the net whose OpenCV network stays loaded between runs
        self._kept = None

    def keep(self, net: Net) -> None:
        """Keep ``net`` loaded once it has run (the original, run several times while the inputs are
        probed), until :meth:`forget`: each load writes and parses the whole model again."""
        self.forget()
        self._keep = net

    def forget(self) -> None:
        self._keep = self._kept = None

    def load_kept(self, net: Net, *, what: str, error=ValidationError):
        """The kept network when ``net`` is the one to keep (loaded on first use), else a fresh load."""
        if self._kept is not None and net is self._keep:
            return self._kept
        cv_net = self.load(net, what=what, error=error)
        if net is self._keep:
            self._kept = cv_net
        return cv_net

    def load(self, net: Net, *, what: str, error=ValidationError):
        if sum(layer.weight_bytes for layer in net.layers) <= MEMORY_LOAD_BYTES:
            # (a timing's one-layer net: writing two scratch files cost 10x what serialising it does)
            weights = b"".join(io.caffemodel_chunks(net))
            return validate.load_opencv_net(io.prototxt_bytes(net), weights, what=what, error=error)
        proto, weights = self.scratch / "m.prototxt", self.scratch / "m.caffemodel"
        try:
            io.write_files(net, proto, weights)
        except OSError as exc:  # a full TMPDIR, ulimit -f: the user's environment, not a bug
            weights.unlink(missing_ok=True)
            raise WriteError(f"scratch directory {self.scratch}: cannot write: {exc.strerror} "
                             "(set TMPDIR to a directory with space)") from None
        try:
            return validate.load_opencv_net(proto, weights, what=what, error=error)
        finally:
            weights.unlink(missing_ok=True)

    def load_files(self, files: tuple[Path, Path], *, what: str, error=ValidationError):
        """OpenCV reads a pair we wrote through ASCII names in the scratch directory (hard links, or copies
        across file systems): no user file name ever reaches it."""
        targets = (self.scratch / "staged.prototxt", self.scratch / "staged.caffemodel")
        for src, dst in zip(files, targets):
            dst.unlink(missing_ok=True)
            try:
                os.link(src, dst)
            except OSError:
                try:
                    shutil.copyfile(src, dst)
                except OSError as exc:
                    raise WriteError(f"scratch directory {self.scratch}: cannot write: {exc.strerror}") from None
        try:
            return validate.load_opencv_net(*targets, what=what, error=error)
        finally:
            for dst in targets:
                dst.unlink(missing_ok=True)

    def run(self, net: Net, inputs: Mapping[str, np.ndarray], sources: Sequence[Hashable], *,
            what: str = "model", error=ValidationError, files: tuple[Path, Path] | None = None,
            stop: Callable[[dict, int], bool] | None = None, order: np.ndarray | None = None) -> dict:
        """{source: array} of ``sources`` for ``inputs``; ``files``: run these (the staged pair) instead.

        stop : called after each chunk with the values so far and their sample count; True ends the run
            there (the values then cover only the first samples).
        order : run these samples, in this order (the values come back in it); the inputs are not copied.
        """
        try:
            return self._run(net, inputs, sources, what=what, error=error, files=files, every=False, stop=stop,
                             order=order)
        except error:
            # OpenCV cannot return some layer outputs by name (a convolution whose output it writes
            # straight into a Concat's buffer): copy every asked-for blob with a layer of its own.
            return self._run(net, inputs, sources, what=what, error=error, files=None, every=True, stop=stop,
                             order=order)

    def _run(self, net, inputs, sources, *, what, error, files, every, stop=None, order=None) -> dict:
        tapped, names = with_taps(net, list(sources), every=every)
        if files is not None and tapped is net:
            cv_net = self.load_files(files, what=what, error=error)
        else:
            cv_net = self.load_kept(tapped, what=what, error=error)
        wanted = list(dict.fromkeys(names[s] for s in sources if not s.is_input))
        values: dict = {}
        count = (len(order) if order is not None else next(iter(inputs.values())).shape[0]) if inputs else 0
        passes = _pass_size(cv_net, inputs) if wanted and count > 1 else RUN_CHUNK
        for start in range(0, count, RUN_CHUNK) if wanted else ():
            # in chunks: OpenCV keeps every intermediate blob of a batch alive (peak memory)
            done = min(start + RUN_CHUNK, count)
            step = slice(start, done) if order is None else order[start:done]
            part = _forward_step(cv_net, inputs, step, passes, wanted, what=what, error=error)
            for k, v in part.items():
                values.setdefault(k, []).append(v)
            if stop is not None and done < count and stop(self._gather(inputs, sources, names, values, done,
                                                                       order), done):
                break
        del cv_net
        return self._gather(inputs, sources, names, values, None, order)

    @staticmethod
    def _gather(inputs, sources, names, parts, done, order) -> dict:
        joined = {k: np.concatenate(v, axis=0) if len(v) > 1 else v[0] for k, v in parts.items()}
        rows = slice(None, done) if order is None else order[:done]
        return {s: (np.asarray(inputs[s.layer][rows], dtype=np.float32) if s.is_input else joined[names[s]])
                for s in sources}


