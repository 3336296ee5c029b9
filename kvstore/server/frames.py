"""Fast (de)serialisation of data frames, wire-compatible with the .proto.

``PutFrame`` and ``GetFrame`` are ``oneof {header = 1; bytes data = 2}``.  A
data frame on the wire is just the tag byte 0x12, a varint length and the
bytes.  Going through protobuf costs two extra copies of every payload byte
(into a ``bytes`` field, then into the serialised message) on each side;
here a data frame is encoded from a memoryview with one join, and decoded as
a memoryview into the received buffer with no copy.  Headers still go
through protobuf.  Any standard gRPC client or server interoperates: the
bytes on the wire are identical.

A :class:`HeaderWithData` is a ``GetFrame`` whose header carries a chunk's
first data bytes (``GetHeader.data``, for a Get that asked ``inline_data``),
encoded with one join too, the ``data`` field last: a reader can parse the
small fields and then take the bytes straight into place (client/h2get.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from kvstore.errors import InvalidArgument

M = TypeVar("M", bound=Message)
DATA_TAG = 0x12  # field 2, wire type 2 (length-delimited)
HEADER_TAG = 0x0A  # GetFrame.header: field 1, wire type 2
INLINE_DATA_TAG = 0x2A  # GetHeader.data: field 5, wire type 2


@dataclass(frozen=True, slots=True)
class HeaderWithData:
    """A GetFrame{header} whose header's ``data`` is ``data`` (the header itself has none)."""

    header: Message
    data: memoryview


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def parts(frame: Message | memoryview | bytes | HeaderWithData) -> tuple[bytes | memoryview, ...]:
    """A header message, raw data bytes, or a header with its first data, as the
    pieces of its serialised frame, payload bytes not copied (kvstore/server/h2get.py
    writes them to the socket as they are)."""
    if isinstance(frame, Message):
        return (frame.SerializeToString(),)
    if isinstance(frame, HeaderWithData):
        head = frame.header.SerializeToString()
        n = len(frame.data)
        size = _varint(n)
        body = len(head) + 1 + len(size) + n
        return b"".join((bytes((HEADER_TAG,)), _varint(body), head, bytes((INLINE_DATA_TAG,)), size)), frame.data
    return bytes((DATA_TAG,)) + _varint(len(frame)), frame


def encode(frame: Message | memoryview | bytes | HeaderWithData) -> bytes:
    """A header message, raw data bytes, or a header with its first data, as a serialised frame."""
    if isinstance(frame, Message):
        return frame.SerializeToString()
    return b"".join(parts(frame))


def varint(raw: bytes | bytearray | memoryview, at: int) -> tuple[int, int] | None:
    """(value, position after it) of the varint at ``at``, or None if ``raw`` ends first."""
    n = shift = 0
    for i in range(at, min(len(raw), at + 10)):
        b = raw[i]
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            return n, i + 1
        shift += 7
    return None


def data_prefix(head: bytes | bytearray | memoryview) -> tuple[int | None, int]:
    """(payload length, bytes of tag + varint) when ``head`` (a frame's first bytes)
    starts a ``data`` field, else (None, 0)."""
    if not head or head[0] != DATA_TAG:
        return None, 0
    got = varint(head, 1)
    return (None, 0) if got is None else got


def _data_view(raw: bytes) -> memoryview | None:
    """The payload of a frame that is exactly one data field, else None."""
    length, used = data_prefix(raw)
    return memoryview(raw)[used:] if length is not None and used + length == len(raw) else None


def decoder(cls: type[M]) -> Callable[[bytes], M | memoryview]:
    """A deserializer returning a memoryview for data frames, else a ``cls``."""

    def decode(raw: bytes) -> M | memoryview:
        view = _data_view(raw)
        if view is not None:
            return view
        try:
            return cls.FromString(raw)
        except DecodeError as exc:
            raise InvalidArgument(f"malformed {cls.__name__}: {exc}") from None

    return decode
