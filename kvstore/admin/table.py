"""Plain-text tables and human-readable sizes for ``kvstore admin``."""

from __future__ import annotations

from collections.abc import Sequence

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def size(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"`` (binary units, three significant digits)."""
    value = float(n)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{int(value)} B" if unit == "B" else f"{value:.3g} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def rate(bytes_per_s: float) -> str:
    """Bandwidth as a size per second; ``-`` when nothing was measured."""
    return "-" if bytes_per_s <= 0 else f"{size(bytes_per_s)}/s"


def percent(ratio: float) -> str:
    return f"{100 * ratio:.1f}%"


def seconds(s: float) -> str:
    """``3725`` -> ``"1h2m5s"``."""
    s = int(s)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m}m{sec}s" if h else f"{m}m{sec}s" if m else f"{sec}s"


def render(headers: Sequence[str], rows: Sequence[Sequence[object]], *, right: Sequence[int] = ()) -> str:
    """A table with one header line; columns in ``right`` (indices) are right-aligned."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)
