"""Showing long work: a bar on a terminal, JSON lines for programs.

Both take the same snapshots, so the CLI picks one and the copy and
migration code never care which.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from typing import Any, Optional, Protocol, TextIO

from vmferry.eta import Estimator, Sample, format_eta
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

    def __init__(self, out: Optional[TextIO] = None) -> None:
        # looked up now, not at import: whoever swapped sys.stdout since wins
        self.out = out or sys.stdout

    def update(self, event: dict[str, Any]) -> None:
        self.out.write(json.dumps(event, separators=(",", ":")) + "\n")
        self.out.flush()

    def close(self) -> None:
        pass


class BarReporter:
    """A single redrawn line on stderr: label, bar, percent, rate, ETA.

    The percentage is the event's 'percent' (eta.py keeps that monotone),
    else 'done' of 'total'; either way it is clamped so the bar never runs
    backwards even if a phase re-counts.  'eta_s' and 'converging', when the
    event has them, become "ETA m:ss" or "converging…".
    """

    def __init__(self, out: Optional[TextIO] = None, min_interval: float = 0.1) -> None:
        self.out = out or sys.stderr
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
        if event.get("percent") is not None:
            frac = min(1.0, event["percent"] / 100)
        else:
            total = event.get("total") or 0
            done = event.get("done") or 0
            frac = min(1.0, done / total) if total else (1.0 if final else 0.0)
        self._best = max(self._best, frac)
        width = shutil.get_terminal_size((80, 20)).columns
        label = event.get("label", "")
        rate = event.get("rate")
        tail = f" {self._best * 100:5.1f}%"
        # fixed widths: the bar must not jump as a rate or an ETA comes and goes
        if "rate" in event:
            tail += f" {format_size(rate) + '/s' if rate else '':>12}"
        if event.get("converging"):
            tail += f" {'converging…':<12}"
        elif "eta_s" in event:
            tail += f" {'ETA ' + format_eta(event['eta_s']):<12}"
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


class CopyProgress:
    """A copy's snapshots (vmferry.copying.CopyResult) as events for a
    reporter, with the copy's percent and ETA from eta.py."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter
        self.estimator = Estimator()

    def __call__(self, snap: Any) -> None:
        self.reporter.update(self.event(snap, "progress"))

    def event(self, snap: Any, kind: str) -> dict[str, Any]:
        e = self.estimator.update(snap.seconds, Sample(
            storage_done=snap.bytes_done, storage_left=snap.bytes_total - snap.bytes_done,
            finished=kind == "done"))
        return dict(snap.as_event(kind), percent=e.percent, eta_s=e.eta_s)


def make_reporter(mode: str | None) -> Reporter:
    """mode: None/'none', 'bar', 'json', or 'auto' (a bar if stderr is a terminal)."""
    if mode == "json":
        return JsonReporter()
    if mode == "bar" or (mode == "auto" and sys.stderr.isatty()):
        return BarReporter()
    return NullReporter()
