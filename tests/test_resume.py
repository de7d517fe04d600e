"""A migration that stops midway keeps what it copied: the destination image
stays with its record, the source's bitmap covers every write since the copy
began, and the next migration moves only the rest plus what changed."""
from __future__ import annotations

import json
import signal

import pytest

from migrate_helpers import MiB, Lab, fill_image, images_identical, sha256
from test_migrate import _native_bitmaps, kernel, lab, qboot  # noqa: F401  (fixtures)

pytestmark = pytest.mark.timeout(300)

GiB = 1 << 30


def _setup(lab: Lab, size_mib: int = 1024):
    src = fill_image(lab.root / "src.raw", size_mib)
    dst = lab.root / "dst.raw"
    spec = lab.spec(disk=src, memory="64M", mem="4M", dirty="slow")
    lab.run_vm(spec)
    return src, dst, lab.serial_of(spec)


def _copied(lab: Lab) -> int:
    return lab.job_file().get("disk_processed", 0)


def _start_and_stop_at(lab: Lab, src, dst, fraction: float, sig: int,
                       engine: str = "native"):
    p = lab.start_migrate("--storage-engine", engine, "--disk-map", f"{src}={dst}",
                          "--create-disks", "--disk-bandwidth", "160")
    lab.wait_for(f"{fraction:.0%} of the disk", lambda: _copied(lab) >= fraction * GiB,
                 60, proc=p, poll=0.05)
    p.send_signal(sig)
    return p


def _guest_writes(lab: Lab, offset: int, pattern: int) -> None:
    """A write the guest could have made, through the source QEMU."""
    out = lab.qmp("human-monitor-command", {
        "command-line": f'qemu-io -d vd0/virtio-backend "write -P {pattern:#x} {offset} {MiB}"'})
    assert out == "", out


def _migrate_rest(lab: Lab, src, dst) -> dict:
    out = lab.ok(lab.migrate("--disk-map", f"{src}={dst}"))
    assert "migrated web1" in out, out
    info = lab.jobinfo()
    assert images_identical(src, dst, "raw") == ""
    assert lab.status(state=lab.B)["state"] == "running"
    return info


@pytest.mark.parametrize("engine", ["native", "mirror"])
def test_ctrl_c_at_60_percent_then_migrate_moves_only_the_rest(lab, engine):
    src, dst, serial = _setup(lab)
    p = _start_and_stop_at(lab, src, dst, 0.6, signal.SIGINT, engine)
    cp = lab.finish(p)
    assert cp.returncode == 130, cp.stderr
    assert "kept the partial copy" in cp.stderr, cp.stderr
    assert "source VM is running" in cp.stderr.splitlines()[-1], cp.stderr
    assert dst.exists() and dst.with_name(dst.name + ".vmferry-presync.json").exists()
    st = lab.status()
    assert st["state"] == "running" and st["copies"]["disk0"]["partial"], st
    if engine == "native":      # it knows how far it got; a mirror does not say
        assert st["copies"]["disk0"]["valid_below"] > 0, st
    assert _native_bitmaps(lab) == ["vmferry-presync"]
    # the guest goes on writing, in the part already copied and beyond
    _guest_writes(lab, 100 * MiB, 0x5a)
    _guest_writes(lab, 900 * MiB, 0xa5)
    info = _migrate_rest(lab, src, dst)
    assert info["disk_processed"] <= 0.7 * GiB, info
    assert json.loads(lab.ok(lab.vmferry("status", "web1", "--json", state=lab.B)))


@pytest.mark.parametrize("engine", ["native", "mirror"])
def test_killed_at_60_percent_then_recover_keeps_the_copy(lab, engine):
    src, dst, serial = _setup(lab)
    h = sha256(src)
    p = _start_and_stop_at(lab, src, dst, 0.6, signal.SIGKILL, engine)
    p.wait(10)
    out = lab.ok(lab.vmferry("recover", "web1"))
    assert out.startswith("rolled back: web1 runs on this host (the partial copy"), out
    assert sha256(src) == h
    assert lab.status()["copies"]["disk0"]["partial"]
    info = _migrate_rest(lab, src, dst)
    assert info["disk_processed"] <= 0.7 * GiB, info


def test_discard_removes_a_kept_copy(lab):
    src, dst, serial = _setup(lab, 256)
    p = lab.start_migrate("--storage-engine", "native", "--disk-map", f"{src}={dst}",
                          "--create-disks", "--disk-bandwidth", "64")
    lab.wait_for("some of the disk", lambda: _copied(lab) >= 64 * MiB, 60, proc=p)
    p.send_signal(signal.SIGINT)
    assert "kept the partial copy" in lab.finish(p).stderr
    out = lab.ok(lab.vmferry("presync", "--discard", "web1", f"local://{lab.B}"))
    assert out.startswith("discarded the copy of web1") and str(dst) in out, out
    assert not dst.exists() and not dst.with_name(dst.name + ".vmferry-presync.json").exists()
    assert lab.status()["copies"] == {}
    assert _native_bitmaps(lab) == []
    line = lab.one_error(lab.vmferry("presync", "--discard", "web1", f"local://{lab.B}"),
                         code=2)
    assert "no presynced or kept copy" in line, line
