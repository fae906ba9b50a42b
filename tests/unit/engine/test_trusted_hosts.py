"""trusted_hosts (engine API 1.9): the scheduler's paged query, over the
real manager and database, read back through the filter's fetch_trusted."""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from tests.refusal import refused
from tests.unit.engine.fakes import HOST, FakeTPM, RaceStack, clone_trusted
from vtpcm_common import exception
from vtpcm_common.api.engine import messages as m
from vtpcm_nova.engine.db import models
from vtpcm_nova.engine.db.models import HostStatus
from vtpcm_nova.scheduler import verdicts

OTHERS = ("cmp0", "cmp2", "cmp3", "cmp4")


class ManagerReader:
    """The engine client's side of the two queries, straight to the manager
    (each reply decoded from its wire form, as the RPC client does)."""

    def __init__(self, stack: RaceStack, version_cap: str = "1.9") -> None:
        self.stack = stack
        self.version_cap = version_cap
        self.pages: list[str | None] = []

    def can_send_version(self, version: str) -> bool:
        return tuple(map(int, version.split("."))) <= \
            tuple(map(int, self.version_cap.split(".")))

    def verdicts(self, timeout: float | None = None) -> m.VerdictList:
        return m.VerdictList.from_wire(self.stack.manager.verdicts({}, payload={}))

    def trusted_hosts(self, after: str | None = None, limit: int = m.TRUSTED_PAGE_MAX,
                      timeout: float | None = None) -> m.TrustedHosts:
        self.pages.append(after)
        request = m.TrustedHostsQuery(after, min(limit, 2))  # tiny pages
        return m.TrustedHosts.from_wire(
            self.stack.manager.trusted_hosts({}, payload=request.to_wire()))


@pytest.fixture
def stack(tmp_path: Path) -> RaceStack:
    stack = RaceStack(f"sqlite:///{tmp_path}/engine.sqlite")
    for host in OTHERS:  # as fakes.enrolled, under the policy HOST recorded
        stack.agent.tpms.setdefault(host, FakeTPM()).extend(16, b"good-boot")
        stack.att.enroll_from_agent(host, auto_approve=False)
        stack.db.assign_policy(host, "golden")
        stack.att.approve(host)
        assert stack.att.attest(host).trusted
    return stack


def test_pages_carry_every_trusted_host_once(stack: RaceStack) -> None:
    reader = ManagerReader(stack)
    got = verdicts.fetch_trusted(reader, timeout=1.0)
    assert sorted(got) == sorted((HOST, *OTHERS))
    assert reader.pages == [None, "cmp1", "cmp3"]  # five hosts, two a page
    now = datetime.datetime.now(datetime.UTC)
    assert all(expires > now for expires in got.values())


def test_untrusted_and_revoked_hosts_are_left_out(stack: RaceStack) -> None:
    """Control for the test above: a host that stops being TRUSTED leaves."""
    stack.att.revoke("cmp2")
    stack.agent.tpms["cmp3"].extend(16, b"evil")
    assert not stack.att.attest("cmp3").trusted
    got = verdicts.fetch_trusted(ManagerReader(stack), timeout=1.0)
    assert sorted(got) == ["cmp0", "cmp1", "cmp4"]


def test_pinned_below_1_9_the_filter_uses_verdicts(stack: RaceStack) -> None:
    reader = ManagerReader(stack, version_cap="1.8")
    got = verdicts.fetch_trusted(reader, timeout=1.0)
    assert sorted(got) == sorted((HOST, *OTHERS)) and reader.pages == []


def test_10001_hosts_reach_the_scheduler(stack: RaceStack) -> None:
    """The 10,000-entry list cap no longer fails a large cloud closed; the
    old single reply still cannot carry it (the planted control)."""
    clone_trusted(stack.db, HOST, ["h%05d" % i for i in range(10001)])

    class FullPages(ManagerReader):
        def trusted_hosts(self, after: str | None = None, limit: int = m.TRUSTED_PAGE_MAX,
                          timeout: float | None = None) -> m.TrustedHosts:
            self.pages.append(after)
            return m.TrustedHosts.from_wire(self.stack.manager.trusted_hosts(
                {}, payload=m.TrustedHostsQuery(after, limit).to_wire()))

    reader = FullPages(stack)
    assert len(verdicts.fetch_trusted(reader, timeout=None)) == 10001 + 1 + len(OTHERS)
    assert reader.pages == [None, "h09994"]  # cmp0-cmp4 sort first
    with pytest.raises(exception.InvalidPayload, match="at most 10000 entries"):
        verdicts.fetch_trusted(ManagerReader(stack, version_cap="1.8"), timeout=None)


def test_a_page_reads_only_its_own_rows(stack: RaceStack,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Paging is done in SQL: a page's work follows its ``limit``, not the
    number of fresh verdicts (it used to read and sort every one of them,
    123 s per fetch at 150,000 hosts). Counted as rows the database hands
    back, so the test does not depend on timing."""
    clone_trusted(stack.db, HOST, ["h%05d" % i for i in range(3000)])
    fetched: list[int] = []
    real_session = stack.db.session

    @contextlib.contextmanager
    def counting_session() -> Iterator[Any]:
        with real_session() as s:
            real_execute = s.execute

            def execute(*args: Any, **kwargs: Any) -> Any:
                rows = list(real_execute(*args, **kwargs))
                fetched.append(len(rows))
                return rows
            s.execute = execute  # type: ignore[method-assign]
            yield s

    monkeypatch.setattr(stack.db, "session", counting_session)
    reply = m.TrustedHosts.from_wire(stack.manager.trusted_hosts(
        {}, payload=m.TrustedHostsQuery("h01499", 2).to_wire()))
    assert sorted(reply.expires) == ["h01500", "h01501"] and reply.next_after == "h01501"
    assert sum(fetched) <= 3, fetched  # limit + 1, not 3005


def test_sql_paging_keeps_the_trust_rules(stack: RaceStack) -> None:
    """Paged in SQL, a page still holds only fresh TRUSTED verdicts of
    APPROVED hosts, in host order after the marker, and ends exactly."""
    stack.att.revoke("cmp2")
    stack.agent.tpms["cmp3"].extend(16, b"evil")
    assert not stack.att.attest("cmp3").trusted
    page = m.TrustedHosts.from_wire(stack.manager.trusted_hosts(
        {}, payload=m.TrustedHostsQuery("cmp0", 2).to_wire()))
    assert list(page.expires) == ["cmp1", "cmp4"] and page.next_after is None
    with stack.db.session() as s:  # a TRUSTED row whose host is no longer APPROVED
        s.execute(update(models.Host).where(models.Host.name == "cmp4")
                  .values(status=HostStatus.PENDING.value))
    assert stack.db.get_verdict("cmp4").status.value == "UNTRUSTED"  # type: ignore[union-attr]
    assert [h for h, _ in stack.db.trusted_page("cmp0", 2)] == ["cmp1"]
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
    assert [h for h, _ in stack.db.trusted_page(None, 10, now=later)] == []


class Stuck:
    """An engine whose pages never end or go backwards."""

    def __init__(self, next_after: Any) -> None:
        self.next_after = next_after

    def can_send_version(self, version: str) -> bool:
        return True

    def verdicts(self, timeout: float | None = None) -> m.VerdictList:
        raise AssertionError("not called at 1.9")

    def trusted_hosts(self, after: str | None = None, limit: int = m.TRUSTED_PAGE_MAX,
                      timeout: float | None = None) -> m.TrustedHosts:
        return m.TrustedHosts({}, next_after=self.next_after(after))


def test_a_marker_that_does_not_move_forward_fails_the_fetch() -> None:
    with refused(exception.InvalidPayload,
                 "Invalid trusted_hosts payload: field next_after: does not move forward"):
        verdicts.fetch_trusted(Stuck(lambda after: "a"), timeout=1.0)


def test_pages_without_end_fail_the_fetch() -> None:
    with refused(exception.InvalidPayload,
                 "Invalid trusted_hosts payload: field next_after: more than 100 pages"):
        verdicts.fetch_trusted(Stuck(lambda after: (after or "") + "a"), timeout=1.0)


def test_markers_in_the_databases_collation_are_progress() -> None:
    """PostgreSQL under en_US.UTF-8 sorts "cmp-10" after "cmp1"; Python
    does not. Paged in SQL, the engine's markers follow the database's
    order, so the scheduler takes any new marker as progress and only a
    repeated one as a loop (the planted control)."""
    order = {None: "cmp1", "cmp1": "cmp-10", "cmp-10": None}
    got = verdicts.fetch_trusted(Stuck(lambda after: order[after]), timeout=None)
    assert got == {}
    loop = {None: "cmp1", "cmp1": "cmp-10", "cmp-10": "cmp1"}
    with refused(exception.InvalidPayload,
                 "Invalid trusted_hosts payload: field next_after: does not move forward"):
        verdicts.fetch_trusted(Stuck(lambda after: loop[after]), timeout=None)
