"""The source's journal of one migration or presync: STATE/NAME/journal.json.

A step is written down before it takes effect (the file is replaced
atomically and fsynced), so that when the vmferry process running the
migration dies — SIGKILL, the OOM killer, a crash of the machine it ran on —
`vmferry recover NAME` can read what was done and which way is safe
(migration/recover.py).  The process removes the journal once the migration
is over, completed or rolled back; a journal whose owner is gone is an
interrupted migration, and every command that touches the VM says so.

What it holds:
  kind       "migrate" or "presync"
  dest       the destination URI (local:///STATE, ssh://..., tls://...)
  phase      the last step entered, in PHASES order
  was_running  whether the guest ran before (recover resumes it only then)
  disks      what moves: node, source path, destination path, format, size
  resources  named things created in the source QEMU or on this host, each a
             dict with a "kind": see recover.py for what undoes each kind

The points of no return are phases of their own: "switchover" is written
before `migrate-continue` (from then on the destination may hold the whole
state) and "finish" before the destination is asked to resume the guest
(from then on it may run there).  "confirm" means the destination runs it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any, Optional

from vmferry.errors import UsageError
from vmferry.migration.options import MigrateOptions
from vmferry.vm.state import StateDir, boot_id as _boot_id, pid_alive, process_start

FILE = "journal.json"
PHASES = ("begin", "prepare", "perform", "switchover", "finish", "confirm")


@dataclasses.dataclass
class Journal:
    kind: str
    name: str
    dest: str
    phase: str = "begin"
    # None until Begin has seen the guest: only a guest that ran is resumed
    was_running: Optional[bool] = None
    # this migration's name, also kept by the destination when it resumes the
    # guest there (incoming.probe): proof that it did, after both processes died
    token: str = ""
    owner: int = 0
    owner_start: Optional[int] = None
    boot_id: str = ""
    started: float = 0.0
    disks: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    # what recover needs of the options: suspend, undefine_source, pki_dir,
    # direct, dname
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    resources: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    # node -> how far the destination image is a copy (the native engine's
    # first pass), so that recover can keep a partial copy; a stale value
    # only means more is copied again
    # node -> the spans its destination image still lacks (native engine)
    missing: dict[str, list] = dataclasses.field(default_factory=dict)
    _saved_valid: float = dataclasses.field(default=0.0, compare=False, repr=False)
    path: Optional[Path] = dataclasses.field(default=None, compare=False, repr=False)

    @classmethod
    def open(cls, state: StateDir, kind: str, name: str, dest: str,
             options: dict[str, Any]) -> "Journal":
        """A new journal owned by this process, written at once."""
        j = cls(kind=kind, name=name, dest=dest, options=options, owner=os.getpid(),
                token=secrets.token_hex(8),
                owner_start=process_start(os.getpid()), boot_id=_boot_id(),
                started=time.time(), path=state.vm_dir(name) / FILE)
        j.save()
        return j

    @property
    def dest_name(self) -> str:
        """The VM's name on the destination (--dname), which its records there use."""
        return str(self.options.get("dname") or self.name)

    # -- writing -----------------------------------------------------------

    def save(self) -> None:
        """Replace the file atomically and make it durable before returning:
        the step it records may take effect right after."""
        assert self.path is not None
        data = {k: v for k, v in dataclasses.asdict(self).items()
                if k not in ("path", "_saved_valid")}
        tmp = self.path.with_name(FILE + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, json.dumps(data, indent=1).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def enter(self, phase: str) -> None:
        assert phase in PHASES, phase
        # Never backwards: recover decides by the furthest step reached.
        if PHASES.index(phase) > PHASES.index(self.phase):
            self.phase = phase
            self.save()

    def add(self, kind: str, **fields: Any) -> None:
        """Record a resource before it is created (recover undoes what it
        finds, and tolerates what was recorded but never made)."""
        item = {"kind": kind, **fields}
        if item not in self.resources:
            self.resources.append(item)
            self.save()

    def note_missing(self, node: str, spans: list) -> None:
        """The copy of NODE now lacks only SPANS; written at most once a second
        (what it copied since is copied again, never trusted unrecorded)."""
        self.missing[node] = [list(sp) for sp in spans]
        now = time.monotonic()
        if now - self._saved_valid >= 1.0:
            self._saved_valid = now
            self.save()

    def has(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.resources if r["kind"] == kind]

    def set_disks(self, disks: list[dict[str, Any]]) -> None:
        self.disks = disks
        self.save()

    def close(self) -> None:
        """The migration is over, one way or the other."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)

    def abandon(self) -> None:
        """This process gives up on the migration without resolving it (the
        destination could not say whether it runs the guest, or an undo step
        failed): from now on it is an interrupted migration for recover."""
        self.owner, self.owner_start = 0, None
        self.save()

    def take_over(self) -> None:
        """recover makes the journal its own, so that a second recover or an
        abort waits for it rather than acts at the same time, and a recover
        that is itself killed leaves a journal the next one can resume."""
        self.owner, self.owner_start = os.getpid(), process_start(os.getpid())
        self.boot_id = _boot_id()
        self.save()

    # -- reading -----------------------------------------------------------

    @property
    def owner_alive(self) -> bool:
        """Whether the process that wrote this still runs (the same process,
        not another that got its pid, on this boot)."""
        if self.owner <= 0 or (self.boot_id and self.boot_id != _boot_id()):
            return False
        return pid_alive(self.owner) and process_start(self.owner) == self.owner_start

    def past(self, phase: str) -> bool:
        """Whether the journal reached PHASE."""
        return PHASES.index(self.phase) >= PHASES.index(phase)

    def describe(self) -> str:
        verb = "migration" if self.kind == "migrate" else "presync"
        return f"{verb} to {self.dest}"


class BadJournal(Journal):
    """A journal that cannot be read: still an interrupted migration (every
    command says so), of which recover can only say what to check."""

    why: str = ""

    def describe(self) -> str:
        return "migration"


def load(state: StateDir, name: str) -> Optional[Journal]:
    path = state.vm_dir(name) / FILE
    try:
        data = json.loads(path.read_text())
        fields = {f.name for f in dataclasses.fields(Journal)} - {"path", "_saved_valid"}
        j = Journal(**{k: v for k, v in data.items() if k in fields})
        if j.kind not in ("migrate", "presync") or j.phase not in PHASES or \
                not isinstance(j.dest, str) or not isinstance(j.owner, int):
            raise ValueError("unknown kind, phase or destination")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as e:
        bad = BadJournal(kind="migrate", name=name, dest="?", path=path)
        bad.why = getattr(e, "strerror", None) or str(e)
        return bad
    j.path = path
    return j


def interrupted(state: StateDir, name: str) -> Optional[Journal]:
    """NAME's journal if the process that wrote it is gone, else None."""
    try:
        j = load(state, name)
    except Exception:       # a bad name, an unreadable folder: nothing to say here
        return None
    return j if j is not None and not j.owner_alive else None


def hint(j: Journal) -> str:
    """What every command says about an interrupted migration."""
    return (f"{j.describe()} interrupted (process gone): run 'vmferry recover {j.name}'")


def refuse_if_interrupted(state: StateDir, name: str) -> None:
    """UsageError when NAME has an interrupted migration: until recover has
    resolved it, the guest may run elsewhere, and nothing may start, move
    or copy it here."""
    j = interrupted(state, name)
    if j is not None:
        raise UsageError(hint(j))


def interrupted_line(state: StateDir, name: str) -> Optional[str]:
    """hint() for NAME's interrupted migration, or None."""
    j = interrupted(state, name)
    return hint(j) if j is not None else None


def problem(state: StateDir, name: str) -> str:
    """Why NAME cannot start a migration or presync now: another one under way,
    or one interrupted that must be recovered first; "" when it can."""
    old = load(state, name)
    if old is not None and old.owner_alive:
        return (f"{name} has a {old.describe()} under way (pid {old.owner}): "
                f"wait for it, or stop it with 'vmferry abort {name}'")
    if old is not None:
        return hint(old)
    return ""


def start(state: StateDir, kind: str, name: str, dest_uri: str,
          opts: MigrateOptions, *, direct: bool = False) -> Journal:
    """Start NAME's journal, unless another migration or presync of it is under
    way, or one was interrupted and must be recovered first.  DIRECT: a
    management machine relays the destination (recover may need it too)."""
    with state.lock():
        why = problem(state, name)
        if why:
            raise UsageError(why)
        return Journal.open(state, kind, name, dest_uri, {
            "suspend": opts.suspend, "undefine_source": opts.undefine_source,
            "pki_dir": str(opts.pki_dir), "direct": direct,
            **({"dname": opts.new_name(name)} if opts.new_name(name) else {})})
