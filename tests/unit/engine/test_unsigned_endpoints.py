"""Issue 9 point 3: the engine's unsigned endpoints never hold an RPC thread
for a caller: ``register_agent`` only queues the name (bounded, per-name
rate limit, background workers), ``attest`` runs once per host at a time."""

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from oslo_messaging.rpc.dispatcher import ExpectedException

from tests.unit.agent.test_unsigned_limits import CountingTPM, _call
from tests.unit.engine.fakes import HOST, WAIT, FakeAgent, FakeTPM, RaceStack
from vtpcm_agent.manager import AgentManager
from vtpcm_common import authn
from vtpcm_common.api.agent import messages as am
from vtpcm_common.api.engine import messages as m
from vtpcm_common.exception import RateLimited
from vtpcm_common.ratelimit import TokenBucket
from vtpcm_nova.engine.registrations import Registrations


class StuckAgent(FakeAgent):
    """An unknown name's agent: get_identity waits until the test ends
    (the RPC timeout, in production)."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[str] = []
        self.release = threading.Event()

    def get_identity(self, host: str, nonce: bytes) -> Any:
        self.asked.append(host)
        if host not in self.tpms:
            self.release.wait(WAIT)
        return super().get_identity(host, nonce)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[RaceStack]:
    stack = RaceStack(f"sqlite:///{tmp_path}/engine.sqlite")
    try:
        yield stack
    finally:
        stack.agent.release.set()
        stack.db.dispose()


def _register(stack: RaceStack, host: str) -> float:
    started = time.monotonic()
    stack.manager.register_agent({}, m.HostRef(host).to_wire())
    return time.monotonic() - started


def test_register_agent_floods_return_at_once_and_enroll_in_the_background(
        stack: RaceStack) -> None:
    agent = StuckAgent()
    stack.att._agents = lambda: agent
    regs = Registrations(stack.manager.enroll_registered, workers=1, backlog=4,
                         per_host_interval=60)
    stack.manager.registrations = regs
    regs.start()
    try:
        names = ["rogue-%s" % uuid.uuid4().hex[:8] for _ in range(50)]
        took = [_register(stack, name) for name in names]
        # no cast waited for an agent (each would wait WAIT s inline)
        assert max(took) < WAIT / 2, took
        assert regs.dropped >= 50 - 1 - 4  # (one with the worker), the last four queued
        accepted = 50 - regs.dropped
        # a real new host announces itself after the flood: queued (the
        # oldest rogue name makes room) and enrolled
        agent.tpms["new-host"] = FakeTPM()
        agent.release.set()
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline and len(agent.asked) < accepted:
            time.sleep(0.05)
        assert _register(stack, "new-host") < WAIT / 2
        while time.monotonic() < deadline and "new-host" not in agent.asked:
            time.sleep(0.05)
        while time.monotonic() < deadline:
            try:
                assert stack.db.get_host("new-host").status.value == "PENDING"
                break
            except Exception:  # noqa: BLE001 - not enrolled yet
                time.sleep(0.05)
        assert stack.db.get_host("new-host").status.value == "PENDING"
        # the same name again within the interval: not even queued
        assert not regs.submit("new-host")
    finally:
        agent.release.set()
        regs.stop()


def test_register_agent_without_registrations_enrolls_nothing(stack: RaceStack) -> None:
    agent = StuckAgent()
    stack.att._agents = lambda: agent
    assert _register(stack, "someone") < WAIT / 2
    assert agent.asked == []


def test_register_agent_with_a_bad_name_changes_nothing(stack: RaceStack) -> None:
    regs = Registrations(stack.manager.enroll_registered, workers=1, backlog=1,
                         per_host_interval=0)
    stack.manager.registrations = regs
    stack.manager.register_agent({}, {"host": "../../etc"})
    stack.manager.register_agent({}, {"nothing": 1})
    assert regs.pending() == 0 and regs.dropped == 0


def test_attest_runs_once_per_host_at_a_time(stack: RaceStack) -> None:
    stack.manager.min_unsigned_interval = 0.0  # every attest quotes
    held: list[Any] = []
    stack.agent.holding = True  # the host holds its next quote reply
    thread = threading.Thread(target=lambda: held.append(
        stack.manager.attest({}, payload=m.HostRef(HOST).to_wire())))
    thread.start()
    try:
        assert stack.agent.arrived.wait(WAIT)
        quotes = stack.agent.calls
        with pytest.raises(ExpectedException) as refused:
            stack.manager.attest({}, payload=m.HostRef(HOST).to_wire())
        err = refused.value.exc_info[1]
        assert isinstance(err, RateLimited) and "unsigned attestations" in str(err)
        assert stack.agent.calls == quotes  # the refused one never reached the host
    finally:
        stack.agent.release.set()
        thread.join(WAIT)
    assert held and held[0]["status"] == "TRUSTED"
    # finished: the next one runs
    assert stack.manager.attest({}, payload=m.HostRef(HOST).to_wire())["status"] == "TRUSTED"


def test_attest_loop_cannot_launder_quotes_past_the_agents_limit(
        stack: RaceStack, tmp_path: Path) -> None:
    """Review finding 1: each unsigned ``attest`` made the engine send a
    vouched quote, which the agent serves without counting; a loop of
    attest drove the host TPM at full speed (120 quotes in 2 s). Now the
    engine quotes at most once per host per ``min_unsigned_interval``."""
    engine = authn.CommandSigner(ed25519.Ed25519PrivateKey.generate())
    (tmp_path / "engine.pub").write_bytes(engine.public_key_pem())
    tpm = CountingTPM()
    agent = AgentManager(HOST, None, tpm,  # type: ignore[arg-type]
                         verifier=authn.CommandVerifier(tmp_path / "engine.pub", HOST),
                         unsigned_limit=TokenBucket(5.0, 10),
                         activation_limit=TokenBucket(2 / 60, 2))
    fake_quote = stack.agent.quote

    def quote(host: str, nonce: bytes, pcrs: Any, bank: str) -> Any:
        # what AgentAPI does for a vouched method: signed by the engine key
        payload = am.QuoteRequest(nonce, tuple(pcrs), bank).to_wire()
        _call(agent, "quote", payload, engine.sign("quote", host, payload))
        return fake_quote(host, nonce, pcrs, bank)
    stack.agent.quote = quote  # type: ignore[method-assign]
    stack.manager.min_unsigned_interval = 1.0
    started, attests = time.monotonic(), 0
    while time.monotonic() - started < 2.0:
        verdict = stack.manager.attest({}, payload=m.HostRef(HOST).to_wire())
        assert verdict["status"] == "TRUSTED"
        attests += 1
    assert attests > 20  # the loop ran, answered from the verdict in force
    # one quote per started interval (the verdict of RaceStack's start counts)
    assert 1 <= tpm.calls.count("quote") <= 3
