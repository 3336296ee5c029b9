"""The generated stubs and what the daemon advertises.

The checked-in stubs under ``kvstore/v1/`` must be what ``protoc`` makes of
``proto/`` today, and a running daemon must list its services through server
reflection, so that tools (grpcurl, Postman) work without the .proto file.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc
from tests.server import channel
from tests.support.daemon import DaemonProcess, cpu_only

REPO = Path(__file__).resolve().parents[2]


def test_checked_in_stubs_are_not_stale() -> None:
    run = subprocess.run(
        [sys.executable, "scripts/gen_proto.py", "--check"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_stub_has_every_rpc_of_the_proto() -> None:
    service = pb.DESCRIPTOR.services_by_name["KVStore"]
    assert service.full_name == "kvstore.v1.KVStore"
    names = {m.name for m in service.methods}
    assert {"Put", "Get", "Lookup", "Exists", "Delete", "RegisterSegment", "ReleaseSegment", "ShmPut", "ShmGet"} <= names
    servicer = pb_grpc.KVStoreServicer
    assert all(hasattr(servicer, n) for n in names)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    with DaemonProcess(tmp_path_factory.mktemp("stubs"), cpu_only("8MiB")) as d:
        yield d


def _reflect(address: str, request: reflection_pb2.ServerReflectionRequest) -> reflection_pb2.ServerReflectionResponse:
    with channel(address) as ch:
        replies = list(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(iter([request]), timeout=10))
    assert len(replies) == 1
    return replies[0]


def test_reflection_lists_the_services(server: DaemonProcess) -> None:
    reply = _reflect(server.address, reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {s.name for s in reply.list_services_response.service}
    assert {"kvstore.v1.KVStore", "grpc.health.v1.Health"} <= names


def test_reflection_serves_the_kvstore_descriptor(server: DaemonProcess) -> None:
    reply = _reflect(
        server.address, reflection_pb2.ServerReflectionRequest(file_containing_symbol="kvstore.v1.KVStore")
    )
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in reply.file_descriptor_response.file_descriptor_proto
    ]
    ours = next(f for f in files if f.package == "kvstore.v1")
    methods = {m.name: (m.client_streaming, m.server_streaming) for m in ours.service[0].method}
    assert methods["Put"] == (True, False)
    assert methods["Get"] == (False, True)
    assert methods["Lookup"] == (False, False)
