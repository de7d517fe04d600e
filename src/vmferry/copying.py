"""vmferry.copy(): move disk data between NBD servers, files and null:.

The C engine does the work in its own threads without the GIL; this module
validates arguments, runs the engine in a helper thread so the caller's
thread stays free to show progress and react to Ctrl-C or task
cancellation, and optionally verifies the result.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from typing import Callable, Literal, Optional, TypeVar

from vmferry import _engine
from vmferry.errors import UsageError
from vmferry.units import parse_size

# How often progress callbacks run while a copy is going.
PROGRESS_INTERVAL = 0.2

T = TypeVar("T")

ZeroCopy = Literal["auto", "on", "off"]
ZERO_COPY_MODES = ("auto", "on", "off")


@dataclasses.dataclass
class CopyResult:
    """What a copy did, in bytes; also the snapshot given to progress callbacks."""

    bytes_total: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    bytes_zeroed: int = 0
    bytes_skipped: int = 0
    seconds: float = 0.0
    connections: int = 0
    verified: Optional[bool] = None
    checksum: Optional[str] = None
    # every byte from the copy's start up to here is copied: what a copy that
    # stopped early (cancelled, or failed) leaves valid, to resume from
    done_below: int = 0
    zero_copy: bool = False     # the data moved on zero-copy lanes
    zero_copy_note: str = ""    # why not, when it did not

    @property
    def path(self) -> str:
        """Which lanes carried the data: "zero-copy" or "libnbd"."""
        return "zero-copy" if self.zero_copy else "libnbd"

    @property
    def bytes_done(self) -> int:
        """Bytes of the source that are finished one way or another."""
        return self.bytes_written + self.bytes_zeroed + self.bytes_skipped

    @property
    def throughput(self) -> float:
        """Source bytes covered per second."""
        return self.bytes_total / self.seconds if self.seconds > 0 else 0.0

    def as_event(self, event: str) -> dict:
        d = dataclasses.asdict(self)
        d["event"] = event
        d["done"] = self.bytes_done
        d["total"] = self.bytes_total
        d["label"] = "copy"
        d["rate"] = self.bytes_done / self.seconds if self.seconds > 0 else 0
        d["path"] = self.path
        return d


ProgressFn = Callable[[CopyResult], None]


def _snapshot(copier: "_engine.Copier", start: float) -> CopyResult:
    total, read, written, zeroed, skipped, done_below = copier.counters()
    return CopyResult(total, read, written, zeroed, skipped,
                      time.monotonic() - start, copier.connections, done_below=done_below,
                      zero_copy=copier.zero_copy, zero_copy_note=copier.zero_copy_note)


def _open(src: str, dst: str, connections: Optional[int], requests: Optional[int],
          request_size: Optional[int | str], bitmap: Optional[str], allocated: bool,
          destination_is_zero: bool, flush: bool, threads: Optional[int],
          zero_detect: Optional[bool], force_multi_conn: bool = False,
          extents_from: Optional[str] = None,
          rate: Optional[int | str] = None,
          span: Optional[tuple[int, int]] = None,
          zero_copy: ZeroCopy = "auto", warm_servers: bool = True) -> "_engine.Copier":
    for name, value in (("connections", connections), ("requests", requests),
                        ("threads", threads)):
        if value is not None and value < 1:
            raise UsageError(f"{name} must be at least 1, not {value}")
    rsize = parse_size(request_size, "request size") if request_size is not None else 0
    bps = parse_size(rate, "rate") if rate is not None else 0
    if rate is not None and bps <= 0:
        raise UsageError(f"rate must be a positive number of bytes per second, not {rate}")
    if zero_copy not in ZERO_COPY_MODES:
        raise UsageError(f"zero_copy must be auto, on or off, not {zero_copy!r}")
    if zero_detect:
        # Finding zeroes in data needs the bytes in this process, which
        # zero-copy lanes never have.
        if zero_copy == "on":
            raise UsageError("zero detection needs the bytes: not with zero_copy='on'")
        zero_copy = "off"
    return _engine.Copier(
        str(src), str(dst), connections=connections or 0, threads=threads or 0,
        requests=requests or 0, request_size=rsize, bitmap=bitmap,
        extents_from=extents_from, allocated=allocated, destination_is_zero=destination_is_zero,
        flush=flush, zero_detect=zero_detect is not False,
        force_multi_conn=force_multi_conn, rate=bps,
        range_start=span[0] if span else 0, range_end=span[1] if span else 0,
        zero_copy=zero_copy, warm_servers=warm_servers)


def _wait_uninterrupted(event: threading.Event) -> None:
    """Wait for the engine to drain even through further Ctrl-Cs."""
    while True:
        try:
            if event.wait(0.1):
                return
        except KeyboardInterrupt:
            continue


def _verify(src: str, dst: str, result: CopyResult,
            stop: Optional[threading.Event] = None) -> None:
    from vmferry.verify import compare
    result.checksum = compare(src, dst, result.bytes_total, stop)
    result.verified = True


def copy(src: str, dst: str, *, connections: Optional[int] = None,
         requests: Optional[int] = None, request_size: Optional[int | str] = None,
         bitmap: Optional[str] = None, allocated: bool = False,
         destination_is_zero: bool = False, flush: bool = False, verify: bool = False,
         progress: Optional[ProgressFn] = None, threads: Optional[int] = None,
         zero_detect: Optional[bool] = None, extents_from: Optional[str] = None,
         rate: Optional[int | str] = None, zero_copy: ZeroCopy = "auto") -> CopyResult:
    """Copy src to dst and return what moved.

    src and dst are NBD URIs (nbd://, nbds://, nbd+unix://), paths, or
    null: (destination only).  A missing destination file is created with
    the source's size.  extents_from: an NBD URI whose block status (with
    BITMAP) says what to copy while the bytes are read from SRC.  rate: bytes
    per second for all connections together (a size: "16M"), None for no
    limit; data counts as it is read, zero ranges only when sent as written
    zeroes, skipped ranges not at all.  zero_copy: "auto" moves the data on
    zero-copy lanes (sendfile/splice; the bytes never enter this process)
    where both ends allow and on libnbd lanes otherwise, "on" fails where it
    cannot, "off" always uses libnbd; result.path says which ran.
    zero_detect: None finds zero blocks in read data on libnbd lanes only
    (zero-copy lanes plan from extents alone); True insists on it (libnbd
    lanes), False never.  Raises a vmferry.VmferryError subclass on failure;
    KeyboardInterrupt cancels the copy cleanly and is re-raised.
    """
    if verify and dst == "null:":
        raise UsageError("--verify needs a destination that can be read back, not null:")
    start = time.monotonic()
    copier = _open(src, dst, connections, requests, request_size, bitmap, allocated,
                   destination_is_zero, flush, threads, zero_detect,
                   extents_from=extents_from, rate=rate, zero_copy=zero_copy)
    failure: list[BaseException] = []
    # An Event, not Thread.join(): a join interrupted by Ctrl-C may later
    # return while the thread still runs, and the engine must never be
    # closed under a running copy.
    finished = threading.Event()

    def body() -> None:
        try:
            copier.run()
        except BaseException as e:  # handed to the caller's thread
            failure.append(e)
        finally:
            finished.set()

    t = threading.Thread(target=body, name="vmferry-copy", daemon=True)
    try:
        t.start()
        try:
            while not finished.wait(PROGRESS_INTERVAL):
                if progress is not None:
                    progress(_snapshot(copier, start))
            if progress is not None:
                progress(_snapshot(copier, start))
        except BaseException:
            # Ctrl-C or an exception from the progress callback: stop the
            # engine, let in-flight requests drain, then pass it on.
            copier.cancel()
            _wait_uninterrupted(finished)
            raise
        if failure:
            raise failure[0]
        result = _snapshot(copier, start)
    finally:
        copier.close()
    if verify:
        _verify(src, dst, result)
    result.seconds = time.monotonic() - start
    return result


async def _in_thread(fut: "asyncio.Future[T]", stop: Callable[[], None],
                    tick: Optional[Callable[[], None]] = None) -> T:
    """The result of FUT, work in an executor thread, calling TICK meanwhile.

    When cancelled (or TICK raises), STOP() asks the work to end and this
    waits until it has, through any further cancellations (a second Ctrl-C),
    before passing the first one on: until then the thread still uses the
    copier, its buffers and its connections, and the caller must not go on
    as if it had stopped."""
    import asyncio
    try:
        while True:
            done, _ = await asyncio.wait({fut}, timeout=PROGRESS_INTERVAL if tick else None)
            if tick is not None:
                tick()
            if done:
                return fut.result()
    except BaseException:
        stop()
        while not fut.done():
            try:
                await asyncio.wait({fut})
            except asyncio.CancelledError:
                continue
        fut.exception()   # retrieved, so not logged: the caller gets the cancellation
        raise


async def copy_async(src: str, dst: str, *, connections: Optional[int] = None,
                     requests: Optional[int] = None,
                     request_size: Optional[int | str] = None,
                     bitmap: Optional[str] = None, allocated: bool = False,
                     destination_is_zero: bool = False, flush: bool = False,
                     verify: bool = False, progress: Optional[ProgressFn] = None,
                     threads: Optional[int] = None,
                     zero_detect: Optional[bool] = None,
                     force_multi_conn: bool = False,
                     extents_from: Optional[str] = None,
                     rate: Optional[int | str] = None,
                     span: Optional[tuple[int, int]] = None,
                     zero_copy: ZeroCopy = "auto",
                     warm_servers: bool = True) -> CopyResult:
    """copy() for asyncio: never blocks the loop; cancelling the task
    cancels the copy and waits for in-flight requests to drain.
    force_multi_conn: open several connections even where a server does not
    advertise multi-conn, for callers that know one server process (one
    QEMU block layer) serves them all.  zero_copy and zero_detect: as copy().
    extents_from: an NBD URI whose block status (with BITMAP) says what to
    copy, while the data is read from SRC (e.g. a raw image file that the
    QEMU exporting the bitmap has open).
    span: (start, end) bytes of the source to copy, end 0 for its end.
    warm_servers=False leaves out the one 31 MiB read that keeps a QEMU NBD
    server's request buffers in its heap (ext/nbd_ops.c): for servers an
    earlier copy already sent it, and where its time counts.
    A copy that fails or is cancelled leaves its last counters (CopyResult,
    with done_below) on the exception as .partial."""
    import asyncio   # here, not at the top: it costs the CLI 50 ms of start-up
    loop = asyncio.get_running_loop()
    if verify and dst == "null:":
        raise UsageError("--verify needs a destination that can be read back, not null:")
    start = time.monotonic()
    copier = await loop.run_in_executor(
        None, _open, src, dst, connections, requests, request_size, bitmap, allocated,
        destination_is_zero, flush, threads, zero_detect, force_multi_conn, extents_from, rate,
        span, zero_copy, warm_servers)
    try:
        await _in_thread(loop.run_in_executor(None, copier.run), copier.cancel,
                         (lambda: progress(_snapshot(copier, start))) if progress else None)
        result = _snapshot(copier, start)
    except BaseException as e:
        # the run has ended (_in_thread waits for it): these counters are final
        e.partial = _snapshot(copier, start)    # type: ignore[attr-defined]
        raise
    finally:
        copier.close()
    if verify:
        stop = threading.Event()
        await _in_thread(loop.run_in_executor(None, _verify, src, dst, result, stop), stop.set)
    result.seconds = time.monotonic() - start
    return result
