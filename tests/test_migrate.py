"""Live migration end to end: real QEMU, the self-built test guest, the vmferry CLI.

Each test runs a source VM in state directory A and migrates it to local:///B of the
same short private folder.  The guest rewrites a verifiable pattern over its memory
and reports every pass on its serial console, so memory lost or torn in a migration
shows up as an ERROR (or a gap in the pass numbers) in the serial log.  Disks are
judged with qemu-img compare and sha256, never through vmferry.

KVM when /dev/kvm works, else TCG; VMFERRY_TEST_ACCEL=tcg forces TCG (see
migrate_helpers).  Every QEMU and vmferry process a test starts is stopped at
teardown, also when the test fails.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest

from disk_data import make_image
from migrate_helpers import (
    ACCEL, MiB, QEMU, Lab, check_serial_log, fill_image, images_identical,
    qemu_pids, sha256, write_while_mirroring,
)
from vmferry.errors import VmferryError
from vmferry.guest import build_guest, find_qboot
from vmferry.vm import StateDir, load_spec
from vmferry.vm.state import pid_alive

pytestmark = [
    pytest.mark.skipif(shutil.which(QEMU) is None or shutil.which("qemu-img") is None,
                       reason="needs qemu-system-x86_64 and qemu-img"),
    pytest.mark.timeout(180),
]


@pytest.fixture(scope="module")
def kernel(tmp_path_factory) -> Path:
    if not (shutil.which("as") and shutil.which("ld")):
        pytest.skip("GNU binutils (as, ld) not installed: cannot build the test guest")
    return build_guest(tmp_path_factory.mktemp("guest"))


@pytest.fixture(scope="module")
def qboot() -> Path | None:
    return find_qboot(QEMU)


@pytest.fixture
def lab(kernel, qboot):
    # short path: the VMs' QMP and NBD sockets live under it (AF_UNIX: 107 bytes)
    root = Path(tempfile.mkdtemp(prefix="vmfm-"))
    lab = Lab(root, kernel, qboot)
    try:
        yield lab
    finally:
        lab.cleanup()
        shutil.rmtree(root, ignore_errors=True)


def serial_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


# --------------------------------------------------------------------------- success

@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_live_migration_guest_runs_on(lab, fmt):
    """The guest keeps rewriting its memory through the migration and goes on on the
    destination with intact memory; the source is retired; the disk arrives intact."""
    src = make_image(lab.root / f"src.{fmt}", 64 * MiB, fmt=fmt)
    dst = lab.root / f"dst.{fmt}"
    spec = lab.spec(disk=src, fmt=fmt, memory="128M", mem="64M")
    src_serial = lab.serial_of(spec)
    src_pid = lab.run_vm(spec, wait_pass=3)
    if fmt == "raw":
        # a destination spec gives the destination its own disk and serial log
        dst_serial = lab.root / "web1-dst.log"
        dspec = lab.spec(disk=dst, fmt=fmt, serial=dst_serial, file=lab.root / "dest.toml")
        args = ["--dest-spec", dspec, "--create-disks"]
    else:
        # same serial file: the destination appends where the source stopped
        dst_serial = src_serial
        args = ["--disk-map", f"{src}={dst}", "--create-disks"]

    out = lab.ok(lab.migrate(*args))
    assert out.startswith("migrated web1 in ") and "ms downtime" in out, out

    # the source is retired: process gone, state "stopped", spec kept
    assert not pid_alive(src_pid), "the source QEMU still runs"
    assert qemu_pids(lab.A) == []
    assert lab.status()["state"] == "stopped"
    # the destination runs the guest from the destination image
    dst_status = lab.status(state=lab.B)
    assert dst_status["state"] == "running" and dst_status["accel"] == ACCEL, dst_status
    assert [d["path"] for d in dst_status["spec"]["disks"]] == [str(dst)]
    assert load_spec(lab.B / "web1" / "spec.toml").disks[0].path == str(dst)

    info = lab.jobinfo()
    assert info["status"] == "completed" and info["phase"] == "done", info
    assert info["downtime_ms"] is not None and 0 <= info["downtime_ms"] < 10_000, info
    assert info["disk_total"] == 64 * MiB and info["disk_remaining"] == 0, info
    assert info["memory_processed"] > 0 and info["error"] == "", info

    # the guest's passes continue on the destination, memory intact
    if dst_serial != src_serial:
        src_text = serial_text(src_serial)     # final: that QEMU is gone
        src_last, problems = check_serial_log(src_text)
        assert problems == [] and src_last >= 3, problems
        lab.wait_progress(dst_serial, src_last + 3, 30, prefix_text=src_text)
        dst_text = serial_text(dst_serial)
        # one stream across both logs: no gap, repeat, restart or ERROR
        problems = check_serial_log(src_text + dst_text)[1]
        assert problems == [], problems
        # the destination's own log has passes past the last one of the source
        assert check_serial_log(dst_text)[0] >= src_last + 3
    else:
        at_switch, problems, _ = lab.progress(src_serial)
        assert problems == [], problems
        lab.wait_progress(src_serial, at_switch + 3, 30)
        assert lab.progress(src_serial)[1] == []

    lab.ok(lab.vmferry("stop", "web1", "--force", state=lab.B))
    assert images_identical(src, dst, fmt) == ""


def test_disk_writes_during_storage_copy_arrive(lab):
    """Writes made through the source QEMU while its mirror copies the disk all reach
    the destination: afterwards both images hold exactly the written data."""
    size = 256
    src = fill_image(lab.root / "src.raw", size)
    dst = lab.root / "dst.raw"
    spec = lab.spec(disk=src, memory="64M", mem="16M", dirty="idle", hb=200)
    lab.run_vm(spec)
    model = bytearray(src.read_bytes())

    p = lab.start_migrate("--storage-engine", "mirror", "--disk-map", f"{src}={dst}",
                          "--create-disks")
    writes: list[tuple[int, int, int]] = []
    counts = write_while_mirroring(StateDir(lab.A).cli_socket("web1"), "vd0/virtio-backend",
                                   writes, lambda: p.poll() is not None, size * MiB)
    out = lab.ok(lab.finish(p))
    assert "migrated web1" in out
    # the writes really overlapped the copy
    assert counts["bulk"] >= 3, counts

    lab.ok(lab.vmferry("stop", "web1", "--force", state=lab.B))
    for off, length, pattern in writes:
        model[off:off + length] = bytes([pattern]) * length
    want = hashlib.sha256(model).hexdigest()
    assert sha256(src) == want, "the source image lacks writes made through its QEMU"
    assert sha256(dst) == want, (f"destination differs from the source at switchover "
                                 f"({len(writes)} writes {counts}): "
                                 f"{images_identical(src, dst, 'raw')}")


@pytest.mark.parametrize("action", ["suspend", "postcopy"])
def test_timeout_action_completes(lab, action):
    """A guest that dirties memory faster than --bandwidth never converges; after
    --timeout the source is paused (or post-copy takes over), the migration completes,
    and the destination runs the guest on with intact memory."""
    spec = lab.spec(memory="64M", mem="32M", dirty="fast")
    serial = lab.serial_of(spec)
    lab.run_vm(spec, wait_pass=2)
    extra = ["--postcopy"] if action == "postcopy" else []
    out = lab.ok(lab.migrate("--timeout", "2", f"--timeout-{action}", "--bandwidth", "32",
                             "--no-escalate", *extra))
    info = lab.jobinfo()
    assert info["status"] == "completed", info
    want = "suspended on timeout" if action == "suspend" else "post-copy on timeout"
    assert want in info["action"] and want in out, (out, info)
    assert info["postcopy"] == (action == "postcopy"), info
    assert info["elapsed_ms"] >= 2000, info
    assert lab.status(state=lab.B)["state"] == "running"
    at, problems, _ = lab.progress(serial)
    assert problems == [], problems
    lab.wait_progress(serial, at + 3, 30)
    assert lab.progress(serial)[1] == []


def test_downtime_escalation_lets_a_busy_guest_converge(lab):
    """With a downtime limit too small for the guest's dirty rate, the limit is raised
    step by step until the migration completes."""
    spec = lab.spec(memory="64M", mem="32M", dirty="fast")
    serial = lab.serial_of(spec)
    lab.run_vm(spec, wait_pass=2)
    # 32 MiB/s: 100 ms then covers 3.2 MiB of dirty pages, below what even a guest
    # slowed by a loaded host dirties per pass (at 64 MiB/s such a guest converged
    # without a raise, and the test failed)
    out = lab.ok(lab.migrate("--max-downtime", "100", "--bandwidth", "32"))
    assert "downtime limit raised" in out, out
    info = lab.jobinfo()
    assert info["status"] == "completed", info
    assert info["action"].startswith("downtime limit raised to "), info
    assert info["downtime_limit_ms"] > 100, info
    assert lab.status(state=lab.B)["state"] == "running"
    at, problems, _ = lab.progress(serial)
    assert problems == [], problems
    lab.wait_progress(serial, at + 3, 30)
    assert lab.progress(serial)[1] == []


PROGRESS_FIELDS = ("percent", "eta_s", "converging", "phase", "elapsed_ms",
                   "disk_processed", "disk_remaining", "disk_rate",
                   "memory_processed", "memory_remaining", "memory_rate")
ETA_MARGIN_S = 0.25


@pytest.mark.parametrize("engine", ["mirror", "native"])
def test_progress_is_one_bar_whose_eta_only_counts_down(lab, engine):
    """--progress=json of a migration with a disk and a guest that dirties memory
    faster than the link sends it at first (a downtime limit too small, raised
    step by step): storage and memory share one percentage that never decreases
    and ends at 100, and an ETA that never rises by more than the time elapsed
    (plus a small margin), with "converging" and no number while memory does not
    shrink.  jobinfo --json has the same fields."""
    disk_mib = 64
    src = fill_image(lab.root / "src.raw", disk_mib)
    dst = lab.root / "dst.raw"
    spec = lab.spec(disk=src, memory="128M", mem="32M", dirty="fast")
    lab.run_vm(spec, wait_pass=2)
    out = lab.ok(lab.migrate("--progress=json", "--storage-engine", engine,
                             "--disk-map", f"{src}={dst}", "--create-disks",
                             "--disk-bandwidth", "64", "--bandwidth", "64",
                             "--max-downtime", "100"))
    events = [json.loads(line) for line in out.splitlines()]
    assert events and events[-1]["event"] == "done", out[-500:]
    for e in events:
        assert all(k in e for k in PROGRESS_FIELDS), sorted(e)

    percents = [e["percent"] for e in events]
    assert percents == sorted(percents), f"percent went down: {percents}"
    assert events[-1]["percent"] == 100 and events[-1]["eta_s"] == 0, events[-1]
    assert all(e["percent"] < 100 for e in events if e["status"] != "completed"), \
        "100% before the migration completed"

    last: dict | None = None
    for e in events:
        if e["converging"]:
            assert e["eta_s"] is None, e
        if e["eta_s"] is None:
            continue
        if last is not None:
            elapsed = (e["elapsed_ms"] - last["elapsed_ms"]) / 1000
            assert e["eta_s"] <= last["eta_s"] + elapsed + ETA_MARGIN_S, (
                f"ETA rose from {last['eta_s']} s to {e['eta_s']} s in {elapsed:.2f} s "
                f"({last['phase']}/{e['phase']})")
        last = e

    moving = [e for e in events if e["phase"] == "perform"]
    storage = [e for e in moving if e["memory_total"] == 0]
    memory = [e for e in moving if e["memory_total"] > 0 and e["memory_remaining"] > 0]
    assert storage and memory, "no progress seen of storage or of memory"
    # one bar for both parts: the disk alone does not fill it, and an ETA and the
    # rates are known while the data moves
    assert storage[-1]["percent"] < 90, storage[-1]
    assert any(e["eta_s"] for e in storage) and any(e["disk_rate"] > 0 for e in storage)
    assert any(e["eta_s"] or e["converging"] for e in memory)
    assert any(e["memory_rate"] > 0 for e in memory)
    if "downtime limit raised" in events[-1]["action"]:
        # raised because memory stopped shrinking: that is what converging says
        assert any(e["converging"] for e in memory), "memory stalled but never 'converging'"

    info = lab.jobinfo()
    assert {k: info.get(k) for k in PROGRESS_FIELDS} == \
        {k: events[-1][k] for k in PROGRESS_FIELDS}, "jobinfo --json and the stream disagree"
    assert info["percent"] == 100 and info["eta_s"] == 0 and info["status"] == "completed"
    text = lab.ok(lab.vmferry("jobinfo", "web1"))
    assert "Progress:" in text and "100.0%" in text, text


def test_dname_renames_the_vm_on_the_destination(lab):
    """virsh --dname: the guest goes on at the destination as web2, its NIC
    keeping the MAC it had (derived from web1), and the one-line summary says
    both names; a name the destination cannot hold is refused up front."""
    src = fill_image(lab.root / "src.raw", 16)
    dst = lab.root / "dst.raw"
    spec = lab.spec(disk=src, memory="64M", mem="8M", dirty="slow")
    spec.write_text(spec.read_text() + '\n[[nics]]\ntype = "user"\n')
    serial = lab.serial_of(spec)
    lab.run_vm(spec)
    mac = load_spec(lab.A / "web1" / "spec.toml").nic_mac(0)
    line = lab.one_error(lab.migrate("--dname", "no/such", "--disk-map", f"{src}={dst}"),
                         code=2)
    assert "--dname 'no/such'" in line, line
    assert lab.status()["state"] == "running"

    out = lab.ok(lab.migrate("--dname", "web2", "--disk-map", f"{src}={dst}",
                             "--create-disks"))
    assert out.startswith("migrated web1 as web2 in "), out
    assert lab.status()["state"] == "stopped" and qemu_pids(lab.A) == []
    st = lab.status("web2", state=lab.B)
    assert st["state"] == "running", st
    assert not (lab.B / "web1").exists()
    moved = load_spec(lab.B / "web2" / "spec.toml")
    assert moved.name == "web2" and moved.nics[0].mac == mac, moved
    assert lab.qmp("query-rx-filter", name="web2", state=lab.B)[0]["main-mac"] == mac
    at, problems, _ = lab.progress(serial)
    assert problems == [], problems
    lab.wait_progress(serial, at + 2, 30)
    lab.ok(lab.vmferry("stop", "web2", "--force", state=lab.B))
    assert images_identical(src, dst, "raw") == ""


def test_offline_migration_of_a_stopped_vm(lab):
    src = fill_image(lab.root / "src.raw", 64)
    dst = lab.root / "dst.raw"
    spec = lab.spec(disk=src, memory="64M", mem="8M", dirty="slow")
    lab.run_vm(spec)
    lab.ok(lab.vmferry("stop", "web1", "--force"))
    out = lab.ok(lab.migrate("--offline", "--disk-map", f"{src}={dst}", "--create-disks"))
    assert "migrated web1" in out, out
    assert qemu_pids(lab.root) == [], "--offline started a QEMU"
    assert images_identical(src, dst, "raw") == ""
    moved = load_spec(lab.B / "web1" / "spec.toml")
    assert moved.disks[0].path == str(dst) and moved.name == "web1"
    assert (lab.A / "web1" / "spec.toml").exists()       # no --undefinesource
    assert lab.status(state=lab.B)["state"] == "stopped"


def test_offline_refuses_what_prepare_refuses(lab):
    """--offline checks its destination images as a live Prepare does: one line
    for the source's own file, a missing image, one too small; nothing copied."""
    src = fill_image(lab.root / "src.raw", 8)
    lab.run_vm(lab.spec(disk=src, memory="64M", mem="8M", dirty="slow"))
    lab.ok(lab.vmferry("stop", "web1", "--force"))
    before = sha256(src)
    small = lab.root / "small.raw"
    small.write_bytes(b"\0" * 4096)
    for target, words in ((src, "source's own file"), (lab.root / "none.raw", "does not exist"),
                          (small, "is smaller")):
        line = lab.one_error(lab.migrate("--offline", "--disk-map", f"{src}={target}"), code=2)
        assert words in line, line
    assert sha256(src) == before and small.stat().st_size == 4096
    assert not (lab.B / "web1").exists()


# --------------------------------------------------------------------------- failures

def _failing_setup(lab: Lab, size_mib: int = 32, **spec_kw):
    """A source VM whose guest rewrites memory slowly (passes keep coming) with a raw
    disk of SIZE_MIB MiB; returns (src, src_hash, dst, serial)."""
    src = fill_image(lab.root / "src.raw", size_mib)
    dst = lab.root / "dst.raw"
    kw = dict(memory="64M", mem="4M", dirty="slow")
    kw.update(spec_kw)
    spec = lab.spec(disk=src, **kw)
    lab.run_vm(spec)
    return src, sha256(src), dst, lab.serial_of(spec)


def signal_pid(pid, sig) -> None:
    assert pid is not None, "no destination QEMU to kill"
    os.kill(pid, sig)


def _memory_migrating(lab: Lab):
    mig = lab.qmp("query-migrate")
    return mig.get("status") == "active" and mig.get("ram", {}).get("transferred", 0) > 0


def _check_failed_job(lab: Lab, status: str = "failed") -> dict:
    info = lab.jobinfo()
    assert info["status"] == status and info["error"], info
    return info


def _mirror_copying(lab: Lab):
    j = {j["id"]: j for j in lab.qmp("query-jobs")}.get("vmferry-mirror-disk0")
    return j and j["status"] == "running" and 0 < j["current-progress"] < j["total-progress"]


@pytest.mark.parametrize("engine", ["mirror", "native"])
def test_destination_killed_during_storage_copy(lab, engine):
    src, h, dst, serial = _failing_setup(lab, 256)
    p = lab.start_migrate("--storage-engine", engine, "--disk-map", f"{src}={dst}",
                          "--create-disks")
    copying = _mirror_copying if engine == "mirror" else _native_copying
    lab.wait_for("the storage copy", lambda: copying(lab), 30, proc=p)
    signal_pid(lab.dest_pid(), signal.SIGKILL)
    line = lab.one_error(lab.finish(p))
    # whichever sees the death first says so: the copy, or the watch on the
    # destination QEMU (the only one for native, which writes a raw image directly)
    assert (f"{'storage mirror' if engine == 'mirror' else 'native copy'} of disk0 failed"
            in line or "the destination QEMU exited" in line), line
    assert "source VM is running" in line, line
    if engine == "native":
        _check_failed_job(lab)
    lab.assert_source_intact(serial=serial, disk=src, disk_hash=h, dest_disk=dst)


def test_destination_killed_during_the_final_pass(lab):
    """The source is paused at pre-switchover for the native engine's last pass when
    the destination QEMU dies: the migration is cancelled and the guest runs on at
    the source, with no bitmap, export or image of the attempt left."""
    src, h, dst, serial = _failing_setup(lab)
    lab.env["VMFERRY_TEST_HOLD"] = "final-pass:30"
    p = lab.start_migrate("--storage-engine", "native", "--disk-map", f"{src}={dst}",
                          "--create-disks")
    lab.wait_for("pre-switchover", lambda: lab.qmp("query-migrate").get("status") ==
                 "pre-switchover", 60, proc=p)
    assert lab.qmp("query-status")["status"] != "running"     # paused for the pass
    signal_pid(lab.dest_pid(), signal.SIGKILL)
    t0 = time.monotonic()
    line = lab.one_error(lab.finish(p))
    assert time.monotonic() - t0 < 20, "the source waited out the hold instead of noticing"
    assert "the destination QEMU exited" in line and "source VM is running" in line, line
    _check_failed_job(lab)
    lab.assert_source_intact(serial=serial, disk=src, disk_hash=h, dest_disk=dst)


def test_destination_killed_during_memory_copy(lab):
    src, h, dst, serial = _failing_setup(lab)
    p = lab.start_migrate("--disk-map", f"{src}={dst}", "--create-disks", "--bandwidth", "4")
    lab.wait_for("memory migration", lambda: _memory_migrating(lab), 30, proc=p)
    signal_pid(lab.dest_pid(), signal.SIGKILL)
    line = lab.one_error(lab.finish(p))
    assert "memory" in line or "destination" in line, line
    _check_failed_job(lab)
    lab.assert_source_intact(serial=serial, disk=src, disk_hash=h, dest_disk=dst)


def test_destination_killed_before_finish(lab):
    """Memory and disks have all arrived and the source is paused, but the destination
    dies before Finish resumes it: the source takes the guest back and runs on."""
    src, h, dst, serial = _failing_setup(lab)
    lab.env["VMFERRY_TEST_HOLD"] = "finish:5"      # a window between Perform and Finish
    p = lab.start_migrate("--disk-map", f"{src}={dst}", "--create-disks")
    lab.wait_for("the memory migration to complete",
                 lambda: lab.qmp("query-status")["status"] == "postmigrate", 60, proc=p)
    signal_pid(lab.dest_pid(), signal.SIGKILL)
    line = lab.one_error(lab.finish(p))
    assert "destination" in line and "source VM is running" in line, line
    info = _check_failed_job(lab)
    assert info["phase"] == "finish", info
    # QEMU keeps reporting the last migration as "completed": it did complete,
    # only the destination never took the guest over
    lab.assert_source_intact(serial=serial, disk=src, disk_hash=h, dest_disk=dst,
                             migration=("completed",))


@pytest.mark.parametrize("before", ["prepare", "finish"])
def test_sigint_between_phases(lab, before):
    """Ctrl-C after Begin (nothing started yet on the destination) and after Perform
    (everything moved, the source paused): either way the source runs on."""
    src, h, dst, serial = _failing_setup(lab)
    # a wide window (a signal ends it at once), so a loaded machine cannot miss it
    lab.env["VMFERRY_TEST_HOLD"] = f"{before}:15"
    p = lab.start_migrate("--disk-map", f"{src}={dst}", "--create-disks")
    if before == "prepare":
        lab.wait_for("Begin to end", lambda: (lab.A / "web1" / "job.json").exists()
                     and lab.job_file()["phase"] == "begin", 30, proc=p)
    else:
        lab.wait_for("Perform to end",
                     lambda: lab.qmp("query-status")["status"] == "postmigrate", 60, proc=p)
    p.send_signal(signal.SIGINT)
    cp = lab.finish(p)
    assert cp.returncode == 130, (cp.returncode, cp.stderr)
    assert "cancelled" in cp.stderr and "source VM is running" in cp.stderr, cp.stderr
    lab.assert_source_intact(serial=serial, disk=src, disk_hash=h, dest_disk=dst,
                             migration=(None, "none", "completed"))


def test_ctrl_c_after_the_destination_resumed_completes_the_migration(lab):
    """Ctrl-C in Finish, after the destination already resumed the guest: rolling
    back would run it on both sides, so the migration completes instead, says
    why, and the source is retired."""
    src, h, dst, serial = _failing_setup(lab)
    lab.env["VMFERRY_TEST_HOLD"] = "resumed:15"
    p = lab.start_migrate("--disk-map", f"{src}={dst}", "--create-disks")
    def resumed() -> bool:
        try:
            return lab.qmp("query-status", state=lab.B)["status"] == "running"
        except VmferryError:        # that QEMU and its sockets are still starting
            return False
    lab.wait_for("the destination to resume the guest", resumed, 60, proc=p)
    p.send_signal(signal.SIGINT)
    cp = lab.finish(p)
    assert cp.returncode == 0, cp.stderr
    assert "the destination runs the guest: completing the migration" in cp.stderr, cp.stderr
    assert qemu_pids(lab.A) == [], "the source QEMU still runs"
    assert lab.status(state=lab.B)["state"] == "running"
    assert lab.jobinfo()["status"] == "completed"


def test_destination_disk_too_small(lab):
    src, h, dst, serial = _failing_setup(lab)
    fill_image(dst, 16, seed=2)
    dst_hash = sha256(dst)
    cp = lab.migrate("--disk-map", f"{src}={dst}")
    line = lab.one_error(cp, code=2)
    assert "smaller" in line and str(dst) in line, line
    assert dst.exists() and sha256(dst) == dst_hash, "the user's destination image changed"
    lab.assert_source_intact(serial=serial, disk=src, disk_hash=h)


def test_abort_command_during_memory_copy(lab):
    src, h, dst, serial = _failing_setup(lab)
    p = lab.start_migrate("--disk-map", f"{src}={dst}", "--create-disks", "--bandwidth", "4",
                          "--no-escalate")
    lab.wait_for("memory migration", lambda: _memory_migrating(lab), 30, proc=p)
    out = lab.ok(lab.vmferry("abort", "web1"))
    assert "aborted" in out, out
    line = lab.one_error(lab.finish(p), code=130, prefix="vmferry: ")
    assert "cancelled in perform" in line and "source VM is running" in line, line
    _check_failed_job(lab, "cancelled")
    lab.assert_source_intact(serial=serial, disk=src, disk_hash=h, dest_disk=dst)


@pytest.mark.parametrize("engine", ["mirror", "native"])
def test_sigint_during_storage_copy(lab, engine):
    """Ctrl-C while the disk is being copied: the destination QEMU, still waiting for
    the memory stream, must be stopped and its new image removed."""
    src, h, dst, serial = _failing_setup(lab, 256)
    p = lab.start_migrate("--storage-engine", engine, "--disk-map", f"{src}={dst}",
                          "--create-disks")
    copying = _mirror_copying if engine == "mirror" else _native_copying
    lab.wait_for("the storage copy", lambda: copying(lab), 30, proc=p)
    dest_pid = lab.dest_pid()
    assert dest_pid is not None
    p.send_signal(signal.SIGINT)
    line = lab.one_error(lab.finish(p), code=130, prefix="vmferry: ")
    assert "cancelled in perform" in line and "source VM is running" in line, line
    _check_failed_job(lab, "cancelled")
    assert not pid_alive(dest_pid), "the destination QEMU was left running"
    lab.assert_source_intact(serial=serial, disk=src, disk_hash=h, dest_disk=dst)


def test_timeout_without_escalation_fails_and_source_runs(lab):
    src, h, dst, serial = _failing_setup(lab, memory="64M", mem="32M", dirty="fast")
    t0 = time.monotonic()
    cp = lab.migrate("--disk-map", f"{src}={dst}", "--create-disks", "--timeout", "2",
                     "--max-downtime", "100", "--bandwidth", "64", "--no-escalate")
    line = lab.one_error(cp, code=1)
    assert "--timeout 2" in line, line
    assert time.monotonic() - t0 < 30
    info = _check_failed_job(lab)
    assert info["downtime_limit_ms"] == 100 and info["action"] == "", info
    lab.assert_source_intact(serial=serial, disk=src, disk_hash=h, dest_disk=dst)



def test_copy_storage_inc_moves_only_the_top_image(lab):
    """--copy-storage-inc over a backing file both sides share: only the overlay's own
    clusters cross, and the destination overlay shows the same disk as the source."""
    base = fill_image(lab.root / "base.raw", 64, seed=7)
    src = lab.root / "top-src.qcow2"
    dst = lab.root / "top-dst.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw",
                    str(src)], check=True)
    # 2 MiB written into the overlay; the other 62 MiB come from the backing file
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x6b 8M 2M", str(src)],
                   check=True, capture_output=True)
    spec = lab.spec(disk=src, fmt="qcow2")
    lab.run_vm(spec)
    lab.ok(lab.migrate("--copy-storage-inc", "--disk-map", f"{src}={dst}", "--create-disks"))
    info = lab.jobinfo()
    assert info["status"] == "completed", info
    assert 0 < info["disk_processed"] <= 8 * MiB, info     # not the whole 64 MiB
    lab.ok(lab.vmferry("stop", "web1", "--force", state=lab.B))
    assert images_identical(src, dst, "qcow2") == ""
    backing = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(dst)],
                                        capture_output=True, text=True, check=True).stdout)
    assert backing.get("backing-filename") == str(base), backing


def test_copy_storage_inc_without_backing_is_refused(lab):
    src = make_image(lab.root / "solo.qcow2", 16 * MiB, "sparse", fmt="qcow2")
    spec = lab.spec(disk=src, fmt="qcow2")
    lab.run_vm(spec)
    cp = lab.migrate("--copy-storage-inc", "--disk-map", f"{src}={lab.root / 'x.qcow2'}",
                     "--create-disks")
    line = lab.one_error(cp)
    assert "backing file" in line and "--copy-storage-all" in line, line
    assert lab.status()["state"] == "running"


# --------------------------------------------------------------------------- native engine

def _native_bitmaps(lab: Lab) -> list[str]:
    nodes = lab.qmp("query-named-block-nodes", {"flat": True})
    return [b["name"] for n in nodes if n["node-name"] == "disk0"
            for b in n.get("dirty-bitmaps", []) if b["name"].startswith("vmferry")]


def _native_copying(lab: Lab) -> bool:
    """The native engine is at work: its bitmap records (from before the first pass,
    which reads a raw image's file directly) and no memory migration started yet."""
    return "vmferry-presync" in _native_bitmaps(lab) and \
        lab.qmp("query-migrate").get("status") in (None, "none")


async def _write_during_native(sock: Path, size: int, writes: list, stop) -> int:
    """HMP qemu-io writes through the source QEMU while vmferry's dirty bitmap records
    (the native copy runs), until memory migration starts; returns how many went in
    while the bitmap existed."""
    import asyncio
    import random
    from vmferry.vm import qmp_session
    rnd = random.Random(11)
    during = 0
    async with qmp_session(sock, timeout=10) as q:
        while not stop():
            if (await q.execute("query-migrate")).get("status") not in (None, "none"):
                break
            nodes = await q.execute("query-named-block-nodes", {"flat": True})
            recording = any(b["name"] == "vmferry-presync" for n in nodes
                            if n["node-name"] == "disk0" for b in n.get("dirty-bitmaps", []))
            length = rnd.choice((4096, 65536, 512 * 1024))
            offset = rnd.randrange(0, size - length, 4096)
            pattern = rnd.randrange(1, 256)
            out = await q.execute("human-monitor-command", {
                "command-line": f'qemu-io -d vd0/virtio-backend '
                                f'"write -P {pattern:#x} {offset} {length}"'})
            assert out == "", out
            writes.append((offset, length, pattern))
            during += recording
            await asyncio.sleep(0.002)
    return during


def test_native_engine_moves_disk_with_writes_during_the_copy(lab):
    """--storage-engine native: the engine copies the disk, then what the guest wrote
    meanwhile, then (paused) the rest; the destination equals the source at switchover."""
    import asyncio
    size = 256
    src = fill_image(lab.root / "src.raw", size, holes=True)
    dst = lab.root / "dst.raw"
    spec = lab.spec(disk=src, memory="64M", mem="16M", dirty="idle", hb=200)
    lab.run_vm(spec)
    model = bytearray(src.read_bytes())
    p = lab.start_migrate("--storage-engine", "native", "--disk-map", f"{src}={dst}",
                          "--create-disks")
    writes: list = []
    during = asyncio.run(_write_during_native(StateDir(lab.A).cli_socket("web1"),
                                              size * MiB, writes, lambda: p.poll() is not None))
    out = lab.ok(lab.finish(p))
    assert "migrated web1" in out, out
    assert during >= 3, f"only {during} writes overlapped the native copy"
    info = lab.jobinfo()
    assert info["storage_engine"] == "native" and info["storage_passes"] >= 2, info
    assert info["final_pass_ms"] is not None, info
    lab.ok(lab.vmferry("stop", "web1", "--force", state=lab.B))
    for off, length, pattern in writes:
        model[off:off + length] = bytes([pattern]) * length
    want = hashlib.sha256(model).hexdigest()
    assert sha256(src) == want
    assert sha256(dst) == want, images_identical(src, dst, "raw")





def test_native_engine_with_a_raw_image_of_odd_size(lab):
    """A raw file whose size is not a multiple of 512: QEMU rounds its disk up, so
    its export is not the file's size; every pass still copies it whole."""
    src = lab.root / "src.raw"
    with open(src, "wb") as f:
        f.write(os.urandom(8 * MiB + 1000))
    dst = lab.root / "dst.raw"
    lab.run_vm(lab.spec(disk=src, memory="64M", mem="8M", dirty="idle", hb=200))
    dmap = ("--disk-map", f"{src}={dst}")
    lab.ok(lab.vmferry("presync", "web1", f"local://{lab.B}", *dmap, "--create-disks"))
    _hmp_write(lab, 2 * MiB, 64 * 1024, 0x61)         # a dirty pass must copy this
    lab.ok(lab.migrate("--copy-storage-inc", *dmap))
    info = lab.jobinfo()
    assert info["storage_engine"] == "native" and info["disk_processed"] >= 64 * 1024, info
    lab.ok(lab.vmferry("stop", "web1", "--force", state=lab.B))
    want = src.read_bytes()
    assert dst.read_bytes()[:len(want)] == want


@pytest.mark.parametrize("how", ["mirror", "native", "presync"])
def test_disk_bandwidth_caps_the_disk_copy(lab, how):
    """--disk-bandwidth 4 (MiB/s): an 8 MiB disk takes about 2 s to move, by QEMU's
    mirror, by the native engine or by presync, and arrives whole."""
    src = fill_image(lab.root / "src.raw", 8, seed=7)
    dst = lab.root / "dst.raw"
    lab.run_vm(lab.spec(disk=src, memory="64M", mem="8M", dirty="idle", hb=200))
    args = ("--disk-map", f"{src}={dst}", "--create-disks", "--disk-bandwidth", "4")
    t0 = time.monotonic()
    if how == "presync":
        lab.ok(lab.vmferry("presync", "web1", f"local://{lab.B}", *args))
    else:
        lab.ok(lab.migrate("--storage-engine", how, *args))
    took = time.monotonic() - t0
    # 2 s, less the 100 ms the engine (and QEMU's rate limit, one slice) may run ahead
    assert took >= 1.85, f"8 MiB at 4 MiB/s moved in {took:.2f} s"
    if how == "presync":
        lab.ok(lab.vmferry("stop", "web1", "--force"))
    else:
        info = lab.jobinfo()
        assert info["storage_engine"] == how and info["disk_processed"] >= 8 * MiB, info
        assert info["disk_bandwidth"] == 4 * MiB, info
        assert "File bandwidth cap: 4.00 MiB/s per disk" in lab.ok(lab.vmferry("jobinfo", "web1"))
        lab.ok(lab.vmferry("stop", "web1", "--force", state=lab.B))
    assert images_identical(src, dst, "raw") == ""


def test_native_engine_with_writes_until_the_guest_pauses(lab):
    """Writes go on through the memory phase (the passes that keep up with them)
    until the source pauses for switchover, so the last ones are left to the
    paused final pass: the destination must hold every write that landed before
    the pause.  (One write may race with the pause itself: its range is left out
    of the comparison, as no guest can write once paused.)"""
    import asyncio
    size = 64
    src = fill_image(lab.root / "src.raw", size)
    dst = lab.root / "dst.raw"
    lab.run_vm(lab.spec(disk=src, memory="64M", mem="16M", dirty="slow", hb=200))
    model = bytearray(src.read_bytes())
    p = lab.start_migrate("--storage-engine", "native", "--disk-map", f"{src}={dst}",
                          "--create-disks", "--bandwidth", "16")
    sure: list = []
    racing: list = []

    async def write_until_paused() -> int:
        import random
        from vmferry.vm import qmp_session
        rnd = random.Random(5)
        in_memory_phase = 0
        async with qmp_session(StateDir(lab.A).cli_socket("web1"), timeout=10) as q:
            while p.poll() is None:
                if (await q.execute("query-status"))["status"] != "running":
                    break
                length = rnd.choice((4096, 65536, 256 * 1024))
                w = (rnd.randrange(0, size * MiB - length, 4096), length, rnd.randrange(1, 256))
                out = await q.execute("human-monitor-command", {
                    "command-line": f'qemu-io -d vd0/virtio-backend "write -P {w[2]} {w[0]} {w[1]}"'})
                assert out == "", out
                if (await q.execute("query-status"))["status"] != "running":
                    racing.append(w)
                    break
                sure.append(w)
                mig = (await q.execute("query-migrate")).get("status")
                in_memory_phase += mig == "active"
                await asyncio.sleep(0.005)
        return in_memory_phase

    in_memory_phase = asyncio.run(write_until_paused())
    out = lab.ok(lab.finish(p))
    assert "migrated web1" in out, out
    assert in_memory_phase >= 3, f"only {in_memory_phase} writes during the memory phase"
    info = lab.jobinfo()
    assert info["storage_engine"] == "native" and info["storage_passes"] >= 3, info
    lab.ok(lab.vmferry("stop", "web1", "--force", state=lab.B))
    for off, length, pattern in sure:
        model[off:off + length] = bytes([pattern]) * length
    got = bytearray(dst.read_bytes())
    for off, length, _ in racing:                 # either value is right there
        got[off:off + length] = model[off:off + length]
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(model).hexdigest(), \
        images_identical(src, dst, "raw")


# --------------------------------------------------------------------------- presync

def _hmp_write(lab: Lab, offset: int, length: int, pattern: int) -> None:
    out = lab.qmp("human-monitor-command", {
        "command-line": f'qemu-io -d vd0/virtio-backend "write -P {pattern:#x} {offset} {length}"'})
    assert out == "", out


def test_presync_then_migrate_moves_only_what_changed(lab):
    """presync copies the disk while the VM runs; a second presync and the migration
    itself move only what the guest wrote since (up to the 64 KiB bitmap granularity)."""
    src = fill_image(lab.root / "src.raw", 64, holes=True)
    dst = lab.root / "dst.raw"
    lab.run_vm(lab.spec(disk=src, memory="64M", mem="8M", dirty="idle", hb=200))
    dmap = ("--disk-map", f"{src}={dst}")
    out = lab.ok(lab.vmferry("presync", "web1", f"local://{lab.B}", *dmap, "--create-disks"))
    assert out.startswith("presynced web1 (full)") and out.endswith("(zero-copy)\n"), out

    _hmp_write(lab, 3 * MiB, 2 * MiB, 0x3c)                 # 2 MiB rewritten
    out = lab.ok(lab.vmferry("presync", "web1", f"local://{lab.B}", *dmap))
    assert out.startswith("presynced web1 (incremental): 2.00 MiB moved"), out

    _hmp_write(lab, 40 * MiB + 4096, 512 * 1024, 0x5d)       # crosses 64 KiB blocks
    out = lab.ok(lab.migrate("--copy-storage-inc", *dmap))
    assert "migrated web1" in out, out
    info = lab.jobinfo()
    assert info["storage_engine"] == "native" and info["warnings"] == [], info
    assert 512 * 1024 <= info["disk_processed"] <= 512 * 1024 + 128 * 1024, info
    lab.ok(lab.vmferry("stop", "web1", "--force", state=lab.B))
    assert images_identical(src, dst, "raw") == ""
    assert not Path(str(dst) + ".vmferry-presync.json").exists(), "stale presync record"
    assert not (lab.A / "web1" / "presync.json").exists()


def test_presync_and_migrate_from_python(lab, monkeypatch):
    """The Python API: vmferry.presync (full, then incremental) and vmferry.migrate
    with copy_storage="inc" move only what the guest wrote in between."""
    import vmferry
    if "VMFERRY_QEMU" in lab.env:          # the lab's QEMU for this process too
        monkeypatch.setenv("VMFERRY_QEMU", lab.env["VMFERRY_QEMU"])
    src = fill_image(lab.root / "src.raw", 32, holes=True)
    dst = lab.root / "dst.raw"
    lab.run_vm(lab.spec(disk=src, memory="64M", mem="8M", dirty="idle", hb=200))

    def opts(**kw):
        return vmferry.MigrateOptions(disk_map={str(src): str(dst)}, **kw)
    r = vmferry.presync(lab.A, "web1", f"local://{lab.B}", opts(create_disks=True))
    assert r.kind == "full" and r.incremental == [] and r.warnings == [], r
    assert 0 < r.bytes_moved == r.disks["disk0"] <= 32 * MiB, r
    _hmp_write(lab, 5 * MiB, MiB, 0x2a)
    r = vmferry.presync(lab.A, "web1", f"local://{lab.B}", opts())
    assert r.kind == "incremental" and r.bytes_moved == MiB, r
    _hmp_write(lab, 9 * MiB, MiB, 0x2b)
    info = vmferry.migrate(lab.A, "web1", f"local://{lab.B}", opts(copy_storage="inc"))
    assert info.storage_engine == "native" and info.warnings == [], info
    assert MiB <= info.disk_processed <= MiB + 128 * 1024, info
    lab.ok(lab.vmferry("stop", "web1", "--force", state=lab.B))
    assert images_identical(src, dst, "raw") == ""


def test_presync_record_that_does_not_hold_falls_back_to_full_copy(lab):
    src = fill_image(lab.root / "src.raw", 32)
    dst = lab.root / "dst.raw"
    lab.run_vm(lab.spec(disk=src, memory="64M", mem="8M", dirty="idle", hb=200))
    dmap = ("--disk-map", f"{src}={dst}")
    lab.ok(lab.vmferry("presync", "web1", f"local://{lab.B}", *dmap, "--create-disks"))
    with open(dst, "r+b") as f:                 # someone touches the destination image
        f.seek(5 * MiB)
        f.write(b"\xee" * 4096)
    cp = lab.migrate("--copy-storage-inc", *dmap)
    lab.ok(cp)
    assert "vmferry: warning: presync record of disk0 does not hold" in cp.stderr, cp.stderr
    assert "in full" in cp.stderr, cp.stderr
    info = lab.jobinfo()
    assert info["disk_processed"] >= 32 * MiB - 64 * 1024, info     # the whole disk
    lab.ok(lab.vmferry("stop", "web1", "--force", state=lab.B))
    assert images_identical(src, dst, "raw") == ""


def test_native_engine_throttles_a_guest_that_outwrites_it(lab):
    """Writes faster than the passes copy: the guest's disk writes are throttled step
    by step until storage converges, jobinfo says so, no write is lost, and the
    throttle is gone afterwards."""
    import asyncio
    import threading
    size = 128
    src = fill_image(lab.root / "src.raw", size)
    dst = lab.root / "dst.raw"
    lab.run_vm(lab.spec(disk=src, memory="64M", mem="8M", dirty="idle", hb=200))
    model = bytearray(src.read_bytes())
    writes: list = []
    done = threading.Event()

    async def hammer() -> None:
        # as fast as HMP goes, 1 MiB at a time over the whole disk, until memory
        # migration starts (later writes could land after the final pass)
        import random
        from vmferry.vm import qmp_session
        rnd = random.Random(3)
        async with qmp_session(StateDir(lab.A).cli_socket("web1"), timeout=10) as q:
            while not done.is_set():
                if (await q.execute("query-migrate")).get("status") not in (None, "none"):
                    return
                off = rnd.randrange(0, size - 1) * MiB
                pat = rnd.randrange(1, 256)
                out = await q.execute("human-monitor-command", {
                    "command-line": f'qemu-io -d vd0/virtio-backend "write -P {pat} {off} {MiB}"'})
                assert out == "", out
                writes.append((off, MiB, pat))

    t = threading.Thread(target=lambda: asyncio.run(hammer()))
    t.start()
    # an engine slowed down to 16 KiB requests, one at a time, reading through the
    # source QEMU, loses to the writer
    lab.env["VMFERRY_NATIVE_TUNING"] = "connections=1,requests=1,request_size=16384,direct=0"
    try:
        time.sleep(0.5)          # the writer is at full speed before the copy starts
        cp = lab.migrate("--storage-engine", "native", "--disk-map", f"{src}={dst}",
                         "--create-disks")
    finally:
        done.set()
        t.join()
    lab.ok(cp)
    info = lab.jobinfo()
    assert "throttled" in info["action"], info
    throttle = lab.qmp("query-block", state=lab.B)
    lab.ok(lab.vmferry("stop", "web1", "--force", state=lab.B))
    for off, length, pat in writes:
        model[off:off + length] = bytes([pat]) * length
    want = hashlib.sha256(model).hexdigest()
    assert sha256(src) == want and sha256(dst) == want, images_identical(src, dst, "raw")
    # a throttle is the source's business: the destination guest runs unthrottled
    assert all(b.get("inserted", {}).get("bps_wr", 0) == 0 for b in throttle), throttle


def test_a_virsh_command_line_works_unchanged(lab):
    """virsh migrate --live --p2p --copy-storage-all --verbose, with --xml for the
    destination spec and --migrateuri: the spellings a virsh user types."""
    src = fill_image(lab.root / "src.raw", 16)
    dst = lab.root / "dst.raw"
    lab.run_vm(lab.spec(disk=src, memory="64M", mem="8M", dirty="idle", hb=200))
    xml = lab.spec(disk=dst, memory="64M", mem="8M", dirty="idle", hb=200,
                   file=lab.root / "dest.toml")
    cp = lab.migrate("--live", "--p2p", "--copy-storage-all", "--verbose", "--xml", xml,
                     "--create-disks")
    assert cp.returncode == 0, cp.stderr
    assert "migrated web1" in cp.stdout, cp.stdout
    assert images_identical(src, dst, "raw") == ""
    assert lab.status(state=lab.B)["state"] == "running"
