"""A source that authenticated but is hostile (or broken), speaking the agent's
protocol by hand over `agent --stdio` and over mutual TLS to `agent --listen`.

Every case asserts three things: the answer (a one-line error reply, or a
hang-up after a frame that breaks the framing), that the agent still serves a
real client afterwards, and that no file outside the storage roots was
created, changed or removed (the autouse `untouched` fixture compares a
snapshot of the whole destination tree, the agent's own state directory
included, before and after).

The destination's tree (one per module):

    base/victim/            outside every root: what an attacker wants gone
    base/srv/               the explicit root of the "root-holds-state" agents
    base/srv/state/         the agents' state directory (agent.toml, records)
    base/srv/state/images/  the default root; images/out -> base/victim
"""
from __future__ import annotations

import json
import os
import socket
import ssl
import struct
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from agent_peer import Agent, Peer, TlsAgent, TlsPeer, client_context, snapshot
from netlab import NetLabError, make_pki

MiB = 1 << 20
MODES = ("default-root", "root-holds-state")
TRANSPORTS = ("stdio", "tls")


class Host:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.victim = base / "victim"
        self.srv = base / "srv"
        self.state = self.srv / "state"
        self.images = self.state / "images"
        self.victim.mkdir()
        (self.victim / "precious.txt").write_text("keep me\n")
        (self.victim / "disk.img").write_bytes(b"\1" * MiB)
        self.images.mkdir(parents=True)
        (self.images / "out").symlink_to(self.victim)
        (self.state / "agent.toml").write_text("allow_extra_args = false\n")

    def args(self, mode: str) -> tuple[str, ...]:
        return () if mode == "default-root" else ("--storage-root", str(self.srv))

    def roots(self, mode: str) -> list[str]:
        return [str(self.images if mode == "default-root" else self.srv)]

    def snap(self) -> dict:
        return snapshot(self.base, skip=(self.state / ".lock",))


@pytest.fixture(scope="module")
def host(tmp_path_factory) -> Host:
    return Host(tmp_path_factory.mktemp("hostile"))


def _pki(tmp_path_factory, name: str, ca: str):
    try:
        return make_pki(tmp_path_factory.mktemp(name), ["127.0.0.1", "localhost"], ca_name=ca)
    except NetLabError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return _pki(tmp_path_factory, "pki", "vmferry test CA")


@pytest.fixture(scope="module")
def rogue_pki(tmp_path_factory):
    return _pki(tmp_path_factory, "rogue", "rogue CA")


@pytest.fixture(autouse=True)
def untouched(host):
    before = host.snap()
    yield
    after = host.snap()
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"files outside the roots created, changed or removed: {changed}"


@pytest.fixture(scope="module")
def agents(host, pki, tmp_path_factory):
    """connect(transport, mode, greet=True): a peer of a live agent.  Over stdio
    the agent of a mode is shared by the cases until one ends its session;
    over TLS each case gets a fresh connection to a long-running agent."""
    logs = tmp_path_factory.mktemp("logs")
    stdio: dict[str, Agent] = {}
    tls: dict[str, TlsAgent] = {}
    conns: list = []

    def connect(transport: str, mode: str = "default-root", greet: bool = True) -> Peer:
        if transport == "stdio":
            a = stdio.get(mode)
            if a is None or a.proc.poll() is not None or not greet:
                a = Agent(host.state, *host.args(mode))
                if greet:
                    a.hello()
                    stdio[mode] = a
                else:
                    conns.append(a)
            return a
        t = tls.get(mode)
        if t is None or t.proc.poll() is not None:
            t = tls[mode] = TlsAgent(host.state, pki, logs / f"{mode}.log", *host.args(mode))
        p = t.connect()
        conns.append(p)
        if greet:
            p.hello()
        return p

    connect.tls = tls            # type: ignore[attr-defined]
    yield connect
    for c in conns:
        c.kill() if isinstance(c, Agent) else c.close()
    for a in stdio.values():
        a.kill()
    for t in tls.values():
        t.stop()


def refused(reply: Any, *words: str) -> str:
    """An error reply whose message is one line and names the problem."""
    assert isinstance(reply, dict) and reply.get("ok") is False, reply
    err = reply["error"]
    assert err["kind"] in ("usage", "protocol"), reply
    msg = err["message"]
    assert "\n" not in msg and 0 < len(msg) < 600, msg
    assert "internal error" not in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


def serves(peer: Peer) -> None:
    r = peer.call("ping")
    assert r["ok"], r


def _toml(value: Any) -> str:
    return json.dumps(value)          # a TOML basic string is a JSON string


def spec(name: str = "h1", disk: str | None = None, fmt: str = "raw", **paths: str) -> str:
    lines = [f"name = {_toml(name)}", 'memory = "64M"']
    lines += [f"{k} = {_toml(v)}" for k, v in paths.items()]
    if disk is not None:
        lines += ["[[disks]]", f"path = {_toml(disk)}", f'format = "{fmt}"']
    return "\n".join(lines) + "\n"


def disk(**over: Any) -> dict:
    return {"node": "disk0", "path": "/src/disk0.img", "fmt": "raw", "size": MiB,
            "export": "disk0", **over}


def prepare(spec_text: str, disks: list | None = None, **over: Any) -> tuple[str, dict]:
    args = {"spec": spec_text, "disks": [] if disks is None else disks,
            "options": {"create_disks": True}, "accel": "tcg",
            "nbd": {"address": "127.0.0.1"}, "migrate": {"address": "127.0.0.1"}}
    args.update(over)
    return "prepare", args


def check(spec_text: str, disks: list | None = None, **over: Any) -> tuple[str, dict]:
    """A prepare's dry run: the same arguments, less the token."""
    op, args = prepare(spec_text, disks, **over)
    return "check", args


def presync_open(dest: str, **over: Any) -> tuple[str, dict]:
    d = {"node": "disk0", "dest_path": dest, "fmt": "raw", "size": MiB, **over}
    return "presync_open", {"disks": [d], "create_disks": True, "overwrite_disks": True,
                            "address": "127.0.0.1"}


def presync_check_open(dest: str, **over: Any) -> tuple[str, dict]:
    """A presync's dry run: presync_open's arguments, each disk with its
    allocated bytes."""
    op, args = presync_open(dest, **over)
    return "presync_check_open", args


# --------------------------------------------------------------------------- requests

def _nested(depth: int) -> Any:
    v: Any = 0
    for _ in range(depth):
        v = [v]
    return v


# frame -> what the error says; the session goes on
REQUESTS: dict[str, tuple[Any, str]] = {
    "unknown-op": ({"id": 1, "op": "format_disk"}, "unknown request 'format_disk'"),
    "op-not-a-string": ({"id": 1, "op": 7}, '"op" string'),
    "op-with-nul": ({"id": 1, "op": "pi\0ng"}, "unknown request"),
    "frame-is-a-list": ([1, 2, 3], '"op" string'),
    "frame-is-a-string": ("ping", '"op" string'),
    "frame-is-null": (None, '"op" string'),
    "no-id": ({"op": "ping"}, 'integer "id"'),
    "id-is-bool": ({"id": True, "op": "ping"}, 'integer "id"'),
    "id-is-a-string": ({"id": "1", "op": "ping"}, 'integer "id"'),
    "id-is-a-float": ({"id": 1.5, "op": "ping"}, 'integer "id"'),
    "args-not-an-object": ({"id": 1, "op": "ping", "args": [1]}, "args must be an object"),
    "unknown-argument": ({"id": 1, "op": "ping", "args": {"x": 1}}, "unknown arguments x"),
    "deeply-nested-argument": ({"id": 1, "op": "ping", "args": {"x": _nested(900)}},
                               "unknown arguments x"),
    "huge-argument": ({"id": 1, "op": "ping", "args": {"x": "y" * 900_000}},
                      "unknown arguments x"),
    "finish-before-prepare": ({"id": 1, "op": "finish", "args": {"resume": True}},
                              "finish before prepare"),
    "close-before-open": ({"id": 1, "op": "presync_close",
                           "args": {"records": {}, "source": "s"}}, "without presync_open"),
    "wrong-version": ({"id": 1, "op": "hello", "args": {"protocol": 2}}, "protocol 2"),
    "version-zero": ({"id": 1, "op": "hello", "args": {"protocol": 0}}, "protocol 0"),
    "version-huge": ({"id": 1, "op": "hello", "args": {"protocol": 2 ** 70}}, "is not spoken"),
    "version-a-string": ({"id": 1, "op": "hello", "args": {"protocol": "1"}}, "wrong type"),
    "keepalive-zero": ({"id": 1, "op": "hello", "args": {"protocol": 1, "keepalive": 0}},
                       "keepalive"),
    "keepalive-huge": ({"id": 1, "op": "hello", "args": {"protocol": 1, "keepalive": 1e308}},
                       "keepalive"),
    "keepalive-nan": ({"id": 1, "op": "hello",
                       "args": {"protocol": 1, "keepalive": float("nan")}}, "keepalive"),
    "resume-not-bool": ({"id": 1, "op": "finish", "args": {"resume": "yes"}}, "wrong type"),
    "records-not-generations": ({"id": 1, "op": "presync_close",
                                 "args": {"records": {"disk0": "x"}, "source": "s"}},
                                "records map nodes"),
    "check-bad-shape": ({"id": 1, "op": "presync_check", "args": {"disks": {"disk0": "x"}}},
                        "map nodes to"),
    "unwritten-bad-format": ({"id": 1, "op": "presync_unwritten",
                              "args": {"disks": {"disk0": ["/x.img", "vmdk"]}}},
                             "map nodes to [path, raw|qcow2]"),
    "command-not-allowed": ({"id": 1, "op": "command", "args": {"argv": ["list"]}},
                            "takes no commands"),
    "signal-not-known": ({"id": 1, "op": "command_signal", "args": {"signal": "KILL"}},
                         "signal is INT or TERM"),
    "forget-not-strings": ({"id": 1, "op": "presync_forget", "args": {"paths": [1]}},
                           "paths are strings"),
    "abort-with-arguments": ({"id": 1, "op": "abort", "args": {"force": True}},
                             "unknown arguments force"),
}


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("case", REQUESTS)
def test_bad_request_gets_one_line_and_the_session_goes_on(agents, transport, case):
    frame, words = REQUESTS[case]
    peer = agents(transport)
    peer.send(frame)
    refused(peer.recv(), words)
    serves(peer)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_requests_before_hello_are_refused(agents, transport):
    peer = agents(transport, greet=False)
    for op, args in (("ping", {}), ("prepare", {}), presync_open("/x"), ("abort", {})):
        refused(peer.call(op, **args), "first request must be hello")
    peer.hello()
    serves(peer)


# --------------------------------------------------------------------------- arguments

ARGUMENTS: dict[str, tuple[Callable[[Host], tuple[str, dict]], str]] = {
    "vm-name-with-slash": (lambda h: prepare(spec("a/b")), "name must be"),
    "vm-name-with-nul": (lambda h: prepare(spec("a\0b")), "name must be"),
    "vm-name-of-300": (lambda h: prepare(spec("a" * 300)), "name must be"),
    "vm-name-dotdot": (lambda h: prepare(spec("..")), "name must be"),
    "vm-named-images": (lambda h: prepare(spec("images")), "cannot be named 'images'"),
    "vm-named-agent.toml": (lambda h: prepare(spec("agent.toml")), "cannot be named"),
    "vm-named-like-a-record": (lambda h: prepare(spec("presync-1-1.json")), "cannot be named"),
    "vm-named-like-a-temporary": (lambda h: prepare(spec("presync-1-1.tmp")), "cannot be named"),
    "node-with-slash": (lambda h: prepare(spec(disk=str(h.images / "a.img")),
                                          [disk(node="disk0/../x")]), "not a disk"),
    "node-with-nul": (lambda h: prepare(spec(disk=str(h.images / "a.img")),
                                        [disk(node="disk\0")]), "not a disk"),
    "node-of-300": (lambda h: prepare(spec(disk=str(h.images / "a.img")),
                                      [disk(node="d" * 300)]), "not a disk"),
    "export-with-slash": (lambda h: prepare(spec(disk=str(h.images / "a.img")),
                                            [disk(export="a/b")]), "export name"),
    "export-with-nul": (lambda h: prepare(spec(disk=str(h.images / "a.img")),
                                          [disk(export="a\0b")]), "export name"),
    "export-of-300": (lambda h: prepare(spec(disk=str(h.images / "a.img")),
                                        [disk(export="e" * 300)]), "export name"),
    "size-negative": (lambda h: prepare(spec(disk=str(h.images / "a.img")),
                                        [disk(size=-1)]), "disk size"),
    "size-2^64": (lambda h: prepare(spec(disk=str(h.images / "a.img")),
                                    [disk(size=2 ** 64)]), "disk size"),
    "size-10^30": (lambda h: prepare(spec(disk=str(h.images / "a.img")),
                                     [disk(size=10 ** 30)]), "disk size"),
    "size-a-float": (lambda h: prepare(spec(disk=str(h.images / "a.img")),
                                       [disk(size=1.5)]), "wrong type"),
    "format-vmdk": (lambda h: prepare(spec(disk=str(h.images / "a.img")),
                                      [disk(fmt="vmdk")]), "not raw or qcow2"),
    "disk-twice": (lambda h: prepare(spec(disk=str(h.images / "a.img")),
                                     [disk(), disk()]), "named twice"),
    "cpus-absurd": (lambda h: prepare(spec() + "cpus = 100000\n"), "cpus"),
    "spec-not-toml": (lambda h: prepare("name = [\n"), "spec"),
    "spec-nested-deep": (lambda h: prepare("x = " + "[" * 5000 + "]" * 5000),
                         "nested too deeply"),
    "spec-extra-args": (lambda h: prepare(spec() + 'extra_args = ["-drive", "file=/etc/shadow"]\n'),
                        "allow_extra_args"),
    "port-zero": (lambda h: prepare(spec(), nbd={"port": 0}), "not a TCP port"),
    "port-70000": (lambda h: prepare(spec(), migrate={"port": 70000}), "not a TCP port"),
    "copy-storage-bogus": (lambda h: prepare(spec(), options={"copy_storage": "everything"}),
                           "copy"),
    "parallel-connections-absurd": (lambda h: prepare(spec(), options={
        "parallel_connections": 10 ** 9}), "parallel"),
    "unknown-option": (lambda h: prepare(spec(), options={"run_as_root": True}),
                       "unknown arguments run_as_root"),
    "accel-bogus": (lambda h: prepare(spec(), accel="xen"), "accel"),
    "presynced-unhashable": (lambda h: prepare(spec(), presynced=[[1]]), "presynced"),
    "presynced-objects": (lambda h: prepare(spec(), presynced=[{"a": 1}]), "presynced"),
    "presync-size-negative": (lambda h: presync_open(str(h.images / "p.img"), size=-5),
                              "disk size"),
    "presync-size-2^64": (lambda h: presync_open(str(h.images / "p.img"), size=2 ** 64),
                          "disk size"),
    "presync-node-bogus": (lambda h: presync_open(str(h.images / "p.img"), node="../x"),
                           "not a disk node"),
    "presync-format-bogus": (lambda h: presync_open(str(h.images / "p.img"), fmt="vpc"),
                             "not raw or qcow2"),
    "presync-relative-path": (lambda h: presync_open("images/p.img"), "not an absolute"),
    # recover's requests: another migration's VM, or none, is never touched
    "token-not-hex": (lambda h: ("probe", {"name": "web1", "token": "../x"}), "token"),
    "token-of-300": (lambda h: ("probe", {"name": "web1", "token": "a" * 300}), "token"),
    "probe-name-dotdot": (lambda h: ("probe", {"name": "..", "token": "ab"}), "VM name"),
    "finish-orphan-none-kept": (lambda h: ("finish_orphan", {"name": "web1", "token": "ab",
                                                              "resume": True}),
                                "waiting for its source"),
    "undo-orphan-none-kept": (lambda h: ("undo_orphan", {"name": "web1", "token": "ab"}),
                              "waiting for its source"),
    "undo-orphan-name-with-slash": (lambda h: ("undo_orphan", {"name": "a/b", "token": "ab"}),
                                    "VM name"),
    "keep-partial-before-prepare": (lambda h: ("keep_partial", {"generation": 1}),
                                    "before prepare"),
    "keep-partial-generation-negative": (lambda h: ("keep_partial", {"generation": -1}),
                                         "generation"),
    "abort-keep-bogus": (lambda h: ("abort", {"keep": {"../x": 1}}), "keep maps"),
    # a dry run's check is validated as its prepare
    "check-allocated-negative": (lambda h: check(spec(disk=str(h.images / "a.img")),
                                                 [disk(allocated=-1)]), "disk size"),
    "check-allocated-2^64": (lambda h: check(spec(disk=str(h.images / "a.img")),
                                             [disk(allocated=2 ** 64)]), "disk size"),
    "check-allocated-a-string": (lambda h: check(spec(disk=str(h.images / "a.img")),
                                                 [disk(allocated="1")]), "wrong type"),
    "check-with-a-token": (lambda h: check(spec(), token="ab"), "unknown arguments token"),
    "check-node-bogus": (lambda h: check(spec(disk=str(h.images / "a.img")),
                                         [disk(node="disk0/../x")]), "not a disk"),
    "check-spec-extra-args": (lambda h: check(spec() + 'extra_args = ["-S"]\n'),
                              "allow_extra_args"),
    "check-port-zero": (lambda h: check(spec(), nbd={"port": 0}), "not a TCP port"),
    "ping-pad-not-a-string": (lambda h: ("ping", {"pad": 1}), "wrong type"),
    "presync-check-size-2^64": (lambda h: presync_check_open(str(h.images / "p.img"),
                                                             size=2 ** 64), "disk size"),
    "presync-check-allocated-negative": (lambda h: presync_check_open(
        str(h.images / "p.img"), allocated=-1), "disk size"),
    "presync-check-node-bogus": (lambda h: presync_check_open(str(h.images / "p.img"),
                                                              node="../x"), "not a disk node"),
    "presync-check-unknown-argument": (lambda h: ("presync_check_open", {
        "disks": [], "serve": True}), "unknown arguments serve"),
}


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("case", ARGUMENTS)
def test_bad_arguments_are_refused_before_anything_is_made(agents, host, transport, case):
    make, words = ARGUMENTS[case]
    peer = agents(transport)
    op, args = make(host)
    refused(peer.call(op, **args), words)
    assert sorted(os.listdir(host.images)) == ["out"]
    serves(peer)


# --------------------------------------------------------------------------- paths

def _paths(h: Host) -> dict[str, tuple[str, str]]:
    """kind -> (path, words of the refusal)"""
    outside = "outside the destination's storage roots"
    own = "own state directory"
    return {
        "dotdot": (str(h.images) + "/../../../victim/new.img", outside),
        "dotdot-onto-a-file": (str(h.images) + "/../../../victim/precious.txt", outside),
        "absolute-outside": (str(h.victim / "new.img"), outside),
        "symlink-out-of-the-root": (str(h.images / "out" / "new.img"), outside),
        "agent-toml": (str(h.state / "agent.toml"), own),
        "presync-record": (str(h.state / "presync-1-1.json"), own),
        "incoming-record": (str(h.state / "evil" / "incoming.json"), own),
        "state-dir-itself": (str(h.state), own),
        "nul-byte": (str(h.images / "a\0b.img"), "NUL"),
        "name-of-300": (str(h.images / ("x" * 300 + ".img")), "longer than 255"),
    }


PATH_KINDS = ("dotdot", "dotdot-onto-a-file", "absolute-outside", "symlink-out-of-the-root",
              "agent-toml", "presync-record", "incoming-record", "state-dir-itself",
              "nul-byte", "name-of-300")


def _field_request(field: str, path: str, h: Host) -> tuple[str, dict]:
    image = str(h.images / "ok.img")
    if field == "disk":
        return prepare(spec(disk=path), [disk()], options={"create_disks": True,
                                                          "overwrite_disks": True})
    if field in ("kernel", "serial"):
        return prepare(spec(**{field: path}))
    if field == "initrd":
        return prepare(spec(kernel=str(h.images / "vmlinuz"), initrd=path))
    if field == "backing":
        return prepare(spec(disk=image, fmt="qcow2"),
                       [disk(fmt="qcow2", backing=path, backing_fmt="raw")],
                       options={"create_disks": True, "copy_storage": "inc"})
    if field == "presync-dest":
        return presync_open(path)
    if field == "presync-check":
        return "presync_check", {"disks": {"disk0": [path, 1]}}
    if field == "presync-unwritten":
        return "presync_unwritten", {"disks": {"disk0": [path, "raw"]}}
    assert field == "presync-forget"
    return "presync_forget", {"paths": [path]}


PATH_FIELDS = ("disk", "kernel", "initrd", "serial", "backing", "presync-dest",
               "presync-check", "presync-unwritten", "presync-forget")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", PATH_KINDS)
@pytest.mark.parametrize("field", PATH_FIELDS)
def test_every_path_field_stays_in_the_roots(agents, host, field, kind, mode):
    peer = agents("stdio", mode)
    path, words = _paths(host)[kind]
    op, args = _field_request(field, path, host)
    refused(peer.call(op, **args), words)
    serves(peer)


ADDRESSES = {"with-nul": "a\0b", "of-300": "x" * 300, "not-here": "203.0.113.9",
             "no-such-host": "no-such-host.invalid", "bad-ipv6": "::zz"}


@pytest.mark.parametrize("address", ADDRESSES)
@pytest.mark.parametrize("op", ["prepare", "check", "presync_open", "presync_check_open"])
def test_an_address_to_listen_on_is_checked(agents, host, op, address):
    """One that cannot be an address is refused; one the host cannot listen on
    is a check's problem (and QEMU's or qemu-nbd's one-line error otherwise)."""
    peer = agents("stdio")
    addr = ADDRESSES[address]
    if op in ("prepare", "check"):
        _, args = check(spec(), [], migrate={"address": addr})
    else:
        _, args = presync_open(str(host.images / "p.img"))
        args["address"] = addr
    reply = peer.call(op, **args)
    if address in ("with-nul", "of-300"):
        refused(reply, "is not a host name or IP address")
    elif op.endswith("check") or op == "presync_check_open":
        assert reply.get("ok") is True, reply
        found = [p for p in reply["result"]["problems"] if "cannot listen on" in p]
        assert len(found) == 1 and len(found[0]) < 600, reply
    else:
        refused_or_failed = reply.get("ok") is False and "internal error" not in str(reply)
        assert refused_or_failed, reply
    assert sorted(os.listdir(host.images)) == ["out"]
    serves(peer)


CHECK_FIELDS = ("disk", "kernel", "initrd", "serial", "backing", "presync-dest")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", PATH_KINDS)
@pytest.mark.parametrize("field", CHECK_FIELDS)
def test_a_check_names_each_path_outside_the_roots_once(agents, host, field, kind, mode):
    """A dry run's check answers with the refusal prepare would give, as one of
    its problems, said once, and looks no further at that path."""
    peer = agents("stdio", mode)
    path, words = _paths(host)[kind]
    op, args = _field_request(field, path, host)
    op = "presync_check_open" if op == "presync_open" else "check"
    reply = peer.call(op, **{k: v for k, v in args.items() if k != "token"})
    if reply.get("ok") is False:
        refused(reply, words)       # the spec itself cannot hold such a path
    else:
        found = reply["result"]["problems"]
        named = [p for p in found if words in p]
        assert len(named) == 1, found
        assert all("\n" not in p and len(p) < 600 and "internal error" not in p
                   for p in found)
    assert sorted(os.listdir(host.images)) == ["out"]
    serves(peer)


@pytest.mark.parametrize("mode", MODES)
def test_only_a_kept_copy_s_holes_are_told(agents, host, mode):
    """What an image holds is told only of one presync or a kept copy left:
    any other file under the roots is none of a peer's business."""
    peer = agents("stdio", mode)
    image = host.images / "someone-elses.img"
    image.write_bytes(b"x" * 4096)
    try:
        refused(peer.call("presync_unwritten", disks={"disk0": [str(image), "raw"]}),
                "is no presynced or kept copy")
        serves(peer)
    finally:
        image.unlink()


# --------------------------------------------------------------------------- the critical attacks

def _critical(h: Host) -> dict[str, tuple[str, dict]]:
    return {
        # an image the reaper would read as an orphaned presync record
        "presync-record": presync_open(str(h.state / "presync-1-1.json")),
        # one it would read as an orphaned incoming migration
        "incoming-record": presync_open(str(h.state / "evil" / "incoming.json")),
        # the next agent's config (allow_extra_args, storage_roots = ["/"])
        "agent-toml": presync_open(str(h.state / "agent.toml")),
        "agent-toml-as-a-disk": prepare(spec(disk=str(h.state / "agent.toml")), [disk()],
                                        options={"overwrite_disks": True}),
        # the guest's console appended to the config
        "agent-toml-as-serial": prepare(spec(serial=str(h.state / "agent.toml"))),
    }


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("attack", ["presync-record", "incoming-record", "agent-toml",
                                    "agent-toml-as-a-disk", "agent-toml-as-serial"])
def test_the_agent_s_records_and_config_are_out_of_reach(agents, host, attack, transport, mode):
    peer = agents(transport, mode)
    op, args = _critical(host)[attack]
    refused(peer.call(op, **args), "own state directory")
    assert not (host.state / "presync-1-1.json").exists()
    assert not (host.state / "evil").exists()
    # a fresh agent (what the next ssh session starts) still has its own config
    fresh = Agent(host.state, *host.args(mode))
    try:
        assert fresh.hello()["storage_roots"] == host.roots(mode)
        r = fresh.call("prepare", **prepare(spec() + 'extra_args = ["-S"]\n')[1])
        refused(r, "allow_extra_args")
    finally:
        fresh.kill()
    serves(peer)


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _ident(path: Path) -> list[int]:
    st = os.stat(path)
    return [st.st_dev, st.st_ino]


# record as planted (a forgery, or an older agent's) -> whether its image goes
FORGED = {
    "owner-not-a-pid": lambda h, img: ({"owner": "x", "created": [str(img)],
                                        "ids": {str(img): _ident(img)}}, False),
    "owner-bool": lambda h, img: ({"owner": True, "created": [str(img)],
                                   "ids": {str(img): _ident(img)}}, False),
    "no-identity": lambda h, img: ({"owner": _dead_pid(), "created": [str(img)]}, False),
    "identity-of-another-file": lambda h, img: (
        {"owner": _dead_pid(), "created": [str(img)],
         "ids": {str(img): _ident(h.victim / "disk.img")}}, False),
    "victim-outside-the-roots": lambda h, img: (
        {"owner": _dead_pid(), "created": [str(h.victim / "disk.img")],
         "ids": {str(h.victim / "disk.img"): _ident(h.victim / "disk.img")}}, False),
    # the control: a record as the agent writes it is acted on
    "as-the-agent-writes-it": lambda h, img: ({"owner": _dead_pid(), "created": [str(img)],
                                               "ids": {str(img): _ident(img)}}, True),
}


@pytest.mark.parametrize("where", ["presync", "incoming"])
@pytest.mark.parametrize("case", FORGED)
def test_records_are_checked_when_read(host, case, where):
    """A record the agent did not write as written (planted before this
    version, say) makes its reaper remove nothing but the agent's own images."""
    img = host.images / "made.img"
    img.write_bytes(b"x" * 4096)
    rec, removed = FORGED[case](host, img)
    path = (host.state / "presync-9-9.json" if where == "presync"
            else host.state / "forged" / "incoming.json")
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(rec))
    try:
        a = Agent(host.state)        # reaps what dead agents left at start
        a.hello()
        a.kill()
        assert img.exists() != removed, (case, rec)
    finally:
        img.unlink(missing_ok=True)
        path.unlink(missing_ok=True)
        if where == "incoming" and path.parent.exists():
            path.parent.rmdir()


# --------------------------------------------------------------------------- framing

FRAMES: dict[str, tuple[bytes, str]] = {
    "length-4GiB": (struct.pack(">I", 0xFFFFFFFF), "larger than"),
    "length-1GiB": (struct.pack(">I", 1 << 30), "larger than"),
    "length-just-over": (struct.pack(">I", (1 << 20) + 1), "larger than"),
    "not-utf8": (struct.pack(">I", 5) + b"\xff\xfe{}x", "not UTF-8 JSON"),
    "not-json": (struct.pack(">I", 6) + b"{'a':}", "not UTF-8 JSON"),
    "empty-body": (struct.pack(">I", 0), "not UTF-8 JSON"),
    "nested-200k": (struct.pack(">I", 200_000) + b"[" * 200_000, "not UTF-8 JSON"),
    "digits-of-a-huge-int": (struct.pack(">I", 6000) + b"9" * 6000, "not UTF-8 JSON"),
}


def _fresh_client_is_served(agents, transport: str) -> None:
    peer = agents(transport)
    serves(peer)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("case", FRAMES)
def test_broken_frame_ends_that_session_only(agents, transport, case):
    data, words = FRAMES[case]
    peer = agents(transport, greet=False)
    peer.hello()
    peer.send_raw(data)
    r = peer.recv()
    assert r is not None and r["id"] is None, r
    refused(r, words)
    assert peer.recv() is None                     # then it hangs up
    if isinstance(peer, Agent):
        rc, err = peer.close()
        assert rc == 0 and "Traceback" not in err, err
    _fresh_client_is_served(agents, transport)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("cut", ["in-the-header", "in-the-body"])
def test_truncated_frame(agents, transport, cut):
    peer = agents(transport, greet=False)
    peer.hello()
    peer.send_raw(b"\0\0" if cut == "in-the-header" else struct.pack(">I", 100) + b'{"id"')
    if isinstance(peer, Agent):
        peer.proc.stdin.close()
        r = peer.recv()
        refused(r, "in the middle of a frame")
        assert peer.proc.wait(20) == 0
        assert "Traceback" not in peer.proc.stderr.read().decode()
    else:
        peer.sock.close()
    _fresh_client_is_served(agents, transport)


# --------------------------------------------------------------------------- connections

def _served_within(agent: TlsAgent, seconds: float) -> float:
    t0 = time.monotonic()
    p = agent.connect()
    try:
        p.hello()
        serves(p)
    finally:
        p.close()
    took = time.monotonic() - t0
    assert took < seconds, f"a real client waited {took:.2f} s"
    return took


def _plain(port: int, n: int) -> list[socket.socket]:
    out = []
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        out.append(s)
    return out


def _tls_attempts(port: int, n: int, ctx: ssl.SSLContext) -> int:
    """N handshakes with CTX; returns how many the agent refused."""
    refusals = 0
    for _ in range(n):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                    s.sendall(b"\0\0\0\2{}")
                    if not s.recv(10):
                        refusals += 1
        except (ssl.SSLError, ConnectionError, socket.timeout):
            refusals += 1
    return refusals


def _tls_agent(agents) -> TlsAgent:
    agents("tls").close()
    return agents.tls["default-root"]


@pytest.mark.parametrize("flood", ["plain-tcp-idle", "plain-tcp-garbage", "tls-no-cert",
                                   "tls-rogue-cert", "tls-cert-idle", "tunnel-idle"])
def test_floods_do_not_lock_a_real_client_out(agents, pki, rogue_pki, flood):
    agent = _tls_agent(agents)
    held: list = []
    try:
        if flood == "plain-tcp-idle":
            held = _plain(agent.port, 200)
        elif flood == "plain-tcp-garbage":
            held = _plain(agent.port, 100)
            time.sleep(0.2)
            for s in held:
                try:
                    s.send(b"GET / HTTP/1.0\r\n\r\n")
                except OSError:
                    pass
        elif flood == "tunnel-idle":
            # past the listener's peek, each waits in the C relay for a handshake
            held = _plain(agent.port, 200)
            time.sleep(0.2)
            for s in held:
                try:
                    s.send(b"VMFRELAY")
                except OSError:
                    pass
        elif flood == "tls-no-cert":
            ctx = client_context(pki, cert=False)
            assert _tls_attempts(agent.port, 30, ctx) == 30
        elif flood == "tls-rogue-cert":
            ctx = client_context(rogue_pki)
            ctx.load_verify_locations(str(pki.ca_cert))
            assert _tls_attempts(agent.port, 30, ctx) == 30
        else:
            # authenticated but silent: each a session until its keepalive ends it
            held = [agent.connect() for _ in range(20)]
        time.sleep(0.3)
        _served_within(agent, 1.0)
    finally:
        for s in held:
            s.close()
    assert agent.proc.poll() is None
    assert "Traceback" not in agent.text()


@pytest.mark.parametrize("who", ["token-unknown", "rogue-cert"])
def test_a_tunnel_connection_needs_the_ca_and_a_prepared_token(agents, pki, rogue_pki, who):
    """A --tunnelled stream's connection (the relay's preface, then TLS in the
    C relay) is closed unless its certificate is the CA's and its token one
    that a session's prepare made; the agent serves on."""
    agent = _tls_agent(agents)
    if who == "rogue-cert":
        ctx = client_context(rogue_pki)
        ctx.load_verify_locations(str(pki.ca_cert))
    else:
        ctx = client_context(pki)
    with socket.create_connection(("127.0.0.1", agent.port), timeout=10) as raw:
        raw.sendall(b"VMFRELAY")
        try:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                s.sendall(b"VMFTUN1 " + b"0" * 64 + b"payload")
                assert s.recv(10) == b""
        except (ssl.SSLError, ConnectionError):
            assert who == "rogue-cert"
    _served_within(agent, 1.0)
    assert agent.proc.poll() is None
    why = "signed by the CA" if who == "rogue-cert" else "named no prepared migration"
    deadline = time.monotonic() + 5
    while why not in agent.text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert any("tunnel connection(s): " in line and why in line
               for line in agent.text().splitlines()), agent.text()


def test_idle_unauthenticated_connection_is_cut_after_the_handshake_deadline(agents):
    agent = _tls_agent(agents)
    s = socket.create_connection(("127.0.0.1", agent.port), timeout=15)
    try:
        t0 = time.monotonic()
        assert s.recv(1) == b""                     # hung up on, not left waiting
        took = time.monotonic() - t0
        assert 4 < took < 9, took
    finally:
        s.close()
    _served_within(agent, 1.0)


def test_an_unauthenticated_flood_is_a_few_log_lines(host, pki, tmp_path):
    """400 idle TCP connections against an agent with 256 descriptors: the
    log stays at a few lines and a real client is served within a second
    (asyncio's own server logged a traceback per accept attempt, 18,272 in 17 s,
    and a real client waited 5 s)."""
    agent = TlsAgent(host.state, pki, tmp_path / "agent.log",
                     prefix=("prlimit", "--nofile=256:256", "--"))
    held: list = []
    try:
        held = _plain(agent.port, 400)
        time.sleep(1.0)
        _served_within(agent, 1.0)
        time.sleep(0.5)
        _served_within(agent, 1.0)
    finally:
        for s in held:
            s.close()
        agent.stop()
    lines = agent.text().splitlines()
    assert "Traceback" not in agent.text()
    assert len(lines) <= 6, lines


def test_out_of_descriptors_backs_off_with_one_line(host, pki, tmp_path):
    """Authenticated sessions use up the agent's 32 descriptors: it says so once,
    retries, and serves a client again as soon as they end."""
    agent = TlsAgent(host.state, pki, tmp_path / "agent.log",
                     prefix=("prlimit", "--nofile=32:32", "--"))
    sessions: list = []
    try:
        for _ in range(40):
            try:
                sessions.append(TlsPeer(agent.port, client_context(pki), timeout=1))
            except (OSError, ssl.SSLError):
                break                      # waiting in the backlog: out of descriptors
        assert len(sessions) < 40, "the agent never ran out of descriptors"
        time.sleep(1.0)
        for p in sessions:
            p.close()
        time.sleep(0.2)
        _served_within(agent, 2.0)
    finally:
        for p in sessions:
            p.close()
        agent.stop()
    text = agent.text()
    assert "Traceback" not in text
    assert text.count("Too many open files") == 1, text


# --------------------------------------------------------------------------- low defects

@pytest.mark.parametrize("transport", TRANSPORTS)
def test_hello_keepalive_applies_to_the_very_next_wait(agents, transport):
    """hello keepalive=0.1: silence is cut after 0.1 * 3 + 2 s, not after the
    default 17 s that was computed before hello was answered."""
    peer = agents(transport, greet=False)
    assert peer.call("hello", protocol=1, version="t", keepalive=0.1)["ok"]
    t0 = time.monotonic()
    if isinstance(peer, Agent):
        assert peer.recv() is None
    else:
        peer.sock.settimeout(20)
        assert peer._read(1) == b""
    assert time.monotonic() - t0 < 8
    _fresh_client_is_served(agents, transport)


def test_refused_prepare_leaves_the_connection_free(host):
    """A refused prepare used to keep the connection's one slot: every later
    prepare said "already prepared", and hanging up logged "removing the
    incoming VM None"."""
    a = Agent(host.state)
    try:
        a.hello()
        op, args = prepare(spec(disk=str(host.victim / "x.img")), [disk()])
        refused(a.call(op, **args), "outside the destination's storage roots")
        op, args = prepare(spec(kernel=str(host.victim / "precious.txt")))
        refused(a.call(op, **args), "the kernel")
        serves(a)
        rc, err = a.close()
        assert rc == 0 and "None" not in err and "Traceback" not in err, err
    finally:
        a.kill()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_relay_input_with_no_command_relaying_is_refused(host, pki, tmp_path, transport):
    """An agent that takes commands (--allow-control), none of them relaying:
    a relay_input's frame — Ctrl-C's "signal" of `migrate --direct`, or a
    reply the management machine passes on — has no stdin to go to, and is
    refused in one line (never written anywhere, never a crash); the session
    goes on."""
    tls = TlsAgent(host.state, pki, tmp_path / "agent.log", "--allow-control") \
        if transport == "tls" else None
    peer: Peer = tls.connect() if tls else Agent(host.state, "--allow-control")
    try:
        peer.hello()
        for frame in ({"signal": "INT"}, {"id": 1, "ok": True, "result": {}}):
            refused(peer.call("relay_input", frame=frame), "no command relays here")
            serves(peer)
    finally:
        peer.kill() if isinstance(peer, Agent) else peer.close()
        if tls:
            tls.stop()
    if tls:
        assert "Traceback" not in tls.text(), tls.text()
