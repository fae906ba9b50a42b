"""The fault-injection matrix (issue 10, point 4): every daemon and swtpm,
killed at every step of a migration (``matrix.run_cell``)."""

import pytest

from tests.functional.faults.deployment import Deployment
from tests.functional.faults.matrix import CELLS, run_cell

pytestmark = pytest.mark.functional


@pytest.mark.parametrize(("part", "step", "mode"), CELLS,
                         ids=["%s-%s-%s" % c for c in CELLS])
def test_fault(deployment: Deployment, part: str, step: str, mode: str) -> None:
    run_cell(deployment, part, step, mode)
