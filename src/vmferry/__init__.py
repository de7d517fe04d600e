"""vmferry: live-migrate QEMU/KVM VMs and move disk data between NBD servers and files.

    >>> import vmferry
    >>> r = vmferry.copy("nbd+unix:///?socket=/run/src.sock", "/var/tmp/disk.raw")
    >>> r.bytes_written
"""
import os
from typing import TYPE_CHECKING, Any, Callable, Optional

from vmferry.errors import (Cancelled, ConnectError, CopyError, EndpointError, MigrationError,
                            UsageError, VerifyError, VmferryError)
if TYPE_CHECKING:
    from vmferry._engine import Endpoint
    from vmferry.copying import CopyResult, copy, copy_async
    from vmferry.migration.dryrun import DryRun
    from vmferry.migration.options import MigrateOptions
    from vmferry.migration.presync import PresyncResult
    from vmferry.migration.job import JobInfo
    from vmferry.vm.state import StateDir


def __getattr__(name: str) -> Any:
    # Names load on first use: a CLI command or an agent pays only for what
    # it runs (the engine, asyncio, qemu.qmp and the VM layer are not free).
    if name in ("copy", "copy_async", "CopyResult"):
        from vmferry import copying
        return getattr(copying, name)
    if name == "Endpoint":
        from vmferry._engine import Endpoint
        return Endpoint
    if name == "MigrateOptions":
        from vmferry.migration.options import MigrateOptions
        return MigrateOptions
    if name == "JobInfo":
        from vmferry.migration.job import JobInfo
        return JobInfo
    if name == "DryRun":
        from vmferry.migration.dryrun import DryRun
        return DryRun
    if name == "PresyncResult":
        from vmferry.migration.presync import PresyncResult
        return PresyncResult
    raise AttributeError(f"module 'vmferry' has no attribute {name!r}")


def migrate(state_dir: "str | os.PathLike[str] | StateDir", name: str, dest: str,
            options: "Optional[MigrateOptions]" = None, *,
            progress: "Optional[Callable[[JobInfo], None]]" = None) -> "JobInfo":
    """Live-migrate VM `name` of `state_dir` to `dest` (local:///path/to/state-dir);
    blocks, returns a JobInfo.  See vmferry.migration.api.migrate_vm."""
    from vmferry.migration.api import migrate_vm
    return migrate_vm(state_dir, name, dest, options, progress=progress)


def dry_run(state_dir: "str | os.PathLike[str] | StateDir", name: str, dest: str,
            options: "Optional[MigrateOptions]" = None, *,
            kind: str = "migrate") -> "DryRun":
    """Check a migration (kind="presync": a presync) of `name` to `dest` without
    changing anything on either host; returns the plan with every problem
    found (`.ok` when none).  See vmferry.migration.api.dry_run_vm."""
    from vmferry.migration.api import dry_run_vm
    if kind not in ("migrate", "presync"):
        raise UsageError(f"kind must be migrate or presync, not {kind!r}")
    return dry_run_vm(state_dir, name, dest, options, kind=kind)   # type: ignore[arg-type]


async def migrate_async(state_dir: "str | os.PathLike[str] | StateDir", name: str, dest: str,
                        options: "Optional[MigrateOptions]" = None, *,
                        progress: "Optional[Callable[[JobInfo], None]]" = None) -> "JobInfo":
    """migrate() for asyncio; cancelling the task rolls the migration back."""
    from vmferry.migration.api import migrate_vm_async
    from vmferry.vm.state import StateDir
    if not isinstance(state_dir, StateDir):
        state_dir = StateDir(state_dir)
    return await migrate_vm_async(state_dir, name, dest, options, progress=progress)


def presync(state_dir: "str | os.PathLike[str] | StateDir", name: str, dest: str,
            options: "Optional[MigrateOptions]" = None, *,
            progress: "Optional[Callable[[CopyResult], None]]" = None) -> "PresyncResult":
    """Copy running VM `name`'s disks to `dest` ahead of a migration (again:
    only what changed since); a later migrate with
    MigrateOptions(copy_storage="inc") moves only the newest writes.  Blocks;
    see vmferry.migration.api.presync_vm."""
    from vmferry.migration.api import presync_vm
    return presync_vm(state_dir, name, dest, options, progress=progress)


async def presync_async(state_dir: "str | os.PathLike[str] | StateDir", name: str, dest: str,
                        options: "Optional[MigrateOptions]" = None, *,
                        progress: "Optional[Callable[[CopyResult], None]]" = None
                        ) -> "PresyncResult":
    """presync() for asyncio; cancelling the task stops the copy cleanly."""
    from vmferry.migration.api import presync_vm_async
    from vmferry.vm.state import StateDir
    if not isinstance(state_dir, StateDir):
        state_dir = StateDir(state_dir)
    return await presync_vm_async(state_dir, name, dest, options, progress=progress)


def recover(state_dir: "str | os.PathLike[str] | StateDir", name: str) -> str:
    """Resolve VM `name`'s migration or presync whose process died (see
    vmferry.migration.recover); returns the line saying where it runs now."""
    from vmferry.migration.recover import recover as recover_async
    from vmferry.vm.qmp import run_sync
    from vmferry.vm.state import StateDir as _StateDir
    state = state_dir if isinstance(state_dir, _StateDir) else _StateDir(state_dir)
    return run_sync(recover_async(state, name))


__all__ = [
    "copy", "copy_async", "CopyResult", "Endpoint",
    "migrate", "migrate_async", "MigrateOptions", "JobInfo", "dry_run", "DryRun",
    "presync", "presync_async", "PresyncResult", "recover",
    "VmferryError", "UsageError", "ConnectError", "EndpointError", "CopyError", "VerifyError",
    "Cancelled", "MigrationError",
]
__version__ = "0.1.0"
