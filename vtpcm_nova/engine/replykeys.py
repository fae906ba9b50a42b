"""Whose signature an agent's reply must carry, as the engine sees it.

A host's replies are signed with the command key the engine enrolled for it
(bound into its TPM's certify, so the AK the engine trusts vouches for it).
Replies that do not verify are audited.

Which host's word counts depends on where the step leads (design.rst,
"Replies of hosts that are not approved"):

- steps that move toward safety (``TOWARD_SAFETY``: discard an incoming
  copy, give the source its vTPCM back, destroy a copy) take the reply of
  an enrolled host whatever its status, signed with a key bound to that
  host (bound at its approval: a PENDING row's key may be anyone's, e.g. a
  re-enrollment pulled over the broker). A revoked or re-pending host that
  lies "done" about its own copy gains nothing: it held that copy before it
  was revoked, and the engine never commits anything to it. Waiting for its
  re-approval instead would freeze the source's vTPCM (a migration stuck
  ABORTING keeps the source claimed) when the host answers honestly;
- every other step (create, seal, prepare, commit, start, stop, reads the
  engine acts on) counts only an APPROVED host's reply: a revoked host's
  word moves no secret and no authority, and the step waits (reconcile
  retries it) until an operator approves the host again.
"""

from cryptography.hazmat.primitives.asymmetric import ed25519

from vtpcm_common import authn, exception
from vtpcm_nova.engine.db import api as db_api
from vtpcm_nova.engine.db.models import HostStatus

# Agent methods whose signed reply counts from an enrolled host of any status.
# ``health`` is there for ``hosts forget``: whether a revoked host's agent
# still answers (a read that moves nothing; any answer, even one that does
# not verify, refuses the forget).
TOWARD_SAFETY = frozenset({"abort_incoming", "abort_outgoing", "destroy", "health"})


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
        if rec.status is HostStatus.FORGOTTEN:
            # its vTPCM records are gone: nothing it says about them counts
            raise exception.ReplyNotAuthenticated(
                host=host, method=method, reason="host was forgotten by an operator")
        if rec.status is not HostStatus.APPROVED and method not in TOWARD_SAFETY:
            raise exception.ReplyNotAuthenticated(
                host=host, method=method,
                reason="host is %s; only an approved host's replies count for %s"
                       % (rec.status.value, method))
        if not rec.command_public:
            raise exception.ReplyNotAuthenticated(
                host=host, method=method, reason="no host command key enrolled")
        if rec.status is not HostStatus.APPROVED and \
                self.db.key_owner("command", rec.command_public) != host:
            # A key is bound to its host only at approval: a PENDING row's key
            # (a re-enrollment, the identity pulled over the broker) may be
            # anyone's, so it speaks for nobody.
            raise exception.ReplyNotAuthenticated(
                host=host, method=method,
                reason="host is %s and its command key was never approved for it"
                       % rec.status.value)
        return authn.load_public_raw(rec.command_public, what="host command key")

    def refused(self, host: str, method: str, reason: str) -> None:
        self.db.audit("agent-reply", "refused", host=host,
                      detail="reply to %s not authenticated: %s" % (method, reason))
