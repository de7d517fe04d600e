"""What Begin, Perform and Confirm do to the source QEMU, over QMP.

Every object this module creates in the source QEMU carries the
"vmferry-" prefix (NBD client nodes, mirror jobs), so rollback can find
and remove exactly what a failed migration left, and nothing else.
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any, Callable, Optional

from vmferry.errors import MigrationError, UsageError, VmferryError
from vmferry.migration.monitor import Monitor
from vmferry.migration.plan import DiskPlan, file_id
from vmferry.migration.options import MigrateOptions

PREFIX = "vmferry-mirror-"
# "unlimited" for QEMU's max-bandwidth, whose own default is 128 MiB/s
UNLIMITED_BANDWIDTH = 1 << 40
DEFAULT_DOWNTIME_MS = 300
TLS_ID = "vmferry-tls"
# past migrate-start-postcopy the guest runs on the destination's side, its
# memory still partly here: no cancel can bring it back (QEMU refuses to
# resume it), only completing the migration can
POSTCOPY = ("postcopy-active", "postcopy-paused", "postcopy-recover")


async def describe(mon: Monitor) -> dict[str, Any]:
    """Begin: the VM must be running (or paused) with no migration under way."""
    status, problems = await state_problems(mon)
    if problems:
        raise MigrationError(problems[0], phase="begin")
    return status


async def state_problems(mon: Monitor) -> tuple[dict[str, Any], list[str]]:
    """The VM's run state, and every reason it cannot move now (a dry run
    lists them all; Begin stops at the first)."""
    problems = []
    status = await mon.cmd("query-status")
    if status["status"] not in ("running", "paused"):
        problems.append(f"the VM is {status['status']}, not running: start it, or "
                        f"use --offline")
    mig = await mon.cmd("query-migrate")
    if mig.get("status") in ("setup", "active", "pre-switchover", "device",
                             "postcopy-active", "cancelling"):
        problems.append(f"a migration is already {mig['status']}: wait for it or "
                        f"run 'vmferry abort'")
    jobs = await mon.cmd("query-block-jobs")
    if any(j["device"].startswith(PREFIX) for j in jobs):
        problems.append("mirror jobs of an earlier migration are still running: "
                        "run 'vmferry recover NAME' first")
    return status, problems


async def accelerator(mon: Monitor) -> str:
    """"kvm" or "tcg": the destination runs the guest with the accelerator it
    has now (a TCG guest moved onto KVM sees its clock and timing change)."""
    kvm = await mon.cmd("query-kvm")
    return "kvm" if kvm.get("enabled") else "tcg"


async def node_sizes(mon: Monitor) -> dict[str, dict[str, Any]]:
    """node-name -> image info (virtual-size, backing) for every named node."""
    nodes = await mon.cmd("query-named-block-nodes", flat=True)
    return {n["node-name"]: n for n in nodes}


async def plan_disks(mon: Monitor, spec: Any, opts: MigrateOptions) -> list[DiskPlan]:
    """Begin: the disks to copy, from the spec and the source QEMU's nodes
    (default: every writable, non-shared disk; --migrate-disks to choose)."""
    nodes = await node_sizes(mon)
    wanted = opts.migrate_disks
    plans = []
    for i, d in enumerate(spec.disks):
        node = f"disk{i}"
        info = nodes.get(node)
        if info is None:
            raise MigrationError(f"the source QEMU has no block node {node} for "
                                 f"{d.path}: was it started by vmferry?", phase="begin")
        chosen = (wanted is None and not getattr(d, "readonly", False)
                  and not getattr(d, "shared", False)) or \
                 (wanted is not None and (node in wanted or d.path in wanted))
        if not chosen or opts.copy_storage == "none":
            continue
        image = info.get("image", {})
        backing = info.get("backing_file") or image.get("backing-filename")
        backing_fmt = (image.get("backing-filename-format")
                       or (image.get("backing-image") or {}).get("format"))
        plans.append(DiskPlan(node=node, path=d.path, fmt=d.format,
                              size=image.get("virtual-size", 0), export=node,
                              backing=backing, backing_fmt=backing_fmt,
                              source_id=file_id(d.path),
                              allocated=image.get("actual-size")))
    if wanted is not None:
        known = {p.node for p in plans} | {p.path for p in plans}
        missing = [w for w in wanted if w not in known]
        if missing:
            raise UsageError(f"--migrate-disks names unknown disks: {', '.join(missing)} "
                             f"(use node names disk0, disk1... or image paths)")
    return plans


async def add_tls(mon: Monitor, tls_dir: str) -> None:
    """--tls: the source QEMU's client credentials, for its NBD client nodes and
    the migration stream (removed again by rollback, or gone with the QEMU)."""
    await mon.cmd("object-add", **{"qom-type": "tls-creds-x509", "id": TLS_ID,
                                   "dir": tls_dir, "endpoint": "client"})


# How long the destination's first large read may take before the mirrors
# start without it (it is a courtesy; Prepare has just reached that server).
WARM_WAIT_S = 5.0


async def warm_destination(prepared: Any, disks: list[DiskPlan]) -> None:
    """The one large read vmferry's engine sends a server first, which keeps a
    QEMU NBD server's request buffers in its heap for good (ext/nbd_ops.c):
    the mirrors write through the destination QEMU's, which otherwise faults
    in and zeroes every request's buffer afresh.  One export readies the
    whole QEMU; the read goes to a hole, so its answer is a few bytes."""
    if not disks:
        return
    from vmferry._engine import Endpoint    # the engine loads only when used

    uri = prepared.export_uri(disks[0].node)
    def warm() -> None:
        with Endpoint(uri, writable=True) as ep:
            ep.warm()
    try:
        await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, warm),
                               WARM_WAIT_S)
    except (VmferryError, asyncio.TimeoutError):
        pass                    # the mirrors' own connections say what is wrong


async def start_mirrors(mon: Monitor, disks: list[DiskPlan], prepared: Any,
                        sync: str, undo: list, speed: int = 0) -> None:
    """Perform, step 1: an NBD client node per disk and a mirror into it.
    speed: bytes per second for each mirror (libvirt's per-disk cap); 0: none."""
    await warm_destination(prepared, disks)
    for d in disks:
        node = PREFIX + d.node
        args: dict[str, Any] = {"driver": "nbd", "node-name": node,
                                "server": prepared.nbd_server, "export": d.export}
        if prepared.tls_dir:
            args["tls-creds"] = TLS_ID
            args["tls-hostname"] = prepared.tls_hostname
        await mon.cmd("blockdev-add", **args)
        undo.append(("blockdev-del", node))
        # auto-dismiss off: a failed job stays visible with its error text.
        await mon.cmd("blockdev-mirror", **{
            "job-id": node, "device": d.node, "target": node, "sync": sync,
            "auto-dismiss": False, **({"speed": speed} if speed else {})})
        undo.append(("job", node))


async def job_states(mon: Monitor) -> dict[str, dict[str, Any]]:
    jobs = await mon.cmd("query-jobs")
    return {j["id"]: j for j in jobs if j["id"].startswith(PREFIX)}


async def block_jobs(mon: Monitor) -> list[dict[str, Any]]:
    return await mon.cmd("query-block-jobs")


def _note_error(event: Any, ops: dict[str, str]) -> None:
    """Keep which side a mirror's first I/O error came from (BLOCK_JOB_ERROR
    says: a read is the source disk, a write the destination)."""
    if event.get("event") == "BLOCK_JOB_ERROR":
        data = event.get("data", {})
        ops.setdefault(data.get("device", ""), data.get("operation", ""))


def _check_jobs(jobs: dict[str, dict[str, Any]], expected: list[str], phase: str,
                ops: Optional[dict[str, str]] = None) -> None:
    for jid in expected:
        j = jobs.get(jid)
        if j is None:
            raise MigrationError(f"storage mirror {jid} vanished", phase=phase)
        if j.get("error"):
            op = (ops or {}).get(jid)
            if op == "read":
                where = " reading the source disk"
                hint = ""
            else:
                # a full destination says so itself; anything else written is
                # most likely the destination gone
                where = " writing to the destination" if op == "write" else ""
                hint = ("" if "No space left" in j["error"]
                        else " (is the destination still there?)")
            raise MigrationError(f"storage mirror of {jid[len(PREFIX):]} failed{where}: "
                                 f"{j['error']}{hint}", phase=phase)
        if j["status"] in ("aborting", "concluded", "null") and not j.get("error"):
            if j["status"] != "concluded":
                raise MigrationError(f"storage mirror {jid} stopped ({j['status']})",
                                     phase=phase)


async def wait_mirrors_ready(mon: Monitor, disks: list[DiskPlan],
                             on_progress: Callable[[list[dict[str, Any]]], None],
                             deadline: Optional[float]) -> None:
    """Perform, step 2: every mirror has copied the whole disk once and is
    now mirroring each new write (the job is 'ready')."""
    ids = [PREFIX + d.node for d in disks]
    # Woken by job events at once, and every 100 ms for the progress display.
    with mon.listener(("BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_ERROR",
                       "JOB_STATUS_CHANGE")) as events:
        ops: dict[str, str] = {}
        while True:
            while not events.empty():
                _note_error(await events.get(), ops)
            jobs = await job_states(mon)
            _check_jobs(jobs, ids, "perform", ops)
            on_progress(await block_jobs(mon))
            if all(jobs[i]["status"] == "ready" for i in ids):
                return
            if deadline is not None and time.monotonic() > deadline:
                raise MigrationError("storage copy did not finish before --timeout",
                                     phase="perform")
            try:
                _note_error(await asyncio.wait_for(events.get(), 0.1), ops)
            except asyncio.TimeoutError:
                pass


async def settle_mirrors(mon: Monitor, disks: list[DiskPlan]) -> None:
    """At pre-switchover the guest is paused and its I/O drained: cancelling a
    ready mirror completes it without pivoting, leaving the target an exact
    copy of the source as of now."""
    ids = [PREFIX + d.node for d in disks]
    for jid in ids:
        await mon.cmd("block-job-cancel", device=jid)
    while True:
        jobs = await job_states(mon)
        for jid in ids:
            j = jobs.get(jid)
            if j is None:
                raise MigrationError(f"storage mirror {jid} vanished", phase="perform")
            if j.get("error"):
                raise MigrationError(f"storage mirror of {jid[len(PREFIX):]} failed while "
                                     f"finishing: {j['error']}", phase="perform")
        if all(jobs[j]["status"] == "concluded" for j in ids):
            break
        await asyncio.sleep(0.005)
    for jid in ids:
        await mon.cmd("job-dismiss", id=jid)
    for d in disks:
        await mon.cmd("blockdev-del", **{"node-name": PREFIX + d.node})


async def set_capabilities(mon: Monitor, wanted: list[dict[str, Any]]) -> None:
    """Set only the capabilities whose state differs from what QEMU has:
    capabilities outlive a migration attempt, so each must be set as
    wanted, but re-setting unchanged ones is needless churn."""
    have = {c["capability"]: c["state"] for c in await mon.cmd("query-migrate-capabilities")}
    change = [c for c in wanted if have.get(c["capability"]) != c["state"]]
    if change:
        await mon.cmd("migrate-set-capabilities", capabilities=change)


def capabilities(opts: MigrateOptions) -> list[dict[str, Any]]:
    caps = {"events": True, "pause-before-switchover": True,
            "postcopy-ram": opts.postcopy, "multifd": bool(opts.parallel_connections),
            "xbzrle": opts.compressed, "auto-converge": opts.auto_converge}
    return [{"capability": k, "state": v} for k, v in caps.items()]


def parameters(opts: MigrateOptions, prepared: Any = None) -> dict[str, Any]:
    tls = prepared is not None and prepared.tls_dir
    p: dict[str, Any] = {
        "max-bandwidth": opts.bandwidth * (1 << 20) if opts.bandwidth else UNLIMITED_BANDWIDTH,
        "downtime-limit": opts.max_downtime or DEFAULT_DOWNTIME_MS,
        # parameters outlive a migration attempt: say "no TLS" explicitly too
        "tls-creds": TLS_ID if tls else "",
        "tls-hostname": prepared.tls_hostname if tls else "",
    }
    if opts.parallel_connections:
        p["multifd-channels"] = opts.parallel_connections
    return p


async def yank(mon: Monitor) -> None:
    """The destination is gone: shut down the sockets to it (the migration
    stream and every vmferry NBD client node), so that cancelling does not
    wait minutes for TCP to give up on a dead link."""
    nodes = await mon.try_cmd("query-named-block-nodes", flat=True) or []
    instances: list[dict[str, Any]] = [{"type": "migration"}]
    instances += [{"type": "block-node", "node-name": n["node-name"]} for n in nodes
                  if n["node-name"].startswith(PREFIX) and n.get("drv") == "nbd"]
    for inst in instances:       # one at a time: yank fails on an unknown instance
        await mon.try_cmd("yank", instances=[inst])


async def cancel_jobs(mon: Monitor) -> None:
    """Cancel and dismiss vmferry's mirror jobs: nothing writes to the
    destination's images any more."""
    jobs = await mon.try_cmd("query-jobs") or []
    for j in jobs:
        if j["id"].startswith(PREFIX) and j["status"] not in ("concluded", "null"):
            await mon.try_cmd("job-cancel", id=j["id"])
    for _ in range(200):
        jobs = [j for j in (await mon.try_cmd("query-jobs") or [])
                if j["id"].startswith(PREFIX)]
        for j in jobs:
            if j["status"] == "concluded":
                await mon.try_cmd("job-dismiss", id=j["id"])
        if not jobs:
            break
        await asyncio.sleep(0.05)


async def rollback(mon: Monitor, resume: bool) -> None:
    """Confirm after a failure: cancel whatever is running, remove every
    vmferry node and job, and resume the guest if it was running."""
    await mon.try_cmd("migrate_cancel")
    # migrate_cancel is asynchronous; wait for the state to settle.
    for _ in range(200):
        mig = await mon.try_cmd("query-migrate") or {}
        if mig.get("status") not in ("cancelling", "active", "setup", "pre-switchover",
                                     "device"):
            break
        await asyncio.sleep(0.05)
    await cancel_jobs(mon)
    nodes = await mon.try_cmd("query-named-block-nodes", flat=True) or []
    for n in nodes:
        if n["node-name"].startswith(PREFIX):
            await mon.try_cmd("blockdev-del", **{"node-name": n["node-name"]})
    await mon.try_cmd("migrate-set-parameters", **{"tls-creds": "", "tls-hostname": ""})
    await mon.try_cmd("object-del", id=TLS_ID)
    status = await mon.try_cmd("query-status") or {}
    if resume and status.get("status") in ("paused", "postmigrate", "finish-migrate"):
        await mon.try_cmd("cont")
