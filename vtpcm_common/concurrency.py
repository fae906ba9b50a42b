"""Native threads only: select oslo.service's threading backend, keep eventlet out.

oslo.messaging imports oslo.service, whose default backend is eventlet
(deprecated upstream, and unimportable in nova-compute's native-thread mode);
futurist and oslo.utils also import eventlet whenever it is installed, just
to detect green threads. Our daemons, CLI and lab run native threads only, so
each entry point calls ``use_native_threads()`` before anything imports
oslo.messaging, as Nova 34 does in ``nova/monkey_patch.py``. The Nova driver
does not call it: inside nova-compute, Nova has already chosen.
"""

import sys

EVENTLET = "eventlet"


def use_native_threads() -> None:
    """Make eventlet unimportable (unless something already imported it) and
    select oslo.service's threading backend. Idempotent; raises
    ``BackendAlreadySelected`` if the eventlet backend was chosen before."""
    if EVENTLET not in sys.modules:
        # None in sys.modules makes ``import eventlet`` raise ImportError, so
        # the libraries' optional imports take their no-eventlet path.
        sys.modules[EVENTLET] = None  # type: ignore[assignment]
    from oslo_service import backend

    backend.init_backend(backend.BackendType.THREADING)


def eventlet_loaded() -> bool:
    """True if a real eventlet module is imported in this process."""
    return sys.modules.get(EVENTLET) is not None
