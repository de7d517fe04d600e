"""`vmferry stop NAME`: shut a VM down, gracefully unless told otherwise."""
from __future__ import annotations

import argparse

from vmferry.errors import UsageError, VmferryError
from vmferry.vm.state import StateDir

_HOW = {"powerdown": "guest powered off", "quit": "QEMU quit",
        "sigterm": "QEMU terminated", "sigkill": "QEMU killed"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stop", help="stop a running VM",
        description="Stop VM NAME: press its ACPI power button and wait, then quit QEMU, "
                    "then SIGTERM, then SIGKILL, until it is gone.")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--force", action="store_true",
                   help="don't ask the guest to shut down: quit QEMU at once")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S",
                   help="seconds the guest gets to power off (default 10)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vmferry.vm.process import stop_vm   # asyncio, qemu.qmp: only here
    if args.timeout < 0:
        raise UsageError(f"--timeout must not be negative, not {args.timeout:g}")
    result = stop_vm(StateDir(args.state_dir), args.name, timeout=args.timeout,
                     force=args.force)
    if result.pid is None:
        raise VmferryError(f"{args.name} is not running")
    print(f"stopped {result.name} (pid {result.pid}, {_HOW[result.how]})", flush=True)
    return 0
