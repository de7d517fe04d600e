"""Tunnelled migrations (issue 13, item 6): `vmferry migrate --tunnelled` over
ssh:// — the disks' NBD and the memory stream inside the ssh connection —
and over tls:// — through the agent's TLS port, relayed by vmferry's C
engine on both hosts — against a direct `--tls` migration to a tls:// agent
(the disks and memory on their own TLS connections), side by side in one run.

The destination host is a network namespace joined to this one by a veth
pair (tests/netlab.py) with a real sshd and a `vmferry agent --listen`
started in it before the rounds.  Two links: unshaped veth, and tc tbf
1 Gbit/s both directions.  The VM is bench_migrate's (1 GiB RAM, idle test
guest with 512 MiB filled, a raw disk half random data on tmpfs,
VMFERRY_BENCH_SCALE scales it), fresh on this host for every migration.
Rounds are interleaved: each round runs both links, and on each link both
contenders in an order that rotates.  All use the storage engine auto picks
(QEMU's mirror: --tls and --tunnelled keep it).

Per migration, from the --progress=json lines: throughput = the disk's data
plus the memory QEMU sent, over the time from the perform phase's first line
to the last (the two streams' share of the migration); wall seconds launch
to exit; and vmferry's CPU seconds (wait4: its own and its ssh client's, or
its relay thread's: the tunnel's source half) beside them, per GiB moved.
For the tls:// routes also the running agent's CPU over the migration (its
relay thread is the tunnel's destination half; the ssh route's sshd and
agent are not counted).

Targets (issue 13): tunnelled at least 0.8x direct's throughput on the
unshaped link, and within 5% of it on the shaped one (medians).

    python -m pytest -q bench/bench_tunnel.py -p no:cacheprovider -s
    VMFERRY_BENCH_QUICK=1 python -m pytest -q bench/bench_tunnel.py -s   # a smoke run
"""
from __future__ import annotations

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

QUICK = os.environ.get("VMFERRY_BENCH_QUICK") == "1"
if QUICK:
    os.environ.setdefault("VMFERRY_BENCH_SCALE", "0.25")   # read by bench_migrate

import report as rpt  # noqa: E402
from bench_migrate import DISK_SIZE  # noqa: E402
from bench_native_remote import NativeRemoteBench, _allocated  # noqa: E402
from bench_remote import (  # noqa: E402
    TLS, TLS_PORT, _foreign_qemus, _vmferry_version, lab_sshd, require_two_hosts,
)
from netlab import NetLab  # noqa: E402
from vmferry.vm.process import vm_status  # noqa: E402
from vmferry.vm.state import StateDir  # noqa: E402

ROUNDS = 1 if QUICK else int(os.environ.get("VMFERRY_BENCH_TUNNEL_ROUNDS")
                             or os.environ.get("VMFERRY_BENCH_ROUNDS") or "5")
LINKS = {"unshaped veth": None, "1 Gbit/s (tc)": "1gbit"}
DIRECT, TUNNEL, TUNNEL_TLS = "direct --tls", "tunnelled ssh://", "tunnelled tls://"
TOOLS = [DIRECT, TUNNEL, TUNNEL_TLS]
TARGET_UNSHAPED, TARGET_SHAPED = 0.8, 0.95
TIMEOUT = float(os.environ.get("VMFERRY_BENCH_TIMEOUT", "600"))
OUT_DIR = rpt.out_dir(QUICK)
GiB = 1 << 30


def _report() -> rpt.Report:
    cols = [
        rpt.Column("case", "link"),
        rpt.Column("tool", "route"),
        *rpt.spread_columns("wall s (median)"),
        rpt.Column("streams_s", "disks + memory s", rpt.fmt_num(2), "right"),
        rpt.Column("mib_s", "throughput MiB/s", rpt.fmt_num(1), "right"),
        rpt.Column("tool_cpu_s", "vmferry + ssh or relay CPU s", rpt.fmt_num(2), "right"),
        rpt.Column("cpu_per_gib", "vmferry + ssh or relay CPU s/GiB", rpt.fmt_num(3), "right"),
        rpt.Column("agent_cpu_per_gib", "tls:// agent CPU s/GiB", rpt.fmt_num(3), "right"),
        rpt.Column("moved_mib", "MiB moved", rpt.fmt_num(0), "right"),
        rpt.Column("ratio", "throughput × direct", rpt.fmt_num(2), "right"),
    ]
    chart = rpt.ChartSpec(group_key="case", series_key="tool", series_order=TOOLS,
                          panels=[rpt.Panel("mib_s", "MiB/s", "Throughput (disks + memory)"),
                                  rpt.Panel("cpu_per_gib", "CPU s per GiB",
                                            "vmferry + ssh client or relay CPU per GiB moved",
                                            value_fmt="{:.3f}")])
    return rpt.Report(name="tunnel", title="tunnelled over ssh and over tls vs direct --tls",
                      columns=cols, out_dir=OUT_DIR, chart=chart, finalize=_finalize)


def _finalize(rep: rpt.Report) -> list[str]:
    lines = []
    for case, target in zip(LINKS, (TARGET_UNSHAPED, TARGET_SHAPED)):
        by = {r["tool"]: r for r in rep.records if r["case"] == case}
        if set(by) != set(TOOLS):
            continue
        for r in by.values():
            r["ratio"] = r["mib_s"] / by[DIRECT]["mib_s"]
        for tool in (TUNNEL, TUNNEL_TLS):
            t = by[tool]["ratio"]
            lines.append(f"- {case}: {tool} at least {target}× direct's throughput: "
                         f"{by[tool]['mib_s']:.1f} vs {by[DIRECT]['mib_s']:.1f} MiB/s, "
                         f"{t:.2f}× → **{'PASS' if t >= target else 'FAIL'}**")
    return lines


class TunnelBench(NativeRemoteBench):
    """bench_remote's VM, a tls:// agent and an sshd in the namespace."""

    def migrate_one(self, tool: str, i: int, verify: bool) -> dict[str, Any]:
        a, _, dst, _ = self.fresh(i)
        agent_cpu0 = None
        if tool in (DIRECT, TUNNEL_TLS):
            b = self.tls_state
            assert b is not None and self.tls_agent is not None
            assert self.tls_agent.poll() is None, "the tls:// agent exited"
            dest = [f"tls://{self.lab.dest_ip}:{TLS_PORT}", "--pki", str(self.pki.dir),
                    "--tls" if tool == DIRECT else "--tunnelled"]
            agent_cpu0 = _cpu_of(self.tls_agent.pid)
        else:
            b = self.state_b(StateDir(self.root / f"Bssh{i}"))
            dest = [self.ssh_uri(b), "--tunnelled"]
        argv = [sys.executable, "-m", "vmferry", "--state-dir", str(a.path), "migrate", "bench",
                *dest, "--disk-map", f"{self.src_disk}={dst}", "--create-disks",
                "--progress=json"]
        load, foreign = os.getloadavg()[0], _foreign_qemus(self.root)
        err_path = self.root / f"migrate{i}.err"
        lines: list[tuple[float, dict]] = []
        try:
            with open(err_path, "wb") as err:
                t0 = time.monotonic()
                proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err,
                                        stdin=subprocess.DEVNULL, env=self.env)
                killer = threading.Timer(TIMEOUT, proc.kill)
                killer.start()
                try:
                    for raw in proc.stdout:
                        lines.append((time.monotonic() - t0, json.loads(raw)))
                    _, status, usage = os.wait4(proc.pid, 0)
                    proc.returncode = os.waitstatus_to_exitcode(status)
                finally:
                    killer.cancel()
                wall = time.monotonic() - t0
            agent_cpu = (_cpu_of(self.tls_agent.pid) - agent_cpu0
                         if agent_cpu0 is not None and self.tls_agent else None)
            if proc.returncode != 0:
                raise RuntimeError(f"{tool} failed (exit {proc.returncode}): "
                                   f"{err_path.read_text()[-2000:]}")
            st = vm_status(b, "bench")
            assert st.state == "running", f"{tool}: destination VM is {st.state}"
            foreign = max(foreign, _foreign_qemus(self.root))
        finally:
            self.cleanup_vms(a, b)
            b.remove("bench")
        try:
            if verify:
                cp = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw",
                                     str(self.src_disk), str(dst)], capture_output=True,
                                    text=True, timeout=300)
                assert cp.returncode == 0, f"{tool}: images differ: {cp.stdout}{cp.stderr}"
        finally:
            dst.unlink(missing_ok=True)
        done = lines[-1][1]
        start = next(t for t, line in lines if line["phase"] == "perform")
        streams = lines[-1][0] - start
        moved = _allocated(self.src_disk) + (done.get("memory_processed") or 0)
        cpu = usage.ru_utime + usage.ru_stime     # vmferry and the ssh it waited for
        return {"wall_s": wall, "streams_s": streams, "moved": moved,
                "mib_s": moved / (1 << 20) / streams, "tool_cpu_s": cpu,
                "cpu_per_gib": cpu / (moved / GiB), "agent_cpu_s": agent_cpu,
                "agent_cpu_per_gib": agent_cpu / (moved / GiB) if agent_cpu is not None
                else None, "engine": done.get("storage_engine"),
                "tls": done.get("tls"), "load1": load, "foreign_qemus": foreign,
                "downtime_ms": done.get("downtime_ms")}


def _cpu_of(pid: int) -> float:
    """PID's own user + system CPU seconds so far (not its children's: the
    agent's QEMUs are not the relay)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture(scope="module")
def tbench():
    require_two_hosts()
    root = Path(tempfile.mkdtemp(prefix="vmft-", dir="/dev/shm"))
    lab = sshd = None
    try:
        lab = NetLab()
        sshd = lab_sshd(lab, root)
        tb = TunnelBench(root, lab, sshd)
        tb.start_tls_agent()
        yield tb
    finally:
        if sshd is not None:
            sshd.stop()
        if lab is not None:
            lab.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.timeout(0)
def test_tunnelled_vs_direct_tls(tbench: TunnelBench) -> None:
    rep = rpt.get_report("tunnel", _report)
    rep.meta["machine"] = rpt.machine_info({"qemu": ["qemu-system-x86_64", "--version"],
                                            "ssh": ["ssh", "-V"]})
    rep.meta["config"] = {
        "vmferry commit": _vmferry_version(),
        "VM": "1 GiB RAM, idle test guest (512 MiB filled)",
        "disk": f"{DISK_SIZE >> 20} MiB raw on tmpfs, half random data",
        "links": "veth to a network namespace: unshaped, and tc tbf 1gbit both directions",
        DIRECT: "vmferry migrate bench tls://DEST:PORT --pki DIR --tls --disk-map SRC=DST "
                "--create-disks (an agent --listen started before the rounds)",
        TUNNEL: "vmferry migrate bench 'ssh://root@DEST/B?keyfile=..' --tunnelled "
                "--disk-map SRC=DST --create-disks",
        TUNNEL_TLS: "vmferry migrate bench tls://DEST:PORT --pki DIR --tunnelled "
                    "--disk-map SRC=DST --create-disks (the same running agent)",
        "rounds": ROUNDS, "order": "per round both links; the routes rotate which goes first",
        "quick": QUICK,
    }
    results: dict[tuple[str, str], list[dict]] = {(c, t): [] for c in LINKS for t in TOOLS}
    n = 0
    for i in range(ROUNDS):
        for case, rate in LINKS.items():
            if rate:
                tbench.lab.shape(rate)
            else:
                tbench.lab.unshape()
            for tool in TOOLS[i % len(TOOLS):] + TOOLS[:i % len(TOOLS)]:
                r = tbench.migrate_one(tool, n, verify=(i == 0))
                n += 1
                results[(case, tool)].append(r)
                print(f"\nround {i + 1} {case} {tool}: {r['mib_s']:.1f} MiB/s over "
                      f"{r['streams_s']:.2f} s, wall {r['wall_s']:.2f} s, CPU "
                      f"{r['tool_cpu_s']:.2f} s, engine {r['engine']}, load {r['load1']:.2f}",
                      flush=True)
    tbench.lab.unshape()
    for (case, tool), rs in results.items():
        med = lambda k: statistics.median(r[k] for r in rs)  # noqa: E731
        walls = [r["wall_s"] for r in rs]
        rep.add({"case": case, "tool": tool, "median_s": statistics.median(walls),
                 "min_s": min(walls), "max_s": max(walls), "streams_s": med("streams_s"),
                 "mib_s": med("mib_s"), "tool_cpu_s": med("tool_cpu_s"),
                 "cpu_per_gib": med("cpu_per_gib"), "moved_mib": med("moved") / (1 << 20),
                 "agent_cpu_per_gib": (statistics.median(r["agent_cpu_per_gib"] for r in rs)
                                       if rs and rs[0]["agent_cpu_per_gib"] is not None
                                       else None),
                 "rounds": rs})
    every = [r for rs in results.values() for r in rs]
    loads = [r["load1"] for r in every]
    busy = sum(1 for r in every if r["foreign_qemus"])
    rep.notes.append(f"Load average (1 min) before each migration: median "
                     f"{statistics.median(loads):.2f}, max {max(loads):.2f} on "
                     f"{os.cpu_count()} CPUs (the bench contributes about 1).")
    if busy:
        rep.notes.append(f"WARNING: other QEMU processes ran during {busy} of {len(every)} "
                         f"migrations: the machine was shared, timings are noisy.")
    if QUICK:
        rep.notes.append("QUICK run (one round, small disk): a smoke test, not a result.")
    rep.notes += [
        "throughput: the source disk's allocated data plus the memory QEMU sent, over the "
        "time from the perform phase's first progress line to the last: the part of the "
        "migration both streams take.  wall: launch to exit (both pay a connection: a TLS "
        "handshake to a running agent, or ssh and the agent's start).",
        "CPU: vmferry's own and its ssh client's (wait4 counts the children it waited "
        "for), with its relay thread over tls://: the source half of the tunnel; the "
        "destination's sshd is not counted.  tls:// agent CPU: the running agent's own "
        "(not its QEMUs'), whose relay thread is the tunnel's destination half over "
        "tls://.  QEMU's own TLS work (direct) is in neither.",
    ]
    for r in every:
        assert r["mib_s"] > 0


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-p", "no:cacheprovider", "-s", *sys.argv[1:]]))
