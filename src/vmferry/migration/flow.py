"""The migration state machine: Begin -> Prepare -> Perform -> Finish -> Confirm.

Each phase is one method; the rollback of everything a phase set up is
registered as soon as it exists, so a failure (or Ctrl-C, or `vmferry
abort`) at any point unwinds exactly what was done, in reverse, and leaves
the source running.  Once the destination guest has been resumed in
Finish, the migration has succeeded and nothing is rolled back.
"""
from __future__ import annotations

import asyncio
import dataclasses
import enum
import os
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

from vmferry.aio import in_thread
from vmferry.errors import Cancelled, MigrationError, UsageError, VmferryError
from vmferry.eta import Estimator
from vmferry.migration import presync, probe, source, testhooks
from vmferry.migration.destination import Destination, destination_spec
from vmferry.migration.dryrun import DiskMove, DryRun, PROBE_SECONDS, options_in_effect
from vmferry.migration.job import JobInfo
from vmferry.migration.journal import Journal
from vmferry.migration.monitor import Monitor
from vmferry.migration.native import NativeStorage
from vmferry.migration.options import MigrateOptions
from vmferry.migration.plan import DiskPlan
from vmferry.migration.source import PREFIX
from vmferry.migration.testhooks import hold as _test_hold
from vmferry.vm.qemu import disk_names

# Raise the downtime limit after this many iterations without progress,
# doubling each time, up to ESCALATE_MAX times the starting limit.
STALL_ITERATIONS = 3
ESCALATE_MAX = 16


class Phase(enum.Enum):
    BEGIN = "begin"
    PREPARE = "prepare"
    PERFORM = "perform"
    FINISH = "finish"
    CONFIRM = "confirm"
    DONE = "done"


Progress = Callable[[JobInfo], None]


# A destination that dies breaks QEMU's data streams a moment before its
# control channel (or the management machine relaying it) says it is gone:
# a failed Perform waits this long for that, to name the cause rather than
# the broken pipe it made.
LOSS_GRACE_S = 1.0


async def _soon(lost: "asyncio.Future[None]") -> bool:
    """Whether LOST (the destination's loss) is known within LOSS_GRACE_S."""
    if not lost.done():
        await asyncio.wait({lost}, timeout=LOSS_GRACE_S)
    return lost.done()


def _honour_cancel() -> None:
    """A Ctrl-C (or SIGTERM) that an await lost still stops the migration
    before its next phase: Python 3.11's asyncio.wait_for swallows a
    cancellation that arrives just as its inner await completes (QMP's
    connect, a command with a timeout), and the task then runs on with the
    request still counted."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError()


class Migration:
    def __init__(self, name: str, qmp_socket: Path, spec: Any, dest: Destination,
                 opts: MigrateOptions, *, job_file: Optional[Path] = None,
                 progress: Optional[Progress] = None,
                 stop_source: Optional[Callable[[], Awaitable[None]]] = None,
                 presync_state: Any = None,
                 warn: Optional[Callable[[str], None]] = None,
                 journal: Optional[Journal] = None) -> None:
        opts.validate()
        self.name = name
        self.qmp_socket = qmp_socket
        self.spec = spec
        self.dest = dest
        self.opts = opts
        self.job_file = job_file
        self.progress = progress
        self.stop_source = stop_source
        self.phase = Phase.BEGIN
        self.info = JobInfo(name=name, pid=os.getpid(), started=time.time(),
                            status="running",
                            dest_name=opts.new_name(name))
        # until memory migration starts, the guest's RAM is the work it will be
        self._estimator = Estimator(memory_expected=spec.memory)
        self.mon: Optional[Monitor] = None
        self.disks: list[DiskPlan] = []
        self.was_running = True
        self.accel: Optional[str] = None
        self.native: Any = None        # NativeStorage with --storage-engine native
        self._keep_up: Optional[asyncio.Task] = None   # its passes during memory migration
        self._keep_stop: Optional[asyncio.Event] = None
        self.presync_state = presync_state   # source StateDir holding presync records
        self.presynced: dict[str, dict] = {}  # node -> valid presync record
        self.warn = warn
        # written before each step takes effect, for 'vmferry recover'
        self.journal = journal
        self._undo: list[tuple[str, Callable[[], Awaitable[None]]]] = []
        self._deadline: Optional[float] = None
        self._undo_failed: list[str] = []      # undo steps that raised
        self._unresolved = False       # where the guest runs is not known
        self._postcopy_left = False    # failed in post-copy: recover completes it
        self._kept = ""                # what the rollback kept of the disk copy
        self._keep_generation = 0      # see _arm_keep
        self._mirror_bitmaps = False   # the mirror's resumable bitmaps were added
        self._mirror_kept = False      # the mirror copies into a copy a failure keeps
        self._described = False        # Begin found the VM in a state to move
        self._moves: dict[str, int] = {}   # a dry run's bytes to move of presynced disks
        self._last_save = 0.0

    # -- bookkeeping ---------------------------------------------------

    def _enter(self, phase: Phase) -> None:
        self.phase = phase
        self.info.phase = phase.value
        if phase not in (Phase.BEGIN, Phase.DONE):
            self._journal(phase.value)
        self._publish(force=True)

    def _journal(self, step: str) -> None:
        if self.journal is not None:
            self.journal.enter(step)

    def _record(self, kind: str, **fields: Any) -> None:
        """Write down a resource before it is made (see journal.py)."""
        if self.journal is not None:
            self.journal.add(kind, **fields)

    def _publish(self, force: bool = False) -> None:
        self.info.tick()
        self.info.estimate(self._estimator)
        if self.progress:
            self.progress(self.info)
        now = time.monotonic()
        if self.job_file and (force or now - self._last_save > 0.5):
            self._last_save = now
            try:
                self.info.save(self.job_file)
            except OSError:
                pass

    def _on_undo(self, what: str, fn: Callable[[], Awaitable[None]]) -> None:
        self._undo.append((what, fn))

    async def _rollback(self) -> None:
        if await self._in_postcopy():
            # nothing can be undone now (source.POSTCOPY): the journal goes
            # to recover, which waits for QEMU to complete it and goes on
            self._undo.clear()
            self._unresolved = self._postcopy_left = True
            self.was_running = False
            self._settle_journal()
            return
        # Shielded from further cancellation: a second Ctrl-C must not leave
        # half the cleanup undone.
        while self._undo:
            what, fn = self._undo.pop()
            step = asyncio.ensure_future(fn())
            while not step.done():
                try:
                    await asyncio.shield(step)
                except asyncio.CancelledError:
                    continue        # finish this undo step before the next one
                except (VmferryError, OSError):
                    break
            if step.done() and not step.cancelled() and step.exception() is not None:
                # not fatal to the other steps, but the journal must stay
                self._undo_failed.append(what)
        self._settle_journal()

    async def _in_postcopy(self) -> bool:
        if not self.info.postcopy or self.mon is None:
            return False
        try:
            info = await asyncio.shield(self.mon.try_cmd("query-migrate")) or {}
        except (VmferryError, OSError, asyncio.CancelledError):
            return True       # cannot tell: cancelling it could lose the guest
        return info.get("status") in source.POSTCOPY

    def _settle_journal(self) -> None:
        """After a rollback: a clean one ends the journal; one with a failed
        step hands it to 'vmferry recover', which redoes every step by name."""
        if self.journal is None:
            return
        if self._undo_failed or self._unresolved:
            self.journal.abandon()
        else:
            self.journal.close()

    def _outcome(self) -> str:
        """What a failed migration's message ends with."""
        if self._postcopy_left:
            return (f"post-copy was under way, which nothing can undo: run 'vmferry "
                    f"recover {self.name}', which completes it on the destination")
        if self._undo_failed:
            return (f"the rollback did not finish ({', '.join(self._undo_failed)}): run "
                    f"'vmferry recover {self.name}'")
        return "the source VM is running" + (f"; {self._kept}" if self._kept else "")

    async def _fail(self, why: str) -> None:
        self.info.status = "failed"
        self.info.error = why
        await self._rollback()
        self._publish(force=True)

    # -- the phases ----------------------------------------------------

    async def run(self) -> JobInfo:
        if self.opts.timeout:
            self._deadline = time.monotonic() + self.opts.timeout
        try:
            try:
                await self.begin()
                await _test_hold("prepare")
                _honour_cancel()
                await self._guarded(self.prepare())
                await _test_hold("perform")
                _honour_cancel()
                await self._guarded(self.perform())
                await _test_hold("finish")
                await self._finish_or_settle()
            except BaseException:
                await self._failing()
                raise
        except asyncio.CancelledError:
            self.info.status = "cancelled"
            self.info.error = "cancelled"
            await self._rollback()
            self._publish(force=True)
            await self.dest.close()
            raise Cancelled(f"migration of {self.name} cancelled in {self.phase.value}; "
                            f"{self._outcome()}")
        except VmferryError as e:
            await self._fail(str(e))
            await self.dest.close()
            if self.phase == Phase.BEGIN and not self._described:
                raise       # the VM was not in a state to move: say only that
            if isinstance(e, MigrationError) and e.source_paused:
                raise       # the journal went to 'vmferry recover' (_settle_journal)
            if isinstance(e, UsageError) and not self._undo_failed:
                raise
            if isinstance(e, MigrationError):
                # Say the one thing a user needs next: their VM is fine.
                raise MigrationError(f"{e}; {self._outcome()}",
                                     phase=e.phase or self.phase.value) from e
            raise MigrationError(f"{e} (in {self.phase.value}; {self._outcome()})",
                                 phase=self.phase.value) from e
        except Exception as e:
            # A bug must not leave a half-migrated VM behind either.
            await self._fail(f"internal error: {e!r}")
            await self.dest.close()
            raise MigrationError(f"internal error in {self.phase.value}: {e!r}; "
                                 f"{self._outcome()}", phase=self.phase.value) from e
        try:
            await _test_hold("confirm")
            await self.confirm()
        finally:
            await self.dest.close()
        return self.info

    async def _finish_or_settle(self) -> None:
        """Finish, and if it fails, find out where the guest is before anything
        is undone: once the destination resumed it, resuming the source too
        would run the guest twice (on shared storage, corrupt its disks)."""
        try:
            await self._guarded(self.finish())
            return
        except (VmferryError, asyncio.CancelledError) as e:
            failure = e
        outcome = await asyncio.shield(self.dest.abort())
        if outcome == "running":
            # The guest runs on the destination: the migration did happen.
            self._warn(f"Finish reported an error ({failure or 'cancelled'}), but the "
                       f"destination runs the guest: completing the migration")
            return
        if outcome == "unknown":
            self.was_running = False        # rollback must not resume the source
            self._unresolved = True         # the journal stays, for recover
            err = MigrationError(f"lost the destination during Finish ({failure or 'cancelled'}"
                                 f"): it may be running the guest; the source VM stays "
                                 f"paused — run 'vmferry recover {self.name}' once "
                                 f"{self.dest!r} answers", phase="finish",
                                 source_paused=True)
            raise err from failure
        raise failure

    async def _failing(self) -> None:
        """Before rolling back, a destination we lost must not be waited on."""
        lost = self.dest.lost()
        if lost is not None and lost.done() and self.mon is not None:
            await source.yank(self.mon)

    async def _guarded(self, phase: Awaitable[None]) -> None:
        """Run PHASE, but stop it as soon as the destination is lost: a cut
        link stalls QEMU's sockets for minutes, the agent channel's keepalive
        notices in seconds."""
        lost = self.dest.lost()
        if lost is None:
            await phase
            return
        task = asyncio.ensure_future(phase)
        try:
            await asyncio.wait({task, lost}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise
        if task.done():
            if (task.cancelled() or task.exception() is None or self.phase != Phase.PERFORM
                    or not await _soon(lost)):
                task.result()
                return
        else:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if lost.cancelled():
            raise MigrationError("the connection to the destination was closed",
                                 phase=self.phase.value)
        raise lost.exception()

    async def begin(self) -> None:
        self._enter(Phase.BEGIN)
        testhooks.native_tuning()         # a bad test knob fails here, not midway
        self.mon = await Monitor(self.qmp_socket, "source", "begin").connect()
        self._on_undo("resume the source", self._close_source)
        status = await source.describe(self.mon)
        self._described = True
        self.was_running = status["status"] == "running"
        if self.journal is not None:
            self.journal.was_running = self.was_running
            self.journal.save()
        self.accel = await source.accelerator(self.mon)
        self.disks = await self._plan_disks()
        if self.journal is not None:
            self.journal.set_disks([dataclasses.asdict(d) for d in self.disks])

    async def check(self) -> DryRun:
        """Begin's and Prepare's checks, every one and on both hosts, changing
        nothing there — no journal or job file, no QEMU object, no file on the
        destination — and the plan they would carry out (a dry run)."""
        run = DryRun(name=self.name, destination=repr(self.dest),
                     transport=self.dest.transport(self.opts))
        self.warn = None                    # warnings go into the plan
        reached = True
        try:
            await self.dest.connect(self.opts)
        except (VmferryError, OSError) as e:
            run.add_problems([str(e)])
            reached = False
        try:
            self.mon = await Monitor(self.qmp_socket, "source", "check").connect()
        except VmferryError as e:
            run.add_problems([str(e)])
        else:
            try:
                await self._check_source(run)
            finally:
                await self.mon.close()
        run.engine = self.opts.storage_engine if self.disks else ""
        found = None
        if reached:
            found = await self.dest.check(self.spec, self.disks, self.opts, accel=self.accel,
                                          presynced=frozenset(self.presynced))
            run.heard(found)
        run.warnings = self.info.warnings + run.warnings
        run.disks = [DiskMove(node=d.node, path=d.path, fmt=d.fmt, size=d.size,
                              allocated=d.allocated,
                              dest_path=(found.dest_paths.get(d.node, "") if found else ""),
                              create=bool(found and d.node in found.create),
                              engine=run.engine, moves=self._moves.get(d.node, d.allocated),
                              dest_free=found.free.get(d.node) if found else None)
                     for d in self.disks]
        run.options = options_in_effect(self.opts)
        if run.ok:
            # a second at most, shared by the link and the disks
            run.link_rate = await self.dest.probe_link(PROBE_SECONDS / 2)
            run.disk_read_rate = await in_thread(probe.disk_read_rate,
                                                 [d.path for d in self.disks],
                                                 PROBE_SECONDS / 2)
            run.estimate(self.opts)
        return run

    async def _check_source(self, run: DryRun) -> None:
        """Begin's checks of the source QEMU, every problem of them."""
        status, problems = await source.state_problems(self.mon)
        run.add_problems(problems)
        self._described = True
        self.was_running = status["status"] == "running"
        self.accel = await source.accelerator(self.mon)
        version = (await self.mon.cmd("query-version")).get("qemu", {})
        memory = await self.mon.try_cmd("query-memory-size-summary") or {}
        run.source = {"qemu": "{major}.{minor}.{micro}".format(**version) if version else "",
                      "accel": self.accel, "machine": self.spec.machine,
                      "memory": memory.get("base-memory", 0), "status": status["status"]}
        try:
            self.disks = await self._plan_disks()
        except VmferryError as e:
            run.add_problems([str(e)])
        if self.presynced:
            self._moves = await presync.delta(self.mon, self.presynced, self.disks)

    async def _close_source(self) -> None:
        """The last undo step: a guest that ran must run again, or the
        rollback is not done."""
        try:
            if self.was_running and self._described:
                status = (await self.mon.cmd("query-status"))["status"]
                if status != "running":
                    raise MigrationError(f"the source guest is {status}, not running")
        finally:
            await self.mon.close()

    async def _plan_disks(self) -> list[DiskPlan]:
        plans = await source.plan_disks(self.mon, self.spec, self.opts)
        opts = self.opts
        if plans and (opts.copy_storage == "inc" or opts.storage_engine != "mirror"):
            self.presynced = await presync.valid_records(
                self.mon, self.presync_state if self.dest.presync_ok else None, self.name,
                plans, self.dest_spec_paths(plans), self._warn, dest=self.dest,
                opts=self.opts)
            if len(self.presynced) == len(plans):
                opts.storage_engine = "native"      # only the bitmaps' extents move
                return plans
            self.presynced = {}
            if opts.copy_storage == "inc":
                no_backing = [p.path for p in plans if p.backing is None]
                if no_backing and self.presync_state is not None and self.dest.presync_ok and \
                        presync.has_records(self.presync_state, self.name):
                    # a record that does not hold: never a silent partial copy
                    self._warn("copying every disk in full instead")
                    opts.copy_storage = "all"
                elif no_backing:
                    raise UsageError(f"--copy-storage-inc needs images with a backing file "
                                     f"both hosts share, or a destination made by 'vmferry "
                                     f"presync'; {', '.join(no_backing)} has neither: use "
                                     f"--copy-storage-all")
                elif opts.storage_engine == "native":
                    raise UsageError("--storage-engine native with --copy-storage-inc needs "
                                     "a destination made by 'vmferry presync'")
        if opts.storage_engine == "auto":
            opts.storage_engine = self._pick_engine(plans)
        return plans

    def _pick_engine(self, plans: list[DiskPlan]) -> str:
        """Where the native engine wins the storage benchmarks it is the default:
        full copies of raw images, to this host, which it writes directly
        (bench/results/storage.md), and to another host over plain NBD, where
        it sends the image file into the TCP connection (zero-copy lanes):
        faster than QEMU's mirror where the link is not the limit, as fast
        where it is, at about a third of the source host's CPU
        (bench/results/native_remote.md).  QEMU's mirror everywhere else:
        qcow2, which the engine can only read through the source QEMU's
        export (between hosts that cost the source twice the mirror's CPU:
        native_remote_qcow2.md), a backing chain, which needs sync=top, and
        --tls (the engine's libnbd lanes) or --tunnelled (through ssh),
        which were not measured against the mirror."""
        if (plans and self.opts.copy_storage == "all"
                and all(p.fmt == "raw" for p in plans)
                and (self.dest.same_host or not (self.opts.tls or self.opts.tunnelled))):
            return "native"
        return "mirror"

    def dest_spec_paths(self, plans: list[DiskPlan]) -> dict[str, str]:
        """node -> destination image path (after --disk-map or --dest-spec)."""
        dspec = destination_spec(self.spec, self.opts)
        return {f"disk{i}": d.path for i, d in enumerate(dspec.disks)}

    def _warn(self, text: str) -> None:
        self.info.warnings.append(text)
        if self.warn:
            self.warn(text)

    async def prepare(self) -> None:
        self._enter(Phase.PREPARE)
        self._on_undo("destroy destination", self._abort_destination)
        self.prepared = await self.dest.prepare(
            self.spec, self.disks, self.opts, accel=self.accel,
            presynced=frozenset(self.presynced),
            token=self.journal.token if self.journal is not None else "")
        p = self.prepared
        self._record("destination", paths=p.dest_paths)
        self.info.destination = repr(self.dest)
        srv = p.nbd_server
        self.info.disks_address = (f"{srv.get('host')}:{srv.get('port')}" if srv.get("host")
                                   else srv.get("path", ""))
        self.info.migrate_uri = p.migrate_uri
        self.info.tls = bool(p.tls_dir)

    async def perform(self) -> None:
        self._enter(Phase.PERFORM)
        mon = self.mon
        mon.phase = "perform"
        self._on_undo("roll back source", lambda: source.rollback(mon, self.was_running))
        self.info.storage_engine = self.opts.storage_engine
        self.info.disk_bandwidth = self.opts.disk_rate()
        if self.prepared.tls_dir:
            self._record("tls-object")
            await source.add_tls(mon, self.prepared.tls_dir)
        if self.disks and self.opts.storage_engine == "native":
            await self._native_storage()
        elif self.disks:
            sync = "top" if self.opts.copy_storage == "inc" else "full"
            # Into images it created, what a mirror wrote is what the image
            # holds: a failure keeps them, as native copies are kept, with a
            # bitmap of every write from before the mirror reads anything.
            resumable = (sync == "full" and self._resumable()
                         and all(d.node in self.prepared.fresh for d in self.disks))
            self._record("mirror", resumable=resumable)
            if resumable:
                await self._arm_keep()
                self._mirror_bitmaps = True
                await self._start_bitmaps(presync.BITMAP)
            undo: list = []
            await source.start_mirrors(mon, self.disks, self.prepared, sync, undo,
                                       speed=self.opts.disk_rate())
            # from here on the destination images may hold what a mirror wrote
            self._mirror_kept = resumable
            await source.wait_mirrors_ready(mon, self.disks, self._disk_progress,
                                            self._deadline_for_storage())
        if self.native is not None:
            self._keep_stop = asyncio.Event()
            keep = asyncio.ensure_future(self.native.keep_up(self._keep_stop))
            self._keep_up = keep

            async def stop_keep_up() -> None:
                keep.cancel()
                await asyncio.gather(keep, return_exceptions=True)
            self._on_undo("stop the passes during memory migration", stop_keep_up)
        self._record("memory")
        await source.set_capabilities(mon, source.capabilities(self.opts))
        await mon.cmd("migrate-set-parameters", **source.parameters(self.opts, self.prepared))
        self.info.downtime_limit_ms = self.opts.max_downtime or source.DEFAULT_DOWNTIME_MS
        with mon.listener("MIGRATION") as events:
            await mon.cmd("migrate", uri=self.prepared.migrate_uri)
            await self._drive_memory(events)

    async def _native_storage(self) -> None:
        def progress(snap: Any) -> None:
            moved = self.native.stats.bytes_copied + snap.bytes_written + snap.bytes_zeroed
            # a copy of every disk takes them one after another: those it has
            # not reached yet are left too, not just the one under way
            left = max(snap.bytes_total - snap.bytes_done, self.native.lacking())
            self.info.disk_processed = moved
            self.info.disk_remaining = left
            self.info.disk_total = max(self.info.disk_total, moved + left)
            self._publish()

        self.info.disk_total = sum(d.size for d in self.disks)
        sock = self.qmp_socket.parent / "vmferry-nbd.sock"
        # The bitmap is presync's: should the migration fail, what it copied so
        # far stays on the destination as a presync would have left it
        # (_abort_destination), and the next presync or migration moves the rest.
        resumable = self._resumable()
        self._record("native", socket=str(sock), bitmap=presync.BITMAP,
                     presynced=sorted(self.presynced), resumable=resumable)
        self.native = NativeStorage(
            self.mon, self.disks, self.prepared, sock, progress, bitmap=presync.BITMAP,
            existing=bool(self.presynced), resumable=resumable,
            missing={d.node: presync.missing(self.presynced[d.node], d.size) or []
                     for d in self.disks if d.node in self.presynced},
            note=self.journal.note_missing if self.journal is not None else None,
            record=self._record, rate=self.opts.disk_rate())
        self._on_undo("remove native exports and bitmaps", self.native.cleanup)
        if self.journal is not None:
            for node, m in self.native.missing.items():
                self.journal.note_missing(node, m)
            self.journal.save()
        if resumable:
            await self._arm_keep()
        await self.native.start()
        if self.presynced:
            # only what changed since, and what an interrupted copy never got
            await self.native.pass_dirty(rest=True)
        else:
            fresh = all(d.node in self.prepared.fresh for d in self.disks)
            await self.native.pass_all(fresh)
        # virtio-blk-pci's block backend hangs off its virtio-backend child
        devices = {n.node: n.device + ("/virtio-backend" if n.disk.bus == "virtio" else "")
                   for n in disk_names(self.spec)}
        await self.native.converge(devices)
        if self.native.throttled_at:
            self.info.action = (f"guest disk writes throttled to "
                                f"{self.native.throttled_at[-1] / (1 << 20):.1f} MiB/s "
                                f"so storage could converge")
        self.info.storage_passes = self.native.stats.passes
        self._note_lanes()
        self.info.disk_total = self.info.disk_processed = self.native.stats.bytes_copied
        self.info.disk_remaining = 0

    def _note_lanes(self) -> None:
        st = self.native.stats
        self.info.storage_lanes = dict(st.lanes)
        self.info.storage_lanes_note = st.lanes_note

    def _resumable(self) -> bool:
        """Whether a disk copy that stops midway can be kept (presync's records
        on both sides)."""
        return self.presync_state is not None and self.dest.presync_ok

    async def _arm_keep(self) -> None:
        """Between hosts, the agent keeps a copy should this process vanish:
        it cannot know how far the copy got, so it keeps the images under a
        generation given now, and the source records the rest."""
        if not self.dest.same_host:
            self._keep_generation = presync.next_generation(self.presync_state, self.name)
            self._record("keep", generation=self._keep_generation)
            await self.dest.keep_on_loss(self._keep_generation)

    async def _start_bitmaps(self, name: str) -> None:
        """A fresh bitmap on each disk (persistent for qcow2, to outlive this
        QEMU as the copy does), replacing one whose records did not hold."""
        for d in self.disks:
            await self.mon.try_cmd("block-dirty-bitmap-remove", node=d.node, name=name)
            self._record("bitmap", node=d.node, name=name)
            await self.mon.cmd("block-dirty-bitmap-add", node=d.node, name=name,
                               persistent=d.fmt == "qcow2")

    def _deadline_for_storage(self) -> Optional[float]:
        # A timeout's action applies to memory; storage that cannot even reach
        # 'ready' in time fails the migration.
        return self._deadline if self.opts.timeout_action is None else None

    def _disk_progress(self, jobs: list[dict[str, Any]]) -> None:
        self.info.update_disks(jobs, PREFIX)
        self._publish()

    async def _drive_memory(self, events: Any) -> None:
        """Watch memory migration until it completes, reacting to
        pre-switchover, stalls and the timeout."""
        mon = self.mon
        best_remaining: Optional[int] = None
        stalled = 0
        last_iter = -1
        limit = self.info.downtime_limit_ms
        ceiling = limit * ESCALATE_MAX
        timeout_done = False
        # The pre-switchover event can also be seen first through query-migrate; the
        # event itself then still waits in the queue and must not be handled twice.
        switched_over = False
        while True:
            try:
                ev = await asyncio.wait_for(events.get(), 0.1)
                status = ev["data"]["status"]
            except asyncio.TimeoutError:
                status = None
            if self._keep_up is not None and self._keep_up.done():
                self._keep_up.result()      # a failed pass fails the migration now
            if status is None or status not in ("pre-switchover", "completed", "failed",
                                                  "cancelled"):
                info = await mon.cmd("query-migrate")
                status = info.get("status", status)
                self.info.update_memory(info)
                if self.disks:
                    self.info.update_disks(await source.block_jobs(mon), PREFIX)
                self._publish()
                # Escalate the downtime limit when remaining stops shrinking.
                ram = info.get("ram") or {}
                it = ram.get("dirty-sync-count", 0)
                if (self.opts.escalate_downtime and status == "active" and it != last_iter
                        and it > 1):
                    last_iter = it
                    rem = ram.get("remaining", 0)
                    if best_remaining is None or rem < best_remaining * 0.9:
                        best_remaining = rem
                        stalled = 0
                    else:
                        stalled += 1
                    if stalled >= STALL_ITERATIONS and limit < ceiling:
                        limit = min(limit * 2, ceiling)
                        await mon.cmd("migrate-set-parameters", **{"downtime-limit": limit})
                        self.info.downtime_limit_ms = limit
                        self.info.action = f"downtime limit raised to {limit} ms"
                        stalled = 0
            if status == "pre-switchover":
                # Source paused, guest I/O drained: finish the disks, then let
                # QEMU send the device state.
                if not switched_over:
                    switched_over = True
                    await _test_hold("switchover")
                    if self.disks and self.native is not None:
                        self._keep_stop.set()
                        await self._keep_up          # its pass in flight ends first
                        await _test_hold("final-pass")
                        await self.native.final_pass()
                        st = self.native.stats
                        self.info.storage_passes = st.passes
                        self.info.final_pass_ms = st.final_ms
                        self.info.final_pass_bytes = st.final_bytes
                        self._note_lanes()
                    elif self.disks:
                        await source.settle_mirrors(mon, self.disks)
                    # from here the destination may hold the whole state
                    self._journal("switchover")
                    await mon.cmd("migrate-continue", state="pre-switchover")
            elif status == "completed":
                info = await mon.cmd("query-migrate")
                # QEMU sets "completed" a moment before it fills in total-time
                # and downtime; wait for them rather than report zeroes.
                for _ in range(100):
                    if info.get("total-time"):
                        break
                    await asyncio.sleep(0.005)
                    info = await mon.cmd("query-migrate")
                self.info.update_memory(info)
                self.info.memory_remaining = 0
                if self.disks:
                    # settled at switchover: the targets equal the sources
                    self.info.disk_remaining = 0
                self._publish(force=True)
                return
            elif status in ("failed", "cancelled"):
                info = await mon.try_cmd("query-migrate") or {}
                why = info.get("error-desc", status)
                raise MigrationError(f"memory migration {status}: {why}", phase="perform")
            if (self._deadline and not timeout_done and time.monotonic() > self._deadline):
                timeout_done = True
                await self._on_timeout()

    async def _on_timeout(self) -> None:
        action = self.opts.timeout_action
        if action == "suspend":
            await self.mon.cmd("stop")
            self.info.action = "source suspended on timeout"
        elif action == "postcopy":
            await self.mon.cmd("migrate-start-postcopy")
            self.info.postcopy = True
            self.info.action = "switched to post-copy on timeout"
        else:
            raise MigrationError(f"migration did not finish within --timeout "
                                 f"{self.opts.timeout:g} s", phase="perform")
        self._publish(force=True)

    async def finish(self) -> None:
        self._enter(Phase.FINISH)
        state = await self.dest.finish(self.opts, resume=self.was_running and
                                       not self.opts.suspend)
        self.info.action = self.info.action or f"destination {state}"

    async def _abort_destination(self) -> str:
        """Undo Prepare, keeping what the native engine copied when it is worth
        it: the destination vouches for its images first, then the source
        records how far each copy got (presync.py)."""
        # A copy that filled its file system would only keep it full: the
        # next attempt there fails the same way, so it goes with the rest.
        full = "No space left on device" in (self.info.error or "")
        keep = {} if full else self._partial_copies()
        generation = (self._keep_generation or presync.next_generation(self.presync_state,
                                                                       self.name)) if keep else 0
        outcome = await self.dest.abort({n: generation for n in keep} if keep else None)
        if not self._mirror_bitmaps and (self.native is None or not self.native.resumable):
            return outcome
        # an agent we lost keeps them as it was told (keep_on_loss), if it can:
        # the records say so, and the next migration checks before trusting them.
        # Also a copy that has reached nothing yet: the agent keeps it all the
        # same, and without records nothing would ever claim or remove it.
        if (outcome == "unknown" and self._keep_generation and not keep
                and self.native is not None and self.native.resumable):
            keep = {d.node: self.native.missing[d.node] for d in self.disks}
            generation = self._keep_generation
        if outcome == "kept" or (keep and outcome == "unknown" and self._keep_generation):
            pid = self.presync_state.read_pid(self.name)
            presync.write_records(self.presync_state, self.name, generation, {
                d.node: presync.record(d, self.prepared.dest_paths[d.node], pid, generation,
                                       keep[d.node], confirmed=outcome == "kept")
                for d in self.disks})
            if self.native is not None:
                size = max(1, sum(d.size for d in self.disks))
                done = f"{1 - self.native.lacking() / size:.0%} of the disks copied"
            else:
                done = "as far as the mirror got"
            # said in the failure's one line (_outcome); a lost agent kept the
            # images if it could (a killed one could not): the next migration
            # checks before it trusts them
            self._kept = (f"kept the partial copy on {self.dest!r} ({done}): a migration "
                          f"or presync there moves only the rest" if outcome == "kept" else
                          f"the partial copy on {self.dest!r} ({done}) is kept if its agent "
                          f"could: a migration or presync there checks, then moves only "
                          f"the rest")
            self.info.warnings.append(self._kept)
        else:
            await self._drop_bitmaps()
        return outcome

    def _partial_copies(self) -> dict[str, presync.Missing]:
        """node -> what its destination image lacks (spans, or UNWRITTEN after
        a mirror), when a copy got somewhere and the destination can keep
        it; else {}."""
        if getattr(self, "prepared", None) is None:
            return {}
        if self._mirror_kept:
            return {d.node: presync.UNWRITTEN for d in self.disks}
        n = self.native
        if n is None or not n.resumable or n.lacking() >= sum(d.size for d in self.disks):
            return {}
        return {d.node: n.missing[d.node] for d in self.disks}

    async def _drop_bitmaps(self) -> None:
        """No partial copy is kept: the bitmap and any records go (the
        destination images may have changed under them)."""
        for d in self.disks:
            await self.mon.try_cmd("block-dirty-bitmap-remove", node=d.node,
                                   name=presync.BITMAP)
        if self.presynced:
            await presync.forget(self.presync_state, self.name, self.dest)

    async def confirm(self) -> None:
        """The destination runs the guest now: retire the source."""
        self._enter(Phase.CONFIRM)
        self._undo.clear()
        if self.native is not None:
            await self.native.cleanup()
        if self.native is not None or self._mirror_bitmaps:
            # a persistent bitmap would otherwise be saved into the source image
            await self._drop_bitmaps()
        elif self.presynced:
            await presync.forget(self.presync_state, self.name, self.dest)
        try:
            await self.mon.try_cmd("quit")
        finally:
            await self.mon.close()
        if self.stop_source:
            await self.stop_source()
        self.info.status = "completed"
        if self.journal is not None:
            self.journal.close()
        self._enter(Phase.DONE)
