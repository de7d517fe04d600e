"""The destination side of a migration, as the source sees it.

Prepare and Finish run on the destination; the source talks to them only
through this interface, so a remote agent can implement it later exactly as
LocalDestination (local.py) does for a second state directory on this host.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Any, Optional

from vmferry.migration.options import MigrateOptions
from vmferry.migration.source import DiskPlan


@dataclasses.dataclass
class Prepared:
    """What Prepare tells the source."""

    migrate_uri: str                   # for QMP migrate, e.g. unix:/path
    nbd_server: dict[str, Any]         # SocketAddress for the source's NBD client nodes
    exports: dict[str, str]            # node name -> export name
    dest_paths: dict[str, str]         # node name -> destination image path
    # nodes whose destination image was created empty for this migration
    fresh: set[str] = dataclasses.field(default_factory=set)


class Destination(abc.ABC):
    @abc.abstractmethod
    async def prepare(self, spec: Any, disks: list[DiskPlan], opts: MigrateOptions, *,
                      accel: Optional[str] = None) -> Prepared:
        """Start QEMU waiting for the incoming migration, with a writable NBD
        export per disk, using the source's accelerator (kvm or tcg).  Raises UsageError for what the user must fix (a
        destination disk too small or missing) before anything starts."""

    @abc.abstractmethod
    async def finish(self, opts: MigrateOptions, *, resume: bool) -> str:
        """The incoming migration has completed: stop the NBD server, resume
        the guest unless resume is False, record the spec.  Returns the
        guest's run state."""

    @abc.abstractmethod
    async def abort(self) -> None:
        """Undo Prepare: stop the destination QEMU and remove what it created."""
