"""LocalDestination: the destination is another state directory on this host
(`local:///path`), which stands for another host in tests and demos and is
also how a same-host storage move is done.  Prepare and Finish run right here,
over Unix sockets, with no agent in between."""
from __future__ import annotations

from typing import Any, Optional

from vmferry.errors import UsageError
from vmferry.migration.destination import Destination, Prepared, destination_spec
from vmferry.migration.incoming import Incoming, create_image, image_size  # noqa: F401
from vmferry.migration.options import MigrateOptions
from vmferry.migration.source import DiskPlan
from vmferry.vm.state import StateDir


class LocalDestination(Destination):
    presync_ok = True

    def __init__(self, state: StateDir) -> None:
        self.state = state
        self.incoming = Incoming(state)

    def __repr__(self) -> str:
        return f"local://{self.state.path}"

    def dest_paths(self, spec: Any, plans: list[DiskPlan], opts: MigrateOptions) -> dict[str, str]:
        dspec = destination_spec(spec, opts)
        return {f"disk{i}": d.path for i, d in enumerate(dspec.disks)}

    async def prepare(self, spec: Any, disks: list[DiskPlan], opts: MigrateOptions, *,
                      accel: Optional[str] = None,
                      presynced: frozenset[str] = frozenset()) -> Prepared:
        if opts.tls:
            raise UsageError("--tls encrypts traffic between hosts: it needs an ssh:// or "
                             "tls:// destination, not local://")
        return await self.incoming.prepare(spec, destination_spec(spec, opts), disks, opts,
                                           accel=accel, presynced=presynced)

    async def finish(self, opts: MigrateOptions, *, resume: bool) -> str:
        return await self.incoming.finish(resume=resume)

    async def abort(self) -> None:
        await self.incoming.abort()
