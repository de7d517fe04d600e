"""What `vmferry migrate --dry-run` reports: every problem that would stop the
migration (found by the very checks Begin and Prepare make, see
Migration.check), the plan it would carry out, and an estimate of its time
from a short probe of the disks and the link.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

from vmferry import __version__
from vmferry.migration.destination import DestinationCheck
from vmferry.migration.options import MigrateOptions
from vmferry.units import format_size

# What the probes may take together (the disks' read and the link's).
PROBE_SECONDS = 1.0


@dataclasses.dataclass
class DiskMove:
    node: str
    path: str                     # on the source
    fmt: str
    size: int                     # virtual size
    allocated: Optional[int]      # what the source image holds: what a full copy moves
    dest_path: str
    create: bool                  # the destination image would be created
    engine: str                   # who would copy it: native or mirror
    # bytes the copy would move: what the source holds for a full copy, what
    # the dirty bitmap marks (and a kept copy lacks) for a presynced one
    moves: Optional[int] = None
    dest_free: Optional[int] = None   # bytes free where an image would be created


@dataclasses.dataclass
class DryRun:
    """A migration checked, not run.  ok: it would start."""

    name: str
    destination: str
    kind: str = "migrate"
    problems: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    disks: list[DiskMove] = dataclasses.field(default_factory=list)
    engine: str = ""              # who would copy the disks: native or mirror
    transport: str = ""
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    source: dict[str, Any] = dataclasses.field(default_factory=dict)   # qemu, accel, memory
    target: dict[str, Any] = dataclasses.field(default_factory=dict)   # the destination's
    disk_read_rate: Optional[float] = None     # bytes/s, from the probe
    link_rate: Optional[float] = None          # bytes/s, from the probe
    estimate_s: Optional[float] = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ok"] = self.ok
        return d

    def add_problems(self, found: list[str]) -> None:
        """Each problem once: a destination that cannot be reached says so to
        every step that asks it."""
        for p in found:
            if p not in self.problems:
                self.problems.append(p)

    def heard(self, found: DestinationCheck) -> None:
        """What the destination said of itself and of the plan."""
        self.add_problems(found.problems)
        self.warnings += found.warnings
        self.target = {"version": found.version, "listen": found.listen}
        if self.kind == "migrate":
            self.target.update(qemu=found.qemu, accel=found.accel)
        if found.version and found.version != __version__:
            self.warnings.append(f"the destination runs vmferry {found.version}, this host "
                                 f"{__version__}")
        source_qemu = self.source.get("qemu", "")
        if _older(found.qemu, source_qemu):
            self.warnings.append(f"the destination's QEMU {found.qemu} is older than the "
                                 f"source's {source_qemu}: QEMU promises migrations to the "
                                 f"same version or a newer one only")

    def estimate(self, opts: MigrateOptions) -> None:
        """Disks at the slower of their read and the link (capped as asked),
        then memory at the link's rate: an upper bound for a guest that does
        not dirty its memory faster than the link moves it, and a lower one
        for a guest that does."""
        if not self.disk_read_rate and not self.link_rate:
            return
        disk_bytes = sum(d.moves if d.moves is not None else d.size for d in self.disks)
        rates = [r for r in (self.disk_read_rate, self.link_rate) if r]
        cap = opts.disk_rate()
        if cap and self.disks:
            rates.append(cap * len(self.disks))
        disk_rate = min(rates)
        mem_rates = [r for r in (self.link_rate,) if r]
        if opts.bandwidth:
            mem_rates.append(opts.bandwidth * (1 << 20))
        memory = self.source.get("memory", 0) if self.kind == "migrate" else 0
        seconds = disk_bytes / disk_rate if disk_bytes else 0.0
        if memory and mem_rates:
            seconds += memory / min(mem_rates)
        self.estimate_s = seconds

    def text(self) -> str:
        """The plan, for people."""
        verb = "would migrate" if self.kind == "migrate" else "would presync"
        head = (f"dry run: {self.name} {verb} to {self.destination}" if self.ok else
                f"dry run: {self.name} cannot {self.kind} to {self.destination} "
                f"({len(self.problems)} problem{'s' if len(self.problems) != 1 else ''})")
        lines = [head]
        for d in self.disks:
            held = (f", {format_size(d.allocated)} allocated" if d.allocated is not None
                    else "")
            if d.moves is not None and d.moves != d.allocated:
                held += f", {format_size(d.moves)} to move since the last copy"
            to = d.dest_path or "?"
            if d.create:
                free = (f", {format_size(d.dest_free)} free there" if d.dest_free is not None
                        else "")
                to += f" (to create{free})"
            lines.append(f"  {d.node}: {d.path} ({d.fmt}, {format_size(d.size)}{held}) -> "
                         f"{to}" + (f" by the {d.engine} engine" if d.engine else ""))
        if not self.disks:
            lines.append("  no disks to copy")
        lines.append(f"  transport: {self.transport}")
        # the disks' lines show where each goes
        on = ", ".join(f"{k}={v}" for k, v in self.options.items()
                       if k not in ("disk_map", "dest_spec"))
        lines.append(f"  options: {on or 'defaults'}")
        src, dst = self.source, self.target
        if src:
            lines.append(f"  source: QEMU {src.get('qemu') or '?'}, {src.get('accel', '?')}, "
                         f"{src.get('machine', '?')}, {format_size(src.get('memory', 0))} "
                         f"of memory")
        if dst:
            parts = [f"vmferry {dst.get('version') or '?'}"]
            if self.kind == "migrate":
                parts += [f"QEMU {dst.get('qemu') or '?'}", dst.get("accel") or "?"]
            listen = ", ".join(f"{k} on {v}" for k, v in dst.get("listen", {}).items())
            lines.append(f"  destination: {', '.join(parts)}"
                         + (f"; listening: {listen}" if listen else ""))
        if self.estimate_s is not None:
            probe = []
            if self.disk_read_rate:
                probe.append(f"disks read {format_size(self.disk_read_rate)}/s")
            if self.link_rate:
                probe.append(f"link {format_size(self.link_rate)}/s")
            lines.append(f"  estimate: about {_duration(self.estimate_s)} "
                         f"({', '.join(probe)})")
        for w in self.warnings:
            lines.append(f"  warning: {w}")
        return "\n".join(lines)


def _older(version: str, than: str) -> bool:
    """"7.2.0" < "8.0.1"; False when either does not say."""
    def parts(v: str) -> tuple[int, ...]:
        return tuple(int(x) for x in v.split(".") if x.isdigit())
    return bool(parts(version)) and bool(parts(than)) and parts(version) < parts(than)


def _duration(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    m, s = divmod(int(s + 0.5), 60)
    return f"{m} min {s} s" if m < 60 else f"{m // 60} h {m % 60} min"


def options_in_effect(opts: MigrateOptions) -> dict[str, Any]:
    """The options that differ from the defaults, by their field names (the
    storage engine and what is copied always)."""
    defaults = MigrateOptions()
    out: dict[str, Any] = {"copy_storage": opts.copy_storage}
    for f in dataclasses.fields(opts):
        v = getattr(opts, f.name)
        if f.name in ("copy_storage", "storage_engine") or v == getattr(defaults, f.name):
            continue
        out[f.name] = str(v) if not isinstance(v, (bool, int, float, str, list, dict)) else v
    return out
