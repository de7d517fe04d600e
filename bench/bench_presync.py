"""Pre-seeding benchmark (issue #12, item 4, third group): where disks dominate,
as on real hosts, a presync followed by `migrate --copy-storage-inc` against a
full migration of the same VM, side by side in one run, over a link shaped to
1 Gbit/s.

The destination host is tests/netlab.py's NetLab: a network namespace joined
to this one by a veth pair, a real sshd in it, tc tbf at 1 Gbit/s in both
directions.  The VM: 512 MiB RAM running the self-built test guest in idle
mode (it fills 64 MiB once, then only wakes for a heartbeat every 100 ms), and
an 8 GiB raw disk whose first half holds 4 GiB of random data, on tmpfs
(VMFERRY_BENCH_SCALE scales the disk).  Each migration starts from a fresh
source VM on this host; the destination QEMU runs in the namespace, and the
data crosses the shaped link.  Per round, in an order that rotates:

* full: `vmferry migrate NAME ssh://.. --disk-map SRC=DST --create-disks`
  (the default storage engine), timed from launch to exit.
* incremental: `vmferry presync NAME ssh://.. --disk-map SRC=DST
  --create-disks` (timed and reported, not part of the target), then 5% of the
  data rewritten through the source QEMU's block layer (HMP qemu-io on the
  disk's device, so the presync's dirty bitmap records it: writes of 16 MiB
  spread evenly over the data), then `vmferry migrate NAME ssh://..
  --disk-map SRC=DST --copy-storage-inc`, timed the same way.

Beside each wall time: the CPU seconds of the vmferry process (os.wait4, its
reaped children such as ssh included) and of the source QEMU (/proc/PID/stat,
sampled every 10 ms until it exits), and the busy time of the rest of the
machine (/proc/stat minus those two: the destination host's sshd, agent and
QEMU, the kernel's network work, and anyone else's load).  Disk bytes moved
come from `vmferry jobinfo NAME --json` (disk_processed).  After every
migration, outside the timed part, `qemu-img compare` checks the destination
image against the source.

Targets (issue #12): `migrate --copy-storage-inc` at most 0.15x the full
migration's time (medians), and disk bytes moved at most 1.1x the rewritten
bytes.

Quick mode for development: VMFERRY_BENCH_SCALE=0.1 VMFERRY_BENCH_PRESYNC_ROUNDS=2
(the report then says it is not the target's configuration).
"""
from __future__ import annotations

import asyncio
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

import report as rpt
from bench_copy import _pdeathsig, _process_cpu, _system_busy_cpu
from bench_remote import (  # noqa: E402
    _foreign_qemus, _in_namespace, _qemu_img_compare, _vmferry_version, lab_sshd,
    require_two_hosts,
)
from vmferry.guest import build_guest, guest_cmdline, wait_for_pass
from vmferry.vm.process import start_vm, stop_all, vm_status
from vmferry.vm.qmp import qmp_session
from vmferry.vm.spec import parse_spec
from vmferry.vm.state import StateDir

_TESTS = Path(__file__).resolve().parent.parent / "tests"
if str(_TESTS) not in sys.path:
    sys.path.append(str(_TESTS))      # after bench/: tests/ only lends netlab.py
from netlab import NetLab  # noqa: E402

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
SCALE = float(os.environ.get("VMFERRY_BENCH_SCALE", "1"))
DISK = max(256 * MiB, int(8 * GiB * SCALE) // (2 * MiB) * (2 * MiB))
DATA = DISK // 2                      # random data in the first half, a hole after it
ROUNDS = int(os.environ.get("VMFERRY_BENCH_PRESYNC_ROUNDS")
             or os.environ.get("VMFERRY_BENCH_ROUNDS") or "5")
QUICK = SCALE != 1 or ROUNDS < 5
RATE = "1gbit"
RAM, GUEST_FILL = "512M", "64M"
REWRITE_FRACTION = 0.05
# 16 MiB writes at full size (~13 of them for 5% of 4 GiB), aligned to the dirty
# bitmap's 64 KiB granularity so that exactly the rewritten bytes are dirty
WRITE_SIZE = max(64 * KiB, int(16 * MiB * SCALE) // (64 * KiB) * (64 * KiB))
N_WRITES = math.ceil(DATA * REWRITE_FRACTION / WRITE_SIZE)
REWRITTEN = N_WRITES * WRITE_SIZE
TARGET_TIME, TARGET_BYTES = 0.15, 1.1
TIMEOUT = float(os.environ.get("VMFERRY_BENCH_TIMEOUT", "900"))
OUT_DIR = Path(os.environ.get("VMFERRY_BENCH_OUT", Path(__file__).parent / "results"))
FULL, PRESYNC, INC = "full migration", "presync (beforehand, no target)", \
    "migrate --copy-storage-inc"
CONTENDERS = [FULL, INC]              # what a round runs, order rotating


def _size(n: int) -> str:
    return f"{n / GiB:g} GiB" if n % GiB == 0 else f"{n / MiB:g} MiB"


CASE = f"1 Gbit/s link, {_size(DISK)} disk, {_size(DATA)} data"
VM = "bench"


def _report() -> rpt.Report:
    cols = [
        rpt.Column("tool", "run"),
        *rpt.spread_columns("median wall s"),
        rpt.Column("cpu_s", "CPU s (vmferry + src QEMU)", rpt.fmt_num(2), "right"),
        rpt.Column("vmferry_cpu_s", "vmferry CPU s", rpt.fmt_num(2), "right"),
        rpt.Column("qemu_cpu_s", "src QEMU CPU s", rpt.fmt_num(2), "right"),
        rpt.Column("other_cpu_s", "rest of machine CPU s", rpt.fmt_num(2), "right"),
        rpt.Column("disk_mib", "disk MiB moved", rpt.fmt_num(1), "right"),
        rpt.Column("rewritten_mib", "MiB rewritten", rpt.fmt_num(1), "right"),
        rpt.Column("memory_mib", "memory MiB moved", rpt.fmt_num(0), "right"),
        rpt.Column("storage_s", "storage s", rpt.fmt_num(2), "right"),
        rpt.Column("memory_s", "memory s", rpt.fmt_num(2), "right"),
        rpt.Column("outside_s", "outside the job s", rpt.fmt_num(2), "right"),
        rpt.Column("engine", "engine"),
        rpt.Column("ratio", "× full wall", rpt.fmt_num(3), "right"),
        rpt.Column("cpu_ratio", "× full CPU", rpt.fmt_num(3), "right"),
    ]
    chart = rpt.ChartSpec(
        group_key="case", series_key="tool", series_order=[FULL, PRESYNC, INC],
        panels=[rpt.Panel("median_s", "seconds", "Wall time (median, min–max)",
                          "min_s", "max_s"),
                rpt.Panel("cpu_s", "CPU seconds", "CPU: vmferry + source QEMU",
                          "cpu_min_s", "cpu_max_s"),
                rpt.Panel("disk_mib", "MiB", "Disk bytes moved", value_fmt="{:.0f}")])
    title = "vmferry pre-seeding benchmark (1 Gbit/s link)"
    if QUICK:
        title += f" — QUICK MODE (scale {SCALE:g}, {ROUNDS} rounds)"
    return rpt.Report(name="presync", title=title, columns=cols, out_dir=OUT_DIR,
                      chart=chart, finalize=_finalize)


def _finalize(rep: rpt.Report) -> list[str]:
    by = {r["tool"]: r for r in rep.records}
    if FULL not in by or INC not in by:
        return []
    f, i = by[FULL], by[INC]
    for r in by.values():
        r["ratio"] = r["median_s"] / f["median_s"]
        r["cpu_ratio"] = r["cpu_s"] / f["cpu_s"] if f["cpu_s"] else None
    moved = i["disk_mib"] / i["rewritten_mib"]
    if rep.chart is not None:         # the time target, drawn on the wall-time panel
        rep.chart.panels[0].hline = TARGET_TIME * f["median_s"]
        rep.chart.panels[0].hline_label = f"target: {TARGET_TIME:g}× full"
    quick = (f"(QUICK MODE: scale {SCALE:g}, {ROUNDS} rounds — not the target's "
             f"configuration, no verdict) " if QUICK else "")
    ok_t, ok_b = i["ratio"] <= TARGET_TIME, moved <= TARGET_BYTES

    def verdict(ok: bool) -> str:
        return ("pass" if ok else "fail") if QUICK else ("PASS" if ok else "FAIL")
    return [
        f"- {quick}`migrate --copy-storage-inc` at most {TARGET_TIME:.2f}× the full "
        f"migration's time: {i['median_s']:.2f} s vs {f['median_s']:.2f} s (medians), "
        f"{i['ratio']:.3f}× → **{verdict(ok_t)}**",
        f"- {quick}disk bytes moved at most {TARGET_BYTES:.1f}× the rewritten bytes: "
        f"{i['disk_mib']:.1f} MiB for {i['rewritten_mib']:.1f} MiB rewritten, "
        f"{moved:.3f}× → **{verdict(ok_b)}**",
        f"- (no target) CPU of vmferry and the source QEMU: {i['cpu_s']:.2f} s vs "
        f"{f['cpu_s']:.2f} s, {i['cpu_ratio']:.3f}×; the presync before it took "
        f"{by[PRESYNC]['median_s']:.2f} s and {by[PRESYNC]['cpu_s']:.2f} CPU s"
        if PRESYNC in by and i.get("cpu_ratio") is not None else
        "- (no target) CPU ratio unavailable",
    ]


def _spec(kernel: Path, disk: Path, serial: Path) -> Any:
    return parse_spec(f'''
name = "{VM}"
memory = "{RAM}"
cpus = 1
kernel = "{kernel}"
cmdline = "{guest_cmdline(mem=GUEST_FILL, dirty='idle', hb=100)}"
serial = "{serial}"
[[disks]]
path = "{disk}"
format = "raw"
''', source="bench spec")


def _cpu_or_none(pid: int) -> float | None:
    """utime+stime of PID, None once it has exited (or is a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                return None
    except (OSError, IndexError):
        return None
    return _process_cpu(pid)


class QemuCpu:
    """CPU seconds a process uses from start() to stop() or its exit: its
    /proc/PID/stat sampled every 10 ms, the last sample before it is gone kept
    (at most one sampling period of its CPU is lost, at its very end)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.first = self.last = _cpu_or_none(pid) or 0.0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            v = _cpu_or_none(self.pid)
            if v is None:
                return
            self.last = v
            self._stop.wait(0.01)

    def start(self) -> "QemuCpu":
        self._t.start()
        return self

    def stop(self) -> float:
        self._stop.set()
        self._t.join()
        v = _cpu_or_none(self.pid)
        if v is not None:
            self.last = v
        return self.last - self.first


def _progress(stdout: str) -> dict[str, Any]:
    """Where a migration's time went, from its --progress=json lines."""
    lines = [json.loads(l) for l in stdout.splitlines() if l.startswith("{")]
    if not lines:
        return {}
    phases: dict[str, int] = {}
    for l in lines:
        phases.setdefault(l["phase"], l["elapsed_ms"])
        if l.get("memory_total"):
            phases.setdefault("memory", l["elapsed_ms"])
    done = lines[-1]
    return {"storage_s": (phases.get("memory", 0) - phases.get("perform", 0)) / 1000,
            "phases_ms": phases, "job_s": (done.get("elapsed_ms") or 0) / 1000}


class PresyncBench:
    def __init__(self, root: Path, lab: NetLab, sshd: Any) -> None:
        self.root, self.lab, self.sshd = root, lab, sshd
        self.kernel = build_guest(root / "guest")
        self.src_disk = root / "src.raw"
        with open(self.src_disk, "wb") as f:
            f.truncate(DISK)
            for off in range(0, DATA, 16 * MiB):
                f.write(os.urandom(min(16 * MiB, DATA - off)))
        self.n = 0
        # Both sides run the vmferry under test (this checkout, not whatever the
        # venv's `vmferry` script imports), with bytecode caches as an installed
        # vmferry has them, kept in the bench's folder.
        import vmferry
        src = Path(vmferry.__file__).resolve().parent.parent
        self.env = dict(os.environ)
        self.env.pop("PYTHONDONTWRITEBYTECODE", None)
        self.env.pop("VMFERRY_STATE_DIR", None)
        self.env["PYTHONPYCACHEPREFIX"] = str(root / "pycache")
        self.env["PYTHONPATH"] = os.pathsep.join(
            [str(src)] + [p for p in self.env.get("PYTHONPATH", "").split(os.pathsep)
                          if p and Path(p).resolve() != src])
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(src / "vmferry")],
                       env=self.env, check=True, capture_output=True)
        self.agent = root / "vmferry-agent"
        self.agent.write_text(
            "#!/bin/sh\n"
            f"PYTHONPATH={shlex.quote(str(src))} "
            f"PYTHONPYCACHEPREFIX={shlex.quote(str(root / 'pycache'))} "
            f"exec {shlex.quote(sys.executable)} -m vmferry \"$@\"\n")
        self.agent.chmod(0o755)

    # -- one VM, one destination ----------------------------------------

    def fresh(self) -> tuple[StateDir, StateDir, Path]:
        self.n += 1
        i = self.n
        a, b = StateDir(self.root / f"A{i}"), StateDir(self.root / f"B{i}")
        serial = self.root / f"serial{i}.log"
        start_vm(a, _spec(self.kernel, self.src_disk, serial))
        wait_for_pass(serial, 1, 120)     # the guest has filled its 64 MiB once
        b.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        (b.path / "agent.toml").write_text(f'storage_roots = ["{self.root}"]\n')
        return a, b, self.root / f"dst{i}.raw"

    def ssh_uri(self, b: StateDir) -> str:
        s = self.sshd
        q = (f"keyfile={quote(str(s.key))}&known_hosts={quote(str(s.known_hosts))}"
             f"&agent={quote(str(self.agent))}")
        return f"ssh://{s.user}@{s.host}:{s.port}{b.path}?{q}"

    def vmferry(self, a: StateDir, *args: str) -> list[str]:
        return [sys.executable, "-m", "vmferry", "--state-dir", str(a.path), *args]

    def timed(self, argv: list[str], qemu_pid: int, name: str) -> dict[str, Any]:
        """Run ARGV as its own process: wall seconds from launch to exit, its CPU
        seconds (wait4: it and the children it reaped), the source QEMU's CPU
        seconds over the same time, and the rest of the machine's busy time."""
        out, err = self.root / f"{name}.stdout", self.root / f"{name}.stderr"
        cpu = QemuCpu(qemu_pid)
        busy0 = _system_busy_cpu()
        with open(out, "wb") as fo, open(err, "wb") as fe:
            t0 = time.monotonic()
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fo, stderr=fe,
                                    env=self.env, preexec_fn=_pdeathsig)
        cpu.start()
        timer = threading.Timer(TIMEOUT, proc.kill)
        timer.start()
        try:
            _, status, ru = os.wait4(proc.pid, 0)
            wall = time.monotonic() - t0
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        qemu = cpu.stop()
        busy = _system_busy_cpu() - busy0
        if proc.returncode != 0:
            raise RuntimeError(f"{shlex.join(argv[3:])} exited {proc.returncode}"
                               f"{' (killed after the timeout)' if wall >= TIMEOUT else ''}: "
                               f"{err.read_text(errors='replace')[-2000:]}")
        own = ru.ru_utime + ru.ru_stime
        return {"wall_s": wall, "vmferry_cpu_s": own, "qemu_cpu_s": qemu,
                "cpu_s": own + qemu, "other_cpu_s": max(0.0, busy - own - qemu),
                "stdout": out.read_text(errors="replace")}

    def jobinfo(self, a: StateDir) -> dict[str, Any]:
        cp = subprocess.run(self.vmferry(a, "jobinfo", VM, "--json"), env=self.env,
                            capture_output=True, text=True, timeout=60)
        assert cp.returncode == 0, cp.stderr
        return json.loads(cp.stdout)

    def rewrite(self, a: StateDir, round_no: int) -> int:
        """5% of the data rewritten through the source QEMU's block layer, as the
        guest would write it: N_WRITES writes of WRITE_SIZE spread evenly over
        the data (shifted a little each round), a new pattern each round."""
        stride = DATA // N_WRITES
        shift = (round_no * 7 * MiB) % max(MiB, stride - WRITE_SIZE) // (64 * KiB) * (64 * KiB)
        pattern = 0x40 + round_no % 0x80

        async def go() -> int:
            n = 0
            async with qmp_session(a.cli_socket(VM), timeout=60) as q:
                for k in range(N_WRITES):
                    off = min(k * stride // (64 * KiB) * (64 * KiB) + shift,
                              DATA - WRITE_SIZE)
                    out = await q.execute("human-monitor-command", {
                        "command-line": f'qemu-io -d vd0/virtio-backend '
                                        f'"write -P {pattern:#x} {off} {WRITE_SIZE}"'})
                    assert out == "", out
                    n += WRITE_SIZE
            return n
        return asyncio.run(go())

    def check_and_clean(self, tool: str, a: StateDir, b: StateDir, dst: Path,
                        result: dict[str, Any]) -> None:
        """Where the VM ended up; then, untimed, the destination image compared
        with the source."""
        try:
            st = vm_status(b, VM)
            assert st.state == "running", f"{tool}: destination VM is {st.state}"
            assert st.pid and _in_namespace(st.pid, self.lab.ns), \
                f"{tool}: the destination QEMU does not run in {self.lab.ns}"
            assert a.read_pid(VM) is None, f"{tool}: the source QEMU still runs"
        finally:
            stop_all(a, b, timeout=5)
        try:
            # how much of the destination image the copy allocated (a mirror's zero
            # writes may fill the holes; presync and the native engine skip them)
            result["dst_allocated_mib"] = dst.stat().st_blocks * 512 / MiB
            diff = _qemu_img_compare(self.src_disk, dst)
            assert diff == "", f"{tool}: destination image differs from the source: {diff}"
            result["checks"] = {"dest_in_netns": True, "qemu_img_compare": "identical"}
        finally:
            for p in (dst, Path(str(dst) + ".vmferry-presync.json")):
                p.unlink(missing_ok=True)

    # -- the contenders -------------------------------------------------

    def run_full(self, round_no: int) -> dict[str, Any]:
        a, b, dst = self.fresh()
        foreign = _foreign_qemus(self.root)
        try:
            r = self.timed(self.vmferry(a, "migrate", VM, self.ssh_uri(b), "--disk-map",
                                        f"{self.src_disk}={dst}", "--create-disks",
                                        "--progress=json"),
                           a.read_pid(VM), f"full{self.n}")
            r.update(self._job(a, r))
        except BaseException:
            stop_all(a, b, timeout=5)
            dst.unlink(missing_ok=True)
            raise
        r["foreign_qemus"] = max(foreign, _foreign_qemus(self.root))
        self.check_and_clean(FULL, a, b, dst, r)
        return r

    def run_inc(self, round_no: int) -> tuple[dict[str, Any], dict[str, Any]]:
        a, b, dst = self.fresh()
        foreign = _foreign_qemus(self.root)
        dmap = ("--disk-map", f"{self.src_disk}={dst}")
        try:
            pid = a.read_pid(VM)
            pre = self.timed(self.vmferry(a, "presync", VM, self.ssh_uri(b), *dmap,
                                          "--create-disks"), pid, f"presync{self.n}")
            first = pre["stdout"].strip().splitlines()[-1]
            assert first.startswith(f"presynced {VM} (full)"), first
            pre["summary"] = first
            rewritten = self.rewrite(a, round_no)
            r = self.timed(self.vmferry(a, "migrate", VM, self.ssh_uri(b), *dmap,
                                        "--copy-storage-inc", "--progress=json"),
                           pid, f"inc{self.n}")
            r.update(self._job(a, r))
            r["rewritten"] = rewritten
        except BaseException:
            stop_all(a, b, timeout=5)
            for p in (dst, Path(str(dst) + ".vmferry-presync.json")):
                p.unlink(missing_ok=True)
            raise
        assert not r["warnings"], f"{INC}: {r['warnings']}"
        r["foreign_qemus"] = pre["foreign_qemus"] = max(foreign, _foreign_qemus(self.root))
        self.check_and_clean(INC, a, b, dst, r)
        return pre, r

    def _job(self, a: StateDir, r: dict[str, Any]) -> dict[str, Any]:
        info = self.jobinfo(a)
        assert info["status"] == "completed", info
        prog = _progress(r.pop("stdout"))
        return {"disk_bytes": info["disk_processed"], "memory_bytes": info["memory_processed"],
                "memory_s": (info.get("memory_ms") or 0) / 1000,
                "downtime_ms": info.get("downtime_ms"), "engine": info["storage_engine"],
                "warnings": info.get("warnings") or [],
                "outside_s": r["wall_s"] - info["elapsed_ms"] / 1000, **prog}


@pytest.fixture(scope="module")
def pbench():
    require_two_hosts("qemu-nbd")
    root = Path(tempfile.mkdtemp(prefix="vmfp-", dir="/dev/shm"))
    lab = None
    try:
        lab = NetLab()
        sshd = lab_sshd(lab, root)
        lab.shape(RATE)
        yield PresyncBench(root, lab, sshd)
    finally:
        if lab is not None:
            lab.close()
        shutil.rmtree(root, ignore_errors=True)


def _summary(tool: str, rs: list[dict[str, Any]]) -> dict[str, Any]:
    def med(key: str, default: float = 0.0) -> float:
        return statistics.median((r.get(key) if r.get(key) is not None else default)
                                 for r in rs)
    walls, cpus = [r["wall_s"] for r in rs], [r["cpu_s"] for r in rs]
    out = {"case": CASE, "tool": tool, "median_s": statistics.median(walls),
           "min_s": min(walls), "max_s": max(walls), "cpu_s": statistics.median(cpus),
           "cpu_min_s": min(cpus), "cpu_max_s": max(cpus),
           "vmferry_cpu_s": med("vmferry_cpu_s"), "qemu_cpu_s": med("qemu_cpu_s"),
           "other_cpu_s": med("other_cpu_s"), "rounds": rs}
    if tool != PRESYNC:
        out.update(disk_mib=med("disk_bytes") / MiB, memory_mib=med("memory_bytes") / MiB,
                   storage_s=med("storage_s"), memory_s=med("memory_s"),
                   outside_s=med("outside_s"),
                   engine="/".join(sorted({r["engine"] for r in rs})))
    if tool == INC:
        out["rewritten_mib"] = med("rewritten") / MiB
    return out


@pytest.mark.timeout(0)
def test_presync_side_by_side(pbench: PresyncBench) -> None:
    rep = rpt.get_report("presync", _report)
    rep.meta["machine"] = rpt.machine_info({"qemu": ["qemu-system-x86_64", "--version"],
                                            "ssh": ["ssh", "-V"]})
    rep.meta["config"] = {
        "mode": (f"QUICK MODE (VMFERRY_BENCH_SCALE={SCALE:g}, {ROUNDS} rounds): not the "
                 f"target's configuration" if QUICK else "full (scale 1)"),
        "vmferry commit": _vmferry_version(),
        "VM": f"{RAM[:-1]} MiB RAM, 1 vCPU, idle test guest ({GUEST_FILL[:-1]} MiB filled once, "
              f"heartbeat every 100 ms)",
        "disk": f"{DISK // MiB} MiB raw on tmpfs, the first {DATA // MiB} MiB random data",
        "rewritten after the presync": f"{N_WRITES} writes of {WRITE_SIZE // KiB} KiB spread "
                                       f"over the data = {REWRITTEN // MiB} MiB "
                                       f"({REWRITTEN / DATA:.1%} of the data), HMP qemu-io "
                                       f"on vd0",
        "link": f"veth to a network namespace, tc tbf {RATE} both directions",
        "full": "vmferry migrate bench 'ssh://root@DEST:22/B?…' --disk-map SRC=DST "
                "--create-disks",
        "presync": "vmferry presync bench 'ssh://root@DEST:22/B?…' --disk-map SRC=DST "
                   "--create-disks",
        "incremental": "vmferry migrate bench 'ssh://root@DEST:22/B?…' --disk-map SRC=DST "
                       "--copy-storage-inc",
        "rounds": ROUNDS, "order": "rotating which goes first",
    }
    results: dict[str, list[dict]] = {FULL: [], PRESYNC: [], INC: []}
    for i in range(ROUNDS):
        order = CONTENDERS[i % 2:] + CONTENDERS[:i % 2]
        for tool in order:
            if tool == FULL:
                r = pbench.run_full(i)
                results[FULL].append(r)
                print(f"\nround {i + 1} full: {r['wall_s']:.2f} s, CPU {r['cpu_s']:.2f} s "
                      f"(vmferry {r['vmferry_cpu_s']:.2f}, QEMU {r['qemu_cpu_s']:.2f}), disk "
                      f"{r['disk_bytes'] / MiB:.0f} MiB, engine {r['engine']}", flush=True)
            else:
                pre, r = pbench.run_inc(i)
                results[PRESYNC].append(pre)
                results[INC].append(r)
                print(f"\nround {i + 1} presync: {pre['wall_s']:.2f} s, CPU "
                      f"{pre['cpu_s']:.2f} s; incremental: {r['wall_s']:.2f} s, CPU "
                      f"{r['cpu_s']:.2f} s, disk {r['disk_bytes'] / MiB:.1f} MiB for "
                      f"{r['rewritten'] / MiB:.1f} MiB rewritten, engine {r['engine']}",
                      flush=True)
    for tool in (FULL, PRESYNC, INC):
        rep.add(_summary(tool, results[tool]))
    busy = sum(1 for rs in results.values() for r in rs if r["foreign_qemus"])
    if busy:
        rep.notes.append(f"WARNING: other QEMU processes (not this bench's) ran during {busy} "
                         f"of {sum(map(len, results.values()))} timed runs: the timings are "
                         f"noisier than on an idle machine (foreign_qemus in the JSON).")
    rep.notes += [
        "Each run starts from a fresh source VM on this host; the destination state "
        "directory, image and QEMU are new each time and live in the namespace behind the "
        "shaped link (checked: destination QEMU running in the namespace, source QEMU gone, "
        "`qemu-img compare` of the destination image with the source after every migration, "
        "outside the timed part).",
        "Wall time: launch of the vmferry process to its exit (ssh, the agent's start and "
        "the destination QEMU's start included).  CPU s = the vmferry process's own CPU "
        "(wait4, with the children it reaped, e.g. ssh) + the source QEMU's "
        "(/proc/PID/stat every 10 ms until it exits; its guest's vCPU included).  Rest of "
        "machine = /proc/stat busy time minus those: the destination host's sshd, agent, "
        "QEMU and qemu-nbd, the kernel's network and tc work, and any other load.",
        "The guest is kept idle with 64 MiB of its 512 MiB touched, so its memory phase is "
        "short and the same for both contenders; a busier guest would add the same memory "
        "time to both and raise the ratio.",
        "disk MiB moved: jobinfo's disk_processed.  The full migration runs the default "
        "storage engine (the engine column says which): for QEMU's mirror that is the job's "
        "offset, the whole virtual disk with its unwritten half sent as zero writes; the "
        "native engine counts the allocated data it sent.  The presync row's disk bytes are "
        "not shown: it copies the data before the migration, while the VM runs.",
        "storage s: from the migration's perform phase to its first progress report with "
        "memory (to the progress granularity); memory s: QEMU's total-time of the memory "
        "migration; outside the job: process start, ssh and agent start, and exit.",
        "Both sides run this checkout's vmferry, with bytecode caches (PYTHONPYCACHEPREFIX in "
        "the bench's folder); the agent through a small wrapper script passed as `agent=`.",
    ]
    f, i_ = statistics.median(r["wall_s"] for r in results[FULL]), \
        statistics.median(r["wall_s"] for r in results[INC])
    print(f"\npresync: incremental {i_:.2f} s vs full {f:.2f} s (medians): {i_ / f:.3f}× "
          f"(target ≤ {TARGET_TIME}×)" + (" — QUICK MODE" if QUICK else ""))
    for r in results[INC]:
        assert r["disk_bytes"] > 0
