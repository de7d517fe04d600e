"""Migration benchmark: vmferry migrate against libvirt's QMP sequence replayed
by hand, side by side in one run, on the same VM.

The VM: 1 GiB RAM running the self-built test guest in idle mode (it fills
512 MiB once, then only wakes for a heartbeat), and a 2 GiB raw disk half
full of random data, on tmpfs.  Both contenders start the same destination
QEMU (vmferry's VM layer) and move memory and disk with QEMU's own mirror
and migration; what differs is the orchestration:

* vmferry: `vmferry migrate NAME local:///B --create-disks` (a process of its
  own, as a user runs it): pause-before-switchover, mirrors settled while
  the source is paused, then device state.
* by hand: libvirt_replay.py, what libvirt does for `virsh migrate --live
  --p2p --copy-storage-all`: blockdev-mirror to the destination's NBD export,
  wait for BLOCK_JOB_READY, migrate, wait for "completed", then
  block-job-cancel the mirrors, stop the NBD server and cont on the
  destination.  Also its own process, so both pay the same start-up.

Measured per round: total wall time, QEMU's reported downtime, and the
guest-visible pause (source STOP event to destination RESUME event, from
QEMU's event timestamps), plus bytes moved.  Targets: vmferry no slower than
the hand sequence; downtime under 300 ms for this idle guest.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

import report as rpt
from vmferry.guest import build_guest, guest_cmdline, wait_for_pass
from vmferry.vm.process import start_vm, stop_all
from vmferry.vm.qmp import qmp_session
from vmferry.vm.spec import parse_spec
from vmferry.vm.state import StateDir

GiB = 1 << 30
ROUNDS = int(os.environ.get("VMFERRY_BENCH_MIGRATE_ROUNDS", "3"))
DISK_SIZE = int(float(os.environ.get("VMFERRY_BENCH_SCALE", "1")) * 2 * GiB) // (1 << 20) << 20
TARGET_DOWNTIME_MS = 300
OUT_DIR = Path(os.environ.get("VMFERRY_BENCH_OUT", Path(__file__).parent / "results"))
# vmferry as a user runs it (its storage engine picked by itself: native for
# this raw disk), vmferry made to use QEMU's mirror exactly as the hand-run
# sequence does (the orchestration alone compared), and the hand-run sequence.
TOOLS = ["vmferry", "vmferry (mirror)", "by-hand"]


def _report() -> rpt.Report:
    cols = [
        rpt.Column("tool", "orchestration"),
        *rpt.spread_columns(),
        rpt.Column("downtime_ms", "QEMU downtime ms (median)", rpt.fmt_num(0), "right"),
        rpt.Column("pause_ms", "guest pause ms (median)", rpt.fmt_num(0), "right"),
        rpt.Column("storage_s", "storage s (median)", rpt.fmt_num(2), "right"),
        rpt.Column("memory_s", "memory s (median)", rpt.fmt_num(2), "right"),
        rpt.Column("disk_mib", "disk MiB moved", rpt.fmt_num(0), "right"),
        rpt.Column("memory_mib", "memory MiB moved", rpt.fmt_num(0), "right"),
        rpt.Column("ratio", "× by-hand time", rpt.fmt_num(2), "right"),
    ]
    chart = rpt.ChartSpec(group_key="case", series_key="tool", series_order=TOOLS,
                          panels=[rpt.Panel("median_s", "seconds", "Total migration time",
                                            "min_s", "max_s"),
                                  rpt.Panel("pause_ms", "ms", "Guest-visible pause",
                                            hline=TARGET_DOWNTIME_MS,
                                            hline_label="300 ms target",
                                            value_fmt="{:.0f}")])
    return rpt.Report(name="migrate", title="vmferry migrate benchmark", columns=cols,
                      out_dir=OUT_DIR, chart=chart, finalize=_finalize)


def _finalize(rep: rpt.Report) -> list[str]:
    by = {r["tool"]: r for r in rep.records}
    if "vmferry" not in by or "by-hand" not in by:
        return []
    v, h = by["vmferry"], by["by-hand"]
    for r in by.values():
        r["ratio"] = r["median_s"] / h["median_s"]
    lines = [
        f"- vmferry no slower than the hand-run QMP sequence: {v['ratio']:.2f}× → "
        f"**{'PASS' if v['ratio'] <= 1.0 else 'FAIL'}**"]
    if "vmferry (mirror)" in by:
        lines.append(f"- (no verdict) with the same storage commands as the hand-run sequence "
                     f"(`--storage-engine mirror`): {by['vmferry (mirror)']['ratio']:.2f}×")
    return lines + [
        f"- idle-guest downtime under {TARGET_DOWNTIME_MS} ms: QEMU {v['downtime_ms']:.0f} ms, "
        f"guest pause {v['pause_ms']:.0f} ms → "
        f"**{'PASS' if v['pause_ms'] < TARGET_DOWNTIME_MS else 'FAIL'}**",
    ]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:     # a zombie waiting for its parent counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def _spec(kernel: Path, disk: Path, serial: Path) -> Any:
    return parse_spec(f'''
name = "bench"
memory = "1G"
cpus = 1
kernel = "{kernel}"
cmdline = "{guest_cmdline(mem='512M', dirty='idle', hb=100)}"
serial = "{serial}"
[[disks]]
path = "{disk}"
format = "raw"
''', source="bench spec")


async def _event_time(sock: Path, event: str, ready: asyncio.Event,
                      wait_for: Path | None = None) -> float:
    """Wall-clock time (QEMU's own timestamp) of the first `event` on sock.
    wait_for: a file whose appearance means QEMU has started and its CLI
    socket is free (QEMU serves one client per socket, and the starter
    probes that socket first)."""
    while wait_for is not None and not wait_for.exists():
        await asyncio.sleep(0.002)
    async with qmp_session(sock, timeout=30) as qmp:
        with qmp.client.listener(event) as listener:
            ready.set()
            ev = await listener.get()
    ts = ev["timestamp"]
    return ts["seconds"] + ts["microseconds"] / 1e6


class Bench:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.kernel = build_guest(root / "guest")
        self.src_disk = root / "src.raw"
        with open(self.src_disk, "wb") as f:
            f.truncate(DISK_SIZE)
            chunk = 16 << 20
            for off in range(0, DISK_SIZE // 2, chunk):
                f.write(os.urandom(min(chunk, DISK_SIZE // 2 - off)))

    def fresh(self, i: int) -> tuple[StateDir, StateDir, Path, Any]:
        a, b = StateDir(self.root / f"A{i}"), StateDir(self.root / f"B{i}")
        serial = self.root / f"serial{i}.log"
        spec = _spec(self.kernel, self.src_disk, serial)
        start_vm(a, spec)
        wait_for_pass(serial, 1, 120)    # the guest has filled its memory once
        return a, b, self.root / f"dst{i}.raw", spec

    def cleanup(self, a: StateDir, b: StateDir, dst: Path) -> None:
        stop_all(a, b, timeout=2)
        dst.unlink(missing_ok=True)

    def run(self, tool: str, i: int) -> dict[str, Any]:
        """One migration by `tool`, run as its own process; the bench process
        only watches the guest stop on the source and resume on the destination."""
        a, b, dst, spec = self.fresh(i)
        if tool.startswith("vmferry"):
            argv = [sys.executable, "-m", "vmferry", "--state-dir", str(a.path), "migrate",
                    "bench", f"local://{b.path}", "--disk-map", f"{self.src_disk}={dst}",
                    "--create-disks", "--progress=json"]
            if tool == "vmferry (mirror)":
                argv += ["--storage-engine", "mirror"]
        else:
            argv = [sys.executable, str(Path(__file__).with_name("libvirt_replay.py")),
                    str(a.path), "bench", str(b.path), str(self.src_disk), str(dst)]
        try:
            async def go() -> tuple[float, float, float, list[dict]]:
                r1, r2 = asyncio.Event(), asyncio.Event()
                stop_t = asyncio.ensure_future(_event_time(a.cli_socket("bench"), "STOP", r1))
                resume_t = asyncio.ensure_future(
                    _event_time(b.cli_socket("bench"), "RESUME", r2,
                                wait_for=b.spec_path("bench")))
                await r1.wait()
                t0 = time.monotonic()
                proc = await asyncio.create_subprocess_exec(
                    *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                out, err = await proc.communicate()
                total = time.monotonic() - t0
                if proc.returncode != 0:
                    raise RuntimeError(f"{tool} failed: {err.decode()[-2000:]}")
                lines = [json.loads(l) for l in out.decode().strip().splitlines()]
                return total, await stop_t, await asyncio.wait_for(resume_t, 10), lines
            total, s, r, lines = asyncio.run(go())
        finally:
            self.cleanup(a, b, dst)
        done = lines[-1]
        if tool.startswith("vmferry"):
            phases: dict[str, int] = {}
            for l in lines:
                phases.setdefault(l["phase"], l["elapsed_ms"])
                if l["memory_total"]:
                    phases.setdefault("memory", l["elapsed_ms"])
            done["storage_s"] = (phases.get("memory", 0) - phases.get("perform", 0)) / 1000
            done["phases_ms"] = phases
        return {"total_s": total, "downtime_ms": done.get("downtime_ms"),
                "pause_ms": (r - s) * 1000, "disk_bytes": done.get("disk_processed"),
                "memory_bytes": done.get("memory_processed"),
                "memory_ms": done.get("memory_ms"), "storage_s": done["storage_s"],
                "job_ms": done.get("elapsed_ms"), "phases_ms": done.get("phases_ms")}


@pytest.fixture(scope="module")
def bench():
    if not shutil.which("qemu-system-x86_64"):
        pytest.skip("qemu-system-x86_64 is not installed")
    root = Path(tempfile.mkdtemp(prefix="vmfb-", dir="/dev/shm"))
    try:
        yield Bench(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.timeout(0)
def test_migrate_side_by_side(bench: Bench) -> None:
    rep = rpt.get_report("migrate", _report)
    rep.meta["machine"] = rpt.machine_info({"qemu": ["qemu-system-x86_64", "--version"]})
    rep.meta["config"] = {"VM": "1 GiB RAM, idle test guest (512 MiB filled)",
                          "disk": f"{DISK_SIZE >> 20} MiB raw on tmpfs, half random data",
                          "rounds": ROUNDS, "order": "rotating which goes first"}
    results: dict[str, list[dict]] = {t: [] for t in TOOLS}
    for i in range(ROUNDS):
        # Rotate which goes first, so none always gets the warmer machine.
        order = TOOLS[i % len(TOOLS):] + TOOLS[:i % len(TOOLS)]
        for k, tool in enumerate(order):
            results[tool].append(bench.run(tool, len(TOOLS) * i + k))
    for tool, rs in results.items():
        totals = [r["total_s"] for r in rs]
        rep.add({"case": "migrate", "tool": tool, "median_s": statistics.median(totals),
                 "min_s": min(totals), "max_s": max(totals),
                 "downtime_ms": statistics.median(r["downtime_ms"] or 0 for r in rs),
                 "pause_ms": statistics.median(r["pause_ms"] for r in rs),
                 "disk_mib": statistics.median(r["disk_bytes"] or 0 for r in rs) / (1 << 20),
                 "memory_mib": statistics.median(r["memory_bytes"] or 0 for r in rs) / (1 << 20),
                 "storage_s": statistics.median(r["storage_s"] for r in rs),
                 "memory_s": statistics.median((r["memory_ms"] or 0) / 1000 for r in rs),
                 "rounds": rs})
    for tool, rs in results.items():
        for r in rs:
            assert r["total_s"] > 0
