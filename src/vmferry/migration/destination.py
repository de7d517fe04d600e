"""The destination side of a migration, as the source sees it.

Prepare and Finish run on the destination; the source talks to them only
through this interface.  LocalDestination (local.py) runs them in this
process for a second state directory on this host; RemoteDestination
(remote.py) asks a vmferry agent on another host over ssh or mutual TLS.
Both end in the same code on the destination host: incoming.Incoming.
"""
from __future__ import annotations

import abc
import asyncio
import dataclasses
from typing import Any, Optional

from vmferry.errors import UsageError
from vmferry.migration.options import MigrateOptions
from vmferry.migration.plan import DiskPlan
from vmferry.vm.spec import load_spec


@dataclasses.dataclass
class Prepared:
    """What Prepare tells the source."""

    migrate_uri: str                   # for QMP migrate, e.g. unix:/path or tcp:host:port
    nbd_server: dict[str, Any]         # SocketAddress for the source's NBD client nodes
    exports: dict[str, str]            # node name -> export name
    dest_paths: dict[str, str]         # node name -> destination image path
    # nodes whose destination image was created empty for this migration
    fresh: set[str] = dataclasses.field(default_factory=set)
    # QEMU certificates dir (client side) when the data streams use TLS
    tls_dir: Optional[str] = None
    tls_hostname: Optional[str] = None
    # the destination images are files of this host (local:// destinations)
    same_host: bool = False

    def export_uri(self, node: str) -> str:
        """The NBD URI of NODE's destination export, as this host reaches it."""
        srv, export = self.nbd_server, self.exports[node]
        if srv.get("type") == "unix":
            return f"nbd+unix:///{export}?socket={srv['path']}"
        host = f"[{srv['host']}]" if ":" in srv["host"] else srv["host"]
        if self.tls_dir:
            # libnbd checks the certificate against the host in the URI
            return f"nbds://{host}:{srv['port']}/{export}?tls-certificates={self.tls_dir}"
        return f"nbd://{host}:{srv['port']}/{export}"


@dataclasses.dataclass
class DestinationCheck:
    """What a destination found when asked to check a migration without
    preparing it (a dry run): every problem, and what it would do."""

    problems: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    version: str = ""                  # vmferry's there
    qemu: str = ""                     # its QEMU's version
    accel: str = ""                    # what its QEMU would run the guest with
    dest_paths: dict[str, str] = dataclasses.field(default_factory=dict)   # node -> image
    create: list[str] = dataclasses.field(default_factory=list)   # nodes: image to create
    free: dict[str, int] = dataclasses.field(default_factory=dict)  # node -> bytes free there
    listen: dict[str, str] = dataclasses.field(default_factory=dict)  # stream -> address

    @classmethod
    def from_wire(cls, d: Any) -> "DestinationCheck":
        """From an agent's reply, keeping only fields of the right shape: the
        reply is printed, never acted on, but must not break the printing."""
        d = d if isinstance(d, dict) else {}

        def strs(v: Any) -> list[str]:
            return [str(x) for x in v] if isinstance(v, list) else []

        def smap(v: Any) -> dict[str, str]:
            return {str(k): str(x) for k, x in v.items()} if isinstance(v, dict) else {}
        free = d.get("free")
        return cls(problems=strs(d.get("problems")), warnings=strs(d.get("warnings")),
                   version=str(d.get("version", "")), qemu=str(d.get("qemu", "")),
                   accel=str(d.get("accel", "")), dest_paths=smap(d.get("dest_paths")),
                   create=strs(d.get("create")), listen=smap(d.get("listen")),
                   free={str(k): v for k, v in free.items() if isinstance(v, int)
                         and not isinstance(v, bool)} if isinstance(free, dict) else {})


def destination_spec(spec: Any, opts: MigrateOptions) -> Any:
    """The VM's spec as the destination runs it: disk paths and serial log
    remapped by --disk-map or a destination spec file (virsh's --xml), under
    --dname's name."""
    if opts.dest_spec:
        other = load_spec(opts.dest_spec)
        if len(other.disks) != len(spec.disks):
            raise UsageError(f"destination spec {opts.dest_spec} has {len(other.disks)} "
                             f"disks, the VM has {len(spec.disks)}: they must match")
        dmap = {f"disk{i}": d.path for i, d in enumerate(other.disks)}
        out = spec.remap(dmap, serial=other.serial if spec.serial else None)
    else:
        out = spec.remap(opts.disk_map)
    return out.renamed(opts.new_name(spec.name)) if opts.new_name(spec.name) else out


class Destination(abc.ABC):
    # The URI it was reached by, for the journal (recover reaches it again)
    uri = ""
    # Whether this destination can be pre-seeded by `vmferry presync`.
    presync_ok = False
    # Whether its images are files of this host.
    same_host = False
    # Whether a management machine relays it (migrate --direct): only from
    # there may it be reachable, for recover too
    relayed = False

    @abc.abstractmethod
    async def prepare(self, spec: Any, disks: list[DiskPlan], opts: MigrateOptions, *,
                      accel: Optional[str] = None,
                      presynced: frozenset[str] = frozenset(), token: str = "") -> Prepared:
        """Start QEMU waiting for the incoming migration, with a writable NBD
        export per disk, using the source's accelerator (kvm or tcg).  Raises
        UsageError for what the user must fix (a destination disk too small or
        missing) before anything starts.  PRESYNCED: nodes whose destination
        image is a presync target, written on purpose.  TOKEN: the journal's
        name for this migration, which the destination keeps when it resumes
        the guest (see probe)."""

    @abc.abstractmethod
    async def finish(self, opts: MigrateOptions, *, resume: bool) -> str:
        """The incoming migration has completed: stop the NBD server, resume
        the guest unless resume is False, record the spec.  Returns the
        guest's run state."""

    @abc.abstractmethod
    async def abort(self, keep: Optional[dict[str, int]] = None) -> str:
        """Undo Prepare: stop the destination QEMU and remove what it created.
        Returns "destroyed"; "running" when Finish already resumed the guest
        there (nothing is undone then); "unknown" when the destination cannot
        be reached to tell.  KEEP: node -> presync generation of the images
        to keep as partial copies; "kept" when they were (Incoming.abort)."""

    async def check(self, spec: Any, disks: list[DiskPlan], opts: MigrateOptions, *,
                    accel: Optional[str] = None,
                    presynced: frozenset[str] = frozenset()) -> DestinationCheck:
        """Every check Prepare makes, and what it would do, changing nothing
        there: no QEMU, image, folder or record (a dry run)."""
        return DestinationCheck(problems=[f"{self!r} cannot check a migration "
                                          f"without preparing it"])

    def transport(self, opts: MigrateOptions) -> str:
        """How the disks and the memory would travel, in a few words."""
        return "TCP" + (" with TLS" if opts.tls else "")

    async def probe_link(self, seconds: float) -> Optional[float]:
        """Bytes per second the link to the destination carried in a probe of
        about SECONDS; None where there is no link to measure."""
        return None

    async def keep_on_loss(self, generation: int) -> None:
        """Should the source be lost (its process killed, the link cut), the
        destination keeps the disk images as partial copies of GENERATION
        instead of removing them.  Only an agent needs telling: on this host,
        recover itself does it."""

    async def connect(self, opts: MigrateOptions) -> None:
        """Reach the destination now (requests that need no Prepare)."""

    async def close(self) -> None:
        """The migration is over, one way or the other: release the channel."""

    def lost(self) -> Optional["asyncio.Future[None]"]:
        """A future that fails when the destination is gone (its agent died or
        the network to it went silent), for the source to roll back at once
        rather than wait on stalled sockets; None when it cannot be lost."""
        return None

    # -- recovery (see recover.py): the migrating process is gone, and with it
    #    everything it knew; these work from the VM's name alone.

    async def probe(self, name: str, token: str, opts: MigrateOptions) -> str:
        """Where the incoming migration TOKEN of NAME stands there (see
        incoming.probe); "unknown" when the destination cannot be asked."""
        return "unknown"

    async def undo_orphan(self, name: str, token: str = "",
                          keep: Optional[dict[str, tuple[str, int, str]]] = None) -> bool:
        """Undo what an incoming migration or presync of NAME whose source
        process died left there (never a guest Finish resumed).  KEEP: image
        path -> (node, presync generation, format) to keep as partial copies;
        True when they were (incoming.keep_images)."""
        return False

    async def finish_orphan(self, name: str, token: str, *, resume: bool) -> Optional[str]:
        """Finish the incoming migration TOKEN of NAME that received
        everything, and return the guest's state there; None when the
        destination no longer has it."""
        return None

    # -- presync (see presync.py); destinations that cannot be pre-seeded
    #    keep presync_ok False and never get these calls.

    async def presync_open(self, disks: list[dict[str, Any]],
                           opts: MigrateOptions) -> dict[str, dict[str, Any]]:
        """Serve the destination images of DISKS for a presync (see
        presync_target.PresyncTarget.open)."""
        raise UsageError(f"presync cannot write to {self!r}")

    async def presync_check_open(self, disks: list[dict[str, Any]],
                                 opts: MigrateOptions) -> DestinationCheck:
        """presync_open's checks, all of them, and what it would do, changing
        nothing (a dry run); DISKS as for presync_open, each with the source's
        allocated bytes."""
        return DestinationCheck(problems=[f"presync cannot write to {self!r}"])

    def presync_uri(self, server: dict[str, Any]) -> str:
        """The engine's URI for a server presync_open returned."""
        raise UsageError(f"presync cannot write to {self!r}")

    async def presync_close(self, records: dict[str, int], source: str) -> None:
        """Stop serving; record GENERATION beside each image in RECORDS."""

    async def presync_check(self, items: dict[str, tuple[str, Any]],
                            opts: MigrateOptions) -> dict[str, str]:
        """node -> '' if the image at PATH still holds presync GENERATION, else why."""
        return {node: "the destination cannot tell" for node in items}

    async def presync_unwritten(self, items: dict[str, tuple[str, str]],
                                opts: MigrateOptions) -> dict[str, Optional[list]]:
        """node -> the spans of the image at PATH (of format FMT) that hold
        nothing written (presync_target.unwritten), or None if it cannot tell."""
        return {node: None for node in items}

    async def presync_forget(self, paths: list[str], discard: bool = False) -> None:
        """Drop the records beside these images (DISCARD: the images too)."""
