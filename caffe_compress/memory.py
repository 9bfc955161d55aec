"""This process's memory: its peak resident size, and handing freed heap back to the OS."""
from __future__ import annotations


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


def map_big_blocks() -> None:
    """Blocks of 8 MiB and more come from the OS and go back to it when freed (glibc: a fixed
    M_MMAP_THRESHOLD). glibc's default threshold rises with every big block freed, up to 32 MiB, so the
    OpenCV nets' and the factors' blobs that a round allocates and frees end up in the heap, which they
    fragment: GenderNet's peak read 385-417 MB with the default, 366-370 MB with this, at 0.2-0.3 s more
    (page faults; `--seed 2`, warm timing cache, 4 runs each). For the whole process, idempotent; glibc only."""
    _libc_call("mallopt", -3, BIG_BLOCK_BYTES)  # M_MMAP_THRESHOLD
