"""Daemon configuration: sources and their precedence, sizes, and validation
errors that name the field at fault."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from kvstore.config import DEFAULT_PORT, build, default_tree, env_overrides, format_size, load, parse_size
from kvstore.errors import ConfigError

MiB = 1 << 20


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No KVSTORE_* variable of the caller leaks in; the default disk path is under tmp."""
    import os

    for name in list(os.environ):
        if name.startswith("KVSTORE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _tree(**server: Any) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1", "port": 0, **server},
        "tiers": [
            {"name": "cpu", "kind": "cpu", "capacity": "64MiB"},
            {"name": "disk", "kind": "disk", "capacity": "1GiB", "path": "/tmp/kvstore-test", "write_through": True},
        ],
    }


def _yaml(tmp_path: Path, tree: dict[str, Any]) -> Path:
    path = tmp_path / "kvstore.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


# -- sources and precedence -------------------------------------------------------------------------
def test_defaults_need_no_file(tmp_path: Path) -> None:
    cfg = load(environ={})
    assert cfg.server.host == "127.0.0.1" and cfg.server.port == DEFAULT_PORT
    assert [(t.name, t.kind) for t in cfg.tiers] == [("cpu", "cpu"), ("disk", "disk")]
    assert cfg.tiers[1].path == tmp_path / "cache" / "kvstore" / "chunks"
    assert cfg.tiers[1].settings.write_through
    assert cfg.server.token_file is None and not cfg.server.tls.enabled
    assert 64 * MiB <= cfg.tiers[0].capacity_bytes <= 8 << 30


def test_precedence_defaults_file_env_overrides(tmp_path: Path) -> None:
    tree = _tree(port=1111, max_batch=10)
    tree["tiers"][0]["capacity"] = "100MiB"
    path = _yaml(tmp_path, tree)
    # The file over the defaults.
    cfg = load(path, environ={})
    assert (cfg.server.port, cfg.server.max_batch, cfg.tiers[0].capacity_bytes) == (1111, 10, 100 * MiB)
    assert cfg.server.frame_bytes == 4 * MiB  # not in the file: the default
    # The environment over the file.
    env = {"KVSTORE_SERVER__PORT": "2222", "KVSTORE_TIERS__CPU__CAPACITY": "200MiB", "KVSTORE_OTHER": "ignored"}
    cfg = load(path, environ=env)
    assert (cfg.server.port, cfg.server.max_batch, cfg.tiers[0].capacity_bytes) == (2222, 10, 200 * MiB)
    # Flags (overrides) over the environment.
    cfg = load(path, environ=env, overrides=[("server.port", 3333), ("tiers.cpu.capacity", "300MiB")])
    assert (cfg.server.port, cfg.tiers[0].capacity_bytes) == (3333, 300 * MiB)
    assert cfg.server.max_batch == 10


def test_environment_is_read_from_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVSTORE_SERVER__PORT", "4444")
    monkeypatch.setenv("KVSTORE_LOG_LEVEL", "debug")
    cfg = load()
    assert cfg.server.port == 4444 and cfg.log_level == "DEBUG"


def test_env_overrides_only_take_config_sections() -> None:
    env = {"KVSTORE_SERVER__TLS__CERT": "/c", "KVSTORE_TEST_ADDRESS": "x", "PATH": "/bin", "KVSTORE_QUOTAS__A/M": "1GiB"}
    assert env_overrides(env) == [("quotas.a/m", "1GiB"), ("server.tls.cert", "/c")]


def test_a_files_tiers_replace_the_default_list(tmp_path: Path) -> None:
    path = _yaml(tmp_path, {"tiers": [{"name": "mem", "kind": "cpu", "capacity": "32MiB"}]})
    cfg = load(path, environ={})
    assert [t.name for t in cfg.tiers] == ["mem"]
    assert cfg.server.port == DEFAULT_PORT


def test_overrides_reach_quotas_and_nested_fields(tmp_path: Path) -> None:
    cfg = load(
        _yaml(tmp_path, _tree()),
        environ={},
        overrides=[("quotas.acme/meta-llama/Llama-3.1-8B", "2GiB"), ("tiers.cpu.eviction", "s3fifo"), ("server.shm", "off")],
    )
    assert cfg.quotas == (("acme/meta-llama/Llama-3.1-8B", 2 << 30),)
    assert cfg.tiers[0].settings.eviction == "s3fifo"
    assert cfg.server.shm is False


def test_override_of_unknown_tier_names_the_tiers() -> None:
    with pytest.raises(ConfigError, match=r"tiers.gpu.capacity.*no tier named 'gpu'.*\['cpu', 'disk'\]"):
        load(environ={}, overrides=[("tiers.gpu.capacity", "1GiB")])


def test_config_round_trips_through_its_printed_form(tmp_path: Path) -> None:
    cfg = load(_yaml(tmp_path, _tree(max_batch=77)), environ={}, overrides=[("quotas.a/m", "1GiB")])
    printed = yaml.safe_load(yaml.safe_dump(cfg.to_dict()))
    assert printed["server"]["max_batch"] == 77
    assert printed["tiers"][0]["capacity"] == "64MiB"
    assert printed["quotas"] == {"a/m": "1GiB"}


# -- sizes ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "n"),
    [
        (1048576, MiB),
        ("1048576", MiB),
        ("512MiB", 512 * MiB),
        ("4GiB", 4 << 30),
        ("1.5GB", 1_500_000_000),
        ("2 kib", 2048),
        ("10K", 10_000),
        ("3MB", 3_000_000),
        ("1TiB", 1 << 40),
        ("0", 0),
        ("7b", 7),
    ],
)
def test_sizes_parse(text: object, n: int) -> None:
    assert parse_size(text, "f") == n


@pytest.mark.parametrize("text", ["", "MiB", "-1", -1, "1.5 XB", "4 GiB GiB", True, None, 1.5, [1]])
def test_bad_sizes_name_the_field(text: object) -> None:
    with pytest.raises(ConfigError, match="^tiers.cpu.capacity: "):
        parse_size(text, "tiers.cpu.capacity")


def test_format_size() -> None:
    assert [format_size(n) for n in (MiB, 3 << 30, 1536, 1000)] == ["1MiB", "3GiB", "1.5KiB", "1000B"]


# -- validation errors name their field ------------------------------------------------------------------
def _bad(mutate: Any, field: str) -> None:
    tree = copy.deepcopy(_tree())
    mutate(tree)
    with pytest.raises(ConfigError) as info:
        build(tree)
    assert field in str(info.value), f"{field!r} not named in: {info.value}"


CASES: dict[str, tuple[Any, str]] = {
    "unknown top-level field": (lambda t: t.update(sever={}), "config: unknown field(s) ['sever']"),
    "unknown server field": (lambda t: t["server"].update(prot=1), "server: unknown field(s) ['prot']"),
    "unknown tls field": (lambda t: t["server"].update(tls={"crt": "x"}), "server.tls: unknown field(s) ['crt']"),
    "unknown tier field": (lambda t: t["tiers"][0].update(size="1GiB"), "tiers.cpu: unknown field(s) ['size']"),
    "port too big": (lambda t: t["server"].update(port=70000), "server.port"),
    "port negative": (lambda t: t["server"].update(port=-1), "server.port"),
    "port not a number": (lambda t: t["server"].update(port="http"), "server.port"),
    "port fractional": (lambda t: t["server"].update(port=80.5), "server.port"),
    "port boolean": (lambda t: t["server"].update(port=True), "server.port"),
    "empty host": (lambda t: t["server"].update(host=""), "server.host"),
    "frame too small": (lambda t: t["server"].update(frame_bytes="1KiB"), "server.frame_bytes"),
    "frame too big": (lambda t: t["server"].update(frame_bytes="128MiB"), "server.frame_bytes"),
    "bad frame size": (lambda t: t["server"].update(frame_bytes="big"), "server.frame_bytes"),
    "max_batch zero": (lambda t: t["server"].update(max_batch=0), "server.max_batch"),
    "max_chunk zero": (lambda t: t["server"].update(max_chunk_bytes=0), "server.max_chunk_bytes"),
    "shm not a bool": (lambda t: t["server"].update(shm="maybe"), "server.shm"),
    "grace negative": (lambda t: t["server"].update(grace_s=-1), "server.grace_s"),
    "reserved share zero": (lambda t: t["server"].update(shm_reserved_share=0), "server.shm_reserved_share"),
    "reserved share over one": (lambda t: t["server"].update(shm_reserved_share=1.5), "server.shm_reserved_share"),
    "reserved share not a number": (lambda t: t["server"].update(shm_reserved_share="half"), "server.shm_reserved_share"),
    "reserved share boolean": (lambda t: t["server"].update(shm_reserved_share=True), "server.shm_reserved_share"),
    "missing token file": (lambda t: t["server"].update(token_file="/nonexistent/tokens.yaml"), "server.token_file"),
    "tls cert without key": (lambda t: t["server"].update(tls={"cert": __file__}), "server.tls"),
    "tls missing file": (
        lambda t: t["server"].update(tls={"cert": "/nonexistent.pem", "key": "/nonexistent.key"}),
        "server.tls.cert",
    ),
    "client_ca without cert": (lambda t: t["server"].update(tls={"client_ca": __file__}), "server.tls.client_ca"),
    "tiers not a list": (lambda t: t.update(tiers={"cpu": {}}), "tiers must be a list"),
    "no tiers": (lambda t: t.update(tiers=[]), "tiers: at least one tier"),
    "tier not a mapping": (lambda t: t["tiers"].__setitem__(0, "cpu"), "tiers[0]"),
    "unknown tier kind": (lambda t: t["tiers"][0].update(kind="tape"), "tiers.cpu.kind must be one of"),
    "bad tier name": (lambda t: t["tiers"][0].update(name="CPU!"), "tiers.CPU!.name"),
    "tier capacity too small": (lambda t: t["tiers"][0].update(capacity="100KiB"), "tiers.cpu.capacity"),
    "bad tier capacity": (lambda t: t["tiers"][0].update(capacity="lots"), "tiers.cpu.capacity"),
    "disk without path": (lambda t: t["tiers"][1].pop("path"), "tiers.disk.path is required"),
    "redis without url": (
        lambda t: t["tiers"].append({"name": "r", "kind": "redis"}),
        "tiers.r.url is required",
    ),
    "unknown eviction policy": (lambda t: t["tiers"][0].update(eviction="random"), "tiers.cpu.eviction must be one of"),
    "bad on_evict": (lambda t: t["tiers"][0].update(on_evict="keep"), "tiers.cpu.on_evict"),
    "bad on_full": (lambda t: t["tiers"][1].update(on_full="wait"), "tiers.disk.on_full"),
    "bad write_through": (lambda t: t["tiers"][1].update(write_through="sometimes"), "tiers.disk.write_through"),
    "bad queue_depth": (lambda t: t["tiers"][1].update(queue_depth=0), "tiers.disk.queue_depth"),
    "bad workers": (lambda t: t["tiers"][1].update(workers=1000), "tiers.disk.workers"),
    "duplicate tier names": (lambda t: t["tiers"][1].update(name="cpu", kind="cpu"), "tiers: names must be unique"),
    "quotas not a mapping": (lambda t: t.update(quotas=["a/m"]), "quotas must be a mapping"),
    "quota namespace without model": (lambda t: t.update(quotas={"acme": "1GiB"}), "quotas: namespace 'acme'"),
    "quota bad tenant": (lambda t: t.update(quotas={"-x/m": "1GiB"}), "quotas: namespace.tenant"),
    "quota bad size": (lambda t: t.update(quotas={"a/m": "much"}), "quotas.a/m: expected a size"),
    "quota zero": (lambda t: t.update(quotas={"a/m": 0}), "quotas.a/m"),
    "bad log level": (lambda t: t.update(log_level="chatty"), "log_level"),
    "server not a mapping": (lambda t: t.update(server=[1]), "server must be a mapping"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_validation_errors_name_the_field(case: str) -> None:
    mutate, field = CASES[case]
    _bad(mutate, field)


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--config: cannot read"):
        load(tmp_path / "missing.yaml", environ={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("server: [unclosed")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load(bad, environ={})
    bad.write_text("- a list\n- at the top\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load(bad, environ={})


def test_env_values_are_validated_too() -> None:
    with pytest.raises(ConfigError, match="server.port"):
        load(environ={"KVSTORE_SERVER__PORT": "not-a-port"})
    with pytest.raises(ConfigError, match="tiers.cpu.capacity"):
        load(environ={"KVSTORE_TIERS__CPU__CAPACITY": "2 parsecs"})
    with pytest.raises(ConfigError, match="server.shm_reserved_share"):
        load(environ={"KVSTORE_SERVER__SHM_RESERVED_SHARE": "2"})
    assert load(environ={"KVSTORE_SERVER__SHM_RESERVED_SHARE": "0.25"}).server.shm_reserved_share == 0.25


def test_default_tree_is_a_fresh_copy() -> None:
    a = default_tree()
    a["server"]["port"] = 1
    assert default_tree()["server"]["port"] == DEFAULT_PORT
