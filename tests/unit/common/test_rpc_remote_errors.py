"""A server's vTPCM error reaches the caller as its own class, message and
named values: oslo.messaging rebuilds it (``allowed_remote_exmods``), the
client drops oslo's ``_Remote`` wrapper (its str() carries the server's
traceback)."""

import sys
from typing import Any

import oslo_messaging as messaging
import pytest
from oslo_messaging._drivers import common as driver_common

from tests.unit.common.test_rpcapi import INSTANCE, MIGRATION, RecordingClient, _engine_api
from vtpcm_common import exception, rpc


def over_the_wire(err: BaseException, exmods: list[str]) -> BaseException:
    """What a client's transport makes of ``err`` raised in a server."""
    try:
        raise err
    except BaseException:  # noqa: BLE001 - serialized as a server does
        data = driver_common.serialize_remote_exception(sys.exc_info())
    return driver_common.deserialize_remote_exception(data, exmods)


def raising(failure: BaseException) -> RecordingClient:
    class Server(RecordingClient):
        class _Prepared(RecordingClient._Prepared):
            def call(self, ctxt: Any, method: str, **args: Any) -> Any:
                raise failure
    return Server()


def test_a_server_refusal_arrives_as_its_class_with_message_and_values() -> None:
    refusal = exception.GenerationMismatch(instance_uuid=INSTANCE, given=3, expected=4)
    rebuilt = over_the_wire(refusal, rpc.REMOTE_EXMODS)
    assert isinstance(rebuilt, exception.GenerationMismatch)  # oslo's _Remote subclass
    assert "Traceback" in str(rebuilt)
    api = _engine_api()
    api.client = raising(rebuilt)
    with pytest.raises(exception.GenerationMismatch) as err:
        api.begin(MIGRATION, INSTANCE, "cmp1", "cmp2")
    assert type(err.value) is exception.GenerationMismatch
    assert str(err.value) == (f"vTPCM of instance {INSTANCE}: generation 3 refused, "
                              "authoritative generation is 4")
    assert err.value.kwargs == {"instance_uuid": INSTANCE, "given": 3, "expected": 4}


def test_the_transport_is_built_to_rebuild_the_project_exceptions() -> None:
    assert rpc.REMOTE_EXMODS == ["vtpcm_common.exception"]
    rebuilt = over_the_wire(exception.NotFound(what="host", key="h"), [])
    assert isinstance(rebuilt, messaging.RemoteError)  # what a bare transport gives


def test_an_error_of_another_module_is_a_vtpcm_error_naming_it() -> None:
    class Odd(Exception):
        pass
    api = _engine_api()
    api.client = raising(over_the_wire(Odd("boom"), rpc.REMOTE_EXMODS))
    with pytest.raises(exception.VTPCMException) as err:  # broad-raises-ok: the subject
        api.begin(MIGRATION, INSTANCE, "cmp1", "cmp2")
    assert type(err.value) is exception.VTPCMException
    assert str(err.value).startswith("remote error Odd: boom")
