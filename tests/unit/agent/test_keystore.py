"""Unit tests of the key store with the dev (file) host key provider."""

import logging
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from tests import leakscan
from tests.refusal import refused
from vtpcm_agent import keystore
from vtpcm_agent.keystore import DevKeyFileHostKey, InstanceKeys, KeyStore
from vtpcm_common.exception import AlreadyExists, InvalidInput, KeyStoreError, NotFound

VID = "3f2504e0-4f89-11d3-9a0c-0305e82c3301"
VID2 = "3f2504e0-4f89-11d3-9a0c-0305e82c3302"


class FixedHostKey:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def host_key(self) -> bytes:
        return self._key


@pytest.fixture
def provider(tmp_path: Path) -> DevKeyFileHostKey:
    return DevKeyFileHostKey(tmp_path / "hostkey")


@pytest.fixture
def store(tmp_path: Path, provider: DevKeyFileHostKey) -> KeyStore:
    return KeyStore(tmp_path / "keys", provider)


def test_round_trip(store: KeyStore, tmp_path: Path) -> None:
    keys = InstanceKeys.generate()
    assert not store.exists(VID)
    store.put(VID, keys)
    assert store.exists(VID)
    assert store.get(VID) == keys
    path = tmp_path / "keys" / (VID + ".keys")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    raw = path.read_bytes()
    assert keys.at_rest_key not in raw and keys.migration_key not in raw
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left


def test_survives_new_objects(tmp_path: Path) -> None:
    keys = InstanceKeys.generate()
    KeyStore(tmp_path / "keys", DevKeyFileHostKey(tmp_path / "hk")).put(VID, keys)
    assert KeyStore(tmp_path / "keys", DevKeyFileHostKey(tmp_path / "hk")).get(VID) == keys


def test_uppercase_id_is_canonicalized(store: KeyStore) -> None:
    keys = InstanceKeys.generate()
    store.put(VID.upper(), keys)
    assert store.get(VID) == keys


def test_refuses_overwrite_unless_replace(store: KeyStore) -> None:
    first, second = InstanceKeys.generate(), InstanceKeys.generate()
    store.put(VID, first)
    with refused(AlreadyExists,
                 'key store entry for vTPCM 3f2504e0-4f89-11d3-9a0c-0305e82c3301 already exists'):
        store.put(VID, second)
    assert store.get(VID) == first
    store.put(VID, second, replace=True)
    assert store.get(VID) == second


def test_missing_entry(store: KeyStore) -> None:
    with refused(NotFound,
                 'key store entry for vTPCM 3f2504e0-4f89-11d3-9a0c-0305e82c3301 not found'):
        store.get(VID)


def entry(tmp_path: Path, vid: str = VID) -> Path:
    return tmp_path / "keys" / (vid + ".keys")


def test_every_flipped_byte_refused(store: KeyStore, tmp_path: Path) -> None:
    store.put(VID, InstanceKeys.generate())
    good = entry(tmp_path).read_bytes()
    for i in range(len(good)):
        bad = bytearray(good)
        bad[i] ^= 0x01
        entry(tmp_path).write_bytes(bytes(bad))
        with pytest.raises(KeyStoreError, match=VID):
            store.get(VID)


def test_truncated_and_extended_refused(store: KeyStore, tmp_path: Path) -> None:
    store.put(VID, InstanceKeys.generate())
    good = entry(tmp_path).read_bytes()
    for bad in (good[:-1], good[:10], b"", good + b"\x00"):
        entry(tmp_path).write_bytes(bad)
        with pytest.raises(KeyStoreError, match=VID):
            store.get(VID)


def test_entry_of_other_id_refused(store: KeyStore, tmp_path: Path) -> None:
    store.put(VID, InstanceKeys.generate())
    os.link(entry(tmp_path), entry(tmp_path, VID2))
    with refused(KeyStoreError,
                 'Key store error: entry of vTPCM 3f2504e0-4f89-11d3-9a0c-0305e82c3302 failed '
                 'authentication (tampered, or written for another id or host key)'):
        store.get(VID2)


def test_other_host_key_refused(tmp_path: Path) -> None:
    KeyStore(tmp_path / "keys", FixedHostKey(b"a" * 32)).put(VID, InstanceKeys.generate())
    with refused(KeyStoreError,
                 'Key store error: entry of vTPCM 3f2504e0-4f89-11d3-9a0c-0305e82c3301 failed '
                 'authentication (tampered, or written for another id or host key)'):
        KeyStore(tmp_path / "keys", FixedHostKey(b"b" * 32)).get(VID)


def test_group_readable_entry_refused(store: KeyStore, tmp_path: Path) -> None:
    store.put(VID, InstanceKeys.generate())
    entry(tmp_path).chmod(0o640)
    with pytest.raises(KeyStoreError, match="mode 0600"):
        store.get(VID)


def test_destroy(store: KeyStore, tmp_path: Path) -> None:
    store.put(VID, InstanceKeys.generate())
    store.put(VID2, InstanceKeys.generate())
    store.destroy(VID)
    assert not store.exists(VID)
    assert not entry(tmp_path).exists()
    store.destroy(VID)  # idempotent
    assert store.exists(VID2)
    with refused(NotFound,
                 'key store entry for vTPCM 3f2504e0-4f89-11d3-9a0c-0305e82c3301 not found'):
        store.get(VID)


@pytest.mark.parametrize("bad", [
    "../etc/passwd", "/etc/shadow", "..", "", "abc", VID + "/x", VID + "\x00",
    "3f2504e0-4f89-11d3-9a0c-0305e82c330", 42, None,
])
def test_bad_ids_refused(store: KeyStore, bad: Any, tmp_path: Path) -> None:
    for op in (store.exists, store.get, store.destroy):
        with pytest.raises(InvalidInput):
            op(bad)
    with pytest.raises(InvalidInput):
        store.put(bad, InstanceKeys.generate())
    assert list((tmp_path / "keys").iterdir()) == []


def test_no_key_bytes_in_repr(store: KeyStore, provider: DevKeyFileHostKey) -> None:
    keys = InstanceKeys.generate()
    store.put(VID, keys)
    host_key = provider.host_key()
    texts = [repr(keys), str(keys), repr(store), str(store), repr(provider), str(provider),
             repr(store.get(VID)), str([keys]), repr({"k": keys})]
    secrets = [("at-rest key", keys.at_rest_key), ("migration key", keys.migration_key),
               ("host key", host_key)]
    haystack = "\n".join(texts).encode()
    # control: the scanner finds each key in the encodings a repr could use
    leakscan.assert_finds(secrets, {keys.migration_key}, haystack)
    assert leakscan.hits(secrets, haystack) == []  # raw, hex, HEX, repr, base64 (any offset)
    assert "hidden" in repr(keys)


def test_instance_keys_validation() -> None:
    with refused(InvalidInput, 'Invalid input: at_rest_key must be 32 bytes'):
        InstanceKeys(at_rest_key=b"x" * 31, migration_key=b"y" * 32)
    with refused(InvalidInput, 'Invalid input: migration_key must be 32 bytes'):
        InstanceKeys(at_rest_key=b"x" * 32, migration_key="y" * 32)  # type: ignore[arg-type]
    a = InstanceKeys.generate()
    assert a != InstanceKeys.generate()
    assert a.at_rest_key != a.migration_key
    assert a == InstanceKeys(at_rest_key=a.at_rest_key, migration_key=a.migration_key)


def test_dev_host_key_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "hk"
    with caplog.at_level(logging.WARNING):
        first = DevKeyFileHostKey(path)
    assert any("INSECURE" in r.getMessage() for r in caplog.records)
    key = first.host_key()
    assert len(key) == 32 and first.host_key() is key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        second = DevKeyFileHostKey(path)
    assert any("INSECURE" in r.getMessage() for r in caplog.records)
    assert second.host_key() == key
    for record in caplog.records:
        assert key.hex() not in record.getMessage()


def test_dev_host_key_file_checks(tmp_path: Path) -> None:
    path = tmp_path / "hk"
    path.write_bytes(b"x" * 32)
    path.chmod(0o644)
    with refused(KeyStoreError, "Key store error: dev host key file %s must be owned by uid "
                 "%d with mode 0600" % (path, os.geteuid())):
        DevKeyFileHostKey(path).host_key()
    path.chmod(0o600)
    path.write_bytes(b"x" * 31)
    with pytest.raises(KeyStoreError, match="exactly 32"):
        DevKeyFileHostKey(path).host_key()
    link = tmp_path / "link"
    link.symlink_to(path)
    with pytest.raises(KeyStoreError):
        DevKeyFileHostKey(link).host_key()


def test_bad_provider_key(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys", FixedHostKey(b"short"))
    with refused(KeyStoreError, 'Key store error: host key provider returned a malformed key'):
        store.put(VID, InstanceKeys.generate())


def test_validate_vtpcm_id() -> None:
    assert keystore.validate_vtpcm_id(VID.upper()) == VID


# -- found by mutation testing (tools/mutation.sh keystore) -------------------

def test_an_entry_is_the_specified_format(store: KeyStore, provider: DevKeyFileHostKey,
                                          tmp_path: Path) -> None:
    """Written a second time from the design: AES-256-GCM under
    HKDF-SHA256(host key, no salt, info "vtpcm keystore wrap v1"), header
    "VTKS" 01 nonce, associated data the header and the canonical id."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    keys = InstanceKeys.generate()
    store.put(VID, keys)
    data = entry(tmp_path).read_bytes()
    assert data[:5] == b"VTKS\x01"
    wrap = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=b"vtpcm keystore wrap v1").derive(provider.host_key())
    plain = AESGCM(wrap).decrypt(data[5:17], data[17:], b"VTKS\x01" + VID.encode())
    assert plain == keys.at_rest_key + keys.migration_key


def test_keys_are_equal_only_when_both_parts_are() -> None:
    keys = InstanceKeys.generate()
    other = InstanceKeys.generate()
    assert keys == InstanceKeys(keys.at_rest_key, keys.migration_key)
    assert keys != InstanceKeys(keys.at_rest_key, other.migration_key)
    assert keys != InstanceKeys(other.at_rest_key, keys.migration_key)


def test_reprs_are_exact(store: KeyStore, provider: DevKeyFileHostKey, tmp_path: Path) -> None:
    assert repr(InstanceKeys.generate()) == "InstanceKeys(<hidden>)"
    assert repr(store) == "KeyStore(directory=%r)" % str(tmp_path / "keys")
    assert repr(provider) == "DevKeyFileHostKey(path=%r)" % str(tmp_path / "hostkey")


def test_id_refusals_are_exact() -> None:
    with refused(InvalidInput, "Invalid input: vTPCM id must be a uuid string"):
        keystore.validate_vtpcm_id(42)  # type: ignore[arg-type]
    with refused(InvalidInput, "Invalid input: vTPCM id %r is not a uuid" % ("x" * 80)):
        keystore.validate_vtpcm_id("x" * 81)


def test_put_refuses_anything_but_instance_keys(store: KeyStore) -> None:
    with refused(InvalidInput, "Invalid input: keys must be InstanceKeys"):
        store.put(VID, (b"a" * 32, b"b" * 32))  # type: ignore[arg-type]


def test_a_symlinked_key_file_is_refused_even_when_its_target_is_good(tmp_path: Path) -> None:
    target = tmp_path / "hk"
    target.write_bytes(b"x" * 32)
    target.chmod(0o600)
    assert DevKeyFileHostKey(target).host_key() == b"x" * 32  # control: the target is good
    link = tmp_path / "link"
    link.symlink_to(target)
    with refused(KeyStoreError, "Key store error: cannot open dev host key file %s: "
                                "Too many levels of symbolic links" % link):
        DevKeyFileHostKey(link).host_key()


def test_a_group_readable_entry_is_refused_by_name(store: KeyStore, tmp_path: Path) -> None:
    store.put(VID, InstanceKeys.generate())
    entry(tmp_path).chmod(0o640)
    with refused(KeyStoreError, "Key store error: key store entry %s must be owned by uid %d "
                                "with mode 0600" % (entry(tmp_path), os.geteuid())):
        store.get(VID)


def test_a_store_in_a_new_nested_directory_is_private(tmp_path: Path) -> None:
    KeyStore(tmp_path / "a" / "b" / "keys", FixedHostKey(b"k" * 32))
    assert stat.S_IMODE((tmp_path / "a" / "b" / "keys").stat().st_mode) == 0o700


def test_a_dev_host_key_created_concurrently_is_adopted_not_replaced(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two agents starting at once: the one that loses the race reads the
    winner's key instead of replacing it."""
    path = tmp_path / "hk"
    winner = b"w" * 32
    real_write = keystore.fileutil.write_atomic

    def racing_write(target: Path, data: bytes, replace: bool = False) -> None:
        if not target.exists():
            real_write(target, winner, replace=False)  # the other agent, just before us
        real_write(target, data, replace=replace)

    monkeypatch.setattr(keystore.fileutil, "write_atomic", racing_write)
    assert DevKeyFileHostKey(path).host_key() == winner
    assert path.read_bytes() == winner


def test_a_key_path_that_is_not_a_regular_file_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "hk"
    path.mkdir(mode=0o700)
    with refused(KeyStoreError, "Key store error: dev host key file %s is not a regular file"
                 % path):
        DevKeyFileHostKey(path).host_key()


def test_destroy_overwrites_the_whole_entry_before_unlinking(store: KeyStore,
                                                             tmp_path: Path) -> None:
    """A second name for the entry's inode (as a backup or a forensic copy
    of the directory would keep) sees only random bytes afterwards."""
    store.put(VID, InstanceKeys.generate())
    original = entry(tmp_path).read_bytes()
    keep = tmp_path / "kept-link"
    os.link(entry(tmp_path), keep)
    store.destroy(VID)
    left = keep.read_bytes()
    assert len(left) >= len(original)
    assert not any(original[i:i + 8] in left for i in range(0, len(original) - 8))


def test_a_replaced_entry_is_overwritten_like_a_destroyed_one(store: KeyStore,
                                                              tmp_path: Path) -> None:
    """A key epoch (put with replace) leaves nothing of the old migration
    key in the old inode (review of issue 9, finding LOW 5, proof p4)."""
    store.put(VID, InstanceKeys.generate())
    original = entry(tmp_path).read_bytes()
    keep = tmp_path / "kept-link"
    os.link(entry(tmp_path), keep)
    fresh = InstanceKeys.generate()
    store.put(VID, fresh, replace=True)
    assert store.get(VID) == fresh  # control: the new entry is in place
    left = keep.read_bytes()
    assert len(left) >= len(original)
    assert not any(original[i:i + 8] in left for i in range(0, len(original) - 8))


def test_a_failed_replace_keeps_the_live_entry(store: KeyStore,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A write of the new entry that fails (EIO, fsync error) must not shred
    the old one: it is the only live key (review round 2 of isofix, HIGH 1)."""
    keys = InstanceKeys.generate()
    store.put(VID, keys)

    def failing_write(target: Path, data: bytes, replace: bool = False) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(keystore.fileutil, "write_atomic", failing_write)
    with pytest.raises(OSError) as err:
        store.put(VID, InstanceKeys.generate(), replace=True)
    assert err.value.errno == 5
    monkeypatch.undo()
    assert store.get(VID) == keys
    fresh = InstanceKeys.generate()
    store.put(VID, fresh, replace=True)  # control: a working write replaces it
    assert store.get(VID) == fresh


def test_a_replace_on_a_full_filesystem_keeps_the_live_entry(tmp_path: Path) -> None:
    """The same on a real full tmpfs (ENOSPC), as an exploited swtpm filling
    the shared state filesystem would cause."""
    import subprocess
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                   check=True, timeout=30)
    try:
        store = KeyStore(mnt / "keys", FixedHostKey(b"k" * 32))
        keys = InstanceKeys.generate()
        store.put(VID, keys)
        fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            with pytest.raises(OSError) as full:
                for _ in range(1000):
                    os.write(fd, b"\0" * 4096)
            assert full.value.errno == 28
        finally:
            os.close(fd)
        with pytest.raises(OSError) as err:
            store.put(VID, InstanceKeys.generate(), replace=True)
        assert err.value.errno == 28
        (mnt / "filler").unlink()
        assert store.get(VID) == keys
    finally:
        subprocess.run(["umount", str(mnt)], check=True, timeout=30)
