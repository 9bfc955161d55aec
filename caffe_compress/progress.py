"""How a run reports progress: phases with an optional item count, and one line per item.

The pipeline never prints: it calls a :class:`Progress` (the CLI draws it with rich in a terminal, or as
timestamped lines in logs). ``compress(progress=fn)`` also takes a plain callable of one-line messages.
"""
from __future__ import annotations

from typing import Callable


class Progress:
    """Receives a run's progress. The base class ignores everything."""

    def stage(self, name: str, total: int | None = None) -> None:
        """A new phase begins; ``total`` items when known (layers to analyse, to time, ...)."""

    def item(self, detail: str) -> None:
        """One item of the phase begins (``detail`` names it, e.g. the layer)."""

    def close(self, *, failed: bool = False) -> None:
        """The run is over (``failed``: it ends with an error, which the caller reports)."""


class MessageProgress(Progress):
    """A callable of one-line messages, called for every phase and item."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say

    def stage(self, name: str, total: int | None = None) -> None:
        self.say(name)

    def item(self, detail: str) -> None:
        self.say(detail)


def as_progress(progress) -> Progress:
    if progress is None:
        return Progress()
    if isinstance(progress, Progress):
        return progress
    if callable(progress):
        return MessageProgress(progress)
    raise TypeError(f"progress: expected a Progress or a callable, got {type(progress).__name__}")
