"""The agent reads swtpm's at-rest permanent state without swtpm (REAL swtpm 0.7.1).

Why: a post-import check (design, "Open points") needs the destination's
agent to know what its incoming swtpm received while QEMU holds that swtpm's
control channel. Shown here: ``permall.decrypt_state_file`` returns exactly
what swtpm itself decrypts (a key-only swtpm on a copy of the files), and a
state moved from A (at-rest key K1) to B (K2, same migration key), as QEMU
moves it in a live migration or as the agent's own ``import_state`` does,
leaves byte-identical plaintext permanent state on both sides.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG
from tpm2_pytss.types import TPML_DIGEST_VALUES, TPMT_HA, TPMU_HA

from tests.functional import tpmtools
from tests.refusal import refused
from vtpcm_agent.swtpm import ctrl, permall, process, provision
from vtpcm_common import exception

pytestmark = pytest.mark.functional

PERMALL = "tpm2-00.permall"


def _key() -> bytes:
    return os.urandom(32)


def _file(paths: process.SwtpmPaths) -> bytes:
    return (paths.state_dir / PERMALL).read_bytes()


def _plain(paths: process.SwtpmPaths, key: bytes) -> bytes:
    return permall.decrypt_state_file(_file(paths), key)


def _swtpm_says(paths: process.SwtpmPaths, key: bytes, base: Path) -> bytes:
    """swtpm's own decryption of the same file (the oracle)."""
    with tpmtools.plaintext_permanent(paths.state_dir, key, base) as plain:
        return plain


def _qemu_like_transfer(source: process.SwtpmPaths, target: process.SwtpmPaths) -> None:
    """What QEMU 7.2's tpm_emulator does in a live migration: the source's
    pre-save reads the three blobs, the target's post-load STOPs, SETs them
    with the flags read, and INITs with DELETE_VOLATILE (``tpmtools``)."""
    blobs = tpmtools.qemu_pre_save(source)
    for blob in blobs[:2]:
        assert ctrl.parse_blob_header(blob.data).migration_encrypted
    tpmtools.qemu_post_load(target, blobs)


def _extend(paths: process.SwtpmPaths) -> None:
    digests = TPML_DIGEST_VALUES([TPMT_HA(hashAlg=TPM2_ALG.SHA256,
                                          digest=TPMU_HA(sha256=os.urandom(32)))])
    with tpmtools.esapi(paths) as esys:
        esys.get_random(16)
        esys.pcr_read("sha256:16")
        esys.pcr_extend(ESYS_TR.PCR16, digests)
        nv = esys.tr_from_tpmpublic(tpmtools.NV_INDEX)
        esys.nv_read(nv, 32)


def test_moved_state_decrypts_to_identical_permanent_state(short_dir, swtpm_factory,
                                                            swtpm_paths):
    mig = _key()
    key_a, key_b, key_c = _key(), _key(), _key()
    pa, pb, pc = (swtpm_paths(n) for n in ("a", "b", "c"))
    provision.provision_state(pa.state_dir, key_a, vtpcm_id="a", localca_dir=short_dir / "ca")
    swtpm_factory(pa, key_a, mig, startup_clear=True)
    nv_a = os.urandom(32)
    tpmtools.write_guest_state(pa, nv_a, os.urandom(32), make_key=True)

    plain_a = _plain(pa, key_a)
    assert plain_a == _swtpm_says(pa, key_a, short_dir)
    assert nv_a in plain_a and len(plain_a) > 4000  # EK, certificates, our NV index and key
    with refused(exception.StateFileError, "swtpm state file tpm2-00.permall rejected: "
                 "HMAC mismatch (wrong at-rest key, or the file was altered)"):
        permall.decrypt_state_file(_file(pa), key_b)

    # QEMU's way, into an incoming B (empty state dir, waiting for INIT).
    for paths in (pb, pc):
        paths.state_dir.mkdir()
    swtpm_factory(pb, key_b, mig)
    assert not (pb.state_dir / PERMALL).exists()
    _qemu_like_transfer(pa, pb)
    assert _plain(pa, key_a) == plain_a  # the source's file is only read
    assert _file(pb) != _file(pa)  # another key and IV ...
    assert _plain(pb, key_b) == plain_a  # ... over the very same state
    assert _plain(pb, key_b) == _swtpm_says(pb, key_b, short_dir)

    # The agent's own cold path: export_state, then import_state into an empty C.
    swtpm_factory(pc, key_c, mig)
    ctrl.import_state(pc.ctrl_socket, ctrl.export_state(pa.ctrl_socket), vtpcm_id="c",
                      empty_target=True)
    assert _plain(pc, key_c) == plain_a

    # Guest commands that write no NV leave B's file alone; an NV write does not.
    before = (pb.state_dir / PERMALL).stat().st_mtime_ns
    _extend(pb)
    assert (pb.state_dir / PERMALL).stat().st_mtime_ns == before
    assert _plain(pb, key_b) == plain_a
    nv_b = os.urandom(32)
    with tpmtools.esapi(pb) as esys:
        esys.nv_write(esys.tr_from_tpmpublic(tpmtools.NV_INDEX), nv_b)
    after = _plain(pb, key_b)
    assert after != plain_a and nv_b in after and nv_a not in after
