"""Bad input and failures: one clear `vmferry: error: ` line, the right exit code, no
traceback, no hang, and a destination never written where it must not be.

Faults come from real servers: qemu-nbd -r (read-only), qemu-nbd -x (export names),
nbdkit's error filter (ENOSPC on writes), an nbdkit eval plugin whose reads fail past
an offset (EIO part way through), nbdkit's delay + log filters for slow sources whose
progress can be watched, and SIGKILL/SIGINT sent while a copy runs.
"""
from __future__ import annotations

import errno
import os
import signal
import time

import pytest

from cli import (
    assert_cli_error, assert_one_error_line, popen_vmferry, run_vmferry, terminate_vmferry,
    wait_for,
)
from disk_data import MiB, eio_after, make_image, read_all, read_nbdkit_log


def _mentions_errno(line: str, code: int) -> bool:
    low = line.lower()
    return os.strerror(code).lower() in low or errno.errorcode[code].lower() in low


# --------------------------------------------------------------------------- usage errors

@pytest.mark.parametrize("uri", [
    "nbd://localhost:notaport/disk",
    "nbd+unix:///disk",                     # unix transport without ?socket=
    "nbd+unix:///disk?socket=",
], ids=["bad-port", "no-socket", "empty-socket"])
@pytest.mark.parametrize("side", ["src", "dst"])
def test_malformed_uri(workdir, uri, side):
    other = make_image(workdir / "f.raw", 4096, "random")
    args = [uri, workdir / "out.raw"] if side == "src" else [other, uri]
    cp = run_vmferry("copy", *args)
    assert_cli_error(cp, 2)


@pytest.mark.parametrize("flags", [
    ["--request-size", "12Q"],
    ["--request-size", "-4K"],
    ["--connections", "0"],
    ["--connections", "many"],
    ["--requests", "0"],
    ["--bandwidth", "0"],
    ["--bandwidth", "-16"],
    ["--bandwidth", "fast"],
    ["--progress=xml"],
    ["--frobnicate"],
], ids=lambda f: " ".join(f))
def test_bad_flags(workdir, flags):
    src = make_image(workdir / "f.raw", 4096, "random")
    cp = run_vmferry("copy", *flags, src, workdir / "out.raw")
    assert_cli_error(cp, 2)
    assert not (workdir / "out.raw").exists(), "a usage error still created the destination"


@pytest.mark.parametrize("value", ["0", "-8", "lots", "1.5"])
@pytest.mark.parametrize("command", ["migrate", "presync"])
def test_bad_disk_bandwidth(workdir, command, value):
    cp = run_vmferry("--state-dir", workdir / "state", command, "vm1",
                     f"local://{workdir}/dest", "--disk-bandwidth", value)
    assert "--disk-bandwidth" in assert_cli_error(cp, 2)


def test_missing_destination_argument(workdir):
    src = make_image(workdir / "f.raw", 4096, "random")
    assert_cli_error(run_vmferry("copy", src), 2)


# --------------------------------------------------------------------------- connecting

def test_unreachable_socket(workdir):
    sock = workdir / "nobody-listens-here.sock"
    cp = run_vmferry("copy", f"nbd+unix:///?socket={sock}", workdir / "out.raw", timeout=60)
    line = assert_cli_error(cp, 1)
    assert str(sock) in line, f"the error does not say which endpoint failed: {line}"


def test_unreachable_destination_socket(workdir):
    src = make_image(workdir / "f.raw", 4096, "random")
    sock = workdir / "gone.sock"
    cp = run_vmferry("copy", src, f"nbd+unix:///?socket={sock}", timeout=60)
    line = assert_cli_error(cp, 1)
    assert str(sock) in line, line


def test_missing_source_file(workdir):
    """A file that cannot be opened is a ConnectError in the contract ("can't reach/open
    endpoint"): a runtime failure, exit 1 - not a usage error."""
    path = workdir / "does-not-exist.raw"
    line = assert_cli_error(run_vmferry("copy", path, workdir / "out.raw"), 1)
    assert str(path) in line or path.name in line, line


def test_unknown_export_name(workdir, qemu_nbd):
    img = make_image(workdir / "disk.raw", 1 * MiB, "random")
    srv = qemu_nbd(img, name="disk", readonly=True)
    cp = run_vmferry("copy", srv.uri_for("other"), workdir / "out.raw")
    line = assert_cli_error(cp, 1)
    assert "other" in line, f"the error does not name the missing export: {line}"


# --------------------------------------------------------------------------- bad destinations

def test_destination_smaller_than_source(workdir, nbdkit):
    size = 2 * MiB + 123
    src = make_image(workdir / "src.raw", size, "random")
    dst_file = make_image(workdir / "dst.raw", size - 1, "fill:0x5a")
    dst = nbdkit("file", str(dst_file))
    cp = run_vmferry("copy", src, dst.uri)
    line = assert_cli_error(cp, (1, 2))
    assert "smaller" in line.lower(), line
    assert read_all(dst_file) == b"\x5a" * (size - 1), "destination written before the size check"


def test_read_only_destination(workdir, qemu_nbd):
    size = 1 * MiB
    src = make_image(workdir / "src.raw", size, "random")
    dst_file = make_image(workdir / "dst.raw", size, "fill:0x5a")
    dst = qemu_nbd(dst_file, readonly=True)
    cp = run_vmferry("copy", src, dst.uri)
    line = assert_cli_error(cp, (1, 2))
    assert "read-only" in line.lower(), line
    assert read_all(dst_file) == b"\x5a" * size


# --------------------------------------------------------------------------- I/O failures

def test_source_eio_part_way(workdir, nbdkit):
    size = 4 * MiB
    data = make_image(workdir / "src.raw", size, "random")
    src = eio_after(nbdkit, data, 2 * MiB)
    dst_file = make_image(workdir / "dst.raw", size, "fill:0x5a")
    dst = nbdkit("file", str(dst_file))
    cp = run_vmferry("copy", "--connections", "1", "--request-size", "256K", src.uri, dst.uri)
    line = assert_cli_error(cp, 1)
    assert _mentions_errno(line, errno.EIO), line


def test_destination_enospc(workdir, nbdkit):
    size = 4 * MiB
    src = make_image(workdir / "src.raw", size, "random")
    dst = nbdkit("memory", f"size={size}", "error=ENOSPC", "error-pwrite-rate=100%",
                 "error-zero=ENOSPC", "error-zero-rate=100%",
                 "error-trim=ENOSPC", "error-trim-rate=100%", filters=["error"])
    cp = run_vmferry("copy", src, dst.uri)
    line = assert_cli_error(cp, 1)
    assert _mentions_errno(line, errno.ENOSPC), line


def test_destination_file_in_missing_directory(workdir):
    """Cannot create the destination file: ConnectError (open failed), exit 1."""
    src = make_image(workdir / "src.raw", 4096, "random")
    out = workdir / "no" / "such" / "dir" / "out.raw"
    line = assert_cli_error(run_vmferry("copy", src, out), 1)
    assert "out.raw" in line, line


# --------------------------------------------------------------------------- mid-copy events

def _slow_source(nbdkit, workdir, size="64G", rdelay="100ms"):
    """A pattern source where each read takes RDELAY, with a log of every request.

    64 GiB at nbdkit's 16 threads per connection and 100 ms a read takes minutes
    whatever the request size, so the copy is surely still running when the test acts.
    """
    log = workdir / "src.log"
    srv = nbdkit("pattern", f"size={size}", f"rdelay={rdelay}", f"logfile={log}",
                 filters=["log", "delay"])
    return srv, log


def _reads_started(log):
    return any(r.op == "Read" for r in read_nbdkit_log(log)[1])


def test_server_killed_mid_copy(workdir, nbdkit):
    src, log = _slow_source(nbdkit, workdir)
    p = popen_vmferry("copy", src.uri, "null:")
    try:
        wait_for(lambda: _reads_started(log) or p.poll() is not None, 30, "the copy to start")
        assert p.poll() is None, f"vmferry ended early: {p.communicate()}"
        time.sleep(0.3)
        src.kill()
        try:
            out, err = p.communicate(timeout=20)
        except Exception:
            pytest.fail("vmferry hung after its source server was killed")
        assert p.returncode == 1, (p.returncode, out, err)
        assert_one_error_line(err)
        assert not any(l.startswith("copied ") for l in out.splitlines()), out
    finally:
        terminate_vmferry(p)


def test_ctrl_c(workdir, nbdkit):
    """SIGINT mid-copy: exit status 130, promptly, no traceback, no summary."""
    src, log = _slow_source(nbdkit, workdir)
    p = popen_vmferry("copy", src.uri, "null:")
    try:
        wait_for(lambda: _reads_started(log) or p.poll() is not None, 30, "the copy to start")
        assert p.poll() is None, f"vmferry ended early: {p.communicate()}"
        time.sleep(0.3)
        p.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        try:
            out, err = p.communicate(timeout=10)
        except Exception:
            pytest.fail("vmferry did not exit within 10 s of SIGINT")
        elapsed = time.monotonic() - t0
        assert p.returncode == 130, (p.returncode, out, err)
        assert elapsed < 5, f"vmferry took {elapsed:.1f} s to stop after SIGINT"
        assert "Traceback" not in err, err
        lines = [l for l in err.splitlines() if l.strip()]
        assert len(lines) <= 1 and all(l.startswith("vmferry: ") for l in lines), err
        assert not any(l.startswith("copied ") for l in out.splitlines()), out
    finally:
        terminate_vmferry(p)


def test_version_names_vmferry_qemu_and_libnbd():
    """What a bug report needs: vmferry's version and those of the QEMU and
    libnbd it found (the engine's own libnbd, not a tool's)."""
    import shutil
    import subprocess
    from vmferry import __version__
    cp = run_vmferry("--version")
    assert cp.returncode == 0, cp.stderr
    lines = cp.stdout.splitlines()
    assert lines[0] == f"vmferry {__version__}", lines
    qemu = subprocess.run([shutil.which("qemu-system-x86_64"), "--version"],
                          capture_output=True, text=True).stdout.split()
    assert lines[1].startswith(f"QEMU {qemu[qemu.index('version') + 1]} ("), lines
    nbdinfo = subprocess.run(["nbdinfo", "--version"], capture_output=True, text=True).stdout
    assert lines[2] in nbdinfo.splitlines(), (lines, nbdinfo)     # "libnbd 1.14.2"
