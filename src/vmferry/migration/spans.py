"""Byte ranges of a disk that a kept partial copy still lacks.

A kept copy (presync.py) is described by its *missing* spans: [start, end)
ranges the next migration copies in full, on top of the source bitmap's
extents.  The native engine keeps them exact as it copies; for QEMU's
mirror, which says nothing of where it got, they are what the destination
image has not written (presync_target.unwritten).
"""
from __future__ import annotations

from typing import Any, Optional

Span = tuple[int, int]

# Each span is one copy with its own connections, so the list stays short:
# spans closer than the rest are merged (recopying the bytes between them).
MAX_SPANS = 64


def total(spans: list[Span]) -> int:
    return sum(e - s for s, e in spans)


def coalesce(spans: list[Span], limit: int = MAX_SPANS) -> list[Span]:
    """SPANS sorted, touching ones joined, and at most LIMIT of them: the
    smallest gaps between them are given up first."""
    out: list[Span] = []
    for s, e in sorted(spans):
        if e <= s:
            continue
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    if len(out) <= limit:
        return out
    gaps = sorted(out[i + 1][0] - out[i][1] for i in range(len(out) - 1))
    # merging every gap up to the (n - limit)th smallest leaves at most limit
    cut = gaps[len(out) - limit - 1]
    merged = [out[0]]
    for s, e in out[1:]:
        if s - merged[-1][1] <= cut:
            merged[-1] = (merged[-1][0], e)
        else:
            merged.append((s, e))
    return merged


def parse(obj: Any, size: int) -> Optional[list[Span]]:
    """Spans read from a record or a peer: None unless each is a pair of ints
    within SIZE, in order and apart, and there are at most MAX_SPANS."""
    if not isinstance(obj, list) or len(obj) > MAX_SPANS:
        return None
    out: list[Span] = []
    for item in obj:
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and
                all(isinstance(x, int) and not isinstance(x, bool) for x in item)):
            return None
        s, e = item
        if not (0 <= s < e <= size) or (out and s <= out[-1][1]):
            return None
        out.append((s, e))
    return out


def trimmed(spans: list[Span], end: int, done_below: int) -> list[Span]:
    """SPANS after the copy of the one ending at END got to DONE_BELOW (a
    span shrinks from its start as its copy goes, so its end names it)."""
    out: list[Span] = []
    for s, e in spans:
        if e == end:
            if done_below < e:
                out.append((max(s, done_below), e))
        else:
            out.append((s, e))
    return out
