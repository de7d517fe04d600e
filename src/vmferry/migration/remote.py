"""RemoteDestination: Prepare and Finish run by a vmferry agent on another
host, reached over ssh (`ssh://[user@]host[:port][/state-dir]`, which runs
`vmferry agent --stdio` there, as libvirt's qemu+ssh:// runs its helper) or
over mutual TLS (`tls://host[:port]`, a long-running `vmferry agent
--listen`).  Only requests and replies travel on this channel; the disks
and the memory stream go straight from QEMU to QEMU, or with --tunnelled
through the control connection's route: ssh's own forwards of Unix sockets
over ssh://, the C relay's TLS connections to the agent's one port over
tls:// (agent/tunnel.py).

URI options (query string): keyfile, known_hosts, no_verify=1 and agent
(the remote vmferry command) for ssh; keepalive=SECONDS for both.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Optional

from vmferry import __version__
from vmferry.agent import protocol, transport, tunnel, wire
from vmferry.agent.pki import Pki
from vmferry.agent.transport import KEEPALIVE_COUNT, Target
from vmferry.errors import MigrationError, UsageError, VmferryError
from vmferry.migration.destination import (
    Destination, DestinationCheck, Prepared, destination_spec,
)
from vmferry.migration.options import MigrateOptions, parse_tcp_uri
from vmferry.migration.plan import DiskPlan

CONNECT_TIMEOUT = 30.0
PROBE_STATES = ("running", "resumed-gone", "busy", "completed", "incoming", "absent",
                "unknown")
WILDCARDS = ("", "0.0.0.0", "::", "[::]")
PROBE_FRAME = 256 << 10         # well below the agent's frame limit


class Channel:
    """Requests to an agent over one byte stream.  A reader task matches
    replies to requests; a keepalive task pings, so that a peer that went
    silent (a cut link stalls rather than resets) is noticed within
    KEEPALIVE_COUNT pings.  Either failure resolves `lost`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 where: str, keepalive: float,
                 proc: Optional[subprocess.Popen] = None,
                 stderr: Optional[asyncio.StreamReader] = None,
                 relayed: bool = False) -> None:
        self.reader, self.writer, self.where = reader, writer, where
        self.keepalive = keepalive
        self.proc = proc
        # through a management machine (migrate --direct, commands/direct.py):
        # it may also say that the destination is lost, or pass on a Ctrl-C
        self.relayed = relayed
        self.lost: asyncio.Future = asyncio.get_running_loop().create_future()
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        # request id -> where its output frames go (the agent's "command")
        self._streams: dict[int, Callable[[str, str], None]] = {}
        # request id -> where a relayed command's frames go (migrate --direct)
        self._relays: dict[int, Callable[[Any], None]] = {}
        self._tasks = [asyncio.ensure_future(self._read()),
                       asyncio.ensure_future(self._ping())]
        self.stderr_tail: list[str] = []
        if stderr is not None:
            self._tasks.append(asyncio.ensure_future(self._read_stderr(stderr)))

    def _lose(self, why: str) -> None:
        if self.lost.done():
            return
        tail = "; ".join(self.stderr_tail[-2:])
        whom = "the management machine relaying to" if self.relayed else \
            "the destination agent at"
        err = MigrationError(f"lost {whom} {self.where}: {why}"
                             + (f" ({tail})" if tail else ""))
        self.lost.set_exception(err)
        self.lost.exception()          # retrieved here: nobody has to wait on it
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(err)
        self._pending.clear()

    async def _read(self) -> None:
        try:
            while True:
                frame = await protocol.read_frame(self.reader)
                if frame is None:
                    if self.proc is not None:
                        # ssh's last words tell "Permission denied" from a crash
                        await self._proc_exit(2)
                    self._lose("the connection closed")
                    return
                rid = frame.get("id") if isinstance(frame, dict) else None
                if self.relayed and isinstance(frame, dict) and rid is None:
                    if isinstance(frame.get("lost"), str):
                        self._lose(frame["lost"][:500])
                        return
                    sig = {"INT": signal.SIGINT, "TERM": signal.SIGTERM}.get(
                        frame.get("signal"))
                    if sig is not None:
                        # as the same key at our own terminal: the flow rolls back
                        os.kill(os.getpid(), sig)
                        continue
                if isinstance(frame, dict) and "output" in frame and rid in self._streams:
                    self._streams[rid](str(frame["output"]), str(frame.get("data", "")))
                    continue
                if isinstance(frame, dict) and "relay" in frame and rid in self._relays:
                    self._relays[rid](frame["relay"])
                    continue
                fut = self._pending.pop(rid, None) if isinstance(rid, int) else None
                if fut is None:
                    # id null: the agent refuses the connection itself (a late
                    # reply to a request we gave up on is not that)
                    if isinstance(frame, dict) and frame.get("ok") is False and \
                            frame.get("id") is None:
                        self._lose(f"it refused the connection: "
                                   f"{frame.get('error', {}).get('message')}")
                        return
                    continue
                if not fut.done():
                    fut.set_result(frame)
        except (protocol.ProtocolError, ConnectionError, OSError) as e:
            self._lose(str(e) or type(e).__name__)

    async def _read_stderr(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            text = line.decode(errors="replace").strip()
            if text:
                self.stderr_tail = (self.stderr_tail + [text])[-5:]

    async def _ping(self) -> None:
        while not self.lost.done():
            await asyncio.sleep(self.keepalive)
            try:
                await asyncio.wait_for(self.call("ping"), self.keepalive * KEEPALIVE_COUNT)
            except asyncio.TimeoutError:
                self._lose(f"no answer for {self.keepalive * KEEPALIVE_COUNT:g} s "
                           f"(network down?)")
            except MigrationError:
                return

    async def call(self, op: str, *, on_output: Optional[Callable[[str, str], None]] = None,
                   on_relay: Optional[Callable[[Any], None]] = None,
                   **args: Any) -> dict[str, Any]:
        """The reply to OP; ON_OUTPUT(stream, text) takes the output frames
        that come before it (the agent's "command"), ON_RELAY(frame) a relayed
        command's frames."""
        reply = await self.call_raw(op, args, on_output=on_output, on_relay=on_relay)
        if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
            raise protocol.ProtocolError(f"the agent sent a malformed reply to {op}")
        if not reply["ok"]:
            protocol.raise_error(op, reply.get("error"))
        result = reply.get("result")
        return result if isinstance(result, dict) else {}

    async def call_raw(self, op: str, args: dict[str, Any], *,
                       on_output: Optional[Callable[[str, str], None]] = None,
                       on_relay: Optional[Callable[[Any], None]] = None) -> Any:
        """The agent's reply frame to OP as it came (a relay passes it on)."""
        if self.lost.done():
            raise self.lost.exception()
        rid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        if on_output is not None:
            self._streams[rid] = on_output
        if on_relay is not None:
            self._relays[rid] = on_relay
        try:
            try:
                self.writer.write(protocol.encode({"id": rid, "op": op, "args": args}))
                await self.writer.drain()
            except (ConnectionError, OSError) as e:
                self._lose(f"cannot send {op}: {e}")
            return await fut
        finally:
            self._pending.pop(rid, None)
            self._streams.pop(rid, None)
            self._relays.pop(rid, None)
            if fut.done() and not fut.cancelled():
                fut.exception()           # retrieved, whoever stopped waiting

    async def _proc_exit(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.proc.poll() is None and loop.time() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.05)       # and its stderr read to the end

    async def close(self) -> None:
        if not self.lost.done():
            with contextlib.suppress(MigrationError, protocol.ProtocolError,
                                     asyncio.TimeoutError):
                await asyncio.wait_for(self.call("bye"), 5)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(OSError, RuntimeError):
            self.writer.close()
        if self.proc is not None:
            _end(self.proc)
        if not self.lost.done():
            self.lost.cancel()


class RemoteDestination(Destination):
    def __init__(self, uri: str, ssh: Optional[subprocess.Popen] = None,
                 relay: Optional[tuple[IO[bytes], IO[bytes]]] = None) -> None:
        """SSH: an ssh process already started for URI (see transport.spawn_ssh),
        which this destination then owns.  RELAY: (input, output) of a channel
        that a management machine relays to URI's agent (migrate --direct)."""
        self.target: Target = transport.parse(uri)
        self.uri = uri
        self.host = self.target.host
        self.keepalive = self.target.keepalive
        self._ssh = ssh
        self._relay = relay
        self.relayed = relay is not None
        self.channel: Optional[Channel] = None
        self.info: dict[str, Any] = {}
        self._presync_tls: Optional[str] = None
        self._tunnel_dir: Optional[str] = None    # --tunnelled: our forwards' sockets
        self._pki: Optional[Pki] = None           # tls://: the control channel's
        self._tunnel_relay: Optional[tunnel.TlsRelay] = None  # --tunnelled over tls://

    def __repr__(self) -> str:
        return str(self.target)

    # -- the channel -----------------------------------------------------

    async def _connect(self, opts: MigrateOptions) -> Channel:
        if self.channel is not None:
            return self.channel
        where = f"{self.host}"
        if self._relay is not None:
            if opts.tunnelled:
                raise UsageError("--tunnelled goes with --p2p (as with virsh): the "
                                 "streams ride on the source's own connection to "
                                 "the destination")
            reader, writer = await transport.pipe_streams(*self._relay,
                                                          protocol.MAX_FRAME + 8)
            self._relay = None
            self.channel = Channel(reader, writer, str(self), self.keepalive,
                                   relayed=True)
        elif self.target.scheme == "ssh":
            proc, self._ssh = self._ssh or transport.spawn_ssh(self.target,
                                                               tunnel=opts.tunnelled), None
            self._tunnel_dir = getattr(proc, "tunnel_dir", None)
            reader, writer = await transport.pipe_streams(proc.stdout, proc.stdin,
                                                          protocol.MAX_FRAME + 8)
            err = asyncio.StreamReader()
            await asyncio.get_running_loop().connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(err), proc.stderr)
            self.channel = Channel(reader, writer, f"ssh://{where}", self.keepalive, proc, err)
        else:
            # pki= in the URI: this host's certificates for the control channel
            # (what --connect has; a migration's --pki otherwise)
            pki_dir = Path(self.target.query["pki"]) if "pki" in self.target.query \
                else opts.pki_dir
            self._pki = Pki(pki_dir)        # and for --tunnelled's relay
            ctx = self._pki.client_context()
            port = self.target.port or 16514
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(
                    self.host, port, ssl=ctx, server_hostname=self.host,
                    limit=protocol.MAX_FRAME + 8), CONNECT_TIMEOUT)
            except (OSError, asyncio.TimeoutError) as e:
                raise MigrationError(f"cannot reach the agent at tls://{self.host}:{port}: "
                                     f"{_why(e)}", phase="prepare") from e
            self.channel = Channel(reader, writer, f"tls://{where}:{port}", self.keepalive)
        try:
            self.info = await asyncio.wait_for(self.channel.call(
                "hello", protocol=protocol.PROTOCOL, version=__version__,
                keepalive=self.keepalive), CONNECT_TIMEOUT)
        except asyncio.TimeoutError:
            await self.channel.close()
            self.channel = None
            raise MigrationError(f"the agent at {self} did not answer within "
                                 f"{CONNECT_TIMEOUT:g} s", phase="prepare") from None
        except BaseException:
            await self.channel.close()
            self.channel = None
            raise
        return self.channel

    def lost(self) -> Optional[asyncio.Future]:
        return self.channel.lost if self.channel else None

    async def connect(self, opts: MigrateOptions) -> None:
        await self._connect(opts)

    async def keep_on_loss(self, generation: int) -> None:
        assert self.channel is not None
        await self.channel.call("keep_partial", generation=generation)

    # -- the phases ------------------------------------------------------

    async def prepare(self, spec: Any, disks: list[DiskPlan], opts: MigrateOptions, *,
                      accel: Optional[str] = None,
                      presynced: frozenset[str] = frozenset(), token: str = "") -> Prepared:
        dspec = destination_spec(spec, opts)
        tls_dir = Pki(opts.pki_dir).qemu_dir("client") if opts.tls else None
        ch = await self._connect(opts)
        if opts.tls and not self.info.get("tls"):
            raise UsageError(f"--tls: the destination {self} has no QEMU server "
                             f"certificates (its PKI/qemu/server-cert.pem)")
        if opts.tunnelled and self.target.scheme == "ssh" and not self._tunnel_dir:
            raise UsageError(f"--tunnelled: the ssh connection to {self} was made without "
                             f"a control socket for its forwards")
        dhost, _ = _uri_host(opts.disks_uri, "--disks-uri")
        mhost, _ = _uri_host(opts.migrate_uri, "--migrate-uri")
        r = await ch.call("prepare", **_prepare_args(dspec, disks, opts, accel, presynced),
                          token=token)
        for d in disks:
            d.dest_path = r.get("dest_paths", {}).get(d.node, "")
        if opts.tunnelled:
            return await self._tunnel(r)
        nbd = dict(r.get("nbd") or {})
        if nbd:
            nbd["host"] = self._connect_host(dhost, nbd.get("host"))
        mig_host, _, mig_port = str(r.get("migrate_uri", "")).removeprefix("tcp:").rpartition(":")
        mig_host = self._connect_host(mhost, mig_host.strip("[]"))
        tls_host = nbd.get("host") if nbd else mig_host
        return Prepared(migrate_uri=f"tcp:{_bracket(mig_host)}:{mig_port}", nbd_server=nbd,
                        exports=dict(r.get("exports", {})),
                        dest_paths=dict(r.get("dest_paths", {})),
                        fresh=set(r.get("fresh", [])), tls_dir=tls_dir,
                        tls_hostname=tls_host if opts.tls else None)

    async def _tunnel(self, r: dict[str, Any]) -> Prepared:
        """--tunnelled: the agent's QEMU listens on Unix sockets of its host;
        a socket of ours in a private folder leads to each, so the source's
        QEMU reaches them through the agent's connection alone: forwarded by
        ssh, or over tls:// relayed by the C engine through the agent's port."""
        nbd = dict(r.get("nbd") or {})
        mig = str(r.get("migrate_uri", ""))
        if (nbd and nbd.get("type") != "unix") or not mig.startswith("unix:"):
            raise MigrationError("the agent did not listen on Unix sockets for --tunnelled",
                                 phase="prepare")
        if self.target.scheme == "tls":
            self._tunnel_dir = tempfile.mkdtemp(prefix="vmferry-tunnel-")
        assert self._tunnel_dir is not None
        local_mig = f"{self._tunnel_dir}/migrate.sock"
        ends = [("migrate", local_mig, mig[len("unix:"):])]
        if nbd:
            ends.append(("nbd", f"{self._tunnel_dir}/nbd.sock", str(nbd.get("path"))))
            nbd = {"type": "unix", "path": ends[-1][1]}
        if self.target.scheme == "tls":
            self._relay_to(r.get("tunnel"), ends)
        else:
            for _, local, remote in ends:
                await asyncio.get_running_loop().run_in_executor(
                    None, transport.forward, self.target, self._tunnel_dir, local, remote)
        return Prepared(migrate_uri=f"unix:{local_mig}", nbd_server=nbd,
                        exports=dict(r.get("exports", {})),
                        dest_paths=dict(r.get("dest_paths", {})),
                        fresh=set(r.get("fresh", [])))

    def _relay_to(self, tokens: Any, ends: list[tuple[str, str, str]]) -> None:
        """The C relay listens on our sockets and carries each connection to
        the agent's port, to the address the control channel reached, with
        the control channel's client certificate and the stream's token."""
        if not (isinstance(tokens, dict) and all(isinstance(tokens.get(s), str)
                                                 for s, _, _ in ends)):
            raise MigrationError(f"the agent at {self} (vmferry "
                                 f"{self.info.get('version', '?')}) relays no --tunnelled "
                                 f"streams: install vmferry {__version__} there",
                                 phase="prepare")
        assert self.channel is not None and self._pki is not None
        peer = self.channel.writer.get_extra_info("peername")
        self._tunnel_relay = tunnel.client(self._pki, str(peer[0]), int(peer[1]), self.host)
        for stream, local, _ in ends:
            self._tunnel_relay.listen(local, tokens[stream])

    async def check(self, spec: Any, disks: list[DiskPlan], opts: MigrateOptions, *,
                    accel: Optional[str] = None,
                    presynced: frozenset[str] = frozenset()) -> DestinationCheck:
        dspec = destination_spec(spec, opts)
        return await self._check("check", "a migration", opts, lambda: _prepare_args(
            dspec, disks, opts, accel, presynced, allocated=True))

    async def _check(self, op: str, what: str, opts: MigrateOptions,
                     args: Callable[[], dict[str, Any]]) -> DestinationCheck:
        """The agent's read-only OP (a dry run of WHAT), every problem as a line."""
        try:
            ch = await self._connect(opts)
            r = await ch.call(op, **args())
        except protocol.ProtocolError as e:
            return DestinationCheck(problems=[self._too_old(e, what)])
        except (VmferryError, OSError) as e:
            return DestinationCheck(problems=[str(e)] + _client_tls_problems(opts))
        # the agent says itself whether it has QEMU certificates for --tls
        out = DestinationCheck.from_wire(r)
        out.problems += _client_tls_problems(opts)
        return out

    def _too_old(self, e: Exception, what: str) -> str:
        """An agent from before dry runs refuses the request by name."""
        if "unknown request" in str(e):
            return (f"the agent at {self} (vmferry {self.info.get('version', '?')}) cannot "
                    f"check {what} without making it: install vmferry {__version__} there")
        return str(e)

    def transport(self, opts: MigrateOptions) -> str:
        if opts.tunnelled:
            if self.target.scheme == "ssh":
                return ("agent over ssh; disks and memory inside the ssh connection (Unix "
                        "sockets there, no TCP port)")
            return ("agent over tls; disks and memory through its TLS port, relayed by "
                    "vmferry (Unix sockets there, no other TCP port)")
        return (f"agent over {self.target.scheme}; disks and memory QEMU to QEMU over TCP"
                + (" with TLS" if opts.tls else ""))

    async def probe_link(self, seconds: float) -> Optional[float]:
        """What the agent's channel carries towards the destination: padded
        pings, each answered only once it arrived in full.  Through ssh's
        encryption or TLS, a lower bound of what QEMU's own streams get."""
        if self.channel is None or self.channel.lost.done():
            return None
        pad = "x" * PROBE_FRAME
        loop = asyncio.get_running_loop()
        start = loop.time()
        sent = 0
        try:
            while loop.time() - start < seconds:
                await asyncio.wait_for(self.channel.call("ping", pad=pad), seconds * 4)
                sent += PROBE_FRAME
        except (VmferryError, asyncio.TimeoutError):
            return None
        return sent / max(loop.time() - start, 1e-6)

    def _connect_host(self, asked: Optional[str], listening: Optional[str]) -> str:
        """Where the source dials: the host the user named for this stream,
        else the address the agent listens on, else the destination's host."""
        if asked:
            return asked
        if listening and listening not in WILDCARDS:
            return listening
        return self.host

    async def finish(self, opts: MigrateOptions, *, resume: bool) -> str:
        assert self.channel is not None
        r = await self.channel.call("finish", resume=resume)
        return str(r.get("state", "unknown"))

    async def abort(self, keep: Optional[dict[str, int]] = None) -> str:
        if self.channel is None:
            return "destroyed"      # nothing was prepared
        if self.channel.lost.done():
            return "unknown"        # the agent tears down by itself if it must
        try:
            r = await asyncio.wait_for(self.channel.call(
                "abort", **({"keep": keep} if keep else {})), 60)
        except (MigrationError, UsageError, protocol.ProtocolError, asyncio.TimeoutError):
            return "unknown"
        outcome = r.get("outcome")
        return outcome if outcome in ("destroyed", "running", "kept") else "unknown"

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()
            self.channel = None
        if self._ssh is not None:          # started early, never used
            self._tunnel_dir = getattr(self._ssh, "tunnel_dir", None)
            _end(self._ssh)
            self._ssh = None
        if self._tunnel_relay is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._tunnel_relay.close)
            self._tunnel_relay = None
        if self._tunnel_dir:
            shutil.rmtree(self._tunnel_dir, ignore_errors=True)
            self._tunnel_dir = None

    # -- recovery: the agent undid an unfinished migration when the source
    #    process that drove it went away; it only has to say where NAME is

    async def probe(self, name: str, token: str, opts: MigrateOptions) -> str:
        try:
            ch = await self._connect(opts)
            r = await asyncio.wait_for(ch.call("probe", name=name, token=token),
                                       CONNECT_TIMEOUT)
        except (MigrationError, UsageError, protocol.ProtocolError, asyncio.TimeoutError,
                OSError):
            return "unknown"
        state = r.get("state")
        return state if state in PROBE_STATES else "unknown"

    async def finish_orphan(self, name: str, token: str, *, resume: bool) -> Optional[str]:
        """The agent kept a migration that arrived when its source went away
        (Incoming.keep_for_recover); anything else it has undone itself."""
        try:
            r = await self.channel.call("finish_orphan", name=name, token=token,
                                        resume=resume) if self.channel else {}
        except UsageError:
            return None
        return str(r.get("state", "unknown"))

    async def undo_orphan(self, name: str, token: str = "",
                          keep: Optional[dict[str, tuple[str, int, str]]] = None) -> bool:
        if self.channel is not None and token:
            with contextlib.suppress(UsageError):
                await self.channel.call("undo_orphan", name=name, token=token)
        return False

    # -- presync: the agent serves the images with qemu-nbd on its address

    presync_ok = True

    async def presync_open(self, disks: list[dict[str, Any]],
                           opts: MigrateOptions) -> dict[str, dict[str, Any]]:
        ch = await self._connect(opts)
        self._presync_tls = Pki(opts.pki_dir).qemu_dir("client") if opts.tls else None
        host, _ = _uri_host(opts.disks_uri, "--disks-uri")
        r = await ch.call("presync_open", **_presync_args(disks, opts))
        out = dict(r.get("disks", {}))
        for t in out.values():
            t["server"]["host"] = self._connect_host(host, t["server"].get("host"))
        return out

    async def presync_check_open(self, disks: list[dict[str, Any]],
                                 opts: MigrateOptions) -> DestinationCheck:
        return await self._check("presync_check_open", "a presync", opts,
                                 lambda: _presync_args(disks, opts))

    def presync_uri(self, server: dict[str, Any]) -> str:
        host = _bracket(server["host"])
        if self._presync_tls:
            return f"nbds://{host}:{server['port']}/?tls-certificates={self._presync_tls}"
        return f"nbd://{host}:{server['port']}/"

    async def presync_close(self, records: dict[str, int], source: str) -> None:
        if self.channel is not None:
            await self.channel.call("presync_close", records=records, source=source)

    async def presync_check(self, items: dict[str, tuple[str, Any]],
                            opts: MigrateOptions) -> dict[str, str]:
        ch = await self._connect(opts)
        r = await ch.call("presync_check", disks={n: list(v) for n, v in items.items()})
        return {n: str(v) for n, v in r.get("disks", {}).items()}

    async def presync_unwritten(self, items: dict[str, tuple[str, str]],
                                opts: MigrateOptions) -> dict[str, Optional[list]]:
        ch = await self._connect(opts)
        r = await ch.call("presync_unwritten", disks={n: list(v) for n, v in items.items()})
        got = r.get("disks", {})
        return {n: got.get(n) if isinstance(got.get(n), list) else None for n in items}

    async def presync_forget(self, paths: list[str], discard: bool = False) -> None:
        if self.channel is not None:
            await self.channel.call("presync_forget", paths=paths,
                                    **({"discard": True} if discard else {}))


def _prepare_args(dspec: Any, disks: list[DiskPlan], opts: MigrateOptions,
                  accel: Optional[str], presynced: frozenset[str],
                  allocated: bool = False) -> dict[str, Any]:
    """A prepare's (or, with ALLOCATED, a check's) arguments as the agent reads
    them."""
    dhost, dport = _uri_host(opts.disks_uri, "--disks-uri")
    mhost, mport = _uri_host(opts.migrate_uri, "--migrate-uri")
    listen = opts.listen_address
    return dict(
        spec=dspec.to_toml(),
        disks=[wire.encode_disk(d, allocated) for d in disks],
        options=wire.encode_options(opts),
        accel=accel, presynced=sorted(presynced),
        nbd={"address": listen or dhost, "port": dport},
        migrate={"address": listen or mhost, "port": mport},
        **({"tunnel": True} if opts.tunnelled else {}))


def _client_tls_problems(opts: MigrateOptions) -> list[str]:
    """--tls: this host's QEMU client certificates, which prepare and
    presync_open look up first."""
    if not opts.tls:
        return []
    try:
        Pki(opts.pki_dir).qemu_dir("client")
    except UsageError as e:
        return [str(e)]
    return []


def _presync_args(disks: list[dict[str, Any]], opts: MigrateOptions) -> dict[str, Any]:
    """A presync_open's (or its check's) arguments as the agent reads them."""
    host, _ = _uri_host(opts.disks_uri, "--disks-uri")
    return dict(disks=disks, create_disks=opts.create_disks,
                overwrite_disks=opts.overwrite_disks, tls=opts.tls,
                address=opts.listen_address or host)


def _end(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for f in (proc.stdin, proc.stdout, proc.stderr):
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()


def _why(e: BaseException) -> str:
    if isinstance(e, asyncio.TimeoutError):
        return f"no answer within {CONNECT_TIMEOUT:g} s"
    return getattr(e, "reason", None) or getattr(e, "strerror", None) or str(e) or repr(e)


def _uri_host(uri: Optional[str], flag: str) -> tuple[Optional[str], Optional[int]]:
    return parse_tcp_uri(flag, uri) if uri else (None, None)


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host
