"""A migration that outlives whoever started it: `migrate --detach` and
`jobinfo --follow`.

`vmferry --connect ssh://src migrate ...` (p2p from a management machine)
runs `migrate --detach` on the source host: the migration runs in a process
of its own session there, and the command only follows it, so a dropped
management connection (SIGHUP) ends the follower, never the migration.
Ctrl-C (SIGINT) or SIGTERM of the follower aborts the migration, as it
would a migration in the foreground, and follows it to its end.
`jobinfo --follow NAME` attaches to a running migration from anywhere.

The detached process writes what the foreground command would print to
STATE/NAME/migrate.log; a follower ends with that last line and the same
exit status.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any, Optional

from vmferry.errors import UsageError
from vmferry.vm.state import StateDir, pid_alive

LOG = "migrate.log"
POLL = 0.2
START_TIMEOUT = 60.0
_EXIT = {"completed": 0, "failed": 1, "cancelled": 130}


def child_argv(argv: list[str]) -> list[str]:
    """The command line of the detached migration: ARGV without --detach and
    the progress options (nobody watches its output but the log)."""
    return [a for a in argv if a != "--detach"
            and not a.startswith(("--progress", "--verbose"))]


def start(state: StateDir, name: str, argv: list[str], mode: Optional[str]) -> int:
    """Run the migration ARGV describes in a session of its own; follow it."""
    from vmferry.commands.migrate import job_file
    state.vm_dir(name).mkdir(parents=True, exist_ok=True)
    path = job_file(state, name)
    before = path.stat().st_mtime_ns if path.exists() else None
    log = state.vm_dir(name) / LOG
    with open(log, "wb") as out:
        child = subprocess.Popen([sys.executable, "-m", "vmferry", "--state-dir",
                                  str(state.path), *child_argv(argv)],
                                 stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                 start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT
    while not _started(path, before, child.pid):
        if child.poll() is not None or time.monotonic() > deadline:
            # it failed before its job began (a usage error, a VM not running)
            if child.poll() is None:
                child.terminate()
            child.wait()
            sys.stderr.write(_last_line(log, "vmferry: error: the migration did not start")
                             + "\n")
            return child.returncode or 1
        time.sleep(POLL / 4)
    return follow(state, name, mode, child)


def _started(path: Any, before: Optional[int], pid: int) -> bool:
    from vmferry.migration.job import JobInfo
    try:
        if before is not None and path.stat().st_mtime_ns == before:
            return False
        return JobInfo.load(path).pid == pid
    except (OSError, ValueError, TypeError):
        return False


def _last_line(log: Any, default: str) -> str:
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return default
    return lines[-1] if lines else default


def follow(state: StateDir, name: str, mode: Optional[str],
           child: Optional[subprocess.Popen] = None) -> int:
    """Show NAME's migration as the foreground command would until it ends;
    the same last line and exit status.  Ctrl-C aborts it; a hang-up leaves
    it running."""
    from vmferry.commands.migrate import MigrationDisplay, job_file, print_done
    from vmferry.migration.job import JobInfo
    path = job_file(state, name)
    if not path.exists():
        raise UsageError(f"{name} has no migration job to follow")
    info = JobInfo.load(path)
    aborting = False

    def abort(signum: int, frame: Any) -> None:
        nonlocal aborting
        if not aborting and pid_alive(info.pid):
            aborting = True
            os.kill(info.pid, signal.SIGTERM)

    def hang_up(signum: int, frame: Any) -> None:
        os._exit(129)          # nobody to tell; the migration goes on

    old = {s: signal.signal(s, h) for s, h in ((signal.SIGINT, abort),
                                                (signal.SIGTERM, abort),
                                                (signal.SIGHUP, hang_up))}
    display = MigrationDisplay(mode)
    try:
        while True:
            info = JobInfo.load(path)
            if info.status == "running":
                if not pid_alive(info.pid):
                    break
                info.tick()
                display(info)
                time.sleep(POLL)
                continue
            break
    finally:
        display.close()
        for s, h in old.items():
            signal.signal(s, h)
    if child is not None:
        child.wait()
    log = state.vm_dir(name) / LOG
    if info.status == "running":        # its process died mid-way
        sys.stderr.write(f"vmferry: error: the migration of {name} was interrupted (process "
                         f"gone): run 'vmferry recover {name}'\n")
        return 1
    code = child.returncode if child is not None else _EXIT.get(info.status, 1)
    if info.status == "completed":
        print_done(info, mode)
        return code
    fallback = ("vmferry: " if info.status == "cancelled" else "vmferry: error: ") + \
        (info.error or info.status)
    line = _last_line(log, fallback) if log.exists() and \
        log.stat().st_mtime >= info.started else fallback
    sys.stderr.write(line + "\n")
    return code
