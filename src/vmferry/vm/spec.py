"""A VM described in TOML: what `vmferry run` starts and what migration recreates.

    name = "web1"
    memory = "1G"                 # K/M/G/T suffix, binary; a whole number of MiB
    cpus = 2                      # default 1
    machine = "q35"               # default "q35"; `run` pins it to the versioned
                                  # type (pc-q35-7.2) in the saved spec
    cpu = "qemu64"                # optional; QEMU's default (qemu64) when absent
    kernel = "/boot/vmlinuz"      # optional direct boot; initrd/cmdline need kernel
    initrd = "/boot/initrd.img"
    cmdline = "console=ttyS0"
    serial = "/var/log/web1.log"  # optional: guest COM1 appended to this file
    extra_args = ["-rtc", "base=utc"]

    [[disks]]
    path = "/var/lib/images/web1.qcow2"
    format = "qcow2"              # required: raw or qcow2 (never probed)
    bus = "virtio"                # virtio (default) | ide | scsi
    cache = "none"                # optional; default none, or writeback where the
                                  # file system refuses O_DIRECT (tmpfs on old kernels)
    readonly = false
    shared = false                # on storage both hosts see: not copied by migration

    [[nics]]
    type = "user"                 # none | user | tap
    model = "virtio"              # virtio (default) | e1000 | rtl8139
    mac = "52:54:00:12:34:56"     # default: derived from the VM name and index
    ifname = "tap0"               # tap only

Relative paths are relative to the spec file's folder and are stored absolute, so a
saved or transmitted spec means the same files wherever it is read.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from vmferry.errors import UsageError
from vmferry.units import parse_size

FORMATS = ("raw", "qcow2")
BUSES = ("virtio", "ide", "scsi")
CACHE_MODES = ("none", "writeback", "writethrough", "directsync", "unsafe")
NIC_TYPES = ("none", "user", "tap")
NIC_MODELS = ("virtio", "e1000", "rtl8139")

MiB = 1 << 20
MIN_MEMORY = 16 * MiB     # SeaBIOS alone needs a few MiB; less is always a typo
MAX_CPUS = 255            # x86 without an IOMMU/x2apic setup tops out here

# A VM name becomes a folder name and part of QEMU's -name: keep it tame.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_IFNAME_RE = re.compile(r"[A-Za-z0-9._-]{1,15}")   # IFNAMSIZ - 1

_TOP_KEYS = ("name", "memory", "cpus", "machine", "cpu", "kernel", "initrd", "cmdline",
             "serial", "disks", "nics", "extra_args")
_DISK_KEYS = ("path", "format", "bus", "cache", "readonly", "shared")
_NIC_KEYS = ("type", "model", "mac", "ifname")


@dataclass(frozen=True)
class DiskSpec:
    path: str                       # absolute
    format: str                     # raw | qcow2
    bus: str = "virtio"
    cache: Optional[str] = None     # None: "none", or "writeback" without O_DIRECT
    readonly: bool = False
    shared: bool = False


@dataclass(frozen=True)
class NicSpec:
    type: str                       # none | user | tap
    model: str = "virtio"
    mac: Optional[str] = None       # None: derived from the VM name (see VMSpec.nic_mac)
    ifname: Optional[str] = None    # tap only; None lets QEMU pick tapN


@dataclass(frozen=True)
class VMSpec:
    name: str
    memory: int                     # bytes, a whole number of MiB
    cpus: int = 1
    machine: str = "q35"
    cpu: Optional[str] = None
    kernel: Optional[str] = None
    initrd: Optional[str] = None
    cmdline: Optional[str] = None
    serial: Optional[str] = None
    disks: tuple[DiskSpec, ...] = ()
    nics: tuple[NicSpec, ...] = ()
    extra_args: tuple[str, ...] = ()

    def nic_mac(self, index: int) -> str:
        """The MAC of nics[index]: the given one, or one derived from the name, so the
        source and destination of a migration agree without anyone writing it down."""
        nic = self.nics[index]
        if nic.mac:
            return nic.mac
        h = hashlib.sha256(f"{self.name}/{index}".encode()).digest()
        return "52:54:00:%02x:%02x:%02x" % (h[0], h[1], h[2])

    def renamed(self, name: str) -> "VMSpec":
        """The same VM under NAME (virsh --dname).  MACs derived from the old
        name are written down, so the guest's NICs keep their addresses."""
        nics = tuple(dataclasses.replace(n, mac=self.nic_mac(i))
                     for i, n in enumerate(self.nics))
        return dataclasses.replace(self, name=name, nics=nics)

    def remap(self, disk_map: Mapping[str, str], serial: Optional[str] = None) -> "VMSpec":
        """The destination's spec: disk paths replaced through DISK_MAP, whose keys are
        source paths or node names ("disk0"); disks not named keep their path.  SERIAL
        replaces the console file; None keeps the source's (the device itself must
        exist on both sides, so it cannot be dropped)."""
        by_key: dict[str, int] = {}
        for i, d in enumerate(self.disks):
            by_key[d.path] = i
            by_key[f"disk{i}"] = i
        new_paths = [d.path for d in self.disks]
        for key, dst in disk_map.items():
            if key not in by_key:
                raise UsageError(f"disk map names {key!r}, which is not a disk of "
                                 f"{self.name} (disks: "
                                 f"{', '.join(d.path for d in self.disks) or 'none'})")
            if not dst:
                raise UsageError(f"disk map gives an empty destination path for {key!r}")
            new_paths[by_key[key]] = os.path.abspath(dst)
        if len(set(new_paths)) != len(new_paths):
            raise UsageError(f"disk map sends two disks of {self.name} to the same file")
        disks = tuple(dataclasses.replace(d, path=p) for d, p in zip(self.disks, new_paths))
        if serial is not None:
            if self.serial is None:
                raise UsageError(f"{self.name} has no serial console to remap: the "
                                 f"destination must have the same devices as the source")
            serial = os.path.abspath(serial)
        return dataclasses.replace(self, disks=disks,
                                   serial=self.serial if serial is None else serial)

    def to_toml(self) -> str:
        """This spec as TOML that load_spec/parse_spec read back to an equal VMSpec."""
        out = [f"name = {_toml_str(self.name)}",
               f"memory = {_toml_str(_size_text(self.memory))}",
               f"cpus = {self.cpus}",
               f"machine = {_toml_str(self.machine)}"]
        for key in ("cpu", "kernel", "initrd", "cmdline", "serial"):
            value = getattr(self, key)
            if value is not None:
                out.append(f"{key} = {_toml_str(value)}")
        if self.extra_args:
            out.append("extra_args = [" + ", ".join(map(_toml_str, self.extra_args)) + "]")
        for d in self.disks:
            out += ["", "[[disks]]", f"path = {_toml_str(d.path)}",
                    f"format = {_toml_str(d.format)}", f"bus = {_toml_str(d.bus)}"]
            if d.cache is not None:
                out.append(f"cache = {_toml_str(d.cache)}")
            out += [f"readonly = {str(d.readonly).lower()}",
                    f"shared = {str(d.shared).lower()}"]
        for n in self.nics:
            out += ["", "[[nics]]", f"type = {_toml_str(n.type)}",
                    f"model = {_toml_str(n.model)}"]
            for key in ("mac", "ifname"):
                value = getattr(n, key)
                if value is not None:
                    out.append(f"{key} = {_toml_str(value)}")
        return "\n".join(out) + "\n"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (memory in bytes)."""
        return dataclasses.asdict(self)


def load_spec(path: str | os.PathLike) -> VMSpec:
    """Read and validate a spec file; errors are one line naming the file and field."""
    where = f"spec {os.fspath(path)}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{where}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{where}: cannot read: {getattr(e, 'strerror', None) or e}") from e
    return parse_spec(text, source=os.fspath(path),
                      base_dir=os.path.dirname(os.path.abspath(path)))


def parse_spec(text: str, *, source: str = "<string>",
               base_dir: str | os.PathLike | None = None) -> VMSpec:
    """Parse TOML TEXT into a VMSpec; relative paths are taken from BASE_DIR (default:
    the current directory).  SOURCE names the text in error messages."""
    where = f"spec {source}"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{where}: not valid TOML: {e}") from None
    return _Parser(where, os.path.abspath(base_dir or os.getcwd())).spec(data)


class _Parser:
    def __init__(self, where: str, base_dir: str) -> None:
        self.where = where
        self.base = base_dir

    def fail(self, field_name: str, message: str) -> UsageError:
        return UsageError(f"{self.where}: {field_name} {message}")

    def keys(self, table: Mapping[str, Any], allowed: tuple[str, ...], prefix: str) -> None:
        for key in table:
            if key not in allowed:
                raise UsageError(f"{self.where}: unknown field {prefix}{key!r} "
                                 f"(known: {', '.join(allowed)})")

    def string(self, table: Mapping[str, Any], key: str, name: str, *,
               required: bool = False, default: Optional[str] = None) -> Optional[str]:
        if key not in table:
            if required:
                raise self.fail(name, "is required")
            return default
        value = table[key]
        if not isinstance(value, str):
            raise self.fail(name, f"must be a string, not {_show(value)}")
        if not value:
            raise self.fail(name, "must not be empty")
        return value

    def choice(self, table: Mapping[str, Any], key: str, name: str, choices: tuple[str, ...],
               *, required: bool = False, default: Optional[str] = None) -> Optional[str]:
        value = self.string(table, key, name, required=required, default=default)
        if value is not None and value not in choices:
            raise self.fail(name, f"must be {_alternatives(choices)}, not {value!r}")
        return value

    def path(self, table: Mapping[str, Any], key: str, name: str, *,
             required: bool = False) -> Optional[str]:
        value = self.string(table, key, name, required=required)
        if value is None:
            return None
        if "\0" in value:
            raise self.fail(name, "must not contain a NUL character")
        return os.path.abspath(os.path.join(self.base, os.path.expanduser(value)))

    def boolean(self, table: Mapping[str, Any], key: str, name: str) -> bool:
        value = table.get(key, False)
        if not isinstance(value, bool):
            raise self.fail(name, f"must be true or false, not {_show(value)}")
        return value

    def spec(self, data: Mapping[str, Any]) -> VMSpec:
        self.keys(data, _TOP_KEYS, "")
        name = self.string(data, "name", "name", required=True)
        assert name is not None
        if not NAME_RE.fullmatch(name):
            raise self.fail("name", f"must be 1-64 letters, digits, '.', '_' or '-' "
                                    f"starting with a letter or digit, not {name!r}")
        memory = self.memory(data)
        cpus = data.get("cpus", 1)
        if isinstance(cpus, bool) or not isinstance(cpus, int) or not 1 <= cpus <= MAX_CPUS:
            raise self.fail("cpus", f"must be an integer from 1 to {MAX_CPUS}, not {_show(cpus)}")
        machine = self.string(data, "machine", "machine", default="q35")
        cpu = self.string(data, "cpu", "cpu")
        kernel = self.path(data, "kernel", "kernel")
        initrd = self.path(data, "initrd", "initrd")
        cmdline = data.get("cmdline")
        if cmdline is not None and not isinstance(cmdline, str):
            raise self.fail("cmdline", f"must be a string, not {_show(cmdline)}")
        for key, value in (("initrd", initrd), ("cmdline", cmdline)):
            if value is not None and kernel is None:
                raise self.fail(key, "needs kernel (direct boot) to be set")
        serial = self.path(data, "serial", "serial")
        extra = data.get("extra_args", [])
        if not isinstance(extra, list) or not all(isinstance(a, str) for a in extra):
            raise self.fail("extra_args", f"must be a list of strings, not {_show(extra)}")
        disks = tuple(self.disk(i, d) for i, d in enumerate(self.array(data, "disks")))
        seen: dict[str, int] = {}
        for i, d in enumerate(disks):
            if d.path in seen:
                raise self.fail(f"disks[{i}].path", f"is the same file as disks[{seen[d.path]}]")
            seen[d.path] = i
        nics = tuple(self.nic(i, n) for i, n in enumerate(self.array(data, "nics")))
        return VMSpec(name=name, memory=memory, cpus=cpus, machine=machine or "q35",
                      cpu=cpu, kernel=kernel, initrd=initrd, cmdline=cmdline, serial=serial,
                      disks=disks, nics=nics, extra_args=tuple(extra))

    def memory(self, data: Mapping[str, Any]) -> int:
        if "memory" not in data:
            raise self.fail("memory", 'is required, e.g. memory = "1G"')
        value = data["memory"]
        # A bare number is bytes to parse_size but MiB to QEMU's -m: refuse to guess.
        if isinstance(value, bool) or not isinstance(value, (str, int)) \
                or re.fullmatch(r"\s*[\d.]+\s*", str(value)):
            raise self.fail("memory", f'must be a size with a unit such as "512M" or "1G", '
                                      f"not {_show(value)}")
        try:
            size = parse_size(value, "memory")
        except UsageError:
            raise self.fail("memory", f'must be a size such as "512M" or "1G", '
                                      f"not {_show(value)}") from None
        if size % MiB:
            raise self.fail("memory", f"must be a whole number of MiB, not {_show(value)}")
        if size < MIN_MEMORY:
            raise self.fail("memory", f"must be at least 16M, not {_show(value)}")
        return size

    def array(self, data: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
        value = data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
            raise self.fail(key, f"must be an array of tables ([[{key}]]), not {_show(value)}")
        return value

    def disk(self, i: int, d: Mapping[str, Any]) -> DiskSpec:
        p = f"disks[{i}]."
        self.keys(d, _DISK_KEYS, p)
        path = self.path(d, "path", p + "path", required=True)
        fmt = self.choice(d, "format", p + "format", FORMATS, required=True)
        bus = self.choice(d, "bus", p + "bus", BUSES, default="virtio")
        cache = self.choice(d, "cache", p + "cache", CACHE_MODES)
        readonly = self.boolean(d, "readonly", p + "readonly")
        shared = self.boolean(d, "shared", p + "shared")
        if readonly and bus == "ide":
            raise self.fail(p + "readonly", "needs bus virtio or scsi (an IDE hard disk "
                                            "cannot be read-only)")
        assert path is not None and fmt is not None and bus is not None
        return DiskSpec(path=path, format=fmt, bus=bus, cache=cache, readonly=readonly,
                        shared=shared)

    def nic(self, i: int, n: Mapping[str, Any]) -> NicSpec:
        p = f"nics[{i}]."
        self.keys(n, _NIC_KEYS, p)
        kind = self.choice(n, "type", p + "type", NIC_TYPES, required=True)
        model = self.choice(n, "model", p + "model", NIC_MODELS, default="virtio")
        mac = self.string(n, "mac", p + "mac")
        if mac is not None:
            mac = mac.lower()
            if not _MAC_RE.fullmatch(mac) or int(mac[:2], 16) & 1:
                raise self.fail(p + "mac", f"must be a unicast MAC like 52:54:00:12:34:56, "
                                           f"not {n['mac']!r}")
        ifname = self.string(n, "ifname", p + "ifname")
        if ifname is not None:
            if kind != "tap":
                raise self.fail(p + "ifname", f"only applies to type tap, not {kind!r}")
            if not _IFNAME_RE.fullmatch(ifname):
                raise self.fail(p + "ifname", f"must be 1-15 letters, digits, '.', '_' or "
                                              f"'-', not {ifname!r}")
        assert kind is not None and model is not None
        return NicSpec(type=kind, model=model, mac=mac, ifname=ifname)


def _alternatives(choices: tuple[str, ...]) -> str:
    return " or ".join(choices) if len(choices) <= 2 else \
        ", ".join(choices[:-1]) + " or " + choices[-1]


def _show(value: Any) -> str:
    """A TOML value as the user wrote it, for error messages."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return repr(value)


def _size_text(n: int) -> str:
    for unit, size in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n % size == 0:
            return f"{n // size}{unit}"
    return f"{n}B"


_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n",
                 "\f": "\\f", "\r": "\\r"}


def _toml_str(s: str) -> str:
    """A TOML basic string; control characters (and DEL) escaped as TOML requires."""
    out = []
    for ch in s:
        if ch in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


__all__ = ["VMSpec", "DiskSpec", "NicSpec", "load_spec", "parse_spec", "FORMATS", "BUSES",
           "CACHE_MODES", "NIC_TYPES", "NIC_MODELS"]
