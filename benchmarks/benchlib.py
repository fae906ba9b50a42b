"""Shared helpers of the benchmarks: statistics, machine description, JSON and
plot output. No project imports, so any venv can use it; matplotlib is
imported only by ``plot_*`` callers (``tools/bench.sh`` installs it).

Results go to ``benchmarks/results/<name>.json`` (+ ``.png``); ``--smoke``
runs write to ``benchmarks/results/smoke/`` (git-ignored) instead, so a
smoke run never overwrites the committed full results.
"""

import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
SMOKE_RESULTS = RESULTS / "smoke"


def out_dir(smoke: bool, override: str | None = None) -> Path:
    """Where a run writes: ``--out-dir`` if given, else results/ or results/smoke/."""
    path = Path(override) if override else (SMOKE_RESULTS if smoke else RESULTS)
    path.mkdir(parents=True, exist_ok=True)
    return path


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1), the way attestation_rtt.py does it."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summary(values: Sequence[float]) -> dict[str, float]:
    """median, p95, min, max, mean of a non-empty sample."""
    vals = list(values)
    return {"n": len(vals), "median": statistics.median(vals), "p95": percentile(vals, 0.95),
            "min": min(vals), "max": max(vals), "mean": statistics.fmean(vals)}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True,
                              text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def git_modified() -> list[str]:
    """Tracked files that differ from HEAD: the code measured is HEAD plus these
    (read-only git call)."""
    return sorted(line[3:] for line in _git("status", "--porcelain",
                                            "--untracked-files=no").splitlines()
                  if len(line) > 3)


def git_head() -> str | None:
    """The commit the run measured, "+dirty" if tracked files differ from it."""
    head = _git("rev-parse", "--short", "HEAD").strip() or None
    if head and git_modified():
        head += "+dirty"
    return head


def machine() -> dict[str, Any]:
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_start": list(os.getloadavg()),
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git_head": git_head(),
        "git_modified": git_modified(),
    }


def write_json(path: Path, result: dict[str, Any], quiet: bool = False,
               rewrite: bool = False) -> None:
    """Write atomically (a reader never sees half a file). ``rewrite``: an
    earlier run's file read again (its load average at the end is kept)."""
    result.setdefault("machine", machine())
    if not (rewrite and "loadavg_end" in result["machine"]):
        result["machine"]["loadavg_end"] = list(os.getloadavg())
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    if not quiet:
        progress("wrote %s" % path)


def progress(text: str) -> None:
    """To the process's real stderr: Nova's test fixtures swap sys.stderr for a
    capture buffer while a test runs (run pytest with -s to see these lines)."""
    stream = sys.__stderr__ or sys.stderr
    print("[bench %s] %s" % (time.strftime("%H:%M:%S"), text), file=stream, flush=True)


def stop_left_swtpms(work: Path) -> list[int]:
    """The vTPCMs' swtpm processes outlive their agent by design (the agent
    re-adopts them), so a run that failed before destroying its vTPCMs
    leaves them running: stop those of agents under ``work`` by the pid in
    their pid file (``<run_dir>/<instance>.pid``, or
    ``<run_dir>/vm/<instance>/swtpm.pid`` for a swtpm under its own uid),
    only if that process's command line is a swtpm's naming ``work``."""
    stopped = []
    for pid_file in [*work.glob("run-*/*.pid"), *work.glob("run-*/vm/*/swtpm.pid")]:
        try:
            pid = int(pid_file.read_text().strip())
            cmdline = Path("/proc/%d/cmdline" % pid).read_bytes()
        except (OSError, ValueError):
            continue
        if b"swtpm" in cmdline and str(work).encode() in cmdline:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            stopped.append(pid)
    return stopped


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
