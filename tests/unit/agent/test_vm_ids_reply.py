"""Agent API 1.11: ``get`` with ``ids`` reports the VM's QEMU uid and gid,
only when asked (an older client's schema refuses fields it does not know)."""

import types
import uuid
from typing import Any

from vtpcm_agent.association import Association, VTPCMState
from vtpcm_agent.manager import AgentManager
from vtpcm_common.api.agent import messages as m

INSTANCE = str(uuid.uuid4())


class Instances:
    def __init__(self, ids: tuple[int, int] | None) -> None:
        self.ids = ids

    def get(self, instance_uuid: str) -> Any:
        return types.SimpleNamespace(
            instance_uuid=instance_uuid, vtpcm_id=str(uuid.UUID(int=1)),
            state=VTPCMState.ACTIVE, generation=1, migration_id=None,
            ctrl_socket="/run/vtpcm/%s.ctrl" % instance_uuid, pid=42)

    def is_running(self, _assoc: Association) -> bool:
        return True

    def vm_ids(self, _instance_uuid: str) -> tuple[int, int] | None:
        return self.ids


def _get(ids_known: tuple[int, int] | None, asked: bool) -> dict[str, Any]:
    manager = AgentManager("h1", Instances(ids_known))  # type: ignore[arg-type]
    reply = manager.get({}, payload=m.InstanceRef(INSTANCE, ids=asked).to_wire(), auth=None)
    return reply  # type: ignore[no-any-return]


def test_ids_are_reported_only_when_asked():
    asked = m.VTPCMInfo.from_wire(_get((1900001003, 1900000003), asked=True))
    assert (asked.qemu_uid, asked.vm_gid) == (1900001003, 1900000003)
    plain = _get((1900001003, 1900000003), asked=False)
    assert "qemu_uid" not in plain and "vm_gid" not in plain  # a 1.0 client's form


def test_an_agent_without_qemu_uids_reports_none():
    reply = m.VTPCMInfo.from_wire(_get(None, asked=True))
    assert (reply.qemu_uid, reply.vm_gid) == (None, None)
