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


VTPCM_COLUMNS = ("instance_uuid", "host", "state", "generation", "migration_id",
                 "vtpcm_id")


def vtpcm_list(api: EngineAPI, args: argparse.Namespace) -> Result:
    return EXIT_OK, listing(VTPCM_COLUMNS,
                             api.list_vtpcms(state=args.state, host=args.host).vtpcms)


def vtpcm_destroy(api: EngineAPI, args: argparse.Namespace) -> Result:
    """Operator-signed: a SHELVED vTPCM (an instance deleted while shelved
    offloaded), or an ACTIVE/STOPPED one the engine reported orphaned
    (``vtpcm.orphan``). The plan is shown first; a vTPCM that is not
    SHELVED is destroyed only with ``--yes`` (Nova's word that its instance
    is gone may be forged by a compromised compute host: check first)."""
    rec = api.get_vtpcm(args.instance_uuid)
    plan = ("crypto-shred the %s vTPCM of instance %s on %s (generation %d): the "
            "guest's TPM state is lost for good"
            % (rec.state, rec.instance_uuid, rec.host, rec.generation))
    if rec.state != "SHELVED" and not args.yes:
        return EXIT_OK, {"plan": plan, "done": False,
                         "next": "Nothing was done: check that the instance is gone "
                                 "(not only shown deleted by Nova), then run it again "
                                 "with --yes."}
    api.destroy_shelved_vtpcm(args.instance_uuid)
    return EXIT_OK, {"plan": plan, "done": True, "destroyed": args.instance_uuid}


def migration_show(api: EngineAPI, args: argparse.Namespace) -> Result:
    return EXIT_OK, one(api.get_migration(args.migration_id))
