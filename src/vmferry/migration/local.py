"""LocalDestination: the destination is another state directory on this host
(`local:///path`), which stands for another host in tests and demos and is
also how a same-host storage move is done."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Optional

from vmferry.errors import MigrationError, UsageError
from vmferry.migration.destination import Destination, Prepared
from vmferry.migration.monitor import Monitor
from vmferry.migration.options import MigrateOptions
from vmferry.migration.source import DiskPlan
from vmferry.units import format_size
from vmferry.vm.process import start_vm_async, stop_vm_async
from vmferry.vm.spec import load_spec
from vmferry.vm.state import StateDir

INCOMING_TIMEOUT = 120.0


def image_size(path: str) -> Optional[int]:
    """Virtual size of an existing image, or None if there is none.  -U: the
    image may be open in a running QEMU."""
    if not os.path.exists(path):
        return None
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", path],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise UsageError(f"cannot read destination image {path}: "
                         f"{out.stderr.strip().splitlines()[-1] if out.stderr else 'qemu-img failed'}")
    return int(json.loads(out.stdout)["virtual-size"])


def create_image(path: str, fmt: str, size: int, backing: Optional[str],
                 backing_fmt: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    cmd = ["qemu-img", "create", "-q", "-f", fmt]
    if backing and fmt == "qcow2":
        cmd += ["-b", backing, "-F", backing_fmt]
    cmd += [path, str(size)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise UsageError(f"cannot create destination image {path}: {out.stderr.strip()}")


class LocalDestination(Destination):
    def __init__(self, state: StateDir) -> None:
        self.state = state
        self.name: Optional[str] = None
        self.mon: Optional[Monitor] = None
        self.created: list[str] = []
        self.new_vm_dir = False
        self.started = False
        self.exports: list[str] = []

    def __repr__(self) -> str:
        return f"local://{self.state.path}"

    def _dest_spec(self, spec: Any, opts: MigrateOptions) -> Any:
        if opts.dest_spec:
            other = load_spec(opts.dest_spec)
            if len(other.disks) != len(spec.disks):
                raise UsageError(f"destination spec {opts.dest_spec} has {len(other.disks)} "
                                 f"disks, the VM has {len(spec.disks)}: they must match")
            dmap = {f"disk{i}": d.path for i, d in enumerate(other.disks)}
            return spec.remap(dmap, serial=other.serial if spec.serial else None)
        return spec.remap(opts.disk_map)

    def dest_paths(self, spec: Any, plans: list[DiskPlan], opts: MigrateOptions) -> dict[str, str]:
        dspec = self._dest_spec(spec, opts)
        return {f"disk{i}": d.path for i, d in enumerate(dspec.disks)}

    def _check_disks(self, spec: Any, dspec: Any, disks: list[DiskPlan],
                     opts: MigrateOptions) -> None:
        by_node = {f"disk{i}": d for i, d in enumerate(dspec.disks)}
        for plan in disks:
            target = by_node[plan.node].path
            plan.dest_path = target
            if os.path.realpath(target) == os.path.realpath(plan.path):
                raise UsageError(f"the destination image of {plan.node} is the source's own "
                                 f"file {target}: map it elsewhere with --disk-map "
                                 f"{plan.path}=NEWPATH")
            size = image_size(target)
            if size is None:
                if not opts.create_disks:
                    raise UsageError(f"destination image {target} does not exist: create it "
                                     f"or pass --create-disks")
            elif size < plan.size:
                raise UsageError(f"destination image {target} is smaller "
                                 f"({format_size(size)}) than {plan.path} "
                                 f"({format_size(plan.size)}): grow it, or remove it and "
                                 f"pass --create-disks")
        for plan in disks:
            if image_size(plan.dest_path) is None:
                # Only an incremental copy keeps the shared backing file; a full
                # copy makes the destination image stand alone.
                inc = opts.copy_storage == "inc"
                create_image(plan.dest_path, plan.fmt, plan.size,
                             plan.backing if inc else None, plan.backing_fmt or "raw")
                self.created.append(plan.dest_path)

    async def prepare(self, spec: Any, disks: list[DiskPlan], opts: MigrateOptions, *,
                      accel: Optional[str] = None) -> Prepared:
        dspec = self._dest_spec(spec, opts)
        self.name = dspec.name
        if self.state.read_pid(dspec.name) is not None:
            raise UsageError(f"a VM named {dspec.name} already runs in {self.state.path}")
        self.new_vm_dir = not self.state.vm_dir(dspec.name).exists()
        self._check_disks(spec, dspec, disks, opts)
        vm = await start_vm_async(self.state, dspec, incoming="defer", paused=True,
                                  accel=accel)
        self.started = True
        self.mon = await Monitor(vm.qmp_socket, "destination", "prepare").connect()
        run = self.state.runtime_dir(dspec.name)
        nbd_sock = run / "nbd.sock"
        mig_sock = run / "migrate.sock"
        for p in (nbd_sock, mig_sock):
            p.unlink(missing_ok=True)
        if disks:
            await self.mon.cmd("nbd-server-start",
                               addr={"type": "unix", "data": {"path": str(nbd_sock)}})
            for plan in disks:
                await self.mon.cmd("block-export-add", **{
                    "type": "nbd", "id": f"vmferry-export-{plan.node}",
                    "node-name": plan.node, "name": plan.export, "writable": True})
                self.exports.append(f"vmferry-export-{plan.node}")
        from vmferry.migration.source import capabilities, set_capabilities
        # The destination must agree on the capabilities that change the stream.
        await set_capabilities(self.mon, [c for c in capabilities(opts)
                                          if c["capability"] in ("postcopy-ram", "multifd")])
        if opts.parallel_connections:
            await self.mon.cmd("migrate-set-parameters",
                               **{"multifd-channels": opts.parallel_connections})
        await self.mon.cmd("migrate-incoming", uri=f"unix:{mig_sock}")
        return Prepared(migrate_uri=f"unix:{mig_sock}",
                        nbd_server={"type": "unix", "path": str(nbd_sock)},
                        exports={p.node: p.export for p in disks},
                        dest_paths={p.node: p.dest_path for p in disks},
                        fresh={p.node for p in disks if p.dest_path in self.created})

    async def finish(self, opts: MigrateOptions, *, resume: bool) -> str:
        mon = self.mon
        mon.phase = "finish"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + INCOMING_TIMEOUT
        while True:
            info = await mon.cmd("query-migrate")
            status = info.get("status")
            if status == "completed":
                break
            if status in ("failed", "cancelled"):
                raise MigrationError(f"incoming migration {status} on the destination: "
                                     f"{info.get('error-desc', 'see its qemu.log')}",
                                     phase="finish")
            if loop.time() > deadline:
                raise MigrationError("the destination never saw the migration complete",
                                     phase="finish")
            await asyncio.sleep(0.01)
        for exp in self.exports:
            await mon.cmd("block-export-del", id=exp)
        if self.exports:
            await mon.cmd("nbd-server-stop")
        self.exports.clear()
        if resume:
            await mon.cmd("cont")
        status = (await mon.cmd("query-status"))["status"]
        await mon.close()
        return status

    async def abort(self) -> None:
        if self.mon is not None:
            await self.mon.close()
        if self.started and self.name:
            await stop_vm_async(self.state, self.name, force=True, timeout=5)
            self.started = False
        for path in self.created:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self.created.clear()
        if self.new_vm_dir and self.name:
            shutil.rmtree(self.state.vm_dir(self.name), ignore_errors=True)
            run = self.state.runtime_dir(self.name)
            if run != self.state.vm_dir(self.name):
                shutil.rmtree(run, ignore_errors=True)
