"""What a migration moves, as both hosts see it: one DiskPlan per disk, made
by the source (source.plan_disks), sent to the destination (agent/wire.py),
which fills in where the data goes."""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

from vmferry.vm.state import boot_id


@dataclasses.dataclass
class DiskPlan:
    """One disk to move: the source's node and where its data goes."""

    node: str                 # format node name in both QEMUs, e.g. disk0
    path: str                 # source image path
    fmt: str
    size: int                 # virtual size in bytes
    dest_path: str = ""
    export: str = ""          # NBD export name on the destination
    backing: Optional[str] = None
    backing_fmt: Optional[str] = None
    source_id: Optional[str] = None   # file_id of the source image
    allocated: Optional[int] = None   # bytes the source image holds on its file system


def file_id(path: str) -> Optional[str]:
    """Which file PATH is, on which running host: two hosts never share a boot
    id, so equal ids mean the very same file (a destination image that is the
    source image itself, which a copy would destroy)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{boot_id()}:{st.st_dev}:{st.st_ino}"
