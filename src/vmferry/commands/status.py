"""`vmferry status NAME`: one VM's state as QEMU reports it."""
from __future__ import annotations

import argparse
import json

from vmferry.units import format_size
from vmferry.vm.state import StateDir


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="show one VM's state",
                       description="Show VM NAME's state (QMP query-status), pid, "
                                   "accelerator, sockets and log.")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vmferry.vm.process import vm_status   # asyncio, qemu.qmp: only here
    from vmferry.migration.journal import interrupted_line
    state = StateDir(args.state_dir)
    st = vm_status(state, args.name)
    note = interrupted_line(state, args.name)
    from vmferry.migration.presync import copies
    kept = copies(state, args.name)
    if args.json:
        print(json.dumps(dict(st.to_dict(), migration=note, copies=kept)), flush=True)
        return 0
    spec = st.spec
    rows = [("name", st.name), ("state", st.state), ("pid", st.pid or "-"),
            ("accel", st.accel or "-"), ("machine", spec.machine), ("cpus", spec.cpus),
            ("memory", format_size(spec.memory))]
    rows += [(f"disk{i}", f"{d.path} ({d.format}, {d.bus})") for i, d in enumerate(spec.disks)]
    rows += [("qmp", st.qmp_socket), ("log", st.log)]
    if note:
        rows.append(("migration", note))
    for node, c in kept.items():
        size = next((d for i, d in enumerate(st.spec.disks) if f"disk{i}" == node), None)
        part = ("copied, then only what changed" if not c["partial"] else
                "partly copied (as far as its image is written), then only what changed"
                if c["valid_below"] is None else
                f"copied from the start up to {format_size(c['valid_below'])}, then "
                f"only what changed")
        rows.append((f"{node} copy", f"{c['dest_path']} ({part}; 'vmferry presync "
                                     f"--discard' removes it)" if size else c["dest_path"]))
    for key, value in rows:
        print(f"{key + ':':9} {value}")
    return 0
