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
