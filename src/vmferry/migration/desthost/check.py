"""A dry run on the destination host: every check Prepare (incoming.py) or a
presync's opening (presync_target.py) makes, and those only a dry run can
afford to make ahead (free space, free ports), without changing anything —
no QEMU, qemu-nbd, image, folder, record or lock file.  LocalDestination runs
it in the migrating process, the agent for a source on another host (its
"check" and "presync_check_open" requests), under the same storage policy as
the real thing: a path is looked at only once the policy allows it.
"""
from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import socket
from typing import Any, Optional

from vmferry import __version__
from vmferry.errors import UsageError, VmferryError
from vmferry.migration.destination import DestinationCheck
from vmferry.migration.desthost.incoming import NO_TLS_CERTS, Incoming, Network
from vmferry.migration.options import MigrateOptions
from vmferry.migration.desthost.presync_target import PresyncTarget
from vmferry.migration.plan import DiskPlan
from vmferry.units import format_size
from vmferry.vm.process import check_accel, preflight
from vmferry.vm.qemu import (detect_accel, machine_supported, qemu_binary, qemu_version,
                             unsupported_machine)


def check_incoming(inc: Incoming, dspec: Any, disks: list[DiskPlan], opts: MigrateOptions,
                   *, accel: Optional[str] = None,
                   presynced: frozenset[str] = frozenset()) -> DestinationCheck:
    """What Incoming.prepare would refuse, all of it, and what it would do."""
    out = DestinationCheck(version=__version__)
    problems = out.problems
    try:
        inc.policy.check_name(dspec.name)
        inc.check_free(dspec.name)
    except UsageError as e:
        problems.append(str(e))
    missing, disk_problems = inc.disk_problems(dspec, disks, opts, set(presynced))
    problems += disk_problems
    out.dest_paths = {p.node: p.dest_path for p in disks}
    out.create = [p.node for p in missing]
    problems += _space_problems([(p.node, p.dest_path, _need(p.allocated, p.size))
                                 for p in missing], out.free)
    problems += _qemu_problems(out, dspec, accel)
    if not disk_problems:
        # files the spec names that must already be there; only once the
        # policy allowed every path, so no answer says what lies outside it
        creating = {p.dest_path for p in missing}
        try:
            preflight(dataclasses.replace(
                dspec, disks=[d for d in dspec.disks if d.path not in creating]))
        except UsageError as e:
            problems.append(str(e))
    if opts.tls and inc.network.tcp and not inc.network.tls_dir:
        problems.append(NO_TLS_CERTS)
    if inc.network.tcp:
        problems += _port_problems(inc.network, bool(disks), out.listen)
    return out


def check_presync_target(target: PresyncTarget, disks: list[dict[str, Any]], *,
                         create: bool, overwrite: bool,
                         tls_problem: str = "") -> DestinationCheck:
    """What PresyncTarget.open would refuse, all of it, and what it would do:
    DISKS as open() takes them, each with the source's allocated bytes."""
    out = DestinationCheck(version=__version__)
    found, out.problems = target.check(disks, create, overwrite)
    out.dest_paths = {d["node"]: d["dest_path"] for d in disks}
    out.create = [n for n, f in found.items() if f["created"]]
    out.warnings = [f"the presync record of {n} does not hold: {f['stale']}"
                    for n, f in found.items() if f["stale"] not in ("", "first")]
    out.problems += _space_problems([(d["node"], d["dest_path"],
                                      _need(d.get("allocated"), d["size"]))
                                     for d in disks if d["node"] in out.create], out.free)
    if shutil.which("qemu-nbd") is None:
        out.problems.append("qemu-nbd not found on the destination: install qemu-utils")
    if tls_problem:
        out.problems.append(tls_problem)
    if target.tcp is not None:
        addr, (lo, hi) = target.tcp
        ports: list[int] = []
        try:
            for _ in disks:
                port = _first_bindable(addr, lo, hi, skip=set(ports))
                if port is None:
                    out.problems.append(f"no free port in {lo}-{hi} on {addr} for "
                                        f"{len(disks)} qemu-nbd servers: widen the agent's "
                                        f"--port-range")
                    break
                ports.append(port)
        except (OSError, ValueError) as e:
            out.problems.append(f"the destination cannot listen on {addr[:80]!r}: "
                                f"{getattr(e, 'strerror', None) or e}: pick another "
                                f"--listen-address")
        else:
            out.listen = {d["node"]: f"{addr}:{port}" for d, port in zip(disks, ports)}
    return out


def _need(allocated: Optional[int], size: int) -> int:
    # what the source holds of an image is what a full copy writes (holes
    # stay holes); the virtual size when the source could not say
    return allocated if allocated is not None else size


def _space_problems(new: list[tuple[str, str, int]], free: dict[str, int]) -> list[str]:
    """Each file system that would hold new images (node, path, bytes) must
    have room for them."""
    need: dict[int, list[tuple[str, str, int]]] = {}
    avail: dict[int, int] = {}
    for node, path, size in new:
        folder = _existing_folder(path)
        try:
            st = os.statvfs(folder)
            dev = os.stat(folder).st_dev
        except OSError as e:
            return [f"cannot tell the free space for {path}: {e.strerror}"]
        avail[dev] = st.f_bavail * st.f_frsize
        free[node] = avail[dev]
        need.setdefault(dev, []).append((node, path, size))
    problems = []
    for dev, images in need.items():
        want = sum(size for _, _, size in images)
        if want > avail[dev]:
            names = ", ".join(path for _, path, _ in images)
            problems.append(f"not enough space for {names}: {format_size(want)} to copy, "
                            f"{format_size(avail[dev])} free there: free some space or map "
                            f"the disk{'s' if len(images) > 1 else ''} elsewhere with "
                            f"--disk-map")
    return problems


def _existing_folder(path: str) -> str:
    """The nearest folder of PATH that exists (--create-disks makes the rest)."""
    folder = os.path.dirname(path)
    while folder != "/" and not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    return folder


def _qemu_problems(out: DestinationCheck, dspec: Any, accel: Optional[str]) -> list[str]:
    """This host's QEMU: there, able to run the machine type and accelerator
    the guest runs with now (a migration cannot change either)."""
    try:
        binary = qemu_binary()
    except UsageError as e:
        return [str(e)]
    out.qemu = qemu_version(binary)
    problems = []
    try:
        if not machine_supported(dspec.machine, binary):
            problems.append(str(unsupported_machine(dspec.machine, binary)))
    except VmferryError as e:
        problems.append(str(e))
    try:
        out.accel = check_accel(accel)
    except UsageError as e:
        out.accel = detect_accel()
        problems.append(f"the guest runs with {accel} on the source: {e}")
    return problems


def _port_problems(net: Network, disks: bool, listen: dict[str, str]) -> list[str]:
    """A free port in each range, as Prepare's QEMU will take the first one
    (bound and closed again at once: a port taken between now and then is
    Prepare's to skip)."""
    taken = 0
    problems = []
    for what, key, (addr, (lo, hi)) in (("the disks' NBD server", "disks", net.nbd),
                                        ("the migration stream", "memory", net.migrate)):
        if key == "disks" and not disks:
            continue
        try:
            port = _first_bindable(addr, lo, hi, skip={taken})
        except (OSError, ValueError) as e:
            problems.append(f"the destination cannot listen on {addr[:80]!r} for {what}: "
                            f"{getattr(e, 'strerror', None) or e}: pick another "
                            f"--listen-address")
            continue
        if port is None:
            problems.append(f"no free port in {lo}-{hi} on {addr} for {what}: widen the "
                            f"agent's --port-range")
            continue
        taken = port
        listen[key] = f"{addr}:{port}"
    return problems


def _first_bindable(addr: str, lo: int, hi: int, skip: set[int]) -> Optional[int]:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    for port in range(lo, hi + 1):
        if port in skip:
            continue
        with socket.socket(family, socket.SOCK_STREAM) as s:
            # as QEMU binds: a port in TIME_WAIT is free to it
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((addr.strip("[]"), port))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    continue
                raise
            return port
    return None
