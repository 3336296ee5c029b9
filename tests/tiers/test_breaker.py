"""The circuit breaker of the remote tiers, on a fake clock."""

from __future__ import annotations

import asyncio
import logging

import pytest

from kvstore.errors import ConfigError, RemoteUnavailable
from kvstore.tiers.base import TierCounters
from kvstore.tiers.breaker import BreakerConfig, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def breaker(clock: Clock, counters: TierCounters | None = None) -> CircuitBreaker:
    config = BreakerConfig(failures=3, reset_s=1.0, max_reset_s=4.0)
    return CircuitBreaker("tier 'r'", config, (OSError,), counters, clock)


async def fail(b: CircuitBreaker) -> None:
    with pytest.raises(RemoteUnavailable):
        async with b.guard(1.0, "get"):
            raise ConnectionRefusedError("refused")


async def succeed(b: CircuitBreaker) -> None:
    async with b.guard(1.0, "get"):
        pass


async def test_opens_after_consecutive_failures_and_refuses_at_once(caplog: pytest.LogCaptureFixture) -> None:
    clock, counters = Clock(), TierCounters()
    b = breaker(clock, counters)
    await fail(b)
    await succeed(b)  # a success resets the count
    await fail(b)
    await fail(b)
    assert b.state == "closed"
    with caplog.at_level(logging.INFO, logger="kvstore.tiers.breaker"):
        await fail(b)
        assert b.state == "open" and b.trips == 1 and counters.errors == 4
        for _ in range(50):
            assert b.refusing()
            with pytest.raises(RemoteUnavailable, match="circuit open"):
                async with b.guard(1.0, "get"):
                    raise AssertionError("an open breaker must not run the call")
    assert b.rejected == 50 and counters.errors == 4  # refusals are not remote errors
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1  # once per transition


async def test_half_open_lets_one_probe_through_and_backs_off() -> None:
    clock = Clock()
    b = breaker(clock)
    for _ in range(3):
        await fail(b)
    clock.now += 1.0
    assert b.allow() and b.state == "half-open"
    assert not b.allow()  # only one probe at a time
    b.record_failure(OSError("still down"))
    assert b.state == "open"
    clock.now += 1.5
    assert b.refusing()  # the wait doubled to 2 s
    clock.now += 0.5
    await fail(b)  # a failed probe: wait doubles again, capped at 4 s
    clock.now += 4.0
    await succeed(b)
    assert b.state == "closed"
    await fail(b)
    assert b.state == "closed"  # counting starts over


async def test_timeout_counts_as_failure() -> None:
    b = breaker(Clock())
    with pytest.raises(RemoteUnavailable, match="timed out"):
        async with b.guard(0.01, "get"):
            await asyncio.sleep(1)


async def test_cancelled_probe_frees_the_slot() -> None:
    clock = Clock()
    b = breaker(clock)
    for _ in range(3):
        await fail(b)
    clock.now += 1.0

    async def probe() -> None:
        async with b.guard(5.0, "get"):
            await asyncio.sleep(10)

    task = asyncio.create_task(probe())
    await asyncio.sleep(0)
    assert b.refusing()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not b.refusing()  # the next call may probe


async def test_other_errors_pass_through() -> None:
    b = breaker(Clock())
    with pytest.raises(KeyError):
        async with b.guard(1.0, "get"):
            raise KeyError("a bug, not the remote")
    assert b.state == "closed"


@pytest.mark.parametrize(("kw", "field"), [({"failures": 0}, "failures"), ({"reset_s": 0}, "reset_s"),
                                           ({"reset_s": 5, "max_reset_s": 1}, "max_reset_s")])
def test_config_errors_name_the_field(kw: dict[str, float], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        BreakerConfig(**kw)  # type: ignore[arg-type]
