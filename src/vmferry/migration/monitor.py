"""A QMP connection for the migration phases: qemu.qmp's QMPClient with
failures turned into one-line MigrationErrors that name the side and the
command, and event waits that always have a deadline."""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from qemu.qmp import ConnectError as QmpConnectError
from qemu.qmp import ExecuteError, QMPClient, QMPError

from vmferry.errors import MigrationError

# qemu.qmp logs every disconnect at WARNING; our errors already say it once.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)


class Monitor:
    def __init__(self, sock: Path | str, side: str, phase: str = "") -> None:
        self.sock = str(sock)
        self.side = side            # "source" or "destination", for messages
        self.phase = phase
        self.client = QMPClient(f"vmferry-{side}")

    async def connect(self, timeout: float = 10.0) -> "Monitor":
        try:
            await asyncio.wait_for(self.client.connect(self.sock), timeout)
        except (QmpConnectError, OSError, asyncio.TimeoutError) as e:
            raise MigrationError(f"cannot reach the {self.side} QEMU's monitor at "
                                 f"{self.sock}: {e}", phase=self.phase) from e
        return self

    async def close(self) -> None:
        try:
            await self.client.disconnect()
        except (QMPError, OSError, EOFError):
            # EOFError: the peer already hung up (e.g. after "quit"); qemu.qmp
            # re-raises its reader task's EOFError from disconnect().
            pass

    async def __aenter__(self) -> "Monitor":
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def cmd(self, command: str, /, **args: Any) -> Any:
        name = command
        try:
            return await self.client.execute(name, args or None)
        except ExecuteError as e:
            raise MigrationError(f"{self.side} QEMU refused {name}: {e}",
                                 phase=self.phase) from e
        except (QMPError, OSError, EOFError) as e:
            raise MigrationError(f"lost the {self.side} QEMU during {name}: it exited or "
                                 f"closed its monitor", phase=self.phase) from e

    async def try_cmd(self, command: str, /, **args: Any) -> Any:
        """For rollback: a command that may fail because there is nothing to undo."""
        try:
            return await self.cmd(command, **args)
        except MigrationError:
            return None

    def listener(self, names: Iterable[str] | str,
                 event_filter: Optional[Callable[[Any], bool]] = None):
        return self.client.listener(names, event_filter)

    @property
    def alive(self) -> bool:
        from qemu.qmp.protocol import Runstate
        return self.client.runstate == Runstate.RUNNING
