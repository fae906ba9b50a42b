"""swtpm layer against REAL swtpm 0.7.1 processes and REAL tpm2-pytss.

Scenario: provision vTPCM A (EK + certificates from host 1's own local CA),
write guest-visible state through the TPM (NV index, PCR16, persistent key),
export it through the control channel, import it into B (other at-rest key,
same migration key, host 2's CA) and read the same state back. Import into
C (other migration key) fails and leaves C (and A) unchanged.

Plaintext scan: the plaintext permanent state is obtained from a throwaway
swtpm started with A's at-rest key only (no --migration-key) on a copy of
A's state files; GET_STATEBLOB "decrypted" then returns the state with no
encryption layer at all. No 32-byte window of it may appear in any file of
the state/run dirs or in the exported blobs.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from tpm2_pytss.constants import ESYS_TR, TPM2_SU

from tests import leakscan
from tests.functional import tpmtools
from vtpcm_agent.swtpm import ctrl, localca, process, provision
from vtpcm_common import exception

pytestmark = pytest.mark.functional

NV_INDEX = 0x01500016
PERSISTENT = 0x81000010
EK_CERT_RSA = 0x01C00002
WINDOW = 32


def _key() -> bytes:
    return os.urandom(32)


def _read_ek_cert(paths: process.SwtpmPaths) -> x509.Certificate:
    with tpmtools.esapi(paths) as esys:
        nv = esys.tr_from_tpmpublic(EK_CERT_RSA)
        size = esys.nv_read_public(nv)[0].nvPublic.dataSize
        data = b""
        while len(data) < size:
            chunk = min(512, size - len(data))
            data += bytes(esys.nv_read(nv, chunk, len(data), auth_handle=ESYS_TR.OWNER))
    return x509.load_der_x509_certificate(data)


def _snapshot(paths: process.SwtpmPaths) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in paths.state_dir.iterdir() if p.is_file()}


# --------------------------------------------------------------------------

def test_concurrent_provisioning_on_one_local_ca(short_dir, swtpm_factory, swtpm_paths):
    """Eight guests booted at once in the lab made one agent create eight
    vTPCMs at once: each create rewrote the local CA's config through one
    shared temporary name, and a rename failed ("No such file or directory:
    swtpm_setup.conf.tmp"). Now all succeed, signed by the one CA, with
    distinct certificate serial numbers."""
    ca = short_dir / "ca"
    names = ["p%d" % i for i in range(6)]
    keys = {n: _key() for n in names}
    paths = {n: swtpm_paths(n) for n in names}
    errors: list[BaseException] = []
    gate = threading.Barrier(len(names))

    def create(name: str) -> None:
        try:
            gate.wait(timeout=30)
            provision.provision_state(paths[name].state_dir, keys[name], vtpcm_id=name,
                                      localca_dir=ca)
        except BaseException as err:  # noqa: BLE001 - asserted below
            errors.append(err)
    threads = [threading.Thread(target=create, args=(n,)) for n in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert sorted(p.name for p in ca.iterdir() if p.name.endswith(".tmp")) == []
    issuer = x509.load_pem_x509_certificate(localca.issuer_cert(ca).read_bytes())
    serials = set()
    for name in names:
        swtpm_factory(paths[name], keys[name], _key(), startup_clear=True)
        cert = _read_ek_cert(paths[name])
        cert.verify_directly_issued_by(issuer)
        serials.add(cert.serial_number)
    assert len(serials) == len(names)


def test_export_import_roundtrip_and_failed_import(short_dir, swtpm_factory, swtpm_paths):
    mig, mig_other = _key(), _key()
    key_a, key_b, key_c = _key(), _key(), _key()
    ca1, ca2 = short_dir / "ca1", short_dir / "ca2"
    pa, pb, pc = (swtpm_paths(n) for n in ("a", "b", "c"))

    provision.provision_state(pa.state_dir, key_a, vtpcm_id="a", localca_dir=ca1)
    provision.provision_state(pb.state_dir, key_b, vtpcm_id="b", localca_dir=ca2)
    provision.provision_state(pc.state_dir, key_c, vtpcm_id="c", localca_dir=ca2,
                              create_ek=False)

    # Each simulated host has its own CA, and A's EK certificate is signed by host 1's.
    issuer1 = x509.load_pem_x509_certificate(localca.issuer_cert(ca1).read_bytes())
    issuer2 = x509.load_pem_x509_certificate(localca.issuer_cert(ca2).read_bytes())
    assert issuer1.public_key().public_numbers() != issuer2.public_key().public_numbers()

    swtpm_factory(pa, key_a, mig, startup_clear=True)
    ek_cert_a = _read_ek_cert(pa)
    ek_cert_a.verify_directly_issued_by(issuer1)

    nv_a, pcr_a = os.urandom(32), os.urandom(32)
    tpmtools.write_guest_state(pa, nv_a, pcr_a, make_key=True)
    before_a = tpmtools.read_guest_state(pa, with_key=True)
    assert before_a["nv"] == nv_a

    state = ctrl.export_state(pa.ctrl_socket)
    assert "bytes" in repr(state) and nv_a.hex() not in repr(state)
    for blob in (state.permanent, state.volatile):
        assert ctrl.parse_blob_header(blob).migration_encrypted
    # Export changes nothing visible in A.
    assert tpmtools.read_guest_state(pa, with_key=True) == before_a

    # B: different at-rest key, same migration key, waits for INIT (like QEMU's target).
    swtpm_factory(pb, key_b, mig)
    ctrl.import_state(pb.ctrl_socket, state, vtpcm_id="b")
    assert tpmtools.read_guest_state(pb, with_key=True) == before_a
    _read_ek_cert(pb).verify_directly_issued_by(issuer1)  # A's EK moved with the state

    # C: different migration key; running, with its own state.
    swtpm_factory(pc, key_c, mig_other, startup_clear=True)
    tpmtools.write_guest_state(pc, os.urandom(32), os.urandom(32), make_key=False)
    before_c = tpmtools.read_guest_state(pc, with_key=False)
    with pytest.raises(exception.StateImportError, match="TPM_DECRYPT_ERROR.*restored"):
        ctrl.import_state(pc.ctrl_socket, state, vtpcm_id="c")
    assert tpmtools.read_guest_state(pc, with_key=False) == before_c  # volatile PCR16 included
    assert tpmtools.read_guest_state(pa, with_key=True) == before_a

    # A tampered blob (right key) is refused too, B unchanged.
    tampered = bytearray(state.permanent)
    tampered[len(tampered) // 2] ^= 1
    with pytest.raises(exception.StateImportError):
        ctrl.import_state(pb.ctrl_socket, ctrl.ExportedState(bytes(tampered), state.volatile),
                          vtpcm_id="b")
    assert tpmtools.read_guest_state(pb, with_key=True) == before_a
    # Tampered volatile blob: the permanent one is accepted (and cached by libtpms)
    # before the volatile one fails; the restore must undo that.
    tampered = bytearray(state.volatile)
    tampered[len(tampered) // 2] ^= 1
    with pytest.raises(exception.StateImportError, match="restored"):
        ctrl.import_state(pc.ctrl_socket, ctrl.ExportedState(state.permanent, bytes(tampered)),
                          vtpcm_id="c")
    assert tpmtools.read_guest_state(pc, with_key=False) == before_c

    # Plaintext scan over everything on disk (state and swtpm logs) and the
    # exported blobs: A's permanent AND volatile state (saved to its state
    # dir first), and every key, in every encoding (tests/leakscan.py).
    with ctrl.CtrlClient(pa.ctrl_socket) as client:
        client.store_volatile()
    with tpmtools.plaintext_permanent(pa.state_dir, key_a, short_dir) as plain:
        pass
    assert len(plain) > 4000  # EK + certificates + our objects
    assert nv_a in plain  # sanity: the scan looks at real plaintext
    _, volatile = tpmtools.plaintext_state(pa.state_dir, key_a, short_dir)
    assert before_a["pcr16"] in volatile  # the volatile plaintext is real too
    found = tpmtools.secrets_of_state(pa.state_dir, key_a, short_dir)
    assert len(found) > 1000
    assert any(w in volatile for w in found)
    keys = [("A at-rest key", key_a), ("B at-rest key", key_b), ("C at-rest key", key_c),
            ("migration key", mig), ("C migration key", mig_other)]
    scanned = tpmtools.files(pa.state_dir, pb.state_dir, pc.state_dir,
                             short_dir / "a", short_dir / "b", short_dir / "c")
    assert any(p.name == "tpm2-00.permall" for p in scanned)
    assert any(p.name == "log" for p in scanned)  # the swtpm logs
    haystack = leakscan.SEP.join([*(p.read_bytes() for p in scanned),
                                  state.permanent, state.volatile])
    leakscan.assert_finds(keys, found, haystack)
    assert leakscan.hits(keys, haystack) == []
    assert leakscan.window_hits(found, haystack) == 0

    # A plaintext blob (no migration-key layer) is refused before swtpm sees it.
    # (swtpm 0.7.1 itself would accept it: it allows "upgrading" to encryption.)
    plain_blob = ctrl.BLOB_HEADER.pack(2, 1, 10, ctrl.BLOB_FLAG_MIGRATION_DATA, 10 + len(plain))
    with pytest.raises(exception.StateImportError, match="not encrypted under a migration"):
        ctrl.import_state(pb.ctrl_socket, ctrl.ExportedState(plain_blob + plain, state.volatile),
                          vtpcm_id="b")


def test_export_refuses_a_real_swtpm_without_migration_key(short_dir, swtpm_paths):
    """A real swtpm running with the at-rest key only would hand out its
    state in plaintext: export_state refuses before asking for any blob."""
    paths = swtpm_paths("k")
    key = _key()
    provision.provision_state(paths.state_dir, key, vtpcm_id="k", create_ek=False)
    with tpmtools.key_only_swtpm(paths.state_dir, key, short_dir, data_socket=False) as plain:
        with ctrl.CtrlClient(plain.ctrl_socket, timeout=2.0) as client:
            assert client.get_config() == ctrl.CONFIG_FLAG_FILE_KEY  # control: no migration key
        with pytest.raises(exception.CtrlChannelError) as err:
            ctrl.export_state(plain.ctrl_socket)
    assert str(err.value) == ("swtpm control channel export_state failed: swtpm runs "
                              "without a migration key; refusing to export plaintext state")


def test_export_from_stopped_tpm_inits_it(short_dir, swtpm_factory, swtpm_paths):
    paths = swtpm_paths("s")
    key, mig = _key(), _key()
    provision.provision_state(paths.state_dir, key, vtpcm_id="s", create_ek=False)
    swtpm_factory(paths, key, mig)  # no startup-clear: TPM stopped until INIT
    with ctrl.CtrlClient(paths.ctrl_socket, timeout=2.0) as client:
        with pytest.raises(exception.CtrlChannelError) as err:
            client.get_stateblob(ctrl.BlobType.PERMANENT)  # 4-byte reply, no hang
        assert ctrl.error_result(err.value) == ctrl.TPM_BAD_ORDINAL
        assert client.get_capability() & 0x0300 == 0x0300  # GET/SET_STATEBLOB
        assert client.get_config() == 3
        assert '"TPMSpecification"' in client.get_info(1)
    state = ctrl.export_state(paths.ctrl_socket)
    assert state.permanent and state.volatile

    # A stopped target with another migration key: refused, left stopped, still usable.
    other = swtpm_paths("t")
    key_t = _key()
    provision.provision_state(other.state_dir, key_t, vtpcm_id="t", create_ek=False)
    swtpm_factory(other, key_t, _key())
    with pytest.raises(exception.StateImportError, match="restored"):
        ctrl.import_state(other.ctrl_socket, state, vtpcm_id="t")
    with ctrl.CtrlClient(other.ctrl_socket, timeout=2.0) as client:
        with pytest.raises(exception.CtrlChannelError):
            client.store_volatile()  # still stopped
    with ctrl.CtrlClient(other.ctrl_socket, timeout=2.0) as client:
        client.init()
    with tpmtools.esapi(other) as esys:
        esys.startup(TPM2_SU.CLEAR)
        assert len(bytes(esys.pcr_read("sha256:16")[2][0])) == 32


def test_provision_encrypted_and_clean_failures(short_dir):
    key = _key()
    state_dir = short_dir / "state-p"
    provision.provision_state(state_dir, key, vtpcm_id="p", localca_dir=short_dir / "ca")
    data = (state_dir / provision.PERMANENT_STATE_FILE).read_bytes()
    assert ctrl.parse_blob_header(data).at_rest_encrypted
    assert key not in data and key.hex().encode() not in data

    # Existing state is refused and left untouched.
    with pytest.raises(exception.SwtpmError, match="not an empty directory"):
        provision.provision_state(state_dir, _key(), vtpcm_id="p")
    assert (state_dir / provision.PERMANENT_STATE_FILE).read_bytes() == data

    # A failing swtpm_setup: clear error, directory removed.
    bad_dir = short_dir / "state-bad"
    with pytest.raises(exception.SwtpmError, match="swtpm_setup exited"):
        provision.provision_state(bad_dir, key, vtpcm_id="bad", swtpm_setup_binary="false")
    assert not bad_dir.exists()

    # Pre-existing empty dir is left empty on failure.
    bad_dir.mkdir()
    with pytest.raises(exception.SwtpmError) as err:
        provision.provision_state(bad_dir, key, vtpcm_id="bad",
                                  swtpm_setup_binary="/nonexistent/swtpm_setup")
    assert bad_dir.exists() and not any(bad_dir.iterdir())
    assert key.hex() not in str(err.value)

    with pytest.raises(exception.InvalidInput):
        provision.provision_state(short_dir / "state-k", b"short", vtpcm_id="k")


def test_readopt_stop_and_crash_detection(short_dir, swtpm_factory, swtpm_paths):
    paths = swtpm_paths("r", data_socket=False)
    key, mig = _key(), _key()
    provision.provision_state(paths.state_dir, key, vtpcm_id="r", create_ek=False)
    pid = swtpm_factory(paths, key, mig, socket_mode=0o600)
    argv = open("/proc/%d/cmdline" % pid, "rb").read()
    assert key not in argv and mig not in argv and key.hex().encode() not in argv
    assert os.getsid(pid) != os.getsid(0)  # detached into its own session
    assert os.stat(paths.ctrl_socket).st_mode & 0o777 == 0o600

    # "Forget" the pid: re-adoption finds the same process; no double start.
    assert process.find_running(paths) == pid
    assert process.is_alive(pid, paths)
    with pytest.raises(exception.AlreadyExists):
        process.start(paths, key, mig)
    assert process.find_running(paths) == pid

    process.stop(pid, paths)
    assert not process.is_alive(pid, paths)
    assert process.find_running(paths) is None
    assert not paths.ctrl_socket.exists() and not paths.pid_file.exists()

    # Crash: kill -9, socket and pid file stay behind (stale).
    pid = swtpm_factory(paths, key, mig)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while process.is_alive(pid, paths) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not process.is_alive(pid, paths)
    assert process.find_running(paths) is None
    assert paths.ctrl_socket.exists()  # stale
    # A restart cleans the stale files and works.
    pid2 = swtpm_factory(paths, key, mig)
    assert process.find_running(paths) == pid2

    process.stop(pid2, paths)
    process.remove_state(paths)
    assert not paths.state_dir.exists()


def test_start_with_wrong_at_rest_key_fails_cleanly(short_dir, swtpm_factory, swtpm_paths):
    paths = swtpm_paths("w", data_socket=False)
    provision.provision_state(paths.state_dir, _key(), vtpcm_id="w", create_ek=False)
    with pytest.raises(exception.SwtpmError, match="swtpm exited"):
        swtpm_factory(paths, _key(), _key(), startup_clear=True)
    assert process.find_running(paths) is None
    assert not paths.ctrl_socket.exists()


def test_start_rejects_bad_input(swtpm_paths):
    paths = swtpm_paths("i", data_socket=False)
    paths.state_dir.mkdir()
    with pytest.raises(exception.InvalidInput, match="migration key"):
        process.start(paths, _key(), b"x" * 16)
    same = _key()
    with pytest.raises(exception.InvalidInput, match="differ"):
        process.start(paths, same, same)
    long_sock = process.SwtpmPaths(paths.state_dir, Path("/tmp/" + "x" * 120), paths.pid_file,
                                   paths.log_file)
    with pytest.raises(exception.InvalidInput, match="longer than"):
        process.start(long_sock, _key(), _key())
    assert not paths.ctrl_socket.exists()
