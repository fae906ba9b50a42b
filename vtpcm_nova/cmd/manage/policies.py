"""``policies``: golden PCR policies, recorded from a host or set by value."""

import argparse

from vtpcm_common.api.engine import messages as m
from vtpcm_common.api.engine.rpcapi import EngineAPI
from vtpcm_nova.cmd.manage.results import EXIT_OK, Result, listing, one

POLICY_COLUMNS = ("name", "bank", "pcrs", "description")


def policies_list(api: EngineAPI, args: argparse.Namespace) -> Result:
    return EXIT_OK, listing(POLICY_COLUMNS, api.list_policies().policies)


def policies_record(api: EngineAPI, args: argparse.Namespace) -> Result:
    policy = api.record_policy(args.name, args.from_host, args.pcrs, args.description)
    return EXIT_OK, one(policy)


def policies_set(api: EngineAPI, args: argparse.Namespace) -> Result:
    """Create or replace the whole policy with exactly the given PCR values."""
    policy = m.PolicyInfo(name=args.name, bank="sha256", pcrs=dict(args.pcr),
                          description=args.description)
    return EXIT_OK, one(api.put_policy(policy))
