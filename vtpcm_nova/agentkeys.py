"""Whose signature an agent's reply must carry, as a compute node sees it.

The Nova driver holds only its own host command key. Its own agent signs
with that key (one file, created by the agent, readable by nova-compute);
another host's key (the destination's, for the socket path its agent
reports) is the one the engine enrolled for it, bound into that host's TPM
certify, asked of the engine (``host_command_key``) for every reply, so a
revocation counts at once. Only an APPROVED host's replies count.
"""

from typing import Protocol

from cryptography.hazmat.primitives.asymmetric import ed25519
from oslo_log import log as logging

from vtpcm_common import authn, exception
from vtpcm_common.api.engine import messages as em

LOG = logging.getLogger(__name__)


class KeyDirectory(Protocol):
    def host_command_key(self, host: str) -> em.HostCommandKey: ...


class EngineReportedKeys:
    """``authn.ReplyKeys`` of a compute node."""

    def __init__(self, host: str, own: ed25519.Ed25519PublicKey, engine: KeyDirectory) -> None:
        self.host = host
        self.own = own
        self.engine = engine

    def reply_key(self, host: str, method: str) -> ed25519.Ed25519PublicKey:
        if host == self.host:
            return self.own
        try:
            info = self.engine.host_command_key(host)
        except exception.NotFound:
            raise exception.ReplyNotAuthenticated(
                host=host, method=method, reason="the engine knows no such host") from None
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
