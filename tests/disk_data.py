"""What disks hold, made and judged without vmferry: images of known layouts,
reads, digests, extents and dirty bitmaps, and a finished copy's counters.

Everything that judges a copy reads the data with a tool other than vmferry: plain
file reads for files, ``nbdcopy URI -`` for NBD servers, ``nbdinfo --map`` for
extents and dirty bitmaps, ``qemu-img``/``qemu-io`` to build qcow2 images with
bitmaps, the nbdkit log filter to see exactly which requests reached a server.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import subprocess
from pathlib import Path
from typing import Iterable, Sequence

from servers import require_tool

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

TOOL_TIMEOUT = 120        # seconds for any helper tool invocation

URI_PREFIXES = ("nbd://", "nbds://", "nbd+unix://", "nbds+unix://", "nbd+vsock://",
                "nbds+vsock://")


def is_uri(target) -> bool:
    return isinstance(target, str) and target.startswith(URI_PREFIXES)


# --------------------------------------------------------------------------- images

@dataclasses.dataclass(frozen=True)
class Region:
    offset: int
    length: int
    kind: str            # "data" | "zero" (allocated zero bytes) | "hole" (never written)

    @property
    def end(self) -> int:
        return self.offset + self.length


def sparse_layout(size: int, seed: int = 0) -> list[Region]:
    """A deterministic mix of data, allocated-zero and hole regions covering SIZE bytes.

    Region boundaries fall at odd offsets on purpose (no alignment assumed), holes are
    long enough that the filesystem keeps most of them as real holes, and the image
    always ends with a short data region so the odd tail has to be copied as data.
    """
    rng = random.Random(seed)
    regions: list[Region] = []
    if size == 0:
        return regions
    tail = min(size, rng.randint(1, 777))
    body = size - tail
    off = 0
    kinds = ["data", "hole", "zero", "hole", "data", "zero", "hole"]
    i = rng.randrange(len(kinds))
    while off < body:
        kind = kinds[i % len(kinds)]
        i += 1
        hi = max(1, body // 6)
        n = min(body - off, rng.randint(max(1, hi // 8), hi) + rng.randint(0, 4095))
        regions.append(Region(off, n, kind))
        off += n
    regions.append(Region(body, tail, "data"))
    return regions


def write_layout(path: str | os.PathLike, size: int, regions: Iterable[Region],
                 seed: int = 0, fill: int | None = None) -> Path:
    """Create PATH of exactly SIZE bytes: data regions get random bytes (from SEED)
    or the byte FILL; zero regions are written as zero bytes; holes are left unwritten."""
    rng = random.Random(seed ^ 0x5EED)
    path = Path(path)
    with open(path, "wb") as f:
        f.truncate(size)
        for r in regions:
            if r.kind == "hole" or r.length == 0:
                continue
            done = 0
            while done < r.length:
                n = min(4 * MiB, r.length - done)
                if r.kind == "data":
                    buf = bytes([fill]) * n if fill is not None else rng.randbytes(n)
                elif r.kind == "zero":
                    buf = bytes(n)
                else:
                    raise ValueError(f"unknown region kind {r.kind!r}")
                os.pwrite(f.fileno(), buf, r.offset + done)
                done += n
    assert path.stat().st_size == size
    return path


def make_image(path: str | os.PathLike, size: int, pattern: str = "random",
               seed: int = 0, fmt: str = "raw") -> Path:
    """An image of exactly SIZE bytes (virtual), raw or, with FMT, converted
    from one (qemu-img convert keeps its holes unallocated).

    pattern: "random" - fully allocated random data;
             "zero"   - fully allocated zero bytes (zeros *written as data*, no holes);
             "sparse" - a mix of random data, allocated zeros and holes (sparse_layout);
             "hole"   - nothing allocated at all;
             "fill:0xNN" - fully allocated, every byte NN.
    """
    if fmt != "raw":
        raw = Path(path).with_suffix(".tmp.raw")
        make_image(raw, size, pattern, seed)
        subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", fmt, str(raw),
                        str(path)], check=True, timeout=TOOL_TIMEOUT)
        raw.unlink()
        return Path(path)
    if pattern == "random":
        regions = [Region(0, size, "data")] if size else []
        return write_layout(path, size, regions, seed)
    if pattern == "zero":
        return write_layout(path, size, [Region(0, size, "zero")] if size else [], seed)
    if pattern == "sparse":
        return write_layout(path, size, sparse_layout(size, seed), seed)
    if pattern == "hole":
        return write_layout(path, size, [], seed)
    if pattern.startswith("fill:"):
        byte = int(pattern[5:], 0)
        return write_layout(path, size, [Region(0, size, "data")] if size else [], seed,
                            fill=byte)
    raise ValueError(f"unknown pattern {pattern!r}")


# --------------------------------------------------------------------------- reading

def read_all(target, timeout: float = TOOL_TIMEOUT) -> bytes:
    """All bytes of a file path or an NBD URI, read without vmferry (nbdcopy for NBD)."""
    if is_uri(target):
        nbdcopy = require_tool("nbdcopy", "needed to read NBD exports independently")
        cp = subprocess.run([nbdcopy, target, "-"], stdin=subprocess.DEVNULL,
                            capture_output=True, timeout=timeout)
        if cp.returncode != 0:
            raise AssertionError(f"nbdcopy could not read {target}: "
                                 f"{cp.stderr.decode(errors='replace').strip()}")
        return cp.stdout
    return Path(target).read_bytes()


def digest(target, timeout: float = TOOL_TIMEOUT) -> str:
    return hashlib.sha256(read_all(target, timeout)).hexdigest()


def export_size(target) -> int:
    if is_uri(target):
        nbdinfo = require_tool("nbdinfo")
        cp = subprocess.run([nbdinfo, "--size", target], capture_output=True, text=True,
                            timeout=TOOL_TIMEOUT, stdin=subprocess.DEVNULL)
        assert cp.returncode == 0, cp.stderr
        return int(cp.stdout.strip())
    return os.stat(target).st_size


def first_difference(a: bytes, b: bytes) -> int | None:
    """Offset of the first differing byte in the common prefix, None if it matches."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return None
    lo, hi = 0, n       # binary search on chunk equality, cheap even for 64 MiB
    while hi - lo > 4096:
        mid = (lo + hi) // 2
        if a[lo:mid] != b[lo:mid]:
            hi = mid
        else:
            lo = mid
    for i in range(lo, hi):
        if a[i] != b[i]:
            return i
    return None


def describe_difference(a: bytes, b: bytes, names=("a", "b")) -> str:
    parts = []
    if len(a) != len(b):
        parts.append(f"sizes differ: {names[0]} {len(a)} bytes, {names[1]} {len(b)} bytes")
    off = first_difference(a, b)
    if off is not None:
        n = min(len(a), len(b))
        ndiff = sum(1 for i in range(0, n, 4096) if a[i:i + 4096] != b[i:i + 4096])
        parts.append(f"first difference at offset {off} ({names[0]}={a[off]:#04x}, "
                     f"{names[1]}={b[off]:#04x}); {ndiff} of {-(-n // 4096)} 4 KiB "
                     f"blocks differ")
    return "; ".join(parts) or "identical"


def assert_same(src, dst, length: int | None = None, *, expect: bytes | None = None) -> None:
    """SRC and DST (paths or URIs) hold the same bytes, compared in full.

    With LENGTH only the first LENGTH bytes of each are compared (a larger destination).
    With EXPECT, DST is compared to those bytes instead of to SRC.
    """
    a = read_all(src) if expect is None else expect
    b = read_all(dst)
    if length is not None:
        assert len(a) >= length and len(b) >= length, (len(a), len(b), length)
        a, b = a[:length], b[:length]
    if a != b:
        raise AssertionError(f"{src if expect is None else 'expected'} != {dst}: "
                             + describe_difference(a, b, ("source", "destination")))


# --------------------------------------------------------------------------- allocation

def allocated_bytes(path) -> int:
    """Bytes the filesystem allocated to PATH (st_blocks), unwritten extents included."""
    return os.stat(path).st_blocks * 512


def data_ranges(path) -> list[tuple[int, int]]:
    """(offset, length) of the data ranges of PATH by SEEK_DATA/SEEK_HOLE."""
    out = []
    with open(path, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        off = 0
        while off < size:
            try:
                d = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:
                break
            h = os.lseek(fd, d, os.SEEK_HOLE)
            out.append((d, h - d))
            off = h
    return out


def nbd_map(uri: str, context: str = "base:allocation") -> list[dict]:
    """nbdinfo --map=CONTEXT --json URI: a list of {offset, length, type, description}."""
    nbdinfo = require_tool("nbdinfo", "needed to read NBD block status independently")
    cp = subprocess.run([nbdinfo, f"--map={context}", "--json", uri], capture_output=True,
                        text=True, timeout=TOOL_TIMEOUT, stdin=subprocess.DEVNULL)
    if cp.returncode != 0:
        raise AssertionError(f"nbdinfo --map={context} {uri} failed: {cp.stderr.strip()}")
    return json.loads(cp.stdout)


def dirty_ranges(uri: str, bitmap: str) -> list[tuple[int, int]]:
    """The dirty (offset, length) ranges the server publishes for BITMAP, merged."""
    out: list[tuple[int, int]] = []
    for e in nbd_map(uri, f"qemu:dirty-bitmap:{bitmap}"):
        if e["type"] & 1:
            if out and out[-1][0] + out[-1][1] == e["offset"]:
                out[-1] = (out[-1][0], out[-1][1] + e["length"])
            else:
                out.append((e["offset"], e["length"]))
    return out


# --------------------------------------------------------------------------- qcow2 + bitmap

@dataclasses.dataclass
class BitmapImage:
    qcow2: Path                 # the image with the new data and the bitmap
    old_raw: Path               # raw copy of the image before the tracked writes
    bitmap: str
    size: int
    granularity: int
    writes: list                # what was written after the bitmap was added

    def expected_dirty(self) -> list[tuple[int, int]]:
        """Dirty ranges computed from the writes: granularity-aligned, clipped to size."""
        g = self.granularity
        granules = set()
        for w in self.writes:
            off, length = w[1], w[2]
            granules.update(range(off // g, (off + length - 1) // g + 1))
        out: list[tuple[int, int]] = []
        for k in sorted(granules):
            start, end = k * g, min((k + 1) * g, self.size)
            if out and out[-1][0] + out[-1][1] == start:
                out[-1] = (out[-1][0], end - out[-1][0])
            else:
                out.append((start, end - start))
        return out


def qemu_io(image, *commands: str, fmt: str = "qcow2") -> None:
    exe = require_tool("qemu-io")
    argv = [exe, "-f", fmt]
    for c in commands:
        argv += ["-c", c]
    cp = subprocess.run(argv + [os.fspath(image)], capture_output=True, text=True,
                        timeout=TOOL_TIMEOUT, stdin=subprocess.DEVNULL)
    if cp.returncode != 0 or "error" in cp.stdout.lower() or "failed" in cp.stdout.lower():
        raise AssertionError(f"qemu-io {commands} failed: {cp.stdout}{cp.stderr}")


def qemu_img(*args: str) -> str:
    exe = require_tool("qemu-img")
    cp = subprocess.run([exe, *args], capture_output=True, text=True, timeout=TOOL_TIMEOUT,
                        stdin=subprocess.DEVNULL)
    if cp.returncode != 0:
        raise AssertionError(f"qemu-img {' '.join(args)} failed: {cp.stderr}")
    return cp.stdout


def make_bitmap_image(workdir: Path, size: int, writes: Sequence[tuple], *,
                      bitmap: str = "inc0", granularity: int = 64 * KiB,
                      base: str = "sparse", seed: int = 7) -> BitmapImage:
    """A qcow2 whose persistent dirty bitmap BITMAP records exactly WRITES.

    The base content (make_image pattern BASE) is saved as old_raw first; then the
    bitmap is added (enabled, persistent) and the WRITES are made with qemu-io, which
    records them in the bitmap.  Each write is ("data", offset, length, byte) or
    ("zero", offset, length).  SIZE must be a multiple of 512 (qcow2 sizes are).
    """
    assert size % 512 == 0, "qcow2 virtual sizes are multiples of 512"
    old_raw = make_image(workdir / "old.raw", size, base, seed)
    qcow2 = workdir / "new.qcow2"
    qemu_img("convert", "-q", "-f", "raw", "-O", "qcow2", str(old_raw), str(qcow2))
    qemu_img("bitmap", "--add", "-g", str(granularity), str(qcow2), bitmap)
    cmds = []
    for w in writes:
        if w[0] == "data":
            cmds.append(f"write -P {w[3]:#x} {w[1]} {w[2]}")
        elif w[0] == "zero":
            cmds.append(f"write -z {w[1]} {w[2]}")
        else:
            raise ValueError(w)
    if cmds:
        qemu_io(qcow2, *cmds)
    return BitmapImage(qcow2, old_raw, bitmap, size, granularity, list(writes))


def apply_writes(data: bytes, writes: Sequence[tuple]) -> bytes:
    """What the image holds after WRITES, computed in Python from its old bytes."""
    buf = bytearray(data)
    for w in writes:
        off, length = w[1], w[2]
        buf[off:off + length] = bytes([w[3]]) * length if w[0] == "data" else bytes(length)
    return bytes(buf)


# --------------------------------------------------------------------------- faults

def eio_after(nbdkit, data_file, fail_from: int):
    """Start (with the nbdkit factory NBDKIT) an eval-plugin server serving DATA_FILE
    whose reads fail with EIO once they reach FAIL_FROM: a deterministic 'source fails
    part way through' (the error filter can only fail at random or by a trigger file)."""
    size = os.stat(data_file).st_size
    pread = (f'if [ $(($4 + $3)) -gt {fail_from} ]; then '
             f'echo "EIO injected read failure at offset $4" >&2; exit 1; fi; '
             f'exec dd if={data_file} iflag=skip_bytes,count_bytes skip=$4 count=$3 '
             f'bs=64K status=none')
    return nbdkit("eval", f"get_size=echo {size}", f"pread={pread}")


# --------------------------------------------------------------------------- nbdkit log

@dataclasses.dataclass
class LoggedRequest:
    conn: int
    op: str                 # Read, Write, Zero, Trim, Flush, Extents, Cache
    offset: int
    count: int
    args: dict

    @property
    def end(self) -> int:
        return self.offset + self.count


_REQ = re.compile(r"connection=(\d+) (\w+) id=\d+ (.*?) ?\.\.\.$")
_CONNECT = re.compile(r"connection=(\d+) Connect ")


_DISCONNECT = re.compile(r"connection=(\d+) Disconnect ")


def read_nbdkit_log(path) -> tuple[int, list[LoggedRequest]]:
    """(number of connections, requests) from an nbdkit log filter logfile."""
    conns, reqs = set(), []
    try:
        text = Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return 0, []
    for line in text.splitlines():
        m = _CONNECT.search(line)
        if m:
            conns.add(int(m.group(1)))
            continue
        m = _REQ.search(line)
        if not m:
            continue
        args = dict(kv.split("=", 1) for kv in m.group(3).split() if "=" in kv)
        reqs.append(LoggedRequest(int(m.group(1)), m.group(2),
                                  int(args.get("offset", "0"), 0),
                                  int(args.get("count", "0"), 0), args))
    return len(conns), reqs


def max_concurrent_connections(path) -> int:
    """The most connections an nbdkit log filter logfile shows open at the same time
    (short probe connections made before or after the copy do not add up)."""
    open_now = best = 0
    for line in Path(path).read_text(errors="replace").splitlines():
        if _CONNECT.search(line):
            open_now += 1
            best = max(best, open_now)
        elif _DISCONNECT.search(line):
            open_now -= 1
    return best


COUNTERS = ("bytes_total", "bytes_read", "bytes_written", "bytes_zeroed", "bytes_skipped")


def check_counters(c, total: int, *, what: str = "result") -> None:
    """Invariants of a finished copy's counters (an object or a dict).

    Every source byte ends up written, zeroed or skipped exactly once; reads never
    exceed the source; nothing is negative.
    """
    get = (lambda k: c[k]) if isinstance(c, dict) else (lambda k: getattr(c, k))
    vals = {k: get(k) for k in COUNTERS}
    for k, v in vals.items():
        assert isinstance(v, int) and not isinstance(v, bool), f"{what}.{k} = {v!r} is not an int"
        assert v >= 0, f"{what}.{k} = {v} is negative"
    assert vals["bytes_total"] == total, f"{what}: bytes_total {vals['bytes_total']} != {total}"
    assert vals["bytes_read"] <= total, f"{what}: read more than the source: {vals}"
    assert vals["bytes_written"] + vals["bytes_zeroed"] + vals["bytes_skipped"] == total, \
        f"{what}: written+zeroed+skipped != total: {vals}"
