"""`vmferry recover NAME|--all`: resolve a migration or presync whose vmferry
process died (see migration/recover.py for the decision table)."""
from __future__ import annotations

import argparse

from vmferry.errors import UsageError, VmferryError
from vmferry.vm.state import StateDir


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "recover", help="finish or undo a migration whose vmferry process died",
        description="Bring VM NAME's interrupted migration or presync (its vmferry process "
                    "was killed, or the machine it ran on went down) to exactly one "
                    "running guest: rolled back before the point of no return, completed "
                    "after it; if the destination cannot be asked whether it runs the guest, "
                    "nothing changes and the guest stays paused.")
    p.add_argument("name", metavar="NAME", nargs="?")
    p.add_argument("--all", action="store_true",
                   help="every interrupted migration of the state directory")
    p.add_argument("--resume-source", action="store_true",
                   help="you checked that the destination does not run the guest: roll "
                        "back and resume it here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if bool(args.name) == bool(args.all):
        raise UsageError("recover takes a VM NAME or --all")
    if args.all and args.resume_source:
        raise UsageError("--resume-source is for one VM: name it")
    from vmferry.migration import recover as rec   # asyncio, qemu.qmp: only here
    from vmferry.vm.qmp import run_sync
    state = StateDir(args.state_dir)
    if args.all:
        results = run_sync(rec.recover_all(state))
        for name, line, ok in results:
            print(line if ok else f"{name}: not resolved: {line}", flush=True)
        if not results:
            print(f"nothing to recover in {state.path}", flush=True)
        if not all(ok for _, _, ok in results):
            raise VmferryError("some migrations were not resolved (see above)")
        return 0
    print(run_sync(rec.recover(state, args.name, resume_source=args.resume_source)),
          flush=True)
    return 0
