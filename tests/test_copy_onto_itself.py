"""`vmferry copy` refuses a destination that is its source under another name —
the same path, a symlink, a hard link, or one export of one Unix socket — with
one line and exit 2, and leaves the data as it was (it used to report a copy)."""
from __future__ import annotations

import os

import pytest

from cli import assert_cli_error, run_vmferry
from disk_data import make_image


@pytest.mark.parametrize("how", ["same-path", "symlink", "hard-link", "relative-path"])
def test_copy_of_a_file_onto_itself_is_refused(workdir, how):
    src = make_image(workdir / "src.raw", 1 << 20, "random")
    before = src.read_bytes()
    dst = {"same-path": src, "symlink": workdir / "link.raw",
           "hard-link": workdir / "hard.raw", "relative-path": "src.raw"}[how]
    if how == "symlink":
        dst.symlink_to(src)
    elif how == "hard-link":
        os.link(src, dst)
    cp = run_vmferry("copy", src, dst, cwd=workdir)
    line = assert_cli_error(cp, 2)
    assert "are the same file" in line, line
    assert src.read_bytes() == before


def test_copy_of_an_export_onto_itself_is_refused(workdir, qemu_nbd):
    srv = qemu_nbd(make_image(workdir / "src.raw", 1 << 20, "random"))
    line = assert_cli_error(run_vmferry("copy", srv.uri, srv.uri), 2)
    assert "are the same export" in line, line
