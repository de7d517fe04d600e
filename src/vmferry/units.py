"""Sizes as people type and read them: 256K, 1.5G, 2 GiB."""
from __future__ import annotations

import re
from typing import Optional

from vmferry.errors import UsageError

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str | int, what: str = "size") -> int:
    """'256K' -> 262144.  Suffixes are binary (K = KiB), as in qemu-img."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.I)
    if not m:
        raise UsageError(f"{what} {text!r} is not a size: use a number with an optional K, M, G or T")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def mib_per_second(value: Optional[int], flag: str) -> int:
    """A bandwidth option in MiB/s as bytes per second; 0 for None (no limit)."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UsageError(f"{flag} must be a positive whole number of MiB/s, not {value!r}")
    return value << 20


def format_size(n: float) -> str:
    """2147483648 -> '2.00 GiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
