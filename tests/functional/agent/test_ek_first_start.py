"""The agent's first start verified against its EK certificate (``[host_tpm]
ek_ca_file``, ``vtpcm_agent/ekverify.py``): the round-3 attack of the
certified parents (an interposer swapping the owner primary at the first
seal reads the host key, hence the AK's auth value) is refused before any
secret reaches the TPM.

Real swtpm stand-ins manufactured by swtpm_setup (EK certificates from
swtpm-localca), the agent's real ``TPMSealedHostKey`` and ``HostTPM`` in
``AgentService``'s order, the interposers of ``tests/functional/tpmmitm``.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID
from tpm2_pytss import ESAPI
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_CAP, TPM2_HT, TPM2_SE, TPMA_OBJECT
from tpm2_pytss.types import (
    TPM2B_NAME,
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPMS_ATTEST,
    TPMS_SIGNATURE_ECC,
    TPMT_PUBLIC,
    TPMT_SIGNATURE,
    TPMT_SYM_DEF,
    TPMU_SIGNATURE,
)

from tests.functional.engine.test_hostkey_parent import SelectiveInterposer
from tests.functional.engine.test_parent_certification import (  # noqa: F401
    attestor,
    db,
)
from tests.functional.hosttpm_fixture import HostTPMStandIn, host_tpm_standin  # noqa: F401
from tests.functional.tpmmitm import (
    CC_CREATE,
    CC_CREATE_PRIMARY,
    Interposer,
    _recv_msg,
    _tpm2b,
)
from vtpcm_agent import ekverify, hostek, hostkeys, keyauth
from vtpcm_agent import keystore as ks
from vtpcm_agent.hosttpm import HostTPM, SealedObject
from vtpcm_common import authn
from vtpcm_common.exception import HostTPMError
from vtpcm_lab.hosttpm import localca_ek_cas
from vtpcm_nova.engine.db.api import Database

pytestmark = pytest.mark.functional
OWNER = 0x40000001


@pytest.fixture(scope="module")
def certified(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HostTPMStandIn, Path]]:
    """A manufactured stand-in and the swtpm-localca bundle that issued its EK
    certificate (the agent's ``ek_ca_file``)."""
    base = tmp_path_factory.mktemp("ekfirst")
    standin = HostTPMStandIn(base, "ek", with_ek_cert=True)
    try:
        standin.start()
        yield standin, localca_ek_cas(base / "ek-cas.pem")
    finally:
        standin.cleanup()


def _provider(tpm: HostTPM, state: Path, ca: Path | None) -> ks.TPMSealedHostKey:
    return ks.TPMSealedHostKey(tpm, state / "hostkey.sealed", ek_ca_file=ca,
                               key_file=state / "hostkeys.tpm")


def _owner_name(tcti: str) -> bytes:
    with ESAPI(tcti) as e:
        return hostkeys.parent_name(e, hostkeys.KEM_HIERARCHY)


class OwnerOnlyInterposer(SelectiveInterposer):
    """The round-3 attacker: swaps only the owner storage primary (the one
    the host key is sealed under) and terminates every session salted to
    it; the endorsement primary and the EK are answered honestly."""

    def _on_response(self, cmd: bytes, rsp: bytes) -> bytes:
        if struct.unpack_from(">I", cmd, 6)[0] == CC_CREATE_PRIMARY:
            self.active = struct.unpack_from(">I", cmd, 10)[0] == OWNER
        return super()._on_response(cmd, rsp)


class SealOnlyInterposer(SelectiveInterposer):
    """Honest while the agent verifies the TPM and creates its two keys,
    then swaps the owner primary the host key is sealed under."""

    creates = 0

    def _on_response(self, cmd: bytes, rsp: bytes) -> bytes:
        cc, handle = struct.unpack_from(">II", cmd, 6)
        self.creates += cc == CC_CREATE
        if cc == CC_CREATE_PRIMARY:
            self.active = handle == OWNER and self.creates >= 2
        return super()._on_response(cmd, rsp)


class EkSwapper(Interposer):
    """Answers the RSA EK's CreatePrimary with an RSA key of its own (name
    recomputed so that ESAPI's consistency check passes)."""

    def __init__(self, target: str) -> None:
        super().__init__(target)
        n = rsa.generate_private_key(65537, 2048).public_key().public_numbers().n
        self.modulus = n.to_bytes(256, "big")

    def _swap_primary(self, rsp: bytes) -> bytes:
        off = 18
        pub, used = TPM2B_PUBLIC.unmarshal(rsp[off:])
        area = pub.publicArea
        if area.type != TPM2_ALG.RSA:
            return rsp
        area.unique.rsa = self.modulus
        out = bytearray(rsp)
        out[off:off + used] = bytes(TPM2B_PUBLIC(area).marshal())
        p = off + used
        for _ in range(2):                # creationData, creationHash
            _skip, p = _tpm2b(rsp, p)
        p += 6                            # creationTicket tag, hierarchy
        _td, p = _tpm2b(rsp, p)
        new_name = b"\x00\x0b" + hashlib.sha256(bytes(area.marshal())).digest()
        out[p + 2:p + 2 + len(new_name)] = new_name
        self.swapped.add(struct.unpack_from(">I", rsp, 10)[0])
        return bytes(out)


def test_a_verified_first_start_seals_under_the_certified_owner_primary(
        certified: tuple[HostTPMStandIn, Path], db: Database,  # noqa: F811
        tmp_path: Path) -> None:
    standin, ca = certified
    with HostTPM(standin.tcti) as tpm:  # AgentService.__init__'s order
        key = _provider(tpm, tmp_path, ca).host_key()
        tpm.use_key_auth(keyauth.derive(key), tmp_path / "hostkeys.tpm")
        record = attestor(db, tpm).enroll_from_agent("verified", auto_approve=True)
    assert record.status.value == "APPROVED"
    sealed = SealedObject.from_bytes((tmp_path / "hostkey.sealed").read_bytes())
    blobs = hostkeys.FileBlobStore(tmp_path / "hostkeys.tpm").load()
    assert blobs is not None
    assert sealed.parent_name == blobs.kem_parent_name == _owner_name(standin.tcti)
    with HostTPM(standin.tcti) as tpm:  # a restart: unsealed, nothing re-verified
        assert _provider(tpm, tmp_path, ca).host_key() == key
        tpm.use_key_auth(keyauth.derive(key), tmp_path / "hostkeys.tpm")
        tpm.quote(b"q" * 16, [0])


def test_the_round3_attack_is_refused_at_the_first_start(
        certified: tuple[HostTPMStandIn, Path], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    standin, ca = certified
    # positive control: without the CA bundle the interposer reads the host key
    tofu = tmp_path / "tofu"
    tofu.mkdir()
    mitm = OwnerOnlyInterposer(standin.tcti).start()
    try:
        with HostTPM(mitm.tcti) as tpm:
            key = _provider(tpm, tofu, None).host_key()
        assert key in mitm.sealed_data
        assert "trust on first use: [host_tpm] ek_ca_file is not set" in caplog.text
    finally:
        mitm.stop()
    mitm = OwnerOnlyInterposer(standin.tcti).start()
    try:
        with HostTPM(mitm.tcti) as tpm, pytest.raises(ekverify.FirstStartRefused) as err:
            _provider(tpm, tmp_path, ca).host_key()
    finally:
        mitm.stop()
    assert mitm.answered  # it did swap the owner primary
    assert ("step 'certification of the owner storage primary'" in str(err.value)
            and "session HMAC" in str(err.value)), err.value
    assert mitm.sealed_data == [] and not any("userAuth" in r for r in mitm.recovered)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tofu"]  # nothing written


def test_an_interposer_swapping_both_primaries_is_refused_at_the_ak_creation(
        certified: tuple[HostTPMStandIn, Path], tmp_path: Path) -> None:
    """The finding-H1 attacker (every storage primary swapped, every session
    salted to them terminated): the AK's Create is authorized by the EK
    session, whose HMAC covers the parent's name it cannot re-compute."""
    standin, ca = certified
    mitm = SelectiveInterposer(standin.tcti).start()
    try:
        with HostTPM(mitm.tcti) as tpm, pytest.raises(
                ekverify.FirstStartRefused,
                match=r"step 'AK creation in a session salted to the EK' .*session HMAC"):
            _provider(tpm, tmp_path, ca).host_key()
    finally:
        mitm.stop()
    assert mitm.answered and not any("userAuth" in r for r in mitm.recovered)
    assert list(tmp_path.iterdir()) == []


def test_an_interposer_only_at_the_seal_meets_the_certified_pin(
        certified: tuple[HostTPMStandIn, Path], tmp_path: Path) -> None:
    """Verified, then the owner primary swapped for the seal alone: the seal
    is pinned to the certified name, refused before the host key is sent."""
    standin, ca = certified
    mitm = SealOnlyInterposer(standin.tcti).start()
    try:
        with HostTPM(mitm.tcti) as tpm, pytest.raises(hostkeys.ParentMismatch) as err:
            _provider(tpm, tmp_path, ca).host_key()
    finally:
        mitm.stop()
    real = _owner_name(standin.tcti)
    fake = next(iter(mitm.answered))
    assert (f"the owner storage primary the TPM answered has name {fake.hex()}, not the "
            f"pinned {real.hex()}") in str(err.value)
    assert mitm.sealed_data == [] and list(tmp_path.iterdir()) == []


def test_an_ek_certificate_of_another_ca_is_refused(
        certified: tuple[HostTPMStandIn, Path], tmp_path: Path) -> None:
    standin, _ca = certified
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "another EK CA")])
    now = datetime.datetime.now(datetime.UTC)
    other = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
             .public_key(key.public_key()).serial_number(1)
             .not_valid_before(now - datetime.timedelta(days=1))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
             .sign(key, hashes.SHA256()))
    ca = tmp_path / "other-ca.pem"
    ca.write_bytes(other.public_bytes(serialization.Encoding.PEM))
    state = tmp_path / "state"
    state.mkdir()
    with HostTPM(standin.tcti) as tpm, pytest.raises(
            ekverify.FirstStartRefused,
            match=r"step 'EK certificate' .*: EK certificate: not signed by a trusted EK CA"):
        _provider(tpm, state, ca).host_key()
    assert list(state.iterdir()) == []


def test_an_interposer_answering_with_its_own_ek_is_refused(
        certified: tuple[HostTPMStandIn, Path], tmp_path: Path) -> None:
    standin, ca = certified
    mitm = EkSwapper(standin.tcti).start()
    try:
        with HostTPM(mitm.tcti) as tpm, pytest.raises(
                ekverify.FirstStartRefused,
                match=r"step 'EK certificate' .*: EK certificate: it does not certify the "
                      r"reported EK"):
            _provider(tpm, tmp_path, ca).host_key()
    finally:
        mitm.stop()
    assert mitm.swapped and list(tmp_path.iterdir()) == []


def test_a_wrong_activated_secret_is_refused(
        certified: tuple[HostTPMStandIn, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The TPM releases what the credential holds: one made for another
    secret than the agent expects stands for a forged activation."""
    standin, ca = certified
    real = ekverify.make_credential
    monkeypatch.setattr(ekverify, "make_credential",
                        lambda pub, secret, name: real(pub, b"\x00" * len(secret), name))
    with HostTPM(standin.tcti) as tpm, pytest.raises(
            ekverify.FirstStartRefused,
            match=r"step 'credential activation' .*: ActivateCredential released another "
                  r"secret"):
        _provider(tpm, tmp_path, ca).host_key()
    assert list(tmp_path.iterdir()) == []


def test_key_blobs_without_a_sealed_host_key_refuse_the_first_start(
        certified: tuple[HostTPMStandIn, Path], tmp_path: Path) -> None:
    """An interrupted first start (or a mixed-up state directory): the
    blobs' keys are not this new host key's; refused, the file kept."""
    standin, ca = certified
    (tmp_path / "hostkeys.tpm").write_bytes(b"VTHK\x02 an earlier start's blobs")
    (tmp_path / "hostkeys.tpm").chmod(0o600)
    with HostTPM(standin.tcti) as tpm, pytest.raises(
            ks.KeyStoreError, match=r"first start refused: .*hostkeys.tpm exists but "
                                    r".*hostkey.sealed does not .* move hostkeys.tpm aside"):
        _provider(tpm, tmp_path, ca).host_key()
    assert [p.name for p in tmp_path.iterdir()] == ["hostkeys.tpm"]


def test_a_tpm_without_an_ek_certificate_is_refused(
        host_tpm_standin: HostTPMStandIn, certified: tuple[HostTPMStandIn, Path],  # noqa: F811
        tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    with HostTPM(host_tpm_standin.tcti) as tpm, pytest.raises(
            ekverify.FirstStartRefused,
            match=r"step 'EK certificate' .*: the host TPM has no EK certificate in NV"):
        _provider(tpm, state, certified[1]).host_key()
    assert list(state.iterdir()) == []


def test_the_local_parent_certification_check(
        certified: tuple[HostTPMStandIn, Path]) -> None:
    """The engine's checks (``vtpcm_common.parentcert``) with the agent's AK
    signature check, on a real certification: what an interposer whose
    key the agent was answered with gets certified (the real primary, with
    the interposer's name bound in; signed here by a software AK, as the
    TPM would if the session did not cover the names), another AK, stale
    qualifying data."""
    standin, _ca = certified
    nonce = b"n" * 16
    with HostTPM(standin.tcti, keyauth.derive(b"e" * 32)) as tpm, \
            HostTPM(standin.tcti, keyauth.derive(b"f" * 32)) as other:
        ident = tpm.identity(nonce, parents=True)
        other_ak = other.identity(nonce).ak_public
    owner = next(c for c in ident.parent_certs if c.hierarchy == "owner")

    def ak2b(public: bytes) -> bytes:
        return bytes(TPM2B_PUBLIC(TPMT_PUBLIC.unmarshal(public)[0]).marshal())

    assert ekverify.check_parent_certification(owner, ak2b(ident.ak_public), nonce) \
        == owner.pinned_name
    # the interposer's storage key, answered in place of the owner primary
    fake_pub = TPMT_PUBLIC.unmarshal(owner.public)[0]
    fake_pub.unique.ecc.x = b"\x01" * 32
    fake = bytes(fake_pub.marshal())
    fake_name = b"\x00\x0b" + hashlib.sha256(fake).digest()
    soft = ec.generate_private_key(ec.SECP256R1())
    attest = TPMS_ATTEST.unmarshal(owner.attest)[0]
    attest.extraData = authn.parent_binding(nonce, "owner", fake_name)
    raw = bytes(attest.marshal())
    r, sig_s = decode_dss_signature(soft.sign(raw, ec.ECDSA(hashes.SHA256())))
    signature = bytes(TPMT_SIGNATURE(sigAlg=TPM2_ALG.ECDSA, signature=TPMU_SIGNATURE(
        ecdsa=TPMS_SIGNATURE_ECC(hash=TPM2_ALG.SHA256, signatureR=r.to_bytes(32, "big"),
                                 signatureS=sig_s.to_bytes(32, "big")))).marshal())
    soft_ak = TPMT_PUBLIC.unmarshal(ident.ak_public)[0]
    nums = soft.public_key().public_numbers()
    soft_ak.unique.ecc.x, soft_ak.unique.ecc.y = (nums.x.to_bytes(32, "big"),
                                                  nums.y.to_bytes(32, "big"))
    planted = owner._replace(public=fake, pinned_name=fake_name, attest=raw,
                             signature=signature)
    with pytest.raises(ekverify.FirstStartRefused,
                       match=f"the TPM certified the creation of {owner.pinned_name.hex()}, "
                             "not of the pinned name"):
        ekverify.check_parent_certification(planted, ak2b(bytes(soft_ak.marshal())), nonce)
    with pytest.raises(ekverify.FirstStartRefused, match="AK's signature .* does not verify"):
        ekverify.check_parent_certification(owner, ak2b(other_ak), nonce)
    with pytest.raises(ekverify.FirstStartRefused, match="does not bind this enrollment's"):
        ekverify.check_parent_certification(owner, ak2b(ident.ak_public), b"m" * 16)


class EndorsementOnlyInterposer(SelectiveInterposer):
    """Swaps only the endorsement primary (the AK's parent), honest else;
    ``swaps`` counts its swaps (``swapped`` forgets flushed handles)."""

    swaps = 0

    def _swap_primary(self, rsp: bytes) -> bytes:
        out = super()._swap_primary(rsp)
        self.swaps += out != rsp
        return out

    def _on_response(self, cmd: bytes, rsp: bytes) -> bytes:
        if struct.unpack_from(">I", cmd, 6)[0] == CC_CREATE_PRIMARY:
            self.active = struct.unpack_from(">I", cmd, 10)[0] == ENDORSEMENT
        return super()._on_response(cmd, rsp)


ENDORSEMENT = 0x4000000B


def _restart_and_quote(tcti: str, state: Path, ca: Path) -> bytes:
    """An agent restart (AgentService's order) and a first use of the keys."""
    with HostTPM(tcti) as tpm:
        key = _provider(tpm, state, ca).host_key()
        tpm.use_key_auth(keyauth.derive(key), state / "hostkeys.tpm")
        tpm.quote(b"q" * 16, [0])
    return key


def test_key_blobs_moved_aside_are_re_created_only_in_the_verified_tpm(
        certified: tuple[HostTPMStandIn, Path], tmp_path: Path) -> None:
    """Review eksalt, finding 3: with ek_ca_file set, hostkeys.tpm moved
    aside (as the agent's own message advises) re-created the AK trusting
    whatever answered the endorsement primary: an interposer swapping it
    read the AK's auth value. Now the re-creation is the verified one: the
    swap is refused, nothing recovered, nothing written; honest, it works
    and the KEM key's parent is the host key's pinned one."""
    standin, ca = certified
    key = _restart_and_quote(standin.tcti, tmp_path, ca)     # verified first start
    blobs = tmp_path / "hostkeys.tpm"
    blobs.rename(tmp_path / "hostkeys.tpm.aside")
    mitm = EndorsementOnlyInterposer(standin.tcti).start()
    try:
        with pytest.raises(HostTPMError, match=r"the AK and KEM key are missing .* "
                                               r"re-created only in the verified TPM: "
                                               r"first start refused at step"):
            _restart_and_quote(mitm.tcti, tmp_path, ca)
    finally:
        mitm.stop()
    assert mitm.swaps, "the interposer did not take part"
    auth = keyauth.derive(key)
    leaked = auth.ak.auth in [r.get("userAuth") for r in mitm.recovered]
    assert not leaked
    assert not blobs.exists()
    assert _restart_and_quote(standin.tcti, tmp_path, ca) == key   # honest: re-created
    sealed = SealedObject.from_bytes((tmp_path / "hostkey.sealed").read_bytes())
    stored = hostkeys.FileBlobStore(blobs).load()
    assert stored is not None and stored.kem_parent_name == sealed.parent_name


def test_re_created_keys_under_another_owner_primary_than_the_host_keys_are_refused(
        certified: tuple[HostTPMStandIn, Path], tmp_path: Path) -> None:
    """The verified re-creation's owner primary must be the sealed host
    key's pinned parent (here the pin names another one, as after an
    owner-hierarchy clear): refused, naming the cause and the remedy."""
    standin, ca = certified
    with HostTPM(standin.tcti) as tpm:
        tpm.bind_host_key_parent(b"\x00\x0b" + b"\x11" * 32, ek_ca_file=ca)
        tpm.use_key_auth(keyauth.derive(b"r" * 32), tmp_path / "hostkeys.tpm")
        with pytest.raises(hostkeys.ParentMismatch,
                           match=r"the owner storage primary the AK certified now .* is not "
                                 r"the one the host key was sealed under \(000b1111.*if the "
                                 r"TPM really was cleared, move the state directory aside"):
            tpm.quote(b"q" * 16, [0])
    assert not (tmp_path / "hostkeys.tpm").exists()


def _ek_policy(e: ESAPI, template: TPM2B_PUBLIC) -> ESYS_TR:
    """The EK's USER authorization: PolicySecret(endorsement) for a
    low-range template, the (empty) password for a high-range one."""
    if template.publicArea.objectAttributes & TPMA_OBJECT.USERWITHAUTH:
        return ESYS_TR.PASSWORD
    session = e.start_auth_session(ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY,
                                   TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL), TPM2_ALG.SHA256)
    e.policy_secret(ESYS_TR.ENDORSEMENT, session, b"", b"", b"", 0)
    return session


class ChildAsOwnerPrimary(Interposer):
    """Answers every owner CreatePrimary with a REAL child storage key
    of this TPM (a child of the EK, the only parent loaded then: libtpms has
    3 object slots): its true public area, creation data, hash and ticket,
    so ESAPI's name check, every session HMAC and the TPM's own
    CertifyCreation (the ticket is genuine) pass. Only the check that a
    storage parent was created as a primary of its hierarchy tells."""

    def __init__(self, target: str, child: tuple[bytes, ...]) -> None:
        super().__init__(target)
        self.child = child  # public, private, creation data, hash, ticket
        self.answered = 0

    def _serve_data(self, client, up) -> None:  # type: ignore[no-untyped-def]
        cmd = _recv_msg(client)
        if cmd is None or struct.unpack_from(">II", cmd, 6) != (
                CC_CREATE_PRIMARY, OWNER):
            if cmd is not None:
                up.sendall(cmd)
                rsp = _recv_msg(up)
                if rsp is not None:
                    client.sendall(rsp)
            super()._serve_data(client, up)
            return
        up.close()  # the stand-in serves one connection at a time
        self.answered += 1
        try:
            client.sendall(self._fake_create_primary())
        finally:
            client.close()

    def _fake_create_primary(self) -> bytes:
        public, private, cdata, chash, ticket = self.child
        pub = TPM2B_PUBLIC.unmarshal(public)[0]
        with ESAPI("swtpm:path=" + self._target) as e:
            found = hostek.ek_template(e)
            assert found is not None
            _more, data = e.get_capability(TPM2_CAP.HANDLES, TPM2_HT.TRANSIENT << 24, 8)
            eks = [h for h in (e.tr_from_tpmpublic(t) for t in data.data.handles)
                   if e.read_public(h)[0].publicArea.type == TPM2_ALG.RSA]
            # the agent's EK if it has it loaded, else one of our own
            with contextlib.ExitStack() as stack:
                ek = eks[0] if eks else stack.enter_context(
                    hostek.loaded_ek(e, found[1]))[0]
                auth = _ek_policy(e, found[1])
                try:
                    handle = e.load(ek, TPM2B_PRIVATE.unmarshal(private)[0], pub,
                                    session1=auth)
                finally:
                    if auth != ESYS_TR.PASSWORD:
                        e.flush_context(auth)
            tpm_handle = e.tr_get_tpm_handle(handle)
        params = (public + cdata + chash + ticket
                  + bytes(TPM2B_NAME(hostkeys.object_name(pub)).marshal()))
        body = struct.pack(">II", tpm_handle, len(params)) + params + b"\x00\x00\x01\x00\x00"
        return struct.pack(">HII", 0x8002, 10 + len(body), 0) + body


def _ek_child(tcti: str) -> tuple[bytes, ...]:
    """A storage key with the owner primaries' template, created as a child
    of the EK: (public, private, creation data, creation hash, ticket),
    each marshaled as CreatePrimary answers them."""
    with ESAPI(tcti) as e:
        found = hostek.ek_template(e)
        assert found is not None
        with hostek.loaded_ek(e, found[1]) as (ek, _pub):
            auth = _ek_policy(e, found[1])
            try:
                priv, pub, cdata, chash, ticket = e.create(
                    ek, TPM2B_SENSITIVE_CREATE(),
                    hostkeys.template(hostkeys.PARENT_TEMPLATE, hostkeys.PARENT_ATTRS),
                    session1=auth)
            finally:
                if auth != ESYS_TR.PASSWORD:
                    e.flush_context(auth)
    return (bytes(pub.marshal()), bytes(priv.marshal()), bytes(cdata.marshal()),
            bytes(chash.marshal()), bytes(ticket.marshal()))


def test_a_real_child_key_answered_for_the_owner_primary_is_refused(
        certified: tuple[HostTPMStandIn, Path], tmp_path: Path) -> None:
    """Review eksalt, finding 4 (mutant wt-m2, the local CertifyCreation
    check skipped, passed every test): the interposer answers the owner
    CreatePrimary with a real storage key of this TPM that is not a
    primary. The TPM certifies its creation (genuine ticket); the agent's
    check of the creation data refuses it, naming the step; nothing is
    written."""
    standin, ca = certified
    child = _ek_child(standin.tcti)
    mitm = ChildAsOwnerPrimary(standin.tcti, child).start()
    try:
        with HostTPM(mitm.tcti) as tpm, pytest.raises(
                ekverify.FirstStartRefused,
                match=r"step 'certification of the owner storage primary' .* not certified "
                      r"by the AK: it was created under 000b[0-9a-f]{64}, not as a primary "
                      r"of the owner hierarchy"):
            _provider(tpm, tmp_path, ca).host_key()
    finally:
        mitm.stop()
    assert mitm.answered == 1  # refused at the first: no KEM key, no seal under it
    assert list(tmp_path.iterdir()) == []
