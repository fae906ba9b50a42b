"""Token buckets for endpoints anyone on the broker may call.

Why: an unsigned call costs its caller one message and may cost the server a
TPM operation or an RPC thread. A bucket refuses at once (``RateLimited``)
what exceeds a steady rate, so a flood never queues work in front of the
signed operations. Pure bookkeeping, clock injected: no I/O, no sleeping.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from vtpcm_common.exception import InvalidInput, RateLimited


class TokenBucket:
    """``rate`` calls per second on average, ``burst`` at once."""

    def __init__(self, rate: float, burst: int, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not rate > 0 or burst < 1:
            raise InvalidInput(reason="a rate limit needs rate > 0 and burst >= 1")
        self.rate, self.burst = float(rate), int(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()
        self._lock = threading.Lock()

    def try_take(self) -> float:
        """0.0 if a call may run now, else the seconds until one may."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return 0.0
            return (1.0 - self._tokens) / self.rate

    def take(self, what: str) -> None:
        """Take a token or raise ``RateLimited`` naming ``what`` was refused."""
        wait = self.try_take()
        if wait:
            raise RateLimited(what=what, retry=math.ceil(wait))


class PerKeyInterval:
    """At most one event per key every ``interval`` seconds, remembering at
    most ``max_keys`` keys (the oldest are forgotten first, so random keys
    cannot exhaust memory)."""

    def __init__(self, interval: float, max_keys: int = 4096, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if interval < 0 or max_keys < 1:
            raise InvalidInput(reason="interval must be >= 0 and max_keys >= 1")
        self.interval, self.max_keys = float(interval), int(max_keys)
        self._clock = clock
        self._last: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def allow(self, key: str) -> bool:
        """True (and the key's clock restarts) if ``key`` had no event lately."""
        with self._lock:
            now = self._clock()
            last = self._last.get(key)
            if last is not None and now - last < self.interval:
                return False
            self._last[key] = now
            self._last.move_to_end(key)
            while len(self._last) > self.max_keys:
                self._last.popitem(last=False)
            return True


    def forget(self, key: str) -> None:
        """Let ``key``'s next event through (its last one came to nothing)."""
        with self._lock:
            self._last.pop(key, None)


class Summary:
    """Counts events (refusals, drops) so that they can be logged at DEBUG
    each and at WARNING at most once per ``period`` with their number: a
    flood of them cannot flood the log, and an operator still sees it."""

    def __init__(self, period: float, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not period > 0:
            raise InvalidInput(reason="a summary period must be > 0")
        self.period = float(period)
        self._clock = clock
        self._count = 0
        self._at: float | None = None
        self._lock = threading.Lock()

    def add(self) -> int:
        """Count one event; the number to report now (this one included)
        if the last report is a period old, else 0."""
        with self._lock:
            self._count += 1
            now = self._clock()
            if self._at is not None and now - self._at < self.period:
                return 0
            count, self._count, self._at = self._count, 0, now
            return count


class InFlight:
    """At most one call per key and ``limit`` calls in all at a time, for
    unsigned calls that may wait on someone else (an agent's reply)."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise InvalidInput(reason="an in-flight limit must be >= 1")
        self.limit = int(limit)
        self._keys: set[str] = set()
        self._lock = threading.Lock()

    @contextmanager
    def slot(self, key: str, what: str) -> Iterator[None]:
        """Run the body holding ``key``'s slot, or raise ``RateLimited``."""
        with self._lock:
            if key in self._keys or len(self._keys) >= self.limit:
                raise RateLimited(what=what, retry=1)
            self._keys.add(key)
        try:
            yield
        finally:
            with self._lock:
                self._keys.discard(key)
