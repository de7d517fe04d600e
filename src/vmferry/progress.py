"""Showing long work: a bar on a terminal, JSON lines for programs.

Both take the same snapshots, so the CLI picks one and the copy and
migration code never care which.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from typing import Any, Protocol, TextIO

from vmferry.units import format_size


class Reporter(Protocol):
    def update(self, event: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class NullReporter:
    def update(self, event: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class JsonReporter:
    """One JSON object per line; 'event' says what kind."""

    def __init__(self, out: TextIO = sys.stdout) -> None:
        self.out = out

    def update(self, event: dict[str, Any]) -> None:
        self.out.write(json.dumps(event, separators=(",", ":")) + "\n")
        self.out.flush()

    def close(self) -> None:
        pass


class BarReporter:
    """A single redrawn line on stderr: label, bar, percent, rate.

    The percentage comes from the caller's 'done' and 'total'; it is
    clamped so the bar never runs backwards even if a phase re-counts.
    """

    def __init__(self, out: TextIO = sys.stderr, min_interval: float = 0.1) -> None:
        self.out = out
        self.min_interval = min_interval
        self._last_draw = 0.0
        self._best = 0.0
        self._drawn = False

    def update(self, event: dict[str, Any]) -> None:
        now = time.monotonic()
        final = event.get("event") == "done"
        if not final and now - self._last_draw < self.min_interval:
            return
        self._last_draw = now
        total = event.get("total") or 0
        done = event.get("done") or 0
        frac = min(1.0, done / total) if total else (1.0 if final else 0.0)
        self._best = max(self._best, frac)
        width = shutil.get_terminal_size((80, 20)).columns
        label = event.get("label", "")
        rate = event.get("rate")
        tail = f" {self._best * 100:5.1f}%"
        if rate:
            tail += f" {format_size(rate)}/s"
        barw = max(10, width - len(label) - len(tail) - 4)
        fill = int(self._best * barw)
        line = f"{label} [{'#' * fill}{'.' * (barw - fill)}]{tail}"
        self.out.write("\r" + line[: width - 1])
        self.out.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self.out.write("\n")
            self.out.flush()
            self._drawn = False


def make_reporter(mode: str | None) -> Reporter:
    """mode: None/'none', 'bar', 'json', or 'auto' (a bar if stderr is a terminal)."""
    if mode == "json":
        return JsonReporter()
    if mode == "bar" or (mode == "auto" and sys.stderr.isatty()):
        return BarReporter()
    return NullReporter()
