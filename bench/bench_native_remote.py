"""The native storage engine between hosts (issue 12, item 4): `vmferry migrate
--storage-engine native` against `--storage-engine mirror` (QEMU's mirror job,
what virsh migrate runs), to another host, side by side in one run.

The destination host is a network namespace joined to this one by a veth pair
(tests/netlab.py), with `vmferry agent --listen` (tls:// control channel; the
disks' NBD traffic itself is plain TCP, no --tls) started in it before the
rounds.  Two links: unshaped veth, and tc tbf 1 Gbit/s both directions.  The
VM is bench_migrate's: 1 GiB RAM running the idle test guest (512 MiB filled
once) and a raw disk (2 GiB, half random data, on tmpfs; VMFERRY_BENCH_SCALE
scales it), started fresh on this host for every migration.  Rounds are
interleaved: each round runs both links, and on each link both engines in an
order that rotates.

Per migration, from the process's --progress=json lines and /proc:

* disk time: from the perform phase's first line to the first line with
  memory figures (the storage phase; to the ~0.1 s progress granularity);
* the source host's CPU seconds in that window: the source QEMU's and the
  vmferry process's (utime + stime of every thread, /proc/PID/stat, read as
  each line arrives), per GiB of the source disk's data (its allocated bytes:
  what both engines must move; the zeroes of a fresh destination are skipped
  or sent as zero requests, not data); the destination QEMU's CPU beside it;
* the whole migration's wall time and vmferry's CPU over its life (wait4).

Targets (issue 12): native's disk time at most 0.8x mirror's, and the source
host's CPU per GiB at most 0.5x mirror's, on each link (medians).

    python -m pytest -q bench/bench_native_remote.py -p no:cacheprovider -s
    python bench/bench_native_remote.py --quick      # one small round, a smoke run
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest

if __name__ == "__main__" and "--quick" in sys.argv:
    # before bench_migrate is imported: it sizes the disk at import
    sys.argv.remove("--quick")
    os.environ["VMFERRY_BENCH_QUICK"] = "1"
QUICK = os.environ.get("VMFERRY_BENCH_QUICK") == "1"
if QUICK:
    os.environ.setdefault("VMFERRY_BENCH_SCALE", "0.25")   # read by bench_migrate

import report as rpt  # noqa: E402
from bench_migrate import DISK_SIZE, _spec  # noqa: E402
from bench_remote import (  # noqa: E402
    TLS, RemoteBench, _foreign_qemus, _vmferry_version, require_two_hosts,
)
from netlab import NetLab  # noqa: E402  (bench_remote added tests/)
from vmferry.guest import wait_for_pass  # noqa: E402
from vmferry.vm.process import start_vm, vm_status  # noqa: E402
from vmferry.vm.state import StateDir  # noqa: E402

# the source image's format: raw (the default; what auto's choice rests on) or qcow2,
# which the native engine reads through the source QEMU's export
FORMAT = os.environ.get("VMFERRY_BENCH_NATIVE_REMOTE_FORMAT", "raw")
ROUNDS = 1 if QUICK else int(os.environ.get("VMFERRY_BENCH_NATIVE_REMOTE_ROUNDS")
                             or os.environ.get("VMFERRY_BENCH_ROUNDS") or "5")
LINKS = {"unshaped veth": None, "1 Gbit/s (tc)": "1gbit"}
ENGINES = ["native", "mirror"]
TARGET_TIME, TARGET_CPU = 0.8, 0.5
TIMEOUT = float(os.environ.get("VMFERRY_BENCH_TIMEOUT", "600"))
OUT_DIR = rpt.out_dir(QUICK)
TICK = os.sysconf("SC_CLK_TCK")
GiB = 1 << 30


def _report() -> rpt.Report:
    cols = [
        rpt.Column("case", "link"),
        rpt.Column("engine", "storage engine"),
        *rpt.spread_columns("disk time s (median)"),
        rpt.Column("src_cpu_s", "source CPU s (QEMU + vmferry)", rpt.fmt_num(2), "right"),
        rpt.Column("qemu_cpu_s", "source QEMU CPU s (no vCPUs)", rpt.fmt_num(2), "right"),
        rpt.Column("tool_cpu_s", "vmferry CPU s", rpt.fmt_num(2), "right"),
        rpt.Column("cpu_per_gib", "source CPU s/GiB", rpt.fmt_num(3), "right"),
        rpt.Column("dst_cpu_s", "dest. QEMU CPU s (no vCPUs)", rpt.fmt_num(2), "right"),
        rpt.Column("total_s", "whole migration s", rpt.fmt_num(2), "right"),
        rpt.Column("disk_mib", "disk MiB moved", rpt.fmt_num(0), "right"),
        rpt.Column("lanes", "lanes", rpt.fmt_str),
        rpt.Column("time_ratio", "disk time × mirror", rpt.fmt_num(2), "right"),
        rpt.Column("cpu_ratio", "CPU/GiB × mirror", rpt.fmt_num(2), "right"),
    ]
    chart = rpt.ChartSpec(group_key="case", series_key="engine", series_order=ENGINES,
                          panels=[rpt.Panel("median_s", "seconds", "Disk time (storage phase)",
                                            "min_s", "max_s"),
                                  rpt.Panel("cpu_per_gib", "CPU s per GiB",
                                            "Source host CPU per GiB of disk data",
                                            value_fmt="{:.3f}")])
    return rpt.Report(name="native_remote" + ("" if FORMAT == "raw" else f"_{FORMAT}"),
                      title=f"native storage engine vs QEMU mirror, to another host ({FORMAT})",
                      columns=cols, out_dir=OUT_DIR, chart=chart, finalize=_finalize)


def _finalize(rep: rpt.Report) -> list[str]:
    lines = []
    for case in LINKS:
        by = {r["engine"]: r for r in rep.records if r["case"] == case}
        if set(by) != set(ENGINES):
            continue
        n, m = by["native"], by["mirror"]
        for r in by.values():
            r["time_ratio"] = r["median_s"] / m["median_s"]
            r["cpu_ratio"] = r["cpu_per_gib"] / m["cpu_per_gib"]
        t, c = n["time_ratio"], n["cpu_ratio"]
        lines += [
            f"- {case}: native's disk time at most {TARGET_TIME}× mirror's: "
            f"{n['median_s']:.2f} s vs {m['median_s']:.2f} s, {t:.2f}× → "
            f"**{'PASS' if t <= TARGET_TIME else 'FAIL'}**",
            f"- {case}: the source host's CPU per GiB at most {TARGET_CPU}× mirror's: "
            f"{n['cpu_per_gib']:.3f} s vs {m['cpu_per_gib']:.3f} s, {c:.2f}× → "
            f"**{'PASS' if c <= TARGET_CPU else 'FAIL'}**",
        ]
    return lines


def _stat_cpu_s(path: str) -> float:
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def _cpu_s(pid: int | None) -> tuple[float, float] | None:
    """(CPU seconds of PID so far, those of its guest vCPU threads), or None
    once it is gone.  The process's figure keeps the time of threads that
    have exited; vCPU threads are QEMU's "CPU n/KVM" (debug-threads=on) and
    live as long as the VM."""
    if not pid:
        return None
    try:
        total = _stat_cpu_s(f"/proc/{pid}/stat")
        vcpus = 0.0
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                if (task / "comm").read_text().startswith("CPU "):
                    vcpus += _stat_cpu_s(str(task / "stat"))
            except OSError:
                continue
    except (OSError, IndexError):
        return None
    return total, vcpus


def _compare(a: Path, b: Path) -> str:
    cp = subprocess.run(["qemu-img", "compare", "-f", FORMAT, "-F", FORMAT, str(a), str(b)],
                        capture_output=True, text=True, timeout=300)
    return "" if cp.returncode == 0 else f"exit {cp.returncode}: {cp.stdout}{cp.stderr}"


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


class NativeRemoteBench(RemoteBench):
    """bench_remote's VM, disk and tls:// agent in the namespace."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.raw_disk = self.src_disk
        if FORMAT != "raw":
            self.src_disk = self.root / f"src.{FORMAT}"
            subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", FORMAT,
                            str(self.raw_disk), str(self.src_disk)], check=True, timeout=300)

    def fresh(self, i: int) -> tuple[StateDir, StateDir, Path, Any]:
        a, b = StateDir(self.root / f"A{i}"), StateDir(self.root / f"B{i}")
        serial = self.root / f"serial{i}.log"
        spec = _spec(self.kernel, self.src_disk, serial)
        spec = dataclasses.replace(spec, disks=type(spec.disks)(
            dataclasses.replace(d, format=FORMAT) for d in spec.disks))
        start_vm(a, spec)
        wait_for_pass(serial, 1, 120)    # the guest has filled its memory once
        return a, b, self.root / f"dst{i}.{FORMAT}", spec

    def migrate(self, engine: str, i: int, verify: bool) -> dict[str, Any]:
        a, _, dst, _ = self.fresh(i)
        b = self.tls_state
        assert b is not None and self.tls_agent is not None and self.tls_agent.poll() is None
        argv = self.argv(TLS, a, b, dst) + ["--storage-engine", engine]
        src_pid = a.read_pid("bench")
        load = os.getloadavg()[0]
        foreign = _foreign_qemus(self.root)
        err_path = self.root / f"migrate{i}.err"
        # per progress line: (elapsed s, source QEMU (total, vCPUs), vmferry,
        # destination QEMU (total, vCPUs)), at the storage phase's two ends
        marks: dict[str, tuple[float, tuple[float, float], float,
                               tuple[float, float] | None]] = {}
        lines: list[dict] = []
        qemu_last = (0.0, 0.0)
        try:
            with open(err_path, "wb") as err:
                t0 = time.monotonic()
                proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err,
                                        stdin=subprocess.DEVNULL, env=self.env)
                killer = threading.Timer(TIMEOUT, proc.kill)
                killer.start()
                dst_pid = None
                try:
                    for raw in proc.stdout:
                        line = json.loads(raw)
                        lines.append(line)
                        if dst_pid is None and line["phase"] == "perform":
                            dst_pid = b.read_pid("bench")
                        q, v = _cpu_s(src_pid), _cpu_s(proc.pid)
                        if q is not None:
                            qemu_last = q
                        mark = (line["elapsed_ms"] / 1000, q or qemu_last,
                                v[0] if v else 0.0, _cpu_s(dst_pid))
                        if line["phase"] == "perform":
                            marks.setdefault("perform", mark)
                        if line.get("memory_total"):
                            marks.setdefault("memory", mark)
                    _, status, usage = os.wait4(proc.pid, 0)
                    proc.returncode = os.waitstatus_to_exitcode(status)
                finally:
                    killer.cancel()
                total = time.monotonic() - t0
            if proc.returncode != 0:
                raise RuntimeError(f"{engine} failed (exit {proc.returncode}): "
                                   f"{err_path.read_text()[-2000:]}")
            st = vm_status(b, "bench")
            assert st.state == "running", f"{engine}: destination VM is {st.state}"
            assert a.read_pid("bench") is None, f"{engine}: the source QEMU still runs"
            done = lines[-1]
            assert self.lab.dest_ip in done.get("disks_address", ""), done
            assert done["storage_engine"] == engine, done
            foreign = max(foreign, _foreign_qemus(self.root))
        finally:
            self.cleanup_vms(a, b)
            b.remove("bench")           # the next round's spec file must be new
        checks: dict[str, Any] = {}
        try:
            if verify:
                diff = _compare(self.src_disk, dst)
                assert diff == "", f"{engine}: destination image differs from the source: {diff}"
                checks["qemu_img_compare"] = "identical"
        finally:
            dst.unlink(missing_ok=True)
        p, m = marks["perform"], marks["memory"]
        data = _allocated(self.src_disk)
        # the guest's own vCPU time is not the migration's: left out (and kept)
        qemu_cpu = (m[1][0] - m[1][1]) - (p[1][0] - p[1][1])
        tool_cpu = m[2] - p[2]
        dst_cpu = ((m[3][0] - m[3][1]) - (p[3][0] - p[3][1])
                   if m[3] is not None and p[3] is not None else None)
        return {"disk_s": m[0] - p[0], "total_s": total, "qemu_cpu_s": qemu_cpu,
                "tool_cpu_s": tool_cpu, "src_cpu_s": qemu_cpu + tool_cpu,
                "cpu_per_gib": (qemu_cpu + tool_cpu) / (data / GiB), "dst_cpu_s": dst_cpu,
                "src_vcpu_s": m[1][1] - p[1][1],
                "tool_cpu_total_s": usage.ru_utime + usage.ru_stime,
                "qemu_cpu_total_s": qemu_last[0], "data_bytes": data,
                "disk_bytes": done.get("disk_processed"), "lanes": done.get("storage_lanes"),
                "lanes_note": done.get("storage_lanes_note"), "load1": load,
                "load1_after": os.getloadavg()[0], "foreign_qemus": foreign,
                "downtime_ms": done.get("downtime_ms"), "checks": checks,
                # how the storage phase went, to tell a stall from a slow link
                "disk_progress": [(l["elapsed_ms"], l.get("disk_processed"))
                                  for l in lines if p[0] <= l["elapsed_ms"] / 1000 <= m[0]]}


@pytest.fixture(scope="module")
def nbench():
    require_two_hosts()
    root = Path(tempfile.mkdtemp(prefix="vmfn-", dir="/dev/shm"))
    lab = None
    try:
        lab = NetLab()
        nb = NativeRemoteBench(root, lab, None)
        nb.start_tls_agent()
        yield nb
    finally:
        if lab is not None:
            lab.close()
        shutil.rmtree(root, ignore_errors=True)


def _lanes(rs: list[dict]) -> str:
    kinds = sorted({k for r in rs for k, v in (r["lanes"] or {}).items() if v})
    return "+".join(kinds) if kinds else "QEMU"


@pytest.mark.timeout(0)
def test_native_vs_mirror_to_another_host(nbench: NativeRemoteBench) -> None:
    rep = rpt.get_report("native_remote", _report)
    rep.meta["machine"] = rpt.machine_info({"qemu": ["qemu-system-x86_64", "--version"]})
    rep.meta["config"] = {
        "vmferry commit": _vmferry_version(),
        "VM": "1 GiB RAM, idle test guest (512 MiB filled)",
        "disk": f"{DISK_SIZE >> 20} MiB {FORMAT} on tmpfs, half random data",
        "links": "veth to a network namespace: unshaped, and tc tbf 1gbit both directions",
        "command": f"vmferry migrate bench tls://DEST:PORT --pki DIR --disk-map SRC=DST "
                   f"--create-disks --storage-engine native|mirror, to a vmferry agent "
                   f"--listen started in the namespace before the rounds",
        "rounds": ROUNDS, "order": "per round both links; engines rotate which goes first",
        "quick": QUICK,
    }
    results: dict[tuple[str, str], list[dict]] = {(c, e): [] for c in LINKS for e in ENGINES}
    n = 0
    for i in range(ROUNDS):
        for case, rate in LINKS.items():
            if rate:
                nbench.lab.shape(rate)
            else:
                nbench.lab.unshape()
            order = ENGINES[i % 2:] + ENGINES[:i % 2]
            for engine in order:
                r = nbench.migrate(engine, n, verify=(i == 0))
                n += 1
                results[(case, engine)].append(r)
                print(f"\nround {i + 1} {case} {engine}: disk {r['disk_s']:.2f} s, source CPU "
                      f"{r['src_cpu_s']:.2f} s ({r['cpu_per_gib']:.3f} s/GiB), whole "
                      f"{r['total_s']:.2f} s, lanes {r['lanes']}, load {r['load1']:.2f}",
                      flush=True)
    nbench.lab.unshape()
    for (case, engine), rs in results.items():
        med = lambda k: statistics.median(r[k] for r in rs)  # noqa: E731
        dsts = [r["dst_cpu_s"] for r in rs if r["dst_cpu_s"] is not None]
        times = [r["disk_s"] for r in rs]
        rep.add({"case": case, "engine": engine, "median_s": statistics.median(times),
                 "min_s": min(times), "max_s": max(times), "src_cpu_s": med("src_cpu_s"),
                 "qemu_cpu_s": med("qemu_cpu_s"), "tool_cpu_s": med("tool_cpu_s"),
                 "cpu_per_gib": med("cpu_per_gib"),
                 "dst_cpu_s": statistics.median(dsts) if dsts else None,
                 "total_s": med("total_s"),
                 "disk_mib": statistics.median(r["disk_bytes"] or 0 for r in rs) / (1 << 20),
                 "lanes": _lanes(rs), "rounds": rs})
    every = [r for rs in results.values() for r in rs]
    loads = [r["load1"] for r in every] + [r["load1_after"] for r in every]
    ncpu = os.cpu_count() or 1
    rep.meta["load_average_1min"] = {"median": statistics.median(loads), "max": max(loads)}
    rep.notes.append(f"Load average (1 min) around the migrations: median "
                     f"{statistics.median(loads):.2f}, max {max(loads):.2f} on {ncpu} CPUs "
                     f"(the bench itself contributes about 1).")
    busy = sum(1 for r in every if r["foreign_qemus"])
    if busy or max(loads) > ncpu + 0.5:
        rep.notes.append(f"WARNING: the machine was shared: other QEMU processes ran during "
                         f"{busy} of {len(every)} migrations and the load average reached "
                         f"{max(loads):.2f}; timings are noisier than on an idle machine.")
    if QUICK:
        rep.notes.append("QUICK run (one round, small disk): a smoke test, not a result.")
    rep.notes += [
        "disk time: the storage phase, from the perform phase's first progress line to the "
        "first with memory figures.  For mirror that is blockdev-mirror until every job is "
        "ready; for native, the engine's passes until the dirty bitmap is small.  The "
        "memory phase, the paused final pass and device state are not in it.",
        "source CPU: utime + stime of the source QEMU and the vmferry process (all threads) "
        "over that window, from /proc/PID/stat, less the guest's vCPU threads (QEMU's "
        "\"CPU n/KVM\": the guest's own work, not the migration's; src_vcpu_s in the JSON); "
        "per GiB of the source disk's allocated data.  "
        "Kernel work not charged to either (softirq on another CPU, ksoftirqd) is not "
        "counted, for either engine.  dest. QEMU CPU: the destination QEMU over the same "
        "window (its NBD server receives every byte for both engines).",
        "disk MiB moved: jobinfo's disk_processed.  mirror counts the whole virtual disk "
        "(its offset); native counts what it wrote (data and zero requests; a fresh "
        "destination's zero extents are skipped).",
        "lanes: which of the engine's lanes carried the native copy (jobinfo's "
        "storage_lanes); mirror's data goes through QEMU.",
    ]
    for (case, engine), rs in results.items():
        for r in rs:
            assert r["disk_s"] > 0
            if engine == "native" and "zero_copy" not in os.environ.get(
                    "VMFERRY_NATIVE_TUNING", ""):
                assert (r["lanes"] or {}).get("zero-copy"), r


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-p", "no:cacheprovider", "-s", *sys.argv[1:]]))
