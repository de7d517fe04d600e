"""The QMP connection the migration phases use: vm.qmp's session, with its
errors turned into one-line MigrationErrors that name the side (source or
destination) and the phase, so a user reads which QEMU failed and when."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from vmferry.errors import ConnectError, MigrationError
from vmferry.vm.qmp import QMPCommandError, QMPSession, qmp_connect

# qemu.qmp logs every disconnect at WARNING; our errors already say it once.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)


class Monitor:
    def __init__(self, sock: Path | str, side: str, phase: str = "") -> None:
        self.sock = str(sock)
        self.side = side            # "source" or "destination", for messages
        self.phase = phase
        self.session: Optional[QMPSession] = None

    async def connect(self, timeout: float = 10.0) -> "Monitor":
        try:
            self.session = await qmp_connect(self.sock, timeout=timeout,
                                             name=f"vmferry-{self.side}")
        except ConnectError as e:
            raise MigrationError(f"cannot reach the {self.side} QEMU's monitor: {e}",
                                 phase=self.phase) from e
        return self

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def __aenter__(self) -> "Monitor":
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def cmd(self, command: str, /, **args: Any) -> Any:
        if self.session is None:
            raise MigrationError(f"no connection to the {self.side} QEMU for {command}",
                                 phase=self.phase)
        try:
            return await self.session.execute(command, args or None)
        except QMPCommandError as e:
            raise MigrationError(f"{self.side} QEMU refused {command}: {e.desc}",
                                 phase=self.phase) from e
        except ConnectError as e:
            raise MigrationError(f"lost the {self.side} QEMU during {command}: it exited or "
                                 f"closed its monitor", phase=self.phase) from e

    async def try_cmd(self, command: str, /, **args: Any) -> Any:
        """For rollback: a command that may fail because there is nothing to undo."""
        try:
            return await self.cmd(command, **args)
        except MigrationError:
            return None

    def listener(self, names: Iterable[str] | str,
                 event_filter: Optional[Callable[[Any], bool]] = None):
        assert self.session is not None
        return self.session.client.listener(names, event_filter)

    @property
    def alive(self) -> bool:
        from qemu.qmp.protocol import Runstate
        return self.session is not None and self.session.client.runstate == Runstate.RUNNING
