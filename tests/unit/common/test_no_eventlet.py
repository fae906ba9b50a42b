"""No entry point needs eventlet, and none loads it (issue: no eventlet anywhere).

Each case runs in a fresh interpreter: the test process itself has already
chosen its backend in ``tests/conftest.py``.
"""

import subprocess
import sys

import pytest

ENTRY_POINTS = (
    "vtpcm_agent.cmd.agent",
    "vtpcm_nova.cmd.engine",
    "vtpcm_nova.cmd.manage",
    "vtpcm_lab.demo",
)

BLOCK_EVENTLET = "import sys; sys.modules['eventlet'] = None\n"
REPORT = (
    "import importlib, sys\n"
    "importlib.import_module(%r)\n"
    "import oslo_messaging\n"
    "from oslo_service import backend\n"
    "print(backend.get_backend_type().value, sys.modules.get('eventlet') is not None)\n"
)


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-W", "error::DeprecationWarning:eventlet",
                           "-c", code], capture_output=True, text=True, timeout=120,
                          check=False)


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_entry_point_imports_without_eventlet(module: str) -> None:
    out = _run(BLOCK_EVENTLET + REPORT % module)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["threading", "False"]


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_entry_point_selects_threads_and_never_loads_eventlet(module: str) -> None:
    out = _run(REPORT % module)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["threading", "False"]
    assert "EventletDeprecationWarning" not in out.stderr


def test_positive_control_plain_oslo_messaging_loads_eventlet() -> None:
    """Without our entry points' choice, oslo.messaging pulls eventlet in:
    the cases above would catch an entry point that forgot to choose."""
    out = _run("import sys, oslo_messaging\n"
               "print(sys.modules.get('eventlet') is not None)\n")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True"]
