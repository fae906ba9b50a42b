"""A source nova-compute restarted after an early begin under a derived id
(a retry to another host): its live_migration finds that begin at the real
Coordinator (SQLite) instead of beginning under Nova's uuid, which the engine
refuses while the derived begin holds the vTPCM."""

import uuid

from tests.unit.engine.test_coordinator import (
    INSTANCE,
    FakeVerdict,
    env,  # noqa: F401  (a fixture)
    trusted_in_db,
)
from vtpcm_nova.virt import earlybegin, livemigration


class _Engine:
    """The Coordinator under the driver's engine calls."""

    def __init__(self, coord: object) -> None:
        self.coord = coord

    def get_migration(self, migration_id: str) -> object:
        return self.coord.get_migration(migration_id)  # type: ignore[attr-defined]

    def begin(self, migration_id: str, instance_uuid: str, source: str, dest: str) -> object:
        return self.coord.begin(migration_id, instance_uuid, source, dest)  # type: ignore[attr-defined]

    def abort(self, migration_id: str, reason: str, instance_uuid: str | None = None,
              timeout: float | None = None) -> object:
        return self.coord.abort(migration_id, reason,  # type: ignore[attr-defined]
                                instance_uuid=instance_uuid, requested_by="host-a")


def test_a_restarted_source_takes_over_the_derived_begin(env) -> None:  # noqa: F811
    coord, db, agents, trust, clock = env
    db.enroll_host("host-c", ak_public=b"ak-c", ak_name=b"n-c", kem_public=b"kem-of-c",
                   kem_name=b"kc", ek_certificate=None, approved=True)
    db.assign_policy("host-c", "golden")
    trusted_in_db(db, "host-c")
    trust.verdicts["host-c"] = FakeVerdict("TRUSTED")
    nova = str(uuid.uuid4())
    # the early begin to host-b under Nova's uuid, superseded by the retry
    # to host-c, whose early begin runs under a derived id
    assert coord.begin(nova, INSTANCE, "host-a", "host-b").state == "PREPARED"
    coord.abort(nova, "early begin: superseded", instance_uuid=INSTANCE,
                requested_by="host-a")
    derived = earlybegin.attempt_id(nova, "host-c", 1)
    assert coord.begin(derived, INSTANCE, "host-a", "host-c").state == "PREPARED"
    # nova-compute restarts: a new EarlyBegins remembers nothing
    engine = _Engine(coord)
    restarted = earlybegin.EarlyBegins(lambda: engine, lambda: "host-a",  # type: ignore[arg-type,return-value]
                                       lambda i: None, lambda n: None, lambda: 60.0)
    chosen = restarted.join(INSTANCE, nova, "host-c", 1.0)
    assert chosen == derived
    # live_migration's begin: PREPARED, the migration goes on
    info = livemigration.begin(engine, chosen, INSTANCE, "host-a", "host-c")  # type: ignore[arg-type]
    assert info.state == "PREPARED"
