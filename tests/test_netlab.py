"""The two-host lab itself: namespace, sshd, certificates, the cut cable and shaping."""
from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import time

import pytest

from servers import require_tool

pytestmark = pytest.mark.timeout(60)

# One server for the network tests, run on the destination host.  The first line a
# client sends picks the service: "echo", "sink" (reply with the byte count at EOF) or
# "source SECONDS" (send zeros for that long, then close).
NETSRV = r"""
import socket, sys, threading, time
def serve(c):
    f = c.makefile("rb")
    cmd = f.readline().split()
    if cmd == [b"echo"]:
        while line := f.readline():
            c.sendall(line)
    elif cmd == [b"sink"]:
        n = 0
        while b := f.read1(1 << 20):
            n += len(b)
        c.sendall(b"%d\n" % n)
    elif cmd[:1] == [b"source"]:
        end, buf = time.monotonic() + float(cmd[1]), bytes(1 << 20)
        while time.monotonic() < end:
            c.sendall(buf)
    c.close()
srv = socket.create_server((sys.argv[1], 0))
print(srv.getsockname()[1], flush=True)
while True:
    threading.Thread(target=serve, args=(srv.accept()[0],), daemon=True).start()
"""

# A TLS server demanding a client certificate; prints one line per connection.
TLSSRV = r"""
import socket, ssl, sys
host, cert, key, ca = sys.argv[1:5]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
ctx.load_verify_locations(ca)
ctx.verify_mode = ssl.CERT_REQUIRED
srv = socket.create_server((host, 0))
print(srv.getsockname()[1], flush=True)
while True:
    conn = srv.accept()[0]
    try:
        with ctx.wrap_socket(conn, server_side=True) as tls:
            cn = dict(x[0] for x in tls.getpeercert()["subject"])["commonName"]
            tls.sendall(b"hello " + cn.encode() + b"\n")
            print("accepted", cn, flush=True)
    except (ssl.SSLError, OSError) as e:
        print("refused", e, flush=True)
"""


def start_server(lab, script: str, *args) -> tuple[subprocess.Popen, int]:
    p = lab.popen([sys.executable, "-c", script, lab.dest_ip, *map(str, args)],
                  stdout=subprocess.PIPE, text=True)
    return p, int(p.stdout.readline())


@pytest.fixture(scope="module")
def netsrv(netlab):
    p, port = start_server(netlab, NETSRV)
    yield port
    p.kill()
    p.wait()


def connect(lab, port: int, service: str, timeout: float = 10) -> socket.socket:
    c = socket.create_connection((lab.dest_ip, port), timeout=timeout)
    c.sendall(service.encode() + b"\n")
    return c


# --------------------------------------------------------------------------- ssh

def ssh(sshd, command: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(sshd.ssh_argv(**kw) + [command], check=False, capture_output=True,
                          text=True, timeout=30, stdin=subprocess.DEVNULL)


def test_ssh_lands_on_destination_host(netlab, sshd):
    r = ssh(sshd, "ip -4 -o addr show; echo PATH=$PATH; command -v qemu-img qemu-nbd")
    assert r.returncode == 0, r.stderr
    assert f"inet {netlab.dest_ip}/24" in r.stdout
    assert netlab.host_ip not in r.stdout.split("PATH=")[0]    # not the source host
    path = r.stdout.split("PATH=")[1].splitlines()[0].split(":")
    assert "/usr/bin" in path and "/usr/sbin" in path
    assert "/usr/bin/qemu-img" in r.stdout


def test_ssh_refuses_unknown_key(sshd):
    r = ssh(sshd, "true", key=sshd.stranger_key)
    assert r.returncode == 255
    assert "Permission denied" in r.stderr


def test_ssh_refuses_unknown_host_key(sshd, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    r = ssh(sshd, "true", known_hosts=empty)
    assert r.returncode == 255
    assert "Host key verification failed" in r.stderr


# --------------------------------------------------------------------------- TLS

@pytest.fixture(scope="module")
def tls_server(netlab, pki):
    p, port = start_server(netlab, TLSSRV, pki.server_cert, pki.server_key, pki.ca_cert)
    yield p, port
    p.kill()
    p.wait()


def tls_hello(lab, port: int, ca, cert, key, server_hostname: str) -> bytes:
    ctx = ssl.create_default_context(cafile=str(ca))   # checks the name, by IP here
    ctx.load_cert_chain(str(cert), str(key))
    with (socket.create_connection((lab.dest_ip, port), timeout=10) as s,
          ctx.wrap_socket(s, server_hostname=server_hostname) as tls):
        return tls.recv(100)


def test_tls_client_certificate_accepted(netlab, pki, tls_server):
    p, port = tls_server
    got = tls_hello(netlab, port, pki.ca_cert, pki.client_cert, pki.client_key, netlab.dest_ip)
    assert got == b"hello vmferry-client\n"
    assert p.stdout.readline() == "accepted vmferry-client\n"


def test_tls_rogue_client_certificate_refused(netlab, pki, rogue_pki, tls_server):
    p, port = tls_server
    # TLS 1.3: the client's handshake ends before the server has checked its
    # certificate, so the refusal arrives as an alert on the first read
    with pytest.raises(ssl.SSLError, match="UNKNOWN_CA|unknown ca"):
        tls_hello(netlab, port, pki.ca_cert, rogue_pki.client_cert, rogue_pki.client_key,
                  netlab.dest_ip)
    assert p.stdout.readline().startswith("refused")


def test_tls_server_name_checked_by_ip(netlab, pki, tls_server):
    p, port = tls_server
    with pytest.raises(ssl.SSLCertVerificationError, match="IP address mismatch"):
        tls_hello(netlab, port, pki.ca_cert, pki.client_cert, pki.client_key,
                  netlab.dest_ip.rsplit(".", 1)[0] + ".99")
    assert p.stdout.readline().startswith("refused")


def test_qemu_accepts_pki(netlab, pki, rogue_pki, tmp_path):
    """qemu-nbd serves with dir=qemu/ and checks clients; libnbd reads with the same dir."""
    require_tool("qemu-nbd")
    require_tool("nbdinfo")
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(1 << 20))
    p = netlab.popen(["qemu-nbd", "--object",
                      f"tls-creds-x509,id=tls0,dir={pki.qemu_dir},endpoint=server,verify-peer=on",
                      "--tls-creds", "tls0", "-b", netlab.dest_ip, "-p", "10809", "-f", "raw",
                      "-x", "disk", "--persistent", "-r", str(image)],
                     stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection((netlab.dest_ip, 10809), timeout=1).close()
                break
            except OSError:
                assert p.poll() is None, p.stderr.read()
                assert time.monotonic() < deadline, "qemu-nbd does not listen"
                time.sleep(0.05)

        def nbdinfo(qemu_dir) -> subprocess.CompletedProcess:
            uri = f"nbds://{netlab.dest_ip}/disk?tls-certificates={qemu_dir}"
            return subprocess.run(["nbdinfo", "--size", uri], check=False,
                                  capture_output=True, text=True, timeout=30)

        r = nbdinfo(pki.qemu_dir)
        assert r.returncode == 0 and r.stdout.strip() == str(1 << 20), r.stderr
        r = nbdinfo(rogue_pki.qemu_dir)
        assert r.returncode != 0 and "certificate verification" in r.stderr, r.stderr
    finally:
        p.kill()
        p.wait()


# --------------------------------------------------------------------------- cable, rate

def test_cut_cable_stalls_then_recovers(netlab, netsrv):
    with connect(netlab, netsrv, "echo") as c:
        c.sendall(b"before\n")
        assert c.recv(100) == b"before\n"
        netlab.link_down()
        try:
            with pytest.raises(TimeoutError):
                socket.create_connection((netlab.dest_ip, netsrv), timeout=1.5)
            c.sendall(b"during\n")
            c.settimeout(1.5)
            with pytest.raises(TimeoutError):     # a stall: no reset, no error
                c.recv(100)
        finally:
            netlab.link_up()
        c.settimeout(15)                          # the next TCP retransmit gets through
        assert c.recv(100) == b"during\n"
    with connect(netlab, netsrv, "echo", timeout=5) as c:
        c.sendall(b"after\n")
        assert c.recv(100) == b"after\n"


def test_shape_limits_both_directions(netlab, netsrv):
    netlab.shape("1gbit")
    try:
        with connect(netlab, netsrv, "sink") as c:     # source host -> destination
            buf, n, t0 = bytes(1 << 20), 0, time.monotonic()
            while time.monotonic() - t0 < 1.0:
                c.sendall(buf)
                n += len(buf)
            c.shutdown(socket.SHUT_WR)
            assert int(c.makefile("rb").readline()) == n
            up = n * 8 / (time.monotonic() - t0) / 1e6
        with connect(netlab, netsrv, "source 1.0") as c:   # destination -> source host
            n, t0 = 0, time.monotonic()
            while b := c.recv(1 << 20):
                n += len(b)
            down = n * 8 / (time.monotonic() - t0) / 1e6
    finally:
        netlab.unshape()
    print(f"shaped to 1 Gbit/s: up {up:.0f} Mbit/s, down {down:.0f} Mbit/s")
    # TCP goodput at 1 Gbit/s line rate is ~950 Mbit/s; well below means a slow machine
    assert 600 < up < 1050 and 600 < down < 1050, (up, down)
