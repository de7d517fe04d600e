"""`vmferry recover NAME`: an interrupted migration or presync (its process
died; see journal.py) brought to exactly one running guest.

What the journal says was reached decides which way is safe; the two QEMUs
(and, between hosts, the destination's agent) are asked where things stand:

  journal reached        the destination says        recover
  ---------------------  --------------------------  ---------------------------
  any                    running (this migration's   complete (resume it there if
                         hand-over mark: written     that was cut short, end its
                         before the guest may run    record, retire the source)
                         there, or Finish ends)
                         it had the guest, and its   change nothing: the guest
                         QEMU died since             stays paused, one line says
                                                     what to check
  any, the source in     (post-copy: the guest's     wait for QEMU to complete
  post-copy              memory is on both hosts)    it, then as below
  begin .. perform       anything else               roll back
  switchover             completed, source complete  complete (resume it there)
  (migrate-continue      anything else               roll back: it was never
   may have been sent)                               asked to run the guest
  finish (asked to       completed                   complete (resume it there)
  resume the guest)      absent, incoming            roll back (no mark: never)
                         busy (its agent still       wait, up to SETTLE_TIMEOUT
                         works on it)
                         cannot be asked             change nothing, as above
  confirm                (runs it)                   complete

A recover that decides to complete writes "finish" into the journal first, so
that one killed on the way goes on forward the next time.

Between hosts the agent undoes an unfinished incoming migration as soon as
the channel from its source drops, unless everything had arrived: it keeps
that one (Incoming.keep_for_recover) for recover to finish or undo.  recover first makes the journal its
own (journal.take_over), so two recovers or an abort never act at once.

Rolling back undoes, by name, what the journal lists in the source QEMU
(migration, mirror jobs and nodes, the native engine's exports, bitmaps,
NBD server and throttles, TLS credentials), removes what the destination
created, and resumes the source guest if it ran before.  Completing
resumes the destination guest and stops the source QEMU.
"""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import IO, Callable, Optional

from vmferry.errors import MigrationError, UsageError, VmferryError
from vmferry.migration import bitmap_pass, journal as journal_mod, presync, source, spans, testhooks
from vmferry.migration.api import parse_destination
from vmferry.migration.destination import Destination
from vmferry.migration.journal import BadJournal, Journal
from vmferry.migration.monitor import Monitor
from vmferry.migration.native import NativeStorage
from vmferry.migration.options import MigrateOptions
from vmferry.migration.plan import DiskPlan
from vmferry.migration.remote import RemoteDestination
from vmferry.vm.process import stop_vm_async
from vmferry.vm.state import StateDir

# how long a destination agent's session may go on working on the migration
# (a Finish waits up to incoming.INCOMING_TIMEOUT) before recover gives up
SETTLE_TIMEOUT = 150.0
PAUSED = ("paused", "postmigrate", "finish-migrate", "prelaunch")


def _claim(state: StateDir, name: str) -> Journal:
    """NAME's interrupted journal, made this process's own (journal.take_over)."""
    with state.lock():
        j = journal_mod.load(state, name)
        if j is None:
            raise UsageError(f"{name} has no interrupted migration or presync to recover")
        if isinstance(j, BadJournal):
            raise UsageError(f"{j.path} cannot be read ({j.why}): find out where {name} "
                             f"runs ('vmferry status {name}' here and on the destination), "
                             f"resolve it by hand, then remove that file")
        if j.owner_alive:
            raise UsageError(f"the {j.describe()} of {name} is still under way (pid "
                             f"{j.owner}): stop it with 'vmferry abort {name}'")
        j.take_over()
        return j


async def recover(state: StateDir, name: str, *, resume_source: bool = False,
                  warn: Optional[Callable[[str], None]] = None,
                  relay: Optional[tuple[IO[bytes], IO[bytes]]] = None,
                  relayed_dest: str = "") -> str:
    """Resolve NAME's interrupted migration or presync; returns the one line
    that says where the guest runs now.  UsageError when there is nothing
    to recover or its process still runs; MigrationError (the guest left
    paused) when the destination cannot tell whether it resumed the guest.
    RESUME_SOURCE: the user checked that the destination does not run it.
    RELAY: the channel through which a management machine relays
    RELAYED_DEST's agent (`--connect SRC recover NAME --direct DEST`), for a
    destination only that machine reaches."""
    j = _claim(state, name)
    try:
        if relay is not None and relayed_dest != j.dest:
            # another agent would answer "absent" for a guest it never had,
            # and the source would resume while the real destination runs it
            raise UsageError(f"the migration of {name} went to {j.dest}, not "
                             f"{relayed_dest}: name that destination after --direct")
        dest = (RemoteDestination(j.dest, relay=relay) if relay is not None
                else parse_destination(j.dest))
        try:
            if j.kind == "presync":
                return await _presync(state, j, dest)
            return await _migration(state, j, dest, resume_source)
        finally:
            await dest.close()
    except BaseException:
        if j.path is not None and j.path.exists():
            j.abandon()         # for the next recover, not "under way" by a dead one
        raise


async def recover_all(state: StateDir) -> list[tuple[str, str, bool]]:
    """recover() for every VM of STATE with an interrupted journal:
    (name, line, resolved) each."""
    out = []
    for name in state.names():
        if journal_mod.interrupted(state, name) is None:
            continue
        try:
            out.append((name, await recover(state, name), True))
        except VmferryError as e:
            out.append((name, str(e), False))
    return out


def _opts(j: Journal) -> MigrateOptions:
    return MigrateOptions(pki_dir=Path(j.options.get("pki_dir", "/etc/pki")))


async def _source(state: StateDir, name: str) -> Optional[Monitor]:
    """A monitor on the source QEMU, or None when it is gone."""
    if state.read_pid(name) is None:
        return None
    return await Monitor(state.qmp_socket(name), "source", "recover").connect()


async def _probe(dest: Destination, j: Journal) -> str:
    """The destination's answer.  Past "finish" an agent's session may still
    be carrying the Finish out: that is waited for, never guessed at."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SETTLE_TIMEOUT
    while True:
        where = await dest.probe(j.dest_name, j.token, _opts(j))
        if where != "busy" or loop.time() > deadline:
            return "unknown" if where == "busy" else where
        await asyncio.sleep(0.5)


async def _migration(state: StateDir, j: Journal, dest: Destination,
                     resume_source: bool) -> str:
    mon = await _source(state, j.name)
    try:
        src_mig = (await mon.cmd("query-migrate")).get("status") if mon else None
        if src_mig in source.POSTCOPY:
            # the guest's state is split between the hosts: the only way is
            # on, and QEMU goes on without vmferry
            src_mig = await _postcopy_done(mon, j)
        where = await _probe(dest, j) if j.past("prepare") else "absent"
        if resume_source:
            if where == "running":
                raise UsageError(f"{j.dest} says it runs {j.dest_name}: --resume-source would "
                                 f"run it twice; run 'vmferry recover {j.name}' instead")
            # it may have run the guest, and written its disks: nothing is kept
            return await _roll_back(state, j, mon, dest, keep_copy=False)
        resume = bool(j.was_running) and not j.options.get("suspend")
        # "running": this migration handed the guest over there (a durable
        # mark, written before it may run there): never anything but forward
        forward = (j.past("confirm") or where == "running"
                   or (j.past("switchover") and where == "completed"
                       and src_mig in ("completed", None)))
        if forward and where in ("completed", "running"):
            # decided: a recover killed from here on goes on forward too
            j.enter("finish")
            # resumes it there if that was cut short, and ends its record
            if await dest.finish_orphan(j.dest_name, j.token, resume=resume) is None and \
                    where == "completed":
                forward = False    # only its agent could, and it undoes it instead
        if forward:
            await _retire_source(state, j, mon, dest)
            j.close()
            if j.was_running and not resume:
                return f"completed: {j.name} is on {j.dest}{_as(j)}, paused as --suspend asked"
            return f"completed: {j.name} runs on {j.dest}{_as(j)}"
        if where == "resumed-gone" or (j.past("finish") and where in ("unknown", "busy")):
            why = ("resumed the guest, and its QEMU has died since" if where == "resumed-gone"
                   else "cannot say whether it resumed the guest")
            raise MigrationError(
                f"{j.dest} {why}: {j.name} stays paused here; check {j.dest}, then run "
                f"'vmferry recover {j.name}' again{_direct_hint(j)}, or 'vmferry recover "
                f"{j.name} --resume-source' if it surely does not run {j.dest_name} there")
        # only a destination known never to have run the guest keeps its copy
        return await _roll_back(state, j, mon, dest,
                                keep_copy=where in ("absent", "incoming", "completed"))
    finally:
        if mon is not None:
            await mon.close()


async def _postcopy_done(mon: Monitor, j: Journal) -> str:
    """Wait for a post-copy migration to complete (the source pushes the
    pages the destination lacks by itself); one that stalled says so."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SETTLE_TIMEOUT
    while True:
        status = (await mon.cmd("query-migrate")).get("status")
        if status not in source.POSTCOPY:
            return status
        if status != "postcopy-active" or loop.time() > deadline:
            raise MigrationError(
                f"the post-copy migration of {j.name} to {j.dest} is {status}: neither host "
                f"holds the whole guest, so it can only go on; once the link is back, "
                f"'migrate-recover' on the destination's QEMU and 'migrate' with "
                f"resume=true on this one, then run 'vmferry recover {j.name}' again")
        await asyncio.sleep(0.2)


def _as(j: Journal) -> str:
    return f" as {j.dest_name}" if j.dest_name != j.name else ""


def _direct_hint(j: Journal) -> str:
    """Where a management machine relayed the destination, it may be the
    only one that reaches it: say how to recover from there."""
    if not j.options.get("direct"):
        return ""
    return (f" (a --direct migration: where only the management machine reaches "
            f"the destination, run there 'vmferry --connect URI-OF-THIS-HOST recover "
            f"{j.name} --direct {j.dest}')")


async def _roll_back(state: StateDir, j: Journal, mon: Optional[Monitor],
                     dest: Destination, keep_copy: bool = True) -> str:
    # The destination first: it never ran the guest, and must not hold it
    # when the source resumes.  What the disk copy got stays there as a
    # partial copy where it can (as the live rollback keeps it, flow.py); a
    # mirror still writing into it is stopped before that, and the source's
    # migration is cancelled only after: a destination QEMU whose incoming
    # migration is cancelled exits by itself, and an image it did not close
    # cleanly is not kept.
    keep = _partial_copies(j) if mon is not None and keep_copy else {}
    if mon is not None:
        await source.cancel_jobs(mon)
        if keep and not await _bitmaps_there(mon, keep):
            keep = {}       # recorded before it was added: nothing tracks the writes
    told = next((r["generation"] for r in j.has("keep")), 0)
    generation = (told or presync.next_generation(state, j.name)) if keep else 0
    if keep and not told:
        # before the destination keeps them: a recover killed after that
        # asks for the same generation, which the images' records then show
        j.add("keep", generation=generation)
    paths = next((r["paths"] for r in j.has("destination")), {})
    fmts = {d["node"]: d["fmt"] for d in j.disks}
    kept = await dest.undo_orphan(j.dest_name, j.token, {paths[n]: (n, generation, fmts[n])
                                                    for n in keep} if keep else None)
    await testhooks.hold("kept")
    if mon is not None:
        await source.rollback(mon, resume=False)
    # an agent kept them when the source went away, as it was told, if it
    # could: the next migration checks its records before trusting them
    kept = kept or bool(keep and told and not dest.same_host)
    await _undo_copies(state, j, mon, dest, (generation, keep) if kept else None)
    note = (f" (the partial copy on {j.dest} is kept: a migration or presync there "
            f"moves only the rest)" if kept else "")
    if mon is None:
        j.close()
        return (f"rolled back: the destination holds nothing of {j.name}, but its QEMU "
                f"on this host is gone too: start it with 'vmferry run'")
    if j.was_running:
        status = (await mon.cmd("query-status"))["status"]
        if status in PAUSED:
            await mon.cmd("cont")
    j.close()
    return f"rolled back: {j.name} runs on this host{note}"


def _disks(j: Journal) -> list[DiskPlan]:
    return [DiskPlan(**d) for d in j.disks]


async def _bitmaps_there(mon: Monitor, nodes: dict) -> bool:
    """Whether each of NODES carries presync's bitmap of the writes since."""
    found = {n.get("node-name") for n in await mon.cmd("query-named-block-nodes", flat=True)
             if any(b.get("name") == presync.BITMAP for b in n.get("dirty-bitmaps", []))}
    return all(node in found for node in nodes)


def _partial_copies(j: Journal) -> dict[str, "presync.Missing"]:
    """node -> what its destination image lacks (the journal's last word on
    it; after a mirror, UNWRITTEN), when the copy ran resumable, the
    destination can keep the images and a copy got somewhere; else {}."""
    if not j.has("destination") or not (j.dest.startswith("local://") or j.has("keep")):
        return {}
    if any(r.get("resumable") for r in j.has("mirror")):
        return {d["node"]: presync.UNWRITTEN for d in j.disks}
    if not any(r.get("resumable") for r in j.has("native")):
        return {}
    out: dict[str, presync.Missing] = {}
    for d in j.disks:
        got = spans.parse(j.missing.get(d["node"], [[0, d["size"]]]), d["size"])
        if got is None:
            return {}
        out[d["node"]] = got
    lacking = sum(spans.total(m) for m in out.values())
    return out if lacking < sum(d["size"] for d in j.disks) else {}


async def _undo_copies(state: StateDir, j: Journal, mon: Optional[Monitor],
                       dest: Destination, kept: Optional[tuple[int, dict]] = None) -> None:
    """The native engine's exports, throttles and NBD server, and the bitmap
    of either engine.  The bitmap stays with the records of a partial copy
    the destination KEPT (generation, node -> what it lacks); otherwise it
    goes, and so do the records of a presync it used (the destination images
    changed under them)."""
    for res in j.has("native"):
        if mon is not None:
            ns = NativeStorage(mon, _disks(j), None, Path(res["socket"]), lambda snap: None,
                               bitmap=res.get("bitmap") or presync.BITMAP,
                               existing=bool(res.get("presynced")),
                               resumable=bool(res.get("resumable")))
            ns._server = True
            for t in j.has("throttle"):
                ns.devices = t["devices"]
                ns.throttled_at = [0]
            await ns.cleanup()
        Path(res["socket"]).unlink(missing_ok=True)
    copied = j.has("native") or [r for r in j.has("mirror") if r.get("resumable")]
    if not copied:
        return
    if kept is not None:
        generation, missing = kept
        paths = next(r["paths"] for r in j.has("destination"))
        pid = state.read_pid(j.name)
        presync.write_records(state, j.name, generation, {
            d.node: presync.record(d, paths[d.node], pid, generation, missing[d.node])
            for d in _disks(j)})
        return
    if mon is not None:
        for d in j.disks:
            # a persistent bitmap would otherwise stay in the source image
            await mon.try_cmd("block-dirty-bitmap-remove", node=d["node"],
                              name=presync.BITMAP)
    if any(r.get("presynced") for r in copied):
        await presync.forget(state, j.name, dest)


async def _retire_source(state: StateDir, j: Journal, mon: Optional[Monitor],
                         dest: Destination) -> None:
    """What Confirm does: the destination runs the guest, the source goes."""
    await _undo_copies(state, j, mon, dest)
    if mon is not None:
        await mon.try_cmd("quit")
        await mon.close()
    await stop_vm_async(state, j.name, force=True, timeout=5)
    if j.options.get("undefine_source"):
        state.spec_path(j.name).unlink(missing_ok=True)


async def _presync(state: StateDir, j: Journal, dest: Destination) -> str:
    """A presync has no point of no return: undo it, and let the next presync
    or migration copy in full (its records no longer vouch for anything)."""
    await dest.undo_orphan(j.name, j.token)
    mon = await _source(state, j.name)
    if mon is not None:
        try:
            await bitmap_pass.unexport_all(mon)
            if j.has("presync-server"):
                await mon.try_cmd("nbd-server-stop")
            for d in j.has("presync-disk"):
                for frozen in (bitmap_pass.FROZEN, *bitmap_pass.OLD_NAMES["frozen"]):
                    await mon.try_cmd("block-dirty-bitmap-remove", node=d["node"],
                                      name=frozen)
                # a bitmap started for an image that never got its copy
                # vouches for nothing
                if d.get("fresh"):
                    await mon.try_cmd("block-dirty-bitmap-remove", node=d["node"],
                                      name=presync.BITMAP)
        finally:
            await mon.close()
    for res in j.has("presync-server"):
        Path(res["socket"]).unlink(missing_ok=True)
    await presync.forget(state, j.name, dest)
    j.close()
    return (f"rolled back: the presync of {j.name} was undone and {j.name} runs on; the "
            f"next presync or migration copies its disks in full")


__all__ = ["recover", "recover_all"]
