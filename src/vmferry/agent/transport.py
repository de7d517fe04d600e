"""Reaching an agent: destination URIs, the ssh command line, and asyncio
streams over a pair of pipes (ssh's on the source, stdin/stdout on the
agent).

Kept free of heavy imports on purpose: `vmferry migrate ssh://...` starts
ssh before it loads the rest of vmferry, so the connection and the remote
agent's start-up overlap with this side's own.
"""
from __future__ import annotations

import dataclasses
import shlex
import subprocess
from typing import IO, Any, Optional, Sequence
from urllib.parse import parse_qs, unquote, urlsplit

from vmferry.errors import UsageError

DEFAULT_KEEPALIVE = 5.0             # seconds between the source's pings
KEEPALIVE_COUNT = 3                 # missed pings before a peer is gone
_OPTIONS = {"ssh": ("keyfile", "known_hosts", "no_verify", "agent", "keepalive"),
            "tls": ("keepalive", "pki")}


@dataclasses.dataclass(frozen=True)
class Target:
    uri: str
    scheme: str                     # "ssh" or "tls"
    host: str
    port: Optional[int]
    user: Optional[str]
    state_dir: Optional[str]
    query: dict[str, str]
    keepalive: float

    def __str__(self) -> str:
        return self.uri.split("?")[0]


def parse(uri: str) -> Target:
    u = urlsplit(uri)
    if u.scheme not in _OPTIONS or not u.hostname:
        raise UsageError(f"destination {uri!r}: use ssh://[USER@]HOST[:PORT][/STATE-DIR] "
                         f"or tls://HOST[:PORT]")
    if u.hostname.startswith("-") or (u.username or "").startswith("-"):
        raise UsageError(f"destination {uri!r}: a host or user name cannot start with '-'")
    try:
        port = u.port
    except ValueError:
        raise UsageError(f"destination {uri!r}: the port is not a number") from None
    state_dir = unquote(u.path) if u.path not in ("", "/") else None
    query = {k: v[-1] for k, v in parse_qs(u.query, keep_blank_values=True).items()}
    unknown = set(query) - set(_OPTIONS[u.scheme])
    if unknown:
        raise UsageError(f"destination {uri!r}: unknown option {sorted(unknown)[0]!r} "
                         f"(known: {', '.join(_OPTIONS[u.scheme])})")
    if u.scheme == "tls" and state_dir:
        raise UsageError(f"destination {uri!r}: a tls:// agent has its own state "
                         f"directory; drop the path")
    try:
        keepalive = float(query.get("keepalive", DEFAULT_KEEPALIVE))
    except ValueError:
        keepalive = -1
    if not 0.1 <= keepalive <= 600:
        raise UsageError(f"destination {uri!r}: keepalive must be 0.1 to 600 seconds")
    return Target(uri=uri, scheme=u.scheme, host=u.hostname, port=port,
                  user=unquote(u.username) if u.username else None, state_dir=state_dir,
                  query=query, keepalive=keepalive)


def ssh_argv(t: Target, command: Sequence[str] = ("agent", "--stdio"),
             tty: bool = False, control: Optional[str] = None) -> list[str]:
    """ssh running vmferry COMMAND on T's host (its agent, by default); TTY:
    with a terminal there, for a command a user watches; CONTROL: a socket
    through which forwards are added later (--tunnelled)."""
    argv = ["ssh", "-o", "BatchMode=yes", "-t" if tty else "-T",
            # ssh's own keepalive ends a session whose link died, so the
            # agent sees its stdin close even if we are gone too
            "-o", f"ServerAliveInterval={max(1, int(t.keepalive))}",
            "-o", f"ServerAliveCountMax={KEEPALIVE_COUNT}"]
    if control:
        argv += ["-o", "ControlMaster=yes", "-o", f"ControlPath={control}",
                 "-o", "StreamLocalBindUnlink=yes"]
        if _aes_in_hardware():
            # the disks and memory ride on this connection: AES-GCM, which the
            # CPU does in hardware, costs ssh 40% less CPU than its default
            # ChaCha20 (2 GiB through ssh on this host: 2.8 s against 4.6 s)
            argv += ["-o", "Ciphers=^aes128-gcm@openssh.com,aes256-gcm@openssh.com"]
    if t.port:
        argv += ["-p", str(t.port)]
    if t.user:
        argv += ["-l", t.user]
    if "keyfile" in t.query:
        argv += ["-i", t.query["keyfile"], "-o", "IdentitiesOnly=yes"]
    if "known_hosts" in t.query:
        argv += ["-o", f"UserKnownHostsFile={t.query['known_hosts']}"]
    if t.query.get("no_verify") in ("1", "yes", "true"):
        argv += ["-o", "StrictHostKeyChecking=no"]
    remote = [t.query.get("agent") or "vmferry"]
    if t.state_dir:
        remote += ["--state-dir", t.state_dir]
    remote += list(command)
    return argv + [t.host, "--", shlex.join(remote)]


def _aes_in_hardware() -> bool:
    """The CPU has AES instructions (x86's and arm64's flag are both "aes")."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith(("flags", "Features")) and " aes" in line
                       for line in f)
    except OSError:
        return False


def spawn_ssh(t: Target, tunnel: bool = False) -> subprocess.Popen:
    """Start `vmferry agent --stdio` on the destination through the system ssh
    client; its own session, so a Ctrl-C meant for us does not kill it before
    we have rolled back through it.  TUNNEL: it also listens on a control
    socket in a private folder (proc.tunnel_dir) for forwards (forward())."""
    import tempfile
    folder = tempfile.mkdtemp(prefix="vmferry-tunnel-") if tunnel else None
    try:
        proc = subprocess.Popen(ssh_argv(t, control=f"{folder}/ctl" if folder else None),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
        proc.tunnel_dir = folder        # type: ignore[attr-defined]
        return proc
    except OSError as e:
        if folder:
            import shutil
            shutil.rmtree(folder, ignore_errors=True)
        raise UsageError(f"cannot run ssh: {e.strerror or e}") from e


def forward(t: Target, folder: str, local: str, remote: str) -> None:
    """Through the ssh process started with tunnel=True: connections to the
    Unix socket LOCAL (in FOLDER) reach REMOTE on the other host, inside the
    ssh connection (OpenSSH's stream-local forwarding)."""
    argv = ["ssh", "-o", f"ControlPath={folder}/ctl", "-O", "forward",
            "-L", f"{local}:{remote}", t.host]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                             stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UsageError(f"cannot add an ssh forward for --tunnelled: {e}") from e
    if out.returncode != 0:
        why = (out.stderr.strip().splitlines() or [f"ssh exited {out.returncode}"])[-1]
        raise UsageError(f"cannot add an ssh forward for --tunnelled: {why}")


def take_stdio() -> tuple[IO[bytes], IO[bytes]]:
    """Private copies of stdin and stdout for a protocol spoken over them (an
    agent under ssh, a --relayed migration); 0 and 1 themselves are pointed
    away, so that no child (QEMU, qemu-img) and no stray print can write
    into the channel or hold it open after we are gone.  What would have gone
    to stdout goes to stderr."""
    import os
    rfd, wfd = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(2, 1)
    os.close(devnull)
    return os.fdopen(rfd, "rb", buffering=0), os.fdopen(wfd, "wb", buffering=0)


async def pipe_streams(rfile: IO[bytes], wfile: IO[bytes], limit: int) -> tuple[Any, Any]:
    """asyncio (reader, writer) over two pipe ends."""
    import asyncio
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), rfile)
    transport, proto = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, wfile)
    return reader, asyncio.StreamWriter(transport, proto, reader, loop)
