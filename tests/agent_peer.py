"""A source as the agent sees it: frames written by hand, over `agent --stdio`
(a pipe pair, as ssh gives it) or over a mutual-TLS connection to
`agent --listen`.  Shared by test_agent.py and test_hostile.py."""
from __future__ import annotations

import json
import os
import socket
import ssl
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

VMFERRY = [sys.executable, "-m", "vmferry"]


class Peer:
    """Requests and replies; subclasses move the bytes."""

    next_id = 0

    def _write(self, data: bytes) -> None:
        raise NotImplementedError

    def _read(self, n: int) -> bytes:
        raise NotImplementedError

    def send_raw(self, data: bytes) -> None:
        self._write(data)

    def send(self, obj: Any) -> None:
        body = json.dumps(obj).encode()
        self.send_raw(struct.pack(">I", len(body)) + body)

    def recv(self) -> Any:
        head = self._read(4)
        if len(head) < 4:
            return None
        (n,) = struct.unpack(">I", head)
        return json.loads(self._read(n))

    def call(self, op: str, **args: Any) -> dict:
        self.next_id += 1
        self.send({"id": self.next_id, "op": op, "args": args})
        reply = self.recv()
        assert reply is not None, f"the agent hung up on {op}"
        assert reply["id"] == self.next_id, reply
        return reply

    def hello(self, keepalive: float = 30) -> dict:
        r = self.call("hello", protocol=1, version="test", keepalive=keepalive)
        assert r["ok"], r
        return r["result"]


class Agent(Peer):
    """`vmferry agent --stdio` with its stdin and stdout as the channel."""

    def __init__(self, state: Path, *extra: str) -> None:
        self.proc = subprocess.Popen(VMFERRY + ["--state-dir", str(state), "agent", "--stdio",
                                                *extra],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.next_id = 0

    def _write(self, data: bytes) -> None:
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def _read(self, n: int) -> bytes:
        return self.proc.stdout.read(n)

    def close(self) -> tuple[int, str]:
        self.proc.stdin.close()
        rc = self.proc.wait(30)
        return rc, self.proc.stderr.read().decode()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            f.close()


def client_context(pki: Any, cert: bool = True) -> ssl.SSLContext:
    """A source's TLS context for PKI (tests/netlab.py's Pki); CERT=False: none."""
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    if cert:
        ctx.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    return ctx


class TlsPeer(Peer):
    """One mutual-TLS connection to `vmferry agent --listen`."""

    def __init__(self, port: int, ctx: ssl.SSLContext, timeout: float = 10) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        self.next_id = 0

    def _write(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _read(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            try:
                chunk = self.sock.recv(n - len(buf))
            except (ConnectionError, ssl.SSLError):
                chunk = b""
            if not chunk:
                break
            buf += chunk
        return buf

    def close(self) -> None:
        self.sock.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TlsAgent:
    """`vmferry agent --listen 127.0.0.1:PORT`, its stderr in LOG."""

    def __init__(self, state: Path, pki: Any, log: Path, *extra: str,
                 prefix: tuple[str, ...] = ()) -> None:
        self.port, self.pki, self.log = free_port(), pki, log
        self.out = open(log, "wb")
        self.proc = subprocess.Popen(
            [*prefix, *VMFERRY, "--state-dir", str(state), "agent", "--listen",
             f"127.0.0.1:{self.port}", "--pki", str(pki.dir), *extra],
            stdin=subprocess.DEVNULL, stdout=self.out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while b"listening on" not in log.read_bytes():
            assert self.proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the agent did not listen within 20 s"
            time.sleep(0.05)

    def connect(self, cert: bool = True, ctx: Optional[ssl.SSLContext] = None) -> TlsPeer:
        return TlsPeer(self.port, ctx or client_context(self.pki, cert))

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.out.close()


def snapshot(top: Path, skip: tuple[Path, ...] = ()) -> dict[str, tuple]:
    """Every entry under TOP but SKIP: kind, inode and, for a file or symlink,
    size, mtime and contents."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d not in skip]
        for name in dirnames + filenames:
            p = here / name
            if p in skip:
                continue
            st = os.lstat(p)
            if p.is_dir() and not p.is_symlink():
                # a folder's mtime moves with every file made and removed again
                out[str(p.relative_to(top))] = (st.st_mode, st.st_ino)
                continue
            data = os.readlink(p) if p.is_symlink() else p.read_bytes()
            out[str(p.relative_to(top))] = (st.st_mode, st.st_size, st.st_ino,
                                            st.st_mtime_ns, data)
    return out
