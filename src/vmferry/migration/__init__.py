"""Live migration: libvirt's migration protocol v3 between two QEMU processes.

    Begin (source) -> Prepare (destination) -> Perform (source)
                   -> Finish (destination) -> Confirm (source)

flow.py runs the phases as a state machine with each phase's rollback
beside it; source.py holds what is done to the source QEMU, destination.py
the interface a destination implements (local.py: another state directory
on this host).  options.py has every knob, stats.py what jobinfo shows.
"""
from vmferry.migration.options import MigrateOptions
from vmferry.migration.stats import JobInfo

__all__ = ["MigrateOptions", "JobInfo"]
# api.py (migrate_vm, migrate_vm_async) is imported by vmferry/__init__.py
# lazily, so that `import vmferry` stays cheap for copy-only users.
