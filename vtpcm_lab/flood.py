"""A broker client flooding the unsigned endpoints, for the load test of
issue 9 point 3 (tests/functional/engine/test_unsigned_flood.py) and
benchmarks/unsigned_flood.py.

What it throws, each at a fixed rate from its own thread, with nothing but
broker credentials: ``register_agent`` casts for random host names and for
names of *silent agents* (RPC servers it runs on the agent topic that take
calls and never answer, so an engine enrolling them inline waits its whole
RPC timeout); unsigned ``get_identity``, ``quote`` and (malformed)
``activate_credential`` calls to real agents; unsigned ``attest`` calls to
the engine. It counts what was answered, refused (RateLimited) or failed.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import oslo_messaging as messaging
from oslo_config import cfg

from vtpcm_common import exception, rpc
from vtpcm_common.api.agent.rpcapi import AgentAPI
from vtpcm_common.api.engine.rpcapi import EngineAPI


class _Silent:
    """An agent endpoint that takes every call and never answers."""

    target = messaging.Target(version="1.99")

    def __init__(self, host: str, release: threading.Event) -> None:
        self.host = host
        self._release = release

    def get_identity(self, ctxt: Any, **kwargs: Any) -> None:
        self._release.wait()


class SilentAgents:
    """RPC servers on the agent topic for ``names`` that never answer."""

    def __init__(self, conf: cfg.ConfigOpts, count: int) -> None:
        self.names = ["silent-%s" % uuid.uuid4().hex[:8] for _ in range(count)]
        self._release = threading.Event()
        self._transport = rpc.get_transport(conf)
        self._servers = [messaging.get_rpc_server(
            self._transport, messaging.Target(topic=rpc.topic(conf, "agent_topic"),
                                              server=name),
            [_Silent(name, self._release)], access_policy=messaging.DefaultRPCAccessPolicy)
            for name in self.names]

    def __enter__(self) -> SilentAgents:
        for server in self._servers:
            server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._release.set()
        for server in self._servers:
            server.stop()
        for server in self._servers:
            server.wait()
        self._transport.cleanup()


DEFAULT_WORKERS = 8  # threads per kind of call


class Flood:
    """Unsigned calls at ``rate`` per second per kind until ``stop``, from
    ``workers`` threads per kind: each waits for its answer, so on a loaded
    machine (an answer in ~0.7 s seen in a CI rehearsal) one thread per kind
    stayed below the agents' limit and the flood refused nothing."""

    def __init__(self, conf: cfg.ConfigOpts, hosts: Sequence[str], silent: Sequence[str],
                 *, rate: float, call_timeout: float = 10.0,
                 workers: int = DEFAULT_WORKERS) -> None:
        if workers < 1:
            raise ValueError("a flood needs at least one worker per kind")
        self.hosts, self.silent, self.rate = list(hosts), list(silent), rate
        self.workers = workers
        self.agents = AgentAPI(conf, timeout=call_timeout)
        if self.agents.signer is not None:
            raise ValueError("the flood must come from a client without the engine's key")
        self.engine = EngineAPI(conf, self.agents.transport, timeout=call_timeout)
        self.outcomes: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.started = self.stopped = 0.0

    def _count(self, kind: str, call: Callable[[], Any]) -> None:
        try:
            call()
            outcome = "answered"
        except exception.RateLimited:
            outcome = "refused"
        except Exception as err:  # noqa: BLE001 - counted by type: the flood goes on
            outcome = type(err).__name__
        with self._lock:
            self.outcomes["%s %s" % (kind, outcome)] += 1

    def _loop(self, kind: str, make: Callable[[int], Callable[[], Any]], worker: int) -> None:
        i = worker
        period = self.workers / self.rate  # each worker's share of the rate
        next_at = time.monotonic() + worker / self.rate
        self._stop.wait(max(0.0, next_at - time.monotonic()))
        while not self._stop.is_set():
            self._count(kind, make(i))
            i += self.workers
            next_at += period
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def start(self) -> None:
        host = self.hosts
        kinds: dict[str, Callable[[int], Callable[[], Any]]] = {
            # half random names, half silent agents' names
            "register_agent": lambda i: lambda: self.engine.register_agent(
                self.silent[i % len(self.silent)] if self.silent and i % 2
                else "rogue-%s" % uuid.uuid4().hex[:10]),
            "get_identity": lambda i: lambda: self.agents.get_identity(
                host[i % len(host)], os.urandom(32)),
            "quote": lambda i: lambda: self.agents.quote(
                host[i % len(host)], os.urandom(32), (0, 1, 2, 3), "sha256"),
            "activate_credential": lambda i: lambda: self.agents.activate_credential(
                host[i % len(host)], b"\x00\x04junk", b"\x00\x04junk"),
            "attest": lambda i: lambda: self.engine.attest(host[i % len(host)]),
        }
        self.started = time.monotonic()
        for kind, make in kinds.items():
            for worker in range(self.workers):
                thread = threading.Thread(target=self._loop, args=(kind, make, worker),
                                          name="flood-%s-%d" % (kind, worker), daemon=True)
                thread.start()
                self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        self.stopped = time.monotonic()
        self.agents.transport.cleanup()

    def calls_per_second(self) -> dict[str, float]:
        """Calls thrown per second, per endpoint."""
        took = max(1e-9, (self.stopped or time.monotonic()) - self.started)
        per: Counter[str] = Counter()
        for key, n in self.outcomes.items():
            per[key.split(" ", 1)[0]] += n
        return {kind: round(n / took, 1) for kind, n in sorted(per.items())}
