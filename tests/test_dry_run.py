"""`vmferry migrate --dry-run`: every problem that would stop the migration, one
line each and exit 1, or the plan and exit 0 — and in either case nothing
changed on either host: no file, no destination QEMU, no journal or job file,
no block node, bitmap, export or job in the source QEMU.

One running VM serves the whole module: a dry run that changes nothing can
be run against it again and again, and each test checks that it did not.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from disk_data import MiB, make_image
from migrate_helpers import QEMU, Lab, qemu_pids
from test_migrate import kernel  # noqa: F401  (the fixture)
from vmferry.guest import find_qboot

pytestmark = [
    pytest.mark.skipif(shutil.which(QEMU) is None or shutil.which("qemu-img") is None,
                       reason="needs qemu-system-x86_64 and qemu-img"),
    pytest.mark.timeout(120),
]

DISK_MIB = 32           # random data: all of it allocated
SMALL_FS = "4m"         # a destination file system it cannot fit in


@pytest.fixture(scope="module")
def lab(kernel):
    root = Path(tempfile.mkdtemp(prefix="vmfd-"))
    small = root / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SMALL_FS}", "tmpfs",
                              str(small)], capture_output=True).returncode == 0
    lab = Lab(root, kernel, find_qboot(QEMU))
    lab.small = small if mounted else None
    lab.src = make_image(root / "src.raw", DISK_MIB * MiB, fmt="raw")
    lab.run_vm(lab.spec(disk=lab.src, fmt="raw"))
    try:
        yield lab
    finally:
        lab.cleanup()
        if mounted:
            subprocess.run(["umount", "-l", str(small)])
        shutil.rmtree(root, ignore_errors=True)


def snapshot(lab: Lab) -> dict:
    """Everything a migration's first steps would change, on both hosts."""
    files = {}
    for p in sorted(lab.root.rglob("*")):
        if p.name.endswith(".log") or p.is_socket():
            continue            # the guest's console and QEMU's log grow on their own
        st = p.lstat()
        files[str(p)] = (st.st_mode, st.st_size if not p.is_dir() else 0, st.st_mtime_ns)
    nodes = lab.qmp("query-named-block-nodes", {"flat": True})
    return {
        "files": files,
        "nodes": sorted((n["node-name"], tuple(sorted(b["name"] for b in
                                                     n.get("dirty-bitmaps", []))))
                        for n in nodes),
        "exports": lab.qmp("query-block-exports"),
        "jobs": lab.qmp("query-block-jobs"),
        "status": lab.qmp("query-status")["status"],
    }


def unchanged(lab: Lab, before: dict) -> None:
    after = snapshot(lab)
    assert after == before, {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    assert qemu_pids(lab.B) == [], "a destination QEMU was started"
    assert not (lab.A / "web1" / "journal.json").exists()
    assert before["status"] == "running"


def dry_run(lab: Lab, dest: str, *args) -> subprocess.CompletedProcess:
    return lab.vmferry("migrate", "web1", dest, "--dry-run", *args)


def problems(cp: subprocess.CompletedProcess) -> list[str]:
    """A failed dry run's lines on stderr, each a problem; exit status 1."""
    assert cp.returncode == 1, (cp.returncode, cp.stdout, cp.stderr)
    assert "Traceback" not in cp.stderr, cp.stderr
    lines = cp.stderr.splitlines()
    assert lines and all(line.startswith("vmferry: error: ") for line in lines), cp.stderr
    return lines


def test_a_good_dry_run_prints_the_plan(lab):
    before = snapshot(lab)
    dst = lab.root / "B-images" / "web1.raw"
    cp = dry_run(lab, f"local://{lab.B}", "--disk-map", f"{lab.src}={dst}", "--create-disks")
    out = lab.ok(cp)
    assert cp.stderr == "", cp.stderr
    assert out.startswith("dry run: web1 would migrate to "), out
    assert str(lab.src) in out and f"{dst} (to create" in out, out
    assert "by the native engine" in out and "estimate: about" in out, out
    unchanged(lab, before)
    assert not dst.parent.exists()


def test_json_output_parses(lab):
    before = snapshot(lab)
    dst = lab.root / "B-images" / "web1.raw"
    cp = dry_run(lab, f"local://{lab.B}", "--disk-map", f"{lab.src}={dst}", "--create-disks",
                 "--json")
    plan = json.loads(lab.ok(cp))
    assert plan["ok"] is True and plan["problems"] == [], plan
    (disk,) = plan["disks"]
    assert disk["dest_path"] == str(dst) and disk["create"] is True, disk
    assert disk["dest_free"] >= disk["allocated"], disk
    assert disk["size"] == DISK_MIB << 20 and disk["allocated"] >= DISK_MIB << 20, disk
    assert plan["engine"] == "native" and plan["estimate_s"] > 0, plan
    assert plan["disk_read_rate"] > 0 and plan["link_rate"] > 0, plan
    unchanged(lab, before)


def test_a_dry_run_is_never_detached(lab):
    """--connect runs migrate with --detach; a dry run still answers at once."""
    before = snapshot(lab)
    dst = lab.root / "B-images" / "web1.raw"
    cp = dry_run(lab, f"local://{lab.B}", "--disk-map", f"{lab.src}={dst}", "--create-disks",
                 "--detach", "--json")
    assert json.loads(lab.ok(cp))["ok"] is True
    unchanged(lab, before)
    assert not (lab.A / "web1" / "migrate.log").exists()


def test_a_full_destination_is_one_line(lab):
    if lab.small is None:
        pytest.skip("cannot mount a tmpfs (needs root)")
    before = snapshot(lab)
    dst = lab.small / "images" / "web1.raw"
    cp = dry_run(lab, f"local://{lab.B}", "--disk-map", f"{lab.src}={dst}", "--create-disks")
    (line,) = problems(cp)
    assert "not enough space" in line and str(dst) in line, line
    assert cp.stdout.startswith("dry run: web1 cannot migrate"), cp.stdout
    unchanged(lab, before)
    assert list(lab.small.iterdir()) == []


def test_every_problem_is_listed(lab):
    """Not just the first: a destination image that is missing and an option
    that does not fit the destination, one line each."""
    before = snapshot(lab)
    dst = lab.root / "B-images" / "web1.raw"
    cp = dry_run(lab, f"local://{lab.B}", "--disk-map", f"{lab.src}={dst}", "--tls",
                 "--json")
    assert cp.returncode == 1, cp.stderr
    plan = json.loads(cp.stdout)
    assert plan["ok"] is False and len(plan["problems"]) == 2, plan
    assert any("does not exist" in p and "--create-disks" in p for p in plan["problems"])
    assert any("--tls" in p for p in plan["problems"])
    assert plan["estimate_s"] is None
    cp = dry_run(lab, f"local://{lab.B}", "--disk-map", f"{lab.src}={dst}", "--tls")
    assert len(problems(cp)) == 2
    unchanged(lab, before)


def test_an_unreachable_host_is_one_line(lab):
    before = snapshot(lab)
    # nothing listens on port 1: ssh's own words say so
    cp = dry_run(lab, "ssh://root@127.0.0.1:1/var/lib/vmferry?no_verify=1&keepalive=1")
    (line,) = problems(cp)
    assert "127.0.0.1" in line and "refused" in line.lower(), line
    unchanged(lab, before)


def test_a_vm_that_is_not_running_is_a_problem(lab):
    before = snapshot(lab)
    lab.spec("web2", file=lab.root / "web2.toml")
    lab.ok(lab.vmferry("run", lab.root / "web2.toml"))
    lab.ok(lab.vmferry("stop", "web2", "--force"))
    cp = lab.vmferry("migrate", "web2", f"local://{lab.B}", "--dry-run")
    (line,) = problems(cp)
    assert "web2 is not running" in line, line
    before["files"] = {k: v for k, v in before["files"].items()}
    after = snapshot(lab)
    assert after["nodes"] == before["nodes"] and after["status"] == "running"
    assert not os.path.exists(lab.B)



def test_presync_dry_run(lab):
    """presync --dry-run: the plan, or a full destination in one line; no
    bitmap, export or NBD server on the source, no image or qemu-nbd there."""
    before = snapshot(lab)
    dst = lab.root / "B-images" / "web1.raw"
    cp = lab.vmferry("presync", "web1", f"local://{lab.B}", "--disk-map", f"{lab.src}={dst}",
                     "--create-disks", "--dry-run", "--json")
    plan = json.loads(lab.ok(cp))
    assert plan["ok"] is True and plan["kind"] == "presync", plan
    assert plan["disks"][0]["create"] is True and plan["estimate_s"] > 0, plan
    out = lab.ok(lab.vmferry("presync", "web1", f"local://{lab.B}", "--disk-map",
                             f"{lab.src}={dst}", "--create-disks", "--dry-run"))
    assert out.startswith("dry run: web1 would presync to "), out
    if lab.small is not None:
        full = lab.small / "web1.raw"
        cp = lab.vmferry("presync", "web1", f"local://{lab.B}", "--disk-map",
                         f"{lab.src}={full}", "--create-disks", "--dry-run")
        (line,) = problems(cp)
        assert "not enough space" in line and str(full) in line, line
    unchanged(lab, before)
    assert not (lab.A / "web1" / "presync.json").exists()
    assert not dst.parent.exists()


def test_dry_run_from_python(lab, monkeypatch):
    import vmferry
    for k, v in lab.env.items():
        monkeypatch.setenv(k, v)        # the lab's QEMU (a TCG wrapper, perhaps)
    before = snapshot(lab)
    dst = lab.root / "B-images" / "web1.raw"
    plan = vmferry.dry_run(lab.A, "web1", f"local://{lab.B}",
                           vmferry.MigrateOptions(disk_map={str(lab.src): str(dst)}))
    assert isinstance(plan, vmferry.DryRun) and not plan.ok, plan
    (problem,) = plan.problems
    assert "does not exist" in problem, problem
    plan = vmferry.dry_run(lab.A, "web1", f"local://{lab.B}", vmferry.MigrateOptions(
        disk_map={str(lab.src): str(dst)}, create_disks=True), kind="presync")
    assert plan.ok and plan.kind == "presync" and plan.disks[0].create, plan
    unchanged(lab, before)


def test_after_a_presync_only_the_delta_is_counted(lab):
    """Last: it leaves a presynced copy (and its bitmap) behind."""
    dst = lab.root / "presynced" / "web1.raw"
    dmap = ("--disk-map", f"{lab.src}={dst}")
    lab.ok(lab.vmferry("presync", "web1", f"local://{lab.B}", *dmap, "--create-disks"))
    before = snapshot(lab)
    plan = json.loads(lab.ok(dry_run(lab, f"local://{lab.B}", *dmap, "--copy-storage-inc",
                                     "--json")))
    (disk,) = plan["disks"]
    assert disk["engine"] == "native" and disk["create"] is False, disk
    assert disk["moves"] < disk["allocated"], disk
    unchanged(lab, before)
