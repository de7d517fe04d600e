"""The agent's wire protocol, version 1.

A frame is a 4-byte big-endian length and that many bytes of UTF-8 JSON
holding one object.  The client sends requests {"id": N, "op": NAME,
"args": {...}}; the agent answers each with {"id": N, "ok": true,
"result": {...}} or {"id": N, "ok": false, "error": {"kind": K,
"message": TEXT}}.  The first request is always "hello", which both sides
use to agree on the protocol version.  Nothing else travels on the
channel: the disks and the memory stream go directly between the QEMUs.
"""
from __future__ import annotations

import asyncio
import json
import struct
from typing import Any, Optional

from vmferry.errors import MigrationError, UsageError, VmferryError

PROTOCOL = 1
MAX_FRAME = 1 << 20       # a VM spec and its disk list fit many times over
_LEN = struct.Struct(">I")

# error kinds on the wire -> what the source raises
USAGE, MIGRATION, PROTOCOL_ERROR = "usage", "migration", "protocol"


class ProtocolError(VmferryError):
    """The peer sent something that is not protocol version 1."""


async def read_frame(reader: asyncio.StreamReader, eof: Any = None) -> Optional[Any]:
    """The next decoded frame, or EOF at a clean end of stream (pass a marker
    of your own to tell it from a frame holding null)."""
    try:
        head = await reader.readexactly(_LEN.size)
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            return eof
        raise ProtocolError("the connection closed in the middle of a frame") from e
    (size,) = _LEN.unpack(head)
    if size > MAX_FRAME:
        raise ProtocolError(f"frame of {size} bytes is larger than {MAX_FRAME}: "
                            f"not a vmferry agent peer")
    try:
        body = await reader.readexactly(size)
    except asyncio.IncompleteReadError as e:
        raise ProtocolError("the connection closed in the middle of a frame") from e
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ProtocolError(f"frame is not UTF-8 JSON: {type(e).__name__}") from e


def encode(obj: Any) -> bytes:
    body = json.dumps(obj, separators=(",", ":")).encode()
    return _LEN.pack(len(body)) + body


def error_reply(rid: Any, kind: str, message: str) -> dict[str, Any]:
    return {"id": rid, "ok": False, "error": {"kind": kind, "message": message}}


def kind_of(exc: BaseException) -> str:
    if isinstance(exc, UsageError):
        return USAGE
    if isinstance(exc, ProtocolError):
        return PROTOCOL_ERROR
    return MIGRATION


def raise_error(op: str, error: Any) -> None:
    """Turn an error reply back into the exception the agent raised."""
    if not isinstance(error, dict):
        raise ProtocolError(f"agent sent a malformed error for {op}")
    kind, message = error.get("kind"), str(error.get("message", "unknown error"))
    if kind == USAGE:
        raise UsageError(f"destination: {message}")
    if kind == PROTOCOL_ERROR:
        raise ProtocolError(f"destination agent refused {op}: {message}")
    raise MigrationError(f"destination: {message}", phase=error.get("phase") or op)


class Args:
    """Typed access to a request's arguments: a wrong or missing field is a
    UsageError naming it, sent back as an error reply."""

    def __init__(self, op: str, args: Any) -> None:
        if not isinstance(args, dict):
            raise ProtocolError(f"{op}: args must be an object")
        self.op = op
        self.args = args

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        if key not in self.args or self.args[key] is None:
            if default is ...:
                raise ProtocolError(f"{self.op}: missing argument {key!r}")
            return default
        value = self.args[key]
        # bool is an int in Python; an int field must not take true/false
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ProtocolError(f"{self.op}: argument {key!r} has the wrong type")
        return value

    def only(self, *keys: str) -> None:
        extra = set(self.args) - set(keys)
        if extra:
            raise ProtocolError(f"{self.op}: unknown arguments {', '.join(sorted(extra))}")
