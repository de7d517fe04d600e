"""Incremental copies with `--bitmap NAME` from qemu-storage-daemon's dirty bitmaps.

The source is a qcow2 whose persistent dirty bitmap recorded known qemu-io writes; it
is exported read-only by qemu-storage-daemon with ``bitmaps.0=NAME`` so the NBD meta
context ``qemu:dirty-bitmap:NAME`` is published.  The destination holds the image's
*old* bytes.  After the copy it must hold the new bytes, and only the dirty extents may
have been touched (checked with the nbdkit log filter and with sentinel bytes planted
in clean areas of the destination).
"""
from __future__ import annotations

import shutil

import pytest

from cli import assert_cli_error, copy_ok, parse_json_lines, run_vmferry
from disk_data import (
    KiB, MiB, apply_writes, check_counters, describe_difference, dirty_ranges,
    make_bitmap_image, make_image, read_all, read_nbdkit_log,
)

SIZE = 8 * MiB + 1536            # not a multiple of the 64 KiB granularity
GRANULARITY = 64 * KiB
WRITES = [
    ("data", 1 * MiB, 4096, 0xAB),          # a small write inside one granule
    ("zero", 3 * MiB, 128 * KiB),           # zeros over old (random) data
    ("data", 5243000, 200000, 0xCD),        # unaligned, spans four granules
    ("data", SIZE - 700, 700, 0xEE),        # in the last, partial granule
]
SENTINEL_OFF, SENTINEL = 2 * MiB + 12345, b"\x77" * 4321      # in a clean area


def done_of(cp) -> dict:
    events = parse_json_lines(cp.stdout)
    assert events and events[-1].get("event") == "done", cp.stdout
    return events[-1]


@pytest.fixture
def case(workdir):
    bi = make_bitmap_image(workdir, SIZE, WRITES, bitmap="inc0", granularity=GRANULARITY,
                           base="random")
    old = bi.old_raw.read_bytes()
    return bi, old, apply_writes(old, WRITES)


def _dirty_total(ranges) -> int:
    return sum(n for _, n in ranges)


def _inside(off, end, ranges) -> bool:
    return any(o <= off and end <= o + n for o, n in ranges)


def test_fixture_bitmap_matches_writes(case, qsd_bitmap):
    """The server publishes exactly the granules the writes touched (fixture sanity)."""
    bi, _, new = case
    src = qsd_bitmap(bi.qcow2, bi.bitmap)
    assert dirty_ranges(src.uri, bi.bitmap) == bi.expected_dirty()
    assert read_all(src.uri) == new


@pytest.mark.parametrize("extra", [
    [],
    ["--connections", "1", "--requests", "1", "--request-size", "4096"],
    ["--connections", "2", "--request-size", "1M"],
], ids=["defaults", "1x1x4K", "2conn-1M"])
def test_bitmap_copies_only_dirty_extents(case, qsd_bitmap, nbdkit, workdir, extra):
    bi, old, new = case
    src = qsd_bitmap(bi.qcow2, bi.bitmap)
    dirty = dirty_ranges(src.uri, bi.bitmap)
    assert dirty == bi.expected_dirty()
    assert not _inside(SENTINEL_OFF, SENTINEL_OFF + len(SENTINEL), dirty)

    dst_file = workdir / "dst.raw"
    shutil.copyfile(bi.old_raw, dst_file)
    with open(dst_file, "r+b") as f:                   # plant a sentinel in a clean area
        f.seek(SENTINEL_OFF)
        f.write(SENTINEL)
    dlog = workdir / "dst.log"
    dst = nbdkit("file", str(dst_file), f"logfile={dlog}", filters=["log"])

    cp = copy_ok("--progress=json", "--bitmap", bi.bitmap, *extra, src.uri, dst.uri)
    done = done_of(cp)

    expected = bytearray(new)
    expected[SENTINEL_OFF:SENTINEL_OFF + len(SENTINEL)] = SENTINEL
    got = read_all(dst_file)
    assert len(got) == SIZE
    if got != bytes(expected):
        pytest.fail("destination after incremental copy: "
                    + describe_difference(bytes(expected), got, ("expected", "destination")))

    _, reqs = read_nbdkit_log(dlog)
    touching = [r for r in reqs if r.op in ("Write", "Zero", "Trim")]
    assert touching, "nothing was written to the destination"
    outside = [r for r in touching if not _inside(r.offset, r.end, dirty)]
    assert not outside, f"requests outside the dirty extents: {outside[:5]}"

    d = _dirty_total(dirty)
    check_counters(done, SIZE)
    assert done["bytes_skipped"] == SIZE - d, (done, d)
    assert done["bytes_written"] + done["bytes_zeroed"] == d, (done, d)
    assert done["bytes_read"] <= d, (done, d)


def test_bitmap_into_existing_file(case, qsd_bitmap, workdir):
    """A plain file destination holding the old bytes is updated in place (not truncated)."""
    bi, old, new = case
    src = qsd_bitmap(bi.qcow2, bi.bitmap)
    dst_file = workdir / "dst.raw"
    shutil.copyfile(bi.old_raw, dst_file)
    cp = copy_ok("--progress=json", "--bitmap", bi.bitmap, src.uri, dst_file)
    done = done_of(cp)
    assert dst_file.stat().st_size == SIZE
    assert read_all(dst_file) == new
    d = _dirty_total(bi.expected_dirty())
    assert done["bytes_skipped"] == SIZE - d, done


def test_bitmap_nothing_dirty(workdir, qsd_bitmap, nbdkit):
    """A bitmap with no writes recorded: nothing is written, everything is skipped."""
    bi = make_bitmap_image(workdir, SIZE, [], bitmap="clean0", base="sparse")
    src = qsd_bitmap(bi.qcow2, bi.bitmap)
    assert dirty_ranges(src.uri, bi.bitmap) == []
    dst_file = make_image(workdir / "dst.raw", SIZE, "fill:0x5a")
    dst = nbdkit("file", str(dst_file))
    cp = copy_ok("--progress=json", "--bitmap", bi.bitmap, src.uri, dst.uri)
    done = done_of(cp)
    check_counters(done, SIZE)
    assert done["bytes_written"] == 0 and done["bytes_zeroed"] == 0, done
    assert done["bytes_skipped"] == SIZE, done
    assert read_all(dst_file) == b"\x5a" * SIZE, "a clean bitmap still changed the destination"


def test_unknown_bitmap_name(case, qsd_bitmap, workdir):
    bi, old, _ = case
    src = qsd_bitmap(bi.qcow2, bi.bitmap)
    dst_file = workdir / "dst.raw"
    shutil.copyfile(bi.old_raw, dst_file)
    cp = run_vmferry("copy", "--bitmap", "nosuchbitmap", src.uri, dst_file)
    line = assert_cli_error(cp, (1, 2))       # the contract names no code for this one
    assert "nosuchbitmap" in line, line
    assert read_all(dst_file) == old, "destination changed by a failed bitmap copy"


def test_bitmap_from_server_without_bitmaps(workdir, nbdkit):
    """A source that publishes no dirty bitmap at all (nbdkit) is an error, not a full copy."""
    size = 1 * MiB
    src = nbdkit("pattern", f"size={size}")
    dst_file = make_image(workdir / "dst.raw", size, "fill:0x5a")
    cp = run_vmferry("copy", "--bitmap", "inc0", src.uri, dst_file)
    line = assert_cli_error(cp, (1, 2))
    assert "inc0" in line, line
    assert read_all(dst_file) == b"\x5a" * size


@pytest.mark.parametrize("via", ["api", "cli"])
def test_bitmap_extents_from_another_endpoint(case, qsd_bitmap, workdir, via):
    """Bytes read from a raw file, what to copy decided by the bitmap another server
    publishes for the same disk: the native engine's direct reads, and
    `vmferry copy --bitmap NAME --extents-from URI FILE DST`, which nbdcopy cannot do."""
    import vmferry
    from disk_data import qemu_img
    bi, old, new = case
    src = qsd_bitmap(bi.qcow2, bi.bitmap)
    new_raw = workdir / "new.raw"
    qemu_img("convert", "-q", "-f", "qcow2", "-O", "raw", str(bi.qcow2), str(new_raw))
    dst_file = workdir / "dst.raw"
    shutil.copyfile(bi.old_raw, dst_file)
    with open(dst_file, "r+b") as f:                   # clean areas must stay as they are
        f.seek(SENTINEL_OFF)
        f.write(SENTINEL)
    if via == "api":
        r = vmferry.copy(str(new_raw), str(dst_file), bitmap=bi.bitmap, extents_from=src.uri,
                         connections=2, request_size=64 * KiB)
        moved, skipped = r.bytes_written + r.bytes_zeroed, r.bytes_skipped
    else:
        done = done_of(copy_ok("--progress=json", "--bitmap", bi.bitmap, "--extents-from",
                               src.uri, new_raw, dst_file))
        moved, skipped = done["bytes_written"] + done["bytes_zeroed"], done["bytes_skipped"]
    expected = bytearray(new)
    expected[SENTINEL_OFF:SENTINEL_OFF + len(SENTINEL)] = SENTINEL
    assert read_all(dst_file) == bytes(expected)
    d = _dirty_total(bi.expected_dirty())
    assert moved == d and skipped == SIZE - d, (moved, skipped, d)


def test_bitmap_extents_from_other_disk_refused(case, qsd_bitmap, workdir):
    import vmferry
    bi, _, _ = case
    src = qsd_bitmap(bi.qcow2, bi.bitmap)
    other = make_image(workdir / "other.raw", SIZE + 512 * KiB, "zero")
    with pytest.raises(vmferry.VmferryError, match="not the same disk"):
        vmferry.copy(str(other), str(workdir / "dst.raw"), bitmap=bi.bitmap,
                     extents_from=src.uri)
    assert not (workdir / "dst.raw").exists()


def test_cli_extents_from_a_file_with_a_bitmap_is_refused(workdir):
    src = make_image(workdir / "src.raw", 1 * MiB, "random")
    cp = run_vmferry("copy", "--bitmap", "b0", "--extents-from", src, src, "null:")
    line = assert_cli_error(cp, 2)
    assert ("--extents-from " + str(src) + ": dirty extents come from an NBD export that "
            "publishes the bitmap (qemu:dirty-bitmap:b0), not from a file") in line, line
