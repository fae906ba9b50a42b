"""Whose signature an agent's reply must carry, as a compute node sees it.

The Nova driver holds only its own host command key. Its own agent signs
with that key (one file, created by the agent, readable by nova-compute);
another host's key (the destination's, for the socket path its agent
reports) is the one the engine enrolled for it, bound into that host's TPM
certify, asked of the engine for every reply, so a revocation counts at
once. Only an APPROVED host's replies count. The engine's answer is signed
with its command key over the host, status, key and a fresh nonce
(``signed_host_command_key``, engine API 1.6) and checked against the
engine public key pinned in ``[vtpcm] engine_public_key``: a broker client
forging the engine's answer cannot hand the driver a key of its own.

The driver's own key file is re-read when it is replaced (``OwnKey``): a
host whose key was rotated (file deleted, agent restarted, host enrolled
again) would otherwise have its own agent's replies refused until
nova-compute restarts.
"""

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric import ed25519
from oslo_log import log as logging

from vtpcm_common import authn, exception
from vtpcm_common.api.engine import messages as em

LOG = logging.getLogger(__name__)


class KeyDirectory(Protocol):
    def signed_host_command_key(self, host: str,
                                nonce: bytes) -> em.SignedHostCommandKey: ...


Stamp = tuple[int, int, int, int]


def file_stamp(path: Path) -> Stamp | None:
    """What identifies a file's current content cheaply (device, inode,
    size, mtime); None if it cannot be read. A replaced key file gets a new
    stamp."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class OwnKey:
    """This host's command public key, read from its key file and read again
    whenever the file's identity (device, inode, size, mtime) changes: a
    rotation replaces the file, and the agent then signs with the new key."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: Stamp | None = None
        self._key: ed25519.Ed25519PublicKey | None = None

    def __repr__(self) -> str:
        return "<OwnKey %s>" % self.path

    def __call__(self) -> ed25519.Ed25519PublicKey:
        with self._lock:
            stamp = file_stamp(self.path)
            if stamp is None:  # load_host_key names the error
                self._key, self._stamp = None, None
            if self._key is None or stamp != self._stamp:
                self._key = authn.load_host_key(self.path).public_key
                if self._stamp is not None:
                    LOG.info("Host command key %(path)s changed: now %(fp)s",
                             {"path": self.path, "fp": authn.fingerprint(self._key)})
                self._stamp = stamp
            return self._key


class EngineReportedKeys:
    """``authn.ReplyKeys`` of a compute node. ``own``: this host's public
    key, or a callable giving it now (``OwnKey``)."""

    def __init__(self, host: str,
                 own: ed25519.Ed25519PublicKey | Callable[[], ed25519.Ed25519PublicKey],
                 engine: KeyDirectory,
                 engine_key: ed25519.Ed25519PublicKey | None) -> None:
        """``engine_key``: the engine's pinned command public key; None
        (not configured): no other host's reply counts."""
        self.host = host
        self.own = own
        self.engine = engine
        self.engine_key = engine_key

    def reply_key(self, host: str, method: str) -> ed25519.Ed25519PublicKey:
        if host == self.host:
            if isinstance(self.own, ed25519.Ed25519PublicKey):
                return self.own
            try:
                return self.own()
            except exception.InvalidInput as err:
                raise exception.ReplyNotAuthenticated(
                    host=host, method=method, reason=str(err.kwargs["reason"])) from None
        if self.engine_key is None:
            raise exception.ReplyNotAuthenticated(
                host=host, method=method,
                reason="[vtpcm] engine_public_key is not set: no engine-signed key "
                       "for another host")
        nonce = os.urandom(authn.NONCE_BYTES)
        try:
            info = self.engine.signed_host_command_key(host, nonce)
        except exception.NotFound:
            # unsigned, but it only refuses: no key is taken from it
            raise exception.ReplyNotAuthenticated(
                host=host, method=method, reason="the engine knows no such host") from None
        if not authn.verify_host_key(self.engine_key, info.signature, info.host, info.status,
                                     info.command_public, nonce):
            LOG.warning("The engine's answer about the command key of %(host)s is not "
                        "signed by the pinned engine key", {"host": host})
            raise exception.ReplyNotAuthenticated(
                host=host, method=method,
                reason="the engine's key answer does not verify with [vtpcm] "
                       "engine_public_key")
        if info.host != host:
            raise exception.ReplyNotAuthenticated(
                host=host, method=method, reason="the engine answered for another host")
        if info.status != "APPROVED" or not info.command_public:
            raise exception.ReplyNotAuthenticated(
                host=host, method=method,
                reason="host is %s; only an approved host's replies count" % info.status)
        return authn.load_public_raw(info.command_public, what="host command key")

    def refused(self, host: str, method: str, reason: str) -> None:
        """Logged by the client already; nova-compute keeps no audit log."""
