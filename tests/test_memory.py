"""The process's memory policy (caffe_compress/memory.py): big freed blocks go back to the OS."""
import platform
from pathlib import Path
import subprocess
import sys

import pytest

# Allocate and free a 24 MiB block twice, then allocate and free a third and print how much
# of it left the process (VmRSS, MB).
# glibc's default raises its mmap threshold to a freed mapped block's size, so the second block comes
# from the heap, and a freed heap top under the trim threshold (twice the mmap threshold) stays resident.
SCRIPT = """
import sys
import numpy as np
from caffe_compress import memory

def rss():
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) for l in fh if l.startswith("VmRSS:")) / 1024.0

if sys.argv[1] == "mapped":
    memory.map_big_blocks()
for _ in range(2):
    block = np.ones(6 << 20, dtype=np.float32)
    del block
block = np.ones(6 << 20, dtype=np.float32)
during = rss()
del block
print(during - rss())
"""


def _freed_mb(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True).stdout
    return float(out)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_big_blocks_go_back_to_the_os_when_freed():
    assert _freed_mb("mapped") > 20  # the 24 MiB block left the process
    assert _freed_mb("default") < 4  # and glibc's default kept it: the policy is what returns it


# Allocate, touch and free a 24 MiB block 8 times (as an OpenCV pass does with its temporaries), with or
# without heap_for_passes, under the mapped policy; print the minor page faults of the last 7 rounds and whether a big block allocated after the passes is mapped again (it leaves when freed).
PASSES = """
import resource, sys
import numpy as np
from caffe_compress import memory

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def rss():
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) for l in fh if l.startswith("VmRSS:")) / 1024.0

memory.map_big_blocks()

def passes():
    for i in range(8):
        if i == 1:
            start = faults()
        block = np.ones(6 << 20, dtype=np.float32)
        del block
    return faults() - start

if sys.argv[1] == "heap":
    with memory.heap_for_passes():
        faulted = passes()
else:
    faulted = passes()
memory.release_memory()
block = np.ones(6 << 20, dtype=np.float32)
during = rss()
del block
print(faulted, during - rss())
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_passes_keep_their_temporaries_in_the_heap_and_the_mapped_policy_returns_after():
    def run(mode):
        out = subprocess.run([sys.executable, "-c", PASSES, mode], capture_output=True, text=True, check=True)
        return [float(v) for v in out.stdout.split()]

    mapped_faults, _ = run("mapped")
    heap_faults, freed_after = run("heap")
    # each pass faulted its 24 MiB in afresh (at least 12 faults a pass, even with 2 MiB pages)
    assert mapped_faults >= 7 * 12
    assert heap_faults < 12  # kept in the heap between passes
    assert freed_after > 20  # and after them a big block is mapped (and leaves) again


# compress() maps big blocks while it runs, and leaves the process with blocks up to 32 MiB in the heap: a
# program's own OpenCV passes after it are not slowed. Print the faults of 7 passes after a compression.
AFTER = """
import resource, sys, tempfile
from pathlib import Path
import numpy as np
sys.path.insert(0, sys.argv[1])
from caffe_compress import pipeline
from test_tradeoff import small_model

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

tmp = Path(tempfile.mkdtemp())
deploy, model = small_model(tmp)
pipeline.compress(deploy, model, tradeoff=0.95, output=tmp / "o", objective="size")
for i in range(8):
    if i == 1:
        start = faults()
    block = np.ones(6 << 20, dtype=np.float32)
    del block
print(faults() - start)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_the_mapped_policy_ends_with_the_compression():
    tests = str(Path(__file__).resolve().parent)
    out = subprocess.run([sys.executable, "-c", AFTER, tests], capture_output=True, text=True, check=True).stdout
    assert int(out.split()[-1]) < 12
