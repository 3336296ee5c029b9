"""The reporting side of ``kvstore bench``: what a report from :func:`kvstore.bench.runner.run` shows.

* :func:`render_table`: every result row, with its get throughput as a share
  of the two memory-copy references, then the goals and the peer findings;
* :data:`GOALS`, :func:`goal_rows`, :func:`render_goals`: issue 3's goals,
  each a ratio of two rows of the same run, at each value size;
* :func:`plot`: put and get throughput against value size (matplotlib, PNG);
* :func:`dump_json`: the report as JSON.

A report is plain data (a dict of lists and strings), so nothing here needs
torch or a daemon.
"""

from __future__ import annotations

import json
from pathlib import Path

MiB = 1 << 20


def render_table(report: dict[str, object]) -> str:
    rows = [r for r in report["results"] if isinstance(r, dict)]  # type: ignore[attr-defined]
    ref = {r["size_bytes"]: r for r in rows if r["target"] == "memcpy"}
    cold = {r["size_bytes"]: r for r in rows if r["target"] == "memcpy-distinct"}

    def f(x: object, spec: str = ".2f") -> str:
        return "n/a" if x is None else format(x, spec)

    lines = [
        f"machine: {report['machine']}",
        "",
        f"{'size':>8} {'target':<15} {'put GB/s':>8} {'get GB/s':>9} {'put p50':>8} {'put p99':>8} "
        f"{'get p50':>8} {'get p99':>8} {'get/memcpy':>10} {'/distinct':>9}",
    ]

    def ratio(r: dict[str, object], m: dict[str, object] | None) -> float | None:
        x, y = r["get_gbps"], m["get_gbps"] if m else None
        return x / y if isinstance(x, float) and isinstance(y, float) and y > 0 else None

    for r in rows:
        size = r["size_bytes"]
        lines.append(
            f"{size / MiB:>6.0f}Mi {r['target']:<15} {f(r['put_gbps']):>8} {f(r['get_gbps']):>9} "
            f"{f(r['put_p50_ms']):>8} {f(r['put_p99_ms']):>8} {f(r['get_p50_ms']):>8} {f(r['get_p99_ms']):>8} "
            f"{f(ratio(r, ref.get(size)), '.0%'):>10} {f(ratio(r, cold.get(size)), '.0%'):>9}"
            + (f"  {r['note']}" if r["note"] else "")
        )
    lines.append("(latencies in ms; one client, one request at a time)")
    goals = render_goals(report)
    if goals:
        lines += ["", goals]
    for fd in report.get("findings", []) or []:  # type: ignore[attr-defined]
        name = fd.get("name") or fd.get("finding")
        lines.append(f"finding: {fd.get('peer', '')} {name}: observed={fd['observed']} — {fd['details']}")
    return "\n".join(lines)


#: Issue 3's goals: (what, target, op, reference, op of the reference, factor).
GOALS = (
    ("gRPC get > Redis get", "kvstore-grpc", "get", "redis", "get", 1.0),
    ("gRPC get >= 0.5x LMCache raw-TCP get", "kvstore-grpc", "get", "lmcache-tcp", "get", 0.5),
    ("shm get >= 2x LMCache MP get", "kvstore-shm", "get", "lmcache-mp", "get", 2.0),
    ("shm put >= 2x LMCache MP put", "kvstore-shm", "put", "lmcache-mp", "put", 2.0),
    ("shm get >= 0.5x memcpy-distinct", "kvstore-shm", "get", "memcpy-distinct", "get", 0.5),
    ("shm put >= 0.5x memcpy-distinct", "kvstore-shm", "put", "memcpy-distinct", "put", 0.5),
    ("(shm get >= 0.5x memcpy, cache-resident)", "kvstore-shm", "get", "memcpy", "get", 0.5),
    ("(shm put >= 0.5x memcpy, cache-resident)", "kvstore-shm", "put", "memcpy", "put", 0.5),
    ("(shm put_many of 8 >= 0.5x memcpy-distinct)", "kvstore-shm-x8", "put", "memcpy-distinct", "put", 0.5),
)


def goal_rows(report: dict[str, object]) -> list[dict[str, object]]:
    """Each goal at each size: the ratio target/reference and whether it is met."""
    rows = [r for r in report["results"] if isinstance(r, dict)]  # type: ignore[attr-defined]
    by = {(r["target"], r["size_bytes"]): r for r in rows}
    sizes = sorted({r["size_bytes"] for r in rows if r["target"] == "memcpy"})
    out: list[dict[str, object]] = []
    for what, target, op, ref, ref_op, factor in GOALS:
        for size in sizes:
            a, b = by.get((target, size)), by.get((ref, size))
            x = a.get(f"{op}_gbps") if a else None
            y = b.get(f"{ref_op}_gbps") if b else None
            ratio = x / y if isinstance(x, float) and isinstance(y, float) and y > 0 else None
            out.append({"goal": what, "size_bytes": size, "ratio": ratio, "needed": factor,
                        "met": None if ratio is None else ratio >= factor})
    return out


def render_goals(report: dict[str, object]) -> str:
    rows = goal_rows(report)
    if not rows:
        return ""
    sizes = sorted({int(r["size_bytes"]) for r in rows})  # type: ignore[call-overload]
    lines = [f"{'goal (ratio, same run)':<44}" + "".join(f"{s / MiB:>11.0f}Mi" for s in sizes)]
    for what in dict.fromkeys(r["goal"] for r in rows):
        cells = []
        for size in sizes:
            r = next(x for x in rows if x["goal"] == what and x["size_bytes"] == size)
            ratio = r["ratio"]
            cells.append("n/a" if not isinstance(ratio, float) else f"{ratio:.2f} {'ok' if r['met'] else 'NO'}")
        lines.append(f"{what:<44}" + "".join(f"{c:>13}" for c in cells))
    return "\n".join(lines)


def plot(report: dict[str, object], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["results"] if isinstance(r, dict) and r["size_bytes"]]  # type: ignore[attr-defined]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, what in zip(axes, ("put_gbps", "get_gbps"), strict=True):
        for target in dict.fromkeys(r["target"] for r in rows):
            pts = [(r["size_bytes"] / MiB, r[what]) for r in rows if r["target"] == target and r[what]]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=target)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("value size (MiB)")
        ax.set_ylabel("GB/s")
        ax.set_title(what.replace("_gbps", ""))
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(str(report["machine"]), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def dump_json(report: dict[str, object]) -> str:
    return json.dumps(report, indent=2)
