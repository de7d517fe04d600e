"""CPU per GiB of the --tunnelled TLS relay (ext/tunnel.c), without QEMU.

A client relay and a server relay in one process, over TCP on 127.0.0.1 (the
server's connections handed over by a small stand-in for the agent's
listener, which reads the preface as the agent does), and GIB GiB pushed from
a Unix socket to a Unix socket through them, every byte checked on arrival.
What is measured is each relay thread's CPU time (the relay's own
stats()["cpu_s"]) per GiB, and the wall time.  On one host the two halves
share the TCP work (an ACK the server's thread sends runs the client's
transmit in that thread), so their sum is the steadier figure.

Several engine builds can be compared: each NAME=PATH is an _engine .so (a
build of another version of ext/, e.g. `setup.py build_ext` in a copy of the
tree); the default is the one vmferry imports.  Every measurement runs in its
own process, and rounds are interleaved: each round runs every build once, in
an order that rotates, since timings on a shared machine drift.  The summary
gives medians with the range.

    python bench/relay_cpu.py                        # 7 rounds of 2 GiB
    python bench/relay_cpu.py --rounds 15 --gib 1 old=/tmp/old/_engine.so new=src/vmferry/_engine.cpython-311-x86_64-linux-gnu.so
    python bench/relay_cpu.py --chunk 32768          # the writer sends 32 KiB at a time
    python bench/relay_cpu.py --both                 # GIB each way at once

Needs openssl (tests/netlab.py makes the certificates).  Not a pytest
benchmark (no bench_ prefix): it writes nothing under bench/results.
"""
from __future__ import annotations

import argparse
import ctypes
import importlib.machinery
import importlib.util
import json
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BLOCK = 4 << 20               # the unit the writer sends and the reader checks


def _load_engine(so: str | None) -> Any:
    """vmferry._engine, or the build at SO in its place."""
    if not so:
        from vmferry import _engine
        return _engine
    import vmferry  # noqa: F401  (the package the extension belongs to)
    loader = importlib.machinery.ExtensionFileLoader("vmferry._engine", so)
    spec = importlib.util.spec_from_file_location("vmferry._engine", so, loader=loader)
    assert spec is not None
    eng = importlib.util.module_from_spec(spec)
    sys.modules["vmferry._engine"] = eng
    loader.exec_module(eng)
    return eng


def _name_thread(name: str) -> None:
    """PR_SET_NAME, so that perf and top tell the threads apart."""
    try:
        ctypes.CDLL(None).prctl(15, name.encode(), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def measure(so: str | None, pki: Path, gib: float, chunk: int, both: bool) -> dict[str, Any]:
    """One run in this process: the relays' CPU per GiB, the wall time, and
    whether every byte arrived as sent."""
    eng = _load_engine(so)
    lv = pki / "libvirt"
    ca = str(pki / "CA" / "cacert.pem")
    tmp = tempfile.mkdtemp(prefix="vf-relay-cpu-")
    token = os.urandom(eng.RELAY_TOKEN_LEN // 2).hex()
    src_path, dst_path = f"{tmp}/src.sock", f"{tmp}/dst.sock"
    errors: list[str] = []

    agent = socket.socket()
    agent.bind(("127.0.0.1", 0))
    agent.listen(8)
    server = eng.Relay("server", ca, str(lv / "servercert.pem"),
                       str(lv / "private" / "serverkey.pem"))
    client = eng.Relay("client", ca, str(lv / "clientcert.pem"),
                       str(lv / "private" / "clientkey.pem"), address="127.0.0.1",
                       port=agent.getsockname()[1], server_name="127.0.0.1")

    def run(r: Any, name: str) -> None:
        _name_thread(name)
        try:
            r.run()
        except Exception as e:  # noqa: BLE001  (reported, not raised in a thread)
            errors.append(f"{name}: {e}")

    def agent_loop() -> None:
        while True:
            try:
                s, _ = agent.accept()
            except OSError:
                return
            if s.recv(len(eng.RELAY_PREFACE), socket.MSG_WAITALL) != eng.RELAY_PREFACE:
                errors.append("a connection without the preface")
                s.close()
                continue
            server.adopt(s.detach(), 5000)

    sink = socket.socket(socket.AF_UNIX)
    sink.bind(dst_path)
    sink.listen(1)
    server.route(token, dst_path)
    client.listen(src_path, token)
    loops = [threading.Thread(target=run, args=(server, "relay-server"), daemon=True),
             threading.Thread(target=run, args=(client, "relay-client"), daemon=True)]
    for t in loops + [threading.Thread(target=agent_loop, daemon=True)]:
        t.start()

    nblocks = max(1, int(gib * (1 << 30)) // BLOCK)
    template = os.urandom(BLOCK)

    def push(s: socket.socket) -> None:
        _name_thread("push")
        blk = bytearray(template)
        mv = memoryview(blk)
        for i in range(nblocks):
            struct.pack_into("<Q", blk, 0, i)     # the block's number: order checked too
            if chunk:
                for o in range(0, BLOCK, chunk):
                    s.sendall(mv[o:o + chunk])
            else:
                s.sendall(blk)
        s.shutdown(socket.SHUT_WR)

    def pull(s: socket.socket, verdict: list[str]) -> None:
        _name_thread("pull")
        buf, expected = bytearray(BLOCK), bytearray(template)
        mv = memoryview(buf)
        bad = 0
        for i in range(nblocks):
            got = 0
            while got < BLOCK:
                n = s.recv_into(mv[got:])
                if n == 0:
                    verdict.append(f"the end after {i} blocks and {got} bytes")
                    return
                got += n
            struct.pack_into("<Q", expected, 0, i)
            bad += buf != expected
        extra = s.recv(1)
        verdict.append("ok" if not bad and not extra else f"{bad} bad blocks, more: {extra!r}")

    cpu0 = client.stats()["cpu_s"], server.stats()["cpu_s"]
    src = socket.socket(socket.AF_UNIX)
    t0 = time.monotonic()
    src.connect(src_path)
    dst, _ = sink.accept()
    verdicts: list[list[str]] = [[], []]
    jobs = [threading.Thread(target=push, args=(src,)),
            threading.Thread(target=pull, args=(dst, verdicts[0]))]
    if both:
        jobs += [threading.Thread(target=push, args=(dst,)),
                 threading.Thread(target=pull, args=(src, verdicts[1]))]
    for j in jobs:
        j.start()
    for j in jobs:
        j.join()
    if not both:
        dst.close()             # and the source sees the end come back
        src.recv(1)
    wall = time.monotonic() - t0
    time.sleep(0.2)             # the loops' last turn counted in cpu_s
    cs, ss = client.stats(), server.stats()
    for r in (client, server):
        r.stop()
    for t in loops:
        t.join()
    for r in (client, server):
        r.close()
    agent.close()
    src.close()
    sink.close()
    shutil.rmtree(tmp, ignore_errors=True)
    moved = nblocks * BLOCK / (1 << 30) * (2 if both else 1)
    return {"client": (cs["cpu_s"] - cpu0[0]) / moved, "server": (ss["cpu_s"] - cpu0[1]) / moved,
            "wall_s": wall, "gib": moved, "verify": [v for vs in verdicts for v in vs],
            "errors": errors + [e for e in (cs["last_error"], ss["last_error"]) if e]}


def _spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.3f} [{min(xs):.3f}-{max(xs):.3f}]"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("engines", nargs="*", metavar="NAME=PATH",
                    help="engine builds to compare (default: the one vmferry imports)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--gib", type=float, default=2.0, help="GiB per run (default 2)")
    ap.add_argument("--chunk", type=int, default=0,
                    help="the writer's send size in bytes (default: 4 MiB blocks)")
    ap.add_argument("--both", action="store_true", help="GIB each way at once")
    ap.add_argument("--child", metavar="SO", help=argparse.SUPPRESS)
    ap.add_argument("--pki", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child is not None:
        out = measure(args.child or None, args.pki, args.gib, args.chunk, args.both)
        print(json.dumps(out))
        return 0 if all(v == "ok" for v in out["verify"]) and not out["errors"] else 1

    engines = [tuple(e.split("=", 1)) for e in args.engines] or [("built", "")]
    for name, so in engines:
        if so and not os.path.exists(so):
            ap.error(f"{name}: no such file: {so}")
    sys.path.insert(0, str(ROOT / "tests"))
    from netlab import make_pki
    pki_dir = Path(tempfile.mkdtemp(prefix="vf-relay-cpu-pki-"))
    results: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in engines}
    failed = False
    try:
        make_pki(pki_dir, ["127.0.0.1"])
        for rnd in range(args.rounds):
            k = rnd % len(engines)
            for name, so in engines[k:] + engines[:k]:
                cmd = [sys.executable, __file__, "--child", so, "--pki", str(pki_dir),
                       "--gib", str(args.gib), "--chunk", str(args.chunk)]
                p = subprocess.run(cmd + (["--both"] if args.both else []), capture_output=True,
                                   text=True, timeout=600)
                try:
                    d = json.loads(p.stdout.strip().splitlines()[-1])
                except (IndexError, ValueError):
                    print(f"round {rnd} {name}: no result\n{p.stderr}", file=sys.stderr)
                    failed = True
                    continue
                if p.returncode != 0:
                    print(f"round {rnd} {name}: FAILED {d['verify']} {d['errors']}",
                          file=sys.stderr)
                    failed = True
                    continue
                results[name].append(d)
                print(f"round {rnd} {name}: client {d['client']:.3f}  server {d['server']:.3f}"
                      f"  CPU s/GiB, wall {d['wall_s']:.2f} s", flush=True)
    finally:
        shutil.rmtree(pki_dir, ignore_errors=True)

    print(f"\nCPU s/GiB of each relay thread, median [min-max] of {args.rounds} rounds of "
          f"{args.gib:g} GiB{' each way' if args.both else ''}"
          f"{f', written {args.chunk} bytes at a time' if args.chunk else ''}:")
    print(f"{'engine':>12} | {'client':^19} | {'server':^19} | {'sum':^19} | wall s")
    for name, _ in engines:
        ds = results[name]
        if not ds:
            continue
        c, s = [d["client"] for d in ds], [d["server"] for d in ds]
        print(f"{name:>12} | {_spread(c)} | {_spread(s)} | "
              f"{_spread([a + b for a, b in zip(c, s)])} | "
              f"{statistics.median(d['wall_s'] for d in ds):.2f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
