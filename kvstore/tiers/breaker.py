"""A circuit breaker for networked tiers (``redis``, ``peer``).

A remote that is down or slow must not slow the daemon down: without a
breaker every get would wait out its timeout, and every write-through would
hammer a server that is trying to come back.  The breaker has three states:

* **closed**: calls go through.  ``failures`` failures in a row open it.
* **open**: calls are refused at once with
  :class:`~kvstore.errors.RemoteUnavailable` (the tiers turn that into a miss
  for gets and lookups, and into a dropped write for puts).  After
  ``reset_s`` it lets one call through: half-open.
* **half-open**: exactly one probe call is in flight; the others are refused.
  If it succeeds the breaker closes; if it fails the breaker opens again and
  the wait doubles, up to ``max_reset_s``.

Every call made through :meth:`CircuitBreaker.guard` is bounded by a timeout;
a timeout counts as a failure.  Failures are counted in the tier's
``counters.errors``; the breaker logs each state change once, never each call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Literal

from kvstore.errors import ConfigError, RemoteUnavailable
from kvstore.tiers.base import TierCounters

__all__ = ["BreakerConfig", "CircuitBreaker", "BreakerState"]

log = logging.getLogger(__name__)

BreakerState = Literal["closed", "open", "half-open"]


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """When the breaker opens and how long it stays open."""

    #: Consecutive failures that open the breaker.
    failures: int = 3
    #: Seconds the breaker stays open before the first probe.
    reset_s: float = 1.0
    #: Upper bound of the wait between probes (it doubles after each failed probe).
    max_reset_s: float = 30.0

    def __post_init__(self) -> None:
        if not isinstance(self.failures, int) or isinstance(self.failures, bool) or not 1 <= self.failures <= 1000:
            raise ConfigError(f"breaker.failures must be an integer in [1, 1000], got {self.failures!r}")
        if not isinstance(self.reset_s, int | float) or not 0.001 <= self.reset_s <= 3600:
            raise ConfigError(f"breaker.reset_s must be seconds in [0.001, 3600], got {self.reset_s!r}")
        if not isinstance(self.max_reset_s, int | float) or not self.reset_s <= self.max_reset_s <= 3600:
            raise ConfigError(
                f"breaker.max_reset_s must be seconds in [reset_s={self.reset_s}, 3600], got {self.max_reset_s!r}"
            )


class CircuitBreaker:
    """Closed / open / half-open; see the module docstring.

    ``failure_types`` are the exceptions that mean "the remote failed" (socket
    errors, the client library's errors); anything else escaping a guarded
    block is a bug or a cancellation and passes through untouched.
    """

    def __init__(
        self,
        name: str,
        config: BreakerConfig,
        failure_types: tuple[type[BaseException], ...],
        counters: TierCounters | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.config = config
        self._failure_types: tuple[type[BaseException], ...] = (*failure_types, TimeoutError)
        self._counters = counters
        self._clock = clock
        self._state: BreakerState = "closed"
        self._consecutive = 0
        self._open_until = 0.0
        self._wait = config.reset_s
        self._probing = False
        #: Calls refused without trying because the breaker was open.
        self.rejected = 0
        #: Times the breaker went from closed to open.
        self.trips = 0

    @property
    def state(self) -> BreakerState:
        return self._state

    def refusing(self) -> bool:
        """Whether a call now would be refused (without claiming the probe)."""
        if self._state == "open":
            return self._clock() < self._open_until
        return self._state == "half-open" and self._probing

    def allow(self) -> bool:
        """Whether a call may go out now (in half-open: claims the one probe)."""
        if self._state == "closed":
            return True
        if self._state == "open":
            if self._clock() < self._open_until:
                return False
            self._state = "half-open"
            self._probing = False
        if self._probing:
            return False
        self._probing = True
        return True

    def record_success(self) -> None:
        self._consecutive = 0
        if self._state != "closed":
            log.info("%s: remote reachable again; circuit closed", self.name)
            self._state = "closed"
            self._wait = self.config.reset_s
        self._probing = False

    def record_failure(self, exc: BaseException) -> None:
        if self._counters is not None:
            self._counters.errors += 1
        self._consecutive += 1
        if self._state == "half-open":
            self._probing = False
            self._wait = min(self._wait * 2, self.config.max_reset_s)
            self._open(exc, level=logging.DEBUG)
        elif self._state == "closed" and self._consecutive >= self.config.failures:
            self.trips += 1
            self._wait = self.config.reset_s
            self._open(exc, level=logging.WARNING)

    def _open(self, exc: BaseException, level: int) -> None:
        self._state = "open"
        self._open_until = self._clock() + self._wait
        log.log(
            level,
            "%s: remote unavailable (%s); circuit open, failing fast for %.1f s",
            self.name,
            _describe(exc),
            self._wait,
        )

    def refuse(self) -> RemoteUnavailable:
        """The error a refused call raises (counted in ``rejected``)."""
        self.rejected += 1
        left = max(0.0, self._open_until - self._clock())
        return RemoteUnavailable(f"{self.name}: remote unavailable (circuit {self._state}, next probe in {left:.1f} s)")

    @contextlib.asynccontextmanager
    async def guard(self, timeout_s: float, what: str) -> AsyncIterator[None]:
        """Run the block as one remote call bounded by ``timeout_s``.

        Raises :class:`RemoteUnavailable` at once when the breaker refuses the
        call, and in place of any failure (``failure_types`` or the timeout),
        which is recorded.  ``what`` names the operation in the error.
        """
        if not self.allow():
            raise self.refuse()
        try:
            async with asyncio.timeout(timeout_s):
                yield
        except self._failure_types as exc:
            self.record_failure(exc)
            if isinstance(exc, TimeoutError):
                raise RemoteUnavailable(f"{self.name}: {what} timed out after {timeout_s:.3g} s") from exc
            raise RemoteUnavailable(f"{self.name}: {what} failed: {_describe(exc)}") from exc
        except BaseException:
            # Cancelled by the caller, or a bug: says nothing about the remote,
            # but a probe that never finished must not block later probes.
            self._probing = False
            raise
        self.record_success()


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
