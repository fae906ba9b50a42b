"""The engine's check of the AK's certification of the agent's storage
parents (``parentcert``, issue 9), on real swtpm bytes
(``vectors/parent_certs.json``, recorded with ``HostTPM.identity(parents=
True)``) and on mutations of them re-signed with a software AK: every
refusal with its exact reason."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from tpm2_pytss.constants import TPM2_ST, TPMA_OBJECT
from tpm2_pytss.types import TPMS_ATTEST, TPMS_CREATION_DATA, TPMT_PUBLIC

from tests.unit.engine import test_verifier as tv
from tests.unit.engine.fakes import Clock, FakeAgent, FakeTPM
from vtpcm_common import authn, exception, tpmstruct
from vtpcm_nova.engine import attestation, parentcert
from vtpcm_nova.engine import verifier as V
from vtpcm_nova.engine.db import api, migration

VECTOR = json.loads((Path(__file__).parent / "vectors" / "parent_certs.json").read_text())
H = bytes.fromhex
AK = V.load_ak(H(VECTOR["ak_public"]))
QUALIFYING = H(VECTOR["qualifying"])
HOST = "cmp1"


def real(hierarchy: str = "owner") -> dict[str, Any]:
    cert = next(c for c in VECTOR["certs"] if c["hierarchy"] == hierarchy)
    return {k: (v if k == "hierarchy" else H(v)) for k, v in cert.items()}


def real_certs() -> list[dict[str, Any]]:
    return [real("endorsement"), real("owner")]


@pytest.fixture(scope="module")
def soft() -> tuple[ec.EllipticCurvePrivateKey, V.AttestationKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    return key, V.load_ak(tv.soft_public(key))


def name_of(public: bytes) -> bytes:
    return b"\x00\x0b" + hashlib.sha256(public).digest()


def resigned(soft: Any, cert: dict[str, Any], **change: Any) -> dict[str, Any]:
    """``cert`` with its attestation changed (``extraData``, ``objectName``,
    ``creationHash``, ``type``, ``magic``) and signed by the software AK."""
    obj, _ = TPMS_ATTEST.unmarshal(cert["attest"])
    for key, value in change.items():
        if key in ("objectName", "creationHash"):
            setattr(obj.attested.creation, key, value)
        else:
            setattr(obj, key, value)
    attest, signature = tv.resign(soft, obj)
    return dict(cert, attest=attest, signature=signature)


def refused(ak: V.AttestationKey, cert: dict[str, Any], why: str,
            qualifying: bytes = QUALIFYING) -> None:
    shown = cert["pinned_name"].hex() if isinstance(cert.get("pinned_name"), bytes) else "?"
    with pytest.raises(exception.CertificationError) as err:
        parentcert.verify_one(ak, cert, qualifying, host=HOST)
    assert err.value.kwargs["reason"] == (
        f"storage parent {shown} ({cert.get('hierarchy')}) not certified by the AK: {why}")


# ---- the real certifications ---------------------------------------------------------

def test_the_real_certifications_pass_and_name_the_pinned_parents() -> None:
    got = parentcert.verify(AK, real_certs(), QUALIFYING, host=HOST)
    assert [(c.hierarchy, c.name) for c in got] == [
        ("endorsement", real("endorsement")["pinned_name"]),
        ("owner", real("owner")["pinned_name"])]
    # what the TPM recorded: a primary of each hierarchy (parent = hierarchy handle)
    data = tpmstruct.creation_data(real("endorsement")["creation_data"])
    assert data.parent_name == data.parent_qualified_name == b"\x40\x00\x00\x0b"


def test_a_mutation_re_signed_by_the_software_ak_is_the_control(soft: Any) -> None:
    """Control for the refusals below: re-signing alone changes nothing."""
    cert = resigned(soft, real())
    assert parentcert.verify_one(soft[1], cert, QUALIFYING, host=HOST).hierarchy == "owner"


# ---- every refusal ---------------------------------------------------------------------

def test_the_interposers_key_is_refused(soft: Any) -> None:
    """The TOFU case: the agent pinned (and reports) the interposer's key;
    the TPM certifies the creation of the real primary only."""
    cert = real()
    pub, _ = TPMT_PUBLIC.unmarshal(cert["public"])
    other = ec.generate_private_key(ec.SECP256R1()).public_key().public_numbers()
    pub.unique.ecc.x, pub.unique.ecc.y = other.x.to_bytes(32, "big"), other.y.to_bytes(32, "big")
    fake = bytes(pub.marshal())
    # the agent binds the pin it reports: the interposer's
    planted = resigned(soft, dict(cert, public=fake, pinned_name=name_of(fake)),
                       extraData=authn.parent_binding(QUALIFYING, "owner", name_of(fake)))
    refused(soft[1], planted, (
        f"the TPM certified the creation of {cert['pinned_name'].hex()}, not of the pinned "
        "name: the agent salts its sessions to a key that is not this TPM's storage primary "
        "(an interposer on the TPM interface when the agent pinned it, or another TPM)"))


def test_a_pinned_name_that_is_not_the_public_areas_is_refused() -> None:
    cert = dict(real(), pinned_name=real("endorsement")["pinned_name"])
    refused(AK, cert, "the pinned name is not the name of the reported public area")


def test_another_aks_signature_is_refused() -> None:
    cert = real()
    key = ec.generate_private_key(ec.SECP256R1())
    cert["signature"] = tv.soft_sign(key, cert["attest"])
    refused(AK, cert, "signature does not verify under the enrolled AK")


BINDING = ("it does not bind this enrollment's nonce, this hierarchy and the reported "
           "pinned name (stale or replayed, or the pinned name was rewritten between agent "
           "and engine)")


def test_another_nonce_is_refused() -> None:
    refused(AK, real(), BINDING, qualifying=b"another enrollment's nonce....")


def test_the_bare_qualifying_data_is_refused(soft: Any) -> None:
    """Before akfix2 the agent certified with the identity's qualifying
    data itself, which does not cover the reported pinned name."""
    refused(soft[1], resigned(soft, real(), extraData=QUALIFYING), BINDING)


def test_a_pinned_name_rewritten_to_the_certified_one_is_refused(soft: Any) -> None:
    """akfix review round 2, finding 1: the agent pinned (and bound) an
    interposer's key, the TPM certified the real primary, and a broker
    client rewrote the unsigned reply's ``pinned_name`` (and ``public``) to
    the real primary's: the binding no longer matches."""
    cert = real()
    interposers = name_of(b"the interposer's public area")
    refused(soft[1], resigned(soft, cert, extraData=authn.parent_binding(
        QUALIFYING, "owner", interposers)), BINDING)


def test_a_certification_relabelled_to_the_other_hierarchy_is_refused() -> None:
    refused(AK, dict(real("endorsement"), hierarchy="owner"), BINDING)


def test_a_plain_certify_is_refused(soft: Any) -> None:
    cert = resigned(soft, real(), type=TPM2_ST.ATTEST_CERTIFY)
    refused(soft[1], cert, "attestation type is 0x8017, not ATTEST_CREATION (0x801a)")


def test_bad_magic_is_refused(soft: Any) -> None:
    cert = resigned(soft, real(), magic=0x12345678)
    refused(soft[1], cert, "attestation was not generated by a TPM (bad magic)")


def test_creation_data_other_than_the_certified_is_refused() -> None:
    cert = real()
    cert["creation_data"] = real("endorsement")["creation_data"]
    refused(AK, cert, "the creation data is not the one the TPM certified")


def test_a_child_key_is_refused(soft: Any) -> None:
    """A key created under some parent (e.g. a duplicable child whose
    private part the attacker can export) is not a primary."""
    cert = real()
    data, _ = TPMS_CREATION_DATA.unmarshal(cert["creation_data"])
    data.parentName = data.parentQualifiedName = name_of(b"some parent")
    raw = bytes(data.marshal())
    cert = resigned(soft, dict(cert, creation_data=raw),
                    creationHash=hashlib.sha256(raw).digest())
    refused(soft[1], cert, f"it was created under {name_of(b'some parent').hex()}, not as a "
                           "primary of the owner hierarchy")


def test_a_primary_of_another_hierarchy_is_refused(soft: Any) -> None:
    cert = dict(real("endorsement"), hierarchy="owner")
    cert = resigned(soft, cert, extraData=authn.parent_binding(
        QUALIFYING, "owner", cert["pinned_name"]))
    refused(soft[1], cert, "it was created under 4000000b, not as a primary of the owner hierarchy")


@pytest.mark.parametrize("clear", [TPMA_OBJECT.FIXEDTPM, TPMA_OBJECT.RESTRICTED,
                                   TPMA_OBJECT.SENSITIVEDATAORIGIN])
def test_a_public_area_that_is_no_tpm_storage_key_is_refused(clear: TPMA_OBJECT) -> None:
    pub, _ = TPMT_PUBLIC.unmarshal(real()["public"])
    attrs = TPMA_OBJECT(pub.objectAttributes) & ~clear
    pub.objectAttributes = attrs
    raw = bytes(pub.marshal())
    cert = dict(real(), public=raw, pinned_name=name_of(raw))
    refused(AK, cert, f"its attributes (0x{int(attrs):08x}) are not those of a storage key "
                      "generated in the TPM (fixedTPM, fixedParent, sensitiveDataOrigin, "
                      "restricted, decrypt, not sign)")


def test_reserved_attribute_bits_are_named_as_a_number() -> None:
    """Found by fuzzing: tpm2-pytss raises ValueError printing them."""
    pub, _ = TPMT_PUBLIC.unmarshal(real()["public"])
    pub.objectAttributes = int(pub.objectAttributes) & ~int(TPMA_OBJECT.FIXEDTPM) | 0x100000
    raw = bytes(pub.marshal())
    refused(AK, dict(real(), public=raw, pinned_name=name_of(raw)),
            f"its attributes (0x{int(pub.objectAttributes):08x}) are not those of a storage "
            "key generated in the TPM (fixedTPM, fixedParent, sensitiveDataOrigin, "
            "restricted, decrypt, not sign)")


@pytest.mark.parametrize(("public", "why"), [
    (lambda p: p[:-3], "its public area is malformed or truncated"),
    (lambda p: p + b"\0", "its public area has 1 trailing bytes"),
    (lambda p: tv.soft_public(ec.generate_private_key(ec.SECP256R1())),
     None),  # a signing key (the AK's template)
])
def test_malformed_or_foreign_public_areas_are_refused(public: Any, why: str | None) -> None:
    raw = public(real()["public"])
    cert = dict(real(), public=raw, pinned_name=name_of(raw))
    if why is None:
        attrs = int(TPMT_PUBLIC.unmarshal(raw)[0].objectAttributes)
        why = (f"its attributes (0x{attrs:08x}) are not those of a storage key generated in the "
               "TPM (fixedTPM, fixedParent, sensitiveDataOrigin, restricted, decrypt, not "
               "sign)")
    refused(AK, cert, why)


@pytest.mark.parametrize("field", ["public", "pinned_name", "creation_data", "attest",
                                   "signature"])
def test_a_missing_field_is_refused(field: str) -> None:
    cert = real()
    del cert[field]
    refused(AK, cert, f"{field} missing or not bytes")


def test_an_unknown_hierarchy_is_refused() -> None:
    refused(AK, dict(real(), hierarchy="platform"), "unknown hierarchy")


@pytest.mark.parametrize("hierarchies", [["owner"], ["owner", "owner"],
                                         ["endorsement", "owner", "owner"], []])
def test_one_certification_per_parent_is_required(hierarchies: list[str]) -> None:
    certs = [real(h) for h in hierarchies]
    with pytest.raises(exception.CertificationError) as err:
        parentcert.verify(AK, certs, QUALIFYING, host=HOST)
    assert err.value.kwargs["reason"] == (
        "storage parents not certified by the AK: expected one certification each for "
        f"endorsement, owner, got {hierarchies}")


# ---- the parsers -----------------------------------------------------------------------

def test_the_parsers_read_what_tpm2_pytss_reads() -> None:
    for cert in real_certs():
        info = tpmstruct.creation_attest(cert["attest"])
        ref, _ = TPMS_ATTEST.unmarshal(cert["attest"])
        assert (info.magic, info.extra_data, info.object_name, info.creation_hash) == (
            int(ref.magic), bytes(ref.extraData), bytes(ref.attested.creation.objectName),
            bytes(ref.attested.creation.creationHash))
        data = tpmstruct.creation_data(cert["creation_data"])
        cd, _ = TPMS_CREATION_DATA.unmarshal(cert["creation_data"])
        assert (data.pcr_digest, data.locality, data.parent_name_alg, data.parent_name,
                data.parent_qualified_name, data.outside_info) == (
            bytes(cd.pcrDigest), int(cd.locality), int(cd.parentNameAlg),
            bytes(cd.parentName), bytes(cd.parentQualifiedName), bytes(cd.outsideInfo))


@pytest.mark.parametrize(("parse", "data", "why"), [
    (tpmstruct.creation_attest, b"", "creation attestation is truncated or has an "
                                     "oversized field"),
    (tpmstruct.creation_attest, "text", "creation attestation must be bytes"),
    (tpmstruct.creation_data, b"\0\0\0\0" + b"\0\0" + b"\1" + b"\0\x10" + b"\0\0" * 3 + b"x",
     "creation data has 1 trailing bytes"),
    (tpmstruct.creation_data, struct.pack(">I", 17), "creation data selects 17 PCR banks "
                                                     "(at most 16)"),
    (tpmstruct.creation_data, struct.pack(">IHB", 1, 0x0B, 4) + b"\xff" * 4,
     "creation data has a PCR bitmap of 4 bytes"),
])
def test_the_parsers_name_the_flaw(parse: Any, data: Any, why: str) -> None:
    with pytest.raises(tpmstruct.Malformed) as err:
        parse(data)
    assert err.value.reason == why


def test_a_truncated_attestation_is_refused_with_its_reason(soft: Any) -> None:
    cert = real()
    short = cert["attest"][:-4]
    cert = dict(cert, attest=short, signature=tv.soft_sign(soft[0], short))
    refused(soft[1], cert, "creation attestation is truncated or has an oversized field")


# ---- enrollment (Attestor) -----------------------------------------------------------

class ParentsTPM(FakeTPM):
    """A fake TPM whose identity carries the parents' certifications (the
    real ones, ``tamper``-ed as the agent would report them, re-signed by
    its AK over the enrollment's qualifying data bound to each reported
    pin, as the agent binds its own)."""

    def __init__(self, tamper: Callable[[list[dict[str, Any]]], None] | None = None) -> None:
        super().__init__()
        self.tamper = tamper

    def identity(self, nonce: bytes, host: str = "cmp1") -> dict[str, Any]:
        ident = super().identity(nonce, host)
        key = (self.ak, V.load_ak(self.ak_public))
        qualifying = authn.host_key_binding(nonce, self.command_public, host)
        certs = real_certs()
        if self.tamper is not None:
            self.tamper(certs)
        certs = [resigned(key, c, extraData=authn.parent_binding(
            qualifying, c["hierarchy"], c["pinned_name"])) for c in certs]
        return dict(ident, parent_certs=certs)


def attestor(tmp_path: Path, agent: FakeAgent, require: bool) -> attestation.Attestor:
    migration.db_sync(f"sqlite:///{tmp_path}/engine.sqlite")
    db = api.Database(f"sqlite:///{tmp_path}/engine.sqlite")
    return attestation.Attestor(db, lambda: agent, verdict_ttl=60, nonce_ttl=30,
                                clock=Clock(), require_certified_parents=require)


def audit(att: attestation.Attestor) -> list[tuple[str, str, str | None]]:
    return [(a.event, a.outcome, a.detail) for a in att.db.list_audit(host=HOST)]


@pytest.mark.parametrize("require", [False, True])
def test_certified_parents_enroll_and_are_stored(tmp_path: Path, require: bool) -> None:
    agent = FakeAgent()
    agent.tpms[HOST] = ParentsTPM()
    att = attestor(tmp_path, agent, require)
    try:
        rec = att.enroll_from_agent(HOST)
        assert (rec.ak_parent_name, rec.kem_parent_name) == (
            real("endorsement")["pinned_name"], real("owner")["pinned_name"])
        assert att.db.get_host(HOST).kem_parent_name == real("owner")["pinned_name"]
        detail = audit(att)[0][2] or ""
        assert (f"storage parents certified: endorsement "
                f"{real('endorsement')['pinned_name'].hex()[:16]}..., owner "
                f"{real('owner')['pinned_name'].hex()[:16]}...") in detail
    finally:
        att.db.dispose()


def test_an_interposers_pinned_key_refuses_the_enrollment(tmp_path: Path) -> None:
    def interposed(certs: list[dict[str, Any]]) -> None:
        other = ec.generate_private_key(ec.SECP256R1()).public_key().public_numbers()
        pub, _ = TPMT_PUBLIC.unmarshal(certs[1]["public"])
        pub.unique.ecc.x = other.x.to_bytes(32, "big")
        pub.unique.ecc.y = other.y.to_bytes(32, "big")
        certs[1]["public"] = bytes(pub.marshal())
        certs[1]["pinned_name"] = name_of(certs[1]["public"])

    agent = FakeAgent()
    agent.tpms[HOST] = ParentsTPM(interposed)
    att = attestor(tmp_path, agent, False)
    try:
        with pytest.raises(exception.CertificationError,
                           match=r"storage parent 000b[0-9a-f]{64} \(owner\) not certified by "
                                 r"the AK: the TPM certified the creation of "):
            att.enroll_from_agent(HOST)
        with pytest.raises(exception.NotFound):
            att.db.get_host(HOST)
        [(event, outcome, detail)] = audit(att)
        assert (event, outcome) == ("enroll", "refused")
        assert "(owner) not certified by the AK: the TPM certified the creation" in detail
    finally:
        att.db.dispose()


def test_an_engine_capped_below_1_10_enrolls_unless_certified_parents_are_required(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    agent = FakeAgent()
    agent.tpms[HOST] = FakeTPM()  # asked below 1.10 (no PARENTS_ASKED): no parent_certs
    att = attestor(tmp_path, agent, False)
    try:
        rec = att.enroll_from_agent(HOST)
        assert (rec.ak_parent_name, rec.kem_parent_name) == (None, None)
        assert ("storage parents not certified (asked below agent API 1.10)"
                in (audit(att)[0][2] or ""))
        assert "enrolled without a certification of its storage parents" in caplog.text
        att.revoke(HOST)
        att.require_certified_parents = True
        with pytest.raises(exception.CertificationError) as err:
            att.enroll_from_agent(HOST)
        assert err.value.kwargs["reason"] == (
            "storage parents not certified by the AK: the identity was asked below agent "
            "API 1.10 ([upgrade_levels] vtpcm_agent caps this engine) and [attestation] "
            "require_certified_parents is on: lift the cap once every agent is upgraded")
        assert audit(att)[0][:2] == ("enroll", "refused")
    finally:
        att.db.dispose()


class AskedAgent(FakeAgent):
    """Answers an identity asked as 1.10 (``PARENTS_ASKED``), with whatever
    ``parent_certs`` the TPM gives (none: stripped on the way)."""

    def get_identity(self, host: str, nonce: bytes) -> dict[str, Any]:
        return dict(super().get_identity(host, nonce), **{attestation.PARENTS_ASKED: True})


@pytest.mark.parametrize("require", [False, True])
def test_an_identity_asked_as_1_10_without_certifications_is_refused_whatever_the_option(
        tmp_path: Path, require: bool) -> None:
    """akparents review finding 2: the reply is unsigned, so a broker
    client could strip ``parent_certs``; asked as 1.10, none is a refusal."""
    agent = AskedAgent()
    agent.tpms[HOST] = FakeTPM()
    att = attestor(tmp_path, agent, require)
    try:
        with pytest.raises(exception.CertificationError) as err:
            att.enroll_from_agent(HOST)
        assert err.value.kwargs["reason"].startswith(
            "storage parents not certified by the AK: the identity was asked as agent API "
            "1.10, with the certifications, and came back without them")
        with pytest.raises(exception.NotFound):
            att.db.get_host(HOST)
        assert audit(att)[0][:2] == ("enroll", "refused")
    finally:
        att.db.dispose()


@pytest.mark.parametrize("cap_allows", [True, False])
def test_the_engines_agent_client_says_whether_it_asked_for_the_certifications(
        cap_allows: bool) -> None:
    """The mark comes from the engine's own version cap, never from the
    (unsigned) reply: HostIdentity.from_wire has no such field."""
    from vtpcm_common.api.agent import messages as am
    from vtpcm_common.api.agent.rpcapi import IDENTITY_PARENTS_VERSION
    from vtpcm_nova.engine.manager import AgentAttestationClient

    class Agents:
        def can_send_version(self, version: str) -> bool:
            assert version == IDENTITY_PARENTS_VERSION
            return cap_allows

        def get_identity(self, host: str, nonce: bytes) -> am.HostIdentity:
            return am.HostIdentity(host=host, ak_public=b"a", kem_public=b"k",
                                   kem_certify_attest=b"c", kem_certify_signature=b"s",
                                   command_public=b"p", ek_certificate=None)

    identity = AgentAttestationClient(Agents()).get_identity(HOST, b"n")  # type: ignore[arg-type]
    assert identity[attestation.PARENTS_ASKED] is cap_allows
    assert attestation.PARENTS_ASKED not in {f.name for f in dataclasses.fields(am.HostIdentity)}


def test_a_re_enrollment_with_other_certified_parents_is_audited(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The stored names are compared at re-enrollment: a changed certified
    parent (its hierarchy's seed changed) is named in the audit."""
    agent = FakeAgent()
    agent.tpms[HOST] = ParentsTPM()
    att = attestor(tmp_path, agent, False)
    try:
        att.enroll_from_agent(HOST)
        att.revoke(HOST)
        att.enroll_from_agent(HOST)  # the same parents: nothing noted
        assert "changed since the last enrollment" not in (audit(att)[0][2] or "")
        att.revoke(HOST)
        old_owner = b"\x00\x0b" + b"\x11" * 32
        stored = att.db.get_host
        monkeypatch.setattr(att.db, "get_host", lambda host: dataclasses.replace(
            stored(host), kem_parent_name=old_owner))
        att.enroll_from_agent(HOST)
        detail = audit(att)[0][2] or ""
        assert (f"certified storage parents changed since the last certified enrollment (owner "
                f"{old_owner.hex()[:16]}... -> {real('owner')['pinned_name'].hex()[:16]}...)"
                f": hierarchy seed changed (TPM cleared or replaced)") in detail
        assert "re-enrolled with other certified storage parents" in caplog.text
    finally:
        att.db.dispose()


def test_a_capped_re_enrollment_keeps_the_certified_names(tmp_path: Path) -> None:
    """akfix review round 2, finding 2: a re-enrollment asked below 1.10
    stored NULL over the names certified before, so the next certified
    re-enrollment had no baseline to name a changed parent against."""
    agent = FakeAgent()
    tpm = ParentsTPM()
    agent.tpms[HOST] = tpm
    att = attestor(tmp_path, agent, False)
    try:
        att.enroll_from_agent(HOST)
        before = att.db.get_host(HOST)
        att.revoke(HOST)
        tpm.tamper = lambda certs: certs.clear()     # a capped engine: asked as 1.5
        att.enroll_from_agent(HOST)
        after = att.db.get_host(HOST)
        assert (after.ak_parent_name, after.kem_parent_name) == (
            before.ak_parent_name, before.kem_parent_name) == (
            real("endorsement")["pinned_name"], real("owner")["pinned_name"])
        assert audit(att)[0][2].startswith(
            "AK ") and ("storage parents not certified (asked below agent API 1.10); the "
                        "names certified at an earlier enrollment are kept") in audit(att)[0][2]
        # the next certified re-enrollment still has its baseline
        new_owner = b"\x00\x0b" + b"\x22" * 32
        assert att._parents_change(HOST, (before.ak_parent_name, new_owner)) == (
            f"owner {before.kem_parent_name.hex()[:16]}... -> {new_owner.hex()[:16]}...")
    finally:
        att.db.dispose()


class MisnamingTPM(ParentsTPM):
    """Certified parents, but a reported KEM name that is not its public
    area's: refused after the parents' check passed."""

    def identity(self, nonce: bytes, host: str = "cmp1") -> dict[str, Any]:
        return dict(super().identity(nonce, host), kem_name=b"\x00\x0b" + b"\x33" * 32)


def test_a_changed_parent_is_said_only_once_the_re_enrollment_passes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """akfix review round 2, finding 2: the "changed" warning was logged
    before the later checks, for an enrollment then refused."""
    agent = FakeAgent()
    agent.tpms[HOST] = ParentsTPM()
    att = attestor(tmp_path, agent, False)
    try:
        att.enroll_from_agent(HOST)
        att.revoke(HOST)
        stored = att.db.get_host
        monkeypatch.setattr(att.db, "get_host", lambda host: dataclasses.replace(
            stored(host), kem_parent_name=b"\x00\x0b" + b"\x11" * 32))
        agent.tpms[HOST] = MisnamingTPM()
        caplog.clear()
        with pytest.raises(exception.CertificationError,
                           match="reported KEM key name does not match its public area"):
            att.enroll_from_agent(HOST)
        assert "other certified storage parents" not in caplog.text
        assert "changed since" not in (audit(att)[0][2] or "")
        agent.tpms[HOST] = ParentsTPM()
        att.enroll_from_agent(HOST)
        assert "re-enrolled with other certified storage parents" in caplog.text
        assert "changed since the last certified enrollment" in (audit(att)[0][2] or "")
    finally:
        att.db.dispose()
