"""Fingerprints of every RPC message type of both contracts (as Nova's
``TestObjectVersions``): a change to a message's fields, checkers, bounds,
defaults or secrecy changes what old peers accept, so it must come with a
new RPC API version. The fingerprint covers what decides the wire format:
each field's name, its checker (the checker factory and every value it
closes over: bounds, patterns, nested checkers and message types,
recursively), its default and whether it is secret.

Each expected value is ``"<version>-<hash>"``: the API version in which the
message last changed (for messages older than this test: as the version
history tells), then the hash. A hash that changes while its version does
not is a missed version bump; reviewers look for it.
"""

import dataclasses
import hashlib
import inspect
import re
from types import ModuleType
from typing import Any

from vtpcm_common.api.agent import messages as agent_messages
from vtpcm_common.api.agent import rpcapi as agent_rpcapi
from vtpcm_common.api.engine import messages as engine_messages
from vtpcm_common.api.engine import rpcapi as engine_rpcapi
from vtpcm_common.wire import Message

CONTRACTS: dict[str, tuple[ModuleType, ModuleType]] = {
    "agent": (agent_messages, agent_rpcapi),
    "engine": (engine_messages, engine_rpcapi),
}

EXPECTED = {
    "agent.ActivatedCredential": "1.5-45cbe47ac000da3c4159f3a2afdb5666",
    "agent.CredentialChallenge": "1.5-c7f8da0a35a4074dbc5e1bbfa1bcde1a",
    "agent.Empty": "1.0-818badba1c71c4ab7c0212d69a69f34a",
    "agent.Health": "1.0-a50c42d27470f7f27f075bd69175869d",
    "agent.HostIdentity": "1.10-93a96c6d5fca6a19298a71078e031e59",
    "agent.IdentityRequest": "1.10-bd48798766494280b7b0cdfc3c95e6fc",
    "agent.IncomingState": "1.7-d824bbf8d37b837f6bb1ebd7dc11b38c",
    "agent.InstanceRef": "1.11-ff07495e18b7fdcc23887e402e5dfcc1",
    "agent.MigrationContext": "1.2-96dc10cc9842957b14de71db8c189101",
    "agent.MigrationStep": "1.2-c1a45072efae4d146aaf482df7bf1d67",
    "agent.ParentCertification": "1.10-e0a361be4ed7b63a329dda811ada8e76",
    "agent.PrepareIncoming": "1.2-71f539ac4f2d7c359f65a72c1ebe56ab",
    "agent.Quote": "1.9-3f63e04b8690cf3e63170e46d4a13115",
    "agent.ReclaimOutgoing": "1.8-70070c9e92ca40e0c2d985df0e158011",
    "agent.QuoteRequest": "1.9-a5398127d6a53f2d057468ebdfc82bdf",
    "agent.SealRequest": "1.2-25cb7551911966276bb411fb01f74d4d",
    "agent.SealedKey": "1.2-9cc3bf09de33629187dc6da2e5411878",
    "agent.StateBlobs": "1.0-315d79c47ea96a73b4b3c8e38e5569ea",
    "agent.StateDigest": "1.13-130e7aab69dfc61bd0cdbd27c5f11cb6",
    "agent.StateDigestRequest": "1.13-acca0bf104fe5a06955efdefdd19e7d1",
    "agent.VTPCMInfo": "1.11-547a4c4742282d1e152fd59a13b1ab86",
    "agent.VTPCMList": "1.11-7a0d8be89602cfeddec00b3056d71ca2",
    "engine.AbortMigration": "1.10-1aa47c1d832d69c1eb120ca7245f8827",
    "engine.AssignPolicy": "1.0-7b1136920f819b1c8a2a5517a8dff2ea",
    "engine.AuditEntry": "1.0-47f4c5c683e20fca6104ae0de010303d",
    "engine.ApiWitness": "1.12-a84b1decc5e22547e9e3dac12d1059ea",
    "engine.AuditList": "1.0-800e15880465a488d0dcee3d3967fc14",
    "engine.AuditQuery": "1.0-b77818f7d6e99bd7083ac1c0703f9454",
    "engine.BeginMigration": "1.0-1f95fc8ba43bfafc9f909739d693ba3e",
    "engine.CheckDestination": "1.0-1b512069b0b5d2d920970f961dd4dd82",
    "engine.Empty": "1.0-818badba1c71c4ab7c0212d69a69f34a",
    "engine.HostCommandKey": "1.4-9ea8434651c34cc0b88ce81f56c280b6",
    "engine.HostInfo": "1.0-4bd020e14e88813e679d28854658a894",
    "engine.HostKeyQuery": "1.6-9ec7469e9abc834ff078f758a65d428c",
    "engine.HostList": "1.0-8b851faf540cd5120f64905fae7d6fda",
    "engine.HostRef": "1.0-531a64db7790294686558a2a4b15ba96",
    "engine.InstanceRef": "1.0-bfbfdbbe7ab9a659de5413dfda72f078",
    "engine.MigrationInfo": "1.0-e8a785277f1a9211c05e26111df7a560",
    "engine.MigrationRef": "1.0-9d081967749d6ceac8fc3294582c30a7",
    "engine.PolicyInfo": "1.0-063d035b351feb4d2b766e83484013ea",
    "engine.PolicyList": "1.0-c1814d864e97263548f4f5c682a6a0fd",
    "engine.RecordPolicy": "1.0-31b202c35c4d86af4cc8e09d41b67b2a",
    "engine.SignedHostCommandKey": "1.6-cf3f8bb00334cdadf256b85864528aec",
    "engine.CommitMigration": "1.11-8315f5f6c95553ff686dfb194e8d1797",
    "engine.TrustedHosts": "1.9-201c76585917349cb20b6fca35c95288",
    "engine.TrustedHostsQuery": "1.9-1dee623cd26106a3e655e625b38f4fce",
    "engine.Verdict": "1.0-ba4b76b44e652a9e065afaffcac7872c",
    "engine.VerdictList": "1.0-f883eb197d2acddb6151b2c4e43642d7",
    "engine.VtpcmPlacement": "1.0-b43f96cbda15440f49455ee922f7a6fb",
    "engine.VtpcmRecord": "1.0-2a49d40912900646e97960fac5d7125d",
    "engine.VtpcmList": "1.8-2117d9d49a0bc6155a21187a123661bc",
    "engine.VtpcmQuery": "1.8-eb76fc43cd8a4b94e4a13744574f8ba7",
    "engine.VtpcmStatus": "1.3-475e6b1ec7a0b869735dcefdb51f4a0c",
    "engine.ForgetHost": "1.8-254dfc95f3d2400a7f95ad6278fcba40",
    "engine.Resolution": "1.7-6b995ffd26a29cb70a92fedc3ec43dab",
    "engine.ResolveMigration": "1.13-bbe0151091e6598a9d9c826ee7e8b4c2",
    "engine.SwtpmRestartReport": "1.7-3e7effc8539641dd2bfaa61089680f58",
}


def describe(value: Any) -> str:
    """A stable text for a checker or a value a checker closes over."""
    if isinstance(value, type) and issubclass(value, Message):
        return "message %s {%s}" % (value.message_type, schema(value))
    if isinstance(value, re.Pattern):
        return "re(%r)" % value.pattern
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return repr(value)
    if isinstance(value, (tuple, list, frozenset, set)):
        items = [describe(v) for v in value]
        return "[%s]" % ", ".join(sorted(items) if isinstance(value, (set, frozenset))
                                  else items)
    if inspect.isfunction(value):
        cells = value.__closure__ or ()
        bound = ", ".join("%s=%s" % (name, describe(cell.cell_contents))
                          for name, cell in zip(value.__code__.co_freevars, cells,
                                                strict=True))
        return "%s(%s)" % (value.__qualname__, bound)
    raise TypeError("cannot fingerprint %r: teach describe() about it" % (value,))


def schema(cls: type[Message]) -> str:
    parts = []
    for spec in sorted(dataclasses.fields(cls), key=lambda f: f.name):
        default = "required" if spec.default is dataclasses.MISSING else \
            "default=" + describe(spec.default)
        parts.append("%s: %s %s%s%s" % (
            spec.name, describe(spec.metadata["check"]), default,
            " secret" if spec.metadata.get("secret") else "",
            " omit_default" if spec.metadata.get("omit_default") else ""))
    return "; ".join(parts)


def fingerprint(cls: type[Message]) -> str:
    text = "%s|%s" % (cls.message_type, schema(cls))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def message_types(module: ModuleType) -> dict[str, type[Message]]:
    return {name: value for name, value in vars(module).items()
            if isinstance(value, type) and issubclass(value, Message)
            and value.__module__ == module.__name__}


def actual_hashes() -> dict[str, str]:
    return {"%s.%s" % (contract, name): fingerprint(cls)
            for contract, (module, _) in CONTRACTS.items()
            for name, cls in message_types(module).items()}


def test_message_schemas_match_their_fingerprints():
    actual = actual_hashes()
    expected = {key: value.partition("-")[2] for key, value in EXPECTED.items()}
    changed = sorted(key for key in set(actual) | set(expected)
                     if actual.get(key) != expected.get(key))
    if not changed:
        return
    lines = []
    for key in changed:
        contract = key.partition(".")[0]
        current = CONTRACTS[contract][1].RPC_API_VERSION
        old = EXPECTED.get(key, "(new)")
        new = ("%s-%s" % (current, actual[key])) if key in actual else "(removed)"
        lines.append("    %r: %r,  # was %s" % (key, new, old))
    raise AssertionError(
        "RPC message types changed:\n%s\n"
        "A changed, new or removed message changes what peers of another release "
        "accept (Message.from_wire refuses unknown fields and needs every field "
        "without a default). Before updating EXPECTED in %s:\n"
        "  1. bump RPC_API_VERSION in vtpcm_common/api/<agent|engine>/rpcapi.py and add "
        "a line to its version history;\n"
        "  2. prepare the methods that send or expect the new form with the new version "
        "(and add them to tests/unit/common/test_rpcapi.py), so older servers refuse "
        "them and [upgrade_levels] can hold them back;\n"
        "  3. then put the lines above into EXPECTED (their version is the bumped "
        "RPC_API_VERSION)." % ("\n".join(lines), __file__))


def test_recorded_versions_are_versions_of_their_api():
    for key, value in EXPECTED.items():
        contract = key.partition(".")[0]
        version = value.partition("-")[0]
        current = CONTRACTS[contract][1].RPC_API_VERSION
        major, minor = (int(x) for x in version.split("."))
        cur_major, cur_minor = (int(x) for x in current.split("."))
        assert major == cur_major and minor <= cur_minor, (key, value, current)


def test_describe_sees_bounds_patterns_and_nesting():
    """The fingerprint changes with what a checker closes over, not only its kind."""
    from vtpcm_common import wire
    assert describe(wire.int_field(0, 5)) != describe(wire.int_field(0, 6))
    assert describe(wire.text_field(8, "[a-z]+")) != describe(wire.text_field(8, "[a-y]+"))
    assert describe(wire.optional(wire.uuid_field)) != describe(wire.uuid_field)
    nested = describe(wire.message_list_field(agent_messages.VTPCMInfo))
    assert "message vtpcm_info" in nested and "ctrl_socket" in nested


# The signed-reply envelope and the signed document are part of the agent
# contract too (agent API 1.6): a change needs a new version, as a message's.
REPLY_SCHEME = "1.6-%s"
EXPECTED_REPLY_SCHEME = "1.6-4cb810ae9515cc55699391ca9b1922b8"


def _reply_scheme_hash() -> str:
    from vtpcm_common import authn
    sample = authn.reply_bytes("1.6", "m", "h", "0" * 32, "r", {"ok": {}})
    return hashlib.md5(repr((authn.REPLY_TAG, sorted(authn.REPLY_FIELDS),
                             sorted(authn.ERROR_FIELDS), sample,
                             agent_rpcapi.REPLY_VERSION,
                             sorted(agent_rpcapi.UNVERIFIED_REPLIES))).encode(),
                       usedforsecurity=False).hexdigest()


def test_signed_reply_scheme_matches_its_fingerprint():
    assert REPLY_SCHEME % _reply_scheme_hash() == EXPECTED_REPLY_SCHEME, \
        "signed replies changed: bump the agent API and record %s" % _reply_scheme_hash()
