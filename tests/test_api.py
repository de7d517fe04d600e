"""The Python API: vmferry.copy / copy_async, CopyResult, the error classes, Endpoint.

Data are still judged with independent tools (file reads, nbdcopy); only the calls under
test go through vmferry.  Each test has a pytest-timeout limit so a hung engine fails.
"""
from __future__ import annotations

import array
import asyncio
import errno
import shutil
import threading
import time

import pytest

from disk_data import (
    COUNTERS, KiB, MiB, apply_writes, assert_same, check_counters, eio_after,
    make_bitmap_image, make_image, read_all, read_nbdkit_log,
)

pytestmark = pytest.mark.timeout(120)


def _snapshot(c) -> dict:
    return {k: getattr(c, k) for k in COUNTERS}


def run_async(main, timeout: float = 60):
    """asyncio.run(main()) in a daemon thread, so that a copy_async that blocks its event
    loop (or ignores cancellation) fails this test instead of hanging the suite."""
    box = {}

    def target():
        try:
            box["value"] = asyncio.run(main())
        except BaseException as e:          # re-raised in the test's thread
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        pytest.fail(f"the event loop did not finish within {timeout} s "
                    "(copy_async blocked it, or did not react to cancellation)")
    if "error" in box:
        raise box["error"]
    return box["value"]


# --------------------------------------------------------------------------- copy()

def test_copy_result(vmferry, workdir, nbdkit):
    size = 10 * MiB + 321
    src_file = make_image(workdir / "src.raw", size, "sparse", seed=31)
    src = nbdkit("file", str(src_file), readonly=True)
    dst = nbdkit("memory", f"size={size}")
    r = vmferry.copy(src.uri, dst.uri, connections=2, requests=16, request_size=128 * KiB)
    check_counters(r, size)
    assert isinstance(r.seconds, float) and r.seconds >= 0, r.seconds
    assert isinstance(r.connections, int) and 1 <= r.connections <= 2, r.connections
    assert r.connections == 2, "both ends allow multi-conn, 2 connections were asked for"
    assert_same(src_file, dst.uri)


def test_copy_file_to_file(vmferry, workdir):
    size = 3 * MiB + 1
    src = make_image(workdir / "src.raw", size, "sparse", seed=32)
    dst = workdir / "dst.raw"
    r = vmferry.copy(str(src), str(dst))
    check_counters(r, size)
    assert dst.stat().st_size == size
    assert_same(src, dst)


def test_copy_accepts_path_objects(vmferry, workdir):
    src = make_image(workdir / "src.raw", 70000, "random", seed=33)
    dst = workdir / "dst.raw"
    vmferry.copy(src, dst)
    assert_same(src, dst)


def test_zero_detection(vmferry, workdir, qemu_nbd, nbdkit):
    """zero_detect=True takes the libnbd lanes, which find zeroes in read data; by
    default the zero-copy lanes move them as data (they never see the bytes)."""
    size = 4 * MiB
    src = qemu_nbd(make_image(workdir / "z.raw", size, "zero"), readonly=True)
    dst = nbdkit("file", str(make_image(workdir / "dst.raw", size, "fill:0x5a")))
    r = vmferry.copy(src.uri, dst.uri, zero_detect=True)
    check_counters(r, size)
    assert r.bytes_read == size and r.bytes_zeroed > 0, _snapshot(r)
    assert r.path == "libnbd" and not r.zero_copy
    assert read_all(dst.uri) == bytes(size)
    r = vmferry.copy(src.uri, dst.uri)
    assert r.path == "zero-copy" and r.bytes_written == size, _snapshot(r)
    assert read_all(dst.uri) == bytes(size)
    with pytest.raises(vmferry.UsageError, match="zero detection"):
        vmferry.copy(src.uri, dst.uri, zero_detect=True, zero_copy="on")


def test_zero_copy_modes(vmferry, workdir, nbdkit):
    """zero_copy=on/off/auto pick the lanes; auto names why it fell back; the async
    entry point takes the same argument."""
    size = 3 * MiB + 512
    src_file = make_image(workdir / "src.raw", size, "sparse", seed=35)
    dst = nbdkit("memory", f"size={size}")
    for mode, path in (("on", "zero-copy"), ("off", "libnbd"), ("auto", "zero-copy")):
        r = vmferry.copy(str(src_file), dst.uri, zero_copy=mode)
        assert r.path == path, (mode, r)
        assert_same(src_file, dst.uri)
    r = vmferry.copy(str(src_file), "null:")
    assert r.path == "libnbd" and "null:" in r.zero_copy_note, r
    with pytest.raises(vmferry.UsageError, match="auto, on or off"):
        vmferry.copy(str(src_file), dst.uri, zero_copy="yes")

    async def main():
        return await vmferry.copy_async(str(src_file), dst.uri, zero_copy="on")
    assert run_async(main).path == "zero-copy"


def test_progress_callback(vmferry, workdir, nbdkit):
    """progress gets snapshots whose counters never decrease and never pass the result."""
    size = 16 * MiB
    src = nbdkit("sparse-random", f"size={size}", "seed=5", "percent=50", "rdelay=5ms",
                 filters=["delay"])
    dst = nbdkit("memory", f"size={size}")
    calls = []
    r = vmferry.copy(src.uri, dst.uri, connections=1, requests=4, request_size=256 * KiB,
                     progress=lambda s: calls.append(_snapshot(s)))
    assert calls, "the progress callback was never called"
    for k in COUNTERS:
        seq = [c[k] for c in calls]
        assert seq == sorted(seq), f"{k} decreased between progress calls: {seq}"
        assert seq[-1] <= getattr(r, k), (k, seq[-1], getattr(r, k))
    assert all(c["bytes_total"] == size for c in calls), calls[:3]
    assert_same(src.uri, dst.uri)


def test_flush_and_verify(vmferry, workdir, nbdkit):
    size = 2 * MiB + 5
    src_file = make_image(workdir / "src.raw", size, "sparse", seed=34)
    dlog = workdir / "dst.log"
    dst = nbdkit("memory", f"size={size}", f"logfile={dlog}", filters=["log"])
    vmferry.copy(str(src_file), dst.uri, flush=True, verify=True)
    assert_same(src_file, dst.uri)
    _, reqs = read_nbdkit_log(dlog)
    assert any(r.op == "Flush" for r in reqs), "flush=True sent no flush"
    assert sum(1 for r in reqs if r.op == "Read") > 0, "verify=True read nothing back"


def test_bitmap_copy_counters(vmferry, workdir, qsd_bitmap):
    size = 4 * MiB
    writes = [("data", 100 * KiB, 10, 0x42), ("data", 3 * MiB - 1, 2, 0x43)]
    bi = make_bitmap_image(workdir, size, writes, bitmap="b1", base="random")
    src = qsd_bitmap(bi.qcow2, "b1")
    dst = workdir / "dst.raw"
    shutil.copyfile(bi.old_raw, dst)
    r = vmferry.copy(src.uri, str(dst), bitmap="b1")
    dirty = sum(n for _, n in bi.expected_dirty())
    assert dirty == 3 * 64 * KiB
    check_counters(r, size)
    assert r.bytes_skipped == size - dirty, _snapshot(r)
    assert r.bytes_written + r.bytes_zeroed == dirty, _snapshot(r)
    assert read_all(dst) == apply_writes(bi.old_raw.read_bytes(), writes)


# --------------------------------------------------------------------------- errors

def test_error_classes(vmferry):
    from vmferry import errors
    assert vmferry.VmferryError is errors.VmferryError
    assert issubclass(errors.VmferryError, Exception)
    for name in ("UsageError", "ConnectError", "CopyError", "Cancelled", "VerifyError"):
        cls = getattr(errors, name)
        assert issubclass(cls, errors.VmferryError), name
        assert getattr(vmferry, name) is cls, f"vmferry.{name} is not exported"


def test_malformed_uri_raises_usage_error(vmferry, workdir):
    with pytest.raises(vmferry.errors.UsageError):
        vmferry.copy("nbd://localhost:notaport/x", str(workdir / "out.raw"))


def test_unreachable_raises_connect_error(vmferry, workdir):
    sock = workdir / "none.sock"
    with pytest.raises(vmferry.errors.ConnectError) as ei:
        vmferry.copy(f"nbd+unix:///?socket={sock}", str(workdir / "out.raw"))
    assert str(sock) in str(ei.value)


def test_missing_file_raises_connect_error(vmferry, workdir):
    with pytest.raises(vmferry.errors.ConnectError) as ei:
        vmferry.copy(str(workdir / "missing.raw"), "null:")
    assert "missing.raw" in str(ei.value)


def test_unknown_export_raises_connect_error(vmferry, workdir, qemu_nbd):
    srv = qemu_nbd(make_image(workdir / "d.raw", MiB, "random"), name="disk", readonly=True)
    with pytest.raises(vmferry.errors.ConnectError) as ei:
        vmferry.copy(srv.uri_for("other"), "null:")
    assert "other" in str(ei.value)


def test_source_eio_raises_copy_error(vmferry, workdir, nbdkit):
    data = make_image(workdir / "src.raw", 4 * MiB, "random")
    src = eio_after(nbdkit, data, 1 * MiB)
    with pytest.raises(vmferry.errors.CopyError) as ei:
        vmferry.copy(src.uri, "null:", connections=1, request_size=256 * KiB)
    assert ei.value.errno == errno.EIO, (ei.value.errno, str(ei.value))


def test_destination_enospc_raises_copy_error(vmferry, workdir, nbdkit):
    size = 2 * MiB
    src = make_image(workdir / "src.raw", size, "random")
    dst = nbdkit("memory", f"size={size}", "error=ENOSPC", "error-pwrite-rate=100%",
                 "error-zero=ENOSPC", "error-zero-rate=100%", filters=["error"])
    with pytest.raises(vmferry.errors.CopyError) as ei:
        vmferry.copy(str(src), dst.uri)
    assert ei.value.errno == errno.ENOSPC, (ei.value.errno, str(ei.value))


def test_verify_mismatch_raises_verify_error(vmferry, workdir, nbdkit):
    size = 1 * MiB
    src = make_image(workdir / "src.raw", size, "random")
    dst = nbdkit("null", f"size={size}")
    with pytest.raises(vmferry.errors.VerifyError):
        vmferry.copy(str(src), dst.uri, verify=True)


def test_smaller_destination_raises(vmferry, workdir, nbdkit):
    src = make_image(workdir / "src.raw", 2 * MiB, "random")
    dst = nbdkit("memory", f"size={MiB}")
    with pytest.raises(vmferry.VmferryError) as ei:
        vmferry.copy(str(src), dst.uri)
    assert "smaller" in str(ei.value).lower()


def test_read_only_destination_raises(vmferry, workdir, qemu_nbd):
    src = make_image(workdir / "src.raw", MiB, "random")
    dst = qemu_nbd(make_image(workdir / "dst.raw", MiB, "zero"), readonly=True)
    with pytest.raises(vmferry.VmferryError) as ei:
        vmferry.copy(str(src), dst.uri)
    assert "read-only" in str(ei.value).lower()


def test_unknown_bitmap_raises(vmferry, workdir, qsd_bitmap):
    bi = make_bitmap_image(workdir, MiB, [("data", 0, 512, 1)], bitmap="b1")
    src = qsd_bitmap(bi.qcow2, "b1")
    with pytest.raises(vmferry.VmferryError) as ei:
        vmferry.copy(src.uri, "null:", bitmap="nope")
    assert "nope" in str(ei.value)


# --------------------------------------------------------------------------- copy_async()

def test_copy_async_result(vmferry, workdir, nbdkit):
    size = 6 * MiB + 3
    src_file = make_image(workdir / "src.raw", size, "sparse", seed=35)
    dst = nbdkit("memory", f"size={size}")
    async def main():
        return await vmferry.copy_async(str(src_file), dst.uri)

    r = run_async(main)
    check_counters(r, size)
    assert_same(src_file, dst.uri)


@pytest.mark.parametrize("warm", [True, False])
def test_copy_async_warm_servers(vmferry, workdir, nbdkit, warm):
    """warm_servers=False (a migration's later passes) leaves out the one 31 MiB read a
    server that takes 32 MiB requests gets first; the copy is the same either way."""
    size = 40 * MiB
    src_file = make_image(workdir / "src.raw", size, "random", seed=36)
    log = workdir / "dst.log"
    dst = nbdkit("memory", f"size={size}", "blocksize-maximum=32M", f"logfile={log}",
                 filters=["log", "blocksize-policy"])
    async def main():
        return await vmferry.copy_async(str(src_file), dst.uri, warm_servers=warm)

    run_async(main)
    assert_same(src_file, dst.uri)
    _, reqs = read_nbdkit_log(log)
    big = [r for r in reqs if r.op == "Read" and r.count == 31 * MiB]
    assert len(big) == (1 if warm else 0), [(r.op, r.count) for r in reqs[:4]]


def test_copy_async_does_not_block_the_loop(vmferry, nbdkit):
    """While the copy runs, other coroutines keep running (the engine is off the loop)."""
    size = 8 * MiB
    # one request at a time, 50 ms each: 32 reads of 256 KiB take >= 1.6 s
    src = nbdkit("pattern", f"size={size}", "rdelay=50ms", "serialize=all-requests",
                 filters=["noparallel", "delay"])
    dst = nbdkit("memory", f"size={size}")

    async def main():
        gaps, last, stop = [], time.monotonic(), False

        async def ticker():
            nonlocal last
            while not stop:
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        t = asyncio.create_task(ticker())
        t0 = time.monotonic()
        r = await vmferry.copy_async(src.uri, dst.uri, connections=1, requests=1,
                                     request_size=256 * KiB)
        took = time.monotonic() - t0
        stop = True
        await t
        return r, took, gaps

    r, took, gaps = run_async(main)
    check_counters(r, size)
    assert took > 1.0, f"copy took {took:.2f} s: too fast for this test to mean anything"
    assert gaps, "the ticker never ran: the copy blocked the event loop throughout"
    assert max(gaps) < 0.5, f"the event loop was blocked for {max(gaps):.2f} s"
    assert_same(src.uri, dst.uri)


def test_copy_async_cancel(vmferry, workdir, nbdkit):
    """Cancelling the task raises CancelledError promptly and the copy really stops."""
    log = workdir / "src.log"
    src = nbdkit("pattern", "size=64G", "rdelay=100ms", f"logfile={log}",
                 filters=["log", "delay"])

    def reads():
        return sum(1 for r in read_nbdkit_log(log)[1] if r.op == "Read")

    async def main():
        task = asyncio.create_task(vmferry.copy_async(src.uri, "null:"))
        deadline = time.monotonic() + 30
        while reads() == 0:
            assert not task.done(), f"copy ended early: {task}"
            assert time.monotonic() < deadline, "copy never started reading"
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
        task.cancel()
        t0 = time.monotonic()
        done, _ = await asyncio.wait({task}, timeout=10)
        elapsed = time.monotonic() - t0
        assert done, "the cancelled copy had not ended 10 s later"
        with pytest.raises(asyncio.CancelledError):
            task.result()
        return elapsed

    elapsed = run_async(main, timeout=45)
    assert elapsed < 5, f"cancellation took {elapsed:.1f} s"
    # requests already queued in the server drain within about a second; after that
    # a cancelled copy sends nothing more
    time.sleep(1.5)
    n = reads()
    time.sleep(1.0)
    assert reads() == n, "the copy kept reading after its task was cancelled"


def test_copy_async_rate(vmferry, workdir, nbdkit):
    """rate=16M: 48 MiB of data take about 3 s over four connections, and arrive whole."""
    size = 48 * MiB
    src_file = make_image(workdir / "src.raw", size, "random", seed=53)
    src = nbdkit("file", str(src_file), readonly=True)
    dst = nbdkit("memory", f"size={size}")

    async def main():
        t0 = time.monotonic()
        r = await vmferry.copy_async(src.uri, dst.uri, connections=4, rate="16M")
        return r, time.monotonic() - t0

    r, took = run_async(main)
    check_counters(r, size)
    assert took >= 2.5, f"48 MiB at 16 MiB/s took only {took:.2f} s"
    assert took < 10, f"48 MiB at 16 MiB/s took {took:.2f} s"
    assert_same(src_file, dst.uri)
    with pytest.raises(vmferry.UsageError, match="rate"):
        vmferry.copy(src.uri, dst.uri, rate=0)


def test_copy_async_cancelled_twice_waits_for_the_engine(vmferry, workdir, nbdkit,
                                                         monkeypatch):
    """Two Ctrl-C's in quick succession: the task ends only after the engine has drained
    and its copier is closed (the half-made destination file is gone), never while the
    engine's threads still use it."""
    from vmferry import _engine
    src = nbdkit("pattern", "size=1G", "rdelay=500ms", filters=["delay"])
    dst = workdir / "new.raw"
    runs = []

    class Watched(_engine.Copier):
        def run(self):
            runs.append(self)
            try:
                super().run()
            finally:
                self.returned = True

    monkeypatch.setattr(_engine, "Copier", Watched)

    async def main():
        task = asyncio.create_task(vmferry.copy_async(src.uri, str(dst)))
        seen = {}
        task.add_done_callback(lambda t: seen.update(
            returned=bool(runs) and getattr(runs[0], "returned", False),
            dst_left=dst.exists()))
        await wait_for_async(lambda: runs and dst.exists(), "the copy to start")
        await asyncio.sleep(0.2)          # reads are in flight for another 300 ms
        task.cancel()
        await asyncio.sleep(0.05)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=10)
        assert done, "the twice-cancelled copy had not ended 10 s later"
        with pytest.raises(asyncio.CancelledError):
            task.result()
        return seen

    seen = run_async(main, timeout=45)
    assert seen["returned"], "copy_async ended while the engine was still running"
    assert not seen["dst_left"], "the copier was not closed when copy_async ended"
    with pytest.raises(vmferry.UsageError):
        runs[0].counters()


async def wait_for_async(predicate, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def test_copy_async_cancelled_while_verifying(vmferry, workdir, nbdkit):
    """A task cancelled during verify=True stops reading back: nothing more is read
    once it has ended."""
    size = 32 * MiB
    src = nbdkit("pattern", f"size={size}")
    log = workdir / "dst.log"
    dst = nbdkit("memory", f"size={size}", "rdelay=300ms", f"logfile={log}",
                 filters=["log", "delay"])

    def reads():
        return sum(1 for r in read_nbdkit_log(log)[1] if r.op == "Read")

    async def main():
        task = asyncio.create_task(vmferry.copy_async(src.uri, dst.uri, verify=True))
        await wait_for_async(lambda: reads() > 0, "the read-back to start")
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=10)
        assert done, "the cancelled verification had not ended 10 s later"
        with pytest.raises(asyncio.CancelledError):
            task.result()
        return reads()

    n = run_async(main)
    time.sleep(1.0)
    assert reads() == n, "the read-back went on after the task had ended"


def test_copier_close_from_another_thread_during_run(vmferry, nbdkit):
    """close() while run() works cancels the run; the copier is freed once it returns."""
    from vmferry import _engine
    src = nbdkit("pattern", "size=64G", "rdelay=200ms", filters=["delay"])
    c = _engine.Copier(src.uri, "null:")
    closer = threading.Timer(0.5, c.close)
    closer.start()
    t0 = time.monotonic()
    with pytest.raises(vmferry.Cancelled):
        c.run()
    assert time.monotonic() - t0 < 5
    closer.join()
    with pytest.raises(vmferry.UsageError, match="closed"):
        c.counters()
    c.close()                               # a second close is harmless


def test_endpoint_warm_reads_a_hole_once(vmferry, workdir, nbdkit):
    """Endpoint.warm() (sent to the destination before QEMU's mirror writes into it):
    one 31 MiB read, into the export's first hole that long, and nothing else; on a
    server that does not take 32 MiB requests, nothing at all."""
    size = 80 * MiB
    image = make_image(workdir / "dst.raw", 8 * MiB, "random", seed=37)
    with open(image, "r+b") as f:
        f.truncate(size)                       # data in the first 8 MiB, then a hole
    log, log2 = workdir / "dst.log", workdir / "plain.log"
    big = nbdkit("file", str(image), "blocksize-maximum=32M", f"logfile={log}",
                 filters=["log", "blocksize-policy"])
    plain = nbdkit("memory", f"size={size}", f"logfile={log2}", filters=["log"])
    for server in (big, plain):
        with vmferry.Endpoint(server.uri, writable=True) as ep:
            ep.warm()
    reads = [r for r in read_nbdkit_log(log)[1] if r.op in ("Read", "Write")]
    assert [(r.op, r.offset, r.count) for r in reads] == [("Read", 8 * MiB, 31 * MiB)]
    assert [r for r in read_nbdkit_log(log2)[1] if r.op in ("Read", "Write")] == []


def test_endpoint_close_during_a_read(vmferry, nbdkit):
    """Closing an Endpoint while another thread reads lets the read finish first."""
    src = nbdkit("pattern", "size=1M", "rdelay=500ms", filters=["delay"])
    ep = vmferry.Endpoint(src.uri)
    buf = bytearray(4096)
    reader = threading.Thread(target=ep.pread_into, args=(buf, 8))
    reader.start()
    time.sleep(0.2)
    ep.close()
    reader.join(10)
    assert not reader.is_alive()
    # nbdkit's pattern plugin: each 8-byte word holds its own offset, big-endian
    assert buf[:8] == (8).to_bytes(8, "big"), "the read did not complete"
    with pytest.raises(vmferry.UsageError, match="closed"):
        ep.pread_into(buf, 0)


# --------------------------------------------------------------------------- Endpoint

def test_endpoint_nbd_read_write(vmferry, workdir, nbdkit):
    size = 1 * MiB + 5
    dst_file = make_image(workdir / "ep.raw", size, "random", seed=36)
    model = bytearray(dst_file.read_bytes())
    srv = nbdkit("file", str(dst_file))
    with vmferry.Endpoint(srv.uri, writable=True) as ep:
        assert ep.size == size

        buf = bytearray(4096)
        assert ep.pread_into(buf, 100) is None
        assert buf == model[100:4196]

        big = bytearray(b"\xff" * 10000)                    # read into a slice only
        ep.pread_into(memoryview(big)[1000:3000], 5)
        assert big[1000:3000] == model[5:2005]
        assert big[:1000] == b"\xff" * 1000 and big[3000:] == b"\xff" * 7000, \
            "pread_into wrote outside the buffer it was given"

        arr = array.array("B", bytes(512))
        ep.pread_into(arr, size - 512)                      # up to the very last byte
        assert arr.tobytes() == model[-512:]

        ep.pwrite(b"hello", 1000)
        model[1000:1005] = b"hello"
        ep.pwrite(bytearray(b"\x01" * 9000), 4000)          # crosses 4 KiB blocks
        model[4000:13000] = b"\x01" * 9000
        tail = bytes(range(256)) * 20
        ep.pwrite(memoryview(tail)[10:4990], size - 4980)   # ends exactly at the end
        model[size - 4980:] = tail[10:4990]
        ep.zero(20000, 70001)
        model[20000:90001] = bytes(70001)
        ep.flush()

        back = bytearray(size)
        ep.pread_into(back, 0)
        assert back == model
    assert read_all(srv.uri) == bytes(model)       # seen by an independent reader too
    assert dst_file.read_bytes() == bytes(model)


def test_endpoint_file(vmferry, workdir):
    size = 300000
    path = make_image(workdir / "f.raw", size, "random", seed=37)
    model = bytearray(path.read_bytes())
    ep = vmferry.Endpoint(str(path), writable=True)
    try:
        assert ep.size == size
        buf = bytearray(777)
        ep.pread_into(buf, 12345)
        assert buf == model[12345:13122]
        ep.pwrite(b"\xaa" * 100, 299900)
        ep.zero(0, 10)
        ep.flush()
    finally:
        ep.close()
    model[299900:] = b"\xaa" * 100
    model[:10] = bytes(10)
    assert path.read_bytes() == bytes(model)
    assert path.stat().st_size == size


def test_endpoint_read_only(vmferry, workdir, nbdkit):
    path = make_image(workdir / "ro.raw", 65536, "random", seed=38)
    before = path.read_bytes()
    srv = nbdkit("file", str(path))
    with vmferry.Endpoint(srv.uri) as ep:                   # writable=False by default
        with pytest.raises(vmferry.VmferryError):
            ep.pwrite(b"x", 0)
        with pytest.raises(vmferry.VmferryError):
            ep.zero(0, 4096)
    assert path.read_bytes() == before


def test_endpoint_bounds(vmferry, workdir, nbdkit):
    """Out-of-range I/O is refused cleanly, never written past the end, never a crash."""
    size = 64 * KiB + 3
    path = make_image(workdir / "b.raw", size, "random", seed=39)
    before = path.read_bytes()
    srv = nbdkit("file", str(path))
    with vmferry.Endpoint(srv.uri, writable=True) as ep:
        with pytest.raises(vmferry.VmferryError):
            ep.pread_into(bytearray(20), size - 10)
        with pytest.raises(vmferry.VmferryError):
            ep.pwrite(b"y" * 20, size - 10)
        with pytest.raises(vmferry.VmferryError):
            ep.zero(size - 1, 2)
        with pytest.raises((TypeError, BufferError, ValueError)):
            ep.pread_into(b"read-only buffer", 0)           # bytes are immutable
    assert path.stat().st_size == size
    assert path.read_bytes() == before


def test_endpoint_unreachable(vmferry, workdir):
    with pytest.raises(vmferry.errors.ConnectError):
        vmferry.Endpoint(f"nbd+unix:///?socket={workdir / 'none.sock'}")
