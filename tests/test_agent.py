"""`vmferry agent --stdio` spoken to directly, frame by frame: every request
is validated, bad ones get an error reply (never a crash), and whatever an
unfinished migration prepared is removed when the source goes away, even
when the agent itself is killed."""
from __future__ import annotations

import os
import signal
import struct
import subprocess
import time
from pathlib import Path

import pytest

from agent_peer import VMFERRY, Agent
from migrate_helpers import qemu_pids
from vmferry.vm.spec import DiskSpec, VMSpec

@pytest.fixture
def agent(tmp_path):
    a = Agent(tmp_path / "state")
    yield a
    if a.proc.poll() is None:
        a.proc.kill()
        a.proc.wait()


def test_hello_reports_versions_and_capabilities(agent, tmp_path):
    info = agent.hello()
    assert info["protocol"] == 1
    assert info["accel"] in ("kvm", "tcg")
    assert info["storage_roots"] == [str(tmp_path / "state" / "images")]
    assert agent.call("ping")["ok"]
    rc, err = agent.close()
    assert rc == 0 and "Traceback" not in err


def test_bad_requests_get_error_replies_and_the_session_goes_on(agent):
    r = agent.call("ping")
    assert not r["ok"] and "first request must be hello" in r["error"]["message"]
    r = agent.call("hello", protocol=99)
    assert not r["ok"] and "protocol 99" in r["error"]["message"]
    agent.hello()
    r = agent.call("format_disk")
    assert not r["ok"] and "unknown request 'format_disk'" in r["error"]["message"]
    r = agent.call("ping", extra=1)
    assert not r["ok"] and "unknown arguments extra" in r["error"]["message"]
    r = agent.call("finish", resume="yes")
    assert not r["ok"] and "'resume' has the wrong type" in r["error"]["message"]
    r = agent.call("finish", resume=True)
    assert not r["ok"] and r["error"]["kind"] == "usage"
    agent.send({"op": "ping"})                      # no id
    r = agent.recv()
    assert r["ok"] is False and "integer \"id\"" in r["error"]["message"]
    r = agent.call("prepare", spec="not = [toml", disks=[], options={})
    assert not r["ok"]
    r = agent.call("prepare", spec=VMSpec(name="x", memory=64 << 20).to_toml(),
                   disks=[{"node": "disk7", "path": "/a", "fmt": "raw", "size": 1,
                           "export": "e"}], options={})
    assert not r["ok"] and "not a disk of the spec" in r["error"]["message"]
    assert agent.call("ping")["ok"]
    rc, err = agent.close()
    assert rc == 0 and "Traceback" not in err


@pytest.mark.parametrize("garbage", [
    struct.pack(">I", 1 << 30),                     # a length no request has
    struct.pack(">I", 5) + b"\xff\xfe{}x",          # not UTF-8 JSON
    struct.pack(">I", 200_000) + b"[" * 200_000,    # nested past Python's recursion limit
])
def test_garbage_ends_the_session_cleanly(agent, garbage):
    agent.hello()
    agent.send_raw(garbage)
    r = agent.recv()
    assert r == {"id": None, "ok": False, "error": {"kind": "protocol",
                                                    "message": r["error"]["message"]}}
    assert agent.recv() is None                     # then the agent hangs up
    rc, err = agent.close()
    assert rc == 0 and "Traceback" not in err


def _spec(tmp_path: Path, disk: Path) -> str:
    return VMSpec(name="inc1", memory=64 << 20,
                  disks=(DiskSpec(path=str(disk), format="raw"),)).to_toml()


def _disks(size: int = 16 << 20):
    return [{"node": "disk0", "path": "/src/disk0.img", "fmt": "raw", "size": size,
             "export": "disk0"}]


def test_disk_outside_storage_roots_is_refused(agent, tmp_path):
    agent.hello()
    outside = tmp_path / "elsewhere" / "d.img"
    r = agent.call("prepare", spec=_spec(tmp_path, outside), disks=_disks(),
                   options={"create_disks": True}, nbd={"address": "127.0.0.1"},
                   migrate={"address": "127.0.0.1"})
    assert not r["ok"] and r["error"]["kind"] == "usage"
    assert "outside the destination's storage roots" in r["error"]["message"]
    assert not outside.exists()


def test_kernel_outside_storage_roots_is_refused(agent, tmp_path):
    """QEMU would load it into the guest's memory, for the guest to read."""
    agent.hello()
    disk = tmp_path / "state" / "images" / "d.img"
    spec = VMSpec(name="inc1", memory=64 << 20, kernel="/etc/hostname",
                  initrd="/etc/passwd", disks=(DiskSpec(path=str(disk), format="raw"),))
    r = agent.call("prepare", spec=spec.to_toml(), disks=_disks(),
                   options={"create_disks": True}, nbd={"address": "127.0.0.1"},
                   migrate={"address": "127.0.0.1"})
    assert not r["ok"] and r["error"]["kind"] == "usage"
    assert ("the kernel /etc/hostname is outside the destination's storage roots"
            in r["error"]["message"]), r
    assert not disk.exists()


def test_existing_image_is_not_overwritten_unless_asked(agent, tmp_path):
    agent.hello()
    disk = tmp_path / "state" / "images" / "d.img"
    disk.parent.mkdir(parents=True)
    disk.write_bytes(b"keep" * (4 << 20))
    r = agent.call("prepare", spec=_spec(tmp_path, disk), disks=_disks(),
                   options={}, nbd={"address": "127.0.0.1"}, migrate={"address": "127.0.0.1"})
    assert not r["ok"] and "--overwrite-disks" in r["error"]["message"]
    assert disk.read_bytes()[:4] == b"keep"


def _prepare(agent: Agent, tmp_path: Path) -> Path:
    agent.hello()
    disk = tmp_path / "state" / "images" / "d.img"
    r = agent.call("prepare", spec=_spec(tmp_path, disk), disks=_disks(),
                   options={"create_disks": True}, accel="tcg",
                   nbd={"address": "127.0.0.1"}, migrate={"address": "127.0.0.1"})
    assert r["ok"], r
    res = r["result"]
    assert res["nbd"]["type"] == "inet" and res["migrate_uri"].startswith("tcp:127.0.0.1:")
    assert res["fresh"] == ["disk0"] and disk.exists()
    assert qemu_pids(tmp_path / "state")
    return disk


def _gone(tmp_path: Path, disk: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not qemu_pids(tmp_path / "state") and not disk.exists() and \
                not (tmp_path / "state" / "inc1").exists():
            return
        time.sleep(0.1)
    raise AssertionError(f"left behind: qemu {qemu_pids(tmp_path / 'state')}, "
                         f"image {disk.exists()}, "
                         f"vm dir {(tmp_path / 'state' / 'inc1').exists()}")


def test_source_hanging_up_tears_down_the_incoming_vm(agent, tmp_path):
    disk = _prepare(agent, tmp_path)
    rc, err = agent.close()
    assert rc == 0
    assert "removing the incoming VM inc1" in err
    _gone(tmp_path, disk)


def test_abort_request_tears_down(agent, tmp_path):
    disk = _prepare(agent, tmp_path)
    assert agent.call("abort")["ok"]
    _gone(tmp_path, disk)
    assert agent.call("ping")["ok"]


def test_killed_agent_is_cleaned_up_by_its_reaper(agent, tmp_path):
    disk = _prepare(agent, tmp_path)
    os.kill(agent.proc.pid, signal.SIGKILL)
    agent.proc.wait()
    _gone(tmp_path, disk)


def test_silent_source_is_given_up_after_its_keepalive(tmp_path):
    a = Agent(tmp_path / "state")
    try:
        assert a.call("hello", protocol=1, version="t", keepalive=0.5)["ok"]
        disk = tmp_path / "state" / "images" / "d.img"
        r = a.call("prepare", spec=_spec(tmp_path, disk), disks=_disks(),
                   options={"create_disks": True}, accel="tcg",
                   nbd={"address": "127.0.0.1"}, migrate={"address": "127.0.0.1"})
        assert r["ok"], r
        t0 = time.monotonic()
        assert a.recv() is None          # we send no ping: it hangs up on us
        assert time.monotonic() - t0 < 10
        _gone(tmp_path, disk)
        assert "no word from the source" in a.proc.stderr.read().decode()
    finally:
        a.proc.kill()
        a.proc.wait()


def test_spec_that_reaches_past_the_roots_is_refused(agent, tmp_path):
    """extra_args would put anything on the destination's QEMU command line, and
    every disk the destination QEMU opens must be under the roots, copied or not."""
    agent.hello()
    inside = tmp_path / "state" / "images" / "d.img"
    spec = VMSpec(name="inc1", memory=64 << 20, extra_args=("-drive", "file=/etc/shadow"),
                  disks=(DiskSpec(path=str(inside), format="raw"),)).to_toml()
    r = agent.call("prepare", spec=spec, disks=_disks(), options={"create_disks": True})
    assert not r["ok"] and "allow_extra_args" in r["error"]["message"], r
    spec = VMSpec(name="inc1", memory=64 << 20,
                  disks=(DiskSpec(path=str(inside), format="raw"),
                         DiskSpec(path="/etc/passwd", format="raw", readonly=True))).to_toml()
    r = agent.call("prepare", spec=spec, disks=_disks(), options={"create_disks": True})
    assert not r["ok"] and "/etc/passwd is outside" in r["error"]["message"], r
    r = agent.call("prepare", spec=_spec(tmp_path, inside), disks=_disks() + _disks(),
                   options={"create_disks": True})
    assert not r["ok"] and "named twice" in r["error"]["message"], r
    bad = dict(_disks()[0], node="disk00")
    r = agent.call("prepare", spec=_spec(tmp_path, inside), disks=[bad], options={})
    assert not r["ok"] and "not a disk of the spec" in r["error"]["message"], r
    assert not inside.exists() and not (tmp_path / "state" / "inc1").exists()


def test_stdio_agent_on_a_file_or_dev_null_is_one_line(tmp_path):
    """`agent --stdio` run by hand with /dev/null or a file for its channel says
    so at once (asyncio cannot wait on those: it used to hang, then trace back)."""
    out = tmp_path / "out.bin"
    with open(out, "wb") as f:
        cp = subprocess.run(VMFERRY + ["--state-dir", str(tmp_path / "state"), "agent",
                                       "--stdio"], stdin=subprocess.DEVNULL, stdout=f,
                            stderr=subprocess.PIPE, text=True, timeout=20)
    assert cp.returncode == 2, cp.stderr
    assert cp.stderr == ("vmferry: error: agent --stdio: standard input must be a pipe or a "
                         "socket (as ssh gives it), not a file or /dev/null; to serve over "
                         "the network use --listen\n"), cp.stderr
    assert out.read_bytes() == b""
