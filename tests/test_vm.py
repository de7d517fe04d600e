"""VM specs, QEMU command lines and the run/list/status/stop life cycle, on real QEMU.

Every QEMU a test starts is found again at teardown by its command line (which names
the test's state directory) and killed, whatever the test did; a test that left one
behind on its own fails.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from migrate_helpers import qemu_pids
from vmferry.errors import ConnectError, UsageError
from vmferry.vm import (
    QMPCommandError, StateDir, disk_names, load_spec, parse_spec, qemu_argv, qmp_call,
    qmp_session, start_vm, stop_vm, vm_status,
)
from vmferry.vm.qemu import supports_o_direct
from vmferry.vm.state import SUN_PATH_MAX

pytestmark = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None
                                or shutil.which("qemu-img") is None,
                                reason="needs qemu-system-x86_64 and qemu-img")

EXAMPLE = """\
name = "web1"
memory = "1G"
cpus = 2
machine = "q35"
"""


# --------------------------------------------------------------------------- helpers

def vmferry(state_dir: Path, *args, timeout: float = 60) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "vmferry", "--state-dir", str(state_dir), *map(str, args)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def ok(cp: subprocess.CompletedProcess) -> str:
    assert cp.returncode == 0, f"exit {cp.returncode}\nstdout: {cp.stdout}\nstderr: {cp.stderr}"
    assert cp.stderr == "", cp.stderr
    return cp.stdout


def one_error(cp: subprocess.CompletedProcess, code: int | None = None) -> str:
    """A failed run: non-zero exit (CODE if given), exactly one `vmferry: error:` line."""
    assert cp.returncode != 0, f"succeeded: {cp.stdout}"
    if code is not None:
        assert cp.returncode == code, f"exit {cp.returncode}, expected {code}: {cp.stderr}"
    assert "Traceback" not in cp.stderr, cp.stderr
    lines = cp.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmferry: error: "), cp.stderr
    return lines[0]


def make_disk(path: Path, fmt: str = "qcow2", size: str = "64M") -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), size], check=True)
    return path


def write_spec(path: Path, name: str = "web1", *, disks=(), extra: str = "",
               memory: str = "128M") -> Path:
    text = f'name = "{name}"\nmemory = "{memory}"\ncpus = 1\n{extra}\n'
    for d, fmt in disks:
        text += f'\n[[disks]]\npath = "{d}"\nformat = "{fmt}"\n'
    path.write_text(text)
    return path


@pytest.fixture
def state_dir(tmp_path):
    d = tmp_path / "state"
    yield d
    leftovers = qemu_pids(str(d))
    for pid in leftovers:
        os.kill(pid, signal.SIGKILL)
    sd = StateDir(d)
    for name in sd.names():
        sd.clear_runtime(name)          # the short socket folder, if one was used
    assert not leftovers, f"QEMU process(es) left running: {leftovers}"


@pytest.fixture
def disk(tmp_path):
    return make_disk(tmp_path / "web1.qcow2")


# --------------------------------------------------------------------------- specs

def test_example_spec(tmp_path):
    p = tmp_path / "web1.toml"
    p.write_text(EXAMPLE)
    s = load_spec(p)
    assert (s.name, s.memory, s.cpus, s.machine) == ("web1", 1 << 30, 2, "q35")
    assert s.disks == () and s.nics == () and s.serial is None and s.kernel is None


def test_full_spec_and_round_trip(tmp_path):
    p = tmp_path / "web1.toml"
    p.write_text(EXAMPLE + '''
kernel = "boot/vmlinuz"
cmdline = "console=ttyS0 quote=\\" back\\\\slash"
serial = "/var/log/web1 serial,log"
extra_args = ["-rtc", "base=utc"]

[[disks]]
path = "disks/root.qcow2"
format = "qcow2"

[[disks]]
path = "/srv/data.raw"
format = "raw"
bus = "scsi"
cache = "writeback"
readonly = true
shared = true

[[nics]]
type = "user"

[[nics]]
type = "tap"
model = "e1000"
mac = "52:54:00:AB:CD:EF"
ifname = "tap7"
''')
    s = load_spec(p)
    assert s.kernel == str(tmp_path / "boot/vmlinuz")          # relative to the spec
    assert s.disks[0].path == str(tmp_path / "disks/root.qcow2")
    assert (s.disks[0].bus, s.disks[0].cache, s.disks[0].readonly) == ("virtio", None, False)
    d1 = s.disks[1]
    assert (d1.format, d1.bus, d1.cache, d1.readonly, d1.shared) == \
        ("raw", "scsi", "writeback", True, True)
    assert s.nics[1].mac == "52:54:00:ab:cd:ef" and s.nics[1].ifname == "tap7"
    assert s.cmdline == 'console=ttyS0 quote=" back\\slash'
    assert s.extra_args == ("-rtc", "base=utc")
    # the default MAC is derived from the name: the same on both ends of a migration
    assert s.nic_mac(0) == parse_spec(s.to_toml()).nic_mac(0)
    assert parse_spec(s.to_toml()) == s
    odd = parse_spec(s.to_toml()).remap({}, serial=str(tmp_path / 'a"b\\c\td\x7fé'))
    assert parse_spec(odd.to_toml()) == odd


BAD_SPECS = [
    ('[[disks]]\npath = "a.img"\nformat = "vmdk"',
     "disks[0].format must be raw or qcow2, not 'vmdk'"),
    ('[[disks]]\npath = "a.img"', "disks[0].format is required"),
    ('[[disks]]\nformat = "raw"', "disks[0].path is required"),
    ('[[disks]]\npath = "a.img"\nformat = "raw"\nbus = "sata"',
     "disks[0].bus must be virtio, ide or scsi, not 'sata'"),
    ('[[disks]]\npath = "a.img"\nformat = "raw"\ncache = "fast"',
     "disks[0].cache must be none, writeback, writethrough, directsync or unsafe, not 'fast'"),
    ('[[disks]]\npath = "a.img"\nformat = "raw"\nreadonly = "yes"',
     "disks[0].readonly must be true or false, not 'yes'"),
    ('[[disks]]\npath = "a.img"\nformat = "raw"\nbus = "ide"\nreadonly = true',
     "disks[0].readonly needs bus virtio or scsi"),
    ('[[disks]]\npath = "a.img"\nformat = "raw"\n[[disks]]\npath = "./a.img"\nformat = "raw"',
     "disks[1].path is the same file as disks[0]"),
    ('[[disks]]\npath = "a.img"\nformat = "raw"\nsize = "1G"', "unknown field disks[0].'size'"),
    ('[[nics]]\ntype = "bridge"', "nics[0].type must be none, user or tap, not 'bridge'"),
    ('[[nics]]\ntype = "user"\nmac = "01:00:5e:00:00:01"', "nics[0].mac must be a unicast MAC"),
    ('[[nics]]\ntype = "user"\nifname = "tap0"', "nics[0].ifname only applies to type tap"),
    ('initrd = "initrd.img"', "initrd needs kernel"),
    ('memroy = "1G"', "unknown field 'memroy'"),
    ('extra_args = "-S"', "extra_args must be a list of strings"),
]


@pytest.mark.parametrize("extra, message", BAD_SPECS, ids=[m for _, m in BAD_SPECS])
def test_bad_spec(tmp_path, extra, message):
    p = tmp_path / "web1.toml"
    p.write_text(EXAMPLE + extra + "\n")
    with pytest.raises(UsageError) as e:
        load_spec(p)
    assert str(e.value).startswith(f"spec {p}: ")
    assert message in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("text, message", [
    ('memory = "1G"', "name is required"),
    ('name = "web 1"\nmemory = "1G"', "name must be 1-64 letters"),
    ('name = "web1"', 'memory is required'),
    ('name = "web1"\nmemory = 1024', 'memory must be a size with a unit such as "512M" or "1G", not 1024'),
    ('name = "web1"\nmemory = "lots"', "memory must be a size"),
    ('name = "web1"\nmemory = "1.5K"', "memory must be a whole number of MiB"),
    ('name = "web1"\nmemory = "1M"', "memory must be at least 16M"),
    ('name = "web1"\nmemory = "1G"\ncpus = 0', "cpus must be an integer from 1 to 255, not 0"),
    ('name = "web1"\nmemory = "1G"\ncpus = true', "cpus must be an integer from 1 to 255, not true"),
    ('name = "web1"\nmemory = "1G"\ncpus = "2"', "cpus must be an integer from 1 to 255, not '2'"),
    ('name = "web1\nmemory', "not valid TOML"),
])
def test_bad_spec_top(tmp_path, text, message):
    p = tmp_path / "web1.toml"
    p.write_text(text + "\n")
    with pytest.raises(UsageError, match=None) as e:
        load_spec(p)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_bad_spec_on_the_command_line(tmp_path, state_dir):
    p = tmp_path / "web1.toml"
    p.write_text(EXAMPLE + '[[disks]]\npath = "a.img"\nformat = "vmdk"\n')
    line = one_error(vmferry(state_dir, "run", p), 2)
    assert line == f"vmferry: error: spec {p}: disks[0].format must be raw or qcow2, not 'vmdk'"
    line = one_error(vmferry(state_dir, "run", tmp_path / "nope.toml"), 2)
    assert "no such file" in line


def test_remap(tmp_path):
    s = parse_spec(EXAMPLE + 'serial = "/src/serial.log"\n'
                   '[[disks]]\npath = "/src/a.qcow2"\nformat = "qcow2"\n'
                   '[[disks]]\npath = "/src/b.raw"\nformat = "raw"\n'
                   '[[disks]]\npath = "/shared/c.raw"\nformat = "raw"\nshared = true\n')
    d = s.remap({"/src/a.qcow2": "/dst/a.qcow2", "disk1": "/dst/b.raw"}, serial="/dst/s.log")
    assert [x.path for x in d.disks] == ["/dst/a.qcow2", "/dst/b.raw", "/shared/c.raw"]
    assert d.serial == "/dst/s.log" and s.serial == "/src/serial.log"
    assert s.remap({}, None) == s
    with pytest.raises(UsageError, match="not a disk of web1"):
        s.remap({"/src/zzz": "/dst/zzz"}, None)
    with pytest.raises(UsageError, match="same file"):
        s.remap({"disk0": "/x", "disk1": "/x"}, None)


# --------------------------------------------------------------------------- argv

def _arg_values(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == option]


def test_argv_stable_names(tmp_path):
    a, b, c = (make_disk(tmp_path / n, f) for n, f in
               (("a.qcow2", "qcow2"), ("b.raw", "raw"), ("c.raw", "raw")))
    spec = parse_spec(EXAMPLE + f'serial = "{tmp_path}/ser,ial.log"\n'
                      f'[[disks]]\npath = "{a}"\nformat = "qcow2"\n'
                      f'[[disks]]\npath = "{b}"\nformat = "raw"\nbus = "scsi"\n'
                      f'[[disks]]\npath = "{c}"\nformat = "raw"\nbus = "ide"\n'
                      f'[[nics]]\ntype = "user"\n')
    argv = qemu_argv(spec, qmp_socket=Path("/run/q.sock"), accel="tcg")
    for opt in ("-nodefaults", "-no-user-config"):
        assert opt in argv
    assert _arg_values(argv, "-display") == ["none"]
    assert _arg_values(argv, "-accel") == ["tcg"]
    assert _arg_values(argv, "-qmp") == ["unix:/run/q.sock,server=on,wait=off"]
    assert "-incoming" not in argv
    blockdevs = [json.loads(x) for x in _arg_values(argv, "-blockdev")]
    assert [(n["node-name"], n["driver"], n.get("file")) for n in blockdevs] == [
        ("file-disk0", "file", None), ("disk0", "qcow2", "file-disk0"),
        ("file-disk1", "file", None), ("disk1", "raw", "file-disk1"),
        ("file-disk2", "file", None), ("disk2", "raw", "file-disk2")]
    assert blockdevs[0]["filename"] == str(a) and blockdevs[0]["aio"] == "threads"
    assert blockdevs[0]["cache"]["direct"] is supports_o_direct(a)
    devices = _arg_values(argv, "-device")
    assert "virtio-scsi-pci,id=scsi0" in devices
    assert any(d.startswith("virtio-blk-pci,drive=disk0,id=vd0") for d in devices)
    assert any(d.startswith("scsi-hd,drive=disk1,id=sd1") for d in devices)
    assert any(d.startswith("ide-hd,drive=disk2,id=hd2") for d in devices)
    assert [(n.node, n.file_node, n.device) for n in disk_names(spec)] == [
        ("disk0", "file-disk0", "vd0"), ("disk1", "file-disk1", "sd1"),
        ("disk2", "file-disk2", "hd2")]
    # console: appended, commas in the path escaped
    assert _arg_values(argv, "-chardev") == [f"file,id=serial0,path={tmp_path}/ser,,ial.log,append=on"]
    assert _arg_values(argv, "-serial") == ["chardev:serial0"]

    # the destination: other paths, same names, plus -incoming
    dst = spec.remap({"disk0": str(tmp_path / "dst.qcow2")}, None)
    dargv = qemu_argv(dst, qmp_socket=Path("/run/d.sock"), accel="tcg", incoming="defer")
    assert _arg_values(dargv, "-incoming") == ["defer"]
    strip = lambda bd: {k: v for k, v in json.loads(bd).items() if k != "filename"}
    assert [strip(x) for x in _arg_values(dargv, "-blockdev")] == \
        [strip(x) for x in _arg_values(argv, "-blockdev")]
    assert _arg_values(dargv, "-device") == devices


def test_argv_cache_modes(tmp_path):
    img = make_disk(tmp_path / "a.raw", "raw")
    for mode, direct, write_cache_off in (("none", True, False), ("writeback", False, False),
                                          ("directsync", True, True)):
        spec = parse_spec(EXAMPLE + f'[[disks]]\npath = "{img}"\nformat = "raw"\n'
                                    f'cache = "{mode}"\nreadonly = true\n')
        argv = qemu_argv(spec, qmp_socket=Path("/q.sock"), accel="tcg")
        file_node = json.loads(_arg_values(argv, "-blockdev")[0])
        assert file_node["cache"]["direct"] is direct and file_node["read-only"] is True
        assert ("write-cache=off" in _arg_values(argv, "-device")[0]) is write_cache_off


# --------------------------------------------------------------------------- life cycle

def test_run_status_list_stop(tmp_path, state_dir, disk):
    spec = write_spec(tmp_path / "web1.toml", disks=[(disk, "qcow2")])
    out = ok(vmferry(state_dir, "run", spec))
    assert out.startswith("started web1 (pid ") and out.rstrip().endswith(("kvm)", "tcg)"))
    pid = int(out.split("pid ")[1].split(",")[0])
    assert qemu_pids(str(state_dir)) == [pid]

    st = json.loads(ok(vmferry(state_dir, "status", "web1", "--json")))
    assert st["state"] == "running" and st["pid"] == pid and st["accel"] in ("kvm", "tcg")
    assert st["spec"]["machine"].startswith("pc-q35-")      # alias pinned for migration
    text = ok(vmferry(state_dir, "status", "web1"))
    assert "state:    running" in text and f"pid:      {pid}" in text

    listing = ok(vmferry(state_dir, "list")).splitlines()
    assert listing[0].split() == ["NAME", "STATE", "PID", "MEMORY", "DISKS"]
    assert listing[1].split() == ["web1", "running", str(pid), "128.00", "MiB", "web1.qcow2"]
    [entry] = json.loads(ok(vmferry(state_dir, "list", "--json")))
    assert (entry["name"], entry["state"], entry["pid"]) == ("web1", "running", pid)

    vm_dir = state_dir / "web1"
    assert {p.name for p in vm_dir.iterdir()} >= {"spec.toml", "qemu.pid", "qemu.log",
                                                  "qmp.sock", "qmp-cli.sock"}
    out = ok(vmferry(state_dir, "stop", "web1", "--timeout", "0.3"))
    assert out.strip() == f"stopped web1 (pid {pid}, QEMU quit)"   # firmware ignores ACPI
    assert not os.path.exists(f"/proc/{pid}") or qemu_pids(str(state_dir)) == []
    assert sorted(p.name for p in vm_dir.iterdir()) == ["qemu.log", "spec.toml"]

    st = json.loads(ok(vmferry(state_dir, "status", "web1", "--json")))
    assert (st["state"], st["pid"], st["accel"]) == ("stopped", None, None)
    assert ok(vmferry(state_dir, "list")).splitlines()[1].split()[:3] == ["web1", "stopped", "-"]
    assert "web1 is not running" in one_error(vmferry(state_dir, "stop", "web1"), 1)
    assert "no VM named 'web2'" in one_error(vmferry(state_dir, "status", "web2"), 2)


def test_run_twice_is_refused(tmp_path, state_dir, disk):
    spec = write_spec(tmp_path / "web1.toml", disks=[(disk, "qcow2")])
    ok(vmferry(state_dir, "run", spec))
    other = write_spec(tmp_path / "other.toml", disks=[(make_disk(tmp_path / "o.raw", "raw"), "raw")])
    line = one_error(vmferry(state_dir, "run", other), 2)     # same name, another spec
    assert "web1 is already running (pid " in line
    assert len(qemu_pids(str(state_dir))) == 1
    assert load_spec(state_dir / "web1" / "spec.toml").disks[0].path == str(disk)
    ok(vmferry(state_dir, "stop", "web1", "--force"))


def test_missing_disk_leaves_nothing(tmp_path, state_dir):
    missing = tmp_path / "nope.qcow2"
    spec = write_spec(tmp_path / "web1.toml", disks=[(missing, "qcow2")])
    line = one_error(vmferry(state_dir, "run", spec), 2)
    assert line == (f"vmferry: error: web1: disks[0].path {missing} does not exist "
                    f"(create it, e.g. with qemu-img create)")
    assert not (state_dir / "web1").exists()
    assert qemu_pids(str(state_dir)) == []
    assert ok(vmferry(state_dir, "list")).splitlines()[1:] == []


def test_qemu_failure_is_one_line_and_cleaned_up(tmp_path, state_dir, disk):
    spec = write_spec(tmp_path / "web1.toml", disks=[(disk, "qcow2")],
                      extra='extra_args = ["-device", "no-such-device"]')
    line = one_error(vmferry(state_dir, "run", spec), 1)
    assert "QEMU for web1 exited with status 1" in line and "no-such-device" in line
    assert not (state_dir / "web1").exists()
    assert qemu_pids(str(state_dir)) == []


@pytest.mark.parametrize("machine, status, says", [
    ("pc-q35-1.0", 2, "machine 'pc-q35-1.0' is not supported by"),   # pinned: QEMU says so
    ("no-such-board", 2, "machine 'no-such-board' is not supported by"),
])
def test_unknown_machine_type_is_one_line(tmp_path, state_dir, disk, machine, status, says):
    spec = write_spec(tmp_path / "web1.toml", disks=[(disk, "qcow2")],
                      extra=f'machine = "{machine}"')
    line = one_error(vmferry(state_dir, "run", spec), status)
    assert says in line, line
    assert not (state_dir / "web1").exists()
    assert qemu_pids(str(state_dir)) == []


def test_long_state_dir_uses_short_sockets(tmp_path, disk):
    deep = tmp_path.joinpath(*["a-rather-long-folder-name"] * 5, "state")
    assert len(os.fsencode(deep / "web1" / "qmp-cli.sock")) > SUN_PATH_MAX
    spec = write_spec(tmp_path / "web1.toml", disks=[(disk, "qcow2")])
    sd = StateDir(deep)
    try:
        vm = start_vm(sd, load_spec(spec))
        assert len(os.fsencode(vm.qmp_socket)) <= SUN_PATH_MAX and vm.qmp_socket.exists()
        assert vm_status(sd, "web1").state == "running"
        assert stop_vm(sd, "web1", force=True).how == "quit"
        assert not vm.qmp_socket.parent.exists()
        assert not (deep / "web1" / "qemu.pid").exists()
    finally:
        for pid in qemu_pids(str(deep)):
            os.kill(pid, signal.SIGKILL)
        sd.clear_runtime("web1")


@pytest.mark.timeout(60)
def test_two_starts_at_once_in_one_event_loop(tmp_path, state_dir):
    """One process (an agent serving two sessions) starting two VMs of one state
    directory at once: the second waits for the lock without blocking the loop
    the first needs to finish (it used to deadlock)."""
    from vmferry.vm.process import start_vm_async, stop_vm_async
    sd = StateDir(state_dir)
    specs = [load_spec(write_spec(tmp_path / f"{n}.toml", name=n,
                                  disks=[(make_disk(tmp_path / f"{n}.qcow2"), "qcow2")]))
             for n in ("web1", "web2")]

    async def both():
        vms = await asyncio.wait_for(asyncio.gather(
            *(start_vm_async(sd, s, accel="tcg", paused=True) for s in specs)), 30)
        try:
            return sorted(vm.spec.name for vm in vms)
        finally:
            for s in specs:
                await stop_vm_async(sd, s.name, force=True, timeout=5)
    assert asyncio.run(both()) == ["web1", "web2"]
    assert qemu_pids(str(state_dir)) == []


def test_in_process_api_tcg_paused_and_stale_pidfile(tmp_path, state_dir, disk):
    sd = StateDir(state_dir)
    spec = load_spec(write_spec(tmp_path / "web1.toml", disks=[(disk, "qcow2")]))
    vm = start_vm(sd, spec, accel="tcg", paused=True)
    assert vm.accel == "tcg" and vm.spec.machine.startswith("pc-q35-")
    st = vm_status(sd, "web1")
    assert (st.state, st.accel, st.pid) == ("prelaunch", "tcg", vm.pid)

    # qmp.sock is the orchestrator's: a session held there does not block the CLI
    async def hold_and_ask():
        async with qmp_session(vm.qmp_socket) as qmp:
            blocks = await qmp.execute("query-named-block-nodes", {"flat": True})
            assert {b["node-name"] for b in blocks} >= {"disk0", "file-disk0"}
            with pytest.raises(QMPCommandError) as e:
                await qmp.execute("no-such-command")
            assert e.value.error_class == "CommandNotFound"
            cp = await asyncio.to_thread(vmferry, state_dir, "status", "web1", "--json")
            return json.loads(ok(cp))["state"]
    assert asyncio.run(hold_and_ask()) == "prelaunch"
    qmp_call(vm.qmp_socket, "cont")
    assert vm_status(sd, "web1").state == "running"

    # QEMU killed behind our back: "stopped", and `run` starts it again
    os.kill(vm.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while vm_status(sd, "web1").state != "stopped":
        assert time.monotonic() < deadline, "SIGKILLed QEMU still counts as running"
        time.sleep(0.05)
    vm2 = start_vm(sd, spec, accel="tcg")
    assert vm2.pid != vm.pid and vm_status(sd, "web1").state == "running"
    assert stop_vm(sd, "web1", timeout=0.2).how == "quit"
    assert stop_vm(sd, "web1").how == "not-running"

    with pytest.raises(ConnectError, match="cannot connect to QMP socket") as e:
        qmp_call(vm.qmp_socket, "query-status")
    assert "\n" not in str(e.value)


def test_guest_kernel_and_serial_append(tmp_path, state_dir):
    guest = pytest.importorskip("vmferry.guest")
    try:
        kernel = guest.build_guest(tmp_path / "guest")
    except guest.GuestBuildError as e:
        pytest.skip(f"cannot build the test guest: {e}")
    serial = tmp_path / "serial.log"
    extra = [] if (qboot := guest.find_qboot()) is None else ["-bios", str(qboot)]
    spec = write_spec(tmp_path / "g.toml", "guest1",
                      disks=[(make_disk(tmp_path / "g.qcow2"), "qcow2")],   # with -kernel
                      extra=f'kernel = "{kernel}"\n'
                            f'cmdline = "{guest.guest_cmdline(mem="8M", dirty="idle")}"\n'
                            f'serial = "{serial}"\nextra_args = {json.dumps(extra)}')
    for boot in (1, 2):
        ok(vmferry(state_dir, "run", spec))
        deadline = time.monotonic() + 15
        while (serial.read_text() if serial.exists() else "").count("vmferry-guest start") < boot:
            assert time.monotonic() < deadline, f"no guest output: {serial.read_text()!r}"
            time.sleep(0.05)
        ok(vmferry(state_dir, "stop", "guest1", "--timeout", "0.2"))
    # the second boot appended: the console of a migrated VM continues in one file
    assert serial.read_text().count("vmferry-guest start") == 2
