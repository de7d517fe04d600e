"""Real, throwaway NBD servers for the tests: qemu-nbd, nbdkit and qemu-storage-daemon.

Every server listens on a Unix socket in a short private directory (socket paths are
limited to 107 bytes, so pytest's long tmp_path is not used for them), is probed with a
real NBD handshake before it is handed out, and is always stopped: SIGTERM, then SIGKILL
after a timeout.  A server that needed SIGKILL is reported (``Server.needed_sigkill``) so
the fixture that owns it can fail the test: a server that will not stop is a bug too.

Nothing here imports vmferry: these helpers must stay independent of the code under test.
A missing tool, plugin or filter turns into ``pytest.skip`` with the reason, never a pass.
"""
from __future__ import annotations

import ctypes
import functools
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterable, Sequence
from urllib.parse import quote

import pytest

START_TIMEOUT = 10.0   # seconds a server gets to accept its first NBD handshake
STOP_TIMEOUT = 10.0    # seconds between SIGTERM and SIGKILL

_PR_SET_PDEATHSIG = 1


class ServerError(RuntimeError):
    """A server failed to start; the message carries its command line and stderr."""


# --------------------------------------------------------------------------- tools

@functools.cache
def _which(tool: str) -> str | None:
    return shutil.which(tool)


def require_tool(tool: str, why: str = "") -> str:
    """Path of TOOL, or skip the calling test with the reason."""
    path = _which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed{': ' + why if why else ''}")
    return path


@functools.cache
def _nbdkit_has(kind: str, name: str) -> bool:
    nbdkit = _which("nbdkit")
    if nbdkit is None:
        return False
    if kind == "plugin":
        argv = [nbdkit, name, "--dump-plugin"]
    else:
        argv = [nbdkit, f"--filter={name}", "null", "--dump-plugin"]
    try:
        return subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def require_nbdkit(plugin: str, filters: Iterable[str] = ()) -> None:
    """Skip unless nbdkit, PLUGIN and every filter in FILTERS are installed."""
    require_tool("nbdkit")
    if not _nbdkit_has("plugin", plugin):
        pytest.skip(f"nbdkit plugin {plugin!r} is not installed")
    for f in filters:
        if not _nbdkit_has("filter", f):
            pytest.skip(f"nbdkit filter {f!r} is not installed")


# --------------------------------------------------------------------------- probe

def nbd_probe(sock: str, timeout: float = 2.0) -> None:
    """One clean NBD handshake on SOCK: read the newstyle greeting, then NBD_OPT_ABORT.

    A bare connect()+close() makes both qemu-nbd and nbdkit log a handshake error, so
    the probe speaks just enough protocol to leave politely.  Raises OSError while the
    server is not ready (no socket yet, refused, or not an NBD newstyle greeting).
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(sock)
        greeting = b""
        while len(greeting) < 18:
            chunk = s.recv(18 - len(greeting))
            if not chunk:
                raise ConnectionResetError("server closed during the NBD greeting")
            greeting += chunk
        if greeting[:16] != b"NBDMAGICIHAVEOPT":
            raise ConnectionError(f"not an NBD newstyle greeting: {greeting!r}")
        # client flags FIXED_NEWSTYLE|NO_ZEROES, then option header: NBD_OPT_ABORT (2), length 0
        s.sendall(struct.pack(">I", 3) + b"IHAVEOPT" + struct.pack(">II", 2, 0))
        try:
            s.recv(64)          # the server's ACK, if it sends one before closing
        except OSError:
            pass


def nbd_uri(sock: str | os.PathLike, export: str = "") -> str:
    """The nbd+unix URI of SOCK with EXPORT (the default export when empty)."""
    return f"nbd+unix:///{quote(export, safe='')}?socket={os.fspath(sock)}"


# --------------------------------------------------------------------------- server

def _set_pdeathsig() -> None:     # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except Exception:
        pass


class Server:
    """A running server.  ``uri``, ``sock``, ``proc``; ``stop()`` always ends it."""

    def __init__(self, kind: str, argv: Sequence[str], rundir: Path, sock: Path,
                 export: str = ""):
        self.kind = kind
        self.argv = [str(a) for a in argv]
        self.rundir = rundir
        self.sock = str(sock)
        self.export = export
        self.uri = nbd_uri(sock, export)
        self.stderr_path = rundir / f"{kind}.stderr"
        self.needed_sigkill = False
        self.killed_on_purpose = False
        self._stderr = open(self.stderr_path, "wb")
        try:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=self._stderr,
                                         preexec_fn=_set_pdeathsig)
        except OSError:
            self._stderr.close()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        """What the server wrote to stderr (kept after stop() removed the files)."""
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return getattr(self, "_last_stderr", "")

    def uri_for(self, export: str) -> str:
        """The URI of another export name on the same socket."""
        return nbd_uri(self.sock, export)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> "Server":
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while True:
            rc = self.proc.poll()
            if rc is not None:
                self.stop()
                raise ServerError(f"{self.kind} exited with status {rc} before accepting "
                                  f"connections\ncommand: {' '.join(self.argv)}\n"
                                  f"stderr:\n{self.stderr()}")
            try:
                nbd_probe(self.sock)
                return self
            except OSError as e:
                last = e
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(f"{self.kind} did not accept an NBD handshake on "
                                  f"{self.sock} within {timeout:.0f} s (last error: {last})"
                                  f"\ncommand: {' '.join(self.argv)}\nstderr:\n{self.stderr()}")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL the server on purpose (a test of the client's reaction to it)."""
        self.killed_on_purpose = True
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=STOP_TIMEOUT)

    def stop(self, timeout: float = STOP_TIMEOUT) -> bool:
        """SIGTERM, wait, SIGKILL after TIMEOUT.  True when SIGTERM was enough.

        Idempotent.  Sets ``needed_sigkill`` when the server ignored SIGTERM.
        """
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.needed_sigkill = True
                self.proc.kill()
                self.proc.wait(timeout=timeout)
        if not self._stderr.closed:
            self._stderr.close()
        if self.rundir.exists():
            # keep the stderr text in memory for reports, drop the socket directory
            self._last_stderr = self.stderr()
            shutil.rmtree(self.rundir, ignore_errors=True)
        return not self.needed_sigkill

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<Server {self.kind} pid={self.proc.pid} uri={self.uri}>"


def _rundir(rundir: str | os.PathLike | None) -> Path:
    """A fresh private directory for one server's socket and stderr."""
    if rundir is not None:
        Path(rundir).mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="s", dir=rundir))
    return Path(tempfile.mkdtemp(prefix="vmfs-"))


def _start(kind: str, argv_for_sock, export: str, rundir, timeout: float) -> Server:
    d = _rundir(rundir)
    sock = d / "s.sock"
    if len(str(sock).encode()) > 107:
        raise ServerError(f"socket path too long for AF_UNIX: {sock}")
    try:
        srv = Server(kind, argv_for_sock(sock), d, sock, export=export)
    except OSError:
        shutil.rmtree(d, ignore_errors=True)
        raise
    return srv.wait_ready(timeout)


# --------------------------------------------------------------------------- kinds

def qemu_nbd(image: str | os.PathLike, fmt: str = "raw", readonly: bool = False,
             shared: int = 4, extra: Sequence[str] = (), *, name: str | None = None,
             cache: str = "writeback", discard: str | None = None, bitmap: str | None = None,
             rundir=None, timeout: float = START_TIMEOUT) -> Server:
    """qemu-nbd serving IMAGE.  With shared > 1 qemu-nbd advertises multi-conn.

    Note: qemu rounds a raw image's size up to a multiple of 512 bytes.
    """
    exe = require_tool("qemu-nbd")

    def argv(sock):
        a = [exe, "-t", "-e", str(shared), f"--cache={cache}", "-f", fmt, "-k", str(sock)]
        if readonly:
            a.append("-r")
        if name is not None:
            a += ["-x", name]
        if discard is not None:
            a.append(f"--discard={discard}")
        if bitmap is not None:
            a += ["-B", bitmap]
        return a + list(extra) + [os.fspath(image)]

    return _start("qemu-nbd", argv, name or "", rundir, timeout)


def nbdkit(plugin: str, *args: str, filters: Sequence[str] = (), readonly: bool = False,
           export: str = "", extra: Sequence[str] = (), rundir=None,
           timeout: float = START_TIMEOUT) -> Server:
    """nbdkit PLUGIN ARGS with FILTERS, foreground, exiting with its parent.

    ARGS are the plugin's and filters' key=value parameters, in nbdkit's order.
    EXPORT only sets the name in the returned URI (most plugins serve any name).
    """
    require_nbdkit(plugin, filters)
    exe = require_tool("nbdkit")

    def argv(sock):
        a = [exe, "-U", str(sock), "-f", "--exit-with-parent"]
        if readonly:
            a.append("-r")
        a += [f"--filter={f}" for f in filters]
        return a + list(extra) + [plugin] + [str(x) for x in args]

    return _start("nbdkit", argv, export, rundir, timeout)


def qsd_bitmap(image_qcow2: str | os.PathLike, bitmap: str | Sequence[str], *,
               export: str = "disk", rundir=None, timeout: float = START_TIMEOUT) -> Server:
    """qemu-storage-daemon exporting a qcow2 read-only, publishing its dirty bitmap(s).

    The node is opened read-only, so an enabled persistent bitmap can be exported as is
    (QEMU refuses to export an enabled bitmap only on a writable node); clients see it
    as the meta context ``qemu:dirty-bitmap:NAME``.  QEMU 7.2 takes the list as
    ``bitmaps.0=NAME`` in the --export keyval syntax.
    """
    exe = require_tool("qemu-storage-daemon")
    names = [bitmap] if isinstance(bitmap, str) else list(bitmap)
    img = os.path.abspath(os.fspath(image_qcow2))

    def argv(sock):
        exp = f"type=nbd,id=exp0,node-name=disk0,name={export},writable=off"
        exp += "".join(f",bitmaps.{i}={n}" for i, n in enumerate(names))
        return [exe,
                "--blockdev", f"driver=file,node-name=file0,filename={img},read-only=on",
                "--blockdev", "driver=qcow2,node-name=disk0,file=file0,read-only=on",
                "--nbd-server", f"addr.type=unix,addr.path={sock}",
                "--export", exp]

    return _start("qemu-storage-daemon", argv, export, rundir, timeout)


class ServerSet:
    """Owns servers started during one test and stops them all at teardown."""

    def __init__(self, rundir: str | os.PathLike | None = None):
        self.rundir = rundir
        self.servers: list[Server] = []

    def _add(self, srv: Server) -> Server:
        self.servers.append(srv)
        return srv

    def qemu_nbd(self, image, fmt="raw", readonly=False, shared=4, extra=(), **kw) -> Server:
        kw.setdefault("rundir", self.rundir)
        return self._add(qemu_nbd(image, fmt, readonly, shared, extra, **kw))

    def nbdkit(self, plugin, *args, **kw) -> Server:
        kw.setdefault("rundir", self.rundir)
        return self._add(nbdkit(plugin, *args, **kw))

    def qsd_bitmap(self, image_qcow2, bitmap, **kw) -> Server:
        kw.setdefault("rundir", self.rundir)
        return self._add(qsd_bitmap(image_qcow2, bitmap, **kw))

    def stop_all(self) -> list[Server]:
        """Stop every server; return those that needed SIGKILL (unless killed on purpose)."""
        stubborn = []
        for srv in reversed(self.servers):
            try:
                srv.stop()
            finally:
                if srv.needed_sigkill and not srv.killed_on_purpose:
                    stubborn.append(srv)
        self.servers.clear()
        return stubborn
