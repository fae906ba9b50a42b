"""trusted_hosts (engine API 1.9): the scheduler's paged query, over the
real manager and database, read back through the filter's fetch_trusted."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.refusal import refused
from tests.unit.engine.fakes import HOST, FakeTPM, RaceStack
from vtpcm_common import exception
from vtpcm_common.api.engine import messages as m
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


def test_10001_hosts_reach_the_scheduler(stack: RaceStack,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The 10,000-entry list cap no longer fails a large cloud closed; the
    old single reply still cannot carry it (the planted control)."""
    record = stack.db.fresh_verdicts()[HOST]
    many = {"h%05d" % i: type(record)(**{**vars(record), "host": "h%05d" % i})
            for i in range(10001)}
    monkeypatch.setattr(stack.db, "fresh_verdicts", lambda now=None: many)

    class FullPages(ManagerReader):
        def trusted_hosts(self, after: str | None = None, limit: int = m.TRUSTED_PAGE_MAX,
                          timeout: float | None = None) -> m.TrustedHosts:
            self.pages.append(after)
            return m.TrustedHosts.from_wire(self.stack.manager.trusted_hosts(
                {}, payload=m.TrustedHostsQuery(after, limit).to_wire()))

    reader = FullPages(stack)
    assert len(verdicts.fetch_trusted(reader, timeout=1.0)) == 10001
    assert reader.pages == [None, "h09999"]
    with pytest.raises(exception.InvalidPayload, match="at most 10000 entries"):
        verdicts.fetch_trusted(ManagerReader(stack, version_cap="1.8"), timeout=1.0)


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
