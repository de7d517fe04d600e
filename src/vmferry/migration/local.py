"""LocalDestination: the destination is another state directory on this host
(`local:///path`), which stands for another host in tests and demos and is
also how a same-host storage move is done.  Prepare and Finish run right here,
over Unix sockets, with no agent in between."""
from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

from vmferry.aio import in_thread
from vmferry.errors import MigrationError, UsageError
from vmferry.migration.desthost import incoming as incoming_mod, presync_target
from vmferry.migration.desthost.check import check_incoming, check_presync_target
from vmferry.migration.destination import (
    Destination, DestinationCheck, Prepared, destination_spec,
)
from vmferry.migration.desthost.incoming import Incoming, create_image, image_size
from vmferry.migration.options import MigrateOptions
from vmferry.migration.plan import DiskPlan
from vmferry.migration.desthost.presync_target import PresyncTarget
from vmferry.migration.probe import local_stream_rate
from vmferry.vm.state import StateDir

NO_TLS = ("--tls encrypts traffic between hosts: it needs an ssh:// or tls:// destination, "
          "not local://")


class LocalDestination(Destination):
    presync_ok = True
    same_host = True

    def __init__(self, state: StateDir) -> None:
        self.state = state
        self.uri = f"local://{state.path}"
        self.incoming = Incoming(state)
        self._lost: Optional[asyncio.Future] = None
        self._watch: Optional[asyncio.Task] = None

    def __repr__(self) -> str:
        return self.uri

    async def prepare(self, spec: Any, disks: list[DiskPlan], opts: MigrateOptions, *,
                      accel: Optional[str] = None,
                      presynced: frozenset[str] = frozenset(), token: str = "") -> Prepared:
        if opts.tls:
            raise UsageError(NO_TLS)
        return await self.incoming.prepare(destination_spec(spec, opts), disks, opts,
                                           accel=accel, presynced=presynced, token=token)

    async def check(self, spec: Any, disks: list[DiskPlan], opts: MigrateOptions, *,
                    accel: Optional[str] = None,
                    presynced: frozenset[str] = frozenset()) -> DestinationCheck:
        try:
            dspec = destination_spec(spec, opts)
        except UsageError as e:
            return DestinationCheck(problems=[str(e)])
        # a fresh Incoming: the one prepare uses must stay untouched
        out = await in_thread(lambda: check_incoming(Incoming(self.state), dspec, disks, opts,
                                                     accel=accel, presynced=presynced))
        if opts.tls:
            out.problems.append(NO_TLS)
        return out

    def transport(self, opts: MigrateOptions) -> str:
        return "this host, Unix sockets"

    async def probe_link(self, seconds: float) -> Optional[float]:
        return await in_thread(local_stream_rate, seconds)

    async def finish(self, opts: MigrateOptions, *, resume: bool) -> str:
        return await self.incoming.finish(resume=resume)

    async def abort(self, keep: Optional[dict[str, int]] = None) -> str:
        await self._stop_watch()
        return await self.incoming.abort(keep)

    def lost(self) -> Optional["asyncio.Future[None]"]:
        """Fails when the destination QEMU dies before Finish: with the native
        engine writing its raw images directly, nothing else would notice
        until the memory stream could not connect."""
        if self._lost is None and self.incoming.started:
            self._lost = asyncio.get_running_loop().create_future()
            self._watch = asyncio.ensure_future(self._watch_qemu(self._lost))
        return self._lost

    async def _watch_qemu(self, lost: "asyncio.Future[None]") -> None:
        name = self.incoming.name
        while self.incoming.started:
            if self.state.read_pid(name) is None:
                lost.set_exception(MigrationError("the destination QEMU exited (see its "
                                                  f"{self.state.log_path(name)})"))
                lost.exception()         # retrieved: nobody may be waiting
                return
            await asyncio.sleep(0.1)

    async def _stop_watch(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
            self._watch = None

    async def close(self) -> None:
        await self._stop_watch()

    # -- recovery: this host's QEMU outlived the process that prepared it

    async def probe(self, name: str, token: str, opts: MigrateOptions) -> str:
        return await incoming_mod.probe(self.state, name, token)

    async def undo_orphan(self, name: str, token: str = "",
                          keep: Optional[dict[str, tuple[str, int, str]]] = None) -> bool:
        # a same-host destination: the user's own files, no storage roots
        done = await incoming_mod.reap_orphans(self.state, None, name=name, keep=keep)
        presync_target.reap_orphans(self.state.path, None)
        if keep and not done:
            # nothing left to undo: a recover killed after this kept them
            # finds them by their records, of the generation it asks for
            return all(presync_target.check(path, generation) == ""
                       for path, (_, generation, _) in keep.items())
        return bool(keep) and done == [name]

    async def finish_orphan(self, name: str, token: str, *, resume: bool) -> Optional[str]:
        return await incoming_mod.finish_orphan(self.state, name, token, resume=resume)

    # -- presync: qemu-nbd on Unix sockets in a private folder

    async def presync_open(self, disks: list[dict[str, Any]],
                           opts: MigrateOptions) -> dict[str, dict[str, Any]]:
        self._presync_dir = Path(tempfile.mkdtemp(prefix=presync_target.RUN_DIR_PREFIX))
        # the images it creates are recorded in the destination state
        # directory first, so 'vmferry recover' can remove them if this
        # process dies (its qemu-nbd dies with it)
        self.presync = PresyncTarget(run_dir=self._presync_dir, record_dir=self.state.path)
        try:
            return await self.presync.open(disks, create=opts.create_disks, overwrite=True)
        except BaseException:
            await self.presync.abort()
            shutil.rmtree(self._presync_dir, ignore_errors=True)
            raise

    async def presync_check_open(self, disks: list[dict[str, Any]],
                                 opts: MigrateOptions) -> DestinationCheck:
        # no run or record folder: a target that only checks makes neither
        return await in_thread(lambda: check_presync_target(
            PresyncTarget(), disks, create=opts.create_disks, overwrite=True))

    def presync_uri(self, server: dict[str, Any]) -> str:
        return f"nbd+unix:///?socket={server['path']}"

    async def presync_close(self, records: dict[str, int], source: str) -> None:
        await self.presync.close(records, source)
        shutil.rmtree(self._presync_dir, ignore_errors=True)

    async def presync_check(self, items: dict[str, tuple[str, Any]],
                            opts: MigrateOptions) -> dict[str, str]:
        return {node: presync_target.check(path, gen) for node, (path, gen) in items.items()}

    async def presync_unwritten(self, items: dict[str, tuple[str, str]],
                                opts: MigrateOptions) -> dict[str, Optional[list]]:
        return {node: await in_thread(presync_target.unwritten, path, fmt)
                for node, (path, fmt) in items.items()}

    async def presync_forget(self, paths: list[str], discard: bool = False) -> None:
        for path in paths:
            presync_target.forget(path, discard)
