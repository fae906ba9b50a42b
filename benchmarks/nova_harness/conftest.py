"""Nova 34's functional harness for the benchmarks: the same process setup as
``tests/nova_functional`` (native threads, ``OS_NOVA_DISABLE_EVENTLET_PATCHING``,
the pytest/Nova ``_clear_attrs`` workaround), by running that conftest's code.

Run from the repository root, Nova venv only::

    .venv-nova/bin/python -m pytest -q -p no:cacheprovider benchmarks/nova_harness

(``tools/bench.sh nova-lm`` does that). ``bench_*.py`` files are collected here
(pytest's default pattern is ``test_*.py``, so no test run ever picks them up
by accident). Where Nova is not installed this directory collects nothing.
"""

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import pytest

_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parents[1]

if importlib.util.find_spec("nova") is None:
    collect_ignore_glob = ["*.py"]
else:
    for path in (str(_ROOT), str(_HERE.parent)):  # tests.*, vtpcm_*; benchlib
        if path not in sys.path:
            sys.path.insert(0, path)
    # what tests/conftest.py does for every test process ...
    from vtpcm_common import concurrency

    concurrency.use_native_threads()
    # ... then tests/nova_functional/conftest.py, executed as it is (it removes
    # the eventlet placeholder, lets Nova poison eventlet, and patches
    # nova.test.TestCase._clear_attrs for pytest)
    importlib.import_module("tests.nova_functional.conftest")
    # Production log level: no DEBUG capture (the tests keep DEBUG for their leak
    # scan; here it would only add formatting cost to both arms).
    os.environ["OS_DEBUG"] = os.environ.get("VTPCM_BENCH_OS_DEBUG", "0")

    def pytest_collect_file(file_path: Path, parent: Any) -> Any:
        if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
            return pytest.Module.from_parent(parent, path=file_path)
        return None

    _EXIT: list[int] = []

    def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
        _EXIT.append(int(exitstatus))

    @pytest.hookimpl(trylast=True)
    def pytest_unconfigure(config: Any) -> None:
        """Leave at once: the interpreter's own finalization of everything Nova's
        harness loaded takes seconds here (no thread left running, only
        teardown in C), which is most of what a smoke run can save. Results
        and the deployment's teardown are done by now."""
        if _EXIT and os.environ.get("VTPCM_BENCH_FAST_EXIT", "1") == "1":
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(_EXIT[-1])
