"""The QEMU command line for a VMSpec.

Names are the contract between the two ends of a migration: the same spec gives the
same names on the source and the destination, whatever the disk paths are, so the
orchestrator can mirror node ``diskN`` of the source into the destination's export of
``diskN`` and the device state lands on the device with the same id.

    spec.disks[N]      protocol node  file-diskN   (driver file: filename, aio=threads,
                                                    cache.direct per cache mode)
                       format node    diskN        (driver raw|qcow2, file=file-diskN)
                       device id      vdN          virtio-blk-pci   (bus "virtio")
                                      hdN          ide-hd           (bus "ide")
                                      sdN          scsi-hd on scsi0 (bus "scsi"; one
                                                   virtio-scsi-pci controller, id scsi0)
    spec.nics[N]       netdev id      netN,  device id nicN  (type none: nothing)
    spec.serial        chardev id     serial0 on COM1 (file, append=on)
    QMP                one "-qmp" server per socket given (the VM's qmp.sock for
                       programs such as the migration orchestrator, qmp-cli.sock for
                       the CLI) so a long session on one never blocks the other

N is the disk's index in the spec, so with disks on mixed buses the ids are e.g. vd0,
sd1, hd2.  Cache modes map like -drive's: none = direct, writeback = host page cache,
writethrough/directsync = the device's write-cache off, unsafe = flushes ignored; a
disk with no cache mode gets "none", or "writeback" when its file system refuses
O_DIRECT (older tmpfs).
"""
from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from vmferry.errors import UsageError, VmferryError
from vmferry.vm.spec import MiB, DiskSpec, VMSpec

ACCELS = ("kvm", "tcg")

_DEVICE = {"virtio": ("virtio-blk-pci", "vd"), "ide": ("ide-hd", "hd"),
           "scsi": ("scsi-hd", "sd")}
_NIC_DEVICE = {"virtio": "virtio-net-pci", "e1000": "e1000", "rtl8139": "rtl8139"}
# cache mode -> (cache.direct, cache.no-flush, device write-cache)
_CACHE = {"none": (True, False, True), "writeback": (False, False, True),
          "writethrough": (False, False, False), "directsync": (True, False, False),
          "unsafe": (False, True, True)}


@dataclass(frozen=True)
class DiskNames:
    """The stable names of spec.disks[index] inside QEMU."""
    index: int
    node: str           # format node: what migration mirrors / exports ("disk0")
    file_node: str      # protocol node under it ("file-disk0")
    device: str         # guest device id ("vd0")
    disk: DiskSpec


def disk_names(spec: VMSpec) -> list[DiskNames]:
    return [DiskNames(i, f"disk{i}", f"file-disk{i}", _DEVICE[d.bus][1] + str(i), d)
            for i, d in enumerate(spec.disks)]


def qemu_binary() -> str:
    """$VMFERRY_QEMU, else qemu-system-x86_64 from PATH."""
    name = os.environ.get("VMFERRY_QEMU") or "qemu-system-x86_64"
    found = shutil.which(name)
    if found is None:
        raise UsageError(f"{name} not found: install qemu-system-x86 or set VMFERRY_QEMU")
    return found


def detect_accel() -> str:
    """"kvm" when /dev/kvm can be opened read-write (what QEMU needs), else "tcg"."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return "tcg"
    os.close(fd)
    return "kvm"


def qemu_version(binary: str) -> str:
    """"7.2.22" from BINARY --version; "" when it does not say."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                             timeout=10, stdin=subprocess.DEVNULL).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return ""
    return out[out.index("version") + 1] if "version" in out[:-1] else ""


def machine_supported(machine: str, binary: str) -> bool:
    """Whether BINARY has MACHINE's type (options after a comma aside)."""
    return machine.partition(",")[0] in _machine_types(binary)[1]


_VERSIONED = re.compile(r"pc-(q35|i440fx)-\d+\.\d+")


@functools.lru_cache(maxsize=None)
def _machine_types(binary: str) -> tuple[dict[str, str], frozenset[str]]:
    try:
        out = subprocess.run([binary, "-machine", "help"], capture_output=True, text=True,
                             timeout=30, stdin=subprocess.DEVNULL).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise VmferryError(f"cannot list machine types of {binary}: {e}") from e
    aliases: dict[str, str] = {}
    names: set[str] = set()
    for line in out.splitlines()[1:]:       # first line: "Supported machines are:"
        parts = line.split(None, 1)
        if not parts:
            continue
        names.add(parts[0])
        m = re.search(r"\(alias of ([^)\s]+)\)", line)
        if m:
            aliases[parts[0]] = m.group(1)
    return aliases, frozenset(names)


def resolve_machine(machine: str, binary: Optional[str] = None) -> str:
    """"q35" -> "pc-q35-7.2": an alias means the newest type of *this* QEMU, which may
    differ on the other host; the versioned type migrates between QEMU versions.
    Options after a comma are kept ("q35,hpet=off" -> "pc-q35-7.2,hpet=off")."""
    base, sep, opts = machine.partition(",")
    if _VERSIONED.fullmatch(base):
        # Already pinned (every incoming migration's is): listing the types costs
        # a QEMU run, and QEMU itself names a type it does not have.
        return machine
    binary = binary or qemu_binary()
    aliases, names = _machine_types(binary)
    if base not in names:
        raise unsupported_machine(machine, binary)
    return aliases.get(base, base) + sep + opts


def unsupported_machine(machine: str, binary: str) -> UsageError:
    base = machine.partition(",")[0]
    return UsageError(f"machine {base!r} is not supported by {binary} "
                      f"(see '{os.path.basename(binary)} -machine help')")


def supports_o_direct(path: str | os.PathLike) -> bool:
    """Whether the file system holding PATH accepts O_DIRECT (cache=none needs it).
    For a missing file, its folder's file system is probed with a scratch file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except FileNotFoundError:
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            return True          # nothing to probe; QEMU will say what is missing
        try:
            fd, scratch = tempfile.mkstemp(dir=folder, prefix=".vmferry-odirect-")
        except OSError:
            return True
        os.close(fd)
        try:
            return supports_o_direct(scratch)
        finally:
            os.unlink(scratch)
    except OSError as e:
        # EINVAL is the file system refusing O_DIRECT; anything else (EACCES, ...)
        # QEMU reports better than we can guess.
        return e.errno != 22
    os.close(fd)
    return True


def effective_cache(disk: DiskSpec) -> str:
    if disk.cache is not None:
        return disk.cache
    return "none" if supports_o_direct(disk.path) else "writeback"


def _opt(value: str) -> str:
    """A value inside a QemuOpts list (-chardev a=b,c=d): commas are doubled."""
    return value.replace(",", ",,")


def _json(obj: dict[str, Any]) -> str:
    # JSON form of -blockdev: no escaping rules for paths with commas or '='.
    return json.dumps(obj, separators=(",", ":"))


def qemu_argv(spec: VMSpec, *, qmp_socket: Path, incoming: Optional[str] = None,
              accel: Optional[str] = None, pidfile: Optional[Path] = None,
              extra_qmp_sockets: Sequence[Path] = (), paused: bool = False,
              daemonize: bool = False, logfile: Optional[Path] = None,
              binary: Optional[str] = None) -> list[str]:
    """The full QEMU command line for SPEC (argv[0] is the QEMU binary).

    INCOMING adds "-incoming INCOMING" ("defer" for migrate-incoming later); PAUSED
    adds -S (the VM waits for "cont"); ACCEL defaults to detect_accel().  DAEMONIZE
    adds -daemonize, LOGFILE -D LOGFILE (QEMU truncates it, then sends all its
    messages there, also after daemonizing).  The machine type is passed as written:
    start_vm pins aliases with resolve_machine first.
    """
    accel = accel or detect_accel()
    if accel not in ACCELS:
        raise UsageError(f"accel must be kvm or tcg, not {accel!r}")
    argv = [binary or qemu_binary(),
            "-nodefaults", "-no-user-config", "-display", "none",
            "-name", f"guest={spec.name},debug-threads=on",
            "-msg", "timestamp=on",
            "-machine", spec.machine, "-accel", accel,
            "-m", f"{spec.memory // MiB}M", "-smp", str(spec.cpus)]
    if spec.cpu:
        argv += ["-cpu", spec.cpu]
    for sock in (qmp_socket, *extra_qmp_sockets):
        argv += ["-qmp", f"unix:{_opt(os.fspath(sock))},server=on,wait=off"]
    if pidfile is not None:
        argv += ["-pidfile", os.fspath(pidfile)]
    if logfile is not None:
        argv += ["-D", os.fspath(logfile)]
    if daemonize:
        argv.append("-daemonize")
    if spec.kernel:
        argv += ["-kernel", spec.kernel]
    if spec.initrd:
        argv += ["-initrd", spec.initrd]
    if spec.cmdline is not None:
        argv += ["-append", spec.cmdline]
    if spec.serial:
        argv += ["-chardev", f"file,id=serial0,path={_opt(spec.serial)},append=on",
                 "-serial", "chardev:serial0"]

    names = disk_names(spec)
    if any(n.disk.bus == "scsi" for n in names):
        argv += ["-device", "virtio-scsi-pci,id=scsi0"]
    for n in names:
        d = n.disk
        direct, no_flush, write_cache = _CACHE[effective_cache(d)]
        cache = {"direct": direct, "no-flush": no_flush}
        argv += ["-blockdev", _json({"driver": "file", "node-name": n.file_node,
                                     "filename": d.path, "aio": "threads", "cache": cache,
                                     "read-only": d.readonly, "discard": "unmap"}),
                 "-blockdev", _json({"driver": d.format, "node-name": n.node,
                                     "file": n.file_node, "cache": cache,
                                     "read-only": d.readonly, "discard": "unmap"})]
        # bootindex 0 belongs to -kernel's option ROM when there is one
        dev = f"{_DEVICE[d.bus][0]},drive={n.node},id={n.device},bootindex={n.index + 1}"
        if d.bus == "scsi":
            dev += f",bus=scsi0.0,scsi-id={n.index},lun=0"
        if not write_cache:
            dev += ",write-cache=off"
        if d.shared:
            dev += ",share-rw=on"
        argv += ["-device", dev]

    for i, nic in enumerate(spec.nics):
        if nic.type == "none":
            continue
        netdev = f"{nic.type},id=net{i}"
        if nic.type == "tap":
            # no /etc/qemu-ifup: the tap must be set up (bridged) by whoever owns it
            netdev += ",script=no,downscript=no"
            if nic.ifname:
                netdev += f",ifname={nic.ifname}"
        argv += ["-netdev", netdev, "-device",
                 f"{_NIC_DEVICE[nic.model]},netdev=net{i},id=nic{i},mac={spec.nic_mac(i)}"]

    if paused:
        argv.append("-S")
    if incoming is not None:
        argv += ["-incoming", incoming]
    argv += list(spec.extra_args)
    return argv


__all__ = ["ACCELS", "DiskNames", "disk_names", "qemu_binary", "detect_accel",
           "resolve_machine", "unsupported_machine", "qemu_version", "machine_supported",
           "supports_o_direct", "effective_cache", "qemu_argv"]
