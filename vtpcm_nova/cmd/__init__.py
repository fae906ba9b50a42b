"""Entry points. Importing this package selects native threads before any
entry point imports oslo.messaging (``vtpcm_common.concurrency``)."""

from vtpcm_common import concurrency

concurrency.use_native_threads()
