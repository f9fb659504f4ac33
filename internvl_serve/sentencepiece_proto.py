"""The one edit of a SentencePiece ModelProto (tokenizer.model) the tokenizer needs: legacy=False turns
the normalizer's add_dummy_prefix off, as transformers 4.37.2 does. Read and written at the protobuf wire
level, field by field (sentencepiece's own pb2 module wants a newer protobuf than Triton's client pins).
Does not parse anything else of the model.
"""
from __future__ import annotations

from typing import Iterator


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _fields(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(field number, wire type, raw bytes of the whole field) of a serialized protobuf message."""
    pos = 0
    while pos < len(data):
        start = pos
        key, pos = _varint(data, pos)
        wire = key & 7
        if wire == 0:
            _, pos = _varint(data, pos)
        elif wire == 1:
            pos += 8
        elif wire == 2:
            length, pos = _varint(data, pos)
            pos += length
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"tokenizer.model: unsupported protobuf wire type {wire}")
        yield key >> 3, wire, data[start:pos]


def without_dummy_prefix(model_proto: bytes) -> bytes:
    """ModelProto with normalizer_spec.add_dummy_prefix = false (what 4.37.2 does for legacy=False)."""
    out, found = bytearray(), False
    for number, wire, raw in _fields(model_proto):
        if number == 3 and wire == 2:  # ModelProto.normalizer_spec
            found = True
            _, pos = _varint(raw, 0)
            _, pos = _varint(raw, pos)
            spec = b"".join(r for n, _, r in _fields(raw[pos:]) if n != 3)  # drop add_dummy_prefix
            spec += bytes([3 << 3 | 0, 0])  # add_dummy_prefix (field 3, varint) = false
            raw = bytes([3 << 3 | 2]) + _encode_varint(len(spec)) + spec
        out += raw
    if not found:
        out += bytes([3 << 3 | 2, 2, 3 << 3 | 0, 0])
    return bytes(out)
