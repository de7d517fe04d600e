"""What `migrate --progress=bar` draws, fed job records as a migration publishes
them: one line redrawn in place for storage and memory together, with the ETA or
"converging…", that neither jumps in width nor ends short of 100%."""
from __future__ import annotations

from vmferry.commands.migrate import MigrationDisplay
from vmferry.migration.job import JobInfo

MiB = 1 << 20


def records() -> list[JobInfo]:
    common = dict(name="web1", status="running", phase="perform")
    return [
        JobInfo(**{**common, "phase": "prepare"}),
        JobInfo(**common, percent=10.0, eta_s=None, disk_processed=8 * MiB,
                disk_remaining=56 * MiB),
        JobInfo(**common, percent=30.0, eta_s=5.0, disk_processed=64 * MiB, disk_rate=60 * MiB),
        JobInfo(**common, percent=60.0, eta_s=2.5, memory_total=128 * MiB,
                memory_remaining=40 * MiB, memory_rate=100 * MiB),
        JobInfo(**common, percent=99.5, eta_s=None, converging=True, memory_total=128 * MiB,
                memory_remaining=30 * MiB, memory_rate=100 * MiB),
        JobInfo(name="web1", status="completed", phase="done", percent=100.0, eta_s=0.0,
                memory_total=128 * MiB),
    ]


def test_one_bar_for_storage_and_memory(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "90")
    display = MigrationDisplay("bar")
    display.bar.min_interval = 0          # every record drawn, not one per 0.1 s
    for info in records():
        display(info)
    display.close()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n"), f"more than one bar: {err!r}"
    frames = [f for f in err.rstrip("\n").split("\r") if f]
    assert [f.split()[0] for f in frames] == ["storage", "storage", "memory", "memory", "done"]
    assert len({len(f) for f in frames}) == 1, "the bar changed width:\n" + "\n".join(frames)
    assert "ETA --:--" in frames[0] and "ETA 0:05" in frames[1] and "ETA 0:03" in frames[2]
    assert "converging…" in frames[3] and "ETA" not in frames[3]
    assert "100.0%" in frames[-1] and "." not in frames[-1].split("[")[1].split("]")[0]
