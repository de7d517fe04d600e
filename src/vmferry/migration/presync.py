"""Pre-seeding: `vmferry presync NAME DEST` copies a running VM's disks to the
destination ahead of time and leaves a dirty bitmap on the source, so that a
later `vmferry migrate --copy-storage-inc` moves only what the guest wrote
since (through the native engine).

Each presync run after the first moves only the new delta.  Two records tie
a destination image to the source bitmap that tracks it:

  source       STATE/NAME/presync.json   node -> bitmap, image path, generation,
                                         the QEMU pid (a raw image's bitmap lives
                                         only as long as that process)
  destination  IMAGE.vmferry-presync.json  generation and the image's identity
                                         (inode, size, mtime) when presync left it

A record that is missing or does not match (bitmap gone or inconsistent after
an unclean shutdown, QEMU restarted, image replaced or touched) makes vmferry
warn and copy the whole disk: never a silent partial copy.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Optional

from vmferry.copying import copy_async
from vmferry.errors import MigrationError, UsageError, VmferryError
from vmferry.migration.monitor import Monitor
from vmferry.migration.options import MigrateOptions
from vmferry.migration.source import DiskPlan, plan_disks

BITMAP = "vmferry-presync"
FROZEN = "vmferry-presync-frozen"
EXPORT = "vmferry-presync-"
RECORD = "presync.json"


def _identity(path: str) -> dict[str, int]:
    st = os.stat(path)
    return {"ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _sidecar(image: str) -> Path:
    return Path(image + ".vmferry-presync.json")


def _source_record(state: Any, name: str) -> Path:
    return state.vm_dir(name) / RECORD


def has_records(state: Any, name: str) -> bool:
    return _source_record(state, name).exists()


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


async def _bitmaps(mon: Monitor) -> dict[str, dict[str, Any]]:
    """node -> {bitmap name: info} for our presync bitmaps."""
    nodes = await mon.cmd("query-named-block-nodes", flat=True)
    return {n["node-name"]: {b["name"]: b for b in n.get("dirty-bitmaps", [])
                             if b["name"] in (BITMAP, FROZEN)} for n in nodes}


async def valid_records(mon: Monitor, state: Any, name: str, plans: list[DiskPlan],
                        dest_paths: dict[str, str],
                        warn: Callable[[str], None]) -> dict[str, dict]:
    """node -> record, for every disk whose presync record still holds."""
    if state is None or not has_records(state, name):
        return {}
    rec = _load(_source_record(state, name))
    pid = state.read_pid(name)
    maps = await _bitmaps(mon)
    good: dict[str, dict] = {}
    for p in plans:
        r = rec.get("disks", {}).get(p.node)
        why = ""
        if r is None:
            why = "no presync record"
        elif dest_paths.get(p.node) and os.path.realpath(dest_paths[p.node]) != \
                os.path.realpath(r["dest_path"]):
            why = f"it was presynced to {r['dest_path']}, not {dest_paths[p.node]}"
        elif BITMAP not in maps.get(p.node, {}):
            why = "its dirty bitmap is gone (QEMU restarted or shut down uncleanly)"
        elif maps[p.node][BITMAP].get("inconsistent"):
            why = "its dirty bitmap is marked inconsistent"
        elif p.fmt != "qcow2" and r.get("qemu_pid") != pid:
            why = "QEMU was restarted since, and a raw image's bitmap lives in memory"
        else:
            side = _load(_sidecar(r["dest_path"]))
            try:
                ident = _identity(r["dest_path"])
            except OSError:
                ident = None
            if side.get("generation") != r.get("generation") or side.get("identity") != ident:
                why = f"destination image {r['dest_path']} was changed or replaced"
        if why:
            warn(f"presync record of {p.node} does not hold: {why}")
        else:
            good[p.node] = r
    return good


def forget(state: Any, name: str) -> None:
    """Drop both records (after a migration used or invalidated them)."""
    rec = _load(_source_record(state, name))
    for r in rec.get("disks", {}).values():
        _sidecar(r["dest_path"]).unlink(missing_ok=True)
    _source_record(state, name).unlink(missing_ok=True)


class _DestServer:
    """qemu-nbd serving a destination image for the duration of a presync, so
    the engine writes guest-visible bytes through the image's own format."""

    def __init__(self, image: str, fmt: str, sock: Path) -> None:
        self.sock = sock
        sock.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            ["qemu-nbd", "-t", "-f", fmt, "-e", "4", "--cache=writeback", "-k", str(sock),
             image], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE)

    async def ready(self) -> str:
        for _ in range(500):
            if self.sock.exists():
                return f"nbd+unix:///?socket={self.sock}"
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace").strip()
                raise MigrationError(f"qemu-nbd could not serve the destination image: {err}",
                                     phase="presync")
            await asyncio.sleep(0.01)
        raise MigrationError("qemu-nbd did not start in 5 s", phase="presync")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.sock.unlink(missing_ok=True)


async def presync(state: Any, name: str, dest: Any, opts: MigrateOptions, *,
                  warn: Callable[[str], None],
                  progress: Optional[Callable[[Any], None]] = None) -> dict[str, Any]:
    """Copy (or refresh) the destination images of NAME's disks while it runs."""
    from vmferry.migration.destination import destination_spec
    from vmferry.migration.incoming import create_image, image_size
    from vmferry.migration.local import LocalDestination
    if not isinstance(dest, LocalDestination):
        raise UsageError("presync needs a local:// destination for now")
    rec = state.load(name)
    if rec.pid is None:
        raise UsageError(f"{name} is not running: presync copies a running VM's disks")
    mon = await Monitor(rec.qmp_socket, "source", "presync").connect()
    run_dir = rec.qmp_socket.parent
    src_sock = run_dir / "vmferry-presync.sock"
    stats = {"disks": {}, "bytes_moved": 0, "incremental": []}
    server = False
    try:
        plans = await plan_disks(mon, rec.spec, opts)
        dspec = destination_spec(rec.spec, opts)
        dpaths = {f"disk{i}": d.path for i, d in enumerate(dspec.disks)}
        good = await valid_records(mon, state, name, plans, dpaths, warn)
        old = _load(_source_record(state, name))
        generation = old.get("generation", 0) + 1
        await mon.cmd("nbd-server-start", addr={"type": "unix",
                                                "data": {"path": str(src_sock)}})
        server = True
        records: dict[str, dict] = {}
        for p in plans:
            target = dpaths[p.node]
            if os.path.realpath(target) == os.path.realpath(p.path):
                raise UsageError(f"the destination image of {p.node} is the source's own "
                                 f"file: map it elsewhere with --disk-map")
            incremental = p.node in good
            maps = (await _bitmaps(mon)).get(p.node, {})
            created = False
            if not incremental:
                # Start recording before the full copy: every write from now
                # on is caught by the next presync or the migration.
                for b in (FROZEN, BITMAP):
                    if b in maps:
                        await mon.cmd("block-dirty-bitmap-remove", node=p.node, name=b)
                await mon.cmd("block-dirty-bitmap-add", node=p.node, name=BITMAP,
                              persistent=p.fmt == "qcow2")
                have = image_size(target)
                if have is None:
                    if not opts.create_disks:
                        raise UsageError(f"destination image {target} does not exist: "
                                         f"create it or pass --create-disks")
                    create_image(target, p.fmt, p.size, None, "raw")
                    created = True
                elif have < p.size:
                    raise UsageError(f"destination image {target} is smaller than {p.path}")
            else:
                await mon.cmd("transaction", actions=[
                    {"type": "block-dirty-bitmap-add",
                     "data": {"node": p.node, "name": FROZEN, "disabled": True}},
                    {"type": "block-dirty-bitmap-merge",
                     "data": {"node": p.node, "target": FROZEN, "bitmaps": [BITMAP]}},
                    {"type": "block-dirty-bitmap-clear", "data": {"node": p.node,
                                                                  "name": BITMAP}}])
            export = {"type": "nbd", "id": EXPORT + p.node, "node-name": p.node,
                      "name": EXPORT + p.node, "writable": False}
            if incremental:
                export["bitmaps"] = [FROZEN]
            await mon.cmd("block-export-add", **export)
            dst = _DestServer(target, p.fmt, run_dir / f"vmferry-presync-dst-{p.node}.sock")
            try:
                dst_uri = await dst.ready()
                r = await copy_async(f"nbd+unix:///{EXPORT}{p.node}?socket={src_sock}",
                                     dst_uri, bitmap=FROZEN if incremental else None,
                                     destination_is_zero=created, flush=True,
                                     force_multi_conn=True, progress=progress)
            except VmferryError:
                if incremental:   # put the frozen bits back: nothing may be forgotten
                    await mon.try_cmd("block-dirty-bitmap-merge", node=p.node,
                                      target=BITMAP, bitmaps=[FROZEN])
                raise
            finally:
                dst.stop()
                await mon.try_cmd("block-export-del", id=EXPORT + p.node, mode="hard")
                if incremental:
                    for _ in range(100):
                        if not any(e["id"] == EXPORT + p.node
                                   for e in await mon.cmd("query-block-exports")):
                            break
                        await asyncio.sleep(0.005)
                    await mon.try_cmd("block-dirty-bitmap-remove", node=p.node, name=FROZEN)
            moved = r.bytes_written + r.bytes_zeroed
            stats["bytes_moved"] += moved
            stats["disks"][p.node] = moved
            if incremental:
                stats["incremental"].append(p.node)
            records[p.node] = {"bitmap": BITMAP, "dest_path": os.path.abspath(target),
                               "fmt": p.fmt, "qemu_pid": rec.pid, "generation": generation}
            _sidecar(target).write_text(json.dumps({
                "source": name, "node": p.node, "generation": generation,
                "identity": _identity(target), "time": time.time()}))
        path = _source_record(state, name)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"generation": generation, "disks": records}, indent=1))
        os.replace(tmp, path)
        return stats
    finally:
        if server:
            await mon.try_cmd("nbd-server-stop")
            src_sock.unlink(missing_ok=True)      # QEMU leaves the socket file
        await mon.close()
