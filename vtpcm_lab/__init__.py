"""A local two-host libvirt lab on one machine, for the demo and the e2e tests.

Two libvirt session daemons under two system users play two compute hosts;
a small busybox + tpm2-tools guest proves over its serial console that its
TPM survives a live migration. The lab never starts swtpm itself: callers
hand it the control-socket path of the swtpm they run on each host.
"""

import os
from pathlib import Path

from vtpcm_common import concurrency

# The lab drives the daemons' RPC clients in-process: native threads, as they run.
concurrency.use_native_threads()

DEFAULT_LAB_DIR = "/var/tmp/vtpcm-lab"


def lab_dir() -> Path:
    """Base directory of the lab's generated files.

    Short on purpose (unix socket paths are limited to 107 bytes) and outside
    any home or /root, so the two lab users can traverse it.
    """
    return Path(os.environ.get("VTPCM_LAB_DIR", DEFAULT_LAB_DIR))


def ensure_dir(path: Path, mode: int = 0o755) -> Path:
    """Create ``path`` (and parents) and force ``mode`` so lab users can traverse it."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, mode)
    return path
