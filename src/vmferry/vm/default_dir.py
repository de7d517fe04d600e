"""The default state directory, on its own: every CLI command needs it for
--state-dir's default, and importing vmferry.vm.state for it alone cost a
copy a third of its start-up (hashlib, tomllib, the VM spec)."""
from __future__ import annotations

import os
from pathlib import Path


def default_state_dir() -> Path:
    """$VMFERRY_STATE_DIR, else /var/lib/vmferry for root, else
    $XDG_STATE_HOME/vmferry (~/.local/state/vmferry)."""
    env = os.environ.get("VMFERRY_STATE_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/vmferry")
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base, "vmferry")
