"""One measured copy for the zero-copy benchmarks: fresh servers, the tool's wall and
CPU seconds, the servers' CPU seconds, the rest of the machine's, then a byte check.

Built on bench_copy.py's pieces (its spawner, which gives the tool's own rusage, its
server starter and its verification); adds qemu-nbd over TCP on 127.0.0.1 and a file
source.  Used by bench_zerocopy.py and bench_zc_sizes.py.
"""
from __future__ import annotations

import os
import shlex
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import bench_copy as bc

GiB = bc.GiB
MiB = bc.MiB


@dataclass(frozen=True)
class Setup:
    """Where the data comes from and goes to."""
    src: str          # "file" | "qemu-nbd" | "sparse-random"
    dst: str          # "qemu-nbd" | "memory"
    transport: str    # "unix" | "tcp"
    size: int


@dataclass
class Measured:
    seconds: float
    client_cpu: float
    server_cpu: float
    other_cpu: float
    maxrss_kib: int
    stdout: str
    softirq_cpu: float = 0.0   # the machine's, during the run; inside the CPU above


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _qemu_nbd(servers: bc.Servers, name: str, image: Path, readonly: bool,
              transport: str) -> tuple[bc.Server, str]:
    if transport == "unix":
        srv = servers.start(name, bc.qemu_nbd_argv(image, readonly))
        return srv, srv.uri
    port = _free_port()
    servers._n += 1
    pidf = servers.workdir / f"{name}-{servers._n}.pid"
    log = servers.workdir / f"{name}-{servers._n}.log"
    argv = ["qemu-nbd", "-t", "-f", "raw", "-e", str(bc.QEMU_NBD_SHARED),
            "--cache=writeback", "--aio=threads", *(["-r"] if readonly else []),
            "-b", "127.0.0.1", "-p", str(port), "--pid-file", str(pidf), str(image)]
    with open(log, "wb") as lf:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=lf, stderr=lf,
                                preexec_fn=bc._pdeathsig)
    # Servers.stop removes sock and sock.with_suffix(".pid"): the pid file here
    srv = bc.Server(name, argv, pidf.with_suffix(".sock"), proc, log)
    servers.running.append(srv)
    deadline = time.monotonic() + 30
    while not (pidf.exists() and pidf.stat().st_size > 0):
        if proc.poll() is not None or time.monotonic() > deadline:
            servers.stop(srv)
            raise RuntimeError(f"{shlex.join(argv)} did not start: {bc._tail(log)}")
        time.sleep(0.005)
    return srv, f"nbd://127.0.0.1:{port}/"


WARM = 31 * MiB      # ext/nbd_ops.c's WARM_BYTES


def warm(uri: str) -> None:
    """The one large read a default vmferry copy sends each QEMU server first (which an
    explicit --request-size leaves out), here from qemu-io: sweeps of request sizes
    then measure the servers as a default copy finds them."""
    subprocess.run(["qemu-io", "-r", "-f", "raw", uri, "-c", f"read 0 {WARM}"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def run(setup: Setup, argv_of, workdir: Path, src_image: Path | None,
        verify: bool = True, warm_servers: bool = False) -> Measured:
    """Fresh servers, one timed run of argv_of(src_uri, dst_uri), a byte check.
    warm_servers: warm() each qemu-nbd first, outside the timed part."""
    servers = bc.Servers(workdir)
    dst_file = workdir / "dst.raw"
    try:
        pids = []
        if setup.src == "file":
            assert src_image is not None
            src_uri = str(src_image)
        elif setup.src == "qemu-nbd":
            assert src_image is not None
            s, src_uri = _qemu_nbd(servers, "src", src_image, True, setup.transport)
            pids.append(s.proc.pid)
        else:
            s = servers.start("src", bc.nbdkit_argv("sparse-random",
                                                    *bc.sparse_random_params(setup.size)))
            src_uri = s.uri
            pids.append(s.proc.pid)
        if setup.dst == "qemu-nbd":
            with open(dst_file, "wb") as f:
                os.posix_fallocate(f.fileno(), 0, setup.size)
            d, dst_uri = _qemu_nbd(servers, "dst", dst_file, False, setup.transport)
        else:
            d = servers.start("dst", bc.nbdkit_argv("memory", f"size={setup.size}"))
            dst_uri = d.uri
        pids.append(d.proc.pid)

        if warm_servers:
            for uri in ([src_uri] if setup.src == "qemu-nbd" else []) + \
                       ([dst_uri] if setup.dst == "qemu-nbd" else []):
                warm(uri)
        argv = argv_of(src_uri, dst_uri)
        logdir = workdir / "logs"
        logdir.mkdir(exist_ok=True)
        busy0, srv0 = bc._system_busy_cpu(), sum(bc._process_cpu(p) for p in pids)
        soft0 = bc._system_softirq_cpu()
        res = bc.run_tool(argv, logdir)                     # <- the timed part
        soft1 = bc._system_softirq_cpu()
        busy1, srv1 = bc._system_busy_cpu(), sum(bc._process_cpu(p) for p in pids)
        if res.returncode != 0:
            raise bc.ToolError(f"{shlex.join(argv)} exited {res.returncode}: {res.stderr_tail}")
        client = res.utime + res.stime
        out = Measured(res.seconds, client, srv1 - srv0,
                       max(0.0, busy1 - busy0 - (srv1 - srv0) - client), res.maxrss_kib,
                       (logdir / "tool.stdout").read_text(errors="replace"), soft1 - soft0)
        if verify:
            if setup.dst == "qemu-nbd":
                servers.stop(d)
                if subprocess.run(["cmp", "-s", str(src_image), str(dst_file)]).returncode:
                    raise bc.ToolError(f"{shlex.join(argv)}: the destination differs")
            else:
                case = bc.Case("zc", "zc", "sparse-random", "memory", setup.size, ())
                bc._verify(case, argv, d, None, servers, None)
        return out
    finally:
        servers.stop_all()
        dst_file.unlink(missing_ok=True)


def random_image(workdir: Path, size: int) -> Path:
    path = workdir / "src.raw"
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(16 * MiB, left)
            f.write(os.urandom(n))
            left -= n
    return path


def vmferry_argv(*extra: str):
    return lambda src, dst: [*bc.VMFERRY_CMD, *extra, src, dst]
