"""`vmferry --connect URI COMMAND ...` (virsh's -c): COMMAND runs against
another host's state directory, with the output, progress, JSON and exit
status it has there.

  local:///STATE-DIR                    this host, as --state-dir
  ssh://[USER@]HOST[:PORT][/STATE-DIR]  vmferry on HOST, through the system ssh
                                        (URI options as a migration's: keyfile,
                                        known_hosts, no_verify, agent=PATH)
  tls://HOST[:PORT][?pki=DIR]           an agent run with --allow-control, over
                                        mutual TLS (DIR: this host's certificates,
                                        default /etc/pki)

A migration started this way runs detached on that host (`migrate
--detach`, p2p): this command only follows it, so a dropped connection leaves it
running, `jobinfo --follow NAME` re-attaches from anywhere, and Ctrl-C on a
terminal (which ssh passes on) aborts it.  Paths in the command are that
host's.  `migrate --direct` instead drives the migration from here
(commands/direct.py).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from vmferry.agent.transport import Target
from vmferry.errors import ConnectError, UsageError

# what may run elsewhere: not the agent, not the demo (it builds its own guest here)
COMMANDS = ("run", "list", "status", "stop", "jobinfo", "abort", "presync", "migrate",
            "recover", "copy")


def run(args: argparse.Namespace) -> int:
    uri: str = args.connect
    if uri.startswith("local://"):
        path = uri[len("local://"):]
        if not path.startswith("/") or path == "/":
            raise UsageError(f"--connect {uri!r}: use local:///STATE-DIR")
        args.state_dir = Path(path)
        return args.func(args)
    if args.state_dir_given:
        raise UsageError("--state-dir is this host's; with --connect, name the other host's "
                         "in the URI (ssh://HOST/STATE-DIR)")
    if args.command not in COMMANDS:
        raise UsageError(f"'{args.command}' does not run through --connect (these do: "
                         f"{', '.join(COMMANDS)})")
    argv = list(args.command_argv)
    from vmferry.agent import transport
    t = transport.parse(uri)
    if args.command in ("migrate", "recover") and args.direct:
        from vmferry.commands import direct
        return direct.run(args, t, argv)
    if args.command == "migrate" and "--detach" not in argv:
        argv.insert(1, "--detach")
    if t.scheme == "tls":
        return _over_tls(uri, argv)
    return _over_ssh(t, argv)


def _over_ssh(t: Target, argv: list[str]) -> int:
    from vmferry.agent import transport
    # A user at a terminal gets one there too: the progress bar, and Ctrl-C
    # reaching the remote command (which aborts a migration).
    tty = sys.stdin.isatty() and sys.stdout.isatty()
    cmd = transport.ssh_argv(t, argv, tty=tty)
    try:
        if tty:
            return subprocess.call(cmd)
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    except OSError as e:
        raise UsageError(f"cannot run ssh: {e.strerror or e}") from e
    # vmferry's own lines pass at once; anything else (ssh's, a shell's) is
    # held, to be said as one line should ssh or the shell fail
    held: list[str] = []
    assert p.stderr is not None
    for raw in p.stderr:
        line = raw.decode(errors="replace").rstrip("\n")
        if line.startswith("vmferry"):
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
        elif line.strip():
            held.append(line)
    rc = p.wait()
    if rc == 255 and held:
        raise ConnectError(f"cannot run vmferry on {t.host} over ssh: {held[-1]}")
    if rc == 127:
        raise ConnectError(f"{t.query.get('agent') or 'vmferry'} is not installed on {t.host} "
                         f"(or name it with ?agent=PATH): {held[-1] if held else ''}")
    for line in held:
        sys.stderr.write(line + "\n")
    return rc


def _over_tls(uri: str, argv: list[str]) -> int:
    """Through an agent run with --allow-control: its output streams back as
    it comes; Ctrl-C is passed on (a migration then aborts)."""
    import asyncio
    import signal
    from vmferry.migration.options import MigrateOptions
    from vmferry.migration.remote import RemoteDestination
    if sys.stderr.isatty():
        # the agent's command has no terminal: ask it for the bar ours would show
        argv = [a.replace("=auto", "=bar") if a.startswith(("--progress=", "--verbose="))
                else a for a in argv]

    def out(stream: str, text: str) -> None:
        f = sys.stderr if stream == "stderr" else sys.stdout
        f.write(text)
        f.flush()

    async def go() -> int:
        agent = RemoteDestination(uri)
        ch = await agent._connect(MigrateOptions())
        loop = asyncio.get_running_loop()
        pending: set[asyncio.Task] = set()

        def interrupt() -> None:
            task = asyncio.ensure_future(ch.call("command_signal", signal="INT"))
            pending.add(task)
            task.add_done_callback(pending.discard)
        loop.add_signal_handler(signal.SIGINT, interrupt)
        try:
            r = await ch.call("command", argv=argv, on_output=out)
            return int(r.get("rc", 1))
        finally:
            loop.remove_signal_handler(signal.SIGINT)
            await agent.close()
    return asyncio.run(go())
