"""Fault-injection points and tuning knobs for the tests, in one place;
unset in normal use.

VMFERRY_TEST_HOLD=POINT:SECONDS makes a migration wait that long at POINT, so
a test can kill a process or send a signal at a moment no timing could hit
reliably.  Points: "prepare", "perform" and "finish" (before those phases,
flow.py), "switchover" (the source paused at pre-switchover, before the disks
are settled, flow.py), "finishing" (the destination's Finish saw everything
arrive and is about to resume the guest, incoming.py),
"final-pass" (the source paused at pre-switchover, before the native engine's
last pass, flow.py) and "resumed" (the destination has just resumed the
guest, incoming.py).

VMFERRY_NATIVE_TUNING (native_tuning) limits the native engine's passes.
"""
from __future__ import annotations

import asyncio
import functools
import os
from typing import Any

from vmferry.errors import UsageError


async def hold(point: str) -> None:
    spec = os.environ.get("VMFERRY_TEST_HOLD", "")
    if spec.partition(":")[0] == point:
        await asyncio.sleep(float(spec.partition(":")[2] or 1))


_INT_KNOBS = ("connections", "requests", "request_size", "direct")


def native_tuning() -> dict[str, Any]:
    """VMFERRY_NATIVE_TUNING="connections=N,requests=N,request_size=BYTES,direct=0|1,
    zero_copy=auto|on|off": limits on the native engine's passes, for the
    tests (a guest that out-writes the engine) and for hosts where storage
    traffic must stay small; direct=0 reads raw images through the source
    QEMU, as qcow2 is read; zero_copy picks the engine's lanes.  A bad value
    is a UsageError, raised when a migration begins (flow.py), never midway."""
    return _parse_tuning(os.environ.get("VMFERRY_NATIVE_TUNING", ""))


@functools.cache
def _parse_tuning(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        try:
            if key in _INT_KNOBS:
                out[key] = int(value)
                if out[key] < 0:
                    raise ValueError
            elif key == "zero_copy" and value in ("auto", "on", "off"):
                out[key] = value
            else:
                raise ValueError
        except ValueError:
            raise UsageError(f"VMFERRY_NATIVE_TUNING: {item!r} is not one of "
                             f"{', '.join(k + '=N' for k in _INT_KNOBS)}, "
                             f"zero_copy=auto|on|off") from None
    return out
