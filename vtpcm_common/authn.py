"""Signed RPC commands: engine -> agent, and operator -> engine.

Anyone with broker credentials (every compute node has them) can publish on
the agent topic, so the broker does not tell who sent a message. The engine
therefore signs every state-changing agent command with an Ed25519 key only
it holds; each agent pins the engine's public key and refuses a command that
is unsigned, signed by another key, meant for another host or method, altered,
stale, or seen before.

The signature covers the canonical JSON of ``{"v": 1, "method", "server",
"payload", "issued_at", "expires_at", "nonce"}`` (sorted keys, no spaces), so
the payload the agent parses is exactly the one the engine signed.

The same scheme protects the engine's admin methods (approve a host, store a
policy, ...): operators sign them with their own Ed25519 keys and the engine
accepts a signature by any of its configured operator public keys. Those
calls go to a topic that any engine worker may answer, so the signed
``server`` is the engine topic name (``CommandSigner.for_server``).
"""

import base64
import binascii
import hashlib
import json
import math
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from oslo_config import cfg
from oslo_log import log as logging

from vtpcm_common import exception, fileutil

LOG = logging.getLogger(__name__)

VERSION = 1
DEFAULT_TTL = 120.0
# How far a verifier's clock may be behind the signer's: a command is still
# accepted this long after its expiry as the signer counts it.
DEFAULT_MAX_SKEW = 30.0
AUTH_FIELDS = frozenset({"server", "issued_at", "expires_at", "nonce", "signature"})
NONCE_BYTES = 16
SIGNATURE_BYTES = 64

Clock = Callable[[], float]


def canonical_bytes(method: str, server: str, payload: Any, issued_at: float,
                    expires_at: float, nonce: str) -> bytes:
    """The signed bytes. The payload goes through JSON once first, so the
    sender signs what the receiver decodes (tuples become lists, int keys
    strings)."""
    wire_payload = json.loads(json.dumps(payload))
    doc = {"v": VERSION, "method": method, "server": server, "payload": wire_payload,
           "issued_at": issued_at, "expires_at": expires_at, "nonce": nonce}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"),
                      allow_nan=False).encode()


def fingerprint(public_key: ed25519.Ed25519PublicKey) -> str:
    """Short, loggable name of a key (SHA-256 of the raw public key)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw,
                                  serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_raw(public_key: ed25519.Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of a public key (how host command keys travel)."""
    return public_key.public_bytes(serialization.Encoding.Raw,
                                   serialization.PublicFormat.Raw)


def load_public_raw(raw: bytes, *, what: str = "public key") -> ed25519.Ed25519PublicKey:
    try:
        return ed25519.Ed25519PublicKey.from_public_bytes(raw)
    except (TypeError, ValueError):
        raise exception.InvalidInput(reason="%s is not a raw Ed25519 public key" % what) \
            from None


HOST_KEY_BINDING = b"vtpcm host command key v2\0"


def host_key_binding(nonce: bytes, command_public: bytes, host: str) -> bytes:
    """The qualifying data of a host's enrollment certify: the engine's nonce
    bound to the host's command public key and its host name, so the AK that
    the engine trusts for quotes also vouches, in the TPM, for the key the
    host signs with, under that name only (v2, agent API 1.6: with v1, a
    broker client answering the engine's get_identity for another name
    could relay a real host's identity and squat its keys under that name).
    Each part is length-prefixed."""
    parts = (nonce, command_public, host.encode("utf-8"))
    return hashlib.sha256(HOST_KEY_BINDING + b"".join(
        len(part).to_bytes(2, "big") + part for part in parts)).digest()


PARENT_BINDING = b"vtpcm certified storage parent v1\0"


def parent_binding(qualifying: bytes, hierarchy: str, pinned_name: bytes) -> bytes:
    """The qualifying data of the AK's TPM2_CertifyCreation of one storage
    parent (agent API 1.10, issue 9): the identity's qualifying data bound
    to the hierarchy and to the name the agent pinned for it. The agent
    computes it from its own pins, the engine from the reported ones: the
    ``pinned_name`` of the (unsigned) reply is then covered by the AK's
    signature, so a broker client that rewrites it to the real primary's
    name (public) breaks the certification instead of hiding an interposer
    the agent pinned. Each part is length-prefixed."""
    parts = (qualifying, hierarchy.encode("utf-8"), pinned_name)
    return hashlib.sha256(PARENT_BINDING + b"".join(
        len(part).to_bytes(2, "big") + part for part in parts)).digest()


def _public_pem(public_key: ed25519.Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.PEM,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


class CommandSigner:
    """The engine's side: signs commands. Holds the private key; its repr
    shows only the public key's fingerprint."""

    def __init__(self, private_key: ed25519.Ed25519PrivateKey, *, ttl: float = DEFAULT_TTL,
                 clock: Clock = time.time, server: str | None = None) -> None:
        if not isinstance(private_key, ed25519.Ed25519PrivateKey):
            raise exception.InvalidInput(reason="command signing key must be Ed25519")
        if not (math.isfinite(ttl) and ttl > 0):
            raise exception.InvalidInput(reason="command signature ttl must be > 0")
        self._key = private_key
        self.ttl = float(ttl)
        self._clock = clock
        self.public_key = private_key.public_key()
        self.fingerprint = fingerprint(self.public_key)
        self.server = server

    def __repr__(self) -> str:
        bound = "" if self.server is None else " server=%s" % self.server
        return "<CommandSigner key=%s ttl=%s%s>" % (self.fingerprint, self.ttl, bound)

    def for_server(self, server: str) -> "CommandSigner":
        """The same key, always signing for ``server``: for calls that go to
        a topic rather than to one named server (RPC clients pass "" then)."""
        return CommandSigner(self._key, ttl=self.ttl, clock=self._clock, server=server)

    def public_key_pem(self) -> bytes:
        return _public_pem(self.public_key)

    def sign(self, method: str, server: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        """The ``auth`` argument sent next to ``payload``."""
        if self.server is not None:
            if server not in ("", self.server):
                raise exception.InvalidInput(
                    reason="this signer signs for %s only, not %s" % (self.server, server))
            server = self.server
        issued_at = float(self._clock())
        expires_at = issued_at + self.ttl
        nonce = secrets.token_hex(NONCE_BYTES)
        data = canonical_bytes(method, server, payload, issued_at, expires_at, nonce)
        return {"server": server, "issued_at": issued_at, "expires_at": expires_at,
                "nonce": nonce,
                "signature": base64.b64encode(self._key.sign(data)).decode("ascii")}

    def sign_reply(self, api: str, method: str, server: str, nonce: str, request: str,
                   outcome: Mapping[str, Any]) -> dict[str, Any]:
        """A host's signed reply (agent API 1.6): the envelope the agent
        returns instead of the bare reply (``verify_reply`` checks it)."""
        data = reply_bytes(api, method, server, nonce, request, outcome)
        return {"api": api, "outcome": outcome,
                "signature": base64.b64encode(self._key.sign(data)).decode("ascii")}


    def sign_host_key(self, host: str, status: str, command_public: bytes | None,
                      nonce: bytes) -> bytes:
        """The engine's signature over its answer to ``signed_host_command_key``
        (engine API 1.6): what the Nova driver checks another host's agent
        replies with comes signed by the key the agents already pin."""
        return self._key.sign(host_key_bytes(host, status, command_public, nonce))


HOST_KEY_TAG = "vtpcm engine host command key v1"


def host_key_bytes(host: str, status: str, command_public: bytes | None,
                   nonce: bytes) -> bytes:
    """The bytes the engine signs for a host's status and command key, bound
    to the caller's nonce (a recorded answer does not pass for a later
    call, e.g. from before a revocation); a tag of its own separates it
    from commands and agent replies."""
    doc = {"tag": HOST_KEY_TAG, "host": host, "status": status,
           "command_public": None if command_public is None else command_public.hex(),
           "nonce": nonce.hex()}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def verify_host_key(key: ed25519.Ed25519PublicKey, signature: bytes, host: str, status: str,
                    command_public: bytes | None, nonce: bytes) -> bool:
    """Did ``key`` (the engine's) sign this answer for this nonce?"""
    try:
        key.verify(signature, host_key_bytes(host, status, command_public, nonce))
    except InvalidSignature:
        return False
    return True


# Signed agent replies (agent API 1.6) ----------------------------------------

REPLY_TAG = "vtpcm agent reply v1"
REPLY_FIELDS = frozenset({"api", "outcome", "signature"})
ERROR_FIELDS = frozenset({"type", "message", "kwargs"})
# The largest reply a verifier parses (the biggest messages carry state blobs).
MAX_REPLY_BYTES = 4 * 1024 * 1024


def request_digest(payload: Any, auth: Any) -> str:
    """SHA-256 (hex) of the request as the agent received it: the payload and
    the engine's ``auth`` (None for unsigned calls). A signed reply names the
    exact request it answers, so a reply the agent gave to another request
    (a stolen command's twin, a forged signature) never passes for it."""
    doc = {"payload": json.loads(json.dumps(payload)),
           "auth": json.loads(json.dumps(auth))}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":"),
                                     allow_nan=False).encode()).hexdigest()


def reply_bytes(api: str, method: str, server: str, nonce: str, request: str,
                outcome: Any) -> bytes:
    """The bytes an agent signs for one reply: a domain-separation tag (never
    valid as a command, whose document has no ``tag``), the agent API
    version, the method, the answering host, the caller's nonce, the request
    digest and the outcome (``{"ok": reply}`` or ``{"error": {"type",
    "message"}}``) as the caller decodes it."""
    doc = {"tag": REPLY_TAG, "api": api, "method": method, "server": server,
           "nonce": nonce, "request": request, "outcome": json.loads(json.dumps(outcome))}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def check_nonce(nonce: Any) -> str:
    """A caller's reply nonce: 32 lowercase hex digits, else InvalidInput."""
    if not isinstance(nonce, str) or len(nonce) != 2 * NONCE_BYTES \
            or any(c not in "0123456789abcdef" for c in nonce):
        raise exception.InvalidInput(
            reason="reply nonce must be %d lowercase hex digits" % (2 * NONCE_BYTES))
    return nonce


def new_nonce() -> str:
    return secrets.token_hex(NONCE_BYTES)


def verify_reply(key: ed25519.Ed25519PublicKey, envelope: Any, *, min_api: str,
                 method: str, server: str, nonce: str, request: str) -> Mapping[str, Any]:
    """The outcome of a signed reply, if ``key`` signed it for exactly this
    method, host, nonce and request at an API version of ``min_api``'s major
    and not below it; raise ReplyNotAuthenticated (reason only, never the
    reply's content) otherwise."""
    def refuse(reason: str) -> exception.ReplyNotAuthenticated:
        return exception.ReplyNotAuthenticated(host=server[:255], method=method,
                                               reason=reason)
    if not isinstance(envelope, Mapping) or set(envelope) != REPLY_FIELDS:
        raise refuse("not a signed reply (fields %s expected)" % ", ".join(sorted(REPLY_FIELDS)))
    api, outcome, sig = envelope["api"], envelope["outcome"], envelope["signature"]
    if not isinstance(api, str) or len(api) > 16 or not _api_at_least(api, min_api):
        raise refuse("signed for an agent API other than %s or later" % min_api)
    try:
        if not isinstance(sig, str):
            raise ValueError("not a string")
        raw = base64.b64decode(sig, validate=True)
    except (ValueError, binascii.Error):
        raise refuse("reply signature must be base64") from None
    if len(raw) != SIGNATURE_BYTES:
        raise refuse("reply signature must be %d bytes" % SIGNATURE_BYTES)
    try:
        data = reply_bytes(api, method, server, nonce, request, outcome)
    except (TypeError, ValueError):
        raise refuse("reply is not canonical JSON") from None
    if len(data) > MAX_REPLY_BYTES:
        raise refuse("reply larger than %d bytes" % MAX_REPLY_BYTES)
    try:
        key.verify(raw, data)
    except InvalidSignature:
        raise refuse("signature does not verify with the command key of %s for this "
                     "call" % server) from None
    if not isinstance(outcome, Mapping) or len(outcome) != 1 \
            or next(iter(outcome)) not in ("ok", "error"):
        raise refuse("outcome must be {ok: reply} or {error: {type, message, kwargs}}")
    if "error" in outcome:
        err = outcome["error"]
        if not isinstance(err, Mapping) or set(err) != ERROR_FIELDS \
                or not isinstance(err["type"], str) or not isinstance(err["message"], str) \
                or not isinstance(err["kwargs"], Mapping) \
                or not all(isinstance(k, str) and k.isidentifier() and k != "message"
                           for k in err["kwargs"]):
            raise refuse("error outcome must have a type, a message and named values")
    return outcome


def _api_at_least(api: str, minimum: str) -> bool:
    major, dot, minor = api.partition(".")
    want_major, _, want_minor = minimum.partition(".")
    return bool(dot and major.isdigit() and minor.isdigit()) and \
        int(major) == int(want_major) and int(minor) >= int(want_minor)


class ReplyKeys(Protocol):
    """Who may answer a call: the key a host's replies must be signed with.

    ``reply_key`` raises ReplyNotAuthenticated when no key counts (host
    unknown, not APPROVED, no command key); ``refused`` records a reply that
    did not verify (the engine audits it)."""

    def reply_key(self, host: str, method: str) -> ed25519.Ed25519PublicKey: ...

    def refused(self, host: str, method: str, reason: str) -> None: ...


def _refuse(method: str, reason: str) -> exception.CommandRefused:
    return exception.CommandRefused(method=method, reason=reason)


def _stale(method: str, reason: str) -> exception.CommandStale:
    """A refusal decided by the clock: it proves neither that the command
    never ran nor that it cannot run later (``CommandStale``)."""
    return exception.CommandStale(method=method, reason=reason)


class NonceStore(Protocol):
    """Where a verifier remembers the nonces it accepted.

    ``claim_nonce`` must be atomic: of two callers with the same nonce, exactly one
    gets True, also across processes sharing the store. Entries may be
    forgotten once ``keep_until`` has passed (the command is then refused as
    expired anyway)."""

    def claim_nonce(self, nonce: str, keep_until: float, now: float) -> bool: ...


class MemoryNonceStore:
    """Nonces in this process only: a restart or a second process forgets
    them, so it suits tests and single short-lived verifiers. Services use a
    durable store (the agent's association list, the engine database)."""

    def __init__(self) -> None:
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def claim_nonce(self, nonce: str, keep_until: float, now: float) -> bool:
        with self._lock:
            for old in [n for n, until in self._seen.items() if until < now]:
                del self._seen[old]
            if nonce in self._seen:
                return False
            self._seen[nonce] = keep_until
            return True


class CommandVerifier:
    """The receiving side: checks each signed command against the pinned
    public key(s), for this server (``server``) only.

    ``public_key_path`` is one PEM file (an agent pins the engine's key) or
    several (the engine accepts any of its operators' keys); a signature by
    any of them is accepted. ``signer_role``, ``service_role`` and
    ``server_kind`` only name things in refusal reasons.

    Replays: a nonce is accepted once while its command is valid. The
    nonces live in ``nonces`` (in memory unless a durable store is given with
    ``remember_nonces_in``: the agent's association list, the engine
    database shared by all workers), so neither a restart nor another worker
    reopens the window. Commands issued before this verifier existed (minus
    ``max_skew``) are refused as well: with an in-memory store that is what
    limits a replay across a restart. ``max_ttl`` bounds how long a nonce
    must be remembered."""

    def __init__(self, public_key_path: Path | Sequence[Path] | None, server: str, *,
                 clock: Clock = time.time, max_skew: float = DEFAULT_MAX_SKEW,
                 max_ttl: float = 300.0,
                 signer_role: str = "engine", service_role: str = "agent",
                 server_kind: str = "host") -> None:
        if public_key_path is None:  # keys come with each call (verify_with)
            paths = []
        else:
            paths = [public_key_path] if isinstance(public_key_path, (str, os.PathLike)) \
                else list(public_key_path)
            if not paths:
                raise exception.InvalidInput(reason="no %s public key given" % signer_role)
        keys: dict[str, ed25519.Ed25519PublicKey] = {}
        for path in paths:
            key = load_public_key(Path(path), role=signer_role)
            keys.setdefault(fingerprint(key), key)  # the same key twice counts once
        self.public_keys = tuple(keys.values())
        self.fingerprints = tuple(keys)
        self.fingerprint = ",".join(self.fingerprints) or "(per call)"
        self.server = server
        self.signer_role = signer_role
        self.service_role = service_role
        self.server_kind = server_kind
        self._clock = clock
        self.max_skew = float(max_skew)
        self.max_ttl = float(max_ttl)
        self.created_at = float(clock())
        self.nonces: NonceStore = MemoryNonceStore()

    def remember_nonces_in(self, store: NonceStore) -> None:
        """Keep accepted nonces in ``store`` from now on (set before serving)."""
        self.nonces = store

    def __repr__(self) -> str:
        return "<CommandVerifier server=%s key=%s>" % (self.server, self.fingerprint)

    def verify(self, method: str, payload: Any, auth: Any) -> str:
        """Return the fingerprint of the key whose valid, fresh, unused
        signature ``auth`` is, over this method, this server and this payload;
        raise CommandRefused if there is none."""
        if not self.public_keys:
            raise _refuse(method, "no %s key is pinned here" % self.signer_role)
        keys = dict(zip(self.fingerprints, self.public_keys, strict=True))
        which = ("the %s key %s" % (self.signer_role, self.fingerprint)
                 if len(self.fingerprints) == 1 else
                 "any of the %d %s keys %s" % (len(self.fingerprints), self.signer_role,
                                               self.fingerprint))
        return self._verify(method, payload, auth, keys, which)

    def verify_with(self, method: str, payload: Any, auth: Any,
                    keys: Mapping[str, ed25519.Ed25519PublicKey]) -> str:
        """Like ``verify``, with the keys this call may be signed by (named,
        e.g. by host); returns the name of the key that signed."""
        if not keys:
            raise _refuse(method, "no %s key may sign it" % self.signer_role)
        which = "the %s key of %s" % (self.signer_role, " or ".join(sorted(keys)))
        return self._verify(method, payload, auth, keys, which)

    def _verify(self, method: str, payload: Any, auth: Any,
                keys: Mapping[str, ed25519.Ed25519PublicKey], which: str) -> str:
        server, issued_at, expires_at, nonce, signature = self._parse(method, auth)
        if server != self.server:
            raise _refuse(method, "misdirected: signed for %s %r, this is %s %s"
                          % (self.server_kind, server[:64], self.server_kind, self.server))
        try:
            data = canonical_bytes(method, self.server, payload, issued_at, expires_at, nonce)
        except (TypeError, ValueError):
            raise _refuse(method, "payload is not canonical JSON") from None
        signed_by = self._signed_by(signature, data, keys)
        if signed_by is None:
            # A command signed for another server fails here too: the server
            # name is part of the signed bytes.
            raise _refuse(method, "signature does not verify with %s for %s %s"
                          % (which, self.server_kind, self.server))
        now = float(self._clock())
        if expires_at - issued_at > self.max_ttl or expires_at < issued_at:
            raise _refuse(method, "validity period longer than %ss" % self.max_ttl)
        # Refusals decided by the clock come before the nonce is claimed:
        # a captured command replayed after its expiry (or from before this
        # service started) then costs no durable nonce write, however often
        # it comes back (review finding 5). They are never signed
        # (``_stale``), as a replay: a command that ran and comes back late
        # must not get a refusal saying it never ran.
        if issued_at > now + self.max_skew:
            raise _stale(method, "issued in the future")
        if now > expires_at:
            raise _stale(method, "expired")
        if issued_at < self.created_at - self.max_skew:
            raise _stale(method, "issued before this %s started" % self.service_role)
        # Kept max_skew past expiry: a clock stepping back a little must not
        # make a forgotten nonce usable again. Scoped by the signing key: a
        # key holder who copies another signer's nonce into a command of its
        # own cannot use it up.
        scoped = "%s:%s" % (fingerprint(keys[signed_by]), nonce)
        if not self.nonces.claim_nonce(scoped, expires_at + self.max_skew, now):
            raise exception.CommandReplayed(method=method,
                                            reason="replayed (nonce already used)")
        return signed_by

    @staticmethod
    def _signed_by(signature: bytes, data: bytes,
                   keys: Mapping[str, ed25519.Ed25519PublicKey]) -> str | None:
        for name, key in keys.items():
            try:
                key.verify(signature, data)
            except InvalidSignature:
                continue
            return name
        return None

    def _parse(self, method: str, auth: Any) -> tuple[str, float, float, str, bytes]:
        if auth is None:
            raise _refuse(method, "no %s signature" % self.signer_role)
        if not isinstance(auth, Mapping):
            raise _refuse(method, "auth must be an object")
        if set(auth) != AUTH_FIELDS:
            raise _refuse(method, "auth must have exactly the fields %s"
                          % ", ".join(sorted(AUTH_FIELDS)))
        server = auth["server"]
        if not isinstance(server, str) or len(server) > 255:
            raise _refuse(method, "auth server must be a host name")
        times = []
        for name in ("issued_at", "expires_at"):
            value = auth[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value):
                raise _refuse(method, "auth %s must be a finite number" % name)
            times.append(float(value))
        nonce = auth["nonce"]
        if not isinstance(nonce, str) or len(nonce) != 2 * NONCE_BYTES \
                or any(c not in "0123456789abcdef" for c in nonce):
            raise _refuse(method, "auth nonce must be %d lowercase hex digits"
                          % (2 * NONCE_BYTES))
        sig = auth["signature"]
        try:
            if not isinstance(sig, str):
                raise ValueError("not a string")
            raw = base64.b64decode(sig, validate=True)
        except (ValueError, binascii.Error):
            raise _refuse(method, "auth signature must be base64") from None
        if len(raw) != SIGNATURE_BYTES:
            raise _refuse(method, "auth signature must be %d bytes" % SIGNATURE_BYTES)
        return server, times[0], times[1], nonce, raw


class Verifier(Protocol):
    """What a signed endpoint needs from its ``verifier``."""

    def verify(self, method: str, payload: Any, auth: Any) -> str: ...


class RefuseAll:
    """The verifier of a service that has no public key to check with: it
    refuses every signed command with ``reason`` (fail closed, and say how to
    fix it) instead of obeying anyone."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return "<RefuseAll>"

    def verify(self, method: str, payload: Any, auth: Any) -> str:
        raise _refuse(method, self.reason)


# Key files -------------------------------------------------------------------

def load_public_key(path: Path, *, role: str = "engine") -> ed25519.Ed25519PublicKey:
    """A pinned public key (PEM): the engine's on an agent, an operator's on
    the engine. ``role`` names it in errors."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise exception.InvalidInput(
            reason="%s public key %s: %s" % (role, path, err.strerror)) from None
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise exception.InvalidInput(
            reason="%s public key %s is not a PEM public key" % (role, path)) from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise exception.InvalidInput(
            reason="%s public key %s is not an Ed25519 key" % (role, path))
    return key


def _load_private_key(path: Path, group_readable: bool = False) -> ed25519.Ed25519PrivateKey:
    mode = path.stat().st_mode
    if not stat.S_ISREG(mode) or mode & (0o037 if group_readable else 0o077):
        raise exception.InvalidInput(
            reason="command signing key %s must be a regular file readable by its "
                   "owner only (chmod %s)" % (path, "640" if group_readable else "600"))
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError):
        # The library's message could quote key bytes; name the file only.
        raise exception.InvalidInput(
            reason="command signing key %s is not an unencrypted PEM private key"
                   % path) from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise exception.InvalidInput(
            reason="command signing key %s is not an Ed25519 key" % path)
    return key


def _create_private_key(path: Path, mode: int = 0o600) -> None:
    """Create the key atomically: a concurrent creator's key wins, never a mix."""
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    try:
        fileutil.write_atomic(path, pem, mode=mode)  # fails if the key appeared meanwhile
        LOG.info("Created the command signing key %(path)s", {"path": path})
    except FileExistsError:
        pass


def _write_public_key(path: Path, pem: bytes) -> None:
    try:
        if path.read_bytes() == pem:
            return
    except FileNotFoundError:
        pass
    fileutil.write_atomic(path, pem, mode=0o644, replace=True)


def public_key_path(private_key_path: Path) -> Path:
    """Where the public half of a signing key is written: ``<path>.pub``."""
    return private_key_path.with_name(private_key_path.name + ".pub")


def load_or_create_signing_key(path: Path, *, ttl: float = DEFAULT_TTL) -> CommandSigner:
    """The engine's signer; creates the key (0600) on first use and (re)writes
    the public key to ``<path>.pub`` (0644) for the agents."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not path.exists():
            _create_private_key(path)
        signer = CommandSigner(_load_private_key(path), ttl=ttl)
        _write_public_key(public_key_path(path), signer.public_key_pem())
    except OSError as err:
        raise exception.InvalidInput(
            reason="command signing key %s: %s" % (path, err.strerror)) from None
    return signer


def load_or_create_host_key(path: Path, *, gid: int | None = None,
                            ttl: float = DEFAULT_TTL) -> CommandSigner:
    """A compute host's command key: like the engine's, but the file may be
    readable by one group (``gid``, 0640), the group of nova-compute, which
    signs the Nova driver's engine calls with it."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o750 if gid is not None else 0o700)
        if not path.exists():
            _create_private_key(path)
            if gid is not None:
                try:  # the group gets read access only once it is the right group
                    os.chown(path, -1, gid)
                    os.chmod(path, 0o640)
                except OSError:
                    path.unlink()
                    raise
    except OSError as err:
        raise exception.InvalidInput(
            reason="host command key %s: %s" % (path, err.strerror)) from None
    return load_host_key(path, ttl=ttl)


def load_host_key(path: Path, *, ttl: float = DEFAULT_TTL) -> CommandSigner:
    """An existing host command key (what the Nova driver signs with)."""
    return load_signing_key(path, ttl=ttl, group_readable=True, what="host command key")


def load_signing_key(path: Path, *, ttl: float = DEFAULT_TTL, group_readable: bool = False,
                     what: str = "command signing key") -> CommandSigner:
    """An existing signing key (never creates one); ``what`` names it in errors."""
    try:
        return CommandSigner(_load_private_key(Path(path), group_readable), ttl=ttl)
    except OSError as err:
        raise exception.InvalidInput(reason="%s %s: %s" % (what, path, err.strerror)) from None


def signer_from_conf(conf: cfg.ConfigOpts) -> CommandSigner | None:
    """The signer named by ``[engine] command_signing_key`` if that option is
    registered, set and the file exists (tools and tests running next to the
    engine); None otherwise. Never creates a key: only the engine does."""
    try:
        value = conf.engine.command_signing_key
    except (cfg.NoSuchOptError, cfg.NoSuchGroupError):
        return None
    if not value or not Path(value).exists():
        return None
    return load_signing_key(Path(value))
