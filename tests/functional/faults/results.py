"""The fault matrix's outcomes, kept in a JSON file that
``tools/faults-table.py`` turns into ``doc/source/faults.rst``.

Each run updates the cells it ran and keeps the others, so a run of a few
cells (``-k``) does not erase the rest of the table."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

RESULTS = Path(os.environ.get("VTPCM_FAULTS_RESULTS",
                              Path(__file__).with_name("results.json")))
SURVIVED = "survived"
OPERATOR = "operator"
LOST = "lost"
_LOCK = threading.Lock()


def record(cell: str, outcome: str, detail: str, seconds: float) -> None:
    """Write one cell's outcome (``survived``, ``operator`` by design, ``lost``)."""
    assert outcome in (SURVIVED, OPERATOR, LOST), outcome
    with _LOCK:
        data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        data[cell] = {"outcome": outcome, "detail": detail, "seconds": round(seconds, 1)}
        RESULTS.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
