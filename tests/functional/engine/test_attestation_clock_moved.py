"""A TPM Restart or reboot between two quotes whose challenges both read
the baseline before either verdict landed (right after an approval: no
baseline) is seen: the later verdict is judged again, under lock, against
the baseline the earlier one stored (``TrustStore.conclude_attestation``).

Two engine workers (two Attestors) on one database (SQLite, PostgreSQL).
Before the fix, B was judged against its challenge's baseline (None) and
landed TRUSTED with the host APPROVED."""
from __future__ import annotations

import datetime
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from tests.functional.engine.conftest import db_url, pg_url  # noqa: F401
from tests.unit.engine.fakes import FakeAgent, enrolled
from vtpcm_common import exception
from vtpcm_nova.engine import attestation
from vtpcm_nova.engine.db import api, migration
from vtpcm_nova.engine.db.models import HostStatus
from vtpcm_nova.engine.verifier import ClockState, TrustStatus


class GatedAgent(FakeAgent):
    """Each quote call waits for its own release; the TPM quotes at release time."""

    def __init__(self) -> None:
        super().__init__()
        self.gates: list[tuple[threading.Event, threading.Event]] = []
        self.gated = False
        self.lock = threading.Lock()

    def quote(self, host: str, nonce: bytes, pcrs: Sequence[int], bank: str) -> Mapping[str, Any]:
        if self.gated:
            arrived, release = threading.Event(), threading.Event()
            with self.lock:
                self.gates.append((arrived, release))
            arrived.set()
            assert release.wait(10)
        return super().quote(host, nonce, pcrs, bank)


def _two_pre_opened(url: str, event: str, policy: str) -> tuple[Any, Any, api.Database]:
    """Approve, open two challenges (A then B) before either quote, land
    A's golden quote, then ``event`` on the TPM and golden PCRs replayed
    before B's quote; (A's verdict, B's verdict, the database)."""
    migration.db_sync(url)
    db1, db2 = api.Database(url), api.Database(url)
    agent = GatedAgent()
    workers = [attestation.Attestor(db, lambda: agent, verdict_ttl=300, nonce_ttl=60,
                                    clock=time.time, reboot_policy=policy)  # type: ignore[arg-type]
               for db in (db1, db2)]
    tpm = enrolled(workers[0], agent)    # approved: baseline None
    assert db1.get_clock_state("cmp1") is None

    agent.gated = True
    out: dict[str, Any] = {}

    def run(name: str, w: attestation.Attestor) -> None:
        out[name] = w.attest("cmp1")
    ta = threading.Thread(target=run, args=("A", workers[0]))
    ta.start()
    while len(agent.gates) < 1:
        time.sleep(0.01)
    time.sleep(0.01)                     # B's challenge strictly later
    tb = threading.Thread(target=run, args=("B", workers[1]))
    tb.start()
    while len(agent.gates) < 2:
        time.sleep(0.01)
    # A: golden quote of the approved boot, lands TRUSTED, baseline stored
    agent.gates[0][1].set()
    ta.join(10)
    assert out["A"].trusted, out["A"].reason
    base = db1.get_clock_state("cmp1")
    assert base is not None and (base.reset_count, base.restart_count) == (1, 0)
    # the host runs something else, then a TPM Restart / reboot, replays golden
    tpm.extend(16, b"something else")
    if event == "restart":
        tpm.restart()
    else:
        tpm.reboot()
    tpm.extend(16, b"good-boot")
    agent.gates[1][1].set()
    tb.join(10)
    return out["A"], out["B"], db1


@pytest.mark.parametrize("event", ["restart", "reboot"])
def test_restart_between_two_pre_opened_challenges_is_seen(db_url: str, event: str) -> None:  # noqa: F811
    _, vb, db = _two_pre_opened(db_url, event, "reapprove")
    after = db.get_clock_state("cmp1")
    host = db.get_host("cmp1")
    # what a sequential attest gives: the restart seen, re-approval required
    assert vb.status is TrustStatus.UNTRUSTED and host.status is HostStatus.PENDING, \
        f"masked: B={vb.status.value} ({vb.reason}), host {host.status.value}, baseline {after}"
    assert ("rebooted" if event == "reboot" else "restarted") in vb.reason
    assert after is not None and (after.reset_count, after.restart_count) == \
        ((2, 0) if event == "reboot" else (1, 1))
    assert [e.outcome for e in db.list_audit(host="cmp1") if e.event == "reboot"] == ["PENDING"]


def test_accept_policy_keeps_a_restart_between_two_quotes(db_url: str) -> None:  # noqa: F811
    """Under reboot_policy=accept the restart judged again is accepted:
    B stands TRUSTED, the host stays APPROVED, the baseline moves on."""
    _, vb, db = _two_pre_opened(db_url, "restart", "accept")
    assert vb.trusted, vb.reason
    assert db.get_host("cmp1").status is HostStatus.APPROVED
    after = db.get_clock_state("cmp1")
    assert after is not None and (after.reset_count, after.restart_count) == (1, 1)


def test_a_quote_older_than_the_baseline_stored_since_its_challenge_is_dropped(
        db_url: str) -> None:  # noqa: F811
    """The stored baseline moved since the challenge to a later quote than
    ours: ours is stale (the later one was judged), not a rollback, and
    nothing is stored; the rejudge is not asked."""
    migration.db_sync(db_url)
    db = api.Database(db_url)
    agent = FakeAgent()
    w = attestation.Attestor(db, lambda: agent, verdict_ttl=300, nonce_ttl=60, clock=time.time)
    enrolled(w, agent)
    rec, policy = db.get_host("cmp1"), db.get_policy("golden")
    now = datetime.datetime.now(datetime.UTC)
    basis = api.TrustBasis("cmp1", rec.revision, "golden", policy.revision, now)
    db.set_clock_state("cmp1", ClockState(500, 1, 0))   # a later quote landed

    def rejudge(stored: ClockState) -> tuple[TrustStatus, str, bool]:
        raise AssertionError("judged again")
    with pytest.raises(exception.StaleAttestation, match="newer quote"):
        db.conclude_attestation(basis, TrustStatus.TRUSTED, "ok",
                                now + datetime.timedelta(seconds=300), now=now,
                                clock=ClockState(400, 1, 0), baseline=None, rejudge=rejudge)
    assert db.get_clock_state("cmp1") == ClockState(500, 1, 0)
    assert db.get_verdict("cmp1") is None
