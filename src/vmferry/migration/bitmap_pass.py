"""A dirty-bitmap pass, the one way both the native engine (native.py) and
presync (presync.py) make it, on the source QEMU:

  freeze      in one transaction per pass, what a live bitmap recorded so far
              becomes the disabled bitmap FROZEN and the live one records on,
              cleared (so a write during the pass lands in the next one)
  export      the node is exported read-only with FROZEN, which QEMU publishes
              only for a disabled bitmap: the engine reads its extents as NBD
              block status (qemu:dirty-bitmap:FROZEN)
  give back   a pass that fails merges FROZEN into the live bitmap again: no
              write it had recorded is forgotten
  drop        FROZEN goes at the end of every pass, copied or given back

Every export and frozen bitmap is named here, so cleanup and `vmferry recover`
find them by these names.

A pass over a raw image reads its file on this host (read_file), not
through the source QEMU: that saves QEMU a read and a socket copy per byte
(its NBD server is one main-loop thread).  Only the dirty bitmap comes from
QEMU's export, as block status.  Reading around QEMU is safe because the
bitmap, not the read, guarantees consistency: a bitmap records before its
pass reads, so a block the guest writes during the read is dirty in the next
one and copied again.
"""
from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any, Iterable, Optional

from vmferry.migration import testhooks
from vmferry.migration.monitor import Monitor

FROZEN = "vmferry-frozen"
EXPORT = "vmferry-src-"
# what versions before this one named them (recover undoes their leftovers)
OLD_NAMES = {"frozen": ("vmferry-presync-frozen",), "export": ("vmferry-presync-",)}


def read_file(path: str, fmt: str, size: int) -> bool:
    """Whether a pass reads the image at PATH from its file (above).  Not a
    file this process may not read (of a QEMU running as another user), nor
    one whose size is not a multiple of 512, which QEMU rounds up: its export
    is then not the file's size; VMFERRY_NATIVE_TUNING=direct=0 reads every
    image through QEMU, as qcow2 always is."""
    return (fmt == "raw" and testhooks.native_tuning().get("direct", 1) != 0
            and os.path.isfile(path) and os.access(path, os.R_OK)
            and os.path.getsize(path) == size)


def export_uri(node: str, socket: Path | str) -> str:
    """NODE's export, on the source QEMU's NBD server at SOCKET."""
    return f"nbd+unix:///{EXPORT}{node}?socket={socket}"


async def freeze(mon: Monitor, nodes: Iterable[str], bitmap: str) -> None:
    """FROZEN := BITMAP, BITMAP cleared, for every node at one instant."""
    actions: list[dict[str, Any]] = []
    for node in nodes:
        actions += [
            {"type": "block-dirty-bitmap-disable", "data": {"node": node, "name": bitmap}},
            {"type": "block-dirty-bitmap-add", "data": {"node": node, "name": FROZEN,
                                                         "disabled": True}},
            {"type": "block-dirty-bitmap-merge", "data": {"node": node, "target": FROZEN,
                                                           "bitmaps": [bitmap]}},
            {"type": "block-dirty-bitmap-clear", "data": {"node": node, "name": bitmap}},
            {"type": "block-dirty-bitmap-enable", "data": {"node": node, "name": bitmap}},
        ]
    await mon.cmd("transaction", actions=actions)


async def export(mon: Monitor, node: str, bitmap: Optional[str]) -> None:
    """NODE exported read-only (with BITMAP's extents, when given)."""
    args: dict[str, Any] = {"type": "nbd", "id": EXPORT + node, "node-name": node,
                            "name": EXPORT + node, "writable": False}
    if bitmap:
        args["bitmaps"] = [bitmap]
    await mon.cmd("block-export-add", **args)


async def unexport(mon: Monitor, node: str, wait: bool = True) -> None:
    """block-export-del returns before the export is gone: WAIT for it, so that
    the next pass can use the id again (the last pass need not)."""
    await mon.try_cmd("block-export-del", id=EXPORT + node, mode="hard")
    if not wait:
        return
    for _ in range(500):
        exports = await mon.try_cmd("query-block-exports") or []
        if not any(e["id"] == EXPORT + node for e in exports):
            return
        await asyncio.sleep(0.002)


async def give_back(mon: Monitor, node: str, bitmap: str) -> None:
    """A pass that did not finish: what FROZEN held is dirty again."""
    await mon.try_cmd("block-dirty-bitmap-merge", node=node, target=bitmap, bitmaps=[FROZEN])


async def drop(mon: Monitor, node: str) -> None:
    await mon.try_cmd("block-dirty-bitmap-remove", node=node, name=FROZEN)


async def unexport_all(mon: Monitor) -> None:
    """Every export a pass made (cleanup after a failure, recover)."""
    prefixes = (EXPORT, *OLD_NAMES["export"])
    for e in await mon.try_cmd("query-block-exports") or []:
        if e["id"].startswith(prefixes):
            await mon.try_cmd("block-export-del", id=e["id"], mode="hard")
