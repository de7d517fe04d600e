"""Certificates, laid out as libvirt lays them out under /etc/pki (DIR
stands for /etc/pki):

    DIR/CA/cacert.pem                                the CA both sides trust
    DIR/libvirt/servercert.pem, private/serverkey.pem   the agent (tls://)
    DIR/libvirt/clientcert.pem, private/clientkey.pem   the source connecting to it
    DIR/qemu/ca-cert.pem, server-cert.pem, server-key.pem,
             client-cert.pem, client-key.pem        QEMU's --tls data streams

so hosts already set up for `virsh migrate --tls` over qemu+tls:// need
nothing new.
"""
from __future__ import annotations

import ssl
from pathlib import Path

from vmferry.errors import UsageError

DEFAULT_DIR = Path("/etc/pki")
QEMU_FILES = {"server": ("ca-cert.pem", "server-cert.pem", "server-key.pem"),
              "client": ("ca-cert.pem", "client-cert.pem", "client-key.pem")}


class Pki:
    def __init__(self, path: str | Path = DEFAULT_DIR) -> None:
        self.dir = Path(path)
        self.cacert = self.dir / "CA" / "cacert.pem"
        self.servercert = self.dir / "libvirt" / "servercert.pem"
        self.serverkey = self.dir / "libvirt" / "private" / "serverkey.pem"
        self.clientcert = self.dir / "libvirt" / "clientcert.pem"
        self.clientkey = self.dir / "libvirt" / "private" / "clientkey.pem"

    def _need(self, *paths: Path) -> None:
        for p in paths:
            if not p.is_file():
                raise UsageError(f"TLS: {p} is missing: lay certificates out as libvirt "
                                 f"does under /etc/pki, and name that folder with --pki")

    def server_context(self) -> ssl.SSLContext:
        """The agent's side: its own certificate, and a client certificate
        signed by the CA is required of everyone."""
        self._need(self.cacert, self.servercert, self.serverkey)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.servercert, self.serverkey)
        ctx.load_verify_locations(self.cacert)
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """The source's side: the agent's certificate must be the CA's and
        name the host we dialled."""
        self._need(self.cacert, self.clientcert, self.clientkey)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_verify_locations(self.cacert)
        ctx.load_cert_chain(self.clientcert, self.clientkey)
        return ctx

    def qemu_dir(self, endpoint: str) -> str:
        """DIR/qemu for QEMU's tls-creds-x509 (and libnbd), checked for the
        files ENDPOINT ("server" or "client") needs."""
        d = self.dir / "qemu"
        self._need(*(d / f for f in QEMU_FILES[endpoint]))
        return str(d)
