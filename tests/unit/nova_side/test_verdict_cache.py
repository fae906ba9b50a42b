import datetime

import pytest

from vtpcm_common import exception
from vtpcm_common.api.engine import messages as em
from vtpcm_nova.scheduler.verdicts import VerdictCache, trusted_until

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
