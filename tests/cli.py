"""Running vmferry as a user does, and what a user is owed back: one error
line on failure, JSON lines for programs, a wait with a deadline.  Every
test runs the CLI through here (migrate_helpers.Lab adds its state
directories and the test QEMU's environment)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any, Callable, Optional, Sequence

VMFERRY_TIMEOUT = 120     # seconds for one vmferry command


def env(base: Optional[dict] = None) -> dict:
    """The environment a command runs in: no debug output on its stderr, and
    no state directory but the one named on its command line."""
    out = dict(os.environ if base is None else base)
    for k in ("LIBNBD_DEBUG", "NBDKIT_DEBUG", "PYTHONWARNINGS", "VMFERRY_STATE_DIR"):
        out.pop(k, None)
    return out


def vmferry_argv(*args: Any) -> list[str]:
    return [sys.executable, "-m", "vmferry", *[os.fspath(a) for a in args]]


def run_vmferry(*args: Any, timeout: float = VMFERRY_TIMEOUT, cwd=None,
                environ: Optional[dict] = None) -> subprocess.CompletedProcess:
    """Run `python -m vmferry ARGS` with a timeout; text stdout/stderr captured."""
    try:
        return subprocess.run(vmferry_argv(*args), capture_output=True, text=True,
                              timeout=timeout, env=env(environ), cwd=cwd,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"vmferry {' '.join(map(str, args))} did not finish within "
                             f"{timeout} s; stderr so far: {e.stderr!r}") from None


def _default_sigint() -> None:       # runs in the child between fork and exec
    # A shell without job control starts background jobs with SIGINT ignored, and an
    # ignored signal stays ignored across exec: Python would then never raise
    # KeyboardInterrupt.  Give vmferry the disposition an interactive Ctrl-C finds.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def popen_vmferry(*args: Any, cwd=None, environ: Optional[dict] = None) -> subprocess.Popen:
    """Start `python -m vmferry ARGS` (SIGINT at its default disposition)."""
    return subprocess.Popen(vmferry_argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env(environ), cwd=cwd, stdin=subprocess.DEVNULL,
                            preexec_fn=_default_sigint)


def copy_ok(*args: Any, timeout: float = VMFERRY_TIMEOUT) -> subprocess.CompletedProcess:
    """`vmferry copy ARGS` must succeed: exit 0, a `copied ` summary, clean stderr."""
    cp = run_vmferry("copy", *args, timeout=timeout)
    assert cp.returncode == 0, (f"vmferry copy {' '.join(map(str, args))} exited "
                                f"{cp.returncode}\nstdout: {cp.stdout}\nstderr: {cp.stderr}")
    assert "Traceback" not in cp.stderr, cp.stderr
    if "--progress=json" not in args:
        assert any(l.startswith("copied ") for l in cp.stdout.splitlines()), \
            f"no 'copied ' summary line on stdout: {cp.stdout!r}"
    return cp


def assert_one_error_line(stderr: str, prefix: str = "vmferry: error: ") -> str:
    """stderr is exactly one line PREFIX..., no traceback; returns it."""
    assert "Traceback" not in stderr, f"Python traceback on stderr:\n{stderr}"
    lines = [l for l in stderr.splitlines() if l.strip()]
    assert len(lines) == 1, f"expected exactly one line on stderr, got {len(lines)}:\n{stderr}"
    assert lines[0].startswith(prefix), f"bad error line: {lines[0]!r}"
    assert len(lines[0]) > len(prefix) + 5, f"error line says nothing: {lines[0]!r}"
    return lines[0]


def assert_cli_error(cp: subprocess.CompletedProcess, codes: int | Sequence[int] = 1,
                     prefix: str = "vmferry: error: ") -> str:
    """A failed run: exit code in CODES, one PREFIX line, no summary."""
    codes = (codes,) if isinstance(codes, int) else tuple(codes)
    assert cp.returncode in codes, (f"exit {cp.returncode}, expected {codes}\n"
                                    f"stdout: {cp.stdout}\nstderr: {cp.stderr}")
    assert not any(l.startswith(("copied ", "migrated ")) for l in cp.stdout.splitlines()), \
        cp.stdout
    return assert_one_error_line(cp.stderr, prefix)


def parse_json_lines(stdout: str) -> list[dict]:
    out = []
    for line in stdout.splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                raise AssertionError(f"not a JSON line in --progress=json output: {line!r}")
    return out


def terminate_vmferry(p: subprocess.Popen) -> None:
    """Make sure a vmferry subprocess we started is gone (teardown of a failed test)."""
    if p.poll() is None:
        p.kill()
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def wait_for(predicate: Callable[[], Any], timeout: float, what: str,
             interval: float = 0.02, proc: Optional[subprocess.Popen] = None) -> Any:
    """Poll PREDICATE until it returns something true (returned); fail after
    TIMEOUT seconds, or as soon as PROC (a command that should be getting
    there) has ended."""
    deadline = time.monotonic() + timeout
    while True:
        v = predicate()
        if v:
            return v
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"vmferry exited ({proc.returncode}) before {what}: "
                                 f"{out}{err}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
