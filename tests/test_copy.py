"""`vmferry copy` on real servers and files: every copy is checked byte for byte.

The destination is always read back with another tool (plain file reads, nbdcopy),
never with vmferry.  Destinations that already exist start out filled with a non-zero
byte, so a copy that skips zeroing where the source is zero (or a hole) is caught.

Every test runs twice, with `--zero-copy=on` and `--zero-copy=off`, and each successful
copy must say it ran on the lanes asked for; the few things zero-copy lanes cannot do
(null:, TLS, zero detection in read data) are checked to fail, or differ, as documented.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

import cli
from cli import assert_cli_error, parse_json_lines
from disk_data import (
    COUNTERS, KiB, MiB, Region, allocated_bytes, assert_same, check_counters, make_image,
    max_concurrent_connections, read_all, read_nbdkit_log, write_layout,
)

GARBAGE = "fill:0x5a"
PATHS = {"on": "zero-copy", "off": "libnbd"}


@pytest.fixture(params=["on", "off"], autouse=True)
def zero_copy(request, monkeypatch) -> str:
    """Runs the test with `vmferry copy --zero-copy=MODE`; copy_ok also checks that the
    copy said it ran on those lanes (its summary line or its JSON done event)."""
    mode = request.param

    def run_vmferry(*args, **kw):
        if args and args[0] == "copy" and not any(str(a).startswith("--zero-copy") for a in args):
            args = ("copy", f"--zero-copy={mode}", *args[1:])
        return cli.run_vmferry(*args, **kw)

    def copy_ok(*args, **kw):
        cp = cli.copy_ok(f"--zero-copy={mode}", *args, **kw)
        if "--progress=json" in args:
            assert parse_json_lines(cp.stdout)[-1]["path"] == PATHS[mode], cp.stdout
        else:
            summary = [l for l in cp.stdout.splitlines() if l.startswith("copied ")]
            assert summary and summary[0].endswith(f"({PATHS[mode]})"), cp.stdout
        return cp

    monkeypatch.setitem(globals(), "run_vmferry", run_vmferry)
    monkeypatch.setitem(globals(), "copy_ok", copy_ok)
    return mode


run_vmferry = cli.run_vmferry
copy_ok = cli.copy_ok


def done_event(cp) -> dict:
    """The final `"event": "done"` object of a --progress=json run (checked)."""
    events = parse_json_lines(cp.stdout)
    assert events, f"no JSON lines on stdout: {cp.stdout!r}"
    for e in events:
        assert e.get("event") in ("progress", "done"), e
        missing = [k for k in COUNTERS if k not in e]
        assert not missing, f"event without {missing}: {e}"
    done = events[-1]
    assert done["event"] == "done", f"last JSON line is not the done event: {done}"
    assert [e["event"] for e in events].count("done") == 1, events
    assert isinstance(done.get("seconds"), (int, float)) and done["seconds"] >= 0, done
    return done


def copy_json(*args):
    cp = copy_ok("--progress=json", *args)
    return done_event(cp)


# --------------------------------------------------------------------------- sizes x directions

SIZES = [0, 7, 1 * MiB + 123, 33 * MiB + 1]
DIRECTIONS = ["file-file", "file-nbd", "nbd-file", "nbd-nbd"]


def _pattern(size):
    return "sparse" if size >= MiB else "random"


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s}B")
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_copy_odd_sizes_all_directions(workdir, nbdkit, size, direction):
    """Odd sizes (not multiples of 512 or of any request size) in all four directions.

    NBD ends are nbdkit's file plugin, which keeps byte-exact sizes (qemu rounds raw
    images up to 512).  A file destination does not exist beforehand and must be
    created with exactly the source's size; an NBD destination starts as garbage.
    """
    src_file = make_image(workdir / "src.raw", size, _pattern(size), seed=size)
    src = nbdkit("file", str(src_file), readonly=True).uri if direction.startswith("nbd") \
        else str(src_file)

    if direction.endswith("nbd"):
        dst_file = make_image(workdir / "dst.raw", size, GARBAGE)
        dst = nbdkit("file", str(dst_file)).uri
    else:
        dst_file = workdir / "new" / "dst.raw"
        dst_file.parent.mkdir()
        dst = str(dst_file)

    done = copy_json(src, dst)
    check_counters(done, size)

    assert dst_file.stat().st_size == size, "destination file size differs from the source"
    assert_same(src_file, dst_file)
    if direction.endswith("nbd"):
        assert_same(src_file, dst)        # and through the server, with nbdcopy


def test_copy_file_to_existing_file(workdir):
    """An existing destination file of the same size is overwritten, zeros included."""
    size = 5 * MiB + 333
    src = make_image(workdir / "src.raw", size, "sparse", seed=11)
    dst = make_image(workdir / "dst.raw", size, GARBAGE)
    copy_ok(src, dst)
    assert dst.stat().st_size == size
    assert_same(src, dst)


# --------------------------------------------------------------------------- settings

SETTINGS = [
    ("1", "1", "4096"),
    ("4", "64", "256K"),
    ("2", "8", "1M"),
]


@pytest.mark.parametrize("conns,reqs,reqsize", SETTINGS, ids=lambda v: str(v))
@pytest.mark.parametrize("pattern", ["sparse", "random"])
def test_copy_qemu_nbd_settings(workdir, qemu_nbd, conns, reqs, reqsize, pattern):
    """qemu-nbd -> qemu-nbd (multi-conn, -e 4) with several connection/request settings.

    The size is a multiple of 512 (qemu rounds raw sizes) but of no request size.
    """
    size = 9 * MiB + 5 * 512
    src_file = make_image(workdir / "src.raw", size, pattern, seed=5)
    dst_file = make_image(workdir / "dst.raw", size, GARBAGE)
    src = qemu_nbd(src_file, readonly=True)
    dst = qemu_nbd(dst_file)
    done = copy_json("--connections", conns, "--requests", reqs, "--request-size", reqsize,
                     src.uri, dst.uri)
    check_counters(done, size)
    assert_same(src.uri, dst.uri)
    assert_same(src_file, dst_file)


def test_connections_are_opened(workdir, nbdkit):
    """--connections 2 between two multi-conn servers: 2 connections to each, at once."""
    size = 16 * MiB
    slog, dlog = workdir / "src.log", workdir / "dst.log"
    src = nbdkit("sparse-random", f"size={size}", "seed=3", "percent=50",
                 f"logfile={slog}", filters=["log"])
    dst = nbdkit("memory", f"size={size}", f"logfile={dlog}", filters=["log"])
    copy_ok("--connections", "2", src.uri, dst.uri)
    assert_same(src.uri, dst.uri)
    nsrc, ndst = max_concurrent_connections(slog), max_concurrent_connections(dlog)
    assert nsrc >= 2 and ndst >= 2, f"--connections 2 had at most {nsrc} source and " \
                                    f"{ndst} destination connections open at once"


def test_request_size_is_respected(workdir, nbdkit):
    """No read or write request is larger than --request-size."""
    size = 4 * MiB + 4096
    src_file = make_image(workdir / "src.raw", size, "random", seed=2)
    slog, dlog = workdir / "src.log", workdir / "dst.log"
    src = nbdkit("file", str(src_file), f"logfile={slog}", filters=["log"], readonly=True)
    dst = nbdkit("memory", f"size={size}", f"logfile={dlog}", filters=["log"])
    copy_ok("--request-size", "64K", src.uri, dst.uri)
    assert_same(src_file, dst.uri)
    _, sreqs = read_nbdkit_log(slog)
    _, dreqs = read_nbdkit_log(dlog)
    reads = [r for r in sreqs if r.op == "Read"]
    writes = [r for r in dreqs if r.op == "Write"]
    assert reads and writes
    assert max(r.count for r in reads) <= 64 * KiB, max(r.count for r in reads)
    assert max(r.count for r in writes) <= 64 * KiB, max(r.count for r in writes)


WARM = 31 * MiB   # ext/nbd_ops.c's WARM_BYTES


# what QEMU's NBD servers advertise, and the only servers asked for that read
BIG = ("blocksize-maximum=32M",)


def _warm_reads(log) -> tuple[list, list]:
    """(indexes of 31 MiB reads, indexes of writes) in an nbdkit log."""
    _, reqs = read_nbdkit_log(log)
    return ([i for i, r in enumerate(reqs) if r.op == "Read" and r.count == WARM],
            [i for i, r in enumerate(reqs) if r.op == "Write"])


def test_servers_get_one_large_read_before_the_copy(workdir, nbdkit):
    """Each server on this host that takes 32 MiB requests is first asked for one
    31 MiB read (it keeps qemu-nbd's later request buffers in its heap, which halved a
    copy's time), the destination's from a hole; the copy is the same for it."""
    size = 80 * MiB + 4096
    src_file = make_image(workdir / "src.raw", size, "random", seed=5)
    dst_file = make_image(workdir / "dst.raw", 32 * MiB, "random", seed=7)
    with open(dst_file, "r+b") as f:                    # data, then a hole from 32 MiB
        f.truncate(size)
    slog, dlog = workdir / "src.log", workdir / "dst.log"
    src = nbdkit("file", str(src_file), *BIG, f"logfile={slog}",
                 filters=["log", "blocksize-policy"], readonly=True)
    dst = nbdkit("file", str(dst_file), *BIG, f"logfile={dlog}",
                 filters=["log", "blocksize-policy"])
    copy_ok(src.uri, dst.uri)
    assert_same(src_file, dst_file)
    for log, offset in ((slog, 0), (dlog, 32 * MiB)):
        warm, writes = _warm_reads(log)
        _, reqs = read_nbdkit_log(log)
        assert len(warm) == 1, [(r.op, r.offset, r.count) for r in reqs[:5]]
        assert reqs[warm[0]].offset == offset
        assert not writes or warm[0] < writes[0]


def test_servers_that_do_not_take_large_requests_get_no_large_read(workdir, nbdkit):
    """nbdkit says nothing of its largest request (and behind a rate or delay filter a
    31 MiB read would cost seconds): no such read."""
    size = 40 * MiB
    slog, dlog = workdir / "src.log", workdir / "dst.log"
    src = nbdkit("pattern", f"size={size}", f"logfile={slog}", filters=["log"])
    dst = nbdkit("memory", f"size={size}", f"logfile={dlog}", filters=["log"])
    copy_ok(src.uri, dst.uri)
    assert _warm_reads(slog)[0] == [] and _warm_reads(dlog)[0] == []


def test_destination_that_fails_reads_still_takes_the_copy(workdir, nbdkit):
    """That read is a courtesy: a destination that fails every read gets the copy."""
    size = 40 * MiB
    src_file = make_image(workdir / "src.raw", size, "random", seed=6)
    dst_file = workdir / "dst.raw"
    with open(dst_file, "wb") as f:
        f.truncate(size)
    dst = nbdkit("file", str(dst_file), *BIG, "error-pread=EIO", "error-pread-rate=100%",
                 filters=["error", "blocksize-policy"])
    copy_ok(str(src_file), dst.uri)
    assert_same(src_file, dst_file)


# --------------------------------------------------------------------------- nbdkit sources

def test_sparse_random_to_memory(nbdkit):
    size = 48 * MiB + 512
    src = nbdkit("sparse-random", f"size={size}", "seed=42", "percent=30", "runlength=65536",
                 "random-content=true")
    dst = nbdkit("memory", f"size={size}")
    done = copy_json(src.uri, dst.uri)
    check_counters(done, size)
    assert done["bytes_read"] < size, "sparse source read in full: extents not used?"
    assert_same(src.uri, dst.uri)


def test_sparse_random_to_checking_sparse_random(nbdkit):
    """sparse-random as destination checks every write against its own data (EIO if not)."""
    size = 32 * MiB
    src = nbdkit("sparse-random", f"size={size}", "seed=9", "percent=25")
    dst = nbdkit("sparse-random", f"size={size}", "seed=9", "percent=25")
    copy_ok(src.uri, dst.uri)


def test_pattern_to_new_file(workdir, nbdkit):
    size = 20 * MiB + 8
    src = nbdkit("pattern", f"size={size}")
    dst = workdir / "out.raw"
    copy_ok(src.uri, dst)
    assert dst.stat().st_size == size
    assert_same(src.uri, dst)


def test_pattern_to_null(nbdkit, zero_copy):
    """`null:` discards everything; the whole source is still read.  It has no
    zero-copy lane: --zero-copy=on says so, auto falls back."""
    size = 24 * MiB
    src = nbdkit("pattern", f"size={size}")
    if zero_copy == "on":
        line = assert_cli_error(run_vmferry("copy", src.uri, "null:"), 1)
        assert "zero-copy is not possible" in line and "null:" in line, line
        cp = cli.copy_ok("--progress=json", src.uri, "null:")     # auto
        assert done_event(cp)["path"] == "libnbd"
        return
    done = copy_json(src.uri, "null:")
    check_counters(done, size)
    assert done["bytes_read"] == size, done


def test_memory_to_memory_larger_destination(workdir, nbdkit):
    """A larger destination: only [0, source size) changes, its tail is left alone."""
    size, dsize = 3 * MiB + 99, 5 * MiB
    src_file = make_image(workdir / "src.raw", size, "sparse", seed=4)
    dst_file = make_image(workdir / "dst.raw", dsize, GARBAGE)
    before = dst_file.read_bytes()
    src = nbdkit("file", str(src_file), readonly=True)
    dst = nbdkit("file", str(dst_file))
    copy_ok(src.uri, dst.uri)
    after = read_all(dst_file)
    assert len(after) == dsize
    assert after[:size] == read_all(src_file), "copied range differs"
    assert after[size:] == before[size:], "destination written past the source's size"


# --------------------------------------------------------------------------- options

def test_destination_is_zero_skips_zero_regions(workdir, nbdkit):
    """--destination-is-zero trusts the destination: zero source regions are not written.

    The destination here is *not* zero (garbage), so what the engine skipped shows:
    data regions must be copied, the large hole in the middle must stay untouched.
    """
    size = 8 * MiB
    layout = [Region(0, MiB, "data"), Region(MiB, 6 * MiB, "hole"),
              Region(7 * MiB, MiB, "data")]
    src_file = write_layout(workdir / "src.raw", size, layout, seed=1)
    dst_file = make_image(workdir / "dst.raw", size, GARBAGE)
    src = nbdkit("file", str(src_file), readonly=True)
    dlog = workdir / "dst.log"
    dst = nbdkit("file", str(dst_file), f"logfile={dlog}", filters=["log"])
    done = copy_json("--destination-is-zero", src.uri, dst.uri)
    check_counters(done, size)
    got, want = read_all(dst_file), read_all(src_file)
    assert got[:MiB] == want[:MiB] and got[7 * MiB:] == want[7 * MiB:], "data not copied"
    middle = got[2 * MiB:6 * MiB]
    assert middle == b"\x5a" * len(middle), \
        "--destination-is-zero still wrote zeros over the hole"
    _, reqs = read_nbdkit_log(dlog)
    zeroing = [r for r in reqs if r.op in ("Zero", "Trim") and r.offset < 6 * MiB
               and r.end > 2 * MiB]
    assert not zeroing, f"zero/trim requests sent despite --destination-is-zero: {zeroing[:3]}"


def test_destination_is_zero_on_zero_destination(workdir, nbdkit):
    """With a really zero destination the result is an exact copy, zeros cost no writes."""
    size = 12 * MiB + 77
    src_file = make_image(workdir / "src.raw", size, "sparse", seed=21)
    src = nbdkit("file", str(src_file), readonly=True)
    dst = nbdkit("memory", f"size={size}")
    done = copy_json("--destination-is-zero", src.uri, dst.uri)
    check_counters(done, size)
    assert done["bytes_written"] < size, done
    assert_same(src_file, dst.uri)


def test_allocated_new_file(workdir):
    """--allocated: a new raw file destination has no holes (all blocks allocated)."""
    size = 8 * MiB + 4096
    src = make_image(workdir / "src.raw", size, "sparse", seed=8)
    assert allocated_bytes(src) < size * 3 // 4, "test image is not sparse enough"
    dst = workdir / "dst.raw"
    copy_ok("--allocated", src, dst)
    assert_same(src, dst)
    assert allocated_bytes(dst) >= size, \
        f"--allocated left holes: {allocated_bytes(dst)} of {size} bytes allocated"


def test_allocated_nbd_destination(workdir, qemu_nbd):
    """--allocated over NBD: zeroing must not punch holes (qemu-nbd --discard=unmap would
    honour a may-trim zero request by punching, so a missing NO_HOLE flag shows)."""
    size = 8 * MiB + 1024
    src_file = make_image(workdir / "src.raw", size, "sparse", seed=12)
    dst_file = make_image(workdir / "dst.raw", size, GARBAGE)
    assert allocated_bytes(dst_file) >= size
    src = qemu_nbd(src_file, readonly=True)
    dst = qemu_nbd(dst_file, discard="unmap")
    copy_ok("--allocated", src.uri, dst.uri)
    assert_same(src_file, dst_file)
    assert allocated_bytes(dst_file) >= size, \
        f"--allocated punched holes: {allocated_bytes(dst_file)} of {size} bytes allocated"


def test_zero_detection_counts_zeroed(workdir, qemu_nbd, nbdkit, zero_copy):
    """A source of zeros *written as data* (reported allocated) is detected as zeros on
    libnbd lanes.  Zero-copy lanes never see the bytes: they write them as data, and
    asking for both is refused."""
    size = 6 * MiB + 512
    src_file = make_image(workdir / "zeros.raw", size, "zero")
    src = qemu_nbd(src_file, readonly=True)
    dst_file = make_image(workdir / "dst.raw", size, GARBAGE)
    dst = nbdkit("file", str(dst_file))
    done = copy_json(src.uri, dst.uri)
    check_counters(done, size)
    assert done["bytes_read"] == size, f"allocated source must be read: {done}"
    assert read_all(dst_file) == bytes(size)
    if zero_copy == "on":
        assert done["bytes_written"] == size and done["bytes_zeroed"] == 0, done
        line = assert_cli_error(run_vmferry("copy", "--zero-detect", src.uri, dst.uri), 2)
        assert "zero detection" in line, line
        # auto with --zero-detect takes the libnbd lanes, which find the zeroes
        cp = cli.copy_ok("--zero-detect", "--progress=json", src.uri, dst.uri)
        done = done_event(cp)
        assert done["path"] == "libnbd" and done["bytes_zeroed"] > 0, done
        return
    assert done["bytes_zeroed"] > 0, f"zeros in read data not detected: {done}"
    assert done["bytes_written"] < size, done
    assert read_all(dst_file) == bytes(size)


def test_counters_match_source_shape(workdir, nbdkit):
    """Data regions are written, holes are zeroed: counters follow the source's layout."""
    size = 16 * MiB
    layout = [Region(0, 4 * MiB, "data"), Region(4 * MiB, 8 * MiB, "hole"),
              Region(12 * MiB, 4 * MiB, "data")]
    src_file = write_layout(workdir / "src.raw", size, layout, seed=3)
    src = nbdkit("file", str(src_file), readonly=True)
    dst = nbdkit("memory", f"size={size}")
    done = copy_json(src.uri, dst.uri)
    check_counters(done, size)
    assert done["bytes_written"] >= 8 * MiB, done
    assert done["bytes_written"] + done["bytes_zeroed"] == size, done
    assert done["bytes_zeroed"] >= 4 * MiB, f"an 8 MiB hole was not zeroed as zero: {done}"
    assert done["bytes_read"] <= 12 * MiB, f"the 8 MiB hole was read: {done}"
    assert_same(src_file, dst.uri)


def test_bandwidth_caps_the_copy(workdir, nbdkit):
    """--bandwidth 4 over four connections: 6 MiB of data take about 1.5 s, not less."""
    size = 6 * MiB
    src_file = make_image(workdir / "src.raw", size, "random", seed=52)
    src = nbdkit("file", str(src_file), readonly=True)
    dst = nbdkit("memory", f"size={size}")
    t0 = time.monotonic()
    copy_ok("--bandwidth", "4", "--connections", "4", src.uri, dst.uri)
    took = time.monotonic() - t0
    assert took >= 1.3, f"6 MiB at 4 MiB/s took only {took:.2f} s"
    assert_same(src_file, dst.uri)


def test_flush_sends_flush(workdir, nbdkit):
    size = 2 * MiB
    src = nbdkit("pattern", f"size={size}")
    dlog = workdir / "dst.log"
    dst = nbdkit("memory", f"size={size}", f"logfile={dlog}", filters=["log"])
    copy_ok("--flush", src.uri, dst.uri)
    assert_same(src.uri, dst.uri)
    _, reqs = read_nbdkit_log(dlog)
    flushes = [r for r in reqs if r.op == "Flush"]
    writes = [r for r in reqs if r.op == "Write"]
    assert flushes, "--flush sent no NBD_CMD_FLUSH to the destination"
    assert reqs.index(flushes[-1]) > reqs.index(writes[-1]), "flush before the last write"


def test_verify_ok(workdir, nbdkit):
    size = 3 * MiB + 17
    src_file = make_image(workdir / "src.raw", size, "sparse", seed=6)
    dst = nbdkit("memory", f"size={size}")
    cp = copy_ok("--verify", src_file, dst.uri)
    assert any(l.startswith("verified ") for l in cp.stdout.splitlines()), cp.stdout
    assert_same(src_file, dst.uri)


def test_verify_detects_mismatch(workdir, nbdkit):
    """nbdkit null accepts writes and reads back zeros: --verify must notice."""
    size = 2 * MiB
    src_file = make_image(workdir / "src.raw", size, "random", seed=6)
    dst = nbdkit("null", f"size={size}")
    cp = run_vmferry("copy", "--verify", src_file, dst.uri)
    line = assert_cli_error(cp, 1)
    assert not any(l.startswith("verified ") for l in cp.stdout.splitlines()), cp.stdout
    assert "verif" in line.lower() or "mismatch" in line.lower() or "differ" in line.lower(), line


def test_progress_json(workdir, nbdkit):
    """--progress=json: one JSON object per line, counters and percent never go down,
    an ETA, a final done."""
    size = 32 * MiB
    src = nbdkit("sparse-random", f"size={size}", "seed=1", "percent=40",
                 "rdelay=2ms", filters=["delay"])
    dst = nbdkit("memory", f"size={size}")
    cp = copy_ok("--progress=json", "--connections", "1", "--request-size", "256K",
                 src.uri, dst.uri)
    events = parse_json_lines(cp.stdout)
    done = done_event(cp)
    check_counters(done, size)
    for k in COUNTERS:
        seq = [e[k] for e in events]
        assert seq == sorted(seq), f"{k} decreased: {seq}"
        assert all(isinstance(v, int) for v in seq), seq
    assert all(e["bytes_total"] == size for e in events)
    # one percentage and an ETA, as a migration's: never backwards, ending at 100
    percents = [e["percent"] for e in events]
    assert percents == sorted(percents) and percents[-1] == 100, percents
    assert all(p < 100 for e, p in zip(events, percents) if e["done"] < size), percents
    # an ETA from the second snapshot on, once a rate has been measured
    midway = [e for e in events if e["done"] < size]
    assert all(e["eta_s"] is not None and e["eta_s"] >= 0 for e in midway[1:]), midway
    assert done["eta_s"] == 0, done
    assert_same(src.uri, dst.uri)


def test_progress_json_counts_the_eta_down(workdir):
    """A copy long enough to watch (--bandwidth): from the second snapshot on each
    progress event has an ETA, which counts down with the time that passes and is
    close to the time the copy really had left."""
    size = 24 * MiB
    src = make_image(workdir / "src.raw", size, "random", seed=3)
    cp = copy_ok("--progress=json", "--bandwidth", "16", src, workdir / "dst.raw")
    events = parse_json_lines(cp.stdout)
    end = events[-1]["seconds"]
    midway = [e for e in events if e["event"] == "progress" and e["done"] < size][1:]
    assert len(midway) >= 3, midway
    for a, b in zip(midway, midway[1:]):
        assert b["eta_s"] <= a["eta_s"] + (b["seconds"] - a["seconds"]) + 0.25, (a, b)
    for e in midway:
        assert abs(e["eta_s"] - (end - e["seconds"])) < 0.25 * (end - e["seconds"]) + 0.3, \
            (e["seconds"], e["eta_s"], end)


def test_summary_line(workdir):
    size = 1 * MiB + 1
    src = make_image(workdir / "src.raw", size, "random")
    cp = copy_ok(src, workdir / "dst.raw")
    lines = [l for l in cp.stdout.splitlines() if l.startswith("copied ")]
    assert len(lines) == 1, cp.stdout
    for word in ("written", "zeroed", "skipped"):
        assert word in lines[0], lines[0]
    assert cp.stderr.strip() == "", f"stderr on success: {cp.stderr!r}"


def test_copy_starts_without_the_other_commands_code(workdir):
    """`vmferry copy` is timed against nbdcopy, which starts in milliseconds:
    its start-up loads the copy's code alone, not the migration package or
    QMP that other commands' parsers would bring (they were half of it)."""
    src = make_image(workdir / "src.raw", 1 * MiB, "random")
    code = ("import sys, vmferry.cli as c; rc = c.main(sys.argv[1:]); "
            "print(' '.join(sorted(sys.modules))); sys.exit(rc)")
    cp = subprocess.run([sys.executable, "-c", code, "copy", str(src), str(workdir / "d.raw")],
                        capture_output=True, text=True, env=cli.env(), timeout=60)
    assert cp.returncode == 0 and cp.stdout.startswith("copied "), (cp.stdout, cp.stderr)
    loaded = set(cp.stdout.splitlines()[-1].split())
    assert "vmferry.copying" in loaded, loaded
    for heavy in ("vmferry.migration", "vmferry.commands.migrate", "vmferry.vm.process",
                  "qemu.qmp", "asyncio"):
        assert heavy not in loaded, f"{heavy} loaded by a copy's start-up"
    assert_same(src, workdir / "d.raw")


def test_size_suffixes_equivalent(workdir, nbdkit):
    """--request-size 128K and 131072 mean the same: both limit requests to 128 KiB."""
    size = 2 * MiB
    src_file = make_image(workdir / "src.raw", size, "random", seed=13)
    for i, spelling in enumerate(("128K", "131072")):
        dlog = workdir / f"dst{i}.log"
        dst = nbdkit("memory", f"size={size}", f"logfile={dlog}", filters=["log"])
        copy_ok("--request-size", spelling, src_file, dst.uri)
        assert_same(src_file, dst.uri)
        _, reqs = read_nbdkit_log(dlog)
        writes = [r.count for r in reqs if r.op == "Write"]
        assert writes and max(writes) == 128 * KiB, (spelling, sorted(set(writes)))


def test_nbd_over_tcp(workdir, nbdkit_tcp):
    """nbd://host:port/export URIs (TCP), both as source and as destination."""
    size = 5 * MiB + 3
    src_file = make_image(workdir / "src.raw", size, "sparse", seed=14)
    src = nbdkit_tcp("file", str(src_file), readonly=True)
    dst = nbdkit_tcp("memory", f"size={size}")
    assert src.uri.startswith("nbd://127.0.0.1:")
    copy_ok(src.uri, dst.uri)
    assert_same(src_file, dst.uri)


@pytest.mark.parametrize("flag", ["--progress", "--progress=bar"])
def test_progress_bar_forms(workdir, flag):
    """`--progress` takes an optional value: a bare --progress before SRC DST must not
    swallow SRC as its value."""
    size = 2 * MiB + 9
    src = make_image(workdir / "src.raw", size, "sparse", seed=15)
    dst = workdir / "dst.raw"
    copy_ok(flag, src, dst)
    assert_same(src, dst)


def test_tls_nbds_psk_both_ways(workdir, nbdkit, zero_copy):
    """nbds+unix:// with a TLS pre-shared key: a copy from and to servers that require
    TLS, with the key file named in the URI; plain nbd:// to them is refused clearly."""
    key = workdir / "keys.psk"
    key.write_text("alice:" + os.urandom(32).hex() + "\n")
    key.chmod(0o600)
    tls = ("--tls=require", f"--tls-psk={key}")
    size = 2 * MiB + 333
    src = nbdkit("pattern", f"size={size}", extra=tls)
    dst = nbdkit("memory", f"size={size}", extra=tls)

    def secure(uri: str) -> str:
        return uri.replace("nbd+unix:///", "nbds+unix://alice@/") + f"&tls-psk-file={key}"

    if zero_copy == "on":
        # TLS stays on libnbd lanes: on refuses, auto falls back
        line = assert_cli_error(run_vmferry("copy", secure(src.uri), secure(dst.uri)), 1)
        assert "zero-copy is not possible" in line and "TLS" in line, line
        copy = cli.copy_ok
    else:
        copy = copy_ok
    copy(secure(src.uri), secure(dst.uri), "--verify")
    plain = workdir / "plain.raw"
    copy(secure(dst.uri), str(plain))
    # read back independently (nbdcopy) through TLS as well
    assert plain.read_bytes() == read_all(secure(src.uri)), "bytes differ after TLS copies"
    line = assert_cli_error(run_vmferry("copy", src.uri, str(workdir / "x.raw")), codes=1)
    assert "TLS" in line, line
