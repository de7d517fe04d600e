"""`vmferry --connect ssh://SRC migrate --direct NAME ssh://DST`: libvirt's
managed direct migration.  This process is the management machine, in its
own namespace; the source (the netlab namespace) and the destination (a
third namespace) each run a real sshd, and are cabled to each other for
QEMU's streams.  This machine relays every request the source has for the
destination's agent; should it die, each host sees its connection close.
Also here, on the same three hosts: a p2p migration tunnelled through ssh to
a destination whose firewall passes only ssh."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path
from urllib.parse import quote

import pytest

from migrate_helpers import qemu_pids
from test_connect import (  # noqa: F401
    _cli, _control_agent, _copying, _moved_there, _on, _uri, _vm, far,
)
from test_remote import AGENT, RemoteLab, _in_namespace, kernel, rlab  # noqa: F401

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def far_pki(far, netlab, tmp_path_factory):
    """Certificates for QEMU's TLS between the source and the third host."""
    from netlab import make_pki
    return make_pki(tmp_path_factory.mktemp("far-pki"), [far[0].dest_ip, netlab.dest_ip])


def _dest(rlab: RemoteLab, far, pki=None) -> tuple[Path, str]:
    """The destination's state directory and its URI, as this machine reaches it."""
    net, sshd = far
    D = rlab.root / "D"
    D.mkdir(exist_ok=True)
    (D / "agent.toml").write_text(f'storage_roots = ["{rlab.root}", "{rlab.kernel.parent}"]\n'
                                  f'allow_extra_args = true\n'
                                  + (f'pki = "{pki.dir}"\n' if pki else ""))
    q = (f"keyfile={quote(str(sshd.key))}&known_hosts={quote(str(sshd.known_hosts))}"
         f"&agent={quote(AGENT)}")
    return D, f"ssh://{sshd.user}@{sshd.host}:{sshd.port}{D}?{q}"


def _holding(rlab: RemoteLab, uri: str, hold: str) -> str:
    """URI whose vmferry waits at testhooks' HOLD (the source's process)."""
    wrapper = rlab.root / "vmferry-holding"
    wrapper.write_text(f"#!/bin/sh\nVMFERRY_TEST_HOLD={hold} exec {AGENT} \"$@\"\n")
    wrapper.chmod(0o755)
    return uri.replace(quote(AGENT), quote(str(wrapper)))


def _guests(net, D: Path) -> list[int]:
    """QEMU processes of state directory D in a namespace."""
    out = []
    for pid in qemu_pids(D):
        try:
            if _in_namespace(pid, net.ns):
                out.append(pid)
        except OSError:
            pass
    return out


def _kill_management(rlab: RemoteLab, p: subprocess.Popen, job: Path) -> None:
    """The management machine (P, in a session of its own) dies at once; the
    source's migration (its job file JOB) ends, failed, having seen why."""
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(10)
    rlab.wait_for("the source to roll back", lambda: json.loads(job.read_text())["status"]
                  != "running", 60)
    info = json.loads(job.read_text())
    assert info["status"] == "failed" and "lost the management machine" in info["error"], info


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_direct_migration_driven_from_a_third_host(rlab, far, far_pki, tls):
    """Every phase goes through this machine; the disks and the memory go
    straight from the source to the destination over their own cable
    (encrypted by QEMU with --tls)."""
    S, uri, src, dst, serial = _vm(rlab, 64)
    D, dest = _dest(rlab, far, far_pki if tls else None)
    extra = ["--tls", "--pki", far_pki.dir] if tls else []
    out = rlab.ok(_on(rlab, uri, "migrate", "--live", "--direct", "web1", dest,
                      "--disk-map", f"{src}={dst}", "--create-disks", *extra))
    assert out.startswith("migrated web1 in "), out
    # the source's own record of it says where it went, and how
    job = json.loads((S / "web1" / "job.json").read_text())
    assert job["status"] == "completed" and job["destination"].startswith("ssh://"), job
    assert job["tls"] == tls, job
    _moved_there(rlab, far[0].ns, S, D, serial, src, dst)


def test_direct_refuses_what_only_p2p_does(rlab, far):
    uri = _uri(rlab, rlab.root / "S")
    D, dest = _dest(rlab, far)
    line = rlab.one_error(_on(rlab, uri, "migrate", "--direct", "--tunnelled", "web1", dest),
                          code=2)
    assert "--tunnelled goes with --p2p" in line, line
    line = rlab.one_error(_on(rlab, uri, "migrate", "--direct", "web1",
                              "ssh://nosuch.invalid/x"), code=1)
    assert "nosuch.invalid" in line, line


@pytest.mark.parametrize("moment", ["prepared", "copying"])
def test_management_killed_mid_migration_rolls_back(rlab, far, moment):
    """The management machine dies once the destination is prepared, or while
    the disks copy: the source rolls back (its guest runs on, unpaused) and
    the destination removes what Prepare made."""
    S, uri, src, dst, serial = _vm(rlab, 64)
    D, dest = _dest(rlab, far)
    if moment == "prepared":
        uri = _holding(rlab, uri, "perform:8")
    p = subprocess.Popen(_cli("--connect", uri, "migrate", "--direct", "web1", dest,
                              "--disk-map", f"{src}={dst}", "--create-disks",
                              "--disk-bandwidth", "8"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         stdin=subprocess.DEVNULL, env=rlab.env, start_new_session=True)
    rlab.procs.append(p)
    job = S / "web1" / "job.json"

    def there() -> bool:
        info = json.loads(job.read_text()) if job.exists() else {}
        if moment == "prepared":
            return info.get("phase") == "prepare" and bool(_guests(far[0], D))
        return info.get("phase") == "perform" and info.get("disk_processed", 0) > 0
    rlab.wait_for(f"the migration to be {moment}", there, 60, proc=p)
    _kill_management(rlab, p, job)
    st = json.loads(rlab.ok(_on(rlab, uri, "status", "web1", "--json")))
    assert st["state"] == "running", st
    at, problems, _ = rlab.progress(serial)
    assert problems == [], problems
    rlab.wait_progress(serial, at + 2, 30)          # the guest runs, unpaused
    rlab.wait_for("the destination to tear down", lambda: _guests(far[0], D) == [], 30)
    assert not (D / "web1" / "qmp.sock").exists()
    rlab.ok(_on(rlab, uri, "stop", "web1", "--force"))


@contextlib.contextmanager
def _source_cut_off(rlab: RemoteLab, far):
    """The destination's firewall refuses the source's ssh connections (the
    management machine's still pass), removed on the way out."""
    net, sshd = far
    rules = rlab.root / "cut-off.nft"
    rules.write_text("table inet vmferry_cut {\n  chain input {\n"
                     "    type filter hook input priority 0; policy accept;\n"
                     f"    ip saddr {rlab.net.dest_ip} tcp dport {sshd.port} "
                     "reject with tcp reset\n  }\n}\n")
    out = net.run(["nft", "-f", str(rules)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    try:
        yield
    finally:
        net.run(["nft", "delete", "table", "inet", "vmferry_cut"])


def test_management_killed_after_the_memory_arrived_is_recovered(rlab, far):
    """Past the point of no return — the guest's memory is on the destination,
    paused, the source paused too — the management machine dies: the source
    records an interrupted migration, and `recover` finishes it from the
    management machine, through which alone the source's firewalled-off
    destination is reached (as the migration reached it).  On the source
    alone, or through another destination than the migration's, recover
    changes nothing and says why."""
    if shutil.which("nft") is None:
        pytest.skip("nftables is not installed")
    S, uri, src, dst, serial = _vm(rlab, 32)
    D, dest = _dest(rlab, far)
    held = _holding(rlab, uri, "finish:8")
    p = subprocess.Popen(_cli("--connect", held, "migrate", "--direct", "web1", dest,
                              "--disk-map", f"{src}={dst}", "--create-disks"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         stdin=subprocess.DEVNULL, env=rlab.env, start_new_session=True)
    rlab.procs.append(p)
    job = S / "web1" / "job.json"
    rlab.wait_for("the memory to arrive", lambda: job.exists() and
                  rlab.qmp("query-status", state=S)["status"] == "postmigrate", 90, proc=p)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(10)
    rlab.wait_for("the source's process to end", lambda: json.loads(job.read_text())
                  ["status"] != "running", 60)
    error = json.loads(job.read_text())["error"]
    assert "lost the management machine" in error and "vmferry recover web1" in error, error
    other = rlab.root / "D-other"
    other.mkdir(exist_ok=True)
    with _source_cut_off(rlab, far):
        line = rlab.one_error(_on(rlab, uri, "recover", "web1", "--direct",
                                  dest.replace(str(D), str(other))), code=2)
        assert "went to ssh://" in line and "name that destination" in line, line
        assert rlab.qmp("query-status", state=S)["status"] == "postmigrate"
        # the source alone cannot ask the destination: nothing changes, and
        # the line says where to recover from
        line = rlab.one_error(_on(rlab, uri, "recover", "web1"), code=1)
        assert "stays paused" in line and "recover web1 --direct ssh://" in line, line
        assert rlab.qmp("query-status", state=S)["status"] == "postmigrate"
        out = rlab.ok(_on(rlab, uri, "recover", "web1", "--direct", dest))
    assert out.startswith("completed: web1 runs on ssh://"), out
    _moved_there(rlab, far[0].ns, S, D, serial, src, dst)


def test_ctrl_c_at_the_management_machine_aborts(rlab, far):
    """Ctrl-C here reaches the source, which rolls back as at its own terminal
    and says so in the last line."""
    S, uri, src, dst, serial = _vm(rlab, 64)
    D, dest = _dest(rlab, far)
    p = _copying(rlab, S, uri, "--direct", "web1", dest,
                 "--disk-map", f"{src}={dst}", "--create-disks")
    job = S / "web1" / "job.json"
    p.send_signal(signal.SIGINT)
    line = rlab.one_error(rlab.finish(p), code=130, prefix="vmferry: ")
    assert "source VM is running" in line, line
    st = json.loads(rlab.ok(_on(rlab, uri, "status", "web1", "--json")))
    assert st["state"] == "running", st
    rlab.wait_for("the destination to tear down", lambda: _guests(far[0], D) == [], 30)
    rlab.ok(_on(rlab, uri, "stop", "web1", "--force"))


def test_direct_from_a_tls_agent(rlab, far):
    """The source reached through its agent (tls://, --allow-control): the
    agent runs the source's side and passes its frames both ways; when this
    machine dies mid-copy, the agent closes that side's channel and it rolls
    back; the next direct migration then completes."""
    S, uri, src, dst, serial = _vm(rlab, 64, via=_control_agent(rlab))
    D, dest = _dest(rlab, far)
    args = ("migrate", "--direct", "web1", dest, "--disk-map", f"{src}={dst}",
            "--create-disks")
    p = _copying(rlab, S, uri, *args[1:], session=True)
    job = S / "web1" / "job.json"
    _kill_management(rlab, p, job)
    assert json.loads(rlab.ok(_on(rlab, uri, "status", "web1", "--json")))["state"] \
        == "running"
    rlab.wait_for("the destination to tear down", lambda: _guests(far[0], D) == [], 30)
    out = rlab.ok(_on(rlab, uri, *args, "--overwrite-disks"))
    assert out.startswith("migrated web1 in "), out
    _moved_there(rlab, far[0].ns, S, D, serial, src, dst)


def _destination_agents(net, D: Path) -> list[int]:
    """The destination's `agent --stdio` processes (ssh's) for state directory D."""
    out = []
    for pid in _pids_with(f"{D}"):
        try:
            if b"--stdio" in Path(f"/proc/{pid}/cmdline").read_bytes() and \
                    _in_namespace(pid, net.ns):
                out.append(pid)
        except OSError:
            pass
    return out


def test_ctrl_c_at_the_management_machine_aborts_through_a_tls_agent(rlab, far):
    """Ctrl-C here with the source reached through its agent (tls://,
    --allow-control): no ssh carries the key, so the "signal" frame rides on
    the agent's relay_input to the source's command, which rolls back as at
    its own terminal and says so in the one last line; the guest runs on at
    the source, nothing is left at the destination."""
    S, uri, src, dst, serial = _vm(rlab, 64, via=_control_agent(rlab))
    D, dest = _dest(rlab, far)
    p = _copying(rlab, S, uri, "--direct", "web1", dest,
                 "--disk-map", f"{src}={dst}", "--create-disks")
    assert _guests(far[0], D), "the destination's QEMU is not there to be undone"
    p.send_signal(signal.SIGINT)           # Ctrl-C at the management machine
    line = rlab.one_error(rlab.finish(p, timeout=60), code=130, prefix="vmferry: ")
    assert "cancelled" in line and "source VM is running" in line, line
    # the source's own record says it was the user, not a failure
    info = json.loads((S / "web1" / "job.json").read_text())
    assert info["status"] == "cancelled", info
    st = json.loads(rlab.ok(_on(rlab, uri, "status", "web1", "--json")))
    assert st["state"] == "running" and _in_namespace(st["pid"], rlab.net.ns), st
    at, problems, _ = rlab.progress(serial)
    assert problems == [], problems
    rlab.wait_progress(serial, at + 2, 30)          # the guest goes on, memory intact
    # the destination undid its Prepare, and its agent went with this machine
    rlab.wait_for("the destination to tear down", lambda: _guests(far[0], D) == [] and
                  not (D / "web1").exists() and _destination_agents(far[0], D) == [], 30)
    assert not dst.exists() or \
        Path(str(dst) + ".vmferry-presync.json").exists(), "a created disk was left"
    assert "Traceback" not in (rlab.root / "agent.log").read_text(errors="replace")
    rlab.ok(_on(rlab, uri, "stop", "web1", "--force"))


def test_destination_agent_lost_mid_copy(rlab, far):
    """The destination's agent dies while the disks copy: this machine tells
    the source at once, which rolls back and says so in one line here."""
    S, uri, src, dst, serial = _vm(rlab, 64)
    D, dest = _dest(rlab, far)
    p = _copying(rlab, S, uri, "--direct", "web1", dest,
                 "--disk-map", f"{src}={dst}", "--create-disks")
    job = S / "web1" / "job.json"
    agents = _destination_agents(far[0], D)
    assert agents, "no destination agent found"
    for pid in agents:
        os.kill(pid, signal.SIGKILL)
    line = rlab.one_error(rlab.finish(p))
    assert "lost the destination agent" in line and "source VM is running" in line, line
    assert json.loads(rlab.ok(_on(rlab, uri, "status", "web1", "--json")))["state"] \
        == "running"
    at, problems, _ = rlab.progress(serial)
    assert problems == [], problems
    rlab.wait_progress(serial, at + 2, 30)
    rlab.ok(_on(rlab, uri, "stop", "web1", "--force"))


def _pids_with(marker: str) -> list[int]:
    """Processes whose command line mentions MARKER."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if marker.encode() in Path("/proc", entry, "cmdline").read_bytes():
                    out.append(int(entry))
            except OSError:
                pass
    return out


def test_tunnelled_p2p_from_a_third_host_through_a_firewall(rlab, far):
    """--connect ssh://SRC migrate --p2p --tunnelled: the source drives, and the
    disks and memory ride on its ssh connection to a destination whose
    firewall passes only ssh; without --tunnelled the same migration fails
    in one line and the guest runs on at the source."""
    import shutil
    from test_remote import _firewall_all_but_ssh
    if shutil.which("nft") is None:
        pytest.skip("nftables is not installed")
    S, uri, src, dst, serial = _vm(rlab, 32)
    D, dest = _dest(rlab, far)
    args = ("migrate", "--p2p", "web1", dest, "--disk-map", f"{src}={dst}", "--create-disks")
    with _firewall_all_but_ssh(far[0], rlab.root):
        line = rlab.one_error(_on(rlab, uri, *args))
        assert "source VM is running" in line, line
        out = rlab.ok(_on(rlab, uri, *args, "--tunnelled", "--overwrite-disks"))
    assert out.startswith("migrated web1 in "), out
    _moved_there(rlab, far[0].ns, S, D, serial, src, dst)


def test_p2p_with_tls_from_a_third_host(rlab, far, far_pki):
    """--connect ssh://SRC migrate --p2p --tls: the source drives, QEMU
    encrypts the disks and the memory between the two other hosts."""
    S, uri, src, dst, serial = _vm(rlab, 32)
    D, dest = _dest(rlab, far, far_pki)
    out = rlab.ok(_on(rlab, uri, "migrate", "--p2p", "--tls", "--pki", far_pki.dir, "web1",
                      dest, "--disk-map", f"{src}={dst}", "--create-disks"))
    assert out.startswith("migrated web1 in "), out
    assert json.loads((S / "web1" / "job.json").read_text())["tls"] is True
    _moved_there(rlab, far[0].ns, S, D, serial, src, dst)
