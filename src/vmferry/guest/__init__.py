"""A tiny self-built test guest for live-migration tests and demos.

The guest (``guest.S``) is a multiboot kernel that QEMU boots with ``-kernel``.
It keeps rewriting a verifiable pattern over most of its RAM and reports every
pass on COM1, so a lost, stale or torn page anywhere in a migration shows up as
an ``ERROR`` line in the serial log.  It is assembled from source with the
system binutils (``as``, ``ld``); nothing is downloaded.

    >>> kernel = build_guest(Path("/tmp/guest"))
    >>> argv = ["qemu-system-x86_64", "-machine", "q35", "-m", "256",
    ...         "-kernel", str(kernel), "-append", guest_cmdline(mem="64M"),
    ...         "-serial", "file:/tmp/serial.log", "-display", "none", "-nodefaults"]
    >>> last_pass, problems = check_serial_log(Path("/tmp/serial.log").read_text())

Serial lines (one per event, ``\\n`` terminated)::

    vmferry-guest start pages=P base=HEX end=HEX mode=fast|slow|idle pps=N hb=MS verify=N ...
    vmferry-guest pass N ok pages=P ms=T
    vmferry-guest pass N bad pages=P ms=T errors=E
    vmferry-guest ERROR pass N page I word W expected HEX got HEX addr=HEX
    vmferry-guest tick K ms=T                 (dirty=idle heartbeat)
    vmferry-guest verify N ok|bad pages=P ms=T [errors=E]   (dirty=idle, verify=N)
    vmferry-guest selftest corrupted page I word 5 addr=HEX
    vmferry-guest FATAL ...
    vmferry-guest halted

Command line words (QEMU ``-append``) are documented in :func:`guest_cmdline`
and at the top of ``guest.S``.

For a migration test start the destination with the same ``-kernel``,
``-append``, ``-m`` and firmware as the source (plus ``-incoming``), give each
its own serial log, and judge ``check_serial_log(src_log + dst_log)``: the
passes must keep counting up by one across the switch-over with no ERROR.
Under TCG with QEMU < 9.0 pass ``tlbflush=True`` (see :func:`guest_cmdline`).
"""
from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from vmferry.errors import VmferryError

__all__ = [
    "GuestBuildError", "GuestEvent", "build_guest", "guest_cmdline", "parse_serial",
    "check_serial_log", "wait_for_pass", "find_qboot",
    "PREFIX", "REGION_START", "PAGE_SIZE", "PATTERN_KEY", "pattern_word",
]

#: every line the guest prints starts with this
PREFIX = "vmferry-guest"
#: first byte of the region the guest rewrites (its 4 KiB pages are numbered from here)
REGION_START = 0x200000
PAGE_SIZE = 4096
#: word at address A in pass N holds A ^ (N * PATTERN_KEY) mod 2**32
PATTERN_KEY = 0x9E3779B1
_KEY_INVERSE = pow(PATTERN_KEY, -1, 1 << 32)

_SOURCES = ("guest.S", "guest.ld")
# Part of the cache key, so changing a flag rebuilds.
_AS_FLAGS = ("--32",)
_LD_FLAGS = ("-m", "elf_i386")
_FORMAT_VERSION = b"vmferry-guest build 1\0"


class GuestBuildError(VmferryError):
    """The test guest could not be assembled or linked."""


def pattern_word(pass_no: int, addr: int) -> int:
    """The 32-bit word the guest stores at physical address ``addr`` in pass ``pass_no``."""
    return (addr ^ (pass_no * PATTERN_KEY)) & 0xFFFFFFFF


# --------------------------------------------------------------------------- building

def _find_tool(name: str) -> str:
    """Find binutils' ``as``/``ld`` able to emit i386 code.

    On an x86 host the native tools do; elsewhere only cross binutils can, so
    the cross names are tried first there.
    """
    native = platform.machine().lower() in ("x86_64", "amd64", "i386", "i486", "i586", "i686")
    cross = [f"{triplet}-{name}" for triplet in ("x86_64-linux-gnu", "i686-linux-gnu")]
    for candidate in ([name] + cross) if native else (cross + [name]):
        path = shutil.which(candidate)
        if path:
            return path
    raise GuestBuildError(
        f"cannot build the test guest: GNU binutils '{name}' not found on PATH; "
        "install binutils (Debian/Ubuntu: apt-get install binutils"
        + ("" if native else "-x86-64-linux-gnu") + ")")


def _run(argv: list[str]) -> None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    except OSError as e:
        raise GuestBuildError(f"cannot run {argv[0]}: {e}") from e
    if proc.returncode != 0:
        out = (proc.stderr or proc.stdout).strip().splitlines()
        raise GuestBuildError(
            f"building the test guest failed: {' '.join(argv)} exited with "
            f"{proc.returncode}: " + " | ".join(out[-8:]))


def _source_bytes() -> dict[str, bytes]:
    # importlib.resources rather than __file__: the sources are package data.
    pkg = resources.files(__name__)
    return {name: pkg.joinpath(name).read_bytes() for name in _SOURCES}


def build_guest(out_dir: Path) -> Path:
    """Assemble and link the guest kernel into ``out_dir``; return its path.

    The file name carries a hash of the sources and flags, so a repeated call
    with unchanged sources returns at once without running any tool, and
    several processes may build into the same directory concurrently (each
    builds in a private temporary directory and renames atomically).

    Raises :class:`GuestBuildError` if ``as``/``ld`` are missing or fail.
    """
    out_dir = Path(out_dir)
    sources = _source_bytes()
    h = hashlib.sha256(_FORMAT_VERSION)
    for name in _SOURCES:
        h.update(name.encode() + b"\0" + sources[name] + b"\0")
    h.update(" ".join(_AS_FLAGS + _LD_FLAGS).encode())
    kernel = out_dir / f"vmferry-guest-{h.hexdigest()[:16]}.elf"
    if kernel.is_file():
        return kernel

    as_, ld = _find_tool("as"), _find_tool("ld")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".guest-build-", dir=out_dir) as tmp:
        tmpdir = Path(tmp)
        # Write the sources out: package data need not be plain files (zip imports).
        for name, data in sources.items():
            (tmpdir / name).write_bytes(data)
        obj, elf = tmpdir / "guest.o", tmpdir / "guest.elf"
        _run([as_, *_AS_FLAGS, "-o", str(obj), str(tmpdir / "guest.S")])
        _run([ld, *_LD_FLAGS, "-T", str(tmpdir / "guest.ld"), "-o", str(elf), str(obj)])
        _check_multiboot_elf32(elf)
        os.replace(elf, kernel)
    return kernel


def _check_multiboot_elf32(path: Path) -> None:
    """QEMU's -kernel only takes ELF32 multiboot images; fail here, not at boot."""
    data = path.read_bytes()
    if data[:5] != b"\x7fELF\x01" or int.from_bytes(data[18:20], "little") != 3:
        raise GuestBuildError(f"building the test guest produced {path.name}, "
                              "which is not an ELF32 i386 file")
    magic = (0x1BADB002).to_bytes(4, "little")
    at = data.find(magic, 0, 8192)
    if at < 0 or at % 4:
        raise GuestBuildError("building the test guest: no multiboot header in the "
                              "first 8 KiB (check guest.ld)")


def guest_cmdline(mem: str | int | None = None, *, dirty: str | None = None,
                  rate: str | int | None = None, hb: int | None = None,
                  verify: int | None = None, selftest: bool = False,
                  halt_on_error: bool = False, tlbflush: bool = False) -> str:
    """Build the guest's command line (QEMU ``-append``).

    mem: region size, e.g. ``"64M"``, ``"1G"`` or an int in MiB (default: all RAM
        above 2 MiB).
    dirty: ``"fast"`` (rewrite as fast as possible, the default), ``"slow"``
        (rate limited, 16 MiB/s unless ``rate``) or ``"idle"`` (write once, then
        only a heartbeat every ``hb`` ms, hlt in between).
    rate: rewrite rate per second (``"8M"``, ``"512K"``, int = MiB); implies slow.
    hb: idle heartbeat period in ms (default 1000).
    verify: idle mode: re-verify the whole region every ``verify`` heartbeats.
    selftest: corrupt one word after pass 2 (idle: pass 1) so an ERROR is reported.
    halt_on_error: stop the guest after a pass with errors instead of going on.
    tlbflush: flush the guest TLB every ms.  Use it when migrating under TCG
        with QEMU < 9.0: those lose dirty pages that the guest keeps writing
        through a cached TLB entry (fixed by QEMU commit 03bfc2188f); without
        it, 8 of 12 of our fast/slow-mode TCG migrations on QEMU 7.2 reported
        ERRORs (the guest's own variables page arrived stale); with it, 0 of 12.
    """
    words: list[str] = []
    if mem is not None:
        words.append(f"mem={mem}")
    if dirty is not None:
        if dirty not in ("fast", "slow", "idle"):
            raise ValueError(f"dirty must be fast, slow or idle, not {dirty!r}")
        words.append(f"dirty={dirty}")
    if rate is not None:
        words.append(f"rate={rate}")
    if hb is not None:
        words.append(f"hb={int(hb)}")
    if verify is not None:
        words.append(f"verify={int(verify)}")
    if selftest:
        words.append("selftest=corrupt")
    if halt_on_error:
        words.append("onerror=halt")
    if tlbflush:
        words.append("tlbflush=1")
    for w in words:
        if " " in w or not re.fullmatch(r"[a-z]+=[0-9A-Za-z]+", w):
            raise ValueError(f"bad guest option {w!r}")
    return " ".join(words)


def find_qboot(qemu: str = "qemu-system-x86_64") -> Path | None:
    """Path of QEMU's minimal ``qboot.rom`` firmware, or None.

    With ``-bios qboot.rom`` the guest is running within ~0.3 s instead of
    several seconds with SeaBIOS on hosts where KVM must emulate real mode
    (e.g. kvm-pvm nested sandboxes).  Source and destination of a migration
    must of course use the same firmware.
    """
    try:
        out = subprocess.run([qemu, "-L", "help"], capture_output=True, text=True,
                             timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for d in out.splitlines():
        p = Path(d.strip()) / "qboot.rom"
        if d.strip() and p.is_file():
            return p
    return None


# --------------------------------------------------------------------------- serial log

@dataclass(frozen=True)
class GuestEvent:
    """One line the guest printed.

    kind: ``start``, ``pass``, ``verify``, ``error``, ``tick``, ``selftest``,
        ``cmdline``, ``fatal``, ``halted`` or ``unknown`` (has the prefix but
        doesn't parse: a garbled stream is itself a finding).
    number: the pass number (pass, verify, error) or heartbeat count (tick);
        0 for lines without one.
    ok: False for ``pass``/``verify`` lines that saw bad pages.
    fields: the line's values (``pages``, ``ms``, ``errors``, ...), as ints
        where numeric; ``base``, ``end`` and ``addr`` are hex on the wire.  For
        ``error``: ``during`` ('pass' or 'verify'), ``page``, ``word``,
        ``expected``, ``got``, ``addr`` and ``got_pass`` (the pass whose pattern
        the bad word holds, if it looks like one, else -1).
    """

    kind: str
    line: str
    lineno: int
    number: int = 0
    ok: bool = True
    fields: dict[str, int | str] = field(default_factory=dict)


_KV = re.compile(r"(\w+)=(\S+)")
_HEX_KEYS = frozenset(("base", "end", "addr"))      # printed as 8 hex digits
_RE_START = re.compile(r"start (.*)$")
_RE_RESULT = re.compile(r"(pass|verify) (\d+) (ok|bad)\b(.*)$")
_RE_ERROR = re.compile(r"ERROR (pass|verify) (\d+) page (\d+) word (\d+) "
                       r"expected ([0-9a-fA-F]{8}) got ([0-9a-fA-F]{8})(.*)$")
_RE_TICK = re.compile(r"tick (\d+)\b(.*)$")


def _kv(text: str) -> dict[str, int | str]:
    out: dict[str, int | str] = {}
    for k, v in _KV.findall(text):
        if k in _HEX_KEYS and re.fullmatch(r"[0-9a-fA-F]+", v):
            out[k] = int(v, 16)
        else:
            out[k] = int(v) if v.isdigit() else v
    return out


def _got_pass(got: int, addr: int) -> int:
    """Which pass wrote ``got`` at ``addr``, or -1 if no plausible pass did."""
    n = ((got ^ addr) * _KEY_INVERSE) & 0xFFFFFFFF
    return n if n < (1 << 24) else -1


def parse_serial(text: str) -> list[GuestEvent]:
    """Parse the guest's serial output into events.

    Only complete lines count: a trailing line without ``\\n`` is still being
    written.  Text before the prefix on a line (firmware noise) and lines
    without the prefix (e.g. the tail of a line whose start went to the
    migration source's log) are ignored.
    """
    events: list[GuestEvent] = []
    lines = text.split("\n")[:-1]
    for lineno, raw in enumerate(lines, 1):
        at = raw.find(PREFIX + " ")
        if at < 0:
            continue
        line = raw[at:].rstrip("\r")
        rest = line[len(PREFIX) + 1:]
        if m := _RE_RESULT.match(rest):
            events.append(GuestEvent(m[1], line, lineno, int(m[2]), m[3] == "ok", _kv(m[4])))
        elif m := _RE_ERROR.match(rest):
            got, expected = int(m[6], 16), int(m[5], 16)
            f: dict[str, int | str] = {"during": m[1], "page": int(m[3]), "word": int(m[4]),
                                       "expected": expected, "got": got}
            addr = _kv(m[7]).get("addr")
            if not isinstance(addr, int):       # no addr= field: derive it from page/word
                addr = REGION_START + int(m[3]) * PAGE_SIZE + 4 * int(m[4])
            f["addr"] = addr
            f["got_pass"] = _got_pass(got, addr)
            events.append(GuestEvent("error", line, lineno, int(m[2]), False, f))
        elif m := _RE_TICK.match(rest):
            events.append(GuestEvent("tick", line, lineno, int(m[1]), True, _kv(m[2])))
        elif m := _RE_START.match(rest):
            events.append(GuestEvent("start", line, lineno, 0, True, _kv(m[1])))
        elif rest.startswith("cmdline"):
            events.append(GuestEvent("cmdline", line, lineno, 0, True,
                                     {"cmdline": rest[len("cmdline"):].strip()}))
        elif rest.startswith("selftest "):
            events.append(GuestEvent("selftest", line, lineno, 0, True, _kv(rest)))
        elif rest.startswith("FATAL"):
            events.append(GuestEvent("fatal", line, lineno, 0, False))
        elif rest.strip() == "halted":
            events.append(GuestEvent("halted", line, lineno, 0, False))
        else:
            events.append(GuestEvent("unknown", line, lineno, 0, False))
    return events


def _describe_error(ev: GuestEvent) -> str:
    f = ev.fields
    during = f["during"]
    # During pass N the guest checks pass N-1's pattern; a verify checks pass N's.
    want = ev.number - 1 if during == "pass" else ev.number
    got_pass = int(f["got_pass"])
    if got_pass < 0:
        what = "not a pattern of any pass (corrupted)"
    elif got_pass < want:
        what = f"stale: holds pass {got_pass}'s pattern, expected pass {want}'s"
    else:
        what = f"holds pass {got_pass}'s pattern, expected pass {want}'s"
    return (f"line {ev.lineno}: {during} {ev.number}: page {f['page']} word {f['word']} "
            f"(addr {int(f['addr']):#x}) expected {int(f['expected']):08x} "
            f"got {int(f['got']):08x}: {what}")


def check_serial_log(text: str, *, first_pass: int | None = None) -> tuple[int, list[str]]:
    """Check a guest serial log; return ``(last_pass, problems)``.

    ``last_pass`` is the number of the last completed pass (0 if none).
    ``problems`` is empty for a healthy log; otherwise one message per finding:
    ERROR lines (with the pass a stale word came from), passes that reported
    bad pages, pass numbers that don't go up by exactly one (a gap or repeat:
    the guest's progress was lost or replayed), a second ``start`` line (the
    guest rebooted), heartbeats out of sequence, FATAL/halted lines and
    garbled guest lines.

    For a migration, check the concatenation of the source's and the
    destination's log (``src + dst``): the guest's output stream is split
    between them, possibly in the middle of a line.  To check only the
    destination's log, pass ``first_pass=`` (the source's last pass + 1) to
    require that the destination continues exactly there.
    """
    problems: list[str] = []
    last_pass = 0
    expect_pass = first_pass
    expect_tick: int | None = None
    started = False
    for ev in parse_serial(text):
        if ev.kind == "start":
            if started:
                problems.append(f"line {ev.lineno}: guest started again (reboot/reset)")
            started = True
            expect_pass, expect_tick = 1, 1
        elif ev.kind == "pass":
            if expect_pass is not None and ev.number != expect_pass:
                kind = "gap" if ev.number > expect_pass else "repeat"
                problems.append(f"line {ev.lineno}: pass {ev.number} follows pass "
                                f"{expect_pass - 1} ({kind})")
            if not ev.ok:
                problems.append(f"line {ev.lineno}: pass {ev.number} found "
                                f"{ev.fields.get('errors', '?')} bad page(s)")
            expect_pass = ev.number + 1
            last_pass = ev.number
        elif ev.kind == "verify":
            if not ev.ok:
                problems.append(f"line {ev.lineno}: verify of pass {ev.number} found "
                                f"{ev.fields.get('errors', '?')} bad page(s)")
            if last_pass and ev.number != last_pass:
                problems.append(f"line {ev.lineno}: verify of pass {ev.number} "
                                f"but the last pass was {last_pass}")
        elif ev.kind == "tick":
            if expect_tick is not None and ev.number != expect_tick:
                problems.append(f"line {ev.lineno}: heartbeat {ev.number} follows "
                                f"{expect_tick - 1}")
            expect_tick = ev.number + 1
        elif ev.kind == "error":
            problems.append(_describe_error(ev))
        elif ev.kind in ("fatal", "halted"):
            problems.append(f"line {ev.lineno}: {ev.line}")
        elif ev.kind == "unknown":
            problems.append(f"line {ev.lineno}: garbled guest line: {ev.line!r}")
    return last_pass, problems


def wait_for_pass(log: Path, min_pass: int, timeout: float, *,
                  proc: subprocess.Popen[Any] | None = None, poll: float = 0.05) -> int:
    """Wait until the serial log at ``log`` shows pass ``min_pass`` done; return the last pass.

    Raises TimeoutError after ``timeout`` seconds, or RuntimeError at once if
    ``proc`` (the QEMU process) exits first; both messages end with the tail
    of the log.  Problems in the log are not raised here: use
    :func:`check_serial_log`.
    """
    deadline = time.monotonic() + timeout
    text = ""
    while True:
        try:
            text = Path(log).read_text(errors="replace")
        except FileNotFoundError:
            text = ""
        last, _ = check_serial_log(text)
        if last >= min_pass:
            return last
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"QEMU exited with status {proc.returncode} before guest "
                               f"pass {min_pass}; serial log tail: {text[-500:]!r}")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"guest did not reach pass {min_pass} within {timeout:g}s "
                               f"(last pass {last}); serial log tail: {text[-500:]!r}")
        time.sleep(poll)
