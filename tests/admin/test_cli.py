"""``kvstore admin <command>`` against a real daemon: tables by default, JSON with ``--json``.

Commands run in-process through ``kvstore.cli.main`` (what the console
script calls); one test runs the real console entry point in a subprocess.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvstore.cli import main
from kvstore.client import Client
from tests.admin.conftest import ADMIN_TOKEN, MiB, RW_TOKEN, blob, key, tiered
from tests.support.daemon import DaemonProcess


@pytest.fixture(scope="module")
def open_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """No token file: every caller is an admin."""
    root = tmp_path_factory.mktemp("admin-cli")
    with DaemonProcess(root / "d", tiered(root / "disk", cpu="16MiB")) as d:
        yield d


@pytest.fixture(scope="module")
def filled(open_daemon: DaemonProcess) -> list[str]:
    keys = [key(i, "cli") for i in range(6)]
    with Client(open_daemon.address, shm=False) as c:
        for i, k in enumerate(keys):
            c.put(k, blob(i, MiB), durable=True)
        c.get(keys[0])
        c.get(key(99, "cli"))
    return keys


def run(capsys: pytest.CaptureFixture[str], d: DaemonProcess, *argv: str) -> tuple[int, str, str]:
    """``kvstore admin ARGV... --address D``: exit code, stdout, stderr."""
    command, *rest = argv
    code = main(["admin", command, "--address", d.address, *rest])
    out = capsys.readouterr()
    return code, out.out, out.err


def run_json(capsys: pytest.CaptureFixture[str], d: DaemonProcess, *argv: str) -> Any:
    code, out, err = run(capsys, d, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def test_stats_table_and_json(
    capsys: pytest.CaptureFixture[str], open_daemon: DaemonProcess, filled: list[str]
) -> None:
    code, out, _ = run(capsys, open_daemon, "stats")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:5] == ["TIER", "KIND", "POLICY", "USED", "CAPACITY"]
    assert lines[1].split()[:3] == ["cpu", "cpu", "lru"] and "16 MiB" in lines[1]
    assert any(line.startswith("cli/m") and "12 MiB" in line for line in lines)  # 6 MiB in each tier
    assert "hit ratio 50.0%" in out
    data = run_json(capsys, open_daemon, "stats")
    cpu = data["tiers"][0]
    assert cpu["name"] == "cpu" and cpu["capacity_bytes"] == 16 * MiB and isinstance(cpu["write_bytes"], int)
    assert (data["gets"], data["hits"], data["misses"]) == (2, 1, 1)


def test_ls_pages(capsys: pytest.CaptureFixture[str], open_daemon: DaemonProcess, filled: list[str]) -> None:
    code, out, _ = run(capsys, open_daemon, "ls", "--namespace", "cli/m", "--limit", "4")
    assert code == 0 and "4 of 6 chunks; next page: --page-token " + filled[3] in out
    assert out.splitlines()[1].startswith(filled[0]) and "cpu,disk" in out and "1 MiB" in out
    page2 = run_json(capsys, open_daemon, "ls", "--namespace", "cli/m", "--limit", "4", "--page-token", filled[3])
    assert [c["key"] for c in page2["chunks"]] == filled[4:] and page2["next_page_token"] == ""
    everything = run_json(capsys, open_daemon, "ls", "--all", "--tier", "disk")
    assert [c["key"] for c in everything["chunks"]] == filled and everything["total"] == 6


def test_pin_evict_watermark_unpin(capsys: pytest.CaptureFixture[str], open_daemon: DaemonProcess,
                                   filled: list[str]) -> None:
    code, out, _ = run(capsys, open_daemon, "pin", filled[0], filled[1], "--ttl", "30")
    assert code == 0 and "pinned 2 chunks for 30 s" in out
    pins = run_json(capsys, open_daemon, "ls", filled[0])["chunks"][0]["pin_remaining_s"]
    assert 0 < pins <= 30
    code, out, _ = run(capsys, open_daemon, "evict", "--tier", "cpu", "--watermark", "2MiB")
    assert code == 0 and "tier now uses 2 MiB" in out and "NOT reached" not in out
    cpu = run_json(capsys, open_daemon, "ls", "--tier", "cpu")
    assert [c["key"] for c in cpu["chunks"]] == filled[:2]  # the pinned ones stayed
    r = run_json(capsys, open_daemon, "evict", "--tier", "cpu", "--watermark", "0")
    assert r["watermark_reached"] is False and r["chunks"] == 0
    code, out, _ = run(capsys, open_daemon, "unpin", "--namespace", "cli/m")
    assert code == 0 and "unpinned 2 chunks" in out
    r = run_json(capsys, open_daemon, "evict", filled[5], "--tier", "disk", "--drop")
    assert r["chunks"] == 1 and r["freed"][0]["key"] == filled[5]


def test_move_set_policy_recode_clear(capsys: pytest.CaptureFixture[str], open_daemon: DaemonProcess,
                                      filled: list[str]) -> None:
    code, out, _ = run(capsys, open_daemon, "move", filled[2], filled[3], "--to", "cpu")
    assert code == 0 and "moved 2 chunks (2 MiB) to cpu" in out
    code, out, _ = run(capsys, open_daemon, "set-policy", "--tier", "cpu", "--eviction", "s3fifo",
                       "--capacity", "8MiB", "--quota", "cli/m=64MiB")
    assert code == 0 and "policy s3fifo, capacity 8 MiB (max 16 MiB)" in out and "cli/m=64 MiB" in out
    r = run_json(capsys, open_daemon, "set-policy", "--tier", "cpu", "--eviction", "lru", "--capacity", "max",
                 "--quota", "cli/m=none")
    assert r["tier"]["capacity_bytes"] == 16 * MiB and r["quotas"] == {}
    r = run_json(capsys, open_daemon, "recode", "--tier", "disk", "--namespace", "cli/m", "--codec", "zstd")
    assert r["recoded"] == 0 and len(r["failed"]) == 5  # opaque bytes: reported, left alone
    code, _, err = run(capsys, open_daemon, "clear", "--namespace", "cli/m")
    assert code == 1 and "--yes" in err  # no terminal to ask on: refused
    code, out, _ = run(capsys, open_daemon, "clear", "--namespace", "cli/m", "--yes")
    assert code == 0 and "cleared 5 chunks" in out
    assert run_json(capsys, open_daemon, "ls", "--namespace", "cli/m")["total"] == 0


def test_errors_are_one_line(capsys: pytest.CaptureFixture[str], open_daemon: DaemonProcess) -> None:
    code, _, err = run(capsys, open_daemon, "ls", "--tier", "nvme")
    assert code == 1 and err.startswith("kvstore: ") and "no tier named 'nvme'" in err
    code, _, err = run(capsys, open_daemon, "move", "--to", "tape")
    assert code == 1 and "tape" in err


def test_tokens_and_admin_role(capsys: pytest.CaptureFixture[str], auth_daemon: DaemonProcess,
                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVSTORE_TOKEN", raising=False)
    code, _, err = run(capsys, auth_daemon, "stats")
    assert code == 1 and "missing 'authorization" in err
    code, _, err = run(capsys, auth_daemon, "stats", "--token", RW_TOKEN)
    assert code == 1 and "admin role" in err
    token_file = tmp_path / "token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    code, out, _ = run(capsys, auth_daemon, "stats", "--token-file", str(token_file))
    assert code == 0 and "TIER" in out
    monkeypatch.setenv("KVSTORE_TOKEN", ADMIN_TOKEN)
    assert run(capsys, auth_daemon, "stats")[0] == 0


def test_console_entry_point(open_daemon: DaemonProcess) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "kvstore.cli", "admin", "stats", "--json", "--address", open_daemon.address],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    assert [t["name"] for t in json.loads(out)["tiers"]] == ["cpu", "disk"]
