"""Guest-side TPM helpers for functional tests (tpm2-pytss on a swtpm data
socket) and the plaintext state the "never in plaintext" tests look for
(with the one scanner, tests/leakscan.py).

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

from tpm2_pytss import ESAPI, TCTILdr, TSS2_Exception
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_CAP, TPM2_HT, TPM2_SU, TPMA_NV
from tpm2_pytss.types import (
    TPM2B_NV_PUBLIC,
    TPML_DIGEST_VALUES,
    TPMS_NV_PUBLIC,
    TPMT_HA,
    TPMU_HA,
)

from tests import leakscan
from vtpcm_agent.swtpm import ctrl, framing, process
from vtpcm_agent.swtpm.keypipe import key_pipe
from vtpcm_common import exception

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


def power_on(paths: process.SwtpmPaths) -> None:
    """What a (re)started QEMU and the guest firmware do to a swtpm waiting
    for INIT: CMD_INIT, then TPM2_Startup(CLEAR)."""
    with ctrl.CtrlClient(paths.ctrl_socket) as client:
        client.init(delete_volatile=False)
    with esapi(paths) as esys:
        esys.startup(TPM2_SU.CLEAR)


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
    with key_only_swtpm(state_dir, at_rest_key, base, data_socket=False) as paths:
        with ctrl.CtrlClient(paths.ctrl_socket) as client:
            assert client.get_config() == ctrl.CONFIG_FLAG_FILE_KEY
            blob = client.get_stateblob(ctrl.BlobType.PERMANENT, decrypted=True)
        header = ctrl.parse_blob_header(blob.data)
        assert not header.migration_encrypted and not header.at_rest_encrypted
        # header (10) + TLV migration-data header (6) + TLV data header (6)
        yield blob.data[22:]


def plaintext_blobs(state_dir: Path, at_rest_key: bytes,
                    base: Path) -> tuple[ctrl.StateBlob, ctrl.StateBlob]:
    """(permanent, volatile) blobs of a stopped vTPCM as a swtpm WITHOUT a
    migration key hands them out (header included): a plaintext stream."""
    with key_only_swtpm(state_dir, at_rest_key, base, data_socket=False) as paths:
        with ctrl.CtrlClient(paths.ctrl_socket) as client:
            assert client.get_config() == ctrl.CONFIG_FLAG_FILE_KEY
            return (client.get_stateblob(ctrl.BlobType.PERMANENT, decrypted=True),
                    client.get_stateblob(ctrl.BlobType.VOLATILE, decrypted=True))


def plaintext_state(state_dir: Path, at_rest_key: bytes, base: Path) -> tuple[bytes, bytes]:
    """(permanent, volatile) plaintext of a stopped vTPCM's state files.

    The volatile part is what the TPM keeps between a STOP and the next
    start (PCRs, loaded objects and sessions; tpm2-00.volatilestate when it
    was saved): the clone starts from the files, so its volatile blob is
    that state, decrypted by the same key-only swtpm."""
    with key_only_swtpm(state_dir, at_rest_key, base, data_socket=False) as paths:
        with ctrl.CtrlClient(paths.ctrl_socket) as client:
            assert client.get_config() == ctrl.CONFIG_FLAG_FILE_KEY
            permanent = client.get_stateblob(ctrl.BlobType.PERMANENT, decrypted=True)
            volatile = client.get_stateblob(ctrl.BlobType.VOLATILE, decrypted=True)
    for blob in (permanent, volatile):
        header = ctrl.parse_blob_header(blob.data)
        assert not header.migration_encrypted and not header.at_rest_encrypted
    return permanent.data[22:], volatile.data[22:]


def secrets_of_state(state_dir: Path, at_rest_key: bytes, base: Path) -> set[bytes]:
    """The secret windows (tests/leakscan.py) of a stopped vTPCM's permanent
    AND volatile plaintext state, leaving out what its guest can read."""
    permanent, volatile = plaintext_state(state_dir, at_rest_key, base)
    public = public_material(state_dir, at_rest_key, base)
    return leakscan.windows(permanent, public) | leakscan.windows(volatile, public)


def public_material(state_dir: Path, at_rest_key: bytes, base: Path) -> list[bytes]:
    """Everything a guest can read through the TPM's public interface: public
    areas and names of persistent objects, public areas, names and readable
    contents of NV indices (EK/platform certificates, the guest's own data),
    each bare and with its TPM2B size prefix.

    A guest that used its TPM holds these in its RAM, so they legitimately
    appear in a migration stream; anything else of the state must not."""
    items: list[bytes] = []
    with key_only_swtpm(state_dir, at_rest_key, base, data_socket=True) as paths, \
            esapi(paths) as esys:
        for handle_type, reader in ((TPM2_HT.PERSISTENT, _object_public),
                                    (TPM2_HT.NV_INDEX, _nv_public)):
            _, data = esys.get_capability(TPM2_CAP.HANDLES, handle_type << 24, 256)
            for handle in data.data.handles:
                items += reader(esys, esys.tr_from_tpmpublic(handle))
    return [i for i in items if len(i) >= WINDOW]


def _object_public(esys: ESAPI, tr: int) -> list[bytes]:
    public, name, qualified = esys.read_public(tr)
    return [public.publicArea.marshal(), public.marshal(), bytes(name), name.marshal(),
            bytes(qualified), qualified.marshal()]


def _nv_public(esys: ESAPI, tr: int) -> list[bytes]:
    public, name = esys.nv_read_public(tr)
    out = [public.nvPublic.marshal(), public.marshal(), bytes(name), name.marshal()]
    size = public.nvPublic.dataSize
    for auth in (tr, ESYS_TR.OWNER):
        data = b""
        try:
            while len(data) < size:
                data += bytes(esys.nv_read(tr, min(512, size - len(data)), len(data),
                                           auth_handle=auth))
        except TSS2_Exception:
            continue
        out.append(data)
        break
    return out


@contextlib.contextmanager
def key_only_swtpm(state_dir: Path, at_rest_key: bytes, base: Path,
                   data_socket: bool) -> Iterator[process.SwtpmPaths]:
    """A key-only swtpm (no migration key) on a copy of ``state_dir``."""
    copy = base / "state-plain"
    copy.mkdir()
    paths = process.SwtpmPaths(copy, base / "plain.ctrl", base / "plain.pid",
                               base / "plain.log", base / "plain" if data_socket else None)
    pid = None
    try:
        for entry in state_dir.iterdir():
            if entry.name != ".lock":
                shutil.copy2(entry, copy / entry.name)
        read_fd = key_pipe(at_rest_key)
        argv = ["swtpm", "socket", "--tpm2", "--daemon",
                "--flags", "not-need-init" + (",startup-clear" if data_socket else ""),
                "--tpmstate", "dir=%s,mode=0600" % copy,
                "--ctrl", "type=unixio,path=%s,mode=0600" % paths.ctrl_socket,
                "--key", "fd=%d,mode=aes-256-cbc,format=binary" % read_fd,
                "--pid", "file=%s" % paths.pid_file,
                "--log", "file=%s,level=1" % paths.log_file]
        if paths.data_socket is not None:
            argv += ["--server", "type=unixio,path=%s" % paths.data_socket]
        try:
            # no output to inherit: the daemonized swtpm would hold the test
            # run's stdout (a CI group's pipe) for as long as it lives
            # (swtpm's own words are in its log file)
            done = subprocess.run(argv, pass_fds=(read_fd,), stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  timeout=10, check=False)
            if done.returncode != 0:
                raise RuntimeError("swtpm exited with %d: %s" % (
                    done.returncode, paths.log_file.read_text(errors="replace")[-600:]
                    if paths.log_file.exists() else "no log"))
        finally:
            os.close(read_fd)
            # also when the launcher failed after the fork; a half-written
            # file must not hide the launcher's own error
            text = paths.pid_file.read_text().strip() if paths.pid_file.exists() else ""
            pid = int(text) if text.isdigit() else None
        if pid is None:
            raise RuntimeError("swtpm wrote no pid file %s" % paths.pid_file)
        yield paths
    finally:
        if pid is not None:
            process.stop(pid, paths)
        else:  # a launcher that failed or timed out may have left its daemon
            with contextlib.suppress(OSError):  # the original error stands
                process._kill_ours(paths)
        shutil.rmtree(copy, ignore_errors=True)


def secret_offsets(plain: bytes, public: list[bytes], candidates: set[int]) -> set[int]:
    """Offsets of windows lying wholly outside every public item's bytes in
    ``plain``. Seeds and private keys are at least 32 bytes long, so each of
    them still yields whole windows here."""
    covered = leakscan.public_mask(plain, public)
    return {o for o in candidates if not any(covered[o:o + WINDOW])}


def files(*dirs: Path) -> list[Path]:
    return [p for d in dirs for p in d.rglob("*") if p.is_file()]


# swtpm's answer to GET_STATEBLOB savestate without a savestate file
TPM_RETRY = 0x800


def qemu_pre_save(paths: process.SwtpmPaths) -> list[ctrl.StateBlob]:
    """What QEMU 7.2's tpm_emulator pre-save reads from the source's swtpm
    in a live migration: permanent, volatile and savestate blobs
    (DECRYPTED: the at-rest layer stripped, the migration-key layer on);
    no savestate file means an empty one, as QEMU sends it."""
    blobs = []
    with ctrl.CtrlClient(paths.ctrl_socket) as client:
        for blob_type in (ctrl.BlobType.PERMANENT, ctrl.BlobType.VOLATILE):
            blobs.append(client.get_stateblob(blob_type, decrypted=True))
        try:
            blobs.append(client.get_stateblob(ctrl.BlobType.SAVESTATE, decrypted=True))
        except exception.CtrlChannelError as exc:
            result = framing.error_result(exc)
            if result != TPM_RETRY:  # a helper: pytest does not rewrite its asserts
                raise AssertionError("GET_STATEBLOB savestate failed with result %s, not "
                                     "TPM_RETRY (no savestate)"
                                     % ("none" if result is None else hex(result))) from exc
            blobs.append(ctrl.StateBlob(ctrl.BlobType.SAVESTATE, 0, b""))
    return blobs


def qemu_post_load(paths: process.SwtpmPaths, blobs: list[ctrl.StateBlob]) -> None:
    """QEMU's post-load on the destination: STOP, SET_STATEBLOB of each blob
    with the flags read, INIT with DELETE_VOLATILE."""
    with ctrl.CtrlClient(paths.ctrl_socket) as client:
        client.stop()
        for blob in blobs:
            client.set_stateblob(blob.blob_type, blob.data, blob.flags)
        client.init(delete_volatile=True)
