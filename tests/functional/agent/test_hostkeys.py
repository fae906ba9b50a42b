"""Issue 9 point 8: the AK and the KEM key are the agent's alone, also for
someone who records its whole TPM command stream (real swtpm stand-in,
tpm2-pytss, a recording relay in front of the stand-in: ``tpmwire``)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from tpm2_pytss import ESAPI
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_RC, TPM2_RH, TPM2_SE, TPMA_OBJECT
from tpm2_pytss.TSS2_Exception import TSS2_Exception
from tpm2_pytss.types import (
    TPM2B_ECC_POINT,
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPMS_ECC_POINT,
    TPMT_PUBLIC,
)

from tests.functional.hosttpm_fixture import (  # noqa: F401
    TEST_KEY_AUTH,
    HostTPMStandIn,
    host_tpm_standin,
    second_host_tpm_standin,
)
from tests.functional.tpmwire import (
    TPM_CC_CREATE_PRIMARY,
    TPM_CC_START_AUTH_SESSION,
    TPMWireTap,
    parameters,
    unsalted_sessions,
    wiretap,
)
from tests.refusal import refused
from vtpcm_agent import hostkeys
from vtpcm_agent.hosttpm import HostTPM
from vtpcm_common import tpmpublic
from vtpcm_common.exception import HostTPMError
from vtpcm_nova.engine import verifier

pytestmark = pytest.mark.functional

SUBPROCESS_TIMEOUT = 120


@pytest.fixture
def tap(host_tpm_standin: HostTPMStandIn) -> Iterator[TPMWireTap]:  # noqa: F811
    with wiretap(host_tpm_standin.tcti) as t:
        yield t


def _peer_point(kem_public: bytes) -> tuple[tuple[bytes, bytes], bytes]:
    """A sender's ephemeral point and the Z it shares with the KEM key."""
    kem = tpmpublic.kem_public_key(kem_public).key
    eph = ec.generate_private_key(ec.SECP256R1())
    nums = eph.public_key().public_numbers()
    z = eph.exchange(ec.ECDH(), kem)
    return (nums.x.to_bytes(32, "big"), nums.y.to_bytes(32, "big")), z


def _observed_primaries(tap: TPMWireTap) -> list[tuple[int, TPM2B_PUBLIC]]:
    """(hierarchy handle, inPublic) of every CreatePrimary on the wire."""
    out = []
    for code, cmd in tap.commands():
        if code != TPM_CC_CREATE_PRIMARY:
            continue
        (hierarchy,) = struct.unpack_from(">I", cmd, 10)
        params = parameters(cmd, 1)
        (sens_size,) = struct.unpack_from(">H", params, 0)
        public, _used = TPM2B_PUBLIC.unmarshal(params[2 + sens_size:])
        out.append((hierarchy, public))
    return out


def test_a_tpm_stream_observer_gets_neither_the_auth_nor_the_keys(
        tap: TPMWireTap, host_tpm_standin: HostTPMStandIn, tmp_path: Path) -> None:  # noqa: F811
    """Before, the AK and KEM key were primaries: their secret ``unique``
    went in clear in each CreatePrimary and their auth value in clear
    password sessions, so one recorded use gave both keys to anyone."""
    with HostTPM(tap.tcti, TEST_KEY_AUTH, key_file=tmp_path / "hostkeys.tpm") as agent:
        identity = agent.identity(os.urandom(32))
        nonce = os.urandom(32)
        quote = agent.quote(nonce, [0, 1, 2])
        point, z = _peer_point(identity.kem_public)
        assert agent.ecdh_zgen(*point) == z  # positive control: the agent can
    verifier.verify_quote(verifier.load_ak(identity.ak_public), quote.attest,
                          quote.signature, nonce, quote.pcr_values)
    wire = tap.everything()
    assert tap.commands(), "the tap recorded nothing"
    assert unsalted_sessions(tap) == []  # M1: every session salted
    # the tap saw the traffic: the TPM returned both public keys through it
    for public in (identity.ak_public, identity.kem_public):
        assert public[-32:] in wire
    for auth in (TEST_KEY_AUTH.ak.auth, TEST_KEY_AUTH.kem.auth):
        assert auth not in wire
    # the observer re-creates every primary it saw, with an auth value of
    # its own: none is the AK or the KEM key (only their storage parents)
    observed = _observed_primaries(tap)
    assert {h for h, _ in observed} == {int(TPM2_RH.ENDORSEMENT), int(TPM2_RH.OWNER)}
    enrolled = {identity.ak_name, identity.kem_name}
    with ESAPI(host_tpm_standin.tcti) as e:
        for hierarchy, public in observed:
            esys = {int(TPM2_RH.ENDORSEMENT): ESYS_TR.ENDORSEMENT,
                    int(TPM2_RH.OWNER): ESYS_TR.OWNER}[hierarchy]
            handle, _pub, _cd, _cdig, _tk = e.create_primary(None, public, esys)
            try:
                assert bytes(e.tr_get_name(handle)) not in enrolled, \
                    "a primary re-created from the observed stream is an agent key"
            finally:
                e.flush_context(handle)


# A foreign process on the same TPM. It has what the strongest local
# attacker short of the host key has: the agent's TPM-wrapped key blobs
# (read from the root-only file or off the wire: TPM2_Load sends them), the
# public storage parents, and any auth value it likes.
_FOREIGN = """
import json, sys
from tpm2_pytss import ESAPI
from tpm2_pytss.TSS2_Exception import TSS2_Exception
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_RH, TPM2_ST, TPMA_OBJECT
from tpm2_pytss.types import (TPM2B_ECC_POINT, TPM2B_PUBLIC, TPM2B_SENSITIVE_CREATE,
                              TPMS_ECC_POINT, TPMS_SENSITIVE_CREATE, TPML_PCR_SELECTION,
                              TPMT_PUBLIC, TPMT_SIG_SCHEME, TPMT_TK_HASHCHECK)
from vtpcm_agent import hostkeys
a = json.loads(sys.argv[1])
blobs = hostkeys.KeyBlobs.from_bytes(bytes.fromhex(a["blobs"]))
point = TPM2B_ECC_POINT(TPMS_ECC_POINT(x=bytes.fromhex(a["x"]), y=bytes.fromhex(a["y"])))
out = {"refusals": [], "used": []}
with ESAPI(a["tcti"]) as e:
    for guess in (b"", b"\\x00" * 32, bytes(range(32))):
        for salted in (False, True):
            try:
                with hostkeys.loaded(e, hostkeys.KEM_HIERARCHY, blobs.kem_public,
                                     blobs.kem_private, guess, "KEM key") as kem:
                    s = kem.session if salted else ESYS_TR.PASSWORD
                    out["used"].append(bytes(e.ecdh_zgen(kem.handle, point,
                                                         session1=s).point.x).hex())
            except TSS2_Exception as exc:
                out["refusals"].append(["zgen", int(exc.error), str(exc)])
            try:
                with hostkeys.loaded(e, hostkeys.AK_HIERARCHY, blobs.ak_public,
                                     blobs.ak_private, guess, "AK") as ak:
                    s = ak.session if salted else ESYS_TR.PASSWORD
                    e.quote(ak.handle, TPML_PCR_SELECTION.parse("sha256:0,1,2"),
                            b"n" * 32, session1=s)
                    out["used"].append("quote")
            except TSS2_Exception as exc:
                out["refusals"].append(["quote", int(exc.error), str(exc)])
    # then it puts the TPM into dictionary-attack lockout with bad tries on
    # a DA-protected key of its own
    sensitive = TPM2B_SENSITIVE_CREATE(TPMS_SENSITIVE_CREATE(userAuth=b"own"))
    attrs = (TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT
             | TPMA_OBJECT.SENSITIVEDATAORIGIN | TPMA_OBJECT.USERWITHAUTH)
    own = e.create_primary(sensitive, TPM2B_PUBLIC(TPMT_PUBLIC.parse(
        "ecc256:ecdsa-sha256:null", objectAttributes=attrs)), ESYS_TR.OWNER)[0]
    for _ in range(12):
        e.tr_set_auth(own, b"wrong")
        try:
            e.sign(own, b"d" * 32, TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL), TPMT_TK_HASHCHECK(
                tag=TPM2_ST.HASHCHECK, hierarchy=TPM2_RH.NULL))
        except TSS2_Exception as exc:
            out["lockout"] = int(exc.error)
    e.flush_context(own)
print(json.dumps(out))
"""
TPM_RC_BAD_AUTH = 0x0A2  # RC_FMT1 + 0x022: authorization failure, no DA


def test_a_foreign_tpm_user_with_the_key_blobs_cannot_zgen_or_quote(
        host_tpm_standin: HostTPMStandIn, tmp_path: Path) -> None:  # noqa: F811
    key_file = tmp_path / "hostkeys.tpm"
    with HostTPM(host_tpm_standin.tcti, TEST_KEY_AUTH, key_file=key_file) as agent:
        identity = agent.identity(os.urandom(32))
        (x, y), z = _peer_point(identity.kem_public)
        proc = subprocess.run(
            [sys.executable, "-c", _FOREIGN,
             json.dumps({"tcti": host_tpm_standin.tcti, "blobs": key_file.read_bytes().hex(),
                         "x": x.hex(), "y": y.hex()})],
            capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, check=False)
        assert proc.returncode == 0, proc.stderr[-600:]
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        assert out["used"] == [], "a foreign TPM user used the agent's keys"
        assert len(out["refusals"]) == 12
        for what, error, text in out["refusals"]:
            assert error == TPM_RC_BAD_AUTH, (what, text)
        assert out["lockout"] == TPM2_RC.LOCKOUT  # the TPM is in DA lockout now
        # positive control, after 12 failed tries and in DA lockout: the
        # agent still can (its keys and their parents are noDA)
        assert agent.ecdh_zgen(x, y) == z
        nonce = os.urandom(32)
        quote = agent.quote(nonce, [0, 1, 2])
    verifier.verify_quote(verifier.load_ak(identity.ak_public), quote.attest,
                          quote.signature, nonce, quote.pcr_values)


def test_z_never_crosses_the_tpm_interface_in_clear(
        tap: TPMWireTap, tmp_path: Path) -> None:
    key_file = tmp_path / "hostkeys.tpm"
    with HostTPM(tap.tcti, TEST_KEY_AUTH, key_file=key_file) as agent:
        kem_public = agent.identity(b"").kem_public
        point, z = _peer_point(kem_public)
        assert agent.ecdh_zgen(*point) == z
    assert z not in tap.everything()
    # planted control: the same key and auth through an HMAC session
    # without response encryption; the scan finds Z on the wire
    blobs = hostkeys.KeyBlobs.from_bytes(key_file.read_bytes())
    with ESAPI(tap.tcti) as e, hostkeys.loaded(
            e, hostkeys.KEM_HIERARCHY, blobs.kem_public, blobs.kem_private,
            TEST_KEY_AUTH.kem.auth, "KEM key") as kem:
        out = e.ecdh_zgen(kem.handle, TPM2B_ECC_POINT(TPMS_ECC_POINT(x=point[0], y=point[1])),
                          session1=kem.session)
    assert bytes(out.point.x) == z
    assert z in tap.everything()


def test_the_keys_persist_in_their_blob_file_and_nowhere_else(
        host_tpm_standin: HostTPMStandIn, tmp_path: Path) -> None:  # noqa: F811
    """The agent's restart keeps its enrolled keys (same blob file); another
    key file (a new agent state) means new keys, never the old ones re-derived."""
    key_file = tmp_path / "hostkeys.tpm"
    with HostTPM(host_tpm_standin.tcti, TEST_KEY_AUTH, key_file=key_file) as first:
        a = first.identity(b"1")
    assert key_file.stat().st_mode & 0o777 == 0o600
    host_tpm_standin.stop()
    host_tpm_standin.start()
    with HostTPM(host_tpm_standin.tcti, TEST_KEY_AUTH, key_file=key_file) as again:
        assert again.identity(b"2").ak_name == a.ak_name
    with HostTPM(host_tpm_standin.tcti, TEST_KEY_AUTH,
                 key_file=tmp_path / "other.tpm") as other:
        b = other.identity(b"3")
    assert {b.ak_name, b.kem_name}.isdisjoint({a.ak_name, a.kem_name})
    assert repr(hostkeys.KeyBlobs.from_bytes(key_file.read_bytes())).startswith(
        "KeyBlobs(ak_public=<")


def test_a_pcr_bound_kem_key_refuses_once_a_policy_pcr_changed(
        host_tpm_standin: HostTPMStandIn, tmp_path: Path) -> None:  # noqa: F811
    """PolicyPCR + PolicyAuthValue on the KEM key: usable only in the
    measured state it was created in; only the engine's signed identity
    (the host's re-enrollment) then gives a new key bound to the new values, which the engine's
    certify check accepts like the first."""
    key_file = tmp_path / "hostkeys.tpm"
    with HostTPM(host_tpm_standin.tcti, TEST_KEY_AUTH, key_file=key_file,
                 kem_pcrs=[8, 9]) as agent:
        nonce = os.urandom(32)
        first = agent.identity(nonce)
        ak = verifier.load_ak(first.ak_public)
        verifier.verify_certification(ak, first.kem_public, first.kem_certify_attest,
                                      first.kem_certify_signature, nonce)
        kem_pub = TPMT_PUBLIC.unmarshal(first.kem_public)[0]
        assert len(bytes(kem_pub.authPolicy)) == 32
        assert not kem_pub.objectAttributes & TPMA_OBJECT.USERWITHAUTH
        (x, y), z = _peer_point(first.kem_public)
        assert agent.ecdh_zgen(x, y) == z  # positive control: measured state
        # the auth value alone (an HMAC session, no policy) does not do
        blobs = hostkeys.KeyBlobs.from_bytes(key_file.read_bytes())
        with ESAPI(host_tpm_standin.tcti) as e, hostkeys.loaded(
                e, hostkeys.KEM_HIERARCHY, blobs.kem_public, blobs.kem_private,
                TEST_KEY_AUTH.kem.auth, "KEM key") as kem:
            with pytest.raises(TSS2_Exception) as auth_only:
                e.ecdh_zgen(kem.handle, TPM2B_ECC_POINT(TPMS_ECC_POINT(x=x, y=y)),
                            session1=kem.session)
        assert auth_only.value.error == TPM2_RC.AUTH_UNAVAILABLE
        agent.extend_pcr(9, hashlib.sha256(b"an unapproved component").digest())
        with refused(HostTPMError, "Host TPM error: ECDH_ZGen: the KEM key is bound to "
                     "PCR values this host no longer has (TPM_RC_POLICY_FAIL); after an "
                     "approved update re-enroll the host, which gives it a new KEM key"):
            agent.ecdh_zgen(x, y)
        # an unsigned get_identity meanwhile keeps the enrolled key (M4) and
        # says it is stale
        stale = agent.identity(nonce)
        assert not stale.kem_current and stale.kem_name == first.kem_name
        assert hostkeys.KeyBlobs.from_bytes(key_file.read_bytes()) == blobs
        # the engine's signed re-enrollment after the (approved) change: a new
        # key for the new values
        second = agent.identity(nonce, rotate_kem=True)
        assert second.kem_current
        assert second.ak_name == first.ak_name and second.kem_name != first.kem_name
        verifier.verify_certification(ak, second.kem_public, second.kem_certify_attest,
                                      second.kem_certify_signature, nonce)
        (x2, y2), z2 = _peer_point(second.kem_public)
        assert agent.ecdh_zgen(x2, y2) == z2
        assert agent.identity(nonce).kem_name == second.kem_name  # stable meanwhile
    with HostTPM(host_tpm_standin.tcti, TEST_KEY_AUTH, key_file=key_file) as unbound:
        # the list emptied: an unbound key replaces the PCR-bound one
        third = unbound.identity(nonce, rotate_kem=True)
        assert bytes(TPMT_PUBLIC.unmarshal(third.kem_public)[0].authPolicy) == b""


def test_blobs_of_another_tpm_are_refused_clearly(
        host_tpm_standin: HostTPMStandIn, second_host_tpm_standin: HostTPMStandIn,  # noqa: F811
        tmp_path: Path) -> None:
    key_file = tmp_path / "hostkeys.tpm"
    with HostTPM(host_tpm_standin.tcti, TEST_KEY_AUTH, key_file=key_file) as first:
        first.quote(b"n", [0])  # positive control: loads in its own TPM
    with HostTPM(second_host_tpm_standin.tcti, TEST_KEY_AUTH, key_file=key_file) as other:
        # the pinned parent is refused before the blobs reach the TPM
        with pytest.raises(hostkeys.ParentMismatch, match=r"^Host TPM error: the endorsement "
                           r"storage primary the TPM answered has name 000b[0-9a-f]{64}, not "
                           r"the pinned 000b[0-9a-f]{64}: .* or this is another TPM or its "
                           r"hierarchy seed changed .*refused before sending any secret"):
            other.quote(b"n", [0])
        # a version-1 file (parents not pinned): the TPM's integrity check
        # refuses the blobs
        pinned = hostkeys.KeyBlobs.from_bytes(key_file.read_bytes())
        v1 = dataclasses.replace(pinned, ak_parent_name=b"", kem_parent_name=b"")
        v1_file = tmp_path / "v1.tpm"
        v1_file.write_bytes(v1.to_bytes())
        v1_file.chmod(0o600)
    with HostTPM(second_host_tpm_standin.tcti, TEST_KEY_AUTH, key_file=v1_file) as other:
        with pytest.raises(HostTPMError, match=r"^Host TPM error: the agent's AK does not "
                           r"load in this TPM \(tpm:parameter\(1\):integrity check failed"
                           r"\): the TPM was cleared or replaced; move the host key blobs "
                           r"aside and re-enroll the host$"):
            other.quote(b"n", [0])
    assert hostkeys.KeyBlobs.from_bytes(key_file.read_bytes())  # left as it was


def test_the_sealed_host_key_never_crosses_the_tpm_interface_in_clear(
        tap: TPMWireTap) -> None:
    """The host key gives the auth values: its seal (Create's inSensitive)
    and unseal (Unseal's outData) go through encrypted sessions."""
    host_key = os.urandom(32)
    with HostTPM(tap.tcti) as tools:
        sealed = tools.seal(host_key)
        assert tools.unseal(sealed) == host_key
    assert host_key not in tap.everything()
    assert sealed.auth not in tap.everything()  # its own auth value (format 3)
    # not only encrypted but salted (M1): an unsalted session's key is
    # computed from what is on the wire when the object's auth is empty
    started = [c for c, _ in tap.commands() if c == TPM_CC_START_AUTH_SESSION]
    assert len(started) == 2 and unsalted_sessions(tap) == []
    # planted control: an Unseal through a plain password session shows it,
    # and an unsalted HMAC session is spotted
    pub = TPM2B_PUBLIC.unmarshal(sealed.public)[0]
    priv = TPM2B_PRIVATE.unmarshal(sealed.private)[0]
    with ESAPI(tap.tcti) as e, hostkeys.parent(e, hostkeys.KEM_HIERARCHY) as srk:
        obj = e.load(srk, priv, pub)
        try:
            e.tr_set_auth(obj, sealed.auth)  # in clear in the password session
            assert bytes(e.unseal(obj)) == host_key
            unsalted = e.start_auth_session(ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.HMAC,
                                            hostkeys.SESSION_CIPHER, TPM2_ALG.SHA256)
            e.flush_context(unsalted)
        finally:
            e.flush_context(obj)
    assert host_key in tap.everything()
    assert len(unsalted_sessions(tap)) == 1
