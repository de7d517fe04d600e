"""`vmferry list`: the VMs of the state directory, running or not."""
from __future__ import annotations

import argparse
import json
import os

from vmferry.units import format_size
from vmferry.vm.state import StateDir


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list VMs and their state",
                       description="List the VMs of the state directory: name, state, "
                                   "pid, memory and disks.")
    p.add_argument("--json", action="store_true", help="a JSON array on stdout")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vmferry.vm.process import all_statuses   # asyncio, qemu.qmp: only here
    from vmferry.migration.journal import interrupted_line
    state = StateDir(args.state_dir)
    statuses = all_statuses(state)
    notes = {s.name: interrupted_line(state, s.name) for s in statuses}
    if args.json:
        print(json.dumps([dict(s.to_dict(), migration=notes[s.name]) for s in statuses]),
              flush=True)
        return 0
    rows = [("NAME", "STATE", "PID", "MEMORY", "DISKS")]
    for s in statuses:
        rows.append((s.name, s.state, str(s.pid or "-"), format_size(s.spec.memory),
                     ",".join(os.path.basename(d.path) for d in s.spec.disks) or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    for name, note in notes.items():
        if note:
            print(f"{name}: {note}")
    return 0
