"""Accepting mutual-TLS connections so that no flood can lock a real source out.

Before its handshake a peer is nobody, so what it may hold is bounded: a
few seconds to finish the handshake, and a place among at most
`pending_cap()` unauthenticated connections — a newcomer evicts the oldest
one that has not said a word yet (else the oldest of all), so a real
source, whose TLS hello comes at once, is let in however many idle sockets
an attacker keeps open or opens in a burst.  When the process runs out of descriptors anyway
(EMFILE/ENFILE) the loop evicts, or else backs off, and says so once per
interval: asyncio's own server would retry and log a traceback per attempt.

A connection that opens with the relay's preface (tunnel.py) instead of a
TLS hello carries a --tunnelled stream: it is handed, preface read, to the
C relay, which bounds the rest of its handshake the same way (the time
left of HANDSHAKE_TIMEOUT, and at most `pending_cap()` still shaking hands,
the oldest evicted).
"""
from __future__ import annotations

import asyncio
import errno
import resource
import socket
import ssl
import time
from typing import Awaitable, Callable, Optional

from vmferry.agent.tunnel import PREFACE
from vmferry.errors import VmferryError

HANDSHAKE_TIMEOUT = 5.0           # seconds an unauthenticated peer may take
LOG_INTERVAL = 10.0               # at most one line per kind of trouble per interval
BACKOFF = 0.1                     # seconds between accept attempts without descriptors
_EXHAUSTED = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
# the peer gave up between its SYN and our accept: nothing to do
_GONE = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM}


def pending_cap() -> int:
    """Unauthenticated connections held at once: a quarter of the descriptors,
    at most 64, so the rest stay for sessions, QEMU's sockets and images."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return 64
    return max(4, min(64, soft // 4))


class Throttle:
    """One log line per interval and kind; the rest are counted into the next."""

    def __init__(self, log: Callable[[str], None], interval: float = LOG_INTERVAL) -> None:
        self._log, self.interval = log, interval
        self._last: dict[str, float] = {}
        self._held: dict[str, tuple[int, str]] = {}

    def __call__(self, kind: str, text: str) -> None:
        now = time.monotonic()
        if now - self._last.get(kind, float("-inf")) >= self.interval:
            self._last[kind] = now
            self._log(text)
            return
        count, _ = self._held.get(kind, (0, ""))
        self._held[kind] = (count + 1, text)
        if count == 0:
            asyncio.get_running_loop().call_later(self._last[kind] + self.interval - now,
                                                  self._flush, kind)

    def _flush(self, kind: str) -> None:
        count, text = self._held.pop(kind, (0, ""))
        if count:
            self._last[kind] = time.monotonic()
            self._log(f"{text} ({count} like it in the last {self.interval:g} s)")


def listen(host: str, port: int) -> list[socket.socket]:
    """Non-blocking listening sockets for every address HOST names."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise VmferryError(f"cannot listen on {host}:{port}: "
                           f"{getattr(e, 'strerror', None) or e}") from e
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, _, addr in dict.fromkeys(
                (i[0], i[1], i[2], "", i[4]) for i in infos):
            s = socket.socket(family, kind, proto)
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                s.bind(addr)
                s.listen(128)
            except OSError as e:
                raise VmferryError(f"cannot listen on {host}:{port}: "
                                   f"{e.strerror or e}") from e
            s.setblocking(False)
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


Session = Callable[[asyncio.StreamReader, asyncio.StreamWriter, str], Awaitable[None]]
# takes a socket's descriptor (preface read) and the seconds its handshake has left
Tunnel = Callable[[int, float], None]


class Listener:
    """Accepts on some listening sockets, completes each TLS handshake within
    HANDSHAKE_TIMEOUT and hands the streams of an authenticated peer to SESSION."""

    def __init__(self, ctx: ssl.SSLContext, session: Session, log: Callable[[str], None],
                 frame_limit: int, cap: Optional[int] = None,
                 tunnel: Optional[Tunnel] = None) -> None:
        self.ctx, self.session, self.frame_limit = ctx, session, frame_limit
        self.tunnel = tunnel
        self.say = log                 # what every authenticated session gets
        self.log = Throttle(log)       # what a flood gets
        self.cap = cap or pending_cap()
        self.pending: dict[asyncio.Task, str] = {}       # unauthenticated, oldest first
        self.silent: set[asyncio.Task] = set()            # of those, no byte sent yet

    async def serve(self, socks: list[socket.socket]) -> None:
        await asyncio.gather(*(self._accept(s) for s in socks))

    async def _accept(self, lsock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, addr = await loop.sock_accept(lsock)
            except OSError as e:
                if e.errno in _GONE:
                    continue
                if e.errno not in _EXHAUSTED:
                    raise
                if self._evict_oldest("the agent ran out of file descriptors"):
                    await asyncio.sleep(0.01)     # let the evicted one close its socket
                    continue
                self.log("exhausted", f"cannot accept connections: {e.strerror}; "
                                      f"retrying every {BACKOFF:g} s")
                await asyncio.sleep(BACKOFF)
                continue
            who = str(addr[0]) if isinstance(addr, tuple) and addr else "?"
            if len(self.pending) >= self.cap:
                self._evict_oldest(f"{self.cap} connections were waiting for a TLS handshake")
            task = loop.create_task(self._handshake(conn, who))
            self.pending[task] = who
            self.silent.add(task)
            task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task) -> None:
        self.pending.pop(task, None)
        self.silent.discard(task)

    def _evict_oldest(self, why: str) -> bool:
        live = [t for t in self.pending if not t.done()]
        victims = [t for t in live if t in self.silent] or live
        if not victims:
            return False
        task = victims[0]
        task.cancel()
        who = self.pending.pop(task)
        self.silent.discard(task)
        self.log("evicted", f"dropped a connection from {who} before its TLS handshake: "
                            f"{why}")
        return True

    async def _handshake(self, conn: socket.socket, who: str) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            await asyncio.wait_for(_readable(conn), HANDSHAKE_TIMEOUT)
        except asyncio.TimeoutError:
            conn.close()
            self.log("refused", f"refused a connection from {who}: no TLS handshake "
                                f"within {HANDSHAKE_TIMEOUT:g} s")
            return
        except BaseException:
            conn.close()            # evicted, or the agent is stopping
            raise
        self.silent.discard(asyncio.current_task())
        if await self._tunnel_preface(conn, who, start + HANDSHAKE_TIMEOUT):
            return
        reader = asyncio.StreamReader(limit=self.frame_limit)
        proto = asyncio.StreamReaderProtocol(reader)
        try:
            # asyncio closes the socket itself if this fails or is cancelled
            tls, _ = await loop.connect_accepted_socket(
                lambda: proto, conn, ssl=self.ctx,
                ssl_handshake_timeout=max(0.1, HANDSHAKE_TIMEOUT - (loop.time() - start)))
        except (ssl.SSLError, OSError, asyncio.TimeoutError) as e:
            self.log("refused", f"refused a connection from {who}: {_reason(e)}")
            return
        # authenticated: from here only the session's keepalive limits it
        self.pending.pop(asyncio.current_task(), None)
        cert = tls.get_extra_info("peercert") or {}
        subject = dict(x[0] for x in cert.get("subject", ()) if x)
        self.say(f"connection from {who} ({subject.get('commonName', 'no name')})")
        local = tls.get_extra_info("sockname")
        writer = asyncio.StreamWriter(tls, proto, reader, loop)
        await self.session(reader, writer, str(local[0]) if local else "")


    async def _tunnel_preface(self, conn: socket.socket, who: str, deadline: float) -> bool:
        """True when CONN was a tunnel stream's (handed to the relay, or
        refused and closed); False for a TLS hello or anything else, which the
        TLS handshake then judges as before."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                head = conn.recv(len(PREFACE), socket.MSG_PEEK)
            except BlockingIOError:
                head = None
            except OSError:
                return False
            if head is not None:
                if not head or not PREFACE.startswith(head):
                    return False
                if len(head) == len(PREFACE):
                    break
            if loop.time() >= deadline:
                conn.close()
                self.log("refused", f"refused a connection from {who}: no TLS handshake "
                                    f"within {HANDSHAKE_TIMEOUT:g} s")
                return True
            await asyncio.sleep(0.01)       # the rest of 8 bytes is on its way
        conn.recv(len(PREFACE))
        # the relay bounds the rest; this place among the pending is free
        self.pending.pop(asyncio.current_task(), None)
        if self.tunnel is None:
            conn.close()
            self.log("refused", f"refused a tunnel connection from {who}: this agent "
                                f"relays no --tunnelled streams")
            return True
        try:
            self.tunnel(conn.detach(), max(0.1, deadline - loop.time()))
        except VmferryError as e:
            self.log("refused", f"refused a tunnel connection from {who}: {e}")
        return True


async def _readable(conn: socket.socket) -> None:
    """Until CONN has bytes to read (or its peer closed it)."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_reader(conn.fileno(), lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        loop.remove_reader(conn.fileno())


def _reason(e: BaseException) -> str:
    if isinstance(e, asyncio.TimeoutError) or "taking longer than" in str(e):
        return f"no TLS handshake within {HANDSHAKE_TIMEOUT:g} s"
    return getattr(e, "reason", None) or str(e) or type(e).__name__
