"""migrate_vm() and presync_vm(): the Python entry points behind `vmferry
migrate` and `vmferry presync` (vmferry.migrate and vmferry.presync)."""
from __future__ import annotations

import asyncio
import dataclasses
import signal
import sys
from pathlib import Path
from typing import Any, Awaitable, Callable, Literal, Optional, TypeVar

from vmferry.errors import Cancelled, UsageError, VmferryError
from vmferry.migration import journal, presync
from vmferry.migration.destination import Destination
from vmferry.migration.dryrun import DryRun
from vmferry.migration.flow import Migration
from vmferry.migration.job import JobInfo
from vmferry.migration.journal import Journal
from vmferry.migration.local import LocalDestination
from vmferry.migration.offline import migrate_offline
from vmferry.migration.options import MigrateOptions
from vmferry.migration.presync import PresyncResult
from vmferry.migration.remote import RemoteDestination
from vmferry.vm.process import stop_vm_async
from vmferry.vm.state import StateDir

JOB_FILE = "job.json"
T = TypeVar("T")


def parse_destination(uri: str) -> Destination:
    """local:///path/to/state-dir -> LocalDestination; ssh://... and tls://...
    -> RemoteDestination."""
    if uri.startswith(("ssh://", "tls://")):
        return RemoteDestination(uri)
    if uri.startswith("local://"):
        path = uri[len("local://"):]
        if not path.startswith("/"):
            raise UsageError(f"destination {uri!r}: use local:///absolute/state/dir")
        return LocalDestination(StateDir(path))
    raise UsageError(f"unsupported destination {uri!r}: use ssh://[USER@]HOST[/STATE-DIR], "
                     f"tls://HOST[:PORT] or local:///path/to/state-dir")


def job_file(state: StateDir, name: str) -> Path:
    return state.vm_dir(name) / JOB_FILE


def _warn_stderr(text: str) -> None:
    sys.stderr.write(f"vmferry: warning: {text}\n")
    sys.stderr.flush()


async def migrate_vm_async(state: StateDir, name: str, dest: str | Destination,
                           opts: Optional[MigrateOptions] = None, *,
                           progress: Optional[Callable[[JobInfo], None]] = None,
                           warn: Callable[[str], None] = _warn_stderr) -> JobInfo:
    """Live-migrate VM `name` of `state` to `dest`; returns the job statistics.

    On failure the source VM is running again and a MigrationError (or
    Cancelled) says what happened."""
    destination = parse_destination(dest) if isinstance(dest, str) else dest
    try:
        return await _migrate(state, name, destination, opts or MigrateOptions(),
                              progress, warn)
    finally:
        await destination.close()     # also when it failed before the flow began


async def _migrate(state: StateDir, name: str, destination: Destination,
                   opts: MigrateOptions, progress: Optional[Callable[[JobInfo], None]],
                   warn: Callable[[str], None]) -> JobInfo:
    opts.validate()
    journal.refuse_if_interrupted(state, name)
    rec = state.load(name)
    if opts.offline:
        return await migrate_offline(state, rec, destination, opts, progress=progress)
    if rec.pid is None:
        raise UsageError(f"{name} is not running: start it with 'vmferry run', or "
                         f"move it with --offline")

    async def retire_source() -> None:
        await stop_vm_async(state, name, force=True, timeout=5)
        if opts.undefine_source:
            state.spec_path(name).unlink(missing_ok=True)

    # opts were validated above: the constructor cannot fail after the journal opens
    m = Migration(name, rec.qmp_socket, rec.spec, destination, opts,
                  job_file=job_file(state, name), progress=progress,
                  stop_source=retire_source, presync_state=state, warn=warn,
                  journal=journal.start(state, "migrate", name, destination.uri, opts,
                                        direct=destination.relayed))
    return await m.run()


async def dry_run_vm_async(state: StateDir, name: str, dest: str | Destination,
                           opts: Optional[MigrateOptions] = None, *,
                           kind: Literal["migrate", "presync"] = "migrate") -> DryRun:
    """Check a live migration (or a presync) of VM `name` to `dest` without
    making it: every check Begin and Prepare (or presync) make, on both hosts,
    and none of their actions (no journal, no QEMU object on the source,
    nothing on the destination).  Returns the plan, with every problem found
    (`ok` when there is none) and an estimate of its time from a probe of
    about a second."""
    destination = parse_destination(dest) if isinstance(dest, str) else dest
    # the check settles the storage engine on its own copy
    opts = dataclasses.replace(opts or MigrateOptions())
    try:
        opts.validate()
        if kind == "presync":
            return await presync.check(state, name, destination, opts)
        if opts.offline:
            raise UsageError("--dry-run checks live migrations: --offline has no dry run")
        rec = state.load(name)
        problem = journal.problem(state, name)
        if rec.pid is None:
            run = DryRun(name=name, destination=repr(destination),
                         transport=destination.transport(opts))
            run.add_problems([f"{name} is not running: start it with 'vmferry run', or move "
                              f"it with --offline"])
            try:
                await destination.connect(opts)
            except (VmferryError, OSError) as e:
                run.add_problems([str(e)])
        else:
            m = Migration(name, rec.qmp_socket, rec.spec, destination, opts,
                          presync_state=state, warn=None)
            run = await m.check()
        if problem:
            run.problems.insert(0, problem)
        return run
    finally:
        await destination.close()


def dry_run_vm(state: StateDir | str, name: str, dest: str | Destination,
               opts: Optional[MigrateOptions] = None, *,
               kind: Literal["migrate", "presync"] = "migrate") -> DryRun:
    """Blocking dry_run_vm_async."""
    if not isinstance(state, StateDir):
        state = StateDir(state)
    return _run_cancellable(lambda: dry_run_vm_async(state, name, dest, opts, kind=kind))


def migrate_vm(state: StateDir | str, name: str, dest: str | Destination,
               opts: Optional[MigrateOptions] = None, *,
               progress: Optional[Callable[[JobInfo], None]] = None) -> JobInfo:
    """Blocking migrate_vm_async; SIGINT, SIGTERM and SIGHUP cancel it cleanly
    (the source VM resumes) and raise Cancelled."""
    if not isinstance(state, StateDir):
        state = StateDir(state)
    return _run_cancellable(lambda: migrate_vm_async(state, name, dest, opts,
                                                     progress=progress))


async def presync_vm_async(state: StateDir, name: str, dest: str | Destination,
                           opts: Optional[MigrateOptions] = None, *,
                           progress: Optional[Callable[[Any], None]] = None,
                           warn: Optional[Callable[[str], None]] = _warn_stderr
                           ) -> PresyncResult:
    """Copy (or refresh) the destination images of running VM `name` ahead of a
    migration, leaving a dirty bitmap on the source (see migration/presync.py);
    a later migrate with copy_storage="inc" moves only what changed since.
    PROGRESS gets the engine's CopyResult snapshots; warnings (a record that
    does not hold, so a disk is copied in full) go to WARN and the result."""
    destination = parse_destination(dest) if isinstance(dest, str) else dest
    opts = opts or MigrateOptions()
    opts.validate()
    try:
        return await presync.presync(state, name, destination, opts, warn=warn,
                                     progress=progress)
    except asyncio.CancelledError:
        raise Cancelled(f"presync of {name} cancelled; {name} runs on, and the next presync "
                        f"or migration copies its disks in full") from None


def presync_vm(state: StateDir | str, name: str, dest: str | Destination,
               opts: Optional[MigrateOptions] = None, *,
               progress: Optional[Callable[[Any], None]] = None,
               warn: Optional[Callable[[str], None]] = _warn_stderr) -> PresyncResult:
    """Blocking presync_vm_async; SIGINT, SIGTERM and SIGHUP cancel it cleanly
    and raise Cancelled."""
    if not isinstance(state, StateDir):
        state = StateDir(state)
    return _run_cancellable(lambda: presync_vm_async(state, name, dest, opts,
                                                     progress=progress, warn=warn))


def _run_cancellable(make: Callable[[], Awaitable[T]]) -> T:
    """asyncio.run(MAKE()) where a signal cancels the task instead of killing the
    process, so its rollback runs (a closed terminal, SIGHUP, like Ctrl-C)."""
    async def main() -> T:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        handled = {}
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            try:
                before = signal.getsignal(sig)
                loop.add_signal_handler(sig, task.cancel)
                handled[sig] = before
            except (ValueError, RuntimeError):   # not the main thread
                pass
        try:
            return await make()
        finally:
            for sig, before in handled.items():
                loop.remove_signal_handler(sig)
                if before is not None:
                    signal.signal(sig, before)   # a calling program's own handlers

    return asyncio.run(main())
