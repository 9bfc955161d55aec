import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a long end-to-end case (GenderNet-sized); `make test-slow` and CI "
                                       "run these, `make test` does not")


@pytest.fixture(scope="session")
def gendernet():
    """The authentic GenderNet, fetched once through the project's own fetch and cached."""
    from caffe_compress import zoo

    return zoo.fetch("gendernet")


# Tests measure their own timings: a timing cache shared with the user's runs (or between tests) would make
# a test's plan depend on what ran before it. The cache itself is tested with its own directory.
os.environ.setdefault("CAFFE_COMPRESS_TIMING_CACHE", "off")
