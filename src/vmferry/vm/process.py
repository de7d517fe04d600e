"""Starting, stopping and asking after QEMU processes of a state directory.

QEMU runs as a child in its own session (start_new_session), not with -daemonize:
it outlives the `vmferry run` that started it and ignores that terminal's Ctrl-C, yet
keeps writing stderr to qemu.log (-daemonize would point it at /dev/null, and
incoming-migration failures are only ever reported there).

Each function has an async form for callers that already run an event loop (the
migration orchestrator) and a blocking form for the CLI; the blocking forms also work
when called inside a running loop (qmp.run_sync), but they block it.
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from vmferry.errors import ConnectError, UsageError, VmferryError
from vmferry.vm.qemu import ACCELS, detect_accel, qemu_argv, qemu_binary, resolve_machine
from vmferry.vm.qmp import qmp_session, run_sync
from vmferry.vm.spec import VMSpec
from vmferry.vm.state import StateDir, pid_alive

START_TIMEOUT = 30.0        # QEMU up and answering QMP; TCG on a loaded host is slow
QMP_TIMEOUT = 3.0           # one status query; QEMU answers in milliseconds when healthy
QUIT_GRACE = 5.0            # after "quit" / SIGTERM, before the next, harder step

# Children started by this process, kept referenced so that a Popen garbage-collected
# while QEMU runs does not warn; pid_alive() reaps them when they exit.
_CHILDREN: dict[int, subprocess.Popen] = {}


class VMStartError(VmferryError):
    """QEMU did not start, or did not answer QMP in time; nothing was left running."""


@dataclass(frozen=True)
class VMProcess:
    """A QEMU that start_vm left running."""
    name: str
    pid: int
    accel: str                  # "kvm" | "tcg"
    spec: VMSpec                # as saved: machine type pinned ("pc-q35-7.2")
    dir: Path
    qmp_socket: Path            # for programs (the orchestrator): QMP, free for you
    cli_socket: Path            # used by vmferry status/list/stop
    log: Path                   # QEMU's stderr
    incoming: Optional[str] = None
    argv: tuple[str, ...] = ()


@dataclass(frozen=True)
class VMStatus:
    name: str
    state: str                  # "stopped", "unresponsive", or QMP's status: "running",
                                # "paused", "inmigrate", "postmigrate", "prelaunch", ...
    pid: Optional[int]
    accel: Optional[str]        # None when stopped or unresponsive
    spec: VMSpec
    dir: Path
    qmp_socket: Path
    cli_socket: Path
    log: Path

    @property
    def running(self) -> bool:
        """Whether a QEMU process exists (the guest may still be paused)."""
        return self.pid is not None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for key in ("dir", "qmp_socket", "cli_socket", "log"):
            d[key] = str(d[key])
        return d


@dataclass(frozen=True)
class StopResult:
    name: str
    pid: Optional[int]          # None: it was not running
    how: str                    # "powerdown" (guest shut down), "quit" (QMP),
                                # "sigterm", "sigkill", "not-running"


# --------------------------------------------------------------------------- start

def start_vm(state: StateDir, spec: VMSpec, *, incoming: Optional[str] = None,
             accel: Optional[str] = None, paused: bool = False,
             timeout: float = START_TIMEOUT) -> VMProcess:
    """Start SPEC's QEMU and wait until its QMP answers; see start_vm_async."""
    return run_sync(start_vm_async(state, spec, incoming=incoming, accel=accel,
                                   paused=paused, timeout=timeout))


async def start_vm_async(state: StateDir, spec: VMSpec, *, incoming: Optional[str] = None,
                         accel: Optional[str] = None, paused: bool = False,
                         timeout: float = START_TIMEOUT) -> VMProcess:
    """Start SPEC's QEMU detached, wait until QMP answers, save the spec.

    INCOMING: QEMU's -incoming ("defer": the VM waits for migrate-incoming).  PAUSED:
    -S, the guest waits for "cont".  ACCEL: "kvm" or "tcg", default detect_accel().
    UsageError when a VM of that name runs or a file the spec names is missing;
    VMStartError (with the end of qemu.log) when QEMU fails or does not answer within
    TIMEOUT seconds.  On any failure no process, pidfile or socket is left, nor the VM
    folder when this start created it.
    """
    binary = qemu_binary()
    accel = _check_accel(accel)
    _preflight(spec)
    spec = dataclasses.replace(spec, machine=resolve_machine(spec.machine, binary))
    name = spec.name
    with state.lock():
        pid = state.read_pid(name)
        if pid is not None:
            raise UsageError(f"{name} is already running (pid {pid}): stop it first with "
                             f"'vmferry stop {name}'")
        new = not state.exists(name)
        state.clear_runtime(name)       # a QEMU that died leaves its pidfile behind
        vm_dir = state.make_vm_dir(name)
        qmp_sock, cli_sock = state.qmp_socket(name), state.cli_socket(name)
        pidfile, log_path = state.pidfile(name), state.log_path(name)
        argv = qemu_argv(spec, qmp_socket=qmp_sock, extra_qmp_sockets=[cli_sock],
                         incoming=incoming, accel=accel, pidfile=pidfile, paused=paused,
                         binary=binary)
        with open(log_path, "ab") as log:
            log.write(f"---- vmferry: starting {name} at "
                      f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}: {shlex.join(argv)}\n"
                      .encode())
            log_offset = log.tell()
            try:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=log, cwd=vm_dir, close_fds=True,
                                        start_new_session=True)
            except OSError as e:
                _discard(state, name, new)
                raise VMStartError(f"cannot run {argv[0]}: {e.strerror or e}") from e
        _CHILDREN[proc.pid] = proc
        # Our own pidfile now, so that a concurrent `run` sees this VM as running;
        # QEMU rewrites it (with the same pid) and holds a lock on it.
        _write_pidfile(pidfile, proc.pid)
    try:
        await _wait_for_qmp(proc, cli_sock, name, log_path, log_offset, timeout)
    except BaseException:
        _kill(proc)
        _discard(state, name, new)
        raise
    state.save_spec(spec)
    return VMProcess(name=name, pid=proc.pid, accel=accel, spec=spec, dir=vm_dir,
                     qmp_socket=qmp_sock, cli_socket=cli_sock, log=log_path,
                     incoming=incoming, argv=tuple(argv))


def _check_accel(accel: Optional[str]) -> str:
    if accel is None:
        return detect_accel()
    if accel not in ACCELS:
        raise UsageError(f"accel must be kvm or tcg, not {accel!r}")
    if accel == "kvm" and detect_accel() != "kvm":
        raise UsageError("accel kvm needs /dev/kvm opened read-write, which fails here: "
                         "use tcg")
    return accel


def _preflight(spec: VMSpec) -> None:
    """Missing files named by the spec, caught before QEMU's longer messages."""
    for i, d in enumerate(spec.disks):
        what = f"{spec.name}: disks[{i}].path {d.path}"
        if not os.path.exists(d.path):
            raise UsageError(f"{what} does not exist (create it, e.g. with qemu-img create)")
        if os.path.isdir(d.path):
            raise UsageError(f"{what} is a folder, not a disk image")
        mode = os.R_OK if d.readonly else os.R_OK | os.W_OK
        if not os.access(d.path, mode):
            raise UsageError(f"{what} is not {'readable' if d.readonly else 'readable and writable'}")
    for key in ("kernel", "initrd"):
        path = getattr(spec, key)
        if path is not None and not os.path.isfile(path):
            raise UsageError(f"{spec.name}: {key} {path} does not exist")
    if spec.serial is not None and not os.path.isdir(os.path.dirname(spec.serial)):
        raise UsageError(f"{spec.name}: serial {spec.serial}: folder "
                         f"{os.path.dirname(spec.serial)} does not exist")


async def _wait_for_qmp(proc: subprocess.Popen, sock: Path, name: str, log: Path,
                        log_offset: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        status = proc.poll()
        if status is not None:
            raise VMStartError(f"QEMU for {name} exited with status {status}: "
                               f"{_log_tail(log, log_offset)}")
        left = deadline - time.monotonic()
        if left <= 0:
            raise VMStartError(f"QEMU for {name} did not answer QMP within {timeout:g} s: "
                               f"{_log_tail(log, log_offset)}")
        if sock.exists():
            try:
                async with qmp_session(sock, timeout=left) as qmp:
                    await qmp.execute("query-status", timeout=left)
                return
            except ConnectError:
                pass            # not listening yet, or exited: the next round tells
        await asyncio.sleep(0.02)


_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT[\d:.]+Z ")


def _log_tail(log: Path, offset: int, lines: int = 3) -> str:
    """The end of what QEMU wrote since OFFSET, as one line; errors before warnings."""
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return "(no qemu.log)"
    got = [_TIMESTAMP.sub("", l).strip() for l in text.splitlines() if l.strip()]
    errors = [l for l in got if "warning:" not in l]
    tail = " / ".join((errors or got)[-lines:]) or "(nothing in qemu.log)"
    return tail if len(tail) <= 600 else "..." + tail[-597:]


def _write_pidfile(path: Path, pid: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{pid}\n")
    os.replace(tmp, path)


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    _CHILDREN.pop(proc.pid, None)


def _discard(state: StateDir, name: str, new: bool) -> None:
    if new:
        state.remove(name)
    else:
        state.clear_runtime(name)


# --------------------------------------------------------------------------- stop

def stop_vm(state: StateDir, name: str, *, timeout: float = 10.0,
            force: bool = False) -> StopResult:
    """Stop NAME's QEMU; see stop_vm_async."""
    return run_sync(stop_vm_async(state, name, timeout=timeout, force=force))


async def stop_vm_async(state: StateDir, name: str, *, timeout: float = 10.0,
                        force: bool = False) -> StopResult:
    """Stop NAME's QEMU, the gentlest way that works:

    1. a running guest gets an ACPI power button press (QMP system_powerdown) and
       TIMEOUT seconds to power off (skipped with FORCE, or when the guest is paused
       or QMP does not answer: nobody would act on it);
    2. QMP "quit": QEMU exits at once, flushing its disks;
    3. SIGTERM (QEMU exits cleanly on it), then SIGKILL.

    The pidfile and sockets are removed; spec.toml and qemu.log stay (the VM is now
    "stopped").  UsageError if the state directory has no VM NAME.
    """
    rec = state.load(name)
    pid, marker = rec.pid, rec.pidfile
    if pid is None:
        with state.lock():
            if state.read_pid(name) is None:
                state.clear_runtime(name)
        return StopResult(name, None, "not-running")

    how = ""
    if not force:
        status = await _qmp_status(rec.cli_socket)
        if status == "running" and await _qmp_try(rec.cli_socket, "system_powerdown"):
            if await _wait_exit(pid, marker, timeout):
                how = "powerdown"
    if not how:
        await _qmp_try(rec.cli_socket, "quit")
        if await _wait_exit(pid, marker, QUIT_GRACE):
            how = "quit"
    for sig, label in ((signal.SIGTERM, "sigterm"), (signal.SIGKILL, "sigkill")):
        if how:
            break
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
        if await _wait_exit(pid, marker, QUIT_GRACE):
            how = label
    if not how:
        raise VmferryError(f"{name}'s QEMU (pid {pid}) is still there after SIGKILL "
                           f"(stuck in the kernel?); its pidfile was kept")
    _CHILDREN.pop(pid, None)
    with state.lock():
        if state.read_pid(name) is None:    # not a QEMU someone started meanwhile
            state.clear_runtime(name)
    return StopResult(name, pid, how)


async def _qmp_status(sock: Path, timeout: float = QMP_TIMEOUT) -> Optional[str]:
    try:
        async with qmp_session(sock, timeout=timeout) as qmp:
            return (await qmp.execute("query-status", timeout=timeout))["status"]
    except VmferryError:
        return None


async def _qmp_try(sock: Path, cmd: str, timeout: float = QMP_TIMEOUT) -> bool:
    """Send CMD; False if it could not be sent or QEMU refused it."""
    try:
        async with qmp_session(sock, timeout=timeout) as qmp:
            await qmp.execute(cmd, timeout=timeout)
        return True
    except ConnectError:
        # "quit" may hang up before its answer arrives: it was still delivered
        return cmd == "quit"
    except VmferryError:
        return False


async def _wait_exit(pid: int, marker: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid, marker):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.05)
    return True


# --------------------------------------------------------------------------- status

def vm_status(state: StateDir, name: str, *, timeout: float = QMP_TIMEOUT) -> VMStatus:
    return run_sync(vm_status_async(state, name, timeout=timeout))


async def vm_status_async(state: StateDir, name: str, *,
                          timeout: float = QMP_TIMEOUT) -> VMStatus:
    """NAME's state from its pidfile and, when it runs, QMP query-status/query-kvm
    (over the CLI socket, so a session held on qmp.sock does not block it)."""
    rec = state.load(name)
    state_name, accel = "stopped", None
    if rec.pid is not None:
        try:
            async with qmp_session(rec.cli_socket, timeout=timeout) as qmp:
                state_name = (await qmp.execute("query-status", timeout=timeout))["status"]
                kvm = await qmp.execute("query-kvm", timeout=timeout)
                accel = "kvm" if kvm.get("enabled") else "tcg"
        except VmferryError:
            state_name = "unresponsive"
    return VMStatus(name=name, state=state_name, pid=rec.pid, accel=accel, spec=rec.spec,
                    dir=rec.dir, qmp_socket=rec.qmp_socket, cli_socket=rec.cli_socket,
                    log=rec.log)


def all_statuses(state: StateDir, *, timeout: float = QMP_TIMEOUT) -> list[VMStatus]:
    """vm_status of every VM of STATE, asked concurrently."""
    async def gather() -> list[VMStatus]:
        return list(await asyncio.gather(*(vm_status_async(state, n, timeout=timeout)
                                           for n in state.names())))
    return run_sync(gather())


__all__ = ["VMProcess", "VMStatus", "StopResult", "VMStartError", "start_vm",
           "start_vm_async", "stop_vm", "stop_vm_async", "vm_status", "vm_status_async",
           "all_statuses"]
