"""--verify: read both sides back and compare checksums.

Both sides are read at once in two threads through the engine's endpoints
(reads release the GIL and hashing large blocks does too), so verifying
costs about one read of the slower side.
"""
from __future__ import annotations

import hashlib
import threading
from typing import Optional

from vmferry._engine import Endpoint
from vmferry.errors import Cancelled, VerifyError

CHUNK = 4 << 20


def checksum(uri: str, size: int, stop: Optional[threading.Event] = None) -> str:
    """BLAKE2b of the first size bytes of uri; raises Cancelled once STOP is set."""
    h = hashlib.blake2b(digest_size=32)
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with Endpoint(uri) as ep:
        off = 0
        while off < size:
            if stop is not None and stop.is_set():
                raise Cancelled("verification cancelled")
            n = min(CHUNK, size - off)
            ep.pread_into(view[:n], off)
            h.update(view[:n])
            off += n
    return h.hexdigest()


def compare(src: str, dst: str, size: int, stop: Optional[threading.Event] = None) -> str:
    """Return the common checksum, or raise VerifyError (Cancelled once STOP is set)."""
    sums: dict[str, str] = {}
    errors: list[BaseException] = []

    def run(key: str, uri: str) -> None:
        try:
            sums[key] = checksum(uri, size, stop)
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=run, args=("dst", dst))
    t.start()
    run("src", src)
    t.join()
    if errors:
        raise errors[0]
    if sums["src"] != sums["dst"]:
        raise VerifyError(f"verification failed: {dst} differs from {src} "
                          f"(checksums {sums['src'][:16]} and {sums['dst'][:16]}); copy again")
    return sums["src"]
