"""The pieces of HTTP/2 (RFC 9113) and of gRPC's mapping onto it
("PROTOCOL-HTTP2") that both ends of kvstore's own gRPC ``Get`` and ``Put``
connection use: the sync client's (kvstore/client/h2get.py, h2put.py) and
the daemon's listener (kvstore/server/h2get.py, h2put.py).

Header blocks are written as HPACK literals without indexing (RFC 7541
6.2.2), which keeps no state between blocks, so either end may encode
without a per-connection encoder; what a peer sends is decoded with the
``hpack`` package (it may use the dynamic table and Huffman codes).
"""

from __future__ import annotations

import struct
from urllib.parse import quote

import grpc

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
GET_PATH = "/kvstore.v1.KVStore/Get"
PUT_PATH = "/kvstore.v1.KVStore/Put"
#: Request header with which a client asks the daemon's gRPC port for the port of its
#: HTTP/2 Get listener (kvstore/server/h2get.py), and the reply's initial-metadata key
#: that answers (the port, in decimal).
ASK_HEADER = "kvstore-ask-get-port"
PORT_HEADER = "kvstore-get-port"

# Frame types and flags (RFC 9113 section 6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
# SETTINGS identifiers (section 6.5.2).
SETTINGS_HEADER_TABLE_SIZE, SETTINGS_ENABLE_PUSH, SETTINGS_MAX_CONCURRENT_STREAMS = 0x1, 0x2, 0x3
SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE, SETTINGS_MAX_HEADER_LIST_SIZE = 0x4, 0x5, 0x6
# Error codes (section 7).
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 0x5, 0x6, 0x7, 0x8, 0x9
ENHANCE_YOUR_CALM = 0xB

MAX_WINDOW = (1 << 31) - 1
DEFAULT_WINDOW = 65535
MIN_FRAME = 1 << 14
#: SETTINGS_MAX_FRAME_SIZE's largest value.
MAX_FRAME = (1 << 24) - 1

#: gRPC status code number -> name ("OK", "NOT_FOUND", ...).
STATUS_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
STATUS_NUMBERS = {name: number for number, name in STATUS_NAMES.items()}

_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    """One whole frame: the 9-byte header and ``payload``."""
    return struct.pack(">I", len(payload))[1:] + bytes((kind, flags)) + struct.pack(">I", stream) + payload


def frame_header(kind: int, flags: int, stream: int, length: int) -> bytes:
    """A frame's 9-byte header alone (its payload is written after it)."""
    return struct.pack(">I", length)[1:] + bytes((kind, flags)) + struct.pack(">I", stream)


def parse_frame_header(raw: bytes | bytearray | memoryview) -> tuple[int, int, int, int]:
    """(length, type, flags, stream) of the 9 bytes at the start of ``raw``."""
    return int.from_bytes(raw[:3], "big"), raw[3], raw[4], int.from_bytes(raw[5:9], "big") & MAX_WINDOW


def hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    """HPACK's integer encoding (RFC 7541 5.1) with ``first``'s high bits."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def literal(name: str, value: str) -> bytes:
    """One header as an HPACK literal without indexing, new name, no Huffman (RFC 7541 6.2.2)."""
    n, v = name.encode("ascii"), value.encode("ascii")
    return b"\x00" + hpack_int(len(n), 7) + n + hpack_int(len(v), 7) + v


def grpc_timeout(seconds: float) -> str:
    """A ``grpc-timeout`` header value for ``seconds`` (at most 8 digits)."""
    ms = max(1, int(seconds * 1000))
    return f"{ms}m" if ms < 100_000_000 else f"{min(int(seconds), 99_999_999)}S"


def parse_grpc_timeout(value: str) -> float:
    """Seconds in a ``grpc-timeout`` header value; ValueError when it is malformed."""
    digits, unit = value[:-1], value[-1:]
    if not digits.isdigit() or len(digits) > 8 or unit not in _TIMEOUT_UNITS:
        raise ValueError(f"malformed grpc-timeout {value!r}: expected 1-8 digits and one of H M S m u n")
    return int(digits) * _TIMEOUT_UNITS[unit]


def grpc_message(text: str) -> str:
    """``text`` percent-encoded for the ``grpc-message`` trailer (gRPC keeps printable ASCII but %)."""
    return quote(text, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~")


def _static_table() -> tuple[tuple[str, str], ...]:
    from hpack.table import HeaderTable

    return tuple((name.decode(), value.decode()) for name, value in HeaderTable.STATIC_TABLE)


_STATIC = _static_table()


def _read_int(block: bytes, at: int, prefix_bits: int) -> tuple[int, int]:
    limit = (1 << prefix_bits) - 1
    value = block[at] & limit
    at += 1
    if value < limit:
        return value, at
    shift = 0
    while True:
        b = block[at]  # IndexError on a truncated block: the caller falls back
        at += 1
        value += (b & 0x7F) << shift
        if not b & 0x80:
            return value, at
        shift += 7
        if shift > 28:
            raise ValueError("HPACK integer too large")


def _read_string(block: bytes, at: int) -> tuple[str, int] | None:
    if block[at] & 0x80:
        return None  # Huffman-coded
    n, at = _read_int(block, at, 7)
    if at + n > len(block):
        raise ValueError("HPACK string runs past the block")
    return block[at : at + n].decode("latin-1"), at + n


def stateless_fields(block: bytes) -> list[tuple[str, str]] | None:
    """The fields of a header block that neither reads nor changes HPACK's dynamic
    table and has no Huffman-coded string (what kvstore's client sends: static
    indices and literals without indexing), decoded without ``hpack``'s
    per-field cost; None for any other block (decode it with the connection's
    ``hpack.Decoder``, whose state this does not touch)."""
    out: list[tuple[str, str]] = []
    at = 0
    try:
        while at < len(block):
            b = block[at]
            if b & 0x80:  # indexed field
                index, at = _read_int(block, at, 7)
                if not 0 < index <= len(_STATIC):
                    return None
                out.append(_STATIC[index - 1])
                continue
            if b & 0xE0 != 0:  # incremental indexing (01) or a table size update (001)
                return None
            index, at = _read_int(block, at, 4)  # literal without indexing (0000) / never indexed (0001)
            if index:
                if index > len(_STATIC):
                    return None
                name = _STATIC[index - 1][0]
            else:
                got = _read_string(block, at)
                if got is None:
                    return None
                name, at = got
            got = _read_string(block, at)
            if got is None:
                return None
            value, at = got
            out.append((name, value))
    except (IndexError, ValueError):
        return None
    return out


def next_bytes(views: list[memoryview], at: int, off: int, n: int) -> tuple[list[memoryview], int, int]:
    """The next ``n`` bytes of the concatenation of ``views``, from byte ``off`` of
    ``views[at]``, as slices; and where the bytes after them start."""
    out = []
    while n:
        view = views[at]
        k = min(len(view) - off, n)
        out.append(view[off : off + k])
        off += k
        n -= k
        if off == len(view):
            at, off = at + 1, 0
    return out, at, off
