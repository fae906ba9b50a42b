"""The vtpcm-manage command line: groups, commands and their arguments.

Why one builder: the CLI reference in doc/ is generated from it
(sphinx-argparse), so ``--help`` and the documentation cannot drift.
"""

import argparse
from typing import Any

from vtpcm_nova.cmd.manage import settle
from vtpcm_nova.cmd.manage.argtypes import (
    PcrValues,
    audit_limit,
    pcr_list,
    pcr_value,
    positive_seconds,
)
from vtpcm_nova.cmd.manage.db import db_sync, db_version
from vtpcm_nova.cmd.manage.hosts import (
    hosts_approve,
    hosts_assign_policy,
    hosts_attest,
    hosts_enroll,
    hosts_list,
    hosts_revoke,
    hosts_show,
)
from vtpcm_nova.cmd.manage.keys import keys_create
from vtpcm_nova.cmd.manage.policies import policies_list, policies_record, policies_set
from vtpcm_nova.cmd.manage.results import EPILOG, PROG, Command, ConfCommand
from vtpcm_nova.cmd.manage.views import (
    audit_list,
    migration_show,
    verdicts_list,
    vtpcm_destroy,
    vtpcm_list,
    vtpcm_show,
)

# Commands that change what the engine trusts: signed with an operator key.
ADMIN_COMMANDS: frozenset[Command] = frozenset({
    hosts_enroll, hosts_approve, hosts_revoke, hosts_assign_policy, policies_record,
    policies_set, vtpcm_destroy}) | settle.ADMIN_COMMANDS


def _format_opt() -> argparse.ArgumentParser:
    """``--format`` also after the sub-command (SUPPRESS keeps the global value)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--format", choices=("table", "json"), default=argparse.SUPPRESS,
                        help="output format (default: table)")
    return parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Operate the vTPCM engine: hosts, policies, verdicts, audit.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", action="append", default=[], metavar="PATH",
                        help="oslo.config file (repeatable; default: the vtpcm-engine "
                             "files, e.g. /etc/vtpcm/vtpcm-engine.conf)")
    parser.add_argument("--config-dir", action="append", default=[], metavar="DIR",
                        help="directory of configuration files ending in .conf "
                             "(repeatable)")
    parser.add_argument("--format", choices=("table", "json"), default="table",
                        help="output format (default: table)")
    parser.add_argument("--timeout", type=positive_seconds, default=120.0, metavar="SECONDS",
                        help="seconds to wait for each engine reply (default: 120)")
    parser.add_argument("--admin-key", metavar="PATH",
                        help="operator private key (Ed25519 PEM, mode 0600) to sign admin "
                             "commands with (default: [manage] admin_key)")
    fmt = [_format_opt()]
    groups = parser.add_subparsers(dest="group", metavar="GROUP", required=True)

    def command(sub: Any, name: str, func: Command, help_text: str) -> argparse.ArgumentParser:
        cmd: argparse.ArgumentParser = sub.add_parser(
            name, help=help_text, description=help_text, parents=fmt, epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter)
        cmd.set_defaults(func=func, admin=func in ADMIN_COMMANDS)
        return cmd

    def group(name: str, help_text: str) -> Any:
        grp = groups.add_parser(name, help=help_text, description=help_text)
        return grp.add_subparsers(dest="command", metavar="COMMAND", required=True)

    hosts = group("hosts", "compute hosts and their attestation")
    command(hosts, "list", hosts_list, "list enrolled hosts")
    for name, func, text in (("show", hosts_show, "show one host"),
                             ("enroll", hosts_enroll,
                              "enroll a host from its agent (a revoked host may enroll again)"),
                             ("approve", hosts_approve, "approve an enrolled host"),
                             ("revoke", hosts_revoke, "revoke a host")):
        command(hosts, name, func, text).add_argument("host", metavar="HOST")
    attest = command(hosts, "attest", hosts_attest,
                     "attest hosts now (exit 1 if any is not TRUSTED)")
    attest.add_argument("hosts", nargs="+", metavar="HOST")
    assign = command(hosts, "assign-policy", hosts_assign_policy,
                     "assign a golden PCR policy to a host, or none")
    assign.add_argument("host", metavar="HOST")
    choice = assign.add_mutually_exclusive_group(required=True)
    choice.add_argument("policy", nargs="?", metavar="POLICY")
    choice.add_argument("--none", action="store_true", help="remove the host's policy")

    policies = group("policies", "golden PCR policies")
    command(policies, "list", policies_list, "list policies")
    record = command(policies, "record", policies_record,
                     "record a policy from what a known-good host quotes now")
    record.add_argument("name", metavar="NAME")
    record.add_argument("--from-host", required=True, metavar="HOST")
    record.add_argument("--pcrs", required=True, type=pcr_list, metavar="0,1,...",
                        help="comma-separated PCR indices (sha256 bank)")
    record.add_argument("--description", default="")
    put = command(policies, "set", policies_set,
                  "create or replace a policy with exactly the given sha256 PCR values")
    put.add_argument("name", metavar="NAME")
    put.add_argument("--pcr", required=True, type=pcr_value, action=PcrValues,
                     metavar="INDEX=HEX", help="one PCR value, repeatable")
    put.add_argument("--description", default="")

    verdicts = group("verdicts", "attestation verdicts")
    command(verdicts, "list", verdicts_list, "list all fresh verdicts")

    audit = group("audit", "the engine's audit log")
    alist = command(audit, "list", audit_list, "list audit entries, newest first")
    alist.add_argument("--host", metavar="HOST")
    alist.add_argument("--limit", type=audit_limit, default=100, metavar="N",
                       help="at most N entries, 1-10000 (default: 100)")

    vtpcm = group("vtpcm", "vTPCMs of instances")
    command(vtpcm, "show", vtpcm_show, "show an instance's vTPCM").add_argument(
        "instance_uuid", metavar="INSTANCE_UUID")
    vlist = command(vtpcm, "list", vtpcm_list, "list vTPCM records")
    vlist.add_argument("--state", metavar="STATE", help="e.g. SHELVED")
    vlist.add_argument("--host", metavar="HOST")
    vdestroy = command(vtpcm, "destroy", vtpcm_destroy,
                       "crypto-shred a SHELVED vTPCM whose instance is gone, or one the "
                       "engine reported orphaned (operator-signed)")
    vdestroy.add_argument("instance_uuid", metavar="INSTANCE_UUID")
    vdestroy.add_argument("--yes", action="store_true",
                          help="destroy a reported orphan (ACTIVE or STOPPED); default: "
                               "only show the plan")
    migration = group("migration", "vTPCM migrations")
    command(migration, "show", migration_show, "show a vTPCM migration").add_argument(
        "migration_id", metavar="MIGRATION_ID")
    settle.add_commands(hosts, migration, command)

    keys = group("keys", "operator keys that sign admin commands")
    create = keys.add_parser(
        "create", parents=fmt, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="create an operator key pair (PATH 0600, PATH.pub)",
        description="Create an operator key pair: the private key PATH (mode 0600, keep "
                    "it with the operator) and PATH.pub (add it to the engine's [engine] "
                    "admin_public_keys). An existing key is kept and shown.")
    create.add_argument("path", metavar="PATH")
    create.set_defaults(func=None, local=keys_create, admin=False)

    db = groups.add_parser(
        "db", help="the engine database's schema (no engine needed)",
        description="The engine database's schema, at [engine] connection of the "
                    "engine's configuration. Run 'db sync' once per upgrade, with the "
                    "engines stopped, before starting the new ones: an engine refuses a "
                    "database that is not at its revision.")
    db_commands = db.add_subparsers(dest="command", metavar="COMMAND", required=True)
    db_funcs: tuple[tuple[str, ConfCommand, str], ...] = (
            ("sync", db_sync, "upgrade the schema to this release's revision, rows kept "
                              "(a database of a release before alembic too)"),
            ("version", db_version, "show the schema's revision and this release's"))
    for name, conf_func, text in db_funcs:
        sub = db_commands.add_parser(name, parents=fmt, epilog=EPILOG, help=text,
                                     description=text,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.set_defaults(func=None, configured=conf_func, admin=False)
    sync = db_commands.choices["sync"]
    sync.add_argument("--revision", default="head", metavar="REVISION",
                      help="stop at this revision (default: head)")
    return parser
