"""pytest glue for vmferry's benchmarks (``python -m pytest bench/``).

* collects ``bench_*.py`` files (pyproject's pytest settings only know tests/);
* writes every report registered in :mod:`report` at the end of the session
  (``bench/results/<name>.{md,json,png}``) and prints its table.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_BENCH_DIR = Path(__file__).resolve().parent
if str(_BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(_BENCH_DIR))

import report  # noqa: E402  (bench/report.py)


def pytest_configure(config: pytest.Config) -> None:
    # pytest-timeout is optional; keep the marker known without it.
    config.addinivalue_line("markers", "timeout(seconds): per-test timeout (pytest-timeout)")


def pytest_collect_file(file_path: Path, parent: pytest.Collector):
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if exitstatus == pytest.ExitCode.INTERRUPTED:
        return      # keep the previous results rather than a partial run's
    for rep in report.pending_reports():
        try:
            rep.write()
        except Exception as e:  # pragma: no cover - report must not mask results
            print(f"bench: writing report {rep.name!r} failed: {e!r}", file=sys.stderr)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    for rep in report.pending_reports():
        tr = terminalreporter
        tr.write_sep("=", rep.title)
        if exitstatus == pytest.ExitCode.INTERRUPTED:
            rep.prepare()
            tr.write_line(f"(session interrupted: results NOT written to {rep.out_dir})")
        for line in rep.render_text().splitlines():
            tr.write_line(line)
        for p in rep.written:
            tr.write_line(f"wrote {p}")
