"""Nova 34.0.0's own functional harness under pytest, native threads only.

Runs only in the Nova venv (``tools/install-nova-env.sh`` builds ``.venv-nova``):
``.venv-nova/bin/python -m pytest -q tests/nova_functional``. Where Nova is not
installed (the main ``.venv``) this directory collects nothing, although the
main suite should pass ``--ignore=tests/nova_functional`` anyway.

Native threads, not eventlet:
- nova-compute runs native threads in Nova 34 and our driver code must never
  import eventlet; Nova's harness supports that mode when
  ``OS_NOVA_DISABLE_EVENTLET_PATCHING=1`` (``nova/monkey_patch.py``): it then
  selects oslo.service's threading backend and installs an import hook that
  makes any later ``import eventlet`` raise ImportError, so these tests also
  prove that nothing on the driver's import path needs eventlet.
- ``tests/conftest.py`` (loaded first, being a parent) already chose native
  threads the vtpcm way: it put ``sys.modules['eventlet'] = None``. Nova's
  ``poison_eventlet()`` treats *any* ``'eventlet'`` key in ``sys.modules`` as
  "eventlet was imported too early" and raises RuntimeError, so that
  placeholder is removed here before Nova installs its own poison.
- ``nova.tests.functional`` (whose ``__init__`` calls
  ``nova.monkey_patch.patch()``) must be imported before ``nova.test``:
  ``nova.test`` imports modules that pull in eventlet-aware libraries first.
  Both go through ``importlib.import_module`` so that an import sorter
  (ruff's isort rule, ``ruff check --fix``) cannot swap them.
"""

import importlib
import importlib.util
import os
import sys
from typing import Any

if importlib.util.find_spec("nova") is None:
    # Not the Nova venv: collect nothing here, import nothing.
    collect_ignore_glob = ["*.py"]
else:
    os.environ["OS_NOVA_DISABLE_EVENTLET_PATCHING"] = "1"
    # Nova's log capture keeps DEBUG lines: the leak scan reads them.
    os.environ["OS_DEBUG"] = "1"
    if "eventlet" in sys.modules and sys.modules["eventlet"] is None:
        del sys.modules["eventlet"]  # tests/conftest.py's placeholder, see above

    # Order matters, and import_module() keeps import sorters from swapping them.
    importlib.import_module("nova.tests.functional")  # runs nova.monkey_patch.patch()
    nova_test = importlib.import_module("nova.test")

    # pytest's unittest runner sets the test method as an instance attribute
    # before running a TestCase and deletes it afterwards (pytest >= 8.x,
    # _pytest/unittest.py TestCaseFunction.runtest); nova.test.TestCase's
    # cleanup _clear_attrs() deletes every public instance attribute first,
    # so every test then fails with AttributeError on that delattr. Keep the
    # test method's attribute.
    _nova_clear_attrs = nova_test.TestCase._clear_attrs

    def _clear_attrs_keeping_test_method(self: Any) -> None:
        name = self._testMethodName
        saved = self.__dict__.get(name)
        _nova_clear_attrs(self)
        if saved is not None:
            self.__dict__[name] = saved

    nova_test.TestCase._clear_attrs = _clear_attrs_keeping_test_method
