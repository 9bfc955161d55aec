"""Field tables of a protobuf schema, for comparing ours with the one OpenCV 4.x compiles in.

A row is (message, field, number, label, type, default); nested messages are dotted
(``PriorBoxParameter.CodeType`` is an enum, so only messages appear). Float defaults are
normalised to float32 so that ``1e-05`` and ``9.99999975e-06`` compare equal.
"""
from __future__ import annotations

import struct
from typing import Iterable

Row = tuple[str, str, int, str, str, str]


def _default(value: str, type_name: str) -> str:
    if value and type_name in ("float", "double"):
        try:
            return repr(struct.unpack("f", struct.pack("f", float(value)))[0])
        except (ValueError, OverflowError):
            return value
    return value


def descriptor_rows(file_descriptor_proto) -> list[Row]:
    """Rows of every field of every message in a FileDescriptorProto."""
    from google.protobuf import descriptor_pb2

    label_name = descriptor_pb2.FieldDescriptorProto.Label.Name
    type_name = descriptor_pb2.FieldDescriptorProto.Type.Name
    rows: list[Row] = []

    def walk(messages, prefix: str) -> None:
        for message in messages:
            name = prefix + message.name
            for f in message.field:
                kind = f.type_name.rsplit(".", 1)[-1] if f.type_name else type_name(f.type)[5:].lower()
                label = label_name(f.label)[6:].lower()
                rows.append((name, f.name, f.number, label, kind, _default(f.default_value, kind)))
            walk(message.nested_type, name + ".")

    walk(file_descriptor_proto.message_type, "")
    return sorted(rows)


def format_rows(rows: Iterable[Row]) -> str:
    lines = ["message\tfield\tnumber\tlabel\ttype\tdefault"]
    lines += ["\t".join(str(v) for v in row) for row in rows]
    return "\n".join(lines) + "\n"


def parse_rows(text: str) -> list[Row]:
    rows = []
    for line in text.splitlines()[1:]:
        if not line or line.startswith("#") or line.startswith("message\t"):
            continue
        m, f, n, label, kind, default = (line.split("\t") + [""])[:6]
        rows.append((m, f, int(n), label, kind, default))
    return sorted(rows)
