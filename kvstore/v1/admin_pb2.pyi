from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Selector(_message.Message):
    __slots__ = ("keys", "key_prefix", "namespace", "tier")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    KEY_PREFIX_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    key_prefix: str
    namespace: str
    tier: str
    def __init__(self, keys: _Optional[_Iterable[str]] = ..., key_prefix: _Optional[str] = ..., namespace: _Optional[str] = ..., tier: _Optional[str] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TierStats(_message.Message):
    __slots__ = ("name", "kind", "eviction_policy", "capacity_bytes", "max_capacity_bytes", "used_bytes", "chunks", "pinned_chunks", "pinned_bytes", "hits", "misses", "evictions", "evicted_bytes", "promotions", "demotions", "errors", "read_bytes", "write_bytes", "read_bandwidth", "write_bandwidth", "healthy", "write_through")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    EVICTION_POLICY_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    PINNED_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    PINNED_BYTES_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    EVICTED_BYTES_FIELD_NUMBER: _ClassVar[int]
    PROMOTIONS_FIELD_NUMBER: _ClassVar[int]
    DEMOTIONS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    READ_BYTES_FIELD_NUMBER: _ClassVar[int]
    WRITE_BYTES_FIELD_NUMBER: _ClassVar[int]
    READ_BANDWIDTH_FIELD_NUMBER: _ClassVar[int]
    WRITE_BANDWIDTH_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    WRITE_THROUGH_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    eviction_policy: str
    capacity_bytes: int
    max_capacity_bytes: int
    used_bytes: int
    chunks: int
    pinned_chunks: int
    pinned_bytes: int
    hits: int
    misses: int
    evictions: int
    evicted_bytes: int
    promotions: int
    demotions: int
    errors: int
    read_bytes: int
    write_bytes: int
    read_bandwidth: float
    write_bandwidth: float
    healthy: bool
    write_through: int
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., eviction_policy: _Optional[str] = ..., capacity_bytes: _Optional[int] = ..., max_capacity_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., chunks: _Optional[int] = ..., pinned_chunks: _Optional[int] = ..., pinned_bytes: _Optional[int] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., evictions: _Optional[int] = ..., evicted_bytes: _Optional[int] = ..., promotions: _Optional[int] = ..., demotions: _Optional[int] = ..., errors: _Optional[int] = ..., read_bytes: _Optional[int] = ..., write_bytes: _Optional[int] = ..., read_bandwidth: _Optional[float] = ..., write_bandwidth: _Optional[float] = ..., healthy: _Optional[bool] = ..., write_through: _Optional[int] = ...) -> None: ...

class NamespaceTierUsage(_message.Message):
    __slots__ = ("tier", "bytes", "chunks")
    TIER_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    tier: str
    bytes: int
    chunks: int
    def __init__(self, tier: _Optional[str] = ..., bytes: _Optional[int] = ..., chunks: _Optional[int] = ...) -> None: ...

class NamespaceStats(_message.Message):
    __slots__ = ("namespace", "bytes", "chunks", "quota_bytes", "tiers", "pinned_chunks", "hits", "misses", "evictions", "read_bytes", "write_bytes", "read_bandwidth", "write_bandwidth", "promotions", "demotions")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    QUOTA_BYTES_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    PINNED_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    READ_BYTES_FIELD_NUMBER: _ClassVar[int]
    WRITE_BYTES_FIELD_NUMBER: _ClassVar[int]
    READ_BANDWIDTH_FIELD_NUMBER: _ClassVar[int]
    WRITE_BANDWIDTH_FIELD_NUMBER: _ClassVar[int]
    PROMOTIONS_FIELD_NUMBER: _ClassVar[int]
    DEMOTIONS_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    bytes: int
    chunks: int
    quota_bytes: int
    tiers: _containers.RepeatedCompositeFieldContainer[NamespaceTierUsage]
    pinned_chunks: int
    hits: int
    misses: int
    evictions: int
    read_bytes: int
    write_bytes: int
    read_bandwidth: float
    write_bandwidth: float
    promotions: int
    demotions: int
    def __init__(self, namespace: _Optional[str] = ..., bytes: _Optional[int] = ..., chunks: _Optional[int] = ..., quota_bytes: _Optional[int] = ..., tiers: _Optional[_Iterable[_Union[NamespaceTierUsage, _Mapping]]] = ..., pinned_chunks: _Optional[int] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., evictions: _Optional[int] = ..., read_bytes: _Optional[int] = ..., write_bytes: _Optional[int] = ..., read_bandwidth: _Optional[float] = ..., write_bandwidth: _Optional[float] = ..., promotions: _Optional[int] = ..., demotions: _Optional[int] = ...) -> None: ...

class StatsReply(_message.Message):
    __slots__ = ("tiers", "namespaces", "gets", "hits", "misses", "hit_ratio", "pins", "uptime_s")
    TIERS_FIELD_NUMBER: _ClassVar[int]
    NAMESPACES_FIELD_NUMBER: _ClassVar[int]
    GETS_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    HIT_RATIO_FIELD_NUMBER: _ClassVar[int]
    PINS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    tiers: _containers.RepeatedCompositeFieldContainer[TierStats]
    namespaces: _containers.RepeatedCompositeFieldContainer[NamespaceStats]
    gets: int
    hits: int
    misses: int
    hit_ratio: float
    pins: int
    uptime_s: float
    def __init__(self, tiers: _Optional[_Iterable[_Union[TierStats, _Mapping]]] = ..., namespaces: _Optional[_Iterable[_Union[NamespaceStats, _Mapping]]] = ..., gets: _Optional[int] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., hit_ratio: _Optional[float] = ..., pins: _Optional[int] = ..., uptime_s: _Optional[float] = ...) -> None: ...

class ListChunksRequest(_message.Message):
    __slots__ = ("selector", "page_size", "page_token")
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    selector: Selector
    page_size: int
    page_token: str
    def __init__(self, selector: _Optional[_Union[Selector, _Mapping]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ChunkInfo(_message.Message):
    __slots__ = ("key", "tiers", "nbytes", "pin_remaining_s")
    KEY_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    PIN_REMAINING_S_FIELD_NUMBER: _ClassVar[int]
    key: str
    tiers: _containers.RepeatedScalarFieldContainer[str]
    nbytes: int
    pin_remaining_s: float
    def __init__(self, key: _Optional[str] = ..., tiers: _Optional[_Iterable[str]] = ..., nbytes: _Optional[int] = ..., pin_remaining_s: _Optional[float] = ...) -> None: ...

class ListChunksReply(_message.Message):
    __slots__ = ("chunks", "next_page_token", "total")
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    chunks: _containers.RepeatedCompositeFieldContainer[ChunkInfo]
    next_page_token: str
    total: int
    def __init__(self, chunks: _Optional[_Iterable[_Union[ChunkInfo, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., total: _Optional[int] = ...) -> None: ...

class EvictRequest(_message.Message):
    __slots__ = ("selector", "use_watermark", "watermark_bytes", "drop", "force")
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    USE_WATERMARK_FIELD_NUMBER: _ClassVar[int]
    WATERMARK_BYTES_FIELD_NUMBER: _ClassVar[int]
    DROP_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    selector: Selector
    use_watermark: bool
    watermark_bytes: int
    drop: bool
    force: bool
    def __init__(self, selector: _Optional[_Union[Selector, _Mapping]] = ..., use_watermark: _Optional[bool] = ..., watermark_bytes: _Optional[int] = ..., drop: _Optional[bool] = ..., force: _Optional[bool] = ...) -> None: ...

class FreedChunk(_message.Message):
    __slots__ = ("key", "tier", "nbytes", "demoted_to")
    KEY_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    DEMOTED_TO_FIELD_NUMBER: _ClassVar[int]
    key: str
    tier: str
    nbytes: int
    demoted_to: str
    def __init__(self, key: _Optional[str] = ..., tier: _Optional[str] = ..., nbytes: _Optional[int] = ..., demoted_to: _Optional[str] = ...) -> None: ...

class EvictReply(_message.Message):
    __slots__ = ("chunks", "bytes", "freed", "skipped_pinned", "watermark_reached", "used_bytes")
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    FREED_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_PINNED_FIELD_NUMBER: _ClassVar[int]
    WATERMARK_REACHED_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    chunks: int
    bytes: int
    freed: _containers.RepeatedCompositeFieldContainer[FreedChunk]
    skipped_pinned: int
    watermark_reached: bool
    used_bytes: int
    def __init__(self, chunks: _Optional[int] = ..., bytes: _Optional[int] = ..., freed: _Optional[_Iterable[_Union[FreedChunk, _Mapping]]] = ..., skipped_pinned: _Optional[int] = ..., watermark_reached: _Optional[bool] = ..., used_bytes: _Optional[int] = ...) -> None: ...

class PinRequest(_message.Message):
    __slots__ = ("selector", "ttl_s")
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    selector: Selector
    ttl_s: float
    def __init__(self, selector: _Optional[_Union[Selector, _Mapping]] = ..., ttl_s: _Optional[float] = ...) -> None: ...

class PinReply(_message.Message):
    __slots__ = ("pinned", "missing", "ttl_s")
    PINNED_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    pinned: int
    missing: _containers.RepeatedScalarFieldContainer[str]
    ttl_s: float
    def __init__(self, pinned: _Optional[int] = ..., missing: _Optional[_Iterable[str]] = ..., ttl_s: _Optional[float] = ...) -> None: ...

class UnpinRequest(_message.Message):
    __slots__ = ("selector",)
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    selector: Selector
    def __init__(self, selector: _Optional[_Union[Selector, _Mapping]] = ...) -> None: ...

class UnpinReply(_message.Message):
    __slots__ = ("unpinned",)
    UNPINNED_FIELD_NUMBER: _ClassVar[int]
    unpinned: int
    def __init__(self, unpinned: _Optional[int] = ...) -> None: ...

class MoveRequest(_message.Message):
    __slots__ = ("selector", "from_tier", "to_tier")
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    FROM_TIER_FIELD_NUMBER: _ClassVar[int]
    TO_TIER_FIELD_NUMBER: _ClassVar[int]
    selector: Selector
    from_tier: str
    to_tier: str
    def __init__(self, selector: _Optional[_Union[Selector, _Mapping]] = ..., from_tier: _Optional[str] = ..., to_tier: _Optional[str] = ...) -> None: ...

class MoveReply(_message.Message):
    __slots__ = ("moved", "bytes", "already_there", "failed")
    MOVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    ALREADY_THERE_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    moved: int
    bytes: int
    already_there: int
    failed: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, moved: _Optional[int] = ..., bytes: _Optional[int] = ..., already_there: _Optional[int] = ..., failed: _Optional[_Iterable[str]] = ...) -> None: ...

class QuotaChange(_message.Message):
    __slots__ = ("namespace", "bytes")
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    namespace: str
    bytes: int
    def __init__(self, namespace: _Optional[str] = ..., bytes: _Optional[int] = ...) -> None: ...

class SetPolicyRequest(_message.Message):
    __slots__ = ("tier", "eviction_policy", "set_capacity", "capacity_bytes", "quotas")
    TIER_FIELD_NUMBER: _ClassVar[int]
    EVICTION_POLICY_FIELD_NUMBER: _ClassVar[int]
    SET_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    QUOTAS_FIELD_NUMBER: _ClassVar[int]
    tier: str
    eviction_policy: str
    set_capacity: bool
    capacity_bytes: int
    quotas: _containers.RepeatedCompositeFieldContainer[QuotaChange]
    def __init__(self, tier: _Optional[str] = ..., eviction_policy: _Optional[str] = ..., set_capacity: _Optional[bool] = ..., capacity_bytes: _Optional[int] = ..., quotas: _Optional[_Iterable[_Union[QuotaChange, _Mapping]]] = ...) -> None: ...

class SetPolicyReply(_message.Message):
    __slots__ = ("tier", "evicted_chunks", "evicted_bytes", "quotas")
    class QuotasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    TIER_FIELD_NUMBER: _ClassVar[int]
    EVICTED_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    EVICTED_BYTES_FIELD_NUMBER: _ClassVar[int]
    QUOTAS_FIELD_NUMBER: _ClassVar[int]
    tier: TierStats
    evicted_chunks: int
    evicted_bytes: int
    quotas: _containers.ScalarMap[str, int]
    def __init__(self, tier: _Optional[_Union[TierStats, _Mapping]] = ..., evicted_chunks: _Optional[int] = ..., evicted_bytes: _Optional[int] = ..., quotas: _Optional[_Mapping[str, int]] = ...) -> None: ...

class RecodeRequest(_message.Message):
    __slots__ = ("selector", "codec", "set_level", "level")
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    SET_LEVEL_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    selector: Selector
    codec: str
    set_level: bool
    level: int
    def __init__(self, selector: _Optional[_Union[Selector, _Mapping]] = ..., codec: _Optional[str] = ..., set_level: _Optional[bool] = ..., level: _Optional[int] = ...) -> None: ...

class RecodeFailure(_message.Message):
    __slots__ = ("key", "reason")
    KEY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    key: str
    reason: str
    def __init__(self, key: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class RecodeReply(_message.Message):
    __slots__ = ("recoded", "unchanged", "bytes_before", "bytes_after", "failed")
    RECODED_FIELD_NUMBER: _ClassVar[int]
    UNCHANGED_FIELD_NUMBER: _ClassVar[int]
    BYTES_BEFORE_FIELD_NUMBER: _ClassVar[int]
    BYTES_AFTER_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    recoded: int
    unchanged: int
    bytes_before: int
    bytes_after: int
    failed: _containers.RepeatedCompositeFieldContainer[RecodeFailure]
    def __init__(self, recoded: _Optional[int] = ..., unchanged: _Optional[int] = ..., bytes_before: _Optional[int] = ..., bytes_after: _Optional[int] = ..., failed: _Optional[_Iterable[_Union[RecodeFailure, _Mapping]]] = ...) -> None: ...

class ClearRequest(_message.Message):
    __slots__ = ("tier", "namespace", "all", "confirm")
    TIER_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    ALL_FIELD_NUMBER: _ClassVar[int]
    CONFIRM_FIELD_NUMBER: _ClassVar[int]
    tier: str
    namespace: str
    all: bool
    confirm: bool
    def __init__(self, tier: _Optional[str] = ..., namespace: _Optional[str] = ..., all: _Optional[bool] = ..., confirm: _Optional[bool] = ...) -> None: ...

class ClearReply(_message.Message):
    __slots__ = ("chunks", "bytes")
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    chunks: int
    bytes: int
    def __init__(self, chunks: _Optional[int] = ..., bytes: _Optional[int] = ...) -> None: ...
