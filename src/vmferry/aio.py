"""asyncio helpers shared by the migration code and the agent."""
from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, TypeVar

T = TypeVar("T")


async def uncancellable(aw: Awaitable[T]) -> T:
    """Await AW to its end even if this task is cancelled meanwhile (a second
    Ctrl-C or SIGHUP during a teardown must not leave it half done); the
    cancellation is passed on once AW has finished."""
    inner = asyncio.ensure_future(aw)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(inner)
            break
        except asyncio.CancelledError:
            if inner.done():
                raise                   # AW itself was cancelled
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return result


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """FN(*ARGS) in a worker thread, so that a slow qemu-img or a process that
    takes its time to stop does not hold up the event loop (the agent's other
    sessions and keepalives run on it).  A cancellation waits for FN to end
    before it is passed on: a rollback must never race with a step still
    creating the files it is about to remove."""
    loop = asyncio.get_running_loop()
    return await uncancellable(loop.run_in_executor(None, lambda: fn(*args)))
