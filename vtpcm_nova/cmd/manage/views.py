"""Read-only views of the engine: ``verdicts``, ``audit``, ``vtpcm`` and
``migration`` (nothing here changes what the engine trusts)."""

import argparse

from vtpcm_common.api.engine.rpcapi import EngineAPI
from vtpcm_nova.cmd.manage.results import EXIT_OK, Result, listing, one

VERDICT_COLUMNS = ("host", "status", "attested_at", "expires_at", "reason")
AUDIT_COLUMNS = ("at", "event", "outcome", "host", "instance", "migration_id", "detail")


def verdicts_list(api: EngineAPI, args: argparse.Namespace) -> Result:
    return EXIT_OK, listing(VERDICT_COLUMNS, api.verdicts().verdicts)


def audit_list(api: EngineAPI, args: argparse.Namespace) -> Result:
    return EXIT_OK, listing(AUDIT_COLUMNS,
                             api.list_audit(limit=args.limit, host=args.host).entries)


def vtpcm_show(api: EngineAPI, args: argparse.Namespace) -> Result:
    return EXIT_OK, one(api.get_vtpcm(args.instance_uuid))


def migration_show(api: EngineAPI, args: argparse.Namespace) -> Result:
    return EXIT_OK, one(api.get_migration(args.migration_id))
