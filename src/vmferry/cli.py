"""The `vmferry` command: argument parsing, and one place that turns
errors into one line on stderr and an exit status."""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import NoReturn, Optional, Sequence

from vmferry.errors import Cancelled, VmferryError
from vmferry.vm.default_dir import default_state_dir

# Each command and the module of vmferry.commands that defines it, in --help's
# order.  A run imports only its own command's module: `vmferry copy` need not
# load what migrations and VMs use (half its start-up, about 50 ms).
_MODULES = {"copy": "copy", "demo": "demo", "run": "run", "list": "list",
            "status": "status", "stop": "stop", "migrate": "migrate",
            "jobinfo": "migrate", "abort": "migrate", "presync": "presync",
            "recover": "recover", "agent": "agent"}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, like every other error."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"vmferry: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(2)


def _version() -> str:
    from vmferry import __version__    # one place; pyproject reads it too
    return __version__


class _Versions(argparse.Action):
    """--version: vmferry's, and those of the QEMU and libnbd it found, which
    decide what a migration can do (and what a bug report needs)."""

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> NoReturn:
        lines = [f"vmferry {_version()}"]
        try:
            from vmferry.vm.qemu import qemu_binary, qemu_version
            qemu = qemu_binary()
            lines.append(f"QEMU {qemu_version(qemu) or '(unknown version)'} ({qemu})")
        except VmferryError as e:
            lines.append(f"QEMU: {e}")
        try:
            from vmferry import _engine
            lines.append(f"libnbd {_engine.libnbd_version()}")
        except ImportError as e:
            lines.append(f"libnbd: the engine cannot load ({e})")
        print("\n".join(lines), flush=True)
        raise SystemExit(0)


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The whole CLI's parser, or with COMMAND (one of _MODULES) that command's
    alone, which is all parsing its arguments needs."""
    parser = _Parser(prog="vmferry",
                     description="Live-migrate QEMU VMs and move disk data, fast.")
    parser.add_argument("--version", action=_Versions, nargs=0,
                        help="the versions of vmferry and of the QEMU and libnbd it uses")
    parser.add_argument("--state-dir", type=Path, default=default_state_dir(), metavar="DIR",
                        help="where VMs keep their spec, sockets, pid and log (default: "
                             "$VMFERRY_STATE_DIR, else /var/lib/vmferry for root, else "
                             "~/.local/state/vmferry; now %(default)s)")
    parser.add_argument("-c", "--connect", metavar="URI",
                        help="run the command on another host, as virsh -c: "
                             "ssh://[USER@]HOST[:PORT][/STATE-DIR] (vmferry there, through "
                             "ssh), tls://HOST[:PORT] (an agent run with --allow-control), "
                             "or local:///STATE-DIR (as --state-dir)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    modules = [_MODULES[command]] if command in _MODULES else dict.fromkeys(_MODULES.values())
    for name in modules:
        importlib.import_module(f"vmferry.commands.{name}").add_parser(sub)
    return parser


# Options whose value is optional: a bare "--progress" must not swallow the
# next argument (SRC) as its value, so it becomes "--progress=auto".
_OPTIONAL_VALUE = {"--progress": "--progress=auto", "--verbose": "--verbose=auto"}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = [_OPTIONAL_VALUE.get(a, a) for a in argv]
    command = command_argv(argv)
    args = build_parser(command[0] if command else None).parse_args(argv)
    args.command_argv = command
    globals_ = argv[:len(argv) - len(args.command_argv)]
    args.state_dir_given = any(a.split("=")[0] == "--state-dir" for a in globals_)
    try:
        if args.connect:
            from vmferry.commands import connect
            return connect.run(args)
        return args.func(args)
    except KeyboardInterrupt:
        sys.stderr.write("vmferry: cancelled\n")
        return 130
    except Cancelled as e:
        sys.stderr.write(f"vmferry: {e}\n")
        return e.exit_code
    except VmferryError as e:
        sys.stderr.write(f"vmferry: error: {e}\n")
        return e.exit_code
    except BrokenPipeError:
        return 1
    except OSError as e:
        # what the system refused (a read-only or unreadable state directory, a
        # socket): one line like every other error, never a traceback
        sys.stderr.write(f"vmferry: error: {os_error(e)}\n")
        return 1


# the global options that take a value (everything before the command)
_GLOBAL_VALUES = ("--state-dir", "--connect", "-c")


def command_argv(argv: list[str]) -> list[str]:
    """ARGV from the command on: what another vmferry (a detached migration,
    or vmferry on the host --connect names) is to run."""
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 1 if "=" in argv[i] or argv[i] not in _GLOBAL_VALUES else 2
    return argv[i:]


def os_error(e: OSError) -> str:
    """An OSError as one line naming what failed: 'PATH: Permission denied'."""
    what = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    reason = e.strerror or str(e) or type(e).__name__
    return f"{what}: {reason}" if what else reason


if __name__ == "__main__":
    sys.exit(main())
