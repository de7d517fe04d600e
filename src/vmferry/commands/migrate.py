"""`vmferry migrate NAME DEST`, `vmferry jobinfo NAME` and `vmferry abort NAME`."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from vmferry.errors import UsageError
from vmferry.eta import format_eta
from vmferry.migration.options import MigrateOptions
from vmferry.migration.job import JobInfo
from vmferry.progress import BarReporter, JsonReporter, NullReporter
from vmferry.units import format_size
from vmferry.vm.state import StateDir, pid_alive


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("migrate", help="live-migrate a running VM with its disks",
                       description="Move VM NAME to DEST while it runs: disks, memory and "
                                   "device state.  DEST is ssh://[USER@]HOST[:PORT][/STATE-DIR] "
                                   "(runs 'vmferry agent --stdio' there), tls://HOST[:PORT] (a "
                                   "'vmferry agent --listen' with mutual TLS) or "
                                   "local:///STATE-DIR (another state directory here).")
    p.add_argument("name", metavar="NAME")
    p.add_argument("dest", metavar="DEST")
    st = p.add_mutually_exclusive_group()
    st.add_argument("--copy-storage-all", dest="copy_storage", action="store_const",
                    const="all", help="copy every disk in full (the default)")
    st.add_argument("--copy-storage-inc", dest="copy_storage", action="store_const",
                    const="inc", help="copy only the top images over a backing file both "
                                      "hosts share")
    st.add_argument("--shared-storage", dest="copy_storage", action="store_const",
                    const="none", help="copy no disks: both hosts see the same images")
    add_disk_options(p, "copy")
    # virsh's spellings of what vmferry always does: a live migration that the
    # source host drives against the destination (peer to peer)
    p.add_argument("--live", action="store_true",
                   help="a live migration (always; accepted for virsh compatibility)")
    p.add_argument("--p2p", action="store_true",
                   help="the source host drives the destination (the default)")
    p.add_argument("--direct", action="store_true",
                   help="with --connect ssh://SOURCE: this machine drives each phase on "
                        "both hosts (libvirt's managed direct migration; DEST as this "
                        "machine reaches it); if it goes away, the migration rolls back")
    # the source's side of --direct (commands/direct.py): the destination's
    # agent is reached through this process's stdin and stdout
    p.add_argument("--relayed", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dname", metavar="NEWNAME",
                   help="the VM's name on the destination (its NICs keep their MACs)")
    p.add_argument("--persistent", action="store_true",
                   help="keep the spec on the destination (always done; accepted for "
                        "virsh compatibility)")
    p.add_argument("--undefinesource", action="store_true",
                   help="remove the VM's spec from the source state directory afterwards")
    p.add_argument("--suspend", action="store_true",
                   help="leave the guest paused on the destination")
    p.add_argument("--offline", action="store_true",
                   help="the VM is not running: move its disks and spec")
    p.add_argument("--timeout", type=float, metavar="SECONDS",
                   help="give memory migration this long, then take the timeout action")
    act = p.add_mutually_exclusive_group()
    act.add_argument("--timeout-suspend", dest="timeout_action", action="store_const",
                     const="suspend", help="on timeout, pause the guest so migration completes")
    act.add_argument("--timeout-postcopy", dest="timeout_action", action="store_const",
                     const="postcopy", help="on timeout, switch to post-copy")
    p.add_argument("--bandwidth", type=int, metavar="MiB/s",
                   help="cap memory migration bandwidth (default: unlimited)")
    p.add_argument("--max-downtime", type=int, metavar="MS",
                   help="downtime limit in milliseconds (default 300)")
    p.add_argument("--no-escalate", action="store_true",
                   help="never raise the downtime limit when migration stalls")
    p.add_argument("--auto-converge", action="store_true",
                   help="throttle the guest's CPUs if memory does not converge")
    p.add_argument("--parallel-connections", type=int, metavar="N",
                   help="multifd: move memory over N connections")
    p.add_argument("--postcopy", action="store_true", help="allow post-copy")
    p.add_argument("--compressed", action="store_true", help="xbzrle page compression")
    p.add_argument("--storage-engine", choices=["auto", "mirror", "native"], default="auto",
                   help="who copies the disks: vmferry's multi-connection engine with "
                        "dirty-bitmap passes (native), QEMU's mirror job (mirror), or auto "
                        "(default): native for raw images moving to this host, where it is "
                        "faster, mirror otherwise")
    add_host_options(p, memory=True)
    p.add_argument("--verbose", "--progress", dest="progress", nargs="?", const="auto",
                   choices=["auto", "bar", "json"], help="show progress")
    p.add_argument("--tunnelled", "--tunneled", action="store_true",
                   help="carry the disks and the memory stream inside the ssh "
                        "connection (ssh://) or through the agent's TLS port (tls://), "
                        "so that only that port need be open between the hosts")
    p.add_argument("--detach", action="store_true",
                   help="run the migration in a session of its own and follow it: a "
                        "hang-up leaves it running ('jobinfo --follow' re-attaches), "
                        "Ctrl-C aborts it (what --connect does)")
    add_dry_run_options(p, "migration")
    p.set_defaults(func=run, copy_storage="all")

    j = sub.add_parser("jobinfo", help="statistics of a VM's current or last migration")
    j.add_argument("name", metavar="NAME")
    j.add_argument("--json", action="store_true")
    j.add_argument("--follow", action="store_true",
                   help="show the running migration as 'migrate' does until it ends, "
                        "with its last line and exit status (Ctrl-C aborts it)")
    j.add_argument("--progress", nargs="?", const="auto", choices=["auto", "bar", "json"],
                   help="with --follow: how to show it (default: auto)")
    j.set_defaults(func=jobinfo)

    a = sub.add_parser("abort", help="cancel a running migration; the source resumes")
    a.add_argument("name", metavar="NAME")
    a.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS")
    a.set_defaults(func=abort)


def add_disk_options(p: argparse.ArgumentParser, verb: str) -> None:
    """Which disks go where (migrate and presync)."""
    p.add_argument("--migrate-disks", metavar="LIST",
                   help=f"comma-separated disks to {verb} (disk0,... or paths)")
    p.add_argument("--disk-map", action="append", default=[], metavar="SRC=DST",
                   help="destination image path for a source image (repeatable)")
    p.add_argument("--dest-spec", "--xml", metavar="FILE",
                   help="a spec file for the destination "
                   "(its disk and serial paths are used)")
    p.add_argument("--create-disks", action="store_true",
                   help="create missing destination images with the right size and format")
    p.add_argument("--disk-bandwidth", type=int, metavar="MiB/s",
                   help="cap each disk's copy at this rate, as libvirt caps each disk's "
                        "mirror: N disks may move N times as much (default: unlimited)")


def add_dry_run_options(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--dry-run", action="store_true",
                   help=f"check everything the {what} needs on both hosts, change nothing, "
                        f"and print the plan with an estimate of its time; exit status 1 "
                        f"(one line per problem) when it would not start")
    p.add_argument("--json", action="store_true",
                   help="with --dry-run: print the plan and its problems as JSON")


def print_dry_run(plan: Any, as_json: bool) -> int:
    """The plan on stdout; each problem on a line of its own on stderr (in
    the JSON with --json)."""
    if as_json:
        print(json.dumps(plan.as_dict(), indent=1), flush=True)
    else:
        print(plan.text(), flush=True)
        for problem in plan.problems:
            sys.stderr.write(f"vmferry: error: {problem}\n")
    return 0 if plan.ok else 1


def common_options(args: argparse.Namespace) -> dict[str, Any]:
    """MigrateOptions fields of add_disk_options and add_host_options."""
    return dict(
        migrate_disks=[d for d in args.migrate_disks.split(",") if d] if args.migrate_disks
        else None,
        disk_map=parse_disk_map(args.disk_map), dest_spec=args.dest_spec,
        create_disks=args.create_disks, overwrite_disks=args.overwrite_disks, tls=args.tls,
        disk_bandwidth=args.disk_bandwidth,
        pki_dir=args.pki, listen_address=args.listen_address, disks_uri=args.disks_uri)


def add_host_options(p: argparse.ArgumentParser, *, memory: bool) -> None:
    """The options of a destination on another host (migrate and presync)."""
    net = p.add_argument_group("between hosts")
    net.add_argument("--tls", action="store_true",
                     help="encrypt and authenticate the disks' NBD" +
                          (" and the migration stream" if memory else "") +
                          " with QEMU's x509 credentials (PKI/qemu on both hosts)")
    net.add_argument("--pki", type=Path, default=Path("/etc/pki"), metavar="DIR",
                     help="this host's certificates, laid out as libvirt's /etc/pki "
                          "(default: %(default)s)")
    net.add_argument("--listen-address", metavar="ADDR",
                     help="address the destination binds for the disks" +
                          (" and memory" if memory else "") +
                          " (default: the one this host reached it on)")
    net.add_argument("--disks-uri", metavar="tcp://HOST[:PORT]",
                     help="destination address (and port) for the disks' NBD traffic")
    if memory:
        net.add_argument("--migrate-uri", "--migrateuri", metavar="tcp://HOST[:PORT]",
                         help="destination address (and port) for the migration stream")
    net.add_argument("--overwrite-disks", action="store_true",
                     help="let a remote destination write into images that already exist "
                          "(images presync made are always its to write)")


def job_file(state: StateDir, name: str) -> "Path":
    from vmferry.migration.api import job_file as path_of
    return path_of(state, name)


def parse_disk_map(items: list[str]) -> dict[str, str]:
    """--disk-map SRC=DST options; SRC is a path or a node name (disk0)."""
    dmap = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"--disk-map {item!r}: use SRC=DST")
        k, v = item.split("=", 1)
        dmap[os.path.abspath(k) if "/" in k else k] = v
    return dmap


def options_from(args: argparse.Namespace) -> MigrateOptions:
    return MigrateOptions(
        **common_options(args), copy_storage=args.copy_storage,
        dname=args.dname, undefine_source=args.undefinesource, suspend=args.suspend,
        offline=args.offline,
        timeout=args.timeout, timeout_action=args.timeout_action, bandwidth=args.bandwidth,
        max_downtime=args.max_downtime, escalate_downtime=not args.no_escalate,
        auto_converge=args.auto_converge, parallel_connections=args.parallel_connections,
        postcopy=args.postcopy, compressed=args.compressed,
        storage_engine=args.storage_engine, migrate_uri=args.migrate_uri,
        tunnelled=args.tunnelled)


class MigrationDisplay:
    """virsh migrate --verbose, with storage and memory in one bar: one
    percentage and one ETA for the whole migration (JobInfo.estimate, eta.py),
    labelled with the part that is moving."""

    def __init__(self, mode: str | None) -> None:
        self.mode = mode
        self.json = JsonReporter() if mode == "json" else None
        self.tty = mode == "bar" or (mode == "auto" and sys.stderr.isatty())
        self.bar: Any = BarReporter() if self.tty else NullReporter()
        self.phase = ""

    def __call__(self, info: JobInfo) -> None:
        if self.json:
            d = info.as_dict()
            d["event"] = "progress"
            self.json.update(d)
            return
        if not self.mode:
            return
        if info.phase != self.phase:
            self.phase = info.phase
            if not self.tty:
                sys.stderr.write(f"migrate: {info.phase}\n")
        if info.phase in ("begin", "prepare"):
            return
        memory = info.memory_total > 0
        label = info.phase if info.phase != "perform" else "memory" if memory else "storage"
        self.bar.update({"label": f"{label:7}", "percent": info.percent,
                         "rate": info.memory_rate if memory else info.disk_rate,
                         "eta_s": info.eta_s, "converging": info.converging,
                         "event": "done" if info.phase == "done" else "progress"})

    def close(self) -> None:
        self.bar.close()


def print_done(info: JobInfo, mode: str | None) -> None:
    """A completed migration's last word: the JSON "done" event, or one line."""
    if mode == "json":
        d = info.as_dict()
        d["event"] = "done"
        JsonReporter().update(d)
    else:
        print(summary(info), flush=True)


def summary(info: JobInfo) -> str:
    down = f"{info.downtime_ms} ms downtime" if info.downtime_ms is not None else "offline"
    renamed = f" as {info.dest_name}" if info.dest_name else ""
    return (f"migrated {info.name}{renamed} in {info.elapsed_ms / 1000:.2f} s: "
            f"{format_size(info.disk_processed)} of disk, "
            f"{format_size(info.memory_processed)} of memory, {down}"
            + (f" ({info.action})" if info.action else ""))


def run(args: argparse.Namespace) -> int:
    opts = options_from(args)
    opts.validate()
    if args.json and not args.dry_run:
        raise UsageError("--json goes with --dry-run (a migration's progress: --progress=json)")
    if args.detach and not args.dry_run:
        # a dry run changes nothing and ends within seconds: nothing to detach
        from vmferry.commands import detached
        return detached.start(StateDir(args.state_dir), args.name, args.command_argv,
                              args.progress)
    if args.relayed:
        return _relayed(args, opts)
    ssh = None
    if args.dest.startswith("ssh://"):
        # ssh's handshake and the remote agent's start-up take longer than
        # loading the rest of vmferry here: let them overlap.
        from vmferry.agent import transport
        ssh = transport.spawn_ssh(transport.parse(args.dest), tunnel=opts.tunnelled)
    dest: Any = args.dest
    if ssh is not None:
        from vmferry.migration.remote import RemoteDestination
        dest = RemoteDestination(args.dest, ssh=ssh)
    state = StateDir(args.state_dir)
    if args.dry_run:
        from vmferry.migration.api import dry_run_vm
        return print_dry_run(dry_run_vm(state, args.name, dest, opts), args.json)
    return _migrate(state, args, dest, opts)


def _migrate(state: StateDir, args: argparse.Namespace, dest: Any,
             opts: MigrateOptions) -> int:
    from vmferry.migration.api import migrate_vm
    display = MigrationDisplay(args.progress)
    try:
        info = migrate_vm(state, args.name, dest, opts, progress=display)
    finally:
        display.close()
    print_done(info, args.progress)
    return 0


def _relayed(args: argparse.Namespace, opts: MigrateOptions) -> int:
    """The source's side of --direct: this process's stdin and stdout are
    its channel to the destination's agent, through the management machine;
    what it prints goes to stderr, which may break with that machine gone
    while the rollback still has work to do."""
    from vmferry.agent import transport
    from vmferry.migration.remote import RemoteDestination
    streams = transport.take_stdio()
    sys.stdout, sys.stderr = Unbreakable(sys.stdout), Unbreakable(sys.stderr)
    dest = RemoteDestination(args.dest, relay=streams)
    return _migrate(StateDir(args.state_dir), args, dest, opts)


class Unbreakable:
    """A text stream whose writes cannot fail: a reader that went away is no
    reason to stop a rollback half-way."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except (OSError, ValueError):
            return len(text)

    def flush(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def jobinfo(args: argparse.Namespace) -> int:
    state = StateDir(args.state_dir)
    if args.follow:
        from vmferry.commands import detached
        return detached.follow(state, args.name, "json" if args.json else
                               (args.progress or "auto"))
    path = job_file(state, args.name)
    if not path.exists():
        raise UsageError(f"{args.name} has no migration job to show")
    info = JobInfo.load(path)
    if info.status == "running" and not pid_alive(info.pid):
        info.status = "failed"
        info.error = info.error or "the vmferry process running it died"
        info.eta_s, info.converging = None, False
    if args.json:
        print(json.dumps(info.as_dict(), indent=1))
        return 0
    rows = [
        ("Job type", "migration"), ("Status", info.status), ("Phase", info.phase),
        ("Time elapsed", f"{info.elapsed_ms} ms"),
        ("Progress", f"{info.percent:.1f}%"),
        ("Time remaining", "converging…" if info.converging else
         format_eta(info.eta_s) if info.eta_s is not None else "unknown"),
        ("Data processed", format_size(info.data_processed)),
        ("Data remaining", format_size(info.data_remaining)),
        ("Data total", format_size(info.data_total)),
        ("Memory processed", format_size(info.memory_processed)),
        ("Memory remaining", format_size(info.memory_remaining)),
        ("Memory total", format_size(info.memory_total)),
        ("Memory bandwidth", f"{format_size(info.memory_bandwidth)}/s"),
        ("Memory rate", f"{format_size(info.memory_rate)}/s"),
        ("Dirty rate", f"{info.dirty_rate} pages/s"),
        ("Iteration", str(info.iteration)),
        ("File processed", format_size(info.disk_processed)),
        ("File remaining", format_size(info.disk_remaining)),
        ("File total", format_size(info.disk_total)),
        ("File rate", f"{format_size(info.disk_rate)}/s"),
        ("File bandwidth cap", f"{format_size(info.disk_bandwidth)}/s per disk"
         if info.disk_bandwidth else "unlimited"),
        ("Expected downtime", f"{info.expected_downtime_ms} ms"),
        ("Downtime limit", f"{info.downtime_limit_ms} ms"),
    ]
    if info.downtime_ms is not None:
        rows.append(("Total downtime", f"{info.downtime_ms} ms"))
    if info.destination:
        rows.append(("Destination", info.destination))
        rows.append(("Disks to", (info.disks_address or "-") + (" (TLS)" if info.tls else "")))
        rows.append(("Memory to", info.migrate_uri + (" (TLS)" if info.tls else "")))
    if info.storage_lanes:
        lanes = ", ".join(f"{k} {format_size(v)}" for k, v in sorted(info.storage_lanes.items()))
        rows.append(("Disk lanes", lanes + (f" ({info.storage_lanes_note})"
                                            if info.storage_lanes_note else "")))
    if info.action:
        rows.append(("Action", info.action))
    if info.error:
        rows.append(("Error", info.error))
    for k, v in rows:
        print(f"{k + ':':20}{v}")
    return 0


def abort(args: argparse.Namespace) -> int:
    state = StateDir(args.state_dir)
    from vmferry.migration.journal import interrupted
    if interrupted(state, args.name) is not None:
        # its process is gone: nothing to signal, recover does the undoing
        # (or completes it, past the point of no return)
        from vmferry.migration.recover import recover
        from vmferry.vm.qmp import run_sync
        print(run_sync(recover(state, args.name)), flush=True)
        return 0
    path = job_file(state, args.name)
    info = JobInfo.load(path) if path.exists() else None
    if info is None or info.status != "running" or not pid_alive(info.pid):
        raise UsageError(f"{args.name} has no migration running")
    os.kill(info.pid, signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    while pid_alive(info.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if pid_alive(info.pid):
        raise UsageError(f"the migration of {args.name} (pid {info.pid}) did not stop "
                         f"within {args.timeout:g} s")
    print(f"aborted the migration of {args.name}; it runs on the source")
    return 0
