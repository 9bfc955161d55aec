#!/usr/bin/env python3
"""Write proto/opencv-caffe-reference.tsv: the Caffe schema that the installed OpenCV 4.x compiles in.

OpenCV's DNN module embeds the serialized descriptor of its ``opencv-caffe.proto`` in the cv2
binary. This tool finds it there, parses it with protobuf's FileDescriptorProto and writes one row
per message field (message, field, number, label, type, default). tests/test_schema.py compares
proto/caffe.proto field by field against this table. Run it after moving to a new OpenCV 4.x:

    python tools/opencv_schema.py            # rewrite the table from the installed cv2
    python tools/opencv_schema.py --check    # exit 1 when the table differs from the installed cv2
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TABLE = ROOT / "proto" / "opencv-caffe-reference.tsv"
sys.path.insert(0, str(ROOT))

from caffe_compress.schema import descriptor_rows, format_rows  # noqa: E402

MARKER = b"\n\x12opencv-caffe.proto\x12\x0copencv_caffe"


def opencv_descriptor():
    """The FileDescriptorProto of opencv-caffe.proto as compiled into the installed cv2."""
    import cv2
    from google.protobuf import descriptor_pb2
    from google.protobuf.message import DecodeError

    binaries = sorted(Path(cv2.__file__).parent.glob("cv2*.so")) + sorted(Path(cv2.__file__).parent.glob("cv2*.pyd"))
    for binary in binaries:
        data = binary.read_bytes()
        start = data.find(MARKER)
        if start < 0:
            continue
        # The serialized length is not stored next to it: take the longest prefix that parses.
        for length in range(min(200_000, len(data) - start), 1000, -1):
            fd = descriptor_pb2.FileDescriptorProto()
            try:
                fd.ParseFromString(data[start:start + length])
            except DecodeError:
                continue
            if fd.name == "opencv-caffe.proto" and fd.message_type:
                return fd, cv2.__version__
    raise SystemExit("no opencv-caffe.proto descriptor found in the installed cv2 binary")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    fd, version = opencv_descriptor()
    text = f"# opencv-caffe.proto as compiled into OpenCV {version}; written by tools/opencv_schema.py\n"
    text += format_rows(descriptor_rows(fd))
    if args.check:
        current = TABLE.read_text().split("\n", 1)[1] if TABLE.exists() else ""
        return 0 if current == text.split("\n", 1)[1] else 1
    TABLE.write_text(text)
    print(f"wrote {TABLE} (OpenCV {version})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
