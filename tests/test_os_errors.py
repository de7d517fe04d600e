"""What the operating system refuses — an address that does not resolve, a port
in use, a read-only or unreadable state directory — is one `vmferry: error:`
line naming what failed, with a non-zero exit status, never a traceback."""
from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from cli import assert_cli_error, run_vmferry
from netlab import NetLabError, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    try:
        return make_pki(tmp_path_factory.mktemp("pki"), ["127.0.0.1"])
    except NetLabError as e:
        pytest.skip(str(e))


def _agent(tmp_path: Path, pki, listen: str) -> subprocess.CompletedProcess:
    return run_vmferry("--state-dir", tmp_path / "state", "agent", "--listen", listen,
                       "--pki", pki.dir, timeout=30)


@pytest.mark.parametrize("listen, code, words", [
    ("[::1", 2, "use HOST, HOST:PORT or [IPV6]:PORT"),
    ("x y", 1, "cannot listen on x y:16514"),
    ("no-such-host.invalid:7000", 1, "cannot listen on no-such-host.invalid:7000"),
])
def test_bad_listen_address(tmp_path, pki, listen, code, words):
    line = assert_cli_error(_agent(tmp_path, pki, listen), code)
    assert words in line, line


def test_listen_on_a_port_in_use(tmp_path, pki):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        line = assert_cli_error(_agent(tmp_path, pki, f"127.0.0.1:{port}"), 1)
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in line, line


@pytest.fixture
def read_only_dir(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(d)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs (needs root)")
    yield d
    subprocess.run(["umount", str(d)], check=True)


def test_run_with_a_read_only_state_dir(tmp_path, read_only_dir):
    spec = tmp_path / "t.toml"
    spec.write_text('name = "t"\nmemory = "64M"\n')
    line = assert_cli_error(run_vmferry("--state-dir", read_only_dir, "run", spec), 1)
    assert str(read_only_dir) in line and "Read-only file system" in line, line


def test_list_of_an_unreadable_state_dir(tmp_path):
    line = assert_cli_error(run_vmferry("--state-dir", "/proc/1", "list"), 1)
    assert "/proc/1" in line and "Permission denied" in line, line
