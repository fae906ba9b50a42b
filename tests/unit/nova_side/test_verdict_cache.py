import datetime

import pytest

from tests.refusal import refused
from vtpcm_common import exception
from vtpcm_common.api.engine import messages as em
from vtpcm_nova.scheduler.verdicts import VerdictCache, fetch_trusted, trusted_until

NOW = datetime.datetime(2026, 11, 30, 12, 0, tzinfo=datetime.UTC)
LATER = (NOW + datetime.timedelta(minutes=5)).isoformat()
EARLIER = (NOW - datetime.timedelta(seconds=1)).isoformat()


def _verdicts(*rows: tuple[str, str, str | None]) -> em.VerdictList:
    return em.VerdictList(tuple(em.Verdict(h, s, "r", NOW.isoformat(), e) for h, s, e in rows))


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_only_trusted_verdicts_count() -> None:
    got = trusted_until(_verdicts(("a", "TRUSTED", LATER), ("b", "UNTRUSTED", LATER),
                                  ("c", "UNKNOWN", LATER), ("d", "TRUSTED", None)))
    assert list(got) == ["a"]


def test_one_fetch_per_ttl_whatever_the_number_of_hosts() -> None:
    calls = []
    clock = Clock()

    def fetch() -> dict[str, datetime.datetime]:
        calls.append(1)
        return trusted_until(_verdicts(("a", "TRUSTED", LATER)))

    cache = VerdictCache(fetch, ttl=5.0, clock=clock)
    for i in range(1000):
        cache.why_not("host-%d" % i, now=NOW)
    assert len(calls) == 1
    clock.t += 5.0
    cache.why_not("a", now=NOW)
    assert len(calls) == 2


def test_reasons() -> None:
    cache = VerdictCache(lambda: trusted_until(_verdicts(
        ("a", "TRUSTED", LATER), ("old", "TRUSTED", EARLIER), ("u", "UNTRUSTED", LATER))),
        ttl=5.0, clock=Clock())
    assert cache.why_not("a", now=NOW) is None
    assert cache.why_not("u", now=NOW) == "no fresh TRUSTED verdict"
    assert cache.why_not("nobody", now=NOW) == "no fresh TRUSTED verdict"
    reason = cache.why_not("old", now=NOW)
    assert reason is not None and reason.startswith("TRUSTED verdict expired at")


def test_unreachable_engine_fails_closed_once_per_ttl() -> None:
    calls = []

    def fetch() -> dict[str, datetime.datetime]:
        calls.append(1)
        raise exception.ServiceUnreachable(service="vtpcm-engine", method="verdicts",
                                           reason="MessagingTimeout")

    cache = VerdictCache(fetch, ttl=5.0, clock=Clock())
    for host in ("a", "b", "c"):
        reason = cache.why_not(host, now=NOW)
        assert reason is not None and reason.startswith("engine unreachable")
    assert len(calls) == 1


@pytest.mark.parametrize("naive", [True, False])
def test_naive_expiry_is_utc(naive: bool) -> None:
    stamp = (NOW + datetime.timedelta(minutes=1))
    text = stamp.replace(tzinfo=None).isoformat() if naive else stamp.isoformat()
    assert trusted_until(_verdicts(("a", "TRUSTED", text)))["a"] == stamp


class PagedEngine:
    """An engine at API 1.9 serving ``pages`` (expires map, next_after),
    each reply decoded from its wire form as the RPC client does; each page
    takes ``took`` seconds of the test's clock and honours its timeout as
    the RPC client does (MessagingTimeout -> ServiceUnreachable)."""

    def __init__(self, pages: list[tuple[dict[str, str], str | None]], clock: Clock,
                 took: float = 0.0) -> None:
        self.pages, self.clock, self.took = pages, clock, took
        self.timeouts: list[float | None] = []

    def can_send_version(self, version: str) -> bool:
        return True

    def verdicts(self, timeout: float | None = None) -> em.VerdictList:
        raise AssertionError("not called at 1.9")

    def trusted_hosts(self, after: str | None = None, limit: int = em.TRUSTED_PAGE_MAX,
                      timeout: float | None = None) -> em.TrustedHosts:
        self.timeouts.append(timeout)
        if timeout is not None and self.took > timeout:
            self.clock.t += timeout
            raise exception.ServiceUnreachable(service="vtpcm-engine",
                                               method="trusted_hosts",
                                               reason="MessagingTimeout")
        self.clock.t += self.took
        expires, next_after = self.pages[len(self.timeouts) - 1]
        return em.TrustedHosts.from_wire(em.TrustedHosts(expires, next_after).to_wire())


FOUR_PAGES = [({"a": LATER}, "a"), ({"b": LATER}, "b"), ({"c": LATER}, "c"), ({"d": LATER}, None)]


def test_the_timeout_bounds_the_whole_fetch_not_each_page() -> None:
    """Four pages of 0.4 s each within 1 s: each page waits only what is
    left (1.0, 0.6, 0.2), the third runs out and the fetch fails closed;
    never four timeouts' worth of pages with the lock held."""
    clock = Clock()
    engine = PagedEngine(FOUR_PAGES, clock, took=0.4)
    cache = VerdictCache(lambda: fetch_trusted(engine, 1.0, clock=clock), ttl=5.0, clock=clock)
    start = clock.t
    assert cache.why_not("a", now=NOW) == (
        "engine unreachable (vtpcm-engine did not answer trusted_hosts: MessagingTimeout)")
    assert engine.timeouts == pytest.approx([1.0, 0.6, 0.2])
    assert clock.t - start == pytest.approx(1.0)


def test_a_fetch_within_its_timeout_passes() -> None:
    """Control for the test above: the same pages within 2 s."""
    clock = Clock()
    engine = PagedEngine(FOUR_PAGES, clock, took=0.4)
    assert sorted(fetch_trusted(engine, 2.0, clock=clock)) == ["a", "b", "c", "d"]
    assert engine.timeouts == pytest.approx([2.0, 1.6, 1.2, 0.8])


def test_a_last_page_answered_after_the_deadline_fails_closed() -> None:
    """An engine client that answers late (past its timeout) does not bring
    hosts older than the deadline into the snapshot."""
    clock = Clock()

    class Late(PagedEngine):
        def trusted_hosts(self, after: str | None = None, limit: int = em.TRUSTED_PAGE_MAX,
                          timeout: float | None = None) -> em.TrustedHosts:
            self.took = 0.0
            reply = super().trusted_hosts(after, limit, timeout)
            self.clock.t += 1.5
            return reply

    engine = Late([({"a": LATER}, None)], clock)
    with refused(exception.ServiceUnreachable, "vtpcm-engine did not answer trusted_hosts: "
                 "scheduler_timeout passed after 1 page(s)"):
        fetch_trusted(engine, 1.0, clock=clock)
    assert sorted(fetch_trusted(Late([({"a": LATER}, None)], clock), 2.0, clock=clock)) == ["a"]


@pytest.mark.parametrize("bad", ["yesterday", "2026-13-01T00:00:00", ""])
def test_a_malformed_expiry_fails_closed_and_is_remembered(bad: str) -> None:
    """The wire schema takes any text as an expiry; a bad one is the
    engine's fault: InvalidPayload, no host passes, and the failure is
    kept for the TTL like any other (one engine fetch, not one per request)."""
    clock = Clock()
    engine = PagedEngine([({"a": bad, "b": LATER}, None)], clock)
    cache = VerdictCache(lambda: fetch_trusted(engine, 1.0, clock=clock), ttl=60.0, clock=clock)
    for host in ("a", "b", "a"):
        assert cache.why_not(host, now=NOW) == (
            "engine unreachable (Invalid trusted_hosts payload: field expires: "
            "not an ISO 8601 timestamp)")
    assert len(engine.timeouts) == 1
    with refused(exception.InvalidPayload, "Invalid verdict_list payload: field expires: "
                 "not an ISO 8601 timestamp"):
        trusted_until(_verdicts(("a", "TRUSTED", bad)))
    good = PagedEngine([({"a": LATER, "b": LATER}, None)], clock)  # the control
    assert sorted(fetch_trusted(good, 1.0, clock=clock)) == ["a", "b"]


def test_any_exception_of_a_fetch_fails_closed_and_is_remembered(
        caplog: pytest.LogCaptureFixture) -> None:
    """Not only a VTPCMException: a bug in the fetch must not raise into
    Nova's scheduler on every vtpcm: request."""
    calls = []

    def fetch() -> dict[str, datetime.datetime]:
        calls.append(1)
        raise KeyError("secret-looking detail")

    cache = VerdictCache(fetch, ttl=5.0, clock=Clock())
    for host in ("a", "b"):
        assert cache.why_not(host, now=NOW) == "engine unreachable (KeyError)"
    assert len(calls) == 1
    assert "KeyError" in caplog.text and "secret-looking" not in caplog.text
