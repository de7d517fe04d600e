"""--offline: the VM is not running, so its disks move through vmferry's
own copy engine and its spec moves with them."""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Optional

from vmferry.copying import copy_async
from vmferry.errors import UsageError
from vmferry.eta import Estimator
from vmferry.migration.destination import Destination, destination_spec
from vmferry.migration.desthost.incoming import Incoming, create_image, image_size
from vmferry.migration.job import JobInfo
from vmferry.migration.local import LocalDestination
from vmferry.migration.options import MigrateOptions
from vmferry.migration.plan import DiskPlan, file_id
from vmferry.vm.state import StateDir


async def migrate_offline(state: StateDir, rec: Any, dest: Destination,
                          opts: MigrateOptions, *,
                          progress: Optional[Callable[[JobInfo], None]] = None) -> JobInfo:
    if rec.pid is not None:
        raise UsageError(f"{rec.name} is running: stop it first, or migrate it live "
                         f"without --offline")
    if not isinstance(dest, LocalDestination):
        raise UsageError("--offline needs a local:// destination for now")
    info = JobInfo(name=rec.name, phase="perform", status="running", started=time.time(),
                   dest_name=opts.new_name(rec.name))
    est = Estimator()
    spec = rec.spec
    dspec = destination_spec(spec, opts)
    created = []
    try:
        if opts.copy_storage != "none":
            # the destination's own checks, as a live migration's Prepare makes
            # them (same file, exists or --create-disks, large enough)
            plans = [DiskPlan(node=f"disk{i}", path=d.path, fmt=d.format,
                              size=image_size(d.path) or 0, source_id=file_id(d.path))
                     for i, d in enumerate(spec.disks) if not (d.readonly or d.shared)]
            info.disk_total = sum(p.size for p in plans)
            missing, problems = Incoming(dest.state).disk_problems(dspec, plans, opts, set())
            if problems:
                raise UsageError(problems[0])
            for plan in missing:
                create_image(plan.dest_path, "raw", plan.size, None, "raw")
                created.append(plan.dest_path)
            for d, t in zip(spec.disks, dspec.disks):
                if d.readonly or d.shared:
                    continue
                if d.format != "raw" or t.format != "raw":
                    raise UsageError("--offline moves raw images only for now: convert "
                                     "qcow2 with qemu-img, or migrate live")
                done_before = info.disk_processed

                def on_progress(snap: Any, base: int = done_before) -> None:
                    info.disk_processed = base + snap.bytes_done
                    info.disk_remaining = info.disk_total - info.disk_processed
                    info.tick()
                    info.estimate(est)
                    if progress:
                        progress(info)
                r = await copy_async(d.path, t.path, progress=on_progress, flush=True,
                                     # file -> file: copy_file_range measured no
                                     # cheaper than the buffered lanes (ext4, tmpfs)
                                     zero_copy="off",
                                     rate=opts.disk_rate() or None)
                info.disk_processed = done_before + r.bytes_total
        dest.state.save_spec(dspec)
        if opts.undefine_source:
            state.spec_path(rec.name).unlink(missing_ok=True)
    except BaseException:
        for p in created:
            if os.path.exists(p):
                os.unlink(p)
        raise
    info.status = "completed"
    info.phase = "done"
    info.disk_remaining = 0
    info.tick()
    info.estimate(est)
    if progress:
        progress(info)
    return info
