"""The agent's host TPM: attestation key, KEM key, quotes, ECDH and sealing.

Everything here runs inside the compute node's own TPM (``/dev/tpmrm0`` in
production, a swtpm stand-in in tests). No private key ever leaves it: the
AK signs quotes and certifies the KEM key, the KEM key only answers
TPM2_ECDH_ZGen, and sealed objects are only TPM-wrapped blobs. The
endorsement key (certificate, credential activation) is in ``hostek``,
which ``HostTPM`` calls under its lock.

The AK and the KEM key are TPM2_Create children (``hostkeys``) with an auth
value only the agent holds (``keyauth``), loaded from their TPM-wrapped blobs
and used through HMAC sessions salted to their parent, with parameter
encryption where a command carries a secret (ECDH_ZGen's result, the sealed
host key in and out). The storage primaries are re-derived on demand and
refused unless their names are the pinned ones. The loaded keys and their
sessions are kept as saved contexts between calls (``keycache``): libtpms
has only 3 transient slots and without a resource manager a leaked handle
would stay loaded, so nothing stays *loaded* between calls.

Byte formats handed out (all TPM 2.0 big-endian marshaling, Part 2 of the
spec), which the engine's verifier parses:

* ``ak_public`` / ``kem_public``: a marshaled ``TPMT_PUBLIC`` (the contents of
  ``TPM2B_PUBLIC`` without its 2-byte size). For these ECC P-256 keys:
  ``type u16=0x0023 | nameAlg u16=0x000b | objectAttributes u32 |
  authPolicy (u16 size: 0, or 32 for a PCR-bound KEM key) | symmetric
  u16=0x0010 (NULL) | scheme u16 (0x0018 ECDSA + hash u16 0x000b for the
  AK; 0x0019 ECDH + 0x000b for the KEM key) | curveID u16=0x0003 | kdf
  u16=0x0010 | x (u16 32 + 32 bytes) | y (u16 32 + 32 bytes)``.
* ``ak_name`` / ``kem_name``: the TPM object name, ``nameAlg u16 (0x000b) ||
  SHA-256(marshaled TPMT_PUBLIC)`` (34 bytes); the engine and the agents check
  the KEM key and compute its name with ``vtpcm_common.tpmpublic``.
* ``attest``: a marshaled ``TPMS_ATTEST`` (contents of ``TPM2B_ATTEST``):
  ``magic u32=0xff544347 | type u16 (0x8018 quote, 0x8017 certify) |
  qualifiedSigner TPM2B_NAME | extraData TPM2B_DATA (the nonce) | clockInfo
  (clock u64, resetCount u32, restartCount u32, safe u8) | firmwareVersion
  u64 | attested``: for a quote ``TPML_PCR_SELECTION (count u32, then per
  bank hash u16, sizeofSelect u8, bitmap) | pcrDigest TPM2B_DIGEST``; for a
  certify ``name TPM2B_NAME | qualifiedName TPM2B_NAME``.
* ``signature``: a marshaled ``TPMT_SIGNATURE``: ``sigAlg u16=0x0018
  (ECDSA) | hash u16=0x000b | r (u16 size + bytes) | s (u16 size + bytes)``;
  verify as ECDSA P-256/SHA-256 over the attest bytes with the AK point.
* ``pcr_values``: PCR index -> raw digest of the quoted bank; the quote's
  ``pcrDigest`` is the bank hash of the values concatenated in ascending
  index order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from secrets import token_bytes
from typing import TypeVar

from cryptography import x509
from oslo_log import log as logging
from tpm2_pytss import ESAPI
from tpm2_pytss.constants import (
    ESYS_TR,
    TPM2_ALG,
    TPM2_CAP,
    TPM2_HT,
    TPM2_RC,
    TPMA_OBJECT,
)
from tpm2_pytss.TSS2_Exception import TSS2_Exception
from tpm2_pytss.types import (
    TPM2B_ECC_POINT,
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPML_DIGEST_VALUES,
    TPML_PCR_SELECTION,
    TPMS_ATTEST,
    TPMS_ECC_POINT,
    TPMS_PCR_SELECTION,
    TPMS_SENSITIVE_CREATE,
    TPMT_HA,
    TPMT_PUBLIC,
    TPMT_SIG_SCHEME,
    TPMU_HA,
)

from vtpcm_agent import ekverify, hostek, hostkeys, keycache

# Re-exported: hosttpm's interface predates hostek (patch them in hostek).
from vtpcm_agent.hostek import EK_CERT_INDICES as EK_CERT_INDICES
from vtpcm_agent.hostek import EK_TYPES as EK_TYPES
from vtpcm_agent.hostkeys import AK_ATTRS as AK_ATTRS
from vtpcm_agent.hostkeys import KEM_ATTRS as KEM_ATTRS
from vtpcm_agent.keyauth import KeyAuth
from vtpcm_common import ekcert, spans
from vtpcm_common.exception import CertificationError, HostTPMError, InvalidInput

LOG = logging.getLogger(__name__)

T = TypeVar("T")
_Loaded = AbstractContextManager[hostkeys.Loaded]

# A sealed data object: the caller supplies the sensitive data, so no
# sensitiveDataOrigin; no sign/decrypt; unseal needs its auth value (random
# since format 3 of SealedObject; empty before).
# Version 1 (SEALED_ATTRS under hostkeys.SRK_ATTRS) was DA-protected: in a DA
# lockout any local TPM user can cause, the agent could not restart (finding
# M3). Version 2 is noDA under the noDA owner parent, whose name it pins.
SEALED_ATTRS = TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.USERWITHAUTH
SEALED_ATTRS_V2 = SEALED_ATTRS | TPMA_OBJECT.NODA


class HostTPMLockout(HostTPMError):
    """The TPM is in dictionary-attack lockout (TPM_RC_LOCKOUT): nothing is
    wrong with the key or the file; it passes with the lockout interval or
    a DictionaryAttackLockReset."""

MAX_SEAL_BYTES = 128  # MAX_SYM_DATA: the largest sensitive data a TPM seals
SEAL_AUTH_LEN = 32  # the sealed object's own userAuth (format 3)
_CRYPT_BOTH = hostkeys.DECRYPT | hostkeys.ENCRYPT
_PCR_BANKS = {"sha1": TPM2_ALG.SHA1, "sha256": TPM2_ALG.SHA256,
              "sha384": TPM2_ALG.SHA384, "sha512": TPM2_ALG.SHA512}
KEM_POLICY_BANK = "sha256"
_BANK_SIZES = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64}
_MAX_NONCE = 64
_QUOTE_ATTEMPTS = 3
_LOCKS: dict[str, threading.RLock] = {}
_LOCKS_GUARD = threading.Lock()


@dataclass(frozen=True)
class HostIdentity:
    """What the engine needs to enroll and trust a host (all public)."""

    ak_public: bytes
    ak_name: bytes
    kem_public: bytes
    kem_name: bytes
    kem_certify_attest: bytes
    kem_certify_signature: bytes
    ek_certificate: bytes | None
    # marshaled TPMT_PUBLIC of the EK that ek_certificate certifies
    ek_public: bytes | None = None
    # False: the KEM key is bound to PCR values the host no longer has
    kem_current: bool = True
    # the AK's TPM2_CertifyCreation of both pinned storage parents (asked
    # for: ``identity(parents=True)``), endorsement (AK's) then owner (KEM's)
    parent_certs: tuple[hostkeys.ParentCertification, ...] = ()


@dataclass(frozen=True)
class QuoteResult:
    """A TPM2_Quote (marshaled TPMS_ATTEST + TPMT_SIGNATURE) and the PCRs."""

    attest: bytes
    signature: bytes
    pcr_values: dict[int, bytes]


@dataclass(frozen=True, repr=False)
class SealedObject:
    """A TPM-wrapped sealed data object (safe to store on disk, root-only).

    ``public`` is a marshaled TPM2B_PUBLIC and ``private`` a marshaled
    TPM2B_PRIVATE (both with their 2-byte size prefix), as TPM2_Load wants.
    ``parent_name``: the name of the storage primary it was sealed under,
    pinned (finding H1); empty in a version-1 object (then the parent is
    the DA-protected ``hostkeys.SRK_ATTRS`` one). ``auth``: the object's
    random 32-byte userAuth (format 3; empty in formats 1 and 2, sealed
    with an empty auth value). Without it a TPM-wrapped blob seen on the
    TPM interface (Create's outPrivate, Load's inPrivate) unseals for
    anyone who can send that TPM commands (review eksalt, finding 1).
    Only the TPM that sealed it can load it. The repr shows sizes only.
    """

    public: bytes
    private: bytes
    parent_name: bytes = b""
    auth: bytes = b""

    _MAGIC_V1 = b"VTSO\x01"
    _MAGIC_V2 = b"VTSO\x02"
    _MAGIC = b"VTSO\x03"

    @property
    def legacy(self) -> bool:
        """A version-1 object: DA-protected parent, nothing pinned."""
        return not self.parent_name

    @property
    def current(self) -> bool:
        """Format 3: its own random auth value (older ones are resealed)."""
        return bool(self.parent_name) and bool(self.auth)

    def to_bytes(self) -> bytes:
        """File format 3: ``b"VTSO" 0x03 | u32 len | public | u32 len |
        private | u32 len | parent_name | u32 len | auth``; format 2 has no
        auth, format 1 no parent_name either. An auth value without a
        parent name has no format (format 1 would drop it, and the object
        would not unseal): refused."""
        if self.auth and not self.parent_name:
            raise HostTPMError(reason="sealed object: an auth value needs a parent name "
                                      "(format 3); format 1 cannot hold it")
        if self.current:
            magic, fields = self._MAGIC, [self.public, self.private, self.parent_name,
                                          self.auth]
        elif self.legacy:
            magic, fields = self._MAGIC_V1, [self.public, self.private]
        else:
            magic, fields = self._MAGIC_V2, [self.public, self.private, self.parent_name]
        return magic + b"".join(struct.pack(">I", len(f)) + f for f in fields)

    @classmethod
    def from_bytes(cls, data: bytes) -> SealedObject:
        """Parse ``to_bytes`` output strictly (HostTPMError on any mismatch)."""
        magic = data[:len(cls._MAGIC)]
        if magic == cls._MAGIC:
            names: tuple[str, ...] = ("public", "private", "parent_name", "auth")
        elif magic == cls._MAGIC_V2:
            names = ("public", "private", "parent_name")
        elif magic == cls._MAGIC_V1:
            names = ("public", "private")
        else:
            raise HostTPMError(reason="sealed object: bad magic/version or too short")
        obj = cls(*hostkeys.read_fields(data, len(cls._MAGIC), names, "sealed object"))
        if magic == cls._MAGIC and (len(obj.auth) != SEAL_AUTH_LEN or not obj.parent_name):
            raise HostTPMError(reason="sealed object: format 3 needs a parent name and a "
                                      f"{SEAL_AUTH_LEN}-byte auth value")
        if magic == cls._MAGIC_V2 and not obj.parent_name:
            raise HostTPMError(reason="sealed object: format 2 needs a parent name")
        return obj

    def __repr__(self) -> str:
        return (f"SealedObject(public=<{len(self.public)} bytes>, "
                f"private=<{len(self.private)} bytes>, "
                f"parent_name=<{len(self.parent_name)} bytes>, "
                f"auth=<{len(self.auth)} bytes>)")


def _sealed_template() -> TPM2B_PUBLIC:
    tmpl = TPMT_PUBLIC.parse("keyedhash", objectAttributes=SEALED_ATTRS_V2)
    tmpl.parameters.keyedHashDetail.scheme.scheme = TPM2_ALG.NULL
    return TPM2B_PUBLIC(tmpl)


def _pcr_selection(bank: str, pcrs: Sequence[int]) -> TPML_PCR_SELECTION:
    bitmap = bytearray(3)
    for i in pcrs:
        bitmap[i // 8] |= 1 << (i % 8)
    sel = TPMS_PCR_SELECTION(hash=_PCR_BANKS[bank], sizeofSelect=3,
                             pcrSelect=bytes(bitmap) + b"\x00")
    return TPML_PCR_SELECTION([sel])


def _selected_indices(sel: TPML_PCR_SELECTION) -> list[int]:
    out: list[int] = []
    for i in range(sel.count):
        s = sel.pcrSelections[i]
        bitmap = bytes(s.pcrSelect)[:s.sizeofSelect]
        for byte_no, byte in enumerate(bitmap):
            for bit in range(8):
                if byte & (1 << bit):
                    out.append(byte_no * 8 + bit)
    return sorted(out)


class HostTPM:
    """Thread-safe access to one host TPM through a tpm2-tss TCTI string.

    ``tcti`` is e.g. ``"device:/dev/tpmrm0"`` or ``"swtpm:path=/run/x/tpm"``.
    One ESAPI context per object. All objects of this process that use the
    same TCTI string share one lock, because without a resource manager
    (swtpm) concurrent operations would compete for the 3 object slots.
    (The swtpm TCTI opens a connection per command, so other processes can
    use the same stand-in between our commands.)
    """

    def __init__(self, tcti: str, key_auth: KeyAuth | None = None,
                 key_file: Path | None = None, kem_pcrs: Sequence[int] = ()) -> None:
        """``key_auth``: the auth values that make the AK and KEM key the
        agent's own (``keyauth``); None only for tools that read or extend
        PCRs or seal: without it identity, quote, activate_credential and
        ecdh_zgen are refused (``HostTPMError``). ``key_file``: where the
        keys' TPM-wrapped blobs are kept (the agent's; created on first use);
        None keeps them in this process only (tools, tests). ``kem_pcrs``:
        SHA-256 PCRs the KEM key is bound to (PolicyPCR; none: unbound)."""
        if not isinstance(tcti, str) or ":" not in tcti and tcti not in ("device", "swtpm"):
            raise HostTPMError(reason="invalid TCTI configuration string")
        self._tcti = tcti
        self._key_auth = key_auth
        self._blob_store: hostkeys.BlobStore = self._store(tcti, key_auth, key_file)
        self._blobs: hostkeys.KeyBlobs | None = None
        # loaded AK/KEM and their sessions, as saved contexts (keycache)
        self._cache = keycache.KeyCache()
        self._kem_pcrs = self._kem_selection(kem_pcrs)
        self._kem_pcr_list = tuple(sorted(set(kem_pcrs)))
        # (EK template, EK public): the public key comes from re-creating
        # the RSA EK, the most expensive TPM operation here, and changes
        # only with the endorsement hierarchy (then an engine-signed
        # credential activation fails and this is dropped). The EK
        # certificate is not cached: it is read from NV on every identity.
        self._ek_public: tuple[bytes, bytes] | None = None
        # the pinned parent name of the sealed host key (bind_host_key_parent):
        # the KEM key's parent must be that primary; None: no sealed host key
        self._host_key_parent: bytes | None = None
        # [host_tpm] ek_ca_file (bind_host_key_parent): missing key blobs are
        # re-created only in the verified TPM
        self._ek_ca_file: Path | None = None
        with _LOCKS_GUARD:
            self._lock = _LOCKS.setdefault(tcti, threading.RLock())
        try:
            self._esapi: ESAPI | None = ESAPI(tcti)
        except TSS2_Exception as exc:
            raise HostTPMError(reason=f"cannot open TCTI {tcti}: {exc}") from exc
        LOG.debug("Opened host TPM through TCTI %(tcti)s", {"tcti": tcti})

    def __repr__(self) -> str:
        return f"HostTPM(tcti={self._tcti!r})"

    def use_key_auth(self, key_auth: KeyAuth, key_file: Path | None = None,
                     kem_pcrs: Sequence[int] = ()) -> None:
        """Set the AK/KEM auth values once the host key is available (it is
        itself sealed in this TPM, so it comes after the HostTPM), where
        the keys' blobs are kept and the PCRs the KEM key is bound to."""
        selection = self._kem_selection(kem_pcrs)
        with self._lock:
            self._key_auth = key_auth
            self._blob_store = self._store(self._tcti, key_auth, key_file)
            self._blobs = None
            self._cache.clear(self._esapi)
            self._kem_pcrs = selection
            self._kem_pcr_list = tuple(sorted(set(kem_pcrs)))
            self._check_stored_parents()

    def bind_host_key_parent(self, name: bytes, ek_ca_file: Path | None = None) -> None:
        """Tie the AK and KEM key to the host key sealed in this TPM: ``name``
        is the pinned parent of that sealed object (``TPMSealedHostKey``
        calls this), empty for a format-1 or -2 object whose reseal failed.

        Why: the AK's and KEM key's auth values derive from the host key, so
        whoever read it at its seal owns both keys, whatever enrollment
        certifies. The host key's parent is the owner primary of the KEM
        key's template, so its name must be the KEM key's pinned parent,
        the one the AK certifies at enrollment: an interposer that swapped
        the primary only for the seal is refused here (at start if the key
        blobs exist, else when they would be created), before any key is
        used. An old (format-1 or -2) host key whose reseal failed: refused too.

        ``ek_ca_file`` (``[host_tpm] ek_ca_file``): key blobs missing at a
        later start (moved aside) are re-created only after the TPM is
        verified against these EK CAs (``ekverify``, as at the first start)
        and only if the owner primary the AK certifies is ``name``; else the
        re-created AK would trust whatever answers the endorsement primary."""
        with self._lock:
            self._host_key_parent = bytes(name)
            self._ek_ca_file = ek_ca_file
            self._blobs = None
            self._cache.clear(self._esapi)
            self._check_stored_parents()

    def _check_stored_parents(self) -> None:
        """The file check of ``bind_host_key_parent`` at start (no TPM
        command): stored, pinned key blobs whose KEM parent is not the host
        key's parent are refused now. An old (format-1 or -2) host key is
        not: the agent starts and unwraps instance keys with it, and the
        AK/KEM key are refused at their first use (``_key_blobs``) until a
        restart reseals it (akfix review round 2, finding 3)."""
        if not self._host_key_parent:
            return
        blobs = self._blob_store.load()
        if blobs is not None and blobs.pinned:
            self._check_host_key_parent(blobs.kem_parent_name)

    def _check_host_key_parent(self, kem_parent: bytes) -> None:
        """Refuse the AK/KEM key unless ``kem_parent`` is the host key's
        pinned parent (``bind_host_key_parent``). Names are public."""
        want = self._host_key_parent
        if want is None:
            return
        if not want:
            raise HostTPMError(reason=(
                "the host key is still an older sealed object (format 1 or 2): resealing "
                "it as format 3 failed at the agent's start (see the warning logged then; "
                "the old file is intact and still unwraps the instance keys), so it is "
                "not tied to the owner parent enrollment certifies (format 1) or unseals "
                "with an empty auth value (format 2); the AK and KEM key are not used "
                "(no enrollment, attestation "
                "or migration of this host) until the agent is restarted after fixing "
                "the cause (e.g. disk space or permissions of the state directory), "
                "which reseals it"))
        if kem_parent != want:
            raise hostkeys.ParentMismatch(reason=(
                f"the host key was sealed under the owner storage primary {want.hex()} but "
                f"the KEM key's pinned parent (the one enrollment certifies) is "
                f"{kem_parent.hex()}: one template in one hierarchy has one name, so one of "
                "these answers came from something between the agent and the TPM (an "
                "interposer at the first start), or the owner hierarchy was cleared in "
                "between; the AK and KEM key (their auth values derive from the host key) "
                "are not used. Keep every file of the state directory and check the TPM "
                "device path and what is attached to it; if the TPM really was cleared, "
                "move the state directory aside and re-enroll the host"))

    @staticmethod
    def _kem_selection(pcrs: Sequence[int]) -> TPML_PCR_SELECTION | None:
        if not pcrs:
            return None
        return _pcr_selection(KEM_POLICY_BANK, _check_pcrs(pcrs, KEM_POLICY_BANK))

    @staticmethod
    def _store(tcti: str, key_auth: KeyAuth | None,
               key_file: Path | None) -> hostkeys.BlobStore:
        if key_file is None:
            auth = b"" if key_auth is None else key_auth.ak.auth + key_auth.kem.auth
            return hostkeys.MemoryBlobStore(tcti, auth)
        return hostkeys.FileBlobStore(key_file)

    # -- lifecycle -------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            if self._esapi is not None:
                esapi, self._esapi = self._esapi, None
                try:
                    self._cache.clear(esapi)
                finally:
                    esapi.close()

    def __enter__(self) -> HostTPM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, what: str, fn: Callable[[ESAPI], T]) -> T:
        """Run ``fn`` under the lock; turn TSS errors into HostTPMError.

        TSS error texts are response-code descriptions, never data.
        """
        with self._lock, spans.span("tpm:" + what):
            if self._esapi is None:
                raise HostTPMError(reason=f"{what}: host TPM connection is closed")
            try:
                return fn(self._esapi)
            except TSS2_Exception as exc:
                raise HostTPMError(reason=f"{what} failed: {exc}") from exc

    def _call_keys(self, what: str, fn: Callable[[ESAPI], T]) -> T:
        """``_call`` for the AK/KEM operations (idempotent): if it fails
        while cached contexts were in play (a TPM Reset, a flushed session,
        nonces out of step), drop them all and run it once more, rebuilt."""
        with self._lock:
            had_cache = bool(self._cache)
            try:
                return self._call(what, fn)
            except HostTPMError:
                if not had_cache:
                    raise
                self._cache.clear(self._esapi)
                LOG.info("%(what)s failed with cached TPM contexts: rebuilt them and "
                         "retried once", {"what": what})
                return self._call(what, fn)

    def flush_stale_transients(self) -> None:
        """Flush transient objects a crashed earlier process left loaded.

        Call once at agent start-up. Without a resource manager (the swtpm
        stand-in) leaked objects would hold the TPM's 3 slots forever; under
        /dev/tpmrm0 we see none. Never call it while another process uses
        the same TPM without a resource manager: it would flush its objects.
        """
        def flush(e: ESAPI) -> None:
            _more, data = e.get_capability(TPM2_CAP.HANDLES,
                                           TPM2_HT.TRANSIENT << 24, 64)
            for handle in list(data.data.handles):
                tr = e.tr_from_tpmpublic(handle)
                e.flush_context(tr)
                LOG.warning("Flushed stale transient object %(h)#x from the host TPM",
                            {"h": int(handle)})
        self._call("flushing stale transient objects", flush)

    def _secrets(self) -> KeyAuth:
        """The AK/KEM secrets; refused without them, before any TPM work:
        keys from the public templates are anyone's (review finding 7)."""
        if self._key_auth is None:
            raise HostTPMError(reason="the AK and KEM key need the agent's key secrets "
                                      "(use_key_auth); this HostTPM serves PCRs and "
                                      "sealing only")
        return self._key_auth

    def _key_blobs(self, e: ESAPI) -> hostkeys.KeyBlobs:
        """The AK/KEM blobs: from the store, or created now (first use of a
        new host key or TPM; the host is then enrolled with the new keys)."""
        if self._blobs is None:
            blobs = self._blob_store.load()
            if blobs is None:
                secrets = self._secrets()
                # the KEM key only under the host key's parent (pinned)
                self._check_host_key_parent(self._host_key_parent or b"")
                if self._ek_ca_file is not None:
                    blobs = self._verified_blobs(e, secrets, self._ek_ca_file)
                else:
                    blobs = self._created_blobs(e, secrets)
                self._blob_store.save(blobs)
                blobs = self._blob_store.load() or blobs  # another thread's, if first
                LOG.info("Created the agent's AK and KEM key in the host TPM (%(store)r)",
                         {"store": self._blob_store})
            if not blobs.pinned:
                blobs = self._pin_parents(e, blobs)
            self._check_host_key_parent(blobs.kem_parent_name)
            self._blobs = blobs
        return self._blobs

    def _created_blobs(self, e: ESAPI, key_auth: KeyAuth) -> hostkeys.KeyBlobs:
        """The AK and KEM key created trusting the TPM's answers (no
        ek_ca_file), the KEM key under the host key's pinned parent."""
        try:
            return hostkeys.create_blobs(e, key_auth.ak.auth, key_auth.kem.auth,
                                         self._kem_pcrs, self._host_key_parent or b"")
        except hostkeys.ParentMismatch as exc:
            raise hostkeys.ParentMismatch(reason=(
                "the KEM key is created only under the owner primary the host key "
                f"was sealed under: {exc.kwargs['reason']}")) from None

    def _verified_blobs(self, e: ESAPI, key_auth: KeyAuth,
                        ek_ca_file: Path) -> hostkeys.KeyBlobs:
        """The AK and KEM key re-created as at a verified first start
        (``ekverify``), refused unless the owner primary the AK certified is
        the one the host key is sealed under (and pinned)."""
        what = (f"the AK and KEM key are missing ({self._blob_store!r}) and, with "
                "[host_tpm] ek_ca_file set, are re-created only in the verified TPM")
        try:
            blobs = ekverify.verified_keys(e, ekcert.load_ca_file(ek_ca_file),
                                           key_auth.ak.auth, key_auth.kem.auth,
                                           self._kem_pcrs)
        except (HostTPMError, CertificationError, InvalidInput) as exc:
            raise HostTPMError(reason=f"{what}: {exc.kwargs.get('reason', exc)}") from None
        want = self._host_key_parent
        if want and blobs.kem_parent_name != want:
            raise hostkeys.ParentMismatch(reason=(
                f"{what}: the owner storage primary the AK certified now "
                f"({blobs.kem_parent_name.hex()}) is not the one the host key was sealed "
                f"under ({want.hex()}): the owner hierarchy was cleared, or something "
                "between the agent and the TPM answered for it. Nothing was written; "
                "keep every file of the state directory and check the TPM device path; "
                "if the TPM really was cleared, move the state directory aside and "
                "re-enroll the host"))
        return blobs

    def _pin_parents(self, e: ESAPI, blobs: hostkeys.KeyBlobs) -> hostkeys.KeyBlobs:
        """Version-1 blobs (before parents were pinned): pin the parents'
        names as the TPM answers now, once, and rewrite the file (v2)."""
        blobs = dataclasses.replace(
            blobs, ak_parent_name=hostkeys.parent_name(e, hostkeys.AK_HIERARCHY),
            kem_parent_name=hostkeys.parent_name(e, hostkeys.KEM_HIERARCHY))
        self._check_host_key_parent(blobs.kem_parent_name)  # before pinning it
        self._blob_store.save(blobs, replace=True)
        LOG.warning("Pinned the names of the AK's and KEM key's parents in %(store)r "
                    "(format 2): from now on another storage primary is refused",
                    {"store": self._blob_store})
        return blobs

    def _ak(self, e: ESAPI) -> _Loaded:
        blobs = self._key_blobs(e)
        return self._cache.use(e, hostkeys.AK_HIERARCHY, blobs.ak_public, blobs.ak_private,
                               self._secrets().ak.auth, "AK", blobs.ak_parent_name)

    def _kem(self, e: ESAPI, zgen: bool = False) -> _Loaded:
        """``zgen``: for ECDH_ZGen (USER role: the PCR policy if bound)."""
        blobs = self._key_blobs(e)
        return self._cache.use(e, hostkeys.KEM_HIERARCHY, blobs.kem_public,
                               blobs.kem_private, self._secrets().kem.auth, "KEM key",
                               blobs.kem_parent_name, self._kem_pcrs if zgen else None)

    def _current_kem(self, e: ESAPI, rotate: bool) -> bool:
        """Whether the KEM key is bound to the PCR values the host has now
        and to ``kem_policy_pcrs``. If not and ``rotate`` (only the engine's
        signed enrollment asks: finding M4, an unsigned get_identity while a
        local user had extended a bound PCR destroyed the enrolled key for
        good), it is replaced by a new one bound to the current values,
        which this enrollment certifies."""
        blobs = self._key_blobs(e)
        if hostkeys.kem_is_current(e, blobs.kem_public, self._kem_pcrs):
            return True
        if not rotate:
            LOG.warning("The host's KEM key is bound to other PCR values or another "
                        "[host_tpm] kem_policy_pcrs (KEM key stale); kept: only the "
                        "engine's signed re-enrollment replaces it")
            return False
        public, private, _name = hostkeys.create_kem(e, self._secrets().kem.auth,
                                                     self._kem_pcrs, blobs.kem_parent_name)
        blobs = dataclasses.replace(blobs, kem_public=public, kem_private=private)
        self._blob_store.save(blobs, replace=True)
        self._blobs = blobs
        self._cache.clear(e)
        LOG.warning("The host's KEM key was bound to other PCR values or another "
                    "[host_tpm] kem_policy_pcrs: the engine's signed re-enrollment "
                    "replaced it with one bound to the current values")
        return True

    def _cached_ek_public(self, template: bytes) -> bytes | None:
        if self._ek_public is not None and self._ek_public[0] == template:
            return self._ek_public[1]
        return None

    @staticmethod
    @contextmanager
    def _srk(e: ESAPI, pinned: bytes = b"", legacy: bool = False,
             ) -> Iterator[tuple[ESYS_TR, ESYS_TR, bytes]]:
        """The owner storage primary the host key is sealed under, a session
        salted to it and its name: the noDA one, whose name must be
        ``pinned`` if given; ``legacy``: the DA-protected one of version-1
        sealed objects (unpinned: their files hold no name)."""
        attrs = hostkeys.SRK_ATTRS if legacy else hostkeys.PARENT_ATTRS
        with hostkeys.pinned_parent(e, hostkeys.KEM_HIERARCHY, pinned, attrs) as (srk, name):
            session = hostkeys.salted_session(e, srk)
            try:
                yield srk, session, name
            finally:
                e.flush_context(session)

    # -- identity --------------------------------------------------------
    def identity(self, nonce: bytes, rotate_kem: bool = False,
                 parents: bool = False) -> HostIdentity:
        """AK and KEM public keys, plus a TPM2_Certify of the KEM key by the AK.

        ``nonce`` (the verifier's freshness value, at most 64 bytes) becomes
        the certify's qualifyingData (``extraData`` in the attest).
        ``rotate_kem``: replace a stale KEM key (the engine's signed
        enrollment only); otherwise ``kem_current`` says it is stale.
        ``parents``: the AK also certifies the creation of both pinned
        storage parents with the same qualifyingData (``parent_certs``), so
        the engine can check that the agent salts its sessions to real
        primaries of this TPM, not to an interposer's keys (issue 9).
        """
        _check_nonce(nonce)
        self._secrets()

        def run(e: ESAPI) -> HostIdentity:
            ek = hostek.certificate_and_public(e, self._cached_ek_public)
            if ek.template is not None and ek.public is not None:
                self._ek_public = (ek.template, ek.public)  # never a missing one
            current = self._current_kem(e, rotate_kem)
            with self._ak(e) as ak, self._kem(e) as kem:
                # certify's objectHandle (KEM) and signHandle (AK) both need
                # the ADMIN/USER auth: an HMAC session each
                attest, sig = e.certify(kem.handle, ak.handle, nonce,
                                        TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL),
                                        session1=kem.session, session2=ak.session)
                ak_name = bytes(e.tr_get_name(ak.handle))
                kem_name = bytes(e.tr_get_name(kem.handle))
                ak_pub, kem_pub = ak.public, kem.public
            certs: tuple[hostkeys.ParentCertification, ...] = ()
            if parents:
                blobs = self._key_blobs(e)
                # the AK alone: the primary takes the KEM key's slot
                with self._ak(e) as ak:
                    certs = tuple(
                        hostkeys.certify_parent(e, hierarchy, pinned, ak.handle,
                                                ak.session, nonce)
                        for hierarchy, pinned in (
                            (hostkeys.AK_HIERARCHY, blobs.ak_parent_name),
                            (hostkeys.KEM_HIERARCHY, blobs.kem_parent_name)))
            return HostIdentity(
                ak_public=ak_pub.publicArea.marshal(),
                ak_name=ak_name,
                kem_public=kem_pub.publicArea.marshal(),
                kem_name=kem_name,
                kem_certify_attest=bytes(attest),
                kem_certify_signature=sig.marshal(),
                ek_certificate=ek.certificate,
                ek_public=ek.public,
                kem_current=current,
                parent_certs=certs,
            )
        return self._call_keys("identity", run)

    def activate_credential(self, credential_blob: bytes, encrypted_secret: bytes,
                            *, signed: bool = False) -> bytes:
        """TPM2_ActivateCredential: the engine's secret, which the TPM releases
        only if the AK it names lives in the same TPM as the EK the secret
        was encrypted to (proof that the AK is a key of this certified TPM).

        ``credential_blob`` and ``encrypted_secret`` are a marshaled
        TPM2B_ID_OBJECT and TPM2B_ENCRYPTED_SECRET (with size prefixes).
        ``signed``: the engine signed this challenge; only its failure drops
        the cached EK public key (anyone can send a bogus unsigned one)."""
        self._secrets()
        blob, secret = hostek.parse_challenge(credential_blob, encrypted_secret)
        try:
            return self._call_keys("activate credential",
                              lambda e: hostek.activate_credential(e, lambda: self._ak(e),
                                                                   blob, secret))
        except HostTPMError:
            if signed:
                self._ek_public = None  # the EK may have changed: re-create it
            raise

    # -- quote and PCRs --------------------------------------------------
    def quote(self, nonce: bytes, pcrs: Sequence[int], bank: str = "sha256") -> QuoteResult:
        """TPM2_Quote by the AK over ``pcrs`` of ``bank`` with ``nonce``.

        The PCRs are read right after the quote in the same locked section;
        a verifier recomputes the digest from ``pcr_values`` and compares.
        If someone else extended a PCR in between (another process on a TPM
        without resource manager), the pair is inconsistent: retry a few
        times rather than hand out a quote that will fail verification.
        """
        _check_nonce(nonce)
        indices = _check_pcrs(pcrs, bank)
        self._secrets()

        def run(e: ESAPI) -> QuoteResult:
            with self._ak(e) as ak:
                for _attempt in range(_QUOTE_ATTEMPTS):
                    attest, sig = e.quote(ak.handle, _pcr_selection(bank, indices), nonce,
                                          session1=ak.session)
                    values = self._read_pcrs(e, indices, bank)
                    quoted = TPMS_ATTEST.unmarshal(bytes(attest))[0]
                    digest = hashlib.new(bank, b"".join(values[i] for i in indices))
                    if bytes(quoted.attested.quote.pcrDigest) == digest.digest():
                        return QuoteResult(attest=bytes(attest), signature=sig.marshal(),
                                           pcr_values=values)
            raise HostTPMError(reason="quote: PCRs kept changing while quoting")
        return self._call_keys("quote", run)

    @property
    def kem_pcrs(self) -> tuple[int, ...]:
        """The SHA-256 PCRs the KEM key is to be bound to (empty: unbound)."""
        return self._kem_pcr_list

    def kem_current(self) -> bool:
        """Whether the stored KEM key is bound as configured to the PCRs'
        values now (``hostkeys.kem_is_current``); never replaces it. A trial
        session's few commands when bound, no TPM command when not."""
        self._secrets()
        return self._call_keys("KEM key check", lambda e: hostkeys.kem_is_current(
            e, self._key_blobs(e).kem_public, self._kem_pcrs))

    def read_pcrs(self, pcrs: Sequence[int], bank: str = "sha256") -> dict[int, bytes]:
        indices = _check_pcrs(pcrs, bank)
        return self._call("PCR read", lambda e: self._read_pcrs(e, indices, bank))

    @staticmethod
    def _read_pcrs(e: ESAPI, indices: list[int], bank: str) -> dict[int, bytes]:
        """TPM2_PCR_Read returns at most 8 digests per call: read until done."""
        values: dict[int, bytes] = {}
        todo = list(indices)
        while todo:
            _counter, sel, digests = e.pcr_read(_pcr_selection(bank, todo))
            got = _selected_indices(sel)
            if not got:
                raise HostTPMError(
                    reason=f"PCR read returned no value for PCRs {todo} of bank {bank}")
            for i, idx in enumerate(got):
                values[idx] = bytes(digests[i])
            todo = [i for i in todo if i not in values]
        return values

    def extend_pcr(self, index: int, data: bytes, bank: str = "sha256") -> None:
        """TPM2_PCR_Extend ``index`` of ``bank`` with the digest ``data``."""
        _check_pcrs([index], bank)
        if not isinstance(data, bytes) or len(data) != _BANK_SIZES[bank]:
            raise HostTPMError(
                reason=f"extend_pcr: data must be a {_BANK_SIZES[bank]}-byte {bank} digest")
        digest = TPMT_HA(hashAlg=_PCR_BANKS[bank], digest=TPMU_HA(**{bank: data}))

        def run(e: ESAPI) -> None:
            e.pcr_extend(_pcr_handle(index), TPML_DIGEST_VALUES([digest]))
        self._call(f"PCR {index} extend", run)

    # -- KEM -------------------------------------------------------------
    def ecdh_zgen(self, x: bytes, y: bytes) -> bytes:
        """TPM2_ECDH_ZGen with the KEM key: the shared point's x (32 bytes).

        The result is a secret: it is never logged; the TPM itself rejects a
        point that is not on P-256.
        """
        if not (isinstance(x, bytes) and isinstance(y, bytes) and len(x) == 32
                and len(y) == 32):
            raise HostTPMError(reason="ecdh_zgen: point coordinates must be 32 bytes each")
        self._secrets()
        point = TPM2B_ECC_POINT(TPMS_ECC_POINT(x=x, y=y))

        def run(e: ESAPI) -> bytes:
            with self._kem(e, zgen=True) as kem:
                # the response's outPoint is Z, the secret: encrypted
                try:
                    out = e.ecdh_zgen(kem.handle, point, session1=hostkeys.use(
                        e, kem.session, hostkeys.ENCRYPT))
                except TSS2_Exception as exc:
                    if exc.error != TPM2_RC.POLICY_FAIL:
                        raise
                    raise HostTPMError(
                        reason="ECDH_ZGen: the KEM key is bound to PCR values this host "
                               "no longer has (TPM_RC_POLICY_FAIL); after an approved "
                               "update re-enroll the host, which gives it a new KEM key"
                    ) from None
            z = bytes(out.point.x)
            if len(z) > 32:
                raise HostTPMError(reason="ecdh_zgen: unexpected shared point size")
            return z.rjust(32, b"\x00")
        return self._call_keys("ECDH_ZGen", run)

    # -- the first start, verified ([host_tpm] ek_ca_file) ----------------
    def verified_first_keys(self, key_auth: KeyAuth, cas: Sequence[x509.Certificate],
                            kem_pcrs: Sequence[int] = ()) -> hostkeys.KeyBlobs:
        """The AK and KEM key of a first start, created only after this TPM
        was verified against the EK CAs ``cas`` (``ekverify``); their
        parents are certified by the AK. Nothing is stored: the caller seals
        the host key under ``kem_parent_name`` and then stores both."""
        selection = self._kem_selection(kem_pcrs)
        return self._call("first start verification", lambda e: ekverify.verified_keys(
            e, cas, key_auth.ak.auth, key_auth.kem.auth, selection))

    # -- sealing ---------------------------------------------------------
    def seal(self, secret: bytes, pinned: bytes = b"") -> SealedObject:
        """Seal ``secret`` (1..128 bytes) as a noDA object under the noDA
        owner storage primary (``pinned``: the name it must have), with a
        random auth value of its own (format 3).

        The auth value and the secret go only inside Create's inSensitive,
        encrypted with a session salted to the (pinned) parent; the response
        (outPrivate) is encrypted too. Unsealing needs the auth value: a
        copy of the blob taken off the TPM interface is not enough."""
        if not isinstance(secret, bytes) or not 0 < len(secret) <= MAX_SEAL_BYTES:
            raise HostTPMError(reason=f"seal: secret must be 1..{MAX_SEAL_BYTES} bytes")
        auth = token_bytes(SEAL_AUTH_LEN)
        sensitive = TPM2B_SENSITIVE_CREATE(TPMS_SENSITIVE_CREATE(userAuth=auth, data=secret))

        def run(e: ESAPI) -> SealedObject:
            with self._srk(e, pinned) as (srk, session, name):
                # inSensitive (auth value, secret) is the first parameter and
                # outPrivate the first of the response: both encrypted
                priv, pub, _cd, _cdig, _tk = e.create(
                    srk, sensitive, _sealed_template(),
                    session1=hostkeys.use(e, session, _CRYPT_BOTH))
            return SealedObject(public=pub.marshal(), private=priv.marshal(),
                                parent_name=name, auth=auth)
        return self._call("seal", lambda e: _lockout_named(lambda: run(e)))

    def unseal(self, sealed: SealedObject) -> bytes:
        """Load ``sealed`` under its storage primary and unseal it.

        Fails (HostTPMError) in any other TPM: the blob's integrity is
        checked with a key derived from this TPM's owner seed; and
        (ParentMismatch) when the storage primary's name is not the one the
        object pins; HostTPMLockout in DA lockout (a version-1 object). The
        object's auth value (format 3) only keys the HMAC session salted to
        the parent, which also encrypts the response: neither it nor the
        secret crosses the TPM interface in clear.
        """
        try:
            pub, used_pub = TPM2B_PUBLIC.unmarshal(sealed.public)
            priv, used_priv = TPM2B_PRIVATE.unmarshal(sealed.private)
        except (TSS2_Exception, ValueError, TypeError) as exc:
            raise HostTPMError(reason="unseal: malformed sealed object") from exc
        if used_pub != len(sealed.public) or used_priv != len(sealed.private):
            raise HostTPMError(reason="unseal: trailing bytes in sealed object")

        def run(e: ESAPI) -> bytes:
            with self._srk(e, sealed.parent_name, sealed.legacy) as (srk, session, _name):
                obj = e.load(srk, priv, pub)
                try:
                    e.tr_set_auth(obj, sealed.auth)
                    # the response's outData is the secret: encrypted
                    return bytes(e.unseal(obj, session1=hostkeys.use(e, session,
                                                                     hostkeys.ENCRYPT)))
                finally:
                    e.flush_context(obj)
        return self._call("unseal", lambda e: _lockout_named(lambda: run(e)))


def _lockout_named(fn: Callable[[], T]) -> T:
    """``fn()``, with TPM_RC_LOCKOUT turned into HostTPMLockout."""
    try:
        return fn()
    except TSS2_Exception as exc:
        if exc.error != TPM2_RC.LOCKOUT:
            raise
        raise HostTPMLockout(reason=(
            "the host TPM is in dictionary-attack lockout (TPM_RC_LOCKOUT): a DA-"
            "protected object was refused; retry after the lockout interval or "
            "after TPM2_DictionaryAttackLockReset")) from None


def _pcr_handle(index: int) -> ESYS_TR:
    return ESYS_TR(int(ESYS_TR.PCR0) + index)


def _check_nonce(nonce: bytes) -> None:
    if not isinstance(nonce, bytes) or len(nonce) > _MAX_NONCE:
        raise HostTPMError(reason=f"nonce must be bytes of at most {_MAX_NONCE} bytes")


def _check_pcrs(pcrs: Sequence[int], bank: str) -> list[int]:
    if bank not in _PCR_BANKS:
        raise HostTPMError(reason=f"unknown PCR bank {bank!r}")
    indices = sorted(set(pcrs))
    if not indices or len(indices) != len(list(pcrs)):
        raise HostTPMError(reason="PCR list must be non-empty and without duplicates")
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i <= 23:
            raise HostTPMError(reason=f"PCR index {i!r} out of range 0..23")
    return indices
