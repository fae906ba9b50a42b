"""Which rebuild is an evacuation (review finding F8): only one Nova
recorded as such (an ``evacuation`` migration of the instance to this host,
in progress). A plain rebuild has the same task state, REBUILD_SPAWNING,
and must never make the driver replace a vTPCM held elsewhere."""

import types
from typing import Any

import pytest
from nova import objects
from nova.compute import task_states

from vtpcm_nova.virt import driver as vdriver

INSTANCE = types.SimpleNamespace(uuid="2b8b4e0e-8a55-4a56-9b3c-1c6f1f0c1d2e",
                                 task_state=task_states.REBUILD_SPAWNING)


@pytest.fixture
def migrations(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """What Nova's database holds; the filters the driver asks with are checked."""
    held: list[Any] = []

    def get_by_filters(context: Any, filters: dict[str, Any]) -> list[Any]:
        assert filters["migration_type"] == "evacuation"
        assert filters["instance_uuid"] == INSTANCE.uuid
        return [m for m in held if m.status in filters["status"]
                and filters["host"] in (m.source_compute, m.dest_compute)]

    monkeypatch.setattr(objects.MigrationList, "get_by_filters", get_by_filters)
    return held


def _evacuation(status: str, dest: str = "b") -> Any:
    return types.SimpleNamespace(status=status, source_compute="a", dest_compute=dest)


def test_a_plain_rebuild_is_no_evacuation(migrations: list[Any]) -> None:
    assert not vdriver._evacuating(INSTANCE, "b")
    migrations.append(_evacuation("done"))  # an earlier, finished evacuation
    assert not vdriver._evacuating(INSTANCE, "b")
    migrations.append(_evacuation("pre-migrating", dest="c"))  # to another host
    assert not vdriver._evacuating(INSTANCE, "b")


@pytest.mark.parametrize("status", ["accepted", "pre-migrating"])
def test_an_evacuation_to_this_host_in_progress_is_one(migrations: list[Any],
                                                        status: str) -> None:
    migrations.append(_evacuation(status))
    assert vdriver._evacuating(INSTANCE, "b")
    spawning_elsewhere = types.SimpleNamespace(uuid=INSTANCE.uuid, task_state=None)
    assert not vdriver._evacuating(spawning_elsewhere, "b")
