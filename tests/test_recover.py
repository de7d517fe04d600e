"""vmferry's own death is a fault like any other: the migrating process is
SIGKILLed at each phase, every command then says the migration was
interrupted, and `vmferry recover` leaves exactly one running guest with its
disk intact and nothing else behind, after which a new migration succeeds."""
from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from pathlib import Path

import pytest

import os

from disk_data import make_image
from migrate_helpers import MiB, Lab, images_identical, qemu_pids, sha256
from test_migrate import (  # noqa: F401  (fixtures)
    _failing_setup, _mirror_copying, _native_bitmaps, _native_copying, kernel, lab, qboot,
)
from vmferry.errors import VmferryError
from vmferry.migration.desthost.incoming import reap_orphans
from vmferry.vm.state import StateDir

pytestmark = pytest.mark.timeout(240)


def _kill(p: subprocess.Popen) -> None:
    p.send_signal(signal.SIGKILL)
    p.wait(10)


def _assert_notices(lab: Lab) -> None:
    """Every command that touches the VM says what happened and what to do."""
    hint = "interrupted (process gone): run 'vmferry recover web1'"
    assert hint in lab.ok(lab.vmferry("list")), lab.vmferry("list").stdout
    assert hint in lab.status()["migration"]
    line = lab.one_error(lab.migrate("--disk-map", "x=y"), code=2)
    assert hint in line and "source VM is running" not in line, line
    line = lab.one_error(lab.vmferry("presync", "web1", f"local://{lab.B}"), code=2)
    assert hint in line, line
    # a second copy of the guest must not start here while it may run there
    line = lab.one_error(lab.vmferry("run", lab.root / "web1.toml"), code=2)
    assert hint in line, line


def _recover(lab: Lab, expect: str) -> str:
    out = lab.ok(lab.vmferry("recover", "web1"))
    assert out.splitlines() == [out.strip()] and expect in out, out
    assert not (lab.A / "web1" / "journal.json").exists()
    return out


def _migrate_again(lab: Lab, src, dst) -> None:
    out = lab.ok(lab.migrate("--disk-map", f"{src}={dst}", "--create-disks"))
    assert "migrated web1" in out, out
    assert images_identical(src, dst, "raw") == ""
    assert lab.status(state=lab.B)["state"] == "running"


def _dest_state(lab: Lab) -> str:
    try:
        return lab.qmp("query-status", state=lab.B)["status"]
    except VmferryError:
        return ""


# The moments the issue names; test_faults.py kills at every moment of both
# engines, these also check every command's notice and a migration after.
KILL_POINTS = {
    # name: (hold, engine, size MiB, extra args, what must be seen before the kill)
    "before-prepare": ("prepare:60", "mirror", 32, (),
                       lambda lab: lab.job_file().get("phase") == "begin"),
    "native-copy": ("", "native", 256, (), _native_copying),
    "final-pass": ("final-pass:60", "native", 32, (),
                   lambda lab: lab.qmp("query-migrate").get("status") == "pre-switchover"),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_killed_before_the_point_of_no_return_rolls_back(lab, point):
    hold, engine, size, extra, seen = KILL_POINTS[point]
    src, h, dst, serial = _failing_setup(lab, size)
    if hold:
        lab.env["VMFERRY_TEST_HOLD"] = hold
    p = lab.start_migrate("--storage-engine", engine, "--disk-map", f"{src}={dst}",
                          "--create-disks", *extra)
    lab.wait_for(point, lambda: seen(lab), 60, proc=p)
    _kill(p)
    lab.env.pop("VMFERRY_TEST_HOLD", None)
    _assert_notices(lab)
    _recover(lab, "rolled back: web1 runs on this host")
    lab.assert_source_intact(serial=serial, disk=src, disk_hash=h, dest_disk=dst,
                             migration=(None, "none", "failed", "cancelled"))
    assert "interrupted" not in lab.ok(lab.vmferry("list"))
    _migrate_again(lab, src, dst)


@pytest.mark.parametrize("engine", ["mirror", "native"])
def test_killed_before_finish_completes_on_the_destination(lab, engine):
    """Everything arrived and both sides are paused, Finish not yet asked for:
    the destination holds the whole state, so recover resumes it there and
    retires the source."""
    src, h, dst, serial = _failing_setup(lab)
    lab.env["VMFERRY_TEST_HOLD"] = "finish:60"
    p = lab.start_migrate("--storage-engine", engine, "--disk-map", f"{src}={dst}",
                          "--create-disks")
    lab.wait_for("the memory to arrive",
                 lambda: lab.qmp("query-status")["status"] == "postmigrate", 60, proc=p)
    _kill(p)
    lab.env.pop("VMFERRY_TEST_HOLD")
    assert _dest_state(lab) != "running"          # the guest runs nowhere now
    _assert_notices(lab)
    _recover(lab, f"completed: web1 runs on local://{lab.B}")
    assert qemu_pids(lab.A) == [], "the source QEMU still runs"
    assert _dest_state(lab) == "running"
    assert images_identical(src, dst, "raw") == ""
    assert sha256(src) == h
    assert not (lab.B / "web1" / "incoming.json").exists()
    assert lab.qmp("query-block-exports", state=lab.B) == []
    last, problems, _ = lab.progress(serial)
    assert problems == [], problems
    lab.wait_progress(serial, last + 2, 30)          # the guest goes on, over there


def test_killed_before_finish_with_dname_completes_under_that_name(lab):
    """--dname: the destination's records are under the new name, which
    recover finds through the journal; the guest goes on there as web2."""
    src, h, dst, serial = _failing_setup(lab)
    lab.env["VMFERRY_TEST_HOLD"] = "finish:60"
    p = lab.start_migrate("--dname", "web2", "--disk-map", f"{src}={dst}", "--create-disks")
    lab.wait_for("the memory to arrive",
                 lambda: lab.qmp("query-status")["status"] == "postmigrate", 60, proc=p)
    _kill(p)
    lab.env.pop("VMFERRY_TEST_HOLD")
    _recover(lab, f"completed: web1 runs on local://{lab.B} as web2")
    assert qemu_pids(lab.A) == [], "the source QEMU still runs"
    assert lab.qmp("query-status", name="web2", state=lab.B)["status"] == "running"
    assert not (lab.B / "web2" / "incoming.json").exists()
    assert images_identical(src, dst, "raw") == "" and sha256(src) == h
    lab.assert_goes_on(serial)


def test_killed_mid_copy_with_dname_rolls_back(lab):
    src, h, dst, serial = _failing_setup(lab, 256)
    p = lab.start_migrate("--storage-engine", "native", "--dname", "web2",
                          "--disk-map", f"{src}={dst}", "--create-disks")
    lab.wait_for("the copy", lambda: _native_copying(lab), 60, proc=p)
    _kill(p)
    _recover(lab, "rolled back: web1 runs on this host")
    assert not (lab.B / "web2").exists(), list((lab.B / "web2").iterdir())
    lab.assert_source_intact(serial=serial, disk=src, disk_hash=h, dest_disk=dst,
                             migration=(None, "none", "failed", "cancelled"))


def _killed_after_the_destination_resumed(lab: Lab):
    """The migrating process dies just after the destination resumed the guest."""
    src, h, dst, serial = _failing_setup(lab)
    lab.env["VMFERRY_TEST_HOLD"] = "resumed:60"
    p = lab.start_migrate("--disk-map", f"{src}={dst}", "--create-disks")
    lab.wait_for("the destination to resume", lambda: _dest_state(lab) == "running", 60,
                 proc=p)
    _kill(p)
    lab.env.pop("VMFERRY_TEST_HOLD")
    return src, h


def test_killed_after_the_destination_resumed_completes(lab):
    _killed_after_the_destination_resumed(lab)
    _recover(lab, "completed: web1 runs on")
    assert qemu_pids(lab.A) == []
    assert _dest_state(lab) == "running"
    _assert_destination_settled(lab)


def _assert_completed_there(lab: Lab, state: str) -> None:
    """recover went forward: the source QEMU gone, the guest STATE on the
    destination, whose record ended with the migration."""
    assert qemu_pids(lab.A) == [], "the source QEMU still runs"
    assert _dest_state(lab) == state
    _assert_destination_settled(lab)


def _assert_destination_settled(lab: Lab) -> None:
    """The destination's incoming record is gone with the migration: one left
    behind would have the next agent or recover there stop the guest it runs
    and delete its disk as an unfinished migration's."""
    assert not (lab.B / "web1" / "incoming.json").exists()
    assert asyncio.run(reap_orphans(StateDir(lab.B), None)) == []
    assert _dest_state(lab) in ("running", "paused")


@pytest.mark.parametrize("suspend", [False, True], ids=["resume", "suspend"])
def test_killed_between_the_hand_over_mark_and_the_end_of_finish(lab, suspend):
    """The destination marked the guest its own (durably, before resuming it),
    then the migrating process died: recover goes forward, resuming the guest
    there unless --suspend, and ends the destination's record."""
    src, h, dst, serial = _failing_setup(lab)
    lab.env["VMFERRY_TEST_HOLD"] = "handed-over:60"
    p = lab.start_migrate("--disk-map", f"{src}={dst}", "--create-disks",
                          *(["--suspend"] if suspend else []))
    lab.wait_for("the hand-over mark", lambda: (lab.B / "web1" / "resumed").exists(), 60,
                 proc=p)
    _kill(p)
    lab.env.pop("VMFERRY_TEST_HOLD")
    _recover(lab, f"paused as --suspend asked" if suspend else
             f"completed: web1 runs on local://{lab.B}")
    assert qemu_pids(lab.A) == [], "the source QEMU still runs"
    assert _dest_state(lab) == ("paused" if suspend else "running")
    _assert_destination_settled(lab)
    assert images_identical(src, dst, "raw") == ""
    if not suspend:
        lab.assert_goes_on(serial)


def test_killed_after_a_suspended_finish_completes_paused(lab):
    """--suspend, killed after Finish ended on the destination (its record
    gone, the guest paused there) and before Confirm: the hand-over mark says
    the destination has the guest, so recover retires the source rather than
    resume it beside that paused copy."""
    src, h, dst, serial = _failing_setup(lab)
    lab.env["VMFERRY_TEST_HOLD"] = "confirm:60"
    p = lab.start_migrate("--disk-map", f"{src}={dst}", "--create-disks", "--suspend")
    lab.wait_for("Finish to end there",
                 lambda: not (lab.B / "web1" / "incoming.json").exists()
                 and _dest_state(lab) == "paused", 60, proc=p)
    _kill(p)
    lab.env.pop("VMFERRY_TEST_HOLD")
    _recover(lab, f"completed: web1 is on local://{lab.B}, paused as --suspend asked")
    _assert_completed_there(lab, "paused")


@pytest.mark.parametrize("how", ["kill", "sigint"])
def test_interrupted_in_post_copy_is_completed_forward(lab, how):
    """Killed (or Ctrl-C) while post-copy runs: the guest's memory is split
    between the hosts and no cancel brings it back (QEMU may refuse to resume
    the source after one), so a Ctrl-C leaves it to recover, saying so;
    recover waits for QEMU to complete it, then resumes the guest at the
    destination, its memory intact."""
    spec = lab.spec(memory="256M", mem="160M", dirty="fast")
    serial = lab.serial_of(spec)
    lab.run_vm(spec, wait_pass=2)
    # post-copy's own transfer slow enough (a few seconds) to be killed in
    lab.qmp("migrate-set-parameters", {"max-postcopy-bandwidth": 48 * MiB})
    p = lab.start_migrate("--postcopy", "--timeout", "1", "--timeout-postcopy",
                          "--bandwidth", "16", "--no-escalate")
    lab.wait_for("post-copy", lambda: lab.qmp("query-migrate").get("status") ==
                 "postcopy-active", 60, proc=p)
    if how == "kill":
        _kill(p)
    else:
        p.send_signal(signal.SIGINT)
        line = lab.one_error(lab.finish(p), prefix="vmferry: ")
        assert "post-copy was under way" in line and "vmferry recover web1" in line, line
    _recover(lab, f"completed: web1 runs on local://{lab.B}")
    _assert_completed_there(lab, "running")
    lab.assert_goes_on(serial)


def test_killed_in_memory_migration_after_a_presync_keeps_it(lab):
    """qcow2, presynced, then --copy-storage-inc killed while memory moves:
    recover stops the destination before it cancels the source's migration
    (a destination whose incoming migration is cancelled exits by itself,
    and an image not closed cleanly is not kept), so the presync survives
    and the next --copy-storage-inc moves only what changed."""
    src = make_image(lab.root / "src.qcow2", 32 * MiB, "random", fmt="qcow2")
    dst = lab.root / "dst.qcow2"
    lab.run_vm(lab.spec(disk=src, fmt="qcow2", memory="128M", mem="64M", dirty="slow"))
    dmap = ("--disk-map", f"{src}={dst}")
    lab.ok(lab.vmferry("presync", "web1", f"local://{lab.B}", *dmap, "--create-disks"))
    p = lab.start_migrate("--copy-storage-inc", *dmap, "--bandwidth", "8", "--no-escalate")
    lab.wait_for("memory to move",
                 lambda: lab.qmp("query-migrate").get("status") == "active", 60, proc=p)
    _kill(p)
    _recover(lab, "rolled back: web1 runs on this host")
    assert qemu_pids(lab.B) == []
    out = lab.ok(lab.migrate("--copy-storage-inc", *dmap))
    assert "migrated web1" in out, out
    assert lab.jobinfo()["disk_processed"] < 8 * MiB, lab.jobinfo()
    lab.ok(lab.vmferry("stop", "web1", "--force", state=lab.B))
    assert images_identical(src, dst, "qcow2") == ""


def _copied_some(lab: Lab) -> bool:
    """The journal says the native engine's copy got somewhere (a partial
    copy worth keeping)."""
    try:
        j = json.loads((lab.A / "web1" / "journal.json").read_text())
    except (OSError, ValueError):
        return False
    missing = j.get("missing", {}).get("disk0")
    return bool(missing) and sum(b - a for a, b in missing) < j["disks"][0]["size"]


def test_a_recover_killed_after_the_destination_kept_the_copy_keeps_it(lab):
    """recover rolling back keeps what the native engine copied; killed just
    after the destination kept it (its VM folder gone, the images' records
    written), the next recover finds it by those records rather than leave
    an image nothing on the source points at; the next migration moves only
    the rest."""
    src, h, dst, serial = _failing_setup(lab, 256)
    p = lab.start_migrate("--storage-engine", "native", "--disk-map", f"{src}={dst}",
                          "--create-disks", "--disk-bandwidth", "64")
    lab.wait_for("the journal to record some of the copy", lambda: _copied_some(lab), 60,
                 proc=p)
    _kill(p)
    lab.env["VMFERRY_TEST_HOLD"] = "kept:60"
    r = lab.start("recover", "web1")
    lab.wait_for("the destination to keep the copy",
                 lambda: not (lab.B / "web1").exists()
                 and Path(str(dst) + ".vmferry-presync.json").exists(), 60, proc=r)
    _kill(r)
    lab.env.pop("VMFERRY_TEST_HOLD")
    out = _recover(lab, "rolled back: web1 runs on this host")
    assert "is kept" in out, out
    assert lab.kept_copy(), "the source has no record of the copy the destination kept"
    lab.assert_source_intact(serial=serial, disk=src, disk_hash=h, dest_disk=dst)
    _migrate_again(lab, src, dst)
    assert lab.jobinfo()["disk_processed"] < 256 * MiB, lab.jobinfo()


def test_a_recover_killed_after_it_resumed_the_destination_is_completed(lab):
    """recover decided to complete, resumed the guest on the destination and
    was killed before retiring the source: the next recover must go on
    forward (the journal says so, and the mark does) — rolling back would run
    the guest on both hosts."""
    src, h, dst, serial = _failing_setup(lab)
    lab.env["VMFERRY_TEST_HOLD"] = "finish:60"
    p = lab.start_migrate("--disk-map", f"{src}={dst}", "--create-disks")
    lab.wait_for("the memory to arrive",
                 lambda: lab.qmp("query-status")["status"] == "postmigrate", 60, proc=p)
    _kill(p)
    lab.env["VMFERRY_TEST_HOLD"] = "resumed:60"
    r = lab.start("recover", "web1")
    lab.wait_for("recover to resume it there", lambda: _dest_state(lab) == "running", 60,
                 proc=r)
    _kill(r)
    lab.env.pop("VMFERRY_TEST_HOLD")
    _recover(lab, f"completed: web1 runs on local://{lab.B}")
    _assert_completed_there(lab, "running")
    lab.assert_goes_on(serial)


def test_abort_of_an_interrupted_migration_rolls_it_back(lab):
    src, h, dst, serial = _failing_setup(lab, 256)
    p = lab.start_migrate("--storage-engine", "mirror", "--disk-map", f"{src}={dst}",
                          "--create-disks")
    lab.wait_for("the mirror", lambda: _mirror_copying(lab), 60, proc=p)
    _kill(p)
    out = lab.ok(lab.vmferry("abort", "web1"))
    assert "rolled back: web1 runs on this host" in out, out
    lab.assert_source_intact(serial=serial, disk=src, disk_hash=h, dest_disk=dst)


def test_recover_refuses_when_there_is_nothing_or_it_still_runs(lab):
    src, h, dst, serial = _failing_setup(lab)
    line = lab.one_error(lab.vmferry("recover", "web1"), code=2)
    assert "no interrupted migration" in line, line
    out = lab.ok(lab.vmferry("recover", "--all"))
    assert "nothing to recover" in out, out
    lab.env["VMFERRY_TEST_HOLD"] = "prepare:60"
    p = lab.start_migrate("--disk-map", f"{src}={dst}", "--create-disks")
    lab.wait_for("Begin", lambda: lab.job_file().get("phase") == "begin", 60, proc=p)
    line = lab.one_error(lab.vmferry("recover", "web1"), code=2)
    assert "still under way" in line and "vmferry abort web1" in line, line
    line = lab.one_error(lab.migrate("--disk-map", f"{src}={dst}"), code=2)
    assert "under way" in line, line
    p.send_signal(signal.SIGINT)
    lab.finish(p)
    lab.assert_source_intact(serial=serial, disk=src, disk_hash=h, dest_disk=dst)


def _presync_dirs(tmp: Path) -> set[Path]:
    """Local presyncs' private socket folders (LocalDestination.presync_open)
    in TMP: this test's vmferry processes' TMPDIR, so another process's presync
    on a shared machine (in /tmp) is never taken for one of ours."""
    return set(tmp.glob("vmferry-presync-*"))


def test_presync_killed_then_recovered(lab):
    """A presync's process dies mid-copy: recover removes the image it created,
    its exports, server and bitmap; the next presync copies in full."""
    src, h, dst, serial = _failing_setup(lab, 256)
    tmp = lab.root / "tmp"
    tmp.mkdir()
    lab.env["TMPDIR"] = str(tmp)
    # slowed, so the kill lands mid-copy: a raw image is read from its file,
    # so no export says a copy runs, only the bitmap recording and the image
    p = lab.start("presync", "web1", f"local://{lab.B}", "--disk-map", f"{src}={dst}",
                  "--create-disks", "--disk-bandwidth", "32")
    lab.wait_for("the presync copy", lambda: "vmferry-presync" in _native_bitmaps(lab)
                 and dst.exists(), 60, proc=p)
    assert len(_presync_dirs(tmp)) == 1, "the presync's socket folder is not in its TMPDIR"
    _kill(p)
    assert "presync to" in lab.status()["migration"]
    _recover(lab, "rolled back: the presync of web1 was undone")
    assert lab.qmp("query-block-exports") == []
    assert _native_bitmaps(lab) == []
    assert not dst.exists(), "the image the killed presync created was kept"
    assert list(lab.B.glob("presync-*.json")) == []
    assert lab.status()["state"] == "running" and sha256(src) == h
    lab.ok(lab.vmferry("presync", "web1", f"local://{lab.B}", "--disk-map",
                       f"{src}={dst}", "--create-disks"))
    assert images_identical(src, dst, "raw") == ""
    assert _presync_dirs(tmp) == set(), "a presync's socket folder was left"


def test_recover_all_resolves_each(lab):
    src, h, dst, serial = _failing_setup(lab)
    lab.env["VMFERRY_TEST_HOLD"] = "prepare:60"
    p = lab.start_migrate("--disk-map", f"{src}={dst}", "--create-disks")
    lab.wait_for("Begin", lambda: lab.job_file().get("phase") == "begin", 60, proc=p)
    _kill(p)
    out = lab.ok(lab.vmferry("recover", "--all"))
    assert out.strip() == "rolled back: web1 runs on this host", out
    assert json.loads(lab.ok(lab.vmferry("list", "--json")))[0]["migration"] is None


def test_recover_from_python(lab):
    import vmferry
    src, h, dst, serial = _failing_setup(lab)
    lab.env["VMFERRY_TEST_HOLD"] = "perform:60"
    p = lab.start_migrate("--disk-map", f"{src}={dst}", "--create-disks")
    lab.wait_for("Prepare", lambda: lab.dest_pid() is not None
                 and lab.job_file().get("phase") == "prepare", 60, proc=p)
    _kill(p)
    with pytest.raises(vmferry.UsageError, match="interrupted"):
        vmferry.migrate(lab.A, "web1", f"local://{lab.B}")
    assert vmferry.recover(lab.A, "web1") == "rolled back: web1 runs on this host"
    lab.assert_source_intact(serial=serial, disk=src, disk_hash=h, dest_disk=dst)


def test_killed_in_finish_before_the_destination_resumed_completes(lab):
    """The journal says Finish was asked for, the destination has everything
    but never resumed the guest (no mark of it): recover finishes there."""
    src, h, dst, serial = _failing_setup(lab)
    lab.env["VMFERRY_TEST_HOLD"] = "finishing:60"
    p = lab.start_migrate("--disk-map", f"{src}={dst}", "--create-disks")
    lab.wait_for("Finish", lambda: lab.job_file().get("phase") == "finish", 60, proc=p)
    _kill(p)
    lab.env.pop("VMFERRY_TEST_HOLD")
    assert _dest_state(lab) != "running"
    _recover(lab, f"completed: web1 runs on local://{lab.B}")
    assert qemu_pids(lab.A) == [] and _dest_state(lab) == "running"
    assert images_identical(src, dst, "raw") == ""


def test_destination_resumed_then_died_leaves_the_source_paused(lab):
    """The destination resumed the guest and its QEMU died since: which side's
    state is the one to keep, nobody can say.  recover changes nothing and
    says what to check; --resume-source is the user's word that it is gone."""
    src, h = _killed_after_the_destination_resumed(lab)
    os.kill(lab.dest_pid(), signal.SIGKILL)
    lab.wait_for("the destination QEMU to die", lambda: lab.dest_pid() is None, 10)
    line = lab.one_error(lab.vmferry("recover", "web1"), code=1)
    assert "stays paused" in line and "--resume-source" in line, line
    assert lab.qmp("query-status")["status"] != "running"     # never both
    assert "interrupted" in lab.status()["migration"]          # still to resolve
    out = lab.ok(lab.vmferry("recover", "web1", "--resume-source"))
    assert out.strip() == "rolled back: web1 runs on this host", out
    assert lab.qmp("query-status")["status"] == "running"
    assert sha256(src) == h


def test_resume_source_is_refused_while_the_destination_runs_it(lab):
    _killed_after_the_destination_resumed(lab)
    line = lab.one_error(lab.vmferry("recover", "web1", "--resume-source"), code=2)
    assert "would run it twice" in line, line
    _recover(lab, "completed: web1 runs on")
    assert qemu_pids(lab.A) == []


def test_an_unreadable_journal_says_what_to_do(lab):
    src, h, dst, serial = _failing_setup(lab)
    (lab.A / "web1" / "journal.json").write_text("{not json")
    assert "interrupted" in lab.status()["migration"]
    line = lab.one_error(lab.vmferry("recover", "web1"), code=2)
    assert "cannot be read" in line and "journal.json" in line, line


def test_a_reused_pid_does_not_keep_a_dead_owner_s_records(tmp_path):
    """Records name their owner by pid and start time: a dead agent whose pid
    another process got since is still dead, and its leftovers are reaped."""
    import json
    import subprocess
    from vmferry.migration.desthost.incoming import orphaned
    from vmferry.vm.state import owner_record, process_start
    other = subprocess.Popen(["sleep", "30"])
    try:
        mine = tmp_path / "mine.json"
        mine.write_text(json.dumps({**owner_record(), "created": []}))
        reused = tmp_path / "reused.json"
        reused.write_text(json.dumps({**owner_record(), "owner": other.pid,
                                      "owner_start": process_start(other.pid) - 1,
                                      "created": []}))
        assert [p for p, _ in orphaned([mine, reused])] == [reused]
    finally:
        other.kill()
        other.wait()


def test_a_suspended_migration_is_completed_paused(lab):
    """--suspend: the guest is to stay paused on the destination, and recover
    keeps to that when it completes the migration."""
    src, h, dst, serial = _failing_setup(lab)
    lab.env["VMFERRY_TEST_HOLD"] = "finish:60"
    p = lab.start_migrate("--disk-map", f"{src}={dst}", "--create-disks", "--suspend")
    lab.wait_for("the memory to arrive",
                 lambda: lab.qmp("query-status")["status"] == "postmigrate", 60, proc=p)
    _kill(p)
    lab.env.pop("VMFERRY_TEST_HOLD")
    _recover(lab, f"completed: web1 is on local://{lab.B}, paused as --suspend asked")
    assert qemu_pids(lab.A) == []
    assert _dest_state(lab) == "paused"
    assert images_identical(src, dst, "raw") == ""


def test_two_recovers_at_once_act_once(lab):
    """Two users (or a user and a timer) recover the same VM at the same time:
    one resolves it, the other says so, and the guest runs once."""
    src, h, dst, serial = _failing_setup(lab, 64)
    p = lab.start_migrate("--storage-engine", "mirror", "--disk-map", f"{src}={dst}",
                          "--create-disks", "--disk-bandwidth", "8")
    lab.wait_for("the mirror", lambda: _mirror_copying(lab), 60, proc=p)
    _kill(p)
    both = [lab.start("recover", "web1") for _ in range(2)]
    done = [lab.finish(q) for q in both]
    ok = [cp for cp in done if cp.returncode == 0]
    assert len(ok) == 1, [(cp.returncode, cp.stdout, cp.stderr) for cp in done]
    assert ok[0].stdout.startswith("rolled back: web1 runs on this host"), ok[0].stdout
    other = next(cp for cp in done if cp.returncode != 0)
    line = lab.one_error(other, code=2)
    assert "no interrupted migration" in line or "still under way" in line, line
    lab.assert_source_intact(serial=serial, disk=src, disk_hash=h, dest_disk=dst)


def test_recover_when_the_source_qemu_died_too(lab):
    """The host lost both vmferry and the source QEMU mid-copy: the
    destination, which never ran the guest, is undone, and the line says the
    guest must be started again here."""
    src, h, dst, serial = _failing_setup(lab, 64)
    p = lab.start_migrate("--storage-engine", "mirror", "--disk-map", f"{src}={dst}",
                          "--create-disks", "--disk-bandwidth", "8")
    lab.wait_for("the mirror", lambda: _mirror_copying(lab), 60, proc=p)
    _kill(p)
    for pid in qemu_pids(lab.A):
        os.kill(pid, signal.SIGKILL)
    lab.wait_for("the source QEMU to die", lambda: qemu_pids(lab.A) == [], 10)
    out = _recover(lab, "rolled back: the destination holds nothing of web1")
    assert "start it with 'vmferry run'" in out, out
    assert qemu_pids(lab.B) == [] and not dst.exists() and not (lab.B / "web1").exists()
    assert sha256(src) == h
    assert "interrupted" not in lab.ok(lab.vmferry("list"))


def test_a_handed_over_guest_is_never_reaped_or_undone(tmp_path):
    """A destination's record of a migration whose owner died, beside that
    migration's hand-over mark: the guest (and its disk) is that host's now,
    so neither the agent's reaping nor an undo asked by a source removes it;
    another migration's mark protects nothing."""
    import asyncio as aio

    from vmferry.migration.desthost import incoming
    state = StateDir(tmp_path)
    vm = tmp_path / "web1"
    vm.mkdir()
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"guest data")
    rec = {"owner": 2 ** 22 + 7, "owner_start": 1, "token": "a" * 16, "completed": True,
           "created": [str(disk)], "dirs": [],
           "ids": {str(disk): [os.stat(disk).st_dev, os.stat(disk).st_ino]},
           "new_vm_dir": True}
    (vm / incoming.RECORD).write_text(json.dumps(rec))
    (vm / incoming.RESUMED).write_text("a" * 16)
    with pytest.raises(VmferryError, match="handed over"):
        aio.run(incoming.undo_kept(state, None, "web1", "a" * 16))
    rec["completed"] = False
    (vm / incoming.RECORD).write_text(json.dumps(rec))
    assert aio.run(reap_orphans(state, None)) == []
    assert disk.exists() and (vm / incoming.RECORD).exists()
    (vm / incoming.RESUMED).write_text("b" * 16)           # another migration's
    assert aio.run(reap_orphans(state, None)) == ["web1"]
    assert not vm.exists() and not disk.exists()
