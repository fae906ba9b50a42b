"""Whole-TPM state transfer for a swtpm that QEMU is NOT attached to.

Why apart from the client: this is policy over the channel (only blobs
sealed under a migration key go out or come in, and a failed import sets
the target's own state back), not the channel itself. The control socket
serves one client at a time, so these run only while QEMU is detached.

Never log or raise with blob contents: only command names, result codes and
sizes appear in messages.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from oslo_log import log as logging

from vtpcm_agent.swtpm.client import CtrlClient
from vtpcm_agent.swtpm.framing import (
    BLOB_FLAG_MIGRATION_256BIT_KEY,
    CONFIG_FLAG_FILE_KEY,
    CONFIG_FLAG_MIGRATION_KEY,
    MAX_BLOB_SIZE,
    STATE_FLAG_ENCRYPTED,
    TPM_BAD_ORDINAL,
    BlobType,
    StateBlob,
    _fail,
    error_result,
    parse_blob_header,
)
from vtpcm_common import exception

LOG = logging.getLogger(__name__)

@dataclasses.dataclass(frozen=True)
class ExportedState:
    """Permanent + volatile blobs, both sealed under the migration key."""

    permanent: bytes = dataclasses.field(repr=False)
    volatile: bytes = dataclasses.field(repr=False)
    permanent_flags: int = 0
    volatile_flags: int = 0

    def __repr__(self) -> str:
        return ("ExportedState(permanent=<%d bytes>, volatile=<%d bytes>, "
                "permanent_flags=0x%x, volatile_flags=0x%x)" % (
                    len(self.permanent), len(self.volatile),
                    self.permanent_flags, self.volatile_flags))


def _require_sealed(blob: bytes, what: str) -> None:
    """Refuse blobs not encrypted under a migration key.

    swtpm 0.7.1 accepts a SET of a blob that carries no migration-key layer
    even when it runs with --migration-key ("upgrade" path): without this
    check anyone able to hand us a blob could inject plaintext state.
    """
    header = parse_blob_header(blob)
    if not header.migration_encrypted:
        raise exception.InvalidInput(reason="%s blob is not encrypted under a migration key"
                                     % what)
    if not header.flags & BLOB_FLAG_MIGRATION_256BIT_KEY:
        raise exception.InvalidInput(reason="%s blob is not sealed with a 256-bit migration key"
                                     % what)


def export_state(path: Path | str, timeout: float = 5.0, *,
                 max_blob_size: int = MAX_BLOB_SIZE,
                 peer_uid: int | None = None) -> ExportedState:
    """Read permanent + volatile state from a swtpm QEMU is not attached to.

    The TPM is started (INIT, keeping the volatile state file) if it was
    stopped, and left running. Refuses a swtpm without a migration key: its
    blobs would come out in plaintext.
    """
    with CtrlClient(path, timeout, max_blob_size=max_blob_size, peer_uid=peer_uid) as client:
        config = client.get_config()
        if not config & CONFIG_FLAG_MIGRATION_KEY:
            raise _fail("export_state", "swtpm runs without a migration key; "
                        "refusing to export plaintext state")
        try:
            permanent = client.get_stateblob(BlobType.PERMANENT)
        except exception.CtrlChannelError as exc:
            if error_result(exc) != TPM_BAD_ORDINAL:
                raise
            LOG.debug("TPM behind %(path)s not running; INIT before export", {"path": str(path)})
            client.init(delete_volatile=False)
            permanent = client.get_stateblob(BlobType.PERMANENT)
        volatile = client.get_stateblob(BlobType.VOLATILE)
    for blob, what in ((permanent.data, "permanent"), (volatile.data, "volatile")):
        try:
            _require_sealed(blob, what)
        except exception.InvalidInput as exc:
            raise _fail("export_state", exc.message) from None
    LOG.info("Exported swtpm state from %(path)s: permanent %(p)d bytes, volatile %(v)d bytes",
             {"path": str(path), "p": len(permanent.data), "v": len(volatile.data)})
    return ExportedState(permanent.data, volatile.data, permanent.flags, volatile.flags)


def validate_import(state: ExportedState, max_blob_size: int) -> None:
    """Refuse blobs no import may take (empty, oversized, unknown flags,
    not sealed under a migration key) before anything is touched."""
    for blob, flags, what in ((state.permanent, state.permanent_flags, "permanent"),
                              (state.volatile, state.volatile_flags, "volatile")):
        if not blob:
            raise exception.InvalidInput(reason="%s blob is empty" % what)
        if len(blob) > max_blob_size:
            raise exception.InvalidInput(reason="%s blob of %d bytes exceeds the limit of %d"
                                         % (what, len(blob), max_blob_size))
        if flags & ~STATE_FLAG_ENCRYPTED:
            raise exception.InvalidInput(reason="%s blob has unknown flags 0x%x" % (what, flags))
        _require_sealed(blob, what)


def import_state(path: Path | str, state: ExportedState, timeout: float = 5.0, *,
                 vtpcm_id: str = "<unnamed>", max_blob_size: int = MAX_BLOB_SIZE,
                 empty_target: bool = False, peer_uid: int | None = None) -> None:
    """Replace the state of a swtpm QEMU is not attached to, then run it.

    Sequence: (INIT if stopped,) snapshot the target's own blobs, STOP,
    SET permanent, SET volatile, INIT(delete volatile): the TPM then
    continues where the exporter stopped (no TPM2_Startup needed).

    If swtpm rejects a blob (other migration key, tampering) the snapshot is
    set back and the TPM restarted, so the target's TPM state is as it was
    (a blob that was already accepted stays cached in libtpms until the next
    INIT, and a zero-length SET does not clear it: it sets an EMPTY state,
    hence the snapshot). A target that was stopped is stopped again.
    StateImportError is raised. Bad input is refused before any contact.

    ``empty_target``: the swtpm was started on an empty state directory and
    never initialized (an incoming vTPCM). The blobs are set and INIT run as
    QEMU's incoming side does; there is nothing to snapshot, and INITing it
    first would manufacture a TPM. After a failure the caller discards it.
    """
    try:
        validate_import(state, max_blob_size)
    except exception.InvalidInput as exc:
        raise exception.StateImportError(vtpcm_id=vtpcm_id, reason=exc.message) from None
    with CtrlClient(path, timeout, max_blob_size=max_blob_size, peer_uid=peer_uid) as client:
        config = client.get_config()
        if config != CONFIG_FLAG_FILE_KEY | CONFIG_FLAG_MIGRATION_KEY:
            raise exception.StateImportError(
                vtpcm_id=vtpcm_id,
                reason="target swtpm must run with an at-rest and a migration key "
                       "(config flags 0x%x)" % config)
        was_running = False
        snapshot: tuple[StateBlob, StateBlob] | None = None
        if not empty_target:
            was_running = _ensure_running(client)
            snapshot = (client.get_stateblob(BlobType.PERMANENT),
                        client.get_stateblob(BlobType.VOLATILE))
            client.stop()
        try:
            client.set_stateblob(BlobType.PERMANENT, state.permanent, state.permanent_flags)
            client.set_stateblob(BlobType.VOLATILE, state.volatile, state.volatile_flags)
            client.init(delete_volatile=True)
        except exception.CtrlChannelError as exc:
            if snapshot is not None:
                _restore_after_failed_import(client, snapshot, was_running, vtpcm_id)
            raise exception.StateImportError(
                vtpcm_id=vtpcm_id,
                reason="swtpm refused the state (%s); wrong migration key or damaged blob%s"
                % (exc.message, "; target restored" if snapshot is not None else "")
            ) from None
    LOG.info("Imported swtpm state into %(kind)svTPCM %(id)s (%(p)d + %(v)d bytes)",
             {"kind": "empty " if empty_target else "", "id": vtpcm_id,
              "p": len(state.permanent), "v": len(state.volatile)})


def _ensure_running(client: CtrlClient) -> bool:
    """INIT a stopped TPM (keeping its volatile file); True if it was running."""
    try:
        client.store_volatile()
    except exception.CtrlChannelError as exc:
        if error_result(exc) != TPM_BAD_ORDINAL:
            raise
        client.init(delete_volatile=False)
        return False
    return True


def _restore_after_failed_import(client: CtrlClient, snapshot: tuple[StateBlob, StateBlob],
                                 was_running: bool, vtpcm_id: str) -> None:
    """Set the target's own blobs back and restart it from them."""
    try:
        client.stop()
        for blob in snapshot:
            client.set_stateblob(blob.blob_type, blob.data, blob.flags)
        client.init(delete_volatile=True)
        if not was_running:
            client.store_volatile()
            client.stop()
    except exception.CtrlChannelError as exc:
        LOG.error("vTPCM %(id)s: restoring the target after a failed import failed: %(err)s",
                  {"id": vtpcm_id, "err": exc.message})
        raise exception.StateImportError(
            vtpcm_id=vtpcm_id,
            reason="import failed and the target could not be restored (%s)" % exc.message
        ) from None
