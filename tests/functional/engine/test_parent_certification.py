"""An interposer present at the agent's FIRST start is refused at enrollment
(issue 9: the end of trust on first use of the pinned storage parents).

Real swtpm host TPM stand-in, the agent's real ``HostTPM`` (first start:
it creates its keys and pins the parents it sees) and the engine's real
``Attestor`` on SQLite, through an in-process agent client (no broker
needed). The interposer (``tpmmitm.SessionInterposer``) swaps the storage
primaries for keys of its own and terminates every session salted to them,
so behind it the agent works normally, pins the interposer's keys and
would hand it every secret. Before the engine checked the AK's
TPM2_CertifyCreation of the parents, such a host enrolled like any other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from tests.functional.hosttpm_fixture import (  # noqa: F401
    TEST_KEY_AUTH,
    HostTPMStandIn,
    host_tpm_standin,
)
from tests.functional.tpmmitm import session_interposer
from vtpcm_agent import hostkeys
from vtpcm_agent.hosttpm import HostTPM
from vtpcm_common import authn, exception
from vtpcm_common.api.agent import messages as m
from vtpcm_common.api.agent.rpcapi import UNVERIFIED_REPLIES
from vtpcm_nova.engine.attestation import PARENTS_ASKED, Attestor
from vtpcm_nova.engine.db import migration
from vtpcm_nova.engine.db.api import Database

pytestmark = pytest.mark.functional

HOST = "tofu-host"


class HostTPMAgent:
    """The Attestor's agent client, answered by a host TPM in this process
    as the agent's ``get_identity`` answers a 1.10 engine."""

    def __init__(self, tpm: HostTPM) -> None:
        self.tpm = tpm
        self.command_public = authn.public_raw(
            ed25519.Ed25519PrivateKey.generate().public_key())

    def get_identity(self, host: str, nonce: bytes) -> Mapping[str, Any]:
        ident = self.tpm.identity(authn.host_key_binding(nonce, self.command_public, host),
                                  rotate_kem=True, parents=True)
        return dict(dataclasses.asdict(ident), command_public=self.command_public,
                    parent_certs=[c._asdict() for c in ident.parent_certs],
                    **{PARENTS_ASKED: True})

    def quote(self, host: str, nonce: bytes, pcrs: Sequence[int],
              bank: str) -> Mapping[str, Any]:
        return dataclasses.asdict(self.tpm.quote(nonce, pcrs, bank))

    def activate_credential(self, host: str, credential_blob: bytes,
                            encrypted_secret: bytes) -> bytes:
        return self.tpm.activate_credential(credential_blob, encrypted_secret)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    migration.db_sync(f"sqlite:///{tmp_path}/engine.sqlite")
    database = Database(f"sqlite:///{tmp_path}/engine.sqlite")
    try:
        yield database
    finally:
        database.dispose()


def attestor(db: Database, tpm: HostTPM) -> Attestor:
    return Attestor(db, lambda: HostTPMAgent(tpm), verdict_ttl=600, nonce_ttl=30,
                    require_certified_parents=True)


def test_an_interposer_present_at_first_start_is_refused_at_enrollment(
        host_tpm_standin: HostTPMStandIn, db: Database,  # noqa: F811
        tmp_path: Path) -> None:
    key_file = tmp_path / "hostkeys.tpm"
    with session_interposer(host_tpm_standin.tcti) as mitm:
        with HostTPM(mitm.tcti, TEST_KEY_AUTH, key_file=key_file) as tpm:
            # first start behind the interposer: the agent notices nothing
            tpm.quote(b"q" * 16, [0])
            with pytest.raises(exception.CertificationError) as err:
                attestor(db, tpm).enroll_from_agent(HOST, auto_approve=True)
    errors = [r for r in mitm.recovered if "error" in r]
    assert errors == [], errors
    # the attack is real: both keys' auth values were taken at creation,
    # and the agent pinned the interposer's keys, not the TPM's primaries
    assert {r["userAuth"] for r in mitm.recovered if "userAuth" in r} == {
        TEST_KEY_AUTH.ak.auth, TEST_KEY_AUTH.kem.auth}
    blobs = hostkeys.KeyBlobs.from_bytes(key_file.read_bytes())
    pinned = {blobs.ak_parent_name, blobs.kem_parent_name}
    assert pinned <= mitm.answered
    assert len(mitm.certified) == 2 and not pinned & set(mitm.certified)
    reason = err.value.kwargs["reason"]
    assert reason.startswith(
        f"storage parent {blobs.ak_parent_name.hex()} (endorsement) not certified by the "
        f"AK: the TPM certified the creation of {mitm.certified[0].hex()}, not of the "
        "pinned name: the agent salts its sessions to a key that is not this TPM's "
        "storage primary (an interposer"), reason
    with pytest.raises(exception.NotFound):
        db.get_host(HOST)
    [entry] = db.list_audit(host=HOST)
    assert (entry.event, entry.outcome) == ("enroll", "refused")
    assert "not certified by the AK: the TPM certified the creation of" in (entry.detail or "")


def test_without_an_interposer_the_host_enrolls_with_its_certified_parents(
        host_tpm_standin: HostTPMStandIn, db: Database,  # noqa: F811
        tmp_path: Path) -> None:
    key_file = tmp_path / "hostkeys.tpm"
    with HostTPM(host_tpm_standin.tcti, TEST_KEY_AUTH, key_file=key_file) as tpm:
        record = attestor(db, tpm).enroll_from_agent(HOST, auto_approve=True)
    blobs = hostkeys.KeyBlobs.from_bytes(key_file.read_bytes())
    assert (record.ak_parent_name, record.kem_parent_name) == (
        blobs.ak_parent_name, blobs.kem_parent_name)
    assert db.get_host(HOST).kem_parent_name == blobs.kem_parent_name
    [entry] = db.list_audit(host=HOST)
    assert (entry.event, entry.outcome) == ("enroll", "APPROVED")
    assert (f"storage parents certified: endorsement {blobs.ak_parent_name.hex()[:16]}..., "
            f"owner {blobs.kem_parent_name.hex()[:16]}...") in (entry.detail or "")


class StrippingBroker(HostTPMAgent):
    """A broker client that removes ``parent_certs`` from the unsigned 1.10
    ``get_identity`` reply: what is left is a valid 1.10 HostIdentity."""

    def get_identity(self, host: str, nonce: bytes) -> Mapping[str, Any]:
        real = dict(super().get_identity(host, nonce))
        assert len(real["parent_certs"]) == 2  # the 1.10 agent did certify
        wire = m.HostIdentity(host=host, ak_public=real["ak_public"],
                              kem_public=real["kem_public"],
                              kem_certify_attest=real["kem_certify_attest"],
                              kem_certify_signature=real["kem_certify_signature"],
                              command_public=real["command_public"],
                              ek_certificate=None).to_wire()
        assert "parent_certs" not in wire  # omit_default: absent on the wire
        real["parent_certs"] = m.HostIdentity.from_wire(wire).parent_certs
        return real


def test_certifications_stripped_from_a_1_10_reply_are_refused_by_default(
        host_tpm_standin: HostTPMStandIn, db: Database,  # noqa: F811
        tmp_path: Path) -> None:
    """akparents review finding 2: get_identity's reply is not signed by the
    host; with require_certified_parents at its default (off) an engine
    that asked as 1.10 enrolled an interposed host whose certifications a
    broker client had stripped."""
    assert "get_identity" in UNVERIFIED_REPLIES
    with session_interposer(host_tpm_standin.tcti) as mitm:
        with HostTPM(mitm.tcti, TEST_KEY_AUTH, key_file=tmp_path / "k.tpm") as tpm:
            att = Attestor(db, lambda: StrippingBroker(tpm), verdict_ttl=600, nonce_ttl=30)
            assert not att.require_certified_parents
            with pytest.raises(exception.CertificationError,
                               match="asked as agent API 1.10, with the certifications, "
                                     "and came back without them"):
                att.enroll_from_agent(HOST, auto_approve=True)
    with pytest.raises(exception.NotFound):
        db.get_host(HOST)
    [entry] = db.list_audit(host=HOST)
    assert (entry.event, entry.outcome) == ("enroll", "refused")


def _real_primaries(tcti: str) -> dict[str, tuple[bytes, bytes]]:
    """What anyone with access to the TPM reads: each hierarchy's storage
    primary's public area and name (all public)."""
    from tpm2_pytss import ESAPI
    with ESAPI(tcti) as e:
        out = {}
        for hierarchy, which in ((hostkeys.AK_HIERARCHY, "endorsement"),
                                 (hostkeys.KEM_HIERARCHY, "owner")):
            with hostkeys.pinned_primary(e, hierarchy) as primary:
                out[which] = (bytes(primary.public.publicArea.marshal()), primary.name)
        return out


class PinRewritingBroker(HostTPMAgent):
    """A broker client that rewrites each certification's ``public`` and
    ``pinned_name`` in the unsigned reply to the real primary's, so that
    they match the name the TPM certified (the interposer's pins hidden)."""

    def __init__(self, tpm: HostTPM, real: dict[str, tuple[bytes, bytes]]) -> None:
        super().__init__(tpm)
        self.real = real

    def get_identity(self, host: str, nonce: bytes) -> Mapping[str, Any]:
        ident = dict(super().get_identity(host, nonce))
        ident["parent_certs"] = [
            dict(c, public=self.real[c["hierarchy"]][0], pinned_name=self.real[c["hierarchy"]][1])
            for c in ident["parent_certs"]]
        return ident


def test_pinned_names_rewritten_in_the_reply_are_refused(
        host_tpm_standin: HostTPMStandIn, db: Database,  # noqa: F811
        tmp_path: Path) -> None:
    """akfix review round 2, finding 1: the engine took ``pinned_name`` from
    the unsigned reply; a broker client rewrote it (and ``public``) to the
    real primaries' and an interposer present at the agent's whole first
    start enrolled APPROVED. The agent now binds its own pins into the
    certifications' qualifying data (``authn.parent_binding``)."""
    real = _real_primaries(host_tpm_standin.tcti)
    key_file = tmp_path / "hostkeys.tpm"
    with session_interposer(host_tpm_standin.tcti) as mitm:
        with HostTPM(mitm.tcti, TEST_KEY_AUTH, key_file=key_file) as tpm:
            tpm.quote(b"q" * 16, [0])
            att = Attestor(db, lambda: PinRewritingBroker(tpm, real), verdict_ttl=600,
                           nonce_ttl=30, require_certified_parents=True)
            with pytest.raises(exception.CertificationError) as err:
                att.enroll_from_agent(HOST, auto_approve=True)
    blobs = hostkeys.KeyBlobs.from_bytes(key_file.read_bytes())
    # the attack setting: the agent pinned the interposer's keys, the TPM
    # certified the real primaries, whose names the broker put in the reply
    assert {blobs.ak_parent_name, blobs.kem_parent_name} <= mitm.answered
    assert set(mitm.certified) == {real["endorsement"][1], real["owner"][1]}
    assert err.value.kwargs["reason"] == (
        f"storage parent {real['endorsement'][1].hex()} (endorsement) not certified by the "
        "AK: it does not bind this enrollment's nonce, this hierarchy and the reported "
        "pinned name (stale or replayed, or the pinned name was rewritten between agent "
        "and engine)")
    with pytest.raises(exception.NotFound):
        db.get_host(HOST)
