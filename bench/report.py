"""Benchmark report writer shared by vmferry's benchmarks.

A benchmark module creates (or fetches) a :class:`Report` with
:func:`get_report`, adds one record (a plain dict) per measured case/tool and
fills ``report.meta``.  ``bench/conftest.py`` writes every report that has
records at the end of the pytest session:

* ``<out_dir>/<name>.md``   - markdown: title, date, machine, configuration,
  result table, target verdicts, notes;
* ``<out_dir>/<name>.json`` - everything above, machine readable, including
  the per-round raw data kept in each record;
* ``<out_dir>/<name>.png``  - grouped bar chart(s) (matplotlib, Agg backend);
  skipped with a warning if matplotlib is not installed.

Nothing here knows about copying; the copy benchmark supplies its columns,
chart panels and a ``finalize`` callback (ratios, target verdicts).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_OUT_DIR = BENCH_DIR / "results"


def out_dir(quick: bool = False) -> Path:
    """Where a benchmark writes its results: $VMFERRY_BENCH_OUT, else
    bench/results, or for a quick (smoke) run a folder outside the tree, so
    that it never replaces a real result."""
    import tempfile
    env = os.environ.get("VMFERRY_BENCH_OUT")
    if env:
        return Path(env)
    return Path(tempfile.gettempdir()) / "vmferry-bench-quick" if quick else DEFAULT_OUT_DIR

GiB = 1 << 30
MiB = 1 << 20


# --------------------------------------------------------------------------
# Machine description
# --------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _meminfo_kib(key: str) -> int | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def tool_version(argv: Sequence[str]) -> str:
    """First line of ``argv``'s output (e.g. ``["nbdcopy", "--version"]``)."""
    if shutil.which(argv[0]) is None and not os.path.isabs(argv[0]):
        return "not installed"
    try:
        cp = subprocess.run(list(argv), stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e.__class__.__name__})"
    out = (cp.stdout or cp.stderr or "").strip().splitlines()
    if cp.returncode != 0 or not out:
        return "unknown (exit %d)" % cp.returncode
    return out[0].strip()


def machine_info(tools: dict[str, Sequence[str]] | None = None) -> dict[str, Any]:
    """nproc, CPU model, kernel, memory, python and the given tools' versions."""
    try:
        nproc = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        nproc = os.cpu_count() or 0
    mem_kib = _meminfo_kib("MemTotal")
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "nproc": nproc,
        "cpu_model": _cpu_model(),
        "kernel": platform.release(),
        "os": _os_release(),
        "mem_total_gib": round(mem_kib / (1 << 20), 1) if mem_kib else None,
        "python": sys.version.split()[0],
    }
    if tools:
        info["tools"] = {name: tool_version(argv) for name, argv in tools.items()}
    return info


def _os_release() -> str:
    try:
        with open("/etc/os-release", encoding="utf-8") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return platform.platform()


# --------------------------------------------------------------------------
# Report model
# --------------------------------------------------------------------------

Formatter = Callable[[Any], str]


def fmt_num(digits: int) -> Formatter:
    def f(v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        return f"{v:.{digits}f}"
    return f


def fmt_str(v: Any) -> str:
    return "-" if v is None else str(v)


@dataclass
class Column:
    key: str
    header: str
    fmt: Formatter = fmt_str
    align: str = "left"          # "left" or "right"


def spread_columns(median_header: str = "median total s", digits: int = 2) -> list[Column]:
    """The median, min and max of a measurement's rounds (keys median_s, min_s,
    max_s), which every benchmark's table shows."""
    return [Column("median_s", median_header, fmt_num(digits), "right"),
            Column("min_s", "min s", fmt_num(digits), "right"),
            Column("max_s", "max s", fmt_num(digits), "right")]


@dataclass
class Panel:
    """One bar-chart panel: ``value_key`` per (group, series)."""
    value_key: str
    ylabel: str
    title: str = ""
    err_low_key: str | None = None    # e.g. min of the rounds
    err_high_key: str | None = None   # e.g. max of the rounds
    hline: float | None = None        # target line (e.g. 64 MiB)
    hline_label: str | None = None
    value_fmt: str = "{:.2f}"


@dataclass
class ChartSpec:
    group_key: str                # x axis groups (e.g. case)
    series_key: str               # bars inside a group (e.g. tool)
    panels: list[Panel]
    group_label_key: str | None = None   # pretty label for the group
    series_order: list[str] | None = None


@dataclass
class Report:
    name: str
    title: str
    columns: list[Column]
    out_dir: Path = DEFAULT_OUT_DIR
    chart: ChartSpec | None = None
    # Called with the report before rendering; may add derived fields to the
    # records (ratios...) and return verdict lines (markdown bullets).
    finalize: Callable[["Report"], list[str]] | None = None
    records: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    verdicts: list[str] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)

    def add(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    # -- rendering ---------------------------------------------------------

    def prepare(self) -> None:
        if self.finalize is not None:
            self.verdicts = list(self.finalize(self) or [])

    def _cells(self) -> list[list[str]]:
        return [[c.fmt(r.get(c.key)) for c in self.columns] for r in self.records]

    def render_text(self) -> str:
        """Aligned plain-text table for the terminal."""
        headers = [c.header for c in self.columns]
        rows = self._cells()
        widths = [max([len(h)] + [len(r[i]) for r in rows])
                  for i, h in enumerate(headers)]

        def line(cells: Sequence[str]) -> str:
            out = []
            for c, w, col in zip(cells, widths, self.columns):
                out.append(c.rjust(w) if col.align == "right" else c.ljust(w))
            return "  ".join(out).rstrip()

        lines = [line(headers), "  ".join("-" * w for w in widths)]
        lines += [line(r) for r in rows]
        if self.verdicts:
            lines.append("")
            lines += [v.replace("**", "").replace("`", "") for v in self.verdicts]
        return "\n".join(lines)

    def render_markdown(self) -> str:
        m = self.meta
        mach = m.get("machine", {})
        out = [f"# {self.title}", ""]
        if "date" in m:
            out.append(f"- Date: {m['date']}")
        if mach:
            out.append(
                f"- Machine: {mach.get('nproc')} CPUs ({mach.get('cpu_model')}), "
                f"{mach.get('mem_total_gib')} GiB RAM, kernel {mach.get('kernel')}, "
                f"{mach.get('os')}, Python {mach.get('python')}")
            for tool, ver in (mach.get("tools") or {}).items():
                out.append(f"- {tool}: `{ver}`")
        for k, v in (m.get("config") or {}).items():
            out.append(f"- {k}: `{v}`" if not isinstance(v, (int, float)) else f"- {k}: {v}")
        out.append("")

        headers = [c.header for c in self.columns]
        out.append("| " + " | ".join(headers) + " |")
        out.append("|" + "|".join("---:" if c.align == "right" else "---"
                                  for c in self.columns) + "|")
        for row in self._cells():
            out.append("| " + " | ".join(x.replace("|", "\\|") for x in row) + " |")
        out.append("")
        if self.verdicts:
            out.append("## Targets")
            out.append("")
            out += self.verdicts
            out.append("")
        if self.notes:
            out.append("## Notes")
            out.append("")
            out += [n if n.startswith(("-", "*")) else f"- {n}" for n in self.notes]
            out.append("")
        if self.chart is not None and (self.out_dir / f"{self.name}.png").exists():
            out.append(f"![{self.name}]({self.name}.png)")
            out.append("")
        return "\n".join(out)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "meta": self.meta,
            "verdicts": self.verdicts,
            "notes": self.notes,
            "results": self.records,
        }

    # -- output ------------------------------------------------------------

    def write(self) -> list[Path]:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.meta.setdefault("date", _dt.datetime.now().astimezone()
                             .isoformat(timespec="seconds"))
        self.prepare()
        written: list[Path] = []
        if self.chart is not None:
            png = self.out_dir / f"{self.name}.png"
            try:
                png.unlink(missing_ok=True)   # never leave a stale chart behind
                if write_chart(png, self):
                    written.append(png)
            except Exception as e:  # never lose the tables because of a chart
                warnings.warn(f"could not write {png}: {e!r}")
        js = self.out_dir / f"{self.name}.json"
        js.write_text(json.dumps(self.to_json(), indent=2, default=_json_default) + "\n",
                      encoding="utf-8")
        written.append(js)
        md = self.out_dir / f"{self.name}.md"
        md.write_text(self.render_markdown(), encoding="utf-8")
        written.append(md)
        self.written = written
        return written


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    return repr(o)


def write_chart(path: Path, report: Report) -> bool:
    """Grouped bars, one subplot per panel.  Returns False without matplotlib."""
    spec = report.chart
    assert spec is not None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed; no chart written "
                      "(pip install matplotlib, or the 'bench' extra)")
        return False

    recs = [r for r in report.records if r.get(spec.group_key) is not None]
    groups: list[str] = []
    for r in recs:
        if r[spec.group_key] not in groups:
            groups.append(r[spec.group_key])
    series: list[str] = list(spec.series_order or [])
    for r in recs:
        if r[spec.series_key] not in series:
            series.append(r[spec.series_key])
    series = [s for s in series if any(r[spec.series_key] == s for r in recs)]
    if not groups or not series or not any(
            r.get(p.value_key) is not None for r in recs for p in spec.panels):
        return False
    labels = {}
    for r in recs:
        labels[r[spec.group_key]] = r.get(spec.group_label_key or spec.group_key,
                                          r[spec.group_key])

    npan = len(spec.panels)
    fig, axes = plt.subplots(1, npan, figsize=(max(7.0, 1.6 * len(groups) + 3) * npan * 0.75,
                                               5.2), squeeze=False)
    width = 0.8 / len(series)
    cmap = plt.get_cmap("tab10")
    for ax, panel in zip(axes[0], spec.panels):
        # series that have a value in each group, so bars are centred per group
        present = {g: [s for s in series if any(
            r[spec.group_key] == g and r[spec.series_key] == s
            and r.get(panel.value_key) is not None for r in recs)] for g in groups}
        for si, s in enumerate(series):
            xs, ys, lo, hi = [], [], [], []
            for gi, g in enumerate(groups):
                r = next((r for r in recs
                          if r[spec.group_key] == g and r[spec.series_key] == s), None)
                v = None if r is None else r.get(panel.value_key)
                if v is None:
                    continue
                pos = present[g].index(s)
                xs.append(gi - width * len(present[g]) / 2 + width * (pos + 0.5))
                ys.append(v)
                lo.append(max(0.0, v - (r.get(panel.err_low_key, v) if panel.err_low_key else v)))
                hi.append(max(0.0, (r.get(panel.err_high_key, v) if panel.err_high_key else v) - v))
            if not xs:
                continue
            yerr = [lo, hi] if (panel.err_low_key or panel.err_high_key) else None
            bars = ax.bar(xs, ys, width * 0.95, label=s, color=cmap(si % 10),
                          yerr=yerr, capsize=3 if yerr else 0)
            for b, v in zip(bars, ys):
                ax.annotate(panel.value_fmt.format(v), (b.get_x() + b.get_width() / 2,
                                                       b.get_height()),
                            ha="center", va="bottom", fontsize=7,
                            xytext=(0, 2), textcoords="offset points")
        if panel.hline is not None:
            ax.axhline(panel.hline, color="red", linestyle="--", linewidth=1,
                       label=panel.hline_label)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([_wrap(str(labels[g])) for g in groups], fontsize=8)
        ax.set_ylabel(panel.ylabel)
        if panel.title:
            ax.set_title(panel.title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(report.title + (f"  ({report.meta.get('date', '')[:10]})"
                                 if report.meta.get("date") else ""), fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _wrap(s: str, width: int = 18) -> str:
    words, lines, cur = s.split(), [], ""
    for w in words:
        if cur and len(cur) + 1 + len(w) > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    if cur:
        lines.append(cur)
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Registry used by bench/conftest.py
# --------------------------------------------------------------------------

REPORTS: dict[str, Report] = {}


def get_report(name: str, factory: Callable[[], Report]) -> Report:
    """The session's report called ``name``, created by ``factory`` once."""
    if name not in REPORTS:
        REPORTS[name] = factory()
    return REPORTS[name]


def pending_reports() -> Iterable[Report]:
    return [r for r in REPORTS.values() if r.records]
