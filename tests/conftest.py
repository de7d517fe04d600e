"""Fixtures: a short private work directory and factories for real NBD servers.

Every server a test starts through these factories is stopped at teardown; one that
ignores SIGTERM and has to be SIGKILLed fails the test (an error in teardown).
"""
from __future__ import annotations

import importlib
import shutil
import tempfile
from pathlib import Path

import pytest

# before any test module imports it: its asserts then report their values
pytest.register_assert_rewrite("migrate_helpers")

from servers import ServerSet  # noqa: E402


def pytest_configure(config):
    if not config.pluginmanager.hasplugin("timeout"):
        # the tests use @pytest.mark.timeout; without pytest-timeout it is only a label
        config.addinivalue_line("markers", "timeout(seconds): per-test time limit "
                                "(enforced by pytest-timeout when installed)")


@pytest.fixture
def workdir():
    """A fresh directory with a short path (Unix socket paths must fit in 107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="vmf-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def servers(workdir):
    """The set of servers of this test; all stopped at teardown."""
    s = ServerSet(rundir=workdir)
    yield s
    stubborn = s.stop_all()
    if stubborn:
        pytest.fail("server(s) ignored SIGTERM and had to be SIGKILLed: "
                    + ", ".join(f"{x.kind} pid {x.pid} ({' '.join(x.argv)})" for x in stubborn))


@pytest.fixture
def qemu_nbd(servers):
    """qemu_nbd(image, fmt='raw', readonly=False, shared=4, extra=(), name=None, ...)."""
    return servers.qemu_nbd


@pytest.fixture
def nbdkit(servers):
    """nbdkit(plugin, *args, filters=(), readonly=False, ...)."""
    return servers.nbdkit


@pytest.fixture
def nbdkit_tcp(servers):
    """nbdkit_tcp(plugin, *args, filters=(), ...): the same, on 127.0.0.1:PORT."""
    return servers.nbdkit_tcp


@pytest.fixture
def qsd_bitmap(servers):
    """qsd_bitmap(image_qcow2, bitmap, export='disk')."""
    return servers.qsd_bitmap


@pytest.fixture
def vmferry():
    """The vmferry package under test; a failure (not a skip) when it cannot be imported."""
    try:
        return importlib.import_module("vmferry")
    except Exception as e:          # a broken build must show up red, never as a skip
        pytest.fail(f"cannot import vmferry: {type(e).__name__}: {e}", pytrace=False)


# --------------------------------------------------------------------------- two hosts
# The destination host in a network namespace, real certificates and a real sshd
# (tests/netlab.py).  Module-scoped: building them takes a second or two.

from netlab import NetLab, Pki, Sshd, make_pki, netlab_unavailable, start_sshd


@pytest.fixture(scope="module")
def netlab():
    """A NetLab: this namespace is the source host, netlab.ns the destination."""
    reason = netlab_unavailable()
    if reason:
        pytest.skip(reason)
    with NetLab() as lab:
        yield lab


@pytest.fixture(scope="module")
def pki(netlab, tmp_path_factory) -> Pki:
    """CA, server and client certificates valid for both hosts and for localhost."""
    return make_pki(tmp_path_factory.mktemp("pki"),
                    [netlab.dest_ip, netlab.host_ip, "localhost", "127.0.0.1"])


@pytest.fixture(scope="module")
def rogue_pki(netlab, tmp_path_factory) -> Pki:
    """An unrelated CA with certificates for the same names: every peer must refuse it."""
    return make_pki(tmp_path_factory.mktemp("rogue"),
                    [netlab.dest_ip, netlab.host_ip, "localhost", "127.0.0.1"],
                    ca_name="rogue CA")


@pytest.fixture(scope="module")
def sshd(netlab, tmp_path_factory):
    """sshd on the destination host: ``sshd.ssh_argv() + [command]`` runs as root there."""
    s: Sshd = start_sshd(netlab, tmp_path_factory.mktemp("sshd"))
    yield s
    s.stop()
