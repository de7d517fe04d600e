"""`vmferry run SPEC`: start the VM a spec file describes, in the state directory."""
from __future__ import annotations

import argparse

from vmferry.vm.qemu import ACCELS
from vmferry.vm.spec import load_spec
from vmferry.vm.state import StateDir


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help="start a VM from a TOML spec",
        description="Start the VM that SPEC (a TOML file) describes. QEMU keeps running "
                    "after this command returns; stop it with 'vmferry stop NAME'.")
    p.add_argument("spec", metavar="SPEC", help="the VM's TOML spec file")
    p.add_argument("--accel", choices=ACCELS,
                   help="kvm or tcg (default: kvm when /dev/kvm is usable)")
    p.add_argument("--paused", action="store_true",
                   help="start with the guest paused (QEMU -S), waiting for QMP 'cont'")
    p.add_argument("--incoming", metavar="URI",
                   help="wait for an incoming migration (QEMU -incoming URI, e.g. defer)")
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="seconds to wait for QEMU to answer QMP (default 30)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vmferry.vm.process import START_TIMEOUT, start_vm   # asyncio, qemu.qmp: only here
    spec = load_spec(args.spec)
    from vmferry.migration.journal import refuse_if_interrupted
    refuse_if_interrupted(StateDir(args.state_dir), spec.name)
    vm = start_vm(StateDir(args.state_dir), spec, incoming=args.incoming, accel=args.accel,
                  paused=args.paused,
                  timeout=START_TIMEOUT if args.timeout is None else args.timeout)
    print(f"started {vm.name} (pid {vm.pid}, {vm.accel})", flush=True)
    return 0
