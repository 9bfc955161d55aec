"""This process's memory: its peak resident size, and handing freed heap back to the OS."""
from __future__ import annotations

from contextlib import contextmanager


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (0 where unknown).

    Linux: VmHWM of this program image. getrusage's ru_maxrss is avoided there
    because it also counts the parent's memory at fork time, before exec.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:  # not on POSIX
        return 0.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def release_memory() -> None:
    """Hand freed heap back to the OS between rounds (glibc keeps it otherwise, and the high-water mark
    creeps up round after round as big blobs are allocated and freed)."""
    import gc

    gc.collect()
    _libc_call("malloc_trim", 0)


def _libc_call(name: str, *args: int) -> None:
    """glibc's ``name(*args)``; nothing where the C library is not glibc."""
    import ctypes

    try:
        getattr(ctypes.CDLL("libc.so.6"), name)(*args)
    except (OSError, AttributeError):  # not glibc
        pass


def one_heap() -> None:
    """Threads started from now on allocate from the heaps that exist (glibc: M_ARENA_MAX 1), not from one new
    arena each: the analysis threads' own arenas kept ~35 MB of freed patches and factors that malloc_trim
    could not hand back, and GenderNet's peak rose from 329 to 363 MB. For the whole process and for good
    (glibc fixes the arena limit once it is first needed), idempotent; glibc only."""
    _libc_call("mallopt", -8, 1)  # M_ARENA_MAX


BIG_BLOCK_BYTES = 8 << 20
PASS_BLOCK_BYTES = 32 << 20  # glibc's largest mmap threshold
PASS_TRIM_BYTES = 64 << 20
DEFAULT_TRIM_BYTES = 128 << 10  # glibc's trim threshold once the mmap threshold is fixed
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_policy = {"mapped": False, "depth": 0}


def map_big_blocks() -> None:
    """Blocks of 8 MiB and more come from the OS and go back to it when freed (glibc: a fixed
    M_MMAP_THRESHOLD). glibc's default threshold rises with every big block freed, up to 32 MiB, so the
    OpenCV nets' and the factors' blobs that a round allocates and frees end up in the heap, which they
    fragment: GenderNet's peak read 385-417 MB with the default, 366-370 MB with this, at 0.2-0.3 s more
    (page faults; `--seed 2`, warm timing cache, 4 runs each). For the process until big_blocks_mapped's
    block ends (for good when called alone), idempotent; glibc only."""
    _set_thresholds(BIG_BLOCK_BYTES, DEFAULT_TRIM_BYTES)
    _policy["mapped"] = True


@contextmanager
def big_blocks_mapped():
    """map_big_blocks for the block (a compression); after it, blocks up to 32 MiB come from the heap and stay
    there (M_MMAP_THRESHOLD 32 MiB, M_TRIM_THRESHOLD 64 MiB), where glibc's own policy settles once big blocks
    have been freed -- glibc cannot go back to that adaptive policy once a threshold is set -- so the OpenCV
    passes a program runs after compress() are not slowed (heap_for_passes)."""
    map_big_blocks()
    try:
        yield
    finally:
        _policy["mapped"] = False
        _set_thresholds(PASS_BLOCK_BYTES, PASS_TRIM_BYTES)


def _set_thresholds(mmap_bytes: int, trim_bytes: int) -> None:
    _libc_call("mallopt", _M_MMAP_THRESHOLD, mmap_bytes)
    _libc_call("mallopt", _M_TRIM_THRESHOLD, trim_bytes)


@contextmanager
def heap_for_passes():
    """While OpenCV runs forward passes, blocks up to 32 MiB come from the heap and stay there between passes
    (glibc: M_MMAP_THRESHOLD 32 MiB, M_TRIM_THRESHOLD 64 MiB), the mapped policy restored after; nothing
    unless map_big_blocks is in force. OpenCV allocates and frees big temporaries in each pass (SRCNN's
    9 x 9 convolution at 256 px: tens of MB): mapped, each pass faulted them in afresh, and SRCNN's original
    read 35.7 ms with 1 thread instead of 29.4, its compressed model 36.6 ms instead of 25.2 -- the never-slower
    check and the planner's timings then saw a 1.16x-faster model as 0.98x. Nestable."""
    if not _policy["mapped"]:
        yield
        return
    if _policy["depth"] == 0:
        _set_thresholds(PASS_BLOCK_BYTES, PASS_TRIM_BYTES)
    _policy["depth"] += 1
    try:
        yield
    finally:
        _policy["depth"] -= 1
        if _policy["depth"] == 0 and _policy["mapped"]:  # (still inside the compression)
            _set_thresholds(BIG_BLOCK_BYTES, DEFAULT_TRIM_BYTES)
