"""vtpcm-manage against a fake engine: output formats, progress, exit codes, bad input."""

import json
import threading
from typing import Any

import oslo_messaging as messaging
import pytest
from oslo_config import cfg

from vtpcm_common import authn, exception
from vtpcm_common.api.engine import messages as m
from vtpcm_common.api.engine import rpcapi
from vtpcm_nova.cmd import manage

INSTANCE = "6f1c2a3e-0000-4000-8000-000000000001"
VTPCM_ID = "6f1c2a3e-0000-4000-8000-000000000002"
MIGRATION = "6f1c2a3e-0000-4000-8000-000000000003"
DIGEST = bytes(range(32))


def host_info(name: str, status: str = "APPROVED", policy: str | None = "golden") -> m.HostInfo:
    return m.HostInfo(name=name, status=status, policy_name=policy, ak_name="000b" + "ab" * 32,
                      enrolled_at="2024-05-01T10:00:00+00:00",
                      approved_at="2024-05-01T10:05:00+00:00" if status == "APPROVED" else None,
                      has_ek_certificate=True)


def verdict(host: str, status: str = "TRUSTED", reason: str = "PCRs match") -> m.Verdict:
    return m.Verdict(host=host, status=status, reason=reason,
                     attested_at="2024-05-01T10:10:00+00:00",
                     expires_at="2024-05-01T10:15:00+00:00")


POLICY = m.PolicyInfo(name="golden", bank="sha256", pcrs={7: DIGEST, 0: b"\x11" * 32},
                      description="boot chain")


class FakeEngine:
    """Stands in for EngineAPI: real reply messages, recorded calls, injectable errors."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.errors: dict[str, BaseException] = {}
        self.verdict_for: dict[str, m.Verdict] = {}
        self.attest_errors: dict[str, BaseException] = {}
        self.block: threading.Event | None = None

    def _record(self, name: str, *args: Any) -> None:
        self.calls.append((name, *args))
        if self.block is not None:
            self.block.wait(10)
        if name in self.errors:
            raise self.errors[name]

    def list_hosts(self) -> m.HostList:
        self._record("list_hosts")
        return m.HostList((host_info("host-a"), host_info("host-b", "PENDING", None)))

    def show_host(self, host: str) -> m.HostInfo:
        self._record("show_host", host)
        return host_info(host)

    def enroll(self, host: str) -> m.HostInfo:
        self._record("enroll", host)
        return host_info(host, "PENDING", None)

    def approve_host(self, host: str) -> m.HostInfo:
        self._record("approve_host", host)
        return host_info(host)

    def resolve_migration(self, migration_id: str, to: str, execute: bool = False,
                          past_commit: bool = False,
                          despite_import_check: bool = False) -> m.Resolution:
        self._record("resolve_migration", migration_id, to, execute,
                     *(("past_commit",) if past_commit else ()),
                     *(("despite_import_check",) if despite_import_check else ()))
        return m.Resolution(action="resolve migration %s to the %s" % (migration_id, to),
                            plan="Abort migration ...", done=execute, state="IN_DOUBT")

    def forget_host(self, host: str, execute: bool = False,
                    despite_unverified_answers: bool = False) -> m.Resolution:
        self._record("forget_host", host, execute,
                     *(("despite_unverified_answers",) if despite_unverified_answers
                       else ()))
        return m.Resolution(action="forget host %s" % host, plan="Forget host ...",
                            done=execute, state=None)

    def revoke_host(self, host: str) -> m.HostInfo:
        self._record("revoke_host", host)
        return host_info(host, "REVOKED")

    def assign_policy(self, host: str, policy_name: str | None) -> m.HostInfo:
        self._record("assign_policy", host, policy_name)
        return host_info(host, policy=policy_name)

    def attest(self, host: str) -> m.Verdict:
        self._record("attest", host)
        if host in self.attest_errors:
            raise self.attest_errors[host]
        return self.verdict_for.get(host, verdict(host))

    def list_policies(self) -> m.PolicyList:
        self._record("list_policies")
        return m.PolicyList((POLICY,))

    def record_policy(self, name: str, host: str, pcrs: tuple[int, ...],
                      description: str = "") -> m.PolicyInfo:
        self._record("record_policy", name, host, pcrs, description)
        return m.PolicyInfo(name=name, bank="sha256", pcrs={i: DIGEST for i in pcrs},
                            description=description)

    def put_policy(self, policy: m.PolicyInfo) -> m.PolicyInfo:
        self._record("put_policy", policy)
        return policy.validated()

    def verdicts(self) -> m.VerdictList:
        self._record("verdicts")
        return m.VerdictList((verdict("host-a"), verdict("host-b", "UNTRUSTED", "PCR 7")))

    def list_audit(self, limit: int = 100, host: str | None = None) -> m.AuditList:
        self._record("list_audit", limit, host)
        return m.AuditList((m.AuditEntry(
            at="2024-05-01T10:00:00+00:00", event="host.approve", outcome="approved",
            host="host-a", instance=None, migration_id=None, detail="by operator"),))

    def destroy_shelved_vtpcm(self, instance_uuid: str) -> m.Empty:
        self._record("destroy_shelved_vtpcm", instance_uuid)
        return m.Empty()

    def list_vtpcms(self, state: str | None = None, host: str | None = None) -> m.VtpcmList:
        self._record("list_vtpcms", state, host)
        return m.VtpcmList((m.VtpcmRecord("4f7f1c3e-8c1b-4a43-9d57-2b1f0d1e5a10", VTPCM_ID,
                                          "host-a", 3, "SHELVED", None),))

    def get_vtpcm(self, instance_uuid: str) -> m.VtpcmRecord:
        self._record("get_vtpcm", instance_uuid)
        return m.VtpcmRecord(instance_uuid, VTPCM_ID, "host-a", 3, "ACTIVE", None)

    def get_migration(self, migration_id: str) -> m.MigrationInfo:
        self._record("get_migration", migration_id)
        return m.MigrationInfo(migration_id, INSTANCE, "host-a", "host-b", 4, "COMMITTED",
                               None)


@pytest.fixture
def operator_key(tmp_path: Any) -> Any:
    path = tmp_path / "keys" / "operator.key"
    authn.load_or_create_signing_key(path)
    return path


@pytest.fixture
def engine(monkeypatch: pytest.MonkeyPatch, tmp_path: Any, operator_key: Any) -> FakeEngine:
    """The fake engine; the default config file names an operator key, so
    admin commands pass the local key check (as with [manage] admin_key)."""
    fake = FakeEngine()
    seen: dict[str, Any] = {}

    def build_api(conf: cfg.ConfigOpts, timeout: float) -> FakeEngine:
        seen["conf"], seen["timeout"] = conf, timeout
        return fake

    default_conf = tmp_path / "default-engine.conf"
    default_conf.write_text(f"[manage]\nadmin_key = {operator_key}\n")
    monkeypatch.setattr(manage, "build_api", build_api)
    monkeypatch.setattr(cfg, "find_config_files", lambda **kw: [str(default_conf)])
    fake.seen = seen  # type: ignore[attr-defined]
    return fake


@pytest.fixture
def keyless(engine: FakeEngine, monkeypatch: pytest.MonkeyPatch) -> FakeEngine:
    """The fake engine with no operator key configured anywhere."""
    monkeypatch.setattr(cfg, "find_config_files", lambda **kw: [])
    return engine


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = manage.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def table(out: str) -> list[list[str]]:
    return [line.split() for line in out.splitlines()]


# --- hosts -------------------------------------------------------------------------------


def test_hosts_list_table(engine: FakeEngine, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "hosts", "list")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "STATUS", "POLICY_NAME", "HAS_EK_CERTIFICATE",
                                "ENROLLED_AT", "APPROVED_AT"]
    assert lines[1].split()[:4] == ["host-a", "APPROVED", "golden", "yes"]
    assert lines[2].split() == ["host-b", "PENDING", "-", "yes", "2024-05-01T10:00:00+00:00",
                                "-"]
    # aligned columns: STATUS starts at the same offset on every line
    assert len({line.index(word) for line, word in
                zip(lines, ["STATUS", "APPROVED", "PENDING"], strict=True)}) == 1


def test_hosts_list_json(engine: FakeEngine, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--format", "json", "hosts", "list")
    assert code == 0
    hosts = json.loads(out)
    assert [h["name"] for h in hosts] == ["host-a", "host-b"]
    assert set(hosts[0]) == {"name", "status", "policy_name", "ak_name", "enrolled_at",
                             "approved_at", "has_ek_certificate"}
    assert hosts[1]["policy_name"] is None and hosts[1]["has_ek_certificate"] is True


def test_format_after_subcommand(engine: FakeEngine, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "hosts", "show", "host-a", "--format", "json")
    assert code == 0 and json.loads(out)["name"] == "host-a"


@pytest.mark.parametrize("action,method,status", [
    ("show", "show_host", "APPROVED"), ("enroll", "enroll", "PENDING"),
    ("approve", "approve_host", "APPROVED"), ("revoke", "revoke_host", "REVOKED")])
def test_host_actions(engine: FakeEngine, capsys: pytest.CaptureFixture[str], action: str,
                      method: str, status: str) -> None:
    code, out, _ = run(capsys, "hosts", action, "host-c")
    assert code == 0
    assert engine.calls == [(method, "host-c")]
    rows = table(out)
    assert rows[0] == ["FIELD", "VALUE"]
    assert ["status", status] in rows and ["ak_name", "000b" + "ab" * 32] in rows
    code, out, _ = run(capsys, "--format", "json", "hosts", action, "host-c")
    assert json.loads(out)["status"] == status


def test_assign_policy(engine: FakeEngine, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "hosts", "assign-policy", "host-a", "golden")[0] == 0
    assert run(capsys, "hosts", "assign-policy", "host-a", "--none")[0] == 0
    assert engine.calls == [("assign_policy", "host-a", "golden"),
                            ("assign_policy", "host-a", None)]
    code, out, _ = run(capsys, "--format", "json", "hosts", "assign-policy", "h", "--none")
    assert json.loads(out)["policy_name"] is None


@pytest.mark.parametrize("argv", [["host-a"], ["host-a", "golden", "--none"]])
def test_assign_policy_needs_exactly_one(engine: FakeEngine, capsys: pytest.CaptureFixture[str],
                                         argv: list[str]) -> None:
    code, out, err = run(capsys, "hosts", "assign-policy", *argv)
    assert code == 2 and out == "" and "error:" in err
    assert engine.calls == []


# --- attest ------------------------------------------------------------------------------


def test_attest_one_trusted(engine: FakeEngine, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "hosts", "attest", "host-a")
    assert code == 0 and err == ""
    assert table(out)[0] == ["HOST", "STATUS", "ATTESTED_AT", "EXPIRES_AT", "REASON"]
    assert table(out)[1][:2] == ["host-a", "TRUSTED"]


def test_attest_one_untrusted_is_negative(engine: FakeEngine,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    engine.verdict_for["host-a"] = verdict("host-a", "UNTRUSTED", "PCR 7 differs")
    code, out, _ = run(capsys, "--format", "json", "hosts", "attest", "host-a")
    assert code == 1
    assert json.loads(out) == [{"host": "host-a", "status": "UNTRUSTED",
                                "reason": "PCR 7 differs",
                                "attested_at": "2024-05-01T10:10:00+00:00",
                                "expires_at": "2024-05-01T10:15:00+00:00"}]


def test_attest_many_shows_progress(engine: FakeEngine,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    engine.verdict_for["host-b"] = verdict("host-b", "UNKNOWN", "agent did not answer")
    code, out, err = run(capsys, "hosts", "attest", "host-a", "host-b", "host-c", "host-a")
    assert code == 1
    assert err.splitlines() == ["attesting 1/3 host-a ... TRUSTED",
                                "attesting 2/3 host-b ... UNKNOWN",
                                "attesting 3/3 host-c ... TRUSTED"]
    assert [r[:2] for r in table(out)[1:]] == [["host-a", "TRUSTED"], ["host-b", "UNKNOWN"],
                                               ["host-c", "TRUSTED"]]


def test_attest_many_all_trusted(engine: FakeEngine, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "--format", "json", "hosts", "attest", "host-a", "host-b")
    assert code == 0
    assert [v["status"] for v in json.loads(out)] == ["TRUSTED", "TRUSTED"]
    assert len(err.splitlines()) == 2


def test_attest_many_goes_on_after_a_host_error(engine: FakeEngine,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    engine.attest_errors["ghost"] = exception.NotFound(what="host", key="ghost")
    code, out, err = run(capsys, "--format", "json", "hosts", "attest", "ghost", "host-a")
    assert code == 3
    assert err.splitlines() == ["attesting 1/2 ghost ... ERROR: host ghost not found",
                                "attesting 2/2 host-a ... TRUSTED"]
    rows = json.loads(out)
    assert rows[0] == {"host": "ghost", "status": "ERROR", "reason": "host ghost not found",
                       "attested_at": None, "expires_at": None}
    assert rows[1]["status"] == "TRUSTED"


def test_attest_many_stops_when_engine_unreachable(engine: FakeEngine,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    engine.attest_errors["host-b"] = messaging.MessagingTimeout("Timed out")
    code, out, err = run(capsys, "hosts", "attest", "host-a", "host-b", "host-c")
    assert code == 5 and out == ""
    assert err.splitlines() == ["attesting 1/3 host-a ... TRUSTED",
                                "attesting 2/3 host-b ... FAILED",
                                "vtpcm-manage: error: engine unreachable: Timed out"]
    assert ("attest", "host-c") not in engine.calls


def test_attest_one_error_is_the_command_error(engine: FakeEngine,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    engine.attest_errors["host-a"] = exception.AttestationError(host="host-a",
                                                                reason="quote rejected")
    code, out, err = run(capsys, "hosts", "attest", "host-a")
    assert (code, out) == (4, "")
    assert err == ("vtpcm-manage: error: Attestation of host host-a failed: "
                   "quote rejected\n")


# --- policies ----------------------------------------------------------------------------


def test_policies_list(engine: FakeEngine, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "policies", "list")
    assert code == 0
    assert table(out) == [["NAME", "BANK", "PCRS", "DESCRIPTION"],
                          ["golden", "sha256", "0,7", "boot", "chain"]]
    code, out, _ = run(capsys, "--format", "json", "policies", "list")
    assert json.loads(out) == [{"name": "golden", "bank": "sha256",
                                "pcrs": {"0": "11" * 32, "7": DIGEST.hex()},
                                "description": "boot chain"}]


def test_policies_record(engine: FakeEngine, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "policies", "record", "gold", "--from-host", "host-a",
                       "--pcrs", "7, 0,1", "--description", "lab")
    assert code == 0
    assert engine.calls == [("record_policy", "gold", "host-a", (0, 1, 7), "lab")]
    rows = table(out)
    assert ["pcrs[0]", DIGEST.hex()] in rows and ["pcrs[7]", DIGEST.hex()] in rows


def test_policies_set(engine: FakeEngine, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--format", "json", "policies", "set", "gold",
                       "--pcr", "16=" + "00" * 32, "--pcr", f"7={DIGEST.hex().upper()}")
    assert code == 0
    (name, policy), = engine.calls
    assert name == "put_policy"
    assert policy == m.PolicyInfo("gold", "sha256", {16: bytes(32), 7: DIGEST}, "")
    assert json.loads(out)["pcrs"] == {"7": DIGEST.hex(), "16": "00" * 32}


@pytest.mark.parametrize("argv,complaint", [
    (["policies", "set", "g", "--pcr", "16=zz"], "64 hex digits"),
    (["policies", "set", "g", "--pcr", "16=" + "0" * 63], "64 hex digits"),
    (["policies", "set", "g", "--pcr", "24=" + "0" * 64], "between 0 and 23"),
    (["policies", "set", "g", "--pcr", "x=" + "0" * 64], "not an integer"),
    (["policies", "set", "g", "--pcr", "0" * 64], "INDEX=HEX"),
    (["policies", "set", "g", "--pcr", "1=" + "0" * 64, "--pcr", "1=" + "1" * 64],
     "PCR 1 given twice"),
    (["policies", "set", "g"], "--pcr"),
    (["policies", "record", "g", "--from-host", "h", "--pcrs", "0,x"], "not an integer"),
    (["policies", "record", "g", "--from-host", "h", "--pcrs", "0,0"], "twice"),
    (["policies", "record", "g", "--from-host", "h", "--pcrs", "0,,1"], "must be like"),
    (["policies", "record", "g", "--pcrs", "0"], "--from-host"),
    (["audit", "list", "--limit", "0"], "between 1 and 10000"),
    (["--timeout", "-1", "hosts", "list"], "timeout"),
    (["hosts", "frobnicate"], "invalid choice"),
    (["nonsense"], "invalid choice"),
    (["hosts"], "required"),
    ([], "required"),
])
def test_bad_input_is_a_usage_error(engine: FakeEngine, capsys: pytest.CaptureFixture[str],
                                    argv: list[str], complaint: str) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert "error:" in err and complaint in err
    assert "Traceback" not in err
    assert engine.calls == []


# --- verdicts, audit, vtpcm, migration ---------------------------------------------------


def test_verdicts_list(engine: FakeEngine, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "verdicts", "list")
    assert code == 0  # listing is not a judgement: UNTRUSTED rows are still success
    assert [r[:2] for r in table(out)[1:]] == [["host-a", "TRUSTED"], ["host-b", "UNTRUSTED"]]
    code, out, _ = run(capsys, "--format", "json", "verdicts", "list")
    assert [v["reason"] for v in json.loads(out)] == ["PCRs match", "PCR 7"]


def test_audit_list(engine: FakeEngine, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "audit", "list")
    assert code == 0
    assert table(out)[0] == ["AT", "EVENT", "OUTCOME", "HOST", "INSTANCE", "MIGRATION_ID",
                             "DETAIL"]
    assert table(out)[1] == ["2024-05-01T10:00:00+00:00", "host.approve", "approved", "host-a",
                             "-", "-", "by", "operator"]
    code, out, _ = run(capsys, "--format", "json", "audit", "list", "--host", "host-a",
                       "--limit", "5")
    assert json.loads(out)[0]["event"] == "host.approve"
    assert engine.calls == [("list_audit", 100, None), ("list_audit", 5, "host-a")]


def test_vtpcm_show(engine: FakeEngine, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "vtpcm", "show", INSTANCE)
    assert code == 0
    assert ["generation", "3"] in table(out) and ["migration_id", "-"] in table(out)
    code, out, _ = run(capsys, "--format", "json", "vtpcm", "show", INSTANCE)
    assert json.loads(out) == {"instance_uuid": INSTANCE, "vtpcm_id": VTPCM_ID,
                               "host": "host-a", "generation": 3, "state": "ACTIVE",
                               "migration_id": None}


def test_vtpcm_list_by_state(engine: FakeEngine, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--format", "json", "vtpcm", "list", "--state", "SHELVED")
    assert code == 0 and engine.calls[-1] == ("list_vtpcms", "SHELVED", None)
    assert [v["state"] for v in json.loads(out)] == ["SHELVED"]


def test_migration_show(engine: FakeEngine, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "migration", "show", MIGRATION)
    assert code == 0 and ["state", "COMMITTED"] in table(out)
    code, out, _ = run(capsys, "--format", "json", "migration", "show", MIGRATION)
    assert json.loads(out)["dest"] == "host-b"
    assert engine.calls[-1] == ("get_migration", MIGRATION)


def test_table_cells_are_one_line_without_control_characters(
        engine: FakeEngine, capsys: pytest.CaptureFixture[str]) -> None:
    engine.verdict_for["host-a"] = verdict("host-a", "UNTRUSTED", "bad\nline \x1b[31mred")
    code, out, _ = run(capsys, "hosts", "attest", "host-a")
    assert code == 1
    assert len(out.splitlines()) == 2 and "\x1b" not in out
    assert out.splitlines()[1].endswith("bad line ?[31mred")


# --- exit codes for errors ---------------------------------------------------------------


@pytest.mark.parametrize("error,code,message", [
    (exception.NotFound(what="host", key="ghost"), 3, "host ghost not found"),
    (exception.InvalidInput(reason="bad host name"), 4, "Invalid input: bad host name"),
    (exception.InvalidPayload(message_type="host_info", field="status",
                              reason="must be one of PENDING"),
     4, "Invalid host_info payload: field status: must be one of PENDING"),
    (exception.HostNotTrusted(host="h", reason="stale verdict"), 4,
     "Host h is not trusted: stale verdict"),
    (exception.InvalidTransition(what="host", key="h", current="REVOKED", target="APPROVED"),
     4, "Illegal transition of host h from REVOKED to APPROVED"),
    (exception.VTPCMException(message="remote error KeyError: 'x'"), 4,
     "remote error KeyError: 'x'"),
    (messaging.MessagingTimeout("Timed out waiting for a reply"), 5,
     "engine unreachable: Timed out waiting for a reply"),
    (messaging.MessageDeliveryFailure("no route"), 5,
     "engine unreachable: MessageDeliveryFailure: no route"),
    (ConnectionRefusedError(111, "Connection refused"), 5,
     "engine unreachable: ConnectionRefusedError: [Errno 111] Connection refused"),
])
def test_error_exit_codes(engine: FakeEngine, capsys: pytest.CaptureFixture[str],
                          error: BaseException, code: int, message: str) -> None:
    engine.errors["approve_host"] = error
    got, out, err = run(capsys, "--format", "json", "hosts", "approve", "host-a")
    assert (got, out) == (code, "")
    assert err == f"vtpcm-manage: error: {message}\n"


def test_amqp_error_is_unreachable(engine: FakeEngine, capsys: pytest.CaptureFixture[str]) -> None:
    import amqp.exceptions as amqp_exceptions  # oslo.messaging's rabbit driver brings it
    engine.errors["list_hosts"] = amqp_exceptions.AccessRefused("Login was refused")
    code, _, err = run(capsys, "hosts", "list")
    assert code == 5 and err.startswith("vtpcm-manage: error: engine unreachable: ")


def test_hung_call_gives_up_after_the_deadline(engine: FakeEngine,
                                               capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manage, "DEADLINE_GRACE", 0.0)
    engine.block = threading.Event()
    try:
        code, out, err = run(capsys, "--timeout", "0.2", "hosts", "list")
    finally:
        engine.block.set()
    assert (code, out) == (5, "")
    assert err == ("vtpcm-manage: error: engine unreachable: no reply from vtpcm-engine "
                   "within 0.2 s\n")


def test_help_lists_exit_codes(engine: FakeEngine, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for line in ("0  success", "1  the operation ran but the answer is negative",
                 "2  usage or configuration error", "3  not found",
                 "4  refused or invalid", "5  engine unreachable"):
        assert line in out
    assert "exit codes" in (manage.__doc__ or "").lower()


# --- configuration -----------------------------------------------------------------------


def test_config_file_and_timeout_reach_the_client(engine: FakeEngine, tmp_path: Any,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    conf_file = tmp_path / "engine.conf"
    conf_file.write_text("[engine]\nrpc_timeout = 7\n[DEFAULT]\ndebug = true\n")
    code, _, _ = run(capsys, "--config-file", str(conf_file), "--timeout", "9", "hosts", "list")
    assert code == 0
    seen = engine.seen  # type: ignore[attr-defined]
    assert seen["timeout"] == 9.0
    assert seen["conf"].engine.rpc_timeout == 7.0 and seen["conf"].debug is True
    assert seen["conf"] is not cfg.CONF


def test_missing_config_file(engine: FakeEngine, tmp_path: Any,
                             capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "--config-file", str(tmp_path / "nope.conf"), "hosts", "list")
    assert (code, out) == (2, "")
    assert err.startswith("vtpcm-manage: error: configuration: ") and "nope.conf" in err
    assert engine.calls == []


def test_unparsable_config_never_echoes_the_line(engine: FakeEngine, tmp_path: Any,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    conf_file = tmp_path / "engine.conf"
    conf_file.write_text("[DEFAULT]\n  transport_url = rabbit://u:hunter2@broker//\n")
    code, out, err = run(capsys, "--config-file", str(conf_file), "hosts", "list")
    assert (code, out) == (2, "")
    assert err == (f"vtpcm-manage: error: cannot parse configuration file {conf_file} "
                   "at line 2\n")
    assert "hunter2" not in err


def test_real_client_without_engine_is_unreachable(tmp_path: Any,
                                                   capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The real EngineAPI on oslo's in-memory fake:// driver, no engine listening."""
    monkeypatch.setattr(cfg, "find_config_files", lambda **kw: [])
    conf_file = tmp_path / "engine.conf"
    conf_file.write_text("[DEFAULT]\ntransport_url = fake:/\n")
    for _ in range(2):  # a private ConfigOpts per run: main() twice in one process
        code, out, err = run(capsys, "--config-file", str(conf_file), "--timeout", "0.3",
                             "hosts", "list")
        assert (code, out) == (5, "")
        assert err.startswith("vtpcm-manage: error: engine unreachable: ")


# --- operator keys -------------------------------------------------------------------------

ADMIN_ARGV = [
    ["hosts", "enroll", "host-a"],
    ["hosts", "approve", "host-a"],
    ["hosts", "revoke", "host-a"],
    ["hosts", "assign-policy", "host-a", "golden"],
    ["policies", "record", "gold", "--from-host", "host-a", "--pcrs", "0,7"],
    ["policies", "set", "gold", "--pcr", "7=" + "00" * 32],
    ["migration", "resolve", MIGRATION, "--to", "source"],
    ["hosts", "forget", "host-a"],
    ["vtpcm", "destroy", "4f7f1c3e-8c1b-4a43-9d57-2b1f0d1e5a10", "--yes"],
]


def test_admin_commands_are_exactly_the_engine_admin_methods(
        engine: FakeEngine, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in ADMIN_ARGV:
        assert run(capsys, *argv)[0] == 0
    # vtpcm destroy reads the record first, to show its plan
    assert {call[0] for call in engine.calls} - {"get_vtpcm"} == rpcapi.ADMIN_METHODS
    assert len(manage.ADMIN_COMMANDS) == len(rpcapi.ADMIN_METHODS)


@pytest.mark.parametrize("argv", ADMIN_ARGV, ids=lambda a: "-".join(a[:2]))
def test_admin_command_without_key_stops_before_calling(
        keyless: FakeEngine, capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    code, out, err = run(capsys, *argv)
    assert (code, out) == (2, "")
    assert err.startswith(f"vtpcm-manage: error: '{argv[0]} {argv[1]}' must be signed with "
                          "an operator key: pass --admin-key PATH")
    assert keyless.calls == [] and "conf" not in keyless.seen  # type: ignore[attr-defined]


def test_read_only_commands_need_no_key(keyless: FakeEngine,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["hosts", "list"], ["hosts", "attest", "host-a"], ["verdicts", "list"],
                 ["policies", "list"], ["audit", "list"]):
        assert run(capsys, *argv)[0] == 0, argv


def test_admin_key_option_reaches_the_client(keyless: FakeEngine, operator_key: Any,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "--admin-key", str(operator_key), "hosts", "approve", "h")
    assert (code, err) == (0, "")
    assert keyless.calls == [("approve_host", "h")]
    conf = keyless.seen["conf"]  # type: ignore[attr-defined]
    assert conf.manage.admin_key == str(operator_key)
    signer = rpcapi.admin_signer_from_conf(conf)
    assert signer is not None
    assert signer.fingerprint == authn.load_signing_key(operator_key).fingerprint


def test_admin_key_option_overrides_the_config(engine: FakeEngine, tmp_path: Any,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "other.key"
    authn.load_or_create_signing_key(other)
    assert run(capsys, "--admin-key", str(other), "hosts", "revoke", "h")[0] == 0
    assert engine.seen["conf"].manage.admin_key == str(other)  # type: ignore[attr-defined]


def test_unusable_admin_key_is_a_usage_error(keyless: FakeEngine, tmp_path: Any,
                                             operator_key: Any,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "--admin-key", str(tmp_path / "nope.key"), "hosts", "list")
    assert (code, out) == (2, "")
    assert "[manage] admin_key" in err and "nope.key" in err
    operator_key.chmod(0o640)
    code, _, err = run(capsys, "--admin-key", str(operator_key), "hosts", "approve", "h")
    assert code == 2 and "chmod 600" in err
    assert keyless.calls == []


def test_keys_create_makes_a_private_pair_and_is_repeatable(
        keyless: FakeEngine, tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ops" / "alice.key"
    code, out, err = run(capsys, "--format", "json", "keys", "create", str(path))
    assert code == 0 and "BEGIN" not in err
    made = json.loads(out)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    pub = authn.public_key_path(path)
    assert made == {"private_key": str(path), "public_key": str(pub),
                    "fingerprint": authn.fingerprint(authn.load_public_key(pub)),
                    "created": True}
    pem = path.read_text()
    assert "".join(pem.strip().splitlines()[1:-1]) not in out + err
    code, out, _ = run(capsys, "keys", "create", str(path))  # table; the key is kept
    assert code == 0
    assert ["fingerprint", made["fingerprint"]] in table(out) and ["created", "no"] in table(out)
    assert path.read_text() == pem
    assert keyless.calls == [] and "conf" not in keyless.seen  # type: ignore[attr-defined]


def test_keys_create_refuses_a_file_that_is_not_a_key(
        keyless: FakeEngine, tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    path.chmod(0o600)
    code, out, err = run(capsys, "keys", "create", str(path))
    assert (code, out) == (2, "") and "not an unencrypted PEM private key" in err
    assert path.read_text() == "hello"


def test_resolve_and_forget_only_show_the_plan_without_yes(
        engine: FakeEngine, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--format", "json", "migration", "resolve", MIGRATION,
                       "--to", "destination")
    assert code == 0 and engine.calls[-1] == ("resolve_migration", MIGRATION,
                                              "destination", False)
    shown = json.loads(out)
    assert shown["done"] is False and shown["next"].startswith("Nothing was done")
    code, out, _ = run(capsys, "--format", "json", "hosts", "forget", "host-a", "--yes")
    assert code == 0 and engine.calls[-1] == ("forget_host", "host-a", True)
    assert json.loads(out)["done"] is True and "next" not in json.loads(out)
    code, _, err = run(capsys, "migration", "resolve", MIGRATION, "--to", "nowhere")
    assert code == 2 and "invalid choice: 'nowhere'" in err
    run(capsys, "migration", "resolve", MIGRATION, "--to", "source", "--past-commit")
    assert engine.calls[-1] == ("resolve_migration", MIGRATION, "source", False,
                                "past_commit")
    run(capsys, "hosts", "forget", "host-a", "--despite-unverified-answers", "--yes")
    assert engine.calls[-1] == ("forget_host", "host-a", True, "despite_unverified_answers")


def test_vtpcm_destroy_of_a_live_record_shows_the_plan_and_waits_for_yes(
        engine: FakeEngine, capsys: pytest.CaptureFixture[str]) -> None:
    """An ACTIVE vTPCM the engine reported orphaned: Nova's word may be
    forged, so the operator sees what would be shredded and must say --yes."""
    instance = "4f7f1c3e-8c1b-4a43-9d57-2b1f0d1e5a10"
    code, out, _ = run(capsys, "vtpcm", "destroy", instance)
    assert code == 0
    assert "crypto-shred the ACTIVE vTPCM of instance %s on host-a" % instance in out
    assert "Nothing was done" in out
    assert [c[0] for c in engine.calls] == ["get_vtpcm"]
    code, out, _ = run(capsys, "vtpcm", "destroy", instance, "--yes")
    assert code == 0 and "crypto-shred the ACTIVE vTPCM" in out
    assert [c[0] for c in engine.calls] == ["get_vtpcm", "get_vtpcm", "destroy_shelved_vtpcm"]
