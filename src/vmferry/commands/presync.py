"""`vmferry presync NAME DEST`: copy a running VM's disks to the destination
ahead of a migration; run it again to move only what changed since."""
from __future__ import annotations

import argparse

from vmferry.errors import UsageError
from vmferry.progress import make_reporter
from vmferry.units import format_size
from vmferry.vm.state import StateDir


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "presync", help="pre-seed a migration's destination disks while the VM runs",
        description="Copy the disks of running VM NAME to DEST (ssh://, tls:// or "
                    "local:///state-dir, as for migrate) and "
                    "leave a dirty bitmap on the source; a later 'vmferry migrate "
                    "--copy-storage-inc' moves only what the guest wrote since. Run it "
                    "again to refresh the destination with just the new delta.")
    p.add_argument("name", metavar="NAME")
    p.add_argument("dest", metavar="DEST")
    from vmferry.commands.migrate import add_disk_options, add_host_options
    add_disk_options(p, "presync")
    add_host_options(p, memory=False)
    p.add_argument("--discard", action="store_true",
                   help="remove the copy on DEST that presync (or an interrupted migration) "
                        "left, with its records and the source's dirty bitmap")
    p.add_argument("--progress", nargs="?", const="auto", default=None,
                   choices=["auto", "bar", "json"], help="show progress")
    from vmferry.commands.migrate import add_dry_run_options
    add_dry_run_options(p, "presync")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vmferry.migration.api import presync_vm
    from vmferry.migration.options import MigrateOptions
    from vmferry.commands.migrate import common_options
    opts = MigrateOptions(**common_options(args))
    if args.json and not args.dry_run:
        raise UsageError("--json goes with --dry-run (a presync's progress: --progress=json)")
    if args.dry_run:
        if args.discard:
            raise UsageError("--dry-run checks a presync: --discard has no dry run")
        from vmferry.commands.migrate import print_dry_run
        from vmferry.migration.api import dry_run_vm
        return print_dry_run(dry_run_vm(StateDir(args.state_dir), args.name, args.dest, opts,
                                        kind="presync"), args.json)
    if args.discard:
        from vmferry.migration.api import parse_destination
        from vmferry.migration.presync import discard
        from vmferry.vm.qmp import run_sync

        async def go() -> str:
            dest = parse_destination(args.dest)
            try:
                return await discard(StateDir(args.state_dir), args.name, dest, opts)
            finally:
                await dest.close()
        print(run_sync(go()), flush=True)
        return 0
    reporter = make_reporter(args.progress)
    try:
        result = presync_vm(StateDir(args.state_dir), args.name, args.dest, opts,
                            progress=lambda s: reporter.update(s.as_event("progress")))
    finally:
        reporter.close()
    n = len(result.disks)
    lanes = [path for path, moved in sorted(result.lanes.items()) if moved]
    print(f"presynced {args.name} ({result.kind}): {format_size(result.bytes_moved)} moved "
          f"for {n} disk{'s' if n != 1 else ''}"
          + (f" ({', '.join(lanes)})" if lanes else ""), flush=True)
    return 0
