"""The scheduler's view of host trust: one engine call, reused for a short TTL.

Nova-free, so the filter's only per-host work is a dict lookup and its cost
can be measured without Nova (``benchmarks/``).
"""

import datetime
import threading
import time
from collections.abc import Callable, Mapping

from oslo_log import log as logging

from vtpcm_common import exception
from vtpcm_common.api.engine import messages as em

LOG = logging.getLogger(__name__)

TRUSTED = "TRUSTED"


def trusted_until(verdicts: em.VerdictList) -> dict[str, datetime.datetime]:
    """Host -> expiry of its TRUSTED verdict; every other verdict is dropped."""
    out: dict[str, datetime.datetime] = {}
    for verdict in verdicts.verdicts:
        if verdict.status != TRUSTED or verdict.expires_at is None:
            continue
        expires = datetime.datetime.fromisoformat(verdict.expires_at)
        if expires.tzinfo is None:
            expires = expires.replace(tzinfo=datetime.UTC)
        out[verdict.host] = expires
    return out


class VerdictCache:
    """Trusted hosts as of the last engine answer, kept ``ttl`` seconds.

    A failed fetch is remembered for the same ``ttl`` (as "no host
    trusted"), so an unreachable engine costs one timeout per TTL, not one
    per host: 10,000 hosts must not mean 10,000 RPC timeouts."""

    def __init__(self, fetch: Callable[[], em.VerdictList], ttl: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._fetch = fetch
        self._ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._fetched_at: float | None = None
        self._trusted: Mapping[str, datetime.datetime] = {}
        self.error: str | None = None

    def trusted(self) -> Mapping[str, datetime.datetime]:
        now = self._clock()
        with self._lock:
            if self._fetched_at is None or now - self._fetched_at >= self._ttl:
                try:
                    self._trusted = trusted_until(self._fetch())
                    self.error = None
                except exception.VTPCMException as err:
                    self._trusted = {}
                    self.error = str(err)
                    LOG.warning("vTPCM engine verdicts unavailable, vtpcm: requests find "
                                "no valid host: %(err)s", {"err": err})
                self._fetched_at = now
            return self._trusted

    def why_not(self, host: str, now: datetime.datetime | None = None) -> str | None:
        """None if ``host`` is trusted right now, else the reason it is not."""
        trusted = self.trusted()
        if self.error is not None:
            return "engine unreachable (%s)" % self.error
        expires = trusted.get(host)
        if expires is None:
            return "no fresh TRUSTED verdict"
        if expires <= (now or datetime.datetime.now(datetime.UTC)):
            return "TRUSTED verdict expired at %s" % expires.isoformat()
        return None
