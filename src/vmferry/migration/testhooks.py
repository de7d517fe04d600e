"""Fault-injection points for the tests, in one place; unset in normal use.

VMFERRY_TEST_HOLD=POINT:SECONDS makes a migration wait that long at POINT, so
a test can kill a process or send a signal at a moment no timing could hit
reliably.  Points: "prepare", "perform" and "finish" (before those phases,
flow.py), "switchover" (the source paused at pre-switchover, before the disks
are settled, flow.py), "finishing" (the destination's Finish saw everything
arrive and is about to resume the guest, incoming.py),
"final-pass" (the source paused at pre-switchover, before the native engine's
last pass, flow.py) and "resumed" (the destination has just resumed the
guest, incoming.py).
"""
from __future__ import annotations

import asyncio
import os


async def hold(point: str) -> None:
    spec = os.environ.get("VMFERRY_TEST_HOLD", "")
    if spec.partition(":")[0] == point:
        await asyncio.sleep(float(spec.partition(":")[2] or 1))
