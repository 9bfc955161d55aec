"""Property: any mutation of a valid model gives either success or a clean, documented error."""
import contextlib
import io as stdio
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from caffe_compress import cli
from test_hostile import GOOD, good_weights
from nets import write_model

DOCUMENTED = {0, 2, 3, 4, 5, 6}

mutation = st.tuples(
    st.sampled_from(["prototxt", "caffemodel"]),
    st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=6),
    st.floats(0.5, 1.0),
)


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(mutation)
def test_mutated_model_gives_success_or_clean_error(tmp_path, case):
    target, edits, keep = case
    work = tmp_path / f"case{abs(hash(str(case))) % 10**8}"
    work.mkdir()
    deploy, weights = write_model(work, "m", GOOD, good_weights())
    path = deploy if target == "prototxt" else weights
    data = bytearray(path.read_bytes())
    for where, value in edits:
        data[int(where * len(data))] = value
    path.write_bytes(bytes(data[: max(1, int(len(data) * keep))]))
    original = (deploy.read_bytes(), weights.read_bytes())
    err = stdio.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(stdio.StringIO()):
        code = cli.main([str(deploy), str(weights), "--tradeoff", "0.5", "-o", str(work / "out"), "-q"])
    assert code in DOCUMENTED, err.getvalue()
    assert "Traceback" not in err.getvalue()
    assert (deploy.read_bytes(), weights.read_bytes()) == original
    produced = sorted(p for p in os.listdir(work) if p.startswith("out") or p.startswith(".out"))
    if code == 0:
        assert produced == ["out.caffemodel", "out.prototxt"]
    else:
        assert produced == [] and err.getvalue().startswith("caffe-compress: error: ")
        assert err.getvalue().count("\n") == 1
