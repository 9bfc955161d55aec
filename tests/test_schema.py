"""proto/caffe.proto against the schema OpenCV 4.x compiles in (proto/opencv-caffe-reference.tsv).

Every message, field number, label, type and default must match, except the differences
listed here with their reasons.
"""
from pathlib import Path

from google.protobuf import descriptor_pb2

from caffe_compress._proto import caffe_pb2
from caffe_compress.schema import descriptor_rows, parse_rows

TABLE = Path(__file__).resolve().parent.parent / "proto" / "opencv-caffe-reference.tsv"

# Messages OpenCV declares that we leave out on purpose, and why.
ONLY_IN_OPENCV = {
    "SolverParameter": "training-solver configuration: never part of a deploy prototxt or caffemodel",
}
# Messages we declare that OpenCV does not, and why.
ONLY_IN_OURS: dict[str, str] = {}


def _ours():
    fd = descriptor_pb2.FileDescriptorProto()
    caffe_pb2.DESCRIPTOR.CopyToProto(fd)
    return descriptor_rows(fd)


def _by_field(rows):
    return {(r[0], r[1]): r[2:] for r in rows}


def test_every_field_matches_opencv():
    reference = _by_field(parse_rows(TABLE.read_text()))
    ours = _by_field(_ours())
    mismatches = []
    for key in sorted(set(reference) | set(ours)):
        message = key[0].split(".")[0]
        if key not in ours and message in ONLY_IN_OPENCV:
            continue
        if key not in reference and message in ONLY_IN_OURS:
            continue
        if reference.get(key) != ours.get(key):
            mismatches.append(f"{key[0]}.{key[1]}: opencv {reference.get(key)} ours {ours.get(key)}")
    assert not mismatches, "\n".join(mismatches)


def test_listed_differences_are_real():
    reference_messages = {r[0] for r in parse_rows(TABLE.read_text())}
    our_messages = {r[0] for r in _ours()}
    for message in ONLY_IN_OPENCV:
        assert message in reference_messages and message not in our_messages
    for message in ONLY_IN_OURS:
        assert message in our_messages and message not in reference_messages


def test_multi_size_prior_box_and_detection_clip_parse():
    from caffe_compress import io

    text = b"""
    layer { name: "p" type: "PriorBox" bottom: "a" bottom: "b" top: "p"
      prior_box_param { min_size: 10 min_size: 16 min_size: 24 max_size: 32 max_size: 48 clip: false } }
    layer { name: "d" type: "DetectionOutput" bottom: "x" bottom: "y" bottom: "p" top: "d"
      detection_output_param { num_classes: 2 clip: true } }
    """
    msg = io.parse_prototxt(text, "t.prototxt")
    assert list(msg.layer[0].prior_box_param.min_size) == [10, 16, 24]
    assert msg.layer[1].detection_output_param.clip is True
