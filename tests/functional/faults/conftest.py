"""The fault-injection deployment (``deployment.Deployment``), one per module."""

import contextlib
import dataclasses
from collections.abc import Iterator

import pytest

from tests.functional.deploy import Spec, Trust, build
from tests.functional.faults.deployment import ENGINE_EXTRA, PCRS, Deployment
from tests.functional.faults.relay import BrokerRelay
from tests.functional.harness import TRANSPORT_URL


@pytest.fixture(scope="module")
def deployment() -> Iterator[Deployment]:
    """The daemons reach RabbitMQ through a relay the broker cells cut."""
    relay = BrokerRelay(("127.0.0.1", 5672)).start()
    try:
        with make_deployment(relay) as d:
            yield d
    finally:
        relay.stop()


@contextlib.contextmanager
def make_deployment(relay: BrokerRelay | None = None) -> Iterator[Deployment]:
    """The deployment; its daemons reach RabbitMQ through ``relay`` if given
    (the test's own clients directly: they stand for Nova and the operator)."""
    url = None if relay is None else TRANSPORT_URL.replace(
        "@127.0.0.1:5672", "@127.0.0.1:%d" % relay.port)
    assert url != TRANSPORT_URL
    # the engine's short agent timeout (ENGINE_EXTRA) can cut a host's first
    # quote, which creates its TPM keys: trust asks again (bound)
    spec = Spec("flt", engine=ENGINE_EXTRA, transport_url=url,
                trust=Trust(pcrs=PCRS, policy="golden", bound=120),
                agent_timeout=10, operator_timeout=20, host_timeout=6)
    with build(spec) as d:
        yield Deployment(**{f.name: getattr(d, f.name) for f in dataclasses.fields(d)},
                         relay=relay)
