"""Run a test's workers in threads and fail the test with what any of them raised."""

from __future__ import annotations

import threading
from collections.abc import Callable


def run_workers(work: Callable[[int], None], n: int, timeout_s: float = 120.0) -> None:
    """``work(0)`` ... ``work(n - 1)``, each in its own thread, all at once; raises the
    first error a worker raised (with how many did), or AssertionError if one hangs."""
    errors: list[BaseException] = []

    def run(w: int) -> None:
        try:
            work(w)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(w,), daemon=True) for w in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    if any(t.is_alive() for t in threads):
        raise AssertionError(f"a worker did not finish within {timeout_s:g} s")
    if errors:
        raise AssertionError(f"{len(errors)} of {n} workers failed; the first: {errors[0]!r}") from errors[0]
