"""``kvstore admin <command>``: the Admin service from the shell.

Every command prints a human-readable table or summary, or with ``--json``
one JSON object (the reply's fields, as documented in
``proto/kvstore/v1/admin.proto``; numbers stay numbers).  Connection options
go after the command: ``--address`` (env ``KVSTORE_ADDRESS``), ``--token``,
``--token-file`` (env ``KVSTORE_TOKEN``), ``--tls-ca``, ``--tls-cert``,
``--tls-key``, ``--tls-server-name``, ``--timeout``.  Errors print one line
and exit 1 (e.g. ``kvstore: this operation needs a token with the admin role``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvstore.admin import table
from kvstore.admin.client import DEFAULT_ADDRESS, AdminClient, selector, to_plain
from kvstore.config import parse_size
from kvstore.errors import InvalidArgument
from kvstore.v1 import admin_pb2 as apb

Handler = Callable[[AdminClient, argparse.Namespace], tuple[str, dict[str, Any]]]
if TYPE_CHECKING:
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]


def add_admin_parser(sub: SubParsers) -> None:
    """Register ``admin`` and its commands on the top-level ``kvstore`` parser."""
    p = sub.add_parser(
        "admin",
        help="inspect and steer a running daemon",
        description="Inspect and steer a running daemon through its Admin service (needs the admin role "
        "when the daemon has a token file).  Run `kvstore admin COMMAND --help` for a command's options.",
    )
    cmds = p.add_subparsers(dest="admin_command", metavar="COMMAND", required=True)
    conn = _connection_parser()
    sel = _selector_parser()

    def add(name: str, handler: Handler, what: str, parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
        cp = cmds.add_parser(name, help=what, description=what, parents=[conn, *parents])
        cp.set_defaults(func=lambda args: _run(handler, args))
        return cp

    add("stats", _stats, "per-tier and per-namespace figures: usage, hits, evictions, bandwidth", [])

    c = add("ls", _ls, "list chunks (by key, prefix, namespace, tier), a page at a time", [sel])
    c.add_argument("--limit", type=int, default=100, help="chunks per page (default 100, at most 10000)")
    c.add_argument("--page-token", default="", help="next_page_token printed by the previous page")
    c.add_argument("--all", action="store_true", help="list every page")

    c = add(
        "evict", _evict,
        "evict chunks (demoted per the tier's on_evict when --tier is given), or a tier down to a watermark", [sel],
    )
    c.add_argument("--watermark", type=_size, help="evict by the tier's policy until it uses at most this, e.g. 1GiB "
                   "(with --namespace: until the namespace holds at most this there)")
    c.add_argument("--drop", action="store_true", help="drop rather than demote to the next tier")
    c.add_argument("--force", action="store_true", help="evict pinned chunks too")

    c = add("pin", _pin, "pin chunks with a lease that ends on its own", [sel])
    c.add_argument("--ttl", type=float, required=True, help="lease in seconds (a re-pin extends it)")

    add("unpin", _unpin, "end pin leases (every lease with an empty selection)", [sel])

    c = add("move", _move, "promote or demote chunks between tiers, e.g. prefetch from disk into cpu", [sel])
    c.add_argument("--to", dest="to_tier", required=True, help="destination tier")
    c.add_argument("--from", dest="from_tier", default="", help="source tier (default: where each chunk is)")

    c = add("set-policy", _set_policy, "change eviction policy, capacity or quotas at run time (not persisted)", [])
    c.add_argument("--tier", default="", help="the tier to change")
    c.add_argument("--eviction", default="", help="eviction policy: lru, lfu, s3fifo, arc")
    c.add_argument("--capacity", help="capacity, e.g. 2GiB, up to what the tier started with; 'max' restores that")
    c.add_argument("--quota", action="append", default=[], metavar="NS=SIZE",
                   help="per-tier quota of namespace tenant/model, e.g. acme/llama=4GiB; SIZE 0 or none removes it")

    c = add("recode", _recode, "re-encode a tier's chunks with another codec or level", [sel])
    c.add_argument("--codec", required=True, help="raw, zstd, kivi, cachegen")
    c.add_argument("--level", type=int, help="codec level (default: the codec's default)")

    c = add("clear", _clear, "drop every chunk of a tier, a namespace, or everything", [])
    c.add_argument("--tier", default="", help="clear this tier")
    c.add_argument("--namespace", default="", help="clear this namespace (tenant/model)")
    c.add_argument("--all", action="store_true", help="clear everything")
    c.add_argument("--yes", action="store_true", help="do not ask for confirmation")


def _connection_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection")
    g.add_argument("--address", default=os.environ.get("KVSTORE_ADDRESS", DEFAULT_ADDRESS),
                   help=f"daemon address host:port (env KVSTORE_ADDRESS; default {DEFAULT_ADDRESS})")
    g.add_argument("--token", help="bearer token with the admin role (prefer --token-file or env KVSTORE_TOKEN)")
    g.add_argument("--token-file", type=Path, help="file holding the token")
    g.add_argument("--tls-ca", type=Path, help="CA of the daemon's certificate (PEM); enables TLS")
    g.add_argument("--tls-cert", type=Path, help="client certificate (PEM) for mutual TLS")
    g.add_argument("--tls-key", type=Path, help="client key (PEM) for mutual TLS")
    g.add_argument("--tls-server-name", help="name expected in the daemon's certificate")
    g.add_argument("--timeout", type=float, default=60.0, help="seconds per call (default 60)")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    return p


def _selector_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("selection (combined with AND)")
    g.add_argument("keys", nargs="*", metavar="KEY", help="chunk keys tenant/model/fingerprint/digest")
    g.add_argument("--prefix", default="", help="keys starting with this")
    g.add_argument("--namespace", default="", help="namespace tenant/model")
    g.add_argument("--tier", default="", help="chunks held in this tier")
    return p


def _size(text: str) -> int:
    try:
        return parse_size(text, "size")
    except InvalidArgument as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _token(args: argparse.Namespace) -> str | None:
    if args.token:
        return str(args.token)
    if args.token_file:
        try:
            return args.token_file.read_text().strip() or None
        except OSError as exc:
            raise InvalidArgument(f"--token-file: cannot read {args.token_file}: {exc.strerror}") from None
    return os.environ.get("KVSTORE_TOKEN") or None


def _run(handler: Handler, args: argparse.Namespace) -> int:
    client = AdminClient(
        args.address,
        token=_token(args),
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        server_name=args.tls_server_name,
        timeout_s=args.timeout,
    )
    with client:
        text, data = handler(client, args)
    print(json.dumps(data, indent=2, sort_keys=True) if args.json else text)
    return 0


def _sel(args: argparse.Namespace) -> apb.Selector:
    return selector(args.keys, prefix=args.prefix, namespace=args.namespace, tier=args.tier)


# -- commands -------------------------------------------------------------------------
def _stats(client: AdminClient, args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    r = client.stats()
    tiers = table.render(
        ["TIER", "KIND", "POLICY", "USED", "CAPACITY", "CHUNKS", "PINNED", "HITS", "MISSES", "EVICTED",
         "PROMOTED", "DEMOTED", "ERRORS", "READ BW", "WRITE BW", "HEALTH"],
        [
            [t.name, t.kind, t.eviction_policy, table.size(t.used_bytes), table.size(t.capacity_bytes), t.chunks,
             t.pinned_chunks, t.hits, t.misses, t.evictions, t.promotions, t.demotions, t.errors,
             table.rate(t.read_bandwidth), table.rate(t.write_bandwidth), "ok" if t.healthy else "ERRORS"]
            for t in r.tiers
        ],
        right=range(3, 15),
    )
    parts = [tiers]
    if r.namespaces:
        parts.append(table.render(
            ["NAMESPACE", "BYTES", "CHUNKS", "QUOTA", "PINNED", "HITS", "MISSES", "EVICTED", "READ", "WRITTEN"],
            [
                [n.namespace, table.size(n.bytes), n.chunks, table.size(n.quota_bytes) if n.quota_bytes else "-",
                 n.pinned_chunks, n.hits, n.misses, n.evictions, table.size(n.read_bytes), table.size(n.write_bytes)]
                for n in r.namespaces
            ],
            right=range(1, 10),
        ))
    parts.append(
        f"gets {r.gets}  hits {r.hits}  misses {r.misses}  hit ratio {table.percent(r.hit_ratio)}  "
        f"pins {r.pins}  uptime {table.seconds(r.uptime_s)}"
    )
    return "\n\n".join(parts), to_plain(r)


def _ls(client: AdminClient, args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    sel = _sel(args)
    if args.all:
        chunks = list(client.iter_chunks(sel, page_size=max(args.limit, 1000)))
        token, total = "", len(chunks)
    else:
        page = client.list_chunks(sel, page_size=args.limit, page_token=args.page_token)
        chunks, token, total = list(page.chunks), page.next_page_token, page.total
    text = table.render(
        ["KEY", "TIERS", "SIZE", "PIN"],
        [
            [c.key, ",".join(c.tiers), table.size(c.nbytes),
             table.seconds(c.pin_remaining_s) if c.pin_remaining_s else "-"]
            for c in chunks
        ],
        right=[2, 3],
    )
    text += f"\n{len(chunks)} of {total} chunks"
    if token:
        text += f"; next page: --page-token {token}"
    data = {"chunks": [to_plain(c) for c in chunks], "next_page_token": token, "total": total}
    return text, data


def _evict(client: AdminClient, args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    r = client.evict(_sel(args), watermark_bytes=args.watermark, drop=args.drop, force=args.force)
    text = f"evicted {r.chunks} chunk copies, {table.size(r.bytes)}"
    if r.skipped_pinned:
        text += f"; skipped {r.skipped_pinned} pinned (--force evicts them)"
    if args.watermark is not None:
        text += f"; tier now uses {table.size(r.used_bytes)}"
        if not r.watermark_reached:
            text += f" (watermark {table.size(args.watermark)} NOT reached: the rest is pinned or in use)"
    return text, to_plain(r)


def _pin(client: AdminClient, args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    r = client.pin(_sel(args), args.ttl)
    text = f"pinned {r.pinned} chunks for {args.ttl:g} s"
    if r.missing:
        text += f"; not held (not pinned): {', '.join(r.missing)}"
    return text, to_plain(r)


def _unpin(client: AdminClient, args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    r = client.unpin(_sel(args))
    return f"unpinned {r.unpinned} chunks", to_plain(r)


def _move(client: AdminClient, args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    r = client.move(_sel(args), args.to_tier, args.from_tier)
    text = f"moved {r.moved} chunks ({table.size(r.bytes)}) to {args.to_tier}; {r.already_there} were there already"
    if r.failed:
        text += f"; failed: {len(r.failed)}\n  " + "\n  ".join(r.failed)
    return text, to_plain(r)


def _set_policy(client: AdminClient, args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    quotas: dict[str, int] = {}
    for item in args.quota:
        ns, sep, value = item.partition("=")
        if not sep or not ns:
            raise InvalidArgument(f"--quota expects NS=SIZE such as acme/llama=4GiB, got {item!r}")
        quotas[ns] = 0 if value.strip().lower() in ("none", "0", "") else parse_size(value, f"--quota {ns}")
    capacity = None
    if args.capacity is not None:
        capacity = 0 if args.capacity.lower() == "max" else parse_size(args.capacity, "--capacity")
    r = client.set_policy(args.tier, eviction_policy=args.eviction, capacity_bytes=capacity, quotas=quotas)
    lines = []
    if r.HasField("tier"):
        t = r.tier
        lines.append(f"tier {t.name}: policy {t.eviction_policy}, capacity {table.size(t.capacity_bytes)} "
                     f"(max {table.size(t.max_capacity_bytes)}), used {table.size(t.used_bytes)}")
    lines.append(f"evicted {r.evicted_chunks} chunk copies, {table.size(r.evicted_bytes)}")
    lines.append("quotas: " + (", ".join(f"{ns}={table.size(q)}" for ns, q in sorted(r.quotas.items())) or "none"))
    return "\n".join(lines), to_plain(r)


def _recode(client: AdminClient, args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    r = client.recode(_sel(args), args.codec, args.level)
    text = (f"recoded {r.recoded} chunks: {table.size(r.bytes_before)} -> {table.size(r.bytes_after)}; "
            f"{r.unchanged} already {args.codec}")
    if r.failed:
        text += f"; failed: {len(r.failed)}\n  " + "\n  ".join(f"{f.key}: {f.reason}" for f in r.failed)
    return text, to_plain(r)


def _clear(client: AdminClient, args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    what = "EVERY chunk" if args.all else "the chunks of " + " in tier ".join(filter(None, [args.namespace, args.tier]))
    if not args.yes:
        if not sys.stdin.isatty():
            raise InvalidArgument(f"clear drops {what}; pass --yes to confirm")
        answer = input(f"Drop {what} on {client.address}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            return "nothing cleared", {"chunks": 0, "bytes": 0}
    r = client.clear(tier=args.tier, namespace=args.namespace, everything=args.all, confirm=True)
    return f"cleared {r.chunks} chunks, {table.size(r.bytes)}", to_plain(r)
