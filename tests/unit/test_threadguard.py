"""A thread a test left behind does not keep the finished run alive: named
with its stack, the run ends with its own status; a run whose threads all
end (or idle in an executor) ends as usual (the controls)."""

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parents[2]

_STUCK = """import threading, time

def stuck_in_a_call():
    time.sleep(300)

def test_leaves_a_thread():
    threading.Thread(target=stuck_in_a_call, name="left-behind").start()
"""


def _run(tmp_path: Path, body: str) -> tuple[subprocess.CompletedProcess[str], float]:
    (tmp_path / "test_sample.py").write_text(body)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.threadguard", "-p", "no:cacheprovider",
         "-q", "--rootdir", str(tmp_path), str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=120, check=False)
    return done, time.monotonic() - started


def test_a_thread_left_running_is_named_and_does_not_hold_the_run(tmp_path: Path) -> None:
    done, took = _run(tmp_path, _STUCK)
    assert took < 60, "the run waited for the thread's 300 s"
    assert done.returncode == 0, done.stdout + done.stderr  # the tests passed
    assert "1 passed" in done.stdout
    assert "threadguard: 1 thread(s) still running" in done.stderr
    assert "--- thread 'left-behind'" in done.stderr
    assert "in stuck_in_a_call" in done.stderr  # its stack


def test_the_runs_own_failure_status_is_kept(tmp_path: Path) -> None:
    done, _ = _run(tmp_path, _STUCK + "\n\ndef test_fails():\n    assert False\n")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "threadguard: 1 thread(s)" in done.stderr


def test_a_run_whose_threads_end_or_idle_in_an_executor_ends_quietly(tmp_path: Path) -> None:
    done, took = _run(tmp_path, "import threading, time\n"
                                "from concurrent.futures import ThreadPoolExecutor\n"
                                "POOL = ThreadPoolExecutor(2)\n\n"
                                "def test_ok():\n"
                                "    threading.Thread(target=time.sleep, args=(1,)).start()\n"
                                "    assert POOL.submit(lambda: 1).result() == 1\n")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "threadguard" not in done.stderr
    assert took < 30
