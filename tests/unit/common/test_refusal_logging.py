"""Which refusals are quiet (review fix3, finding "note"): only those anyone
on the broker can cause without a key (malformed request, a signature that
does not verify, a replay, a rate limit); a key holder's refusal by the
method itself is logged at WARNING each."""

import logging
from typing import Any

import pytest
from oslo_messaging.rpc.dispatcher import ExpectedException

from vtpcm_common import exception, rpc
from vtpcm_common.api.engine import messages as m


class Verifier:
    """Accepts the auth "good", refuses anything else as a bad signature."""

    def verify(self, method: str, payload: Any, auth: Any) -> str:
        if auth != "good":
            raise exception.CommandRefused(method=method, reason="bad signature")
        return "op"


class Service:
    verifier = Verifier()

    @rpc.endpoint(m.HostRef, signed=True)
    def act(self, req: m.HostRef) -> m.Empty:
        raise exception.CommandRefused(method="act", reason="only the source may pass "
                                                            "the commit point")

    @rpc.endpoint(m.HostRef)
    def limited(self, req: m.HostRef) -> m.Empty:
        raise exception.RateLimited(what="calls", retry=1)


def _refusal(call: Any, *args: Any) -> exception.VTPCMException:
    with pytest.raises(ExpectedException) as caught:
        call({}, *args)
    err = caught.value.exc_info[1]
    assert isinstance(err, exception.VTPCMException)
    return err


def _levels(caplog: pytest.LogCaptureFixture, text: str) -> set[int]:
    return {r.levelno for r in caplog.records if text in r.getMessage()}


@pytest.fixture(autouse=True)
def _fresh_summary(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rpc, "_quiet_refusals", rpc.Summary(3600.0))


def test_a_key_holders_refusal_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="vtpcm_common.rpc")
    err = _refusal(Service().act, {"host": "h1"}, "good")
    assert type(err) is exception.CommandRefused and "commit point" in str(err)
    assert not err.at_verification
    assert _levels(caplog, "commit point") == {logging.WARNING}


@pytest.mark.parametrize("payload, auth, why", [
    ({"host": "h1"}, "forged", "bad signature"),
    ({"host": "no such/host"}, "good", "host"),
])
def test_refusals_at_verification_are_quiet(caplog: pytest.LogCaptureFixture,
                                            payload: Any, auth: str, why: str) -> None:
    caplog.set_level(logging.DEBUG, logger="vtpcm_common.rpc")
    err = _refusal(Service().act, payload, auth)
    assert isinstance(err, (exception.CommandRefused, exception.InvalidInput))
    assert err.at_verification and why in str(err)
    # the first of a period is summed up at WARNING, then each at DEBUG only
    caplog.clear()
    _refusal(Service().act, payload, auth)
    assert _levels(caplog, "Refused act") == {logging.DEBUG}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_rate_limit_is_quiet(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="vtpcm_common.rpc")
    _refusal(Service().limited, {"host": "h1"})
    caplog.clear()
    err = _refusal(Service().limited, {"host": "h1"})
    assert isinstance(err, exception.RateLimited)
    assert _levels(caplog, "Refused limited") == {logging.DEBUG}
