#!/usr/bin/env python3
"""Regenerate caffe_compress/_proto/caffe_pb2.py from proto/caffe.proto.

Needs grpcio-tools (``pip install -e .[dev]``). The generated module is
post-processed to drop protoc's runtime-version guard, so the package works
with any protobuf runtime >= 3.20 (the builder API), not only the one that
generated it. ``--check`` exits 1 when the committed module describes another schema than the .proto.
"""
from __future__ import annotations

import argparse
import ast
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto" / "caffe.proto"
TARGET = ROOT / "caffe_compress" / "_proto" / "caffe_pb2.py"

_VERSION_GUARD = re.compile(
    r"from google\.protobuf import runtime_version as _runtime_version\n"
    r"|_runtime_version\.ValidateProtobufRuntimeVersion\([^)]*\)\n",
    re.S,
)


def generate() -> str:
    """Return the text of the generated module."""
    from grpc_tools import protoc  # maintainer-only dependency

    with tempfile.TemporaryDirectory() as out:
        rc = protoc.main(["protoc", f"-I{ROOT}", f"--python_out={out}", str(PROTO.relative_to(ROOT))])
        if rc != 0:
            raise SystemExit(f"protoc failed with exit code {rc}")
        text = (Path(out) / "proto" / "caffe_pb2.py").read_text()
    text = _VERSION_GUARD.sub("", text)
    text = re.sub(r"# Protobuf Python Version: .*\n", "", text)
    return text


def serialized_descriptor(text: str) -> bytes:
    """The FileDescriptorProto a generated module registers (its AddSerializedFile literal): what the module
    means, whatever version of protoc wrote the code around it."""
    found = re.search(r"AddSerializedFile\((b'(?:[^'\\]|\\.)*')\)", text)
    if found is None:
        raise SystemExit("no AddSerializedFile(...) in the generated module")
    return ast.literal_eval(found.group(1))


def in_sync(current: str, generated: str) -> bool:
    """The committed module describes the same schema as the .proto (text differences of protoc versions,
    such as header comments, do not count)."""
    return bool(current) and serialized_descriptor(current) == serialized_descriptor(generated)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when stale")
    args = parser.parse_args()
    text = generate()
    if args.check:
        current = TARGET.read_text() if TARGET.exists() else ""
        if not in_sync(current, text):
            print(f"{TARGET.relative_to(ROOT)} is stale: run tools/gen_proto.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    print(f"wrote {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
