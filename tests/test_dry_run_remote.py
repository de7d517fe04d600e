"""`vmferry migrate --dry-run` to another host (tests/netlab.py): the agent's
"check" request runs Prepare's checks there — its storage roots, free space,
ports, QEMU — and starts or creates nothing."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from urllib.parse import quote

import pytest

import vmferry

from disk_data import MiB, make_image
from migrate_helpers import QEMU
from test_dry_run import problems, snapshot, unchanged
from test_remote import AGENT, kernel, rlab  # noqa: F401  (the fixtures)

pytestmark = [
    pytest.mark.skipif(shutil.which(QEMU) is None or shutil.which("qemu-img") is None,
                       reason="needs qemu-system-x86_64 and qemu-img"),
    pytest.mark.timeout(120),
]


def ssh_uri(lab) -> str:
    """The lab's ssh:// destination, whose agent runs this very vmferry: ssh
    passes no PYTHONPATH, and the check request is as new as the code under
    test."""
    wrapper = lab.root / "agent.sh"
    wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={Path(vmferry.__file__).parents[1]} "
                       f"exec {sys.executable} -m vmferry \"$@\"\n")
    wrapper.chmod(0o755)
    return lab.ssh_uri().replace(quote(AGENT), quote(str(wrapper)))


def _vm(lab):
    src = make_image(lab.root / "src.qcow2", 16 * MiB, "sparse", fmt="qcow2")
    lab.run_vm(lab.spec(disk=src, fmt="qcow2", memory="128M", mem="64M"))
    return src


@pytest.mark.parametrize("transport", ["ssh", "tls"])
def test_a_good_remote_dry_run(rlab, transport):
    src = _vm(rlab)
    if transport == "tls":
        rlab.start_tls_agent()
    dest = ssh_uri(rlab) if transport == "ssh" else rlab.tls_uri()
    dst = rlab.root / "dst" / "web1.qcow2"
    before = snapshot(rlab)
    cp = rlab.remote(dest, "--disk-map", f"{src}={dst}", "--create-disks", "--dry-run",
                     "--json", timeout=60)
    plan = json.loads(rlab.ok(cp))
    assert plan["ok"] is True, plan
    (disk,) = plan["disks"]
    assert disk["dest_path"] == str(dst) and disk["create"] is True, disk
    target = plan["target"]
    assert target["version"] and target["qemu"], target
    assert set(target["listen"]) == {"disks", "memory"}, target
    assert plan["link_rate"] > 0 and plan["estimate_s"] > 0, plan
    unchanged(rlab, before)
    assert not dst.parent.exists()


def test_remote_problems_one_line_each(rlab):
    """An image outside the destination's storage roots, then one that exists
    there and may not be overwritten: each one line, exit 1, nothing made."""
    src = _vm(rlab)
    dest = ssh_uri(rlab)
    before = snapshot(rlab)
    outside = f"/var/tmp/vmferry-dry-run-{rlab.root.name}/web1.qcow2"
    cp = rlab.remote(dest, "--disk-map", f"{src}={outside}", "--create-disks",
                     "--dry-run", timeout=60)
    (line,) = problems(cp)
    assert "outside the destination's storage roots" in line and outside in line, line
    unchanged(rlab, before)
    taken = make_image(rlab.root / "taken.qcow2", 16 * MiB, "sparse", seed=2, fmt="qcow2")
    before = snapshot(rlab)
    cp = rlab.remote(dest, "--disk-map", f"{src}={taken}", "--dry-run", timeout=60)
    (line,) = problems(cp)
    assert "already exists" in line and "--overwrite-disks" in line, line
    unchanged(rlab, before)
    # both at once, with --tls but no client certificates here: every one said
    nopki = rlab.root / "no-pki"
    nopki.mkdir()
    before = snapshot(rlab)
    cp = rlab.remote(dest, "--disk-map", f"{src}={outside}", "--create-disks", "--tls",
                     "--pki", nopki, "--dry-run", timeout=60)
    lines = problems(cp)
    assert len(lines) == 2, lines
    assert any("outside the destination's storage roots" in x for x in lines), lines
    assert any(str(nopki) in x for x in lines), lines
    unchanged(rlab, before)


def test_remote_presync_dry_run(rlab):
    """presync --dry-run over ssh: the plan of a good one; an image outside the
    roots one line; no qemu-nbd started, no image or record made there."""
    src = _vm(rlab)
    dest = ssh_uri(rlab)
    dst = rlab.root / "dst" / "web1.qcow2"
    before = snapshot(rlab)
    cp = rlab.vmferry("presync", "web1", dest, "--pki", rlab.pki.dir, "--disk-map",
                      f"{src}={dst}", "--create-disks", "--dry-run", "--json", timeout=60)
    plan = json.loads(rlab.ok(cp))
    assert plan["ok"] is True and plan["disks"][0]["create"] is True, plan
    assert list(plan["target"]["listen"]) == ["disk0"], plan
    outside = f"/var/tmp/vmferry-dry-run-{rlab.root.name}/web1.qcow2"
    cp = rlab.vmferry("presync", "web1", dest, "--pki", rlab.pki.dir, "--disk-map",
                      f"{src}={outside}", "--create-disks", "--dry-run", timeout=60)
    (line,) = problems(cp)
    assert "outside the destination's storage roots" in line, line
    unchanged(rlab, before)
    assert not dst.parent.exists() and not Path(outside).parent.exists()


def test_tunnelled_dry_run_needs_no_free_port(rlab):
    """--tunnelled listens on Unix sockets there, never on the agent's TCP port
    range: an agent whose only port is taken (by its host's sshd) passes a
    tunnelled dry run, and fails the same one untunnelled."""
    src = _vm(rlab)
    conf = rlab.B / "agent.toml"
    conf.write_text(conf.read_text() + f"port_range = [{rlab.sshd.port}, {rlab.sshd.port}]\n")
    dest = ssh_uri(rlab)
    dst = rlab.root / "dst" / "web1.qcow2"
    before = snapshot(rlab)
    args = ("--disk-map", f"{src}={dst}", "--create-disks", "--dry-run", "--json")
    cp = rlab.remote(dest, *args, timeout=60)
    assert cp.returncode == 1, (cp.stdout, cp.stderr)
    plan = json.loads(cp.stdout)
    assert plan["ok"] is False and len(plan["problems"]) == 2, plan      # disks, memory
    assert all(f"no free port in {rlab.sshd.port}-{rlab.sshd.port}" in x
               for x in plan["problems"]), plan
    cp = rlab.remote(dest, "--tunnelled", *args, timeout=60)
    plan = json.loads(rlab.ok(cp))
    assert plan["ok"] is True and plan["problems"] == [], plan
    assert plan["target"]["listen"] == {}, plan
    assert "inside the ssh connection" in plan["transport"], plan
    unchanged(rlab, before)


def test_an_agent_from_before_dry_runs_is_named():
    """An older agent refuses the check by name: the problem says to update it."""
    import asyncio
    from vmferry.agent.protocol import ProtocolError
    from vmferry.migration.options import MigrateOptions
    from vmferry.migration.remote import RemoteDestination
    from vmferry.vm.spec import parse_spec

    class OldAgent:
        async def call(self, op, **args):
            raise ProtocolError(f"destination agent refused {op}: unknown request {op!r}")

    dest = RemoteDestination("tls://192.0.2.1")
    dest.info = {"version": "0.0.1"}

    async def connect(opts):
        return OldAgent()
    dest._connect = connect
    spec = parse_spec('name = "web1"\nmemory = "64M"\n', source="a test spec")
    found = asyncio.run(dest.check(spec, [], MigrateOptions()))
    (problem,) = found.problems
    assert "vmferry 0.0.1" in problem and "install vmferry" in problem, problem
    found = asyncio.run(dest.presync_check_open([], MigrateOptions()))
    assert "cannot check a presync" in found.problems[0], found
