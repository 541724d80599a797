"""Canonical binary encoding for protocol messages and configuration: fixed-width big-endian
integers, length-prefixed byte strings and lists, nothing else.

Rule: exactly one byte string per value and back; a reader that runs out of bytes, finds a
length over its limit, or has bytes left over raises `MalformedMessage`. No pickle, no JSON.
"""

from __future__ import annotations

import struct

from secagg.errors import MalformedMessage

MAX_FIELD_BYTES = 1 << 24
MAX_LIST_ITEMS = 1 << 16


class Writer:
    """Appends fields to one growing buffer."""

    __slots__ = ("_parts",)

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def _pack(self, fmt: str, v: float) -> Writer:
        self._parts.append(struct.pack(fmt, v))
        return self

    def u8(self, v: int) -> Writer:
        return self._pack(">B", v)

    def u32(self, v: int) -> Writer:
        return self._pack(">I", v)

    def u64(self, v: int) -> Writer:
        return self._pack(">Q", v)

    def f64(self, v: float) -> Writer:
        return self._pack(">d", v)

    def fixed(self, data: bytes, size: int) -> Writer:
        if len(data) != size:
            raise ValueError(f"field must be {size} bytes, got {len(data)}")
        self._parts.append(data)
        return self

    def blob(self, data: bytes) -> Writer:
        self._parts.append(struct.pack(">I", len(data)) + data)
        return self

    def text(self, s: str) -> Writer:
        return self.blob(s.encode("utf-8"))

    def bytes(self) -> bytes:
        return b"".join(self._parts)


class Reader:
    """Consumes fields from `data`; `end()` insists nothing is left over."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._pos = 0

    def _take(self, n: int) -> bytes:
        if n < 0 or self._pos + n > len(self._data):
            raise MalformedMessage("message is truncated")
        out = bytes(self._data[self._pos : self._pos + n])
        self._pos += n
        return out

    def u8(self) -> int:
        return int(self._take(1)[0])

    def u32(self) -> int:
        return int(struct.unpack(">I", self._take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack(">Q", self._take(8))[0])

    def f64(self) -> float:
        return float(struct.unpack(">d", self._take(8))[0])

    def fixed(self, size: int) -> bytes:
        return self._take(size)

    def blob(self) -> bytes:
        n = self.u32()
        if n > MAX_FIELD_BYTES:
            raise MalformedMessage("field length over limit")
        return self._take(n)

    def text(self) -> str:
        try:
            return self.blob().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedMessage("text field is not UTF-8") from exc

    def count(self) -> int:
        n = self.u32()
        if n > MAX_LIST_ITEMS:
            raise MalformedMessage("list length over limit")
        return n

    def end(self) -> None:
        if self._pos != len(self._data):
            raise MalformedMessage("trailing bytes after message")
