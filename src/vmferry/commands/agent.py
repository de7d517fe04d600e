"""`vmferry agent`: serve the destination side of migrations from other hosts."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from vmferry.errors import UsageError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "agent", help="serve incoming migrations from other hosts",
        description="The destination side of 'vmferry migrate ssh://...' or 'tls://...'. "
                    "With --stdio it serves one migration on stdin/stdout (ssh runs it); "
                    "with --listen it waits for sources that present a client "
                    "certificate signed by the CA in --pki. Everything an unfinished "
                    "migration started is removed when its source goes away.")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--stdio", action="store_true",
                      help="one session on stdin/stdout")
    mode.add_argument("--listen", metavar="HOST[:PORT]",
                      help="accept mutual-TLS connections (default port 16514)")
    p.add_argument("--pki", type=Path, metavar="DIR",
                   help="certificates laid out as libvirt's /etc/pki (default: pki of "
                        "STATE-DIR/agent.toml, else /etc/pki)")
    p.add_argument("--storage-root", action="append", default=[], metavar="DIR",
                   help="a folder incoming disk images may be written under (repeatable; "
                        "default: storage_roots of STATE-DIR/agent.toml, else STATE-DIR/images; never "
                        "the rest of STATE-DIR, which holds the agent's own records)")
    p.add_argument("--allow-control", action="store_true",
                   help="run vmferry commands that clients send (vmferry --connect "
                        "tls://...): every client it accepts may then run, stop and "
                        "migrate this host's VMs")
    p.add_argument("--port-range", metavar="LO-HI",
                   help="TCP ports for disk and migration data (default: port_range of "
                        "STATE-DIR/agent.toml, else 49152-49215)")
    p.set_defaults(func=run)


def _port_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    try:
        r = (int(lo), int(hi or lo))
    except ValueError:
        r = (0, 0)
    if not 1 <= r[0] <= r[1] <= 65535:
        raise UsageError(f"--port-range {text!r}: use LO-HI, e.g. 49152-49215")
    return r


def _host_port(text: str) -> tuple[str, int]:
    from vmferry.agent.server import DEFAULT_TLS_PORT
    m = re.fullmatch(r"\[([^\[\]]+)\](?::([0-9]+))?", text)    # [IPv6] or [IPv6]:PORT
    if m:
        host, port = m.group(1), m.group(2) or ""
    elif text.count(":") > 1 or ":" not in text:
        host, port = text, ""           # a bare IPv6 address, or no port
    else:
        host, _, port = text.partition(":")
    try:
        p = int(port) if port else DEFAULT_TLS_PORT
    except ValueError:
        p = 0
    if not host or "[" in host or "]" in host or not 1 <= p <= 65535:
        raise UsageError(f"--listen {text!r}: use HOST, HOST:PORT or [IPV6]:PORT")
    return host, p


def run(args: argparse.Namespace) -> int:
    import asyncio
    from vmferry.agent import reaper, server
    from vmferry.migration.desthost import presync_target
    from vmferry.migration.desthost.incoming import reap_orphans
    from vmferry.vm.state import StateDir
    state = StateDir(args.state_dir)
    cfg = server.load_config(state, args.storage_root, args.pki,
                             _port_range(args.port_range) if args.port_range else None,
                             allow_control=args.allow_control)
    listen = _host_port(args.listen) if args.listen else None
    if listen:
        cfg.pki.server_context()          # missing certificates: say so before listening
    else:
        server.check_stdio()              # before anything is reaped or spawned
    # An agent that died before us (and its reaper) left these behind.
    try:
        asyncio.run(reap_orphans(state, cfg.storage_roots))
    finally:
        presync_target.reap_orphans(state.path, cfg.storage_roots)
    reaper.spawn(str(state.path), cfg.storage_roots)
    if args.stdio:
        asyncio.run(server.serve_stdio(cfg))
    else:
        asyncio.run(server.serve_tls(cfg, *listen))
    return 0
