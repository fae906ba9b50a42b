"""What a TPM-interface observer gets from the agent's start (review eksalt).

Finding 1: the sealed host key had an empty auth value, so its TPM-wrapped
blob, seen on the wire (Create's outPrivate at the first start, Load's
inPrivate at every start), unsealed for anyone who can send that TPM
commands: Load under the owner primary, Unseal with an empty password. Now
the sealed object has a random auth value of its own (format 3), which only
goes inside Create's encrypted inSensitive and keys the salted Unseal.

Finding 2: an unsalted session whose key follows from values on the wire
encrypts as well as a salted one, so "the secret's bytes are not on the
wire" does not tell them apart. Here every Create's inSensitive on the wire
is decrypted as an observer would if its session were unsalted (session key
empty, the parents' auth values empty), and every session but the EK's
PolicySecret one must be salted.

Real swtpm stand-ins with EK certificates (swtpm-localca), the agent's own
``TPMSealedHostKey`` and ``HostTPM`` in ``AgentService``'s order, a
recording relay on the TPM interface (``tests/functional/tpmwire``).
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from tpm2_pytss import ESAPI
from tpm2_pytss.constants import TPM2_ALG
from tpm2_pytss.TSS2_Exception import TSS2_Exception
from tpm2_pytss.types import (
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
)

from tests.functional.agent.test_ek_first_start import certified  # noqa: F401
from tests.functional.agent.test_hostkeys_review import _seal_v2
from tests.functional.hosttpm_fixture import HostTPMStandIn
from tests.functional.tpmmitm import _tpm2b, kdfa
from tests.functional.tpmwire import TPM_CC_LOAD, TPMWireTap, unsalted_sessions, wiretap
from vtpcm_agent import hostkeys, keyauth
from vtpcm_agent import keystore as ks
from vtpcm_agent.hosttpm import HostTPM, SealedObject

pytestmark = pytest.mark.functional
Certified = tuple[HostTPMStandIn, Path]
CC_CREATE = 0x153
CC_START_AUTH_SESSION = 0x176
TPM_SE_POLICY = 0x01
TPM_ALG_NULL = 0x0010
# (handles in the command, handles in the response) of every command the
# agent sends with an authorization area at its start
HANDLES = {0x131: (1, 1), 0x153: (1, 0), 0x157: (1, 1), 0x147: (2, 0), 0x14A: (2, 0),
           0x15E: (1, 0), 0x148: (2, 0), 0x158: (1, 0), 0x154: (1, 0), 0x16C: (1, 0),
           0x151: (2, 0), 0x13F: (0, 0), 0x161: (0, 0), 0x182: (1, 0), 0x14E: (2, 0)}


def _provider(tpm: HostTPM, state: Path, ca: Path | None) -> ks.TPMSealedHostKey:
    return ks.TPMSealedHostKey(tpm, state / "hostkey.sealed", ek_ca_file=ca,
                               key_file=state / "hostkeys.tpm")


def _start(tcti: str, state: Path, ca: Path | None) -> bytes:
    """An agent start (AgentService's order) and a first use of its keys."""
    with HostTPM(tcti) as tpm:
        key = _provider(tpm, state, ca).host_key()
        tpm.use_key_auth(keyauth.derive(key), state / "hostkeys.tpm")
        tpm.quote(b"q" * 16, [0])
    return key


def _sealed_loads(tap: TPMWireTap) -> list[tuple[TPM2B_PUBLIC, TPM2B_PRIVATE]]:
    """(public, private) of every TPM2_Load of a keyedhash object on the wire."""
    out = []
    for code, cmd in tap.commands():
        if code != TPM_CC_LOAD:
            continue
        off = 14
        (auth,) = struct.unpack_from(">I", cmd, off)
        off += 4 + auth
        priv, n = TPM2B_PRIVATE.unmarshal(cmd[off:])
        pub, _n = TPM2B_PUBLIC.unmarshal(cmd[off + n:])
        if pub.publicArea.type == TPM2_ALG.KEYEDHASH:
            out.append((pub, priv))
    return out


def _replay_unseals(tcti: str, pub: TPM2B_PUBLIC, priv: TPM2B_PRIVATE) -> bytes:
    """The observer's replay: Load under the owner primary, Unseal with an
    empty password (raises TSS2_Exception if the object refuses)."""
    with ESAPI(tcti) as e, hostkeys.pinned_parent(e, hostkeys.KEM_HIERARCHY) as (srk, _n):
        obj = e.load(srk, priv, pub)
        try:
            return bytes(e.unseal(obj))
        finally:
            e.flush_context(obj)


@pytest.mark.parametrize("with_ca", [True, False], ids=["ek_ca_file", "tofu"])
def test_a_sealed_blob_seen_on_the_wire_does_not_unseal(
        certified: Certified, tmp_path: Path, with_ca: bool) -> None:  # noqa: F811
    """Before: the observer's replay of the Load it saw at a restart
    unsealed the host key (then keyauth.derive gave it the AK's and KEM
    key's auth values). Now the object needs its own auth value, which is
    never on the wire: the replay fails, at the first start and later."""
    standin, ca = certified
    with wiretap(standin.tcti) as tap:
        key = _start(tap.tcti, tmp_path, ca if with_ca else None)
        first = tap.everything()
        assert _start(tap.tcti, tmp_path, ca if with_ca else None) == key
        wire = tap.everything()
        loads = _sealed_loads(tap)
    sealed = SealedObject.from_bytes((tmp_path / "hostkey.sealed").read_bytes())
    assert sealed.current and len(sealed.auth) == 32
    priv = bytes(TPM2B_PRIVATE.unmarshal(sealed.private)[0].buffer)
    # Create's outPrivate is encrypted at the first start; the restart's
    # Load carries it (TPM-wrapped) in clear: that is what gets replayed
    assert priv not in first
    assert priv in wire and len(loads) == 1
    for pub, blob in loads:
        with pytest.raises(TSS2_Exception, match="authorization"):
            _replay_unseals(standin.tcti, pub, blob)
    auth = keyauth.derive(key)
    for secret in (key, sealed.auth, auth.ak.auth, auth.kem.auth):
        seen = secret in wire
        assert not seen


@pytest.mark.parametrize("with_ca", [True, False], ids=["ek_ca_file", "tofu"])
def test_a_format2_host_key_is_resealed_with_its_own_auth_value(
        certified: Certified, tmp_path: Path, with_ca: bool) -> None:  # noqa: F811
    """A format-2 file (empty auth value) is resealed as format 3 at the
    next start, with or without ek_ca_file: same key, same pinned parent,
    and the blob the restart's Load shows no longer unseals."""
    standin, ca = certified
    key = b"h" * ks.KEY_LEN
    path = tmp_path / "hostkey.sealed"
    path.write_bytes(_seal_v2(standin.tcti, key))
    path.chmod(0o600)
    old = SealedObject.from_bytes(path.read_bytes())
    assert _replay_unseals(standin.tcti, *_unmarshal(old)) == key  # the hole, planted
    with wiretap(standin.tcti) as tap:
        assert _start(tap.tcti, tmp_path, ca if with_ca else None) == key
        assert _start(tap.tcti, tmp_path, ca if with_ca else None) == key
        loads = _sealed_loads(tap)
    new = SealedObject.from_bytes(path.read_bytes())
    assert path.read_bytes().startswith(b"VTSO\x03") and new.current
    assert new.parent_name == old.parent_name
    assert (path.stat().st_mode & 0o777) == 0o600
    # the old one, the reseal's check, the new one at start 2: replayed
    assert len(loads) == 3
    for pub, blob in loads[1:]:
        with pytest.raises(TSS2_Exception, match="authorization"):
            _replay_unseals(standin.tcti, pub, blob)


def _unmarshal(sealed: SealedObject) -> tuple[TPM2B_PUBLIC, TPM2B_PRIVATE]:
    return (TPM2B_PUBLIC.unmarshal(sealed.public)[0],
            TPM2B_PRIVATE.unmarshal(sealed.private)[0])


def _pairs(tap: TPMWireTap) -> list[tuple[bytes, bytes]]:
    """(command, response) in order: the swtpm TCTI uses a connection per
    command, and the tap records each connection's two directions."""
    with tap._lock:
        streams = [(fwd, bytes(b)) for fwd, b in tap.streams]
    return [(streams[i][1], streams[i + 1][1]) for i in range(len(streams) - 1)
            if streams[i][0] and not streams[i + 1][0] and streams[i][1]]


def _sessions(buf: bytes, off: int, end: int, command: bool) -> list[tuple[int, bytes]]:
    """The (handle or 0, nonce) of each session in an authorization area."""
    out = []
    while off < end:
        handle = 0
        if command:
            (handle,) = struct.unpack_from(">I", buf, off)
            off += 4
        nonce, off = _tpm2b(buf, off)
        off += 1  # sessionAttributes
        _hmac, off = _tpm2b(buf, off)
        out.append((handle, nonce))
    return out


def _as_if_unsalted(tap: TPMWireTap) -> list[bytes]:
    """Every Create's inSensitive (userAuth, then data) decrypted with the
    key an observer computes for an unsalted, unbound session whose
    authorized parent has an empty auth value: KDFa(SHA256, "", "CFB",
    nonceCaller, nonceTPM). For a salted session this is noise."""
    nonce_tpm: dict[int, bytes] = {}
    found: list[bytes] = []
    for cmd, rsp in _pairs(tap):
        tag, _size, cc = struct.unpack_from(">HII", cmd, 0)
        rc = struct.unpack_from(">I", rsp, 6)[0] if len(rsp) >= 10 else 1
        if cc == CC_START_AUTH_SESSION and rc == 0:
            nonce_tpm[struct.unpack_from(">I", rsp, 10)[0]] = _tpm2b(rsp, 14)[0]
            continue
        if tag != 0x8002 or rc:
            continue
        assert cc in HANDLES, f"command {cc:#x} with sessions: add its handles"
        nh, rh = HANDLES[cc]
        (auth_size,) = struct.unpack_from(">I", cmd, 10 + 4 * nh)
        start = 14 + 4 * nh
        sessions = _sessions(cmd, start, start + auth_size, command=True)
        handle, nonce_caller = sessions[0]
        if cc == CC_CREATE and handle in nonce_tpm:
            enc, _off = _tpm2b(cmd, start + auth_size)
            kiv = kdfa(b"", b"CFB", nonce_caller, nonce_tpm[handle], 256)
            d = Cipher(algorithms.AES(kiv[:16]), modes.CFB(kiv[16:])).decryptor()
            plain = d.update(enc) + d.finalize()
            user_auth, off = _tpm2b(plain, 0)
            data, _off = _tpm2b(plain, off) if off + 2 <= len(plain) else (b"", off)
            found += [user_auth, data]
        (psize,) = struct.unpack_from(">I", rsp, 10 + 4 * rh)
        roff = 14 + 4 * rh + psize
        for (h, _nc), (_z, nt) in zip(sessions, _sessions(rsp, roff, len(rsp), False),
                                      strict=False):
            nonce_tpm[h] = nt
    return found


def test_the_first_start_salts_every_session_that_carries_a_secret(
        certified: Certified, tmp_path: Path) -> None:  # noqa: F811
    """Mutant wt-m1 (the EK session unsalted) passed the whole first-start
    suite; an observer then read both auth values off the Creates. Here:
    the only unsalted session is the EK's PolicySecret policy session (no
    parameter encryption, it carries nothing secret), and decrypting the
    Creates as if unsalted gives neither auth value nor the host key."""
    standin, ca = certified
    with wiretap(standin.tcti) as tap:
        with HostTPM(tap.tcti) as tpm:
            key = _provider(tpm, tmp_path, ca).host_key()
        unsalted = unsalted_sessions(tap)
        recovered = _as_if_unsalted(tap)
    creates = [c for c, _cmd in tap.commands() if c == CC_CREATE]
    assert len(creates) >= 3  # AK, KEM key, sealed host key
    for cmd in unsalted:
        off = 18 + 2 + struct.unpack_from(">H", cmd, 18)[0]
        off += 2 + struct.unpack_from(">H", cmd, off)[0]
        assert cmd[off] == TPM_SE_POLICY, "an unsalted HMAC session"
        assert struct.unpack_from(">H", cmd, off + 1)[0] == TPM_ALG_NULL
    assert len(unsalted) <= 1
    sealed = SealedObject.from_bytes((tmp_path / "hostkey.sealed").read_bytes())
    auth = keyauth.derive(key)
    for name, secret in (("AK auth", auth.ak.auth), ("KEM auth", auth.kem.auth),
                         ("host key", key), ("sealed object auth", sealed.auth)):
        leaked = secret in recovered  # (not compared in the assert: no secret printed)
        assert not leaked, f"{name} read off the wire"
