"""--storage-engine native: vmferry's own copy engine carries the disks.

Instead of one blockdev-mirror per disk inside the source QEMU (one thread,
16 requests of at most 1 MiB in flight), the source QEMU only exports its
disks over NBD and keeps a dirty bitmap; the engine copies with several
connections and deep queues straight into the destination's NBD exports:

  pass 0   a bitmap starts recording, then every allocated extent is copied
  pass k   atomically (one QMP transaction) the current bitmap is frozen and
           a fresh one starts; the frozen one is published with the export
           (qemu:dirty-bitmap:NAME, which QEMU allows only for a disabled
           bitmap) and only its dirty extents are copied; then it is dropped
  final    at pre-switchover, with the guest paused and its I/O drained, one
           last pass copies what the guest wrote since, before device state

No write is lost: a write that completes after a bitmap starts is in that
bitmap, and one racing with the copy of its block is in the next one.  Every
node, export and bitmap made here is named "vmferry-..." and undone on failure.
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

from vmferry.copying import CopyResult, copy_async
from vmferry.errors import MigrationError, VmferryError
from vmferry.migration import bitmap_pass, spans, testhooks
from vmferry.migration.destination import Prepared
from vmferry.migration.monitor import Monitor
from vmferry.migration.plan import DiskPlan
from vmferry.migration.spans import Span

BITMAP = "vmferry-dirty"
# Stop iterating when a pass moved less than this, or stopped shrinking.
SMALL_ENOUGH = 16 << 20
# how often the passes during memory migration look for new writes
KEEP_UP_INTERVAL = 0.1
MAX_PASSES = 8
# Throttle steps before giving up on convergence (each halves the write rate),
# and the floor: a guest is slowed, never stopped.
THROTTLE_STEPS = 4
MIN_THROTTLE = 1 << 20


@dataclasses.dataclass
class NativeStats:
    passes: int = 0
    bytes_copied: int = 0          # written + zeroed by the engine, all passes
    final_bytes: int = 0           # moved during the final (paused) pass
    final_ms: int = 0
    # bytes moved per kind of lane ("zero-copy", "libnbd"), and why a copy
    # did not take the zero-copy ones (the engine's note, the last one)
    lanes: dict[str, int] = dataclasses.field(default_factory=dict)
    lanes_note: str = ""

    def count(self, r: CopyResult) -> None:
        self.lanes[r.path] = self.lanes.get(r.path, 0) + r.bytes_written + r.bytes_zeroed
        if r.zero_copy_note:
            self.lanes_note = r.zero_copy_note


class NativeStorage:
    def __init__(self, mon: Monitor, disks: list[DiskPlan], prepared: Prepared,
                 socket: Path, on_progress: Callable[[CopyResult], None], *,
                 bitmap: str = BITMAP, existing: bool = False, rate: int = 0,
                 record: Optional[Callable[..., None]] = None,
                 resumable: bool = False, missing: Optional[dict[str, list[Span]]] = None,
                 note: Optional[Callable[[str, list[Span]], None]] = None) -> None:
        self.mon = mon
        self.disks = disks
        self.prepared = prepared
        self.socket = socket               # the source QEMU's NBD server socket
        self.on_progress = on_progress     # the engine's counters of the current copy
        self.stats = NativeStats()
        self._server = False
        # existing: a presync bitmap that already records (and must survive a
        # failed migration, with every bit it had).
        self.bitmap = bitmap
        self.existing = existing
        # resumable: the bitmap (persistent for qcow2) outlives a failed
        # migration too, so that its partial copy can be kept (flow.py);
        # missing: node -> the spans its destination image lacks (all of it
        # before pass 0; what an earlier, interrupted copy never got), told
        # to NOTE as the copies shrink them
        self.resumable = resumable or existing
        self.missing: dict[str, list[Span]] = {
            d.node: list((missing or {}).get(d.node, [(0, d.size)])) for d in disks}
        self._note = note or (lambda node, valid: None)
        # bytes/s for each copy (--disk-bandwidth; disks go one after another,
        # so also for all of them); 0: unlimited.  The paused final pass too:
        # a link shared with others stays shared during downtime.
        self.rate = rate
        self.throttled_at: list[int] = []     # bps_wr of each throttle step
        self.devices: dict[str, str] = {}
        self._pass_s = 0.0
        # journal.add: a throttle outlives this process, so it is written down
        self._record = record or (lambda kind, **fields: None)

    def _src_uri(self, d: DiskPlan) -> str:
        return bitmap_pass.export_uri(d.node, self.socket)

    def _dst_file(self, d: DiskPlan) -> Optional[str]:
        """The destination image itself, when the engine may write it directly.

        For a raw image on this host the destination QEMU's NBD server is pure
        overhead: one main-loop thread receives every byte (it tops out at a
        core).  Writing the file is safe while that QEMU waits in -incoming:
        its block nodes stay inactive, reading nothing, until the migration
        completes, and it caches nothing of a raw image; the writes are
        flushed before the guest can run there."""
        path = self.prepared.dest_paths.get(d.node)
        if (self.prepared.same_host and d.fmt == "raw" and path
                and os.path.isfile(path)):
            return path
        return None

    def _dst_uri(self, d: DiskPlan) -> str:
        return self._dst_file(d) or self.prepared.export_uri(d.node)

    def _advance(self, d: DiskPlan, end: int, done_below: int) -> None:
        left = spans.trimmed(self.missing[d.node], end, done_below)
        if left != self.missing[d.node]:
            self.missing[d.node] = left
            self._note(d.node, left)

    def lacking(self) -> int:
        """Bytes of the destination images no copy has reached yet."""
        return sum(spans.total(m) for m in self.missing.values())

    async def _copy(self, d: DiskPlan, bitmap: Optional[str], fresh: bool,
                    final: bool = False, span: Optional[Span] = None) -> CopyResult:
        """One copy of D: its allocated extents (of SPAN only, if given), or
        those dirty in BITMAP.  A copy of a span D lacks shrinks that span as
        it goes, to where it got when it stops early."""
        end = (span or (0, d.size))[1] if bitmap is None else None
        def progress(snap: CopyResult) -> None:
            if end is not None:
                self._advance(d, end, snap.done_below)
            self.on_progress(snap)
        try:
            r = await self._copy_once(d, bitmap, fresh, final, span, progress)
        except BaseException as e:
            partial = getattr(e, "partial", None) or getattr(e.__cause__, "partial", None)
            if end is not None and partial is not None:
                self._advance(d, end, partial.done_below)
            raise
        if end is not None:
            self._advance(d, end, end)
        self.stats.count(r)
        return r

    async def _copy_once(self, d: DiskPlan, bitmap: Optional[str], fresh: bool,
                         final: bool, span: Optional[tuple[int, int]],
                         progress: Callable[[CopyResult], None]) -> CopyResult:
        # A raw image is read from its file, only the bitmap through QEMU
        # (bitmap_pass.read_file says when, and why that is safe).
        tune = testhooks.native_tuning()
        raw_file = bitmap_pass.read_file(d.path, d.fmt, d.size)
        direct = bitmap is None and raw_file
        if not direct:
            await bitmap_pass.export(self.mon, d.node, bitmap)
        try:
            # QEMU 7.2 advertises multi-conn only on read-only exports, but each
            # side is one QEMU whose connections share one block layer.
            src = d.path if raw_file else self._src_uri(d)
            extents_from = self._src_uri(d) if bitmap and raw_file else None
            # The final pass runs with the guest paused and has little to move:
            # one connection saves three handshakes of downtime.  Another
            # host's QEMU receives every connection in one NBD server thread,
            # so more connections only add TCP flows that contend at the link:
            # one was faster over a veth both unshaped and at 1 Gbit/s
            # (bench_native_remote.py with a one-connection variant beside it,
            # 512 MiB of data, medians of 3: 1.18 vs 1.30 s, 4.67 vs 4.92 s).
            # Under TLS the lanes are libnbd's, not measured so: left as they were.
            dst = self._dst_uri(d)
            remote = not self.prepared.same_host and not self.prepared.tls_dir
            conns = 1 if final else tune.get("connections") or (1 if remote else None)
            # auto: zero-copy lanes where both ends are plain (a file, NBD over
            # Unix or TCP), so the bytes never pass through this process;
            # TLS takes the libnbd lanes.  Those lanes plan from extents
            # alone: zeroes the image holds as allocated data move as data.
            return await copy_async(src, dst, bitmap=bitmap, extents_from=extents_from,
                                    zero_copy=tune.get("zero_copy", "auto"),
                                    destination_is_zero=fresh and bitmap is None,
                                    force_multi_conn=not final,
                                    # written around QEMU: durable before it runs,
                                    # each pass its own (the final one is small)
                                    flush=dst == self._dst_file(d),
                                    connections=conns,
                                    requests=tune.get("requests"),
                                    request_size=tune.get("request_size"),
                                    rate=self.rate or None, span=span,
                                    # the first pass readies the QEMUs' NBD
                                    # servers for good; later ones, the
                                    # paused last above all, need no more
                                    warm_servers=bitmap is None and not final,
                                    progress=progress)
        except VmferryError as e:
            raise MigrationError(f"native copy of {d.node} failed: {e}",
                                 phase="perform") from e
        finally:
            if not direct:
                # nothing reuses the export id after the final pass: don't wait
                await bitmap_pass.unexport(self.mon, d.node, wait=not final)

    async def start(self) -> None:
        await self.mon.cmd("nbd-server-start",
                           addr={"type": "unix", "data": {"path": str(self.socket)}})
        self._server = True
        if not self.existing:
            for d in self.disks:
                # a bitmap of an earlier presync whose records did not hold
                await bitmap_pass.drop(self.mon, d.node)
                await self.mon.try_cmd("block-dirty-bitmap-remove", node=d.node,
                                       name=self.bitmap)
                self._record("bitmap", node=d.node, name=self.bitmap)
                await self.mon.cmd("block-dirty-bitmap-add", node=d.node, name=self.bitmap,
                                   persistent=self.resumable and d.fmt == "qcow2")

    async def dirty_by_node(self) -> dict[str, int]:
        nodes = await self.mon.cmd("query-named-block-nodes", flat=True)
        wanted = {d.node for d in self.disks}
        out = {node: 0 for node in wanted}
        for n in nodes:
            if n["node-name"] in wanted:
                for b in n.get("dirty-bitmaps", []):
                    if b["name"] == self.bitmap:
                        out[n["node-name"]] += b["count"]
        return out

    async def dirty_bytes(self) -> int:
        return sum((await self.dirty_by_node()).values())

    async def pass_all(self, fresh: bool) -> None:
        """Pass 0: everything allocated (the bitmap already records)."""
        for d in self.disks:
            r = await self._copy(d, None, fresh)
            self.stats.bytes_copied += r.bytes_written + r.bytes_zeroed
        self.stats.passes += 1

    async def pass_dirty(self, final: bool = False, rest: bool = False) -> int:
        """Copy what the bitmap marks; with REST, first what an interrupted
        earlier copy never got, in full (read now, so what the guest writes
        meanwhile is in the fresh bitmap)."""
        # At the final pass the guest is paused and its I/O drained, so a count
        # of zero stays zero: one query then saves a disk its export,
        # connections and block-status round trips, which would be downtime.
        # (Earlier, a write may land between the query and the freeze.)
        dirty = await self.dirty_by_node() if final else {}
        if final and not any(dirty.values()):
            self.stats.passes += 1
            return 0
        await bitmap_pass.freeze(self.mon, [d.node for d in self.disks], self.bitmap)
        moved = 0
        try:
            for d in self.disks:
                for span in list(self.missing[d.node]) if rest else []:
                    r = await self._copy(d, None, False, span=span)
                    moved += r.bytes_written + r.bytes_zeroed
                if final and not dirty.get(d.node):
                    continue
                r = await self._copy(d, bitmap_pass.FROZEN, False, final)
                moved += r.bytes_written + r.bytes_zeroed
        except BaseException:
            if self.resumable:
                for d in self.disks:
                    await bitmap_pass.give_back(self.mon, d.node, self.bitmap)
            raise
        finally:
            for d in self.disks:
                await bitmap_pass.drop(self.mon, d.node)
        self.stats.bytes_copied += moved
        self.stats.passes += 1
        return moved

    async def keep_up(self, stop: asyncio.Event) -> None:
        """While memory migrates, copy what the guest keeps writing, so that the
        paused final pass finds little: otherwise every write of the memory
        phase (seconds of it) would be copied in the guest's downtime.  A pass
        under way when STOP is set is finished, never cut short."""
        while not stop.is_set():
            if await self.dirty_bytes():
                await self.pass_dirty()
            try:
                await asyncio.wait_for(stop.wait(), KEEP_UP_INTERVAL)
            except asyncio.TimeoutError:
                pass

    async def converge(self, devices: dict[str, str]) -> None:
        """Dirty passes until little is left.  When a pass leaves as much dirty
        as it found, the guest writes faster than the engine copies: its disk
        writes are throttled (block_set_io_throttle), halving each time, until
        the passes win; the throttle is lifted in cleanup()."""
        last: Optional[int] = None
        rate: Optional[float] = None
        for _ in range(MAX_PASSES + THROTTLE_STEPS):
            dirty = await self.dirty_bytes()
            if dirty <= SMALL_ENOUGH:
                return
            if last is not None and dirty >= last * 0.9:
                if len(self.throttled_at) >= THROTTLE_STEPS:
                    return            # the final pass takes what is left
                # the guest dirtied `dirty` bytes during the last pass
                rate = max(MIN_THROTTLE, (rate or dirty / max(self._pass_s, 0.01)) / 2)
                await self._throttle(devices, int(rate))
            last = dirty
            t0 = time.monotonic()
            await self.pass_dirty()
            self._pass_s = time.monotonic() - t0

    async def _throttle(self, devices: dict[str, str], bps_wr: int) -> None:
        self._record("throttle", devices=devices)
        for d in self.disks:
            await self.mon.cmd("block_set_io_throttle", id=devices[d.node], bps=0,
                               bps_rd=0, bps_wr=bps_wr, iops=0, iops_rd=0, iops_wr=0)
        self.devices = devices
        self.throttled_at.append(bps_wr)

    async def unthrottle(self) -> None:
        if self.throttled_at:
            for d in self.disks:
                await self.mon.try_cmd("block_set_io_throttle", id=self.devices[d.node], bps=0,
                                       bps_rd=0, bps_wr=0, iops=0, iops_rd=0, iops_wr=0)

    async def final_pass(self) -> None:
        t0 = time.monotonic()
        moved = await self.pass_dirty(final=True)
        self.stats.final_bytes = moved
        self.stats.final_ms = int((time.monotonic() - t0) * 1000)

    async def cleanup(self) -> None:
        """Remove every export, bitmap, throttle and the NBD server this made."""
        await self.unthrottle()
        await bitmap_pass.unexport_all(self.mon)
        for d in self.disks:
            if self.resumable:
                # Frozen bits not yet copied go back: a later migration needs
                # them (whoever keeps the partial copy, or drops the bitmap)
                await bitmap_pass.give_back(self.mon, d.node, self.bitmap)
            await bitmap_pass.drop(self.mon, d.node)
            if not self.resumable:
                await self.mon.try_cmd("block-dirty-bitmap-remove", node=d.node,
                                       name=self.bitmap)
        if self._server:
            await self.mon.try_cmd("nbd-server-stop")
            self._server = False
            self.socket.unlink(missing_ok=True)   # QEMU leaves the socket file
