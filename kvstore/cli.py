"""The ``kvstore`` command: ``serve``, ``bench``, ``admin``.

Run ``kvstore <command> --help`` for every option of a command.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

import yaml

from kvstore.config import DEFAULT_PORT, load
from kvstore.errors import ConfigError, KVStoreError


def _set_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE such as server.port=51062, got {text!r}")
    return key.strip(), value.strip()


def add_serve_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "serve",
        help="run the daemon",
        description=(
            "Run the kvstore daemon.  With no options it serves on 127.0.0.1:%d with a CPU tier sized "
            "from available memory (a quarter, at most 8 GiB) and a disk tier under ~/.cache/kvstore/chunks "
            "(half the free space, at most 64 GiB).  Precedence, lowest first: embedded defaults, "
            "--config FILE, KVSTORE_* environment variables (KVSTORE_SERVER__PORT=51062, "
            "KVSTORE_TIERS__CPU__CAPACITY=2GiB), then flags.  The effective config is printed at start." % DEFAULT_PORT
        ),
    )
    p.add_argument("--config", type=Path, help="YAML config file (see docs/configuration.md)")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help=f"port to listen on (default {DEFAULT_PORT}; 0 = any free port)")
    p.add_argument("--token-file", type=Path, help="YAML token file; enables bearer-token authentication")
    p.add_argument("--tls-cert", type=Path, help="server certificate (PEM); enables TLS")
    p.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    p.add_argument("--tls-client-ca", type=Path, help="CA bundle for client certificates; enables mutual TLS")
    p.add_argument("--cpu-capacity", help="capacity of the 'cpu' tier, e.g. 4GiB")
    p.add_argument("--disk-path", help="directory of the 'disk' tier")
    p.add_argument("--disk-capacity", help="capacity of the 'disk' tier, e.g. 100GiB")
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        type=_set_pair,
        metavar="KEY=VALUE",
        help="override any field by dotted path, e.g. --set server.frame_bytes=8MiB --set tiers.cpu.eviction=s3fifo",
    )
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log verbosity (default INFO)")
    p.add_argument("--print-config", action="store_true", help="print the effective config and exit")
    p.add_argument("--port-file", type=Path, help="write the bound port to this file once serving (for scripts)")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    overrides: list[tuple[str, object]] = []
    flag_map = {
        "host": "server.host",
        "port": "server.port",
        "token_file": "server.token_file",
        "tls_cert": "server.tls.cert",
        "tls_key": "server.tls.key",
        "tls_client_ca": "server.tls.client_ca",
        "cpu_capacity": "tiers.cpu.capacity",
        "disk_path": "tiers.disk.path",
        "disk_capacity": "tiers.disk.capacity",
        "log_level": "log_level",
    }
    for attr, dotted in flag_map.items():
        value = getattr(args, attr)
        if value is not None:
            overrides.append((dotted, str(value) if isinstance(value, Path) else value))
    overrides.extend(args.sets)
    cfg = load(args.config, overrides=overrides)
    print("# kvstore effective config", flush=True)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), flush=True)
    if args.print_config:
        return 0
    logging.basicConfig(level=cfg.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from kvstore.server.daemon import Daemon
    from kvstore.server.malloc import tune_for_streaming

    tune_for_streaming()  # process-wide, so here and not in Daemon (see its module)

    async def run() -> None:
        daemon = Daemon(cfg)
        port = await daemon.start()
        print(f"kvstore serving on {cfg.server.host}:{port}", flush=True)
        if args.port_file:
            args.port_file.write_text(str(port))
        await daemon.run_until_signal()
        print("kvstore stopped", flush=True)

    asyncio.run(run())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvstore",
        description="kvstore: a tiered KV-cache storage service for LLM inference.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_serve_parser(sub)
    from kvstore.bench.cli import add_bench_parser

    add_bench_parser(sub)
    from kvstore.admin.cli import add_admin_parser

    add_admin_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"kvstore: configuration error: {exc}", file=sys.stderr)
        return 2
    except KVStoreError as exc:
        print(f"kvstore: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
