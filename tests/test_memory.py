"""The process's memory policy (caffe_compress/memory.py): big freed blocks go back to the OS."""
import platform
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
