"""Trust state: attestation verdicts and the TPM clock baseline of each host.

Why verdicts and clocks together: ``record_attestation`` stores both in
ONE transaction, after locking the host row (``Store._update_host``) and
checking the policy; a verdict holds only while what it was decided on
does.

Why an attestation is two transactions (``open_challenge``,
``conclude_attestation``): each committed write costs an fsync (0.5-10 ms
under load) and each transaction the ORM's round. The challenge's reads
are one, read-only (its nonce stays in the attesting call's memory: no
one else ever answers it); the nonce recorded as used, the verdict, the
clock and the audit entries are the other, so they commit (or vanish in
a crash) together: a verdict never stands without its nonce on record as
used and its audit entry written.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Callable
from typing import Any, NamedTuple, cast

from sqlalchemy import Table, insert, select, update
from sqlalchemy.engine import Connection, Row
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from vtpcm_common import exception
from vtpcm_nova.engine import verifier
from vtpcm_nova.engine.db import models
from vtpcm_nova.engine.db.audit import add_audit
from vtpcm_nova.engine.db.models import HostStatus
from vtpcm_nova.engine.db.nonces import add_used_nonce
from vtpcm_nova.engine.db.records import (
    Challenge,
    HostRecord,
    TrustBasis,
    VerdictRecord,
    host_rec,
    policy_rec,
    verdict_rec,
)
from vtpcm_nova.engine.db.store import Store, utcnow

# The verdict transaction's statements run in SQLAlchemy Core on the
# session's connection (the same transaction): the ORM's identity map,
# unit of work and flushes cost more CPU than the statements themselves
# (issue 11 point 3).
VERDICTS = cast(Table, models.VerdictRow.__table__)
CLOCKS = cast(Table, models.ClockStateRow.__table__)

KEM_AUDIT_EVENT, KEM_AUDIT_OUTCOME = "kem binding", "unbound accepted"


class Concluded(NamedTuple):
    """What ``conclude_attestation`` stored: the verdict, whether its status
    changed, whether it audited an unbound KEM key accepted."""

    verdict: VerdictRecord
    changed: bool
    kem_audited: bool


def _last_kem_audit(s: Session, host: str) -> str | None:
    """The detail of the host's newest unbound-KEM-key audit entry."""
    return s.connection().scalar(
        select(models.Audit.detail)
        .where(models.Audit.host == host, models.Audit.event == KEM_AUDIT_EVENT)
        .order_by(models.Audit.id.desc()).limit(1))


Rejudge = Callable[[verifier.ClockState], tuple[verifier.TrustStatus, str, bool]]
"""The attesting call's verdict judged again against another clock
baseline: (status, reason, reapprove). Pure: it runs under the locks of
the verdict's transaction."""


def _effective_verdict(r: models.VerdictRow, host_status: str) -> VerdictRecord:
    """A verdict as read together with its host: only an APPROVED host is
    TRUSTED, whatever the row says."""
    rec = verdict_rec(r)
    if rec.trusted and host_status != HostStatus.APPROVED.value:
        return dataclasses.replace(rec, status=verifier.TrustStatus.UNTRUSTED,
                                   reason=f"host is {host_status}")
    return rec


class TrustStore(Store):
    """Verdicts and clock baselines; the write helpers run in the caller's
    transaction so host and policy changes can drop verdicts in theirs."""

    def record_attestation(self, basis: TrustBasis, status: verifier.TrustStatus,
                           reason: str, expires_at: datetime.datetime, *,
                           clock: verifier.ClockState | None = None,
                           reapprove: bool = False) -> VerdictRecord:
        """Store an attestation's verdict (one row per host), in ONE
        transaction and only if nothing it was decided on changed since
        its challenge: the host's revision (status, keys, policy
        assignment), the policy's revision, no verdict of a later challenge
        on record (whatever either status: a failing verdict decided
        without a quote leaves no clock to order by) and, for TRUSTED, an
        APPROVED host and no newer quote of it on record. Else
        StaleAttestation and nothing changes. A quote's TPM clock becomes
        the host's baseline (never moved back); ``reapprove`` sends an
        APPROVED host to PENDING.
        """
        with self.session() as s:
            return self._record(s, basis, status, reason, expires_at, clock=clock,
                                reapprove=reapprove)[0]

    def open_challenge(self, host: str) -> Challenge:
        """The host, its policy (if APPROVED with one) and its clock
        baseline, in ONE read-only transaction and no write (no fsync)
        before the quote. NotFound for an unknown host or a policy gone.

        Not a consistent snapshot: on SQLite and on PostgreSQL's READ
        COMMITTED each read sees what was committed when it ran, so a
        change committed between them can show in one and not another.
        Nothing relies on it: ``conclude_attestation`` re-checks all of it
        under lock (host revision, policy revision, and the clock baseline,
        judged again if it moved). In Core (``Store.reading``)."""
        hosts, policies = models.Host.__table__, models.Policy.__table__
        with self.reading() as c:
            row = c.execute(select(hosts).where(hosts.c.name == host)).first()
            if row is None:
                raise exception.NotFound(what="host", key=host)
            record = host_rec(row)
            if record.status is not HostStatus.APPROVED or record.policy_name is None:
                return Challenge(record, None, None)
            policy = c.execute(select(policies)
                               .where(policies.c.name == record.policy_name)).first()
            if policy is None:
                raise exception.NotFound(what="policy", key=record.policy_name)
            clock = c.execute(select(CLOCKS).where(CLOCKS.c.host == host)).first()
        return Challenge(record, policy_rec(policy),
                         None if clock is None else verifier.ClockState(
                             clock.clock, clock.reset_count, clock.restart_count))

    def conclude_attestation(self, basis: TrustBasis, status: verifier.TrustStatus,
                             reason: str, expires_at: datetime.datetime, *,
                             now: datetime.datetime,
                             clock: verifier.ClockState | None = None,
                             reapprove: bool = False,
                             nonce: tuple[bytes, str, datetime.datetime] | None = None,
                             baseline: verifier.ClockState | None = None,
                             rejudge: Rejudge | None = None,
                             unbound_kem: str | None = None,
                             ) -> Concluded:
        """``record_attestation``, and in the SAME transaction the quote's
        ``nonce`` (value, purpose, expiry) recorded as used (expired or
        already on record: QuoteVerificationError and nothing changes) and
        the audit entries: a non-TRUSTED verdict always, a TRUSTED one when
        the status changed, the reboot that sent the host to PENDING.

        ``unbound_kem``: the name (hex) of the host's enrolled KEM key when
        it is not PCR-bound (accepted because ``require_kem_pcr_binding`` is
        off). A TRUSTED verdict then also writes ``kem binding`` /
        ``unbound accepted`` naming the key, once per trust period and key:
        when the host becomes TRUSTED (from any other status or none), or
        when the host's last such entry names another key. Not one per
        quote: periodic attestation would bury the trail; what an operator
        asks is since when, and with which key, trust rested on a key the
        TPM lets use in any platform state.

        ``baseline`` is the clock baseline the verdict was judged against
        (the challenge's). If the stored one differs when the clock row is
        locked here, another verdict stored its quote's clock since the
        challenge (with no later challenge and no host revision change: it
        need not make ours stale). Then a quote older than it makes ours
        stale (StaleAttestation), and otherwise ``rejudge`` decides ours
        again against the stored baseline, and its outcome is stored (a
        reboot or TPM Restart since that quote: the reboot policy's rule).
        Returns the verdict and whether its status changed."""
        with self.session() as s:
            verdict, previous, reapproved = self._record(
                s, basis, status, reason, expires_at, clock=clock, reapprove=reapprove,
                nonce=nonce, now=now, baseline=baseline, rejudge=rejudge)
            if reapproved:
                add_audit(s, "reboot", "PENDING", host=basis.host, detail=verdict.reason,
                          now=now)
            changed = previous is not verdict.status
            if changed or not verdict.trusted:
                add_audit(s, "verdict", verdict.status.value, host=basis.host,
                          detail=verdict.reason, now=now)
            kem_audited = False
            if verdict.trusted and unbound_kem is not None:
                detail = (f"KEM key {unbound_kem} is not bound to PCRs ([host_tpm] "
                          "kem_policy_pcrs empty on the host): accepted because "
                          "[attestation] require_kem_pcr_binding is off")
                if changed or _last_kem_audit(s, basis.host) != detail:
                    add_audit(s, KEM_AUDIT_EVENT, KEM_AUDIT_OUTCOME, host=basis.host,
                              detail=detail, now=now)
                    kem_audited = True
            return Concluded(verdict, changed, kem_audited)

    def _record(self, s: Session, basis: TrustBasis, status: verifier.TrustStatus,
                reason: str, expires_at: datetime.datetime, *,
                clock: verifier.ClockState | None, reapprove: bool,
                nonce: tuple[bytes, str, datetime.datetime] | None = None,
                now: datetime.datetime | None = None,
                baseline: verifier.ClockState | None = None,
                rejudge: Rejudge | None = None,
                ) -> tuple[VerdictRecord, verifier.TrustStatus | None, bool]:
        """The body of ``record_attestation`` in ``s``; also the status the
        verdict replaced (None: none) and whether the host was sent to
        PENDING. With ``nonce`` it is recorded as used right after the host
        row is locked; with ``rejudge`` see ``conclude_attestation``."""
        trusted = status is verifier.TrustStatus.TRUSTED
        if trusted and basis.policy_revision is None:
            raise exception.InvalidInput(reason="a TRUSTED verdict needs a policy")
        self._hold_basis(s, basis, trusted)
        if nonce is not None:
            try:
                fresh = add_used_nonce(s, basis.host, nonce[0], nonce[1], nonce[2],
                                       now or utcnow())
            except IntegrityError:  # on record already: the whole transaction is undone
                fresh = False
            if not fresh:
                raise exception.QuoteVerificationError(
                    host=basis.host, reason="quote nonce expired or already used")
        # the verdict row, locked: the one read that both orders us after
        # any verdict on record and says which status ours replaces
        c = s.connection()
        row = _locked(c, VERDICTS, basis.host)
        if row is not None and row.attested_at > basis.challenged_at:
            raise exception.StaleAttestation(
                host=basis.host, reason="a newer attestation of the host was recorded")
        if clock is not None:
            stored = _locked(c, CLOCKS, basis.host)
            if rejudge is not None:
                status, reason, reapprove = self._judge_again(
                    stored, basis.host, clock, baseline, rejudge, (status, reason, reapprove))
                trusted = status is verifier.TrustStatus.TRUSTED
            _advance_clock(c, basis.host, clock, stored, newest_only=trusted)
        if reapprove:
            self._update_host(s, basis.host,
                              models.Host.status == HostStatus.APPROVED.value,
                              status=HostStatus.PENDING.value)
        verdict, previous = self._put_verdict(s, basis.host, status, reason,
                                              basis.challenged_at, expires_at, row)
        return verdict, previous, reapprove

    @staticmethod
    def _judge_again(row: Row[Any] | None, host: str, clock: verifier.ClockState,
                     baseline: verifier.ClockState | None, rejudge: Rejudge,
                     judged: tuple[verifier.TrustStatus, str, bool],
                     ) -> tuple[verifier.TrustStatus, str, bool]:
        """The verdict ``judged`` against ``baseline``, or judged again if
        the stored baseline (read locked: no other verdict moves it until
        we commit) is not ``baseline``. A verdict that lands after a quote
        taken after its challenge was stored is judged against that quote's
        clock, as if it had been the challenge's: else a TPM Restart or
        reboot between the two quotes would go unseen. It can only get
        worse: a failing verdict stays failing. ``row``: the stored
        baseline, read locked by the caller."""
        if row is None:
            return judged
        stored = verifier.ClockState(row.clock, row.reset_count, row.restart_count)
        if stored == baseline:
            return judged
        if (clock.reset_count, clock.restart_count, clock.clock) < \
                (stored.reset_count, stored.restart_count, stored.clock):
            raise exception.StaleAttestation(
                host=host, reason="a newer quote of the host was recorded since the challenge")
        again = rejudge(stored)
        if judged[0] is not verifier.TrustStatus.TRUSTED \
                and again[0] is verifier.TrustStatus.TRUSTED:
            return judged
        return again

    def _hold_basis(self, s: Session, basis: TrustBasis, trusted: bool) -> None:
        """Lock the host row iff it is as the basis says, then check the
        policy under a shared lock (a policy change waits for us, or we see it)."""
        conds = [models.Host.revision == basis.host_revision,
                 models.Host.policy_name.is_(None) if basis.policy_name is None
                 else models.Host.policy_name == basis.policy_name]
        if trusted:
            conds.append(models.Host.status == HostStatus.APPROVED.value)
        c = s.connection()  # Core: see VERDICTS
        if not self._update_host(c, basis.host, *conds, bump=False):
            raise exception.StaleAttestation(host=basis.host,
                                             reason=self._why_stale(s, basis))
        if basis.policy_revision is None:  # decided without a policy
            return
        revision = c.scalar(select(models.Policy.revision)
                            .where(models.Policy.name == basis.policy_name)
                            .with_for_update(read=True))
        if revision != basis.policy_revision:
            raise exception.StaleAttestation(
                host=basis.host,
                reason=f"policy {basis.policy_name} changed since the challenge")

    def _why_stale(self, s: Session, basis: TrustBasis) -> str:
        row = s.scalar(select(models.Host).where(models.Host.name == basis.host))
        if row is None:
            return "host is no longer enrolled"
        if row.status != HostStatus.APPROVED.value:
            return f"host is {row.status}"
        if row.policy_name != basis.policy_name:
            return "policy assignment changed since the challenge"
        return "host record changed since the challenge"

    def _put_verdict(self, s: Session, host: str, status: verifier.TrustStatus, reason: str,
                     attested_at: datetime.datetime,
                     expires_at: datetime.datetime, row: Row[Any] | None = None,
                     ) -> tuple[VerdictRecord, verifier.TrustStatus | None]:
        """The host's verdict written (``row``: as the caller read it
        locked, else read locked here), and the status it had (None: new).
        In Core, on the session's connection."""
        c = s.connection()
        if row is None:
            row = _locked(c, VERDICTS, host)
        values = {"status": status.value, "reason": reason, "attested_at": attested_at,
                  "expires_at": expires_at}
        if row is None:
            c.execute(insert(VERDICTS).values(host=host, **values))
            previous = None
        else:
            c.execute(update(VERDICTS).where(VERDICTS.c.host == host).values(**values))
            previous = verifier.TrustStatus(row.status)
        return VerdictRecord(host, status, reason, attested_at, expires_at), previous

    @staticmethod
    def _expire_verdicts(s: Session, which: Any, why: str, now: datetime.datetime) -> None:
        q = (update(models.VerdictRow).where(which)
             .values(status=verifier.TrustStatus.UNKNOWN.value, reason=why + "; attest again",
                     attested_at=now, expires_at=now)
             .execution_options(synchronize_session=False))
        s.execute(q)

    def _verdicts_with_hosts(self, *conditions: Any) -> list[VerdictRecord]:
        q = (select(models.VerdictRow, models.Host.status)
             .join(models.Host, models.Host.name == models.VerdictRow.host)
             .where(*conditions).order_by(models.VerdictRow.host))
        with self.session() as s:
            return [_effective_verdict(row, status) for row, status in s.execute(q)]

    def get_verdict(self, host: str) -> VerdictRecord | None:
        """The host's verdict, read with its status (see _effective_verdict)."""
        found = self._verdicts_with_hosts(models.VerdictRow.host == host)
        return found[0] if found else None

    def host_and_verdict(self, host: str
                         ) -> tuple[HostRecord | None, VerdictRecord | None]:
        """The host (None: not enrolled) and its verdict read with its
        status (as ``get_verdict``), in ONE query."""
        q = (select(models.Host, models.VerdictRow)
             .outerjoin(models.VerdictRow, models.VerdictRow.host == models.Host.name)
             .where(models.Host.name == host))
        with self.session() as s:
            found = s.execute(q).first()
            if found is None:
                return None, None
            row, verdict = found
            return host_rec(row), (None if verdict is None
                                   else _effective_verdict(verdict, row.status))

    def fresh_verdicts(self, now: datetime.datetime | None = None) -> dict[str, VerdictRecord]:
        """All unexpired verdicts with their hosts' status in ONE query (the
        scheduler filter calls this): only an APPROVED host is TRUSTED."""
        return {v.host: v for v in self._verdicts_with_hosts(
            models.VerdictRow.expires_at > (now or utcnow()))}

    def trusted_page(self, after: str | None, limit: int,
                     now: datetime.datetime | None = None
                     ) -> list[tuple[str, datetime.datetime]]:
        """Up to ``limit`` + 1 (host, expiry) of fresh TRUSTED verdicts of
        APPROVED hosts, by host name after ``after``: one page of the
        scheduler's ``trusted_hosts``, paged in SQL along the verdicts'
        primary key so a page costs its own size, not every fresh verdict
        (150,000 hosts read and sorted per page took 123 s per fetch). The
        extra row tells the caller whether a next page exists."""
        conds = [models.VerdictRow.status == verifier.TrustStatus.TRUSTED.value,
                 models.VerdictRow.expires_at > (now or utcnow()),
                 models.Host.status == HostStatus.APPROVED.value]
        if after is not None:  # on both sides of the join: each index starts there
            conds += [models.VerdictRow.host > after, models.Host.name > after]
        q = (select(models.VerdictRow.host, models.VerdictRow.expires_at)
             .join(models.Host, models.Host.name == models.VerdictRow.host)
             .where(*conds).order_by(models.VerdictRow.host).limit(limit + 1))
        with self.session() as s:
            return [(host, expires) for host, expires in s.execute(q)]

    # ---- clock states -----------------------------------------------------------

    def get_clock_state(self, host: str) -> verifier.ClockState | None:
        with self.session() as s:
            row = s.get(models.ClockStateRow, host)
            if row is None:
                return None
            return verifier.ClockState(row.clock, row.reset_count, row.restart_count)

    def set_clock_state(self, host: str, state: verifier.ClockState) -> bool:
        """Store the TPM clock baseline, never moving it backwards."""
        with self.session() as s:
            if not self._update_host(s, host, bump=False):
                raise exception.NotFound(what="host", key=host)
            c = s.connection()
            return _advance_clock(c, host, state, _locked(c, CLOCKS, host),
                                  newest_only=False)


def _locked(c: Connection, table: Any, host: str) -> Row[Any] | None:
    """The host's row of ``table`` (verdicts, clock states), read FOR
    UPDATE (on SQLite the transaction holds the write lock already: it
    started with the host row's conditional UPDATE)."""
    return c.execute(select(table).where(table.c.host == host).with_for_update()).first()


def _advance_clock(c: Connection, host: str, state: verifier.ClockState,
                   row: Row[Any] | None, *, newest_only: bool) -> bool:
    """Move the baseline (``row``, read locked) forward to ``state``;
    False if it is older.

    Two engine workers attesting one host at once must not leave the
    older quote's clock as the baseline (that would weaken rollback
    detection). ``newest_only``: an older quote is refused
    (StaleAttestation), since a newer one was judged already."""
    values = {"clock": state.clock, "reset_count": state.reset_count,
              "restart_count": state.restart_count}
    if row is None:
        c.execute(insert(CLOCKS).values(host=host, **values))
        return True
    if (state.reset_count, state.restart_count, state.clock) < \
            (row.reset_count, row.restart_count, row.clock):
        if newest_only:
            raise exception.StaleAttestation(
                host=host, reason="a newer quote of the host was recorded")
        return False
    c.execute(update(CLOCKS).where(CLOCKS.c.host == host).values(**values))
    return True
