"""libvirt's QMP sequence for `virsh migrate --live --p2p --copy-storage-all`,
replayed by hand: the reference the migration benchmark runs against vmferry.

    python bench/libvirt_replay.py [--tcp ADDR] SRC_STATE NAME DEST_STATE SRC_DISK DST_DISK

It runs as its own process, as vmferry does, and prints one JSON line.  It
uses vmferry's VM layer only to start the destination QEMU exactly as
vmferry would (same command line), then drives both QEMUs itself:

  destination: -incoming defer -S, nbd-server-start, block-export-add, migrate-incoming
  source:      blockdev-add nbd, blockdev-mirror sync=full, wait BLOCK_JOB_READY,
               migrate, wait "completed" (the source is paused now),
               block-job-cancel (target consistent), blockdev-del
  destination: wait "completed", nbd-server-stop, cont
  source:      quit, wait for the process to end (libvirt's Confirm)

Disk data and the migration stream go over Unix sockets in the destination
VM's runtime folder (both QEMUs on one host), or with --tcp ADDR over TCP:
the destination listens on ADDR, port 49152 for NBD and 49153 for the
migration stream (the ports vmferry's agent takes first, as libvirt's
migration_port_min).  For a destination host in a network namespace, run
the whole script in it (`ip netns exec NS python libvirt_replay.py --tcp
...`): the destination QEMU then starts there, and the QMP sockets of both
QEMUs are files, reachable from any namespace.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time

from vmferry.migration.options import MigrateOptions
from vmferry.migration.source import capabilities, parameters
from vmferry.vm.process import start_vm_async
from vmferry.vm.qmp import qmp_session
from vmferry.vm.state import StateDir, pid_alive

NBD_PORT, MIGRATE_PORT = 49152, 49153


def _endpoints(b: StateDir, name: str, tcp: str | None) -> tuple[dict, dict, str]:
    """(nbd-server-start addr, blockdev-add server, migration URI)."""
    if tcp is None:
        run = b.runtime_dir(name)
        nbd, mig = run / "nbd.sock", run / "migrate.sock"
        return ({"type": "unix", "data": {"path": str(nbd)}},
                {"type": "unix", "path": str(nbd)}, f"unix:{mig}")
    host = f"[{tcp}]" if ":" in tcp else tcp
    return ({"type": "inet", "data": {"host": tcp, "port": str(NBD_PORT)}},
            {"type": "inet", "host": tcp, "port": str(NBD_PORT)},
            f"tcp:{host}:{MIGRATE_PORT}")


async def replay(a: StateDir, name: str, b: StateDir, src_disk: str, dst_disk: str,
                 tcp: str | None = None) -> dict:
    t0 = time.monotonic()
    opts = MigrateOptions()
    spec = a.load_spec(name)
    size = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", src_disk],
                                     capture_output=True, check=True).stdout)["virtual-size"]
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", dst_disk, str(size)], check=True)
    vm = await start_vm_async(b, spec.remap({src_disk: dst_disk}), incoming="defer",
                              paused=True)
    nbd_listen, nbd_server, mig = _endpoints(b, name, tcp)
    src_pid = a.read_pid(name)
    async with qmp_session(vm.qmp_socket) as d, qmp_session(a.qmp_socket(name)) as s:
        await d.execute("nbd-server-start", {"addr": nbd_listen})
        await d.execute("block-export-add", {"type": "nbd", "id": "e0",
                                             "node-name": "disk0", "writable": True})
        await d.execute("migrate-incoming", {"uri": mig})
        prepare_s = time.monotonic() - t0
        with s.client.listener(("BLOCK_JOB_READY", "MIGRATION")) as ev:
            await s.execute("blockdev-add", {"driver": "nbd", "node-name": "m0",
                                             "server": nbd_server, "export": "disk0"})
            t_mirror = time.monotonic()
            await s.execute("blockdev-mirror", {"job-id": "m0", "device": "disk0",
                                                "target": "m0", "sync": "full"})
            while (await ev.get())["event"] != "BLOCK_JOB_READY":
                pass
            storage_s = time.monotonic() - t_mirror
            caps = [c for c in capabilities(opts) if c["state"]
                    and c["capability"] != "pause-before-switchover"]
            await s.execute("migrate-set-capabilities", {"capabilities": caps})
            await s.execute("migrate-set-parameters", parameters(opts))
            await s.execute("migrate", {"uri": mig})
            while True:
                e = await ev.get()
                if e["event"] == "MIGRATION" and e["data"]["status"] in ("completed",
                                                                           "failed"):
                    break
        info = await s.execute("query-migrate")
        with s.client.listener("BLOCK_JOB_COMPLETED") as done:
            jobs = await s.execute("query-block-jobs")
            disk_bytes = jobs[0]["offset"] if jobs else 0
            await s.execute("block-job-cancel", {"device": "m0"})
            await done.get()
        await s.execute("blockdev-del", {"node-name": "m0"})
        while (await d.execute("query-migrate")).get("status") != "completed":
            await asyncio.sleep(0.005)
        await d.execute("nbd-server-stop")
        await d.execute("cont")
        try:
            await s.execute("quit")
        except Exception:
            pass
    while src_pid is not None and pid_alive(src_pid):
        await asyncio.sleep(0.005)
    return {"elapsed_ms": int((time.monotonic() - t0) * 1000),
            "downtime_ms": info.get("downtime"), "disk_processed": disk_bytes,
            "memory_ms": info.get("total-time"), "storage_s": storage_s,
            "prepare_s": prepare_s, "migrate_uri": mig,
            "memory_processed": (info.get("ram") or {}).get("transferred")}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description="libvirt's QMP sequence for virsh migrate "
                                "--live --p2p --copy-storage-all, replayed by hand")
    p.add_argument("--tcp", metavar="ADDR",
                   help=f"the destination listens on TCP ADDR (NBD port {NBD_PORT}, "
                        f"migration port {MIGRATE_PORT}) instead of Unix sockets")
    for a in ("src_state", "name", "dest_state", "src_disk", "dst_disk"):
        p.add_argument(a)
    o = p.parse_args(argv)
    result = asyncio.run(replay(StateDir(o.src_state), o.name, StateDir(o.dest_state),
                                os.path.abspath(o.src_disk), os.path.abspath(o.dst_disk),
                                tcp=o.tcp))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
