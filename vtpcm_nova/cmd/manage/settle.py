"""vtpcm-manage commands for decisions only an operator can take.

``migration resolve ID --to source|destination`` settles a migration the
protocol cannot settle alone (in doubt, or stuck on a host that died);
``hosts forget HOST`` drops the records of a host gone for good. Both are
operator-signed and audited by the engine, which refuses any choice that
would lose the only good copy of a tenant's TPM. Without ``--yes`` each
only shows, in plain words, what it would do (the engine's plan); with
``--yes`` it does it and shows the plan again with the outcome.
"""

import argparse
from collections.abc import Callable
from typing import Any

from vtpcm_common.api.engine import messages as m
from vtpcm_common.api.engine.rpcapi import EngineAPI
from vtpcm_nova.cmd.manage.results import EXIT_OK, Command, Result

NOTHING_DONE = "Nothing was done: run it again with --yes to do this."


def _answer(res: m.Resolution) -> Result:
    data: dict[str, Any] = {"action": res.action, "plan": res.plan, "done": res.done}
    if res.state is not None:
        data["state"] = res.state
    if not res.done:
        data["next"] = NOTHING_DONE
    return EXIT_OK, data


def migration_resolve(api: EngineAPI, args: argparse.Namespace) -> Result:
    return _answer(api.resolve_migration(args.migration_id, args.to, execute=args.yes,
                                         past_commit=args.past_commit,
                                         despite_import_check=args.despite_import_check))


def hosts_forget(api: EngineAPI, args: argparse.Namespace) -> Result:
    return _answer(api.forget_host(
        args.host, execute=args.yes,
        despite_unverified_answers=args.despite_unverified_answers))


ADMIN_COMMANDS: frozenset[Command] = frozenset({migration_resolve, hosts_forget})


def add_commands(hosts: Any, migration: Any,
                 command: Callable[[Any, str, Any, str], argparse.ArgumentParser]) -> None:
    """Register the commands on the ``hosts`` and ``migration`` groups."""
    yes = "do it (default: only show what it would do)"
    resolve = command(migration, "resolve", migration_resolve,
                      "settle a migration the engine cannot settle alone, toward the host "
                      "the guest runs on; refused if it would lose the only good state")
    resolve.add_argument("migration_id", metavar="MIGRATION_ID")
    resolve.add_argument("--to", required=True, choices=("source", "destination"),
                         help="where the guest runs now")
    resolve.add_argument("--past-commit", action="store_true",
                         help="with --to source: go back to the source's copy past the "
                              "commit point, only for a destination revoked after it died "
                              "before committing (the guest's TPM goes back to its state "
                              "at the switchover)")
    resolve.add_argument("--despite-import-check", action="store_true",
                         help="with --to destination: commit although the post-import "
                              "check (which the resolve runs) did not pass: the "
                              "destination's state is not the source's, cannot be "
                              "checked, or got no answer (audited; engine API 1.13)")
    resolve.add_argument("--yes", action="store_true", help=yes)
    forget = command(hosts, "forget", hosts_forget,
                     "forget a revoked host gone for good: its enrollment, keys and the "
                     "vTPCM records located on it")
    forget.add_argument("host", metavar="HOST")
    forget.add_argument("--despite-unverified-answers", action="store_true",
                        help="forget it although something answers on its topic with "
                             "replies that do not verify (if that is its agent with a "
                             "changed key, the host is forgotten while alive)")
    forget.add_argument("--yes", action="store_true", help=yes)
