"""Request size, depth and connections for the zero-copy lanes, by measurement (issue 12,
item 2).

qemu-nbd (or a file) -> qemu-nbd over Unix sockets or TCP, 1 GiB of random data on tmpfs,
through `vmferry copy --zero-copy=on --request-size S --requests D --connections N`;
rounds interleaved over
the settings.  Prints and writes (bench/results/zc_sizes.{md,json}) the wall time, the
client's CPU seconds per GiB and both servers' together: the servers' cost per request
is what falls with request size, and with zero-copy lanes nothing of the client's
grows with it (no buffers).  VF_ZC_REQUEST_SIZE and
VF_ZC_REQUESTS in ext/vmferry.h, and the zero-copy lanes' default connection count
(copy.c), come from this table.

    PYTHONPATH=src python bench/bench_zc_sizes.py      # or as part of `make bench`

VMFERRY_BENCH_SWEEP_ROUNDS (default 3) rounds; VMFERRY_BENCH_SCALE scales the size.
"""
from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_copy as bc  # noqa: E402
import report as rpt  # noqa: E402
import zc_harness as zh  # noqa: E402

ROUNDS = bc._env_int("VMFERRY_BENCH_SWEEP_ROUNDS", 3, minimum=1)
SIZE = bc._scaled(zh.GiB)
KiB = 1024
# (source, transport, request size, depth, connections): NBD -> NBD across sizes,
# depths and connection counts, file -> NBD (where the source side costs nothing per
# request) across sizes and connection counts, over Unix sockets and TCP.
SETTINGS = [("qemu-nbd", "unix", 256 * KiB, 16, 4), ("qemu-nbd", "unix", 256 * KiB, 64, 4),
            ("qemu-nbd", "unix", 256 * KiB, 16, 1), ("qemu-nbd", "unix", 512 * KiB, 16, 4),
            ("qemu-nbd", "unix", 512 * KiB, 16, 2), ("qemu-nbd", "unix", 512 * KiB, 16, 1),
            ("qemu-nbd", "unix", 1024 * KiB, 16, 1), ("qemu-nbd", "unix", 1024 * KiB, 4, 4),
            ("qemu-nbd", "unix", 2048 * KiB, 16, 1), ("qemu-nbd", "unix", 2048 * KiB, 8, 1),
            ("file", "unix", 1024 * KiB, 16, 4), ("file", "unix", 1024 * KiB, 16, 1),
            ("file", "unix", 512 * KiB, 16, 1),
            ("file", "unix", 2048 * KiB, 16, 1), ("file", "unix", 4096 * KiB, 16, 1),
            ("file", "tcp", 1024 * KiB, 16, 4), ("file", "tcp", 1024 * KiB, 16, 2),
            ("file", "tcp", 1024 * KiB, 16, 1), ("file", "tcp", 2048 * KiB, 16, 1),
            ("file", "tcp", 4096 * KiB, 16, 1), ("file", "tcp", 512 * KiB, 16, 1)]


def _label(n: int) -> str:
    return f"{n // (1024 * KiB)}M" if n >= 1024 * KiB else f"{n // KiB}K"


def _report() -> rpt.Report:
    cols = [rpt.Column("source", "source"), rpt.Column("transport", "to qemu-nbd over"),
            rpt.Column("request", "request size"), rpt.Column("depth", "requests", align="right"),
            rpt.Column("connections", "connections", align="right"),
            *rpt.spread_columns("median s", 2),
            rpt.Column("client_cpu_per_gib", "client CPU s/GiB", rpt.fmt_num(3), "right"),
            rpt.Column("server_cpu_per_gib", "servers CPU s/GiB", rpt.fmt_num(3), "right"),
            rpt.Column("other_cpu_s", "other CPU s", rpt.fmt_num(2), "right")]
    rep = rpt.Report(name="zc_sizes", title="Zero-copy lanes: request size and depth",
                     columns=cols, out_dir=bc.OUT_DIR)
    rep.meta["machine"] = rpt.machine_info({"qemu-nbd": ["qemu-nbd", "--version"]})
    rep.meta["config"] = {"copy": f"qemu-nbd or a file -> qemu-nbd, Unix sockets or TCP "
                                  f"to 127.0.0.1, {SIZE / zh.GiB:.2f} GiB random on tmpfs",
                          "rounds (median of, interleaved)": ROUNDS,
                          "load average at start": bc._loadavg()}
    rep.notes.append("CPU s/GiB = median CPU seconds over the rounds / GiB copied; "
                     "servers = source and destination qemu-nbd together.")
    rep.notes.append("Before each run (outside its time) each qemu-nbd gets the one 31 MiB "
                     "read a default copy sends first (an explicit --request-size leaves it "
                     "out), so the sizes are measured on servers as a default copy finds them.")
    return rep


@pytest.mark.timeout(0)
def test_zc_sizes() -> None:
    rep = rpt.get_report("zc_sizes", _report)
    work = Path(tempfile.mkdtemp(prefix="vmferry-bench-", dir=bc.TMPDIR))
    try:
        bc.require_memory(2 * SIZE + 256 * zh.MiB, 2 * SIZE + 512 * zh.MiB, "the sweep")
        image = zh.random_image(work, SIZE)
        runs: dict[tuple[str, str, int, int, int], list[zh.Measured]] = \
            {s: [] for s in SETTINGS}
        for rnd in range(ROUNDS + 1):                   # round 0 warms up
            k = rnd % len(SETTINGS)
            for src, transport, size, depth, conns in SETTINGS[k:] + SETTINGS[:k]:
                setup = zh.Setup(src, "qemu-nbd", transport, SIZE)
                m = zh.run(setup, zh.vmferry_argv("--zero-copy=on", "--request-size",
                                                  str(size), "--requests", str(depth),
                                                  "--connections", str(conns)),
                           work, image, verify=rnd == 0, warm_servers=True)
                if rnd:
                    runs[(src, transport, size, depth, conns)].append(m)
        gib = SIZE / zh.GiB
        for (src, transport, size, depth, conns), ms in runs.items():
            t = [m.seconds for m in ms]
            rep.add({"source": src, "transport": transport, "request": _label(size),
                     "depth": depth, "connections": conns,
                     "median_s": statistics.median(t), "min_s": min(t), "max_s": max(t),
                     "client_cpu_per_gib": statistics.median(m.client_cpu for m in ms) / gib,
                     "server_cpu_per_gib": statistics.median(m.server_cpu for m in ms) / gib,
                     "other_cpu_s": statistics.median(m.other_cpu for m in ms),
                     "times_s": t})
        rep.meta["config"]["load average at end"] = bc._loadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-p", "no:cacheprovider", "-q", *sys.argv[1:]]))
