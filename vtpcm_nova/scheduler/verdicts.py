"""The scheduler's view of host trust: one engine query, reused for a short TTL.

Nova-free, so the filter's only per-host work is a dict lookup and its cost
can be measured without Nova (``benchmarks/``).
"""

import datetime
import threading
import time
from collections.abc import Callable, Mapping
from typing import Protocol

from oslo_log import log as logging

from vtpcm_common import exception
from vtpcm_common.api.engine import messages as em

LOG = logging.getLogger(__name__)

TRUSTED = "TRUSTED"
# engine API version of trusted_hosts (paged); below it, the one-shot verdicts
TRUSTED_HOSTS_SINCE = "1.9"

Trusted = Mapping[str, datetime.datetime]


class EngineReader(Protocol):
    def can_send_version(self, version: str) -> bool: ...

    def verdicts(self, timeout: float | None = None) -> em.VerdictList: ...

    def trusted_hosts(self, after: str | None = None, limit: int = em.TRUSTED_PAGE_MAX,
                      timeout: float | None = None) -> em.TrustedHosts: ...


def _expiry(text: str, message_type: str) -> datetime.datetime:
    """An ISO 8601 expiry, naive read as UTC; anything else is the engine
    answering garbage: InvalidPayload, which fails the fetch closed."""
    try:
        expires = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise exception.InvalidPayload(message_type=message_type, field="expires",
                                       reason="not an ISO 8601 timestamp") from None
    return expires if expires.tzinfo is not None else expires.replace(tzinfo=datetime.UTC)


def trusted_until(verdicts: em.VerdictList) -> dict[str, datetime.datetime]:
    """Host -> expiry of its TRUSTED verdict; every other verdict is dropped."""
    return {v.host: _expiry(v.expires_at, "verdict_list") for v in verdicts.verdicts
            if v.status == TRUSTED and v.expires_at is not None}


def fetch_trusted(engine: EngineReader, timeout: float | None, max_pages: int = 100,
                  clock: Callable[[], float] = time.monotonic) -> dict[str, datetime.datetime]:
    """Every TRUSTED host, page by page (engine API 1.9), or through the one
    ``verdicts`` call when the client is pinned below 1.9 (rolling upgrade).

    ``timeout`` bounds the WHOLE fetch, not each page: each page waits only
    the time left, and a fetch that runs out fails closed. Else N slow pages
    take N timeouts (while the cache lock is held) and the first page's
    hosts are that old when the filter uses them. ``max_pages`` bounds the
    loop against an engine that never says "last page": its answer then
    fails the fetch (closed) instead of spinning."""
    if not engine.can_send_version(TRUSTED_HOSTS_SINCE):
        return trusted_until(engine.verdicts(timeout=timeout))
    deadline = None if timeout is None else clock() + timeout
    out: dict[str, datetime.datetime] = {}
    after: str | None = None
    markers: set[str] = set()
    for pages in range(max_pages):
        page = engine.trusted_hosts(after=after, timeout=_left(deadline, clock, pages))
        for host, expires in page.expires.items():
            out[host] = _expiry(expires, "trusted_hosts")
        if page.next_after is None:
            _left(deadline, clock, pages + 1)  # an answer after the deadline is too old
            return out
        # the engine's database orders host names by its own collation (not
        # Python's): a marker must be new, not larger, to count as progress
        if page.next_after in markers:
            raise exception.InvalidPayload(message_type="trusted_hosts", field="next_after",
                                           reason="does not move forward")
        markers.add(page.next_after)
        after = page.next_after
    raise exception.InvalidPayload(message_type="trusted_hosts", field="next_after",
                                   reason="more than %d pages" % max_pages)


def _left(deadline: float | None, clock: Callable[[], float], pages: int) -> float | None:
    """Seconds left for the fetch; ServiceUnreachable once none are."""
    if deadline is None:
        return None
    left = deadline - clock()
    if left <= 0:
        raise exception.ServiceUnreachable(
            service="vtpcm-engine", method="trusted_hosts",
            reason="scheduler_timeout passed after %d page(s)" % pages)
    return left


class TrustSnapshot:
    """The trusted hosts and the time, read once for one scheduling request:
    the per-host check is then a dict lookup and a comparison."""

    __slots__ = ("_trusted", "_error", "_now")

    def __init__(self, trusted: Trusted, error: str | None, now: datetime.datetime) -> None:
        self._trusted = trusted
        self._error = error
        self._now = now

    def why_not(self, host: str) -> str | None:
        """None if ``host`` is trusted, else the reason it is not."""
        if self._error is not None:
            return "engine unreachable (%s)" % self._error
        expires = self._trusted.get(host)
        if expires is None:
            return "no fresh TRUSTED verdict"
        if expires <= self._now:
            return "TRUSTED verdict expired at %s" % expires.isoformat()
        return None


class VerdictCache:
    """Trusted hosts as of the last engine answer, kept ``ttl`` seconds.

    A failed fetch, whatever its exception, is remembered for the same
    ``ttl`` (as "no host trusted"), so an unreachable engine costs one timeout per TTL, not one
    per host: 10,000 hosts must not mean 10,000 RPC timeouts."""

    def __init__(self, fetch: Callable[[], Trusted], ttl: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._fetch = fetch
        self._ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._fetched_at: float | None = None
        self._trusted: Trusted = {}
        self.error: str | None = None

    def trusted(self) -> Trusted:
        return self._current()[0]

    def _current(self) -> tuple[Trusted, str | None]:
        """The trusted hosts and the fetch error, refreshed past the TTL,
        read together under the lock."""
        now = self._clock()
        with self._lock:
            if self._fetched_at is None or now - self._fetched_at >= self._ttl:
                try:
                    self._trusted = self._fetch()
                    self.error = None
                except Exception as err:  # noqa: BLE001 - any failure fails closed
                    # whatever went wrong (a VTPCMException or a bug), remembered
                    # for the TTL: vtpcm: requests find no host, none re-fetches,
                    # and nothing raises into Nova's scheduler
                    self._trusted = {}
                    self.error = (str(err) if isinstance(err, exception.VTPCMException)
                                  else type(err).__name__)
                    LOG.warning("vTPCM engine verdicts unavailable, vtpcm: requests find "
                                "no valid host: %(err)s", {"err": self.error})
                self._fetched_at = now
            return self._trusted, self.error

    def snapshot(self, now: datetime.datetime | None = None) -> TrustSnapshot:
        """The view one scheduling request uses for all its hosts."""
        trusted, error = self._current()
        return TrustSnapshot(trusted, error, now or datetime.datetime.now(datetime.UTC))

    def why_not(self, host: str, now: datetime.datetime | None = None) -> str | None:
        """None if ``host`` is trusted right now, else the reason it is not."""
        return self.snapshot(now).why_not(host)
