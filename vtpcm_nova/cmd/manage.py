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
    migration show MIGRATION_ID
    migration resolve MIGRATION_ID --to source|destination [--yes]
    hosts forget HOST [--yes]
    keys create PATH

Admin commands (hosts enroll/approve/revoke/assign-policy/forget, policies
record/set, migration resolve) change what the engine trusts: they are signed with an operator
key, ``--admin-key PATH`` or ``[manage] admin_key``, whose public half is in
the engine's ``[engine] admin_public_keys``. Without a key they stop here
with exit 2; the engine refuses a call signed by a key it does not know
(exit 4). ``keys create PATH`` makes an operator key pair (no engine needed).

Exit codes (scripts may rely on them):

    0  success
    1  the operation ran but the answer is negative
       (``hosts attest``: at least one host is not TRUSTED)
    2  usage or configuration error
    3  not found (host, policy, vTPCM, migration)
    4  refused or invalid (any other engine error: invalid input,
       host not trusted, illegal transition, ...)
    5  engine unreachable (no reply in time, transport error)

Errors are one line on stderr, ``vtpcm-manage: error: <message>``.
"""

import argparse
import dataclasses
import json
import re
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, cast

import oslo_messaging as messaging
from oslo_config import cfg
from oslo_log import log as logging

from vtpcm_common import authn, exception
from vtpcm_common.api.engine import messages as m
from vtpcm_common.api.engine import rpcapi
from vtpcm_common.api.engine.rpcapi import EngineAPI
from vtpcm_common.wire import Message
from vtpcm_nova import conf as engine_conf
from vtpcm_nova.cmd import settle

LOG = logging.getLogger(__name__)

PROG = "vtpcm-manage"

EXIT_OK = 0
EXIT_NEGATIVE = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_REFUSED = 4
EXIT_UNREACHABLE = 5

EPILOG = """\
exit codes:
  0  success
  1  the operation ran but the answer is negative
     (hosts attest: at least one host is not TRUSTED)
  2  usage or configuration error
  3  not found
  4  refused or invalid (invalid input, host not trusted, illegal transition...)
  5  engine unreachable (no reply in time, transport error)
"""

# Seconds a call may run past its RPC timeout before we give up on it: the
# rabbit driver retries a refused broker connection forever, ignoring timeout.
DEADLINE_GRACE = 5.0

SHA256_HEX = 64
MAX_PCR = 23


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


# --- results --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Listing:
    """Rows of one kind: JSON prints every key, the table only ``columns``."""

    columns: tuple[str, ...]
    rows: list[dict[str, Any]]


Data = Listing | dict[str, Any]
Result = tuple[int, Data]
Command = Callable[[EngineAPI, argparse.Namespace], Result]
LocalCommand = Callable[[argparse.Namespace], Result]


def to_json(value: Any) -> Any:
    """Message -> JSON-safe value with stable keys (field names, bytes as hex)."""
    if isinstance(value, Message):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, Mapping):
        keys = sorted(value, key=lambda k: (not isinstance(k, int), k))
        return {str(k): to_json(value[k]) for k in keys}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    return value


def _listing(columns: tuple[str, ...], items: Sequence[Message]) -> Listing:
    return Listing(columns, [cast(dict[str, Any], to_json(i)) for i in items])


def _one(item: Message) -> dict[str, Any]:
    return cast(dict[str, Any], to_json(item))


HOST_COLUMNS = ("name", "status", "policy_name", "has_ek_certificate", "enrolled_at",
                "approved_at")
POLICY_COLUMNS = ("name", "bank", "pcrs", "description")
VERDICT_COLUMNS = ("host", "status", "attested_at", "expires_at", "reason")
AUDIT_COLUMNS = ("at", "event", "outcome", "host", "instance", "migration_id", "detail")


# --- argument types -----------------------------------------------------------------------


def pcr_index(text: str) -> int:
    try:
        index = int(text.strip(), 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"PCR index {text!r} is not an integer") from None
    if not 0 <= index <= MAX_PCR:
        raise argparse.ArgumentTypeError(f"PCR index {index} is not between 0 and {MAX_PCR}")
    return index


def pcr_list(text: str) -> tuple[int, ...]:
    """``0,1,2`` -> (0, 1, 2); duplicates and empty lists are refused."""
    parts = [p for p in text.split(",")]
    if not text.strip() or any(not p.strip() for p in parts):
        raise argparse.ArgumentTypeError(f"PCR list {text!r} must be like 0,1,2,7")
    indices = [pcr_index(p) for p in parts]
    if len(set(indices)) != len(indices):
        raise argparse.ArgumentTypeError(f"PCR list {text!r} names a PCR twice")
    return tuple(sorted(indices))


def pcr_value(text: str) -> tuple[int, bytes]:
    """``16=<64 hex digits>`` -> (16, digest): one golden sha256 PCR value."""
    index_text, sep, digest_text = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"PCR value {text[:80]!r} must be INDEX=HEX")
    index = pcr_index(index_text)
    digest_text = digest_text.strip()
    if len(digest_text) != SHA256_HEX or not re.fullmatch(r"[0-9A-Fa-f]+", digest_text):
        raise argparse.ArgumentTypeError(
            f"PCR {index} value must be {SHA256_HEX} hex digits (sha256)")
    return index, bytes.fromhex(digest_text)


class _PcrValues(argparse.Action):
    """Collect repeated ``--pcr I=HEX`` into one dict, refusing an index given twice."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        index, digest = cast(tuple[int, bytes], values)
        current = dict(getattr(namespace, self.dest, None) or {})
        if index in current:
            raise argparse.ArgumentError(self, f"PCR {index} given twice")
        current[index] = digest
        setattr(namespace, self.dest, current)


def audit_limit(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"limit {text!r} is not an integer") from None
    if not 1 <= value <= 10000:
        raise argparse.ArgumentTypeError("limit must be between 1 and 10000")
    return value


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"timeout {text!r} is not a number") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError("timeout must be between 0 and 3600 seconds")
    return value


# --- commands -----------------------------------------------------------------------------


def hosts_list(api: EngineAPI, args: argparse.Namespace) -> Result:
    return EXIT_OK, _listing(HOST_COLUMNS, api.list_hosts().hosts)


def hosts_show(api: EngineAPI, args: argparse.Namespace) -> Result:
    return EXIT_OK, _one(api.show_host(args.host))


def hosts_enroll(api: EngineAPI, args: argparse.Namespace) -> Result:
    return EXIT_OK, _one(api.enroll(args.host))


def hosts_approve(api: EngineAPI, args: argparse.Namespace) -> Result:
    return EXIT_OK, _one(api.approve_host(args.host))


def hosts_revoke(api: EngineAPI, args: argparse.Namespace) -> Result:
    return EXIT_OK, _one(api.revoke_host(args.host))


def hosts_assign_policy(api: EngineAPI, args: argparse.Namespace) -> Result:
    policy = None if args.none else args.policy
    return EXIT_OK, _one(api.assign_policy(args.host, policy))


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
        return code, _listing(VERDICT_COLUMNS, [verdict])
    rows: list[dict[str, Any]] = []
    code = EXIT_OK
    first_error: int | None = None
    for number, host in enumerate(hosts, 1):
        _progress(f"attesting {number}/{len(hosts)} {host} ... ")
        try:
            verdict = api.attest(host)
        except exception.VTPCMException as err:
            _progress(f"ERROR: {_one_line(str(err))}\n")
            first_error = first_error or _error_code(err)
            rows.append({"host": host, "status": "ERROR", "reason": _one_line(str(err)),
                         "attested_at": None, "expires_at": None})
            continue
        except BaseException:
            _progress("FAILED\n")
            raise
        _progress(f"{verdict.status}\n")
        rows.append(_one(verdict))
        if verdict.status != "TRUSTED":
            code = EXIT_NEGATIVE
    return (first_error or code), Listing(VERDICT_COLUMNS, rows)


def policies_list(api: EngineAPI, args: argparse.Namespace) -> Result:
    return EXIT_OK, _listing(POLICY_COLUMNS, api.list_policies().policies)


def policies_record(api: EngineAPI, args: argparse.Namespace) -> Result:
    policy = api.record_policy(args.name, args.from_host, args.pcrs, args.description)
    return EXIT_OK, _one(policy)


def policies_set(api: EngineAPI, args: argparse.Namespace) -> Result:
    """Create or replace the whole policy with exactly the given PCR values."""
    policy = m.PolicyInfo(name=args.name, bank="sha256", pcrs=dict(args.pcr),
                          description=args.description)
    return EXIT_OK, _one(api.put_policy(policy))


def verdicts_list(api: EngineAPI, args: argparse.Namespace) -> Result:
    return EXIT_OK, _listing(VERDICT_COLUMNS, api.verdicts().verdicts)


def audit_list(api: EngineAPI, args: argparse.Namespace) -> Result:
    return EXIT_OK, _listing(AUDIT_COLUMNS,
                             api.list_audit(limit=args.limit, host=args.host).entries)


def vtpcm_show(api: EngineAPI, args: argparse.Namespace) -> Result:
    return EXIT_OK, _one(api.get_vtpcm(args.instance_uuid))


def migration_show(api: EngineAPI, args: argparse.Namespace) -> Result:
    return EXIT_OK, _one(api.get_migration(args.migration_id))


def keys_create(args: argparse.Namespace) -> Result:
    """Make an operator key pair (or show an existing one: safe to repeat).
    Only the fingerprint and paths are printed, never key material."""
    path = Path(args.path)
    existed = path.exists()
    signer = authn.load_or_create_signing_key(path)
    return EXIT_OK, {"private_key": str(path),
                     "public_key": str(authn.public_key_path(path)),
                     "fingerprint": signer.fingerprint, "created": not existed}


def _progress(text: str) -> None:
    sys.stderr.write(text)
    sys.stderr.flush()


# Commands that change what the engine trusts: signed with an operator key.
ADMIN_COMMANDS: frozenset[Command] = frozenset({
    hosts_enroll, hosts_approve, hosts_revoke, hosts_assign_policy, policies_record,
    policies_set}) | settle.ADMIN_COMMANDS


# --- parser -------------------------------------------------------------------------------


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
    put.add_argument("--pcr", required=True, type=pcr_value, action=_PcrValues,
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
    return parser


# --- rendering ----------------------------------------------------------------------------

_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _one_line(text: str) -> str:
    """Keep a cell or message on one line, without terminal control characters."""
    return _UNPRINTABLE.sub("?", text.replace("\r\n", " ").replace("\n", " "))


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Mapping):
        return ",".join(str(k) for k in value) or "-"
    if isinstance(value, (list, tuple)):
        return ",".join(cell(v) for v in value) or "-"
    return _one_line(str(value))


def _aligned(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                   + "\n" for r in rows)


def render_table(data: Data) -> str:
    if isinstance(data, Listing):
        header = [c.upper() for c in data.columns]
        return _aligned([header] + [[cell(r.get(c)) for c in data.columns]
                                    for r in data.rows])
    pairs = [["FIELD", "VALUE"]]
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            pairs.extend([f"{key}[{k}]", cell(v)] for k, v in value.items())
        else:
            pairs.append([key, cell(value)])
    return _aligned(pairs)


def render(data: Data, fmt: str, out: IO[str]) -> None:
    if fmt == "json":
        payload = data.rows if isinstance(data, Listing) else data
        out.write(json.dumps(payload, indent=2) + "\n")
    else:
        out.write(render_table(data))


# --- wiring -------------------------------------------------------------------------------


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


class DeadlineAPI:
    """Run each engine call in a worker thread and give up after ``seconds``.

    The rabbit driver retries a refused broker connection forever, so a call
    to a dead broker would hang the CLI despite the RPC timeout.
    """

    def __init__(self, api: Any, seconds: float) -> None:
        self._api = api
        self._seconds = seconds

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._api, name)
        if not callable(method):
            return method

        def call(*args: Any, **kwargs: Any) -> Any:
            outcome: dict[str, Any] = {}

            def run() -> None:
                try:
                    outcome["value"] = method(*args, **kwargs)
                except BaseException as err:  # noqa: B036 - re-raised in the caller
                    outcome["error"] = err

            worker = threading.Thread(target=run, name=f"{PROG}-{name}", daemon=True)
            worker.start()
            worker.join(self._seconds)
            if worker.is_alive():
                raise messaging.MessagingTimeout(
                    f"no reply from vtpcm-engine within {self._seconds:g} s")
            if "error" in outcome:
                raise outcome["error"]
            return outcome.get("value")
        return call


def _error_code(err: exception.VTPCMException) -> int:
    if isinstance(err, exception.ServiceUnreachable):
        return EXIT_UNREACHABLE
    return EXIT_NOT_FOUND if isinstance(err, exception.NotFound) else EXIT_REFUSED


def _config_error_text(err: cfg.Error) -> str:
    """Name the file and line, never the offending line (it may hold a password)."""
    if isinstance(err, cfg.ConfigFileParseError):
        line = re.match(r"at .*:(\d+), ", err.msg or "")
        where = f" at line {line.group(1)}" if line else ""
        return f"cannot parse configuration file {err.config_file}{where}"
    return f"configuration: {_one_line(str(err))}"


def fail(message: str, code: int) -> int:
    sys.stderr.write(f"{PROG}: error: {_one_line(message)}\n")
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
    try:
        conf = load_config(args)
        logging.setup(conf, PROG)
        problem = admin_key_problem(conf, args)
        if problem is not None:
            return fail(problem, EXIT_USAGE)
        code, data = run(conf, args)
    except cfg.Error as err:
        return fail(_config_error_text(err), EXIT_USAGE)
    except exception.ServiceUnreachable as err:
        return fail(f"engine unreachable: {err}", EXIT_UNREACHABLE)
    except exception.VTPCMException as err:
        return fail(str(err), _error_code(err))
    except messaging.MessagingTimeout as err:
        return fail(f"engine unreachable: {err}", EXIT_UNREACHABLE)
    except UNREACHABLE_ERRORS as err:
        return fail(f"engine unreachable: {type(err).__name__}: {err}", EXIT_UNREACHABLE)
    except KeyboardInterrupt:
        return 130
    render(data, args.format, sys.stdout)
    return code


if __name__ == "__main__":
    sys.exit(main())
