"""tools/faults-table.py writes the docs table only from results that say
which checked-in code they ran on (review of issue 10)."""

import importlib.util
import json
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "faults_table", Path(__file__).parents[2] / "tools" / "faults-table.py")
assert _SPEC is not None and _SPEC.loader is not None
table = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(table)

SHA = "6fb73a2921a199ab3c9e976f5fda67fd14cca9fc"


@pytest.fixture(autouse=True)
def _no_lab_cells(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tool also reads tests/e2e/lab_cells.json, which a lab run of the
    same suite rewrites (a failed lab cell there made these tests fail):
    each test here gets its own, absent, lab file."""
    monkeypatch.setattr(table, "LAB_CELLS", tmp_path / "lab_cells.json")


def _results(last_commit: object) -> dict[str, dict[str, object]]:
    cells = sorted(table.CELL_NAMES)
    results: dict[str, dict[str, object]] = {
        c: {"outcome": "survived", "detail": "ABORTED", "seconds": 1.0, "commit": SHA}
        for c in cells}
    results[cells[-1]]["commit"] = last_commit
    return results


def _run(tmp_path: Path, results: dict[str, dict[str, object]],
         *flags: str) -> tuple[int, Path]:
    src, dst = tmp_path / "results.json", tmp_path / "faults.rst"
    src.write_text(json.dumps(results))
    return table.main(["faults-table.py", *flags, str(src), str(dst)]), dst


@pytest.mark.parametrize("commit", ["unknown", "", None, "6fb73a2", "main"])
def test_a_cell_of_no_recorded_commit_is_refused_and_nothing_written(
        tmp_path: Path, commit: object) -> None:
    status, dst = _run(tmp_path, _results(commit))
    assert status == 2 and not dst.exists()
    assert "no commit recorded for" in table.check(_results(commit))


def test_a_dirty_cell_is_refused_unless_asked_for_a_trial_table(tmp_path: Path) -> None:
    dirty = _results(SHA + "+dirty")
    assert "uncommitted changes" in table.check(dirty)
    status, dst = _run(tmp_path, dirty)
    assert status == 2 and not dst.exists()
    status, dst = _run(tmp_path, dirty, "--allow-dirty")
    assert status == 0 and "%s+dirty" % SHA in dst.read_text()


def test_results_of_one_clean_commit_make_the_table(tmp_path: Path) -> None:
    status, dst = _run(tmp_path, _results(SHA))
    assert status == 0 and "Run on commit ``%s``." % SHA in dst.read_text()
