"""`vmferry demo`: vmferry's main job on a built-in default.

`vmferry demo` (or `demo migrate`) builds the test guest, boots it with a
disk full of data, live-migrates it with its disk to a second state
directory with the progress display, and checks that the guest's memory
pattern went on without a gap and that both disks hold the same bytes.

`vmferry demo copy` starts two real NBD servers (nbdkit sparse-random and
memory), copies one into the other with a progress bar and verifies it.
Everything the demo starts is stopped and removed whatever happens.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from vmferry.commands.copy import summary
from vmferry.errors import UsageError
from vmferry.progress import CopyProgress, make_reporter
from vmferry.units import format_size, parse_size


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run a built-in demonstration",
                       description="Live-migrate a built-in VM with its disk (migrate, the "
                                   "default), or copy a disk between two NBD servers (copy).")
    p.add_argument("what", nargs="?", default="migrate", choices=["migrate", "copy"])
    p.add_argument("--size", default=None,
                   help="disk size (default: 512M for migrate, 4G for copy)")
    p.add_argument("--progress", default="auto", choices=["auto", "bar", "json"])
    p.set_defaults(func=run)


def _start_nbdkit(sock: Path, *args: str) -> subprocess.Popen:
    if shutil.which("nbdkit") is None:
        raise UsageError("nbdkit is not installed: run 'make demo', which installs it")
    proc = subprocess.Popen(["nbdkit", "-U", str(sock), "-f", "--exit-with-parent", *args],
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
            proc.kill()
            raise UsageError(f"nbdkit {args[0]} did not start: {err or 'timed out'}")
        time.sleep(0.02)
    return proc


def run(args: argparse.Namespace) -> int:
    if args.what == "migrate":
        from vmferry.commands.demo_migrate import run_migrate_demo
        return run_migrate_demo(parse_size(args.size or "512M", "--size"), args.progress)
    size = parse_size(args.size or "4G", "--size")
    with tempfile.TemporaryDirectory(prefix="vmferry-demo-") as tmp:
        src_sock, dst_sock = Path(tmp, "src.sock"), Path(tmp, "dst.sock")
        procs = []
        try:
            procs.append(_start_nbdkit(src_sock, "sparse-random", f"size={size}",
                                       "seed=1"))
            procs.append(_start_nbdkit(dst_sock, "memory", f"size={size}"))
            src = f"nbd+unix:///?socket={src_sock}"
            dst = f"nbd+unix:///?socket={dst_sock}"
            print(f"demo: copying a {format_size(size)} sparse-random disk (nbdkit) "
                  f"into an empty memory disk (nbdkit) over Unix sockets", flush=True)
            from vmferry.copying import copy
            reporter = make_reporter(args.progress)
            try:
                shown = CopyProgress(reporter)
                result = copy(src, dst, verify=True, progress=shown)
                reporter.update(shown.event(result, "done"))
            finally:
                reporter.close()
            print(summary(result))
            print(f"verified {format_size(result.bytes_total)}: both servers hold the same bytes")
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    return 0
