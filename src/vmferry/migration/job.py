"""What `vmferry jobinfo` shows: the fields of `virsh domjobinfo`, built from
QMP's query-migrate and query-block-jobs, and kept in the source VM's state
directory (job.json) while a migration runs and after it ends."""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Optional

from vmferry.eta import Estimator, Sample


@dataclasses.dataclass
class JobInfo:
    name: str = ""
    dest_name: str = ""             # the name on the destination, if --dname renames it
    phase: str = "begin"
    status: str = "none"            # running, completed, failed, cancelled
    pid: int = 0                    # the vmferry process running the job
    started: float = 0.0            # wall clock
    elapsed_ms: int = 0
    # both parts together (eta.py): never lower than before, and an ETA that
    # never jumps up; None while unknown or while memory is not converging
    percent: float = 0.0
    eta_s: Optional[float] = None
    converging: bool = False
    # storage part (mirror jobs)
    disk_total: int = 0
    disk_processed: int = 0
    disk_remaining: int = 0
    disk_bandwidth: int = 0         # bytes/s per disk (--disk-bandwidth); 0: unlimited
    disk_rate: float = 0.0          # bytes/s, measured and smoothed
    # memory part (query-migrate ram)
    memory_total: int = 0
    memory_processed: int = 0
    memory_remaining: int = 0
    memory_bandwidth: float = 0.0   # bytes/s, QEMU's figure for its last iteration
    memory_rate: float = 0.0        # bytes/s, measured and smoothed as disk_rate
    dirty_rate: int = 0             # pages/s
    iteration: int = 0
    expected_downtime_ms: int = 0
    downtime_ms: Optional[int] = None
    downtime_limit_ms: int = 0
    setup_ms: Optional[int] = None
    memory_ms: Optional[int] = None   # QEMU's total-time of the memory migration
    postcopy: bool = False
    storage_engine: str = "mirror"
    storage_passes: int = 0         # native engine: copy passes, the final one included
    final_pass_ms: Optional[int] = None   # native engine: the paused last pass
    final_pass_bytes: int = 0
    # native engine: bytes moved on each kind of the engine's lanes
    # ({"zero-copy": N, "libnbd": M}), and why not zero-copy, when not
    storage_lanes: dict = dataclasses.field(default_factory=dict)
    storage_lanes_note: str = ""
    # where the data went: the destination's NBD server and migration stream
    destination: str = ""
    disks_address: str = ""
    migrate_uri: str = ""
    tls: bool = False
    warnings: list = dataclasses.field(default_factory=list)
    action: str = ""                # e.g. "downtime raised to 600 ms", "suspended on timeout"
    error: str = ""

    @property
    def data_total(self) -> int:
        return self.disk_total + self.memory_total

    @property
    def data_processed(self) -> int:
        return self.disk_processed + self.memory_processed

    @property
    def data_remaining(self) -> int:
        return self.disk_remaining + self.memory_remaining

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(data_total=self.data_total, data_processed=self.data_processed,
                 data_remaining=self.data_remaining)
        return d

    def save(self, path: Path) -> None:
        """Written atomically so a concurrent jobinfo never reads half a file."""
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.as_dict(), indent=1))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "JobInfo":
        raw = json.loads(path.read_text())
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in fields})

    def update_memory(self, info: dict[str, Any]) -> None:
        """From a query-migrate reply."""
        ram = info.get("ram") or {}
        if ram:
            self.memory_total = ram.get("total", self.memory_total)
            self.memory_processed = ram.get("transferred", self.memory_processed)
            self.memory_remaining = ram.get("remaining", self.memory_remaining)
            self.memory_bandwidth = ram.get("mbps", 0.0) * 1e6 / 8
            self.dirty_rate = ram.get("dirty-pages-rate", self.dirty_rate)
            self.iteration = ram.get("dirty-sync-count", self.iteration)
        if "expected-downtime" in info:
            self.expected_downtime_ms = info["expected-downtime"]
        if "downtime" in info:
            self.downtime_ms = info["downtime"]
        if "setup-time" in info:
            self.setup_ms = info["setup-time"]
        if "total-time" in info:
            self.memory_ms = info["total-time"]

    def update_disks(self, jobs: list[dict[str, Any]], prefix: str) -> None:
        """From a query-block-jobs reply; only our own mirror jobs count."""
        mine = [j for j in jobs if str(j.get("device", "")).startswith(prefix)]
        if not mine:
            return
        total = sum(j.get("len", 0) for j in mine)
        done = sum(j.get("offset", 0) for j in mine)
        self.disk_total = max(self.disk_total, total)
        self.disk_processed = max(self.disk_processed, done)
        self.disk_remaining = max(0, total - done)

    def tick(self) -> None:
        if self.started:
            self.elapsed_ms = int((time.time() - self.started) * 1000)

    def estimate(self, est: Estimator) -> None:
        """Percent, ETA and rates from the counters as they are now, on the
        clock of elapsed_ms (tick first), so whoever reads the record can hold
        the ETA against it.  Only the process running the job estimates:
        the record carries the result to everyone else."""
        e = est.update(self.elapsed_ms / 1000, Sample(
            storage_done=self.disk_processed, storage_left=self.disk_remaining,
            memory_done=self.memory_processed, memory_left=self.memory_remaining,
            memory_started=self.memory_total > 0, memory_iteration=self.iteration,
            finished=self.status == "completed"))
        self.percent = e.percent
        self.disk_rate = round(e.storage_rate)
        self.memory_rate = round(e.memory_rate)
        # a job that failed or was cancelled has no time left to count down
        ends = self.status in ("running", "completed")
        self.eta_s = e.eta_s if ends else None
        self.converging = e.converging and ends
