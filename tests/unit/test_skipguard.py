"""A skip of a required part fails the run and is listed with its reason;
a run without skips passes (the control)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def _run(tmp_path: Path, body: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_sample.py").write_text(body)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.skipguard", "-p", "no:cacheprovider",
         "-q", "--rootdir", str(tmp_path), str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=120, check=False)


def test_a_skip_fails_the_run_and_says_why(tmp_path: Path) -> None:
    done = _run(tmp_path, "import pytest\n\n"
                          "def test_db():\n    pytest.skip('PostgreSQL unreachable')\n\n"
                          "def test_ok():\n    pass\n")
    assert done.returncode == 1, done.stdout
    assert "skipped tests and why" in done.stdout
    assert "test_sample.py::test_db: PostgreSQL unreachable" in done.stdout
    assert "1 skip(s) of a required part: the run FAILS" in done.stdout


def test_a_run_without_skips_passes(tmp_path: Path) -> None:
    done = _run(tmp_path, "def test_ok():\n    pass\n")
    assert done.returncode == 0, done.stdout
    assert "skipped tests and why" not in done.stdout


def test_a_mariadb_skip_fails_the_run_too(tmp_path: Path) -> None:
    done = _run(tmp_path, "import pytest\n\n"
                          "def test_maria():\n    pytest.skip('MariaDB at x unusable: no')\n")
    assert done.returncode == 1, done.stdout
    assert "test_sample.py::test_maria: MariaDB at x unusable: no" in done.stdout
    assert "1 skip(s) of a required part: the run FAILS" in done.stdout
