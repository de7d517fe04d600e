"""`vmferry agent`: the destination side of migrations from other hosts.

One Session per controlling connection (ssh's stdio, or one mutual-TLS
connection).  Requests are validated before anything runs; a malformed or
unknown one gets an error reply and the session goes on, except for a frame
that breaks the framing itself, after which the connection is closed.
Whatever a session prepared and did not finish is torn down when its
connection drops or falls silent for longer than the client's keepalive
allows, as libvirt destroys an incoming domain whose client went away.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import signal
import socket
import stat
import sys
import tomllib
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

from vmferry import __version__
from vmferry.agent import listener, protocol, transport, tunnel, wire
from vmferry.agent.pki import Pki
from vmferry.agent.protocol import Args, ProtocolError
from vmferry.agent.transport import DEFAULT_KEEPALIVE, KEEPALIVE_COUNT
from vmferry.aio import in_thread
from vmferry.commands.connect import COMMANDS
from vmferry.errors import UsageError, VmferryError
from vmferry.migration.desthost import presync_target
from vmferry.migration.desthost.check import check_incoming, check_presync_target
from vmferry.migration.desthost.incoming import (
    DEFAULT_PORTS, IMAGES, Incoming, Network, Policy, finish_orphan, handed_over,
    kept_record, probe, undo_kept,
)
from vmferry.migration.options import MigrateOptions
from vmferry.migration.plan import DiskPlan
from vmferry.migration.desthost.presync_target import PresyncTarget
from vmferry.vm.qemu import detect_accel
from vmferry.vm.spec import parse_spec
from vmferry.vm.state import StateDir

DEFAULT_TLS_PORT = 16514            # libvirt's TLS port
_EOF = object()             # not None: a frame of JSON null is a frame, and answered
_TOKEN_RE = re.compile(r"[0-9a-f]{0,64}")


@dataclasses.dataclass
class AgentConfig:
    state: StateDir
    storage_roots: list[str]
    pki: Pki
    ports: tuple[int, int] = DEFAULT_PORTS
    # extra QEMU arguments from a source's spec reach this host's QEMU command
    # line unchecked: only where the operator says so
    allow_extra_args: bool = False
    # vmferry commands from any client it accepts (--connect tls://): the power
    # of this agent's user over its VMs, so only where the operator says so
    allow_control: bool = False

    def policy(self, protect_existing: bool = True) -> Policy:
        """Images under the roots only, and never among the agent's own files."""
        return Policy(storage_roots=self.storage_roots, protect_existing=protect_existing,
                      state_dir=str(self.state.path))


def _log(text: str) -> None:
    # stderr is the ssh channel, which is gone exactly when teardown matters
    try:
        sys.stderr.write(f"vmferry agent: {text}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


@dataclasses.dataclass
class _IncomingRequest:
    incoming: Incoming
    spec: Any
    disks: list[DiskPlan]
    opts: MigrateOptions
    accel: Optional[str]
    presynced: frozenset[str]


class Session:
    """One controlling connection and the (at most one) migration it drives."""

    def __init__(self, cfg: AgentConfig, local_address: Optional[str],
                 tunnels: Optional[tunnel.TlsRelay] = None) -> None:
        self.cfg = cfg
        # a tls:// agent's C relay (agent/tunnel.py): --tunnelled streams come
        # through its port, each naming a route this session made
        self.tunnels = tunnels
        self.routes: list[str] = []
        self.local_address = local_address      # where the source reached us
        self.incoming: Optional[Incoming] = None
        self.presync: Any = None                 # a PresyncTarget while one is served
        self.greeted = False
        self.finished = False
        self._bye = asyncio.Event()
        self.keepalive = DEFAULT_KEEPALIVE
        self.keep_generation = 0                 # see op_keep_partial
        self._busy = asyncio.Lock()              # one phase at a time
        self._send_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self.commands: set[asyncio.subprocess.Process] = set()   # op_command's
        self.relayed: Optional[asyncio.subprocess.Process] = None  # the one with relay

    # -- the connection --------------------------------------------------

    async def serve(self, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        why = "the source closed the connection"
        try:
            while not self._bye.is_set():
                # Before hello, the client's keepalive is not known yet.
                silence = self.keepalive * KEEPALIVE_COUNT + 2
                try:
                    frame = await asyncio.wait_for(self._next(reader), silence)
                except asyncio.TimeoutError:
                    why = f"no word from the source for {silence:g} s"
                    break
                except ProtocolError as e:
                    await self._send(writer, protocol.error_reply(
                        None, protocol.PROTOCOL_ERROR, str(e)))
                    why = f"protocol error: {e}"
                    break
                except (ConnectionError, OSError):
                    why = "the connection to the source broke"
                    break
                if frame is _EOF:
                    break
                task = asyncio.ensure_future(self._answer(writer, frame))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                if isinstance(frame, dict) and frame.get("op") == "hello":
                    # its keepalive must govern the very next wait, not the one after
                    await asyncio.gather(task, return_exceptions=True)
        finally:
            for proc in self.commands:
                if proc is self.relayed and proc.stdin is not None:
                    # its channel closes: it rolls back, as with a lost destination
                    proc.stdin.close()
                    continue
                # as a terminal's hang-up: a detached migration it follows goes on
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGHUP)
            for task in list(self._tasks):
                # let a phase in progress end before undoing it (and a relayed
                # migration its rollback)
                await asyncio.gather(task, return_exceptions=True)
            if self.incoming is not None and not self.finished:
                arrived = await self.incoming.arrived()
                if arrived:
                    # in post-copy this side runs the guest, and no other has all of it
                    _log(f"{why} during post-copy: keeping the incoming VM "
                         f"{self.incoming.name}, which runs the guest now, for its "
                         f"source's 'vmferry recover'" if arrived == "postcopy"
                         else f"{why} after the whole migration arrived: keeping the "
                         f"incoming VM {self.incoming.name} paused for its source's "
                         f"'vmferry recover'")
                    await self.incoming.keep_for_recover()
                else:
                    _log(f"{why}: removing the incoming VM {self.incoming.name}"
                         + (" (its disk images stay as a partial copy)"
                            if self.keep_generation else ""))
                    await self._abort({d.node: self.keep_generation
                                       for d in self.incoming.disks}
                                      if self.keep_generation else None)
            self._unroute()
            if self.presync is not None:
                _log(f"{why}: stopping an unfinished presync")
                await self.presync.abort()
                self.presync = None
            writer.close()

    async def _next(self, reader: asyncio.StreamReader) -> Any:
        """The next frame, or _EOF at the end of the stream or once "bye"
        is answered (the source may keep its end open a moment longer)."""
        read = asyncio.ensure_future(protocol.read_frame(reader, eof=_EOF))
        bye = asyncio.ensure_future(self._bye.wait())
        try:
            await asyncio.wait({read, bye}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            bye.cancel()
            if not read.done():
                read.cancel()
        return read.result() if read.done() and not read.cancelled() else _EOF

    async def _send(self, writer: asyncio.StreamWriter, obj: Any) -> None:
        async with self._send_lock:
            try:
                writer.write(protocol.encode(obj))
                await writer.drain()
            except (ConnectionError, OSError):
                pass       # the reader loop sees the same break and cleans up

    async def _answer(self, writer: asyncio.StreamWriter, frame: Any) -> None:
        rid = frame.get("id") if isinstance(frame, dict) else None
        try:
            if not isinstance(frame, dict) or not isinstance(frame.get("op"), str):
                raise ProtocolError("a request is an object with an \"op\" string")
            if not isinstance(rid, int) or isinstance(rid, bool):
                raise ProtocolError("a request needs an integer \"id\"")
            op = frame["op"]
            handler = self.OPS.get(op)
            if handler is None:
                raise ProtocolError(f"unknown request {op!r}")
            if op != "hello" and not self.greeted:
                raise ProtocolError("the first request must be hello")
            if op == "command":
                result = await self._command(writer, rid, Args(op, frame.get("args", {})))
            else:
                result = await handler(self, Args(op, frame.get("args", {})))
            reply = {"id": rid, "ok": True, "result": result}
            if op == "bye":
                await self._send(writer, reply)
                self._bye.set()
                return
        except VmferryError as e:
            reply = protocol.error_reply(rid, protocol.kind_of(e), str(e))
            if getattr(e, "phase", None):
                reply["error"]["phase"] = e.phase
        except Exception as e:          # a bug answers with an error, never a crash
            reply = protocol.error_reply(rid, protocol.MIGRATION, f"internal error: {e!r}")
        await self._send(writer, reply)

    # -- requests --------------------------------------------------------

    async def op_hello(self, a: Args) -> dict[str, Any]:
        a.only("protocol", "version", "keepalive")
        version = a.get("protocol", int)
        if version != protocol.PROTOCOL:
            raise ProtocolError(f"protocol {version} is not spoken here (this agent "
                                f"speaks {protocol.PROTOCOL}): install the same vmferry "
                                f"version on both hosts")
        keepalive = a.get("keepalive", (int, float), DEFAULT_KEEPALIVE)
        if not 0.1 <= keepalive <= 600:
            raise UsageError("keepalive must be 0.1 to 600 seconds")
        self.keepalive = float(keepalive)
        self.greeted = True
        tls = (self.cfg.pki.dir / "qemu" / "server-cert.pem").is_file()
        return {"protocol": protocol.PROTOCOL, "version": __version__,
                "host": socket.gethostname(), "accel": detect_accel(), "tls": tls,
                "storage_roots": self.cfg.storage_roots}

    async def op_ping(self, a: Args) -> dict[str, Any]:
        # PAD: a dry run's probe of the link (the frame limit bounds it)
        a.only("pad")
        a.get("pad", str, "")
        return {}

    def _incoming_request(self, a: Args, *, check: bool = False) -> _IncomingRequest:
        """A prepare's arguments (or a check's: the same, less the token, with
        each disk's allocated bytes), validated, and the Incoming to run it."""
        a.only("spec", "disks", "options", "accel", "presynced", "nbd", "migrate", "tunnel",
               *(() if check else ("token",)))
        try:
            spec = parse_spec(a.get("spec", str), source="the source's VM spec")
        except RecursionError:
            raise ProtocolError(f"{a.op}: the VM spec is nested too deeply") from None
        disks = [wire.disk_plan(d, spec, a.op, allocated=check) for d in a.get("disks", list)]
        if len({d.node for d in disks}) != len(disks):
            raise ProtocolError(f"{a.op}: a disk is named twice")
        if spec.extra_args and not self.cfg.allow_extra_args:
            raise UsageError("the VM spec has extra_args, which would reach the destination's "
                             "QEMU command line: allow them with allow_extra_args = true in "
                             "the agent's agent.toml")
        opts = wire.options(Args(f"{a.op} options", a.get("options", dict)))
        accel = a.get("accel", str, None)
        if accel not in (None, "kvm", "tcg"):
            raise ProtocolError("accel must be kvm or tcg")
        presynced = a.get("presynced", list, [])
        if not all(isinstance(n, str) for n in presynced):
            raise ProtocolError(f"{a.op}: presynced is a list of disk nodes")
        nbd = self._listen(Args(f"{a.op} nbd", a.get("nbd", dict, {})))
        mig = self._listen(Args(f"{a.op} migrate", a.get("migrate", dict, {})))
        # --tunnelled: Unix sockets in the VM's folder, which the source's ssh
        # forwards to; nothing listens on the network
        tunnel = a.get("tunnel", bool, False)
        tls_dir = None
        if opts.tls:
            try:
                tls_dir = self.cfg.pki.qemu_dir("server")
            except UsageError:
                if not check:
                    raise
                # a check lists it with the rest (desthost/check.py)
        incoming = Incoming(self.cfg.state, network=Network(
            tcp=not tunnel, tunnel=tunnel, nbd=nbd, migrate=mig, tls_dir=tls_dir),
            policy=self.cfg.policy())
        return _IncomingRequest(incoming, spec, disks, opts, accel, frozenset(presynced))

    async def op_check(self, a: Args) -> dict[str, Any]:
        """A prepare's dry run: every check, reading only (desthost/check.py)."""
        r = self._incoming_request(a, check=True)
        found = await in_thread(lambda: check_incoming(r.incoming, r.spec, r.disks, r.opts,
                                                       accel=r.accel, presynced=r.presynced))
        return dataclasses.asdict(found)

    async def op_prepare(self, a: Args) -> dict[str, Any]:
        r = self._incoming_request(a)
        token = _token(a.get("token", str, ""))
        async with self._busy:
            if self.incoming is not None:
                raise UsageError("this connection has already prepared a migration")
            incoming = r.incoming
            try:
                prepared = await incoming.prepare(r.spec, r.disks, r.opts, accel=r.accel,
                                                  presynced=r.presynced, token=token)
            except BaseException:
                # a refused or failed prepare leaves nothing behind, and the
                # connection free to prepare again
                await incoming.abort()
                raise
            self.incoming = incoming
            tokens = self._route(prepared) if incoming.network.tunnel else None
        return {"nbd": prepared.nbd_server, "migrate_uri": prepared.migrate_uri,
                "exports": prepared.exports, "dest_paths": prepared.dest_paths,
                "fresh": sorted(prepared.fresh),
                **({"tunnel": tokens} if tokens else {})}

    def _route(self, prepared: Any) -> Optional[dict[str, str]]:
        """--tunnelled to this tls:// agent: a token per stream, which a
        tunnel connection must present to reach QEMU's Unix socket; valid
        while this session lasts.  Over ssh (no relay) ssh forwards instead."""
        if self.tunnels is None:
            return None
        ends = {"migrate": prepared.migrate_uri.removeprefix("unix:")}
        if prepared.nbd_server:
            ends["nbd"] = str(prepared.nbd_server["path"])
        tokens = {}
        for stream, path in ends.items():
            tokens[stream] = tunnel.new_token()
            self.tunnels.route(tokens[stream], path)
            self.routes.append(tokens[stream])
        return tokens

    def _unroute(self) -> None:
        while self.routes:
            self.tunnels.unroute(self.routes.pop())

    def _listen(self, a: Args) -> tuple[str, tuple[int, int]]:
        a.only("address", "port")
        address = _address(a) or self.local_address or "0.0.0.0"
        port = a.get("port", int, None)
        if port is not None and not 1 <= port <= 65535:
            raise UsageError(f"port {port} is not a TCP port")
        return address, (port, port) if port else self.cfg.ports

    async def op_finish(self, a: Args) -> dict[str, Any]:
        a.only("resume")
        resume = a.get("resume", bool)
        async with self._busy:
            if self.incoming is None:
                raise UsageError("finish before prepare")
            try:
                state = await self.incoming.finish(resume=resume)
            finally:
                # resumed here, even if a later step failed: never torn down
                self.finished = self.incoming.handed_over
        return {"state": state}

    async def op_abort(self, a: Args) -> dict[str, Any]:
        a.only("keep")
        keep = a.get("keep", dict, None)
        if keep is not None and not all(
                isinstance(n, str) and wire.NODE_RE.fullmatch(n) and isinstance(g, int)
                and not isinstance(g, bool) and 0 < g < 1 << 62 for n, g in keep.items()):
            raise ProtocolError("abort: keep maps disk nodes to presync generations")
        return {"outcome": await self._abort(keep)}

    async def _abort(self, keep: Optional[dict[str, int]] = None) -> str:
        async with self._busy:
            if self.incoming is None:
                return "destroyed"
            self._unroute()
            return await self.incoming.abort(keep)

    # -- presync: the images served by qemu-nbd on this host's address

    async def op_presync_check_open(self, a: Args) -> dict[str, Any]:
        """A presync's dry run: presync_open's checks, reading only, with no
        record written (desthost/check.py)."""
        a.only("disks", "create_disks", "overwrite_disks", "tls", "address")
        disks = [wire.presync_disk(d, "presync_check_open", allocated=True)
                 for d in a.get("disks", list)]
        address = _address(a) or self.local_address or "0.0.0.0"
        tls_problem = ""
        if a.get("tls", bool, False):
            try:
                self.cfg.pki.qemu_dir("server")
            except UsageError as e:
                tls_problem = f"--tls: {e}"
        target = PresyncTarget(self.cfg.policy(), tcp=(address, self.cfg.ports))
        found = await in_thread(lambda: check_presync_target(
            target, disks, create=a.get("create_disks", bool, False),
            overwrite=a.get("overwrite_disks", bool, False), tls_problem=tls_problem))
        return dataclasses.asdict(found)

    async def op_presync_open(self, a: Args) -> dict[str, Any]:
        a.only("disks", "create_disks", "overwrite_disks", "tls", "address")
        disks = [wire.presync_disk(d) for d in a.get("disks", list)]
        tls = a.get("tls", bool, False)
        address = _address(a) or self.local_address or "0.0.0.0"
        async with self._busy:
            if self.presync is not None:
                raise UsageError("this connection already serves a presync")
            self.presync = PresyncTarget(
                self.cfg.policy(),
                tcp=(address, self.cfg.ports),
                tls_dir=self.cfg.pki.qemu_dir("server") if tls else None,
                record_dir=self.cfg.state.path)
            try:
                return {"disks": await self.presync.open(
                    disks, create=a.get("create_disks", bool, False),
                    overwrite=a.get("overwrite_disks", bool, False))}
            except BaseException:
                await self.presync.abort()
                self.presync = None
                raise

    async def op_presync_close(self, a: Args) -> dict[str, Any]:
        a.only("records", "source")
        records = a.get("records", dict)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in records.values()):
            raise ProtocolError("presync_close: records map nodes to generations")
        async with self._busy:
            if self.presync is None:
                raise UsageError("presync_close without presync_open")
            await self.presync.close(records, a.get("source", str))
            self.presync = None
        return {}

    async def op_presync_check(self, a: Args) -> dict[str, Any]:
        a.only("disks")
        out = {}
        for node, item in a.get("disks", dict).items():
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
                raise ProtocolError("presync_check: disks map nodes to [path, generation]")
            presync_target.check_paths(self.cfg.policy(False), item[0])
            out[node] = presync_target.check(item[0], item[1])
        return {"disks": out}

    async def op_presync_unwritten(self, a: Args) -> dict[str, Any]:
        """What a kept copy's image has not written: only of an image that
        presync or a kept copy left (its record beside it), under the roots."""
        a.only("disks")
        out = {}
        for node, item in a.get("disks", dict).items():
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
                    and item[1] in ("raw", "qcow2")):
                raise ProtocolError("presync_unwritten: disks map nodes to [path, raw|qcow2]")
            presync_target.check_paths(self.cfg.policy(False), item[0])
            if not presync_target.sidecar(item[0]).exists():
                raise UsageError(f"{item[0]} is no presynced or kept copy")
            out[node] = await in_thread(presync_target.unwritten, item[0], item[1])
        return {"disks": out}

    async def op_presync_forget(self, a: Args) -> dict[str, Any]:
        a.only("paths", "discard")
        paths = a.get("paths", list)
        discard = a.get("discard", bool, False)
        for path in paths:
            if not isinstance(path, str):
                raise ProtocolError("presync_forget: paths are strings")
            presync_target.check_paths(self.cfg.policy(False), path)
        for path in paths:
            presync_target.forget(path, discard)
        return {}

    async def op_probe(self, a: Args) -> dict[str, Any]:
        """Where an incoming migration of NAME stands (for a source's
        'vmferry recover'); answers about VMs of this agent's state only."""
        a.only("name", "token")
        return {"state": await probe(self.cfg.state, a.get("name", str),
                                     _token(a.get("token", str)))}

    async def op_keep_partial(self, a: Args) -> dict[str, Any]:
        """Should this session end unfinished, keep the disk images as partial
        copies of presync generation GENERATION: the source's native engine
        knows how far it got and records that itself (recover, flow.py)."""
        a.only("generation")
        generation = a.get("generation", int)
        if not 0 < generation < 1 << 62:
            raise ProtocolError("keep_partial: a generation is a positive integer")
        if self.incoming is None:
            raise UsageError("keep_partial before prepare")
        self.keep_generation = generation
        return {}

    async def op_finish_orphan(self, a: Args) -> dict[str, Any]:
        """recover on the source completes a migration that arrived here and
        whose source went away (keep_for_recover), or settles one handed over
        here whose Finish was cut short (resumes it if asked, drops its record)."""
        a.only("name", "token", "resume")
        name, token = a.get("name", str), _token(a.get("token", str))
        if not handed_over(self.cfg.state, name, token):
            kept_record(self.cfg.state, name, token)
        return {"state": await finish_orphan(self.cfg.state, name, token,
                                             resume=a.get("resume", bool))}

    async def op_undo_orphan(self, a: Args) -> dict[str, Any]:
        """recover on the source rolls such a migration back."""
        a.only("name", "token")
        await undo_kept(self.cfg.state, self.cfg.storage_roots, a.get("name", str),
                        _token(a.get("token", str)))
        return {}

    async def op_bye(self, a: Args) -> dict[str, Any]:
        a.only()          # _answer ends the session once this reply is sent
        return {}

    async def _command(self, writer: asyncio.StreamWriter, rid: int,
                       a: Args) -> dict[str, Any]:
        """`vmferry --connect tls://...`: one vmferry command run against this
        agent's state directory, its output streamed back as it comes (frames
        with this request's id and "output"), then its exit status.

        RELAY (`migrate --direct`, commands/direct.py): the command speaks
        the agent protocol on its stdin and stdout with the client, through
        us: each frame it writes goes to the client as {"id": this request's,
        "relay": FRAME}, and the client's "relay_input" requests are written
        to its stdin.  One at a time per session."""
        a.only("argv", "relay")
        relay = a.get("relay", bool, False)
        if not self.cfg.allow_control:
            raise UsageError("this agent takes no commands: start it with --allow-control "
                             "(or allow_control = true in its agent.toml)")
        argv = a.get("argv", list)
        if not (argv and len(argv) <= 256 and all(isinstance(x, str) and "\0" not in x
                                                   and len(x) <= 4096 for x in argv)):
            raise ProtocolError("command: argv is a list of at most 256 strings")
        if argv[0] not in COMMANDS:
            raise UsageError(f"'{argv[0][:40]}' does not run through --connect (these do: "
                             f"{', '.join(COMMANDS)})")
        if relay and (argv[1:2] != ["--relayed"] or argv[0] not in ("migrate", "recover")
                      or self.relayed is not None):
            raise ProtocolError("command: only one 'migrate --relayed' or 'recover "
                                "--relayed' relays at a time")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "vmferry", "--state-dir", str(self.cfg.state.path), *argv,
            stdin=asyncio.subprocess.PIPE if relay else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            start_new_session=True, limit=protocol.MAX_FRAME + 8)
        self.commands.add(proc)
        if relay:
            self.relayed = proc

        async def pump(stream: asyncio.StreamReader, name: str) -> None:
            while chunk := await stream.read(65536):
                await self._send(writer, {"id": rid, "output": name,
                                          "data": chunk.decode(errors="replace")})

        async def frames(stream: asyncio.StreamReader) -> None:
            with contextlib.suppress(ProtocolError):
                while (frame := await protocol.read_frame(stream, eof=_EOF)) is not _EOF:
                    await self._send(writer, {"id": rid, "relay": frame})
            while await stream.read(65536):
                pass         # whatever a broken command still writes: never block it
        try:
            assert proc.stdout is not None and proc.stderr is not None
            await asyncio.gather(frames(proc.stdout) if relay else pump(proc.stdout, "stdout"),
                                 pump(proc.stderr, "stderr"))
            return {"rc": await proc.wait()}
        finally:
            self.commands.discard(proc)
            if self.relayed is proc:
                self.relayed = None

    async def op_relay_input(self, a: Args) -> dict[str, Any]:
        """A frame for the relayed command's stdin (see _command)."""
        a.only("frame")
        frame = a.get("frame", dict)
        proc = self.relayed
        if proc is None or proc.stdin is None:
            raise UsageError("relay_input: no command relays here")
        try:
            proc.stdin.write(protocol.encode(frame))
            await proc.stdin.drain()
        except (ConnectionError, OSError):
            raise UsageError("relay_input: the relayed command has ended") from None
        return {}

    async def op_command_signal(self, a: Args) -> dict[str, Any]:
        """Ctrl-C at the client: to this session's commands (a migration it
        follows is then aborted, as at a terminal)."""
        a.only("signal")
        sig = {"INT": signal.SIGINT, "TERM": signal.SIGTERM}.get(a.get("signal", str))
        if sig is None:
            raise ProtocolError("command_signal: signal is INT or TERM")
        for proc in self.commands:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
        return {}

    async def op_command(self, a: Args) -> dict[str, Any]:
        raise AssertionError("answered by _command")      # (it needs the request id)

    OPS: dict[str, Callable[["Session", Args], Awaitable[dict[str, Any]]]] = {
        "hello": op_hello, "ping": op_ping, "prepare": op_prepare, "check": op_check,
        "finish": op_finish,
        "abort": op_abort, "bye": op_bye, "presync_open": op_presync_open,
        "presync_close": op_presync_close, "presync_check": op_presync_check,
        "presync_unwritten": op_presync_unwritten,
        "presync_forget": op_presync_forget, "presync_check_open": op_presync_check_open,
        "probe": op_probe,
        "finish_orphan": op_finish_orphan, "undo_orphan": op_undo_orphan,
        "keep_partial": op_keep_partial, "command": op_command,
        "command_signal": op_command_signal, "relay_input": op_relay_input}


def _address(a: Args) -> Optional[str]:
    """An address to listen on, as a source may name it: a host name or IP
    address, which the system (or QEMU) then resolves or refuses."""
    address = a.get("address", str, None)
    if address is not None and ("\0" in address or len(address) > 255):
        raise ProtocolError(f"{a.op}: address {address[:80]!r} is not a host name or "
                            f"IP address")
    return address


def _token(token: str) -> str:
    if not _TOKEN_RE.fullmatch(token):
        raise ProtocolError("a migration token is up to 64 hex digits")
    return token


# -- transports ----------------------------------------------------------

def check_stdio() -> None:
    """UsageError unless stdin and stdout are what asyncio can wait on: a file
    or /dev/null would hang the session until its keepalive gave up."""
    for fd, what in ((0, "input"), (1, "output")):
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or os.isatty(fd)):
            raise UsageError(f"agent --stdio: standard {what} must be a pipe or a socket "
                             f"(as ssh gives it), not a file or /dev/null; to serve "
                             f"over the network use --listen")


async def serve_stdio(cfg: AgentConfig) -> None:
    """One session on stdin/stdout (what ssh runs; transport.take_stdio)."""
    check_stdio()
    reader, writer = await transport.pipe_streams(*transport.take_stdio(),
                                                  protocol.MAX_FRAME + 8)
    # ssh tells us which of our addresses the source dialled
    conn = os.environ.get("SSH_CONNECTION", "").split()
    session = Session(cfg, conn[2] if len(conn) == 4 else None)
    await _until_signal(session.serve(reader, writer))


async def serve_tls(cfg: AgentConfig, host: str, port: int,
                    ready: Optional[Callable[[], None]] = None) -> None:
    """A long-running agent: every connection must present a client
    certificate signed by the CA, or the handshake fails and no request is
    ever read (listener.py bounds what such peers may hold)."""
    ctx = cfg.pki.server_context()
    socks = listener.listen(host, port)
    cap = listener.pending_cap()
    try:
        tunnels = tunnel.server(cfg.pki, cap)
    except BaseException:
        for s in socks:
            s.close()
        raise

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      local: str) -> None:
        await Session(cfg, local or None, tunnels).serve(reader, writer)

    try:
        _log(f"listening on {host}:{port} (mutual TLS, certificates in {cfg.pki.dir})")
        if ready:
            ready()
        await _until_signal(asyncio.gather(
            listener.Listener(ctx, session, _log, protocol.MAX_FRAME + 8, cap=cap,
                              tunnel=tunnels.adopt).serve(socks),
            _log_refusals(tunnels)))
    finally:
        tunnels.close()
        for s in socks:
            s.close()


async def _log_refusals(tunnels: tunnel.TlsRelay, every: float = 1.0) -> None:
    """The C relay only counts the tunnel connections it closes: the log says
    so, at most a line per interval as for the listener's own refusals."""
    say = listener.Throttle(_log)
    seen = {"refused": 0, "failed": 0}
    while True:
        await asyncio.sleep(every)
        st = tunnels.stats()
        for kind, what in (("refused", "refused"), ("failed", "broke off")):
            if st[kind] > seen[kind]:
                # one line per interval and reason: a flood stays a line, and
                # a real peer's different trouble is not held behind it
                say(f"tunnel-{kind}: {st['last_error']}",
                    f"{what} {st[kind] - seen[kind]} tunnel connection(s): "
                    f"{st['last_error']}")
                seen[kind] = st[kind]


async def _until_signal(work: Awaitable[None]) -> None:
    """Run WORK; SIGTERM, SIGINT and SIGHUP cancel it, so that sessions tear
    down what they prepared before the agent exits."""
    task = asyncio.ensure_future(work)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        pass


def load_config(state: StateDir, roots: list[str], pki_dir: Optional[Path],
                ports: Optional[tuple[int, int]] = None,
                allow_control: bool = False) -> AgentConfig:
    """Settings from the command line, else from STATE/agent.toml (what an
    ssh:// source gets, as it cannot pass options to the agent):
        storage_roots = ["/srv/images"]     # default: STATE/images alone
        pki = "/etc/pki"                    # default: /etc/pki
        port_range = [49152, 49215]
        allow_extra_args = false            # a source spec's extra QEMU arguments
        allow_control = false               # vmferry commands from clients (--connect)
    """
    conf = state.path / "agent.toml"
    data: dict[str, Any] = {}
    if conf.is_file():
        try:
            data = tomllib.loads(conf.read_text())
        except (OSError, ValueError) as e:
            raise UsageError(f"{conf}: {e}") from e
    if not roots:
        roots = data.get("storage_roots", [])
        if not isinstance(roots, list) or not all(isinstance(r, str) for r in roots):
            raise UsageError(f"{conf}: storage_roots must be a list of folders")
    if pki_dir is None:
        pki = data.get("pki", "/etc/pki")
        if not isinstance(pki, str):
            raise UsageError(f"{conf}: pki must be a folder")
        pki_dir = Path(pki)
    if ports is None:
        r = data.get("port_range", list(DEFAULT_PORTS))
        if (not isinstance(r, list) or len(r) != 2 or not all(isinstance(x, int) for x in r)
                or not 1 <= r[0] <= r[1] <= 65535):
            raise UsageError(f"{conf}: port_range must be [LOW, HIGH]")
        ports = (r[0], r[1])
    allow = data.get("allow_extra_args", False)
    if not isinstance(allow, bool):
        raise UsageError(f"{conf}: allow_extra_args must be true or false")
    control = data.get("allow_control", False) or allow_control
    if not isinstance(control, bool):
        raise UsageError(f"{conf}: allow_control must be true or false")
    # The default root is a folder of the state directory, not all of it: the
    # rest holds the agent's records and this file, which no source may write.
    roots = [os.path.abspath(r) for r in roots] or [str(state.path / IMAGES)]
    return AgentConfig(state=state, storage_roots=roots, pki=Pki(pki_dir), ports=ports,
                       allow_extra_args=allow, allow_control=control)
