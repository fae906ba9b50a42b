"""The vTPCM instance manager: one swtpm per VM, its keys and its record.

Order matters for safety and is the same everywhere:
- create: record (CREATING) -> keys -> encrypted state -> STOPPED; a failure
  or a crash in between is cleaned up (``recover``) and leaves no record.
- destroy / commit_outgoing: keys are shredded FIRST (the state on disk is
  then unreadable), then swtpm stops and the files go; the row stays as a
  tombstone that remembers the generation.
- incoming: the migration key is unwrapped inside this host's TPM, a fresh
  at-rest key is made, swtpm starts empty at the instance's socket and QEMU
  fills it from the migration stream.
"""

import contextlib
import dataclasses
import functools
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol, TypeVar

from oslo_log import log as logging

from vtpcm_agent import sealing, uidranges
from vtpcm_agent.association import Association, AssociationList, VTPCMState, floor_advice
from vtpcm_agent.keystore import InstanceKeys, KeyStore
from vtpcm_agent.swtpm import (
    ctrl,
    ctrlproxy,
    firstwrite,
    isolation,
    permall,
    process,
    provision,
    proxyctl,
    uidprocs,
)
from vtpcm_common import exception, fileutil, statedigest

LOG = logging.getLogger(__name__)
S = VTPCMState
PERMANENT_STATE_FILE = "tpm2-00.permall"
OWN_DIRS = "vm"  # <run_dir>/vm/<instance uuid>/: an unprivileged swtpm's sockets
# in that dir with [agent] ctrl_proxy: the socket QEMU reaches (the proxy's)
# and what the proxy saw (``ctrlproxy.read_record``)
PROXY_SOCKET = "qemu.ctrl"
PROXY_RECORD = "ctrlproxy.json"
VOLATILE_STATE_FILE = "tpm2-00.volatilestate"
# <state_root>/captures/: the first permanent state file each incoming
# swtpm wrote (at-rest ciphertext, ``firstwrite``), or why it could not be
# told; the agent's alone (0700), never in a directory a swtpm uid writes
CAPTURES = "captures"
CAPTURE_SUFFIX = ".permall"
AMBIGUOUS_SUFFIX = ".ambiguous"
LOST_IN_RESTART = ("the capture of the first write was lost in an agent restart (the "
                   "state arrived while the agent was down)")
# a capture older than the agent process: no watch saw what happened while
# the agent was down (a second import, ``firstwrite.SUPERSEDED``)
RESTARTED_AFTER_CAPTURE = ("the agent restarted after the capture; a later import cannot "
                           "be excluded")
# fewer uids than this (or than a tenth of the range) left in [agent]
# swtpm_uid_range: a WARNING at the agent's start
UIDS_LOW = 100
# seconds between the watchdog's sweeps of the uids kept aside (a segment
# another user keeps attached goes with its last detach)
KEPT_SWEEP_INTERVAL = 60
# what a guest keeps and loses when its swtpm is restarted (logged for the operator)
RESTART_OUTCOME = (
    "the guest keeps its permanent TPM state (NV indices, EK and its certificates, "
    "persistent keys, hierarchy auth); it lost its volatile state (PCR values, sessions, "
    "loaded transient objects). QEMU does not reconnect to a restarted swtpm: the "
    "guest's TPM answers every command with a failure until the VM is hard-rebooted "
    "(nova reboot --hard); after that it boots with the permanent state and fresh PCRs")


@dataclasses.dataclass(frozen=True)
class Restarted:
    """One crashed swtpm that the agent started again (for reports and tests)."""

    instance_uuid: str
    vtpcm_id: str
    state: str
    old_pid: int | None
    pid: int
    with_state: bool


FoundOutcome = Literal["stopped", "shredded", "discarded", "shred-failed",
                       "discard-failed"]


@dataclasses.dataclass(frozen=True)
class FoundDead:
    """A swtpm that should have run, found dead by an operation that then
    stops expecting it to run (an abort leaves the vTPCM STOPPED, a commit
    shreds the source's copy, an abort discards the incoming one), so the
    watchdog's next pass would never see it as a crash (for reports)."""

    instance_uuid: str
    vtpcm_id: str
    state: str  # the state it died in
    pid: int
    found_by: str
    outcome: FoundOutcome = "stopped"  # what the operation made of the copy


F = TypeVar("F", bound=Callable[..., Any])


def serialized(func: F) -> F:
    """Run one instance's operations one at a time.

    RPC calls arrive on several threads; two calls for one instance (a start
    racing an export, a late seal racing an abort) must not interleave their
    check-then-act steps. Calls for different instances still run in parallel."""
    @functools.wraps(func)
    def inner(self: "InstanceManager", target: Any, *args: Any, **kwargs: Any) -> Any:
        instance_uuid = target if isinstance(target, str) else target.instance_uuid
        with self._lock_for(instance_uuid):
            return func(self, target, *args, **kwargs)
    return inner  # type: ignore[return-value]


class HostTPMLike(Protocol):
    def ecdh_zgen(self, x: bytes, y: bytes) -> bytes: ...


@dataclasses.dataclass(frozen=True)
class AgentSettings:
    """What the instance manager needs from the configuration."""

    host: str
    state_root: Path
    run_dir: Path
    swtpm_binary: str = "swtpm"
    swtpm_setup_binary: str = "swtpm_setup"
    socket_mode: int = 0o660
    socket_uid: int | None = None
    socket_gid: int | None = None
    create_ek: bool = True
    expose_data_socket: bool = False
    max_state_blob_bytes: int = 256 * 1024
    timeout: float = 10.0
    # first and last uid of [agent] swtpm_uid_range; None: swtpm runs as the agent
    swtpm_uids: tuple[int, int] | None = None
    # first and last uid of [agent] qemu_uid_range (as large as swtpm_uids):
    # the QEMU uid of the VM whose swtpm runs as swtpm_uids[0] + i is
    # qemu_uids[0] + i; None: no QEMU uids
    qemu_uids: tuple[int, int] | None = None
    # /etc/subuid and /etc/subgid: no QEMU uid implied by the recorded qemu
    # FIRST while qemu_uids is None may fall in one of their blocks
    subid_files: tuple[Path, ...] = uidranges.SUBID_FILES
    # [agent] ctrl_proxy: QEMU reaches each swtpm through ``ctrlproxy``
    # (needs swtpm_uids)
    ctrl_proxy: bool = False


# a destination answer's reason when its proxy refused a request or swtpm a blob
PROXY_REFUSED = "the control-channel proxy refused state"
# ... or when its proxy did not see a whole import of the stream
PROXY_INCOMPLETE = "the control-channel proxy saw no complete import"


class StateDigests(NamedTuple):
    """One side's answer to the post-import check: the permanent state's
    digest and the proxy's stream digest, each None with a reason."""

    digest: bytes | None
    reason: str
    stream: bytes | None
    stream_reason: str


def capture_owner(name: str) -> str:
    """The vTPCM id a file of the captures dir belongs to: ``<id><suffix>``,
    or ``write_atomic``'s ``.<id><suffix>.<hex>.tmp`` (vTPCM ids are uuids:
    no dot); "" for anything else."""
    if name.startswith("."):
        if not name.endswith(".tmp") or name.count(".") < 4:
            return ""
        name = name[1:].rsplit(".", 2)[0]
    return name.split(".", 1)[0]


class InstanceManager:
    def __init__(self, settings: AgentSettings, associations: AssociationList,
                 keystore: KeyStore, host_tpm: HostTPMLike | None = None) -> None:
        self.settings = settings
        self.associations = associations
        self.keystore = keystore
        self.host_tpm = host_tpm
        self._locks: dict[str, threading.RLock] = {}
        self._locks_guard = threading.Lock()
        # the swtpm of each instance this agent started or adopted, pinned
        # (pid, start time) when it did: the shredding path decides on it
        # alone, never on a pid file, socket or argv the swtpm uid controls
        # (review round 3 of the sweep, MEDIUM 1)
        self._pins: dict[str, uidprocs.Pin] = {}
        # told of every swtpm restart (the watchdog logs and reports it);
        # called under the instance's lock, so it must not block
        self.on_restart: Callable[[Restarted], None] | None = None
        # told of every crashed swtpm an operation found and settled into a
        # state no watchdog pass looks at (the abort of a migration whose
        # source swtpm died a moment earlier), after the settled state is
        # written (or, with a *-failed outcome, when the operation failed);
        # called under the instance's lock, must not block; what it raises
        # is logged, never fails the operation
        self.on_found_dead: Callable[[FoundDead], None] | None = None
        # the first-write watch of each incoming vTPCM, by vtpcm id
        self._watches: dict[str, firstwrite.FirstWriteWatch] = {}
        self._watches_guard = threading.Lock()
        # tests inject a slow reader here (``firstwrite.FirstWriteWatch``)
        self.capture_opener: firstwrite.Opener = firstwrite.read_state_file
        for sub in ("vtpcms", "logs", "localca", CAPTURES):
            (settings.state_root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        settings.run_dir.mkdir(parents=True, exist_ok=True)
        # QEMU (another user) must traverse it to reach its socket.
        os.chmod(settings.run_dir, 0o755)  # noqa: S103
        if settings.swtpm_uids is not None:
            # each swtpm reaches its own state dir and log file (traverse
            # only: no listing); keys/ and localca/ stay the agent's alone
            for path in (settings.state_root, settings.state_root / "vtpcms",
                         settings.state_root / "logs"):
                os.chmod(path, 0o711)  # noqa: S103
            (settings.run_dir / OWN_DIRS).mkdir(exist_ok=True)
            os.chmod(settings.run_dir / OWN_DIRS, 0o755)  # noqa: S103
        if settings.ctrl_proxy and settings.swtpm_uids is None:
            LOG.error("Refusing to start: [agent] ctrl_proxy needs swtpm_uid_range")
            raise exception.InvalidInput(reason="[agent] ctrl_proxy needs swtpm_uid_range")
        try:
            if settings.swtpm_uids is None:
                self._check_no_uid_held()
            else:
                associations.check_range_firsts(
                    settings.swtpm_uids[0],
                    None if settings.qemu_uids is None else settings.qemu_uids[0],
                    swtpm_last=settings.swtpm_uids[1],
                    qemu_last=None if settings.qemu_uids is None else settings.qemu_uids[1])
                if settings.qemu_uids is None:
                    self._check_implied_qemu_uids(settings.swtpm_uids)
        except exception.InvalidInput as err:
            LOG.error("Refusing to start: %s", err.message)
            raise
        if settings.swtpm_uids is not None:
            self.check_uid_range()

    def _check_no_uid_held(self) -> None:
        """With ``swtpm_uid_range`` unset, no swtpm uid may be in use or
        kept aside: destroy and the sweep of kept uids act on uids only with
        the range set, so such a VM's swtpm and QEMU uids would never be
        killed or swept again (review of the DAC label round 4, LOW 5)."""
        in_use, kept = self.associations.held_uids()
        if not in_use and not kept:
            return
        firsts = self.associations.range_firsts()
        held = [what % uidprocs.some(uids) for what, uids in
                (("in use (%s)", in_use), ("kept aside (%s)", kept)) if uids]
        raise exception.InvalidInput(reason=(
            "[agent] swtpm_uid_range is unset, but swtpm uids are %s: their swtpm and "
            "QEMU processes would no longer be killed, nor their files swept, when their "
            "vTPCMs go; set swtpm_uid_range back%s; to turn it off, first destroy or "
            "migrate away every vTPCM whose swtpm runs as a uid of its own and wait until "
            "the agent logs each kept uid freed"
            % (" and ".join(held),
               "" if firsts is None else " (its FIRST was %d)" % firsts[0])))

    def _check_implied_qemu_uids(self, swtpm: tuple[int, int]) -> None:
        """With ``qemu_uid_range`` unset but a qemu FIRST recorded (uids
        were given out under it), every uid of today's swtpm range is still
        paired with a QEMU uid (``qemu_uid_for``), killed and swept with it:
        those QEMU uids get the checks ``qemu_uid_range`` gets (no account,
        no systemd or subordinate id range, not 65535, not overlapping the
        swtpm range). A swtpm LAST raised while the option was unset paired
        new VMs with unchecked uids, another VM's swtpm uid among them
        (review of the DAC label round 4, MEDIUM 1)."""
        firsts = self.associations.range_firsts()
        if firsts is None or firsts[1] is None:
            return
        qemu = (firsts[1], firsts[1] + swtpm[1] - firsts[0])
        try:
            uidranges.qemu_uid_range("%d-%d" % qemu, swtpm, self.settings.subid_files)
        except exception.InvalidInput as err:
            raise exception.InvalidInput(reason=(
                "[agent] swtpm_uid_range %d-%d pairs its uids with the QEMU uids %d-%d "
                "(qemu_uid_range is unset, but uids were given out while it started at "
                "%d: a VM's QEMU uid is still computed from that FIRST, and killed and "
                "swept with its swtpm uid), and those are not free: %s; keep "
                "swtpm_uid_range's LAST so that the QEMU uids it implies stay free "
                "(checked as qemu_uid_range is), or set qemu_uid_range again"
                % (swtpm + qemu + (qemu[0], err.kwargs.get("reason", err.message))))
            ) from None

    def check_uid_range(self) -> int:
        """At the agent's start: an ERROR if no uid of ``[agent]
        swtpm_uid_range`` can be given out (every create would fail), a
        WARNING if few are left (fewer than ``UIDS_LOW`` or a tenth of
        the range). How many are left."""
        if self.settings.swtpm_uids is None:
            return 0
        first, last = self.settings.swtpm_uids
        left, floor = self.associations.uid_headroom(first, last)
        if left == 0:
            LOG.error("No swtpm uid can be given out: creating or migrating in a vTPCM will "
                      "fail. %s", floor_advice(first, last, *floor)
                      if floor is not None and floor[0] >= last else
                      "[agent] swtpm_uid_range %d-%d is used up (a uid is never given out "
                      "twice); widen the range (raise LAST, or give uids above it)"
                      % (first, last))
        elif left < max(UIDS_LOW, (last - first + 1) // 10):
            LOG.warning("Only %(left)d uid(s) of [agent] swtpm_uid_range %(first)d-%(last)d "
                        "are left to give out (a uid is never given out twice: one per "
                        "vTPCM created or migrated in); widen the range (raise LAST) before "
                        "it is used up", {"left": left, "first": first, "last": last})
        return left

    def _lock_for(self, instance_uuid: str) -> threading.RLock:
        with self._locks_guard:
            return self._locks.setdefault(instance_uuid, threading.RLock())

    # --- paths -------------------------------------------------------------

    def paths(self, instance_uuid: str, vtpcm_id: str) -> process.SwtpmPaths:
        """Where swtpm itself keeps its files. Run as the agent, its sockets
        are the public ones; run as its own uid (``swtpm_uids``), they are in
        a directory of that uid and the public paths link to them (an
        unprivileged swtpm cannot bind in the agent's run_dir, and a
        directory all swtpm uids could write would let one squat another's
        socket name)."""
        run = self.settings.run_dir
        state_dir = self.settings.state_root / "vtpcms" / vtpcm_id
        log_file = self.settings.state_root / "logs" / (vtpcm_id + ".log")
        if self.settings.swtpm_uids is None:
            data = run / instance_uuid if self.settings.expose_data_socket else None
            return process.SwtpmPaths(
                state_dir=state_dir, ctrl_socket=self.public_ctrl_socket(instance_uuid),
                pid_file=run / (instance_uuid + ".pid"), log_file=log_file,
                data_socket=data)
        own = run / OWN_DIRS / instance_uuid
        return process.SwtpmPaths(
            state_dir=state_dir, ctrl_socket=own / "tpm.ctrl", pid_file=own / "swtpm.pid",
            log_file=log_file,
            data_socket=own / "tpm" if self.settings.expose_data_socket else None)

    def public_ctrl_socket(self, instance_uuid: str) -> Path:
        """The control socket QEMU is given: ``<run_dir>/<instance uuid>.ctrl``."""
        return self.settings.run_dir / (instance_uuid + ".ctrl")

    def proxy_socket(self, instance_uuid: str) -> Path:
        """The control-channel proxy's socket, which the public path links
        to with ``ctrl_proxy``."""
        return self.settings.run_dir / OWN_DIRS / instance_uuid / PROXY_SOCKET

    def proxy_record(self, instance_uuid: str) -> Path:
        return self.settings.run_dir / OWN_DIRS / instance_uuid / PROXY_RECORD

    def _paths_of(self, assoc: Association) -> process.SwtpmPaths:
        return self.paths(assoc.instance_uuid, assoc.vtpcm_id)

    # --- queries -------------------------------------------------------------

    def get(self, instance_uuid: str) -> Association:
        return self.associations.get(instance_uuid)

    def list_vtpcms(self) -> list[Association]:
        return self.associations.list()

    def holds_state(self, assoc: Association) -> bool:
        """Whether the vTPCM's permanent state exists (an incoming one: it
        received the state), for the engine's resolve --to destination."""
        return self._received_state(assoc)

    def is_running(self, assoc: Association) -> bool:
        return assoc.pid is not None and process.is_alive(assoc.pid, self._paths_of(assoc))

    def crashed(self) -> list[str]:
        """Instances whose swtpm should run (ACTIVE, migrating) but died,
        leaving its pid file or socket behind (a clean exit, QEMU's
        CMD_SHUTDOWN, is no crash: the VM's next start starts it)."""
        return [a.instance_uuid for a in self.associations.list()
                if a.state in (S.ACTIVE, S.MIGRATING_OUT, S.MIGRATING_IN)
                and self.swtpm_died(a)]

    def busy(self, instance_uuid: str) -> bool:
        """An operation holds the instance now (for the watchdog: a crash it
        reported is not forgotten while an operation may still be settling
        it and about to report it, ``on_found_dead``)."""
        lock = self._lock_for(instance_uuid)
        if not lock.acquire(blocking=False):
            return True
        lock.release()
        return False

    def swtpm_died(self, assoc: Association) -> bool:
        """The record's swtpm crashed (also for the watchdog, which rechecks
        what ``crashed`` listed: a hard reboot may have started it since)."""
        return (assoc.pid is not None and not self.is_running(assoc)
                and process.left_behind(self._paths_of(assoc)))

    @contextlib.contextmanager
    def _crash_reported(self, assoc: Association, found_by: str, outcome: FoundOutcome,
                        failed: FoundOutcome | None = None) -> Iterator[None]:
        """Around an operation that settles ``assoc`` where no watchdog pass
        looks: a swtpm that had crashed (as ``crashed`` decides) is told to
        ``on_found_dead`` once the operation is done, as ``outcome``; if it
        raises, as ``failed`` (None: not told, its retry finds it again)."""
        dead = None
        try:
            if assoc.pid is not None and self.swtpm_died(assoc):
                dead = FoundDead(instance_uuid=assoc.instance_uuid, vtpcm_id=assoc.vtpcm_id,
                                 state=assoc.state.value, pid=assoc.pid, found_by=found_by,
                                 outcome=outcome)
        except OSError as err:  # a report must never fail the operation
            LOG.error("Could not tell whether the swtpm of instance %(instance)s crashed "
                      "(%(err)s); not reported", {"instance": assoc.instance_uuid,
                                                 "err": type(err).__name__})
        try:
            yield
        except BaseException:
            if failed is not None:
                self._report_found(dead, failed=failed)
            raise
        self._report_found(dead)

    def _report_found(self, dead: FoundDead | None,
                      failed: FoundOutcome | None = None) -> None:
        """Tell ``on_found_dead`` of ``dead`` (``failed``: the operation
        raised, the outcome it reports instead)."""
        if dead is None or self.on_found_dead is None:
            return
        if failed is not None:
            dead = dataclasses.replace(dead, outcome=failed)
        try:
            self.on_found_dead(dead)
        except Exception as err:  # noqa: BLE001 - the operation it follows is done
            LOG.error("Could not report the crashed swtpm of instance %(instance)s found "
                      "by %(by)s (%(err)s)", {"instance": dead.instance_uuid,
                                              "by": dead.found_by, "err": type(err).__name__})

    def _settle_running(self, assoc: Association, found_by: str, **changes: Any) -> Association:
        """The outgoing copy live again: ACTIVE if its swtpm runs, else
        STOPPED with no pid (as ``stop`` leaves it). A swtpm that crashed
        is reported once STOPPED is written: no pass takes a STOPPED vTPCM
        for a crash, and the kill of a source swtpm during the copy is
        aborted within a second, before the next pass (found by the e2e
        lab cell under CI load)."""
        if self.is_running(assoc):
            return self.associations.transition(
                assoc.instance_uuid, S.ACTIVE, expected=frozenset({S.MIGRATING_OUT}),
                migration_id=None, **changes)
        with self._crash_reported(assoc, found_by, "stopped"):
            return self.associations.transition(
                assoc.instance_uuid, S.STOPPED, expected=frozenset({S.MIGRATING_OUT}),
                migration_id=None, pid=None, **changes)

    # --- lifecycle -----------------------------------------------------------

    @serialized
    def create(self, instance_uuid: str) -> Association:
        """Create a vTPCM whose state is encrypted from its first byte."""
        existing = self.associations.find(instance_uuid)
        if existing is not None and existing.state is not S.DESTROYED:
            raise exception.AlreadyExists(what="vTPCM of instance", key=instance_uuid)
        tombstone = self.associations.tombstone(instance_uuid)
        generation = tombstone + 1 if tombstone is not None else 0
        vtpcm_id = str(uuid.uuid4())
        paths = self.paths(instance_uuid, vtpcm_id)
        self.associations.add(
            instance_uuid=instance_uuid, vtpcm_id=vtpcm_id, state=S.CREATING,
            generation=generation, state_dir=str(paths.state_dir),
            ctrl_socket=str(self.public_ctrl_socket(instance_uuid)))
        try:
            keys = InstanceKeys.generate()
            self.keystore.put(vtpcm_id, keys)
            provision.provision_state(
                paths.state_dir, keys.at_rest_key, vtpcm_id=vtpcm_id,
                create_ek=self.settings.create_ek,
                localca_dir=self.settings.state_root / "localca",
                swtpm_setup_binary=self.settings.swtpm_setup_binary)
        except BaseException:
            self._discard(instance_uuid, vtpcm_id, paths)
            raise
        return self.associations.transition(instance_uuid, S.STOPPED)

    @serialized
    def start(self, instance_uuid: str) -> Association:
        """Start (or re-adopt) the swtpm of a STOPPED or ACTIVE vTPCM; also
        the way back for one whose swtpm died (the guest's hard reboot):
        from its permanent state, never an empty TPM in its place. An
        incoming vTPCM that received its state is started too (a resized
        guest stopped before the confirm; the engine asks only then): it
        stays MIGRATING_IN, at its generation, with its state."""
        assoc = self.associations.get(instance_uuid)
        if assoc.state in (S.ACTIVE, S.MIGRATING_IN) and self.is_running(assoc):
            if assoc.pid is not None:
                # one that went missing (a failed start after an import); a
                # guest whose QEMU attached before the option keeps starting
                try:
                    self._ensure_proxy(instance_uuid, self._paths_of(assoc), assoc.pid,
                                       stream_import=(assoc.state is S.MIGRATING_IN
                                                      and not self._received_state(assoc)))
                except (exception.VTPCMException, OSError, ValueError) as exc:
                    public = self.public_ctrl_socket(instance_uuid)
                    if (public.is_symlink()
                            and Path(os.readlink(public)) == self.proxy_socket(instance_uuid)):
                        raise  # a new QEMU would find no one at its socket
                    # a guest whose QEMU attached straight to swtpm (started
                    # before the option) keeps running as it is
                    LOG.error("Could not start the control-channel proxy of instance "
                              "%(inst)s; its guest keeps its direct connection: %(err)s",
                              {"inst": instance_uuid,
                               "err": getattr(exc, "message", None) or str(exc)})
            return assoc
        if assoc.state is S.MIGRATING_IN:
            if not self._received_state(assoc):
                raise exception.MigrationError(
                    migration_id=assoc.migration_id or "(none)",
                    reason="the incoming vTPCM of instance %s has not received its "
                           "state; refusing to start it" % instance_uuid)
            # as a stopped vTPCM starts: its state is on disk now
            pid = self._spawn(assoc, self.keystore.get(assoc.vtpcm_id))
            return self.associations.set_pid(instance_uuid, pid)
        if assoc.state not in (S.STOPPED, S.ACTIVE):
            raise exception.InvalidTransition(
                what="vTPCM of instance", key=instance_uuid, current=assoc.state.value,
                target=S.ACTIVE.value)
        if not self._received_state(assoc):
            raise exception.SwtpmError(
                vtpcm_id=assoc.vtpcm_id,
                reason="its permanent state file is missing; not starting an empty TPM "
                       "in its place")
        paths = self._paths_of(assoc)
        if process.find_running(paths) is None:
            keys = self._new_migration_key(assoc)
        else:  # re-adopted after an agent restart: it keeps the key it runs with
            keys = self.keystore.get(assoc.vtpcm_id)
        pid = self._spawn(assoc, keys)
        return self.associations.transition(
            instance_uuid, S.ACTIVE, expected=frozenset({S.STOPPED, S.ACTIVE}), pid=pid)

    def _new_migration_key(self, assoc: Association) -> InstanceKeys:
        """A fresh migration key for a swtpm about to start (a key epoch).

        swtpm 0.7.1 takes the migration key only at start and opens any
        blob sealed under it, of any generation: a migration stream captured
        earlier is only good until the next start. Stored (atomically)
        before swtpm starts, so a crash between leaves a key no blob uses."""
        keys = self.keystore.get(assoc.vtpcm_id)
        fresh = InstanceKeys(at_rest_key=keys.at_rest_key,
                             migration_key=InstanceKeys.generate().migration_key)
        self.keystore.put(assoc.vtpcm_id, fresh, replace=True)
        LOG.info("vTPCM %(vtpcm)s of instance %(instance)s starts a new migration key "
                 "epoch", {"vtpcm": assoc.vtpcm_id, "instance": assoc.instance_uuid})
        return fresh

    @serialized
    def stop(self, instance_uuid: str) -> Association:
        assoc = self.associations.get(instance_uuid)
        if assoc.state is S.STOPPED:
            return assoc
        if assoc.state is not S.ACTIVE:
            raise exception.InvalidTransition(
                what="vTPCM of instance", key=instance_uuid, current=assoc.state.value,
                target=S.STOPPED.value)
        self._kill(assoc)
        return self.associations.transition(
            instance_uuid, S.STOPPED, expected=frozenset({S.ACTIVE}), pid=None)

    @serialized
    def destroy(self, instance_uuid: str) -> Association:
        """Crypto-shred: the swtpm and its uid's processes killed first
        (survivors of the uid do not stop it once the swtpm is gone,
        ``_kill``), then the keys, then the state and the uid's files."""
        assoc = self.associations.get(instance_uuid)
        if assoc.state is S.DESTROYED:
            return assoc
        if assoc.state in (S.MIGRATING_OUT, S.MIGRATING_IN):
            raise exception.InvalidTransition(
                what="vTPCM of instance", key=instance_uuid, current=assoc.state.value,
                target=S.DESTROYED.value)
        # also a swtpm that a STOPPED record may still have; processes of
        # its uid that outlive it do not stop the shred (``_kill``)
        self._kill(assoc, shredding=True)
        if assoc.state is S.ACTIVE:
            assoc = self.associations.transition(
                instance_uuid, S.STOPPED, expected=frozenset({S.ACTIVE}), pid=None)
        self._shred(assoc)
        return self.associations.transition(instance_uuid, S.DESTROYED, pid=None)

    # --- state collector -----------------------------------------------------

    @serialized
    def export_state(self, instance_uuid: str) -> tuple[Association, ctrl.ExportedState]:
        """Blobs of a vTPCM that QEMU is not attached to, encrypted by swtpm
        under the migration key. A stopped vTPCM is started for the read and
        stopped again."""
        assoc = self.associations.get(instance_uuid)
        if assoc.state not in (S.ACTIVE, S.STOPPED, S.MIGRATING_OUT):
            raise exception.InvalidTransition(
                what="vTPCM of instance", key=instance_uuid, current=assoc.state.value,
                target="export")
        paths = self._paths_of(assoc)
        if self.is_running(assoc):
            return assoc, ctrl.export_state(paths.ctrl_socket, timeout=self.settings.timeout,
                                           peer_uid=process.owner(paths))
        pid = self._spawn(assoc, self.keystore.get(assoc.vtpcm_id), with_proxy=False)
        try:
            return assoc, ctrl.export_state(paths.ctrl_socket, timeout=self.settings.timeout,
                                           peer_uid=process.owner(paths))
        finally:
            process.stop(pid, paths, timeout=self.settings.timeout)

    @serialized
    def import_state(self, instance_uuid: str, migration_id: str | None, generation: int,
                     state: ctrl.ExportedState) -> Association:
        """Set exported blobs into this host's incoming vTPCM of the instance.

        Only into a vTPCM prepared for that very migration (same migration
        key), at the same generation, and only once: blobs exported earlier
        can never be set over a vTPCM that already has state (no rollback).
        A refused import discards the incoming swtpm's state and restarts it
        empty, so the migration can still be retried or aborted."""
        assoc = self.associations.get(instance_uuid)
        if assoc.state is not S.MIGRATING_IN:
            raise exception.InvalidTransition(
                what="vTPCM of instance", key=instance_uuid, current=assoc.state.value,
                target="import")
        if migration_id != assoc.migration_id:
            raise exception.MigrationError(
                migration_id=migration_id or "(none)",
                reason="the incoming vTPCM of instance %s was prepared for migration %s"
                % (instance_uuid, assoc.migration_id))
        if generation != assoc.generation:
            raise exception.GenerationMismatch(
                instance_uuid=instance_uuid, given=generation, expected=assoc.generation)
        paths = self._paths_of(assoc)
        if self._received_state(assoc):
            raise exception.StateImportError(
                vtpcm_id=assoc.vtpcm_id, reason="this vTPCM already holds state")
        size = len(state.permanent) + len(state.volatile)
        if size > self.settings.max_state_blob_bytes:
            raise exception.StateImportError(
                vtpcm_id=assoc.vtpcm_id,
                reason="state of %d bytes exceeds the limit of %d"
                % (size, self.settings.max_state_blob_bytes))
        keys = self.keystore.get(assoc.vtpcm_id)
        # bad blobs are refused before anything is stopped (review round 5)
        try:
            ctrl.validate_import(state, self.settings.max_state_blob_bytes)
        except exception.InvalidInput as exc:
            # the same words as transfer.import_state's refusal
            raise exception.StateImportError(vtpcm_id=assoc.vtpcm_id,
                                             reason=exc.message) from None
        # no client may reach swtpm while the agent imports, nor a stream
        # after it (a source that signs a transfer during a live migration):
        # its proxy is stopped first and a closed one started only once the
        # import is done (review rounds 2 and 3 of the proxy)
        if self.settings.ctrl_proxy:
            # a fresh swtpm, whatever the record's pid says: the one
            # prepare_incoming started behind an open proxy may hold a data
            # channel a client of that proxy passed it (SET_DATAFD: the
            # guest's TPM to whoever sent it, review round 4, MEDIUM 1), or a
            # stream's INIT still queued (round 4, LOW 2)
            self._stop_proxy(assoc)
            self._kill(assoc)
            assoc = self.associations.set_pid(instance_uuid, None)
            if self._received_state(assoc):
                # a stream's import landed before the kill (a source that
                # signed a transfer during its live migration): refused, and
                # its swtpm restarted behind a closed proxy; its post-import
                # check cannot pass (the proxy's record is new, the capture
                # superseded): an operator resolves the migration
                assoc = self.associations.set_pid(
                    instance_uuid, self._spawn_paths(instance_uuid, paths, keys,
                                                     startup_clear=False, with_proxy=False))
                self._proxy_or_warn(assoc, paths)
                raise exception.StateImportError(
                    vtpcm_id=assoc.vtpcm_id, reason="this vTPCM already holds state")
        if not self.is_running(assoc):
            assoc = self.associations.set_pid(
                instance_uuid, self._spawn_paths(instance_uuid, paths, keys,
                                                 startup_clear=False, with_proxy=False))
        try:
            ctrl.import_state(paths.ctrl_socket, state, timeout=self.settings.timeout,
                              vtpcm_id=assoc.vtpcm_id,
                              max_blob_size=self.settings.max_state_blob_bytes,
                              empty_target=True, peer_uid=process.owner(paths))
        except exception.VTPCMException:
            self._kill(assoc)
            assoc = self.associations.set_pid(instance_uuid, None)
            self._drop_capture(assoc.vtpcm_id)
            shutil.rmtree(paths.state_dir)
            paths.state_dir.mkdir(mode=0o700)
            self._arm_capture(assoc.vtpcm_id, paths.state_dir)
            assoc = self.associations.set_pid(
                instance_uuid, self._spawn_paths(instance_uuid, paths, keys,
                                                 startup_clear=False, with_proxy=False))
            # the import's error is what the caller sees, not the proxy's
            self._proxy_or_warn(assoc, paths)
            raise
        LOG.info("Imported state into vTPCM %(vtpcm)s of instance %(instance)s",
                 {"vtpcm": assoc.vtpcm_id, "instance": instance_uuid})
        # the state is in: the import stands even if its proxy does not
        # start (a retry would be refused); the guest's start tries again
        self._proxy_or_warn(assoc, paths)
        # the only import it takes (a second is refused above): the guest's
        # start on it before the confirm (CMD_INIT) supersedes nothing
        watch = self._watches.get(assoc.vtpcm_id)
        if watch is not None and not watch.settle(self.settings.timeout):
            LOG.warning("Incoming vTPCM %(vtpcm)s: its first write was not captured at the "
                        "end of the import; a later start of its guest makes its post-import "
                        "check answer none", {"vtpcm": assoc.vtpcm_id})
        return assoc

    # --- migration (source side) ----------------------------------------------

    @serialized
    def seal_migration_key(self, ctx: sealing.SealContext, dest_kem_public: bytes) -> bytes:
        """Mark MIGRATING_OUT and seal the migration key to dest's TPM KEM key."""
        if ctx.source_host != self.settings.host or ctx.dest_host == self.settings.host:
            raise exception.MigrationError(
                migration_id=ctx.migration_id,
                reason="this host is %s, the request names source %s and destination %s"
                % (self.settings.host, ctx.source_host, ctx.dest_host))
        self._refuse_aborted(ctx)
        assoc = self.associations.get(ctx.instance_uuid)
        self._check_generation(assoc, ctx)
        if assoc.state is S.MIGRATING_OUT:
            if assoc.migration_id != ctx.migration_id:
                raise exception.MigrationError(
                    migration_id=ctx.migration_id,
                    reason="the vTPCM is already migrating out in migration %s"
                    % assoc.migration_id)
        else:
            assoc = self.associations.transition(
                ctx.instance_uuid, S.MIGRATING_OUT,
                expected=frozenset({S.ACTIVE, S.STOPPED}), migration_id=ctx.migration_id)
        keys = self.keystore.get(assoc.vtpcm_id)
        envelope = sealing.seal(dest_kem_public, keys.migration_key, ctx)
        self.associations.record_seal(ctx.migration_id, ctx.instance_uuid, ctx.generation,
                                      ctx.dest_host)
        LOG.info("Sealed the migration key of instance %(instance)s for host %(dest)s "
                 "(migration %(mig)s, generation %(gen)d)",
                 {"instance": ctx.instance_uuid, "dest": ctx.dest_host,
                  "mig": ctx.migration_id, "gen": ctx.generation})
        return envelope

    @serialized
    def commit_outgoing(self, ctx: sealing.SealContext) -> Association:
        assoc = self.associations.get(ctx.instance_uuid)
        if assoc.state is S.DESTROYED and assoc.migration_id == ctx.migration_id:
            return assoc
        self._check_migration(assoc, ctx, S.MIGRATING_OUT)
        # a shred that failed half-way took the pid file: reported as failed
        with self._crash_reported(assoc, "the commit of migration %s" % ctx.migration_id,
                                  "shredded", failed="shred-failed"):
            self._kill(assoc, shredding=True)
            self._shred(assoc)
            return self.associations.transition(
                ctx.instance_uuid, S.DESTROYED, expected=frozenset({S.MIGRATING_OUT}),
                pid=None)

    @serialized
    def abort_outgoing(self, ctx: sealing.SealContext) -> Association:
        """The source's copy is live again, not out for this migration.

        A live (ACTIVE, STOPPED) vTPCM is left as it is, whatever migration
        id it carries: that is the migration it arrived with (kept by
        ``commit_incoming``), never this one, whose seal either never ran
        here or was undone already. Refusing it wedged the abort of a begin
        whose seal never reached this agent (an engine killed before it, a
        seal timed out) in RESTORING for good, found under load
        (tests/functional/engine/test_load.py). The aborted id is recorded
        first, so a seal still on its way is refused."""
        self.associations.record_aborted(ctx.migration_id, ctx.instance_uuid)
        assoc = self.associations.get(ctx.instance_uuid)
        if assoc.state in (S.ACTIVE, S.STOPPED):
            return assoc
        self._check_migration(assoc, ctx, S.MIGRATING_OUT)
        return self._settle_running(assoc, "the abort of migration %s" % ctx.migration_id)

    @serialized
    def reclaim_outgoing(self, ctx: sealing.SealContext, generation: int) -> Association:
        """An operator's rollback past the commit point (the destination
        died before committing): the outgoing copy, intact here, is live
        again at ``generation``, which must be above the destination's
        ``ctx.generation + 1``, so the copy left there can never pass for
        it. Idempotent: a retry finds it done."""
        if generation <= ctx.generation + 1:
            raise exception.GenerationMismatch(
                instance_uuid=ctx.instance_uuid, given=generation,
                expected="> %d" % (ctx.generation + 1))
        self.associations.record_aborted(ctx.migration_id, ctx.instance_uuid)
        assoc = self.associations.get(ctx.instance_uuid)
        if assoc.state in (S.ACTIVE, S.STOPPED) and assoc.migration_id is None \
                and assoc.generation == generation:
            return assoc
        self._check_migration(assoc, ctx, S.MIGRATING_OUT)
        return self._settle_running(
            assoc, "the operator's rollback of migration %s" % ctx.migration_id,
            generation=generation)

    # --- migration (destination side) ------------------------------------------

    @serialized
    def prepare_incoming(self, ctx: sealing.SealContext, envelope: bytes) -> Association:
        """Unwrap the key in this host's TPM and start an empty swtpm for QEMU."""
        if ctx.dest_host != self.settings.host:
            raise exception.MigrationError(
                migration_id=ctx.migration_id,
                reason="this host is %s, not the destination %s"
                % (self.settings.host, ctx.dest_host))
        if self.host_tpm is None:
            raise exception.HostTPMError(reason="this agent has no host TPM configured")
        self._refuse_aborted(ctx)
        existing = self.associations.find(ctx.instance_uuid)
        if (existing is not None and existing.state is S.MIGRATING_IN
                and existing.migration_id == ctx.migration_id):
            return existing
        if existing is not None and existing.state is not S.DESTROYED:
            raise exception.AlreadyExists(what="vTPCM of instance", key=ctx.instance_uuid)
        migration_key = sealing.open_envelope(envelope, ctx, self.host_tpm.ecdh_zgen)
        keys = InstanceKeys(at_rest_key=InstanceKeys.generate().at_rest_key,
                            migration_key=migration_key)
        vtpcm_id = str(uuid.uuid4())
        paths = self.paths(ctx.instance_uuid, vtpcm_id)
        self.associations.add(
            instance_uuid=ctx.instance_uuid, vtpcm_id=vtpcm_id, state=S.MIGRATING_IN,
            generation=ctx.generation, state_dir=str(paths.state_dir),
            ctrl_socket=str(self.public_ctrl_socket(ctx.instance_uuid)),
            migration_id=ctx.migration_id)
        try:
            self.keystore.put(vtpcm_id, keys)
            paths.state_dir.mkdir(parents=True, mode=0o700)
            # watched before its swtpm exists: its first write is queued
            self._arm_capture(vtpcm_id, paths.state_dir)
            # Empty and never initialized: QEMU (or import_state) brings the state.
            pid = self._spawn_paths(ctx.instance_uuid, paths, keys, startup_clear=False,
                                    stream_import=True)
        except BaseException:
            self._discard(ctx.instance_uuid, vtpcm_id, paths)
            raise
        return self.associations.set_pid(ctx.instance_uuid, pid)

    @serialized
    def commit_incoming(self, ctx: sealing.SealContext) -> Association:
        """The incoming vTPCM becomes the live one at generation + 1.

        It must hold its state (set by QEMU or ``import_state``). Past the
        commit point it is the authority, and refusing would wedge the
        commit for good, so a swtpm that is not running is no refusal:

        * it exited cleanly (QEMU's CMD_SHUTDOWN: the guest stopped on the
          destination before the confirm, or the agent's own stop): it
          commits STOPPED, as a powered-off guest's vTPCM is, and the
          guest's next start starts it; a swtpm started now would serve no
          guest, only whoever opens its socket;
        * it crashed (left its pid file or socket): it is started again
          first, as before (the convergence rule)."""
        assoc = self.associations.get(ctx.instance_uuid)
        if (assoc.state in (S.ACTIVE, S.STOPPED) and assoc.generation == ctx.generation + 1
                and assoc.migration_id == ctx.migration_id):
            self._drop_capture(assoc.vtpcm_id)  # a retry after a crash in between
            return assoc
        self._check_migration(assoc, ctx, S.MIGRATING_IN)
        if (not self.is_running(assoc) and self._received_state(assoc)
                and not process.left_behind(self._paths_of(assoc))):
            LOG.info("Incoming vTPCM of instance %(i)s: its swtpm exited cleanly (the "
                     "guest stopped); committed STOPPED at generation %(g)d",
                     {"i": ctx.instance_uuid, "g": ctx.generation + 1})
            committed = self.associations.transition(
                ctx.instance_uuid, S.STOPPED, expected=frozenset({S.MIGRATING_IN}),
                generation=ctx.generation + 1, pid=None)
            self._drop_capture(assoc.vtpcm_id)
            return committed
        if not self.is_running(assoc) and self._received_state(assoc):
            # its swtpm died after the switchover: the state is on disk, and
            # the authority may already be here; bring it back rather than
            # refuse forever (the only restart the agent makes on its own)
            self._restart_incoming(assoc)
            assoc = self.associations.get(ctx.instance_uuid)
        if not (self.is_running(assoc) and self._received_state(assoc)):
            raise exception.MigrationError(
                migration_id=ctx.migration_id,
                reason="the incoming vTPCM of instance %s has not received its state "
                       "(or its swtpm is not running); refusing to commit"
                       % ctx.instance_uuid)
        committed = self.associations.transition(
            ctx.instance_uuid, S.ACTIVE, expected=frozenset({S.MIGRATING_IN}),
            generation=ctx.generation + 1)
        self._drop_capture(assoc.vtpcm_id)
        return committed

    @serialized
    def abort_incoming(self, ctx: sealing.SealContext, only_if_unused: bool = False) -> None:
        """Destroy an incoming vTPCM; no tombstone, since it never went live."""
        self.associations.record_aborted(ctx.migration_id, ctx.instance_uuid)
        assoc = self.associations.find(ctx.instance_uuid)
        if assoc is None or assoc.state is not S.MIGRATING_IN \
                or assoc.migration_id != ctx.migration_id:
            LOG.info("Abort of incoming migration %(mig)s: nothing to clean up for "
                     "instance %(instance)s", {"mig": ctx.migration_id,
                                               "instance": ctx.instance_uuid})
            return
        paths = self._paths_of(assoc)
        if only_if_unused and self._received_state(assoc):
            raise exception.DestinationInUse(
                migration_id=ctx.migration_id,
                reason="the incoming vTPCM already received its state; refusing to "
                       "destroy it on a timeout")
        # a retry may find no pid file left: a failure is reported as such
        with self._crash_reported(assoc, "the abort of migration %s" % ctx.migration_id,
                                  "discarded", failed="discard-failed"):
            self._kill(assoc)
            self._discard(ctx.instance_uuid, assoc.vtpcm_id, paths)

    # --- the post-import check --------------------------------------------------

    def _capture_path(self, vtpcm_id: str, suffix: str) -> Path:
        return self.settings.state_root / CAPTURES / (vtpcm_id + suffix)

    def _arm_capture(self, vtpcm_id: str, state_dir: Path) -> firstwrite.FirstWriteWatch:
        """Watch an incoming vTPCM's state dir for its swtpm's first write
        (``firstwrite``) and persist what it sees. Armed before anything
        could write there; SwtpmError if it cannot be (no inotify instance
        or watch left: fs.inotify.max_user_instances / max_user_watches)."""
        try:
            watch = firstwrite.FirstWriteWatch(
                state_dir, functools.partial(self._persist_capture, vtpcm_id),
                opener=self.capture_opener).arm()
        except OSError as exc:
            raise exception.SwtpmError(
                vtpcm_id=vtpcm_id,
                reason="cannot watch its state dir for the post-import check (%s)"
                % exc.strerror) from None
        with self._watches_guard:
            old = self._watches.pop(vtpcm_id, None)
            self._watches[vtpcm_id] = watch
        if old is not None:
            old.stop(self.settings.timeout)
        return watch.start()

    def _persist_capture(self, vtpcm_id: str, capture: firstwrite.Capture) -> None:
        """Keep the watch's outcome across agent restarts: the bytes as read
        (at-rest ciphertext), or the reason there are none, written
        atomically, 0600, in the agent's own directory."""
        if capture.data is not None:
            fileutil.write_atomic(self._capture_path(vtpcm_id, CAPTURE_SUFFIX), capture.data,
                                  replace=True)
        else:
            fileutil.write_atomic(self._capture_path(vtpcm_id, AMBIGUOUS_SUFFIX),
                                  capture.reason.encode("utf-8"), replace=True)
        LOG.info("Incoming vTPCM %(vtpcm)s: first write of its permanent state %(what)s",
                 {"vtpcm": vtpcm_id,
                  "what": "captured" if capture.data is not None
                  else "not captured: " + capture.reason})

    def _drop_capture(self, vtpcm_id: str) -> None:
        """The incoming vTPCM went live or went away: stop its watch (the
        thread ends, its outcome written or never) and remove what it kept
        (with the temporary files a crash in a write left)."""
        with self._watches_guard:
            watch = self._watches.pop(vtpcm_id, None)
        if watch is not None and not watch.stop(self.settings.timeout):
            LOG.error("The first-write watch of vTPCM %s did not end within %.1f s",
                      vtpcm_id, self.settings.timeout)
        for suffix in (CAPTURE_SUFFIX, AMBIGUOUS_SUFFIX):
            self._capture_path(vtpcm_id, suffix).unlink(missing_ok=True)
        for path in (self.settings.state_root / CAPTURES).glob(".%s.*.tmp" % vtpcm_id):
            path.unlink(missing_ok=True)

    def _recover_capture(self, assoc: Association) -> None:
        """At the agent's start, an incoming vTPCM: one with no state yet is
        watched again (armed first, then checked: a state that appeared in
        between may not be the first write); one that holds state but has
        no capture answers LOST_IN_RESTART (``_capture_of``); a capture no
        watch of this process followed is marked RESTARTED_AFTER_CAPTURE
        (an import while the agent was down would have gone unseen)."""
        if self._capture_path(assoc.vtpcm_id, AMBIGUOUS_SUFFIX).exists():
            return
        if self._capture_path(assoc.vtpcm_id, CAPTURE_SUFFIX).exists():
            try:
                self._persist_capture(assoc.vtpcm_id,
                                      firstwrite.ambiguous(RESTARTED_AFTER_CAPTURE))
            except OSError as exc:  # _capture_of answers the same without the mark
                LOG.error("Could not mark the capture of incoming vTPCM %(vtpcm)s as older "
                          "than this agent: %(err)s", {"vtpcm": assoc.vtpcm_id,
                                                        "err": exc.strerror})
            return
        if self._received_state(assoc):
            return
        state_dir = self._paths_of(assoc).state_dir
        try:
            self._arm_capture(assoc.vtpcm_id, state_dir)
        except exception.SwtpmError as exc:
            LOG.error("Could not watch the state dir of incoming vTPCM %(vtpcm)s again "
                      "(its post-import check will answer that the capture was lost): "
                      "%(err)s", {"vtpcm": assoc.vtpcm_id, "err": exc.message})
            return
        if self._received_state(assoc):
            with self._watches_guard:
                watch = self._watches.pop(assoc.vtpcm_id, None)
            if watch is not None:
                watch.stop(self.settings.timeout)
            self._persist_capture(assoc.vtpcm_id, firstwrite.ambiguous(
                "the state arrived while the agent restarted"))

    def _sweep_captures(self, incoming: set[str]) -> None:
        """Remove what no incoming vTPCM owns (a crash between a commit or
        an abort and the removal); what one owns stays, its temporary files
        (``.<id><suffix>.<hex>.tmp``, a watch may be writing them now) too."""
        for path in (self.settings.state_root / CAPTURES).iterdir():
            if capture_owner(path.name) not in incoming:
                path.unlink(missing_ok=True)

    def _capture_of(self, assoc: Association) -> tuple[bytes | None, str]:
        """The first write of an incoming vTPCM's swtpm, or why there is none
        (or why it no longer stands: superseded by a later import)."""
        watch = self._watches.get(assoc.vtpcm_id)
        # what was queued by now counts (a second import that already ran)
        if watch is not None and not watch.sync(self.settings.timeout):
            return None, ("the watch of the state dir did not answer within %.1f s"
                          % self.settings.timeout)
        data_path = self._capture_path(assoc.vtpcm_id, CAPTURE_SUFFIX)
        reason_path = self._capture_path(assoc.vtpcm_id, AMBIGUOUS_SUFFIX)
        if reason_path.exists():
            return None, reason_path.read_text("utf-8", "replace")
        if watch is not None and watch.failed:
            return None, "the outcome of the watch could not be kept: " + watch.failed
        if watch is not None and watch.outcome is not None and watch.outcome.data is None:
            return None, watch.outcome.reason  # never without its file; a safeguard
        if data_path.exists():
            if watch is None:
                return None, RESTARTED_AFTER_CAPTURE
            if not watch.alive() and not watch.settled:
                return None, ("the watch ended after the capture: a later import cannot "
                              "be excluded")
            return data_path.read_bytes(), ""
        if watch is not None and watch.alive():
            return None, "no write of the permanent state seen yet"
        if self._received_state(assoc):
            return None, LOST_IN_RESTART
        return None, "the state dir is not watched and holds no state"

    def state_digest(self, ctx: sealing.SealContext, side: str, nonce: bytes,
                     streams: bool = False) -> StateDigests:
        """The post-import check's digest (``statedigest``) of this side's
        permanent state: the source's current one (its guest is paused by
        then), the destination's as its swtpm first wrote it after
        prepare_incoming (the import, before any guest write), or None and
        why not. Refuses a vTPCM not in that migration on that side.

        Anyone on the broker may ask (unsigned, read-only), so a request
        for another host or an instance this agent does not know is refused
        before the per-instance lock is made: those locks are never freed,
        and random ids would grow the table without bound (review of the
        unsigned request, MEDIUM)."""
        host = ctx.source_host if side == "source" else ctx.dest_host
        if side not in ("source", "destination") or host != self.settings.host:
            raise exception.MigrationError(
                migration_id=ctx.migration_id,
                reason="this host is %s, asked as the %s side (source %s, destination %s)"
                % (self.settings.host, side, ctx.source_host, ctx.dest_host))
        if self.associations.find(ctx.instance_uuid) is None:
            raise exception.NotFound(what="vTPCM of instance", key=ctx.instance_uuid)
        return self._state_digest(ctx, side, nonce, streams)

    @serialized
    def _state_digest(self, ctx: sealing.SealContext, side: str, nonce: bytes,
                      streams: bool) -> StateDigests:
        assoc = self.associations.get(ctx.instance_uuid)
        if side == "source":
            self._check_migration(assoc, ctx, S.MIGRATING_OUT)
            path = self._paths_of(assoc).state_dir / PERMANENT_STATE_FILE
            try:
                data = firstwrite.read_state_file(path)
            except (OSError, ValueError) as exc:
                raise exception.StateFileError(
                    name=PERMANENT_STATE_FILE,
                    reason="cannot be read: %s" % (
                        exc if isinstance(exc, ValueError)
                        else os.strerror(exc.errno or 0))) from None
            outcome: tuple[bytes | None, str] = (self._keyed_digest(assoc, data, nonce), "")
        else:
            self._check_migration(assoc, ctx, S.MIGRATING_IN)
            captured, reason = self._capture_of(assoc)
            outcome = (None, reason)
            if captured is not None:
                try:
                    outcome = (self._keyed_digest(assoc, captured, nonce), "")
                except exception.StateFileError as exc:
                    outcome = (None, "the captured first write does not decrypt: %s"
                               % exc.message)
        stream: tuple[bytes | None, str] = (None, "not asked")
        if streams:
            stream = self._stream_digest(assoc, side, nonce)
            if stream[1].startswith((PROXY_REFUSED, PROXY_INCOMPLETE)):
                # something tried to set state past the proxy's rules: the
                # import is not the one the check may pass, whatever the
                # permanent state says
                outcome = (None, stream[1])
        LOG.info("State digest of vTPCM %(vtpcm)s (instance %(inst)s, migration %(mig)s, "
                 "%(side)s): %(what)s%(stream)s",
                 {"vtpcm": assoc.vtpcm_id, "inst": ctx.instance_uuid,
                  "mig": ctx.migration_id, "side": side,
                  "what": "answered" if outcome[0] is not None else "none, " + outcome[1],
                  "stream": "" if not streams else "; blobs: " + (
                      "answered" if stream[0] is not None else "none, " + stream[1])})
        return StateDigests(outcome[0], outcome[1], stream[0], stream[1])

    def _stream_digest(self, assoc: Association, side: str,
                       nonce: bytes) -> tuple[bytes | None, str]:
        """``statedigest.stream_digest`` of the blobs this side's QEMU read
        (source) or set (destination) through the proxy, or None and why."""
        if not self.settings.ctrl_proxy:
            return None, "this host runs no control-channel proxy ([agent] ctrl_proxy)"
        # an incoming vTPCM of a host with the proxy always has one, open
        # for its stream from prepare_incoming on: on the destination
        # anything short of a complete import through it fails the check
        # (PROXY_INCOMPLETE), whatever [engine] require_stream_check says
        # (review of the proxy, HIGH 2: a stream with an empty volatile
        # blob, which QEMU does not set, left a record without one). A
        # source's QEMU may have attached before its proxy existed (started
        # before the option): there it is only "cannot tell".
        lacking = PROXY_INCOMPLETE + ": " if side == "destination" else ""
        try:
            record = ctrlproxy.read_record(self.proxy_record(assoc.instance_uuid))
        except (OSError, ValueError) as exc:
            return None, "%sthe proxy record cannot be read: %s" % (
                lacking, exc if isinstance(exc, ValueError) else exc.strerror)
        if record is None:
            return None, "%sno control-channel proxy serves this vTPCM" % lacking
        if record["swtpm_pid"] != assoc.pid:
            return None, "%sthe proxy record is of another swtpm (pid %s, not %s)" % (
                lacking, record["swtpm_pid"], assoc.pid)
        if side == "destination":
            refused = record["refused"] + record["failed"]  # type: ignore[operator]
            if record["refused_count"] or record["failed"]:
                return None, "%s: %s" % (PROXY_REFUSED, "; ".join(refused)[:600])
            if record["closed"]:
                return None, lacking + ("its proxy takes no stream (the agent imported the "
                                        "state, or the proxy was started again after the "
                                        "import)")
            if not record["started"]:
                return None, lacking + "the destination's QEMU has not started the TPM"
        seen = record["got" if side == "source" else "set"]
        assert isinstance(seen, dict)
        blobs = {int(t): (v[0], v[1], v[2]) for t, v in seen.items() if v[1] > 0}
        if sorted(blobs) != list(statedigest.STREAM_BLOB_TYPES):
            return None, "%sthe %s's QEMU %s no permanent and volatile blob through the proxy" % (
                lacking, side, "read" if side == "source" else "set")
        return statedigest.stream_digest(nonce, blobs), ""

    def _keyed_digest(self, assoc: Association, state_file: bytes, nonce: bytes) -> bytes:
        """``statedigest`` of the plaintext in one of this vTPCM's at-rest
        state files (StateFileError if it is not one)."""
        plain = permall.decrypt_state_file(state_file,
                                           self.keystore.get(assoc.vtpcm_id).at_rest_key)
        return statedigest.permanent_state_digest(nonce, plain)

    # --- crash recovery ---------------------------------------------------------

    def _restart_incoming(self, assoc: Association) -> Restarted:
        """Start again the dead swtpm of an incoming vTPCM that received its
        state, for ``commit_incoming`` (whose instance lock is held): after
        the commit point it is the authority and must run. The only restart
        the agent makes: elsewhere a restarted swtpm serves no guest (QEMU
        never reconnects) but whoever opens its socket (``watchdog``).

        Same state dir, same keys (the at-rest key opens the persisted state;
        the migration key stays the migration's), same socket path. Only the
        permanent state file survives a crash (swtpm keeps the volatile state
        in memory; a leftover volatile file is older than the guest's last
        TPM command and is removed, never resumed)."""
        paths = self._paths_of(assoc)
        # a swtpm that lost its socket but still runs would hold the state lock
        if assoc.pid is not None and process.owns(assoc.pid, paths):
            process.stop(assoc.pid, paths, timeout=self.settings.timeout)
        (paths.state_dir / VOLATILE_STATE_FILE).unlink(missing_ok=True)
        # it received its state: its proxy lets none through
        pid = self._spawn_paths(assoc.instance_uuid, paths,
                                self.keystore.get(assoc.vtpcm_id), startup_clear=False)
        self.associations.set_pid(assoc.instance_uuid, pid)
        done = Restarted(instance_uuid=assoc.instance_uuid, vtpcm_id=assoc.vtpcm_id,
                         state=assoc.state.value, old_pid=assoc.pid, pid=pid,
                         with_state=True)
        if self.on_restart is not None:
            self.on_restart(done)
        return done

    # --- start-up --------------------------------------------------------------

    def recover(self) -> dict[str, list[str]]:
        """Re-adopt running swtpm processes and clean up interrupted creates."""
        report: dict[str, list[str]] = {"adopted": [], "crashed": [], "cleaned": []}
        started = time.monotonic()
        incoming = set()
        for assoc in self.associations.list():
            paths = self._paths_of(assoc)
            if assoc.state is S.CREATING:
                self._discard(assoc.instance_uuid, assoc.vtpcm_id, paths)
                report["cleaned"].append(assoc.instance_uuid)
                continue
            if assoc.state is S.MIGRATING_IN:
                incoming.add(assoc.vtpcm_id)
                self._recover_capture(assoc)
            pid = process.find_running(paths)
            if pid is not None:
                self._pin(assoc.instance_uuid, pid)
                if pid != assoc.pid:
                    self.associations.set_pid(assoc.instance_uuid, pid)
                report["adopted"].append(assoc.instance_uuid)
                try:
                    self._ensure_proxy(
                        assoc.instance_uuid, paths, pid,
                        stream_import=(assoc.state is S.MIGRATING_IN
                                       and not self._received_state(assoc)))
                except (exception.VTPCMException, OSError, ValueError) as exc:
                    LOG.error("Could not start the control-channel proxy of instance "
                              "%(inst)s (its QEMU keeps what it has; a new QEMU cannot "
                              "attach): %(err)s",
                              {"inst": assoc.instance_uuid,
                               "err": getattr(exc, "message", None) or str(exc)})
            elif assoc.state in (S.ACTIVE, S.MIGRATING_OUT, S.MIGRATING_IN):
                report["crashed"].append(assoc.instance_uuid)
                LOG.error("swtpm of instance %(instance)s (vTPCM %(vtpcm)s, %(state)s) "
                          "is not running", {"instance": assoc.instance_uuid,
                                             "vtpcm": assoc.vtpcm_id,
                                             "state": assoc.state.value})
        self._sweep_captures(incoming)
        self.sweep_kept()
        # the seconds: an agent restart delays every RPC on the host by this
        LOG.info("Recovered: %(a)d adopted, %(c)d crashed, %(x)d interrupted creates "
                 "cleaned in %(s).3f s",
                 {"a": len(report["adopted"]), "c": len(report["crashed"]),
                  "x": len(report["cleaned"]), "s": time.monotonic() - started})
        return report

    # --- helpers ---------------------------------------------------------------

    def _spawn(self, assoc: Association, keys: InstanceKeys, with_proxy: bool = True) -> int:
        return self._spawn_paths(assoc.instance_uuid, self._paths_of(assoc), keys,
                                 with_proxy=with_proxy)

    def _spawn_paths(self, instance_uuid: str, paths: process.SwtpmPaths,
                     keys: InstanceKeys, startup_clear: bool | None = None,
                     with_proxy: bool = True, stream_import: bool = False) -> int:
        """Start (or adopt) the instance's swtpm and, with ``ctrl_proxy``
        and unless ``with_proxy`` is off (a swtpm only the agent talks
        to), its control-channel proxy; ``stream_import``: an incoming
        swtpm waiting for a live migration's stream (the only one whose
        proxy lets state through)."""
        running = process.find_running(paths)
        if running is not None:
            pinned = self._pins.get(instance_uuid)
            if pinned is None or pinned[0] != running or uidprocs.gone(pinned):
                self._pin(instance_uuid, running)
            if with_proxy:
                self._ensure_proxy(instance_uuid, paths, running, stream_import)
            return running
        server = process.socket_server(paths.ctrl_socket)
        if server is not None:
            raise exception.SwtpmError(
                vtpcm_id=paths.state_dir.name,
                reason="another process (pid %d, uid %d) serves its control socket %s; not "
                       "starting a second swtpm there" % (*server, paths.ctrl_socket))
        if startup_clear is None:
            startup_clear = self.settings.expose_data_socket
        run_as = self._own_files(instance_uuid, paths)
        proxied = self.settings.ctrl_proxy
        # behind a proxy, swtpm's own socket is its uid's alone: QEMU (whose
        # group may be that uid's gid) must not reach past the proxy
        pid = process.start(
            paths, keys.at_rest_key, keys.migration_key,
            socket_mode=0o600 if proxied else self.settings.socket_mode,
            socket_uid=None if proxied else self.settings.socket_uid,
            socket_gid=None if proxied else self.settings.socket_gid,
            swtpm_binary=self.settings.swtpm_binary,
            startup_clear=startup_clear, timeout=self.settings.timeout, run_as=run_as)
        self._pin(instance_uuid, pid)
        if with_proxy:
            try:
                self._ensure_proxy(instance_uuid, paths, pid, stream_import)
            except exception.SwtpmError:
                process.stop(pid, paths, timeout=self.settings.timeout)
                raise
        return pid

    def _proxy_or_warn(self, assoc: Association, paths: process.SwtpmPaths) -> None:
        """A closed proxy for the running swtpm of ``assoc``; a failure is a
        WARNING (the guest's ``start`` tries again)."""
        if assoc.pid is None:
            return
        try:
            self._ensure_proxy(assoc.instance_uuid, paths, assoc.pid)
        except (exception.VTPCMException, OSError, ValueError) as exc:
            LOG.warning("The control-channel proxy of vTPCM %(vtpcm)s did not start (the "
                        "guest's start retries it): %(err)s",
                        {"vtpcm": assoc.vtpcm_id,
                         "err": getattr(exc, "message", None) or str(exc)})

    def _stop_proxy(self, assoc: Association) -> None:
        """Stop the instance's proxy, if one runs (nobody reaches its swtpm
        through the public path until one is started again)."""
        if not self.settings.ctrl_proxy:
            return
        record = self.proxy_record(assoc.instance_uuid)
        found = proxyctl.find(record)
        if found is not None:
            proxyctl.stop(found, record, timeout=self.settings.timeout)
            if proxyctl.find(record) is not None:
                raise exception.SwtpmError(
                    vtpcm_id=assoc.vtpcm_id,
                    reason="its control-channel proxy pid %d did not stop" % found)
        self.proxy_socket(assoc.instance_uuid).unlink(missing_ok=True)

    def _ensure_proxy(self, instance_uuid: str, paths: process.SwtpmPaths,
                      swtpm_pid: int, stream_import: bool = False) -> None:
        """With ``ctrl_proxy``: the proxy of ``swtpm_pid`` runs and the
        public path leads to it (started if missing: a proxy that died, or
        a swtpm started before the option; a QEMU attached directly keeps
        its connection). A proxy started here lets a stream's state
        through only if ``stream_import``. A running proxy of that swtpm is
        adopted as it is: QEMU never reconnects, and replacing it would cut
        the guest's control channel (review round 2, HIGH); the agent's own
        import stops it first (``_stop_proxy``)."""
        if not self.settings.ctrl_proxy:
            return
        record = self.proxy_record(instance_uuid)
        running = proxyctl.find_with_record(record)
        if running is not None:
            found, current = running
            if current["swtpm_pid"] == swtpm_pid:
                return
            proxyctl.stop(found, record, timeout=self.settings.timeout)
        uid = self.associations.uid_of(instance_uuid)
        if uid is None:
            raise exception.SwtpmError(vtpcm_id=paths.state_dir.name,
                                       reason="no swtpm uid to run its proxy as")
        public = self.proxy_socket(instance_uuid)
        proxy_pid = proxyctl.start(
            public, paths.ctrl_socket, swtpm_pid, record,
            staging_dir=self.settings.run_dir, log_file=paths.log_file,
            socket_mode=self.settings.socket_mode,
            socket_uid=uid if self.settings.socket_uid is None else self.settings.socket_uid,
            socket_gid=uid if self.settings.socket_gid is None else self.settings.socket_gid,
            run_as=process.RunAs(uid=uid, gid=uid), closed=not stream_import,
            max_blob=self.settings.max_state_blob_bytes, timeout=self.settings.timeout)
        isolation.link(self.public_ctrl_socket(instance_uuid), public)
        LOG.info("Started the control-channel proxy pid %(pid)d of instance %(inst)s",
                 {"pid": proxy_pid, "inst": instance_uuid})

    def _pin(self, instance_uuid: str, pid: int) -> None:
        """Record the identity of the instance's swtpm as it is now."""
        pinned = uidprocs.pin(pid)
        if pinned is not None:
            self._pins[instance_uuid] = pinned

    def _own_files(self, instance_uuid: str,
                   paths: process.SwtpmPaths) -> process.RunAs | None:
        """The uid an instance's swtpm runs as, its files handed to it
        (None: swtpm runs as the agent)."""
        if self.settings.swtpm_uids is None:
            return None
        first, last = self.settings.swtpm_uids
        uid = self.associations.assign_uid(instance_uuid, first, last)
        # no swtpm of this instance runs (the caller checked): whatever
        # else its uid runs is an exploited swtpm that hid, and would race
        # the hand-over below
        uidprocs.kill_all(uid, timeout=self.settings.timeout,
                          own_dirs=self._uid_dirs(instance_uuid, paths))
        run_as = process.RunAs(uid=uid, gid=uid)
        public = self.public_ctrl_socket(instance_uuid)
        isolation.hand_over(paths, run_as, public,
                            public.with_suffix("") if paths.data_socket else None,
                            ctrl_target=(self.proxy_socket(instance_uuid)
                                         if self.settings.ctrl_proxy else None))
        return run_as

    def qemu_uid_for(self, swtpm_uid: int) -> int | None:
        """The QEMU uid paired with ``swtpm_uid``, from the FIRSTs the uids
        were given under (recorded at the agent's start, never moved once a
        uid was given out), whatever today's ranges say: a VM still running
        labelled after ``qemu_uid_range`` was unset keeps its QEMU uid
        killed, swept and kept aside with its swtpm uid (review of the DAC
        label round 3, LOW 3). None: no qemu FIRST was ever recorded, or
        ``swtpm_uid`` is outside today's ``swtpm_uid_range``, whose QEMU
        uids alone the agent's start checked (round 4, MEDIUM 1)."""
        firsts = self.associations.range_firsts()
        if firsts is None or firsts[1] is None or swtpm_uid < firsts[0]:
            return None
        if self.settings.swtpm_uids is None or swtpm_uid > self.settings.swtpm_uids[1]:
            # beyond the QEMU uids checked at the start (qemu_uid_range, or
            # those today's swtpm range implies): no uid in use or kept
            # aside is there, and an unchecked uid is never killed or swept
            return None
        return firsts[1] + (swtpm_uid - firsts[0])

    def _vm_uids(self, swtpm_uid: int) -> tuple[int, ...]:
        """A VM's swtpm uid and, if it has one, its QEMU uid: killed, swept
        and kept aside together (a QEMU that escaped and hid must not meet
        the next VM's, and the pair is never given out again)."""
        qemu = self.qemu_uid_for(swtpm_uid)
        return (swtpm_uid,) if qemu is None else (swtpm_uid, qemu)

    def vm_ids(self, instance_uuid: str) -> tuple[int, int] | None:
        """(QEMU uid, VM gid) of an instance whose swtpm has its own uid
        here: the label its QEMU must run with to reach its 0660 U:U
        socket, and no other VM's. None: no per-VM QEMU uid (no
        qemu_uid_range, or no uid assigned yet: its swtpm never started)."""
        if self.settings.swtpm_uids is None or self.settings.qemu_uids is None:
            return None
        uid = self.associations.uid_of(instance_uuid)
        if uid is None:
            return None
        qemu = self.qemu_uid_for(uid)
        return None if qemu is None else (qemu, uid)

    def _drop_own_files(self, instance_uuid: str) -> None:
        """Remove an instance's public links and socket dir and free its uid
        once no process of the uid is left (an exploited swtpm may have
        hidden from ``_kill``) and nothing of it remains in the shared
        temporary directories or SysV IPC (``uidprocs.sweep``).

        Never fails for what the uid left: the keys and state are gone by
        then, and another user can keep a leftover alive (a segment it keeps
        attached, review of the sweep, MEDIUM 2), so a destroy that waited
        for it could be blocked by anyone. The uid is kept aside instead
        (never given out again, and no longer the instance's), logged with
        a WARNING naming what remains, and swept again by ``sweep_kept``."""
        if self.settings.swtpm_uids is None:
            return  # no uid in use or kept aside: the start refused otherwise
        uid = self.associations.uid_of(instance_uuid)
        # the VM's QEMU uid goes with its swtpm uid (``_vm_uids``)
        kept: exception.SwtpmError | None = None
        if uid is not None:
            try:
                uidprocs.kill_and_sweep(self._vm_uids(uid), timeout=self.settings.timeout)
            except exception.SwtpmError as exc:
                kept = exc
        # the socket dir is this instance's own, never the uid's next
        # holder's: a tree the uid built there to make its removal fail
        # must not keep the uid forever (review round 2 of isofix, MEDIUM 3)
        public = self.public_ctrl_socket(instance_uuid)
        try:
            isolation.remove(self.settings.run_dir / OWN_DIRS / instance_uuid,
                             (public, public.with_suffix("")))
        except (OSError, exception.VTPCMException) as exc:
            LOG.error("Could not remove the socket dir of instance %(inst)s (the uid is "
                      "freed anyway: no process of it is left): %(err)s",
                      {"inst": instance_uuid,
                       "err": getattr(exc, "message", None) or str(exc)})
        if kept is not None:
            self.associations.keep_uid(instance_uuid)
            LOG.warning("Keeping swtpm uid %(uid)d of instance %(inst)s aside (never given "
                        "out again; swept again every %(every)d s and at the agent's "
                        "start): %(err)s",
                        {"uid": uid, "inst": instance_uuid, "every": KEPT_SWEEP_INTERVAL,
                         "err": kept.message})
            return
        self.associations.release_uid(instance_uuid)

    def sweep_kept(self) -> int:
        """Sweep the uids kept aside again; record each found clean as freed
        (never given out again either). Returns how many are still kept."""
        if self.settings.swtpm_uids is None:
            return 0  # none kept: the start refused otherwise (_check_no_uid_held)
        still = []
        for instance_uuid, uid in self.associations.kept_uids():
            try:
                uidprocs.kill_and_sweep(self._vm_uids(uid), timeout=self.settings.timeout)
            except exception.SwtpmError as exc:
                still.append(uid)
                LOG.debug("swtpm uid %(uid)d stays kept: %(err)s",
                          {"uid": uid, "err": exc.message})
                continue
            self.associations.release_kept(uid)
            LOG.info("Freed kept swtpm uid %(uid)d (of instance %(inst)s): nothing of it "
                     "remains", {"uid": uid, "inst": instance_uuid})
        if still:
            LOG.warning("Swtpm uids kept aside with leftovers (%(uids)s)",
                        {"uids": uidprocs.some(still)})
        return len(still)

    def _received_state(self, assoc: Association) -> bool:
        """An incoming vTPCM holds state once QEMU or import_state set it."""
        return (self._paths_of(assoc).state_dir / PERMANENT_STATE_FILE).exists()

    def _refuse_aborted(self, ctx: sealing.SealContext) -> None:
        if self.associations.was_aborted(ctx.migration_id):
            raise exception.MigrationError(
                migration_id=ctx.migration_id,
                reason="this migration was aborted; a new migration needs a new id")

    def _kill(self, assoc: Association, shredding: bool = False) -> None:
        """Stop the instance's swtpm and every process of its uid.

        ``shredding`` (destroy, commit of an outgoing migration): once the
        swtpm's own pid is gone, processes of the uid that survive do not
        stop the shred. Another local user can keep re-creating them (a
        setuid file of the uid it holds open, review round 2 of the sweep,
        MEDIUM 1); failing here would leave the keys and state on disk for
        good. The shred then keeps the uid aside (``_drop_own_files``).
        "The swtpm is gone" is decided on the swtpm this agent started or
        adopted, pinned then (pid and start time, ``uidprocs.pin``): never
        on the pid file, control socket or argv, which a survivor of the
        uid can fake (review round 3 of the sweep, MEDIUM 1); a record this
        agent pinned nothing for has no swtpm of its own left to wait for.
        Start and restart still refuse while a process of the uid lives
        (``_own_files``)."""
        paths = self._paths_of(assoc)
        pinned = self._pins.get(assoc.instance_uuid)
        uid = (self.associations.uid_of(assoc.instance_uuid)
               if self.settings.swtpm_uids is not None else None)
        if (pinned is None or uidprocs.gone(pinned)) and not (shredding and uid is not None):
            # nothing of ours pinned runs: a swtpm still found is stopped
            # cleanly (it writes its state) and pinned from here on. Not
            # when shredding a uid's vTPCM: what its pid file names then is
            # the uid's (kill_all kills it), and stopping it must not be
            # able to fail the shred
            pid = process.find_running(paths) or assoc.pid
            if pid is not None and process.is_alive(pid, paths):
                self._pin(assoc.instance_uuid, pid)
                pinned = self._pins.get(assoc.instance_uuid)
        if pinned is not None and not uidprocs.gone(pinned) \
                and process.is_alive(pinned[0], paths):
            process.stop(pinned[0], paths, timeout=self.settings.timeout)
        if uid is None:
            self._pins.pop(assoc.instance_uuid, None)
            return
        try:
            # a swtpm that unlinked its socket is not "alive" to the above
            uidprocs.kill_all(uid, timeout=self.settings.timeout,
                              own_dirs=self._uid_dirs(assoc.instance_uuid, paths))
        except exception.SwtpmError as exc:
            if not shredding or (pinned is not None and not uidprocs.gone(pinned)):
                raise
            self._pins.pop(assoc.instance_uuid, None)
            LOG.warning("Shredding the vTPCM of instance %(inst)s although processes of its "
                        "swtpm uid %(uid)d survive (its swtpm is gone; the uid will be kept "
                        "aside): %(err)s",
                        {"inst": assoc.instance_uuid, "uid": uid, "err": exc.message})
        self._pins.pop(assoc.instance_uuid, None)  # nothing of the uid runs

    def _uid_dirs(self, instance_uuid: str, paths: process.SwtpmPaths) -> tuple[Path, ...]:
        """The instance's own directories its uid can write in (its state
        dir, its socket dir): defused with the temporary ones by
        ``uidprocs.kill_all``."""
        return (paths.state_dir, self.settings.run_dir / OWN_DIRS / instance_uuid)

    def _shred(self, assoc: Association) -> None:
        self.keystore.destroy(assoc.vtpcm_id)
        try:
            process.remove_state(self._paths_of(assoc))
        finally:  # the keys are gone: the uid goes even if the state stays
            self._drop_own_files(assoc.instance_uuid)

    def _discard(self, instance_uuid: str, vtpcm_id: str, paths: process.SwtpmPaths) -> None:
        """Undo a create or an incoming that never went live: no tombstone.

        Never the live vTPCM: if the record of ``vtpcm_id`` went live (an
        incoming one committed), this refuses before its keys and state go.
        Each caller checks that already; this is the last line, since a
        discard that got past one would shred the holder's keys and leave
        its record live (``forget`` keeps live rows) with nothing to open
        its state: the tenant's TPM lost. Callers hold the instance's lock,
        so the record cannot go live between the check and the shred."""
        record = self.associations.find(instance_uuid)
        if record is not None and record.vtpcm_id == vtpcm_id \
                and record.state not in (S.CREATING, S.MIGRATING_IN):
            LOG.error("Refused to discard vTPCM %(vtpcm)s of instance %(instance)s: it is "
                      "%(state)s (generation %(gen)d), not an unfinished create or incoming; "
                      "its keys and state are kept",
                      {"vtpcm": vtpcm_id, "instance": instance_uuid,
                       "state": record.state.value, "gen": record.generation})
            raise exception.InvalidTransition(
                what="vTPCM of instance", key=instance_uuid, current=record.state.value,
                target="discarded")
        self._drop_capture(vtpcm_id)
        self.keystore.destroy(vtpcm_id)
        if paths.state_dir.exists():
            shutil.rmtree(paths.state_dir)
        process.remove_log(paths)
        self.associations.forget(instance_uuid, vtpcm_id)
        if self.associations.find(instance_uuid) is None:
            self._drop_own_files(instance_uuid)

    @staticmethod
    def _check_generation(assoc: Association, ctx: sealing.SealContext) -> None:
        if assoc.generation != ctx.generation:
            raise exception.GenerationMismatch(
                instance_uuid=ctx.instance_uuid, given=ctx.generation,
                expected=assoc.generation)

    def _check_migration(self, assoc: Association, ctx: sealing.SealContext,
                         state: VTPCMState) -> None:
        if assoc.state is not state or assoc.migration_id != ctx.migration_id:
            raise exception.MigrationError(
                migration_id=ctx.migration_id,
                reason="vTPCM of instance %s is %s in migration %s, expected %s"
                % (ctx.instance_uuid, assoc.state.value, assoc.migration_id, state.value))
        self._check_generation(assoc, ctx)


def context_from(message: Any) -> sealing.SealContext:
    """messages.MigrationContext -> sealing.SealContext."""
    return sealing.SealContext(
        migration_id=message.migration_id, instance_uuid=message.instance_uuid,
        generation=message.generation, source_host=message.source_host,
        dest_host=message.dest_host)

