"""The agent's reaper: a small process of its own that waits for the agent
to exit and then undoes every incoming migration the agent left unfinished
(incoming.json in a VM's folder names what was created) and removes the
images of every presync it left unfinished (STATE/presync-PID-N.json).

An agent that is asked to stop cleans up by itself; the reaper is for the
one that cannot: killed with SIGKILL, or out of memory.  It runs in its own
session with no descriptor of the agent's, so it neither dies with the
agent's process group nor keeps an ssh channel open.
"""
from __future__ import annotations

import os
import select
import subprocess
import sys


def spawn(state_dir: str, roots: list[str]) -> subprocess.Popen:
    """ROOTS: the agent's storage roots, the only places it removes images from."""
    return subprocess.Popen([sys.executable, "-m", "vmferry.agent.reaper", str(os.getpid()),
                             state_dir, *roots],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, close_fds=True,
                            start_new_session=True)


def main(argv: list[str]) -> int:
    pid, state_dir, roots = int(argv[0]), argv[1], argv[2:]
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        pass                    # already gone: reap right away
    else:
        select.select([fd], [], [])
        os.close(fd)
    # imported only now: until the agent dies this process should cost nothing
    # (it starts beside the agent, which is busy answering its first requests)
    import asyncio
    from vmferry.migration.desthost import presync_target
    from vmferry.migration.desthost.incoming import reap_orphans
    from vmferry.vm.state import StateDir
    # each on its own: one that fails must not keep the other from its work
    try:
        asyncio.run(reap_orphans(StateDir(state_dir), roots, owner=pid))
    finally:
        presync_target.reap_orphans(StateDir(state_dir).path, roots, owner=pid)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
