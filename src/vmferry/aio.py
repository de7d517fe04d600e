"""asyncio helpers shared by the migration code and the agent."""
from __future__ import annotations

import asyncio
from typing import Any, Callable, TypeVar

T = TypeVar("T")


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """FN(*ARGS) in a worker thread, so that a slow qemu-img or a process that
    takes its time to stop does not hold up the event loop (the agent's other
    sessions and keepalives run on it).  A cancellation waits for FN to end
    before it is passed on: a rollback must never race with a step still
    creating the files it is about to remove."""
    fut = asyncio.get_running_loop().run_in_executor(None, lambda: fn(*args))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        while not fut.done():
            try:
                await asyncio.shield(fut)
            except asyncio.CancelledError:
                continue
            except BaseException:
                break
        raise
