"""libvirt's QMP sequence for `virsh migrate --live --p2p --copy-storage-all`,
replayed by hand: the reference the migration benchmark runs against vmferry.

    python bench/libvirt_replay.py SRC_STATE NAME DEST_STATE SRC_DISK DST_DISK

It runs as its own process, as vmferry does, and prints one JSON line.  It
uses vmferry's VM layer only to start the destination QEMU exactly as
vmferry would (same command line), then drives both QEMUs itself:

  destination: -incoming defer -S, nbd-server-start, block-export-add, migrate-incoming
  source:      blockdev-add nbd, blockdev-mirror sync=full, wait BLOCK_JOB_READY,
               migrate, wait "completed" (the source is paused now),
               block-job-cancel (target consistent), blockdev-del
  destination: wait "completed", nbd-server-stop, cont
  source:      quit, wait for the process to end (libvirt's Confirm)
"""
from __future__ import annotations

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


async def replay(a: StateDir, name: str, b: StateDir, src_disk: str, dst_disk: str) -> dict:
    t0 = time.monotonic()
    opts = MigrateOptions()
    spec = a.load_spec(name)
    size = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", src_disk],
                                     capture_output=True, check=True).stdout)["virtual-size"]
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", dst_disk, str(size)], check=True)
    vm = await start_vm_async(b, spec.remap({src_disk: dst_disk}), incoming="defer",
                              paused=True)
    run = b.runtime_dir(name)
    nbd, mig = run / "nbd.sock", run / "migrate.sock"
    src_pid = a.read_pid(name)
    async with qmp_session(vm.qmp_socket) as d, qmp_session(a.qmp_socket(name)) as s:
        await d.execute("nbd-server-start", {"addr": {"type": "unix",
                                                      "data": {"path": str(nbd)}}})
        await d.execute("block-export-add", {"type": "nbd", "id": "e0",
                                             "node-name": "disk0", "writable": True})
        await d.execute("migrate-incoming", {"uri": f"unix:{mig}"})
        with s.client.listener(("BLOCK_JOB_READY", "MIGRATION")) as ev:
            await s.execute("blockdev-add", {"driver": "nbd", "node-name": "m0",
                                             "server": {"type": "unix", "path": str(nbd)},
                                             "export": "disk0"})
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
            await s.execute("migrate", {"uri": f"unix:{mig}"})
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
            "memory_processed": (info.get("ram") or {}).get("transferred")}


def main(argv: list[str]) -> int:
    src_state, name, dest_state, src_disk, dst_disk = argv
    result = asyncio.run(replay(StateDir(src_state), name, StateDir(dest_state),
                                os.path.abspath(src_disk), os.path.abspath(dst_disk)))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
