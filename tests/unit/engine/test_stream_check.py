"""The post-import check's second half (agent API 1.13): the digests of the
state blobs the source's QEMU read and the destination's QEMU set, as each
host's control-channel proxy saw them, volatile state included. Real
coordinator and SQLite, fake agents (``FakeAgents.streams``)."""

import logging

import pytest

from tests.unit.engine.test_coordinator import env  # noqa: F401 (fixture)
from tests.unit.engine.test_post_import_check import _commit_refusals, _prepared, _untouched
from vtpcm_common import exception

PERMANENT = (2, 6200, "aa" * 32)
VOLATILE = (2, 9100, "bb" * 32)
OLDER_VOLATILE = (2, 9100, "cc" * 32)


def _streams(agents, source, destination):
    agents.streams.update(source=source, destination=destination)


def test_the_same_blobs_on_both_sides_commit(env, caplog):  # noqa: F811
    coord, db, agents, mid = _prepared(env)
    _streams(agents, {1: PERMANENT, 2: VOLATILE}, {1: PERMANENT, 2: VOLATILE})
    with caplog.at_level(logging.INFO, logger="vtpcm_nova.engine.coordinator"):
        assert coord.commit(mid, requested_by="host-a").state == "COMMITTED"
    assert {streams for _, _, streams in agents.digest_streams} == {True}
    assert any("its QEMU set the blobs the source's QEMU read" in r.getMessage()
               for r in caplog.records)


def test_an_older_volatile_blob_is_refused_though_the_permanent_state_matches(env):  # noqa: F811
    """The pairing a stream writer can make (review HIGH 2): today's
    permanent blob with an earlier volatile one of the same key epoch."""
    coord, db, agents, mid = _prepared(env)
    _streams(agents, {1: PERMANENT, 2: VOLATILE}, {1: PERMANENT, 2: OLDER_VOLATILE})
    with pytest.raises(exception.ImportedStateMismatch,
                       match="state blobs the destination host-b's QEMU set are not the "
                             "ones the source host-a's QEMU read"):
        coord.commit(mid, requested_by="host-a")
    _untouched(db, agents, mid, "PREPARED")
    assert "volatile state" in _commit_refusals(db, mid)[0]


@pytest.mark.parametrize("missing", ["source", "destination"])
def test_a_side_without_a_proxy_is_checked_on_its_permanent_state_alone(env, caplog,  # noqa: F811
                                                                         missing):
    coord, db, agents, mid = _prepared(env)
    _streams(agents, {1: PERMANENT, 2: VOLATILE}, {1: PERMANENT, 2: VOLATILE})
    agents.streams[missing] = "this host runs no control-channel proxy"
    with caplog.at_level(logging.WARNING, logger="vtpcm_nova.engine.coordinator"):
        assert coord.commit(mid, requested_by="host-a").state == "COMMITTED"
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert ("post-import check passed on the permanent state only; the state blobs "
            "(volatile state) were not compared: the %s: this host runs no "
            "control-channel proxy" % missing) in warning


def test_required_stream_check_refuses_a_side_without_a_proxy(env):  # noqa: F811
    coord, db, agents, mid = _prepared(env)
    coord.require_stream_check = True
    _streams(agents, {1: PERMANENT, 2: VOLATILE}, "no control-channel proxy serves it")
    with pytest.raises(exception.ImportedStateUnverified,
                       match=r"cannot be compared \(\[engine\] require_stream_check\): the "
                             "destination: no control-channel proxy serves it"):
        coord.commit(mid, requested_by="host-a")
    _untouched(db, agents, mid, "PREPARED")


def test_a_1_12_agent_that_refuses_the_stream_request_is_asked_again_without(env):  # noqa: F811
    coord, db, agents, mid = _prepared(env)
    _streams(agents, {1: PERMANENT, 2: VOLATILE}, {1: PERMANENT, 2: VOLATILE})
    agents.api_version["host-b"] = "1.12"
    agents.fail["state_digest", "host-b"] = exception.RPCVersionUnsupported(
        service="vtpcm-agent.host-b", method="state_digest", version="1.13",
        reason="it runs an older API version")
    assert coord.commit(mid, requested_by="host-a").state == "COMMITTED"
    assert ("host-b", "destination", False) in agents.digest_streams


def test_a_1_13_agent_refusing_the_request_is_not_asked_again(env):  # noqa: F811
    coord, db, agents, mid = _prepared(env)
    agents.fail["state_digest", "host-b"] = exception.RPCVersionUnsupported(
        service="vtpcm-agent.host-b", method="state_digest", version="1.13",
        reason="refused")
    with pytest.raises(exception.ImportedStateUnverified, match="refused"):
        coord.commit(mid, requested_by="host-a")
    assert [s for h, _, s in agents.digest_streams if h == "host-b"] == []
