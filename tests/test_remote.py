"""Migrations between two hosts: the destination is a network namespace with
its own address (tests/netlab.py), reached over a real sshd or a mutual-TLS
`vmferry agent --listen` running inside it.  Disk and memory data cross the
veth link from the source QEMU to the destination QEMU, with and without
--tls.  Failures (the link cut, the agent killed) must leave the source
running and the destination empty; strangers (a wrong certificate, an
unknown ssh key, plain TCP) are refused.

Skipped, with the reason, where network namespaces cannot be made.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import pytest

from disk_data import MiB, make_image
from migrate_helpers import (
    QEMU, Lab, images_identical, qemu_pids,
)
from vmferry.guest import build_guest, find_qboot

pytestmark = [
    pytest.mark.skipif(shutil.which(QEMU) is None or shutil.which("qemu-img") is None,
                       reason="needs qemu-system-x86_64 and qemu-img"),
    pytest.mark.timeout(240),
]

# the vmferry the other hosts run; VMFERRY_TEST_AGENT: another checkout's (a
# wrapper setting PYTHONPATH), as ssh passes no environment
AGENT = os.environ.get("VMFERRY_TEST_AGENT") or str(Path(sys.executable).parent / "vmferry")
TLS_PORT = 16599


@pytest.fixture(scope="module")
def kernel(tmp_path_factory) -> Path:
    if not (shutil.which("as") and shutil.which("ld")):
        pytest.skip("GNU binutils (as, ld) not installed: cannot build the test guest")
    return build_guest(tmp_path_factory.mktemp("guest"))


class RemoteLab(Lab):
    """Lab's A is this host; B is the destination host's state directory (the
    same file system, as a shared /home would be; its QEMU runs in the
    namespace).  Images and logs may be written anywhere under the lab."""

    def __init__(self, root: Path, kernel: Path, netlab, sshd, pki) -> None:
        super().__init__(root, kernel, find_qboot(QEMU))
        self.net, self.sshd, self.pki = netlab, sshd, pki
        self.B.mkdir()
        # the test guest's spec passes -bios qboot.rom in extra_args, and its
        # kernel is built outside the lab
        (self.B / "agent.toml").write_text(f'storage_roots = ["{root}", "{kernel.parent}"]\n'
                                           f'pki = "{pki.dir}"\nallow_extra_args = true\n')

    def ssh_uri(self, key: Path | None = None, keepalive: float = 5) -> str:
        s = self.sshd
        q = (f"keyfile={quote(str(key or s.key))}&known_hosts={quote(str(s.known_hosts))}"
             f"&agent={quote(AGENT)}&keepalive={keepalive:g}")
        return f"ssh://{s.user}@{s.host}:{s.port}{self.B}?{q}"

    def tls_uri(self, keepalive: float = 5) -> str:
        return f"tls://{self.net.dest_ip}:{TLS_PORT}?keepalive={keepalive:g}"

    def start_tls_agent(self) -> subprocess.Popen:
        log = open(self.root / "agent.log", "wb")
        p = self.net.popen([AGENT, "--state-dir", str(self.B), "agent", "--listen",
                            f"{self.net.dest_ip}:{TLS_PORT}", "--pki", str(self.pki.dir)],
                           stdout=log, stderr=subprocess.STDOUT, env=self.env)
        self.procs.append(p)
        self.wait_for("the tls agent to listen",
                      lambda: b"listening on" in (self.root / "agent.log").read_bytes(), 20,
                      proc=p)
        return p

    def remote(self, dest: str, *args, name: str = "web1", timeout: float = 180):
        return self.vmferry("migrate", name, dest, "--pki", self.pki.dir, *args,
                            timeout=timeout)

    def assert_destination_empty(self, timeout: float = 30) -> None:
        """Nothing of the incoming VM is left on the destination host."""
        self.wait_for("the destination to be cleaned up",
                      lambda: not qemu_pids(self.B) and not (self.B / "web1").exists(),
                      timeout)


@pytest.fixture
def rlab(kernel, netlab, sshd, pki):
    root = Path(tempfile.mkdtemp(prefix="vmfr-"))
    lab = RemoteLab(root, kernel, netlab, sshd, pki)
    try:
        yield lab
    finally:
        netlab.link_up()
        netlab.unshape()
        lab.cleanup()
        shutil.rmtree(root, ignore_errors=True)


def _migrate_and_check(lab: RemoteLab, dest: str, *extra: str, dname: str = "") -> dict:
    src = make_image(lab.root / "src.qcow2", 64 * MiB, "sparse", fmt="qcow2")
    dst = lab.root / "dst.qcow2"
    spec = lab.spec(disk=src, fmt="qcow2", memory="128M", mem="64M")
    serial = lab.serial_of(spec)
    lab.run_vm(spec, wait_pass=2)
    out = lab.ok(lab.remote(dest, "--disk-map", f"{src}={dst}", "--create-disks", *extra,
                            *(("--dname", dname) if dname else ())))
    assert out.startswith(f"migrated web1{' as ' + dname if dname else ''} in "), out
    # the guest runs on in the destination host's QEMU, memory intact
    st = lab.status(dname or "web1", state=lab.B)
    assert st["state"] == "running", st
    assert _in_namespace(st["pid"], lab.net.ns), "the destination QEMU runs on this host"
    at, problems, _ = lab.progress(serial)
    assert problems == [], problems
    lab.wait_progress(serial, at + 2, 30)
    assert lab.progress(serial)[1] == []
    assert qemu_pids(lab.A) == []
    lab.ok(lab.vmferry("stop", dname or "web1", "--force", state=lab.B))
    assert images_identical(src, dst, "qcow2") == ""
    return lab.jobinfo()


def _in_namespace(pid: int, ns: str) -> bool:
    return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{ns}").st_ino


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_migration_over_ssh(rlab, tls):
    """ssh://: the agent runs through the system ssh client; the disks and memory
    cross the link between the hosts, encrypted with --tls."""
    extra = ["--tls"] if tls else []
    info = _migrate_and_check(rlab, rlab.ssh_uri(), *extra)
    assert info["status"] == "completed" and info["disk_remaining"] == 0, info


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_migration_to_tls_agent(rlab, tls):
    agent = rlab.start_tls_agent()
    extra = ["--tls", "--storage-engine", "native"] if tls else []
    info = _migrate_and_check(rlab, rlab.tls_uri(), *extra)
    assert info["status"] == "completed", info
    assert agent.poll() is None, "the long-running agent exited after one migration"


def test_dname_to_another_host(rlab):
    """--dname through an agent: the other host runs the guest as web2."""
    info = _migrate_and_check(rlab, rlab.ssh_uri(), dname="web2")
    assert info["status"] == "completed" and info["dest_name"] == "web2", info
    assert not (rlab.B / "web1").exists()


@pytest.mark.parametrize("tls,engine", [(False, "auto"), (True, "native"), (True, "auto")],
                         ids=["plain-auto", "tls-native", "tls-auto"])
def test_native_engine_between_hosts_takes_zero_copy_lanes(rlab, tls, engine):
    """The native engine reads a raw image from its file and sends it over the
    link to the destination's NBD export: on zero-copy lanes (sendfile from
    the file into the TCP socket) in plain NBD, where --storage-engine auto
    picks it, and on libnbd lanes, which speak TLS, with --tls (where auto
    picks QEMU's mirror); jobinfo says which carried the bytes."""
    src = make_image(rlab.root / "src.raw", 64 * MiB, fmt="raw")
    dst = rlab.root / "dst.raw"
    spec = rlab.spec(disk=src, fmt="raw", memory="128M", mem="64M")
    rlab.run_vm(spec, wait_pass=2)
    extra = ["--tls"] if tls else []
    out = rlab.ok(rlab.remote(rlab.ssh_uri(), "--disk-map", f"{src}={dst}", "--create-disks",
                              "--storage-engine", engine, *extra))
    assert out.startswith("migrated web1 in "), out
    info = rlab.jobinfo()
    assert info["tls"] == tls, info
    lanes = info["storage_lanes"]
    if tls and engine == "auto":
        assert info["storage_engine"] == "mirror" and lanes == {}, info
    else:
        assert info["storage_engine"] == "native", info
        used, unused = ("libnbd", "zero-copy") if tls else ("zero-copy", "libnbd")
        assert lanes.get(used, 0) >= 32 << 20 and not lanes.get(unused), info
        if tls:
            assert "TLS" in info["storage_lanes_note"], info
    rlab.ok(rlab.vmferry("stop", "web1", "--force", state=rlab.B))
    assert images_identical(src, dst, "raw") == ""


def _slow_migration(lab: RemoteLab, dest: str, *extra: str
                    ) -> tuple[subprocess.Popen, Path, str]:
    """A migration stuck in its disk copy long enough to break something: a
    256 MiB disk over a link shaped to 40 Mbit/s."""
    from migrate_helpers import sha256
    src = make_image(lab.root / "src.raw", 256 * MiB, fmt="raw")
    spec = lab.spec(disk=src, memory="64M", mem="16M", dirty="fast")
    lab.run_vm(spec, wait_pass=2)
    digest = sha256(src)
    lab.net.shape("40mbit")
    p = lab.start("migrate", "web1", dest, "--pki", lab.pki.dir, "--disk-map",
                  f"{src}={lab.root / 'dst.raw'}", "--create-disks", *extra)
    lab.wait_for("the disk copy to start",
                 lambda: lab.job_file().get("disk_processed", 0) > 4 << 20, 60, proc=p)
    return p, src, digest


@pytest.mark.parametrize("engine", ["native", "mirror"])
@pytest.mark.parametrize("transport", ["ssh", "tls"])
def test_link_cut_mid_migration(rlab, transport, engine):
    """The cable is pulled during the disk copy: within a few keepalives the
    source gives up, resumes the guest with its disk untouched, and the agent,
    hearing nothing, removes the incoming VM (with the native engine, the
    default for this raw image, it keeps the image, and the source records
    it as a partial copy: assert_source_intact checks both sides' records)."""
    if transport == "tls":
        rlab.start_tls_agent()
        dest = rlab.tls_uri(keepalive=1)
    else:
        dest = rlab.ssh_uri(keepalive=1)
    p, src, digest = _slow_migration(rlab, dest, "--storage-engine", engine)
    t0 = time.monotonic()
    rlab.net.link_down()
    cp = rlab.finish(p, timeout=60)
    took = time.monotonic() - t0
    line = rlab.one_error(cp)
    assert "lost the destination agent" in line and "the source VM is running" in line, line
    assert took < 30, f"noticed the cut link only after {took:.0f} s"
    rlab.net.link_up()
    rlab.net.unshape()
    rlab.assert_destination_empty()
    rlab.assert_source_intact(serial=rlab.serial_of(rlab.root / "web1.toml"), disk=src,
                              disk_hash=digest, dest_disk=rlab.root / "dst.raw")


def test_link_cut_during_memory_migration(rlab):
    """The cable is pulled while memory moves (the disks are already there, the
    mirror keeps them in sync): the source yanks the stalled migration stream,
    resumes the guest, and the agent removes the incoming VM."""
    from migrate_helpers import sha256
    src = make_image(rlab.root / "src.raw", 8 * MiB, fmt="raw")
    rlab.run_vm(rlab.spec(disk=src, memory="128M", mem="64M", dirty="fast"), wait_pass=2)
    digest = sha256(src)
    p = rlab.start("migrate", "web1", rlab.ssh_uri(keepalive=1), "--pki", rlab.pki.dir,
                   "--disk-map", f"{src}={rlab.root / 'dst.raw'}", "--create-disks",
                   "--bandwidth", "4")
    rlab.wait_for("memory migration", lambda: _memory_moving(rlab), 60, proc=p)
    rlab.net.link_down()
    line = rlab.one_error(rlab.finish(p, timeout=60))
    assert "lost the destination agent" in line and "the source VM is running" in line, line
    rlab.net.link_up()
    rlab.assert_destination_empty()
    rlab.assert_source_intact(serial=rlab.serial_of(rlab.root / "web1.toml"), disk=src,
                              disk_hash=digest, dest_disk=rlab.root / "dst.raw")


def _memory_moving(lab: RemoteLab) -> bool:
    mig = lab.qmp("query-migrate")
    return mig.get("status") == "active" and mig.get("ram", {}).get("transferred", 0) > 1 << 20


def _pids_running(pred) -> list[int]:
    """Pids of the processes whose argv (a list of bytes) satisfies PRED."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path("/proc", entry, "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if pred(cmd):
                out.append(int(entry))
    return out


def _agent_pids(state: Path) -> list[int]:
    return _pids_running(lambda cmd: b"agent" in cmd and os.fsencode(state) in cmd
                         and b"--stdio" in cmd)


def test_agent_killed_mid_migration(rlab):
    """SIGKILL for the agent during the disk copy: the source says so and resumes;
    the agent's reaper removes the destination QEMU and the image it created."""
    p, src, digest = _slow_migration(rlab, rlab.ssh_uri())
    pids = _agent_pids(rlab.B)
    assert pids, "no agent process found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    line = rlab.one_error(rlab.finish(p, timeout=60))
    assert "the source VM is running" in line, line
    rlab.net.unshape()
    rlab.assert_destination_empty()
    rlab.assert_source_intact(serial=rlab.serial_of(rlab.root / "web1.toml"), disk=src,
                              disk_hash=digest, dest_disk=rlab.root / "dst.raw")


# --------------------------------------------------------------------------- strangers

def _idle_vm(lab: RemoteLab) -> Path:
    src = make_image(lab.root / "src.raw", 8 * MiB, fmt="raw")
    lab.run_vm(lab.spec(disk=src, memory="64M", mem="8M", dirty="idle"))
    return src


def test_unknown_ssh_key_is_refused(rlab):
    src = _idle_vm(rlab)
    cp = rlab.remote(rlab.ssh_uri(key=rlab.sshd.stranger_key), "--disk-map",
                     f"{src}={rlab.root / 'dst.raw'}", "--create-disks")
    line = rlab.one_error(cp)
    assert "Permission denied" in line and "the source VM is running" in line, line
    rlab.assert_destination_empty(5)
    assert rlab.status()["state"] == "running"


def test_wrong_client_certificate_is_refused(rlab, rogue_pki):
    agent = rlab.start_tls_agent()
    src = _idle_vm(rlab)
    cp = rlab.vmferry("migrate", "web1", rlab.tls_uri(), "--pki", rogue_pki.dir,
                      "--disk-map", f"{src}={rlab.root / 'dst.raw'}", "--create-disks")
    line = rlab.one_error(cp)
    assert "tls://" in line and "the source VM is running" in line, line
    assert "certificate" in line.lower() or "closed" in line, line
    rlab.wait_for("the agent to log the refusal",
                  lambda: b"refused a connection" in (rlab.root / "agent.log").read_bytes(), 10)
    assert agent.poll() is None
    rlab.assert_destination_empty(5)
    assert rlab.status()["state"] == "running"


def test_plain_tcp_to_the_agent_is_refused(rlab):
    agent = rlab.start_tls_agent()
    hello = json.dumps({"id": 1, "op": "hello", "args": {"protocol": 1}}).encode()
    with socket.create_connection((rlab.net.dest_ip, TLS_PORT), timeout=15) as s:
        s.sendall(struct.pack(">I", len(hello)) + hello)
        got = b""
        try:
            while chunk := s.recv(4096):
                got += chunk
        except (ConnectionResetError, socket.timeout):
            pass
    # a TLS alert at most, never a protocol reply
    assert b'"ok"' not in got
    rlab.wait_for("the agent to log the refusal",
                  lambda: b"refused a connection" in (rlab.root / "agent.log").read_bytes(), 15)
    assert agent.poll() is None


def test_tls_flag_needs_a_remote_destination(rlab):
    src = _idle_vm(rlab)
    cp = rlab.vmferry("migrate", "web1", f"local://{rlab.B}", "--tls", "--disk-map",
                      f"{src}={rlab.root / 'dst.raw'}", "--create-disks")
    assert "--tls" in rlab.one_error(cp) and cp.returncode == 2


def test_network_and_ports_are_chosen_by_the_user(rlab):
    """--disks-uri picks the NBD port, the agent's port_range the migration port,
    --listen-address what the destination binds; jobinfo says where data went."""
    (rlab.B / "agent.toml").write_text(f'storage_roots = ["{rlab.root}", '
                                       f'"{rlab.kernel.parent}"]\n'
                                       f'port_range = [50100, 50110]\n'
                                       f'allow_extra_args = true\n')
    src = _idle_vm(rlab)
    ip = rlab.net.dest_ip
    rlab.ok(rlab.remote(rlab.ssh_uri(), "--disk-map", f"{src}={rlab.root / 'dst.raw'}",
                        "--create-disks", "--listen-address", "0.0.0.0",
                        "--disks-uri", f"tcp://{ip}:50120", "--migrate-uri", f"tcp://{ip}"))
    info = rlab.jobinfo()
    assert info["disks_address"] == f"{ip}:50120", info
    assert info["migrate_uri"] == f"tcp:{ip}:50100", info
    assert info["destination"].startswith(f"ssh://root@{ip}"), info
    text = rlab.ok(rlab.vmferry("jobinfo", "web1"))
    assert f"Memory to:          tcp:{ip}:50100" in text, text
    assert images_identical(src, rlab.root / "dst.raw", "raw") == ""


def test_bad_network_options_are_one_line_errors(rlab):
    src = _idle_vm(rlab)
    cp = rlab.remote(rlab.ssh_uri(), "--disk-map", f"{src}={rlab.root / 'dst.raw'}",
                     "--disks-uri", "http://host")
    assert "--disks-uri 'http://host': use tcp://HOST" in rlab.one_error(cp, 2)
    cp = rlab.remote(f"ssh://{rlab.net.dest_ip}/x?colour=blue")
    assert "unknown option 'colour'" in rlab.one_error(cp, 2)


# --------------------------------------------------------------------------- presync

def _hmp_write(lab: Lab, offset: int, length: int, pattern: int) -> None:
    out = lab.qmp("human-monitor-command", {
        "command-line": f'qemu-io -d vd0/virtio-backend "write -P {pattern:#x} {offset} {length}"'})
    assert out == "", out


@pytest.mark.parametrize("transport", ["ssh", "tls"])
def test_presync_to_another_host_then_migrate_moves_only_the_delta(rlab, transport):
    """presync over the link (qemu-nbd on the destination host, --tls on the tls
    variant), a refresh moving only the rewritten bytes, then a migration that
    moves only what changed since; the destination image ends equal."""
    from migrate_helpers import MiB, fill_image
    if transport == "tls":
        rlab.start_tls_agent()
        dest, extra = rlab.tls_uri(), ["--tls"]
    else:
        dest, extra = rlab.ssh_uri(), []
    src = fill_image(rlab.root / "src.raw", 64, holes=True)
    dst = rlab.root / "dst.raw"
    rlab.run_vm(rlab.spec(disk=src, memory="64M", mem="8M", dirty="idle", hb=200))
    dmap = ("--disk-map", f"{src}={dst}", "--pki", rlab.pki.dir, *extra)
    out = rlab.ok(rlab.vmferry("presync", "web1", dest, *dmap, "--create-disks"))
    # plain NBD over the link on the zero-copy lanes; TLS on libnbd's
    lanes = "(libnbd)" if transport == "tls" else "(zero-copy)"
    assert out.startswith("presynced web1 (full)") and out.endswith(lanes + "\n"), out
    assert images_identical(src, dst, "raw") == ""
    _hmp_write(rlab, 3 * MiB, 2 * MiB, 0x3c)
    out = rlab.ok(rlab.vmferry("presync", "web1", dest, *dmap))
    assert out.startswith("presynced web1 (incremental): 2.00 MiB moved"), out
    _hmp_write(rlab, 40 * MiB + 4096, 512 * 1024, 0x5d)
    cp = rlab.vmferry("migrate", "web1", dest, "--copy-storage-inc", *dmap)
    rlab.ok(cp)
    assert "warning" not in cp.stderr, cp.stderr
    info = rlab.jobinfo()
    assert info["storage_engine"] == "native", info
    assert 512 * 1024 <= info["disk_processed"] <= 512 * 1024 + 128 * 1024, info
    rlab.ok(rlab.vmferry("stop", "web1", "--force", state=rlab.B))
    assert images_identical(src, dst, "raw") == ""
    assert not Path(str(dst) + ".vmferry-presync.json").exists(), "stale presync record"


def test_presync_record_touched_on_the_other_host_falls_back(rlab):
    from migrate_helpers import MiB, fill_image
    src = fill_image(rlab.root / "src.raw", 32)
    dst = rlab.root / "dst.raw"
    rlab.run_vm(rlab.spec(disk=src, memory="64M", mem="8M", dirty="idle", hb=200))
    dmap = ("--disk-map", f"{src}={dst}")
    rlab.ok(rlab.vmferry("presync", "web1", rlab.ssh_uri(), *dmap, "--create-disks"))
    with open(dst, "r+b") as f:                # someone on that host touches the image
        f.seek(5 * MiB)
        f.write(b"\xee" * 4096)
    cp = rlab.vmferry("migrate", "web1", rlab.ssh_uri(), "--copy-storage-inc", *dmap)
    rlab.ok(cp)
    assert "presync record of disk0 does not hold" in cp.stderr and "in full" in cp.stderr
    assert rlab.jobinfo()["disk_processed"] >= 32 * MiB - 64 * 1024
    rlab.ok(rlab.vmferry("stop", "web1", "--force", state=rlab.B))
    assert images_identical(src, dst, "raw") == ""


def _slow_presync(rlab: RemoteLab) -> tuple[subprocess.Popen, Path]:
    """A first presync of a 256 MiB disk over a 40 Mbit/s link, caught copying."""
    from migrate_helpers import fill_image
    src = fill_image(rlab.root / "src.raw", 256)
    dst = rlab.root / "dst.raw"
    rlab.run_vm(rlab.spec(disk=src, memory="64M", mem="8M", dirty="idle", hb=200))
    rlab.net.shape("40mbit")
    p = rlab.start("presync", "web1", rlab.ssh_uri(), "--disk-map", f"{src}={dst}",
                   "--create-disks")
    rlab.wait_for("the copy to the other host", lambda: dst.exists() and
                  _qemu_nbd_serving(dst), 60, proc=p)
    return p, dst


def _assert_presync_left_nothing(rlab: RemoteLab, dst: Path) -> None:
    rlab.wait_for("qemu-nbd to stop", lambda: not _qemu_nbd_serving(dst), 20)
    rlab.wait_for("the image presync created to be removed", lambda: not dst.exists(), 20)
    assert not list(rlab.B.glob("presync-*.json"))
    assert not Path(str(dst) + ".vmferry-presync.json").exists()
    assert not (rlab.A / "web1" / "presync.json").exists()
    assert rlab.status()["state"] == "running"
    assert rlab.qmp("query-block-exports") == []
    nodes = rlab.qmp("query-named-block-nodes", {"flat": True})
    assert [b["name"] for n in nodes for b in n.get("dirty-bitmaps", [])] == [], \
        "a presync bitmap was left on the source"


def test_presync_interrupted_leaves_nothing_on_the_other_host(rlab):
    """Ctrl-C during a presync over a slow link: the agent stops its qemu-nbd, the
    image it created is removed, no record vouches for anything, and the VM runs on."""
    p, dst = _slow_presync(rlab)
    time.sleep(1)
    p.send_signal(signal.SIGINT)
    cp = rlab.finish(p, timeout=60)
    assert cp.returncode == 130, (cp.returncode, cp.stderr)
    assert "Traceback" not in cp.stderr, cp.stderr
    _assert_presync_left_nothing(rlab, dst)


def test_agent_killed_during_presync_leaves_no_image(rlab):
    """SIGKILL for the agent while presync copies: its qemu-nbd dies with it, its
    reaper removes the image the presync created, and the source VM runs on
    with no presync bitmap or record vouching for anything."""
    p, dst = _slow_presync(rlab)
    assert list(rlab.B.glob("presync-*.json")), "the agent keeps no record of its image"
    for pid in _agent_pids(rlab.B):
        os.kill(pid, signal.SIGKILL)
    line = rlab.one_error(rlab.finish(p, timeout=60))
    # the copy or the channel may see the agent's death first; either way:
    assert line.startswith("vmferry: error: presync of web1 failed: "), line
    assert "web1 runs on, and the next presync or migration copies its disks in full" in line
    rlab.net.unshape()
    _assert_presync_left_nothing(rlab, dst)


def _qemu_nbd_serving(image: Path) -> bool:
    return bool(_pids_running(lambda cmd: cmd[0].endswith(b"qemu-nbd")
                              and os.fsencode(image) in cmd))


@pytest.mark.parametrize("point", ["perform", "finish"])
@pytest.mark.parametrize("transport", ["ssh", "tls"])
def test_migrating_process_killed_then_recovered(rlab, transport, point):
    """The migrating process is SIGKILLed once the destination host has prepared,
    or once everything has arrived there.  In the first case the agent undoes
    its side as the channel drops and recover rolls the source back; in the
    second the agent keeps the paused VM (it may hold the only complete state
    of the guest) and recover, asking the agent, completes the migration."""
    src = make_image(rlab.root / "src.qcow2", 32 * MiB, "sparse", fmt="qcow2")
    dst = rlab.root / "dst.qcow2"
    spec = rlab.spec(disk=src, fmt="qcow2", memory="64M", mem="8M", dirty="slow")
    serial = rlab.serial_of(spec)
    rlab.run_vm(spec)
    if transport == "tls":
        rlab.start_tls_agent()
    dest = rlab.ssh_uri() if transport == "ssh" else rlab.tls_uri()
    rlab.env["VMFERRY_TEST_HOLD"] = f"{point}:60"
    p = rlab.start("migrate", "web1", dest, "--pki", rlab.pki.dir, "--disk-map",
                   f"{src}={dst}", "--create-disks")
    if point == "perform":
        rlab.wait_for("the destination QEMU", lambda: qemu_pids(rlab.B), 60, proc=p)
    else:
        rlab.wait_for("the memory to arrive",
                      lambda: rlab.qmp("query-status")["status"] == "postmigrate", 60, proc=p)
    p.send_signal(signal.SIGKILL)
    p.wait(10)
    rlab.env.pop("VMFERRY_TEST_HOLD")
    out = rlab.ok(rlab.vmferry("recover", "web1"))
    at, problems, _ = rlab.progress(serial)
    assert problems == [], problems
    if point == "finish":
        assert out.strip() == f"completed: web1 runs on {dest}", out
        st = rlab.status(state=rlab.B)
        assert st["state"] == "running" and _in_namespace(st["pid"], rlab.net.ns), st
        assert qemu_pids(rlab.A) == [], "the source QEMU still runs"
        assert not (rlab.B / "web1" / "incoming.json").exists()
        rlab.wait_progress(serial, at + 2, 30)          # the guest goes on over there
        rlab.ok(rlab.vmferry("stop", "web1", "--force", state=rlab.B))
        assert images_identical(src, dst, "qcow2") == ""
        return
    assert out.strip() == "rolled back: web1 runs on this host", out
    rlab.assert_destination_empty()
    assert not dst.exists()
    assert rlab.status()["state"] == "running"
    assert rlab.qmp("query-status")["status"] == "running"
    assert [n for n in rlab.qmp("query-named-block-nodes", {"flat": True})
            if n["node-name"].startswith("vmferry")] == []
    rlab.wait_progress(serial, at + 2, 30)


def test_killed_after_the_hand_over_mark_between_hosts_completes(rlab, suspend=False):
    """tls://: the agent marked the guest its own (before resuming it), then the
    migrating process died and the channel dropped mid-Finish, which goes on in
    the agent: it must not undo a guest it may already run, and recover, asking
    it, waits for that Finish instead of failing on the monitor it holds, then
    goes forward — the guest on that host only, its record there ended.  (The
    --suspend variant of this path is test_recover.py's, on one host.)"""
    src = make_image(rlab.root / "src.qcow2", 32 * MiB, "sparse", fmt="qcow2")
    dst = rlab.root / "dst.qcow2"
    spec = rlab.spec(disk=src, fmt="qcow2", memory="64M", mem="8M", dirty="slow")
    serial = rlab.serial_of(spec)
    rlab.run_vm(spec)
    # the agent's Finish waits there, still holding the QEMU's monitor when recover
    # comes, a little longer than a monitor's greeting may take (10 s)
    rlab.env["VMFERRY_TEST_HOLD"] = "handed-over:11"
    rlab.start_tls_agent()
    rlab.env.pop("VMFERRY_TEST_HOLD")
    dest = rlab.tls_uri()
    p = rlab.start("migrate", "web1", dest, "--pki", rlab.pki.dir, "--disk-map",
                   f"{src}={dst}", "--create-disks", *(["--suspend"] if suspend else []))
    rlab.wait_for("the hand-over mark", lambda: (rlab.B / "web1" / "resumed").exists(), 60,
                  proc=p)
    at, _, _ = rlab.progress(serial)
    p.send_signal(signal.SIGKILL)
    p.wait(10)
    out = rlab.ok(rlab.vmferry("recover", "web1"))
    if suspend:
        assert out.startswith("completed: web1") and dest in out \
            and "paused as --suspend asked" in out, out
    else:
        assert out.strip() == f"completed: web1 runs on {dest}", out
    assert qemu_pids(rlab.A) == [], "the source QEMU still runs"
    st = rlab.status(state=rlab.B)
    assert st["state"] == ("paused" if suspend else "running"), st
    assert _in_namespace(st["pid"], rlab.net.ns), st
    rlab.wait_for("the agent to end the record",
                  lambda: not (rlab.B / "web1" / "incoming.json").exists(), 30)
    if not suspend:
        rlab.wait_progress(serial, at + 2, 30)          # the guest goes on over there
    rlab.ok(rlab.vmferry("stop", "web1", "--force", state=rlab.B))
    assert images_identical(src, dst, "qcow2") == ""


@pytest.mark.parametrize("transport", ["ssh", "tls"])
def test_killed_in_post_copy_between_hosts_is_completed_forward(rlab, transport):
    """Killed while post-copy runs, the guest's memory split between the
    hosts: nothing may cancel it (QEMU may refuse to resume the source after
    one), and recover, asking the agent, waits for QEMU to complete it, then
    resumes the guest over there, its memory intact."""
    spec = rlab.spec(memory="256M", mem="160M", dirty="fast")
    serial = rlab.serial_of(spec)
    rlab.run_vm(spec, wait_pass=2)
    # post-copy's own transfer slow enough (a few seconds) to be killed in
    rlab.qmp("migrate-set-parameters", {"max-postcopy-bandwidth": 48 * MiB})
    if transport == "tls":
        rlab.start_tls_agent()
    dest = rlab.ssh_uri() if transport == "ssh" else rlab.tls_uri()
    p = rlab.start("migrate", "web1", dest, "--pki", rlab.pki.dir, "--postcopy",
                   "--timeout", "1", "--timeout-postcopy", "--bandwidth", "16",
                   "--no-escalate")
    rlab.wait_for("post-copy", lambda: rlab.qmp("query-migrate").get("status") ==
                  "postcopy-active", 60, proc=p)
    p.send_signal(signal.SIGKILL)
    p.wait(10)
    out = rlab.ok(rlab.vmferry("recover", "web1"))
    assert out.strip() == f"completed: web1 runs on {dest}", out
    assert qemu_pids(rlab.A) == [], "the source QEMU still runs"
    st = rlab.status(state=rlab.B)
    assert st["state"] == "running" and _in_namespace(st["pid"], rlab.net.ns), st
    rlab.wait_for("the agent to end the record",
                  lambda: not (rlab.B / "web1" / "incoming.json").exists(), 30)
    at, problems, _ = rlab.progress(serial)
    assert problems == [], problems                   # its memory arrived intact
    rlab.wait_progress(serial, at + 2, 30)
    rlab.ok(rlab.vmferry("stop", "web1", "--force", state=rlab.B))


def test_link_cut_in_post_copy_keeps_both_halves(rlab):
    """The cable is pulled during post-copy: QEMU pauses it (postcopy-paused) and
    neither host holds the whole guest, so nothing may stop either QEMU.  The
    migration says so in one line and leaves it to recover, the agent keeps its VM
    when its channel times out, and recover, while the link is down, says what to
    do once it is back (exit 1), the journal kept for the next recover."""
    spec = rlab.spec(memory="256M", mem="160M", dirty="fast")
    rlab.run_vm(spec, wait_pass=2)
    rlab.qmp("migrate-set-parameters", {"max-postcopy-bandwidth": 48 * MiB})
    rlab.start_tls_agent()
    p = rlab.start("migrate", "web1", rlab.tls_uri(keepalive=1), "--pki", rlab.pki.dir,
                   "--postcopy", "--timeout", "1", "--timeout-postcopy", "--bandwidth", "16",
                   "--no-escalate")
    rlab.wait_for("post-copy", lambda: rlab.qmp("query-migrate").get("status") ==
                  "postcopy-active", 60, proc=p)
    rlab.net.link_down()
    try:
        line = rlab.one_error(rlab.finish(p, timeout=90))
        assert "post-copy" in line and "vmferry recover web1" in line, line
        rlab.wait_for("the agent to give up on its channel",
                      lambda: b"during post-copy: keeping" in
                      (rlab.root / "agent.log").read_bytes(), 30)
        line = rlab.one_error(rlab.vmferry("recover", "web1"))
        assert "postcopy-paused" in line and "migrate-recover" in line, line
        assert qemu_pids(rlab.A) and qemu_pids(rlab.B), "a half of the guest was stopped"
        assert (rlab.A / "web1" / "journal.json").exists()
    finally:
        rlab.net.link_up()


@pytest.mark.parametrize("how,engine", [("kill", "native"), ("sigint", "native"),
                                        ("kill", "mirror")])
def test_partial_copy_to_another_host_is_kept(rlab, how, engine):
    """The disks are copied to the agent's NBD export over the link; the
    migrating process is stopped midway (killed, then recover; or Ctrl-C):
    the agent keeps the images it was told to keep, the source records how far
    the copy got (after a mirror: the agent says what its image holds), and
    the next migration moves only the rest."""
    src = rlab.root / "src.raw"
    src.write_bytes(os.urandom(MiB) * 96)
    dst = rlab.root / "dst.raw"
    spec = rlab.spec(disk=src, fmt="raw", memory="64M", mem="8M", dirty="slow")
    serial = rlab.serial_of(spec)
    rlab.run_vm(spec)
    dmap = ("--disk-map", f"{src}={dst}")
    p = rlab.start("migrate", "web1", rlab.ssh_uri(), "--pki", rlab.pki.dir, *dmap,
                   "--create-disks", "--storage-engine", engine, "--disk-bandwidth", "16")
    rlab.wait_for("60% of the disk", lambda: rlab.job_file().get("disk_processed", 0)
                  >= 58 * MiB, 60, proc=p, poll=0.05)
    if how == "kill":
        p.send_signal(signal.SIGKILL)
        p.wait(10)
        out = rlab.ok(rlab.vmferry("recover", "web1"))
        assert out.startswith("rolled back: web1 runs on this host (the partial copy"), out
    else:
        p.send_signal(signal.SIGINT)
        line = rlab.one_error(rlab.finish(p), code=130, prefix="vmferry: ")
        assert "kept the partial copy" in line, line
    rlab.wait_for("the destination QEMU to go", lambda: not qemu_pids(rlab.B), 30)
    assert dst.exists() and Path(str(dst) + ".vmferry-presync.json").exists()
    assert rlab.status()["state"] == "running"
    out = rlab.ok(rlab.remote(rlab.ssh_uri(), *dmap, "--storage-engine", "native"))
    assert out.startswith("migrated web1"), out
    # what is known copied lags what was sent by a few work ranges in flight
    assert rlab.jobinfo()["disk_processed"] <= 72 * MiB, rlab.jobinfo()
    rlab.ok(rlab.vmferry("stop", "web1", "--force", state=rlab.B))
    assert images_identical(src, dst, "raw") == ""


@contextlib.contextmanager
def _firewall_all_but_ssh(net, folder: Path, port: int = 22):
    """The destination host answers only on its ssh port (or PORT): anything
    else is refused (reset), as by a host firewall; removed on the way out
    (the namespace serves the module's other tests)."""
    rules = folder / "firewall.nft"
    rules.write_text("table inet vmferry_test {\n  chain input {\n"
                     "    type filter hook input priority 0; policy accept;\n"
                     "    iif lo accept\n    ct state established,related accept\n"
                     f"    tcp dport {port} accept\n    meta l4proto tcp reject with tcp reset\n"
                     "  }\n}\n")
    out = net.run(["nft", "-f", str(rules)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    try:
        yield
    finally:
        net.run(["nft", "delete", "table", "inet", "vmferry_test"])


def _listening(net) -> set[int]:
    out = net.run(["ss", "-Hltn"], capture_output=True, text=True)
    return {int(line.split()[3].rsplit(":", 1)[1]) for line in out.stdout.splitlines()}


@pytest.mark.parametrize("engine", ["mirror", "native"])
def test_tunnelled_through_a_firewall_that_passes_only_ssh(rlab, engine):
    """--tunnelled: the disks and the memory go inside the ssh connection, so
    a destination whose firewall passes only ssh is reached; nothing listens
    there on any other port meanwhile.  Without it, one line says why not."""
    if shutil.which("nft") is None:
        pytest.skip("nftables is not installed")
    with _firewall_all_but_ssh(rlab.net, rlab.root):
        _tunnelled_migration(rlab, rlab.ssh_uri(), {22}, "--storage-engine", engine)


def _tunnelled_migration(rlab, uri: str, listening: set[int], *extra: str) -> None:
    """A migration to URI fails through the firewall in one line, leaving
    nothing; with --tunnelled it arrives byte for byte while the destination
    listens on LISTENING alone, and leaves no tunnel folder (its vmferry gets
    a TMPDIR of the lab's, so another process's tunnel is not counted)."""
    tmp = rlab.root / "tmp"
    tmp.mkdir(exist_ok=True)
    rlab.env["TMPDIR"] = str(tmp)
    src = make_image(rlab.root / "src.raw", 64 * MiB, fmt="raw")
    dst = rlab.root / "dst.raw"
    spec = rlab.spec(disk=src, fmt="raw", memory="64M", mem="8M", dirty="slow")
    serial = rlab.serial_of(spec)
    rlab.run_vm(spec)
    dmap = ("--disk-map", f"{src}={dst}", "--create-disks", *extra)
    line = rlab.one_error(rlab.remote(uri, *dmap))
    assert "source VM is running" in line, line
    assert rlab.status()["state"] == "running"
    rlab.assert_destination_empty()
    rlab.env["VMFERRY_TEST_HOLD"] = "finish:4"     # a moment to look around, then on
    p = rlab.start("migrate", "web1", uri, "--pki", rlab.pki.dir, *dmap, "--tunnelled")
    rlab.wait_for("everything to arrive",
                  lambda: rlab.qmp("query-status")["status"] == "postmigrate", 60, proc=p)
    rlab.env.pop("VMFERRY_TEST_HOLD")
    assert _listening(rlab.net) == listening, _listening(rlab.net)
    out = rlab.ok(rlab.finish(p))
    rlab.env.pop("TMPDIR")
    assert out.startswith("migrated web1 in "), out
    st = rlab.status(state=rlab.B)
    assert st["state"] == "running" and _in_namespace(st["pid"], rlab.net.ns), st
    at, problems, _ = rlab.progress(serial)
    assert problems == [], problems
    rlab.wait_progress(serial, at + 2, 30)
    rlab.ok(rlab.vmferry("stop", "web1", "--force", state=rlab.B))
    assert images_identical(src, dst, "raw") == ""
    assert not list(tmp.glob("vmferry-tunnel-*")), "tunnel left"


def test_tunnelled_to_a_tls_agent_through_a_firewall_that_passes_only_its_port(rlab):
    """--tunnelled to tls://: the disks and the memory go through the agent's
    TLS port, relayed by vmferry's C engine on both hosts, so a destination
    whose firewall passes only that port is reached and nothing new listens
    there meanwhile.  Without it, one line says why not."""
    if shutil.which("nft") is None:
        pytest.skip("nftables is not installed")
    rlab.start_tls_agent()
    listening = _listening(rlab.net)
    assert TLS_PORT in listening, listening
    with _firewall_all_but_ssh(rlab.net, rlab.root, TLS_PORT):
        _tunnelled_migration(rlab, rlab.tls_uri(), listening)
    log = (rlab.root / "agent.log").read_text()
    assert "tunnel connection" not in log and "Traceback" not in log, log


def test_tunnelled_refuses_what_it_makes_needless(rlab):
    src = make_image(rlab.root / "src.raw", 8 * MiB, fmt="raw")
    rlab.run_vm(rlab.spec(disk=src, fmt="raw", memory="64M", mem="8M", dirty="slow"))
    line = rlab.one_error(rlab.remote(rlab.ssh_uri(), "--tunnelled", "--tls"), code=2)
    assert "drop --tls" in line, line
    line = rlab.one_error(rlab.remote(rlab.tls_uri(), "--tunnelled", "--tls"), code=2)
    assert "drop --tls" in line, line
