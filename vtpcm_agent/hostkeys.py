"""The agent's AK and KEM key as TPM2_Create children, and salted sessions.

Why (issue 9 point 8): primaries are re-derived from the hierarchy seed and
their template, and the template travels in clear in every CreatePrimary, so
whoever saw the agent's TPM command stream once could re-create the AK and
the KEM key with an auth value of their own. Children are different:

* their private part is generated inside the TPM (sensitiveDataOrigin) at
  random and leaves it only wrapped under its parent (fixedTPM|fixedParent);
  the agent keeps the wrapped blobs (``KeyBlobs``) and loads them with
  TPM2_Load. A CreatePrimary with the observed public template gives another
  key; nothing derivable identifies them;
* their auth value goes to the TPM once, inside TPM2_Create's inSensitive,
  encrypted by a salted session (parameter encryption), and afterwards only
  as HMACs of salted sessions: neither a TPM-stream observer nor another
  local TPM user learns it;
* the sessions are salted to the parent, a restricted decryption key: no
  local user can make that key decrypt the salt (restricted keys refuse
  RSA_Decrypt/ECDH_ZGen), so the session keys stay the agent's too, and the
  responses that carry secrets (ECDH_ZGen's point, Unseal's data) come back
  encrypted.

With ``[host_tpm] kem_policy_pcrs`` the KEM key is also bound to the
platform's measured state: its authPolicy is PolicyPCR over those PCRs (their
values when the key was created) then PolicyAuthValue, and userWithAuth is
clear, so ECDH_ZGen works only in a policy session where the PCRs still hold
those values *and* the auth value is known. Certify (ADMIN role, no
adminWithPolicy) still uses the auth value. After an approved update the
PCRs differ: ``kem_is_current`` sees it and, at the engine's signed
re-enrollment only, the agent creates a new KEM key, which that enrollment
certifies.

The parents' names are pinned (``pinned_parent``, finding H1): a session
is salted to the public key in the CreatePrimary answer, so an interposer
that swapped it would read everything the session encrypts. The pin does
not authenticate the first start, so at enrollment the AK certifies each
parent's creation (``certify_parent``, TPM2_CertifyCreation) and the engine
checks the pinned names are this TPM's primaries (issue 9); with
``[host_tpm] ek_ca_file`` the agent checks them itself before its first
seal (``ekverify``).

The AK's parent is a storage primary of the *endorsement* hierarchy: a key
of another hierarchy gets its quotes' resetCount/restartCount obfuscated,
and the verifier relies on them. The KEM key's parent is the owner storage
primary (the one that also seals the host key: ``HostTPM`` refuses the keys
unless the host key's pinned parent is the KEM key's, the certified one).

Every function takes an open ESAPI context: ``HostTPM`` calls them under its
lock and turns TSS errors into HostTPMError.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Protocol

from tpm2_pytss import ESAPI
from tpm2_pytss.constants import (
    ESYS_TR,
    TPM2_ALG,
    TPM2_RC,
    TPM2_SE,
    TPMA_OBJECT,
    TPMA_SESSION,
)
from tpm2_pytss.TSS2_Exception import TSS2_Exception
from tpm2_pytss.types import (
    TPM2B_CREATION_DATA,
    TPM2B_DIGEST,
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPML_PCR_SELECTION,
    TPMS_SENSITIVE_CREATE,
    TPMT_PUBLIC,
    TPMT_SIG_SCHEME,
    TPMT_TK_CREATION,
)

from vtpcm_common import authn, fileutil
from vtpcm_common.exception import HostTPMError

_BASE_ATTRS = (TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT
               | TPMA_OBJECT.SENSITIVEDATAORIGIN | TPMA_OBJECT.USERWITHAUTH)
PARENT_TEMPLATE = "ecc256:aes128cfb"
# The owner storage primary the host key is sealed under, unchanged since
# the first release: another template would orphan every hostkey.sealed.
SRK_ATTRS = _BASE_ATTRS | TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.DECRYPT
# The AK's and KEM key's parents are noDA as well: in DA lockout (which any
# local TPM user can trigger with bad tries on a DA-protected key of its
# own) the TPM refuses every DA-protected object, empty auth or not.
PARENT_ATTRS = SRK_ATTRS | TPMA_OBJECT.NODA
# noDA: a wrong auth value must not count towards the TPM's dictionary-
# attack lockout, or any local TPM user could lock the agent out of its keys
# with a few bad tries; a 256-bit random auth value needs no DA protection.
AK_TEMPLATE = "ecc256:ecdsa-sha256:null"
AK_ATTRS = (_BASE_ATTRS | TPMA_OBJECT.NODA | TPMA_OBJECT.RESTRICTED
            | TPMA_OBJECT.SIGN_ENCRYPT)
KEM_TEMPLATE = "ecc256:ecdh-sha256:null"
KEM_ATTRS = _BASE_ATTRS | TPMA_OBJECT.NODA | TPMA_OBJECT.DECRYPT
AK_HIERARCHY = ESYS_TR.ENDORSEMENT  # quotes keep clear clock fields
KEM_HIERARCHY = ESYS_TR.OWNER
SESSION_CIPHER = "aes128cfb"
# what a command may ask of its session besides continueSession
DECRYPT = TPMA_SESSION.CONTINUESESSION | TPMA_SESSION.DECRYPT
ENCRYPT = TPMA_SESSION.CONTINUESESSION | TPMA_SESSION.ENCRYPT
AUTH_ONLY = TPMA_SESSION.CONTINUESESSION



def read_fields(data: bytes, off: int, names: tuple[str, ...], what: str) -> list[bytes]:
    """The non-empty, u32-length-prefixed fields ``names`` of ``data`` from
    ``off`` to its end, exactly: the one format of the agent's TPM blob
    files (``what`` names the file in the refusals)."""
    parts: list[bytes] = []
    for name in names:
        if off + 4 > len(data):
            raise HostTPMError(reason=f"{what}: truncated before {name}")
        (n,) = struct.unpack_from(">I", data, off)
        off += 4
        if n == 0 or off + n > len(data):
            raise HostTPMError(reason=f"{what}: bad {name} length")
        parts.append(data[off:off + n])
        off += n
    if off != len(data):
        raise HostTPMError(reason=f"{what}: trailing bytes")
    return parts

@dataclass(frozen=True, repr=False)
class KeyBlobs:
    """The AK and KEM key as TPM2_Create returned them: marshaled
    TPM2B_PUBLIC and TPM2B_PRIVATE (the private part TPM-wrapped, useless
    outside this TPM), and the names of their parents as the agent first
    saw them (pinned: a CreatePrimary answer with another name is refused,
    finding H1). Safe on disk; the repr shows sizes only."""

    ak_public: bytes
    ak_private: bytes
    kem_public: bytes
    kem_private: bytes
    # empty only in a version-1 file, until the agent pins them
    ak_parent_name: bytes = b""
    kem_parent_name: bytes = b""

    _MAGIC_V1 = b"VTHK\x01"
    _MAGIC = b"VTHK\x02"
    _FIELDS_V1 = ("ak_public", "ak_private", "kem_public", "kem_private")
    _FIELDS = _FIELDS_V1 + ("ak_parent_name", "kem_parent_name")

    @property
    def pinned(self) -> bool:
        """Whether both parents' names are known (format version 2)."""
        return bool(self.ak_parent_name and self.kem_parent_name)

    def to_bytes(self) -> bytes:
        """``b"VTHK" 0x02`` then each field as ``u32 length | bytes``
        (version 1, without the parent names, only while they are unknown)."""
        magic, fields = ((self._MAGIC, self._FIELDS) if self.pinned
                         else (self._MAGIC_V1, self._FIELDS_V1))
        out = [magic]
        for name in fields:
            value = getattr(self, name)
            out += [struct.pack(">I", len(value)), value]
        return b"".join(out)

    @classmethod
    def from_bytes(cls, data: bytes) -> KeyBlobs:
        """Parse ``to_bytes`` output strictly, version 2 or 1 (HostTPMError
        naming the flaw)."""
        if data.startswith(cls._MAGIC):
            fields: tuple[str, ...] = cls._FIELDS
        elif data.startswith(cls._MAGIC_V1):
            fields = cls._FIELDS_V1
        else:
            raise HostTPMError(reason="host key blobs: bad magic or version")
        return cls(*read_fields(data, len(cls._MAGIC), fields, "host key blobs"))

    def __repr__(self) -> str:
        return "KeyBlobs(%s)" % ", ".join(
            f"{n}=<{len(getattr(self, n))} bytes>" for n in self._FIELDS)


class BlobStore(Protocol):
    """Where the agent keeps its ``KeyBlobs`` between uses and restarts."""

    def load(self) -> KeyBlobs | None: ...

    def save(self, blobs: KeyBlobs, replace: bool = False) -> None: ...


class FileBlobStore:
    """The agent's store: one root-only file (``[agent] state_dir``/
    ``hostkeys.tpm``), written once, atomically; the same keys after a
    restart keep the enrollment valid."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"FileBlobStore({str(self.path)!r})"

    def load(self) -> KeyBlobs | None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise HostTPMError(reason=f"cannot open host key blobs {self.path}: "
                                      f"{exc.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise HostTPMError(reason=f"host key blobs {self.path} is not a regular file")
            # as hostkey.sealed: whoever may write it chooses the agent's keys
            if st.st_uid != os.geteuid() or st.st_mode & 0o077:
                raise HostTPMError(reason=f"host key blobs {self.path} must be owned by uid "
                                          f"{os.geteuid()} with mode 0600")
            data = f.read()
        try:
            return KeyBlobs.from_bytes(data)
        except HostTPMError as exc:
            raise HostTPMError(reason=f"{self.path} failed its integrity check: "
                                      f"{exc.kwargs['reason']}") from None

    def save(self, blobs: KeyBlobs, replace: bool = False) -> None:
        try:
            fileutil.write_atomic(self.path, blobs.to_bytes(), mode=0o600, replace=replace)
        except FileExistsError:
            raise HostTPMError(reason=f"host key blobs {self.path} appeared meanwhile: "
                                      "another agent uses this state directory") from None


_MEMORY: dict[tuple[str, bytes], KeyBlobs] = {}
_MEMORY_GUARD = threading.Lock()


class MemoryBlobStore:
    """For tools, tests and benchmarks without a state directory: the keys
    live as long as this process, shared by its HostTPMs of one TCTI. The
    agent never uses it (its enrollment must survive a restart). Keyed by
    TCTI and a digest of the auth values, so that HostTPMs with other auth
    values get keys of their own instead of ones they cannot use."""

    def __init__(self, tcti: str, auth: bytes) -> None:
        self._tcti = tcti
        self._key = (tcti, hashlib.sha256(b"vtpcm memory blob store " + auth).digest())

    def __repr__(self) -> str:
        return f"MemoryBlobStore({self._tcti!r})"

    def load(self) -> KeyBlobs | None:
        with _MEMORY_GUARD:
            return _MEMORY.get(self._key)

    def save(self, blobs: KeyBlobs, replace: bool = False) -> None:
        with _MEMORY_GUARD:
            if replace:
                _MEMORY[self._key] = blobs
            else:
                _MEMORY.setdefault(self._key, blobs)


class Loaded(NamedTuple):
    """A loaded child: its handle, public area and an HMAC session salted to
    its parent, to authorize (and encrypt) the commands that use it."""

    handle: ESYS_TR
    public: TPM2B_PUBLIC
    session: ESYS_TR


def template(alg: str, attrs: TPMA_OBJECT, policy: bytes = b"") -> TPM2B_PUBLIC:
    tmpl = TPMT_PUBLIC.parse(alg, objectAttributes=attrs)
    tmpl.authPolicy = TPM2B_DIGEST(policy)
    return TPM2B_PUBLIC(tmpl)


def _policy_commands(e: ESAPI, session: ESYS_TR, pcrs: TPML_PCR_SELECTION) -> None:
    # empty pcrDigest: the TPM takes the PCRs' current values
    e.policy_pcr(session, TPM2B_DIGEST(b""), pcrs)
    e.policy_auth_value(session)


def kem_policy(e: ESAPI, pcrs: TPML_PCR_SELECTION) -> bytes:
    """The KEM key's authPolicy for the PCRs' current values (a trial
    session: PolicyPCR, then PolicyAuthValue)."""
    session = e.start_auth_session(ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.TRIAL,
                                   None, TPM2_ALG.SHA256)
    try:
        _policy_commands(e, session, pcrs)
        return bytes(e.policy_get_digest(session))
    finally:
        e.flush_context(session)


def kem_is_current(e: ESAPI, kem_public: bytes, pcrs: TPML_PCR_SELECTION | None) -> bool:
    """Whether the stored KEM key is bound as configured now: no policy
    without ``pcrs``, else the policy of the PCRs' current values."""
    pub, _used = TPM2B_PUBLIC.unmarshal(kem_public)
    bound = bytes(pub.publicArea.authPolicy)
    return bound == (kem_policy(e, pcrs) if pcrs is not None else b"")


def object_name(public: TPM2B_PUBLIC) -> bytes:
    """The TPM name of ``public`` (nameAlg SHA-256 || digest of the
    marshaled TPMT_PUBLIC), computed here, not taken from the TPM."""
    area = public.publicArea
    if area.nameAlg != TPM2_ALG.SHA256:
        raise HostTPMError(reason="storage primary with an unexpected name algorithm")
    return struct.pack(">H", int(TPM2_ALG.SHA256)) + hashlib.sha256(area.marshal()).digest()


_HIERARCHY_NAMES = {ESYS_TR.OWNER: "owner", ESYS_TR.ENDORSEMENT: "endorsement"}


class ParentMismatch(HostTPMError):
    """A storage primary's name differs from the pinned one: refused before
    any secret is sent under it."""


class Primary(NamedTuple):
    """A storage primary as CreatePrimary answered: its handle, its name
    (computed here), its public area, and the creation data, hash and
    ticket (for TPM2_CertifyCreation, ``certify_parent``)."""

    handle: ESYS_TR
    name: bytes
    public: TPM2B_PUBLIC
    creation_data: TPM2B_CREATION_DATA
    creation_hash: TPM2B_DIGEST
    ticket: TPMT_TK_CREATION


@contextmanager
def pinned_primary(e: ESAPI, hierarchy: ESYS_TR, pinned: bytes = b"",
                   attrs: TPMA_OBJECT = PARENT_ATTRS) -> Iterator[Primary]:
    """The storage primary of ``hierarchy`` for one operation.

    Why the pin (finding H1): sessions are salted to the public key in the
    CreatePrimary *answer*; an interposer that swaps it learns the session
    key. A primary is derived from the hierarchy seed and the template, so
    its name never changes while the seed does not: with ``pinned`` (the
    name seen when the key or the sealed object was made) any other answer
    is refused before a session is salted to it. Empty auth: it only wraps
    children and salts sessions, it decrypts nothing for anyone."""
    handle, pub, cdata, cdigest, ticket = e.create_primary(
        None, template(PARENT_TEMPLATE, attrs), hierarchy)
    try:
        name = object_name(pub)
        if pinned and name != pinned:
            which = _HIERARCHY_NAMES.get(hierarchy, str(hierarchy))
            raise ParentMismatch(reason=(
                f"the {which} storage primary the TPM answered has name {name.hex()}, "
                f"not the pinned {pinned.hex()}: something between the agent and the "
                "TPM answers for it (an interposer), or this is another TPM or its "
                "hierarchy seed changed (cleared, replaced); refused before sending "
                "any secret. Keep every file of the state "
                "directory (they are needed once the TPM path is sound again) and "
                "check the TPM device path and what is attached to it"))
        yield Primary(handle, name, pub, cdata, cdigest, ticket)
    finally:
        e.flush_context(handle)


@contextmanager
def pinned_parent(e: ESAPI, hierarchy: ESYS_TR, pinned: bytes = b"",
                  attrs: TPMA_OBJECT = PARENT_ATTRS) -> Iterator[tuple[ESYS_TR, bytes]]:
    """``pinned_primary``'s handle and name."""
    with pinned_primary(e, hierarchy, pinned, attrs) as primary:
        yield primary.handle, primary.name


class ParentCertification(NamedTuple):
    """TPM2_CertifyCreation of a pinned storage parent by the AK (issue 9:
    ends trust on first use of the pins). All public. The creation ticket
    is an HMAC under the TPM's proof value over the object's name and its
    creation hash: only an object this TPM created itself has one, never a
    key loaded with LoadExternal or imported, so the AK signs the name of
    a real primary of ``hierarchy`` and the engine compares it with
    ``pinned_name`` (what the agent salts its sessions to)."""

    hierarchy: str            # "owner" or "endorsement"
    public: bytes             # marshaled TPMT_PUBLIC as the TPM answered
    pinned_name: bytes        # the name the agent pinned
    creation_data: bytes      # marshaled TPMS_CREATION_DATA
    attest: bytes             # marshaled TPMS_ATTEST (ATTEST_CREATION)
    signature: bytes          # marshaled TPMT_SIGNATURE by the AK


def certify_parent(e: ESAPI, hierarchy: ESYS_TR, pinned: bytes, signer: ESYS_TR,
                   session: ESYS_TR, qualifying: bytes) -> ParentCertification:
    """Re-create ``hierarchy``'s storage primary (refused unless its name is
    ``pinned``; empty: its name as answered, the first start's
    ``ekverify``) and have ``signer`` (the loaded AK, authorized by
    ``session``) certify its creation; extraData binds ``qualifying`` to
    the hierarchy and to the agent's own pin (``authn.parent_binding``), so
    the AK's signature covers the ``pinned_name`` the reply reports."""
    which = _HIERARCHY_NAMES[hierarchy]
    with pinned_primary(e, hierarchy, pinned) as primary:
        pinned = primary.name  # the pin itself if one was given
        attest, sig = e.certify_creation(
            signer, primary.handle, authn.parent_binding(qualifying, which, pinned),
            primary.creation_hash,
            TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL), primary.ticket, session1=session)
        return ParentCertification(
            hierarchy=which,
            public=bytes(primary.public.publicArea.marshal()),
            pinned_name=pinned,
            creation_data=bytes(primary.creation_data.creationData.marshal()),
            attest=bytes(attest), signature=bytes(sig.marshal()))


@contextmanager
def parent(e: ESAPI, hierarchy: ESYS_TR,
           attrs: TPMA_OBJECT = PARENT_ATTRS) -> Iterator[ESYS_TR]:
    """The storage primary of ``hierarchy`` for one operation, unpinned
    (for callers that send it nothing secret)."""
    with pinned_parent(e, hierarchy, b"", attrs) as (handle, _name):
        yield handle


def salted_session(e: ESAPI, salt_key: ESYS_TR) -> ESYS_TR:
    """An HMAC session whose salt is encrypted to ``salt_key`` (a loaded
    restricted decryption key); the caller sets its attributes per command
    (``use``) and flushes it."""
    session = e.start_auth_session(salt_key, ESYS_TR.NONE, TPM2_SE.HMAC,
                                   SESSION_CIPHER, TPM2_ALG.SHA256)
    e.trsess_set_attributes(session, AUTH_ONLY)
    return session


def use(e: ESAPI, session: ESYS_TR, attrs: TPMA_SESSION) -> ESYS_TR:
    """``session`` with ``attrs`` for the next command (returns it)."""
    e.trsess_set_attributes(session, attrs)
    return session


def _create_child(e: ESAPI, hierarchy: ESYS_TR, public: TPM2B_PUBLIC,
                  auth: bytes, pinned: bytes, salted: ESYS_TR | None = None,
                  ) -> tuple[bytes, bytes, bytes]:
    """``salted``: a session of the caller's (the first start's, salted to
    the verified EK: ``ekverify``) instead of one salted to the parent; it
    authorizes the parent too, so its name is in the command's HMAC."""
    sensitive = TPM2B_SENSITIVE_CREATE(TPMS_SENSITIVE_CREATE(userAuth=auth))
    with pinned_parent(e, hierarchy, pinned) as (p, name):
        session = salted_session(e, p) if salted is None else salted
        try:
            # inSensitive (the auth value) is the first parameter: encrypted
            priv, pub, _cd, _cdig, _tk = e.create(p, sensitive, public,
                                                  session1=use(e, session, DECRYPT))
        finally:
            if salted is None:
                e.flush_context(session)
    return pub.marshal(), priv.marshal(), name


def create_kem(e: ESAPI, auth: bytes, pcrs: TPML_PCR_SELECTION | None,
               pinned: bytes = b"", salted: ESYS_TR | None = None,
               ) -> tuple[bytes, bytes, bytes]:
    """A new KEM key (owner hierarchy): (public, private) blobs and its
    parent's name (``pinned``: the name it must have). With ``pcrs`` bound
    to their current values (userWithAuth clear: ZGen only through the
    policy). ``salted``: as ``_create_child``'s."""
    if pcrs is None:
        public = template(KEM_TEMPLATE, KEM_ATTRS)
    else:
        public = template(KEM_TEMPLATE, KEM_ATTRS & ~TPMA_OBJECT.USERWITHAUTH,
                          kem_policy(e, pcrs))
    return _create_child(e, KEM_HIERARCHY, public, auth, pinned, salted)


def create_ak(e: ESAPI, auth: bytes, salted: ESYS_TR | None = None,
              ) -> tuple[bytes, bytes, bytes]:
    """A new AK (endorsement hierarchy): (public, private) blobs and its
    parent's name. ``salted``: as ``_create_child``'s."""
    return _create_child(e, AK_HIERARCHY, template(AK_TEMPLATE, AK_ATTRS), auth, b"",
                         salted)


def create_blobs(e: ESAPI, ak_auth: bytes, kem_auth: bytes,
                 kem_pcrs: TPML_PCR_SELECTION | None = None,
                 kem_parent: bytes = b"") -> KeyBlobs:
    """A new AK (endorsement hierarchy) and KEM key (owner hierarchy) with
    the given auth values, created inside the TPM; their parents' names as
    seen now are pinned from here on. ``kem_parent``: the name the KEM key's
    parent must have (the sealed host key's parent: the same primary).

    The KEM key first (akfix review round 2, finding 4): its parent is
    checked against ``kem_parent`` before any session is salted to it, so
    an interposer swapping the owner primary is refused before the AK's
    auth value (which derives from the host key, the same on every
    attempt) is sent; the AK's parent, the endorsement primary, has no
    earlier pin to check (design "Open points")."""
    kem_pub, kem_priv, kem_parent = create_kem(e, kem_auth, kem_pcrs, kem_parent)
    ak_pub, ak_priv, ak_parent = create_ak(e, ak_auth)
    return KeyBlobs(ak_public=ak_pub, ak_private=ak_priv,
                    kem_public=kem_pub, kem_private=kem_priv,
                    ak_parent_name=ak_parent, kem_parent_name=kem_parent)


def parent_name(e: ESAPI, hierarchy: ESYS_TR) -> bytes:
    """The name of ``hierarchy``'s storage primary now (to pin the parents
    of a version-1 blob file, trusting this one answer)."""
    with pinned_parent(e, hierarchy) as (_handle, name):
        return name


def _unmarshal(public: bytes, private: bytes) -> tuple[TPM2B_PUBLIC, TPM2B_PRIVATE]:
    try:
        pub, used_pub = TPM2B_PUBLIC.unmarshal(public)
        priv, used_priv = TPM2B_PRIVATE.unmarshal(private)
    except (TSS2_Exception, ValueError, TypeError) as exc:
        raise HostTPMError(reason="host key blobs: malformed key") from exc
    if used_pub != len(public) or used_priv != len(private):
        raise HostTPMError(reason="host key blobs: trailing bytes in a key")
    return pub, priv


def load_with_session(e: ESAPI, hierarchy: ESYS_TR, public: bytes, private: bytes,
                      what: str, policy: bool, pinned: bytes = b"",
                      ) -> tuple[ESYS_TR, TPM2B_PUBLIC, ESYS_TR]:
    """Load a child under its hierarchy's (pinned) parent and start a
    session salted to that parent (a policy session if ``policy``); the
    parent is flushed before returning (libtpms has three transient slots:
    certify needs AK and KEM key). The caller flushes handle and session."""
    pub, priv = _unmarshal(public, private)
    with pinned_parent(e, hierarchy, pinned) as (p, _name):
        try:
            handle = e.load(p, priv, pub)
        except TSS2_Exception as exc:
            if exc.error != TPM2_RC.INTEGRITY:
                raise HostTPMError(reason=f"the agent's {what} cannot be loaded: {exc}"
                                   ) from None
            raise HostTPMError(
                reason=f"the agent's {what} does not load in this TPM ({exc}): the TPM "
                       "was cleared or replaced; move the host key blobs aside and "
                       "re-enroll the host") from None
        try:
            if not policy:
                session = salted_session(e, p)
            else:
                session = e.start_auth_session(p, ESYS_TR.NONE, TPM2_SE.POLICY,
                                               SESSION_CIPHER, TPM2_ALG.SHA256)
                e.trsess_set_attributes(session, AUTH_ONLY)
        except BaseException:
            e.flush_context(handle)
            raise
    return handle, pub, session


@contextmanager
def loaded(e: ESAPI, hierarchy: ESYS_TR, public: bytes, private: bytes,
           auth: bytes, what: str, policy: TPML_PCR_SELECTION | None = None,
           pinned: bytes = b"") -> Iterator[Loaded]:
    """Load a child with a salted session (``load_with_session``) for one
    command; the child and the session are flushed after it. ``policy``: a
    policy session that has run the KEM key's PolicyPCR and PolicyAuthValue,
    instead of an HMAC session (for the USER role of a PCR-bound key).
    ``pinned``: the name the parent must have (``pinned_parent``)."""
    handle, pub, session = load_with_session(e, hierarchy, public, private, what,
                                             policy is not None, pinned)
    try:
        if policy is not None:
            _policy_commands(e, session, policy)
        e.tr_set_auth(handle, auth)
        yield Loaded(handle, pub, session)
    finally:
        e.flush_context(session)
        e.flush_context(handle)
