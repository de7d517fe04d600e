"""The fault matrix: each fault at each moment of a migration, on both storage
engines, to local:///B.  Whatever happens, the guest ends up running on
exactly one host, the source disk is untouched (or the destination equals it
when the migration completed), nothing of the attempt is left behind, and
the user reads one line.

Faults:
  kill      the migrating vmferry process is SIGKILLed, then `vmferry recover`
  term      SIGTERM to the migrating process
  int2      two Ctrl-C's in a row (the second arrives during the rollback)
  destkill  the destination QEMU is SIGKILLed

Moments (a test hold point keeps the migration there, see testhooks.py):
  prepare     the destination QEMU waits, nothing copied yet
  copy        the disk copy runs (a 256 MiB disk)
  memory      memory migrates (capped at 4 MiB/s)
  switchover  the source is paused at pre-switchover, disks not yet settled
  finish      memory and disks arrived, both sides paused, Finish not begun

The outcome of every case is "source" (rolled back: the guest runs on the
source) except `kill` at `finish`, where the destination holds the whole
state and recover completes the migration ("destination").  The README
shows this table.  Faults between hosts (link cut, agent killed, process
killed over ssh:// and tls://) are in test_remote.py.
"""
from __future__ import annotations

import os
import signal
import time

import pytest

from migrate_helpers import Lab, images_identical, qemu_pids, sha256
from test_migrate import (  # noqa: F401  (fixtures)
    _failing_setup, _mirror_copying, _native_bitmaps, _native_copying, kernel, lab, qboot,
)
from vmferry.errors import VmferryError

pytestmark = pytest.mark.timeout(240)

FAULTS = ["kill", "term", "int2", "destkill"]
MOMENTS = ["prepare", "copy", "memory", "switchover", "finish"]
ENGINES = ["mirror", "native"]


def outcome(fault: str, moment: str) -> str:
    return "destination" if (fault, moment) == ("kill", "finish") else "source"


def _status(lab: Lab, state) -> str:
    try:
        return lab.qmp("query-status", state=state)["status"]
    except VmferryError:
        return ""


def _reached(lab: Lab, moment: str, engine: str):
    if moment == "prepare":
        return lambda: lab.dest_pid() is not None and \
            lab.job_file().get("phase") == "prepare"
    if moment == "copy":
        return (lambda: _mirror_copying(lab)) if engine == "mirror" else \
            (lambda: _native_copying(lab))
    if moment == "memory":
        return lambda: lab.qmp("query-migrate").get("status") == "active"
    if moment == "switchover":
        return lambda: lab.qmp("query-migrate").get("status") == "pre-switchover"
    return lambda: _status(lab, lab.A) == "postmigrate"


HOLDS = {"prepare": "perform", "switchover": "switchover", "finish": "finish"}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("moment", MOMENTS)
@pytest.mark.parametrize("fault", FAULTS)
def test_fault(lab, fault, moment, engine):
    src, h, dst, serial = _failing_setup(lab, 256 if moment == "copy" else 32)
    if moment in HOLDS:
        # A process held at Finish sleeps the hold out before it finds its
        # destination dead: 8 s there (time to see the moment and kill), not 60.
        hold = 8 if (fault, moment) == ("destkill", "finish") else 60
        lab.env["VMFERRY_TEST_HOLD"] = f"{HOLDS[moment]}:{hold}"
    extra = ("--bandwidth", "4", "--no-escalate") if moment == "memory" else ()
    p = lab.start_migrate("--storage-engine", engine, "--disk-map", f"{src}={dst}",
                          "--create-disks", *extra)
    lab.wait_for(moment, _reached(lab, moment, engine), 60, proc=p)
    lab.env.pop("VMFERRY_TEST_HOLD", None)

    if fault == "kill":
        p.send_signal(signal.SIGKILL)
        p.wait(10)
        out = lab.ok(lab.vmferry("recover", "web1"))
        assert len(out.splitlines()) == 1, out
        line = out.strip()
    else:
        if fault == "term":
            p.send_signal(signal.SIGTERM)
        elif fault == "int2":
            p.send_signal(signal.SIGINT)
            time.sleep(0.05)
            p.send_signal(signal.SIGINT)
        else:
            os.kill(lab.dest_pid(), signal.SIGKILL)
        cp = lab.finish(p)
        prefix = "vmferry: error: " if fault == "destkill" else "vmferry: "
        if fault == "int2" and cp.returncode == -signal.SIGINT:
            # the second Ctrl-C came after the rollback and its line: it ends
            # the process as a shell expects (status 130 there)
            cp.returncode = 130
        line = lab.one_error(cp, code=1 if fault == "destkill" else 130, prefix=prefix)
        assert "source VM is running" in line, line

    assert not (lab.A / "web1" / "journal.json").exists(), "the journal was left"
    if outcome(fault, moment) == "destination":
        assert line.startswith("completed: web1 runs on"), line
        assert qemu_pids(lab.A) == [], "the source QEMU still runs"
        assert _status(lab, lab.B) == "running"
        assert images_identical(src, dst, "raw") == "" and sha256(src) == h
        assert not (lab.B / "web1" / "incoming.json").exists()
        assert lab.qmp("query-block-exports", state=lab.B) == []
        last, problems, _ = lab.progress(serial)
        assert problems == [], problems
        lab.wait_progress(serial, last + 2, 30)
        return
    if fault == "kill":
        assert line.startswith("rolled back: web1 runs on this host"), line
    # QEMU keeps reporting a migration whose memory all went as "completed"
    done = ("completed",) if moment == "finish" else ()
    lab.assert_source_intact(serial=serial, disk=src, disk_hash=h, dest_disk=dst,
                             migration=(None, "none", "failed", "cancelled") + done)
    assert "interrupted" not in lab.ok(lab.vmferry("list"))


@pytest.mark.parametrize("engine", ENGINES)
def test_source_read_error_during_the_copy(lab, engine):
    """The source disk fails a read while its copy runs (QEMU's blkdebug
    filter slid under the disk's node): the migration stops with one line,
    the guest runs on, its disk untouched."""
    src, h, dst, serial = _failing_setup(lab, 64)
    lab.qmp("blockdev-add", {"driver": "blkdebug", "node-name": "faulty",
                             "image": "file-disk0", "inject-error": [
                                 {"event": "read_aio", "errno": 5, "once": False,
                                  "sector": (40 << 20) // 512}]})
    lab.qmp("blockdev-reopen", {"options": [{"driver": "raw", "node-name": "disk0",
                                             "file": "faulty", "discard": "unmap"}]})
    # the native engine reads a raw image's file itself: here it must go
    # through QEMU, as it does for qcow2
    lab.env["VMFERRY_NATIVE_TUNING"] = "direct=0"
    cp = lab.migrate("--storage-engine", engine, "--disk-map", f"{src}={dst}",
                     "--create-disks")
    line = lab.one_error(cp)
    assert ("reading the source disk: Input/output error" in line if engine == "mirror"
            else "native copy of disk0 failed: reading from" in line), line
    assert "is the destination still there" not in line, line
    assert "source VM is running" in line, line
    lab.assert_source_intact(serial=serial, disk=src, disk_hash=h, dest_disk=dst)
