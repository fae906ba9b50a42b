"""The review findings on the child-key change (issue 9 point 8), as tests
that failed before the fix: an active interposer (H1), PolicyAuthValue in
the KEM policy (M2), DA lockout and the host key (M3), KEM rotation by an
unsigned get_identity (M4), hostkeys.tpm's owner and mode (L1). Real swtpm
stand-ins and tpm2-pytss; each has a planted positive control."""

from __future__ import annotations

import hashlib
import os
import pwd
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from tpm2_pytss import ESAPI
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_RC, TPM2_RH, TPM2_SE, TPM2_ST, TPMA_OBJECT
from tpm2_pytss.TSS2_Exception import TSS2_Exception
from tpm2_pytss.types import (
    TPM2B_DIGEST,
    TPM2B_ECC_POINT,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPML_PCR_SELECTION,
    TPMS_ECC_POINT,
    TPMS_SENSITIVE_CREATE,
    TPMT_PUBLIC,
    TPMT_SIG_SCHEME,
    TPMT_TK_HASHCHECK,
)

from tests.functional.hosttpm_fixture import (  # noqa: F401
    TEST_KEY_AUTH,
    HostTPMStandIn,
    host_tpm_standin,
)
from tests.functional.tpmmitm import interposer
from tests.refusal import refused
from vtpcm_agent import hostkeys, keyauth, keystore
from vtpcm_agent.hosttpm import SEALED_ATTRS, SEALED_ATTRS_V2, HostTPM, SealedObject
from vtpcm_common import tpmpublic
from vtpcm_common.exception import HostTPMError, KeyStoreError


def _seal_v1(tcti: str, key: bytes) -> bytes:
    """A hostkey.sealed as the agent wrote it before format 2: DA-protected
    object under the DA-protected owner primary, no parent name."""
    tmpl = TPMT_PUBLIC.parse("keyedhash", objectAttributes=SEALED_ATTRS)
    tmpl.parameters.keyedHashDetail.scheme.scheme = TPM2_ALG.NULL
    with ESAPI(tcti) as e, hostkeys.parent(e, hostkeys.KEM_HIERARCHY,
                                           hostkeys.SRK_ATTRS) as srk:
        session = hostkeys.salted_session(e, srk)
        try:
            priv, pub, _cd, _cdig, _tk = e.create(
                srk, TPM2B_SENSITIVE_CREATE(TPMS_SENSITIVE_CREATE(data=key)),
                TPM2B_PUBLIC(tmpl), session1=hostkeys.use(e, session, hostkeys.DECRYPT))
        finally:
            e.flush_context(session)
    return SealedObject(public=pub.marshal(), private=priv.marshal()).to_bytes()


def _seal_v2(tcti: str, key: bytes) -> bytes:
    """A hostkey.sealed as the agent wrote it in format 2: noDA, under the
    pinned noDA owner primary, with an EMPTY auth value."""
    tmpl = TPMT_PUBLIC.parse("keyedhash", objectAttributes=SEALED_ATTRS_V2)
    tmpl.parameters.keyedHashDetail.scheme.scheme = TPM2_ALG.NULL
    with ESAPI(tcti) as e, hostkeys.pinned_parent(e, hostkeys.KEM_HIERARCHY) as (srk, name):
        priv, pub, _cd, _cdig, _tk = e.create(
            srk, TPM2B_SENSITIVE_CREATE(TPMS_SENSITIVE_CREATE(data=key)), TPM2B_PUBLIC(tmpl))
    return SealedObject(public=pub.marshal(), private=priv.marshal(),
                        parent_name=name).to_bytes()


def _write_private(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


# -- H1: an active interposer ------------------------------------------------

def test_an_interposer_swapping_the_storage_primary_is_refused_at_restart(
        host_tpm_standin: HostTPMStandIn, tmp_path: Path) -> None:  # noqa: F811
    """Before: at every agent start the interposer took the host key (and
    the agent's unseal succeeded). Now the parents' names are pinned: the
    swapped answer is refused before any session is salted to it."""
    sealed = tmp_path / "hostkey.sealed"
    blobs = tmp_path / "hostkeys.tpm"
    with HostTPM(host_tpm_standin.tcti) as tpm:                   # clean first start
        host_key = keystore.TPMSealedHostKey(tpm, sealed).host_key()
        tpm.use_key_auth(keyauth.derive(host_key), blobs)
        tpm.quote(b"n", [0])
    assert sealed.read_bytes().startswith(b"VTSO\x03")
    assert hostkeys.KeyBlobs.from_bytes(blobs.read_bytes()).pinned
    # planted positive control: the same key in a format-1 file (no pin)
    # goes to the interposer, and the agent sees nothing wrong
    legacy = _write_private(tmp_path / "legacy.sealed", _seal_v1(host_tpm_standin.tcti,
                                                                 host_key))
    with interposer(host_tpm_standin.tcti) as mitm, HostTPM(mitm.tcti) as tpm:
        assert keystore.TPMSealedHostKey(tpm, legacy).host_key() == host_key
    assert host_key in mitm.stolen
    # the agent restarts through the interposer: refused, nothing leaks
    before = sealed.read_bytes()
    with interposer(host_tpm_standin.tcti) as mitm:
        with HostTPM(mitm.tcti) as tpm:
            with pytest.raises(KeyStoreError, match=(
                    r"^Key store error: host key .*hostkey.sealed not unsealed: the owner "
                    r"storage primary the TPM answered has name 000b[0-9a-f]{64}, not the "
                    r"pinned 000b[0-9a-f]{64}: something between the agent and the TPM "
                    r"answers for it \(an interposer\).*refused before sending any secret. "
                    r"Keep every file")) as err:
                keystore.TPMSealedHostKey(tpm, sealed).host_key()
            assert "re-enroll" not in str(err.value)
        # the AK and KEM key's parents likewise (their auth values and Z)
        with HostTPM(mitm.tcti, keyauth.derive(host_key), key_file=blobs) as agent:
            with pytest.raises(hostkeys.ParentMismatch, match="the endorsement storage "
                               "primary the TPM answered has name"):
                agent.quote(b"n", [0])
    assert mitm.swapped, "the interposer swapped nothing: the test proves nothing"
    assert mitm.stolen == [] and mitm.recovered == [] and mitm.sessions == {}
    assert sealed.read_bytes() == before


def test_a_format_1_blob_file_is_pinned_and_rewritten_once(
        host_tpm_standin: HostTPMStandIn, tmp_path: Path) -> None:  # noqa: F811
    key_file = tmp_path / "hostkeys.tpm"
    with HostTPM(host_tpm_standin.tcti, TEST_KEY_AUTH, key_file=key_file) as agent:
        first = agent.identity(b"")
    pinned = hostkeys.KeyBlobs.from_bytes(key_file.read_bytes())
    v1 = hostkeys.KeyBlobs(pinned.ak_public, pinned.ak_private, pinned.kem_public,
                           pinned.kem_private)
    _write_private(key_file, v1.to_bytes())
    assert key_file.read_bytes().startswith(b"VTHK\x01")
    with HostTPM(host_tpm_standin.tcti, TEST_KEY_AUTH, key_file=key_file) as agent:
        assert agent.identity(b"").ak_name == first.ak_name       # same keys
    assert hostkeys.KeyBlobs.from_bytes(key_file.read_bytes()) == pinned


# -- M2: PolicyAuthValue in the KEM policy -----------------------------------

def _foreign_zgen(tcti: str, blobs: hostkeys.KeyBlobs, x: bytes, y: bytes) -> bytes | None:
    """A foreign TPM user: the blob (on the wire in every Load), no auth
    value, a PolicyPCR session of its own."""
    with ESAPI(tcti) as e, hostkeys.parent(e, hostkeys.KEM_HIERARCHY) as p:
        pub, priv = hostkeys._unmarshal(blobs.kem_public, blobs.kem_private)
        handle = e.load(p, priv, pub)
        session = e.start_auth_session(ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY, None,
                                       TPM2_ALG.SHA256)
        try:
            e.policy_pcr(session, TPM2B_DIGEST(b""), TPML_PCR_SELECTION.parse("sha256:8,9"))
            out = e.ecdh_zgen(handle, TPM2B_ECC_POINT(TPMS_ECC_POINT(x=x, y=y)),
                              session1=session)
            return bytes(out.point.x)
        except TSS2_Exception as exc:
            if exc.error != TPM2_RC.POLICY_FAIL:
                raise
            return None
        finally:
            e.flush_context(session)
            e.flush_context(handle)


def _pcr_only(e: ESAPI, session: ESYS_TR, pcrs: TPML_PCR_SELECTION) -> None:
    e.policy_pcr(session, TPM2B_DIGEST(b""), pcrs)


@pytest.mark.parametrize("planted", [False, True], ids=["real", "planted-pcr-only-policy"])
def test_a_foreign_user_with_the_blob_and_a_pcr_session_cannot_zgen(
        host_tpm_standin: HostTPMStandIn, tmp_path: Path,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch, planted: bool) -> None:
    """The KEM key's policy is PolicyPCR *and* PolicyAuthValue: PolicyPCR
    alone (anyone can run it) must not do. Planted: the policy without
    PolicyAuthValue -- then the foreign user gets Z."""
    if planted:
        monkeypatch.setattr(hostkeys, "_policy_commands", _pcr_only)
    key_file = tmp_path / "hostkeys.tpm"
    with HostTPM(host_tpm_standin.tcti, TEST_KEY_AUTH, key_file=key_file,
                 kem_pcrs=[8, 9]) as agent:
        ident = agent.identity(os.urandom(32))
        eph = ec.generate_private_key(ec.SECP256R1())
        n = eph.public_key().public_numbers()
        x, y = n.x.to_bytes(32, "big"), n.y.to_bytes(32, "big")
        z = eph.exchange(ec.ECDH(), tpmpublic.kem_public_key(ident.kem_public).key)
        assert agent.ecdh_zgen(x, y) == z                  # the agent can either way
    blobs = hostkeys.KeyBlobs.from_bytes(key_file.read_bytes())
    got = _foreign_zgen(host_tpm_standin.tcti, blobs, x, y)
    assert (got == z) if planted else (got is None)


# -- M3: DA lockout ------------------------------------------------------------

def _lockout(tcti: str) -> None:
    """What any local TPM user can do: bad tries on a DA-protected key of its own."""
    with ESAPI(tcti) as e:
        attrs = (TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT
                 | TPMA_OBJECT.SENSITIVEDATAORIGIN | TPMA_OBJECT.USERWITHAUTH)
        own = e.create_primary(
            TPM2B_SENSITIVE_CREATE(TPMS_SENSITIVE_CREATE(userAuth=b"own")),
            TPM2B_PUBLIC(TPMT_PUBLIC.parse("ecc256:ecdsa-sha256:null", objectAttributes=attrs)),
            ESYS_TR.OWNER)[0]
        try:
            for _ in range(40):
                e.tr_set_auth(own, b"wrong")
                try:
                    e.sign(own, b"d" * 32, TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL),
                           TPMT_TK_HASHCHECK(tag=TPM2_ST.HASHCHECK, hierarchy=TPM2_RH.NULL))
                except TSS2_Exception as exc:
                    if exc.error == TPM2_RC.LOCKOUT:
                        return
            raise AssertionError("the stand-in never entered DA lockout")
        finally:
            e.flush_context(own)


def _lock_reset(tcti: str) -> None:
    with ESAPI(tcti) as e:
        e.dictionary_attack_lock_reset(ESYS_TR.LOCKOUT)


def test_da_lockout_neither_stops_a_restart_nor_invites_deleting_the_host_key(
        host_tpm_standin: HostTPMStandIn, tmp_path: Path) -> None:  # noqa: F811
    tcti = host_tpm_standin.tcti
    sealed = tmp_path / "hostkey.sealed"
    with HostTPM(tcti) as tpm:
        host_key = keystore.TPMSealedHostKey(tpm, sealed).host_key()
    legacy_bytes = _seal_v1(tcti, host_key)
    legacy = _write_private(tmp_path / "legacy.sealed", legacy_bytes)
    _lockout(tcti)
    with HostTPM(tcti) as tpm:
        # format 2 (noDA): the restart unseals in lockout
        assert keystore.TPMSealedHostKey(tpm, sealed).host_key() == host_key
        # format 1 (DA-protected): a retryable lockout, not "damaged file"
        with refused(keystore.HostKeyLockout, (
                f"Key store error: the host TPM is in dictionary-attack lockout, so the "
                f"host key {legacy} cannot be unsealed now; this is retryable: do NOT "
                f"delete legacy.sealed (every wrapped instance key depends on it); retry "
                "after the lockout interval or a DictionaryAttackLockReset (the host TPM "
                "is in dictionary-attack lockout (TPM_RC_LOCKOUT): a DA-protected object "
                "was refused; retry after the lockout interval or after "
                "TPM2_DictionaryAttackLockReset)")):
            keystore.TPMSealedHostKey(tpm, legacy).host_key()
    assert legacy.read_bytes() == legacy_bytes
    # out of lockout: the format-1 file is resealed noDA (format 2, pinned)
    _lock_reset(tcti)
    with HostTPM(tcti) as tpm:
        assert keystore.TPMSealedHostKey(tpm, legacy).host_key() == host_key
    upgraded = SealedObject.from_bytes(legacy.read_bytes())
    assert not upgraded.legacy
    assert TPM2B_PUBLIC.unmarshal(upgraded.public)[0].publicArea.objectAttributes \
        & TPMA_OBJECT.NODA
    _lockout(tcti)
    with HostTPM(tcti) as tpm:
        assert keystore.TPMSealedHostKey(tpm, legacy).host_key() == host_key


# -- M4: no KEM rotation by an unsigned get_identity ---------------------------

def _peer(kem_public: bytes) -> tuple[tuple[bytes, bytes], bytes]:
    eph = ec.generate_private_key(ec.SECP256R1())
    n = eph.public_key().public_numbers()
    return ((n.x.to_bytes(32, "big"), n.y.to_bytes(32, "big")),
            eph.exchange(ec.ECDH(), tpmpublic.kem_public_key(kem_public).key))


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "planted-signed"])
def test_an_unsigned_get_identity_keeps_the_enrolled_kem_key(
        host_tpm_standin: HostTPMStandIn, tmp_path: Path, signed: bool) -> None:  # noqa: F811
    """A local user extends a bound PCR, anyone calls get_identity, the host
    reboots: the enrolled KEM key still opens envelopes. Planted: the same
    call as the engine's signed re-enrollment rotates it (the old key is
    gone: what an unsigned call did before)."""
    key_file = tmp_path / "hostkeys.tpm"
    with HostTPM(host_tpm_standin.tcti, TEST_KEY_AUTH, key_file=key_file,
                 kem_pcrs=[9]) as agent:
        enrolled = agent.identity(os.urandom(32))
        (x, y), z = _peer(enrolled.kem_public)
        assert agent.ecdh_zgen(x, y) == z
        agent.extend_pcr(9, hashlib.sha256(b"anyone").digest())
        meanwhile = agent.identity(os.urandom(32), rotate_kem=signed)
        assert meanwhile.kem_current == signed
        assert (meanwhile.kem_name == enrolled.kem_name) != signed
    host_tpm_standin.stop()                                 # reboot: PCRs reset
    host_tpm_standin.start()
    with HostTPM(host_tpm_standin.tcti, TEST_KEY_AUTH, key_file=key_file,
                 kem_pcrs=[9]) as agent:
        if signed:
            with pytest.raises(HostTPMError, match="TPM_RC_POLICY_FAIL"):
                agent.ecdh_zgen(x, y)
        else:
            assert agent.ecdh_zgen(x, y) == z
            assert agent.identity(b"").kem_current


# -- L1: hostkeys.tpm's owner and mode -----------------------------------------

BLOBS = hostkeys.KeyBlobs(b"\x00\x01a", b"\x00\x01b", b"\x00\x01c", b"\x00\x01d",
                          b"N" * 34, b"M" * 34)


@pytest.mark.parametrize("mode,owner", [(0o666, False), (0o640, False), (0o600, True)])
def test_a_blob_file_others_may_read_write_or_own_is_refused(
        tmp_path: Path, mode: int, owner: bool) -> None:
    path = _write_private(tmp_path / "hostkeys.tpm", BLOBS.to_bytes())
    assert hostkeys.FileBlobStore(path).load() == BLOBS        # positive control
    path.chmod(mode)
    if owner:
        os.chown(path, pwd.getpwnam("nobody").pw_uid, -1)
    with refused(HostTPMError, f"Host TPM error: host key blobs {path} must be owned by "
                               f"uid {os.geteuid()} with mode 0600"):
        hostkeys.FileBlobStore(path).load()


def test_a_damaged_blob_file_is_named(tmp_path: Path) -> None:
    path = _write_private(tmp_path / "hostkeys.tpm", BLOBS.to_bytes()[:-3])
    with refused(HostTPMError, f"Host TPM error: {path} failed its integrity check: "
                               "host key blobs: bad kem_parent_name length"):
        hostkeys.FileBlobStore(path).load()
