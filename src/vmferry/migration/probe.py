"""A dry run's short measurements, for its estimate of the time a migration
takes: how fast the source images read, and how fast the path to the
destination carries data.  Each is bounded in time (a fraction of a second)
and reads or sends only scratch data: nothing is written anywhere.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from typing import Optional

CHUNK = 1 << 20


def disk_read_rate(paths: list[str], seconds: float) -> Optional[float]:
    """Bytes per second read from the data (not the holes) of PATHS, the
    images shared out in turn, for about SECONDS in all; None when nothing
    could be read.  Mostly the page cache for a warm image: an upper bound."""
    if not paths:
        return None
    done = 0
    start = time.monotonic()
    budget = seconds / len(paths)
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            done += _read_data(fd, start + budget * (paths.index(path) + 1))
        finally:
            os.close(fd)
    took = time.monotonic() - start
    return done / took if done and took > 0 else None


def _read_data(fd: int, deadline: float) -> int:
    done = 0
    offset = 0
    buf = bytearray(CHUNK)
    while time.monotonic() < deadline:
        try:
            offset = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError:
            break               # ENXIO: no data past OFFSET
        n = os.preadv(fd, [buf], offset)
        if n <= 0:
            break
        done += n
        offset += n
    return done


def local_stream_rate(seconds: float) -> Optional[float]:
    """Bytes per second through a Unix socket on this host: what a local://
    migration's streams (QEMU to QEMU, or to the engine) run over."""
    a, b = socket.socketpair()
    received = [0]

    def drain() -> None:
        while True:
            data = b.recv(CHUNK)
            if not data:
                return
            received[0] += len(data)
    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    payload = b"\0" * CHUNK
    start = time.monotonic()
    try:
        while time.monotonic() - start < seconds:
            a.sendall(payload)
    finally:
        a.close()
        reader.join(5)
        b.close()
    took = time.monotonic() - start
    return received[0] / took if took > 0 else None
