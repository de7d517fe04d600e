"""`vmferry --connect URI migrate --direct NAME DEST`: libvirt's managed direct
migration, driven from a management machine.

This machine talks to both hosts.  It reaches the destination's agent itself
(DEST as this machine names it), and on the source it runs `vmferry migrate
--relayed`, which does the source's phases — Begin, Perform, Confirm and
their rollback — with that host's VM, QEMU and journal.  Each request the
source has for the destination (hello, prepare, finish, abort, ...) comes
here as an agent request on that process's stdin and stdout, and this
machine passes it to the destination's agent and the reply back: the two
hosts exchange no request, only QEMU's data streams (the disks' NBD and the
memory stream), as in libvirt's direct migration.

Should this machine go away, each host sees its control connection close:
the destination's agent undoes an unfinished Prepare (or keeps a migration
that arrived in full, paused, for recover), as for a lost source, and the
source process sees its destination lost and rolls back, or, past the point
of no return, leaves an interrupted migration that `vmferry recover NAME`
resolves there.  A destination this machine loses is reported to the source
at once (a "lost" frame), and Ctrl-C here reaches the source (a "signal"
frame), which then aborts as at its own terminal.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from typing import Any, Callable, Optional

from vmferry.agent import protocol, transport
from vmferry.agent.transport import Target
from vmferry.errors import ConnectError, UsageError, VmferryError

_EOF = object()
# what the source's phases ask of the destination; nothing else is passed on
RELAYED_OPS = frozenset({
    "hello", "ping", "prepare", "finish", "abort", "keep_partial", "check", "probe",
    "finish_orphan", "undo_orphan", "presync_check", "presync_unwritten", "presync_forget"})


def source_argv(argv: list[str]) -> list[str]:
    """The source's command: the same migration, its destination relayed
    through us, its progress as JSON lines for us to show."""
    return ["migrate", "--relayed", "--progress=json"] + [
        a for a in argv[1:] if a != "--direct"
        and not a.startswith(("--progress", "--verbose"))]


def run(args: argparse.Namespace, t: Target, argv: list[str]) -> int:
    if args.command == "recover":
        # a --direct migration that the source could not finish alone: its
        # destination through this machine again
        return asyncio.run(_drive(None, t, transport.parse(args.direct),
                                  ["recover", "--relayed", *argv[1:]]))
    if args.tunnelled:
        raise UsageError("--tunnelled goes with --p2p (as with virsh): the streams ride "
                         "on the source's own connection to the destination")
    if args.detach:
        raise UsageError("--direct is driven from this machine: it cannot --detach "
                         "(--p2p can)")
    if args.dry_run:
        raise UsageError("--dry-run goes with --p2p through --connect")
    dest = transport.parse(args.dest)      # an agent this machine reaches: ssh:// or tls://
    return asyncio.run(_drive(args.progress, t, dest, source_argv(argv)))


async def _drive(progress: Optional[str], src: Target, dest: Target,
                 argv: list[str]) -> int:
    """Run ARGV (`migrate --relayed`, or `recover --relayed` with PROGRESS
    None) on SRC, relaying DEST's agent to it."""
    from vmferry.commands.migrate import MigrationDisplay, print_done
    from vmferry.migration.options import MigrateOptions
    from vmferry.migration.remote import RemoteDestination
    # the destination first: an unreachable one fails here, the source untouched
    destination = RemoteDestination(dest.uri)
    channel = await destination._connect(MigrateOptions())
    display = MigrationDisplay(progress)
    lines = _Lines(display)
    link: _Source = _OverSsh(src) if src.scheme == "ssh" else _OverTls(src)
    relay = _Relay(channel, link)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, relay.interrupt)
    loop.add_signal_handler(signal.SIGTERM, relay.interrupt)
    try:
        rc = await link.run(argv, relay.feed, lines)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        display.close()
        relay.stop()
        await link.close()
        await destination.close()
    if isinstance(link, _OverSsh) and rc == 255 and lines.held:
        raise ConnectError(f"cannot run vmferry on {src.host} over ssh: {lines.held[-1]}")
    if isinstance(link, _OverSsh) and rc == 127:
        raise ConnectError(f"{src.query.get('agent') or 'vmferry'} is not installed on "
                           f"{src.host} (or name it with ?agent=PATH)")
    lines.flush()
    if rc == 0 and lines.final is not None:
        print_done(lines.final, progress)
    if rc == 0 and lines.recovered:
        print(lines.recovered, flush=True)
    return rc


class _Source:
    """Where `migrate --relayed` runs: its frames to FEED, its stderr to LINES."""

    async def run(self, argv: list[str], feed: Callable[[Any], None],
                  lines: "_Lines") -> int:
        raise NotImplementedError

    async def send(self, frame: dict[str, Any]) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        pass


class _OverSsh(_Source):
    """vmferry on the source through the system ssh: the frames on its stdin
    and stdout, its lines on stderr."""

    def __init__(self, t: Target) -> None:
        self.t = t
        self.proc: Optional[asyncio.subprocess.Process] = None
        self._lock = asyncio.Lock()

    async def run(self, argv: list[str], feed: Callable[[Any], None],
                  lines: "_Lines") -> int:
        try:
            self.proc = proc = await asyncio.create_subprocess_exec(
                *transport.ssh_argv(self.t, argv), stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                start_new_session=True, limit=protocol.MAX_FRAME + 8)
        except OSError as e:
            raise UsageError(f"cannot run ssh: {e.strerror or e}") from e
        assert proc.stdout is not None and proc.stderr is not None

        async def frames(stream: asyncio.StreamReader) -> None:
            with contextlib.suppress(protocol.ProtocolError):   # it died mid-frame
                while (frame := await protocol.read_frame(stream, eof=_EOF)) is not _EOF:
                    feed(frame)

        async def text(stream: asyncio.StreamReader) -> None:
            while raw := await stream.readline():
                lines.line(raw.decode(errors="replace").rstrip("\n"))
        await asyncio.gather(frames(proc.stdout), text(proc.stderr))
        return await proc.wait()

    async def send(self, frame: dict[str, Any]) -> None:
        stdin = self.proc.stdin if self.proc else None
        if stdin is None:
            return
        async with self._lock:
            with contextlib.suppress(ConnectionError, OSError, RuntimeError):
                stdin.write(protocol.encode(frame))
                await stdin.drain()

    async def close(self) -> None:
        if self.proc is not None and self.proc.stdin is not None:
            with contextlib.suppress(OSError, RuntimeError):
                self.proc.stdin.close()


class _OverTls(_Source):
    """vmferry on the source through its agent (run with --allow-control):
    the frames travel as the agent's "relay" frames and "relay_input"
    requests, its lines as "output" frames."""

    def __init__(self, t: Target) -> None:
        from vmferry.migration.remote import RemoteDestination
        self.agent = RemoteDestination(t.uri)
        self.channel: Any = None

    async def run(self, argv: list[str], feed: Callable[[Any], None],
                  lines: "_Lines") -> int:
        from vmferry.migration.options import MigrateOptions
        self.channel = await self.agent._connect(MigrateOptions())
        r = await self.channel.call("command", argv=argv, relay=True, on_relay=feed,
                                    on_output=lambda _, data: lines.text(data))
        return int(r.get("rc", 1))

    async def send(self, frame: dict[str, Any]) -> None:
        if self.channel is None:
            return
        with contextlib.suppress(VmferryError):
            await self.channel.call("relay_input", frame=frame)

    async def close(self) -> None:
        await self.agent.close()


class _Relay:
    """The source's requests to the destination's agent, and the replies back."""

    def __init__(self, channel: Any, source: _Source) -> None:
        self.channel, self.source = channel, source
        self._tasks: set[asyncio.Task] = set()
        self._watch = asyncio.ensure_future(self._watch_destination())

    def feed(self, frame: Any) -> None:
        """A frame from the source: requests only, each answered in its turn."""
        if isinstance(frame, dict) and isinstance(frame.get("op"), str):
            self._spawn(self._answer(frame))

    def _spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, frame: dict[str, Any]) -> None:
        rid, op = frame.get("id"), frame["op"]
        if op == "bye":
            # our own channel says its goodbye when we close it
            await self.source.send({"id": rid, "ok": True, "result": {}})
            return
        if op not in RELAYED_OPS:
            await self.source.send(protocol.error_reply(
                rid, protocol.PROTOCOL_ERROR, f"the management machine relays no {op!r}"))
            return
        args = frame.get("args", {})
        try:
            reply = await self.channel.call_raw(op, args if isinstance(args, dict) else {})
        except VmferryError:
            return     # the destination is lost: _watch_destination said so
        if isinstance(reply, dict):
            reply["id"] = rid
            await self.source.send(reply)

    async def _watch_destination(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            try:
                await asyncio.shield(self.channel.lost)
            except VmferryError as e:
                await self.source.send({"lost": str(e)})

    def interrupt(self) -> None:
        """Ctrl-C or SIGTERM here: the source aborts (and says so in its last line)."""
        self._spawn(self.source.send({"signal": "INT"}))

    def stop(self) -> None:
        self._watch.cancel()
        for task in self._tasks:
            task.cancel()


class _Lines:
    """The source's stderr: its progress events into our display; its own
    lines pass at once; anything else (ssh's, a shell's) is held, to be said
    should ssh fail, else at the end."""

    def __init__(self, display: Any) -> None:
        self.display = display
        self.final: Optional[Any] = None       # the "done" event's JobInfo
        self.recovered = ""                    # the "recovered" event's line
        self.held: list[str] = []
        self._partial = ""

    def text(self, data: str) -> None:
        *whole, self._partial = (self._partial + data).split("\n")
        for line in whole:
            self.line(line)

    def line(self, line: str) -> None:
        from vmferry.migration.job import JobInfo
        event = _event(line)
        if event is not None and event.get("event") == "recovered":
            self.recovered = str(event.get("line", ""))
        elif event is not None:
            info = JobInfo(**{k: v for k, v in event.items()
                              if k in JobInfo.__dataclass_fields__})
            if event.get("event") == "done":
                self.final = info
            else:
                self.display(info)
        elif line.startswith("vmferry"):
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
        elif line.strip():
            self.held.append(line)

    def flush(self) -> None:
        if self._partial:
            self.line(self._partial)
            self._partial = ""
        for line in self.held:
            sys.stderr.write(line + "\n")
        self.held = []


def _event(line: str) -> Optional[dict[str, Any]]:
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) and event.get("event") in (
        "progress", "done", "recovered") else None
