"""Exceptions of kvstore.

Expected failures are subclasses of :class:`KVStoreError` and each carries the
name of the one gRPC status code it maps to (``status``), so the server turns
them into the right code without a lookup table spread through the code base.
Anything else that escapes is a bug and is *not* caught and logged away.

The names are plain strings so that this module does not import grpc: the core
store runs without the daemon.
"""

from __future__ import annotations


class KVStoreError(Exception):
    """Base of every expected kvstore failure."""

    status: str = "UNKNOWN"


class InvalidArgument(KVStoreError, ValueError):
    """The caller passed something malformed; the message says what and how to fix it."""

    status = "INVALID_ARGUMENT"


class ConfigError(InvalidArgument):
    """A configuration value is invalid; the message names the field."""


class NotFound(KVStoreError, KeyError):
    """The chunk (or other object) does not exist."""

    status = "NOT_FOUND"

    def __str__(self) -> str:  # KeyError quotes its argument; we want the message
        return str(self.args[0]) if self.args else "not found"


class AlreadyExists(KVStoreError):
    status = "ALREADY_EXISTS"


class CapacityError(KVStoreError):
    """Not enough room: the chunk is larger than the tier, or everything left is pinned."""

    status = "RESOURCE_EXHAUSTED"


class QuotaExceeded(CapacityError):
    """A namespace's byte quota does not allow this put."""


class CorruptChunk(KVStoreError):
    """Stored or received bytes fail their checksum or are malformed.

    A corrupt chunk is never served; it is dropped and counted.
    """

    status = "DATA_LOSS"


class CodecError(CorruptChunk):
    """Encoded bytes cannot be decoded (truncated, corrupted or hostile input)."""


class RemoteUnavailable(KVStoreError):
    """A networked tier or the daemon cannot be reached right now; retrying may help."""

    status = "UNAVAILABLE"


class Unauthenticated(KVStoreError):
    status = "UNAUTHENTICATED"


class PermissionDenied(KVStoreError):
    status = "PERMISSION_DENIED"


class DeadlineExceeded(KVStoreError):
    status = "DEADLINE_EXCEEDED"


class Closed(KVStoreError):
    """The store or tier was closed; no more operations are accepted."""

    status = "UNAVAILABLE"


_BY_STATUS: dict[str, type[KVStoreError]] = {
    "INVALID_ARGUMENT": InvalidArgument,
    "NOT_FOUND": NotFound,
    "ALREADY_EXISTS": AlreadyExists,
    "RESOURCE_EXHAUSTED": CapacityError,
    "DATA_LOSS": CorruptChunk,
    "UNAVAILABLE": RemoteUnavailable,
    "UNAUTHENTICATED": Unauthenticated,
    "PERMISSION_DENIED": PermissionDenied,
    "DEADLINE_EXCEEDED": DeadlineExceeded,
}


def error_for_status(status: str, message: str) -> KVStoreError:
    """The typed error a client raises for a gRPC status name from the daemon."""
    cls = _BY_STATUS.get(status, KVStoreError)
    err = cls(message)
    if cls is KVStoreError:
        err.status = status
    return err
