"""Pre-seeding: `vmferry presync NAME DEST` copies a running VM's disks to the
destination ahead of time and leaves a dirty bitmap on the source, so that a
later `vmferry migrate --copy-storage-inc` moves only what the guest wrote
since (through the native engine).

Each presync run after the first moves only the new delta.  Two records tie
a destination image to the source bitmap that tracks it:

  source       STATE/NAME/presync.json   node -> bitmap, image path, generation,
                                         the QEMU pid (a raw image's bitmap lives
                                         only as long as that process), and
                                         "missing" when parts of the image were
                                         never copied
  destination  IMAGE.vmferry-presync.json  generation and the image's identity
                                         (inode, size, mtime) when presync left it
                                         (presync_target.py, on the destination host)

A migration that stops midway keeps its destination images the same way
(flow.py, "keep the partial copy"): the bitmap records every write since its
copy began, and "missing" lists the spans the copy never got (spans.py) —
exactly, as the native engine tracks them, or, after QEMU's mirror, which
does not say, as "unwritten": what the fresh destination image holds nothing
in, asked of the destination when the copy is next used.  The next presync
or migration copies those spans in full and the bitmap's extents.

A record that is missing or does not match (bitmap gone or inconsistent after
an unclean shutdown, QEMU restarted, image replaced or touched) makes vmferry
warn and copy the whole disk: never a silent partial copy.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional, Union

from vmferry.aio import in_thread, uncancellable
from vmferry.copying import copy_async
from vmferry.errors import Cancelled, MigrationError, UsageError, VmferryError
from vmferry.migration import bitmap_pass, journal, probe, spans, testhooks
from vmferry.migration.destination import destination_spec
from vmferry.migration.dryrun import DiskMove, DryRun, PROBE_SECONDS, options_in_effect
from vmferry.migration.journal import refuse_if_interrupted
from vmferry.migration.monitor import Monitor
from vmferry.migration.options import MigrateOptions
from vmferry.migration.plan import DiskPlan
from vmferry.migration.source import plan_disks
from vmferry.migration.spans import Span

BITMAP = "vmferry-presync"
RECORD = "presync.json"


@dataclasses.dataclass
class PresyncResult:
    """What one presync moved."""
    bytes_moved: int = 0
    disks: dict[str, int] = dataclasses.field(default_factory=dict)   # node -> bytes
    incremental: list[str] = dataclasses.field(default_factory=list)  # nodes: delta only
    warnings: list[str] = dataclasses.field(default_factory=list)
    # the engine's lanes that carried the bytes ("zero-copy", "libnbd") -> bytes
    lanes: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def kind(self) -> str:
        """"incremental" when every disk moved only its delta, else "full"."""
        return ("incremental" if self.disks and len(self.incremental) == len(self.disks)
                else "full")


def _source_record(state: Any, name: str) -> Path:
    return state.vm_dir(name) / RECORD


def has_records(state: Any, name: str) -> bool:
    return _source_record(state, name).exists()


def load_records(state: Any, name: str) -> dict:
    """STATE/NAME/presync.json: {"generation": N, "disks": {node: record}}."""
    return _load(_source_record(state, name))


def next_generation(state: Any, name: str) -> int:
    return load_records(state, name).get("generation", 0) + 1


def write_records(state: Any, name: str, generation: int, records: dict[str, dict]) -> None:
    """The source's half of the records (after the destination vouched for
    its images: a failure in between leaves records that do not match, and a
    full copy next time, never a partial one)."""
    path = _source_record(state, name)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"generation": generation, "disks": records}, indent=1))
    os.replace(tmp, path)


# "missing" of a copy made by QEMU's mirror: the destination image's holes
UNWRITTEN = "unwritten"
Missing = Union[list[Span], str, None]


def record(p: DiskPlan, dest_path: str, qemu_pid: Optional[int], generation: int,
           missing: Missing = None, confirmed: bool = True) -> dict:
    """The source's record of a copy; MISSING: the spans it lacks, UNWRITTEN,
    or nothing for a complete one.  Not CONFIRMED: the destination was lost
    before it could say it kept the image (it may not have)."""
    r = {"bitmap": BITMAP, "dest_path": dest_path, "fmt": p.fmt, "qemu_pid": qemu_pid,
         "generation": generation}
    if not confirmed:
        r["unconfirmed"] = True
    if missing == UNWRITTEN:
        r["missing"] = UNWRITTEN
    elif missing:
        r["missing"] = [list(sp) for sp in missing]
    return r


def copies(state: Any, name: str) -> dict[str, dict]:
    """node -> {dest_path, valid_below, partial}: the destination images the
    source's records vouch for (presynced, or kept from an interrupted
    migration), as status shows them.  valid_below: where the first span a
    copy lacks starts (None: complete, or not known before it is used)."""
    out = {}
    for node, r in load_records(state, name).get("disks", {}).items():
        m = r.get("missing")
        first = (m[0][0] if isinstance(m, list) and m and isinstance(m[0], list)
                 else r.get("valid_below"))
        out[node] = {"dest_path": r.get("dest_path"), "valid_below": first,
                     "partial": first is not None or m == UNWRITTEN}
    return out


def missing(r: dict, size: int) -> Optional[list[Span]]:
    """The spans the copy R vouches for lacks ([] for all of it), or None
    when the record says nothing usable (UNWRITTEN is resolved by
    valid_records, asking the destination)."""
    m = r.get("missing")
    if m is None:
        v = r.get("valid_below", size)          # records of earlier versions
        if not (isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= size):
            return None
        return [(v, size)] if v < size else []
    return spans.parse(m, size)


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


async def _bitmaps(mon: Monitor) -> dict[str, dict[str, Any]]:
    """node -> {bitmap name: info} for our presync bitmaps."""
    nodes = await mon.cmd("query-named-block-nodes", flat=True)
    return {n["node-name"]: {b["name"]: b for b in n.get("dirty-bitmaps", [])
                             if b["name"] in (BITMAP, bitmap_pass.FROZEN)} for n in nodes}


async def delta(mon: Monitor, good: dict[str, dict], plans: list[DiskPlan]) -> dict[str, int]:
    """node -> bytes an incremental copy of each disk in GOOD (node -> its
    record) moves: what its bitmap marks, and what the copy still lacks."""
    maps = await _bitmaps(mon)
    out = {}
    for p in plans:
        if p.node in good:
            dirty = maps.get(p.node, {}).get(BITMAP, {}).get("count", 0)
            lacking = spans.total(missing(good[p.node], p.size) or [])
            out[p.node] = min(p.size, dirty + lacking)
    return out


async def valid_records(mon: Monitor, state: Any, name: str, plans: list[DiskPlan],
                        dest_paths: dict[str, str], warn: Callable[[str], None],
                        dest: Any = None, opts: Optional[MigrateOptions] = None
                        ) -> dict[str, dict]:
    """node -> record, for every disk whose presync record still holds: the
    source's bitmap, and (asked of DEST) the image beside its own record."""
    if state is None or not has_records(state, name):
        return {}
    rec = _load(_source_record(state, name))
    pid = state.read_pid(name)
    maps = await _bitmaps(mon)
    good: dict[str, dict] = {}
    why: dict[str, str] = {}
    for p in plans:
        r = rec.get("disks", {}).get(p.node)
        if r is None:
            why[p.node] = "no presync record"
        elif dest_paths.get(p.node) and os.path.realpath(dest_paths[p.node]) != \
                os.path.realpath(r["dest_path"]):
            why[p.node] = f"it was presynced to {r['dest_path']}, not {dest_paths[p.node]}"
        elif BITMAP not in maps.get(p.node, {}):
            why[p.node] = "its dirty bitmap is gone (QEMU restarted or shut down uncleanly)"
        elif maps[p.node][BITMAP].get("inconsistent"):
            why[p.node] = "its dirty bitmap is marked inconsistent"
        elif p.fmt != "qcow2" and r.get("qemu_pid") != pid:
            why[p.node] = "QEMU was restarted since, and a raw image's bitmap lives in memory"
        elif r.get("missing") != UNWRITTEN and missing(r, p.size) is None:
            why[p.node] = "it says nothing usable of what the copy lacks"
        else:
            good[p.node] = r
    if good and dest is not None:
        stale = await dest.presync_check({n: (r["dest_path"], r.get("generation"))
                                          for n, r in good.items()}, opts or MigrateOptions())
        for node, reason in stale.items():
            if reason:
                why[node] = reason
                good.pop(node, None)
    ask = {n: (r["dest_path"], r.get("fmt", "raw")) for n, r in good.items()
           if r.get("missing") == UNWRITTEN}
    if ask:
        holes = await dest.presync_unwritten(ask, opts or MigrateOptions()) \
            if dest is not None else {}
        size = {p.node: p.size for p in plans}
        for node in ask:
            got = spans.parse(holes.get(node), size[node])
            if got is None:
                why[node] = "the destination cannot tell which parts its image holds"
                good.pop(node)
            else:
                good[node] = dict(good[node], missing=[list(sp) for sp in got])
    for node, reason in why.items():
        warn(f"presync record of {node} does not hold: {reason}")
    return good


async def forget(state: Any, name: str, dest: Any = None, discard: bool = False) -> None:
    """Drop both records (after a migration used or invalidated them); with
    DISCARD, the destination images they vouch for too."""
    rec = _load(_source_record(state, name))
    paths = [r["dest_path"] for r in rec.get("disks", {}).values()]
    if dest is not None and paths:
        try:
            await dest.presync_forget(paths, discard)
        except VmferryError:
            if discard:
                raise
            # the source record goes anyway: alone, an image record vouches for nothing
    _source_record(state, name).unlink(missing_ok=True)


async def discard(state: Any, name: str, dest: Any, opts: MigrateOptions) -> str:
    """`vmferry presync --discard`: remove a presynced or kept partial copy,
    its records and the source's bitmap."""
    copied = copies(state, name)
    if not copied:
        raise UsageError(f"{name} has no presynced or kept copy to discard")
    rec = state.load(name)
    if rec.pid is not None:
        async with Monitor(rec.qmp_socket, "source", "presync") as mon:
            for node in copied:
                for b in (bitmap_pass.FROZEN, BITMAP):
                    await mon.try_cmd("block-dirty-bitmap-remove", node=node, name=b)
    await dest.connect(opts)
    await forget(state, name, dest, discard=True)
    return (f"discarded the copy of {name} on {dest!r}: "
            f"{', '.join(c['dest_path'] for c in copied.values())}")


async def presync(state: Any, name: str, dest: Any, opts: MigrateOptions, *,
                  warn: Optional[Callable[[str], None]] = None,
                  progress: Optional[Callable[[Any], None]] = None) -> PresyncResult:
    """Copy (or refresh) the destination images of NAME's disks while it runs."""
    refuse_if_interrupted(state, name)
    rec = state.load(name)
    if rec.pid is None:
        raise UsageError(f"{name} is not running: presync copies a running VM's disks")
    if not dest.presync_ok:
        raise UsageError(f"presync cannot write to {dest!r}")
    stats = PresyncResult()

    def note(text: str) -> None:
        stats.warnings.append(text)
        if warn is not None:
            warn(text)
    jr = journal.start(state, "presync", name, dest.uri, opts)
    try:
        mon = await Monitor(rec.qmp_socket, "source", "presync").connect()
    except BaseException:
        jr.close()
        raise
    src_sock = rec.qmp_socket.parent / "vmferry-presync.sock"
    server = opened = ok = False
    records: dict[str, dict] = {}
    added: list[str] = []
    try:
        plans = await plan_disks(mon, rec.spec, opts)
        dspec = destination_spec(rec.spec, opts)
        dpaths = {f"disk{i}": d.path for i, d in enumerate(dspec.disks)}
        good = await valid_records(mon, state, name, plans, dpaths, note, dest=dest,
                                   opts=opts)
        generation = next_generation(state, name)
        targets = await dest.presync_open(_targets(plans, dpaths, good), opts)
        opened = True
        jr.enter("perform")
        for node, t in targets.items():
            if node in good and t["stale"]:
                note(f"presync record of {node} does not hold: {t['stale']}")
                good.pop(node)
        jr.add("presync-server", socket=str(src_sock))
        await mon.cmd("nbd-server-start", addr={"type": "unix",
                                                "data": {"path": str(src_sock)}})
        server = True
        for p in plans:
            if p.node not in good:
                added.append(p.node)      # _copy_disk starts a fresh bitmap
            jr.add("presync-disk", node=p.node, fresh=p.node not in good)
            moved = await _copy_disk(mon, p, p.node in good, targets[p.node], src_sock,
                                     dest.presync_uri, progress, opts.disk_rate(),
                                     missing(good[p.node], p.size) or []
                                     if p.node in good else [], stats.lanes)
            stats.bytes_moved += moved
            stats.disks[p.node] = moved
            if p.node in good:
                stats.incremental.append(p.node)
            records[p.node] = record(p, dpaths[p.node], rec.pid, generation)
        # The destination vouches for its images first, then the source record
        # (a failure in between leaves records that do not match: a full copy
        # next time, never a partial one).
        opened = False
        await dest.presync_close({n: generation for n in records}, name)
        write_records(state, name, generation, records)
        ok = True
        return stats
    except (UsageError, Cancelled):
        raise
    except VmferryError as e:
        # one line that also says where that leaves the user
        raise MigrationError(f"presync of {name} failed: {e}; {name} runs on, and the next "
                             f"presync or migration copies its disks in full",
                             phase="presync") from e
    finally:
        async def teardown() -> None:
            # each step on its own: one that fails must not skip the others
            if not ok:
                for node in added:
                    # a bitmap for an image that never got its copy vouches for nothing
                    await mon.try_cmd("block-dirty-bitmap-remove", node=node, name=BITMAP)
            if opened:
                with contextlib.suppress(VmferryError):     # already failing
                    await dest.presync_close({}, name)
            if server:
                await mon.try_cmd("nbd-server-stop")
                src_sock.unlink(missing_ok=True)      # QEMU leaves the socket file
            await mon.close()
            with contextlib.suppress(VmferryError):
                await dest.close()
            jr.close()
        await uncancellable(teardown())


def _targets(plans: list[DiskPlan], dpaths: dict[str, str], good: dict[str, dict],
             allocated: bool = False) -> list[dict[str, Any]]:
    """The destination images presync_open (or, with ALLOCATED, its check) asks for."""
    return [{"node": p.node, "dest_path": dpaths[p.node], "fmt": p.fmt, "size": p.size,
             "source_id": p.source_id,
             "generation": good[p.node].get("generation") if p.node in good else None,
             **({"allocated": p.allocated} if allocated else {})}
            for p in plans]


async def check(state: Any, name: str, dest: Any, opts: MigrateOptions) -> DryRun:
    """presync()'s checks, every one and on both hosts, changing nothing: no
    journal, bitmap, export or NBD server on the source, no image, record or
    qemu-nbd on the destination (a dry run).  A disk whose records hold
    would move only what its bitmap marks."""
    rec = state.load(name)
    run = DryRun(name=name, destination=repr(dest), kind="presync",
                 transport=dest.transport(opts), engine="native",
                 options=options_in_effect(opts))
    problem = journal.problem(state, name)
    if problem:
        run.add_problems([problem])
    if not dest.presync_ok:
        run.add_problems([f"presync cannot write to {dest!r}"])
    try:
        await dest.connect(opts)
    except (VmferryError, OSError) as e:
        run.add_problems([str(e)])
    if rec.pid is None:
        run.add_problems([f"{name} is not running: presync copies a running VM's disks"])
        return run
    plans: list[DiskPlan] = []
    good: dict[str, dict] = {}
    dpaths: dict[str, str] = {}
    moves: dict[str, int] = {}
    try:
        async with Monitor(rec.qmp_socket, "source", "check") as mon:
            plans = await plan_disks(mon, rec.spec, opts)
            dspec = destination_spec(rec.spec, opts)
            dpaths = {f"disk{i}": d.path for i, d in enumerate(dspec.disks)}
            good = await valid_records(mon, state, name, plans, dpaths, run.warnings.append,
                                       dest=dest if dest.presync_ok else None, opts=opts)
            moves = await delta(mon, good, plans)
    except VmferryError as e:
        run.add_problems([str(e)])
    found = None
    if plans and dest.presync_ok and run.ok:
        found = await dest.presync_check_open(_targets(plans, dpaths, good, allocated=True),
                                              opts)
        run.heard(found)
    run.disks = [DiskMove(node=p.node, path=p.path, fmt=p.fmt, size=p.size,
                          allocated=p.allocated, dest_path=dpaths.get(p.node, ""),
                          create=bool(found and p.node in found.create), engine="native",
                          moves=moves.get(p.node, p.allocated),
                          dest_free=found.free.get(p.node) if found else None)
                 for p in plans]
    if run.ok:
        run.link_rate = await dest.probe_link(PROBE_SECONDS / 2)
        run.disk_read_rate = await in_thread(probe.disk_read_rate, [p.path for p in plans],
                                             PROBE_SECONDS / 2)
        run.estimate(opts)
    return run


async def _copy_disk(mon: Monitor, p: DiskPlan, incremental: bool, target: dict[str, Any],
                     src_sock: Path, uri_of: Callable[[dict], str],
                     progress: Optional[Callable[[Any], None]], rate: int = 0,
                     lacking: Optional[list[Span]] = None,
                     lanes: Optional[dict[str, int]] = None) -> int:
    """One disk: all of it (recording from before the copy starts), or only
    what the bitmap marked since the last presync, and in full the spans an
    earlier copy was LACKING.  LANES: bytes counted by the lanes that
    carried them."""
    lanes = {} if lanes is None else lanes

    def count(r: Any) -> int:
        n = r.bytes_written + r.bytes_zeroed
        lanes[r.path] = lanes.get(r.path, 0) + n
        return n
    maps = (await _bitmaps(mon)).get(p.node, {})
    if not incremental:
        # Start recording before the full copy: every write from now on is
        # caught by the next presync or the migration.
        for b in (bitmap_pass.FROZEN, BITMAP):
            if b in maps:
                await mon.cmd("block-dirty-bitmap-remove", node=p.node, name=b)
        await mon.cmd("block-dirty-bitmap-add", node=p.node, name=BITMAP,
                      persistent=p.fmt == "qcow2")
    else:
        await bitmap_pass.freeze(mon, [p.node], BITMAP)
    # a raw image is read from its file, its dirty extents from QEMU's export
    # (bitmap_pass.read_file): the full copy needs no export at all
    from_file = bitmap_pass.read_file(p.path, p.fmt, p.size)
    exported = incremental or not from_file
    if exported:
        await bitmap_pass.export(mon, p.node, bitmap_pass.FROZEN if incremental else None)
    export = bitmap_pass.export_uri(p.node, src_sock)
    src, dst = (p.path if from_file else export), uri_of(target["server"])
    extents = export if from_file and incremental else None
    try:
        moved = 0
        for span in (lacking or []) if incremental else []:
            # the rest of an interrupted copy, read now: what the guest writes
            # meanwhile is in the fresh bitmap
            moved += count(await copy_async(src, dst, span=span, force_multi_conn=True,
                                            progress=progress, rate=rate or None))
        r = await copy_async(src, dst, bitmap=bitmap_pass.FROZEN if incremental else None,
                             extents_from=extents,
                             destination_is_zero=target["created"], flush=True,
                             zero_copy=testhooks.native_tuning().get("zero_copy", "auto"),
                             force_multi_conn=True, progress=progress, rate=rate or None)
    except BaseException:
        if incremental:   # nothing may be forgotten, cancelled or not
            await bitmap_pass.give_back(mon, p.node, BITMAP)
        raise
    finally:
        if exported:
            await bitmap_pass.unexport(mon, p.node, wait=incremental)
        if incremental:
            await bitmap_pass.drop(mon, p.node)
    return moved + count(r)
