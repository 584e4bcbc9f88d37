"""How sizes and durations read, everywhere: the CLI, the TUI and error lines (base layer)."""

from __future__ import annotations

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30


def format_bytes(count: float, *, binary: bool = False) -> str:
    """Decimal units by default, as disk vendors and the hub show sizes ("93.4 GB"); `binary`
    for memory, as the status bar shows RAM and VRAM ("1.5 GiB", "512 MiB")."""
    if binary:
        return f"{count / GIB:.1f} GiB" if count >= GIB else f"{count / MIB:.0f} MiB"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


def format_count(count: float) -> str:
    """A count of things as people say it: "46.7 B", "12.9 B", "6.1 M", "950"; three significant
    digits so that a small model's "0.00 B" reads "1.2 M"."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(count) >= scale:
            return f"{count / scale:.3g} {unit}"
    return f"{count:.0f}"


def format_duration(seconds: float | None) -> str:
    """A remaining time as people read it: "5 s", "3 min 05 s", "1 h 02 min"; "?" when unknown."""
    if seconds is None:
        return "?"
    whole = max(0, round(seconds))
    if whole >= 3600:
        return f"{whole // 3600} h {whole % 3600 // 60:02d} min"
    if whole >= 60:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole} s"


def format_age(seconds: float) -> str:
    """How long ago, as a list column shows it: "now", "5 min", "3 h", "2 d"."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return "now"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min"
    if seconds < 86400:
        return f"{seconds // 3600:.0f} h"
    return f"{seconds // 86400:.0f} d"


def format_size(count: float | None) -> str:
    """`format_bytes` for a table cell: "-" when the size is unknown or nothing."""
    return format_bytes(count) if count else "-"
