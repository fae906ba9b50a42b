"""Sphinx configuration of the vtpcm documentation.

Build: ``tox -e docs``
(``sphinx-build -E -W --keep-going -b html doc/source doc/build/html``).

Generated at build time from the code, so they cannot drift from it:

* the configuration reference (``configuration/*.rst``, one page per file,
  since the agent and the engine files share groups) from the
  ``oslo.config.opts`` entry points ``vtpcm.agent``, ``vtpcm.engine`` and
  ``vtpcm.nova`` (``oslo_config.sphinxext``, shipped with oslo.config);
* the ``vtpcm-manage`` reference (``cli/vtpcm-manage.rst``) from
  ``vtpcm_nova.cmd.manage.parser.build_parser`` (sphinx-argparse, through
  ``_ext/manage_doc.py``).
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
# Document the tree being built, ahead of any installed copy of the package;
# _ext holds the small helpers of this documentation.
sys.path[:0] = [os.path.join(_HERE, "..", ".."), os.path.join(_HERE, "_ext")]

# Loading the option lists imports oslo.messaging: native threads, as every
# vtpcm entry point does (no eventlet import, no deprecation noise).
from vtpcm_common import concurrency  # noqa: E402

concurrency.use_native_threads()

project = "vtpcm"
copyright = "vTPCM developers"
author = "vTPCM developers"

extensions = [
    "oslo_config.sphinxext",
    "sphinxarg.ext",
]

root_doc = "index"
exclude_patterns: list[str] = []
# a reference to an option, group or label that does not exist is an error (-W)
nitpicky = True

html_theme = "alabaster"
html_static_path: list[str] = []
