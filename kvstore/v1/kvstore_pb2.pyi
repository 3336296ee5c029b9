from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ChunkMeta(_message.Message):
    __slots__ = ("nbytes", "checksum", "codec", "codec_version", "dtype", "shape", "layout")
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    CODEC_VERSION_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    nbytes: int
    checksum: int
    codec: str
    codec_version: int
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    layout: str
    def __init__(self, nbytes: _Optional[int] = ..., checksum: _Optional[int] = ..., codec: _Optional[str] = ..., codec_version: _Optional[int] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., layout: _Optional[str] = ...) -> None: ...

class PutHeader(_message.Message):
    __slots__ = ("key", "meta", "durable")
    KEY_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    DURABLE_FIELD_NUMBER: _ClassVar[int]
    key: str
    meta: ChunkMeta
    durable: bool
    def __init__(self, key: _Optional[str] = ..., meta: _Optional[_Union[ChunkMeta, _Mapping]] = ..., durable: _Optional[bool] = ...) -> None: ...

class PutFrame(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: PutHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[PutHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PutResult(_message.Message):
    __slots__ = ("key", "tier")
    KEY_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    key: str
    tier: str
    def __init__(self, key: _Optional[str] = ..., tier: _Optional[str] = ...) -> None: ...

class PutReply(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[PutResult]
    def __init__(self, results: _Optional[_Iterable[_Union[PutResult, _Mapping]]] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("keys", "frame_bytes", "inline_data")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    FRAME_BYTES_FIELD_NUMBER: _ClassVar[int]
    INLINE_DATA_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    frame_bytes: int
    inline_data: bool
    def __init__(self, keys: _Optional[_Iterable[str]] = ..., frame_bytes: _Optional[int] = ..., inline_data: _Optional[bool] = ...) -> None: ...

class GetHeader(_message.Message):
    __slots__ = ("index", "key", "found", "meta", "data")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    FOUND_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    index: int
    key: str
    found: bool
    meta: ChunkMeta
    data: bytes
    def __init__(self, index: _Optional[int] = ..., key: _Optional[str] = ..., found: _Optional[bool] = ..., meta: _Optional[_Union[ChunkMeta, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class GetFrame(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: GetHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[GetHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, keys: _Optional[_Iterable[str]] = ...) -> None: ...

class LookupReply(_message.Message):
    __slots__ = ("count", "tiers")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    count: int
    tiers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, count: _Optional[int] = ..., tiers: _Optional[_Iterable[str]] = ...) -> None: ...

class ExistsRequest(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, keys: _Optional[_Iterable[str]] = ...) -> None: ...

class ExistsReply(_message.Message):
    __slots__ = ("present",)
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    present: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, present: _Optional[_Iterable[bool]] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, keys: _Optional[_Iterable[str]] = ...) -> None: ...

class DeleteReply(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, found: _Optional[_Iterable[bool]] = ...) -> None: ...

class RegisterSegmentRequest(_message.Message):
    __slots__ = ("name", "size", "nonce")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    size: int
    nonce: bytes
    def __init__(self, name: _Optional[str] = ..., size: _Optional[int] = ..., nonce: _Optional[bytes] = ...) -> None: ...

class RegisterSegmentReply(_message.Message):
    __slots__ = ("segment_id", "control_socket")
    SEGMENT_ID_FIELD_NUMBER: _ClassVar[int]
    CONTROL_SOCKET_FIELD_NUMBER: _ClassVar[int]
    segment_id: int
    control_socket: str
    def __init__(self, segment_id: _Optional[int] = ..., control_socket: _Optional[str] = ...) -> None: ...

class ReleaseSegmentRequest(_message.Message):
    __slots__ = ("segment_id",)
    SEGMENT_ID_FIELD_NUMBER: _ClassVar[int]
    segment_id: int
    def __init__(self, segment_id: _Optional[int] = ...) -> None: ...

class ReleaseSegmentReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ShmSlice(_message.Message):
    __slots__ = ("segment_id", "offset", "length")
    SEGMENT_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    segment_id: int
    offset: int
    length: int
    def __init__(self, segment_id: _Optional[int] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class ShmPutItem(_message.Message):
    __slots__ = ("key", "meta", "slice", "daemon_checksum")
    KEY_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    SLICE_FIELD_NUMBER: _ClassVar[int]
    DAEMON_CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    key: str
    meta: ChunkMeta
    slice: ShmSlice
    daemon_checksum: bool
    def __init__(self, key: _Optional[str] = ..., meta: _Optional[_Union[ChunkMeta, _Mapping]] = ..., slice: _Optional[_Union[ShmSlice, _Mapping]] = ..., daemon_checksum: _Optional[bool] = ...) -> None: ...

class ShmPutRequest(_message.Message):
    __slots__ = ("items", "durable")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    DURABLE_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ShmPutItem]
    durable: bool
    def __init__(self, items: _Optional[_Iterable[_Union[ShmPutItem, _Mapping]]] = ..., durable: _Optional[bool] = ...) -> None: ...

class ShmGetItem(_message.Message):
    __slots__ = ("key", "slice")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SLICE_FIELD_NUMBER: _ClassVar[int]
    key: str
    slice: ShmSlice
    def __init__(self, key: _Optional[str] = ..., slice: _Optional[_Union[ShmSlice, _Mapping]] = ...) -> None: ...

class ShmGetRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ShmGetItem]
    def __init__(self, items: _Optional[_Iterable[_Union[ShmGetItem, _Mapping]]] = ...) -> None: ...

class ShmGetResult(_message.Message):
    __slots__ = ("found", "meta", "written")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    WRITTEN_FIELD_NUMBER: _ClassVar[int]
    found: bool
    meta: ChunkMeta
    written: bool
    def __init__(self, found: _Optional[bool] = ..., meta: _Optional[_Union[ChunkMeta, _Mapping]] = ..., written: _Optional[bool] = ...) -> None: ...

class ShmGetReply(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ShmGetResult]
    def __init__(self, results: _Optional[_Iterable[_Union[ShmGetResult, _Mapping]]] = ...) -> None: ...

class ArenaPutItem(_message.Message):
    __slots__ = ("key", "meta", "offset", "micros")
    KEY_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    MICROS_FIELD_NUMBER: _ClassVar[int]
    key: str
    meta: ChunkMeta
    offset: int
    micros: int
    def __init__(self, key: _Optional[str] = ..., meta: _Optional[_Union[ChunkMeta, _Mapping]] = ..., offset: _Optional[int] = ..., micros: _Optional[int] = ...) -> None: ...

class ArenaPutRequest(_message.Message):
    __slots__ = ("items", "durable", "reserve", "release", "checksums_follow")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    DURABLE_FIELD_NUMBER: _ClassVar[int]
    RESERVE_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    CHECKSUMS_FOLLOW_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ArenaPutItem]
    durable: bool
    reserve: _containers.RepeatedScalarFieldContainer[int]
    release: _containers.RepeatedScalarFieldContainer[int]
    checksums_follow: bool
    def __init__(self, items: _Optional[_Iterable[_Union[ArenaPutItem, _Mapping]]] = ..., durable: _Optional[bool] = ..., reserve: _Optional[_Iterable[int]] = ..., release: _Optional[_Iterable[int]] = ..., checksums_follow: _Optional[bool] = ...) -> None: ...

class ArenaPutReply(_message.Message):
    __slots__ = ("results", "reserved")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    RESERVED_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[PutResult]
    reserved: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, results: _Optional[_Iterable[_Union[PutResult, _Mapping]]] = ..., reserved: _Optional[_Iterable[int]] = ...) -> None: ...
