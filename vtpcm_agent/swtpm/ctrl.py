"""Client of swtpm 0.7.1's control channel (unix socket), and state transfer.

Why pure Python: the agent must read and set a vTPCM's state blobs whenever
QEMU is not attached (cold migration, resize, shelve, verification) without
shelling out to ``swtpm_ioctl`` and without ever holding plaintext state.

This module only re-exports three layers, each usable alone, so that callers
keep one name for the channel (``ctrl.CtrlClient``, ``ctrl.export_state``):

* ``framing``: request encoders, reply lengths and parsers, result codes and
  blob headers; pure functions over bytes, no I/O;
* ``client``: ``CtrlClient``, one connection, every read bounded by a
  deadline;
* ``transfer``: ``export_state`` / ``import_state``, whole-TPM transfer for a
  swtpm that QEMU is NOT attached to.
"""

from __future__ import annotations

from vtpcm_agent.swtpm.client import CtrlClient
from vtpcm_agent.swtpm.framing import (
    BLOB_FLAG_ENCRYPTED,
    BLOB_FLAG_ENCRYPTED_256BIT_KEY,
    BLOB_FLAG_MIGRATION_256BIT_KEY,
    BLOB_FLAG_MIGRATION_DATA,
    BLOB_FLAG_MIGRATION_ENCRYPTED,
    BLOB_HEADER,
    CONFIG_FLAG_FILE_KEY,
    CONFIG_FLAG_MIGRATION_KEY,
    INIT_FLAG_DELETE_VOLATILE,
    MAX_BLOB_SIZE,
    MAX_INFO_SIZE,
    STATE_FLAG_DECRYPTED,
    STATE_FLAG_ENCRYPTED,
    TPM_BAD_ORDINAL,
    TPM_BAD_PARAMETER,
    TPM_FAIL,
    TPM_SUCCESS,
    BlobHeader,
    BlobType,
    Command,
    StateBlob,
    check_result,
    encode_get_info,
    encode_get_stateblob,
    encode_init,
    encode_request,
    encode_set_locality,
    encode_set_stateblob,
    error_result,
    parse_blob_header,
    parse_capability,
    parse_config,
    parse_info,
    parse_result,
    parse_stateblob,
    response_length,
    result_name,
)
from vtpcm_agent.swtpm.transfer import ExportedState, export_state, import_state, validate_import

__all__ = [
    # framing
    "BLOB_FLAG_ENCRYPTED", "BLOB_FLAG_ENCRYPTED_256BIT_KEY", "BLOB_FLAG_MIGRATION_256BIT_KEY",
    "BLOB_FLAG_MIGRATION_DATA", "BLOB_FLAG_MIGRATION_ENCRYPTED", "BLOB_HEADER",
    "CONFIG_FLAG_FILE_KEY", "CONFIG_FLAG_MIGRATION_KEY", "INIT_FLAG_DELETE_VOLATILE",
    "MAX_BLOB_SIZE", "MAX_INFO_SIZE", "STATE_FLAG_DECRYPTED", "STATE_FLAG_ENCRYPTED",
    "TPM_BAD_ORDINAL", "TPM_BAD_PARAMETER", "TPM_FAIL", "TPM_SUCCESS", "BlobHeader", "BlobType",
    "Command", "StateBlob", "check_result", "encode_get_info", "encode_get_stateblob",
    "encode_init", "encode_request", "encode_set_locality", "encode_set_stateblob", "error_result",
    "parse_blob_header", "parse_capability", "parse_config", "parse_info", "parse_result",
    "parse_stateblob", "response_length", "result_name",
    # client
    "CtrlClient",
    # transfer
    "ExportedState", "export_state", "import_state", "validate_import",
]
