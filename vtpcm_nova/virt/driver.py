"""VTPCMLibvirtDriver: Nova's libvirt driver, with the vTPCM for ``vtpcm:`` flavors.

Thin on purpose: each override calls Nova's own method and hands the vTPCM's
part to plain functions (``lifecycle``, ``livemigration``, ``tpmxml``) that
the lab runs too. Instances whose flavor lacks ``vtpcm:enabled=true`` take
Nova's paths untouched, with no engine call. Loaded by nova-compute as
``compute_driver = vtpcm.VTPCMLibvirtDriver`` through the ``nova/virt/vtpcm``
shim.

Private Nova methods overridden here (``_add_vtpm_device``,
``_live_migration_operation``) are pinned by a contract test against the
supported Nova range (``SUPPORTED_NOVA``).
"""

import contextlib
import os
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any

import nova.conf
from lxml import etree
from nova import context as nova_context
from nova import exception as nova_exception
from nova import objects
from nova.compute import power_state, task_states, vm_states
from nova.virt.libvirt import config as vconfig
from nova.virt.libvirt import driver as libvirt_driver
from nova.virt.libvirt import utils as libvirt_utils
from oslo_log import log as logging
from oslo_utils import excutils

from vtpcm_common import exception
from vtpcm_common.api.agent.rpcapi import AgentAPI
from vtpcm_common.api.engine.rpcapi import EngineAPI
from vtpcm_nova import clients, extra_specs
from vtpcm_nova.conf import compute as compute_conf
from vtpcm_nova.virt import coldmigration, daclabel, earlybegin, lifecycle, livemigration, tpmxml

LOG = logging.getLogger(__name__)
CONF = nova.conf.CONF

SUPPORTED_NOVA = (">=34.0.0", "<35")
TRAIT = "CUSTOM_VTPCM"
# Nova calls destroy for many reasons; the vTPCM is shredded only for these
# (a delete, the reclaim of a soft delete, or a build that failed before the
# guest ever ran). Shelve
# offload, rebuild, rescue, revert and the cleanup after a migration keep it.
_SHRED_TASK_STATES = frozenset({task_states.DELETING})


class VTPCMFault(nova_exception.NovaException):
    """A vTPCM refusal or failure, shown to the user as the instance fault."""

    msg_fmt = "vTPCM: %(reason)s"


class LibvirtConfigGuestExternalTPM(vconfig.LibvirtConfigGuestDevice):
    """``<tpm>`` on libvirt's external backend (Nova's own class hard-codes
    the emulator backend, where libvirt runs swtpm and QEMU carries the
    state without a migration key)."""

    def __init__(self, socket_path: str, model: str, **kwargs: Any) -> None:
        super().__init__(root_name="tpm", **kwargs)
        self.socket_path = socket_path
        self.model = model

    def format_dom(self) -> Any:
        element = tpmxml.tpm_element(self.socket_path, self.model)
        return etree.fromstring(ET.tostring(element))


class _MigrationXmlGuest:
    """Nova's Guest whose ``migrate`` sends a rewritten destination XML
    (Nova has no hook for it); ``_rewrite`` says how, ``_missing`` why it
    cannot go without one."""

    _missing = "no destination XML to rewrite"

    def __init__(self, guest: Any) -> None:
        self._guest = guest

    def __getattr__(self, name: str) -> Any:
        return getattr(self._guest, name)

    def _rewrite(self, xml: str) -> str:
        raise NotImplementedError

    def migrate(self, destination: str, *args: Any, **kwargs: Any) -> Any:
        xml = kwargs.get("destination_xml")
        if xml is None:
            raise exception.MigrationError(migration_id="?", reason=self._missing)
        kwargs["destination_xml"] = self._rewrite(xml)
        return self._guest.migrate(destination, *args, **kwargs)


class _RewritingGuest(_MigrationXmlGuest):
    """The destination XML with the TPM pointed at the destination's
    incoming vTPCM, and with ``ids`` (``[vtpcm] qemu_dac_label``) its QEMU
    labelled with the destination agent's ids for this VM."""

    _missing = "no destination XML to point at the vTPCM"

    def __init__(self, guest: Any, socket_path: str, instance_uuid: str,
                 ids: daclabel.VMIds | None = None) -> None:
        super().__init__(guest)
        self._socket_path = socket_path
        self._instance_uuid = instance_uuid
        self._ids = ids

    def _rewrite(self, xml: str) -> str:
        xml = tpmxml.rewrite_tpm_socket(xml, self._socket_path)
        if self._ids is not None:
            return daclabel.relabel_for_destination(xml, self._ids, self._instance_uuid)
        if daclabel.has_static_label(xml):
            # never the source's ids on the destination, where they may be
            # another VM's (review of dacbuild, MEDIUM 2)
            raise exception.InvalidInput(
                reason="instance %s runs with a per-VM QEMU label and no checked ids of "
                       "the destination's agent; not migrating it with this host's ids"
                       % self._instance_uuid)
        return xml


class _PinningGuest(_MigrationXmlGuest):
    """The destination XML of a guest without a vTPCM with its backing
    chains pinned (``daclabel.pin_for_migration``)."""

    _missing = "no destination XML to pin the backing files in"

    def __init__(self, guest: Any, instance_dir: str) -> None:
        super().__init__(guest)
        self._instance_dir = instance_dir

    def _rewrite(self, xml: str) -> str:
        return daclabel.pin_for_migration(xml, self._instance_dir)


# the guest's XML Nova's rescue saves in the instance's directory, which its
# unrescue defines and starts again
UNRESCUE_XML = "unrescue.xml"

# Cinder volume types attached as files (<disk type='file'>)
FILE_VOLUMES = frozenset(("nfs", "glusterfs", "quobyte", "scality", "smbfs", "vzstorage",
                          "local", "fs"))


def vtpcm_spec(flavor: Any) -> extra_specs.VtpcmSpec:
    """The flavor's vTPCM request; a malformed one is a fault naming the key."""
    try:
        return extra_specs.parse(flavor.extra_specs or {})
    except exception.InvalidInput as err:
        raise VTPCMFault(reason=str(err)) from None


def _migration_id(migrate_data: Any) -> str:
    migration = getattr(migrate_data, "migration", None) if migrate_data else None
    if migration is None or not getattr(migration, "uuid", None):
        raise nova_exception.MigrationError(
            reason="vTPCM: Nova gave no migration record to bind the vTPCM's move to")
    return str(migration.uuid)


class VTPCMLibvirtDriver(libvirt_driver.LibvirtDriver):
    """LibvirtDriver plus the vTPCM; see the module docstring."""

    def __init__(self, virtapi: Any, read_only: bool = False) -> None:
        super().__init__(virtapi, read_only)
        compute_conf.register_opts(CONF)
        self._clients_lock = threading.Lock()
        # the engine client as this host signs it (clients.EngineForHost)
        self._engine: Callable[[], EngineAPI] | None = None
        self._agents: AgentAPI | None = None
        self._dest_sockets: dict[str, str] = {}
        self._dest_ids: dict[str, daclabel.VMIds] = {}
        self._trait: tuple[float, bool] = (0.0, False)
        self._vtpcm_host: str | None = None
        self._early = earlybegin.EarlyBegins(
            lambda: self.vtpcm_engine, lambda: self.vtpcm_host,
            lambda i: _in_progress_migration(i, self.vtpcm_host),
            _migration_status, lambda: float(CONF.vtpcm.early_begin_timeout),
            wait_previous=lambda: float(CONF.vtpcm.engine_timeout) * 1.25)

    def init_host(self, host: str) -> None:
        # the compute service's host name, as the engine and agents know it
        self._vtpcm_host = host
        if CONF.vtpcm.qemu_dac_label:
            self._dac_ranges()  # a bad setting stops nova-compute here, by name
        super().init_host(host)

    @staticmethod
    def _dac_ranges() -> daclabel.Ranges:
        return daclabel.ranges(CONF.vtpcm.qemu_uid_range, CONF.vtpcm.vm_gid_range)

    def _vm_ids(self, host: str, instance_uuid: str,
                state: str | None = None) -> daclabel.VMIds:
        """The QEMU uid and VM gid ``host``'s agent reserved for the VM
        (a reply signed by that host's key), checked against this side's
        ranges; ``state``: the vTPCM must be in it (a migration's incoming)."""
        info = self.vtpcm_agents.get(host, instance_uuid, ids=True)
        if state is not None and info.state != state:
            raise exception.MigrationError(
                migration_id=info.migration_id or "?",
                reason="the vTPCM of instance %s on %s is %s, not %s"
                       % (instance_uuid, host, info.state, state))
        return daclabel.checked_ids(info.qemu_uid, info.vm_gid, self._dac_ranges(),
                                    instance_uuid, host)

    # --- the guest's XML: a per-VM DAC label ([vtpcm] qemu_dac_label) ----------------
    def _get_guest_xml(self, context: Any, instance: Any, network_info: Any, disk_info: Any,
                       image_meta: Any, *args: Any, **kwargs: Any) -> str:
        """Nova's XML; with ``qemu_dac_label`` every guest's backing files
        pinned (never relabelled by libvirt), and a vTPCM guest's QEMU
        labelled with this host agent's ids for the VM (known once
        ``_add_vtpm_device``, inside, started its vTPCM here)."""
        xml: str = super()._get_guest_xml(context, instance, network_info, disk_info,
                                          image_meta, *args, **kwargs)
        if not CONF.vtpcm.qemu_dac_label:
            return xml
        try:
            if not vtpcm_spec(instance.flavor).enabled:
                # every guest's chain pinned, a labelled one or not: an
                # unpinned guest's libvirt would chown the shared _base to
                # its QEMU user for good (review of the DAC label round 3,
                # HIGH 1), writable by every unlabelled QEMU
                return daclabel.pin_domain(xml, libvirt_utils.get_instance_path(instance))
            ids = self._vm_ids(self.vtpcm_host, instance.uuid)
            return daclabel.label_domain(xml, ids, libvirt_utils.get_instance_path(instance),
                                         instance.uuid)
        except exception.VTPCMException as err:
            raise VTPCMFault(reason=str(err)) from None

    def unrescue(self, context: Any, instance: Any) -> None:
        """Nova starts the guest's XML it saved at rescue (``unrescue.xml``)
        as it was: a guest rescued before ``qemu_dac_label`` went on would
        come back with its chain unpinned, and RESCUED allows no hard reboot
        (review of the DAC label round 5, LOW 2). With the option on, the
        saved XML is pinned in its file before Nova reads it, or refused
        before Nova destroys the rescue guest."""
        if CONF.vtpcm.qemu_dac_label:
            self._pin_unrescue_xml(instance)
        super().unrescue(context, instance)

    def _pin_unrescue_xml(self, instance: Any) -> None:
        instance_dir = libvirt_utils.get_instance_path(instance)
        path = os.path.join(instance_dir, UNRESCUE_XML)
        try:
            saved = libvirt_utils.load_file(path)
        except FileNotFoundError:
            return  # Nova's unrescue fails on it by itself
        try:
            if vtpcm_spec(instance.flavor).enabled:
                if daclabel.labelled_and_pinned(saved):
                    return
                # its label comes from _get_guest_xml only, with the ids
                # this host's agent reserved: not made up here
                raise VTPCMFault(reason=(
                    "instance %s was rescued before [vtpcm] qemu_dac_label was on: the "
                    "guest Nova saved at rescue has no per-VM QEMU label and its backing "
                    "chain is not pinned (libvirt would hand the shared backing files to "
                    "its QEMU user), so unrescue is refused and Nova puts the instance in "
                    "ERROR (the rescue guest still runs). To bring it back, hard reboot it "
                    "(allowed from ERROR): Nova then builds its XML anew, labelled and "
                    "pinned" % instance.uuid))
            pinned = daclabel.pin_for_migration(saved, instance_dir)
        except exception.VTPCMException as err:
            raise VTPCMFault(reason=str(err)) from None
        # replaced whole: the file is never seen half written
        fd, tmp = tempfile.mkstemp(prefix=".unrescue.", dir=instance_dir)
        try:
            with os.fdopen(fd, "w") as out:
                out.write(pinned)
                out.flush()
                os.fsync(out.fileno())  # never a zero-length file after a power loss
            os.replace(tmp, path)
            dir_fd = os.open(instance_dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except BaseException:
            with excutils.save_and_reraise_exception():
                with contextlib.suppress(OSError):
                    os.unlink(tmp)

    def attach_volume(self, context: Any, connection_info: Any, instance: Any,
                      mountpoint: str, *args: Any, **kwargs: Any) -> Any:
        """A multiattach volume on a labelled guest would be relabelled to its
        QEMU's ids under the other VMs using it: refused."""
        info = connection_info or {}
        if self._labelled(instance) and info.get("multiattach"):
            raise VTPCMFault(reason=(
                "instance %s: a multiattach volume cannot be attached to a guest with a "
                "per-VM QEMU label ([vtpcm] qemu_dac_label)" % instance.uuid))
        if self._labelled(instance) and info.get("driver_volume_type") in FILE_VOLUMES \
                and (info.get("data") or {}).get("format", "raw") != "raw":
            # a file volume's qcow2 may have a backing chain (its snapshots)
            # that libvirt would label to this VM's QEMU
            raise VTPCMFault(reason=(
                "instance %s: a %s volume of format %s (it may have backing files) "
                "cannot be attached to a guest with a per-VM QEMU label ([vtpcm] "
                "qemu_dac_label); only raw file volumes can"
                % (instance.uuid, info.get("driver_volume_type"),
                   (info.get("data") or {}).get("format"))))
        return super().attach_volume(context, connection_info, instance, mountpoint,
                                     *args, **kwargs)

    def _labelled(self, instance: Any) -> bool:
        """Whether the guest runs (or its defined domain is) with a static
        DAC label, whatever the option is now (review of dacbuild round 2,
        HIGH 1: a guest started labelled keeps its +Q:+U after the option is
        turned off), or will get one when Nova next builds its XML."""
        if CONF.vtpcm.qemu_dac_label and vtpcm_spec(instance.flavor).enabled:
            return True
        try:
            xml = self._host.get_guest(instance).get_xml_desc()
        except nova_exception.InstanceNotFound:
            return False
        return daclabel.has_static_label(xml)

    def _refuse_for_labelled(self, instance: Any, what: str) -> None:
        """libvirt labels the files of a block job's or a new snapshot's
        chain itself, backing files included: under a per-VM label Nova's
        shared ``_base`` (or a volume's backing file) would be chowned to
        this VM's QEMU for good. Refused with a message naming why."""
        if self._labelled(instance):
            raise VTPCMFault(reason=(
                "instance %s: %s is refused for a guest with a per-VM QEMU label "
                "([vtpcm] qemu_dac_label): libvirt would relabel the disk's shared "
                "backing files to this VM's QEMU" % (instance.uuid, what)))

    def _live_snapshot(self, context: Any, instance: Any, guest: Any, disk_path: str,
                       out_path: str, source_format: str, image_format: str,
                       image_meta: Any) -> Any:
        """Nova's live snapshot (a delta qcow2 over ``_base``, blockRebase
        copy) makes libvirt label the copy's whole chain, ``_base`` with it:
        refused for a labelled guest (a stopped instance is snapshotted cold,
        qemu-img only). An unlabelled guest on a host with
        ``qemu_dac_label`` is snapshotted cold instead (review of the DAC
        label round 3, HIGH 1: its block copy would hand ``_base`` to
        libvirt's QEMU user): Nova 34 decides live or cold inside
        ``snapshot`` with no hook, so this takes Nova's own cold steps
        where its live path calls: the guest saved (managed save), its disk
        extracted by qemu-img, the guest restored from its saved, pinned XML."""
        self._refuse_for_labelled(instance, "a live snapshot (stop the instance: a "
                                            "stopped instance is snapshotted cold)")
        if not CONF.vtpcm.qemu_dac_label:
            return super()._live_snapshot(context, instance, guest, disk_path, out_path,
                                          source_format, image_format, image_meta)
        running_xml = guest.get_xml_desc()
        self._refuse_unpinned(instance, running_xml, "snapshotted")
        reasons = daclabel.unsaveable(running_xml) + _unsaveable(instance)
        if guest.get_all_devices(devtype=vconfig.LibvirtConfigGuestHostdevMDEV):
            # what Nova's suspend hot-detaches (_detach_mediated_devices)
            reasons.insert(0, "mediated devices (a vGPU), which Nova's restore after a "
                              "managed save does not re-attach")
        if reasons:
            # refused before anything is detached (review of the DAC label
            # round 4, MEDIUM 2): Nova's suspend hot-detaches mdevs its
            # restore never re-attaches, and a guest libvirt cannot save
            # would only fail the managed save
            raise VTPCMFault(reason=(
                "instance %s: a snapshot of the running guest is refused with [vtpcm] "
                "qemu_dac_label on: Nova's live snapshot would hand the shared backing "
                "file to libvirt's QEMU user, and this guest cannot be saved for a cold "
                "one: it has %s. Stop the instance: a stopped instance is snapshotted "
                "cold" % (instance.uuid, "; ".join(reasons))))
        LOG.info("vTPCM: [vtpcm] qemu_dac_label is on: snapshotting cold instead (a live "
                 "snapshot's block copy would relabel the shared backing files)",
                 instance=instance)
        power = guest.get_power_state(self._host)
        try:
            self._suspend_guest_for_snapshot(context, False, power, instance)
        except Exception:
            with excutils.save_and_reraise_exception():
                self._reattach_after_failed_save(context, instance, guest, power)
        try:
            source_type = libvirt_utils.get_disk_type_from_path(disk_path) or source_format
            root_disk = self.image_backend.by_libvirt_path(instance, disk_path,
                                                           image_type=source_type)
            root_disk.snapshot_extract(out_path, image_format)
        finally:
            self._resume_guest_after_snapshot(context, False, power, instance, guest)

    @staticmethod
    def _refuse_unpinned(instance: Any, running_xml: str, what: str) -> None:
        """A managed save's restore starts the running XML again: of a guest
        started before ``qemu_dac_label`` that is libvirt's detected,
        unpinned chain, and libvirt chowns ``_base`` again."""
        if not daclabel.chains_pinned(running_xml):
            raise VTPCMFault(reason=(
                "instance %s: the running guest cannot be %s with [vtpcm] qemu_dac_label "
                "on: it was started before the option, on a backing chain libvirt "
                "relabels, and its restore would start it so. Hard reboot the instance "
                "first (its chain is then pinned)" % (instance.uuid, what)))

    def _suspend_guest_for_snapshot(self, context: Any, live_snapshot: bool,
                                    current_power_state: int, instance: Any) -> None:
        """Both cold snapshot paths (this driver's and Nova's own:
        ``[workarounds] disable_libvirt_livesnapshot``, encrypted ephemeral
        storage, LVM) save the guest here: its restore starts the running
        XML again, and that of a guest started before ``qemu_dac_label`` is
        libvirt's detected, unpinned chain, so libvirt would chown ``_base``
        again. Refused before anything is detached (review of the DAC label
        round 6, MEDIUM 1)."""
        if CONF.vtpcm.qemu_dac_label and self._needs_suspend_resume_for_snapshot(
                live_snapshot, current_power_state):
            guest = self._host.get_guest(instance)
            self._refuse_unpinned(instance, guest.get_xml_desc(), "snapshotted")
        super()._suspend_guest_for_snapshot(context, live_snapshot, current_power_state,
                                            instance)

    def suspend(self, context: Any, instance: Any) -> None:
        """A tenant's suspend is the same managed save (review of the round-6
        fix, MEDIUM): refused for an unpinned guest, as a rollback, so that
        Nova keeps the instance ACTIVE and records the fault (a plain error
        would put a running guest in ERROR; review of that fix, MEDIUM)."""
        if CONF.vtpcm.qemu_dac_label:
            guest = self._host.get_guest(instance)
            try:
                self._refuse_unpinned(instance, guest.get_xml_desc(), "suspended")
            except VTPCMFault as fault:
                raise nova_exception.InstanceFaultRollback(inner_exception=fault) from None
        super().suspend(context, instance)

    def _soft_reboot(self, instance: Any) -> bool:
        """A soft reboot starts the guest's definition again as it is: of a
        guest started before ``qemu_dac_label``, unpinned (review round 6).
        With the option on, such a guest is shut down gracefully (ACPI, at
        most ``wait_soft_reboot_seconds``) and then takes Nova's fallback,
        the hard reboot, which builds its XML pinned (review of the fix:
        returning at once made the soft reboot a power cut)."""
        if CONF.vtpcm.qemu_dac_label:
            guest = self._host.get_guest(instance)
            if not daclabel.chains_pinned(guest.get_xml_desc()):
                LOG.info("vTPCM: the guest was started before [vtpcm] qemu_dac_label, on an "
                         "unpinned backing chain: shutting it down and hard rebooting it "
                         "instead of a soft reboot, which would start that chain again",
                         instance=instance)
                self._shut_down_gracefully(instance, guest)
                return False
        return bool(super()._soft_reboot(instance))

    def _shut_down_gracefully(self, instance: Any, guest: Any) -> None:
        if guest.get_power_state(self._host) != power_state.RUNNING:
            return
        guest.shutdown()
        for _ in range(CONF.libvirt.wait_soft_reboot_seconds):
            if self._host.get_guest(instance).get_power_state(self._host) in (
                    power_state.SHUTDOWN, power_state.CRASHED):
                return
            time.sleep(1)

    def _reattach_after_failed_save(self, context: Any, instance: Any, guest: Any,
                                    power: int) -> None:
        """Nova's suspend detached the guest's PCI devices and direct ports
        before its managed save failed (a guest libvirt cannot save): the
        guest runs on, so they go back with Nova's own helpers, one at a
        time, each failure logged (one never detached fails to attach).
        Never raises: the save's failure is what the snapshot reports."""
        if not self._needs_suspend_resume_for_snapshot(False, power):
            return  # nothing was suspended
        pci = instance.get_pci_devices(source=objects.InstancePCIRequest.FLAVOR_ALIAS)
        cache = getattr(instance, "info_cache", None)
        network_info = cache.network_info if cache is not None else None
        steps: list[tuple[str, Any]] = [("PCI device %s" % dev.address, dev) for dev in pci]
        steps += [("port %s" % vif["id"], vif) for vif in network_info or []]
        for what, device in steps:
            try:
                if what.startswith("PCI"):
                    self._attach_pci_devices(guest, [device])
                else:
                    self._attach_direct_passthrough_ports(context, instance, guest, [device])
            except Exception as err:  # noqa: BLE001 - the next one still goes back
                LOG.warning("vTPCM: after the failed managed save, %(what)s could not be "
                            "attached again: %(err)s", {"what": what, "err": err},
                            instance=instance)

    def swap_volume(self, context: Any, old_connection_info: Any, new_connection_info: Any,
                    instance: Any, *args: Any, **kwargs: Any) -> Any:
        self._refuse_for_labelled(instance, "swapping a volume (a block copy)")
        return super().swap_volume(context, old_connection_info, new_connection_info,
                                   instance, *args, **kwargs)

    def volume_snapshot_create(self, context: Any, instance: Any, volume_id: str,
                               create_info: Any) -> Any:
        try:
            self._refuse_for_labelled(instance, "an assisted volume snapshot")
        except VTPCMFault:
            # Cinder waits for this status (the RPC is a cast): Nova's own
            # failure path sends it, so a refusal must too (review of
            # dacbuild round 2, MEDIUM 2)
            with excutils.save_and_reraise_exception():
                LOG.error("vTPCM: assisted volume snapshot refused for a labelled guest, "
                          "sending error status to Cinder", instance=instance)
                self._volume_snapshot_update_status(
                    context, (create_info or {}).get("snapshot_id"), "error")
        return super().volume_snapshot_create(context, instance, volume_id, create_info)

    def volume_snapshot_delete(self, context: Any, instance: Any, volume_id: str,
                               snapshot_id: str, delete_info: Any) -> Any:
        try:
            self._refuse_for_labelled(instance, "deleting an assisted volume snapshot")
        except VTPCMFault:
            with excutils.save_and_reraise_exception():
                LOG.error("vTPCM: deleting an assisted volume snapshot refused for a "
                          "labelled guest, sending error_deleting status to Cinder",
                          instance=instance)
                self._volume_snapshot_update_status(context, snapshot_id, "error_deleting")
        return super().volume_snapshot_delete(context, instance, volume_id, snapshot_id,
                                              delete_info)

    @property
    def vtpcm_host(self) -> str:
        return self._vtpcm_host or CONF.host

    # --- clients -----------------------------------------------------------------
    @property
    def vtpcm_engine(self) -> EngineAPI:
        """Made on first use: a compute without vTPCM instances never needs it."""
        with self._clients_lock:
            if self._engine is None:
                self._engine = clients.EngineForHost(CONF)
        return self._engine()  # made again after a host key rotation

    @property
    def vtpcm_agents(self) -> AgentAPI:
        with self._clients_lock:
            if self._agents is None:
                self._agents = clients.agent_reader(CONF, self.vtpcm_host)
            return self._agents

    # --- the guest's TPM device (spawn, reboot, power on, host boot, unshelve) ----
    def _add_vtpm_device(self, guest: Any, flavor: Any, instance: Any,
                         image_meta: Any) -> None:
        spec = vtpcm_spec(flavor)
        if not spec.enabled:
            super()._add_vtpm_device(guest, flavor, instance, image_meta)
            return
        try:
            if instance.vm_state == vm_states.SHELVED_OFFLOADED:
                lifecycle.unshelve_here(self.vtpcm_engine, instance.uuid, self.vtpcm_host)
            # the destination of an unconfirmed resize runs the incoming vTPCM
            socket_path = coldmigration.guest_socket(self.vtpcm_engine, self.vtpcm_agents,
                                                     instance.uuid, self.vtpcm_host,
                                                     CONF.vtpcm.socket_dirs)
        except exception.VTPCMNotHere as err:
            evacuating = _evacuating(instance, self.vtpcm_host)
            if not (evacuating and CONF.vtpcm.evacuate_with_fresh_vtpcm):
                raise VTPCMFault(reason=_not_here_reason(instance, err, evacuating)) \
                    from None
            socket_path = self._fresh_after_evacuation(instance)
        except exception.VTPCMException as err:
            raise VTPCMFault(reason=str(err)) from None
        guest.add_device(LibvirtConfigGuestExternalTPM(socket_path, spec.model))

    def spawn(self, context: Any, instance: Any, image_meta: Any, injected_files: Any,
              admin_password: Any, allocations: Any, network_info: Any = None,
              block_device_info: Any = None, power_on: bool = True,
              accel_info: Any = None) -> None:
        """An unshelve whose spawn fails leaves the instance SHELVED_OFFLOADED:
        its vTPCM, moved here by ``_add_vtpm_device``, is shelved again from
        this host, so the next unshelve may take it anywhere."""
        try:
            super().spawn(context, instance, image_meta, injected_files, admin_password,
                          allocations, network_info, block_device_info, power_on,
                          accel_info)
        except Exception:
            with excutils.save_and_reraise_exception():
                if instance.vm_state == vm_states.SHELVED_OFFLOADED and \
                        vtpcm_spec(instance.flavor).enabled:
                    self._shelve(instance)

    def _shelve(self, instance: Any) -> None:
        """Never fails the offload: without the engine's record the vTPCM
        stays on this host, and an unshelve elsewhere is refused by name."""
        try:
            lifecycle.shelve_if_held(self.vtpcm_engine, instance.uuid, self.vtpcm_host)
        except exception.VTPCMException as err:
            LOG.error("vTPCM of the offloaded instance not shelved: it can be unshelved "
                      "only on %(host)s: %(err)s", {"host": self.vtpcm_host, "err": err},
                      instance=instance)

    def _fresh_after_evacuation(self, instance: Any) -> str:
        try:
            return lifecycle.fresh_after_evacuation(self.vtpcm_engine, self.vtpcm_agents,
                                                    instance.uuid, self.vtpcm_host,
                                                    CONF.vtpcm.socket_dirs)
        except exception.VTPCMException as err:
            raise VTPCMFault(reason="evacuation with a fresh vTPCM refused: %s" % err) \
                from None

    def destroy(self, context: Any, instance: Any, network_info: Any,
                block_device_info: Any = None, destroy_disks: bool = True,
                destroy_secrets: bool = True) -> None:
        super().destroy(context, instance, network_info, block_device_info, destroy_disks,
                        destroy_secrets)
        if not vtpcm_spec(instance.flavor).enabled:
            return
        if instance.task_state == task_states.SHELVING_OFFLOADING:
            self._shelve(instance)
            return
        if not _shreds(instance):
            return
        try:
            lifecycle.destroy_if_held(self.vtpcm_engine, instance.uuid, self.vtpcm_host)
        except exception.VTPCMException as err:
            raise VTPCMFault(reason="could not destroy the vTPCM: %s" % err) from None

    # --- live migration --------------------------------------------------------------
    def check_can_live_migrate_destination(self, context: Any, instance: Any,
                                           src_compute_info: Any, dst_compute_info: Any,
                                           block_migration: bool = False,
                                           disk_over_commit: bool = False) -> Any:
        if vtpcm_spec(instance.flavor).enabled:
            # before Nova's own checks, which leave state to clean up
            try:
                with livemigration.timed("check destination", "-", instance.uuid):
                    livemigration.check_destination(self.vtpcm_engine, instance.uuid,
                                                    self.vtpcm_host)
            except exception.VTPCMException as err:
                raise nova_exception.MigrationPreCheckError(reason="vTPCM: %s" % err) \
                    from None
        data = super().check_can_live_migrate_destination(
            context, instance, src_compute_info, dst_compute_info, block_migration,
            disk_over_commit)
        if vtpcm_spec(instance.flavor).enabled or CONF.vtpcm.qemu_dac_label:
            # names this host to the source, which begins early; the
            # source's check takes it out again (Nova sets the field itself
            # in live_migration). With qemu_dac_label it says so: a source
            # without the option sends unpinned XML, and this host's
            # libvirt would hand _base to the guest's QEMU user under the
            # labelled guests here (review of the DAC label round 4, MEDIUM 3)
            data.migration = objects.Migration(dest_compute=self.vtpcm_host)
            if CONF.vtpcm.qemu_dac_label:
                data.migration.status = DAC_LABEL_HINT
        return data

    def check_can_live_migrate_source(self, context: Any, instance: Any,
                                      dest_check_data: Any,
                                      block_device_info: Any = None) -> Any:
        dest_pins = _dac_hint(dest_check_data)
        hint = _take_dest_hint(dest_check_data)
        if dest_pins and not CONF.vtpcm.qemu_dac_label:
            raise nova_exception.MigrationPreCheckError(reason=(
                "vTPCM: the destination %s runs with [vtpcm] qemu_dac_label and this host "
                "does not: the guest's backing chain would reach it unpinned, and its "
                "libvirt would hand the shared backing files to the guest's QEMU user under "
                "the labelled guests there; turn [vtpcm] qemu_dac_label on here first"
                % (hint or "host")))
        result = super().check_can_live_migrate_source(context, instance, dest_check_data,
                                                       block_device_info)
        if dest_pins:
            # the destination refuses a source that does not say it pins
            # (review of the DAC label round 5, MEDIUM 1: a stock Nova or an
            # older vtpcm source let the flag pass or dropped it)
            result.migration = objects.Migration(status=DAC_LABEL_ACK)
        if (hint and vtpcm_spec(instance.flavor).enabled
                and _not_queued(self.vtpcm_host, instance)):
            # the engine's begin, in the background: live_migration joins it
            self._early.start(instance.uuid, hint)
        return result

    def check_source_migrate_data_at_dest(self, ctxt: Any, instance: Any,
                                          migrate_data: Any, migration: Any, limits: Any,
                                          allocs: Any) -> Any:
        answer = _bare_status(migrate_data)
        # a source that does not take the hint out (an older driver) must
        # not pass it on to pre_live_migration, nor the acknowledgement
        _take_dest_hint(migrate_data)
        if CONF.vtpcm.qemu_dac_label and answer != DAC_LABEL_ACK:
            raise nova_exception.MigrationPreCheckError(reason=_unpinning_source(
                getattr(instance, "host", None), answer))
        return super().check_source_migrate_data_at_dest(ctxt, instance, migrate_data,
                                                         migration, limits, allocs)

    def live_migration(self, context: Any, instance: Any, dest: str, post_method: Any,
                       recover_method: Any, block_migration: bool = False,
                       migrate_data: Any = None) -> None:
        if not vtpcm_spec(instance.flavor).enabled:
            super().live_migration(context, instance, dest, post_method, recover_method,
                                   block_migration, migrate_data)
            return
        nova_id = _migration_id(migrate_data)
        # decided from the guest as it runs, not from today's option: a guest
        # started labelled keeps its +Q:+U, which must never reach another
        # host unchecked and unchanged (review of dacbuild, MEDIUM 2)
        try:
            labelled = daclabel.has_static_label(
                self._host.get_guest(instance).get_xml_desc())
            if labelled and not CONF.vtpcm.qemu_dac_label:
                raise exception.InvalidInput(reason=(
                    "instance %s runs with a per-VM QEMU label but [vtpcm] qemu_dac_label "
                    "is off here, so the destination's ids cannot be checked; turn the "
                    "option back on to migrate it, or hard reboot it (unlabelled) first"
                    % instance.uuid))
        except exception.VTPCMException as err:
            LOG.error("vTPCM of migration %(mig)s refused, rolling back: %(err)s",
                      {"mig": nova_id, "err": err}, instance=instance)
            recover_method(context, instance, dest, migrate_data)
            return
        try:
            with livemigration.timed("early begin join", nova_id, instance.uuid):
                migration_id = self._early.join(instance.uuid, nova_id, dest,
                                                float(CONF.vtpcm.engine_timeout))
        except exception.VTPCMException as err:
            # the early begin is still under way: rolled back as after a
            # failed begin (its own thread aborts what it began)
            LOG.error("vTPCM of migration %(mig)s refused, rolling back: %(err)s",
                      {"mig": nova_id, "err": err}, instance=instance)
            recover_method(context, instance, dest, migrate_data)
            return
        if migration_id != nova_id:
            LOG.info("vTPCM migration id %(mig)s for Nova migration %(nova)s (an earlier "
                     "begin under Nova's uuid was aborted)",
                     {"mig": migration_id, "nova": nova_id}, instance=instance)
        try:
            # PREPARED already if the early begin was taken over: one round trip
            with livemigration.timed("begin", migration_id, instance.uuid):
                livemigration.begin(self.vtpcm_engine, migration_id, instance.uuid,
                                    self.vtpcm_host, dest)
        except exception.VTPCMException as err:
            # begin aborted itself (or tried to): never taken over again
            # here; Nova must roll back, not mark the instance ERROR (which
            # an exception from here would do)
            self._early.remember_abort(migration_id)
            LOG.error("vTPCM begin of migration %(mig)s failed, rolling back: %(err)s",
                      {"mig": migration_id, "err": err}, instance=instance)
            recover_method(context, instance, dest, migrate_data)
            return
        try:
            with livemigration.timed("socket lookup", migration_id, instance.uuid):
                self._dest_sockets[instance.uuid] = livemigration.destination_socket(
                    self.vtpcm_agents, dest, instance.uuid, CONF.vtpcm.socket_dirs)
        except exception.VTPCMException as err:
            LOG.error("vTPCM of migration %(mig)s: no usable destination socket, "
                      "rolling back: %(err)s", {"mig": migration_id, "err": err},
                      instance=instance)
            self._abort(instance, migrate_data, "no usable destination socket: %s" % err)
            recover_method(context, instance, dest, migrate_data)
            return
        if labelled or CONF.vtpcm.qemu_dac_label:
            try:
                self._dest_ids[instance.uuid] = self._vm_ids(dest, instance.uuid,
                                                             "MIGRATING_IN")
            except exception.VTPCMException as err:
                LOG.error("vTPCM of migration %(mig)s: no usable QEMU label on the "
                          "destination, rolling back: %(err)s",
                          {"mig": migration_id, "err": err}, instance=instance)
                self._dest_sockets.pop(instance.uuid, None)
                self._abort(instance, migrate_data,
                            "no usable QEMU label on the destination: %s" % err)
                recover_method(context, instance, dest, migrate_data)
                return
        try:
            super().live_migration(context, instance, dest, post_method, recover_method,
                                   block_migration, migrate_data)
        finally:
            # An exception out of Nova's own live_migration (not a failed
            # job: those go through recover_method) leaves the guest's host
            # unknown; no explicit abort here, which would destroy a
            # destination copy the guest may run on. The engine's deadline
            # abort spares a destination that received the state.
            self._dest_sockets.pop(instance.uuid, None)
            self._dest_ids.pop(instance.uuid, None)

    def _live_migration_operation(self, context: Any, instance: Any, dest: str,
                                  block_migration: bool, migrate_data: Any, guest: Any,
                                  device_names: Any) -> Any:
        socket_path = self._dest_sockets.get(instance.uuid)
        if socket_path is not None:
            guest = _RewritingGuest(guest, socket_path, instance.uuid,
                                    self._dest_ids.get(instance.uuid))
        elif CONF.vtpcm.qemu_dac_label and not vtpcm_spec(instance.flavor).enabled:
            # a guest started before the option moves pinned (review of the
            # DAC label round 4, MEDIUM 3)
            guest = _PinningGuest(guest, libvirt_utils.get_instance_path(instance))
        return super()._live_migration_operation(context, instance, dest, block_migration,
                                                 migrate_data, guest, device_names)

    def post_live_migration(self, context: Any, instance: Any, block_device_info: Any,
                            migrate_data: Any = None) -> None:
        if vtpcm_spec(instance.flavor).enabled:
            # the guest runs on the destination: its vTPCM must be the live one
            nova_id = _migration_id(migrate_data)
            migration_id = self._early.migration_id(nova_id)
            try:
                with livemigration.timed("commit", migration_id, instance.uuid):
                    livemigration.commit(self.vtpcm_engine, migration_id)
                self._early.forget(nova_id)
            except livemigration.IMPORT_CHECK_REFUSALS as err:
                # Raising would leave Nova believing the guest is on the source.
                # Not retried: the engine would refuse (and audit) each retry.
                LOG.error("vTPCM of migration %(mig)s NOT committed: the engine's "
                          "post-import check failed (%(err)s). The guest runs on the "
                          "destination; the vTPCM's authority stays with the source's "
                          "copy until an operator decides: 'vtpcm-manage migration show "
                          "%(mig)s', then 'vtpcm-manage migration resolve %(mig)s'.",
                          {"mig": migration_id, "err": err}, instance=instance)
            except exception.VTPCMException as err:
                # Raising would leave Nova believing the guest is on the source.
                LOG.error("vTPCM commit of migration %(mig)s failed: %(err)s. The guest "
                          "runs on the destination; the migration waits for this host's "
                          "commit (check with 'vtpcm-manage migration show %(mig)s').",
                          {"mig": migration_id, "err": err}, instance=instance)
        super().post_live_migration(context, instance, block_device_info, migrate_data)

    def rollback_live_migration_at_source(self, context: Any, instance: Any,
                                          migrate_data: Any) -> None:
        super().rollback_live_migration_at_source(context, instance, migrate_data)
        if vtpcm_spec(instance.flavor).enabled:
            self._abort(instance, migrate_data, "rolled back by Nova at the source")
            migration = getattr(migrate_data, "migration", None) if migrate_data else None
            if migration is not None and getattr(migration, "uuid", None):
                self._early.forget(str(migration.uuid))

    def rollback_live_migration_at_destination(self, context: Any, instance: Any,
                                               network_info: Any, block_device_info: Any,
                                               destroy_disks: bool = True,
                                               migrate_data: Any = None) -> None:
        super().rollback_live_migration_at_destination(
            context, instance, network_info, block_device_info, destroy_disks,
            migrate_data)
        if vtpcm_spec(instance.flavor).enabled and migrate_data is not None:
            self._abort(instance, migrate_data, "rolled back by Nova at the destination")

    def _abort(self, instance: Any, migrate_data: Any, reason: str) -> None:
        """Abort on a rollback; never raises: Nova's rollback must go on, and
        the engine's reconcile finishes an abort that did not get through."""
        try:
            migration_id = self._early.migration_id(_migration_id(migrate_data))
            self._early.remember_abort(migration_id)  # never taken over again here
            livemigration.abort(self.vtpcm_engine, migration_id, reason,
                                instance_uuid=instance.uuid)
        except (exception.VTPCMException, nova_exception.MigrationError) as err:
            LOG.warning("vTPCM abort on rollback failed: %(err)s", {"err": err},
                        instance=instance)

    # --- cold migration and resize ----------------------------------------------------
    def migrate_disk_and_power_off(self, context: Any, instance: Any, dest: str,
                                   flavor: Any, network_info: Any,
                                   block_device_info: Any = None, timeout: int = 0,
                                   retry_interval: int = 0) -> Any:
        has, wants = vtpcm_spec(instance.flavor).enabled, vtpcm_spec(flavor).enabled
        if has != wants:
            raise nova_exception.InstanceFaultRollback(VTPCMFault(reason=(
                "a resize cannot %s a vTPCM; the guest's TPM belongs to the instance"
                % ("remove" if has else "add"))))
        migration = _resize_migration(context, instance) if has else None
        if migration is None or migration.dest_compute == self.vtpcm_host:
            # no vTPCM, or a resize on this host: the vTPCM stays as it is
            return super().migrate_disk_and_power_off(
                context, instance, dest, flavor, network_info, block_device_info, timeout,
                retry_interval)
        was_running = instance.vm_state == vm_states.ACTIVE
        # the state is read once nothing can change it any more
        self.power_off(instance, timeout, retry_interval)
        try:
            coldmigration.move(self.vtpcm_engine, migration.uuid, instance.uuid,
                               self.vtpcm_host, migration.dest_compute)
        except exception.VTPCMException as err:
            LOG.error("vTPCM of migration %(mig)s refused or failed, rolling back: %(err)s",
                      {"mig": migration.uuid, "err": err}, instance=instance)
            self._restart_on_source(context, instance, network_info, block_device_info,
                                    was_running)
            raise nova_exception.InstanceFaultRollback(VTPCMFault(
                reason="cold migration to %s refused: %s" % (migration.dest_compute, err))) \
                from None
        try:
            return super().migrate_disk_and_power_off(
                context, instance, dest, flavor, network_info, block_device_info, timeout,
                retry_interval)
        except BaseException as err:
            with excutils.save_and_reraise_exception():
                self._revert_quietly(instance, migration.uuid,
                                     "moving the disks failed: %s" % err)
                if isinstance(err, nova_exception.InstanceFaultRollback):
                    self._restart_on_source(context, instance, network_info,
                                            block_device_info, was_running)

    def finish_revert_migration(self, context: Any, instance: Any, network_info: Any,
                                migration: Any, block_device_info: Any = None,
                                power_on: bool = True, share_info: Any = None) -> None:
        if vtpcm_spec(instance.flavor).enabled and _moves_host(migration):
            # before the guest's XML is made: it needs the source's vTPCM back
            try:
                coldmigration.revert(self.vtpcm_engine, migration.uuid,
                                     "resize reverted by Nova")
            except exception.VTPCMException as err:
                raise VTPCMFault(reason="could not take the vTPCM back from %s: %s"
                                 % (migration.dest_compute, err)) from None
        super().finish_revert_migration(context, instance, network_info, migration,
                                        block_device_info, power_on, share_info)

    def confirm_migration(self, context: Any, migration: Any, instance: Any,
                          network_info: Any) -> None:
        if vtpcm_spec(instance.flavor).enabled and _moves_host(migration):
            try:
                coldmigration.confirm(self.vtpcm_engine, migration.uuid)
            except exception.VTPCMException as err:
                # the guest keeps running on the destination's incoming
                # vTPCM; the migration waits for this host's commit
                raise VTPCMFault(reason="vTPCM commit of migration %s failed: %s"
                                 % (migration.uuid, err)) from None
        super().confirm_migration(context, migration, instance, network_info)

    def _restart_on_source(self, context: Any, instance: Any, network_info: Any,
                           block_device_info: Any, was_running: bool) -> None:
        """Undo our power off: Nova's rollback of a refused resize puts the
        instance back ACTIVE but does not start the guest again."""
        if not was_running:
            return
        try:
            self.power_on(context, instance, network_info, block_device_info)
        except Exception as err:  # the refusal is what Nova must see
            LOG.error("Could not restart the guest after the refused migration: %(err)s",
                      {"err": err}, instance=instance)

    def _revert_quietly(self, instance: Any, migration_id: str, reason: str) -> None:
        try:
            coldmigration.revert(self.vtpcm_engine, migration_id, reason)
        except exception.VTPCMException as err:
            LOG.warning("vTPCM abort of migration %(mig)s failed (the engine's deadline "
                        "finishes it): %(err)s", {"mig": migration_id, "err": err},
                        instance=instance)

    # --- placement -----------------------------------------------------------------------
    def update_provider_tree(self, provider_tree: Any, nodename: str,
                             allocations: Any = None) -> None:
        super().update_provider_tree(provider_tree, nodename, allocations=allocations)
        if self._vtpcm_ready():
            provider_tree.add_traits(nodename, TRAIT)
        else:
            provider_tree.remove_traits(nodename, TRAIT)

    def _vtpcm_ready(self) -> bool:
        """Agent healthy and host enrolled and approved; re-checked at most every
        ``[vtpcm] trait_refresh_seconds`` (the periodic task must stay cheap)."""
        checked_at, ready = self._trait
        now = time.monotonic()
        if checked_at and now - checked_at < CONF.vtpcm.trait_refresh_seconds:
            return ready
        try:
            self.vtpcm_agents.health(self.vtpcm_host, timeout=CONF.vtpcm.agent_timeout)
            ready = self.vtpcm_engine.show_host(self.vtpcm_host).status == "APPROVED"
        except exception.VTPCMException as err:
            if ready or not checked_at:
                LOG.warning("vTPCM not available on %(host)s, not reporting %(trait)s: "
                            "%(err)s", {"host": self.vtpcm_host, "trait": TRAIT, "err": err})
            ready = False
        self._trait = (now, ready)
        return ready


# a Migration's fields carry what a driver adds to the check data; the
# destination's hint says with this status that it runs qemu_dac_label
DAC_LABEL_HINT = "vtpcm:qemu_dac_label"
# ... and a source with the option answers with this one that it pins
DAC_LABEL_ACK = "vtpcm:qemu_dac_label:pinned"
ACCELERATOR_VNIC_TYPES = ("accelerator-direct", "accelerator-direct-physical")


def _unsaveable(instance: Any) -> list[str]:
    """What of the instance keeps Nova from suspending it, as its API
    refuses a suspend (block_accelerators, block_port_accelerators)."""
    reasons = []
    if (instance.flavor.extra_specs or {}).get("accel:device_profile"):
        reasons.append("Cyborg accelerators, which Nova does not suspend")
    cache = getattr(instance, "info_cache", None)
    info = cache.network_info if cache is not None else None
    if any(vif.get("vnic_type") in ACCELERATOR_VNIC_TYPES for vif in info or []):
        reasons.append("accelerator ports, which Nova does not suspend")
    return reasons


def _bare_migration(data: Any) -> Any | None:
    """The bare Migration (no uuid: not Nova's) a driver put in the check
    data's ``migration`` field, if any."""
    if data is None or "migration" not in data:
        return None
    bare = data.migration
    if bare is None or bare.obj_attr_is_set("uuid"):
        return None
    return bare


def _bare_status(data: Any) -> str | None:
    """The status of that bare Migration, if it has one."""
    bare = _bare_migration(data)
    if bare is None or not bare.obj_attr_is_set("status"):
        return None
    return str(bare.status)


def _dac_hint(dest_check_data: Any) -> bool:
    """Whether the destination's hint says it runs ``qemu_dac_label`` (read
    before ``_take_dest_hint`` takes the hint out)."""
    return _bare_status(dest_check_data) == DAC_LABEL_HINT


def _unpinning_source(source: str | None, answer: str | None) -> str:
    """Why a destination with ``qemu_dac_label`` refuses a source that did
    not acknowledge its flag: the flag back untouched (a driver that does
    not know it: stock Nova's), or no answer at all (a vtpcm driver from
    before the acknowledgement, whose check takes the flag out)."""
    why = ("it returned this host's flag untouched: it does not run the vtpcm driver"
           if answer == DAC_LABEL_HINT else
           "it did not acknowledge this host's flag: it runs an older vtpcm driver")
    return ("vTPCM: this host runs with [vtpcm] qemu_dac_label and the source %s does not "
            "pin the guest's backing chain (%s): the guest's XML would arrive unpinned, and "
            "this host's libvirt would hand the shared backing files to the guest's QEMU "
            "user under the labelled guests here; upgrade the source to this release and "
            "turn [vtpcm] qemu_dac_label on there first" % (source or "host", why))


def _take_dest_hint(dest_check_data: Any) -> str | None:
    """The destination's name its driver put in the check data, taken out
    again; a Migration with a uuid is not that bare hint and stays."""
    hint = _bare_migration(dest_check_data)
    if hint is None:
        return None
    del dest_check_data.migration
    if not hint.obj_attr_is_set("dest_compute") or not hint.dest_compute:
        return None
    return str(hint.dest_compute)


def _in_progress_migration(instance_uuid: str, source: str) -> str | None:
    """Nova's live migration of the instance from this host whose checks run
    ("accepted": ``MigrationList.get_in_progress_by_instance`` starts at
    "queued"); the newest, should an older one have been left "accepted"
    (a conductor that died in the task)."""
    migrations = objects.MigrationList.get_by_filters(
        nova_context.get_admin_context(),
        {"instance_uuid": instance_uuid, "migration_type": "live-migration",
         "status": ["accepted"], "source_compute": source},
        sort_keys=["created_at", "id"], sort_dirs=["desc", "desc"], limit=1)
    uuids = [str(m.uuid) for m in migrations]
    return uuids[0] if uuids else None


def _not_queued(source: str, instance: Any) -> bool:
    """Whether the instance's live migration begins early: not when it
    would wait in this host's queue with the destination's incoming vTPCM
    prepared (an evacuation: every instance), nor when the queue cannot be
    read (a conductor blip costs the early begin, not the migration);
    ``live_migration`` begins then, when its turn comes."""
    try:
        queued = _queued_behind(source, instance.uuid)
    except Exception as err:  # noqa: BLE001 - whatever the conductor raised
        # the class only: a database or messaging error's text is not ours
        # to vouch for (no secret in any log)
        LOG.warning("vTPCM: live migrations from this host could not be counted "
                    "(%(err)s); no early begin", {"err": type(err).__name__},
                    instance=instance)
        return False
    if queued:
        LOG.info("vTPCM: live migrations from this host are at "
                 "max_concurrent_live_migrations; no early begin", instance=instance)
    return not queued


def _queued_behind(source: str, instance_uuid: str) -> bool:
    """Whether a live migration from ``source`` would wait in its compute
    service's queue (``[DEFAULT] max_concurrent_live_migrations`` of them
    queued or under way), best effort: other instances' live migrations
    from here still in their checks ("accepted") count too, since a host
    evacuation runs all its checks within a second or two, before any is
    queued; one left "accepted" by a dead conductor costs early begins only."""
    limit = int(CONF.max_concurrent_live_migrations)
    if limit <= 0:
        return False
    busy = objects.MigrationList.get_by_filters(
        nova_context.get_admin_context(),
        {"source_compute": source, "migration_type": "live-migration",
         "status": ["accepted", "queued", "preparing", "running", "post-migrating"]},
        limit=limit + 1)
    return len([m for m in busy if str(m.instance_uuid) != instance_uuid]) >= limit


def _migration_status(nova_id: str) -> str | None:
    return str(objects.Migration.get_by_uuid(nova_context.get_admin_context(),
                                             nova_id).status)


def _shreds(instance: Any) -> bool:
    """Delete, or a build that failed before the guest ever ran."""
    return (instance.task_state in _SHRED_TASK_STATES
            or instance.vm_state in (vm_states.BUILDING, vm_states.DELETED,
                                     vm_states.SOFT_DELETED))


def _resize_migration(context: Any, instance: Any) -> Any:
    """Nova's migration record of the resize under way (its uuid is the
    protocol's migration id; Nova passes only the destination's address)."""
    mig_ctx = instance.migration_context
    if mig_ctx is None:
        raise nova_exception.InstanceFaultRollback(VTPCMFault(
            reason="Nova gave no migration record to bind the vTPCM's move to"))
    return objects.Migration.get_by_id(context, mig_ctx.migration_id)


def _moves_host(migration: Any) -> bool:
    return bool(migration.source_compute != migration.dest_compute)


# Nova's evacuation migration while the destination spawns: "accepted",
# then "pre-migrating" once the destination's rebuild claim ran.
EVACUATION_IN_PROGRESS = ("accepted", "pre-migrating")


def _evacuating(instance: Any, host: str) -> bool:
    """A rebuild spawning here is an evacuation only if Nova recorded one
    (an ``evacuation`` migration of this instance to this host, in
    progress): a plain rebuild has the same task state, and must never
    replace the vTPCM of an instance whose holder is another host."""
    if instance.task_state != task_states.REBUILD_SPAWNING:
        return False
    migrations = objects.MigrationList.get_by_filters(
        nova_context.get_admin_context(),
        {"instance_uuid": instance.uuid, "migration_type": "evacuation",
         "status": list(EVACUATION_IN_PROGRESS), "host": host})
    return any(m.dest_compute == host for m in migrations)


def _not_here_reason(instance: Any, err: exception.VTPCMNotHere, evacuating: bool) -> str:
    """Name the Nova operation that tried to run the guest away from its vTPCM."""
    if evacuating:
        return ("evacuate is refused for vTPCM instances: the vTPCM state cannot be read "
                "from the failed host (%s); [vtpcm] evacuate_with_fresh_vtpcm allows it "
                "with a new, empty TPM" % err)
    if instance.vm_state == vm_states.SHELVED_OFFLOADED:
        return ("unshelve onto this host refused: the vTPCM is kept on its host (%s)"
                % err)
    return str(err)
