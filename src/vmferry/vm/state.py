"""Where vmferry keeps its VMs: one folder per VM in a state directory.

    STATE_DIR/
      .lock               flock(2)ed while a VM is started or stopped
      web1/
        spec.toml         the spec it was last started with (machine type pinned)
        qemu.pid          QEMU's pid, present while it runs
        qemu.log          QEMU's messages (-D): errors, warnings, migration failures
        qemu.log.1        the previous start's qemu.log
        qmp.sock          QMP for programs (the migration orchestrator)
        qmp-cli.sock      QMP for vmferry's own CLI (status, list, stop)

A Unix socket path must fit in sun_path (107 bytes and a NUL).  When STATE_DIR is too
deep for that, the two sockets go to a short private folder instead,
$XDG_RUNTIME_DIR/vmferry/HASH/ or /tmp/vmferry-UID/HASH/ (HASH from the VM folder's
path), so every path stays derivable from the state directory alone.

The default state directory is $VMFERRY_STATE_DIR, else /var/lib/vmferry for root,
else $XDG_STATE_HOME/vmferry (~/.local/state/vmferry).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import stat
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Iterator, Optional

from vmferry.errors import UsageError, VmferryError
from vmferry.vm.default_dir import default_state_dir
from vmferry.vm.spec import NAME_RE, VMSpec, load_spec

# event loop -> state directory -> asyncio.Lock (see StateDir.alock)
_LOOP_LOCKS: "weakref.WeakKeyDictionary[object, dict[str, object]]" = \
    weakref.WeakKeyDictionary()

SUN_PATH_MAX = 107          # sizeof(sockaddr_un.sun_path) - 1 for the NUL
QMP_SOCKET = "qmp.sock"
CLI_SOCKET = "qmp-cli.sock"
PIDFILE = "qemu.pid"
LOG = "qemu.log"
SPEC = "spec.toml"


def process_start(pid: int) -> Optional[int]:
    """PID's start time in clock ticks since boot (/proc/PID/stat field 22):
    with the pid, it names one process even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def owner_record() -> dict[str, Any]:
    """This process, as a record names its owner (owner_alive reads it)."""
    return {"owner": os.getpid(), "owner_start": process_start(os.getpid()),
            "boot_id": boot_id()}


def owner_alive(rec: dict[str, Any]) -> bool:
    """Whether the process a record names as its owner still runs: that very
    process (its start time, where the record has one), on this boot, not
    another that got its pid since."""
    pid = rec.get("owner")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    if rec.get("boot_id") and rec["boot_id"] != boot_id():
        return False
    if not pid_alive(pid):
        return False
    return rec.get("owner_start") is None or process_start(pid) == rec["owner_start"]


def pid_alive(pid: int, marker: Optional[str | os.PathLike] = None) -> bool:
    """Whether PID is a live process (not a zombie) and, with MARKER, one whose
    arguments include MARKER verbatim: a recycled pid is not our QEMU."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        if fields[0] in (b"Z", b"X"):
            return False
        if marker is None:
            return True
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    except PermissionError:
        return True
    return b"\0" + os.fsencode(marker) + b"\0" in b"\0" + cmdline


@dataclass(frozen=True)
class VMRecord:
    """A VM of a state directory as the file system sees it (QMP status: vm_status)."""
    name: str
    dir: Path
    spec: VMSpec
    pid: Optional[int]          # the live QEMU, or None
    qmp_socket: Path
    cli_socket: Path
    pidfile: Path
    log: Path

    @property
    def state(self) -> str:
        """"running" while its QEMU process lives (whatever the guest does), else
        "stopped"."""
        return "running" if self.pid is not None else "stopped"


class StateDir:
    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(os.path.abspath(path))

    def __repr__(self) -> str:
        return f"StateDir({str(self.path)!r})"

    def vm_dir(self, name: str) -> Path:
        if not NAME_RE.fullmatch(name):
            raise UsageError(f"{name!r} is not a VM name: use letters, digits, '.', '_' "
                             f"and '-', starting with a letter or digit")
        return self.path / name

    def runtime_dir(self, name: str) -> Path:
        """The folder of NAME's sockets: its VM folder, or a short private one when
        that path would make a socket path too long for AF_UNIX."""
        vm_dir = self.vm_dir(name)
        if len(os.fsencode(vm_dir / CLI_SOCKET)) <= SUN_PATH_MAX:
            return vm_dir
        short = _short_runtime_base() / hashlib.sha256(os.fsencode(vm_dir)).hexdigest()[:16]
        if len(os.fsencode(short / CLI_SOCKET)) > SUN_PATH_MAX:
            raise UsageError(f"state directory {self.path} is too deep for Unix socket "
                             f"paths and {short.parent} is too: use a shorter --state-dir")
        return short

    def qmp_socket(self, name: str) -> Path:
        return self.runtime_dir(name) / QMP_SOCKET

    def cli_socket(self, name: str) -> Path:
        return self.runtime_dir(name) / CLI_SOCKET

    def pidfile(self, name: str) -> Path:
        return self.vm_dir(name) / PIDFILE

    def log_path(self, name: str) -> Path:
        return self.vm_dir(name) / LOG

    def spec_path(self, name: str) -> Path:
        return self.vm_dir(name) / SPEC

    def exists(self, name: str) -> bool:
        return self.spec_path(name).is_file()

    def names(self) -> list[str]:
        """Names of the VMs with a saved spec, sorted."""
        try:
            entries = list(self.path.iterdir())
        except FileNotFoundError:
            return []
        except OSError as e:
            raise VmferryError(f"cannot read state directory {self.path}: "
                               f"{e.strerror or e}") from e
        return sorted(p.name for p in entries
                      if NAME_RE.fullmatch(p.name) and (p / SPEC).is_file())

    def save_spec(self, spec: VMSpec) -> Path:
        """Write spec.toml atomically (a reader never sees half a file)."""
        path = self.spec_path(spec.name)
        self.make_vm_dir(spec.name)
        tmp = path.with_name(SPEC + ".tmp")
        tmp.write_text(spec.to_toml(), encoding="utf-8")
        os.replace(tmp, path)
        return path

    def load_spec(self, name: str) -> VMSpec:
        if not self.exists(name):
            raise self._unknown(name)
        return load_spec(self.spec_path(name))

    def read_pid(self, name: str) -> Optional[int]:
        """The pid of NAME's live QEMU, or None (no pidfile, or a dead or foreign pid)."""
        pidfile = self.pidfile(name)
        try:
            pid = int(pidfile.read_text().strip() or "0")
        except (FileNotFoundError, ValueError):
            return None
        return pid if pid > 0 and pid_alive(pid, pidfile) else None

    def load(self, name: str) -> VMRecord:
        """NAME's record; UsageError if the state directory has no such VM."""
        spec = self.load_spec(name)
        return VMRecord(name=name, dir=self.vm_dir(name), spec=spec,
                        pid=self.read_pid(name), qmp_socket=self.qmp_socket(name),
                        cli_socket=self.cli_socket(name), pidfile=self.pidfile(name),
                        log=self.log_path(name))

    def records(self) -> list[VMRecord]:
        return [self.load(n) for n in self.names()]

    def make_vm_dir(self, name: str) -> Path:
        d = self.vm_dir(name)
        # 0700: the QMP sockets inside give full control of the VM
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        d.mkdir(mode=0o700, exist_ok=True)
        run = self.runtime_dir(name)
        if run != d:
            run.mkdir(mode=0o700, exist_ok=True)
        return d

    def clear_runtime(self, name: str) -> None:
        """Remove what only a running QEMU needs: pidfile and sockets (and the short
        socket folder).  Keeps spec.toml and qemu.log."""
        for p in (self.pidfile(name), self.qmp_socket(name), self.cli_socket(name)):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        run = self.runtime_dir(name)
        if run != self.vm_dir(name):
            with contextlib.suppress(OSError):
                run.rmdir()

    def remove(self, name: str) -> None:
        """Delete NAME's folder entirely (its QEMU must not be running)."""
        self.clear_runtime(name)
        shutil.rmtree(self.vm_dir(name), ignore_errors=True)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Serialise check-then-act sequences (is it running? start it) across
        processes sharing this state directory.  Blocks: async code uses alock()."""
        fd = self._take_lock()
        try:
            yield
        finally:
            os.close(fd)

    @contextlib.asynccontextmanager
    async def alock(self) -> AsyncIterator[None]:
        """lock() for coroutines, which may hold it across an await (start_vm
        holds it until QEMU has written its pidfile).  flock(2) is taken in a
        thread, and coroutines of one event loop queue on an asyncio.Lock
        first: a second coroutine blocking the loop on flock would otherwise
        wait forever for the first, which needs that loop to finish."""
        import asyncio
        loop = asyncio.get_running_loop()
        mine = _LOOP_LOCKS.setdefault(loop, {}).setdefault(str(self.path), asyncio.Lock())
        async with mine:
            fut = loop.run_in_executor(None, self._take_lock)
            try:
                fd = await asyncio.shield(fut)
            except asyncio.CancelledError:
                # the thread still gets the lock: release it when it does
                fut.add_done_callback(lambda f: f.cancelled() or f.exception() is not None
                                      or os.close(f.result()))
                raise
            try:
                yield
            finally:
                os.close(fd)

    def _take_lock(self) -> int:
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _unknown(self, name: str) -> UsageError:
        return UsageError(f"no VM named {name!r} in {self.path} (see 'vmferry list')")


def _short_runtime_base() -> Path:
    """A private folder with a short path, checked to be ours: /tmp is shared, and a
    folder planted there by someone else would hand them our QMP sockets."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isabs(xdg) and len(xdg) <= 48 and os.path.isdir(xdg):
        base = Path(xdg, "vmferry")
    else:
        base = Path(f"/tmp/vmferry-{os.geteuid()}")
    try:
        base.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(base)
    except OSError as e:
        raise VmferryError(f"cannot create socket folder {base}: {e.strerror or e}") from e
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise VmferryError(f"socket folder {base} is not a private folder of this user: "
                           f"remove it, or use a shorter --state-dir")
    return base


__all__ = ["StateDir", "VMRecord", "default_state_dir", "pid_alive", "SUN_PATH_MAX"]
