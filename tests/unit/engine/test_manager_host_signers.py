"""Which host's signature each engine method of cold migration, shelve and
evacuation accepts, at the RPC endpoint (review item 9): the coordinator's
own ``requested_by`` checks never see a foreign signer, because the
endpoint verifies against the keys of the hosts the engine's records name
(``EngineManager._hosts_concerned``). Real SQLite, real Ed25519 signatures,
fake agents."""

import uuid

import oslo_messaging as messaging
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from sqlalchemy import update

from tests.unit.engine.test_coordinator import INSTANCE, FakeVerdict, env, trusted_in_db  # noqa: F401
from tests.unit.engine.test_coordinator_cold import ColdAgents
from vtpcm_common import authn, exception
from vtpcm_common.api.agent import messages as am
from vtpcm_common.api.engine import messages as m
from vtpcm_nova.engine.db import models
from vtpcm_nova.engine.manager import EngineManager

TOPIC = "vtpcm-engine"
HOSTS = ("host-a", "host-b", "host-c")


@pytest.fixture
def rpc(env):  # noqa: F811
    """The engine's endpoint over the coordinator of ``env``; each host has
    an enrolled command key; host-c is a third, TRUSTED host."""
    coord, db, agents, trust, _ = env
    db.enroll_host("host-c", ak_public=b"ak-c", ak_name=b"n-c", kem_public=b"kem-of-c",
                   kem_name=b"kc", ek_certificate=None, approved=True)
    db.assign_policy("host-c", "golden")
    trusted_in_db(db, "host-c")
    trust.verdicts["host-c"] = FakeVerdict("TRUSTED")
    keys = {h: authn.CommandSigner(ed25519.Ed25519PrivateKey.generate()) for h in HOSTS}
    with db.session() as s:
        for host, signer in keys.items():
            s.execute(update(models.Host).where(models.Host.name == host)
                      .values(command_public=authn.public_raw(signer.public_key)))
    verifier = authn.CommandVerifier(None, TOPIC, signer_role="host command",
                                     service_role="engine", server_kind="engine topic")
    manager = EngineManager(db, None, coord, host_verifier=verifier)  # type: ignore[arg-type]
    cold = ColdAgents(agents, None)
    agents.export_state = lambda host, instance: am.StateBlobs(
        INSTANCE, db.get_vtpcm(INSTANCE).migration_id, 0, b"\x01" * 64, 0, b"", 0)
    agents.import_state = cold.import_state

    def call(method, payload, signed_by):
        auth = None if signed_by is None else keys[signed_by].sign(method, TOPIC, payload)
        return getattr(manager, method)({}, payload, auth=auth)
    call.agents = agents
    return call, db


def _refusal(call, method, payload, signer, only):
    """The endpoint's refusal (as oslo.messaging carries it back): only the
    key of host ``only`` verifies; an unsigned call is refused by name."""
    with pytest.raises(messaging.ExpectedException) as err:
        call(method, payload, signer)
    exc_type, exc, _ = err.value.exc_info
    assert exc_type is exception.CommandRefused
    why = ("no host command signature" if signer is None else
           "signature does not verify with the host command key of %s for engine "
           "topic" % only)
    assert why in str(exc), str(exc)


def _refused(call, method, payload, signer, db, only):
    before = db.get_vtpcm(INSTANCE)
    _refusal(call, method, payload, signer, only)
    assert db.get_vtpcm(INSTANCE) == before
    assert (db.list_audit(limit=1)[0].event, db.list_audit(limit=1)[0].outcome) == \
        ("host-call", "refused")


PLACE_B = m.VtpcmPlacement(INSTANCE, "host-b").to_wire()
REF = m.InstanceRef(INSTANCE).to_wire()


@pytest.mark.parametrize("signer", ["host-a", "host-c", None])
def test_replace_vtpcm_only_by_the_target(rpc, signer):
    call, db = rpc
    db.revoke_host("host-a")
    _refused(call, "replace_vtpcm", PLACE_B, signer, db, "host-b")
    assert call("replace_vtpcm", PLACE_B, "host-b")["host"] == "host-b"  # positive control


@pytest.mark.parametrize("signer", ["host-b", "host-c", None])
def test_shelve_vtpcm_only_by_the_holder(rpc, signer):
    call, db = rpc
    _refused(call, "shelve_vtpcm", REF, signer, db, "host-a")
    assert call("shelve_vtpcm", REF, "host-a")["state"] == "SHELVED"


@pytest.mark.parametrize("signer", ["host-a", "host-c", None])
def test_unshelve_vtpcm_only_by_the_target(rpc, env, signer):  # noqa: F811
    call, db = rpc
    call("shelve_vtpcm", REF, "host-a")
    env[0].nova.unshelving(INSTANCE, "host-b")
    _refused(call, "unshelve_vtpcm", PLACE_B, signer, db, "host-b")
    assert call("unshelve_vtpcm", PLACE_B, "host-b")["host"] == "host-b"


@pytest.mark.parametrize("signer", ["host-b", "host-c", None])
def test_transfer_state_only_by_the_source(rpc, signer):
    call, db = rpc
    coord_mid = str(uuid.uuid4())
    begin = m.BeginMigration(coord_mid, INSTANCE, "host-a", "host-b").to_wire()
    assert call("begin", begin, "host-a")["state"] == "PREPARED"
    ref = m.MigrationRef(coord_mid).to_wire()
    _refusal(call, "transfer_state", ref, signer, "host-a")
    assert db.get_migration(coord_mid).state == "PREPARED"
    assert call("transfer_state", ref, "host-a")["state"] == "TRANSFERRED"


@pytest.mark.parametrize("signer", ["host-a", "host-c", None])
def test_start_incoming_only_by_the_destination(rpc, signer):
    call, db = rpc
    mid = str(uuid.uuid4())
    call("begin", m.BeginMigration(mid, INSTANCE, "host-a", "host-b").to_wire(), "host-a")
    ref = m.MigrationRef(mid).to_wire()
    call("transfer_state", ref, "host-a")
    call.agents.start = lambda host, instance_uuid: am.VTPCMInfo(
        instance_uuid, "v", "MIGRATING_IN", 0, mid, "/run/x.ctrl", True, 42)
    _refusal(call, "start_incoming", ref, signer, "host-b")
    assert call("start_incoming", ref, "host-b")["host"] == "host-b"
