"""Every knob of a migration, with virsh's names in the comments."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from vmferry.errors import UsageError
from vmferry.units import mib_per_second
from vmferry.vm.spec import NAME_RE


@dataclasses.dataclass
class MigrateOptions:
    # --copy-storage-all / --copy-storage-inc: "all", "inc" or "none" (shared storage)
    copy_storage: str = "all"
    # --migrate-disks: node or device names (disk0, vd0) or paths; None = every writable, non-shared disk
    migrate_disks: Optional[list[str]] = None
    # --disk-map SRC=DST: destination image paths
    disk_map: dict[str, str] = dataclasses.field(default_factory=dict)
    # a destination spec file (virsh --xml)
    dest_spec: Optional[Path] = None
    create_disks: bool = False
    # --dname: the VM's name on the destination (None: the same)
    dname: Optional[str] = None
    # --persistent / --undefinesource: where the spec lives afterwards
    persistent: bool = True
    undefine_source: bool = False
    # --suspend: leave the guest paused on the destination
    suspend: bool = False
    # --offline: the VM is not running; only disks and spec move
    offline: bool = False
    # --timeout N with an action: "suspend" or "postcopy"
    timeout: Optional[float] = None
    timeout_action: Optional[str] = None
    # --bandwidth MiB/s (0 or None: unlimited, unlike QEMU's 128 MiB/s default)
    bandwidth: Optional[int] = None
    # --disk-bandwidth MiB/s: each disk's copy (mirror job or native engine), as
    # libvirt caps each disk's NBD mirror; None: unlimited
    disk_bandwidth: Optional[int] = None
    # --max-downtime ms
    max_downtime: Optional[int] = None
    # raise the downtime limit when the remaining data stops shrinking
    escalate_downtime: bool = True
    auto_converge: bool = False
    # --parallel-connections N: multifd channels
    parallel_connections: Optional[int] = None
    postcopy: bool = False
    # xbzrle page delta compression
    compressed: bool = False
    # who copies the disks: QEMU's blockdev-mirror, vmferry's engine (native.py),
    # or auto: the engine where it is faster (see Migration._pick_engine)
    storage_engine: str = "auto"
    # remote destinations refuse to write into an existing image unless asked
    overwrite_disks: bool = False
    # --tls: QEMU's tls-creds-x509 for the disks' NBD and the migration stream
    tls: bool = False
    # where the source's TLS files are, laid out as /etc/pki (qemu/ for --tls,
    # CA/ and libvirt/ for a tls:// agent)
    pki_dir: Path = Path("/etc/pki")
    # --listen-address: what the destination binds its NBD server and
    # migration stream to (default: the address the source connects to)
    listen_address: Optional[str] = None
    # --disks-uri / --migrate-uri tcp://HOST[:PORT]: the destination address
    # (and port) the source connects to, to pick a network
    disks_uri: Optional[str] = None
    migrate_uri: Optional[str] = None
    # --tunnelled: the disks' NBD and the memory stream travel inside the ssh
    # connection that carries the agent's requests, or through a tls:// agent's
    # port (the C relay); nothing else listens on the network
    tunnelled: bool = False

    def validate(self) -> None:
        if self.dname is not None and not NAME_RE.fullmatch(self.dname):
            raise UsageError(f"--dname {self.dname!r}: a VM name is 1 to 64 letters, digits, "
                             f"'.', '_' or '-', starting with a letter or digit")
        if self.storage_engine not in ("auto", "mirror", "native"):
            raise UsageError(f"--storage-engine must be auto, mirror or native, not "
                             f"{self.storage_engine!r}")
        if self.copy_storage not in ("all", "inc", "none"):
            raise UsageError(f"copy_storage must be all, inc or none, not {self.copy_storage!r}")
        if self.timeout_action not in (None, "suspend", "postcopy"):
            raise UsageError("the timeout action must be suspend or postcopy")
        if self.timeout_action and not self.timeout:
            raise UsageError(f"--timeout-{self.timeout_action} needs --timeout N")
        if self.timeout is not None and self.timeout <= 0:
            raise UsageError("--timeout must be a positive number of seconds")
        if self.timeout_action == "postcopy" and not self.postcopy:
            # libvirt requires --postcopy for --timeout-postcopy too; do the same
            raise UsageError("--timeout-postcopy needs --postcopy")
        if self.parallel_connections is not None and not 1 <= self.parallel_connections <= 64:
            raise UsageError("--parallel-connections must be 1 to 64")
        if self.max_downtime is not None and self.max_downtime <= 0:
            raise UsageError("--max-downtime must be a positive number of milliseconds")
        for flag, uri in (("--disks-uri", self.disks_uri), ("--migrate-uri", self.migrate_uri)):
            if uri is not None:
                parse_tcp_uri(flag, uri)
        if self.tunnelled:
            for flag, given in (("--tls", self.tls), ("--disks-uri", self.disks_uri),
                                ("--migrate-uri", self.migrate_uri),
                                ("--listen-address", self.listen_address)):
                if given:
                    raise UsageError(f"--tunnelled carries everything through the "
                                     f"agent's connection (ssh, or a tls:// agent's port: "
                                     f"encrypted, no port of its own): drop {flag}")
        if self.bandwidth is not None and self.bandwidth < 0:
            raise UsageError("--bandwidth must not be negative")
        self.disk_rate()

    def new_name(self, name: str) -> str:
        """What --dname renames NAME to on the destination; "" if it does not."""
        return self.dname if self.dname and self.dname != name else ""

    def disk_rate(self) -> int:
        """--disk-bandwidth in bytes per second per disk; 0: unlimited."""
        return mib_per_second(self.disk_bandwidth, "--disk-bandwidth")


def parse_tcp_uri(flag: str, uri: str) -> tuple[str, Optional[int]]:
    """tcp://HOST[:PORT] (IPv6 hosts in brackets) -> (host, port or None)."""
    from urllib.parse import urlsplit
    u = urlsplit(uri)
    try:
        port = u.port
    except ValueError:
        port = -1
    if u.scheme != "tcp" or not u.hostname or port == -1 or u.path not in ("", "/"):
        raise UsageError(f"{flag} {uri!r}: use tcp://HOST or tcp://HOST:PORT")
    return u.hostname, port
