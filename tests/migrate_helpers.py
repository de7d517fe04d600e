"""A two-"host" lab for live-migration tests: state directories A (source) and B
(destination) in one short private folder, the self-built test guest, the vmferry
CLI run as a real subprocess, and QMP on the VMs' CLI sockets to look inside.

Accelerator: KVM when /dev/kvm opens read-write, else TCG; VMFERRY_TEST_ACCEL=tcg
forces TCG on a KVM host.  vmferry picks the accelerator itself (the destination
QEMU of a migration is started by `vmferry migrate` with detect_accel()), so TCG is
forced through VMFERRY_QEMU: a wrapper that runs the real QEMU with "-accel tcg"
whatever -accel it was given.  Under TCG the guest also flushes its TLB every ms
(QEMU < 9.0 loses dirty pages otherwise, see vmferry.guest.guest_cmdline).
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import cli
from disk_data import MiB, make_image  # noqa: F401  (the tests' one image maker)
from vmferry.guest import check_serial_log, guest_cmdline
from vmferry.vm import StateDir, qmp_call, stop_all
from vmferry.vm.qemu import detect_accel
from vmferry.vm.state import pid_alive

QEMU = "qemu-system-x86_64"
KVM = detect_accel() == "kvm"
ACCEL = os.environ.get("VMFERRY_TEST_ACCEL") or ("kvm" if KVM else "tcg")
TCG = ACCEL == "tcg"
# TCG boots, dirties and copies more slowly: scale every wait
SLOW = 4.0 if TCG else 1.0

_TCG_WRAPPER = """#!/bin/sh
# test wrapper (VMFERRY_TEST_ACCEL=tcg): the real QEMU, always with -accel tcg
for a do
  shift
  if [ "$prev" = "-accel" ]; then set -- "$@" tcg; else set -- "$@" "$a"; fi
  prev=$a
done
exec {qemu} "$@"
"""


def qemu_pids(marker: str | os.PathLike) -> list[int]:
    """Live QEMU processes whose command line mentions MARKER (a test's folder)."""
    pids = []
    needle = os.fsencode(marker)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path("/proc", entry, "cmdline").read_bytes()
            state = Path("/proc", entry, "stat").read_bytes().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in (b"Z", b"X") and needle in cmdline and b"qemu-system" in cmdline:
            pids.append(int(entry))
    return pids


def sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fill_image(path: Path, size_mib: int, seed: int = 1, *, holes: bool = False) -> Path:
    """A raw image of SIZE_MIB MiB whose every MiB differs (a random MiB with the
    chunk's index and the seed in front), cheap to make even for hundreds of MiB.
    HOLES: every third MiB is left unwritten (sparse)."""
    base = bytearray(os.urandom(MiB))
    with open(path, "wb") as f:
        f.truncate(size_mib * MiB)
        for i in range(size_mib):
            if holes and i % 3 == 1:
                continue
            base[:16] = i.to_bytes(8, "little") + seed.to_bytes(8, "little")
            f.seek(i * MiB)
            f.write(base)
    return path


def images_identical(a: Path, b: Path, fmt_a: str, fmt_b: Optional[str] = None) -> str:
    """'' when qemu-img compare finds the guest-visible contents equal, else its output."""
    cp = subprocess.run(["qemu-img", "compare", "-f", fmt_a, "-F", fmt_b or fmt_a,
                         str(a), str(b)], capture_output=True, text=True, timeout=120)
    return "" if cp.returncode == 0 else f"exit {cp.returncode}: {cp.stdout}{cp.stderr}"


class Lab:
    """One test's two state directories, its images, VMs and vmferry processes.
    cleanup() (the fixture's teardown) stops everything whatever the test did."""

    def __init__(self, root: Path, kernel: Path, qboot: Optional[Path]) -> None:
        self.root = root
        self.A = root / "A"
        self.B = root / "B"
        self.kernel = kernel
        self.qboot = qboot
        self.env = dict(os.environ)
        self.env.pop("VMFERRY_STATE_DIR", None)
        if TCG:
            wrapper = root / "qemu-system-x86_64"
            wrapper.write_text(_TCG_WRAPPER.format(qemu=shutil.which(QEMU)))
            wrapper.chmod(0o755)
            self.env["VMFERRY_QEMU"] = str(wrapper)
        self.procs: list[subprocess.Popen] = []

    # ---------------------------------------------------------------- specs, VMs

    def cmdline(self, mem: str, dirty: str = "fast", **kw: Any) -> str:
        return guest_cmdline(mem=mem, dirty=dirty, tlbflush=TCG, **kw)

    def spec(self, name: str = "web1", *, disk: Optional[Path] = None, fmt: str = "raw",
             memory: str = "128M", mem: str = "64M", dirty: str = "fast",
             serial: Optional[Path] = None, file: Optional[Path] = None,
             **guest: Any) -> Path:
        """Write a spec for the test guest; returns its path."""
        serial = serial or self.root / f"{name}-src.log"
        lines = [f'name = "{name}"', f'memory = "{memory}"', f'kernel = "{self.kernel}"',
                 f'cmdline = "{self.cmdline(mem, dirty, **guest)}"', f'serial = "{serial}"']
        if self.qboot:
            # qboot: the guest runs ~0.3 s after start instead of seconds with SeaBIOS
            lines.append(f'extra_args = ["-bios", "{self.qboot}"]')
        if disk is not None:
            lines += ["", "[[disks]]", f'path = "{disk}"', f'format = "{fmt}"']
        path = file or self.root / f"{name}.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def run_vm(self, spec: Path, *, wait_pass: int = 1) -> int:
        """`vmferry run` on A; waits for guest pass WAIT_PASS (tick, in idle mode)."""
        self.ok(self.vmferry("run", spec))
        name = self.spec_name(spec)
        assert self.status(name)["accel"] == ACCEL
        serial = self.serial_of(spec)
        self.wait_progress(serial, wait_pass, 60 * SLOW)
        return StateDir(self.A).read_pid(name)

    @staticmethod
    def spec_name(spec: Path) -> str:
        for line in spec.read_text().splitlines():
            if line.startswith("name = "):
                return line.split('"')[1]
        raise AssertionError(f"no name in {spec}")

    @staticmethod
    def serial_of(spec: Path) -> Path:
        for line in spec.read_text().splitlines():
            if line.startswith("serial = "):
                return Path(line.split('"')[1])
        raise AssertionError(f"no serial in {spec}")

    # ---------------------------------------------------------------- the CLI

    def vmferry(self, *args: Any, state: Optional[Path] = None,
                timeout: float = 120) -> subprocess.CompletedProcess:
        return cli.run_vmferry("--state-dir", state or self.A, *args, timeout=timeout * SLOW,
                               environ=self.env)

    def start(self, *args: Any, state: Optional[Path] = None) -> subprocess.Popen:
        """A vmferry command in the background (killed at cleanup if still running)."""
        p = cli.popen_vmferry("--state-dir", state or self.A, *args, environ=self.env)
        self.procs.append(p)
        return p

    def migrate(self, *args: Any, name: str = "web1", timeout: float = 120
                ) -> subprocess.CompletedProcess:
        return self.vmferry("migrate", name, f"local://{self.B}", *args, timeout=timeout)

    def start_migrate(self, *args: Any, name: str = "web1") -> subprocess.Popen:
        return self.start("migrate", name, f"local://{self.B}", *args)

    @staticmethod
    def finish(p: subprocess.Popen, timeout: float = 120) -> subprocess.CompletedProcess:
        out, err = p.communicate(timeout=timeout * SLOW)
        return subprocess.CompletedProcess(p.args, p.returncode, out, err)

    @staticmethod
    def ok(cp: subprocess.CompletedProcess) -> str:
        assert cp.returncode == 0, (f"{' '.join(map(str, cp.args[2:]))}: exit "
                                    f"{cp.returncode}\nstdout: {cp.stdout}\nstderr: {cp.stderr}")
        assert "Traceback" not in cp.stderr, cp.stderr
        return cp.stdout

    @staticmethod
    def one_error(cp: subprocess.CompletedProcess, code: Optional[int] = None,
                  prefix: str = "vmferry: error: ") -> str:
        """A failed run: non-zero exit (CODE if given), one line on stderr: PREFIX..."""
        assert cp.returncode != 0, f"succeeded: {cp.stdout}"
        if code is not None:
            assert cp.returncode == code, f"exit {cp.returncode}, expected {code}: {cp.stderr}"
        return cli.assert_one_error_line(cp.stderr, prefix)

    def kept_copy(self, name: str = "web1") -> dict[str, Any]:
        """The source's record of a partial copy a failed migration kept
        (presync.json), or {}."""
        try:
            return json.loads((self.A / name / "presync.json").read_text())
        except FileNotFoundError:
            return {}

    def status(self, name: str = "web1", state: Optional[Path] = None) -> dict[str, Any]:
        return json.loads(self.ok(self.vmferry("status", name, "--json", state=state)))

    def jobinfo(self, name: str = "web1") -> dict[str, Any]:
        return json.loads(self.ok(self.vmferry("jobinfo", name, "--json")))

    # ---------------------------------------------------------------- QMP, files

    def qmp(self, cmd: str, args: Optional[dict] = None, *, name: str = "web1",
            state: Optional[Path] = None) -> Any:
        """CMD on the VM's CLI socket (the orchestrator holds qmp.sock)."""
        return qmp_call(StateDir(state or self.A).cli_socket(name), cmd, args, timeout=10)

    def job_file(self, name: str = "web1") -> dict[str, Any]:
        try:
            return json.loads((self.A / name / "job.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def dest_pid(self, name: str = "web1") -> Optional[int]:
        return StateDir(self.B).read_pid(name)

    def wait_for(self, what: str, pred: Callable[[], Any], timeout: float,
                 proc: Optional[subprocess.Popen] = None, poll: float = 0.02) -> Any:
        """Poll PRED until it returns something true; fail if PROC ends first."""
        return cli.wait_for(pred, timeout * SLOW, what, poll, proc)

    @staticmethod
    def progress(serial: Path) -> tuple[int, list[str], str]:
        """(last pass or heartbeat, problems, text) of a serial log."""
        try:
            text = serial.read_text(errors="replace")
        except FileNotFoundError:
            text = ""
        last, problems = check_serial_log(text)
        if "dirty=idle" in text and last == 0:
            ticks = [l for l in text.split("\n")[:-1] if " tick " in l]
            last = int(ticks[-1].split(" tick ")[1].split()[0]) if ticks else 0
        return last, problems, text

    def wait_progress(self, serial: Path, n: int, timeout: float,
                      prefix_text: str = "") -> int:
        """Wait until SERIAL (after PREFIX_TEXT, for a destination's own log) shows
        pass (or heartbeat) N; returns the last one."""
        deadline = time.monotonic() + timeout * SLOW
        while True:
            last, _, text = self.progress(serial)
            if prefix_text:
                last = check_serial_log(prefix_text + text)[0]
            if last >= n:
                return last
            if time.monotonic() > deadline:
                raise AssertionError(f"guest did not reach {n} in {serial} within "
                                     f"{timeout * SLOW:g} s (at {last}); tail: {text[-300:]!r}")
            time.sleep(0.05)

    def assert_goes_on(self, serial: Path, passes: int = 2) -> None:
        """The guest logging to SERIAL runs on, its memory intact: no problem
        in its log so far, and PASSES more passes within 30 s."""
        last, problems, _ = self.progress(serial)
        assert problems == [], problems
        self.wait_progress(serial, last + passes, 30)

    # ---------------------------------------------------------------- checks

    def assert_source_intact(self, name: str = "web1", *, serial: Path,
                             disk: Optional[Path] = None, disk_hash: str = "",
                             dest_disk: Optional[Path] = None,
                             migration: tuple = (None, "none", "failed", "cancelled")) -> None:
        """What every failed or cancelled migration must leave: the source guest
        running on, its disk untouched, no vmferry leftovers in the source QEMU,
        nothing left on the destination."""
        st = self.status(name)
        assert st["state"] == "running", st
        assert self.qmp("query-status")["status"] == "running"
        mig = self.qmp("query-migrate")
        assert mig.get("status") in migration, mig
        jobs = self.qmp("query-jobs")
        assert [j for j in jobs if j["id"].startswith("vmferry")] == [], jobs
        # what a native copy got so far may be kept, recorded on both sides
        # with the bitmap of every write since; nothing else stays
        kept = self.kept_copy(name)
        bitmaps = [b["name"] for n in self.qmp("query-named-block-nodes", {"flat": True})
                   for b in n.get("dirty-bitmaps", []) if b["name"].startswith("vmferry")]
        if kept:
            assert bitmaps == ["vmferry-presync"] * len(kept["disks"]), bitmaps
            for rec in kept["disks"].values():
                # one the destination confirmed is there; a lost one may not be
                assert rec.get("unconfirmed") or \
                    Path(rec["dest_path"] + ".vmferry-presync.json").exists(), rec
        else:
            assert bitmaps == [], f"vmferry bitmaps left on the source disks: {bitmaps}"
        nodes = self.qmp("query-named-block-nodes", {"flat": True})
        assert [n["node-name"] for n in nodes if n["node-name"].startswith("vmferry")] == []
        assert self.qmp("query-block-exports") == []
        # no destination QEMU, no destination VM folder (with its NBD socket)
        assert qemu_pids(self.B) == [], f"destination QEMU left: {qemu_pids(self.B)}"
        assert not (self.B / name).exists(), list((self.B / name).iterdir())
        if dest_disk is not None and not kept:
            assert not dest_disk.exists(), f"{dest_disk} created by --create-disks was kept"
        if disk is not None:
            assert sha256(disk) == disk_hash, "the source disk changed"
        # the guest goes on, with intact memory
        last, problems, text = self.progress(serial)
        assert problems == [], problems
        self.wait_progress(serial, last + 2, 30)
        assert self.progress(serial)[1] == []

    def cleanup(self) -> list[int]:
        """Kill our vmferry processes, stop every VM of A and B, kill any QEMU that
        mentions this lab's folder; returns the pids that had to be killed."""
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            try:
                p.communicate(timeout=10)
            except (subprocess.TimeoutExpired, ValueError):
                pass
        stop_all(StateDir(self.A), StateDir(self.B))
        killed = qemu_pids(self.root)
        for pid in killed:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while any(pid_alive(p) for p in killed) and time.monotonic() < deadline:
            time.sleep(0.05)
        return killed


async def _write_loop(sock: Path, device: str, writes: list, stop: Callable[[], bool],
                      size: int, seed: int) -> dict[str, int]:
    """See Lab.write_while_mirroring."""
    import random
    from vmferry.vm import qmp_session
    rnd = random.Random(seed)
    counts = {"before": 0, "bulk": 0, "ready": 0}
    async with qmp_session(sock, timeout=10) as q:
        while not stop():
            mig = await q.execute("query-migrate", timeout=10)
            if mig.get("status") not in (None, "none"):
                break              # memory migration started: the guest could pause any time
            jobs = {j["id"]: j for j in await q.execute("query-jobs", timeout=10)}
            job = jobs.get("vmferry-mirror-disk0")
            phase = "before" if job is None else (
                "bulk" if job["status"] == "running" else
                "ready" if job["status"] == "ready" else None)
            if phase is None:
                await asyncio.sleep(0.005)
                continue
            length = rnd.choice((4096, 65536, 512 * 1024, MiB))
            offset = rnd.randrange(0, size - length, 4096)
            pattern = rnd.randrange(1, 256)
            out = await q.execute("human-monitor-command", {
                "command-line": f'qemu-io -d {device} "write -P {pattern:#x} {offset} {length}"'},
                timeout=10)
            assert out == "", f"qemu-io: {out}"
            writes.append((offset, length, pattern))
            counts[phase] += 1
    return counts


def write_while_mirroring(sock: Path, device: str, writes: list,
                          stop: Callable[[], bool], size: int, seed: int = 7) -> dict[str, int]:
    """Write random patterns to DEVICE through the source QEMU's HMP qemu-io while
    its mirror runs, until memory migration starts (from then on the source may pause
    for switchover at any moment, and a write no guest could make would land after
    it) or STOP() says so.  Appends (offset, length, pattern) to WRITES; returns how
    many writes went in before the mirror, during its bulk copy and once ready."""
    return asyncio.run(_write_loop(sock, device, writes, stop, size, seed))
