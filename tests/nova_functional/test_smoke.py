"""Smoke test: a LibvirtDriver subclass inside Nova 34.0.0's functional harness.

Run (from the repo root, after ``tools/install-nova-env.sh``):

    .venv-nova/bin/python -m pytest -q -p no:cacheprovider --timeout=300 tests/nova_functional

The main suite (``.venv``, no Nova) must not collect this directory: run it with
``--ignore=tests/nova_functional`` (without it, conftest.py collects nothing here).

What runs: real nova-api (wsgi-intercept), conductor, scheduler, placement and
two nova-compute services in one process on SQLite and the fake RPC transport,
native threads (see conftest.py). Each compute gets its own fake libvirt
connection (``nova.tests.fixtures.libvirt``); ``LibvirtMigrationMixin`` stubs
``Domain.migrateToURI3`` so that the "migration" defines the domain on the
destination's fake libvirt. ``nova.virt.driver.load_compute_driver`` is stubbed
to return our LibvirtDriver subclass (Nova loads drivers only as
``nova.virt.<name>``; precedent: nova/tests/functional/test_server_group.py).
"""

import sys
import threading
from typing import Any

import pytest
from nova import context as nova_context
from nova import exception, monkey_patch, objects
from nova.tests.functional.libvirt import base
from nova.virt.libvirt import driver as libvirt_driver

SRC = "src"
DEST = "dest"


class SmokeDriver(libvirt_driver.LibvirtDriver):
    """LibvirtDriver that records the hooks vtpcm overrides, then calls super()."""

    def __init__(self, virtapi: Any, calls: list[tuple[str | None, str, str]]) -> None:
        super().__init__(virtapi)
        self.calls = calls  # shared by every compute of a test: one global order
        self.hostname: str | None = None  # set by the test after start_compute
        self.refuse_destination: str | None = None

    def _record(self, method: str, instance: Any) -> None:
        # list.append is atomic; the hooks run in several threads.
        self.calls.append((self.hostname, method, instance.uuid))

    def spawn(self, context: Any, instance: Any, *args: Any, **kwargs: Any) -> Any:
        self._record("spawn", instance)
        return super().spawn(context, instance, *args, **kwargs)

    def check_can_live_migrate_destination(
        self, context: Any, instance: Any, *args: Any, **kwargs: Any
    ) -> Any:
        self._record("check_can_live_migrate_destination", instance)
        if self.refuse_destination:
            raise exception.MigrationPreCheckError(reason=self.refuse_destination)
        return super().check_can_live_migrate_destination(context, instance, *args, **kwargs)

    def live_migration(self, context: Any, instance: Any, *args: Any, **kwargs: Any) -> Any:
        self._record("live_migration", instance)
        return super().live_migration(context, instance, *args, **kwargs)

    def post_live_migration(self, context: Any, instance: Any, *args: Any, **kwargs: Any) -> Any:
        self._record("post_live_migration", instance)
        return super().post_live_migration(context, instance, *args, **kwargs)

    def destroy(self, context: Any, instance: Any, *args: Any, **kwargs: Any) -> Any:
        self._record("destroy", instance)
        return super().destroy(context, instance, *args, **kwargs)


def test_harness_runs_native_threads_without_eventlet() -> None:
    """conftest.py made Nova pick native threads; eventlet is not importable."""
    from oslo_service import backend

    assert backend.get_backend_type() == backend.BackendType.THREADING
    assert not monkey_patch.is_patched()
    assert sys.modules.get("eventlet") is None
    with pytest.raises(ImportError):
        __import__("eventlet")


class SmokeDriverLiveMigrationTest(base.LibvirtMigrationMixin, base.ServersTestBase):
    """Two computes running SmokeDriver; boot, live-migrate, delete."""

    # Casts stay casts (as in test_vtpm.py): closer to a real deployment.
    CAST_AS_CALL = False
    ADMIN_API = True
    # 2.25: block_migration='auto' (used by _live_migrate); 2.34: asynchronous
    # live-migration pre-checks; 2.84: instance action events carry 'details'.
    microversion = "2.84"

    def setUp(self) -> None:
        self.calls: list[tuple[str | None, str, str]] = []
        self.drivers: list[SmokeDriver] = []
        self._drivers_lock = threading.Lock()
        super().setUp()

        def load_compute_driver(virtapi: Any, compute_driver: Any = None) -> SmokeDriver:
            drv = SmokeDriver(virtapi, self.calls)
            with self._drivers_lock:
                self.drivers.append(drv)
            return drv

        self.stub_out("nova.virt.driver.load_compute_driver", load_compute_driver)

    def _start_smoke_compute(self, hostname: str) -> Any:
        self.start_compute(hostname=hostname)
        compute = self.computes[hostname]
        driver = compute.driver
        self.assertIsInstance(driver, SmokeDriver)
        driver.hostname = hostname
        return compute

    def _domains(self, compute: Any) -> list[str]:
        return [d.UUIDString() for d in compute.driver._host.list_instance_domains()]

    def _host_of(self, server: Any) -> str:
        ctx = nova_context.get_admin_context()
        return objects.Instance.get_by_uuid(ctx, server["id"]).host

    def _calls_for(self, server: Any) -> list[tuple[str | None, str]]:
        return [(h, m) for h, m, uuid in self.calls if uuid == server["id"]]

    def test_live_migration_calls_hooks_in_order(self) -> None:
        self.src = self._start_smoke_compute(SRC)
        self.server = self._create_server(networks="none", host=SRC)
        self.dest = self._start_smoke_compute(DEST)
        self.assertEqual(SRC, self.server["OS-EXT-SRV-ATTR:host"])
        self.assertEqual([self.server["id"]], self._domains(self.src))

        server = self._live_migrate(self.server, migration_expected_state="completed")

        self.assertTrue(self.migrate_stub_ran)
        self.assertEqual(DEST, server["OS-EXT-SRV-ATTR:host"])
        self.assertEqual(DEST, self._host_of(server))
        self.assertEqual([server["id"]], self._domains(self.dest))
        # (The fake source domain stays "running" after the stubbed migration:
        # fakelibvirt's complete_job() only flips the job type. Real libvirt
        # removes it; the upstream tests do not look at it either.)
        self.assertEqual(
            [
                (SRC, "spawn"),
                (DEST, "check_can_live_migrate_destination"),
                (SRC, "live_migration"),
                (SRC, "post_live_migration"),
            ],
            self._calls_for(server),
        )

        self._delete_server(server)
        self.assertEqual([], self._domains(self.dest))
        self.assertEqual((DEST, "destroy"), self._calls_for(server)[-1])
        self.assertEqual(5, len(self._calls_for(server)))

    def test_destination_precheck_refusal_keeps_server_on_source(self) -> None:
        self.src = self._start_smoke_compute(SRC)
        self.server = self._create_server(networks="none", host=SRC)
        self.dest = self._start_smoke_compute(DEST)
        self.dest.driver.refuse_destination = "vtpcm smoke: destination refused"

        # The conductor treats MigrationPreCheckError as "try another host";
        # there is none, so NoValidHost: migration 'error', server ACTIVE.
        server = self._live_migrate(
            self.server, migration_expected_state="error", server_expected_state="ACTIVE"
        )

        self.assertFalse(self.migrate_stub_ran)
        self.assertEqual(SRC, server["OS-EXT-SRV-ATTR:host"])
        self.assertEqual(SRC, self._host_of(server))
        self.assertEqual([server["id"]], self._domains(self.src))
        self.assertEqual([], self._domains(self.dest))
        self.assertEqual(
            [(SRC, "spawn"), (DEST, "check_can_live_migrate_destination")],
            self._calls_for(server),
        )
        event = self._wait_for_instance_action_event(
            server, "live-migration", "compute_check_can_live_migrate_destination", "Error"
        )
        self.assertIn("vtpcm smoke: destination refused", event["details"])

        self._delete_server(server)
        self.assertEqual([], self._domains(self.src))
        self.assertEqual((SRC, "destroy"), self._calls_for(server)[-1])
