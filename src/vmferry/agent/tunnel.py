"""--tunnelled to a tls:// agent: QEMU's disk and memory streams through the
agent's one TLS port, relayed by the C engine (ext/tunnel.c) so that no
payload byte passes through Python.

    source host                                  destination host (agent)
    QEMU ──unix──▶ client relay ══TLS:16514══▶ listener ─▶ server relay ──unix──▶ QEMU
                   (a 0700 folder)              (preface)   (token → socket)

Each stream connection is its own TLS connection to the agent's port.  Its
first 8 bytes, in the clear, are a preface (RELAY_PREFACE) that no TLS
ClientHello can start with, so the agent's listener tells it from a control
connection by peeking, before any handshake, and hands the socket to the
server relay: Python's ssl could not give a session it negotiated to C.
The relay then requires a client certificate signed by the CA (the
control channel's PKI) and, inside TLS, a header with a token that the
agent's prepare made for that migration's session; anything else is closed.
"""
from __future__ import annotations

import secrets
import threading
from typing import Any, Optional

from vmferry import _engine
from vmferry.agent.pki import Pki
from vmferry.errors import VmferryError

PREFACE: bytes = _engine.RELAY_PREFACE


def new_token() -> str:
    return secrets.token_hex(_engine.RELAY_TOKEN_LEN // 2)


class TlsRelay:
    """A C relay and the thread its loop runs in, without the GIL."""

    def __init__(self, relay: Any) -> None:
        self._r = relay
        self.error: Optional[VmferryError] = None
        self._thread = threading.Thread(target=self._run, name="vmferry-tls-relay",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._r.run()
        except VmferryError as e:
            self.error = e

    def listen(self, path: str, token: str) -> None:
        self._r.listen(path, token)

    def route(self, token: str, path: str) -> None:
        self._r.route(token, path)

    def unroute(self, token: str) -> None:
        self._r.unroute(token)

    def adopt(self, fd: int, timeout: float) -> None:
        self._r.adopt(fd, max(1, int(timeout * 1000)))

    def stats(self) -> dict[str, Any]:
        return self._r.stats()

    def close(self) -> None:
        """Stops the loop, waits for it, and closes every connection."""
        self._r.stop()
        self._thread.join()
        self._r.close()


def client(pki: Pki, address: str, port: int, server_name: str) -> TlsRelay:
    """The source's half: the same client certificate as the control channel;
    ADDRESS is the agent's numeric IP (the one the control channel reached),
    SERVER_NAME what its certificate must name (the host dialled)."""
    pki.client_context()              # the files are there, or one line says which
    return TlsRelay(_engine.Relay("client", str(pki.cacert), str(pki.clientcert),
                               str(pki.clientkey), address=address, port=port,
                               server_name=server_name, handshake_ms=30000))


def server(pki: Pki, pending_cap: int) -> TlsRelay:
    """The agent's half: its server certificate, clients must be the CA's."""
    return TlsRelay(_engine.Relay("server", str(pki.cacert), str(pki.servercert),
                               str(pki.serverkey), pending_cap=pending_cap))
