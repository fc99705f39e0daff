"""Protobuf by hand, for the hostile ONNX files that ``onnx.helper`` cannot write.

Shared by the ONNX tests: ``from tests import protobuf_bytes as pb``.
"""

from __future__ import annotations


def varint(value: int) -> bytes:
    """``value`` (>= 0) as a base-128 varint."""
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def key(number: int, wire: int) -> bytes:
    """The tag of field ``number`` with wire type ``wire``."""
    return varint(number << 3 | wire)


def ld(number: int, payload: bytes) -> bytes:
    """Field ``number`` as a length-delimited record (wire type 2)."""
    return key(number, 2) + varint(len(payload)) + payload


def varint_field(number: int, value: int) -> bytes:
    """Field ``number`` as a varint record (wire type 0)."""
    return key(number, 0) + varint(value)
