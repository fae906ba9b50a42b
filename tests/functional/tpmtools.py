"""Guest-side TPM helpers for functional tests (tpm2-pytss on a swtpm data
socket) and the plaintext-window scan used by the "never in plaintext" tests.

The plaintext permanent state comes from a throwaway swtpm started with the
at-rest key only (no --migration-key) on a COPY of the state files:
GET_STATEBLOB "decrypted" then returns the state with no encryption layer.
"""

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from tpm2_pytss import ESAPI, TCTILdr
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPMA_NV
from tpm2_pytss.types import (
    TPM2B_NV_PUBLIC,
    TPML_DIGEST_VALUES,
    TPMS_NV_PUBLIC,
    TPMT_HA,
    TPMU_HA,
)

from vtpcm_agent.swtpm import ctrl, process

NV_INDEX = 0x01500016
PERSISTENT = 0x81000010
WINDOW = 32


@contextlib.contextmanager
def esapi(paths: process.SwtpmPaths) -> Iterator[ESAPI]:
    """A tpm2-pytss ESAPI on a swtpm data socket; always closed."""
    tcti = TCTILdr("swtpm", "path=%s" % paths.data_socket)
    esys = ESAPI(tcti)
    try:
        yield esys
    finally:
        esys.close()
        tcti.close()


def write_guest_state(paths: process.SwtpmPaths, nv_data: bytes, pcr_digest: bytes,
                      make_key: bool) -> None:
    """What a guest does: define + write an NV index, extend PCR16, persist a key."""
    with esapi(paths) as esys:
        nv_public = TPM2B_NV_PUBLIC(nvPublic=TPMS_NV_PUBLIC(
            nvIndex=NV_INDEX, nameAlg=TPM2_ALG.SHA256,
            attributes=TPMA_NV.OWNERWRITE | TPMA_NV.OWNERREAD | TPMA_NV.AUTHREAD
            | TPMA_NV.AUTHWRITE,
            dataSize=len(nv_data)))
        handle = esys.nv_define_space(b"", nv_public)
        esys.nv_write(handle, nv_data)
        digests = TPML_DIGEST_VALUES([TPMT_HA(hashAlg=TPM2_ALG.SHA256,
                                              digest=TPMU_HA(sha256=pcr_digest))])
        esys.pcr_extend(ESYS_TR.PCR16, digests)
        if make_key:
            primary = esys.create_primary(None, "ecc256")[0]
            esys.evict_control(ESYS_TR.OWNER, primary, PERSISTENT)
            esys.flush_context(primary)


def read_guest_state(paths: process.SwtpmPaths, with_key: bool) -> dict[str, bytes]:
    with esapi(paths) as esys:
        nv = esys.tr_from_tpmpublic(NV_INDEX)
        size = esys.nv_read_public(nv)[0].nvPublic.dataSize
        result = {"nv": bytes(esys.nv_read(nv, size)),
                  "pcr16": bytes(esys.pcr_read("sha256:16")[2][0])}
        if with_key:
            key = esys.tr_from_tpmpublic(PERSISTENT)
            public, name, _ = esys.read_public(key)
            result["key_public"] = public.marshal()
            result["key_name"] = bytes(name)
        return result


@contextlib.contextmanager
def plaintext_permanent(state_dir: Path, at_rest_key: bytes, base: Path) -> Iterator[bytes]:
    """Decrypted permanent state, read from a key-only swtpm on a copy of the files.

    The throwaway swtpm is stopped by pid and the copy removed, also on failure."""
    copy = base / "state-plain"
    copy.mkdir()
    paths = process.SwtpmPaths(copy, base / "plain.ctrl", base / "plain.pid",
                               base / "plain.log")
    pid = None
    try:
        for entry in state_dir.iterdir():
            if entry.name != ".lock":
                shutil.copy2(entry, copy / entry.name)
        read_fd, write_fd = os.pipe()
        os.write(write_fd, at_rest_key)
        os.close(write_fd)
        try:
            subprocess.run(
                ["swtpm", "socket", "--tpm2", "--daemon", "--flags", "not-need-init",
                 "--tpmstate", "dir=%s,mode=0600" % copy,
                 "--ctrl", "type=unixio,path=%s,mode=0600" % paths.ctrl_socket,
                 "--key", "fd=%d,mode=aes-256-cbc,format=binary" % read_fd,
                 "--pid", "file=%s" % paths.pid_file,
                 "--log", "file=%s,level=1" % paths.log_file],
                pass_fds=(read_fd,), stdin=subprocess.DEVNULL, check=True, timeout=10)
        finally:
            os.close(read_fd)
        pid = int(paths.pid_file.read_text())
        with ctrl.CtrlClient(paths.ctrl_socket) as client:
            assert client.get_config() == ctrl.CONFIG_FLAG_FILE_KEY
            blob = client.get_stateblob(ctrl.BlobType.PERMANENT, decrypted=True)
        header = ctrl.parse_blob_header(blob.data)
        assert not header.migration_encrypted and not header.at_rest_encrypted
        # header (10) + TLV migration-data header (6) + TLV data header (6)
        yield blob.data[22:]
    finally:
        if pid is not None:
            process.stop(pid, paths)
        shutil.rmtree(copy, ignore_errors=True)


def windows(plain: bytes) -> set[bytes]:
    """32-byte windows with enough variety (runs of zeros match anything)."""
    return {plain[i:i + WINDOW] for i in range(len(plain) - WINDOW + 1)
            if len(set(plain[i:i + WINDOW])) >= 12}


def leaks(found: set[bytes], data: bytes) -> int:
    return sum(1 for i in range(len(data) - WINDOW + 1) if data[i:i + WINDOW] in found)


def files(*dirs: Path) -> list[Path]:
    return [p for d in dirs for p in d.rglob("*") if p.is_file()]
