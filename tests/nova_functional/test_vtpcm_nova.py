"""VTPCMLibvirtDriver and VTPCMFilter inside Nova 34's own functional harness,
with a real engine, real agents and real swtpm behind them.

Run: ``.venv-nova/bin/python -m pytest -q tests/nova_functional`` (after
``tools/install-nova-env.sh``). Nova's API, conductor, scheduler (with
VTPCMFilter) and compute code run in-process on Nova's fake libvirt; the
vTPCM services are the daemons of ``deployment.py``. Two things stand in for
what the fake libvirt lacks:

- its domains forget ``<tpm>`` in ``XMLDesc``: ``_KeepTPM`` keeps the
  element, so Nova's migration XML carries it and the driver's rewrite to the
  destination's socket runs on Nova's own XML;
- it runs no QEMU: where the harness stubs ``migrateToURI3``, the stub moves
  the TPM state the way QEMU's stream does at the switchover: the blobs as
  swtpm hands them out (encrypted under the migration key) from the source
  vTPCM's control socket into the socket the destination XML names.

Every case checks through Nova's API and through tpm2-pytss on the vTPCM.
"""

import secrets
import sys
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import fixtures
import nova.conf
import oslo_messaging
import pytest
from nova import context as nova_context
from nova import exception as nova_exception
from nova import objects
from nova.api import wsgi as nova_wsgi
from nova.tests.fixtures import libvirt as fakelibvirt
from nova.tests.functional.api import client as api_client
from nova.tests.functional.libvirt import base
from tpm2_pytss import ESYS_TR, TPM2_ALG, TPML_DIGEST_VALUES, TPMT_HA, TPMU_HA, TSS2_Exception

from tests import leakscan
from tests.functional import tpmtools
from tests.nova_functional import deployment as dep_mod
from vtpcm_agent.swtpm import ctrl
from vtpcm_common import authn, exception, rpc
from vtpcm_common.api.agent.rpcapi import AgentAPI
from vtpcm_lab import daemons
from vtpcm_lab.nova import configs
from vtpcm_nova import agentkeys
from vtpcm_nova.conf import api as api_conf
from vtpcm_nova.conf import compute as compute_conf
from vtpcm_nova.virt import driver as vdriver
from vtpcm_nova.virt import earlybegin, tpmxml

CONF = nova.conf.CONF
FILTER = "vtpcm_nova.scheduler.filters.vtpcm_filter.VTPCMFilter"
VTPCM_SPECS = {"vtpcm:enabled": "true"}

_DEPLOYMENT: dep_mod.Deployment | None = None
RECONCILE_S = 2


@pytest.fixture(scope="module", autouse=True)
def vtpcm_deployment() -> Any:
    global _DEPLOYMENT
    # the engine's periodic reaper ([nova] reap_interval, as often as the
    # reconcile) destroys shelved vTPCMs of deleted instances; the engine
    # requires nova-api's witnesses, which the real vtpcm_witness filter in
    # this Nova's paste pipeline (OSAPIFixture loads it) sends
    with dep_mod.deployment(reconcile_interval=RECONCILE_S, witness=True) as dep:
        _DEPLOYMENT = dep
        try:
            yield dep
        finally:
            _DEPLOYMENT = None


def _external_tpm_path(xml: str) -> str | None:
    sources = tpmxml.external_tpm_sources(ET.fromstring(xml))  # noqa: S314
    return sources[0].get("path") if sources else None


class _KeepTPM:
    """fakelibvirt's Domain keeps the ``<tpm>`` elements it was defined with."""

    def __init__(self) -> None:
        self.init = fakelibvirt.Domain.__init__
        self.xml_desc = fakelibvirt.Domain.XMLDesc

    def patched_init(self_, domain: Any, connection: Any, xml: str, *args: Any,
                     **kwargs: Any) -> None:
        self_.init(domain, connection, xml, *args, **kwargs)
        root = ET.fromstring(xml)  # noqa: S314 - XML the driver made
        domain._vtpcm_tpms = [ET.tostring(t, encoding="unicode")
                              for t in root.findall("devices/tpm")]

    def patched_xml_desc(self_, domain: Any, flags: int) -> str:
        xml = self_.xml_desc(domain, flags)
        tpms = getattr(domain, "_vtpcm_tpms", [])
        if not tpms or "</devices>" not in xml:
            return xml
        return xml.replace("</devices>", "".join(tpms) + "</devices>", 1)


class VTPCMNovaTest(base.LibvirtMigrationMixin, base.ServersTestBase):
    CAST_AS_CALL = False
    ADMIN_API = True
    microversion = "2.91"
    ADDITIONAL_FILTERS = ["VTPCMFilter"]

    def setUp(self) -> None:
        assert _DEPLOYMENT is not None
        self.dep = _DEPLOYMENT
        self.drivers: dict[str, vdriver.VTPCMLibvirtDriver] = {}
        self._next_host: str | None = None
        self.fail_migration: str | None = None
        self.engine_calls: list[tuple[str, Any]] = []
        # (method, first argument, calling thread, started, returned): monotonic
        self.engine_timeline: list[tuple[str, Any, str, float, float]] = []
        self.before_engine_call: dict[str, Any] = {}
        super().setUp()
        keep = _KeepTPM()
        self.useFixture(fixtures.MonkeyPatch(
            "nova.tests.fixtures.libvirt.Domain.__init__",
            lambda domain, *a, **k: keep.patched_init(domain, *a, **k)))
        self.useFixture(fixtures.MonkeyPatch(
            "nova.tests.fixtures.libvirt.Domain.XMLDesc",
            lambda domain, flags=0: keep.patched_xml_desc(domain, flags)))
        self.stub_out("nova.virt.driver.load_compute_driver", self._load_driver)
        # the engine asks this test's Nova API (real code, over a real port)
        self.dep.nova.app = nova_wsgi.Loader().load_app("osapi_compute")
        self.addCleanup(setattr, self.dep.nova, "app", None)
        self.names = list(self.dep.hosts)
        flavor = self._create_flavor(name="vtpcm.small", extra_spec=dict(VTPCM_SPECS))
        self.vtpcm_flavor = flavor
        self.plain_flavor = self._create_flavor(name="plain.small")

    # --- wiring --------------------------------------------------------------------
    def _configure(self) -> None:
        compute_conf.register_opts(CONF)
        rpc.register_rpc_opts(CONF)
        self.flags(transport_url=daemons.TRANSPORT_URL, control_exchange=self.dep.exchange,
                   verdict_cache_seconds=0, scheduler_timeout=3, engine_timeout=60,
                   agent_timeout=10, trait_refresh_seconds=0,
                   socket_dirs=[str(h.run_dir) for h in self.dep.hosts.values()],
                   engine_public_key=str(self._engine_public_key()), group="vtpcm")
        for option, value in daemons.topics(self.dep.exchange).items():
            self.flags(**{option: value}, group="vtpcm_rpc")
        self._configure_witness()

    def _configure_witness(self) -> None:
        """nova-api's pipeline with the vtpcm_witness filter after
        keystonecontext (as the lab and the operator guide put it) and the
        deployment's witness key: OSAPIFixture loads Nova's paste config."""
        api_conf.register_opts(CONF)
        stock = Path(CONF.find_file(CONF.wsgi.api_paste_config)
                     or CONF.wsgi.api_paste_config).read_text()
        paste = Path(self.useFixture(fixtures.TempDir()).path) / "api-paste.ini"
        paste.write_text(configs.paste_with_witness(stock))
        self.flags(api_paste_config=str(paste), group="wsgi")
        assert self.dep.witness_key is not None
        self.flags(api_witness_key_file=str(self.dep.witness_key), group="vtpcm")

    def _engine_public_key(self) -> Any:
        """[vtpcm] engine_public_key: the engine key the agents pin too."""
        return authn.public_key_path(daemons.signing_key_path(self.dep.exchange))

    def _setup_scheduler_service(self) -> Any:
        self._configure()
        self.flags(available_filters=["nova.scheduler.filters.all_filters", FILTER],
                   group="filter_scheduler")
        return super()._setup_scheduler_service()

    def _load_driver(self, virtapi: Any, compute_driver: Any = None) -> Any:
        host = self._next_host
        assert host is not None
        drv = vdriver.VTPCMLibvirtDriver(virtapi)
        # the one key the driver holds: this host's command key
        recording = RecordingEngine(self.dep.engine_at(host), self.engine_calls,
                                    self.before_engine_call, self.engine_timeline)
        drv._engine = lambda: recording
        # agent replies verified as clients.agent_reader does: this host's
        # key for its own agent, the engine's signed record for the others
        own = authn.load_host_key(self.dep.hosts[host].command_key).public_key
        engine_key = authn.load_public_key(self._engine_public_key())
        drv._agents = AgentAPI(self.dep.conf, self.dep.operator.transport, timeout=10,
                               signer=None, reply_keys=agentkeys.EngineReportedKeys(
                                   host, own, self.dep.engine_at(host), engine_key))
        self.drivers[host] = drv
        return drv

    def start_compute(self, hostname: str = "compute1", **kwargs: Any) -> Any:
        self._next_host = hostname
        try:
            return super().start_compute(hostname=hostname, **kwargs)
        finally:
            self._next_host = None

    def _start_hosts(self, count: int) -> list[str]:
        names = self.names[:count]
        for name in names:
            self.start_compute(hostname=name)
        return names

    # --- QEMU's part of the migration -------------------------------------------------
    def _migrate_stub(self, domain: Any, destination: str, params: Any, flags: int) -> None:
        dest_host = urlparse(destination).hostname
        xml = params["destination_xml"]
        instance = domain.UUIDString()
        dest_socket = _external_tpm_path(xml)
        if dest_socket is not None:
            src_host = objects.Instance.get_by_uuid(nova_context.get_admin_context(),
                                                    instance).host
            src_socket = self.dep.agents.get(src_host, instance).ctrl_socket
            state = ctrl.export_state(src_socket)  # encrypted under the migration key
            # as QEMU's incoming side: SET_STATEBLOB then INIT on the empty,
            # never initialized swtpm (an INIT first would manufacture a TPM,
            # whose state the agent then captures as the first write after
            # the import, and the engine's post-import check refuses)
            ctrl.import_state(dest_socket, state, empty_target=True)
        self.computes[dest_host].driver._host.get_connection().createXML(
            xml, "fake-createXML-doesnt-care-about-flags")
        if self.fail_migration:
            # fails after the device state reached the destination: the
            # worst moment for the vTPCM (a copy on each side)
            domain.fail_job()
            return
        domain.complete_job()
        self.migrate_stub_ran = True

    # --- patience: real swtpm processes behind Nova's 5-second waits ----------------------
    # Nova's helpers give up after ~10 polls of 0.5 s; creating a vTPCM
    # (swtpm_setup with an EK and certificates) alone takes 1-2 s, and much
    # more on a loaded CI machine. Same checks, a bounded longer wait.
    WAIT_S = 120.0

    def _patiently(self, wait: Any, *args: Any, **kwargs: Any) -> Any:
        deadline = time.monotonic() + self.WAIT_S
        while True:
            try:
                return wait(*args, **kwargs)
            except AssertionError:
                if time.monotonic() > deadline:
                    raise

    def _wait_for_server_parameter(self, server: Any, expected_params: Any,
                                   max_retries: int = 10, **kwargs: Any) -> Any:
        return self._patiently(super()._wait_for_server_parameter, server,
                               expected_params, max_retries, **kwargs)

    def _wait_for_migration_status(self, server: Any, expected_statuses: Any) -> Any:
        return self._patiently(super()._wait_for_migration_status, server,
                               expected_statuses)

    def _wait_for_instance_action_event(self, *args: Any, **kwargs: Any) -> Any:
        return self._patiently(super()._wait_for_instance_action_event, *args, **kwargs)

    # --- helpers -----------------------------------------------------------------------
    def _boot(self, host: str | None = None, flavor: str | None = None,
              expected_state: str = "ACTIVE") -> dict[str, Any]:
        return self._create_server(flavor_id=flavor or self.vtpcm_flavor, networks="none",
                                   host=host, expected_state=expected_state,
                                   api=self.admin_api)

    def _tpm(self, host: str, instance: str) -> dict[str, bytes]:
        return tpmtools.read_guest_state(self.dep.hosts[host].data_paths(instance),
                                         with_key=False)

    def _write_tpm(self, host: str, instance: str) -> dict[str, bytes]:
        tpmtools.write_guest_state(self.dep.hosts[host].data_paths(instance),
                                   secrets.token_bytes(32), secrets.token_bytes(32),
                                   make_key=False)
        return self._tpm(host, instance)

    def _host_of(self, server: dict[str, Any]) -> str:
        return str(self.admin_api.get_server(server["id"])["OS-EXT-SRV-ATTR:host"])

    def _domain_xml(self, host: str, instance: str) -> str:
        conn = self.computes[host].driver._host.get_connection()
        return str(conn.lookupByUUIDString(instance).XMLDesc(0))

    def _untrusted(self) -> str:
        """The third host, made UNTRUSTED for the rest of the module (PCRs
        cannot be taken back without a reboot of its TPM)."""
        name = self.names[2]
        self.dep.hosts[name].untrust()
        self.assertEqual("UNTRUSTED", self.dep.operator.attest(name).status)
        return name

    def _migrations(self, instance: str) -> list[dict[str, Any]]:
        return [m for m in self.admin_api.get_migrations()
                if m["instance_uuid"] == instance]

    def _audit(self, instance: str, event: str) -> list[Any]:
        return [e for e in self.dep.operator.list_audit(limit=500).entries
                if e.instance == instance and e.event == event]

    # --- cases -------------------------------------------------------------------------
    def test_boot_gives_a_vtpcm_and_a_plain_flavor_is_untouched(self) -> None:
        a, = self._start_hosts(1)
        server = self._boot(host=a)
        instance = server["id"]
        rec = self.dep.operator.get_vtpcm(instance)
        self.assertEqual((a, 0), (rec.host, rec.generation))
        info = self.dep.agents.get(a, instance)
        self.assertTrue(info.running)
        self.assertEqual(info.ctrl_socket, _external_tpm_path(self._domain_xml(a, instance)))
        tpms = ET.fromstring(self._domain_xml(a, instance)).findall("devices/tpm")  # noqa: S314
        self.assertEqual([("tpm-crb", "external")],
                         [(t.get("model"), t.find("backend").get("type")) for t in tpms])
        self._write_tpm(a, instance)  # the guest's TPM answers
        # the host reports it can run vTPCMs: agent healthy, host APPROVED
        self.computes[a].manager.update_available_resource(nova_context.get_admin_context())
        self.assertIn("CUSTOM_VTPCM",
                      self._get_provider_traits(self._get_provider_uuid_by_host(a)))

        self.assertIn(("create_vtpcm", instance), self.engine_calls)
        plain = self._boot(host=a, flavor=self.plain_flavor)
        self.assertIsNone(_external_tpm_path(self._domain_xml(a, plain["id"])))
        self._delete_server(plain)
        self.assertEqual([], [c for c in self.engine_calls if c[1] == plain["id"]])
        with pytest.raises(exception.NotFound):
            self.dep.operator.get_vtpcm(plain["id"])

    def test_live_migration_moves_the_tpm_state_to_a_trusted_host(self) -> None:
        a, b = self._start_hosts(2)
        server = self._boot(host=a)
        instance = server["id"]
        before = self._write_tpm(a, instance)
        src_state = self.dep.hosts[a].state_dir / "vtpcms" / \
            self.dep.agents.get(a, instance).vtpcm_id

        server = self._live_migrate(server)  # no host: the scheduler picks

        self.assertTrue(self.migrate_stub_ran)
        self.assertEqual(b, self._host_of(server))
        self.assertEqual(before, self._tpm(b, instance))
        rec = self.dep.operator.get_vtpcm(instance)
        self.assertEqual((b, 1, None), (rec.host, rec.generation, rec.migration_id))
        self.assertIsNone(self.dep.vtpcm_on(a, instance))
        self.assertFalse(src_state.exists())
        mig = self.dep.operator.get_migration(self._migrations(instance)[0]["uuid"])
        self.assertEqual("COMMITTED", mig.state)  # Nova's migration uuid is the protocol's

        # and back, through the rewrite to a's socket again
        server = self._live_migrate(server, host=a)
        self.assertEqual(a, self._host_of(server))
        self.assertEqual(before, self._tpm(a, instance))
        self.assertEqual(2, self.dep.operator.get_vtpcm(instance).generation)

    def test_untrusted_destination_is_refused_and_nothing_moves(self) -> None:
        a = self.names[0]
        self.start_compute(hostname=a)
        server = self._boot(host=a)
        instance = server["id"]
        before = self._write_tpm(a, instance)
        c = self._untrusted()
        self.start_compute(hostname=c)

        # requested host: the scheduler (VTPCMFilter) leaves no valid host
        server = self._live_migrate(server, host=c, migration_expected_state="error",
                                    server_expected_state="ACTIVE")
        # forced host (2.30-2.67): no scheduler; the driver's gate on the
        # destination refuses with the verdict's reason
        self.admin_api.microversion = "2.67"
        try:
            self.admin_api.post_server_action(instance, {"os-migrateLive": {
                "host": c, "block_migration": "auto", "force": True}})
        finally:
            self.admin_api.microversion = self.microversion
        self._wait_for_migration_status(server, ["error"])
        event = self._wait_for_instance_action_event(
            server, "live-migration", "compute_check_can_live_migrate_destination", "Error")
        self.assertIn("is not trusted", event["details"])
        server = self._wait_for_state_change(server, "ACTIVE")

        self.assertFalse(self.migrate_stub_ran)
        self.assertEqual(a, self._host_of(server))
        self.assertEqual(before, self._tpm(a, instance))
        rec = self.dep.operator.get_vtpcm(instance)
        self.assertEqual((a, 0, None), (rec.host, rec.generation, rec.migration_id))
        self.assertIsNone(self.dep.vtpcm_on(c, instance))
        refused = self._audit(instance, "migration.check_destination")
        self.assertEqual(["refused"], [e.outcome for e in refused])

    def test_scheduler_places_vtpcm_instances_on_trusted_hosts_only(self) -> None:
        a = self.names[0]
        c = self._untrusted()
        for name in (a, c):
            self.start_compute(hostname=name)
        for _ in range(3):
            server = self._boot()
            self.assertEqual(a, self._host_of(server))
            self._delete_server(server)
        # requested onto the untrusted host: the filter leaves no valid host
        server = self._boot(host=c, expected_state="ERROR")
        self.assertIn("No valid host", server["fault"]["message"])
        # a plain flavor may still go there
        plain = self._boot(host=c, flavor=self.plain_flavor)
        self.assertEqual(c, self._host_of(plain))

    def test_engine_unreachable_fails_vtpcm_requests_closed_only(self) -> None:
        self._start_hosts(1)
        self.flags(engine_topic="vtpcm-nobody-listens", group="vtpcm_rpc")
        for flt in self.scheduler.manager.host_manager.enabled_filters:
            if type(flt).__name__ == "VTPCMFilter":
                flt._cache = None  # rebuilt from the new topic
        server = self._boot(expected_state="ERROR")
        self.assertIn("No valid host", server["fault"]["message"])
        plain = self._boot(flavor=self.plain_flavor)
        self.assertEqual("ACTIVE", plain["status"])

    def test_libvirt_failure_rolls_back_and_a_retry_succeeds(self) -> None:
        a, b = self._start_hosts(2)
        server = self._boot(host=a)
        instance = server["id"]
        before = self._write_tpm(a, instance)
        self.fail_migration = "injected failure in the middle of the migration"
        server = self._live_migrate(server, host=b, migration_expected_state="failed",
                                    server_expected_state="ACTIVE")
        failed = self._migrations(instance)[0]["uuid"]
        # the rollback on the destination is a cast: wait for the engine's view
        daemons.wait_for("abort of %s" % failed,
                         lambda: self.dep.operator.get_migration(failed).state == "ABORTED",
                         timeout=60)
        self.assertEqual(a, self._host_of(server))
        self.assertEqual(before, self._tpm(a, instance))
        rec = self.dep.operator.get_vtpcm(instance)
        self.assertEqual((a, 0, None), (rec.host, rec.generation, rec.migration_id))
        self.assertIsNone(self.dep.vtpcm_on(b, instance))

        self.fail_migration = None
        # fakelibvirt keeps the failed job on the domain; libvirt starts afresh
        self.computes[a].driver._host.get_connection().lookupByUUIDString(
            instance)._job_type = fakelibvirt.VIR_DOMAIN_JOB_NONE
        server = self._live_migrate(server, host=b)
        self.assertEqual(b, self._host_of(server))
        self.assertEqual(before, self._tpm(b, instance))

    # --- the begin started early, at the source's check ---------------------------------
    def _fail_destinations_after_the_source_check(self, times: int) -> list[str]:
        """The first ``times`` destination checks fail after the source's
        check (as a claim or port binding would), each once the source's
        early begin to that host is PREPARED (the hard case); the conductor
        then tries another host with the same Nova migration."""
        failed: list[str] = []
        original = vdriver.VTPCMLibvirtDriver.check_source_migrate_data_at_dest
        test = self

        def check(drv: Any, ctxt: Any, instance: Any, migrate_data: Any, migration: Any,
                  limits: Any, allocs: Any) -> Any:
            if len(failed) >= times:
                return original(drv, ctxt, instance, migrate_data, migration, limits, allocs)
            failed.append(drv.vtpcm_host)
            try:
                daemons.wait_for("early begin to %s" % drv.vtpcm_host, lambda: (
                    test.dep.operator.get_migration(migration.uuid).state == "PREPARED"
                    and test.dep.operator.get_migration(migration.uuid).dest
                    == drv.vtpcm_host), timeout=30)
            except Exception as err:  # noqa: BLE001 - the test's assertions say why
                failed.append("no early begin: %s" % err)
            raise nova_exception.MigrationPreCheckError(reason="injected after the source check")
        self.useFixture(fixtures.MonkeyPatch(
            "vtpcm_nova.virt.driver.VTPCMLibvirtDriver.check_source_migrate_data_at_dest",
            check))
        return failed

    def test_early_begin_finishes_before_live_migration_starts_libvirt(self) -> None:
        a, b = self._start_hosts(2)
        server = self._boot(host=a)
        instance = server["id"]
        before = self._write_tpm(a, instance)
        server = self._live_migrate(server, host=b)
        self.assertEqual(b, self._host_of(server))
        self.assertEqual(before, self._tpm(b, instance))
        nova_id = self._migrations(instance)[0]["uuid"]
        self.assertEqual("COMMITTED", self.dep.operator.get_migration(nova_id).state)
        begins = [t for t in self.engine_timeline if t[0] == "begin" and t[1] == nova_id]
        # the early begin, in its own thread, answered before live_migration
        # began (again: PREPARED, one round trip) and libvirt started
        self.assertEqual(2, len(begins), begins)
        early, joined = begins
        self.assertTrue(early[2].startswith("vtpcm-early-begin-"), early)
        self.assertFalse(joined[2].startswith("vtpcm-early-begin-"), joined)
        self.assertLessEqual(early[4], joined[3])

    def test_no_early_begin_for_a_migration_that_would_wait_in_the_queue(self) -> None:
        """With max_concurrent_live_migrations under way from the source, the
        migration would queue: live_migration begins when its turn comes,
        under Nova's uuid; nothing holds the destination meanwhile."""
        self._no_early_begin_behind("running")

    def test_no_early_begin_behind_another_migration_in_its_checks(self) -> None:
        """Review round 2, LOW/MEDIUM: a host evacuation runs every check
        within a second or two, while the others are still "accepted"
        (none queued yet): those count as well."""
        self._no_early_begin_behind("accepted")

    def _no_early_begin_behind(self, status: str) -> None:
        a, b = self._start_hosts(2)
        self.flags(max_concurrent_live_migrations=1)
        server = self._boot(host=a)
        instance = server["id"]
        before = self._write_tpm(a, instance)
        ctxt = nova_context.get_admin_context()
        other = objects.Migration(ctxt, source_compute=a, dest_compute="elsewhere",
                                  migration_type="live-migration", status=status,
                                  instance_uuid=str(uuid.uuid4()), project_id="p",
                                  user_id="u")
        other.create()
        server = self._live_migrate(server, host=b)
        self.assertEqual(b, self._host_of(server))
        self.assertEqual(before, self._tpm(b, instance))
        nova_id = self._migrations(instance)[0]["uuid"]
        self.assertEqual("COMMITTED", self.dep.operator.get_migration(nova_id).state)
        begins = [t for t in self.engine_timeline if t[0] == "begin" and t[1] == nova_id]
        self.assertEqual(1, len(begins), begins)
        self.assertFalse(begins[0][2].startswith("vtpcm-early-begin-"), begins)

    def test_a_conductor_blip_in_the_queue_check_costs_only_the_early_begin(self) -> None:
        """Review round 3, L2: the source's check counts this host's live
        migrations through the conductor; a failed count (a messaging
        timeout) begins nothing early and the migration goes on, begun by
        live_migration, with a WARNING naming only the error's class."""
        a, b = self._start_hosts(2)
        self.flags(max_concurrent_live_migrations=1)
        server = self._boot(host=a)
        instance = server["id"]
        before = self._write_tpm(a, instance)
        original = objects.MigrationList.get_by_filters
        counted: list[str] = []

        # a classmethod again once patched in (fixtures.MonkeyPatch)
        def get_by_filters(cls: Any, context: Any, filters: Any, *args: Any,
                           **kwargs: Any) -> Any:
            if sys._getframe(1).f_code.co_name == "_queued_behind":
                counted.append(filters["source_compute"])
                raise oslo_messaging.MessagingTimeout("no reply from the conductor: secret-ish")
            return original(context, filters, *args, **kwargs)
        self.useFixture(fixtures.MonkeyPatch(
            "nova.objects.MigrationList.get_by_filters", get_by_filters))
        server = self._live_migrate(server, host=b)
        self.assertEqual([a], counted)  # control: the count was asked for, and failed
        self.assertEqual(b, self._host_of(server))
        self.assertEqual(before, self._tpm(b, instance))
        nova_id = self._migrations(instance)[0]["uuid"]
        self.assertEqual("COMMITTED", self.dep.operator.get_migration(nova_id).state)
        begins = [t for t in self.engine_timeline if t[0] == "begin" and t[1] == nova_id]
        self.assertEqual(1, len(begins), begins)
        self.assertFalse(begins[0][2].startswith("vtpcm-early-begin-"), begins)
        output = self.stdlog.logger.output
        self.assertIn("could not be counted (MessagingTimeout); no early begin", output)
        self.assertNotIn("secret-ish", output)

    def test_early_begin_to_a_failed_destination_lets_the_retry_to_another_succeed(
            self) -> None:
        names = self._start_hosts(3)
        a = names[0]
        for name in names[1:]:
            # alphabetical test order runs this before the cases that untrust c
            self.assertEqual("TRUSTED", self.dep.operator.attest(name).status, name)
        server = self._boot(host=a)
        instance = server["id"]
        before = self._write_tpm(a, instance)
        failed = self._fail_destinations_after_the_source_check(1)

        server = self._live_migrate(server)  # the scheduler picks; the conductor retries

        self.assertEqual(1, len(failed), failed)
        final = self._host_of(server)
        self.assertNotIn(final, (a, failed[0]))
        self.assertEqual(before, self._tpm(final, instance))
        nova_id = self._migrations(instance)[0]["uuid"]
        first = self.dep.operator.get_migration(nova_id)
        self.assertEqual(("ABORTED", failed[0]), (first.state, first.dest))
        retried = self.dep.operator.get_migration(earlybegin.attempt_id(nova_id, final, 1))
        self.assertEqual(("COMMITTED", final), (retried.state, retried.dest))
        rec = self.dep.operator.get_vtpcm(instance)
        self.assertEqual((final, 1, None), (rec.host, rec.generation, rec.migration_id))
        self.assertIsNone(self.dep.vtpcm_on(failed[0], instance))

    def test_an_early_begin_nobody_takes_over_is_aborted_when_nova_gives_up(self) -> None:
        a, b = self._start_hosts(2)
        self.flags(early_begin_timeout=600, group="vtpcm")  # Nova's status decides
        server = self._boot(host=a)
        instance = server["id"]
        before = self._write_tpm(a, instance)
        failed = self._fail_destinations_after_the_source_check(1)
        started = time.monotonic()
        server = self._live_migrate(server, migration_expected_state="error",
                                    server_expected_state="ACTIVE")
        self.assertEqual([b], failed)
        nova_id = self._migrations(instance)[0]["uuid"]
        daemons.wait_for("abort of the early begin", lambda: (
            self.dep.operator.get_migration(nova_id).state == "ABORTED"), timeout=30)
        self.assertLess(time.monotonic() - started, 120)
        self.assertIn("early begin", self.dep.operator.get_migration(nova_id).error or "")
        rec = self.dep.operator.get_vtpcm(instance)
        self.assertEqual((a, 0, None), (rec.host, rec.generation, rec.migration_id))
        self.assertIsNone(self.dep.vtpcm_on(b, instance))
        self.assertEqual(before, self._tpm(a, instance))
        self.assertEqual(a, self._host_of(server))

    def test_refused_begin_rolls_back_and_the_server_stays_active(self) -> None:
        a, b = self._start_hosts(2)
        server = self._boot(host=a)
        instance = server["id"]
        before = self._write_tpm(a, instance)
        # the operator revokes b after the destination check, before begin
        self.before_engine_call["begin"] = lambda: self.dep.operator.revoke_host(b)
        try:
            server = self._live_migrate(server, host=b, migration_expected_state="failed",
                                        server_expected_state="ACTIVE")
            self.assertEqual(a, self._host_of(server))
            self.assertFalse(self.migrate_stub_ran)
            self.assertEqual(before, self._tpm(a, instance))
            rec = self.dep.operator.get_vtpcm(instance)
            self.assertEqual((a, 0, None), (rec.host, rec.generation, rec.migration_id))
            self.assertIsNone(self.dep.vtpcm_on(b, instance))
            nova_id = self._migrations(instance)[0]["uuid"]
            mig = self.dep.operator.get_migration(nova_id)
            self.assertEqual("REFUSED", mig.state)
            # the early begin under Nova's uuid and live_migration's under
            # the next one were refused, each aborted by begin itself (and
            # the second by the rollback): never taken over by this host
            retried = earlybegin.attempt_id(nova_id, b, 1)
            self.assertEqual("REFUSED", self.dep.operator.get_migration(retried).state)
            self.assertEqual([nova_id, retried],
                             list(self.computes[a].driver._early._aborted))
            # a revoked host no longer reports the trait
            self.computes[b].manager.update_available_resource(
                nova_context.get_admin_context())
            self.assertNotIn("CUSTOM_VTPCM",
                             self._get_provider_traits(self._get_provider_uuid_by_host(b)))
        finally:
            self.dep.operator.enroll(b)
            self.dep.operator.assign_policy(b, dep_mod.GOLDEN)
            self.assertEqual("TRUSTED", self.dep.operator.attest(b).status)

    # --- cold migration and resize (fakelibvirt moves no disks: Nova's own
    # functional tests stub LibvirtDriver.migrate_disk_and_power_off, which
    # the driver calls after moving the vTPCM) --------------------------------------------
    def _stub_disk_move(self) -> None:
        self.useFixture(fixtures.MockPatch(
            "nova.virt.libvirt.driver.LibvirtDriver.migrate_disk_and_power_off",
            return_value="{}"))

    def test_cold_migration_moves_the_tpm_state_and_confirm_commits(self) -> None:
        self._stub_disk_move()
        a, b = self._start_hosts(2)
        server = self._boot(host=a)
        instance = server["id"]
        before = self._write_tpm(a, instance)
        src_id = self.dep.agents.get(a, instance).vtpcm_id
        src_state = self.dep.hosts[a].state_dir / "vtpcms" / src_id
        src_keys = list((self.dep.hosts[a].state_dir / "keys").glob(src_id + "*"))

        self.admin_api.post_server_action(instance, {"migrate": {"host": b}})
        server = self._wait_for_state_change(server, "VERIFY_RESIZE")
        mid = self._migrations(instance)[0]["uuid"]
        self.assertEqual("TRANSFERRED", self.dep.operator.get_migration(mid).state)
        # the resized guest runs on b's incoming vTPCM; a keeps its copy for a revert
        incoming = self.dep.agents.get(b, instance)
        self.assertEqual(("MIGRATING_IN", mid, True),
                         (incoming.state, incoming.migration_id, incoming.running))
        self.assertEqual(incoming.ctrl_socket, _external_tpm_path(self._domain_xml(b, instance)))
        self.assertEqual(before, self._tpm(b, instance))
        self.assertEqual("MIGRATING_OUT", self.dep.agents.get(a, instance).state)

        self.admin_api.post_server_action(instance, {"confirmResize": None})
        server = self._wait_for_state_change(server, "ACTIVE")
        self.assertEqual(b, self._host_of(server))
        self.assertEqual("COMMITTED", self.dep.operator.get_migration(mid).state)
        rec = self.dep.operator.get_vtpcm(instance)
        self.assertEqual((b, 1, None), (rec.host, rec.generation, rec.migration_id))
        self.assertEqual(before, self._tpm(b, instance))
        self.assertIsNone(self.dep.vtpcm_on(a, instance))
        self.assertFalse(src_state.exists())
        self.assertTrue(src_keys)
        self.assertEqual([], [k for k in src_keys if k.exists()])

    def test_resize_then_revert_restores_the_source_unchanged(self) -> None:
        self._stub_disk_move()
        a, b = self._start_hosts(2)
        bigger = self._create_flavor(name="vtpcm.big", memory_mb=4096,
                                     extra_spec=dict(VTPCM_SPECS))
        server = self._boot(host=a)
        instance = server["id"]
        before = self._write_tpm(a, instance)

        self.admin_api.post_server_action(instance, {"resize": {"flavorRef": bigger}})
        server = self._wait_for_state_change(server, "VERIFY_RESIZE")
        self.assertEqual(b, self._host_of(server))  # no resize to the same host
        mid = self._migrations(instance)[0]["uuid"]
        self.assertEqual(before, self._tpm(b, instance))
        with tpmtools.esapi(self.dep.hosts[b].data_paths(instance)) as esys:
            esys.pcr_extend(ESYS_TR.PCR16, TPML_DIGEST_VALUES([TPMT_HA(
                hashAlg=TPM2_ALG.SHA256, digest=TPMU_HA(sha256=b"\x5a" * 32))]))
        # the resized guest used its TPM
        self.assertNotEqual(before["pcr16"], self._tpm(b, instance)["pcr16"])

        self.admin_api.post_server_action(instance, {"revertResize": None})
        server = self._wait_for_state_change(server, "ACTIVE")
        self._wait_for_migration_status(server, ["reverted"])
        self.assertEqual(a, self._host_of(server))
        self.assertEqual("ABORTED", self.dep.operator.get_migration(mid).state)
        rec = self.dep.operator.get_vtpcm(instance)
        self.assertEqual((a, 0, None), (rec.host, rec.generation, rec.migration_id))
        self.assertEqual(before, self._tpm(a, instance))  # b's changes are gone with b's copy
        self.assertIsNone(self.dep.vtpcm_on(b, instance))
        self.assertEqual(self.dep.agents.get(a, instance).ctrl_socket,
                         _external_tpm_path(self._domain_xml(a, instance)))

    def test_a_resize_on_the_same_host_keeps_the_vtpcm(self) -> None:
        self._stub_disk_move()
        self.flags(allow_resize_to_same_host=True)
        a, = self._start_hosts(1)
        bigger = self._create_flavor(name="vtpcm.same", memory_mb=4096,
                                     extra_spec=dict(VTPCM_SPECS))
        server = self._boot(host=a)
        instance = server["id"]
        before = self._write_tpm(a, instance)
        old = self.dep.operator.get_vtpcm(instance)
        self.admin_api.post_server_action(instance, {"resize": {"flavorRef": bigger}})
        server = self._wait_for_state_change(server, "VERIFY_RESIZE")
        self.admin_api.post_server_action(instance, {"confirmResize": None})
        server = self._wait_for_state_change(server, "ACTIVE")
        self.assertEqual(a, self._host_of(server))
        self.assertEqual(old, self.dep.operator.get_vtpcm(instance))  # no migration
        self.assertEqual(before, self._tpm(a, instance))
        called = {c[0] for c in self.engine_calls}
        self.assertFalse(called & {"begin", "transfer_state", "commit", "abort"}, called)

    def test_a_refused_cold_migration_rolls_back_and_restarts_the_guest(self) -> None:
        self._stub_disk_move()
        a, b = self._start_hosts(2)
        server = self._boot(host=a)
        instance = server["id"]
        before = self._write_tpm(a, instance)
        # the operator revokes b after scheduling, before begin
        self.before_engine_call["begin"] = lambda: self.dep.operator.revoke_host(b)
        try:
            self.admin_api.post_server_action(instance, {"migrate": {"host": b}})
            self._wait_for_migration_status(server, ["error"])
            server = self._wait_for_state_change(server, "ACTIVE")
            event = self._wait_for_instance_action_event(
                server, "migrate", "compute_resize_instance", "Error")
            self.assertIn("vTPCM: cold migration to %s refused" % b, event["details"])
            self.assertEqual(a, self._host_of(server))
            self.assertEqual(before, self._tpm(a, instance))
            rec = self.dep.operator.get_vtpcm(instance)
            self.assertEqual((a, 0, None), (rec.host, rec.generation, rec.migration_id))
            self.assertIsNone(self.dep.vtpcm_on(b, instance))
            # the guest was started again on its vTPCM
            self.assertEqual(self.dep.agents.get(a, instance).ctrl_socket,
                             _external_tpm_path(self._domain_xml(a, instance)))
        finally:
            self.dep.operator.enroll(b)
            self.dep.operator.assign_policy(b, dep_mod.GOLDEN)
            self.assertEqual("TRUSTED", self.dep.operator.attest(b).status)

    def test_evacuation_is_refused_unless_the_operator_allows_a_fresh_vtpcm(self) -> None:
        a, b = self._start_hosts(2)
        server = self._boot(host=a)
        instance = server["id"]
        self._write_tpm(a, instance)
        old = self.dep.operator.get_vtpcm(instance)
        self.computes[a].stop()
        self.admin_api.put_service(self.computes[a].service_ref.uuid, {"forced_down": True})

        def evacuate(expected: str) -> dict[str, Any]:
            self.admin_api.post_server_action(instance, {"evacuate": {}})
            return self._wait_for_state_change(server, expected)

        # default: refused, the fault says why, nothing changes
        server = evacuate("ERROR")
        self.assertIn("evacuate is refused for vTPCM instances", server["fault"]["message"])
        self.assertEqual(old, self.dep.operator.get_vtpcm(instance))
        self.assertIsNone(self.dep.vtpcm_on(b, instance))

        # allowed by the operator, but the holder is not revoked (a silent
        # agent is no operator decision): refused, nothing changes
        self.flags(evacuate_with_fresh_vtpcm=True, group="vtpcm")
        agent_a = self.dep.hosts[a].agent
        agent_a.stop()
        try:
            server = evacuate("ERROR")
        finally:
            agent_a.start()
            agent_a.wait_ready(self.dep.agents)
        self.assertIn("needs the failed host revoked first", server["fault"]["message"])
        self.assertEqual(old, self.dep.operator.get_vtpcm(instance))

        # the operator revokes the failed host: a fresh vTPCM on b, audited as state loss
        self.dep.operator.revoke_host(a)
        try:
            server = evacuate("ACTIVE")
            self.assertEqual(b, self._host_of(server))
            rec = self.dep.operator.get_vtpcm(instance)
            self.assertEqual(b, rec.host)
            self.assertNotEqual(old.vtpcm_id, rec.vtpcm_id)
            self.assertEqual(rec.vtpcm_id, self.dep.agents.get(b, instance).vtpcm_id)
            with self.assertRaisesRegex(TSS2_Exception, "handle"):  # fresh TPM: no NV index
                self._tpm(b, instance)
            self.assertEqual(["refused", "state lost"],
                             sorted(e.outcome for e in self._audit(instance,
                                                                   "vtpcm.evacuate")))
            # the old copy is never started again through the engine
            with pytest.raises(exception.CommandRefused):
                self.dep.engine_at(a).start_vtpcm(instance)
        finally:
            self.dep.operator.enroll(a)
            self.dep.operator.assign_policy(a, dep_mod.GOLDEN)
            self.assertEqual("TRUSTED", self.dep.operator.attest(a).status)

    def test_shelve_offload_then_unshelve_on_another_host_moves_the_vtpcm(self) -> None:
        a, b = self._start_hosts(2)
        server = self._boot(host=a)
        instance = server["id"]
        before = self._write_tpm(a, instance)
        src_id = self.dep.agents.get(a, instance).vtpcm_id
        src_state = self.dep.hosts[a].state_dir / "vtpcms" / src_id
        self.admin_api.post_server_action(instance, {"shelve": {}})
        server = self._wait_for_state_change(server, "SHELVED_OFFLOADED")
        # the offload stopped the guest and its vTPCM; the encrypted state
        # stays on a, and the engine records the holder's consent to a move
        rec = self.dep.operator.get_vtpcm(instance)
        self.assertEqual((a, 0, "SHELVED"), (rec.host, rec.generation, rec.state))
        self.assertFalse(self.dep.agents.get(a, instance).running)

        self.admin_api.post_server_action(instance, {"unshelve": {"host": b}})
        server = self._wait_for_state_change(server, "ACTIVE")
        self.assertEqual(b, self._host_of(server))
        rec = self.dep.operator.get_vtpcm(instance)
        self.assertEqual((b, 1, None), (rec.host, rec.generation, rec.migration_id))
        after = self._tpm(b, instance)
        self.assertEqual(before["nv"], after["nv"])
        # PCRs are volatile: the guest was powered off, they start afresh
        self.assertEqual(bytes(32), after["pcr16"])
        self.assertIsNone(self.dep.vtpcm_on(a, instance))
        self.assertFalse(src_state.exists())
        self.assertEqual(["moved"],
                         [e.outcome for e in self._audit(instance, "vtpcm.unshelve")])

    def test_an_unshelve_whose_spawn_fails_after_the_move_shelves_it_again(self) -> None:
        """Review finding F5: the vTPCM moved to b, the spawn failed, Nova put
        the instance back to SHELVED_OFFLOADED, and the vTPCM stayed ACTIVE
        on b: every unshelve elsewhere was refused. The driver shelves it
        again from its new holder."""
        a, b = self._start_hosts(2)
        server = self._boot(host=a)
        instance = server["id"]
        before = self._write_tpm(a, instance)
        self.admin_api.post_server_action(instance, {"shelve": {}})
        server = self._wait_for_state_change(server, "SHELVED_OFFLOADED")
        failing = fixtures.MockPatch(
            "nova.virt.libvirt.driver.LibvirtDriver._create_guest_with_network",
            side_effect=RuntimeError("spawn failed after the vTPCM moved"))
        failing.setUp()
        try:
            self.admin_api.post_server_action(instance, {"unshelve": {"host": b}})
            self._wait_for_instance_action_event(
                server, "unshelve", "compute_unshelve_instance", "Error")
            server = self._wait_for_state_change(server, "SHELVED_OFFLOADED")
        finally:
            failing.cleanUp()
        rec = self.dep.operator.get_vtpcm(instance)
        self.assertEqual((b, 1, "SHELVED", None),
                         (rec.host, rec.generation, rec.state, rec.migration_id))
        self.assertFalse(self.dep.agents.get(b, instance).running)
        self.assertEqual(["moved"],
                         [e.outcome for e in self._audit(instance, "vtpcm.unshelve")])
        # the next unshelve may take it anywhere: back to a, with its state
        self.admin_api.post_server_action(instance, {"unshelve": {"host": a}})
        server = self._wait_for_state_change(server, "ACTIVE")
        self.assertEqual(a, self._host_of(server))
        rec = self.dep.operator.get_vtpcm(instance)
        self.assertEqual((a, 2, "ACTIVE"), (rec.host, rec.generation, rec.state))
        self.assertEqual(before["nv"], self._tpm(a, instance)["nv"])

    def test_a_trusted_host_nova_is_not_unshelving_onto_gets_nothing(self) -> None:
        """Issue 8 (review HIGH): b is enrolled, approved and TRUSTED and signs
        its own unshelve_vtpcm, but Nova is not unshelving the instance onto
        b: the engine asks Nova's API and refuses; nothing moves. Before the
        fix the engine sealed the state to b."""
        a, b = self._start_hosts(2)
        server = self._boot(host=a)
        instance = server["id"]
        before = self._write_tpm(a, instance)
        src_id = self.dep.agents.get(a, instance).vtpcm_id
        src_state = self.dep.hosts[a].state_dir / "vtpcms" / src_id
        self.admin_api.post_server_action(instance, {"shelve": {}})
        server = self._wait_for_state_change(server, "SHELVED_OFFLOADED")
        self.assertEqual("TRUSTED", self.dep.operator.attest(b).status)

        with pytest.raises(exception.UnshelveNotAuthorized,
                           match=r"onto %s refused: Nova is not unshelving the instance "
                                 r"\(task_state None\)" % b):
            self.dep.engine_at(b).unshelve_vtpcm(instance, b)
        rec = self.dep.operator.get_vtpcm(instance)
        self.assertEqual((a, 0, "SHELVED", None),
                         (rec.host, rec.generation, rec.state, rec.migration_id))
        self.assertIsNone(self.dep.vtpcm_on(b, instance))
        self.assertTrue(src_state.exists())
        (refused,) = self._audit(instance, "vtpcm.unshelve")
        self.assertEqual(("refused", b), (refused.outcome, refused.host))
        self.assertIn("not authorized by Nova", refused.detail)
        self.assertIn(("GET", "/v2.1/servers/" + instance, 200), self.dep.nova.requests)

        # positive control: Nova's own unshelve onto b moves it there
        self.admin_api.post_server_action(instance, {"unshelve": {"host": b}})
        server = self._wait_for_state_change(server, "ACTIVE")
        self.assertEqual(b, self._host_of(server))
        rec = self.dep.operator.get_vtpcm(instance)
        self.assertEqual((b, 1, "ACTIVE"), (rec.host, rec.generation, rec.state))
        self.assertEqual(before["nv"], self._tpm(b, instance)["nv"])
        self.assertFalse(src_state.exists())

    def test_a_forged_nova_record_without_nova_apis_witness_moves_nothing(self) -> None:
        """Issue 8's last HIGH (review H2): a compromised compute host b
        writes the instance's host and task_state through nova-conductor
        (``Instance.save``, no per-host check), so Nova's API truly shows it
        unshelving onto b, and b signs its own unshelve_vtpcm. nova-api never
        accepted an unshelve request: no witness, refused, nothing sealed.
        Then the user's real unshelve goes through nova-api's vtpcm_witness
        filter (this Nova's paste pipeline) and moves it, once."""
        a, b = self._start_hosts(2)
        server = self._boot(host=a)
        instance = server["id"]
        before = self._write_tpm(a, instance)
        self.admin_api.post_server_action(instance, {"shelve": {}})
        server = self._wait_for_state_change(server, "SHELVED_OFFLOADED")
        ctxt = nova_context.get_admin_context()
        inst = objects.Instance.get_by_uuid(ctxt, instance)
        inst.host, inst.task_state = b, "spawning"
        inst.save()  # what b's nova-compute can make nova-conductor write
        with pytest.raises(exception.UnshelveNotAuthorized,
                           match="nova-api witnessed no unshelve request"):
            self.dep.engine_at(b).unshelve_vtpcm(instance, b)
        rec = self.dep.operator.get_vtpcm(instance)
        self.assertEqual((a, 0, "SHELVED", None),
                         (rec.host, rec.generation, rec.state, rec.migration_id))
        self.assertIsNone(self.dep.vtpcm_on(b, instance))
        inst.host, inst.task_state = None, None
        inst.save()
        # the user's unshelve, witnessed by nova-api's filter: moved once
        self.admin_api.post_server_action(instance, {"unshelve": {"host": b}})
        server = self._wait_for_state_change(server, "ACTIVE")
        self.assertEqual(b, self._host_of(server))
        rec = self.dep.operator.get_vtpcm(instance)
        self.assertEqual((b, 1, "ACTIVE"), (rec.host, rec.generation, rec.state))
        self.assertEqual(before["nv"], self._tpm(b, instance)["nv"])
        self.assertEqual(["recorded", "used"],
                         sorted(e.outcome for e in self._audit(instance, "vtpcm.witness")))

    def test_a_compute_hosts_service_credentials_get_no_witness(self) -> None:
        """Witness review, finding 1 (proof P4) through this Nova's own
        pipeline: b's nova-compute holds service credentials (roles admin
        and service) and asks nova-api itself to unshelve the server onto b
        (2.91). Nova accepts it (an admin may), but the vtpcm_witness filter
        records no witness: b's spawn gets UnshelveNotAuthorized, nothing is
        sealed, the instance is SHELVED_OFFLOADED again. A user's unshelve
        then moves it."""
        a, b = self._start_hosts(2)
        server = self._boot(host=a)
        instance = server["id"]
        before = self._write_tpm(a, instance)
        self.admin_api.post_server_action(instance, {"shelve": {}})
        server = self._wait_for_state_change(server, "SHELVED_OFFLOADED")
        service = api_client.TestOpenStackClient(
            "nova", self.admin_api.base_url, project_id=self.admin_api.project_id,
            roles=["admin", "service"])
        service.microversion = self.microversion
        service.post_server_action(instance, {"unshelve": {"host": b}})
        self._wait_for_instance_action_event(
            server, "unshelve", "compute_unshelve_instance", "Error")
        server = self._wait_for_state_change(server, "SHELVED_OFFLOADED")
        rec = self.dep.operator.get_vtpcm(instance)
        self.assertEqual((a, 0, "SHELVED", None),
                         (rec.host, rec.generation, rec.state, rec.migration_id))
        self.assertIsNone(self.dep.vtpcm_on(b, instance))
        self.assertEqual([], self._audit(instance, "vtpcm.witness"))
        (refused,) = self._audit(instance, "vtpcm.unshelve")
        self.assertIn("not witnessed by nova-api", refused.detail)
        # the user's own unshelve is witnessed and moves it
        self.admin_api.post_server_action(instance, {"unshelve": {"host": b}})
        server = self._wait_for_state_change(server, "ACTIVE")
        rec = self.dep.operator.get_vtpcm(instance)
        self.assertEqual((b, 1, "ACTIVE"), (rec.host, rec.generation, rec.state))
        self.assertEqual(before["nv"], self._tpm(b, instance)["nv"])

    def test_deleting_a_shelved_offloaded_server_reaps_its_vtpcm(self) -> None:
        """Issue 8: Nova deletes a shelved offloaded server without its
        compute driver (_local_delete). The engine's reconcile asks Nova and
        destroys the vTPCM on its holder after two 404s in a row, never while
        Nova gives no answer (here: its API unplugged, 503)."""
        a, = self._start_hosts(1)
        server = self._boot(host=a)
        instance = server["id"]
        self._write_tpm(a, instance)
        vtpcm_id = self.dep.agents.get(a, instance).vtpcm_id
        state = self.dep.hosts[a].state_dir / "vtpcms" / vtpcm_id
        keys = list((self.dep.hosts[a].state_dir / "keys").glob(vtpcm_id + "*"))
        self.admin_api.post_server_action(instance, {"shelve": {}})
        server = self._wait_for_state_change(server, "SHELVED_OFFLOADED")
        self.assertTrue(state.exists() and keys)

        app, self.dep.nova.app = self.dep.nova.app, None  # Nova's API down: 503
        self._delete_server(server)
        unanswered = len([r for r in self.dep.nova.requests if r[2] == 503])
        time.sleep(4 * RECONCILE_S)
        self.assertGreater(len([r for r in self.dep.nova.requests if r[2] == 503]),
                           unanswered + 1, "the engine did not ask during the outage")
        self.assertEqual("SHELVED", self.dep.operator.get_vtpcm(instance).state)
        self.assertTrue(state.exists())

        self.dep.nova.app = app
        started = time.monotonic()
        deadline = started + 20 * RECONCILE_S
        while time.monotonic() < deadline:
            try:
                self.dep.operator.get_vtpcm(instance)
            except exception.NotFound:
                break
            time.sleep(0.2)
        reaped_after = time.monotonic() - started
        with pytest.raises(exception.NotFound):
            self.dep.operator.get_vtpcm(instance)
        self.assertIsNone(self.dep.vtpcm_on(a, instance))
        self.assertFalse(state.exists())
        self.assertEqual([], [k for k in keys if k.exists()])
        self.assertEqual(["destroyed"], [e.outcome for e in self._audit(instance, "vtpcm.reap")])
        self.assertEqual(["destroyed"],
                         [e.outcome for e in self._audit(instance, "vtpcm.destroy")])
        print("shelved vTPCM reaped %.1f s after Nova's API answered again" % reaped_after)

    def test_a_credential_without_the_admin_role_never_reaps_a_live_shelved_vtpcm(
            self) -> None:
        """Review H1 (P1): a [nova] service user without the admin role gets
        404 for every other project's server; the reaper took that as
        "deleted" and shredded the vTPCM of a live shelved offloaded server
        within two passes, and its unshelve then got an empty TPM. Now Nova
        refuses that user the all-tenants listing (403) and nothing is
        reaped; the unshelve gets the guest's own TPM back."""
        a, = self._start_hosts(1)
        server = self._boot(host=a)
        instance = server["id"]
        before = self._write_tpm(a, instance)
        vtpcm_id = self.dep.agents.get(a, instance).vtpcm_id
        state = self.dep.hosts[a].state_dir / "vtpcms" / vtpcm_id
        self.admin_api.post_server_action(instance, {"shelve": {}})
        server = self._wait_for_state_change(server, "SHELVED_OFFLOADED")

        admin_app = self.dep.nova.app

        def service_user_without_admin(environ: dict[str, Any], start: Any) -> Any:
            environ["HTTP_X_AUTH_USER"] = "vtpcm-engine"
            environ["HTTP_X_ROLES"] = "reader,member,service"
            return admin_app(environ, start)  # type: ignore[misc]
        self.dep.nova.app = service_user_without_admin
        asked = len(self.dep.nova.requests)
        try:
            time.sleep(6 * RECONCILE_S)
        finally:
            self.dep.nova.app = admin_app
        self.assertEqual([], self._audit(instance, "vtpcm.reap"))
        self.assertEqual("SHELVED", self.dep.operator.get_vtpcm(instance).state)
        self.assertTrue(state.exists())
        refused = [r for r in self.dep.nova.requests[asked:]
                   if r[1] == "/v2.1/servers/detail" and r[2] == 403]
        self.assertGreater(len(refused), 2, "the engine did not ask Nova meanwhile")

        self.admin_api.post_server_action(instance, {"unshelve": {}})
        server = self._wait_for_state_change(server, "ACTIVE")
        host = self._host_of(server)
        rec = self.dep.operator.get_vtpcm(instance)
        self.assertEqual((vtpcm_id, "ACTIVE"), (rec.vtpcm_id, rec.state))
        self.assertEqual(before["nv"], self._tpm(host, instance)["nv"])

    def test_delete_shreds_the_vtpcm(self) -> None:
        a, = self._start_hosts(1)
        server = self._boot(host=a)
        instance = server["id"]
        vtpcm_id = self.dep.agents.get(a, instance).vtpcm_id
        state = self.dep.hosts[a].state_dir / "vtpcms" / vtpcm_id
        keys = list((self.dep.hosts[a].state_dir / "keys").glob(vtpcm_id + "*"))
        self.assertTrue(state.exists() and keys)
        self._delete_server(server)
        with pytest.raises(exception.NotFound):
            self.dep.operator.get_vtpcm(instance)
        self.assertIsNone(self.dep.vtpcm_on(a, instance))
        self.assertFalse(state.exists())
        self.assertEqual([], [k for k in keys if k.exists()])
        self.assertEqual(["destroyed"],
                         [e.outcome for e in self._audit(instance, "vtpcm.destroy")])

    def test_no_key_or_plaintext_state_in_any_log_at_debug(self) -> None:
        a, b = self._start_hosts(2)
        server = self._boot(host=a)
        instance = server["id"]
        self._write_tpm(a, instance)
        secrets_seen = self._secrets_of(a, instance, "source")
        server = self._live_migrate(server, host=b)
        secrets_seen += self._secrets_of(b, instance, "destination")

        logs = [self.stdlog.logger.output.encode()]  # Nova, DEBUG included
        for host in self.dep.hosts.values():
            logs += [p.read_bytes() for p in host.logs() if p.is_file()]
        logs.append(Path(self.dep.engine.log_file).read_bytes())
        haystack = b"\n".join(logs)
        self.assertIn(b"DEBUG", haystack)  # the capture really holds DEBUG lines
        windows = self._plaintext_windows
        self.assertTrue(windows)
        # planted controls: one key, the way a careless debug line would show
        # it, and a key and a state window only decoding finds
        planted = haystack + ("DEBUG key=%s" % secrets_seen[0][1].hex()).encode()
        self.assertIn("%s as hex" % secrets_seen[0][0], leakscan.hits(secrets_seen[:1], planted))
        leakscan.assert_finds(secrets_seen, windows, haystack)
        self.assertEqual([], leakscan.hits(secrets_seen, haystack))
        self.assertEqual(0, leakscan.window_hits(windows, haystack))

    def _secrets_of(self, host: str, instance: str, side: str) -> list[tuple[str, bytes]]:
        vtpcm_id = self.dep.agents.get(host, instance).vtpcm_id
        keys = self.dep.hosts[host].keys(vtpcm_id)
        state_dir = self.dep.hosts[host].state_dir / "vtpcms" / vtpcm_id
        base = Path(self.useFixture(fixtures.TempDir(rootdir="/tmp")).path)
        # permanent and volatile, what the guest can read left out
        self._plaintext_windows = getattr(self, "_plaintext_windows", set()) | \
            tpmtools.secrets_of_state(state_dir, keys.at_rest_key, base)
        return [(side + " at-rest key", keys.at_rest_key),
                (side + " migration key", keys.migration_key)]

    def test_bad_vtpcm_extra_specs_are_refused_by_the_flavor_api(self) -> None:
        flavor = self._create_flavor(name="typo")
        for spec in ({"vtpcm:enabled": "maybe"}, {"vtpcm:model": "tpm-spapr"},
                     {"vtpcm:enable": "true"}):
            with self.assertRaises(api_client.OpenStackApiException) as ctx:
                self.admin_api.post_extra_spec(flavor, {"extra_specs": spec})
            self.assertEqual(400, ctx.exception.response.status_code, spec)
        self.admin_api.post_extra_spec(flavor, {"extra_specs": {"vtpcm:model": "tpm-tis"}})


class RecordingEngine:
    """The driver's engine client, counting calls (a plain flavor makes none)."""

    def __init__(self, inner: Any, calls: list[tuple[str, Any]],
                 before: dict[str, Any],
                 timeline: list[tuple[str, Any, str, float, float]] | None = None) -> None:
        self._inner = inner
        self._calls = calls
        self._before = before  # method -> callable run once before it (a race)
        self._timeline = timeline if timeline is not None else []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            self._calls.append((name, args[0] if args else None))
            hook = self._before.pop(name, None)
            if hook is not None:
                hook()
            started = time.monotonic()
            try:
                return attr(*args, **kwargs)
            finally:
                self._timeline.append((name, args[0] if args else None,
                                       threading.current_thread().name, started,
                                       time.monotonic()))
        return call


