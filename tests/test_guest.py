"""The self-built test guest (vmferry.guest): build, real boots under QEMU, the log checker.

Boots use KVM when /dev/kvm can be opened read/write, else TCG (or whatever
$VMFERRY_TEST_ACCEL says); one test boots under TCG as well.  QEMU's qboot firmware
is used when QEMU ships it: with SeaBIOS a boot takes ~5 s on hosts where KVM must
emulate real mode (kvm-pvm), with qboot ~0.3 s.  Every QEMU started here is killed
at teardown.
"""
from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest

QEMU = "qemu-system-x86_64"

pytestmark = pytest.mark.timeout(90)


def _kvm_usable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


KVM = _kvm_usable()
# VMFERRY_TEST_ACCEL=tcg forces TCG for every boot (e.g. to check the TCG path on a KVM host)
BEST_ACCEL = os.environ.get("VMFERRY_TEST_ACCEL") or ("kvm" if KVM else "tcg")

needs_binutils = pytest.mark.skipif(not (shutil.which("as") and shutil.which("ld")),
                                    reason="GNU binutils (as, ld) not installed")
needs_qemu = pytest.mark.skipif(shutil.which(QEMU) is None, reason=f"{QEMU} not installed")


@pytest.fixture(scope="module")
def guest():
    """The vmferry.guest module; a failure (not a skip) when it cannot be imported."""
    try:
        return importlib.import_module("vmferry.guest")
    except Exception as e:
        pytest.fail(f"cannot import vmferry.guest: {type(e).__name__}: {e}", pytrace=False)


@pytest.fixture(scope="module")
def kernel(guest, tmp_path_factory) -> Path:
    if not (shutil.which("as") and shutil.which("ld")):
        pytest.skip("GNU binutils (as, ld) not installed")
    return guest.build_guest(tmp_path_factory.mktemp("guest"))


@pytest.fixture(scope="module")
def qboot(guest) -> Path | None:
    return guest.find_qboot(QEMU) if shutil.which(QEMU) else None


class Guest:
    """One QEMU running the test guest, logging COM1 to a file."""

    def __init__(self, proc: subprocess.Popen, log: Path) -> None:
        self.proc, self.log = proc, log

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_until(self, what: str, pred: Callable[[str], bool], timeout: float = 30) -> str:
        """Poll the log until pred(text) holds; fail with the log tail otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            if pred(text):
                return text
            if self.proc.poll() is not None:
                pytest.fail(f"QEMU exited ({self.proc.returncode}) waiting for {what}; "
                            f"log tail: {text[-400:]!r}; stderr: {self.stderr()[-400:]!r}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout}s waiting for {what}; "
                            f"log tail: {text[-400:]!r}")
            time.sleep(0.05)

    def stderr(self) -> str:
        try:
            return self.log.with_suffix(".stderr").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture
def boot(kernel, qboot, tmp_path):
    """boot(append, accel=BEST_ACCEL) -> Guest.  All guests are killed at teardown."""
    if shutil.which(QEMU) is None:
        pytest.skip(f"{QEMU} not installed")
    started: list[Guest] = []

    def _boot(append: str, accel: str = BEST_ACCEL) -> Guest:
        log = tmp_path / f"serial-{len(started)}.log"
        argv = [QEMU, "-machine", "q35", "-accel", accel, "-m", "256",
                "-kernel", str(kernel), "-append", append,
                "-display", "none", "-serial", f"file:{log}",
                "-nodefaults", "-no-reboot"]
        if qboot is not None:
            argv += ["-bios", str(qboot)]
        with open(log.with_suffix(".stderr"), "wb") as err:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=err)
        g = Guest(proc, log)
        started.append(g)
        return g

    yield _boot
    for g in started:
        g.kill()


def _last_pass(guest, n: int) -> Callable[[str], bool]:
    return lambda text: guest.check_serial_log(text)[0] >= n


# --------------------------------------------------------------------------- build

@needs_binutils
def test_build_is_cached_and_multiboot_elf32(guest, tmp_path):
    k1 = guest.build_guest(tmp_path)
    mtime = k1.stat().st_mtime_ns
    t0 = time.monotonic()
    k2 = guest.build_guest(tmp_path)
    assert k2 == k1 and k2.stat().st_mtime_ns == mtime      # not rebuilt
    assert time.monotonic() - t0 < 0.5
    data = k1.read_bytes()
    assert data[:5] == b"\x7fELF\x01"                        # ELF32: QEMU -kernel wants that
    assert int.from_bytes(data[18:20], "little") == 3        # EM_386
    assert (0x1BADB002).to_bytes(4, "little") in data[:8192]  # multiboot header
    assert [p.name for p in tmp_path.iterdir()] == [k1.name]  # no temporary files left


def test_build_without_binutils_is_a_clear_error(guest, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(guest.GuestBuildError, match="binutils"):
        guest.build_guest(tmp_path / "out")


def test_cmdline_builder(guest):
    assert guest.guest_cmdline() == ""
    assert guest.guest_cmdline("64M", dirty="idle", hb=200, verify=5, selftest=True,
                               halt_on_error=True, tlbflush=True) == \
        "mem=64M dirty=idle hb=200 verify=5 selftest=corrupt onerror=halt tlbflush=1"
    assert guest.guest_cmdline(128, rate="8M") == "mem=128 rate=8M"
    with pytest.raises(ValueError):
        guest.guest_cmdline(dirty="sometimes")
    with pytest.raises(ValueError):
        guest.guest_cmdline("64M quiet")


# --------------------------------------------------------------------------- real boots

@pytest.mark.parametrize("accel", [
    pytest.param("kvm", marks=pytest.mark.skipif(not KVM, reason="/dev/kvm not usable")),
    "tcg",
])
def test_guest_passes_count_up_without_errors(guest, boot, accel):
    g = boot(guest.guest_cmdline("64M"), accel=accel)
    text = g.wait_until("pass 3", _last_pass(guest, 3))
    g.kill()
    last, problems = guest.check_serial_log(text)
    assert problems == []
    events = guest.parse_serial(text)
    start = [e for e in events if e.kind == "start"]
    assert len(start) == 1 and start[0].fields["pages"] == 64 * 256
    assert start[0].fields["mode"] == "fast"
    assert start[0].fields["base"] == guest.REGION_START
    assert start[0].fields["end"] == guest.REGION_START + 64 * 2**20
    passes = [e for e in events if e.kind == "pass"]
    assert [e.number for e in passes] == list(range(1, last + 1))
    assert all(e.ok and e.fields["pages"] == 64 * 256 and "ms" in e.fields for e in passes)


def test_guest_detects_corruption_for_real(guest, boot):
    """selftest=corrupt flips one bit after pass 2; pass 3's verification must catch it."""
    g = boot(guest.guest_cmdline("16M", selftest=True))
    text = g.wait_until("pass 4", _last_pass(guest, 4))
    g.kill()
    events = guest.parse_serial(text)
    (corrupt,) = [e for e in events if e.kind == "selftest"]
    (err,) = [e for e in events if e.kind == "error"]
    page = 16 * 256 // 2
    addr = guest.REGION_START + page * guest.PAGE_SIZE + 5 * 4
    assert corrupt.fields["addr"] == addr
    assert err.number == 3 and err.fields["during"] == "pass"
    assert (err.fields["page"], err.fields["word"], err.fields["addr"]) == (page, 5, addr)
    assert err.fields["expected"] == guest.pattern_word(2, addr)
    assert err.fields["got"] == guest.pattern_word(2, addr) ^ 1
    by_number = {e.number: e for e in events if e.kind == "pass"}
    assert not by_number[3].ok and by_number[3].fields["errors"] == 1
    assert by_number[2].ok and by_number[4].ok      # page rewritten: pass 4 is clean again
    last, problems = guest.check_serial_log(text)
    assert last >= 4
    assert len(problems) == 2
    assert "pass 3: page 2048 word 5" in problems[0] and "corrupted" in problems[0]
    assert "pass 3 found 1 bad page" in problems[1]


def test_guest_halts_on_error_when_asked(guest, boot):
    g = boot(guest.guest_cmdline("4M", selftest=True, halt_on_error=True))
    text = g.wait_until("halted", lambda t: "vmferry-guest halted\n" in t)
    time.sleep(0.3)                 # nothing may follow the halt
    assert g.text() == text
    _, problems = guest.check_serial_log(text)
    assert problems[-1].endswith("vmferry-guest halted")


def test_idle_mode_heartbeat_and_verify(guest, boot):
    g = boot(guest.guest_cmdline("16M", dirty="idle", hb=100, verify=2))
    text = g.wait_until("2 verifies", lambda t: t.count(" verify ") >= 2)
    g.kill()
    events = guest.parse_serial(text)
    assert [e.number for e in events if e.kind == "pass"] == [1]
    ticks = [e for e in events if e.kind == "tick"]
    assert [e.number for e in ticks] == list(range(1, len(ticks) + 1))
    gaps = [b.fields["ms"] - a.fields["ms"] for a, b in zip(ticks, ticks[1:])]
    assert all(90 <= gap <= 150 for gap in gaps), gaps     # guest time, ~hb apart
    verifies = [e for e in events if e.kind == "verify"]
    assert all(e.ok and e.number == 1 for e in verifies)
    assert guest.check_serial_log(text) == (1, [])


def test_slow_mode_is_rate_limited(guest, boot):
    # 4 MiB at 8 MiB/s: a pass should take ~500 ms of guest time
    g = boot(guest.guest_cmdline("4M", rate="8M"))
    text = g.wait_until("pass 2", _last_pass(guest, 2))
    g.kill()
    events = guest.parse_serial(text)
    (start,) = [e for e in events if e.kind == "start"]
    assert start.fields["mode"] == "slow" and start.fields["pps"] == 2048
    passes = [e for e in events if e.kind == "pass"]
    assert all(450 <= e.fields["ms"] <= 700 for e in passes), [e.line for e in passes]
    assert guest.check_serial_log(text) == (passes[-1].number, [])


# --------------------------------------------------------------------------- checker

def _pass(n: int, ok: bool = True) -> str:
    return (f"vmferry-guest pass {n} ok pages=16 ms=1\n" if ok
            else f"vmferry-guest pass {n} bad pages=16 ms=1 errors=2\n")


START = "vmferry-guest start pages=16 base=00200000 end=00210000 mode=fast pps=0\n"


def test_checker_accepts_clean_logs(guest):
    log = "SeaBIOS noise\n" + START + "".join(_pass(n) for n in range(1, 6))
    assert guest.check_serial_log(log) == (5, [])
    assert guest.check_serial_log("") == (0, [])
    # a destination log starts mid-stream, possibly with the tail of a line
    dst = "ss 7 ok pages=16 ms=1\n" + "".join(_pass(n) for n in range(8, 11))
    assert guest.check_serial_log(dst) == (10, [])
    assert guest.check_serial_log(dst, first_pass=8) == (10, [])


def test_checker_joins_a_line_split_across_source_and_destination(guest):
    stream = START + "".join(_pass(n) for n in range(1, 9))
    cut = stream.index("pass 5") + 3            # the migration cut the line in half
    src, dst = stream[:cut], stream[cut:]
    assert guest.check_serial_log(src) == (4, [])   # the unfinished line is not counted
    assert guest.check_serial_log(src + dst) == (8, [])
    assert guest.check_serial_log(dst, first_pass=5)[1] == ["line 2: pass 6 follows pass 4 (gap)"]


@pytest.mark.parametrize("log, expect", [
    (START + _pass(1) + _pass(2) + _pass(4), ["pass 4 follows pass 2 (gap)"]),
    (START + _pass(1) + _pass(2) + _pass(2), ["pass 2 follows pass 2 (repeat)"]),
    (START + _pass(2), ["pass 2 follows pass 0 (gap)"]),
    (START + _pass(1) + START + _pass(1), ["guest started again"]),
    (START + _pass(1) + _pass(2, ok=False), ["pass 2 found 2 bad page(s)"]),
    (START + _pass(1) + "vmferry-guest FATAL exception 14 err=00000002 rip=00100abc\n"
     "vmferry-guest halted\n", ["FATAL exception 14", "vmferry-guest halted"]),
    (START + "vmferry-guest pass 1vmferry-guest pass 2 ok pages=16 ms=1\n", ["garbled"]),
    ("vmferry-guest tick 1 ms=1000\nvmferry-guest tick 3 ms=3000\n", ["heartbeat 3 follows 1"]),
    ("vmferry-guest verify 1 bad pages=16 ms=3 errors=1\n", ["verify of pass 1 found 1 bad"]),
])
def test_checker_flags_problems(guest, log, expect):
    _, problems = guest.check_serial_log(log)
    assert len(problems) == len(expect), problems
    for p, e in zip(problems, expect):
        assert e in p


def test_checker_explains_stale_pages(guest):
    """An ERROR's 'got' value is decoded into the pass whose pattern the page holds."""
    addr = guest.REGION_START + 3 * guest.PAGE_SIZE + 8
    want, stale = guest.pattern_word(16, addr), guest.pattern_word(12, addr)
    log = (f"vmferry-guest ERROR pass 17 page 3 word 2 expected {want:08x} got {stale:08x} "
           f"addr={addr:08x}\n")
    (ev,) = guest.parse_serial(log)
    assert ev.kind == "error" and ev.fields["got_pass"] == 12
    _, problems = guest.check_serial_log(log)
    assert problems == [f"line 1: pass 17: page 3 word 2 (addr {addr:#x}) expected {want:08x} "
                        f"got {stale:08x}: stale: holds pass 12's pattern, expected pass 16's"]
