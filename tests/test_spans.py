"""What a kept partial copy lacks: spans kept short, records read with
suspicion, and a destination image's unwritten parts read from the image."""
from __future__ import annotations

import os
import subprocess

import pytest

from vmferry.migration import spans
from vmferry.migration.desthost.presync_target import unwritten

MiB = 1 << 20


def test_coalesce_joins_touching_spans_and_keeps_the_list_short():
    assert spans.coalesce([(10, 20), (0, 10), (30, 40), (35, 50)]) == [(0, 20), (30, 50)]
    many = [(i * 100, i * 100 + 10) for i in range(200)]
    many[50] = (5000, 5099)          # one gap of 1 between it and the next
    out = spans.coalesce(many, limit=64)
    assert len(out) <= 64
    # nothing missing is ever dropped: every byte of the input is still covered
    for s, e in many:
        assert any(a <= s and e <= b for a, b in out), (s, e)


@pytest.mark.parametrize("obj", [
    "all", [[0]], [[5, 5]], [[-1, 3]], [[0, 200]], [[10, 20], [15, 30]], [[True, 4]],
    [[0, 1]] * 2, [[i * 2, i * 2 + 1] for i in range(spans.MAX_SPANS + 1)]])
def test_parse_refuses_what_no_copy_could_say(obj):
    assert spans.parse(obj, 100) is None


def test_trimmed_shrinks_the_span_being_copied():
    m = [(0, 10), (20, 30)]
    assert spans.trimmed(m, 30, 25) == [(0, 10), (25, 30)]
    assert spans.trimmed(m, 10, 10) == [(20, 30)]
    assert spans.trimmed(m, 10, 3) == [(3, 10), (20, 30)]


def test_unwritten_raw_image_is_its_holes(tmp_path):
    img = tmp_path / "d.raw"
    with open(img, "wb") as f:
        f.truncate(64 * MiB)
        f.seek(8 * MiB)
        f.write(os.urandom(MiB))
        f.seek(40 * MiB)
        f.write(os.urandom(2 * MiB))
    holes = unwritten(str(img), "raw")
    assert holes is not None
    covered = [(s, e) for s, e in holes]
    # the data is never counted as missing; every hole is
    for s, e in covered:
        assert not (s < 9 * MiB and e > 8 * MiB) and not (s < 42 * MiB and e > 40 * MiB)
    assert spans.total(covered) == 61 * MiB


def test_unwritten_qcow2_image_is_what_its_map_leaves_out(tmp_path):
    img = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "64M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 16M 4M",
                    "-c", "write -z 32M 4M", str(img)], check=True, capture_output=True)
    holes = unwritten(str(img), "qcow2")
    # zeroes written are as good as never written: a copy makes them again cheaply
    assert holes == [[0, 16 * MiB], [20 * MiB, 64 * MiB]]
