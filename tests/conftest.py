"""Every test process runs native threads only, as the daemons do; and no
test skips silently (tests/skipguard.py)."""

from tests.skipguard import (  # noqa: F401  (pytest hooks)
    pytest_runtest_logreport,
    pytest_sessionfinish,
    pytest_terminal_summary,
)
from vtpcm_common import concurrency

concurrency.use_native_threads()
