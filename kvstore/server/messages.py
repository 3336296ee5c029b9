"""Conversions between the API's messages and kvstore's types, with errors naming the field."""

from __future__ import annotations

from kvstore.chunk import ChunkMeta
from kvstore.errors import InvalidArgument
from kvstore.keys import ChunkKey
from kvstore.v1 import kvstore_pb2 as pb


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
