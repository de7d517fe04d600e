"""QEMU VMs: specs (spec), command lines (qemu), the state directory (state),
processes (process) and QMP sessions (qmp).  The names most callers need are
re-exported here."""
from vmferry.vm.process import (
    StopResult, VMProcess, VMStartError, VMStatus, all_statuses, start_vm, start_vm_async,
    stop_vm, stop_vm_async, vm_status, vm_status_async,
)
from vmferry.vm.qemu import DiskNames, detect_accel, disk_names, qemu_argv, resolve_machine
from vmferry.vm.qmp import QMPCommandError, QMPSession, qmp_call, qmp_session, run_sync
from vmferry.vm.spec import DiskSpec, NicSpec, VMSpec, load_spec, parse_spec
from vmferry.vm.state import StateDir, VMRecord, default_state_dir

__all__ = [
    "VMSpec", "DiskSpec", "NicSpec", "load_spec", "parse_spec",
    "qemu_argv", "detect_accel", "resolve_machine", "disk_names", "DiskNames",
    "StateDir", "VMRecord", "default_state_dir",
    "start_vm", "start_vm_async", "stop_vm", "stop_vm_async", "vm_status",
    "vm_status_async", "all_statuses", "VMProcess", "VMStatus", "StopResult",
    "VMStartError",
    "qmp_session", "qmp_call", "run_sync", "QMPSession", "QMPCommandError",
]
