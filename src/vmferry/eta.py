"""One percentage and one ETA for work made of two parts: a migration's
storage and memory (or a copy's storage alone).

The model
---------
Work left is the bytes still to move in both parts::

    left = storage left + memory left

*Memory left* is QEMU's ``ram.remaining``: it already counts the pages the
guest dirtied after they were sent, so it can grow.  Until memory migration
starts (it follows the storage copy) it is the guest's RAM size, so the
percentage does not race to 100 on the disks alone and then stall.

Each part's rate is measured from its own byte counter: bytes moved over
the time they took, both weighted down exponentially with age (an
exponentially weighted moving average whose weights follow the time between
samples, not how often they come).  A part is measured only while it has
work left or moves: a finished or not yet started part is idle, not slow.
A part whose rate is not known yet borrows the other's (both cross the
same link)::

    raw percent = done / (done + left)        done: bytes moved, both parts
    raw ETA     = storage left / storage rate + memory left / memory rate

The parts' times add because they run one after the other.

What is shown never runs backwards
----------------------------------
A raw estimate jumps: a rate changes, dirty pages are found, a disk's
copy turns out longer.  So the shown values are clamped:

* the percentage never decreases, and stays below 100 until the caller
  says everything has moved (``Sample.finished``);
* the ETA drops as soon as the raw one does, but rises by at most ``rise``
  times the wall time since the last shown ETA: an estimate that was too
  hopeful is corrected slowly, never by a jump;
* *converging*: while memory left does not shrink -- at the start of each of
  ``stall_iterations`` consecutive iterations (where it peaks: QEMU has just
  collected the dirty pages) it is above 90% of the lowest start so far --
  the guest dirties memory as fast as it is sent, and no remaining time
  follows from the rates.  The ETA is then None and shown as "converging…";
  it comes back, still clamped against the last one shown, once an
  iteration starts lower again (or nothing is left).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

# Samples closer together than this are measured together with the next
# one: a rate from a few milliseconds of bytes is noise.
MIN_DT = 0.05

# Memory left at an iteration's start must fall below this share of the
# lowest so far to count as progress (as in flow.py's downtime escalation).
SHRINK = 0.9


@dataclasses.dataclass(frozen=True)
class Sample:
    """Byte counters at one moment; 'left' includes what must be sent again."""

    storage_done: int = 0
    storage_left: int = 0
    memory_done: int = 0
    memory_left: int = 0
    memory_started: bool = False   # False: memory_left is the expected RAM size
    memory_iteration: int = 0      # QEMU's dirty-sync-count
    finished: bool = False         # everything moved: the only way to 100%


@dataclasses.dataclass(frozen=True)
class Estimate:
    percent: float                 # 0..100, never lower than the previous one
    eta_s: Optional[float]         # None: not known yet, or converging
    converging: bool
    storage_rate: float            # smoothed bytes/s; 0 until measured
    memory_rate: float


def format_eta(seconds: Optional[float]) -> str:
    if seconds is None:
        return "--:--"
    s = int(math.ceil(seconds))
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class _Rate:
    """A part's throughput: bytes over time, both decayed with time constant
    TAU_S.  Unlike an average seeded with its first sample, this is the plain
    average while the part is younger than TAU_S -- a slow first interval
    (a mirror job starting up) does not drag the rate for long."""

    def __init__(self, tau_s: float) -> None:
        self.tau_s = tau_s
        self._bytes = 0.0
        self._seconds = 0.0

    @property
    def value(self) -> Optional[float]:
        return self._bytes / self._seconds if self._seconds > 0 else None

    def add(self, moved: int, dt: float) -> None:
        keep = math.exp(-dt / self.tau_s)
        self._bytes = self._bytes * keep + max(0, moved)
        self._seconds = self._seconds * keep + dt


class Estimator:
    """Feed it samples in time order (``now`` in seconds, any origin)."""

    def __init__(self, *, memory_expected: int = 0, tau_s: float = 2.0, rise: float = 0.5,
                 stall_iterations: int = 2) -> None:
        self.memory_expected = memory_expected
        self.rise = rise
        self.stall_iterations = stall_iterations
        self._storage = _Rate(tau_s)
        self._memory = _Rate(tau_s)
        self._prev: Optional[tuple[float, Sample]] = None
        self._percent = 0.0
        self._eta: Optional[tuple[float, float]] = None   # (when, shown ETA)
        self._iteration = 0                  # the last memory iteration seen
        self._best: Optional[int] = None     # lowest memory left at an iteration's start
        self._stalled = 0                    # iterations since it was last lowered

    def update(self, now: float, s: Sample) -> Estimate:
        self._measure(now, s)
        storage_left = max(0, s.storage_left)
        memory_left = max(0, s.memory_left if s.memory_started else
                          max(s.memory_left, self.memory_expected))
        left = 0 if s.finished else storage_left + memory_left
        done = max(0, s.storage_done) + max(0, s.memory_done)
        converging = self._converging(s) and left > 0

        if s.finished:
            raw_pct = 100.0
        elif left == 0:
            # all known work moved, but the end is not confirmed: QEMU reports
            # no memory left between iterations too
            raw_pct = 99.9 if done else 0.0
        else:
            raw_pct = min(99.9, 100.0 * done / (done + left))
        self._percent = max(self._percent, round(raw_pct, 1))

        eta: Optional[float] = None
        if left == 0:
            eta = 0.0
        elif not converging:
            eta = self._raw_eta(storage_left, memory_left)
        if eta is not None:
            if self._eta is not None:
                when, shown = self._eta
                eta = min(eta, shown + self.rise * max(0.0, now - when))
            eta = round(eta, 1)
            self._eta = (now, eta)
        return Estimate(self._percent, eta, converging, self._storage.value or 0.0,
                        self._memory.value or 0.0)

    def _measure(self, now: float, s: Sample) -> None:
        if self._prev is not None:
            then, p = self._prev
            dt = now - then
            if dt < MIN_DT:
                return
            # a part is measured while it has work or moves (its first bytes
            # may come before its first count of what is left)
            if p.storage_left > 0 or s.storage_done > p.storage_done:
                self._storage.add(s.storage_done - p.storage_done, dt)
            if p.memory_started and (p.memory_left > 0 or s.memory_done > p.memory_done):
                self._memory.add(s.memory_done - p.memory_done, dt)
        self._prev = (now, s)

    def _raw_eta(self, storage_left: int, memory_left: int) -> Optional[float]:
        storage = self._storage.value
        memory = self._memory.value
        total = 0.0
        for left, own, other in ((storage_left, storage, memory),
                                 (memory_left, memory, storage)):
            if left <= 0:
                continue
            rate = own if own is not None else other
            if not rate:
                return None        # nothing measured, or nothing moving
            total += left / rate
        return total

    def _converging(self, s: Sample) -> bool:
        # Memory left peaks when an iteration starts (QEMU has just collected
        # the dirty pages) and falls while it sends them: the first sample of
        # each iteration stands for it.
        if s.memory_started and s.memory_iteration != self._iteration:
            self._iteration = s.memory_iteration
            if self._best is None or s.memory_left < self._best * SHRINK:
                self._best = s.memory_left
                self._stalled = 0
            else:
                self._stalled += 1
        return s.memory_started and self._stalled >= self.stall_iterations
