"""Whose signature an agent's reply must carry, as the engine sees it.

A host's replies are signed with the command key the engine enrolled for it
(bound into its TPM's certify, so the AK the engine trusts vouches for it).
Only an APPROVED host's replies count: a revoked or re-pending host's word
moves nothing, and the step waits (reconcile retries it) until an operator
approves the host again. Replies that do not verify are audited.
"""

from cryptography.hazmat.primitives.asymmetric import ed25519

from vtpcm_common import authn, exception
from vtpcm_nova.engine.db import api as db_api
from vtpcm_nova.engine.db.models import HostStatus


class EnrolledReplyKeys:
    """``authn.ReplyKeys`` from the engine database (read at every call, so
    a revocation counts from the next reply on)."""

    def __init__(self, db: db_api.Database) -> None:
        self.db = db

    def reply_key(self, host: str, method: str) -> ed25519.Ed25519PublicKey:
        try:
            rec = self.db.get_host(host)
        except exception.NotFound:
            raise exception.ReplyNotAuthenticated(
                host=host, method=method, reason="host is not enrolled") from None
        if rec.status is not HostStatus.APPROVED:
            raise exception.ReplyNotAuthenticated(
                host=host, method=method,
                reason="host is %s; only an approved host's replies count" % rec.status.value)
        if not rec.command_public:
            raise exception.ReplyNotAuthenticated(
                host=host, method=method, reason="no host command key enrolled")
        return authn.load_public_raw(rec.command_public, what="host command key")

    def refused(self, host: str, method: str, reason: str) -> None:
        self.db.audit("agent-reply", "refused", host=host,
                      detail="reply to %s not authenticated: %s" % (method, reason))
