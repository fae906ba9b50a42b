"""Outcomes of the fault cells only the lab shows (issue 10 point 4: real
QEMU), kept in ``lab_cells.json`` next to this file, which
``tools/faults-table.py`` adds to ``doc/source/faults.rst`` as its own
section. Same format as the QEMU-less matrix's ``results.json``
(``tests/functional/faults/results.py``); each run updates the cells it
ran and keeps the others."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

RESULTS = Path(os.environ.get("VTPCM_LAB_CELLS_RESULTS",
                              Path(__file__).with_name("lab_cells.json")))
OUTCOMES = ("survived", "operator", "lost")


class LabCell:
    """One cell of one test: ``begin`` at the fault, ``converged`` once the
    migration is final (the seconds recorded), ``end`` when every check
    passed. A test that never reaches ``end`` is recorded lost."""

    def __init__(self) -> None:
        self.cell: str | None = None
        self.outcome = "lost"
        self.detail = "the test failed before its checks ended (see its log)"
        self._start = 0.0
        self.seconds = 0.0

    def begin(self, cell: str) -> None:
        assert cell.count("/") == 2, cell
        self.cell = cell
        self._start = time.monotonic()

    def converged(self) -> None:
        self.seconds = time.monotonic() - self._start

    def end(self, outcome: str, detail: str) -> None:
        assert outcome in OUTCOMES, outcome
        self.outcome, self.detail = outcome, detail

    def record(self) -> None:
        if self.cell is None:
            return
        data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        data[self.cell] = {"outcome": self.outcome, "detail": self.detail,
                           "seconds": round(self.seconds, 1)}
        RESULTS.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
