"""The engine run's lease across a clean stop (issue 10 review): it is
renewed while the RPC server drains the calls in flight (a begin whose
step waits up to ``[engine] rpc_timeout``), and dropped only after."""

import threading
import time
import types

from vtpcm_nova.engine import service
from vtpcm_nova.engine.db import migration
from vtpcm_nova.engine.db.api import Database

TTL = 0.4  # renewed every 0.1 s


class _DrainingServer:
    """oslo.messaging's RPC server with one begin in flight at the stop."""

    def __init__(self, during_drain):  # noqa: ANN001 - a tiny fake
        self.during_drain = during_drain

    def stop(self) -> None:
        pass

    def wait(self) -> None:
        self.during_drain()


def _service(db: Database, server: _DrainingServer) -> service.EngineService:
    svc = service.EngineService.__new__(service.EngineService)
    svc._stop = threading.Event()
    svc._threads = []
    svc.db, svc.worker, svc.registrations, svc.server = db, "engine-1/aaaa", None, server
    # its background shreds stop after the drain (bounded)
    svc.coordinator = types.SimpleNamespace(stop_background=lambda timeout: None)
    svc.conf = types.SimpleNamespace(engine=types.SimpleNamespace(
        host="engine-1", worker_lease_ttl=TTL))
    return svc


def test_the_lease_is_renewed_while_the_rpc_server_drains_and_dropped_after(tmp_path) -> None:
    url = "sqlite:///%s" % (tmp_path / "engine.sqlite")
    migration.db_sync(url)
    db = Database(url)
    renewals: list[int] = []
    seen: dict[str, object] = {}

    def during_drain() -> None:  # the in-flight begin outlives the lease TTL
        before = len(renewals)
        time.sleep(TTL * 3)
        seen["renewed while draining"] = len(renewals) - before
        seen["live while draining"] = svc.worker in db.live_workers()

    svc = _service(db, _DrainingServer(during_drain))
    real_renew = svc._renew_lease

    def renew() -> None:
        renewals.append(1)
        real_renew()
    svc._renew_lease = renew  # type: ignore[method-assign]
    svc._start_lease()
    disposed = db.dispose
    db.dispose = lambda: None  # type: ignore[method-assign]  # read it after the stop
    svc.stop()
    assert seen["live while draining"] is True
    assert seen["renewed while draining"] >= 2
    assert svc.worker not in db.live_workers()  # deregistered after the drain
    assert not any(t.is_alive() for t in svc._threads)  # the renewal ended
    disposed()
