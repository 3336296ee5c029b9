"""The background layer loader: overlap with compute, order, errors, shutdown."""

from __future__ import annotations

import threading
import time

import pytest

from kvstore.blend.loader import LayerLoader
from kvstore.errors import Closed, InvalidArgument, RemoteUnavailable


def test_loading_overlaps_the_consumers_work() -> None:
    delay = 0.05
    layers = list(range(8))

    def fetch(layer: int) -> int:
        time.sleep(delay)  # stands for a storage round trip
        return layer * 10

    started = time.perf_counter()
    with LayerLoader(fetch, layers, depth=2) as loader:
        for layer in layers:
            assert loader.get(layer) == layer * 10
            time.sleep(delay)  # stands for recomputing the layer
    elapsed = time.perf_counter() - started
    serial = 2 * delay * len(layers)
    # Overlapped: about (n + 1) * delay instead of 2 n delay.
    assert elapsed < 0.8 * serial, (elapsed, serial)
    assert loader.load_s >= delay * len(layers) * 0.9
    assert loader.wait_s < delay * 3


def test_the_loader_runs_at_most_depth_layers_ahead() -> None:
    fetched: list[int] = []
    gate = threading.Event()

    def fetch(layer: int) -> int:
        fetched.append(layer)
        return layer

    with LayerLoader(fetch, range(10), depth=3) as loader:
        gate.wait(0.2)
        assert fetched == [0, 1, 2]
        loader.get(0)
        gate.wait(0.2)
        assert fetched == [0, 1, 2, 3]


def test_a_fetch_error_reaches_the_consumer_typed() -> None:
    def fetch(layer: int) -> int:
        if layer == 2:
            raise RemoteUnavailable("daemon went away")
        return layer

    with LayerLoader(fetch, range(5)) as loader:
        assert loader.get(0) == 0
        assert loader.get(1) == 1
        with pytest.raises(RemoteUnavailable, match="went away"):
            loader.get(2)


def test_layers_must_be_taken_in_order() -> None:
    with LayerLoader(lambda i: i, [3, 4, 5]) as loader:
        with pytest.raises(InvalidArgument, match="out of order"):
            loader.get(4)
        assert loader.get(3) == 3


def test_close_stops_the_thread_and_get_after_close_fails() -> None:
    release = threading.Event()

    def fetch(layer: int) -> int:
        release.wait(5)
        return layer

    loader = LayerLoader(fetch, range(100), depth=2)
    release.set()
    loader.close()
    assert not loader._thread.is_alive()
    with pytest.raises(Closed, match="closed"):
        loader.get(0)


def test_bad_depth_is_rejected() -> None:
    with pytest.raises(InvalidArgument, match="depth"):
        LayerLoader(lambda i: i, [0], depth=0)
