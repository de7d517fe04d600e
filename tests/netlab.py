"""Two hosts on one machine: a network namespace for the destination, joined to the
root namespace (the source host) by a veth pair; plus real TLS certificates and a real
sshd, so migration tests exercise the same kernel, ssh and TLS paths as two machines.

Nothing here imports vmferry, and nothing is mocked.  Needs root, iproute2 (ip, tc),
openssl and openssh; ``netlab_unavailable()`` says why a lab cannot be built here.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import ipaddress
import itertools
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Self

CMD_TIMEOUT = 30            # seconds for any ip/tc/openssl/ssh-keygen call
SSHD_START_TIMEOUT = 15.0   # seconds until sshd must accept a login

_SUBNET_PREFIX = "10.77"
_NS_RE = re.compile(r"^vfdst-(\d+)-(\d+)$")
_seq = itertools.count(1)


class NetLabError(RuntimeError):
    """A lab command failed; the message carries the command and its stderr."""


def _tool(name: str) -> str | None:
    # root's PATH usually has /usr/sbin, but a sudo or cron PATH may not
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")


def _run(argv: Sequence[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("stdin", subprocess.DEVNULL)
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", CMD_TIMEOUT)
    r = subprocess.run(list(argv), check=False, **kw)
    if check and r.returncode != 0:
        raise NetLabError(f"{' '.join(map(str, argv))} exited {r.returncode}: "
                          f"{(r.stderr or '').strip()}")
    return r


# --------------------------------------------------------------------------- network

@functools.cache
def netlab_unavailable() -> str | None:
    """None if network namespaces and veth pairs can be made here, else why not."""
    if os.geteuid() != 0:
        return "the network lab needs root (network namespaces, veth)"
    for tool in ("ip", "tc"):
        if _tool(tool) is None:
            return f"the network lab needs {tool} (iproute2)"
    ip = _tool("ip")
    probe = f"vfprobe-{os.getpid()}"
    r = _run([ip, "netns", "add", probe], check=False)
    if r.returncode != 0:
        return f"cannot create a network namespace: {r.stderr.strip()}"
    try:
        r = _run([ip, "link", "add", f"vfp{os.getpid()}", "type", "veth",
                  "peer", "name", "vfpeer", "netns", probe], check=False)
        if r.returncode != 0:
            return f"cannot create a veth pair: {r.stderr.strip()}"
        _run([ip, "link", "del", f"vfp{os.getpid()}"], check=False)
    finally:
        _run([ip, "netns", "del", probe], check=False)
    return None


@contextlib.contextmanager
def _global_lock() -> Iterator[None]:
    # two pytest runs at once must not pick the same 10.77.N subnet
    lockdir = Path("/run/lock") if Path("/run/lock").is_dir() else Path(tempfile.gettempdir())
    with open(lockdir / "vmferry-netlab.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _procs() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state letter) of every process, zombies ("Z") included."""
    table = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
                table[int(d.name)] = (int(fields[1]), fields[0])
    return table


def _ns_members(ns: str) -> set[int]:
    """Live processes in network namespace NS."""
    try:
        link = f"net:[{os.stat(f'/run/netns/{ns}').st_ino}]"
    except OSError:
        return set()
    members = set()
    for pid, (_, state) in _procs().items():
        with contextlib.suppress(OSError):
            if state != "Z" and os.readlink(f"/proc/{pid}/ns/net") == link:
                members.add(pid)
    return members


def _descendants(root: int) -> set[int]:
    """Live processes in the tree under ROOT, ROOT included."""
    table = _procs()
    tree, grew = {root}, True
    while grew:
        more = {pid for pid, (ppid, _) in table.items() if ppid in tree} - tree
        tree |= more
        grew = bool(more)
    return {pid for pid in tree if pid in table and table[pid][1] != "Z"}


def _kill_leaves_first(members: Callable[[], set[int]], timeout: float = 5.0) -> None:
    """SIGKILL every process members() returns, children before their parents.

    Killing a parent before it has reaped its children hands the zombies to init, which
    in some containers reaps them late or never; killing leaves first lets sshd or a
    shell reap its own children.
    """
    deadline = time.monotonic() + timeout
    while live := members():
        has_children = {ppid for ppid, _ in _procs().values()}
        leaves = [p for p in live if p not in has_children]
        if time.monotonic() > deadline:      # a parent that does not reap: stop waiting
            leaves = list(live)
        for pid in leaves:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline + 1:
            return
        time.sleep(0.01)


def _teardown(ns: str, host_if: str, procs: list[subprocess.Popen]) -> None:
    ip = _tool("ip") or "ip"
    _kill_leaves_first(lambda: _ns_members(ns))
    for p in procs:
        if p.returncode is None:   # not reaped yet, so its pid cannot have been reused
            # the group the lab started, should a member have left the namespace
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)
    # deleting a namespace frees its veth only later, in a kernel work queue; deleting
    # the host end frees both ends and the address at once, so N can be reused
    _run([ip, "link", "del", host_if], check=False)
    _run([ip, "netns", "del", ns], check=False)


def _reap_stale(ip: str) -> None:
    """Remove labs left by a test process that died without cleaning up (SIGKILL)."""
    for line in _run([ip, "netns", "list"], check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _NS_RE.match(name)
        if m and not _pid_alive(int(m.group(1))):
            _teardown(name, f"vfh-{m.group(1)}-{m.group(2)}", [])


def _free_subnet(ip: str) -> int:
    used = set(re.findall(rf"inet {re.escape(_SUBNET_PREFIX)}\.(\d+)\.",
                          _run([ip, "-4", "-o", "addr", "show"]).stdout))
    for n in range(1, 255):
        if str(n) not in used:
            return n
    raise NetLabError(f"no free {_SUBNET_PREFIX}.N.0/24 subnet left")


class NetLab:
    """The destination host: a network namespace joined to this one by a veth pair.

    The root namespace plays the source host (host_ip = 10.77.N.1 on host_if); processes
    started with popen() run on the destination host (dest_ip = 10.77.N.2 on dest_if);
    N (``subnet``) is unique among the labs alive on this machine.  close() kills them and removes the lab; it
    also runs at interpreter exit, and a later lab removes labs of dead processes.
    """

    def __init__(self) -> None:
        reason = netlab_unavailable()
        if reason:
            raise NetLabError(reason)
        self._ip = _tool("ip")
        self._tc = _tool("tc")
        pid, seq = os.getpid(), next(_seq)
        self.ns = f"vfdst-{pid}-{seq}"
        self.host_if = f"vfh-{pid}-{seq}"     # interface names are limited to 15 bytes
        self.dest_if = f"vfd-{pid}-{seq}"
        assert len(self.host_if) <= 15, self.host_if
        self._procs: list[subprocess.Popen] = []
        self._shaping: tuple[str, float] | None = None
        self._down = False
        self._finalizer = weakref.finalize(self, _teardown, self.ns, self.host_if, self._procs)
        try:
            with _global_lock():
                _reap_stale(self._ip)
                self.subnet = _free_subnet(self._ip)
                self.host_ip = f"{_SUBNET_PREFIX}.{self.subnet}.1"
                self.dest_ip = f"{_SUBNET_PREFIX}.{self.subnet}.2"
                self._create()
        except BaseException:
            self.close()
            raise

    def _create(self) -> None:
        ip, n = self._ip, self.subnet
        host_mac, dest_mac = f"02:77:00:00:{n:02x}:01", f"02:77:00:00:{n:02x}:02"
        _run([ip, "netns", "add", self.ns])
        _run([ip, "link", "add", self.host_if, "address", host_mac, "type", "veth",
              "peer", "name", self.dest_if, "address", dest_mac, "netns", self.ns])
        _run([ip, "addr", "add", f"{self.host_ip}/24", "dev", self.host_if])
        _run([ip, "link", "set", self.host_if, "up"])
        _run([ip, "-n", self.ns, "addr", "add", f"{self.dest_ip}/24", "dev", self.dest_if])
        _run([ip, "-n", self.ns, "link", "set", self.dest_if, "up"])
        _run([ip, "-n", self.ns, "link", "set", "lo", "up"])
        # Static neighbours: while the cable is cut, ARP would fail after a few seconds
        # and turn a stall into "No route to host"; a real cut shows up as a stall.
        _run([ip, "neigh", "replace", self.dest_ip, "lladdr", dest_mac,
              "dev", self.host_if, "nud", "permanent"])
        _run([ip, "-n", self.ns, "neigh", "replace", self.host_ip, "lladdr", host_mac,
              "dev", self.dest_if, "nud", "permanent"])

    # -- processes on the destination host

    def ns_argv(self, argv: Sequence[str]) -> list[str]:
        """ARGV run inside the destination namespace."""
        return [self._ip, "netns", "exec", self.ns, *map(str, argv)]

    def popen(self, argv: Sequence[str], **kw) -> subprocess.Popen:
        """Start ARGV on the destination host; close() kills its whole process group."""
        kw.setdefault("start_new_session", True)
        kw.setdefault("stdin", subprocess.DEVNULL)
        p = subprocess.Popen(self.ns_argv(argv), **kw)
        self._procs.append(p)
        return p

    def run(self, argv: Sequence[str], **kw) -> subprocess.CompletedProcess:
        """Run ARGV on the destination host to completion (subprocess.run keywords)."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("timeout", CMD_TIMEOUT)
        kw.setdefault("check", False)
        return subprocess.run(self.ns_argv(argv), **kw)

    # -- the cable

    def link_down(self) -> None:
        """Cut the cable: every packet in both directions is dropped; connections stall.

        Not `ip link set HOST_IF down`: that deletes the 10.77.N.0/24 route, so traffic
        to dest_ip silently takes the default route instead (on a NATed CI box a
        transparent proxy may even accept the TCP connect), or fails at once with
        ENETUNREACH.  A drop-everything qdisc (pfifo limit 0) on both veth ends keeps
        routes and link state, like a cable cut between two switches: both hosts keep
        their link, nothing answers.  Shaping set meanwhile applies after link_up().
        """
        self._down = True
        self._apply()

    def link_up(self) -> None:
        """Reconnect the cable; stalled connections resume on their next retransmit."""
        self._down = False
        self._apply()

    def shape(self, rate: str = "1gbit", delay_ms: float = 0) -> None:
        """Limit both directions to RATE (tc syntax: 100mbit, 1gbit) plus DELAY_MS each way.

        The delay needs the sch_netem qdisc; without it this raises NetLabError.
        """
        _rate_bytes(rate)  # reject a bad rate before touching the qdiscs
        self._shaping = (rate, float(delay_ms))
        try:
            self._apply()
        except NetLabError as e:
            self._shaping = None
            self._apply()
            if delay_ms and "netem" in str(e):
                raise NetLabError(f"delay_ms needs the sch_netem qdisc: {e}") from None
            raise

    def unshape(self) -> None:
        self._shaping = None
        self._apply()

    def _apply(self) -> None:
        for tc, dev in (([self._tc], self.host_if), ([self._tc, "-n", self.ns], self.dest_if)):
            if self._down:
                _run([*tc, "qdisc", "replace", "dev", dev, "root", "pfifo", "limit", "0"])
                continue
            _run([*tc, "qdisc", "del", "dev", dev, "root"], check=False)  # may be none
            if self._shaping:
                rate, delay_ms = self._shaping
                _run([*tc, "qdisc", "replace", "dev", dev, "root", "handle", "1:",
                      *_tbf_args(rate)])
                if delay_ms:
                    # netem under tbf: tbf paces, netem holds each packet DELAY_MS
                    _run([*tc, "qdisc", "replace", "dev", dev, "parent", "1:1", "handle",
                          "10:", "netem", "delay", f"{delay_ms}ms", "limit", "100000"])

    # -- lifetime

    def close(self) -> None:
        """Kill the lab's processes and remove the namespace and veth pair; idempotent."""
        self._finalizer()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"NetLab(ns={self.ns!r}, host_ip={self.host_ip!r}, dest_ip={self.dest_ip!r})"


def join(a: NetLab, b: NetLab) -> None:
    """A cable straight between the two labs' hosts, so that each reaches the other's
    dest_ip without this (management) namespace forwarding anything: a veth pair from
    A's namespace to B's, and a host route over it each way.  It goes with the
    namespaces."""
    ip = a._ip
    tag = f"{a.subnet}-{b.subnet}"
    ends = (f"vfj{tag}a", f"vfj{tag}b")
    assert all(len(e) <= 15 for e in ends), ends
    _run([ip, "link", "add", ends[0], "netns", a.ns, "type", "veth",
          "peer", "name", ends[1], "netns", b.ns])
    for lab, end, other in ((a, ends[0], b), (b, ends[1], a)):
        _run([ip, "-n", lab.ns, "link", "set", end, "up"])
        _run([ip, "-n", lab.ns, "route", "add", f"{other.dest_ip}/32", "dev", end,
              "src", lab.dest_ip])


_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
          "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9}


def _rate_bytes(rate: str) -> float:
    m = re.fullmatch(r"\s*([\d.]+)\s*([a-zA-Z]*)\s*", rate)
    unit = (m.group(2).lower() or "bit") if m else ""
    if not m or unit not in _UNITS:
        raise ValueError(f"bad rate {rate!r}; use tc units such as 100mbit or 1gbit")
    return float(m.group(1)) * _UNITS[unit] / 8


def _tbf_args(rate: str) -> list[str]:
    # burst: ~4 ms at RATE, and never below a 64 KiB GSO packet, so one token refill
    # covers a whole TSO segment from veth; latency bounds the queue (about 20 ms of data)
    burst = max(int(_rate_bytes(rate) * 0.004), 64 * 1024 + 1514)
    return ["tbf", "rate", rate, "burst", str(burst), "latency", "20ms"]


# --------------------------------------------------------------------------- TLS

@dataclasses.dataclass(frozen=True)
class Pki:
    """Certificates laid out as libvirt does under /etc/pki (``dir`` stands for it)."""
    dir: Path
    hosts: tuple[str, ...]
    ca_cert: Path       # dir/CA/cacert.pem
    ca_key: Path        # dir/CA/private/cakey.pem
    server_cert: Path   # dir/libvirt/servercert.pem
    server_key: Path    # dir/libvirt/private/serverkey.pem
    client_cert: Path   # dir/libvirt/clientcert.pem
    client_key: Path    # dir/libvirt/private/clientkey.pem
    qemu_dir: Path      # dir/qemu: ca-cert.pem, server-{cert,key}.pem, client-{cert,key}.pem


# QEMU's tls-creds-x509 refuses a CA without keyCertSign and a peer certificate
# without the matching purpose, so every extension is spelled out.
_OPENSSL_CNF = """\
[req]
distinguished_name = dn
prompt = no
[dn]
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth, clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = {san}
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def make_pki(dir: Path, hosts: Sequence[str], ca_name: str = "vmferry test CA") -> Pki:
    """A CA, a server certificate for every name/IP in HOSTS and a client certificate.

    RSA 2048 keys, valid ten years.  A second call with another CA_NAME (and DIR) gives
    an unrelated PKI whose certificates a peer trusting the first CA must refuse.
    """
    openssl = _tool("openssl")
    if openssl is None:
        raise NetLabError("openssl is not installed")
    if not hosts:
        raise ValueError("make_pki needs at least one host for the server certificate")
    dir = Path(dir)
    ca_dir, lv_dir, qemu_dir = dir / "CA", dir / "libvirt", dir / "qemu"
    for d in (ca_dir / "private", lv_dir / "private", qemu_dir):
        d.mkdir(parents=True, exist_ok=True)
    for d in (ca_dir / "private", lv_dir / "private"):
        d.chmod(0o700)
    pki = Pki(dir=dir, hosts=tuple(hosts),
              ca_cert=ca_dir / "cacert.pem", ca_key=ca_dir / "private" / "cakey.pem",
              server_cert=lv_dir / "servercert.pem",
              server_key=lv_dir / "private" / "serverkey.pem",
              client_cert=lv_dir / "clientcert.pem",
              client_key=lv_dir / "private" / "clientkey.pem",
              qemu_dir=qemu_dir)
    san = ", ".join(f"IP:{h}" if _is_ip(h) else f"DNS:{h}" for h in hosts)
    with tempfile.TemporaryDirectory(prefix="vf-pki-") as tmp:
        cnf = Path(tmp) / "openssl.cnf"
        cnf.write_text(_OPENSSL_CNF.format(san=san))
        # keep the host's /etc/ssl/openssl.cnf (and its defaults) out of it
        env = {**os.environ, "OPENSSL_CONF": str(cnf)}

        def ossl(*args: str) -> None:
            _run([openssl, *args], env=env)

        ossl("req", "-x509", "-new", "-newkey", "rsa:2048", "-nodes", "-config", str(cnf),
             "-extensions", "ca", "-subj", f"/O=vmferry tests/CN={ca_name}", "-days", "3650",
             "-set_serial", str(secrets.randbits(63)),
             "-keyout", str(pki.ca_key), "-out", str(pki.ca_cert))
        for kind, cn, cert, key in (("server", hosts[0], pki.server_cert, pki.server_key),
                                    ("client", "vmferry-client", pki.client_cert,
                                     pki.client_key)):
            csr = Path(tmp) / f"{kind}.csr"
            ossl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-config", str(cnf),
                 "-subj", f"/O=vmferry tests/CN={cn}", "-keyout", str(key), "-out", str(csr))
            ossl("x509", "-req", "-in", str(csr), "-CA", str(pki.ca_cert),
                 "-CAkey", str(pki.ca_key), "-set_serial", str(secrets.randbits(63)),
                 "-days", "3650", "-sha256", "-extfile", str(cnf), "-extensions", kind,
                 "-out", str(cert))
    for src, name in ((pki.ca_cert, "ca-cert.pem"),
                      (pki.server_cert, "server-cert.pem"), (pki.server_key, "server-key.pem"),
                      (pki.client_cert, "client-cert.pem"), (pki.client_key, "client-key.pem")):
        shutil.copyfile(src, qemu_dir / name)
    for key in (pki.ca_key, pki.server_key, pki.client_key,
                qemu_dir / "server-key.pem", qemu_dir / "client-key.pem"):
        key.chmod(0o600)
    return pki


# --------------------------------------------------------------------------- ssh

@dataclasses.dataclass
class Sshd:
    """A real sshd on the destination host; log in as ``user`` with ``key``."""
    lab: NetLab
    dir: Path
    host: str
    port: int
    user: str
    key: Path            # authorized client key (ed25519, private half)
    stranger_key: Path   # a valid key that is not authorized
    known_hosts: Path    # the host key for host:port, for StrictHostKeyChecking=yes
    proc: subprocess.Popen
    log: Path            # sshd -e output

    def ssh_argv(self, key: Path | None = None, known_hosts: Path | None = None
                 ) -> list[str]:
        """ssh to the destination host as root; append the remote command."""
        return ["ssh", "-F", "none", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
                "-o", "ConnectTimeout=10",
                "-o", f"UserKnownHostsFile={known_hosts or self.known_hosts}",
                "-o", "StrictHostKeyChecking=yes",
                "-i", str(key or self.key), "-p", str(self.port), f"{self.user}@{self.host}"]

    def stop(self) -> None:
        """Kill sshd and every session it started (the lab's close() does so too)."""
        if self.proc.returncode is None:
            _kill_leaves_first(lambda: _descendants(self.proc.pid))
            self.proc.wait(timeout=5)


_SSHD_CONFIG = """\
ListenAddress {host}:{port}
HostKey {dir}/ssh_host_ed25519_key
PidFile {dir}/sshd.pid
AuthorizedKeysFile {dir}/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PrintMotd no
Subsystem sftp internal-sftp
"""


def start_sshd(lab: NetLab, dir: Path, port: int = 22) -> Sshd:
    """Start /usr/sbin/sshd on lab.dest_ip:PORT with its whole configuration in DIR."""
    sshd_bin, keygen = _tool("sshd"), _tool("ssh-keygen")
    if sshd_bin is None or keygen is None or _tool("ssh") is None:
        raise NetLabError("openssh-server and openssh-client are needed for the ssh lab")
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    # sshd's privilege separation chroots its pre-auth child here and refuses to start
    # without it; the openssh-server package only creates it when its service runs
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    for name in ("ssh_host_ed25519_key", "client_ed25519", "stranger_ed25519"):
        (dir / name).unlink(missing_ok=True)
        (dir / f"{name}.pub").unlink(missing_ok=True)
        _run([keygen, "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(dir / name)])
    (dir / "authorized_keys").write_text((dir / "client_ed25519.pub").read_text())
    host_pub = " ".join((dir / "ssh_host_ed25519_key.pub").read_text().split()[:2])
    known_hosts = dir / "known_hosts"
    names = lab.dest_ip if port == 22 else f"[{lab.dest_ip}]:{port}"
    known_hosts.write_text(f"{names} {host_pub}\n")
    config = dir / "sshd_config"
    config.write_text(_SSHD_CONFIG.format(host=lab.dest_ip, port=port, dir=dir))
    _run([sshd_bin, "-t", "-f", str(config)])   # a config error reads better here
    log = dir / "sshd.log"
    with open(log, "wb") as logf:
        # sshd re-executes itself, so it must be started by absolute path
        proc = lab.popen([sshd_bin, "-D", "-e", "-f", str(config)],
                         stdout=logf, stderr=subprocess.STDOUT)
    sshd = Sshd(lab=lab, dir=dir, host=lab.dest_ip, port=port, user="root",
                key=dir / "client_ed25519", stranger_key=dir / "stranger_ed25519",
                known_hosts=known_hosts, proc=proc, log=log)
    deadline = time.monotonic() + SSHD_START_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise NetLabError(f"sshd exited {proc.returncode}: {log.read_text().strip()}")
        r = _run([*sshd.ssh_argv(), "true"], check=False)
        if r.returncode == 0:
            return sshd
        if time.monotonic() > deadline:
            sshd.stop()
            raise NetLabError(f"sshd does not accept logins: {r.stderr.strip()}; "
                              f"sshd log: {log.read_text().strip()}")
        time.sleep(0.1)
