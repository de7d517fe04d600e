"""`vmferry copy SRC DST`: the CLI face of vmferry.copy()."""
from __future__ import annotations

import argparse
import os
import stat
from typing import TYPE_CHECKING, Optional
from urllib.parse import parse_qs, unquote, urlsplit

from vmferry.errors import UsageError
from vmferry.progress import CopyProgress, make_reporter
from vmferry.units import format_size, mib_per_second, parse_size

if TYPE_CHECKING:
    from vmferry.copying import CopyResult


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "copy", help="copy a disk between NBD servers, files and null:",
        description="Copy SRC to DST. Each is nbd://host[:port]/export, "
                    "nbd+unix:///export?socket=PATH, nbds://..., a path, or null: "
                    "(destination only). A missing destination file is created.")
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    p.add_argument("--connections", type=int, metavar="N",
                   help="connections per side (default 4 when both allow multi-conn, else 1)")
    p.add_argument("--requests", type=int, metavar="N",
                   help="requests in flight per connection (default 64; 16 on zero-copy lanes)")
    p.add_argument("--request-size", metavar="SIZE",
                   help="bytes per data request, a power of two, e.g. 256K (default), 512K "
                        "(the default on zero-copy lanes)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="worker threads, each driving several connections (default: half "
                        "the CPUs between two NBD servers, else all; at most one per "
                        "connection)")
    p.add_argument("--bitmap", metavar="NAME",
                   help="copy only extents the source's qemu:dirty-bitmap:NAME marks dirty")
    p.add_argument("--extents-from", metavar="URI",
                   help="ask this NBD export (with --bitmap, its bitmap) what to copy, and read "
                        "the bytes from SRC: e.g. a raw image file that the QEMU exporting "
                        "the bitmap has open, read directly instead of through QEMU")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--allocated", action="store_true",
                      help="write zero ranges as allocated blocks (no holes in DST)")
    mode.add_argument("--destination-is-zero", action="store_true",
                      help="DST already reads as zeroes: skip zero ranges")
    detect = p.add_mutually_exclusive_group()
    detect.add_argument("--no-zero-detect", dest="zero_detect", action="store_false",
                        default=None, help="don't scan read data for zero blocks")
    detect.add_argument("--zero-detect", dest="zero_detect", action="store_true",
                        help="scan read data for zero blocks even though that needs the "
                             "libnbd lanes (zero-copy lanes plan from extents only)")
    p.add_argument("--zero-copy", choices=["auto", "on", "off"], default="auto",
                   help="move data with sendfile/splice, never through this process: "
                        "auto where both ends allow (default), on or fail saying why, "
                        "off for libnbd lanes")
    p.add_argument("--bandwidth", type=int, metavar="MiB/s",
                   help="cap the copy at this rate, all connections together "
                        "(default: unlimited)")
    p.add_argument("--flush", action="store_true", help="flush DST when done")
    p.add_argument("--verify", action="store_true",
                   help="read both sides back and compare checksums")
    p.add_argument("--progress", nargs="?", const="auto", default=None,
                   choices=["auto", "bar", "json"],
                   help="show progress: a bar on a terminal, or json lines on stdout")
    p.set_defaults(func=run)


def summary(r: CopyResult) -> str:
    return (f"copied {format_size(r.bytes_total)} in {r.seconds:.2f} s "
            f"({format_size(r.throughput)}/s): {format_size(r.bytes_written)} written, "
            f"{format_size(r.bytes_zeroed)} zeroed, {format_size(r.bytes_skipped)} skipped "
            f"over {r.connections} connection{'s' if r.connections != 1 else ''} ({r.path})")


def _identity(target: str) -> Optional[tuple]:
    """What TARGET names where that can be known: a file by device and inode (a
    block device by its number), an export of a Unix socket by the socket's.
    None for TCP servers, whose names and addresses may alias each other."""
    try:
        if "://" not in target and not target.startswith("null:"):
            st = os.stat(target)
            if stat.S_ISBLK(st.st_mode):
                return ("block", st.st_rdev)
            return ("file", st.st_dev, st.st_ino)
        u = urlsplit(target)
        if u.scheme in ("nbd+unix", "nbds+unix"):
            sock = parse_qs(u.query).get("socket", [""])[-1]
            st = os.stat(sock)
            return ("nbd", st.st_dev, st.st_ino, unquote(u.path.lstrip("/")))
    except (OSError, ValueError):
        pass                    # missing (to be created) or malformed: copy() says which
    return None


def check_not_itself(src: str, dst: str) -> None:
    ident = _identity(src)
    if ident is not None and ident == _identity(dst):
        raise UsageError(f"SRC {src} and DST {dst} are the same "
                         f"{'export' if ident[0] == 'nbd' else 'file'}: a copy onto itself "
                         f"would read what it is overwriting")


def run(args: argparse.Namespace) -> int:
    from vmferry.copying import copy     # the engine loads only for commands that copy
    check_not_itself(args.src, args.dst)
    reporter = make_reporter(args.progress)
    shown = CopyProgress(reporter)
    rsize = parse_size(args.request_size, "--request-size") if args.request_size else None
    rate = mib_per_second(args.bandwidth, "--bandwidth") or None
    try:
        result = copy(args.src, args.dst, connections=args.connections,
                      requests=args.requests, request_size=rsize, bitmap=args.bitmap,
                      allocated=args.allocated,
                      destination_is_zero=args.destination_is_zero, flush=args.flush,
                      verify=args.verify, threads=args.threads,
                      zero_detect=args.zero_detect, extents_from=args.extents_from,
                      rate=rate, zero_copy=args.zero_copy,
                      progress=shown)
        # a bar ends full; in JSON this is the last line
        reporter.update(shown.event(result, "done"))
    finally:
        reporter.close()
    if args.progress != "json":
        print(summary(result), flush=True)
        if result.verified:
            print(f"verified {format_size(result.bytes_total)}: both sides hold the same bytes "
                  f"(blake2b {result.checksum[:16]})", flush=True)
    return 0
