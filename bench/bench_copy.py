"""Copy benchmark: vmferry vs nbdcopy vs qemu-img, side by side, same servers.

Run::

    python -m pytest bench/bench_copy.py -p no:cacheprovider
    # or: python bench/bench_copy.py   (same thing; extra args go to pytest)

Cases (sizes multiplied by VMFERRY_BENCH_SCALE):

(a) ``a-nbd-nbd``     2 GiB of random data, qemu-nbd -> qemu-nbd, both raw
                      images on tmpfs, Unix sockets.       [vmferry, nbdcopy, qemu-img]
(b) ``b-sparse-mem``  8 GiB nbdkit sparse-random -> nbdkit memory.
                                                           [vmferry, nbdcopy, qemu-img]
(c) ``c-nbd-null``    read ceiling: (a)'s source -> ``null:``   [vmferry, nbdcopy]
    ``c-sparse-null`` read ceiling: (b)'s source -> ``null:``   [vmferry, nbdcopy]

Every run starts fresh servers (source and destination), so every tool sees
exactly the same state: (a) a new destination file (preallocated with
fallocate by default, see VMFERRY_BENCH_DST_PREALLOC), (b) a new, empty
nbdkit memory server.  Server start-up, destination creation and verification
are outside the timed region; the timed region is spawning the tool until it
has been reaped.  Each tool is spawned by a small helper process (see
Spawner) and reaped with os.wait4(), whose rusage gives the tool's peak RSS
(ru_maxrss) and CPU time.

Rounds are interleaved: the first test of a case runs the whole case
(run_case), each round running every tool once with the order rotated from
round to round.  On this kind of machine the timings drift by 10-20 % over a
minute (tmpfs page recycling, the host, other load); running all rounds of one
tool and then all rounds of the next made nbdcopy look 1.15-1.23x slower than
itself.  Each case x tool test then hands its tool's measured rounds to
pytest-benchmark through benchmark.pedantic() with a clock that replays them,
so pytest-benchmark's table and --benchmark-json show the interleaved numbers.

After every round the destination is checked against the source (cmp for (a),
nbdcopy into a verifying sparse-random server for (b)); a tool that exits 0
but copies wrongly fails its test.

Environment:

VMFERRY_BENCH_ROUNDS        measured rounds per case and tool (default 5)
VMFERRY_BENCH_WARMUP        unmeasured warm-up rounds before them (default 1)
VMFERRY_BENCH_SCALE         size multiplier, e.g. 0.02 for a smoke run (default 1)
VMFERRY_BENCH_VMFERRY_CMD   command replacing ``python -m vmferry copy``
                            (shell-split; SRC and DST are appended), e.g. nbdcopy
VMFERRY_BENCH_TMPDIR        where images/sockets go (default /dev/shm)
VMFERRY_BENCH_TIMEOUT       seconds before a tool run is killed (default 900)
VMFERRY_BENCH_VERIFY        1 (default) verify every round, 0 never
VMFERRY_BENCH_DST_PREALLOC  1 (default) fallocate (a)'s destination, 0 sparse file
VMFERRY_BENCH_QEMU_NBD_SHARED  qemu-nbd -e value (default 4; >1 => multi-conn)
VMFERRY_BENCH_SPARSE_PERCENT   sparse-random percent= (default 10)
VMFERRY_BENCH_OUT           results directory (default bench/results)

Results: bench/results/copy.{md,json,png}, written at the end of the session
by bench/conftest.py (via bench/report.py), plus pytest-benchmark's table.
"""

from __future__ import annotations

import atexit
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report as rpt  # noqa: E402  (bench/report.py)

GiB = 1 << 30
MiB = 1 << 20


# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------

def _env_int(name: str, default: int, minimum: int = 0) -> int:
    v = os.environ.get(name, "").strip()
    if not v:
        return default
    n = int(v)
    if n < minimum:
        raise ValueError(f"{name}={v}: must be >= {minimum}")
    return n


def _env_float(name: str, default: float) -> float:
    v = os.environ.get(name, "").strip()
    return float(v) if v else default


def _env_bool(name: str, default: bool) -> bool:
    v = os.environ.get(name, "").strip().lower()
    if not v:
        return default
    return v not in ("0", "no", "false", "off")


ROUNDS = _env_int("VMFERRY_BENCH_ROUNDS", 5, minimum=1)
WARMUP = _env_int("VMFERRY_BENCH_WARMUP", 1)
SCALE = _env_float("VMFERRY_BENCH_SCALE", 1.0)
TMPDIR = os.environ.get("VMFERRY_BENCH_TMPDIR") or "/dev/shm"
TIMEOUT = _env_float("VMFERRY_BENCH_TIMEOUT", 900.0)
VERIFY = _env_bool("VMFERRY_BENCH_VERIFY", True)
DST_PREALLOC = _env_bool("VMFERRY_BENCH_DST_PREALLOC", True)
QEMU_NBD_SHARED = _env_int("VMFERRY_BENCH_QEMU_NBD_SHARED", 4, minimum=1)
SPARSE_PERCENT = _env_int("VMFERRY_BENCH_SPARSE_PERCENT", 10)
SPARSE_SEED = 20240229
OUT_DIR = Path(os.environ.get("VMFERRY_BENCH_OUT") or rpt.DEFAULT_OUT_DIR)

_VMFERRY_OVERRIDE = os.environ.get("VMFERRY_BENCH_VMFERRY_CMD", "").strip()
VMFERRY_CMD = (shlex.split(_VMFERRY_OVERRIDE) if _VMFERRY_OVERRIDE
               else [sys.executable, "-m", "vmferry", "copy"])


def _scaled(nbytes: int) -> int:
    """nbytes * SCALE, rounded to a whole MiB (at least 1 MiB)."""
    return max(MiB, int(round(nbytes * SCALE / MiB)) * MiB)


SIZE_A = _scaled(2 * GiB)     # (a) and (c) qemu-nbd source
SIZE_B = _scaled(8 * GiB)     # (b) and (c) sparse-random source


def human(n: int) -> str:
    if n % GiB == 0:
        return f"{n // GiB} GiB"
    if n >= GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / MiB:.0f} MiB"


# --------------------------------------------------------------------------
# Tools
# --------------------------------------------------------------------------

QEMU_IMG_CONVERT = ["qemu-img", "convert", "-n", "-W", "-m", "16", "-f", "raw", "-O", "raw"]


def tool_argv(tool: str, src: str, dst: str) -> list[str]:
    if tool == "vmferry":
        return [*VMFERRY_CMD, src, dst]
    if tool == "nbdcopy":
        return ["nbdcopy", src, dst]
    if tool == "qemu-img":
        return [*QEMU_IMG_CONVERT, src, dst]
    raise ValueError(tool)


TOOL_ORDER = ["vmferry", "nbdcopy", "qemu-img"]


def tool_label(tool: str) -> str:
    return "vmferry*" if tool == "vmferry" and _VMFERRY_OVERRIDE else tool


class ToolError(Exception):
    """The tool failed: bad exit status, timeout, or a wrong copy."""


@dataclass
class RunResult:
    seconds: float        # fork/exec .. reaped, measured by the spawner
    returncode: int
    maxrss_kib: int
    utime: float
    stime: float
    stderr_tail: str
    server_cpu: float = 0.0   # CPU s the NBD servers used during the run
    other_cpu: float = 0.0    # CPU s used by anything else (background load)


def _pdeathsig() -> None:
    """preexec_fn: the child gets SIGTERM if the benchmark dies."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _tail(path: Path, nbytes: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - nbytes))
            return f.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""


# Why a separate spawner process: Linux folds the hiwater RSS of the address
# space a process exec()s *from* into its ru_maxrss (exec_mmap ->
# setmax_mm_hiwater_rss), and fork/vfork children of pytest start from
# pytest's ~40+ MiB address space.  So every tool would report >= pytest's RSS.
# Tools are therefore started by this small long-lived process (python -S -I,
# ~10 MiB), which posix_spawn()s the tool, reaps it with os.wait4() and sends
# back the child's rusage.  ru_maxrss = max(tool's own peak, spawner's ~10 MiB
# floor); the floor is measured (by spawning `true`) and recorded.
_SPAWNER_CODE = r"""
import json, os, select, signal, sys, time
child = [0]
def _kill(pid):
    # the tool leads its own process group: take its helpers down too
    try: os.killpg(pid, signal.SIGKILL)
    except OSError: pass
def _term(signum, frame):
    if child[0]:
        _kill(child[0])
    os._exit(1)
signal.signal(signal.SIGTERM, _term)
signal.signal(signal.SIGINT, _term)
inp, out = sys.stdin.buffer, sys.stdout.buffer
for line in inp:
    req = json.loads(line)
    fa = [(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
          (os.POSIX_SPAWN_OPEN, 1, req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644),
          (os.POSIX_SPAWN_OPEN, 2, req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)]
    rep = {}
    t0 = time.perf_counter()
    try:
        pid = os.posix_spawnp(req["argv"][0], req["argv"], os.environ, file_actions=fa,
                              setpgroup=0,
                              setsigdef=(signal.SIGTERM, signal.SIGINT, signal.SIGPIPE))
    except OSError as e:
        rep = {"error": "%s: %s" % (req["argv"][0], e)}
    else:
        child[0] = pid
        fd = os.pidfd_open(pid)
        p = select.poll()
        p.register(fd, select.POLLIN)
        if not p.poll(req["timeout"] * 1000):
            _kill(pid)
            rep["timeout"] = True
        _, status, ru = os.wait4(pid, 0)
        rep.update(elapsed=time.perf_counter() - t0,
                   returncode=os.waitstatus_to_exitcode(status),
                   maxrss_kib=ru.ru_maxrss, utime=ru.ru_utime, stime=ru.ru_stime)
        child[0] = 0
        os.close(fd)
    out.write(json.dumps(rep).encode() + b"\n")
    out.flush()
"""


class Spawner:
    """Runs tools from a small helper process so ru_maxrss is the tool's own."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-S", "-I", "-c", _SPAWNER_CODE],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     preexec_fn=_pdeathsig)
        self.floor_kib: int | None = None

    def run(self, argv: list[str], stdout: Path, stderr: Path, timeout: float) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        req = {"argv": list(argv), "stdout": str(stdout), "stderr": str(stderr),
               "timeout": timeout}
        try:
            self.proc.stdin.write(json.dumps(req).encode() + b"\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BaseException:
            # e.g. KeyboardInterrupt: SIGTERM makes the spawner kill the tool
            self.proc.terminate()
            self.proc.wait()
            raise
        if not line:
            raise RuntimeError(f"tool spawner died (exit {self.proc.poll()})")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # type: ignore[union-attr]
                self.proc.wait(10)
            except Exception:
                self.proc.kill()
                self.proc.wait()


_SPAWNER: Spawner | None = None


def spawner() -> Spawner:
    global _SPAWNER
    if _SPAWNER is None or _SPAWNER.proc.poll() is not None:
        _SPAWNER = Spawner()
        atexit.register(_SPAWNER.close)
        with tempfile.TemporaryDirectory() as d:
            r = _SPAWNER.run(["true"], Path(d, "o"), Path(d, "e"), 30)
        _SPAWNER.floor_kib = r.get("maxrss_kib")
    return _SPAWNER


def run_tool(argv: list[str], logdir: Path, timeout: float = TIMEOUT) -> RunResult:
    """Run argv to completion: wall time, exit code and the child's rusage."""
    out = logdir / "tool.stdout"
    err = logdir / "tool.stderr"
    rep = spawner().run(argv, out, err, timeout)
    if "error" in rep:
        raise ToolError(f"cannot start {shlex.join(argv)}: {rep['error']}")
    if rep.get("timeout"):
        raise ToolError(
            f"{shlex.join(argv)} did not finish within {timeout:.0f} s "
            f"(VMFERRY_BENCH_TIMEOUT); killed. stderr:\n{_tail(err)}\n"
            f"(note: a qemu-nbd server accepts at most -e {QEMU_NBD_SHARED} "
            "(VMFERRY_BENCH_QEMU_NBD_SHARED) connections at a time; a client opening "
            "more waits forever)")
    rc = rep["returncode"]
    return RunResult(rep["elapsed"], rc, rep["maxrss_kib"], rep["utime"], rep["stime"],
                     _tail(err) if rc != 0 else _tail(err, 500))


# --------------------------------------------------------------------------
# Servers
# --------------------------------------------------------------------------

def nbd_uri(sock: Path) -> str:
    return f"nbd+unix:///?socket={sock}"


@dataclass
class Server:
    name: str
    argv: list[str]
    sock: Path
    proc: subprocess.Popen
    log: Path

    @property
    def uri(self) -> str:
        return nbd_uri(self.sock)


class Servers:
    """Starts NBD servers in a work directory and guarantees they are stopped."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.running: list[Server] = []
        self._n = 0

    def start(self, name: str, make_argv: Callable[[Path, Path], list[str]],
              ready_timeout: float = 30.0) -> Server:
        self._n += 1
        tag = f"{name}-{self._n}"
        sock = self.workdir / f"{tag}.sock"
        pidf = self.workdir / f"{tag}.pid"
        log = self.workdir / f"{tag}.log"
        argv = make_argv(sock, pidf)
        with open(log, "wb") as lf:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=lf, stderr=lf,
                                    preexec_fn=_pdeathsig)
        srv = Server(name, argv, sock, proc, log)
        self.running.append(srv)
        # Both qemu-nbd --pid-file and nbdkit -P write the pid file once the
        # socket is listening.
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                self.stop(srv)
                raise RuntimeError(f"server {shlex.join(argv)} exited with {proc.returncode}:\n"
                                   f"{_tail(log)}")
            try:
                if pidf.stat().st_size > 0 and sock.exists():
                    return srv
            except FileNotFoundError:
                pass
            if time.monotonic() > deadline:
                self.stop(srv)
                raise RuntimeError(f"server {shlex.join(argv)} not ready after "
                                   f"{ready_timeout} s:\n{_tail(log)}")
            time.sleep(0.005)

    def stop(self, srv: Server) -> None:
        p = srv.proc
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if srv in self.running:
            self.running.remove(srv)
        for f in (srv.sock, srv.sock.with_suffix(".pid")):
            try:
                f.unlink()
            except FileNotFoundError:
                pass

    def stop_all(self) -> None:
        for srv in list(reversed(self.running)):
            try:
                self.stop(srv)
            except Exception:
                pass


def qemu_nbd_argv(image: Path, readonly: bool) -> Callable[[Path, Path], list[str]]:
    def make(sock: Path, pidf: Path) -> list[str]:
        # tmpfs has no O_DIRECT, so --cache=none is impossible; writeback is
        # qemu-nbd's default.  -e N > 1 makes qemu-nbd advertise multi-conn.
        return ["qemu-nbd", "-t", "-f", "raw", "-e", str(QEMU_NBD_SHARED),
                "--cache=writeback", "--aio=threads", *(["-r"] if readonly else []),
                "-k", str(sock), "--pid-file", str(pidf), str(image)]
    return make


def nbdkit_argv(plugin: str, *params: str) -> Callable[[Path, Path], list[str]]:
    def make(sock: Path, pidf: Path) -> list[str]:
        return ["nbdkit", "-f", "--exit-with-parent", "-U", str(sock), "-P", str(pidf),
                plugin, *params]
    return make


def sparse_random_params(size: int) -> list[str]:
    return [f"size={size}", f"seed={SPARSE_SEED}", f"percent={SPARSE_PERCENT}"]


# --------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    id: str
    title: str
    src: str          # "qemu-nbd" | "sparse-random"
    dst: str          # "qemu-nbd" | "memory" | "null"
    size: int
    tools: tuple[str, ...]
    target_ratio: float | None = None   # vmferry/nbdcopy time target


CASES = [
    Case("a-nbd-nbd", f"(a) qemu-nbd → qemu-nbd, {human(SIZE_A)} random",
         "qemu-nbd", "qemu-nbd", SIZE_A, ("vmferry", "nbdcopy", "qemu-img"), 0.8),
    Case("b-sparse-mem", f"(b) sparse-random → memory, {human(SIZE_B)} ({SPARSE_PERCENT}% data)",
         "sparse-random", "memory", SIZE_B, ("vmferry", "nbdcopy", "qemu-img"), 0.8),
    Case("c-nbd-null", f"(c) qemu-nbd {human(SIZE_A)} random → null:",
         "qemu-nbd", "null", SIZE_A, ("vmferry", "nbdcopy")),
    Case("c-sparse-null", f"(c) sparse-random {human(SIZE_B)} → null:",
         "sparse-random", "null", SIZE_B, ("vmferry", "nbdcopy")),
]
CASE_ORDER = [c.id for c in CASES]
MATRIX = [pytest.param(c, t, id=f"{c.id}-{t}") for c in CASES for t in c.tools]

TARGET_RSS_MIB = 64


# --------------------------------------------------------------------------
# Memory checks
# --------------------------------------------------------------------------

def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def require_memory(tmpfs_bytes: int, ram_bytes: int, what: str) -> None:
    free = shutil.disk_usage(TMPDIR).free
    avail = _mem_available()
    if free < tmpfs_bytes or avail < ram_bytes:
        pytest.fail(
            f"not enough memory for {what}: need {tmpfs_bytes / GiB:.2f} GiB free in "
            f"{TMPDIR} (have {free / GiB:.2f}) and {ram_bytes / GiB:.2f} GiB MemAvailable "
            f"(have {avail / GiB:.2f}); shrink with VMFERRY_BENCH_SCALE",
            pytrace=False)


# --------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------

def _copy_report() -> rpt.Report:
    cols = [
        rpt.Column("case_title", "case"),
        rpt.Column("tool_label", "tool"),
        *rpt.spread_columns("median s", 3),
        rpt.Column("gib_per_s", "GiB/s", rpt.fmt_num(2), "right"),
        rpt.Column("peak_rss_mib", "peak RSS MiB", rpt.fmt_num(1), "right"),
        rpt.Column("cpu_s", "CPU s", rpt.fmt_num(2), "right"),
        rpt.Column("server_cpu_s", "server CPU s", rpt.fmt_num(2), "right"),
        rpt.Column("other_cpu_s", "other CPU s", rpt.fmt_num(2), "right"),
        rpt.Column("ratio_vs_nbdcopy", "× nbdcopy", rpt.fmt_num(2), "right"),
        rpt.Column("status", "status"),
    ]
    chart = rpt.ChartSpec(
        group_key="case", series_key="tool_label", group_label_key="case_title",
        series_order=[tool_label(t) for t in TOOL_ORDER],
        panels=[
            rpt.Panel("median_s", "median seconds (lower is better)",
                      "Copy time (bars: min..max of rounds)", "min_s", "max_s"),
            rpt.Panel("peak_rss_mib", "peak RSS (MiB)", "Peak RSS of the tool process",
                      hline=TARGET_RSS_MIB, hline_label=f"vmferry target {TARGET_RSS_MIB} MiB",
                      value_fmt="{:.0f}"),
        ])
    return rpt.Report(name="copy", title="vmferry copy benchmark", columns=cols,
                      out_dir=OUT_DIR, chart=chart, finalize=_finalize)


def _finalize(rep: rpt.Report) -> list[str]:
    rep.records.sort(key=lambda r: (CASE_ORDER.index(r["case"]) if r["case"] in CASE_ORDER
                                    else 99, TOOL_ORDER.index(r["tool"])
                                    if r["tool"] in TOOL_ORDER else 99))
    base = {r["case"]: r["median_s"] for r in rep.records
            if r["tool"] == "nbdcopy" and r.get("median_s")}
    for r in rep.records:
        b = base.get(r["case"])
        r["ratio_vs_nbdcopy"] = (r["median_s"] / b) if (b and r.get("median_s")) else None

    lines = []
    ncpu = (rep.meta.get("machine") or {}).get("nproc") or os.cpu_count() or 1
    noisy = [f"{r['case']}/{r['tool']}" for r in rep.records
             if r.get("other_cpu_s") is not None and r.get("median_s")
             and r["other_cpu_s"] > max(0.1, 0.05 * r["median_s"] * ncpu)]
    if noisy:
        lines.append("- WARNING: other processes used > 5 % of the machine's CPU during "
                     f"{', '.join(noisy)} (see other CPU s); rerun on an idle machine.")
    vm = [r for r in rep.records if r["tool"] == "vmferry"]
    if not vm:
        return lines
    targets = {c.id: c for c in CASES}
    for r in vm:
        c = targets.get(r["case"])
        if c is None or c.target_ratio is None:
            continue
        ratio = r.get("ratio_vs_nbdcopy")
        if ratio is None:
            lines.append(f"- {r['case_title']}: vmferry time ≤ {c.target_ratio:.2f}× nbdcopy: "
                         f"**n/a** ({r['status']})")
        else:
            ok = ratio <= c.target_ratio
            lines.append(f"- {r['case_title']}: vmferry time ≤ {c.target_ratio:.2f}× nbdcopy: "
                         f"{ratio:.2f}× → **{'PASS' if ok else 'FAIL'}**")
    rss = [r["peak_rss_mib"] for r in vm if r.get("peak_rss_mib") is not None]
    if rss:
        ok = max(rss) <= TARGET_RSS_MIB
        lines.append(f"- vmferry peak RSS ≤ {TARGET_RSS_MIB} MiB (all cases): max "
                     f"{max(rss):.1f} MiB → **{'PASS' if ok else 'FAIL'}**")
    if _VMFERRY_OVERRIDE:
        lines.append(f"- NOTE: `vmferry*` is a stand-in: VMFERRY_BENCH_VMFERRY_CMD="
                     f"`{_VMFERRY_OVERRIDE}`; these verdicts are not vmferry's.")
    return lines


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


@pytest.fixture(scope="session")
def copy_report() -> rpt.Report:
    rep = rpt.get_report("copy", _copy_report)
    if not rep.meta:
        load1 = float(_loadavg().split()[0]) if _loadavg() != "?" else 0.0
        if load1 > 0.5:
            rep.notes.append(f"WARNING: 1-minute load average was {load1:.2f} when the "
                             "benchmark started; other processes may have skewed the "
                             "timings.")
        tools = {"nbdcopy": ["nbdcopy", "--version"],
                 "qemu-img": ["qemu-img", "--version"],
                 "qemu-nbd": ["qemu-nbd", "--version"],
                 "nbdkit": ["nbdkit", "--version"]}
        if not _VMFERRY_OVERRIDE:
            # `vmferry --version` may not exist: ask the package metadata
            tools = {"vmferry": [sys.executable, "-c",
                                 "import importlib.metadata as m, vmferry; "
                                 "print('vmferry', m.version('vmferry'), vmferry.__file__)"],
                     **tools}
        rep.meta["machine"] = rpt.machine_info(tools)
        if _VMFERRY_OVERRIDE:
            rep.meta["machine"]["tools"] = {
                "vmferry": f"stand-in: {_VMFERRY_OVERRIDE}", **rep.meta["machine"]["tools"]}
        rep.meta["config"] = {
            "rounds (median of)": ROUNDS,
            "warm-up rounds (not measured)": WARMUP,
            "scale": SCALE,
            "vmferry command": shlex.join(VMFERRY_CMD) + " SRC DST",
            "nbdcopy command": "nbdcopy SRC DST",
            "qemu-img command": shlex.join(QEMU_IMG_CONVERT) + " SRC DST",
            "qemu-nbd source": shlex.join(qemu_nbd_argv(Path("SRC.raw"), True)(
                Path("SOCK"), Path("PID"))),
            "qemu-nbd destination": shlex.join(qemu_nbd_argv(Path("DST.raw"), False)(
                Path("SOCK"), Path("PID"))),
            "(a) destination file": ("fresh per round, fallocate'd (pages already allocated)"
                                     if DST_PREALLOC else "fresh sparse file per round"),
            "sparse-random source": "nbdkit sparse-random " + " ".join(
                sparse_random_params(SIZE_B)) + " (runlength=16M default)",
            "memory destination": f"nbdkit memory size={SIZE_B}, fresh server per round",
            "URIs": "nbd+unix:///?socket=SOCK",
            "tmpdir": TMPDIR,
            "verify every round": VERIFY,
            "peak RSS floor (tool spawner, MiB)": round((spawner().floor_kib or 0) / 1024, 1),
            "load average at start": _loadavg(),
        }
        rep.notes += [
            "Rounds are interleaved: each round runs every tool of the case once, the "
            "order rotating from round to round (see round_order in copy.json).",
            "Every run starts fresh source and destination servers; only the tool "
            "process (spawned to reaped) is timed.",
            "Throughput = virtual disk size / median time (for (b) most of the disk is "
            "holes).",
            "Peak RSS and CPU time (user+sys) come from os.wait4() on the tool process "
            "(spawned by a ~10 MiB helper so pytest's own RSS does not leak into "
            "ru_maxrss; values are max(tool peak, that floor)); peak RSS is the max over "
            "the measured rounds, CPU s the median.",
            "× nbdcopy = median time / nbdcopy's median time in the same case.",
            "CPU s = the tool's user+sys time; server CPU s = what the NBD servers "
            "used during the run; other CPU s = all other busy CPU time of the machine "
            "during the run (kernel threads, other processes): a few hundredths is "
            "normal, more means the machine was not idle and the timings are suspect. "
            "All are medians over the measured rounds.",
        ]
        if _VMFERRY_OVERRIDE:
            rep.notes.append(f"vmferry* = stand-in command `{_VMFERRY_OVERRIDE}` "
                             "(VMFERRY_BENCH_VMFERRY_CMD), not vmferry.")
    return rep


def _remove_stale_workdirs() -> None:
    """Delete work dirs (and their big images) left by killed benchmark runs."""
    for d in Path(TMPDIR).glob("vmferry-bench-*"):
        try:
            pid = int((d / "owner.pid").read_text())
        except (OSError, ValueError):
            continue
        try:
            os.kill(pid, 0)
            continue                      # owner still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def workdir() -> Path:
    if not os.path.isdir(TMPDIR):
        pytest.fail(f"{TMPDIR} does not exist (VMFERRY_BENCH_TMPDIR)", pytrace=False)
    _remove_stale_workdirs()
    d = Path(tempfile.mkdtemp(prefix="vmferry-bench-", dir=TMPDIR))
    (d / "owner.pid").write_text(f"{os.getpid()}\n")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def random_image(workdir: Path) -> Path:
    """(a)'s source: SIZE_A bytes of random data on tmpfs (deleted at the end)."""
    # source + one destination at a time, plus slack
    require_memory(2 * SIZE_A + 256 * MiB, 2 * SIZE_A + 512 * MiB,
                   f"(a) {human(SIZE_A)} source + destination images")
    path = workdir / "src.raw"
    chunk = 16 * MiB
    with open(path, "wb") as f:
        left = SIZE_A
        while left:
            n = min(chunk, left)
            f.write(os.urandom(n))
            left -= n
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


# --------------------------------------------------------------------------
# One run of one tool
# --------------------------------------------------------------------------

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _system_busy_cpu() -> float:
    """CPU seconds all CPUs spent not idle since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice]
    return (sum(v[:8]) - v[3] - v[4]) / _CLK_TCK


def _system_softirq_cpu() -> float:
    """CPU seconds all CPUs spent in softirqs since boot (/proc/stat): on loopback
    TCP, the receiving socket's network work, done in whichever process sends."""
    with open("/proc/stat") as f:
        return int(f.readline().split()[7]) / _CLK_TCK


def _process_cpu(pid: int) -> float:
    """utime+stime of a live process, all threads (/proc/PID/stat)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK
    except (OSError, IndexError, ValueError):
        return 0.0


def _start_source(case: Case, servers: Servers, src_image: Path | None) -> Server:
    if case.src == "qemu-nbd":
        assert src_image is not None
        return servers.start("src", qemu_nbd_argv(src_image, readonly=True))
    return servers.start("src", nbdkit_argv("sparse-random", *sparse_random_params(case.size)))


def _verify(case: Case, argv: list[str], dst: Server | None, dst_file: Path | None,
            servers: Servers, src_image: Path | None) -> None:
    """Raise ToolError unless the destination equals the source."""
    if case.dst == "null":
        return                      # nothing to check but the exit status
    if case.dst == "qemu-nbd":
        assert dst is not None and dst_file is not None and src_image is not None
        servers.stop(dst)           # client is gone; make sure all writes landed
        if dst_file.stat().st_size != src_image.stat().st_size:
            raise ToolError(f"{shlex.join(argv)}: destination size changed to "
                            f"{dst_file.stat().st_size}")
        if subprocess.run(["cmp", "-s", str(src_image), str(dst_file)]).returncode != 0:
            raise ToolError(f"{shlex.join(argv)}: destination differs from source")
        return
    if case.dst == "memory":
        assert dst is not None
        # A sparse-random server with the same parameters checks every write
        # and zero request against its own data and fails with EIO otherwise.
        checker = servers.start("verify", nbdkit_argv("sparse-random",
                                                      *sparse_random_params(case.size)))
        try:
            cp = subprocess.run(["nbdcopy", dst.uri, checker.uri],
                                capture_output=True, text=True)
        finally:
            servers.stop(checker)
        if cp.returncode != 0:
            raise ToolError(f"{shlex.join(argv)}: destination differs from source "
                            f"(nbdcopy into a verifying sparse-random server failed):\n"
                            f"{cp.stderr[-1500:]}")
        return
    raise ValueError(case.dst)


def run_once(case: Case, tool: str, servers: Servers, workdir: Path,
             src_image: Path | None) -> RunResult:
    """Fresh servers, one timed run of tool, verification, teardown."""
    src = _start_source(case, servers, src_image)
    dst: Server | None = None
    dst_file: Path | None = None
    try:
        if case.dst == "qemu-nbd":
            dst_file = workdir / "dst.raw"
            with open(dst_file, "wb") as f:
                if DST_PREALLOC:
                    os.posix_fallocate(f.fileno(), 0, case.size)
                else:
                    f.truncate(case.size)
            dst = servers.start("dst", qemu_nbd_argv(dst_file, readonly=False))
            dst_uri = dst.uri
        elif case.dst == "memory":
            dst = servers.start("dst", nbdkit_argv("memory", f"size={case.size}"))
            dst_uri = dst.uri
        else:
            dst_uri = "null:"
        argv = tool_argv(tool, src.uri, dst_uri)
        logdir = workdir / f"logs-{case.id}-{tool}"
        logdir.mkdir(exist_ok=True)

        pids = [s.proc.pid for s in (src, dst) if s is not None]
        busy0, srv0 = _system_busy_cpu(), sum(_process_cpu(p) for p in pids)
        res = run_tool(argv, logdir)                       # <- the timed part
        busy1, srv1 = _system_busy_cpu(), sum(_process_cpu(p) for p in pids)
        res.server_cpu = srv1 - srv0
        res.other_cpu = max(0.0, (busy1 - busy0) - res.server_cpu - res.utime - res.stime)

        if res.returncode != 0:
            raise ToolError(f"{shlex.join(argv)} exited with {res.returncode}:\n"
                            f"{res.stderr_tail}")
        if VERIFY:
            _verify(case, argv, dst, dst_file, servers, src_image)
        return res
    finally:
        for s in (dst, src):
            if s is not None:
                servers.stop(s)
        if dst_file is not None:
            dst_file.unlink(missing_ok=True)


# --------------------------------------------------------------------------
# One case: all its tools, rounds interleaved
# --------------------------------------------------------------------------

@dataclass
class ToolOutcome:
    warmup: list[RunResult]
    runs: list[RunResult]
    error: str | None = None


@dataclass
class CaseOutcome:
    tools: dict[str, ToolOutcome]
    order: list[list[str]]          # tool order of every round (warm-up first)
    error: str | None = None        # whole case failed (e.g. a server)


_CASE_OUTCOMES: dict[str, CaseOutcome] = {}


def _selected_tools(request: pytest.FixtureRequest, case: Case) -> list[str]:
    """Tools of this case that the session will run (honours -k / node ids)."""
    sel = []
    for item in request.session.items:
        cs = getattr(item, "callspec", None)
        if cs is not None and cs.params.get("case") == case and cs.params["tool"] not in sel:
            sel.append(cs.params["tool"])
    return [t for t in case.tools if t in sel]


def run_case(case: Case, tools: list[str], workdir: Path,
             src_image: Path | None) -> CaseOutcome:
    """WARMUP + ROUNDS rounds; each round runs every tool once, in an order
    rotated from round to round, so slow drifts of the machine (tmpfs page
    recycling, the host, background load) hit every tool alike."""
    out = CaseOutcome({t: ToolOutcome([], []) for t in tools}, [])
    servers = Servers(workdir)
    try:
        for rnd in range(WARMUP + ROUNDS):
            k = rnd % len(tools)
            order = [t for t in tools[k:] + tools[:k] if out.tools[t].error is None]
            out.order.append(order)
            for tool in order:
                to = out.tools[tool]
                try:
                    res = run_once(case, tool, servers, workdir, src_image)
                except ToolError as e:
                    to.error = str(e)
                    continue
                (to.warmup if rnd < WARMUP else to.runs).append(res)
    except Exception as e:         # servers, memory, ...: the whole case fails
        out.error = f"{e.__class__.__name__}: {e}"
    finally:
        servers.stop_all()
    return out


def _replay_timer(durations: list[float]) -> Callable[[], float]:
    """A clock for pytest-benchmark that makes round i last durations[i]."""
    state = {"calls": 0, "now": 0.0}

    def timer() -> float:
        i = state["calls"]
        state["calls"] += 1
        if i % 2 == 1:             # end of round i // 2
            state["now"] += durations[(i // 2) % len(durations)]
        return state["now"]
    return timer


# --------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------

@pytest.mark.timeout(0)
@pytest.mark.filterwarnings("ignore:Benchmark fixture was not used")   # failed tools
@pytest.mark.parametrize("case,tool", MATRIX)
def test_copy(benchmark, request, case: Case, tool: str, copy_report: rpt.Report,
              workdir: Path) -> None:
    """One case × tool.  The first test of a case runs the whole case (all its
    selected tools, rounds interleaved, see run_case); every test then hands
    its tool's measured rounds to pytest-benchmark via benchmark.pedantic().
    """
    record: dict[str, Any] = {
        "case": case.id, "case_title": case.title, "tool": tool,
        "tool_label": tool_label(tool), "size_bytes": case.size,
        "command": shlex.join(tool_argv(tool, "SRC", "null:" if case.dst == "null" else "DST")),
    }
    benchmark.group = case.id
    benchmark.extra_info.update({"case": case.id, "tool": tool, "size": case.size})

    def fail(msg: str) -> None:
        record.update(status="FAILED", error=msg[:3000])
        copy_report.add(record)
        pytest.fail(msg, pytrace=False)

    if case.id not in _CASE_OUTCOMES:
        src_image: Path | None = None
        try:
            if case.src == "qemu-nbd":
                src_image = request.getfixturevalue("random_image")
            if case.dst == "memory":
                frac = min(1.0, SPARSE_PERCENT / 100 * 1.5)
                require_memory(64 * MiB, int(case.size * frac) + 512 * MiB,
                               f"(b) nbdkit memory destination (~{SPARSE_PERCENT}% of "
                               f"{human(case.size)})")
        except BaseException as e:
            _CASE_OUTCOMES[case.id] = CaseOutcome({}, [], error=f"{e.__class__.__name__}: {e}")
            raise
        _CASE_OUTCOMES[case.id] = run_case(case, _selected_tools(request, case), workdir,
                                           src_image)
    outcome = _CASE_OUTCOMES[case.id]
    if outcome.error:
        fail(f"{case.id}: {outcome.error}")
    to = outcome.tools.get(tool)
    if to is None:
        fail(f"{case.id}: {tool} was not run")
    if to.error:
        fail(to.error)
    if not to.runs:
        fail(f"{case.id}: {tool}: no measured rounds")

    times = [r.seconds for r in to.runs]
    # pytest-benchmark gets the interleaved measurements: its clock replays
    # them (the runs themselves happened in run_case, timed by the spawner).
    benchmark._timer = _replay_timer(times)
    benchmark.pedantic(lambda: None, rounds=len(times), warmup_rounds=0, iterations=1)
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is not None and (len(stats.data) != len(times)
                              or abs(stats.median - statistics.median(times)) > 1e-6):
        warnings.warn("pytest-benchmark did not take the replayed times; its table is "
                      "wrong for this test (bench/results/copy.* are not affected)")

    med = statistics.median(times)
    rss_mib = [r.maxrss_kib / 1024 for r in to.runs]
    cpu = [r.utime + r.stime for r in to.runs]
    record.update(
        status="ok" if VERIFY else "ok (unverified)",
        rounds=len(times), warmup_rounds=len(to.warmup),
        times_s=times, median_s=med, min_s=min(times), max_s=max(times),
        stdev_s=statistics.stdev(times) if len(times) > 1 else 0.0,
        gib_per_s=case.size / GiB / med if med > 0 else None,
        peak_rss_mib=max(rss_mib), rss_mib=rss_mib,
        cpu_s=statistics.median(cpu), cpu_s_rounds=cpu,
        user_s=[r.utime for r in to.runs], sys_s=[r.stime for r in to.runs],
        warmup_s=[r.seconds for r in to.warmup],
        server_cpu_s=statistics.median(r.server_cpu for r in to.runs),
        server_cpu_s_rounds=[r.server_cpu for r in to.runs],
        other_cpu_s=statistics.median(r.other_cpu for r in to.runs),
        other_cpu_s_rounds=[r.other_cpu for r in to.runs],
        round_order=outcome.order,
    )
    benchmark.extra_info.update(peak_rss_mib=max(rss_mib), cpu_s=record["cpu_s"])
    copy_report.add(record)
    copy_report.meta["config"]["load average at end"] = _loadavg()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-p", "no:cacheprovider", *sys.argv[1:]]))
