"""The ``kvstore`` command: help that lists every option, ``serve --print-config``,
configuration errors (exit status 2, the field named) and a daemon started
with no configuration at all."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import yaml

from kvstore.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    return capsys.readouterr().out


def test_console_script_is_installed() -> None:
    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get("kvstore") == "kvstore.cli:main"


def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    out = _help(["--help"], capsys)
    commands = _subcommands()
    assert {"serve", "bench"} <= set(commands)
    for name in commands:
        assert name in out


@pytest.mark.parametrize("command", sorted(_subcommands()))
def test_command_help_mentions_every_flag(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = _help([command, "--help"], capsys)
    flags = [s for a in _subcommands()[command]._actions for s in a.option_strings]
    assert flags, command
    missing = [f for f in flags if f not in out]
    assert not missing, f"kvstore {command} --help does not mention {missing}"
    for action in _subcommands()[command]._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{action.option_strings} has no help text"


def test_serve_and_bench_have_the_documented_flags() -> None:
    serve = {s for a in _subcommands()["serve"]._actions for s in a.option_strings}
    assert {
        "--config", "--host", "--port", "--token-file", "--tls-cert", "--tls-key", "--tls-client-ca",
        "--cpu-capacity", "--disk-path", "--disk-capacity", "--set", "--log-level", "--print-config", "--port-file",
    } <= serve
    bench = {s for a in _subcommands()["bench"]._actions for s in a.option_strings}
    assert {"--address", "--sizes", "--iters", "--peers", "--json"} <= bench


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in list(os.environ):
        if name.startswith("KVSTORE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path


def test_print_config_prints_yaml_and_exits_0(clean_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["serve", "--print-config", "--port", "0", "--cpu-capacity", "64MiB", "--set", "server.max_batch=99"])
    assert rc == 0
    out = capsys.readouterr().out
    printed = yaml.safe_load(out)
    assert printed["server"]["port"] == 0
    assert printed["server"]["max_batch"] == 99
    assert printed["tiers"][0]["capacity"] == "64MiB"
    assert printed["tiers"][1]["path"] == str(clean_env / "cache" / "kvstore" / "chunks")
    assert not (clean_env / "cache" / "kvstore").exists()  # printing creates nothing


def test_print_config_reads_file_and_environment(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = clean_env / "kvstore.yaml"
    cfg.write_text(yaml.safe_dump({"server": {"port": 1111, "max_batch": 5}}))
    monkeypatch.setenv("KVSTORE_SERVER__PORT", "2222")
    assert main(["serve", "--config", str(cfg), "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["server"]["port"], printed["server"]["max_batch"]) == (2222, 5)
    assert main(["serve", "--config", str(cfg), "--print-config", "--port", "3333"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["server"]["port"] == 3333


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["--port", "70000"], "server.port"),
        (["--cpu-capacity", "lots"], "tiers.cpu.capacity"),
        (["--set", "server.frame_bytes=1KiB"], "server.frame_bytes"),
        (["--set", "tiers.cpu.eviction=random"], "tiers.cpu.eviction"),
        (["--set", "server.nope=1"], "server: unknown field(s) ['nope']"),
        (["--token-file", "/nonexistent/tokens.yaml"], "server.token_file"),
        (["--config", "/nonexistent/kvstore.yaml"], "--config"),
    ],
)
def test_config_error_exits_2_naming_the_field(
    clean_env: Path, capsys: pytest.CaptureFixture[str], argv: list[str], field: str
) -> None:
    assert main(["serve", "--print-config", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvstore: configuration error:")
    assert field in err


def test_bad_flag_syntax_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", "--set", "no-equals-sign"])
    assert info.value.code == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err


def test_config_error_from_the_real_command_exits_2(clean_env: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    run = subprocess.run(
        [sys.executable, "-m", "kvstore.cli", "serve", "--port", "-5"],
        capture_output=True, text=True, env=env, timeout=120, cwd=REPO,
    )
    assert run.returncode == 2, run.stderr
    assert "server.port" in run.stderr
    assert "Traceback" not in run.stderr


def test_serve_with_no_config_starts_on_embedded_defaults(clean_env: Path) -> None:
    """No --config, no KVSTORE_* variables, HOME and XDG_CACHE_HOME in a temp dir."""
    from tests.server import SERVING, health

    env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    env.update(HOME=str(clean_env / "home"), XDG_CACHE_HOME=str(clean_env / "cache"))
    port_file = clean_env / "port"
    log = (clean_env / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvstore.cli", "serve", "--port", "0", "--cpu-capacity", "64MiB",
         "--port-file", str(port_file)],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
    )
    try:
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            assert proc.poll() is None, (clean_env / "serve.log").read_text()
            assert time.monotonic() < deadline, "the daemon did not start"
            time.sleep(0.05)  # the port file is the daemon's only signal that it is up
        address = f"127.0.0.1:{int(port_file.read_text())}"
        assert health(address) == SERVING
        assert health(address, "kvstore.v1.KVStore") == SERVING
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    text = (clean_env / "serve.log").read_text()
    printed = yaml.safe_load(text.split("kvstore serving on")[0])
    assert [t["name"] for t in printed["tiers"]] == ["cpu", "disk"]
    assert printed["tiers"][1]["path"] == str(clean_env / "cache" / "kvstore" / "chunks")
    assert (clean_env / "cache" / "kvstore" / "chunks").is_dir()  # the default disk tier lives there
    assert "kvstore stopped" in text
