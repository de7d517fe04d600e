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
    p.add_argument("--direct", metavar="DEST",
                   help="with --connect: the migration was --direct, and DEST (as it "
                        "was named then) is reached through this machine, as it was")
    p.add_argument("--relayed", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if bool(args.name) == bool(args.all):
        raise UsageError("recover takes a VM NAME or --all")
    if args.all and args.resume_source:
        raise UsageError("--resume-source is for one VM: name it")
    if args.direct and not args.relayed:
        raise UsageError("--direct goes with --connect: 'vmferry --connect SOURCE-URI "
                         "recover NAME --direct DEST', on the machine that drove it")
    if args.relayed and not (args.direct and args.name):
        raise UsageError("--relayed is the management machine's (recover NAME --direct DEST)")
    from vmferry.migration import recover as rec   # asyncio, qemu.qmp: only here
    from vmferry.vm.qmp import run_sync
    state = StateDir(args.state_dir)
    if args.relayed:
        return _relayed(args, state)
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


def _relayed(args: argparse.Namespace, state: StateDir) -> int:
    """The source's side of `--connect SRC recover NAME --direct DEST`: stdin
    and stdout are the channel to DEST's agent through the management
    machine (commands/direct.py), which shows the outcome this sends."""
    import json
    import sys
    from vmferry.agent import transport
    from vmferry.commands.migrate import Unbreakable
    from vmferry.migration import recover as rec
    from vmferry.vm.qmp import run_sync
    relay = transport.take_stdio()
    sys.stdout, sys.stderr = Unbreakable(sys.stdout), Unbreakable(sys.stderr)
    line = run_sync(rec.recover(state, args.name, resume_source=args.resume_source,
                                relay=relay, relayed_dest=args.direct))
    print(json.dumps({"event": "recovered", "line": line}), file=sys.stderr, flush=True)
    return 0
