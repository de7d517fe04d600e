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

def nbd_probe(sock, timeout: float = 2.0) -> None:
    """One clean NBD handshake on SOCK: read the newstyle greeting, then NBD_OPT_ABORT.

    A bare connect()+close() makes both qemu-nbd and nbdkit log a handshake error, so
    the probe speaks just enough protocol to leave politely.  Raises OSError while the
    server is not ready (no socket yet, refused, or not an NBD newstyle greeting).
    """
    family = socket.AF_INET if isinstance(sock, tuple) else socket.AF_UNIX
    with socket.socket(family, socket.SOCK_STREAM) as s:
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

try:    # looked up once here: the child between fork and exec must not dlopen anything
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _prctl = None


def _set_pdeathsig() -> None:     # runs in the child between fork and exec
    """SIGTERM the server if the test process dies without stopping it (qemu-nbd and
    qemu-storage-daemon have no --exit-with-parent of their own)."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


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
        self.tcp: tuple[str, int] | None = None     # (host, port) of a TCP server
        self.stderr_path = rundir / f"{kind}.stderr"
        self.needed_sigkill = False
        self.killed_on_purpose = False
        self._stderr = open(self.stderr_path, "wb")
        try:
            # cwd: anything a server drops (a core file, say) lands in its own directory
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=self._stderr,
                                         cwd=rundir, preexec_fn=_set_pdeathsig)
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
                nbd_probe(self.tcp if self.tcp else self.sock)
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
        return a + list(extra) + [os.path.abspath(os.fspath(image))]

    return _start("qemu-nbd", argv, name or "", rundir, timeout)


def nbdkit(plugin: str, *args: str, filters: Sequence[str] = (), readonly: bool = False,
           export: str = "", extra: Sequence[str] = (), rundir=None,
           timeout: float = START_TIMEOUT) -> Server:
    """nbdkit PLUGIN ARGS with FILTERS, foreground, exiting with its parent.

    ARGS are the plugin's and filters' key=value parameters, in nbdkit's order; file
    names in them must be absolute (the server runs in its own directory).
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

    Both block nodes are opened read-only, so the enabled persistent bitmap that
    qemu-img/qemu-io left in the image can be exported as it is; clients see it as the
    meta context ``qemu:dirty-bitmap:NAME``.  Checked with QEMU 7.2:
      - a read-only export of a *writable* node refuses an enabled bitmap ("Enabled
        bitmap 'NAME' incompatible with readonly export"), and opening the image
        read-write can leave the bitmap marked in-use ("inconsistent") if the daemon
        dies - so the image is never opened read-write here;
      - the list is spelled ``bitmaps.0=NAME`` in --export's keyval syntax; the
        ``bitmap=NAME`` of ``--help`` is rejected ("Parameter 'bitmap' is unexpected").
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


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the server binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def nbdkit_tcp(plugin: str, *args: str, filters: Sequence[str] = (), readonly: bool = False,
               export: str = "", rundir=None, timeout: float = START_TIMEOUT) -> Server:
    """nbdkit on 127.0.0.1:PORT instead of a Unix socket; ``uri`` is nbd://127.0.0.1:PORT/."""
    require_nbdkit(plugin, filters)
    exe = require_tool("nbdkit")
    host = "127.0.0.1"
    last: Exception | None = None
    for _ in range(5):                       # another process may grab the port first
        port = free_tcp_port(host)
        d = _rundir(rundir)
        argv = [exe, "-i", host, "-p", str(port), "-f", "--exit-with-parent"]
        if readonly:
            argv.append("-r")
        argv += [f"--filter={f}" for f in filters] + [plugin] + [str(x) for x in args]
        srv = Server("nbdkit", argv, d, d / "unused.sock", export=export)
        srv.tcp = (host, port)
        srv.uri = f"nbd://{host}:{port}/{quote(export, safe='')}"
        try:
            return srv.wait_ready(timeout)
        except ServerError as e:
            last = e
            if "Address already in use" not in str(e):
                raise
    raise ServerError(f"no free TCP port for nbdkit: {last}")


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

    def nbdkit_tcp(self, plugin, *args, **kw) -> Server:
        kw.setdefault("rundir", self.rundir)
        return self._add(nbdkit_tcp(plugin, *args, **kw))

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
