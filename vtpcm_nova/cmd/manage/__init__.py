"""vtpcm-manage: the operator CLI of the vtpcm-engine (hosts, policies, verdicts, audit).

It is a thin RPC client of the running engine (``vtpcm_common.api.engine.rpcapi``):
every answer comes from the engine's database, nothing is cached here. Each
command is one small function ``(api, args) -> (exit_code, data)``; rendering
(aligned table or ``--format json``) is separate, so scripts get stable keys.

Commands::

    hosts list | show HOST | enroll HOST | approve HOST | revoke HOST
    hosts attest HOST [HOST...]
    hosts assign-policy HOST (POLICY | --none)
    policies list
    policies record NAME --from-host HOST --pcrs 0,1,2,3,4,5,6,7 [--description D]
    policies set NAME --pcr 16=<64 hex digits> [--pcr ...] [--description D]
    verdicts list
    audit list [--host HOST] [--limit N]
    vtpcm show INSTANCE_UUID
    vtpcm list [--state STATE] [--host HOST]
    vtpcm destroy INSTANCE_UUID [--yes]  (SHELVED, or a reported orphan; operator-signed)
    migration show MIGRATION_ID
    migration resolve MIGRATION_ID --to source|destination [--past-commit]
        [--despite-import-check] [--yes]
    hosts forget HOST [--despite-unverified-answers] [--yes]
    keys create PATH
    db sync [--revision REV] | db version

Admin commands (hosts enroll/approve/revoke/assign-policy/forget, policies
record/set, migration resolve) change what the engine trusts: they are signed with an operator
key, ``--admin-key PATH`` or ``[manage] admin_key``, whose public half is in
the engine's ``[engine] admin_public_keys``. Without a key they stop here
with exit 2; the engine refuses a call signed by a key it does not know
(exit 4). ``keys create PATH`` makes an operator key pair, ``db sync``
moves the engine database's schema to this release's revision and ``db
version`` shows where it is (no engine needed for these).

Exit codes (scripts may rely on them):

    0  success
    1  the operation ran but the answer is negative
       (``hosts attest``: at least one host is not TRUSTED)
    2  usage or configuration error
    3  not found (host, policy, vTPCM, migration)
    4  refused or invalid (any other engine error: invalid input,
       host not trusted, illegal transition, ...)
    5  engine unreachable (no reply in time, transport error; for ``db``:
       the database)

Errors are one line on stderr, ``vtpcm-manage: error: <message>``.

The package: ``parser`` (the command line), one module per command group
(``hosts``, ``policies``, ``views``, ``keys``, ``db``), ``results`` (exit
codes, data), ``output`` (table/JSON), ``deadline`` and, here, the wiring: configuration,
the engine client, errors to exit codes.
"""

import argparse
import re
import sys
from typing import cast

import oslo_messaging as messaging
import sqlalchemy.exc
from oslo_config import cfg
from oslo_log import log as logging

from vtpcm_common import exception
from vtpcm_common.api.engine import rpcapi
from vtpcm_common.api.engine.rpcapi import EngineAPI
from vtpcm_nova import conf as engine_conf
from vtpcm_nova.cmd.manage.deadline import DeadlineAPI
from vtpcm_nova.cmd.manage.output import one_line, render
from vtpcm_nova.cmd.manage.parser import ADMIN_COMMANDS, build_parser
from vtpcm_nova.cmd.manage.results import (
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    PROG,
    ConfCommand,
    LocalCommand,
    Result,
    error_code,
)

__all__ = ["ADMIN_COMMANDS", "DEADLINE_GRACE", "UNREACHABLE_ERRORS", "DeadlineAPI",
           "build_api", "build_parser", "main"]

LOG = logging.getLogger(__name__)

# Seconds a call may run past its RPC timeout before we give up on it: the
# rabbit driver retries a refused broker connection forever, ignoring timeout.
DEADLINE_GRACE = 5.0


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Broker-level errors that mean "cannot reach the engine" (driver-specific)."""
    errors: list[type[BaseException]] = [messaging.MessagingException, OSError]
    try:
        import amqp.exceptions
        errors.append(amqp.exceptions.AMQPError)
    except ImportError:
        pass
    try:
        import kombu.exceptions
        errors.append(kombu.exceptions.KombuError)
    except ImportError:
        pass
    return tuple(errors)


UNREACHABLE_ERRORS = _transport_errors()


def load_config(args: argparse.Namespace) -> cfg.ConfigOpts:
    """A private ConfigOpts: main() may run several times in one process."""
    conf = cfg.ConfigOpts()
    logging.register_options(conf)
    engine_conf.register_opts(conf)
    oslo_argv: list[str] = []
    for path in args.config_file:
        oslo_argv += ["--config-file", path]
    for path in args.config_dir:
        oslo_argv += ["--config-dir", path]
    conf(oslo_argv, project="vtpcm", prog="vtpcm-engine",
         default_config_files=cfg.find_config_files(project="vtpcm", prog="vtpcm-engine"))
    if args.admin_key:
        conf.set_override("admin_key", args.admin_key, group="manage")
    return conf


def bare_config() -> cfg.ConfigOpts:
    """Options for the commands that need no engine (no config files read);
    their log lines go to stderr, stdout is for the result."""
    conf = cfg.ConfigOpts()
    logging.register_options(conf)
    conf([], project="vtpcm", prog=PROG, default_config_files=[])
    conf.set_override("use_stderr", True)
    return conf


def admin_key_problem(conf: cfg.ConfigOpts, args: argparse.Namespace) -> str | None:
    """Why this command cannot run with the configured operator key, if so.
    Checked before any call: a missing key is a usage error, not something
    to learn from the engine's refusal, and a broken one is named."""
    try:
        signer = rpcapi.admin_signer_from_conf(conf)
    except exception.InvalidInput as err:
        return str(err.kwargs.get("reason", err))
    if args.admin and signer is None:
        return (f"'{args.group} {args.command}' must be signed with an operator key: "
                "pass --admin-key PATH or set [manage] admin_key (create one with "
                f"'{PROG} keys create PATH')")
    return None


def build_api(conf: cfg.ConfigOpts, timeout: float) -> EngineAPI:
    """Hook replaced by the unit tests with a fake engine."""
    return EngineAPI(conf, timeout=timeout)


def _config_error_text(err: cfg.Error) -> str:
    """Name the file and line, never the offending line (it may hold a password)."""
    if isinstance(err, cfg.ConfigFileParseError):
        line = re.match(r"at .*:(\d+), ", err.msg or "")
        where = f" at line {line.group(1)}" if line else ""
        return f"cannot parse configuration file {err.config_file}{where}"
    return f"configuration: {one_line(str(err))}"


def _db_error_text(err: sqlalchemy.exc.DBAPIError) -> str:
    """The driver's own first line, not SQLAlchemy's (which adds the
    statement and its parameters)."""
    lines = str(err.orig).strip().splitlines()
    return f"{type(err.orig).__name__}: {lines[0] if lines else ''}"


def fail(message: str, code: int) -> int:
    sys.stderr.write(f"{PROG}: error: {one_line(message)}\n")
    return code


def run(conf: cfg.ConfigOpts, args: argparse.Namespace) -> Result:
    """Build the client, run one command, always release the transport."""
    api = build_api(conf, args.timeout)
    try:
        return cast(Result, args.func(
            cast(EngineAPI, DeadlineAPI(api, args.timeout + DEADLINE_GRACE)), args))
    finally:
        transport = getattr(api, "transport", None)
        if transport is not None:
            transport.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as done:  # argparse: --help (0) or a usage error (2)
        return done.code if isinstance(done.code, int) else EXIT_USAGE
    local: LocalCommand | None = getattr(args, "local", None)
    if local is not None:
        try:
            logging.setup(bare_config(), PROG)
            code, data = local(args)
        except exception.VTPCMException as err:
            return fail(str(err), EXIT_USAGE)
        render(data, args.format, sys.stdout)
        return code
    configured: ConfCommand | None = getattr(args, "configured", None)
    try:
        conf = load_config(args)
        if configured is not None:
            conf.set_override("use_stderr", True)  # stdout is for the result
        logging.setup(conf, PROG)
        if configured is not None:
            code, data = configured(conf, args)
        else:
            problem = admin_key_problem(conf, args)
            if problem is not None:
                return fail(problem, EXIT_USAGE)
            code, data = run(conf, args)
    except cfg.Error as err:
        return fail(_config_error_text(err), EXIT_USAGE)
    except sqlalchemy.exc.ArgumentError:
        # never echo the URL: it may hold the database password
        return fail("configuration: [engine] connection is not a database URL this "
                    "engine can use", EXIT_USAGE)
    except sqlalchemy.exc.DBAPIError as err:
        return fail(f"database error: {_db_error_text(err)}",
                    EXIT_UNREACHABLE if isinstance(err, sqlalchemy.exc.OperationalError)
                    else EXIT_REFUSED)
    except exception.ServiceUnreachable as err:
        return fail(f"engine unreachable: {err}", EXIT_UNREACHABLE)
    except exception.VTPCMException as err:
        return fail(str(err), error_code(err))
    except messaging.MessagingTimeout as err:
        return fail(f"engine unreachable: {err}", EXIT_UNREACHABLE)
    except UNREACHABLE_ERRORS as err:
        return fail(f"engine unreachable: {type(err).__name__}: {err}", EXIT_UNREACHABLE)
    except KeyboardInterrupt:
        return 130
    render(data, args.format, sys.stdout)
    return code
