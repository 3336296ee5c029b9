"""A background thread that loads the KV of the next layers while the current one computes.

CacheBlend walks the layers in order; layer ``i + 1``'s reused KV is fetched (from the
daemon or a TieredStore), re-rotated and moved to the device while layer ``i`` is being
recomputed, so storage latency hides behind compute.  :class:`LayerLoader` runs ``fetch``
for each layer of a fixed list, in order, at most ``depth`` layers ahead of the consumer
(bounding memory), and hands the results over in order.

If ``fetch`` raises, the loader stops and the consumer's next :meth:`LayerLoader.get` raises
that same exception (typed kvstore errors stay typed).  :meth:`LayerLoader.close` stops the
thread early (waiting for a fetch under way) and is called by the context manager, so an
error in the consumer never leaves the thread running.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from kvstore.errors import Closed, InvalidArgument

T = TypeVar("T")


class LayerLoader(Generic[T]):
    """Runs ``fetch(layer)`` for ``layers`` in a thread, ``depth`` layers ahead at most."""

    def __init__(self, fetch: Callable[[int], T], layers: Sequence[int], *, depth: int = 2) -> None:
        if depth < 1:
            raise InvalidArgument(f"depth must be >= 1, got {depth}")
        self._fetch = fetch
        self._layers = list(layers)
        self._depth = depth
        self._ready: dict[int, T] = {}
        self._error: BaseException | None = None
        self._next = 0  # index into _layers of the next layer the consumer takes
        self._stop = False
        self._cond = threading.Condition()
        self.load_s = 0.0  # time spent in fetch (the loader's work)
        self.wait_s = 0.0  # time the consumer spent waiting for a layer (not hidden)
        self._thread = threading.Thread(target=self._run, name="kvstore-blend-loader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for i, layer in enumerate(self._layers):
            with self._cond:
                while not self._stop and i - self._next >= self._depth:
                    self._cond.wait()
                if self._stop:
                    return
            started = time.perf_counter()
            try:
                value = self._fetch(layer)
            except BaseException as exc:  # handed to the consumer, who re-raises it
                with self._cond:
                    self._error = exc
                    self._cond.notify_all()
                return
            with self._cond:
                if self._stop:
                    return
                self.load_s += time.perf_counter() - started
                self._ready[layer] = value
                self._cond.notify_all()

    def get(self, layer: int) -> T:
        """The result for ``layer``; layers must be taken in the order given at construction."""
        with self._cond:
            if self._stop:
                raise Closed("the layer loader was closed")
            if self._next >= len(self._layers) or self._layers[self._next] != layer:
                expected = self._layers[self._next] if self._next < len(self._layers) else None
                raise InvalidArgument(f"layer {layer} requested out of order; the loader's next layer is {expected}")
            started = time.perf_counter()
            while layer not in self._ready:
                if self._error is not None:
                    raise self._error
                if self._stop:
                    raise Closed("the layer loader was closed")
                self._cond.wait()
            self.wait_s += time.perf_counter() - started
            self._next += 1
            self._cond.notify_all()
            return self._ready.pop(layer)

    def close(self) -> None:
        """Stop loading (a fetch under way finishes first) and drop what was loaded."""
        with self._cond:
            self._stop = True
            self._ready.clear()
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def __enter__(self) -> LayerLoader[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
