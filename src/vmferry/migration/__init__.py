"""Live migration: libvirt's migration protocol v3 between two QEMU processes.

    Begin (source) -> Prepare (destination) -> Perform (source)
                   -> Finish (destination) -> Confirm (source)

Which host runs what:

  on the source host (the process that migrates, or recovers)
    api.py           the entry points: migrate, dry run, recover
    flow.py          the phases as a state machine, each rollback beside its phase
    source.py        what is done to the source QEMU (describe, mirrors, rollback)
    native.py        the native storage engine's passes (the C engine copies)
    bitmap_pass.py   one dirty-bitmap pass in the source QEMU (native and presync)
    presync.py       pre-seeding, and the records that tie a copy to its bitmap
    journal.py       what a migration did, written before it takes effect
    recover.py       `vmferry recover`: an interrupted migration to one running guest
    offline.py       --offline: a stopped VM's disks and spec
    dryrun.py, probe.py   --dry-run's plan and its short probe
    local.py         a destination in another state directory of this host
    remote.py        a destination on another host, through its agent (or, for
                     migrate --direct, relayed by a management machine:
                     commands/direct.py)

  on the destination host: desthost/ (in the agent, vmferry/agent/, or in
  this process for a local:// destination)
    desthost/incoming.py        Prepare and Finish: the incoming QEMU, its images, rollback
    desthost/presync_target.py  a presync's images and the qemu-nbd serving them
    desthost/check.py           a dry run of Prepare: every check, reading only

  both
    destination.py   the interface the source talks to (Prepared: what Prepare says)
    plan.py          DiskPlan: one disk to move; file_id: which file on which host
    options.py       every knob (MigrateOptions)
    job.py           the job record jobinfo shows (JobInfo)
    spans.py         what a kept partial copy lacks
    monitor.py       a QMP connection with one-line errors
    testhooks.py     the tests' hold points and tuning knobs, unset in normal use
"""
from vmferry.migration.options import MigrateOptions
from vmferry.migration.job import JobInfo

__all__ = ["MigrateOptions", "JobInfo"]
# api.py (migrate_vm, migrate_vm_async) is imported by vmferry/__init__.py
# lazily, so that `import vmferry` stays cheap for copy-only users.
