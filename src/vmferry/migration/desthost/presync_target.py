"""The destination side of a presync: the images, qemu-nbd serving them for
the duration, and the record beside each image (IMAGE.vmferry-presync.json)
that a later migration checks before trusting the image.

One class, PresyncTarget, used in this process for a local:// destination
and by the agent for ssh:// and tls:// ones.  The agent also keeps, while a
presync runs, STATE/presync-PID-N.json naming the images it created, so that
its reaper can remove them should the agent be killed (reap_orphans).
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

from vmferry.aio import in_thread
from vmferry.errors import MigrationError, UsageError
from vmferry.migration.desthost.incoming import (
    Policy, claim_file, create_image, image_size, make_parents, orphaned, remove_made,
)
from vmferry.migration.plan import file_id
from vmferry.migration.spans import coalesce
from vmferry.vm.state import owner_record

START_TIMEOUT = 10.0
RUN_DIR_PREFIX = "vmferry-presync-"
TLS_ID = "vmferry-tls"
_SEQ = itertools.count(1)


def sidecar(image: str) -> Path:
    return Path(image + ".vmferry-presync.json")


def identity(path: str) -> dict[str, int]:
    st = os.stat(path)
    return {"ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def check(image: str, generation: Any) -> str:
    """'' when IMAGE is still what presync GENERATION left, else why not."""
    try:
        side = json.loads(sidecar(image).read_text())
    except (OSError, ValueError):
        side = {}
    try:
        ident = identity(image)
    except OSError:
        ident = None
    if side.get("generation") != generation or side.get("identity") != ident:
        return f"destination image {image} was changed or replaced"
    return ""


def check_paths(policy: Policy, image: str) -> None:
    """IMAGE and the record beside it, which presync writes and removes too."""
    policy.check_path("destination image", image)
    policy.check_path("presync record", str(sidecar(image)))


def write_record(image: str, source: str, node: str, generation: int) -> None:
    sidecar(image).write_text(json.dumps({
        "source": source, "node": node, "generation": generation,
        "identity": identity(image), "time": time.time()}))


def forget(image: str, discard: bool = False) -> None:
    """Drop IMAGE's record; with DISCARD, the image too — only one that has
    a record, i.e. that presync or a kept partial copy wrote."""
    if discard and sidecar(image).exists():
        with contextlib.suppress(FileNotFoundError):
            os.unlink(image)
    sidecar(image).unlink(missing_ok=True)


def unwritten(image: str, fmt: str) -> Optional[list[list[int]]]:
    """The spans of IMAGE that hold nothing written (holes, or zero clusters
    of a qcow2), coalesced: what a mirror into this fresh image may not have
    copied.  None when the file system cannot tell holes from data (it then
    claims more data than the file has blocks): such an image vouches for
    nothing.  Read with the image's QEMU stopped."""
    size = image_size(image) if fmt == "qcow2" else os.path.getsize(image)
    if size is None:
        return None
    holes: list[tuple[int, int]] = []
    if fmt == "raw":
        fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
        try:
            data, pos = 0, 0
            while pos < size:
                try:
                    start = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError as e:
                    if e.errno != errno.ENXIO:      # ENXIO: only a hole is left
                        raise
                    start = size
                if start > pos:
                    holes.append((pos, start))
                if start >= size:
                    break
                pos = min(os.lseek(fd, start, os.SEEK_HOLE), size)
                data += pos - start
            if data > os.fstat(fd).st_blocks * 512 + (1 << 20):
                return None
        finally:
            os.close(fd)
    else:
        out = subprocess.run(["qemu-img", "map", "-U", "--output=json", "-f", fmt, image],
                             capture_output=True, text=True)
        if out.returncode != 0:
            return None
        for m in json.loads(out.stdout):
            if not m.get("data") or m.get("zero"):
                holes.append((m["start"], m["start"] + m["length"]))
    return [[s, e] for s, e in coalesce(holes)]


def _die_with_parent() -> None:
    # qemu-nbd must not outlive whoever started it (a killed agent or presync)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)      # PR_SET_PDEATHSIG


def _accepts(path: Path) -> bool:
    """Whether a server listens on PATH: the socket file appears at bind(),
    a moment before listen(), and a connection then is refused."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


class _Server:
    """qemu-nbd serving one image (through its format, so qcow2 is written as
    qcow2) on a Unix socket or a TCP address, with TLS when asked."""

    def __init__(self, image: str, fmt: str) -> None:
        self.image, self.fmt = image, fmt
        self.proc: Optional[subprocess.Popen] = None
        self.sock: Optional[Path] = None

    def _argv(self, tls_dir: Optional[str]) -> list[str]:
        argv = ["qemu-nbd", "-t", "-f", self.fmt, "-e", "4", "--cache=writeback"]
        if tls_dir:
            argv += ["--object", f"tls-creds-x509,id={TLS_ID},dir={tls_dir},endpoint=server,"
                                 f"verify-peer=on", "--tls-creds", TLS_ID]
        return argv

    def _spawn(self, argv: list[str], listen: Optional[int] = None) -> subprocess.Popen:
        argv = argv + [self.image]
        if listen is not None:
            # Socket activation: qemu-nbd serves the socket it finds as fd 3
            # when LISTEN_PID is its own pid, which the shell's is after exec.
            argv = ["sh", "-c", f'exec 3<&{listen} {listen}<&-; LISTEN_FDS=1 '
                                f'LISTEN_PID=$$ exec "$@"', "qemu-nbd"] + argv
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE,
                                pass_fds=(listen,) if listen is not None else (),
                                preexec_fn=_die_with_parent)

    async def _wait(self, ready: Any, early_only: bool = False) -> str:
        """'' once READY() holds, or qemu-nbd's complaint if it exited.  EARLY_ONLY:
        the socket already listens, so only give it a moment to fail (a bad
        image, a locked file)."""
        deadline = time.monotonic() + (0.2 if early_only else START_TIMEOUT)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return self.proc.stderr.read().decode(errors="replace").strip() or \
                    f"qemu-nbd exited with status {self.proc.returncode}"
            if ready():
                return ""
            await asyncio.sleep(0.01)
        if early_only:
            return ""
        self.stop()
        raise MigrationError(f"qemu-nbd did not serve {self.image} within "
                             f"{START_TIMEOUT:g} s", phase="presync")

    async def start_unix(self, sock: Path) -> dict[str, Any]:
        self.sock = sock
        sock.unlink(missing_ok=True)
        self.proc = self._spawn(self._argv(None) + ["-k", str(sock)])
        err = await self._wait(lambda: _accepts(sock))
        if err:
            raise MigrationError(f"qemu-nbd could not serve {self.image}: {err}",
                                 phase="presync")
        return {"type": "unix", "path": str(sock)}

    async def start_tcp(self, address: str, ports: tuple[int, int],
                        tls_dir: Optional[str]) -> dict[str, Any]:
        """Bind the port here and hand the listening socket to qemu-nbd
        (systemd-style socket activation): the port is provably ours, never
        another server's that happened to answer first."""
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        for port in range(ports[0], ports[1] + 1):
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.bind((address, port))
                sock.listen(16)
            except OSError as e:
                sock.close()
                if e.errno == errno.EADDRINUSE:
                    continue
                raise MigrationError(f"cannot listen on {address}:{port} to serve "
                                     f"{self.image}: {e.strerror}", phase="presync") from e
            try:
                self.proc = self._spawn(self._argv(tls_dir), listen=sock.fileno())
            finally:
                sock.close()          # qemu-nbd holds it now
            err = await self._wait(lambda: False, early_only=True)
            if err:
                raise MigrationError(f"qemu-nbd could not serve {self.image}: {err}",
                                     phase="presync")
            return {"type": "inet", "host": address, "port": str(port)}
        raise MigrationError(f"no free port in {ports[0]}-{ports[1]} on {address} to serve "
                             f"{self.image}", phase="presync")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stderr:
            self.proc.stderr.close()
        if self.sock is not None:
            self.sock.unlink(missing_ok=True)


class PresyncTarget:
    """One presync's destination images: checked against the host's policy,
    created when missing and asked for, served until close()."""

    def __init__(self, policy: Optional[Policy] = None, *, run_dir: Optional[Path] = None,
                 tcp: Optional[tuple[str, tuple[int, int]]] = None,
                 tls_dir: Optional[str] = None, record_dir: Optional[Path] = None) -> None:
        self.policy = policy or Policy()
        self.run_dir = run_dir           # Unix sockets here, for local:// destinations
        self.tcp = tcp                   # or (address, ports) for remote ones
        self.tls_dir = tls_dir
        self.servers: dict[str, _Server] = {}
        self.created: list[str] = []
        self.ids: dict[str, list[int]] = {}      # created path -> [st_dev, st_ino]
        self.dirs: list[str] = []                # folders made for them
        # what a reaper needs if this process dies before close() or abort()
        self.record = (record_dir / f"presync-{os.getpid()}-{next(_SEQ)}.json"
                       if record_dir is not None else None)
        # a state directory made only to hold the record goes with it
        self._made_record_dir = record_dir is not None and not record_dir.exists()

    def _save_record(self) -> None:
        if self.record is not None:
            self.record.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.record.with_suffix(".tmp")
            try:
                tmp.write_text(json.dumps({**owner_record(), "created": self.created,
                                           "ids": self.ids, "dirs": self.dirs,
                                           "run_dir": str(self.run_dir or "")}))
                os.replace(tmp, self.record)
            except OSError:
                tmp.unlink(missing_ok=True)      # a full file system keeps nothing of it
                raise

    def _drop_record(self) -> None:
        if self.record is not None:
            self.record.unlink(missing_ok=True)
            if self._made_record_dir:
                folder = self.record.parent
                with contextlib.suppress(OSError):
                    if set(os.listdir(folder)) <= {".lock"}:
                        (folder / ".lock").unlink(missing_ok=True)
                        folder.rmdir()

    def check(self, disks: list[dict[str, Any]], create: bool,
              overwrite: bool) -> tuple[dict[str, dict[str, Any]], list[str]]:
        """What open() refuses, every problem of it (a dry run lists them all,
        open() refuses at the first), and per node whether its image would be
        created and why its record does not hold.  Reads only, and only the
        paths the policy allows."""
        out: dict[str, dict[str, Any]] = {}
        problems: list[str] = []
        allowed = []
        for d in disks:
            try:
                check_paths(self.policy, d["dest_path"])
                allowed.append(d)
            except UsageError as e:
                problems.append(str(e))
        if len({d["node"] for d in disks}) != len(disks) or \
                len({os.path.realpath(d["dest_path"]) for d in allowed}) != len(allowed):
            problems.append("presync names a disk or a destination image twice")
        for d in allowed:
            try:
                out[d["node"]] = self._check_image(d, create, overwrite)
            except UsageError as e:
                problems.append(str(e))
        return out, problems

    def _check_image(self, d: dict[str, Any], create: bool, overwrite: bool) -> dict[str, Any]:
        path = d["dest_path"]
        if d.get("source_id") and file_id(path) == d["source_id"]:
            raise UsageError(f"the destination image of {d['node']} is the source's own "
                             f"file {path}: map it elsewhere with --disk-map")
        stale = check(path, d.get("generation")) if d.get("generation") else "first"
        have = image_size(path)
        if have is None:
            if not create:
                raise UsageError(f"destination image {path} does not exist: create it "
                                 f"or pass --create-disks")
        elif have < d["size"]:
            raise UsageError(f"destination image {path} is smaller than the source's "
                             f"disk: grow it or remove it and pass --create-disks")
        elif (self.policy.protect_existing and not overwrite
              and not sidecar(path).exists()):
            raise UsageError(f"destination image {path} already exists and was not made "
                             f"by presync: pass --overwrite-disks to replace its contents")
        return {"created": have is None, "stale": stale}

    async def open(self, disks: list[dict[str, Any]], *, create: bool,
                   overwrite: bool) -> dict[str, dict[str, Any]]:
        """DISKS: node, dest_path, fmt, size and the presync generation the
        source believes the image holds (None for a first presync).  Returns,
        per node, where the image is served, whether it was created, and why
        its record does not hold ('' when it does)."""
        self._save_record()      # its socket folder, should this process die
        out, problems = await in_thread(self.check, disks, create, overwrite)
        if problems:
            raise UsageError(problems[0])
        for d in disks:
            path = d["dest_path"]
            if out[d["node"]]["created"]:
                self.dirs += await in_thread(make_parents, path)
                self.created.append(path)
                self._save_record()         # before the image exists: never a leak
                self.ids[path] = await in_thread(claim_file, path)
                self._save_record()
                await in_thread(create_image, path, d["fmt"], d["size"], None, "raw")
            # A copy starts now: until close() writes a new record, the old one
            # must not vouch for a half-written image.
            forget(path)
            srv = _Server(path, d["fmt"])
            self.servers[d["node"]] = srv
            if self.tcp is not None:
                out[d["node"]]["server"] = await srv.start_tcp(*self.tcp, self.tls_dir)
            else:
                assert self.run_dir is not None
                out[d["node"]]["server"] = await srv.start_unix(
                    self.run_dir / f"vmferry-presync-dst-{d['node']}.sock")
        return out

    async def close(self, records: dict[str, dict[str, Any]], source: str) -> None:
        """Stop serving.  RECORDS: node -> generation, for the images copied in
        full or in part successfully; every other image this presync created
        is removed."""
        paths = {}
        for node, srv in self.servers.items():
            await in_thread(srv.stop)
            paths[node] = srv.image
        self.servers.clear()
        done = {paths[n] for n in records if n in paths}
        # Images about to be vouched for leave the orphan record first: a reaper
        # must never delete an image its record says is good.
        self.created = [p for p in self.created if p not in done]
        self.ids = {p: i for p, i in self.ids.items() if p not in done}
        # a folder holding a vouched-for image stays (rmdir leaves it anyway);
        # with nothing to vouch for there is nothing to save (on a full file
        # system it could not be, and the removal below must still happen)
        if done:
            self._save_record()
        for node, gen in records.items():
            if node in paths:
                write_record(paths[node], source, node, int(gen))
        self._remove()

    async def abort(self) -> None:
        for srv in self.servers.values():
            await in_thread(srv.stop)
        self.servers.clear()
        self._remove()

    def _remove(self) -> None:
        remove_made(self.ids, self.dirs)
        self.created.clear()
        self.ids.clear()
        self.dirs.clear()
        self._drop_record()


def reap_orphans(folder: Path, roots: Optional[list[str]],
                 owner: Optional[int] = None) -> list[str]:
    """Remove the images of every presync in FOLDER (the agent's state
    directory) whose process is gone (or is OWNER) and that never finished —
    those under ROOTS (None: anywhere, for a local:// destination) that are
    still the files it made; returns their paths.
    Their qemu-nbd died with that process (parent-death signal) and their
    records were dropped when the copy started, so nothing vouches for them."""
    removed: list[str] = []
    policy = Policy(storage_roots=roots, state_dir=str(folder))
    for rec_path, rec in orphaned(sorted(folder.glob("presync-*.json")), owner):
        removed += remove_made(rec.get("ids", {}), rec.get("dirs", []), policy)
        run_dir = rec.get("run_dir")
        if isinstance(run_dir, str) and os.path.basename(run_dir).startswith(RUN_DIR_PREFIX):
            # a local presync's private socket folder (see LocalDestination)
            shutil.rmtree(run_dir, ignore_errors=True)
        rec_path.unlink(missing_ok=True)
    return removed


__all__ = ["PresyncTarget", "check", "check_paths", "forget", "reap_orphans", "sidecar",
           "unwritten"]
