"""Fixtures: a real kvstore daemon on loopback and backends built by SGLang's factory."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

try:
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig
    from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory
except ImportError:  # SGLang is installed by .ci/run (pip install --no-deps sglang==0.5.23 ...)
    collect_ignore_glob = ["test_*.py"]
else:
    from kvstore.connectors.sglang import KVStoreHiCacheStorage
from tests.support.daemon import DaemonProcess, cpu_only

DYNAMIC = {
    "backend_name": "kvstore",
    "module_path": "kvstore.connectors.sglang",
    "class_name": "KVStoreHiCacheStorage",
    "interface_v1": 1,
}


def storage_config(
    extra: dict[str, Any], *, tp_rank: int = 0, tp_size: int = 1, mla: bool = False, pp: tuple[int, int] = (0, 1),
    model: str | None = "HuggingFaceTB/SmolLM2-135M", metrics: bool = False,
) -> HiCacheStorageConfig:
    return HiCacheStorageConfig(
        tp_rank=tp_rank, tp_size=tp_size, pp_rank=pp[0], pp_size=pp[1], attn_cp_rank=0, attn_cp_size=1,
        is_mla_model=mla, enable_storage_metrics=metrics, is_page_first_layout=False, model_name=model,
        extra_config={**DYNAMIC, **extra},
    )


#: A small segment (committing its pages takes time) and a deadline generous
#: enough for a loaded 2-core CI machine.
SMALL = {"shm_bytes": "32MiB", "timeout_s": 30}


def build(extra: dict[str, Any], pool: Any = None, **kw: Any) -> KVStoreHiCacheStorage:
    """The way SGLang's cache controller does it: factory, then register the pool."""
    backend = StorageBackendFactory.create_backend("dynamic", storage_config({**SMALL, **extra}, **kw), pool)
    assert isinstance(backend, KVStoreHiCacheStorage)
    if pool is not None:
        backend.register_mem_pool_host(pool)
    return backend


@pytest.fixture(scope="module")
def kv_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    d = DaemonProcess(tmp_path_factory.mktemp("kvd"), cpu_only("512MiB")).start()
    yield d
    d.stop()


def _tenant(request: pytest.FixtureRequest) -> str:
    return "t" + hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:16]


@pytest.fixture
def tenant(request: pytest.FixtureRequest) -> str:
    return _tenant(request)


Factory = Callable[..., KVStoreHiCacheStorage]


@pytest.fixture(params=["shm", "stream", "local"])
def make_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Factory]:
    """Backends over shared memory, over the gRPC stream, and in-process."""
    made: list[KVStoreHiCacheStorage] = []
    mode = request.param

    def make(pool: Any = None, extra: dict[str, Any] | None = None, **kw: Any) -> KVStoreHiCacheStorage:
        base: dict[str, Any]
        if mode == "local":
            base = {"mode": "local", "local_capacity": "32MiB"}
        else:
            daemon = request.getfixturevalue("kv_daemon")
            # one namespace per test: the module's daemon outlives each test
            base = {"address": daemon.address, "shm": mode == "shm", "tenant": _tenant(request), **SMALL}
        b = build({**base, **(extra or {})}, pool, **kw)
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()
