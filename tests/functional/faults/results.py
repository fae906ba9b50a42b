"""The fault matrix's outcomes, kept in a JSON file that
``tools/faults-table.py`` turns into ``doc/source/faults.rst``.

Each run updates the cells it ran and keeps the others, so a run of a few
cells (``-k``) does not erase the rest of the table. Each cell names the
commit it ran on (``+dirty`` if the tree had changes), so the table says
which code it speaks for."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import threading
from pathlib import Path

RESULTS = Path(os.environ.get("VTPCM_FAULTS_RESULTS",
                              Path(__file__).with_name("results.json")))
SURVIVED = "survived"
OPERATOR = "operator"
LOST = "lost"
_LOCK = threading.Lock()
ROOT = Path(__file__).resolve().parents[3]


@functools.cache
def commit() -> str:
    """The checkout's commit, ``+dirty`` with uncommitted changes; "unknown"
    outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, check=True, capture_output=True,
                               text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def record(cell: str, outcome: str, detail: str, seconds: float) -> None:
    """Write one cell's outcome (``survived``, ``operator`` by design, ``lost``)."""
    assert outcome in (SURVIVED, OPERATOR, LOST), outcome
    with _LOCK:
        data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        data[cell] = {"outcome": outcome, "detail": detail, "seconds": round(seconds, 1),
                      "commit": commit()}
        RESULTS.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
