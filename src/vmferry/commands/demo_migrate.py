"""The live-migration demo behind `vmferry demo`: a real guest, a real disk,
two state directories standing for two hosts."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from vmferry.commands.migrate import MigrationDisplay, summary
from vmferry.errors import VmferryError
from vmferry.guest import (build_guest, check_serial_log, find_qboot, guest_cmdline,
                           wait_for_pass)
from vmferry.migration.api import migrate_vm
from vmferry.migration.options import MigrateOptions
from vmferry.units import format_size
from vmferry.vm.process import start_vm, stop_all, stop_vm
from vmferry.vm.qemu import detect_accel
from vmferry.vm.spec import parse_spec
from vmferry.vm.state import StateDir


def _fill_disk(path: Path, size: int) -> None:
    """Half random data, half zeroes: a realistic mix for the mirror."""
    with open(path, "wb") as f:
        f.truncate(size)
        chunk = 4 << 20
        for off in range(0, size // 2, chunk):
            f.seek(off)
            f.write(os.urandom(min(chunk, size // 2 - off)))


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_migrate_demo(disk_size: int, progress: str | None) -> int:
    # SIGTERM or a closed terminal must still stop the demo's VMs (finally below)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    tmp = Path(tempfile.mkdtemp(prefix="vmf-demo-", dir="/tmp"))
    a, b = StateDir(tmp / "A"), StateDir(tmp / "B")
    try:
        kernel = build_guest(tmp / "guest")
        src_disk, dst_disk = tmp / "demo-src.raw", tmp / "demo-dst.raw"
        _fill_disk(src_disk, disk_size)
        log = tmp / "serial.log"
        # qboot starts a direct-boot kernel in well under a second; SeaBIOS can
        # take seconds where the host emulates real mode.
        qboot = find_qboot()
        # QEMU before 9.0 under TCG can miss pages dirtied through a cached
        # TLB entry during migration; the guest flushing its TLB avoids it.
        tcg = detect_accel() == "tcg"
        bios = f'extra_args = ["-bios", "{qboot}"]' if qboot else ""
        spec = parse_spec(f'''
name = "demo"
memory = "512M"
cpus = 1
kernel = "{kernel}"
cmdline = "{guest_cmdline(mem='256M', dirty='slow', rate='128M', tlbflush=tcg)}"
serial = "{log}"
{bios}
[[disks]]
path = "{src_disk}"
format = "raw"
''', source="built-in demo spec")
        vm = start_vm(a, spec)
        print(f"demo: started VM 'demo' ({vm.accel}): 512 MiB RAM, the guest rewriting "
              f"256 MiB of it at 128 MiB/s, a {format_size(disk_size)} disk", flush=True)
        before = wait_for_pass(log, 2, 60)
        print(f"demo: guest at memory pass {before}; migrating to {b.path} "
              f"with its disk", flush=True)
        display = MigrationDisplay(progress or "auto")
        try:
            info = migrate_vm(a, "demo", f"local://{b.path}",
                              MigrateOptions(disk_map={str(src_disk): str(dst_disk)},
                                             create_disks=True), progress=display)
        finally:
            display.close()
        print(summary(info), flush=True)
        last = wait_for_pass(log, check_serial_log(log.read_text())[0] + 2, 60)
        _, problems = check_serial_log(log.read_text())
        if problems:
            raise VmferryError(f"demo: the guest saw its memory damaged: {problems[0]}")
        print(f"demo: on the destination the guest went on to pass {last} with no lost "
              f"or torn page", flush=True)
        stop_vm(b, "demo", force=True)
        cmp = subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw",
                              str(src_disk), str(dst_disk)])
        if cmp.returncode != 0:
            raise VmferryError("demo: the destination disk differs from the source")
        print("demo: source and destination disks are identical (qemu-img compare)")
        return 0
    finally:
        stop_all(a, b, timeout=2)
        shutil.rmtree(tmp, ignore_errors=True)
