"""Prepare and Finish as the destination host runs them: a QEMU waiting with
-incoming, an NBD server exporting its disks, and their teardown.

Both destinations use this one class: LocalDestination (local.py) in the
migrating process itself, and the agent (vmferry.agent) on another host.
What an incoming migration created is also written down in the VM's folder
(incoming.json), so that whoever finds it orphaned — the agent's reaper
after the agent was killed, or the next agent to start — can remove it.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from vmferry.aio import in_thread
from vmferry.errors import MigrationError, UsageError
from vmferry.migration import testhooks
from vmferry.migration.destination import Prepared
from vmferry.migration.monitor import Monitor
from vmferry.migration.options import MigrateOptions
from vmferry.migration.plan import DiskPlan, file_id
from vmferry.migration.source import capabilities, set_capabilities
from vmferry.units import format_size
from vmferry.vm.process import start_vm_async, stop_vm_async
from vmferry.vm.spec import NAME_RE
from vmferry.vm.state import StateDir, owner_alive, owner_record

INCOMING_TIMEOUT = 120.0
# The destination's migration states in which it runs the guest already.
POSTCOPY = ("postcopy-active", "postcopy-paused", "postcopy-recover")
# How long a recover here waits for this migration's own Finish, still under
# way when its source died, to end before it settles the guest itself.
FINISHING_WAIT_S = 30.0
RECORD = "incoming.json"
# the token of the migration that handed the guest over to this side: written
# before it is resumed here (or, with --suspend, before Finish ends), so that
# from then on nothing but this side may ever run it
RESUMED = "resumed"
TLS_ID = "vmferry-tls"
EXPORT_ID = "vmferry-export-"
# libvirt's migration_port_min/max
DEFAULT_PORTS = (49152, 49215)
NO_TLS_CERTS = ("--tls: the destination has no QEMU certificates (PKI/qemu with ca-cert.pem, "
                "server-cert.pem, server-key.pem)")


@dataclasses.dataclass
class Network:
    """Where the destination QEMU listens for disk data and the memory stream:
    Unix sockets in the VM's runtime folder (same host), or TCP on an
    (address, port range) each."""

    tcp: bool = False
    nbd: tuple[str, tuple[int, int]] = ("0.0.0.0", DEFAULT_PORTS)
    migrate: tuple[str, tuple[int, int]] = ("0.0.0.0", DEFAULT_PORTS)
    tls_dir: Optional[str] = None         # QEMU tls-creds-x509 dir (server side) for --tls
    # Unix sockets for a source on another host, through its ssh (--tunnelled)
    tunnel: bool = False


# The one folder of an agent's state directory that images may be in (and its
# default storage root): everything else there is the agent's own records and
# config, which a source that could write them could turn against the host.
IMAGES = "images"
NAME_MAX = 255                  # bytes in one path component (Linux)
_RESERVED = (".json", ".toml", ".tmp")      # agent.toml, presync-*.json and their .tmp


@dataclasses.dataclass
class Policy:
    """What a destination host allows an incoming migration to write."""

    storage_roots: Optional[list[str]] = None   # None: anywhere (same-host moves)
    protect_existing: bool = False              # existing images need --overwrite-disks
    # the agent's state directory: no image may resolve into it, but for IMAGES
    state_dir: Optional[str] = None

    def check_path(self, what: str, path: str, remedy: str = "map it with --disk-map, or ") -> None:
        if self.storage_roots is None:
            return
        if "\0" in path or any(len(os.fsencode(part)) > NAME_MAX for part in path.split("/")):
            raise UsageError(f"{what} {path[:80]!r}{'...' if len(path) > 80 else ''} is not "
                             f"a usable path (a NUL byte, or a name longer than {NAME_MAX} "
                             f"bytes)")
        if not os.path.isabs(path):
            # relative to whatever the agent's cwd is, and QEMU would read a
            # "proto:" prefix as a protocol rather than a file
            raise UsageError(f"{what} {path} is not an absolute path")
        real = os.path.realpath(path)
        if self.state_dir is not None:
            state = os.path.realpath(self.state_dir)
            if _within(real, state) and not _within(real, os.path.join(state, IMAGES)):
                raise UsageError(f"{what} {path} is in the destination agent's own state "
                                 f"directory {self.state_dir}, where only {IMAGES}/ may hold "
                                 f"images: {remedy}use a storage root")
        for root in self.storage_roots:
            if _within(real, os.path.realpath(root)):
                return
        raise UsageError(f"{what} {path} is outside the destination's storage roots "
                         f"({', '.join(self.storage_roots)}): {remedy}"
                         f"add a root there (the agent's --storage-root, or storage_roots "
                         f"in its STATE-DIR/agent.toml)")

    def allows(self, path: str) -> bool:
        try:
            self.check_path("image", path)
        except UsageError:
            return False
        return True

    def check_name(self, name: str) -> None:
        """A VM folder is the agent's to write, beside its own files: never the
        images folder, nor a name its config or records (or their temporary
        files) could have."""
        if self.state_dir is not None and (name == IMAGES or name.endswith(_RESERVED)):
            raise UsageError(f"a VM cannot be named {name!r} on this destination: the "
                             f"agent keeps its images, config and records under such names")


def _within(real: str, root: str) -> bool:
    return real == root or real.startswith(root.rstrip("/") + "/")


def _host(addr: str) -> str:
    """An address as QEMU's tcp: URIs want it: IPv6 in brackets."""
    return f"[{addr}]" if ":" in addr and not addr.startswith("[") else addr


def image_size(path: str) -> Optional[int]:
    """Virtual size of an existing image, or None if there is none.  -U: the
    image may be open in a running QEMU."""
    if not os.path.exists(path):
        return None
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", path],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise UsageError(f"cannot read destination image {path}: "
                         f"{out.stderr.strip().splitlines()[-1] if out.stderr else 'qemu-img failed'}")
    return int(json.loads(out.stdout)["virtual-size"])


def make_parents(path: str) -> list[str]:
    """Create PATH's missing folders; returns those this call made, outermost
    first, so that a failed migration can take them away again."""
    missing = []
    parent = Path(path).parent
    while not os.path.lexists(parent):
        missing.append(parent)
        parent = parent.parent
    made = []
    for d in reversed(missing):
        try:
            os.mkdir(d)
        except FileExistsError:
            continue             # someone else's after all: not ours to remove
        except OSError as e:
            raise UsageError(f"cannot create folder {d} for destination image {path}: "
                             f"{e.strerror}") from e
        made.append(str(d))
    return made


def claim_file(path: str) -> list[int]:
    """Create PATH empty, refusing anything already there (a symlink too), and
    return its [st_dev, st_ino]: a record lists that, and a reaper removes the
    path only while it is still this very file.  qemu-img create then writes
    the image into it, keeping the inode."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644)
    except OSError as e:
        raise UsageError(f"cannot create destination image {path}: {e.strerror}") from e
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    return [st.st_dev, st.st_ino]


def remove_made(ids: dict[str, list[int]], dirs: list[str],
                policy: Optional[Policy] = None) -> list[str]:
    """Unlink each file of IDS (path -> [st_dev, st_ino]) that is still the file
    made then and, with POLICY, a path it allows; then the folders DIRS made
    for them, once empty.  Returns the paths removed."""
    removed = []
    for path, ident in ids.items():
        if policy is not None and not policy.allows(path):
            continue
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode) or [st.st_dev, st.st_ino] != list(ident):
            continue            # replaced since: whatever is there now is not ours
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            removed.append(path)
    for d in reversed(dirs):
        if policy is None or policy.allows(d):
            with contextlib.suppress(OSError):
                os.rmdir(d)     # only while empty
    return removed


def create_image(path: str, fmt: str, size: int, backing: Optional[str],
                 backing_fmt: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    cmd = ["qemu-img", "create", "-q", "-f", fmt]
    if backing and fmt == "qcow2":
        cmd += ["-b", backing, "-F", backing_fmt]
    cmd += [path, str(size)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines() or ["qemu-img failed"]
        raise UsageError(f"cannot create destination image {path}: {lines[-1]}")


class Incoming:
    def __init__(self, state: StateDir, *, network: Optional[Network] = None,
                 policy: Optional[Policy] = None) -> None:
        self.state = state
        self.network = network or Network()
        self.policy = policy or Policy()
        self.name: Optional[str] = None
        self.mon: Optional[Monitor] = None
        self.created: list[str] = []
        self.ids: dict[str, list[int]] = {}      # created path -> [st_dev, st_ino]
        self.dirs: list[str] = []                # folders made for them
        self.new_vm_dir = False
        self.started = False
        self.exports: list[str] = []
        # Finish gave the guest to this side (resumed, or paused as asked):
        # from then on nothing here is ever undone
        self.handed_over = False
        self.aborted = False
        self.disks: list[DiskPlan] = []
        self.kept = False          # left for recover (keep_for_recover)
        # the source's name for this migration (journal.py), written beside the
        # VM before the guest is resumed here: recover's proof that it was
        self.token = ""
        self._claim: Optional[tuple[str, str]] = None
        self.new_state_dir = False   # made by this prepare (with its .lock)

    # -- the record that lets someone else clean up after us -------------

    def _record_path(self) -> Path:
        assert self.name
        return self.state.vm_dir(self.name) / RECORD

    def _save_record(self) -> None:
        path = self._record_path()
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**owner_record(), "created": self.created,
                                   "ids": self.ids, "dirs": self.dirs,
                                   "new_vm_dir": self.new_vm_dir, "token": self.token,
                                   "completed": self.kept}))
        os.replace(tmp, path)

    async def arrived(self) -> Optional[str]:
        """Whether the migration went so far that removing this VM could lose
        the guest: "completed" when all of it arrived (paused, not resumed),
        "postcopy" once post-copy runs the guest here while its memory still
        comes; None when it did not."""
        if self.mon is None or self.handed_over or self.aborted:
            return None
        status = (await self.mon.try_cmd("query-migrate") or {}).get("status")
        return ("completed" if status == "completed" else
                "postcopy" if status in POSTCOPY else None)

    async def keep_for_recover(self) -> None:
        """The source went away after everything arrived: this paused VM may
        now hold the only complete state of the guest (the source host may
        be gone too), so it stays, marked in its record, until the source's
        'vmferry recover' finishes it (finish_orphan) or undoes it
        (undo_kept).  Reapers leave it alone."""
        self.kept = True
        self._save_record()
        if self.mon is not None:
            await self.mon.close()
            self.mon = None
        self._release()

    # -- Prepare ---------------------------------------------------------

    def _check_disks(self, dspec: Any, disks: list[DiskPlan], opts: MigrateOptions,
                     presynced: set[str]) -> list[DiskPlan]:
        """Refuse what the user must fix before anything starts; returns the
        disks whose destination image is missing (to be created)."""
        missing, problems = self.disk_problems(dspec, disks, opts, presynced)
        if problems:
            raise UsageError(problems[0])
        return missing

    def disk_problems(self, dspec: Any, disks: list[DiskPlan], opts: MigrateOptions,
                      presynced: set[str]) -> tuple[list[DiskPlan], list[str]]:
        """Every disk, path and image problem, not just the first (a dry run
        lists them all, Prepare refuses at the first), and the disks whose
        destination image is missing.  Reads only: a path is stat'ed or its
        image inspected only once the policy allows it."""
        missing: list[DiskPlan] = []
        problems: list[str] = []
        refused: set[str] = set()      # each path's refusal said once

        def allowed(check: Callable[[], None], path: str) -> None:
            try:
                check()
            except UsageError as e:
                problems.append(str(e))
                refused.add(path)
        by_node = {f"disk{i}": d for i, d in enumerate(dspec.disks)}
        if dspec.serial:
            allowed(lambda: self.policy.check_path("the serial log", dspec.serial),
                    dspec.serial)
        for d in dspec.disks:           # copied or not, the destination QEMU opens it
            allowed(lambda: self.policy.check_path("disk image", d.path), d.path)
        for what in ("kernel", "initrd"):
            # QEMU only reads these, but into guest memory: a file outside the
            # roots (an initrd of /etc/shadow) would be handed to whoever
            # controls the guest.
            path = getattr(dspec, what)
            if path:
                allowed(lambda: self.policy.check_path(
                    f"the {what}", path, remedy="the destination reads it at the same path; "),
                    path)
        for plan in disks:
            if plan.backing and opts.copy_storage == "inc":
                allowed(lambda: self.policy.check_path("backing image", plan.backing),
                        plan.backing)
        for plan in disks:
            target = by_node[plan.node].path
            plan.dest_path = target
            if target in refused:
                continue
            try:
                if self._check_image(plan, target, opts, presynced) == "missing":
                    missing.append(plan)
            except UsageError as e:
                problems.append(str(e))
        return missing, problems

    def _check_image(self, plan: DiskPlan, target: str, opts: MigrateOptions,
                     presynced: set[str]) -> Optional[str]:
        """"missing" when the image is to be created."""
        self.policy.check_path("destination image", target)
        if (file_id(target) or os.path.realpath(target)) == \
                (plan.source_id or os.path.realpath(plan.path)):
            raise UsageError(f"the destination image of {plan.node} is the source's own "
                             f"file {target}: map it elsewhere with --disk-map "
                             f"{plan.path}=NEWPATH")
        size = image_size(target)
        if size is None:
            if not opts.create_disks:
                raise UsageError(f"destination image {target} does not exist: create it "
                                 f"or pass --create-disks")
            return "missing"
        if size < plan.size:
            raise UsageError(f"destination image {target} is smaller "
                             f"({format_size(size)}) than {plan.path} "
                             f"({format_size(plan.size)}): grow it, or remove it and "
                             f"pass --create-disks")
        elif (self.policy.protect_existing and not opts.overwrite_disks
              and opts.copy_storage == "all" and plan.node not in presynced
              and not _made_by_presync(target)):
            raise UsageError(f"destination image {target} already exists: pass "
                             f"--overwrite-disks to replace its contents, or map the "
                             f"disk elsewhere with --disk-map")
        return None

    def _create_disks(self, missing: list[DiskPlan], opts: MigrateOptions) -> None:
        # Only an incremental copy keeps the shared backing file; a full copy
        # makes the destination image stand alone.
        inc = opts.copy_storage == "inc"
        for plan in missing:
            self.dirs += make_parents(plan.dest_path)
            self.created.append(plan.dest_path)
            self._save_record()        # before the file exists: never orphaned
            self.ids[plan.dest_path] = claim_file(plan.dest_path)
            self._save_record()
            create_image(plan.dest_path, plan.fmt, plan.size,
                         plan.backing if inc else None, plan.backing_fmt or "raw")

    def _claim_and_check(self, dspec: Any, disks: list[DiskPlan], opts: MigrateOptions,
                         presynced: set[str]) -> list[DiskPlan]:
        name = dspec.name
        self.policy.check_name(name)
        self.new_state_dir = not self.state.path.exists()
        with self.state.lock():
            # Claimed under the state directory's lock: two sources moving a VM
            # of the same name here at once must not share (and then delete)
            # one VM folder.
            self.check_free(name)
            key = (str(self.state.path), name)
            missing = self._check_disks(dspec, disks, opts, presynced)
            _CLAIMED.add(key)
            self._claim = key
            self.name = name        # from here on, abort() owns what is created
            self.new_vm_dir = not self.state.vm_dir(name).exists()
            self._save_record()
        return missing

    def check_free(self, name: str) -> None:
        """No VM of that name runs here, nor does another incoming migration of it."""
        if self.state.read_pid(name) is not None:
            raise UsageError(f"a VM named {name} already runs in {self.state.path}")
        if (str(self.state.path), name) in _CLAIMED or _claimed_elsewhere(self.state, name):
            raise UsageError(f"an incoming migration of {name} is already under way in "
                             f"{self.state.path}")

    async def prepare(self, dspec: Any, disks: list[DiskPlan],
                      opts: MigrateOptions, *, accel: Optional[str] = None,
                      presynced: set[str] = frozenset(), token: str = "") -> Prepared:
        self.token = token
        self.disks = disks
        missing = await in_thread(self._claim_and_check, dspec, disks, opts, set(presynced))
        await in_thread(self._create_disks, missing, opts)
        vm = await start_vm_async(self.state, dspec, incoming="defer", paused=True,
                                  accel=accel)
        self.started = True
        self.mon = await Monitor(vm.qmp_socket, "destination", "prepare").connect()
        net = self.network
        tls = bool(opts.tls)
        if tls:
            if not net.tls_dir:
                raise UsageError(NO_TLS_CERTS)
            await self.mon.cmd("object-add", **{"qom-type": "tls-creds-x509", "id": TLS_ID,
                                                "dir": net.tls_dir, "endpoint": "server",
                                                "verify-peer": True})
        # The destination must agree on the capabilities that change the stream.
        await set_capabilities(self.mon, [c for c in capabilities(opts)
                                          if c["capability"] in ("postcopy-ram", "multifd")])
        params: dict[str, Any] = {}
        if opts.parallel_connections:
            params["multifd-channels"] = opts.parallel_connections
        if tls:
            params["tls-creds"] = TLS_ID
        if params:
            await self.mon.cmd("migrate-set-parameters", **params)
        if net.tcp:
            nbd_server, migrate_uri = await self._listen_tcp(disks, tls)
        else:
            nbd_server, migrate_uri = await self._listen_unix(disks)
        return Prepared(migrate_uri=migrate_uri, nbd_server=nbd_server,
                        exports={p.node: p.export for p in disks},
                        dest_paths={p.node: p.dest_path for p in disks},
                        fresh={p.node for p in disks if p.dest_path in self.created},
                        same_host=not (net.tcp or net.tunnel))

    async def _export_disks(self, disks: list[DiskPlan]) -> None:
        for plan in disks:
            await self.mon.cmd("block-export-add", **{
                "type": "nbd", "id": EXPORT_ID + plan.node,
                "node-name": plan.node, "name": plan.export, "writable": True})
            self.exports.append(EXPORT_ID + plan.node)

    async def _listen_unix(self, disks: list[DiskPlan]) -> tuple[dict[str, Any], str]:
        run = self.state.runtime_dir(self.name)
        nbd_sock, mig_sock = run / "nbd.sock", run / "migrate.sock"
        for p in (nbd_sock, mig_sock):
            p.unlink(missing_ok=True)
        if disks:
            await self.mon.cmd("nbd-server-start",
                               addr={"type": "unix", "data": {"path": str(nbd_sock)}})
            await self._export_disks(disks)
        await self.mon.cmd("migrate-incoming", uri=f"unix:{mig_sock}")
        return {"type": "unix", "path": str(nbd_sock)}, f"unix:{mig_sock}"

    async def _listen_tcp(self, disks: list[DiskPlan],
                          tls: bool) -> tuple[dict[str, Any], str]:
        """Take the first free port of each range: QEMU itself reports a port
        in use, which no check made beforehand could rule out."""
        server: dict[str, Any] = {}
        if disks:
            addr, port = await self._first_free("the disks' NBD server", self.network.nbd,
                                                lambda a, p: ("nbd-server-start", {
                                                    "addr": {"type": "inet", "data": {
                                                        "host": a, "port": str(p)}},
                                                    **({"tls-creds": TLS_ID} if tls else {})}))
            server = {"type": "inet", "host": addr, "port": str(port)}
            await self._export_disks(disks)
        taken = int(server.get("port", 0))
        addr, port = await self._first_free("the migration stream", self.network.migrate,
                                            lambda a, p: ("migrate-incoming",
                                                          {"uri": f"tcp:{_host(a)}:{p}"}),
                                            skip=taken)
        return server, f"tcp:{_host(addr)}:{port}"

    async def _first_free(self, what: str, where: tuple[str, tuple[int, int]],
                          command: Any, skip: int = 0) -> tuple[str, int]:
        addr, (lo, hi) = where
        for port in range(lo, hi + 1):
            if port == skip:
                continue
            name, args = command(addr, port)
            if await self._try_listen(name, args):
                return addr, port
        raise MigrationError(f"no free port in {lo}-{hi} on {addr} for {what}: widen "
                             f"the agent's --port-range", phase="prepare")

    async def _try_listen(self, command: str, args: dict[str, Any]) -> bool:
        try:
            await self.mon.cmd(command, **args)
            return True
        except MigrationError as e:
            if "in use" in str(e):
                return False
            raise

    # -- Finish ----------------------------------------------------------

    async def finish(self, *, resume: bool) -> str:
        mon = self.mon
        if mon is None:
            raise MigrationError("finish without prepare", phase="finish")
        mon.phase = "finish"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + INCOMING_TIMEOUT
        while True:
            info = await mon.cmd("query-migrate")
            status = info.get("status")
            if status == "completed":
                break
            if status in ("failed", "cancelled"):
                raise MigrationError(f"incoming migration {status} on the destination: "
                                     f"{info.get('error-desc', 'see its qemu.log')}",
                                     phase="finish")
            if loop.time() > deadline:
                raise MigrationError("the destination never saw the migration complete",
                                     phase="finish")
            await asyncio.sleep(0.01)
        for exp in self.exports:
            await mon.cmd("block-export-del", id=exp)
        if self.exports:
            await mon.cmd("nbd-server-stop")
        self.exports.clear()
        await testhooks.hold("finishing")
        if self.token:
            _write_durably(self.state.vm_dir(self.name) / RESUMED, self.token)
        await testhooks.hold("handed-over")
        if resume:
            await mon.cmd("cont")
            # From here the guest has run on this side: the source must never
            # resume it too, so abort() no longer removes anything.
            self.handed_over = True
            await testhooks.hold("resumed")
        status = (await mon.cmd("query-status"))["status"]
        await mon.close()
        self.mon = None
        self.handed_over = True
        self.created.clear()
        self.ids.clear()
        self.dirs.clear()
        self.started = False
        self.new_vm_dir = False
        self._record_path().unlink(missing_ok=True)
        self._release()
        return status

    def _release(self) -> None:
        if self._claim is not None:
            _CLAIMED.discard(self._claim)
            self._claim = None

    # -- rollback --------------------------------------------------------

    async def abort(self, keep: Optional[dict[str, int]] = None) -> str:
        """Undo Prepare.  Returns "destroyed", or "running" once Finish has
        resumed the guest here (then nothing is touched).  KEEP: node ->
        presync generation, images the source keeps as partial copies
        (flow.py): stopped cleanly, they stay with their record beside them,
        and it returns "kept" — all of them or none."""
        if self.handed_over:
            # resumed here, but a QEMU that died since holds no guest either:
            # then nobody can say which side's state is the one to keep
            alive = self.name is not None and self.state.read_pid(self.name) is not None
            return "running" if alive else "unknown"
        if self.mon is not None:
            await self.mon.close()
            self.mon = None
        if self.name is None or self.aborted:
            if self.new_state_dir:
                _remove_state_dir(self.state)
            return "destroyed"
        self.aborted = True
        clean = True
        if self.started:
            stopped = await stop_vm_async(self.state, self.name, force=True, timeout=5)
            clean = stopped.how in CLEAN_STOPS
            self.started = False
        kept = await in_thread(keep_images, {p.dest_path: (p.node, keep[p.node], p.fmt)
                                             for p in self.disks if keep and p.node in keep},
                               self.name, clean, self.ids)
        _remove(self.state, self.name, self.ids, self.dirs, self.new_vm_dir)
        if self.new_state_dir:
            _remove_state_dir(self.state)
        self.created.clear()
        self.ids.clear()
        self.dirs.clear()
        self._release()
        return "kept" if kept else "destroyed"


# (state dir, VM name) of the incoming migrations this process prepares: the
# record's owner pid cannot tell two sessions of one agent apart.
_CLAIMED: set[tuple[str, str]] = set()


def _claimed_elsewhere(state: StateDir, name: str) -> bool:
    """An incoming.json whose owner is another live process."""
    try:
        rec = json.loads((state.vm_dir(name) / RECORD).read_text())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(rec, dict) and rec.get("owner") != os.getpid() and owner_alive(rec)


def _made_by_presync(image: str) -> bool:
    """An image presync made (even one whose record no longer holds) is vmferry's
    to write; anything else on the destination is not, unless asked."""
    from vmferry.migration.desthost.presync_target import sidecar   # presync_target imports this module
    return sidecar(image).exists()


# how a QEMU stopped when it wrote back everything it cached
CLEAN_STOPS = ("powerdown", "quit", "sigterm")


def keep_images(keep: dict[str, tuple[str, int, str]], source: str, clean: bool,
                ids: dict[str, list[int]]) -> bool:
    """Vouch for KEEP's images (path -> node, presync generation, format) as
    partial copies: fsynced, with their record beside them, and taken out of
    IDS so that they are not removed with the rest.  All or none: a qcow2
    image whose QEMU did not stop cleanly may lack metadata it cached, and
    then nothing is kept.  Returns whether they were."""
    from vmferry.migration.desthost.presync_target import forget, write_record   # (a cycle, as above)
    if not keep or any(fmt != "raw" and not clean for _, _, fmt in keep.values()):
        return False
    done = []
    try:
        for path, (node, generation, _) in keep.items():
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            write_record(path, source, node, generation)
            done.append(path)
    except OSError:
        for path in done:
            forget(path)
        return False
    for path in keep:
        ids.pop(path, None)
    return True


def _remove(state: StateDir, name: str, ids: dict[str, list[int]], dirs: list[str],
            new_vm_dir: bool, policy: Optional[Policy] = None) -> None:
    remove_made(ids, dirs, policy)
    if new_vm_dir:
        shutil.rmtree(state.vm_dir(name), ignore_errors=True)
        run = state.runtime_dir(name)
        if run != state.vm_dir(name):
            shutil.rmtree(run, ignore_errors=True)
    else:
        (state.vm_dir(name) / RECORD).unlink(missing_ok=True)


def _remove_state_dir(state: StateDir) -> None:
    """A state directory this prepare made, if nothing but its lock file is in it."""
    with contextlib.suppress(OSError):
        if set(os.listdir(state.path)) <= {".lock"}:
            (state.path / ".lock").unlink(missing_ok=True)
            state.path.rmdir()


def _is_pid(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def _well_formed(rec: Any) -> bool:
    """A record as the agent writes it.  Records live where no source can
    write, but one that is not as written is left alone rather than trusted."""
    if not isinstance(rec, dict) or not _is_pid(rec.get("owner")):
        return False
    ids, dirs = rec.get("ids", {}), rec.get("dirs", [])
    return (isinstance(rec.get("created", []), list)
            and (rec.get("owner_start") is None or _is_pid(rec["owner_start"]))
            and isinstance(rec.get("boot_id", ""), str)
            and isinstance(rec.get("token", ""), str)
            and isinstance(rec.get("completed", False), bool)
            and isinstance(ids, dict) and isinstance(dirs, list)
            and all(isinstance(d, str) for d in dirs)
            and all(isinstance(k, str) and isinstance(v, list) and len(v) == 2
                    and all(isinstance(n, int) for n in v) for k, v in ids.items()))


def orphaned(records: Iterable[Path], owner: Optional[int] = None) -> list[tuple[Path, dict]]:
    """The well-formed records whose owner pid is OWNER, or, with no OWNER, a
    pid that is gone: the work of a process that died unfinished.  An owner
    that is not a pid is never taken for a dead one."""
    out = []
    for path in records:
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError, RecursionError):
            continue
        if not _well_formed(rec):
            continue
        if owner is not None and rec["owner"] != owner:
            continue
        if owner is None and owner_alive(rec):
            continue
        out.append((path, rec))
    return out


async def reap_orphans(state: StateDir, roots: Optional[list[str]],
                       owner: Optional[int] = None, name: Optional[str] = None,
                       keep: Optional[dict[str, tuple[str, int, str]]] = None) -> list[str]:
    """Undo every incoming migration in STATE (or only NAME's) whose owner is
    gone (or is OWNER): stop its QEMU, delete the images it created (those
    under ROOTS, None for anywhere, that are still the files it made).
    KEEP: as for keep_images, for NAME (recover keeping a partial copy);
    NAME is then in the result only if they were kept.  Returns the VM
    names."""
    done: list[str] = []
    if not state.path.is_dir():
        return done
    policy = Policy(storage_roots=roots,
                    state_dir=str(state.path) if roots is not None else None)
    dirs = [d for d in sorted(state.path.iterdir()) if d.name != IMAGES
            and NAME_RE.fullmatch(d.name) and d.is_dir() and not d.is_symlink()
            and (name is None or d.name == name)]
    for rec_path, rec in orphaned((d / RECORD for d in dirs), owner):
        if rec.get("completed") is True:
            continue        # the only complete state, perhaps: recover decides
        vm = rec_path.parent.name
        if handed_over(state, vm, rec.get("token")):
            continue        # it is this side's guest now: recover finishes the record
        clean = False
        if state.read_pid(vm) is not None:
            clean = (await stop_vm_async(state, vm, force=True, timeout=5)).how in CLEAN_STOPS
        ids = rec.get("ids", {})
        kept = keep_images(keep or {}, vm, clean, ids) if vm == name else False
        _remove(state, vm, ids, rec.get("dirs", []), rec.get("new_vm_dir") is True, policy)
        if kept or not keep:
            done.append(vm)
    return done


def handed_over(state: StateDir, name: str, token: Any) -> bool:
    """Whether migration TOKEN handed NAME's guest over to this side (RESUMED)."""
    try:
        return isinstance(token, str) and bool(token) and \
            (state.vm_dir(name) / RESUMED).read_text() == token
    except OSError:
        return False


def _write_durably(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


async def probe(state: StateDir, name: str, token: str) -> str:
    """Where the incoming migration TOKEN of NAME stands on this host, for
    recover:
      "running"       it resumed the guest here, and its QEMU runs
      "resumed-gone"  it resumed the guest here, and that QEMU has died since:
                      nobody can say which side's state is the one to keep
      "busy"          a session of this host's agent still works on it
      "completed"     everything arrived, the guest was not resumed
      "incoming"      prepared, not everything arrived
      "absent"        nothing of it here (never prepared, or undone)
      "unknown"       its QEMU runs but does not answer"""
    vm_dir = state.vm_dir(name)
    resumed = handed_over(state, name, token)
    alive = state.read_pid(name) is not None
    if resumed:
        return "running" if alive else "resumed-gone"
    if not (vm_dir / RECORD).exists() or not alive:
        return "absent"
    if (str(state.path), name) in _CLAIMED or _claimed_elsewhere(state, name):
        return "busy"
    try:
        # the CLI socket: the orchestrator's may still be held by a session
        async with Monitor(state.cli_socket(name), "destination", "recover") as mon:
            info = await mon.cmd("query-migrate")
    except MigrationError:
        return "unknown"
    return "completed" if info.get("status") == "completed" else "incoming"


async def _wait_for_finish_under_way(state: StateDir, name: str) -> None:
    """The source may have died in the middle of this host's Finish (after
    the hand-over mark, say), which then goes on here and holds the QEMU's
    monitor: wait for it to end rather than fail on the monitor, and then
    settle what it left (nothing, or a guest still to resume)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + FINISHING_WAIT_S
    while (str(state.path), name) in _CLAIMED or _claimed_elsewhere(state, name):
        if loop.time() > deadline:
            raise MigrationError(f"the destination is still finishing the migration of "
                                 f"{name}: run 'vmferry recover {name}' again in a minute",
                                 phase="finish")
        await asyncio.sleep(0.05)


def kept_record(state: StateDir, name: str, token: str) -> dict:
    """The record of NAME's incoming migration TOKEN that keep_for_recover
    left; UsageError when there is none (another migration's, or none)."""
    try:
        rec = json.loads((state.vm_dir(name) / RECORD).read_text())
    except (OSError, ValueError):
        rec = None
    if not (_well_formed(rec) and rec.get("completed") is True and token
            and rec.get("token") == token):
        raise UsageError(f"no migration of {name} that arrived here is waiting for its "
                         f"source's recover")
    return rec


async def undo_kept(state: StateDir, roots: Optional[list[str]], name: str,
                    token: str) -> None:
    """Undo an incoming migration keep_for_recover left (the source rolls back)."""
    rec = kept_record(state, name, token)
    if handed_over(state, name, token):
        raise UsageError(f"{name} was handed over to this host: it is not undone")
    if state.read_pid(name) is not None:
        await stop_vm_async(state, name, force=True, timeout=5)
    _remove(state, name, rec.get("ids", {}), rec.get("dirs", []),
            rec.get("new_vm_dir") is True,
            Policy(storage_roots=roots, state_dir=str(state.path) if roots else None))


async def finish_orphan(state: StateDir, name: str, token: str, *, resume: bool) -> str:
    """Finish an incoming migration whose source process died after the
    memory arrived: what Incoming.finish does, from the record alone."""
    await _wait_for_finish_under_way(state, name)
    inc = Incoming(state)
    inc.name = name
    inc.token = token
    inc.started = True
    inc.mon = await Monitor(state.qmp_socket(name), "destination", "finish").connect()
    inc.exports = [e["id"] for e in await inc.mon.cmd("query-block-exports")
                   if e["id"].startswith(EXPORT_ID)]
    if not inc.exports:
        await inc.mon.try_cmd("nbd-server-stop")   # a Finish cut short after its exports
    return await inc.finish(resume=resume)
