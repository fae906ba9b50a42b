"""Every test process runs native threads only, as the daemons do."""

from vtpcm_common import concurrency

concurrency.use_native_threads()
