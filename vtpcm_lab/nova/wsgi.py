"""WSGI entry points of nova-api and glance-api under gunicorn.

Nova's and glance's WSGI modules parse ``sys.argv`` as their own command
line: under gunicorn that is gunicorn's, which they refuse. These wrappers
hide it before importing them (config files come from the environment:
``OS_NOVA_CONFIG_FILES``, ``OS_GLANCE_CONFIG_DIR``).
"""

import importlib
import sys
from typing import Any


def _load(module: str) -> Any:
    # Importing vtpcm_lab made eventlet unimportable with a None in
    # sys.modules; Nova's own poisoning takes that for an early import.
    if "eventlet" in sys.modules and sys.modules["eventlet"] is None:
        del sys.modules["eventlet"]
    saved = sys.argv
    sys.argv = [saved[0]]
    try:
        return importlib.import_module(module).application
    finally:
        sys.argv = saved


def nova_api() -> Any:
    """gunicorn ``vtpcm_lab.nova.wsgi:nova_api()``."""
    return _load("nova.wsgi.osapi_compute")


def glance_api() -> Any:
    """gunicorn ``vtpcm_lab.nova.wsgi:glance_api()``."""
    return _load("glance.wsgi.api")
