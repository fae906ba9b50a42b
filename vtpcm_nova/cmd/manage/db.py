"""``db sync`` and ``db version``: the engine database's schema revision.

Why here and not in the engine: the schema moves only when the operator
says so (``nova-manage db sync`` likewise), once, with the engines stopped;
a started engine only checks it is at head. These commands read the
engine's configuration for ``[engine] connection`` and need no engine.
"""

import argparse

from oslo_config import cfg

from vtpcm_nova.cmd.manage.results import EXIT_OK, Result
from vtpcm_nova.engine.db import migration


def db_sync(conf: cfg.ConfigOpts, args: argparse.Namespace) -> Result:
    """Upgrade the engine database to head (or ``--revision``), rows kept."""
    done = migration.db_sync(conf.engine.connection, args.revision)
    return EXIT_OK, {"before": done.before, "after": done.after, "head": migration.head()}


def db_version(conf: cfg.ConfigOpts, args: argparse.Namespace) -> Result:
    """Where the engine database's schema is, and where this release's is."""
    return EXIT_OK, {"current": migration.db_version(conf.engine.connection),
                     "head": migration.head()}
