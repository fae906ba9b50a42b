"""Issue 9 point 3, agent side: unsigned TPM calls beyond the rate limit are
refused before the TPM is touched; the engine's vouched (signed) calls are
not counted, and a vouched call whose signature does not verify is refused."""

import logging
import uuid
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from oslo_messaging.rpc.dispatcher import ExpectedException

from vtpcm_agent import association, instances
from vtpcm_agent.hosttpm import QuoteResult
from vtpcm_agent.keystore import DevKeyFileHostKey, KeyStore
from vtpcm_agent.manager import AgentManager
from vtpcm_common import authn, exception
from vtpcm_common.api.agent import messages as m
from vtpcm_common.ratelimit import TokenBucket

HOST = "cmp1"


class CountingTPM:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def quote(self, nonce: bytes, pcrs: Any, bank: str) -> QuoteResult:
        self.calls.append("quote")
        return QuoteResult(attest=b"a", signature=b"s", pcr_values={0: b"\0" * 32})

    def activate_credential(self, blob: bytes, secret: bytes, *, signed: bool = False) -> bytes:
        self.calls.append("activate_credential")
        return b"k" * 32


class Frozen:
    def __call__(self) -> float:
        return 0.0


@pytest.fixture
def agent(tmp_path: Path) -> Any:
    engine = authn.CommandSigner(ed25519.Ed25519PrivateKey.generate())
    (tmp_path / "engine.pub").write_bytes(engine.public_key_pem())
    tpm = CountingTPM()
    manager = AgentManager(HOST, None, tpm,  # type: ignore[arg-type]
                           verifier=authn.CommandVerifier(tmp_path / "engine.pub", HOST),
                           unsigned_limit=TokenBucket(1.0, 2, clock=Frozen()),
                           activation_limit=TokenBucket(1.0, 1, clock=Frozen()))
    return manager, tpm, engine


def _call(manager: AgentManager, method: str, payload: Any, auth: Any = None) -> Any:
    try:
        return getattr(manager, method)({}, payload=payload, auth=auth)
    except ExpectedException as err:
        raise err.exc_info[1] from None


QUOTE = m.QuoteRequest(b"n" * 32, (0,), "sha256").to_wire()
IDENTITY = m.IdentityRequest(b"n" * 32).to_wire()
CHALLENGE = m.CredentialChallenge(b"\x00\x01b", b"\x00\x01s").to_wire()


def test_unsigned_calls_beyond_the_limit_never_reach_the_tpm(agent: Any) -> None:
    manager, tpm, _ = agent
    _call(manager, "quote", QUOTE)
    _call(manager, "quote", QUOTE)
    with pytest.raises(exception.RateLimited, match="Too many unsigned TPM calls"):
        _call(manager, "quote", QUOTE)
    _call(manager, "activate_credential", CHALLENGE)  # a bucket of its own
    with pytest.raises(exception.RateLimited, match="Too many credential activations"):
        _call(manager, "activate_credential", CHALLENGE)
    assert tpm.calls == ["quote", "quote", "activate_credential"]


def test_the_engines_vouched_calls_are_not_counted(agent: Any) -> None:
    manager, tpm, engine = agent
    for _ in range(2):
        _call(manager, "quote", QUOTE)  # the flood used up the bucket
    for _ in range(5):
        _call(manager, "quote", QUOTE, engine.sign("quote", HOST, QUOTE))
        _call(manager, "activate_credential", CHALLENGE,
              engine.sign("activate_credential", HOST, CHALLENGE))
    assert tpm.calls.count("quote") == 7 and tpm.calls.count("activate_credential") == 5


def test_only_a_verified_engine_call_counts_as_the_engines_contact(agent: Any) -> None:
    """The agent stops announcing itself once the engine called (finding 2)."""
    manager, _, engine = agent
    rogue = authn.CommandSigner(ed25519.Ed25519PrivateKey.generate())
    _call(manager, "quote", QUOTE)
    with pytest.raises(exception.CommandRefused, match="does not verify"):
        _call(manager, "get_identity", IDENTITY, rogue.sign("get_identity", HOST, IDENTITY))
    assert not manager.engine_contact.is_set()
    _call(manager, "quote", QUOTE, engine.sign("quote", HOST, QUOTE))
    assert manager.engine_contact.is_set()


def test_a_vouched_call_that_does_not_verify_is_refused(agent: Any) -> None:
    manager, tpm, engine = agent
    rogue = authn.CommandSigner(ed25519.Ed25519PrivateKey.generate())
    with pytest.raises(exception.CommandRefused, match="does not verify"):
        _call(manager, "quote", QUOTE, rogue.sign("quote", HOST, QUOTE))
    signed = engine.sign("quote", HOST, QUOTE)
    _call(manager, "quote", QUOTE, signed)
    with pytest.raises(exception.CommandRefused):  # replayed
        _call(manager, "quote", QUOTE, signed)
    with pytest.raises(exception.CommandRefused, match="misdirected"):
        _call(manager, "quote", QUOTE, engine.sign("quote", "cmp2", QUOTE))
    assert tpm.calls == ["quote"]


def test_a_flood_of_refusals_is_logged_at_debug_with_a_bounded_warning(
        agent: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Review finding 6: each refused unsigned call (rate-limited, or with a
    bogus ``auth``) was one WARNING line: 2000 calls, 1998 lines."""
    manager, tpm, _ = agent
    caplog.set_level(logging.DEBUG)
    refused = 0
    for i in range(200):
        try:
            _call(manager, "quote", QUOTE, None if i % 2 else {"garbage": 1})
        except (exception.RateLimited, exception.CommandRefused):
            refused += 1
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    debug = [r for r in caplog.records
             if r.levelno == logging.DEBUG and "Refused quote" in r.getMessage()]
    assert refused == 198 and len(tpm.calls) == 2  # the bucket's burst
    assert len(debug) == refused
    assert len(warnings) <= 1  # the periodic count (once a minute per process)
    assert all("calls refused" in r.getMessage() for r in warnings)


def _manager_over_real_files(tmp_path: Path) -> tuple[AgentManager, Any]:
    settings = instances.AgentSettings(host=HOST, state_root=tmp_path / "s",
                                       run_dir=tmp_path / "r",
                                       subid_files=(tmp_path / "none",))
    im = instances.InstanceManager(
        settings, association.AssociationList(tmp_path / "a.sqlite"),
        KeyStore(tmp_path / "k", DevKeyFileHostKey(tmp_path / "hk")))
    return AgentManager(HOST, im), im


def _digest_request(instance_uuid: str) -> dict[str, Any]:
    ctx = m.MigrationContext(migration_id=str(uuid.uuid4()), instance_uuid=instance_uuid,
                             generation=0, source_host=HOST, dest_host="other")
    return m.StateDigestRequest(context=ctx, side="source", nonce=b"n" * 32).to_wire()


def test_unsigned_state_digests_for_unknown_instances_leave_no_lock_behind(tmp_path: Path):
    """state_digest is unsigned: a broker client's requests for instances
    this agent does not know are refused (NotFound) before the per-instance
    lock, which is never freed, is made (review of the unsigned request,
    MEDIUM: 20,000 random ids left 20,000 locks)."""
    agent, im = _manager_over_real_files(tmp_path)
    for _ in range(200):
        with pytest.raises(ExpectedException) as caught:
            agent.state_digest({}, payload=_digest_request(str(uuid.uuid4())))
        assert isinstance(caught.value.exc_info[1], exception.NotFound)
    assert im._locks == {}
    # positive control: a known instance does take its lock (then is
    # refused: it is not migrating out), so the count above can move
    known = str(uuid.uuid4())
    im.associations.add(instance_uuid=known, vtpcm_id=str(uuid.uuid4()),
                        state=association.VTPCMState.CREATING, generation=0,
                        state_dir=str(tmp_path / "sd"), ctrl_socket=str(tmp_path / "c"))
    with pytest.raises(ExpectedException):
        agent.state_digest({}, payload=_digest_request(known))
    assert list(im._locks) == [known]
