"""Per-instance keys, stored on disk only wrapped by a host key.

Each vTPCM has an at-rest key (swtpm ``--key``) and a migration key (swtpm
``--migration-key``). They are wrapped with AES-256-GCM under a key derived
from the *host key*, which itself lives sealed in the host TPM
(``TPMSealedHostKey``) or, in an explicit dev mode only, in a root-only file
(``DevKeyFileHostKey``). Stealing the key store directory alone yields nothing.

Entry file ``<dir>/<vtpcm_id>.keys`` (97 bytes)::

    b"VTKS" | u8 version=1 | nonce (12) | AES-256-GCM(at_rest || migration) + tag

with AAD = ``b"VTKS" | version | vtpcm_id`` (so an entry copied to another
id's name does not open) and the wrapping key
``HKDF-SHA256(host_key, info=b"vtpcm keystore wrap v1")``.
"""

from __future__ import annotations

import hmac
import os
import secrets
import stat
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from oslo_log import log as logging

from vtpcm_agent import hostkeys, keyauth
from vtpcm_agent.hostkeys import ParentMismatch
from vtpcm_agent.hosttpm import HostTPM, HostTPMLockout, SealedObject
from vtpcm_common import ekcert, fileutil
from vtpcm_common.exception import (
    AlreadyExists,
    HostTPMError,
    InvalidInput,
    KeyStoreError,
    NotFound,
)

LOG = logging.getLogger(__name__)

KEY_LEN = 32
_MAGIC = b"VTKS"
_VERSION = 1
_NONCE = 12
_ENTRY_LEN = len(_MAGIC) + 1 + _NONCE + 2 * KEY_LEN + 16
_WRAP_INFO = b"vtpcm keystore wrap v1"


@dataclass(frozen=True, eq=False)
class InstanceKeys:
    """The two 32-byte keys of one vTPCM. repr/str never show them."""

    at_rest_key: bytes
    migration_key: bytes

    def __post_init__(self) -> None:
        for name in ("at_rest_key", "migration_key"):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != KEY_LEN:
                raise InvalidInput(reason=f"{name} must be {KEY_LEN} bytes")

    @classmethod
    def generate(cls) -> InstanceKeys:
        return cls(at_rest_key=secrets.token_bytes(KEY_LEN),
                   migration_key=secrets.token_bytes(KEY_LEN))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, InstanceKeys):
            return NotImplemented
        return (hmac.compare_digest(self.at_rest_key, other.at_rest_key)
                & hmac.compare_digest(self.migration_key, other.migration_key))

    def __hash__(self) -> int:
        return id(self)

    def __repr__(self) -> str:
        return "InstanceKeys(<hidden>)"

    __str__ = __repr__


class HostKeyProvider(Protocol):
    """Gives the 32-byte host key that wraps every instance's keys."""

    def host_key(self) -> bytes: ...


def _overwrite(fd: int) -> None:
    """Overwrite an entry's bytes in place with random ones and fsync
    (best effort on copy-on-write or wear-levelled storage)."""
    size = os.fstat(fd).st_size
    os.pwrite(fd, secrets.token_bytes(max(size, _ENTRY_LEN)), 0)
    os.fsync(fd)


def validate_vtpcm_id(vtpcm_id: str) -> str:
    """Return the canonical uuid string; anything else is refused.

    The id becomes a file name: only a canonical uuid is safe from path
    traversal ("../x", "/etc/x", NUL, ...).
    """
    if not isinstance(vtpcm_id, str):
        raise InvalidInput(reason="vTPCM id must be a uuid string")
    try:
        canonical = str(uuid.UUID(vtpcm_id))
    except ValueError:
        raise InvalidInput(reason=f"vTPCM id {vtpcm_id[:80]!r} is not a uuid") from None
    return canonical


def _read_private_file(path: Path, what: str) -> bytes:
    """Read a file that must be a regular file owned by us, mode 0600 or stricter."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise KeyStoreError(reason=f"cannot open {what} {path}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyStoreError(reason=f"{what} {path} is not a regular file")
        if st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise KeyStoreError(reason=f"{what} {path} must be owned by uid {os.geteuid()} "
                                       "with mode 0600")
        chunks = []
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


class _CachedHostKey:
    """Loads (or creates) the host key once, under a lock, then keeps it."""

    def __init__(self, path: Path) -> None:
        self._path = Path(path)
        self._key: bytes | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(path={str(self._path)!r})"

    def host_key(self) -> bytes:
        with self._lock:
            if self._key is None:
                self._key = self._load_or_create()
            return self._key

    def _load_or_create(self) -> bytes:
        raise NotImplementedError


class DevKeyFileHostKey(_CachedHostKey):
    """DEV ONLY: the host key in a root-only 0600 file, not in a TPM.

    Anyone who can read the file (root, a disk image, a backup) can unwrap
    every instance key on the host. Construction always logs a warning.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        LOG.warning("INSECURE dev mode: the vTPCM host key is kept in the plain file "
                    "%(path)s instead of being sealed in the host TPM; never use this "
                    "in production", {"path": self._path})

    def _load_or_create(self) -> bytes:
        try:
            data = _read_private_file(self._path, "dev host key file")
        except FileNotFoundError:
            key = secrets.token_bytes(KEY_LEN)
            try:
                fileutil.write_atomic(self._path, key, replace=False)
                LOG.warning("Created dev host key file %(path)s", {"path": self._path})
                return key
            except FileExistsError:
                data = _read_private_file(self._path, "dev host key file")
        if len(data) != KEY_LEN:
            raise KeyStoreError(reason=f"dev host key file {self._path} must hold exactly "
                                       f"{KEY_LEN} bytes")
        return data


class HostKeyLockout(KeyStoreError):
    """The host TPM is in DA lockout: retryable, the sealed file is sound."""


class TPMSealedHostKey(_CachedHostKey):
    """The host key sealed in the host TPM; the file holds only the TPM blob.

    First use generates a random key, seals it and writes the sealed object
    (0600, atomic). Later uses unseal it. If the file exists but this TPM
    cannot unseal it, that is an error: silently making a new key would
    orphan every wrapped instance key.
    """

    def __init__(self, host_tpm: HostTPM, path: Path, *, ek_ca_file: Path | None = None,
                 key_file: Path | None = None, kem_pcrs: Sequence[int] = ()) -> None:
        """``ek_ca_file`` (``[host_tpm] ek_ca_file``): at the first start
        (no ``path`` yet) verify the TPM against these EK CAs, create the AK
        and KEM key (stored in ``key_file``, with ``kem_pcrs``) and seal
        the host key under the certified owner primary (``ekverify``);
        without it the first start is trust on first use (a warning)."""
        super().__init__(path)
        self._tpm = host_tpm
        self._ek_ca_file = ek_ca_file
        self._key_file = key_file
        self._kem_pcrs = tuple(kem_pcrs)
        if ek_ca_file is not None and key_file is None:
            raise InvalidInput(reason="ek_ca_file needs the key blobs' file (key_file)")

    def _load_or_create(self) -> bytes:
        """The host key; its sealed object's pinned parent is bound to the
        HostTPM (``bind_host_key_parent``): the AK and KEM key are used only
        if their owner parent, the one enrollment certifies, is that one;
        with ``ek_ca_file`` a missing AK and KEM key are re-created only in
        the verified TPM, under the owner primary it certifies as that one."""
        key, parent = self._unsealed()
        self._tpm.bind_host_key_parent(parent, ek_ca_file=self._ek_ca_file)
        return key

    def _unsealed(self) -> tuple[bytes, bytes]:
        """The host key and its sealed object's pinned parent name (empty:
        a format-1 or -2 object whose reseal failed)."""
        try:
            data = _read_private_file(self._path, "sealed host key file")
        except FileNotFoundError:
            key = secrets.token_bytes(KEY_LEN)
            sealed = self._first_seal(key)
            try:
                fileutil.write_atomic(self._path, sealed.to_bytes(), replace=False)
            except FileExistsError:
                data = _read_private_file(self._path, "sealed host key file")
            else:
                LOG.info("Sealed a new host key in the host TPM, blob at %(path)s",
                         {"path": self._path})
                return key, sealed.parent_name
        try:
            sealed = SealedObject.from_bytes(data)
        except HostTPMError as exc:
            raise KeyStoreError(reason=f"sealed host key file {self._path} failed its integrity "
                                       f"check: {exc.kwargs['reason']}") from None
        try:
            key = self._tpm.unseal(sealed)
        except HostTPMLockout as exc:
            raise HostKeyLockout(reason=(
                f"the host TPM is in dictionary-attack lockout, so the host key "
                f"{self._path} cannot be unsealed now; this is retryable: do NOT delete "
                f"{self._path.name} (every wrapped instance key depends on it); retry after "
                "the lockout interval or a DictionaryAttackLockReset "
                f"({exc.kwargs['reason']})")) from None
        except ParentMismatch as exc:
            raise KeyStoreError(reason=f"host key {self._path} not unsealed: "
                                       f"{exc.kwargs['reason']}") from None
        except HostTPMError as exc:
            raise KeyStoreError(reason=f"host key {self._path} cannot be unsealed by this host TPM "
                                       "(another TPM, cleared owner hierarchy or damaged "
                                       f"file): {exc.message}") from exc
        if len(key) != KEY_LEN:
            raise KeyStoreError(reason=f"unsealed host key {self._path} has a wrong length")
        if not sealed.current:
            return key, self._upgrade(key, sealed)
        return key, sealed.parent_name

    def _first_seal(self, key: bytes) -> SealedObject:
        """Seal a new host key: under the owner primary the AK certified
        once the TPM was verified (``[host_tpm] ek_ca_file``; the key blobs
        are written first, then the caller writes the sealed key), or, with
        no CA bundle, trusting the TPM's answers (logged)."""
        if self._ek_ca_file is None:
            LOG.warning("First start of this agent: the host key is sealed and the AK "
                        "and KEM key created trusting whatever answers on the TPM "
                        "interface (trust on first use: [host_tpm] ek_ca_file is not "
                        "set, so the TPM is not verified against its EK certificate); "
                        "an active interposer there now could read the host key")
            return self._tpm.seal(key)
        assert self._key_file is not None
        store = hostkeys.FileBlobStore(self._key_file)
        if os.path.lexists(self._key_file):
            raise KeyStoreError(reason=(
                f"first start refused: {self._key_file} exists but {self._path} does not "
                "(an interrupted first start or a mixed-up state directory); move "
                f"{self._key_file.name} aside and start the agent again"))
        cas = ekcert.load_ca_file(self._ek_ca_file)
        blobs = self._tpm.verified_first_keys(keyauth.derive(key), cas, self._kem_pcrs)
        sealed = self._tpm.seal(key, pinned=blobs.kem_parent_name)
        store.save(blobs)
        LOG.info("First start: the host TPM was verified against its EK certificate "
                 "(%(cas)s); the AK and KEM key were created and the host key sealed "
                 "under the owner primary the AK certified", {"cas": self._ek_ca_file})
        return sealed

    def _upgrade(self, key: bytes, old: SealedObject) -> bytes:
        """Reseal a format-1 or -2 host key as format 3 (noDA, under the noDA
        parent, its name pinned, and its own random auth value: an old
        object unseals with an empty one, so its blob seen on the TPM
        interface gave the host key away) and swap the file atomically; its
        parent's name (bound to the HostTPM like a new seal's). A format-2
        object keeps its pinned parent. On failure the old file stays and
        unwraps instance keys, but no parent is bound (empty): the agent
        starts, the AK and KEM key are refused at use until a later start
        reseals it."""
        fmt = 1 if old.legacy else 2
        try:
            resealed = self._tpm.seal(key, pinned=old.parent_name)
            if self._tpm.unseal(resealed) != key:
                raise HostTPMError(reason="the resealed host key does not unseal to the same key")
            fileutil.write_atomic(self._path, resealed.to_bytes(), replace=True)
        except (HostTPMError, OSError) as exc:
            LOG.warning("Kept the format-%(fmt)d sealed host key %(path)s intact: resealing "
                        "it as format 3 failed: %(err)s. Instance keys still unwrap; the AK "
                        "and KEM key are refused (no enrollment, attestation or migration) "
                        "until the agent is restarted after fixing the cause (e.g. disk "
                        "space or permissions of the state directory)",
                        {"fmt": fmt, "path": self._path, "err": _reason(exc)})
            return b""
        LOG.warning("Resealed the format-%(fmt)d host key %(path)s as format 3: noDA, its "
                    "parent's name pinned, its own auth value. The host key is the same: "
                    "every earlier copy of the format-%(fmt)d blob (seen on the TPM "
                    "interface at an earlier start, or a backup of the old file) still "
                    "unseals it in this TPM with an empty password. If the TPM interface "
                    "or backups of the state directory may have been exposed, drain and "
                    "revoke this host, start the agent with a fresh state directory (a new "
                    "host key), re-enroll it, and destroy the old file's backups",
                    {"fmt": fmt, "path": self._path})
        return resealed.parent_name


def _reason(exc: HostTPMError | OSError) -> str:
    """What failed, without data: the TPM error's message, or the OS
    error's name and strerror (ENOSPC: "No space left on device")."""
    if isinstance(exc, HostTPMError):
        return exc.message
    return f"{type(exc).__name__}: {exc.strerror or 'no reason given'}"


class KeyStore:
    """Wrapped per-instance keys in one directory (0700), one file each."""

    def __init__(self, directory: Path, host_key_provider: HostKeyProvider) -> None:
        self._dir = Path(directory)
        self._provider = host_key_provider
        self._lock = threading.Lock()
        self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self._dir.stat().st_mode & 0o077:
            LOG.warning("Key store directory %(dir)s is accessible by group/others",
                        {"dir": self._dir})

    def __repr__(self) -> str:
        return f"KeyStore(directory={str(self._dir)!r})"

    def _path(self, vtpcm_id: str) -> tuple[str, Path]:
        canonical = validate_vtpcm_id(vtpcm_id)
        return canonical, self._dir / (canonical + ".keys")

    def _aead(self) -> AESGCM:
        host_key = self._provider.host_key()
        if not isinstance(host_key, bytes) or len(host_key) != KEY_LEN:
            raise KeyStoreError(reason="host key provider returned a malformed key")
        wrap_key = HKDF(algorithm=hashes.SHA256(), length=KEY_LEN, salt=None,
                        info=_WRAP_INFO).derive(host_key)
        return AESGCM(wrap_key)

    @staticmethod
    def _aad(vtpcm_id: str) -> bytes:
        return _MAGIC + bytes([_VERSION]) + vtpcm_id.encode("ascii")

    def exists(self, vtpcm_id: str) -> bool:
        return self._path(vtpcm_id)[1].exists()

    def put(self, vtpcm_id: str, keys: InstanceKeys, replace: bool = False) -> None:
        """Store ``keys`` wrapped; refuse to overwrite unless ``replace``."""
        canonical, path = self._path(vtpcm_id)
        if not isinstance(keys, InstanceKeys):
            raise InvalidInput(reason="keys must be InstanceKeys")
        nonce = secrets.token_bytes(_NONCE)
        ct = self._aead().encrypt(nonce, keys.at_rest_key + keys.migration_key,
                                  self._aad(canonical))
        with self._lock:
            old = None
            if replace:
                # the entry it replaces (a migration key epoch ago) is
                # shredded as destroy() does, not left in freed blocks
                try:
                    old = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
                except FileNotFoundError:
                    pass
            entry = _MAGIC + bytes([_VERSION]) + nonce + ct
            try:
                try:
                    fileutil.write_atomic(path, entry, replace=replace)
                except FileExistsError:
                    raise AlreadyExists(what="key store entry for vTPCM",
                                        key=canonical) from None
                if old is not None:
                    # shred the old entry only once the new one is durably in
                    # place and reads back: a failed write (ENOSPC, EIO) must
                    # leave the only live key untouched
                    if _read_private_file(path, "key store entry") != entry:
                        raise KeyStoreError(reason=f"entry of vTPCM {canonical} did not "
                                                   "read back as written")
                    _overwrite(old)
            finally:
                if old is not None:
                    os.close(old)
        LOG.info("Stored wrapped keys of vTPCM %(id)s", {"id": canonical})

    def get(self, vtpcm_id: str) -> InstanceKeys:
        canonical, path = self._path(vtpcm_id)
        try:
            data = _read_private_file(path, "key store entry")
        except FileNotFoundError:
            raise NotFound(what="key store entry for vTPCM", key=canonical) from None
        if len(data) != _ENTRY_LEN:
            raise KeyStoreError(reason=f"entry of vTPCM {canonical} has a wrong size "
                                       f"({len(data)} bytes)")
        if data[:len(_MAGIC)] != _MAGIC or data[len(_MAGIC)] != _VERSION:
            raise KeyStoreError(reason=f"entry of vTPCM {canonical} has a bad magic/version")
        off = len(_MAGIC) + 1
        nonce, ct = data[off:off + _NONCE], data[off + _NONCE:]
        try:
            plain = self._aead().decrypt(nonce, ct, self._aad(canonical))
        except InvalidTag:
            raise KeyStoreError(reason=f"entry of vTPCM {canonical} failed authentication "
                                       "(tampered, or written for another id or host key)"
                                ) from None
        return InstanceKeys(at_rest_key=plain[:KEY_LEN], migration_key=plain[KEY_LEN:])

    def destroy(self, vtpcm_id: str) -> None:
        """Crypto-shred an entry: overwrite with random bytes, fsync, unlink.

        Idempotent. On copy-on-write or wear-levelled storage the overwrite
        is best effort; the entry is useless without the host key anyway.
        """
        canonical, path = self._path(vtpcm_id)
        with self._lock:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
            except FileNotFoundError:
                return
            try:
                _overwrite(fd)
            finally:
                os.close(fd)
            path.unlink()
            fileutil.fsync_dir(self._dir)
        LOG.info("Destroyed the keys of vTPCM %(id)s", {"id": canonical})
