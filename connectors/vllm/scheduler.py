"""Scheduler side of the vLLM connector: which tokens to load, which chunks to save.

Runs in vLLM's scheduler (EngineCore) process.  Per step vLLM calls, in order:

* ``get_num_new_matched_tokens`` for each request it considers admitting: one
  batched ``Lookup`` of the request's chunk keys at the daemon; no side effect
  on the store (it may be called again for the same request), the answer is
  remembered for the next call;
* ``update_state_after_alloc`` once blocks are allocated: the load is planned;
* ``build_connector_meta`` once per step: loads planned since the last step,
  and saves of every chunk that becomes complete in this step;
* ``request_finished`` when a request ends: its state is dropped.  Saves never
  hold blocks: the worker copies a chunk out of the paged buffers in the step
  that completes it (see :mod:`kvstore.connectors.saver`), so this returns
  ``False`` and the blocks are freed at once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvstore.connectors.chunking import TokenChunker
from kvstore.connectors.vllm.metadata import KVStoreConnectorMetadata, LoadSpec, SaveSpec
from kvstore.errors import KVStoreError
from kvstore.keys import ChunkKey, LayoutFingerprint, Namespace

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

    from kvstore.client import Client

log = logging.getLogger(__name__)

#: ``kv_transfer_params`` key: how many chunks a producer saved for the request.
PRODUCER_CHUNKS = "kvstore_chunks"


@dataclass(slots=True)
class _Tracked:
    """What the scheduler side remembers about one live request."""

    request: Request | None
    prompt: list[int]
    block_ids: list[int] = field(default_factory=list)
    #: Leading chunks known to be in the store (the lookup's answer): never re-saved.
    stored_chunks: int = 0
    #: Chunks already handed to the workers for saving (or known stored).
    saved_chunks: int = 0
    #: Tokens the last lookup says can be loaded.
    hit_tokens: int = 0
    #: Pending load, tokens [start, end).
    load: tuple[int, int] | None = None
    first_wait: float | None = None

    def tokens(self) -> list[int]:
        return list(self.request.all_token_ids) if self.request is not None else self.prompt

    def num_tokens(self) -> int:
        return self.request.num_tokens if self.request is not None else len(self.prompt)


class SchedulerSide:
    def __init__(
        self,
        client: Client,
        *,
        namespace: Namespace,
        layout: LayoutFingerprint,
        chunker: TokenChunker,
        block_size: int,
        loads: bool,
        saves: bool,
        save_decode_tokens: bool,
        wait_for_producer_s: float,
    ) -> None:
        self._client = client
        self._ns = namespace
        self._layout = layout
        self._chunker = chunker
        self._block_size = block_size
        self._loads = loads
        self._saves = saves
        self._save_decode = save_decode_tokens
        self._wait_s = wait_for_producer_s
        self._reqs: dict[str, _Tracked] = {}
        self._last_warning = 0.0
        self.lookups = 0
        self.lookup_errors = 0

    def close(self) -> None:
        self._client.close()

    # -- requests ----------------------------------------------------------------------
    def track(self, request: Request) -> _Tracked:
        st = self._reqs.get(request.request_id)
        if st is None:
            st = _Tracked(request, list(request.prompt_token_ids or []))
            self._reqs[request.request_id] = st
        return st

    def _warn(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last_warning > 10.0:
            self._last_warning = now
            log.warning(msg, *args)

    # -- loads -------------------------------------------------------------------------
    def num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        st = self.track(request)
        st.hit_tokens = 0
        if not self._loads or request.prompt_token_ids is None:
            return 0, False
        tokens = st.tokens()[: request.num_tokens]
        # The engine must compute at least the last token itself.
        full = self._chunker.full_chunks(len(tokens))
        if full == 0 or (full * self._chunker.chunk_size <= num_computed_tokens):
            return 0, False
        digests = self._chunker.digests(tokens, full)
        keys = [ChunkKey(self._ns, self._layout.digest, d) for d in digests]
        self.lookups += 1
        try:
            count = self._client.lookup(keys).count
        except KVStoreError as exc:
            self.lookup_errors += 1
            self._warn("kvstore: lookup failed, computing without the store: %s", exc)
            return 0, False
        st.stored_chunks = max(st.stored_chunks, count)
        st.saved_chunks = max(st.saved_chunks, count)
        expected = _announced_chunks(request)
        if expected is not None and count < min(expected, full):
            # A producer announced chunks that are not all visible yet (its
            # saves are still in flight): ask again shortly, up to a deadline.
            now = time.monotonic()
            if st.first_wait is None:
                st.first_wait = now
            if now - st.first_wait < self._wait_s:
                return None, False
            self._warn("kvstore: producer announced %d chunks, %d arrived; recomputing the rest", expected, count)
        hit = min(count * self._chunker.chunk_size, len(tokens) - 1)
        if hit <= num_computed_tokens:
            return 0, False
        st.hit_tokens = hit
        return hit - num_computed_tokens, False

    def after_alloc(self, request: Request, num_external_tokens: int) -> None:
        if num_external_tokens <= 0:
            return
        st = self.track(request)
        st.load = (st.hit_tokens - num_external_tokens, st.hit_tokens)

    def _load_spec(self, req_id: str, st: _Tracked) -> LoadSpec | None:
        if st.load is None:
            return None
        start, end = st.load
        st.load = None
        first = start // self._chunker.chunk_size
        last = -(-end // self._chunker.chunk_size)
        digests = self._chunker.digests(st.tokens(), last)[first:]
        return LoadSpec(req_id, digests, first, start, end, list(st.block_ids))

    # -- saves -------------------------------------------------------------------------
    def _save_spec(self, req_id: str, st: _Tracked, computed_after: int) -> SaveSpec | None:
        if not self._saves:
            return None
        limit = computed_after if self._save_decode else min(computed_after, len(st.prompt))
        full = self._chunker.full_chunks(min(limit, st.num_tokens()))
        first = max(st.saved_chunks, st.stored_chunks)
        if full <= first:
            return None  # the common decode step: no copy of the token list
        st.saved_chunks = full
        digests = self._chunker.digests(st.tokens(), full)[first:]
        nblocks = -(-full * self._chunker.chunk_size // self._block_size)
        if nblocks > len(st.block_ids):
            log.error("kvstore: request %s has %d blocks, %d needed to save; skipped", req_id, len(st.block_ids), nblocks)
            return None
        return SaveSpec(req_id, digests, first, st.block_ids[:nblocks])

    # -- per step ---------------------------------------------------------------------------
    def build_meta(self, out: SchedulerOutput) -> KVStoreConnectorMetadata:
        meta = KVStoreConnectorMetadata()
        for new in out.scheduled_new_reqs:
            st = self._reqs.get(new.req_id)
            if st is None:
                st = self._reqs[new.req_id] = _Tracked(None, list(new.prompt_token_ids or []))
            st.block_ids = list(new.block_ids[0]) if new.block_ids else []
            self._plan(meta, new.req_id, st, new.num_computed_tokens, out)
        cached = out.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            st = self._reqs.get(req_id)
            if st is None:
                continue
            new_blocks = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                # After a preemption the request owns a whole new block list.
                st.block_ids = list(new_blocks[0]) if new_blocks else []
            elif new_blocks is not None:
                st.block_ids.extend(new_blocks[0])
            self._plan(meta, req_id, st, cached.num_computed_tokens[i], out)
        return meta

    def _plan(self, meta: KVStoreConnectorMetadata, req_id: str, st: _Tracked, computed: int, out: SchedulerOutput) -> None:
        load = self._load_spec(req_id, st)
        if load is not None:
            meta.loads.append(load)
        # Speculative tokens may be rejected: their slots are not KV of the sequence yet.
        spec = len(out.scheduled_spec_decode_tokens.get(req_id, ()))
        after = computed + out.num_scheduled_tokens.get(req_id, 0) - spec
        save = self._save_spec(req_id, st, after)
        if save is not None:
            meta.saves.append(save)

    def finished(self, request: Request) -> tuple[bool, dict[str, Any] | None]:
        st = self._reqs.pop(request.request_id, None)
        if st is None or not self._saves or self._loads:
            return False, None
        # A producer tells the consumer (through the proxy) how many chunks to
        # expect, so that it waits for saves still in flight instead of missing.
        return False, {PRODUCER_CHUNKS: st.saved_chunks}


def _announced_chunks(request: Request) -> int | None:
    params = request.kv_transfer_params
    if not isinstance(params, dict):
        return None
    value = params.get(PRODUCER_CHUNKS)
    return value if isinstance(value, int) and value >= 0 else None
