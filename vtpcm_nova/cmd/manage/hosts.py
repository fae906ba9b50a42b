"""``hosts``: list, show, enroll, approve, revoke, attest and assign a
policy to compute hosts (each one call to the engine)."""

import argparse
from typing import Any

from vtpcm_common import exception
from vtpcm_common.api.engine.rpcapi import EngineAPI
from vtpcm_nova.cmd.manage.output import one_line, progress
from vtpcm_nova.cmd.manage.results import (
    EXIT_NEGATIVE,
    EXIT_OK,
    Listing,
    Result,
    error_code,
    listing,
    one,
)
from vtpcm_nova.cmd.manage.views import VERDICT_COLUMNS

HOST_COLUMNS = ("name", "status", "policy_name", "has_ek_certificate", "enrolled_at",
                "approved_at")


def hosts_list(api: EngineAPI, args: argparse.Namespace) -> Result:
    return EXIT_OK, listing(HOST_COLUMNS, api.list_hosts().hosts)


def hosts_show(api: EngineAPI, args: argparse.Namespace) -> Result:
    return EXIT_OK, one(api.show_host(args.host))


def hosts_enroll(api: EngineAPI, args: argparse.Namespace) -> Result:
    return EXIT_OK, one(api.enroll(args.host))


def hosts_approve(api: EngineAPI, args: argparse.Namespace) -> Result:
    return EXIT_OK, one(api.approve_host(args.host))


def hosts_revoke(api: EngineAPI, args: argparse.Namespace) -> Result:
    return EXIT_OK, one(api.revoke_host(args.host))


def hosts_assign_policy(api: EngineAPI, args: argparse.Namespace) -> Result:
    policy = None if args.none else args.policy
    return EXIT_OK, one(api.assign_policy(args.host, policy))


def hosts_attest(api: EngineAPI, args: argparse.Namespace) -> Result:
    """Attest each host now; exit 1 unless all are TRUSTED.

    With one host an engine error is the command's error. With several, a
    host's error becomes an ERROR row and the run goes on; the exit code is
    then that of the first error (3 or 4). Progress goes to stderr.
    """
    hosts = list(dict.fromkeys(args.hosts))
    if len(hosts) == 1:
        verdict = api.attest(hosts[0])
        code = EXIT_OK if verdict.status == "TRUSTED" else EXIT_NEGATIVE
        return code, listing(VERDICT_COLUMNS, [verdict])
    rows: list[dict[str, Any]] = []
    code = EXIT_OK
    first_error: int | None = None
    for number, host in enumerate(hosts, 1):
        progress(f"attesting {number}/{len(hosts)} {host} ... ")
        try:
            verdict = api.attest(host)
        except exception.VTPCMException as err:
            progress(f"ERROR: {one_line(str(err))}\n")
            first_error = first_error or error_code(err)
            rows.append({"host": host, "status": "ERROR", "reason": one_line(str(err)),
                         "attested_at": None, "expires_at": None})
            continue
        except BaseException:
            progress("FAILED\n")
            raise
        progress(f"{verdict.status}\n")
        rows.append(one(verdict))
        if verdict.status != "TRUSTED":
            code = EXIT_NEGATIVE
    return (first_error or code), Listing(VERDICT_COLUMNS, rows)
