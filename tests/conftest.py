import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def gendernet():
    """The authentic GenderNet, fetched once through the project's own fetch and cached."""
    from caffe_compress import zoo

    return zoo.fetch("gendernet")
