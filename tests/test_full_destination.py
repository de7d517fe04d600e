"""A migration or presync into a file system that fills up fails with one line
that says so, and leaves nothing behind on the destination: not the image, not
the folder --create-disks made for it, not the state directory and its .lock."""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from disk_data import MiB, make_image
from migrate_helpers import QEMU, Lab
from test_migrate import kernel  # noqa: F401  (the fixture)
from vmferry.guest import find_qboot

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def full_lab(kernel):
    """A Lab whose B (and every destination image) is on a 4 MiB tmpfs."""
    root = Path(tempfile.mkdtemp(prefix="vmff-"))
    full = root / "full"
    full.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(full)],
                      capture_output=True).returncode != 0:
        shutil.rmtree(root)
        pytest.skip("cannot mount a tmpfs (needs root)")
    lab = Lab(root, kernel, find_qboot(QEMU))
    lab.B = full / "B"
    try:
        yield lab, full
    finally:
        lab.cleanup()
        subprocess.run(["umount", "-l", str(full)])
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("command", ["migrate", "presync"])
def test_full_destination_leaves_nothing_behind(full_lab, command):
    lab, full = full_lab
    src = make_image(lab.root / "src.raw", 32 * MiB, fmt="raw")
    lab.run_vm(lab.spec(disk=src, fmt="raw"))
    dmap = ("--disk-map", f"{src}={full / 'images' / 'web1.raw'}", "--create-disks")
    if command == "migrate":
        cp = lab.migrate(*dmap, "--storage-engine", "mirror")
    else:
        cp = lab.vmferry("presync", "web1", f"local://{lab.B}", *dmap)
    line = lab.one_error(cp)
    assert "No space left on device" in line, line
    assert "is the destination still there" not in line, line
    assert sorted(p.name for p in full.iterdir()) == [], list(full.rglob("*"))
    assert lab.status()["state"] == "running"
