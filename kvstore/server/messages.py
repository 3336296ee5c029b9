"""Conversions between the API's messages and kvstore's types, with errors naming the field,
and the lenient request decoder the daemon's gRPC handlers use."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from kvstore.chunk import ChunkMeta
from kvstore.errors import InvalidArgument
from kvstore.keys import ChunkKey
from kvstore.v1 import kvstore_pb2 as pb

M = TypeVar("M", bound=Message)


def meta_from_pb(m: pb.ChunkMeta, where: str = "meta") -> ChunkMeta:
    try:
        return ChunkMeta(
            nbytes=m.nbytes,
            checksum=m.checksum,
            codec=m.codec or "raw",
            codec_version=m.codec_version or 1,
            dtype=m.dtype or "uint8",
            shape=tuple(m.shape),
            layout=m.layout or "LKTHD",
        )
    except InvalidArgument as exc:
        raise InvalidArgument(f"{where}: {exc}") from None


def meta_to_pb(m: ChunkMeta) -> pb.ChunkMeta:
    return pb.ChunkMeta(
        nbytes=m.nbytes,
        checksum=m.checksum,
        codec=m.codec,
        codec_version=m.codec_version,
        dtype=m.dtype,
        shape=list(m.shape),
        layout=m.layout,
    )


def parse_key(text: str, where: str = "key") -> ChunkKey:
    try:
        return ChunkKey.parse(text)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{where}: {exc}") from None


def lenient(cls: type[M]) -> Callable[[bytes], M | InvalidArgument]:
    """A request deserializer that hands a malformed request to the handler as
    an error to answer with INVALID_ARGUMENT.  Raising inside grpc instead
    would answer UNKNOWN and log a traceback for every bad request."""

    def decode(raw: bytes) -> M | InvalidArgument:
        try:
            return cls.FromString(raw)
        except DecodeError as exc:
            return InvalidArgument(f"malformed {cls.__name__}: {exc}")

    return decode
