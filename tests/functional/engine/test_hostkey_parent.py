"""An interposer that swaps the owner primary ONLY while the host key is
sealed (akparents review, finding 1) is refused before the AK or KEM key is
used.

The AK's and KEM key's auth values derive from the host key, so whoever
reads the host key at its seal owns both keys, although enrollment certifies
the real parents. The host key's parent is the owner primary of the KEM
key's template: the agent requires the same name (``bind_host_key_parent``).
Before that check, such a host enrolled APPROVED and the interposer opened
every envelope sent to it with ECDH_ZGen on the real TPM.

Real swtpm, the agent's real ``TPMSealedHostKey`` and ``HostTPM`` in the
order ``AgentService`` uses them, the engine's real ``Attestor`` on SQLite.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tpm2_pytss import ESAPI

from tests.functional.agent.test_hostkeys_review import _seal_v1 as seal_v1
from tests.functional.agent.test_hostkeys_review import _seal_v2 as seal_v2
from tests.functional.engine.test_parent_certification import (  # noqa: F401
    attestor,
    db,
)
from tests.functional.hosttpm_fixture import HostTPMStandIn, host_tpm_standin  # noqa: F401
from tests.functional.tpmmitm import CC_CREATE, SessionInterposer, _tpm2b
from vtpcm_agent import hostkeys, keyauth
from vtpcm_agent import keystore as ks
from vtpcm_agent.hosttpm import HostTPM, SealedObject
from vtpcm_common import exception
from vtpcm_nova.engine.db.api import Database

pytestmark = pytest.mark.functional


class SelectiveInterposer(SessionInterposer):
    """A SessionInterposer that swaps primaries only while ``active`` and
    keeps the sealed data of every TPM2_Create it decrypts."""

    def __init__(self, target: str) -> None:
        super().__init__(target)
        self.active = True
        self.sealed_data: list[bytes] = []
        self._cc = 0

    def _swap_primary(self, rsp: bytes) -> bytes:
        return super()._swap_primary(rsp) if self.active else rsp

    def _translate_command(self, cc: int, cmd: bytes) -> bytes:
        self._cc = cc
        return super()._translate_command(cc, cmd)

    def _cfb_param(self, key, a, b, params, encrypt):  # type: ignore[no-untyped-def]
        out = SessionInterposer._cfb_param(key, a, b, params, encrypt)
        if not encrypt and self._cc == CC_CREATE:
            _user_auth, off = _tpm2b(out, 2)
            self.sealed_data.append(_tpm2b(out, off)[0])
        return out


def _owner_primary_name(tcti: str) -> bytes:
    with ESAPI(tcti) as e:
        return hostkeys.parent_name(e, hostkeys.KEM_HIERARCHY)


def test_an_interposer_only_at_the_host_key_seal_is_refused_before_any_key_is_used(
        host_tpm_standin: HostTPMStandIn, db: Database, tmp_path: Path) -> None:  # noqa: F811
    sealed_path, key_file = tmp_path / "hostkey.sealed", tmp_path / "hostkeys.tpm"
    mitm = SelectiveInterposer(host_tpm_standin.tcti).start()
    try:
        with HostTPM(mitm.tcti) as tpm:
            # first start, as AgentService.__init__: the seal is interposed
            host_key = ks.TPMSealedHostKey(tpm, sealed_path).host_key()
            mitm.active = False                  # honest from here on
            assert host_key in mitm.sealed_data  # what the interposer got
            sealed = SealedObject.from_bytes(sealed_path.read_bytes())
            assert sealed.parent_name in mitm.answered
            tpm.use_key_auth(keyauth.derive(host_key), key_file)
            real = _owner_primary_name(host_tpm_standin.tcti)
            expected = (f"the owner storage primary the TPM answered has name {real.hex()}, "
                        f"not the pinned {sealed.parent_name.hex()}")
            with pytest.raises(hostkeys.ParentMismatch) as err:
                tpm.quote(b"q" * 16, [0])
            assert "host key was sealed under" in str(err.value) and expected in str(err.value)
            assert host_key.hex() not in str(err.value)
            # no KEM key under the real primary: nothing to enroll
            assert not key_file.exists()
            with pytest.raises(hostkeys.ParentMismatch):
                attestor(db, tpm).enroll_from_agent("victim", auto_approve=True)
        with pytest.raises(exception.NotFound):
            db.get_host("victim")
    finally:
        mitm.stop()


def test_key_blobs_under_another_primary_than_the_host_key_refuse_the_start(
        host_tpm_standin: HostTPMStandIn, tmp_path: Path) -> None:  # noqa: F811
    """The agent restarts with a host key sealed under the interposer's
    primary but key blobs made under the real one (an earlier release made
    both): refused at start, before any TPM command, naming both names."""
    sealed_path, key_file = tmp_path / "hostkey.sealed", tmp_path / "hostkeys.tpm"
    mitm = SelectiveInterposer(host_tpm_standin.tcti).start()
    try:
        with HostTPM(mitm.tcti) as tpm:
            host_key = ks.TPMSealedHostKey(tpm, sealed_path).host_key()
        fake = SealedObject.from_bytes(sealed_path.read_bytes()).parent_name
    finally:
        mitm.stop()
    with ESAPI(host_tpm_standin.tcti) as e:
        auth = keyauth.derive(host_key)
        blobs = hostkeys.create_blobs(e, auth.ak.auth, auth.kem.auth)
    hostkeys.FileBlobStore(key_file).save(blobs)
    with HostTPM(host_tpm_standin.tcti) as tpm:
        # the restart's unseal goes through the interposer's primary: its
        # pinned name is refused, so an honest path is used here to reach
        # the check of the stored blobs
        tpm.bind_host_key_parent(fake)
        with pytest.raises(hostkeys.ParentMismatch,
                           match=f"sealed under the owner storage primary {fake.hex()} but "
                                 f"the KEM key's pinned parent .* is "
                                 f"{blobs.kem_parent_name.hex()}"):
            tpm.use_key_auth(keyauth.derive(host_key), key_file)


def test_an_interposer_at_the_format1_upgrade_reseal_is_refused(
        host_tpm_standin: HostTPMStandIn, tmp_path: Path) -> None:  # noqa: F811
    """A format-1 host key is resealed (``_upgrade``) under the noDA owner
    primary: an interposer that swaps it only then is refused like at a
    first seal (the key blobs were pinned under the real one)."""
    sealed_path, key_file = tmp_path / "hostkey.sealed", tmp_path / "hostkeys.tpm"
    host_key = b"k" * ks.KEY_LEN
    with HostTPM(host_tpm_standin.tcti) as tpm:
        v2 = tpm.seal(host_key)
    with ESAPI(host_tpm_standin.tcti) as e:
        auth = keyauth.derive(host_key)
        blobs = hostkeys.create_blobs(e, auth.ak.auth, auth.kem.auth)
    assert blobs.kem_parent_name == v2.parent_name  # one primary, one name
    hostkeys.FileBlobStore(key_file).save(blobs)
    sealed_path.write_bytes(seal_v1(host_tpm_standin.tcti, host_key))
    sealed_path.chmod(0o600)
    mitm = SelectiveInterposer(host_tpm_standin.tcti).start()
    try:
        with HostTPM(mitm.tcti) as tpm:
            assert ks.TPMSealedHostKey(tpm, sealed_path).host_key() == host_key
            upgraded = SealedObject.from_bytes(sealed_path.read_bytes())
            assert upgraded.parent_name in mitm.answered  # resealed under its key
            with pytest.raises(hostkeys.ParentMismatch,
                               match=f"sealed under the owner storage primary "
                                     f"{upgraded.parent_name.hex()} but the KEM key's pinned "
                                     f"parent .* is {blobs.kem_parent_name.hex()}"):
                tpm.use_key_auth(keyauth.derive(host_key), key_file)
    finally:
        mitm.stop()


def test_the_format2_reseal_is_pinned_to_the_old_parent(
        host_tpm_standin: HostTPMStandIn, tmp_path: Path,  # noqa: F811
        caplog: pytest.LogCaptureFixture) -> None:
    """Review eksalt round 2, finding 3: the reseal of a format-2 host key
    (``_upgrade``) seals under the parent the old object pins. An
    interposer that swaps the owner primary only at the reseal's seal is
    refused at its CreatePrimary, before the Create carries the host key
    and the new auth value to it; the format-2 file stays."""
    sealed_path = tmp_path / "hostkey.sealed"
    host_key = b"p" * ks.KEY_LEN
    sealed_path.write_bytes(seal_v2(host_tpm_standin.tcti, host_key))
    sealed_path.chmod(0o600)
    v2 = sealed_path.read_bytes()
    mitm = SelectiveInterposer(host_tpm_standin.tcti).start()
    mitm.active = False
    refusals: list[BaseException] = []
    try:
        with HostTPM(mitm.tcti) as tpm:
            real_seal = tpm.seal

            def seal_interposed(secret: bytes, pinned: bytes = b"") -> SealedObject:
                mitm.active = True  # only at the reseal's seal
                try:
                    return real_seal(secret, pinned=pinned)
                except hostkeys.ParentMismatch as exc:
                    refusals.append(exc)
                    raise
                finally:
                    mitm.active = False

            tpm.seal = seal_interposed  # type: ignore[method-assign]
            assert ks.TPMSealedHostKey(tpm, sealed_path).host_key() == host_key
    finally:
        mitm.stop()
    old = SealedObject.from_bytes(v2)
    assert mitm.answered and old.parent_name not in mitm.answered
    assert host_key not in mitm.sealed_data, "the interposer read the host key"
    assert not mitm.sealed_data
    assert len(refusals) == 1
    assert f"not the pinned {old.parent_name.hex()}" in str(refusals[0])
    assert sealed_path.read_bytes() == v2
    assert "Kept the format-2 sealed host key" in caplog.text


def test_an_unpinned_host_key_refuses_the_ak_and_kem_key(
        host_tpm_standin: HostTPMStandIn, tmp_path: Path) -> None:  # noqa: F811
    """A format-1 host key whose reseal failed has no pinned parent: it
    cannot be tied to the certified owner parent, so the keys are refused
    (the instance keys it wraps still open); without any sealed host key
    (the dev key file, tools) nothing is bound."""
    auth = keyauth.derive(b"d" * ks.KEY_LEN)
    with HostTPM(host_tpm_standin.tcti) as tpm:
        tpm.bind_host_key_parent(b"")
        tpm.use_key_auth(auth, tmp_path / "hostkeys.tpm")
        with pytest.raises(exception.HostTPMError,
                           match=r"the host key is still an older sealed object \(format 1 "
                                 r"or 2\): resealing it as format 3 failed at the agent's "
                                 r"start"):
            tpm.quote(b"q" * 16, [0])
    assert not (tmp_path / "hostkeys.tpm").exists()
    with HostTPM(host_tpm_standin.tcti) as tpm:
        tpm.use_key_auth(auth, tmp_path / "hostkeys.tpm")
        tpm.quote(b"q" * 16, [0])


@pytest.mark.parametrize("fmt", [1, 2])
def test_a_failed_old_format_reseal_starts_the_agent_with_the_ak_and_kem_key_refused(
        host_tpm_standin: HostTPMStandIn, tmp_path: Path,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, fmt: int) -> None:
    """akfix review round 2, finding 3: a format-1 host key whose reseal
    failed (ENOSPC on the atomic rewrite) on a host whose key blobs were
    already pinned stopped the agent at ``use_key_auth``, contrary to
    ``_upgrade``'s design: the format-1 file stays and unwraps instance
    keys, only the AK and KEM key are refused, until a restart reseals.
    Format 2 (eksalt review round 2, finding 2): its pinned parent is the
    real one, but its blob unseals with an empty password, so the AK and
    KEM key are refused as well until it is format 3."""
    import errno
    sealed_path, key_file = tmp_path / "hostkey.sealed", tmp_path / "hostkeys.tpm"
    host_key = b"k" * ks.KEY_LEN
    auth = keyauth.derive(host_key)
    with ESAPI(host_tpm_standin.tcti) as e:  # an earlier release: pinned blobs
        hostkeys.FileBlobStore(key_file).save(
            hostkeys.create_blobs(e, auth.ak.auth, auth.kem.auth))
    seal_old = seal_v1 if fmt == 1 else seal_v2
    sealed_path.write_bytes(seal_old(host_tpm_standin.tcti, host_key))
    sealed_path.chmod(0o600)
    v1 = sealed_path.read_bytes()
    assert v1.startswith(b"VTSO" + bytes([fmt]))
    real_write = ks.fileutil.write_atomic

    def enospc(path: Path, data: bytes, *args: object, replace: bool = False,
               **kwargs: object) -> None:
        if replace and Path(path) == sealed_path:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, data, *args, replace=replace, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ks.fileutil, "write_atomic", enospc)
    with HostTPM(host_tpm_standin.tcti) as tpm:  # AgentService.__init__'s order
        provider = ks.TPMSealedHostKey(tpm, sealed_path)
        assert provider.host_key() == host_key  # instance keys unwrap
        tpm.use_key_auth(keyauth.derive(provider.host_key()), key_file)  # starts
        with pytest.raises(exception.HostTPMError,
                           match=r"the old file is intact and still unwraps the instance "
                                 r"keys\), .* until the agent is restarted after fixing the "
                                 r"cause \(e\.g\. disk space"):
            tpm.quote(b"q" * 16, [0])
    assert sealed_path.read_bytes() == v1
    assert f"Kept the format-{fmt} sealed host key" in caplog.text
    assert "until the agent is restarted after fixing the cause" in caplog.text
    monkeypatch.setattr(ks.fileutil, "write_atomic", real_write)  # the disk freed
    with HostTPM(host_tpm_standin.tcti) as tpm:  # the restart reseals
        provider = ks.TPMSealedHostKey(tpm, sealed_path)
        assert provider.host_key() == host_key
        tpm.use_key_auth(keyauth.derive(host_key), key_file)
        tpm.quote(b"q" * 16, [0])
    resealed = SealedObject.from_bytes(sealed_path.read_bytes())
    assert resealed.current
    # the warning says the old blob still unseals and what ends that
    assert (f"Resealed the format-{fmt} host key {sealed_path} as format 3" in caplog.text
            and "still unseals it in this TPM with an empty password" in caplog.text
            and "fresh state directory (a new host key)" in caplog.text)
    for secret in (host_key, resealed.auth):
        assert secret.hex() not in caplog.text and repr(secret)[2:-1] not in caplog.text


def test_a_refused_first_key_creation_sends_no_auth_value(
        host_tpm_standin: HostTPMStandIn, db: Database, tmp_path: Path) -> None:  # noqa: F811
    """akfix review round 2, finding 4: the AK was created (its auth value
    sent in a session salted to the unpinned endorsement primary) before
    the KEM key's parent was checked against the host key's pin. An
    interposer present only at the refused first key creation kept the
    auth value of every later AK (it derives from the host key), and the
    host enrolled APPROVED once it had left. The KEM key's parent is now
    checked first: nothing is sent under a swapped primary."""
    sealed_path, key_file = tmp_path / "hostkey.sealed", tmp_path / "hostkeys.tpm"
    mitm = SelectiveInterposer(host_tpm_standin.tcti).start()
    try:
        with HostTPM(mitm.tcti) as tpm:
            mitm.active = False  # the host key is sealed honestly
            host_key = ks.TPMSealedHostKey(tpm, sealed_path).host_key()
            tpm.use_key_auth(keyauth.derive(host_key), key_file)
            mitm.active = True  # the first key creation is interposed
            with pytest.raises(hostkeys.ParentMismatch, match="the KEM key is created only "
                                                              "under the owner primary"):
                tpm.quote(b"q" * 16, [0])
            assert not key_file.exists()
            mitm.active = False  # it leaves: the keys are created honestly
            tpm.quote(b"q" * 16, [0])
            record = attestor(db, tpm).enroll_from_agent("victim", auto_approve=True)
    finally:
        mitm.stop()
    assert record.status.value == "APPROVED"
    assert sum("userAuth" in r for r in mitm.recovered) == 0  # no auth value went to it
