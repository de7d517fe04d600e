"""Starting, stopping and asking after QEMU processes of a state directory.

QEMU runs with -daemonize: the `qemu-system-x86_64` we spawn forks, its child
detaches (own session, parent init) and the parent exits once the VM is built, 0 or
with the error.  So QEMU outlives the `vmferry run` or orchestrator that started it,
is never our zombie, and a start's success is known without guessing.  With -D its
messages, including those after daemonizing (a failed incoming migration says why
only there), go to qemu.log; its pid comes from -pidfile.

Each function has an async form for callers that already run an event loop (the
migration orchestrator) and a blocking form for the CLI; the blocking forms also work
when called inside a running loop (qmp.run_sync), but they block it.
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from vmferry.errors import ConnectError, UsageError, VmferryError
from vmferry.vm.qemu import (ACCELS, detect_accel, qemu_argv, qemu_binary, resolve_machine,
                             unsupported_machine)
from vmferry.vm.qmp import qmp_session, run_sync
from vmferry.vm.spec import VMSpec
from vmferry.vm.state import StateDir, pid_alive

START_TIMEOUT = 30.0        # QEMU up and answering QMP; TCG on a loaded host is slow
QMP_TIMEOUT = 3.0           # one status query; QEMU answers in milliseconds when healthy
QUIT_GRACE = 5.0            # after "quit" / SIGTERM, before the next, harder step


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
    log: Path                   # QEMU's messages
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
    accel = check_accel(accel)
    preflight(spec)
    spec = dataclasses.replace(spec, machine=resolve_machine(spec.machine, binary))
    name = spec.name
    deadline = time.monotonic() + timeout
    # Held until QEMU has daemonized and written its pidfile, so that a concurrent
    # start of the same name sees it running.
    async with state.alock():
        pid = state.read_pid(name)
        if pid is not None:
            raise UsageError(f"{name} is already running (pid {pid}): stop it first with "
                             f"'vmferry stop {name}'")
        new = not state.exists(name)
        state.clear_runtime(name)       # a QEMU that was SIGKILLed leaves files behind
        vm_dir = state.make_vm_dir(name)
        qmp_sock, cli_sock = state.qmp_socket(name), state.cli_socket(name)
        pidfile, log = state.pidfile(name), state.log_path(name)
        if log.exists():
            os.replace(log, log.with_name(log.name + ".1"))    # -D truncates it
        argv = qemu_argv(spec, qmp_socket=qmp_sock, extra_qmp_sockets=[cli_sock],
                         incoming=incoming, accel=accel, pidfile=pidfile, paused=paused,
                         daemonize=True, logfile=log, binary=binary)
        try:
            pid = await _daemonize(argv, name, pidfile, log, deadline, timeout)
        except BaseException as e:
            _discard(state, name, new)
            if isinstance(e, VMStartError) and "unsupported machine type" in str(e):
                # QEMU's own line does not say which type (a pinned one is not
                # checked beforehand: see resolve_machine)
                raise unsupported_machine(spec.machine, binary) from e
            raise
    try:
        await _wait_for_qmp(pid, pidfile, cli_sock, name, log, deadline, timeout)
    except BaseException:
        _kill(pid, pidfile)
        _discard(state, name, new)
        raise
    state.save_spec(spec)
    return VMProcess(name=name, pid=pid, accel=accel, spec=spec, dir=vm_dir,
                     qmp_socket=qmp_sock, cli_socket=cli_sock, log=log,
                     incoming=incoming, argv=tuple(argv))


async def _daemonize(argv: list[str], name: str, pidfile: Path, log: Path,
                     deadline: float, timeout: float) -> int:
    """Run QEMU until its first process exits (VM built, or failed); the daemon's pid."""
    try:
        # stderr: what QEMU says before -D takes over (bad options); later all in log
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, close_fds=True,
                                start_new_session=True)
    except OSError as e:
        raise VMStartError(f"cannot run {argv[0]}: {e.strerror or e}") from e
    assert proc.stderr is not None
    # Should the daemon ever inherit the pipe, reading must still not wait for it.
    os.set_blocking(proc.stderr.fileno(), False)
    try:
        while proc.poll() is None:
            if time.monotonic() > deadline:
                raise VMStartError(f"QEMU for {name} did not start within {timeout:g} s: "
                                   f"{_log_tail(log)}")
            await asyncio.sleep(0.02)
    except BaseException:
        proc.kill()
        proc.wait()
        _kill_from_pidfile(pidfile)
        raise
    finally:
        try:
            early = (proc.stderr.read() or b"").decode(errors="replace")
        except BlockingIOError:
            early = ""
        proc.stderr.close()
    if proc.returncode != 0:
        raise VMStartError(f"QEMU for {name} exited with status {proc.returncode}: "
                           f"{_log_tail(log, early)}")
    pid = _read_pid(pidfile)
    if pid is None:
        raise VMStartError(f"QEMU for {name} started but wrote no pid to {pidfile}: "
                           f"{_log_tail(log, early)}")
    return pid


def _read_pid(pidfile: Path) -> Optional[int]:
    try:
        return int(pidfile.read_text().strip()) or None
    except (OSError, ValueError):
        return None


def check_accel(accel: Optional[str]) -> str:
    if accel is None:
        return detect_accel()
    if accel not in ACCELS:
        raise UsageError(f"accel must be kvm or tcg, not {accel!r}")
    if accel == "kvm" and detect_accel() != "kvm":
        raise UsageError("accel kvm needs /dev/kvm opened read-write, which fails here: "
                         "use tcg")
    return accel


def preflight(spec: VMSpec) -> None:
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


async def _wait_for_qmp(pid: int, pidfile: Path, sock: Path, name: str, log: Path,
                        deadline: float, timeout: float) -> None:
    # QEMU listens before it daemonizes: this normally succeeds at the first try
    while True:
        if not pid_alive(pid, pidfile):
            raise VMStartError(f"QEMU for {name} exited right after starting: "
                               f"{_log_tail(log)}")
        left = deadline - time.monotonic()
        if left <= 0:
            raise VMStartError(f"QEMU for {name} did not answer QMP within {timeout:g} s: "
                               f"{_log_tail(log)}")
        try:
            async with qmp_session(sock, timeout=left) as qmp:
                await qmp.execute("query-status", timeout=left)
            return
        except ConnectError:
            await asyncio.sleep(0.02)


_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT[\d:.]+Z ")


def _log_tail(log: Path, early: str = "", lines: int = 3) -> str:
    """The end of QEMU's messages (EARLY: its stderr) as one line; errors before
    warnings, so the reason is not crowded out by "host doesn't support" noise."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        text = ""
    got = [_TIMESTAMP.sub("", l).strip() for l in (early + "\n" + text).splitlines()
           if l.strip()]
    errors = [l for l in got if "warning:" not in l]
    tail = " / ".join((errors or got)[-lines:]) or "(QEMU printed nothing)"
    return tail if len(tail) <= 600 else "..." + tail[-597:]


def _kill_from_pidfile(pidfile: Path) -> None:
    pid = _read_pid(pidfile)
    if pid is not None:
        _kill(pid, pidfile)


def _kill(pid: int, pidfile: Path) -> None:
    """SIGKILL our QEMU PID (if it still is ours) and wait until it is gone."""
    if not pid_alive(pid, pidfile):
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while pid_alive(pid, pidfile) and time.monotonic() < deadline:
        time.sleep(0.01)


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


def stop_all(*states: StateDir, timeout: float = 5.0) -> None:
    """Force-stop every running VM of STATES, whatever fails: the teardown of
    demos, tests and benchmarks, which must leave no QEMU behind."""
    for state in states:
        try:
            names = state.names()
        except OSError:
            continue
        for name in names:
            if state.read_pid(name) is not None:
                try:
                    stop_vm(state, name, force=True, timeout=timeout)
                except VmferryError:
                    pass


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
    pid, marker, cli_socket = state.read_pid(name), state.pidfile(name), state.cli_socket(name)
    if pid is None and not state.exists(name):
        raise state._unknown(name)
    # A QEMU killed with its starter may have no spec.toml yet: it is stopped
    # all the same, by its pidfile.
    if pid is None:
        async with state.alock():
            if state.read_pid(name) is None:
                state.clear_runtime(name)
        return StopResult(name, None, "not-running")

    how = ""
    if not force:
        status = await _qmp_status(cli_socket)
        if status == "running" and await _qmp_try(cli_socket, "system_powerdown"):
            if await _wait_exit(pid, marker, timeout):
                how = "powerdown"
    if not how:
        await _qmp_try(cli_socket, "quit")
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
    async with state.alock():
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
