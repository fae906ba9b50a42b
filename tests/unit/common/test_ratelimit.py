"""Rate limits of the unsigned endpoints (``vtpcm_common.ratelimit``)."""

import pytest

from vtpcm_common.exception import InvalidInput, RateLimited
from vtpcm_common.ratelimit import InFlight, PerKeyInterval, Summary, TokenBucket


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_bucket_allows_the_burst_then_the_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(2.0, 3, clock=clock)
    assert [bucket.try_take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.try_take() == pytest.approx(0.5)
    with pytest.raises(RateLimited, match="Too many quotes: .* retry in 1 s"):
        bucket.take("quotes")
    clock.t += 0.5
    assert bucket.try_take() == 0.0
    clock.t += 60  # refills up to the burst only
    assert [bucket.try_take() for _ in range(4)][-1] > 0


def test_per_key_interval_is_per_key_and_bounded() -> None:
    clock = Clock()
    recent = PerKeyInterval(60, max_keys=2, clock=clock)
    assert recent.allow("a") and not recent.allow("a") and recent.allow("b")
    clock.t += 61
    assert recent.allow("a")
    assert recent.allow("c") and recent.allow("d")  # "a" forgotten: bounded memory
    assert recent.allow("a")


def test_summary_reports_a_count_at_most_once_a_period() -> None:
    clock = Clock()
    summary = Summary(60, clock=clock)
    assert summary.add() == 1  # the first at once
    assert [summary.add() for _ in range(5)] == [0] * 5
    clock.t += 61
    assert summary.add() == 6  # the five unreported and this one


def test_in_flight_one_per_key_and_a_total() -> None:
    slots = InFlight(2)
    with slots.slot("h1", "attestations"):
        with pytest.raises(RateLimited, match="Too many attestations"):
            with slots.slot("h1", "attestations"):
                pass
        with slots.slot("h2", "attestations"):
            with pytest.raises(RateLimited):
                with slots.slot("h3", "attestations"):
                    pass
    with slots.slot("h1", "attestations"):  # released after use, also on errors
        pass


@pytest.mark.parametrize("make", [lambda: TokenBucket(0, 1), lambda: TokenBucket(1, 0),
                                  lambda: PerKeyInterval(-1), lambda: InFlight(0),
                                  lambda: Summary(0)])
def test_bad_limits_are_refused(make) -> None:
    with pytest.raises(InvalidInput):
        make()
