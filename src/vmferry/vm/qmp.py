"""QMP on top of qemu.qmp, with vmferry's errors.

    async with qmp_session(sock) as qmp:
        status = await qmp.execute("query-status")
        with qmp.client.listener(("MIGRATION",)) as events:   # qemu.qmp's QMPClient
            event = await events.get()

    qmp_call(sock, "query-status")          # one command, from synchronous code

Every qemu.qmp failure becomes one line: ConnectError when QEMU cannot be reached,
stops answering or hangs up; QMPCommandError (with .command and QEMU's .error_class)
when QEMU answers a command with an error.  QEMU serves one client at a time per QMP
socket: a second client gets no greeting until the first disconnects, which shows up
here as a ConnectError after TIMEOUT.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
from typing import Any, AsyncIterator, Coroutine, Mapping, Optional, TypeVar

from qemu.qmp import ConnectError as _QMPConnectError
from qemu.qmp import ExecInterruptedError, ExecuteError, QMPClient, QMPError, StateError

from vmferry.errors import ConnectError, VmferryError

T = TypeVar("T")


class QMPCommandError(VmferryError):
    """QEMU refused a QMP command; .error_class is QEMU's class, e.g. "GenericError",
    .desc QEMU's own words."""

    def __init__(self, message: str, *, command: str, error_class: str,
                 desc: str = "") -> None:
        super().__init__(message)
        self.command = command
        self.error_class = error_class
        self.desc = desc


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _reason(e: BaseException) -> str:
    """The root cause of a qemu.qmp error in a few words."""
    cause = getattr(e, "exc", None) or e.__cause__ or e
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    if isinstance(cause, EOFError):
        return "QEMU closed the connection"
    return _one_line(cause) or type(cause).__name__


class QMPSession:
    """A connected QMP client; .client is qemu.qmp's QMPClient (events, fd passing)."""

    def __init__(self, client: QMPClient, socket: str) -> None:
        self.client = client
        self.socket = socket

    async def execute(self, cmd: str, args: Optional[Mapping[str, object]] = None, *,
                      timeout: Optional[float] = None) -> Any:
        """Run CMD and return its "return" value."""
        try:
            return await asyncio.wait_for(self.client.execute(cmd, args), timeout)
        except ExecuteError as e:
            raise QMPCommandError(f"QMP {cmd} failed: {_one_line(e)}", command=cmd,
                                  error_class=e.error_class, desc=_one_line(e)) from e
        except (ExecInterruptedError, StateError, EOFError, OSError) as e:
            raise ConnectError(f"QMP {cmd} on {self.socket}: QEMU went away "
                               f"({_reason(e)})") from e
        except asyncio.TimeoutError:
            raise ConnectError(f"QMP {cmd} on {self.socket}: no answer within "
                               f"{timeout:g} s") from None
        except QMPError as e:
            raise ConnectError(f"QMP {cmd} on {self.socket}: {_one_line(e)}") from e


    async def close(self) -> None:
        await _quiet_disconnect(self.client)


async def qmp_connect(sock: str | os.PathLike, *, timeout: Optional[float] = 5.0,
                      name: Optional[str] = None) -> QMPSession:
    """Connect to the QMP socket SOCK (greeting and capabilities within TIMEOUT s);
    the caller closes the session."""
    path = os.fspath(sock)
    for attempt in range(3):
        client = QMPClient(name)
        try:
            await asyncio.wait_for(client.connect(path), timeout)
            return QMPSession(client, path)
        except _QMPConnectError as e:
            await _quiet_disconnect(client)
            # qemu.qmp's capability negotiation has been seen to trip over a
            # message arriving mid-handshake; a fresh connection then works
            if "Negotiation failed" in str(e) and attempt < 2:
                await asyncio.sleep(0.05)
                continue
            raise ConnectError(f"cannot connect to QMP socket {path}: {_reason(e)}") from e
        except asyncio.TimeoutError:
            await _quiet_disconnect(client)
            raise ConnectError(f"QMP socket {path} did not greet within {timeout:g} s (QEMU "
                               f"serves one client per socket: is another one connected?)"
                               ) from None
        except QMPError as e:
            await _quiet_disconnect(client)
            raise ConnectError(f"cannot connect to QMP socket {path}: {_one_line(e)}") from e
    raise AssertionError("unreachable")


@contextlib.asynccontextmanager
async def qmp_session(sock: str | os.PathLike, *, timeout: Optional[float] = 5.0,
                      name: Optional[str] = None) -> AsyncIterator[QMPSession]:
    """qmp_connect, and disconnect on exit, even when the body raised."""
    session = await qmp_connect(sock, timeout=timeout, name=name)
    try:
        yield session
    finally:
        await session.close()


async def _quiet_disconnect(client: QMPClient) -> None:
    # disconnect() re-raises whatever ended the connection (EOFError after "quit");
    # by now every command has its answer or its own error, so it tells us nothing.
    with contextlib.suppress(Exception):
        await client.disconnect()


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run CORO to completion from synchronous code, also when this thread already
    runs an event loop (then in a helper thread, blocking the caller)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        in_loop = False
    else:
        in_loop = True
    if not in_loop:
        return asyncio.run(coro)     # outside the except: no "during handling" noise
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vmferry-qmp") as ex:
        return ex.submit(asyncio.run, coro).result()


def qmp_call(sock: str | os.PathLike, cmd: str, args: Optional[Mapping[str, object]] = None,
             *, timeout: float = 10.0) -> Any:
    """Connect, run one command, disconnect; for CLI commands and scripts."""
    async def call() -> Any:
        async with qmp_session(sock, timeout=timeout) as qmp:
            return await qmp.execute(cmd, args, timeout=timeout)
    return run_sync(call())


__all__ = ["QMPSession", "QMPCommandError", "qmp_connect", "qmp_session", "qmp_call",
           "run_sync"]
