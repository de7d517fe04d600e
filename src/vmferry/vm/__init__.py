"""QEMU VMs: specs (spec), command lines (qemu), the state directory (state),
processes (process) and QMP sessions (qmp).  The names most callers need are
re-exported here."""
import importlib
from typing import Any

# Re-exported lazily: importing vmferry.vm.state (the CLI does, for every
# command) must not drag in asyncio and qemu.qmp through process and qmp.
_WHERE = {
    **dict.fromkeys(("StopResult", "VMProcess", "VMStartError", "VMStatus", "all_statuses",
                     "start_vm", "start_vm_async", "stop_vm", "stop_vm_async", "stop_all", "vm_status",
                     "vm_status_async"), "process"),
    **dict.fromkeys(("DiskNames", "detect_accel", "disk_names", "qemu_argv",
                     "resolve_machine"), "qemu"),
    **dict.fromkeys(("QMPCommandError", "QMPSession", "qmp_call", "qmp_session",
                     "run_sync"), "qmp"),
    **dict.fromkeys(("DiskSpec", "NicSpec", "VMSpec", "load_spec", "parse_spec"), "spec"),
    **dict.fromkeys(("StateDir", "VMRecord", "default_state_dir"), "state"),
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"vmferry.vm.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'vmferry.vm' has no attribute {name!r}")


__all__ = [
    "VMSpec", "DiskSpec", "NicSpec", "load_spec", "parse_spec",
    "qemu_argv", "detect_accel", "resolve_machine", "disk_names", "DiskNames",
    "StateDir", "VMRecord", "default_state_dir",
    "start_vm", "start_vm_async", "stop_vm", "stop_vm_async", "stop_all", "vm_status",
    "vm_status_async", "all_statuses", "VMProcess", "VMStatus", "StopResult",
    "VMStartError",
    "qmp_session", "qmp_call", "run_sync", "QMPSession", "QMPCommandError",
]
