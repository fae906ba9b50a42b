"""Verdict writes against concurrent revocations and policy changes, on real
SQLite files and the local PostgreSQL (READ COMMITTED, its default).

Two Database objects stand for two engine workers. One of them is stopped
half-way through its transaction (the real method, held just before its
commit) while the other tries its write: the second must wait for the first
and then see its change, never act on the row as it was. The whole held-quote
race through Attestor, EngineManager and Coordinator runs here on both
backends too.
"""

from __future__ import annotations

import dataclasses
import datetime
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy

from tests.unit.engine.fakes import HOST, RaceStack
from vtpcm_common import exception
from vtpcm_common.api.engine import messages as m
from vtpcm_nova.engine import verifier
from vtpcm_nova.engine.db import api
from vtpcm_nova.engine.verifier import ClockState, TrustStatus

pytestmark = pytest.mark.functional

T0 = datetime.datetime(2025, 1, 1, 12, 0, tzinfo=datetime.UTC)
TTL = datetime.timedelta(minutes=5)
WAIT = 15.0
BLOCKED = 0.7  # how long a write must stay blocked to count as waiting

MakeDb = Callable[[], api.Database]


def approved_host(db: api.Database) -> api.TrustBasis:
    """cmp1, APPROVED with policy golden; the basis of a challenge now."""
    db.put_policy("golden", "sha256", {16: b"\x16" * 32}, now=T0)
    db.enroll_host(HOST, ak_public=b"ak", ak_name=b"\x00\x0bak", kem_public=b"kem",
                   kem_name=b"\x00\x0bkem", approved=True, now=T0)
    db.assign_policy(HOST, "golden")
    return basis_now(db)


def basis_now(db: api.Database) -> api.TrustBasis:
    rec = db.get_host(HOST)
    assert rec.policy_name is not None
    return api.TrustBasis(HOST, rec.revision, rec.policy_name,
                          db.get_policy(rec.policy_name).revision, T0)


def trusted(db: api.Database, basis: api.TrustBasis,
            clock: ClockState | None = None) -> api.VerdictRecord:
    return db.record_attestation(basis, TrustStatus.TRUSTED, "quote verified", T0 + TTL,
                                 clock=clock)


class Paused:
    """Runs ``call`` in a thread whose transaction stops at ``db.<step>``
    (after the real step ran, before the commit) until ``resume``."""

    def __init__(self, db: api.Database, step: str, call: Callable[[], Any]) -> None:
        self.reached, self.go = threading.Event(), threading.Event()
        self.result: list[Any] = []
        real = getattr(db, step)

        def paused(*args: Any, **kwargs: Any) -> Any:
            out = real(*args, **kwargs)
            self.reached.set()
            assert self.go.wait(WAIT)
            return out
        setattr(db, step, paused)
        self.thread = threading.Thread(target=self._run, args=(call,))
        self.thread.start()
        assert self.reached.wait(WAIT), "the transaction never reached " + step

    def _run(self, call: Callable[[], Any]) -> None:
        try:
            self.result.append(call())
        except BaseException as err:  # noqa: BLE001 - handed to the test
            self.result.append(err)

    def resume(self) -> Any:
        self.go.set()
        self.thread.join(WAIT)
        assert not self.thread.is_alive()
        return self.result[0]


class Waiting:
    """Runs ``call`` in a thread and tells whether it is still blocked."""

    def __init__(self, call: Callable[[], Any]) -> None:
        self.done = threading.Event()
        self.result: list[Any] = []

        def run() -> None:
            try:
                self.result.append(call())
            except BaseException as err:  # noqa: BLE001 - handed to the test
                self.result.append(err)
            finally:
                self.done.set()
        self.thread = threading.Thread(target=run)
        self.thread.start()

    def still_blocked(self) -> bool:
        return not self.done.wait(BLOCKED)

    def outcome(self) -> Any:
        self.thread.join(WAIT)
        assert not self.thread.is_alive()
        return self.result[0]


def test_a_verdict_write_waits_for_a_revocation_under_way(make_db: MakeDb) -> None:
    worker1, worker2 = make_db(), make_db()
    basis = approved_host(worker1)
    trusted(worker1, basis)
    revoke = Paused(worker2, "_put_verdict", lambda: worker2.revoke_host(HOST))
    write = Waiting(lambda: trusted(worker1, basis))
    assert write.still_blocked()
    assert revoke.resume().status.value == "REVOKED"
    refused = write.outcome()
    assert isinstance(refused, exception.StaleAttestation)
    assert refused.kwargs["reason"] == "host is REVOKED"
    stored = worker1.get_verdict(HOST)
    assert stored is not None and (stored.status, stored.reason) == \
        (TrustStatus.UNTRUSTED, "host revoked")
    assert worker1.trusted_host(HOST, T0) is None


def test_a_revocation_waits_for_a_verdict_write_under_way(make_db: MakeDb) -> None:
    worker1, worker2 = make_db(), make_db()
    basis = approved_host(worker1)
    write = Paused(worker1, "_put_verdict", lambda: trusted(worker1, basis))
    revoke = Waiting(lambda: worker2.revoke_host(HOST))
    assert revoke.still_blocked()
    assert write.resume().trusted
    assert revoke.outcome().status.value == "REVOKED"
    stored = worker2.get_verdict(HOST)
    assert stored is not None and (stored.status, stored.reason) == \
        (TrustStatus.UNTRUSTED, "host revoked")


def test_a_verdict_write_waits_for_a_policy_change_under_way(make_db: MakeDb) -> None:
    worker1, worker2 = make_db(), make_db()
    basis = approved_host(worker1)
    trusted(worker1, basis)
    change = Paused(worker2, "_expire_verdicts", lambda: worker2.put_policy(
        "golden", "sha256", {16: b"\x17" * 32}))
    write = Waiting(lambda: trusted(worker1, basis))
    assert write.still_blocked()
    assert change.resume().revision == basis.policy_revision + 1
    refused = write.outcome()
    assert isinstance(refused, exception.StaleAttestation)
    assert refused.kwargs["reason"] == "policy golden changed since the challenge"
    stored = worker1.get_verdict(HOST)
    assert stored is not None and (stored.status, stored.reason) == \
        (TrustStatus.UNKNOWN, "policy golden changed; attest again")


def test_a_verdict_write_waits_for_a_policy_assignment_under_way(make_db: MakeDb) -> None:
    worker1, worker2 = make_db(), make_db()
    basis = approved_host(worker1)
    worker1.put_policy("other", "sha256", {16: b"\x17" * 32})
    change = Paused(worker2, "_expire_verdicts",
                    lambda: worker2.assign_policy(HOST, "other"))
    write = Waiting(lambda: trusted(worker1, basis))
    assert write.still_blocked()
    change.resume()
    refused = write.outcome()
    assert isinstance(refused, exception.StaleAttestation)
    assert refused.kwargs["reason"] == "policy assignment changed since the challenge"
    assert worker1.trusted_host(HOST, T0) is None


def test_an_older_quote_cannot_replace_a_newer_one(make_db: MakeDb) -> None:
    db = make_db()
    basis = approved_host(db)
    db.record_attestation(basis, TrustStatus.UNTRUSTED, "PCR 16 differs", T0 + TTL,
                          clock=ClockState(200, 1, 0))
    with pytest.raises(exception.StaleAttestation,
                       match="a newer quote of the host was recorded"):
        trusted(db, basis, clock=ClockState(100, 1, 0))
    stored = db.get_verdict(HOST)
    assert stored is not None and stored.reason == "PCR 16 differs"
    # a failing verdict is never held back (fail closed); the baseline stays
    db.record_attestation(basis, TrustStatus.UNKNOWN, "agent timed out", T0 + TTL,
                          clock=ClockState(150, 1, 0))
    assert db.get_clock_state(HOST) == ClockState(200, 1, 0)
    assert trusted(db, basis, clock=ClockState(300, 1, 0)).trusted


def test_a_verdict_of_an_older_challenge_never_replaces_a_newer_one(make_db: MakeDb) -> None:
    """Whatever both statuses: a failing verdict without a clock (garbage,
    no answer) is ordered by its challenge time like any other."""
    db = make_db()
    basis = approved_host(db)
    later = dataclasses.replace(basis, challenged_at=T0 + datetime.timedelta(seconds=1))
    db.record_attestation(later, TrustStatus.UNTRUSTED, "quote rejected", T0 + TTL)
    for status in TrustStatus:
        with pytest.raises(exception.StaleAttestation,
                           match="a newer attestation of the host was recorded"):
            db.record_attestation(basis, status, "held back", T0 + TTL,
                                  clock=ClockState(100, 1, 0))
    stored = db.get_verdict(HOST)
    assert stored is not None and (stored.status, stored.reason, stored.attested_at) == \
        (TrustStatus.UNTRUSTED, "quote rejected", later.challenged_at)
    assert db.get_clock_state(HOST) is None  # nothing of the stale ones was kept
    assert trusted(db, later, clock=ClockState(100, 1, 0)).trusted  # same challenge time


def test_readers_see_trust_only_with_an_approved_host(make_db: MakeDb) -> None:
    """Whatever writer forgets the verdict, the host's status is read with it."""
    db = make_db()
    trusted(db, approved_host(db))
    with db.engine.begin() as conn:
        conn.execute(sqlalchemy.text("UPDATE hosts SET status = 'PENDING'"))
    stored = db.get_verdict(HOST)
    assert stored is not None and (stored.status, stored.reason) == \
        (TrustStatus.UNTRUSTED, "host is PENDING")
    assert db.fresh_verdicts(T0)[HOST].status is TrustStatus.UNTRUSTED
    assert db.trusted_host(HOST, T0) is None


def test_a_trusted_verdict_needs_a_policy_and_an_approved_host(make_db: MakeDb) -> None:
    db = make_db()
    basis = approved_host(db)
    with pytest.raises(exception.InvalidInput, match="needs a policy"):
        trusted(db, api.TrustBasis(HOST, basis.host_revision, None, None, T0))
    db.revoke_host(HOST)
    with pytest.raises(exception.StaleAttestation, match="host is REVOKED"):
        trusted(db, basis_now(db))


@pytest.fixture
def stack(db_url: str) -> Iterator[RaceStack]:
    s = RaceStack(db_url)
    try:
        yield s
    finally:
        s.db.dispose()


def test_held_quote_and_revocation_through_the_engine(stack: RaceStack) -> None:
    land = stack.hold_attestation()
    stack.admin("revoke_host", m.HostRef(HOST))
    verdict = land()
    assert (verdict.status, verdict.reason) == (TrustStatus.UNTRUSTED, "host revoked")
    assert stack.scheduler_view() == {HOST: "UNTRUSTED"}
    with pytest.raises(exception.HostNotTrusted, match="is not trusted: host is REVOKED"):
        stack.begin()
    assert stack.agents.calls == []


def test_held_quote_without_a_change_through_the_engine(stack: RaceStack) -> None:
    land = stack.hold_attestation()
    assert land().status is verifier.TrustStatus.TRUSTED
    assert stack.scheduler_view() == {HOST: "TRUSTED"}
    assert stack.begin().state == "PREPARED"
