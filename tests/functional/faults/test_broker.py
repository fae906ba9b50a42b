"""The fault matrix's RabbitMQ row: the broker goes away under the engine
and both agents (a relay they reach it through is cut, which is what a
broker restart looks like to them, without restarting the broker others
share) and comes back after a restart's time or past the RPC timeouts."""

import socket
from collections.abc import Iterator

import pytest

from tests.functional.faults.conftest import make_deployment
from tests.functional.faults.deployment import Deployment
from tests.functional.faults.matrix import STEPS, run_cell
from tests.functional.faults.relay import BrokerRelay

pytestmark = pytest.mark.functional

CELLS = [("broker", step, mode) for step in STEPS[1:] for mode in ("restart", "down")]


@pytest.fixture(scope="module")
def deployment() -> Iterator[Deployment]:
    relay = BrokerRelay(("127.0.0.1", 5672)).start()
    try:
        with make_deployment(relay) as d:
            yield d
    finally:
        relay.stop()


def test_the_relay_really_cuts() -> None:
    """Positive control: a cut relay refuses connections, a restored one relays."""
    relay = BrokerRelay(("127.0.0.1", 5672)).start()
    try:
        relay.cut()
        with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as conn:
            assert conn.recv(1) == b""  # closed at once
        relay.restore()
        with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as conn:
            conn.sendall(b"AMQP\x00\x00\x09\x01")
            assert conn.recv(8)  # the broker's Connection.Start
    finally:
        relay.stop()


@pytest.mark.parametrize(("part", "step", "mode"), CELLS,
                         ids=["%s-%s-%s" % c for c in CELLS])
def test_broker_fault(deployment: Deployment, part: str, step: str, mode: str) -> None:
    run_cell(deployment, part, step, mode)
