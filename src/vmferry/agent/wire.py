"""What travels between a source and its destination agent, in one place:
each kind of value is encoded (for the source, migration/remote.py) beside
its decoding and checking (for the agent, server.py), so that the two can
only change together.  The agent trusts nothing it reads: each decoder
checks every field before anything uses it."""
from __future__ import annotations

import re
from typing import Any

from vmferry.agent.protocol import Args, ProtocolError
from vmferry.migration.options import MigrateOptions
from vmferry.migration.plan import DiskPlan

NODE_RE = re.compile(r"disk[0-9]{1,3}")
_EXPORT_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")      # NBD export names: the node's
# MigrateOptions fields a source may set on the destination
OPTIONS = {"copy_storage": str, "create_disks": bool, "overwrite_disks": bool,
           "postcopy": bool, "parallel_connections": int, "tls": bool}
_DISK = ("node", "path", "fmt", "size", "export", "backing", "backing_fmt", "source_id")


# -- a disk to migrate (prepare, check) ------------------------------------

def encode_disk(d: DiskPlan, allocated: bool = False) -> dict[str, Any]:
    out = {k: getattr(d, k) for k in _DISK}
    if allocated:
        out["allocated"] = d.allocated
    return out


def disk_plan(d: Any, spec: Any, op: str = "prepare", allocated: bool = False) -> DiskPlan:
    a = Args(f"{op} disks", d)
    a.only(*_DISK, *(("allocated",) if allocated else ()))
    node = a.get("node", str)
    if (not NODE_RE.fullmatch(node) or node != f"disk{int(node[4:])}"
            or int(node[4:]) >= len(spec.disks)):
        raise ProtocolError(f"{op}: {node!r} is not a disk of the spec")
    fmt = a.get("fmt", str)
    if fmt not in ("raw", "qcow2"):
        raise ProtocolError(f"{op}: format {fmt!r} is not raw or qcow2")
    size = _size(a, op)
    export = a.get("export", str)
    if not _EXPORT_RE.fullmatch(export):
        raise ProtocolError(f"{op}: {export[:80]!r} is not an NBD export name")
    return DiskPlan(node=node, path=a.get("path", str), fmt=fmt, size=size,
                    export=export, backing=a.get("backing", str, None),
                    backing_fmt=a.get("backing_fmt", str, None),
                    source_id=a.get("source_id", str, None),
                    allocated=_size(a, op, "allocated") if a.get("allocated", int, None)
                    is not None else None)


# -- a disk to presync (presync_open, presync_check_open) -------------------

def presync_disk(d: Any, op: str = "presync_open", allocated: bool = False) -> dict[str, Any]:
    a = Args(f"{op} disks", d)
    a.only("node", "dest_path", "fmt", "size", "generation", "source_id",
           *(("allocated",) if allocated else ()))
    fmt = a.get("fmt", str)
    if fmt not in ("raw", "qcow2"):
        raise ProtocolError(f"{op}: format {fmt!r} is not raw or qcow2")
    node = a.get("node", str)
    if not NODE_RE.fullmatch(node) or node != f"disk{int(node[4:])}":
        raise ProtocolError(f"{op}: {node!r} is not a disk node")
    out = {"node": node, "dest_path": a.get("dest_path", str), "fmt": fmt,
           "size": _size(a, op), "generation": a.get("generation", int, None),
           "source_id": a.get("source_id", str, None)}
    if allocated and a.get("allocated", int, None) is not None:
        out["allocated"] = _size(a, op, "allocated")
    return out


def _size(a: Args, op: str, key: str = "size") -> int:
    size = a.get(key, int)
    if not 0 <= size < 1 << 63:        # QEMU's and the file system's limit
        raise ProtocolError(f"{op}: disk size {size} is not 0 to 2^63 - 1 bytes")
    return size


# -- the options a destination honours --------------------------------------

def encode_options(opts: MigrateOptions) -> dict[str, Any]:
    return {k: getattr(opts, k) for k in OPTIONS}


def options(a: Args) -> MigrateOptions:
    a.only(*OPTIONS)
    opts = MigrateOptions(**{k: a.get(k, t) for k, t in OPTIONS.items() if k in a.args
                             and a.args[k] is not None})
    opts.validate()
    return opts
