"""`vmferry --connect URI`: commands run on another host — the netlab
namespace, reached through its real sshd — with the output and exit status
they have there.  A migration started that way runs detached on that host:
the management connection may drop, `jobinfo --follow` re-attaches, `abort`
stops it."""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional
from urllib.parse import quote

import pytest

from migrate_helpers import fill_image, images_identical, qemu_pids
from test_remote import AGENT, RemoteLab, _in_namespace, kernel, rlab  # noqa: F401

pytestmark = pytest.mark.timeout(240)


def _uri(lab: RemoteLab, state: Path) -> str:
    s = lab.sshd
    q = (f"keyfile={quote(str(s.key))}&known_hosts={quote(str(s.known_hosts))}"
         f"&agent={quote(AGENT)}")
    return f"ssh://{s.user}@{s.host}:{s.port}{state}?{q}"


def _vm(lab: RemoteLab, size_mib: int = 32, via: Optional[tuple[Path, str]] = None):
    """A VM started on the other host through --connect (ssh://, or VIA: a
    state directory and the URI that reaches it); (S, uri, src, dst, serial)."""
    S, uri = via or (lab.root / "S", _uri(lab, lab.root / "S"))
    src = fill_image(lab.root / "src.raw", size_mib)
    dst = lab.root / "dst.raw"
    spec = lab.spec(disk=src, memory="64M", mem="8M", dirty="slow")
    out = lab.ok(_on(lab, uri, "run", spec))
    assert "web1" in out, out
    return S, uri, src, dst, lab.serial_of(spec)


def _cli(*args: object) -> list[str]:
    return [sys.executable, "-m", "vmferry", *map(str, args)]


def _on(lab: RemoteLab, uri: str, *args: object, timeout: float = 120
        ) -> subprocess.CompletedProcess:
    """vmferry --connect URI ARGS, as a user on the management machine runs it."""
    return subprocess.run(_cli("--connect", uri, *args), capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, env=lab.env, timeout=timeout)


def _copying(rlab: RemoteLab, S: Path, uri: str, *args: object,
             session: bool = False) -> subprocess.Popen:
    """`vmferry --connect URI migrate ARGS`, slowed to 8 MiB/s per disk, once
    the source's job (in state directory S) copies; SESSION: in a session of
    its own, to kill it whole as a dying management machine."""
    p = subprocess.Popen(_cli("--connect", uri, "migrate", *args, "--disk-bandwidth", "8"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         stdin=subprocess.DEVNULL, env=rlab.env, start_new_session=session)
    rlab.procs.append(p)
    job = S / "web1" / "job.json"
    rlab.wait_for("the migration to copy", lambda: job.exists() and
                  json.loads(job.read_text()).get("phase") == "perform", 60, proc=p)
    return p


def _moved_there(rlab: RemoteLab, ns: str, S: Path, D: Path, serial: Path, src: Path,
                 dst: Path) -> None:
    """The guest runs on at the destination (state directory D, in network
    namespace NS), none at the source (S); the disk arrived byte for byte."""
    st = rlab.status(state=D)
    assert st["state"] == "running" and _in_namespace(st["pid"], ns), st
    at, problems, _ = rlab.progress(serial)
    assert problems == [], problems
    rlab.wait_progress(serial, at + 2, 30)
    assert qemu_pids(S) == []
    rlab.ok(rlab.vmferry("stop", "web1", "--force", state=D))
    assert images_identical(src, dst, "raw") == ""


def test_commands_run_on_the_other_host(rlab):
    S, uri, src, dst, serial = _vm(rlab)
    st = json.loads(rlab.ok(_on(rlab, uri, "status", "web1", "--json")))
    assert st["state"] == "running" and _in_namespace(st["pid"], rlab.net.ns), st
    assert "web1" in rlab.ok(_on(rlab, uri, "list"))
    # an error there is the same one line and status as here
    line = rlab.one_error(_on(rlab, uri, "status", "nosuch"), code=2)
    assert "nosuch" in line, line
    # p2p from here: the other host's vmferry drives the migration, this one watches
    out = rlab.ok(_on(rlab, uri, "migrate", "web1", f"local://{rlab.B}",
                               "--disk-map", f"{src}={dst}", "--create-disks"))
    assert out.startswith("migrated web1 in "), out
    st = json.loads(rlab.ok(_on(rlab, _uri(rlab, rlab.B), "status", "web1",
                                         "--json")))
    assert st["state"] == "running" and _in_namespace(st["pid"], rlab.net.ns), st
    info = json.loads(rlab.ok(_on(rlab, uri, "jobinfo", "web1", "--json")))
    assert info["status"] == "completed", info
    rlab.ok(_on(rlab, _uri(rlab, rlab.B), "stop", "web1", "--force"))
    assert images_identical(src, dst, "raw") == ""
    # --state-dir is this host's: with --connect the URI names the other's
    line = rlab.one_error(subprocess.run(_cli("--state-dir", rlab.A, "--connect", uri, "list"),
                                         capture_output=True, text=True), code=2)
    assert "in the URI" in line, line


def test_a_dropped_connection_leaves_the_migration_running(rlab):
    S, uri, src, dst, serial = _vm(rlab, 64)
    p = _copying(rlab, S, uri, "web1", f"local://{rlab.B}",
                 "--disk-map", f"{src}={dst}", "--create-disks", session=True)
    job = S / "web1" / "job.json"
    os.killpg(p.pid, signal.SIGKILL)          # the management machine is gone
    p.wait(10)
    time.sleep(1)
    assert json.loads(job.read_text())["status"] == "running"
    cp = _on(rlab, uri, "jobinfo", "web1", "--follow")
    assert rlab.ok(cp).startswith("migrated web1 in "), cp.stdout
    assert qemu_pids(S) == []
    assert rlab.status(state=rlab.B)["state"] == "running"
    rlab.ok(rlab.vmferry("stop", "web1", "--force", state=rlab.B))
    assert images_identical(src, dst, "raw") == ""


def test_abort_through_connect(rlab):
    S, uri, src, dst, serial = _vm(rlab, 64)
    p = _copying(rlab, S, uri, "web1", f"local://{rlab.B}",
                 "--disk-map", f"{src}={dst}", "--create-disks")
    job = S / "web1" / "job.json"
    out = rlab.ok(_on(rlab, uri, "abort", "web1"))
    assert out.startswith("aborted the migration of web1"), out
    line = rlab.one_error(rlab.finish(p), code=130, prefix="vmferry: ")
    assert "source VM is running" in line, line
    st = json.loads(rlab.ok(_on(rlab, uri, "status", "web1", "--json")))
    assert st["state"] == "running", st
    assert not (rlab.B / "web1").exists()


def test_detached_migration_on_this_host(rlab):
    """`migrate --detach` without --connect: the same follower, here."""
    src = fill_image(rlab.root / "src.raw", 32)
    dst = rlab.root / "dst.raw"
    rlab.run_vm(rlab.spec(disk=src, memory="64M", mem="8M", dirty="slow"))
    out = rlab.ok(rlab.migrate("--detach", "--disk-map", f"{src}={dst}", "--create-disks"))
    assert out.startswith("migrated web1 in "), out
    # and a migration that cannot start says why, as in the foreground
    line = rlab.one_error(rlab.migrate("--detach", "--disk-map", f"{src}={dst}"), code=2)
    assert "web1" in line, line


def test_ctrl_c_of_a_follower_aborts_the_migration(rlab):
    """`jobinfo --follow NAME` attached to a detached migration: its Ctrl-C
    aborts the migration, as the foreground command's would; it ends with
    the migration's last line, the source VM runs on."""
    src = fill_image(rlab.root / "src.raw", 64)
    dst = rlab.root / "dst.raw"
    spec = rlab.spec(disk=src, memory="64M", mem="8M", dirty="slow")
    rlab.run_vm(spec)
    started = rlab.start_migrate("--detach", "--disk-map", f"{src}={dst}", "--create-disks",
                                 "--disk-bandwidth", "8")
    rlab.wait_for("the migration to copy",
                  lambda: rlab.job_file().get("phase") == "perform", 60, proc=started)
    f = rlab.start("jobinfo", "web1", "--follow", "--progress=json")
    assert f.stdout is not None

    def following() -> bool:
        return bool(select.select([f.stdout], [], [], 0)[0]) and bool(f.stdout.readline())
    rlab.wait_for("the follower to show progress", following, 30, proc=f)
    f.send_signal(signal.SIGINT)
    line = rlab.one_error(rlab.finish(f, timeout=60), code=130, prefix="vmferry: ")
    assert "source VM is running" in line, line
    # the one that started it sees the same end
    line = rlab.one_error(rlab.finish(started, timeout=60), code=130, prefix="vmferry: ")
    assert "source VM is running" in line, line
    assert rlab.jobinfo()["status"] == "cancelled"
    rlab.assert_source_intact(serial=rlab.serial_of(spec), dest_disk=dst)


@pytest.fixture(scope="module")
def far(netlab, tmp_path_factory):
    """A third host: its own namespace and sshd, cabled straight to the source's
    (netlab's) namespace; this namespace only manages."""
    from netlab import NetLab, join, start_sshd
    with NetLab() as lab:
        join(netlab, lab)
        sshd = start_sshd(lab, tmp_path_factory.mktemp("far-sshd"))
        yield lab, sshd
        sshd.stop()


def test_p2p_migration_driven_from_a_third_host(rlab, far):
    """Management here, source and destination two other hosts: the source
    host's vmferry migrates to the destination's agent over ssh, straight
    across their own cable; this host only started it and watched."""
    net, sshd = far
    S, uri, src, dst, serial = _vm(rlab, 64)
    D = rlab.root / "D"
    D.mkdir()
    (D / "agent.toml").write_text(f'storage_roots = ["{rlab.root}", "{rlab.kernel.parent}"]\n'
                                  f'allow_extra_args = true\n')
    q = (f"keyfile={quote(str(sshd.key))}&known_hosts={quote(str(sshd.known_hosts))}"
         f"&agent={quote(AGENT)}")
    dest = f"ssh://{sshd.user}@{sshd.host}:{sshd.port}{D}?{q}"
    out = rlab.ok(_on(rlab, uri, "migrate", "--live", "--p2p", "web1", dest,
                      "--disk-map", f"{src}={dst}", "--create-disks"))
    assert out.startswith("migrated web1 in "), out
    _moved_there(rlab, net.ns, S, D, serial, src, dst)


def test_commands_through_a_tls_agent(rlab):
    """tls://: an agent that takes commands (--allow-control) runs them against
    its own state directory; one that does not refuses in one line."""
    from test_remote import TLS_PORT
    S = rlab.root / "S"
    S.mkdir()
    (S / "agent.toml").write_text(f'storage_roots = ["{rlab.root}", "{rlab.kernel.parent}"]\n'
                                  f'pki = "{rlab.pki.dir}"\nallow_extra_args = true\n')
    log = open(rlab.root / "agent.log", "wb")
    listen = ["--state-dir", S, "agent", "--listen", f"{rlab.net.dest_ip}:{TLS_PORT}"]
    p = rlab.net.popen([AGENT, *map(str, listen)], stdout=log, stderr=subprocess.STDOUT,
                       env=rlab.env)
    rlab.procs.append(p)
    rlab.wait_for("the agent", lambda: b"listening on" in (rlab.root / "agent.log")
                  .read_bytes(), 20, proc=p)
    uri = f"tls://{rlab.net.dest_ip}:{TLS_PORT}?pki={quote(str(rlab.pki.dir))}"
    line = rlab.one_error(_on(rlab, uri, "list"), code=2)
    assert "takes no commands" in line and "--allow-control" in line, line
    p.terminate()
    p.wait(10)
    (rlab.root / "agent.log").write_bytes(b"")
    p = rlab.net.popen([AGENT, *map(str, listen), "--allow-control"], stdout=log,
                       stderr=subprocess.STDOUT, env=rlab.env)
    rlab.procs.append(p)
    rlab.wait_for("the agent", lambda: b"listening on" in (rlab.root / "agent.log")
                  .read_bytes(), 20, proc=p)
    src = fill_image(rlab.root / "src.raw", 32)
    dst = rlab.root / "dst.raw"
    spec = rlab.spec(disk=src, memory="64M", mem="8M", dirty="slow")
    rlab.ok(_on(rlab, uri, "run", spec))
    st = json.loads(rlab.ok(_on(rlab, uri, "status", "web1", "--json")))
    assert st["state"] == "running" and _in_namespace(st["pid"], rlab.net.ns), st
    line = rlab.one_error(_on(rlab, uri, "status", "nosuch"), code=2)
    assert "nosuch" in line, line
    out = rlab.ok(_on(rlab, uri, "migrate", "web1", f"local://{rlab.B}",
                      "--disk-map", f"{src}={dst}", "--create-disks"))
    assert out.startswith("migrated web1 in "), out
    assert rlab.status(state=rlab.B)["state"] == "running"
    rlab.ok(rlab.vmferry("stop", "web1", "--force", state=rlab.B))
    assert images_identical(src, dst, "raw") == ""


def _control_agent(rlab: RemoteLab) -> tuple[Path, str]:
    """An agent on the other host that takes commands (--allow-control) for
    its state directory S; (S, its tls:// URI)."""
    from test_remote import TLS_PORT
    S = rlab.root / "S"
    S.mkdir()
    (S / "agent.toml").write_text(f'storage_roots = ["{rlab.root}", "{rlab.kernel.parent}"]\n'
                                  f'pki = "{rlab.pki.dir}"\nallow_extra_args = true\n')
    log = rlab.root / "agent.log"
    p = rlab.net.popen([AGENT, "--state-dir", str(S), "agent", "--listen",
                        f"{rlab.net.dest_ip}:{TLS_PORT}", "--allow-control"],
                       stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=rlab.env)
    rlab.procs.append(p)
    rlab.wait_for("the agent", lambda: b"listening on" in log.read_bytes(), 20, proc=p)
    return S, f"tls://{rlab.net.dest_ip}:{TLS_PORT}?pki={quote(str(rlab.pki.dir))}"


def test_ctrl_c_through_a_tls_agent_aborts_the_migration(rlab):
    """Ctrl-C of `vmferry --connect tls://... migrate` is passed on to the
    agent (command_signal): the migration there aborts, the guest runs on at
    the source, nothing is left at the destination."""
    S, uri = _control_agent(rlab)
    src = fill_image(rlab.root / "src.raw", 64)
    dst = rlab.root / "dst.raw"
    spec = rlab.spec(disk=src, memory="64M", mem="8M", dirty="slow")
    rlab.ok(_on(rlab, uri, "run", spec))
    p = _copying(rlab, S, uri, "web1", f"local://{rlab.B}",
                 "--disk-map", f"{src}={dst}", "--create-disks")
    job = S / "web1" / "job.json"
    assert (rlab.B / "web1").exists()      # the destination VM is there, to be undone
    p.send_signal(signal.SIGINT)           # Ctrl-C at the management machine
    line = rlab.one_error(rlab.finish(p, timeout=60), code=130, prefix="vmferry: ")
    assert "source VM is running" in line, line
    info = json.loads(rlab.ok(_on(rlab, uri, "jobinfo", "web1", "--json")))
    assert info["status"] == "cancelled", info
    st = json.loads(rlab.ok(_on(rlab, uri, "status", "web1", "--json")))
    assert st["state"] == "running" and _in_namespace(st["pid"], rlab.net.ns), st
    serial = rlab.serial_of(spec)
    at, problems, _ = rlab.progress(serial)
    assert problems == [], problems
    rlab.wait_progress(serial, at + 2, 30)          # the guest goes on, memory intact
    assert qemu_pids(rlab.B) == [] and not (rlab.B / "web1").exists()
    assert not dst.exists() or \
        Path(str(dst) + ".vmferry-presync.json").exists(), "a created disk was left"
