"""Remote migration benchmark (issue #4): the same VM moved to another host
over a link shaped to 1 Gbit/s, by vmferry and by libvirt's QMP sequence
run by hand, side by side in one run.

The destination host is a network namespace joined to this one by a veth
pair (tests/netlab.py), with a real sshd in it; tc shapes both directions
of the link to 1 Gbit/s (tbf, ~958 Mbit/s measured).  The VM is
bench_migrate's: 1 GiB RAM running the self-built test guest in idle mode
(512 MiB filled once), and a 2 GiB raw disk half full of random data, on
tmpfs (VMFERRY_BENCH_SCALE scales the disk).  A fresh source VM on this
host per migration; the destination QEMU runs in the namespace, and the
disks and memory cross the shaped link:

* vmferry: `vmferry migrate NAME 'ssh://root@DEST/B?keyfile=..&agent=..'
  --disk-map SRC=DST --create-disks`, a process of its own as a user runs
  it: ssh starts `vmferry agent --stdio` on the destination host, which
  creates the image and starts the destination QEMU listening on DEST.
* by hand: libvirt_replay.py --tcp DEST, run inside the namespace (`ip
  netns exec`), also its own process: it creates the image, starts the
  destination QEMU with vmferry's own command line, then drives both QEMUs
  over QMP (NBD server and migrate-incoming on DEST, blockdev-mirror, wait
  ready, migrate, wait completed, cancel the mirror, cont, quit the source).

Both include starting the destination QEMU.  vmferry also pays for the ssh
connection and the agent's start (a Python process on the destination
host): that is the overhead the target is about, so it stays in.  To show
where it goes, the harness times ssh and the agent's hello on their own
once, and runs a third contender (VMFERRY_BENCH_REMOTE_TLS=0 leaves it out):

* vmferry tls://: `vmferry migrate NAME tls://DEST:PORT --pki DIR ...` to a
  `vmferry agent --listen` started in the namespace before the rounds, as
  libvirtd runs on a destination host: no ssh, no agent start per migration.

Target (issue #4): vmferry's overhead at most 5% of the total time,
(vmferry ssh:// - by hand) / by hand on the medians.
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
from urllib.parse import quote

import pytest

import report as rpt
from bench_migrate import DISK_SIZE, Bench, _event_time
from vmferry.vm.process import vm_status
from vmferry.vm.state import StateDir

_TESTS = Path(__file__).resolve().parent.parent / "tests"
if str(_TESTS) not in sys.path:
    sys.path.append(str(_TESTS))      # after bench/: tests/ only lends netlab.py
from netlab import (  # noqa: E402
    NetLab, NetLabError, make_pki, netlab_unavailable, start_sshd,
)

ROUNDS = int(os.environ.get("VMFERRY_BENCH_REMOTE_ROUNDS")
             or os.environ.get("VMFERRY_BENCH_ROUNDS") or "3")
RATE = "1gbit"
TARGET_OVERHEAD = 0.05
TIMEOUT = float(os.environ.get("VMFERRY_BENCH_TIMEOUT", "600"))
OUT_DIR = Path(os.environ.get("VMFERRY_BENCH_OUT", Path(__file__).parent / "results"))
SSH, HAND, TLS = "vmferry ssh://", "by-hand", "vmferry tls://"
TLS_AGENT = os.environ.get("VMFERRY_BENCH_REMOTE_TLS", "1") != "0"
TOOLS = [SSH, HAND] + ([TLS] if TLS_AGENT else [])
TLS_PORT = 16599
AGENT = str(Path(sys.executable).parent / "vmferry")
REPLAY = Path(__file__).with_name("libvirt_replay.py")
PROBES = 5          # runs of each start-up probe (median)


def _report() -> rpt.Report:
    cols = [
        rpt.Column("tool", "orchestration"),
        *rpt.spread_columns(),
        rpt.Column("dest_up_s", "dest. QEMU up after s", rpt.fmt_num(2), "right"),
        rpt.Column("storage_s", "storage s", rpt.fmt_num(2), "right"),
        rpt.Column("memory_s", "memory s", rpt.fmt_num(2), "right"),
        rpt.Column("tail_s", "resume to exit s", rpt.fmt_num(2), "right"),
        rpt.Column("downtime_ms", "QEMU downtime ms", rpt.fmt_num(0), "right"),
        rpt.Column("pause_ms", "guest pause ms", rpt.fmt_num(0), "right"),
        rpt.Column("disk_mib", "disk MiB moved", rpt.fmt_num(0), "right"),
        rpt.Column("memory_mib", "memory MiB moved", rpt.fmt_num(0), "right"),
        rpt.Column("ratio", "× by-hand time", rpt.fmt_num(3), "right"),
    ]
    chart = rpt.ChartSpec(group_key="case", series_key="tool", series_order=TOOLS,
                          panels=[rpt.Panel("median_s", "seconds", "Total migration time",
                                            "min_s", "max_s"),
                                  rpt.Panel("dest_up_s", "seconds",
                                            "Start to destination QEMU up",
                                            "dest_up_min_s", "dest_up_max_s"),
                                  rpt.Panel("pause_ms", "ms", "Guest-visible pause",
                                            value_fmt="{:.0f}")])
    return rpt.Report(name="remote", title="vmferry remote migration benchmark (1 Gbit/s link)",
                      columns=cols, out_dir=OUT_DIR, chart=chart, finalize=_finalize)


def _finalize(rep: rpt.Report) -> list[str]:
    by = {r["tool"]: r for r in rep.records}
    if SSH not in by or HAND not in by:
        return []
    h = by[HAND]
    for r in by.values():
        r["ratio"] = r["median_s"] / h["median_s"]
    v = by[SSH]
    overhead = v["ratio"] - 1
    lines = [
        f"- vmferry's overhead at most {TARGET_OVERHEAD:.0%} of the hand-run QMP sequence's "
        f"total time: {v['median_s']:.2f} s vs {h['median_s']:.2f} s (medians), "
        f"{v['ratio']:.3f}×, overhead {overhead:+.1%} → "
        f"**{'PASS' if overhead <= TARGET_OVERHEAD else 'FAIL'}**",
    ]
    if TLS in by:
        t = by[TLS]
        lines.append(f"- (for comparison, no verdict) vmferry to an agent already running, "
                     f"tls://: {t['median_s']:.2f} s, {t['ratio']:.3f}×, overhead "
                     f"{t['ratio'] - 1:+.1%}")
    return lines


def _in_namespace(pid: int, ns: str) -> bool:
    return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{ns}").st_ino


def _qemu_img_compare(a: Path, b: Path) -> str:
    cp = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(a), str(b)],
                        capture_output=True, text=True, timeout=300)
    return "" if cp.returncode == 0 else f"exit {cp.returncode}: {cp.stdout}{cp.stderr}"


def _foreign_qemus(mine: Path) -> int:
    """QEMU processes on this machine that are not this bench's (another test
    run sharing the CPUs makes the timings noisy)."""
    n = 0
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes()
            except OSError:
                continue
            if b"qemu-system" in cmd.split(b"\0")[0] and os.fsencode(mine) not in cmd:
                n += 1
    return n


def _vmferry_version() -> str:
    """The commit measured, and whether src/ had uncommitted changes."""
    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--", "src"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return f"{head or 'unknown'}{' + uncommitted changes in src/' if dirty else ''}"


async def _appears(path: Path) -> float:
    """time.monotonic() at which PATH exists (polled every 2 ms)."""
    while not path.exists():
        await asyncio.sleep(0.002)
    return time.monotonic()


class RemoteBench(Bench):
    """bench_migrate's VM and source disk; the destination is the lab's host."""

    def __init__(self, root: Path, lab: NetLab, sshd: Any) -> None:
        super().__init__(root)
        self.lab, self.sshd = lab, sshd
        self.pki: Any = None
        self.tls_state: StateDir | None = None
        self.tls_agent: subprocess.Popen | None = None
        # Both tools' Python processes with bytecode caches, as an installed
        # vmferry has them (this shell may set PYTHONDONTWRITEBYTECODE); kept
        # in the bench's folder, not in the source tree.
        self.env = dict(os.environ)
        self.env.pop("PYTHONDONTWRITEBYTECODE", None)
        self.env.pop("VMFERRY_STATE_DIR", None)
        self.env["PYTHONPYCACHEPREFIX"] = str(root / "pycache")
        import vmferry
        subprocess.run([sys.executable, "-m", "compileall", "-q",
                        str(Path(vmferry.__file__).parent), str(REPLAY)],
                       env=self.env, check=True, capture_output=True)

    def state_b(self, b: StateDir) -> StateDir:
        b.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        (b.path / "agent.toml").write_text(f'storage_roots = ["{self.root}"]\n')
        return b

    def start_tls_agent(self) -> None:
        """`vmferry agent --listen DEST:PORT` in the namespace, for all rounds."""
        self.pki = make_pki(self.root / "pki", [self.lab.dest_ip, self.lab.host_ip])
        self.tls_state = self.state_b(StateDir(self.root / "Btls"))
        log = self.root / "tls-agent.log"
        with open(log, "wb") as f:
            self.tls_agent = self.lab.popen(
                [AGENT, "--state-dir", str(self.tls_state.path), "agent", "--listen",
                 f"{self.lab.dest_ip}:{TLS_PORT}", "--pki", str(self.pki.dir)],
                stdout=f, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + 30
        while b"listening on" not in log.read_bytes():
            if self.tls_agent.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the tls:// agent did not start: {log.read_text()}")
            time.sleep(0.05)

    def ssh_uri(self, b: StateDir) -> str:
        s = self.sshd
        q = (f"keyfile={quote(str(s.key))}&known_hosts={quote(str(s.known_hosts))}"
             f"&agent={quote(AGENT)}")
        return f"ssh://{s.user}@{s.host}:{s.port}{b.path}?{q}"

    def argv(self, tool: str, a: StateDir, b: StateDir, dst: Path) -> list[str]:
        if tool in (SSH, TLS):
            dest = (self.ssh_uri(b) if tool == SSH
                    else f"tls://{self.lab.dest_ip}:{TLS_PORT}")
            pki = ["--pki", str(self.pki.dir)] if tool == TLS else []
            return [sys.executable, "-m", "vmferry", "--state-dir", str(a.path), "migrate",
                    "bench", dest, *pki, "--disk-map", f"{self.src_disk}={dst}",
                    "--create-disks", "--progress=json"]
        return self.lab.ns_argv([sys.executable, str(REPLAY), "--tcp", self.lab.dest_ip,
                                 str(a.path), "bench", str(b.path), str(self.src_disk),
                                 str(dst)])

    def run(self, tool: str, i: int, verify: bool = False) -> dict[str, Any]:
        """One migration by `tool`, run as its own process; the bench process
        only watches: the guest stop on the source and resume on the
        destination (QEMU's event timestamps), and the destination QEMU's
        spec file appearing (start_vm_async writes it once QMP answers)."""
        a, b, dst, _ = self.fresh(i)
        foreign = _foreign_qemus(self.root)
        if tool == TLS:
            assert self.tls_state is not None and self.tls_agent is not None
            assert self.tls_agent.poll() is None, "the tls:// agent exited"
            b = self.tls_state          # the running agent's own state directory
        else:
            self.state_b(b)
        argv = self.argv(tool, a, b, dst)
        checks: dict[str, Any] = {}
        try:
            async def go() -> tuple[float, float, float, float, float, list[dict]]:
                r1, r2 = asyncio.Event(), asyncio.Event()
                stop_t = asyncio.ensure_future(_event_time(a.cli_socket("bench"), "STOP", r1))
                resume_t = asyncio.ensure_future(
                    _event_time(b.cli_socket("bench"), "RESUME", r2,
                                wait_for=b.spec_path("bench")))
                up_t = asyncio.ensure_future(_appears(b.spec_path("bench")))
                await r1.wait()
                t0 = time.monotonic()
                proc = await asyncio.create_subprocess_exec(
                    *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.env,
                    stdin=subprocess.DEVNULL)
                try:
                    out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
                except asyncio.TimeoutError:
                    proc.kill()
                    await proc.wait()
                    raise RuntimeError(f"{tool} did not finish within {TIMEOUT:g} s")
                t_end, wall_end = time.monotonic(), time.time()
                if proc.returncode != 0:
                    for t in (stop_t, resume_t, up_t):
                        t.cancel()
                    raise RuntimeError(f"{tool} failed (exit {proc.returncode}): "
                                       f"{err.decode()[-2000:]}")
                lines = [json.loads(l) for l in out.decode().strip().splitlines()]
                up = await asyncio.wait_for(up_t, 10)
                return (t_end - t0, up - t0, await stop_t,
                        await asyncio.wait_for(resume_t, 10), wall_end, lines)
            total, up, s, r, wall_end, lines = asyncio.run(go())
            # Where the destination ran and where the data went: the namespace
            # behind the shaped link, for both tools.
            st = vm_status(b, "bench")
            assert st.state == "running", f"{tool}: destination VM is {st.state}"
            assert st.pid and _in_namespace(st.pid, self.lab.ns), \
                f"{tool}: the destination QEMU does not run in {self.lab.ns}"
            assert a.read_pid("bench") is None, f"{tool}: the source QEMU still runs"
            done = lines[-1]
            uri = done.get("migrate_uri", "")
            assert self.lab.dest_ip in uri, f"{tool}: memory went to {uri!r}"
            checks = {"dest_state": st.state, "dest_in_netns": True, "migrate_uri": uri}
            foreign = max(foreign, _foreign_qemus(self.root))
        finally:
            self.cleanup_vms(a, b)
            if tool == TLS:
                b.remove("bench")       # the next round's spec file must be new
        try:
            if verify:
                diff = _qemu_img_compare(self.src_disk, dst)
                assert diff == "", f"{tool}: destination image differs from the source: {diff}"
                checks["qemu_img_compare"] = "identical"
        finally:
            dst.unlink(missing_ok=True)
        if tool != HAND:
            phases: dict[str, int] = {}
            for l in lines:
                phases.setdefault(l["phase"], l["elapsed_ms"])
                if l["memory_total"]:
                    phases.setdefault("memory", l["elapsed_ms"])
            done["storage_s"] = (phases.get("memory", 0) - phases.get("perform", 0)) / 1000
            done["prepare_s"] = phases.get("perform", 0) / 1000
            done["phases_ms"] = phases
        return {"total_s": total, "dest_up_s": up, "tail_s": wall_end - r,
                "downtime_ms": done.get("downtime_ms"), "pause_ms": (r - s) * 1000,
                "disk_bytes": done.get("disk_processed"),
                "memory_bytes": done.get("memory_processed"),
                "memory_ms": done.get("memory_ms"), "storage_s": done["storage_s"],
                "job_s": (done.get("elapsed_ms") or 0) / 1000,
                "prepare_s": done.get("prepare_s"), "phases_ms": done.get("phases_ms"),
                "foreign_qemus": foreign, "checks": checks}

    def cleanup_vms(self, a: StateDir, b: StateDir) -> None:
        from vmferry.vm.process import stop_all
        stop_all(a, b)

    # -- where vmferry's extra time goes ---------------------------------

    def probes(self) -> dict[str, float]:
        """Median wall time (ms) of the start-up steps vmferry adds or shares:
        ssh alone, ssh + the agent's hello (vmferry's exact ssh command), the
        agent's hello without ssh, each side's Python imports.  Also warms the
        agent's bytecode cache before the measured runs."""
        from vmferry import __version__
        from vmferry.agent import protocol, transport
        b = self.state_b(StateDir(self.root / "Bprobe"))
        ssh = transport.ssh_argv(transport.parse(self.ssh_uri(b)))
        frames = (protocol.encode({"id": 1, "op": "hello", "args": {
            "protocol": protocol.PROTOCOL, "version": __version__, "keepalive": 5}})
            + protocol.encode({"id": 2, "op": "bye", "args": {}}))
        agent = [AGENT, "--state-dir", str(b.path), "agent", "--stdio"]
        cases = {
            "python -c pass": ([sys.executable, "-c", "pass"], None),
            "vmferry CLI imports (python -c 'import vmferry.cli, vmferry.migration.api')": (
                [sys.executable, "-c", "import vmferry.cli, vmferry.migration.api"], None),
            "replay imports (python libvirt_replay.py --help)": (
                [sys.executable, str(REPLAY), "--help"], None),
            "ip netns exec NS true": (self.lab.ns_argv(["true"]), None),
            "ssh DEST true": (ssh[:-1] + ["true"], None),
            # sshd runs the command with the user's shell, and bash started by
            # sshd reads ~/.bashrc: part of every ssh:// migration's cost
            "the destination user's ~/.bashrc (bash -c '. ~/.bashrc')": (
                self.lab.ns_argv(["bash", "-c", f". {Path('~root').expanduser()}/.bashrc "
                                  f"2>/dev/null; true"]), None),
            "agent hello+bye without ssh (ip netns exec)": (self.lab.ns_argv(agent), frames),
            "ssh DEST vmferry agent --stdio: hello+bye": (ssh, frames),
        }
        out: dict[str, float] = {}
        for name, (argv, data) in cases.items():
            times = []
            for k in range(PROBES + 1):
                t0 = time.monotonic()
                cp = subprocess.run(argv, input=data, capture_output=True, env=self.env,
                                    timeout=60)
                dt = time.monotonic() - t0
                assert cp.returncode == 0, f"{name}: exit {cp.returncode}: {cp.stderr!r}"
                if data is not None:
                    assert b'"id":2,"ok":true' in cp.stdout, f"{name}: {cp.stdout!r}"
                if k:                     # the first run only warms caches
                    times.append(dt * 1000)
            out[name] = statistics.median(times)
        shutil.rmtree(b.path, ignore_errors=True)
        return out


def _where_it_goes(med: dict[str, float], probes: dict[str, float]) -> str:
    """vmferry ssh://'s extra time over the hand-run sequence, split by the
    tls:// contender and the start-up probes."""
    extra = med[SSH] - med[HAND]
    ssh_hello = next(v for k, v in probes.items() if k.startswith("ssh DEST vmferry"))
    rc = next(v for k, v in probes.items() if "bashrc" in k)
    text = (f"Where vmferry ssh://'s extra {extra:+.2f} s goes: ssh + the agent's start and "
            f"hello take {ssh_hello / 1000:.2f} s on their own (the destination user's "
            f"~/.bashrc, which bash started by sshd reads, {rc / 1000:.2f} s of it)")
    if TLS in med:
        text += (f"; vmferry to an agent already running (tls://) is "
                 f"{med[TLS] - med[HAND]:+.2f} s from the hand-run sequence, and "
                 f"{med[SSH] - med[TLS]:+.2f} s from ssh://")
    return text + "."


def require_two_hosts(*tools: str) -> None:
    """Skip, saying why, where a benchmark between two hosts cannot run here:
    QEMU and TOOLS, binutils for the test guest, network namespaces."""
    for tool in ("qemu-system-x86_64", "qemu-img", *tools):
        if not shutil.which(tool):
            pytest.skip(f"{tool} is not installed")
    if not (shutil.which("as") and shutil.which("ld")):
        pytest.skip("GNU binutils (as, ld) not installed: cannot build the test guest")
    reason = netlab_unavailable()
    if reason:
        pytest.skip(reason)


def lab_sshd(lab: NetLab, root: Path) -> Any:
    """A real sshd on the lab's destination host (skip without one)."""
    try:
        return start_sshd(lab, root / "sshd")
    except NetLabError as e:
        pytest.skip(f"no sshd for the destination host: {e}")


@pytest.fixture(scope="module")
def rbench():
    require_two_hosts()
    root = Path(tempfile.mkdtemp(prefix="vmfr-", dir="/dev/shm"))
    lab = None
    try:
        lab = NetLab()
        sshd = lab_sshd(lab, root)
        lab.shape(RATE)
        rb = RemoteBench(root, lab, sshd)
        if TLS_AGENT:
            rb.start_tls_agent()
        yield rb
    finally:
        if lab is not None:
            lab.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.timeout(0)
def test_remote_side_by_side(rbench: RemoteBench) -> None:
    rep = rpt.get_report("remote", _report)
    rep.meta["machine"] = rpt.machine_info({"qemu": ["qemu-system-x86_64", "--version"],
                                            "ssh": ["ssh", "-V"]})
    rep.meta["config"] = {
        "vmferry commit": _vmferry_version(),
        "VM": "1 GiB RAM, idle test guest (512 MiB filled)",
        "disk": f"{DISK_SIZE >> 20} MiB raw on tmpfs, half random data",
        "link": f"veth to a network namespace, tc tbf {RATE} both directions",
        "vmferry ssh://": "vmferry migrate bench 'ssh://root@DEST:22/B?keyfile=…&known_hosts=…"
                   "&agent=…/vmferry' --disk-map SRC=DST --create-disks",
        "by hand": "ip netns exec NS python bench/libvirt_replay.py --tcp DEST A bench B "
                   "SRC DST",
        **({"vmferry tls://": f"vmferry migrate bench tls://DEST:{TLS_PORT} --pki DIR "
                              "--disk-map SRC=DST --create-disks, to a vmferry agent --listen "
                              "started in the namespace before the rounds"}
           if TLS_AGENT else {}),
        "rounds": ROUNDS, "order": "rotating which goes first",
    }
    probes = rbench.probes()
    rep.meta["startup_probes_ms"] = probes
    results: dict[str, list[dict]] = {t: [] for t in TOOLS}
    for i in range(ROUNDS):
        # Rotate which goes first, so no tool always gets the warmer machine.
        order = TOOLS[i % len(TOOLS):] + TOOLS[:i % len(TOOLS)]
        for k, tool in enumerate(order):
            r = rbench.run(tool, len(TOOLS) * i + k, verify=(i == 0))
            results[tool].append(r)
            print(f"\nround {i + 1} {tool}: {r['total_s']:.2f} s total, dest QEMU up after "
                  f"{r['dest_up_s']:.2f} s, downtime {r['downtime_ms']} ms", flush=True)
    med = {}
    for tool, rs in results.items():
        totals = [r["total_s"] for r in rs]
        ups = [r["dest_up_s"] for r in rs]
        med[tool] = statistics.median(totals)
        rep.add({"case": "1 Gbit/s link", "tool": tool, "median_s": med[tool],
                 "min_s": min(totals), "max_s": max(totals),
                 "dest_up_s": statistics.median(ups), "dest_up_min_s": min(ups),
                 "dest_up_max_s": max(ups),
                 "storage_s": statistics.median(r["storage_s"] for r in rs),
                 "memory_s": statistics.median((r["memory_ms"] or 0) / 1000 for r in rs),
                 "tail_s": statistics.median(r["tail_s"] for r in rs),
                 "downtime_ms": statistics.median(r["downtime_ms"] or 0 for r in rs),
                 "pause_ms": statistics.median(r["pause_ms"] for r in rs),
                 "disk_mib": statistics.median(r["disk_bytes"] or 0 for r in rs) / (1 << 20),
                 "memory_mib": statistics.median(r["memory_bytes"] or 0 for r in rs)
                 / (1 << 20),
                 "rounds": rs})
    ratio = med[SSH] / med[HAND]
    busy = sum(1 for rs in results.values() for r in rs if r["foreign_qemus"])
    if busy:
        rep.notes.append(f"WARNING: other QEMU processes (not this bench's) ran during {busy} "
                         f"of {sum(map(len, results.values()))} migrations: the timings are "
                         f"noisier than on an idle machine (foreign_qemus in the JSON).")
    vs = {t: {k: statistics.median(r[k] for r in rs) for k in ("dest_up_s", "tail_s")}
          for t, rs in results.items()}
    rep.notes += [
        "Fairness: both contenders create the destination image and start the destination "
        "QEMU (vmferry's own command line) inside the destination namespace, and both are "
        "processes of their own, timed from launch to exit.  vmferry additionally pays for "
        "the ssh connection and starting `vmferry agent --stdio` (Python) on the "
        "destination host: that is the overhead measured here.  The hand-run sequence "
        "pays `ip netns exec` (a few ms) instead.  vmferry tls:// (if run) talks to an "
        "agent started before the rounds, so it pays neither ssh nor an agent start: "
        "the gap between it and ssh:// is their cost within a migration.",
        "dest. QEMU up after: launch to the destination QEMU answering QMP (its spec file "
        "written), as the harness sees it; resume to exit: the guest's RESUME on the "
        "destination to the process's exit (finish, confirm, source quit, ssh teardown).",
        "disk MiB moved: with QEMU's mirror (by hand) the job's offset, the whole virtual "
        "disk, its unwritten half sent as zero writes, not data; vmferry picks its storage "
        "engine as a user's migration does (native for this raw disk, which counts what it "
        "wrote: the data, not the fresh image's zeroes).",
        "storage s: vmferry from its perform phase to its first progress report with "
        "memory (so to the progress granularity); by hand from blockdev-mirror to "
        "BLOCK_JOB_READY.  memory s: QEMU's total-time of the memory migration.",
        f"Medians: vmferry ssh:// / by-hand total time {ratio:.3f}× ({ratio - 1:+.1%}); "
        f"destination QEMU up after {vs[SSH]['dest_up_s']:.2f} s vs "
        f"{vs[HAND]['dest_up_s']:.2f} s; resume to exit "
        f"{vs[SSH]['tail_s']:.2f} s vs {vs[HAND]['tail_s']:.2f} s.",
        "Start-up probes (median of %d, ms): " % PROBES
        + "; ".join(f"{k}: {v:.0f}" for k, v in probes.items()) + ".",
        _where_it_goes(med, probes),
        "Both tools' Python processes run with bytecode caches (PYTHONPYCACHEPREFIX in the "
        "bench's folder), as an installed vmferry has them.",
    ]
    print(f"\nremote: vmferry ssh:// {med[SSH]:.2f} s, by hand {med[HAND]:.2f} s "
          f"(medians): {ratio:.3f}×, overhead {ratio - 1:+.1%} "
          f"(target ≤ {TARGET_OVERHEAD:.0%})"
          + (f"; vmferry tls:// {med[TLS]:.2f} s ({med[TLS] / med[HAND] - 1:+.1%})"
             if TLS in med else ""))
    for tool, rs in results.items():
        for r in rs:
            assert r["total_s"] > 0
