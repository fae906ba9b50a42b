"""Two-host lab with RAW swtpm processes: live migration keeps the guest's TPM.

What these tests prove (with libvirt 9.0, QEMU 7.2, swtpm 0.7.1, TCG):
- A guest's PCR16, NV index, EK and boot id are identical after A -> B -> A
  live migrations with an external swtpm on each host, the destination
  swtpm starting from an EMPTY state dir with a fresh at-rest key and the
  shared migration key; the guest kept running (uptime grew, same boot id).
- With a migration key, no high-entropy 32-byte window of the plaintext
  permanent TPM state crosses the wire; without one (control), many do.
- A destination swtpm with a different migration key makes the migration
  fail and libvirt leaves the guest running on the source, TPM unchanged.
"""

import gzip
import os
import time
from pathlib import Path
from typing import Any

import libvirt
import pytest

from vtpcm_lab import console, domain, migrate, proxy
from vtpcm_lab.exception import LabError

pytestmark = pytest.mark.e2e


def _migrate(lab_fx: Any, guest: Any, src: Any, dst: Any, dst_ctrl: Path | None,
             via_proxy: Path | None = None) -> migrate.MigrationResult:
    src_conn = src.connect()
    dst_conn = dst.connect()
    try:
        dom = src_conn.lookupByName(guest.name)
        xml = domain.render_destination_xml(
            dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE),
            dst_ctrl, dst.serial_path(guest.name))
        port = lab_fx.free_port()
        if via_proxy is None:
            return migrate.migrate(dom, dst_conn, dst.uri, xml, port, timeout=60.0)
        with proxy.CaptureProxy(("127.0.0.1", port), ("127.0.0.2", port), via_proxy):
            return migrate.migrate(dom, dst_conn, dst.uri, xml, port,
                                   connect_host="127.0.0.1", listen_address="127.0.0.2",
                                   timeout=60.0)
    finally:
        src_conn.close()
        dst_conn.close()


def _guest_image_bytes(lab: Any) -> bytes:
    """The uncompressed initramfs: public constants the guest holds in RAM."""
    return gzip.decompress(lab.image.initrd.read_bytes())


def test_roundtrip_keeps_tpm_and_guest(lab: Any, swtpms: Any, tpm_dirs: Path,
                                       make_guest: Any, lab_fx: Any) -> None:
    mkey = lab_fx.Key()
    key_a = lab_fx.Key()
    state_a = tpm_dirs / "a1"
    lab_fx.setup_state(state_a, key_a)
    ctrl_a = lab_fx.ctrl_path(lab.a, "rt1")
    swtpms.start(state_a, ctrl_a, lab.a.uid, key_a, mkey)

    guest = make_guest("vg-rt")
    con = guest.boot(lab.a, ctrl_a)
    print("boot under TCG: %.2fs" % guest.boot_s)
    before = con.report()
    assert before["EK"] != "none" and before["TPMDEV"].startswith("/dev/tpm")
    value = os.urandom(32).hex()
    con.write(value)
    written = con.report()
    assert written["NV"] == value
    assert written["PCR16"] != before["PCR16"]
    con.close()

    ctrl_b = lab_fx.ctrl_path(lab.b, "rt1")
    swtpms.start(tpm_dirs / "b1", ctrl_b, lab.b.uid, lab_fx.Key(), mkey)
    res1 = _migrate(lab_fx, guest, lab.a, lab.b, ctrl_b)
    print("A->B total %.3fs downtime %s" % (res1.total_s, res1.downtime_s))
    with console.GuestConsole(lab.b.serial_path(guest.name)) as con_b:
        on_b = con_b.report()
    for field in ("PCR16", "NV", "EK", "BOOTID"):
        assert on_b[field] == written[field], field
    assert float(on_b["UPTIME"]) > float(written["UPTIME"])

    ctrl_a2 = lab_fx.ctrl_path(lab.a, "rt2")
    swtpms.start(tpm_dirs / "a2", ctrl_a2, lab.a.uid, lab_fx.Key(), mkey)
    res2 = _migrate(lab_fx, guest, lab.b, lab.a, ctrl_a2)
    print("B->A total %.3fs downtime %s" % (res2.total_s, res2.downtime_s))
    with console.GuestConsole(lab.a.serial_path(guest.name)) as con_a:
        back = con_a.report()
    for field in ("PCR16", "NV", "EK", "BOOTID"):
        assert back[field] == written[field], field
    assert float(back["UPTIME"]) > float(on_b["UPTIME"])
    conn_b = lab.b.connect()
    try:
        assert guest.name not in [d.name() for d in conn_b.listAllDomains()]
    finally:
        conn_b.close()


def _capture_run(lab_fx: Any, lab: Any, swtpms: Any, tpm_dirs: Path, make_guest: Any, tag: str,
                 with_mkey: bool) -> tuple[int, int]:
    """Migrate A->B through the proxy; return (windows, hits in the capture)."""
    mkey = lab_fx.Key() if with_mkey else None
    key_a = lab_fx.Key()
    state_a = tpm_dirs / ("a-" + tag)
    lab_fx.setup_state(state_a, key_a)
    ctrl_a = lab_fx.ctrl_path(lab.a, tag)
    swtpms.start(state_a, ctrl_a, lab.a.uid, key_a, mkey)
    guest = make_guest("vg-" + tag)
    guest.boot(lab.a, ctrl_a).close()
    ctrl_b = lab_fx.ctrl_path(lab.b, tag)
    swtpms.start(tpm_dirs / ("b-" + tag), ctrl_b, lab.b.uid, lab_fx.Key(), mkey)
    capture = tpm_dirs / ("cap-" + tag)
    res = _migrate(lab_fx, guest, lab.a, lab.b, ctrl_b, via_proxy=capture)
    assert capture.stat().st_size > 1 << 20, "the stream did not go through the proxy"
    print("%s via proxy: total %.3fs downtime %s, %d bytes"
          % (tag, res.total_s, res.downtime_s, capture.stat().st_size))
    with console.GuestConsole(lab.b.serial_path(guest.name)) as con_b:
        con_b.wait_ready(timeout=10.0)
    plain = lab_fx.plaintext_permanent_state(state_a, key_a)
    offsets = proxy.high_entropy_windows(plain)
    hits = proxy.find_windows(plain, capture.read_bytes(), offsets)
    # Windows the guest's own image contains (e.g. the EK policy digest in
    # tpm2-tools) are public and legitimately in the guest RAM pages.
    public = proxy.find_windows(plain, _guest_image_bytes(lab), hits)
    print("%s: %d windows, %d in the stream, %d of them public (in the guest image)"
          % (tag, len(offsets), len(hits), len(public)))
    return len(offsets), len(hits - public)


def test_stream_has_no_plaintext_state_with_migration_key(
        lab: Any, swtpms: Any, tpm_dirs: Path, make_guest: Any, lab_fx: Any) -> None:
    windows, secret_hits = _capture_run(lab_fx, lab, swtpms, tpm_dirs, make_guest, "ck", True)
    assert windows > 1000
    assert secret_hits == 0
    # Control: the same scan finds the state when there is no migration key.
    windows_c, secret_hits_c = _capture_run(lab_fx, lab, swtpms, tpm_dirs, make_guest, "cn",
                                            False)
    assert secret_hits_c > windows_c // 2


def test_wrong_migration_key_fails_and_source_keeps_running(
        lab: Any, swtpms: Any, tpm_dirs: Path, make_guest: Any, lab_fx: Any) -> None:
    key_a = lab_fx.Key()
    state_a = tpm_dirs / "a-wk"
    lab_fx.setup_state(state_a, key_a)
    ctrl_a = lab_fx.ctrl_path(lab.a, "wk")
    swtpms.start(state_a, ctrl_a, lab.a.uid, key_a, lab_fx.Key())
    guest = make_guest("vg-wk")
    con = guest.boot(lab.a, ctrl_a)
    con.write(os.urandom(32).hex())
    before = con.report()
    con.close()
    ctrl_b = lab_fx.ctrl_path(lab.b, "wk")
    swtpms.start(tpm_dirs / "b-wk", ctrl_b, lab.b.uid, lab_fx.Key(), lab_fx.Key())
    with pytest.raises(LabError, match="failed"):
        _migrate(lab_fx, guest, lab.a, lab.b, ctrl_b)
    # The reason is in the destination QEMU's log, not in libvirt's error.
    assert "decryption error" in lab.b.qemu_log(guest.name).read_text()
    conn_a = lab.a.connect()
    try:
        dom = conn_a.lookupByName(guest.name)
        state, _reason = dom.state()
        assert state == libvirt.VIR_DOMAIN_RUNNING
    finally:
        conn_a.close()
    deadline = time.monotonic() + 10
    with console.GuestConsole(lab.a.serial_path(guest.name)) as con_a:
        con_a.wait_ready(timeout=deadline - time.monotonic())
        after = con_a.report()
    for field in ("PCR16", "NV", "EK", "BOOTID"):
        assert after[field] == before[field], field
    assert float(after["UPTIME"]) > float(before["UPTIME"])


def test_migration_without_tpm_for_timing(lab: Any, make_guest: Any, lab_fx: Any) -> None:
    guest = make_guest("vg-nt")
    con = guest.boot(lab.a, None)
    before = con.report()
    con.close()
    res = _migrate(lab_fx, guest, lab.a, lab.b, None)
    print("no TPM: boot %.2fs, A->B total %.3fs downtime %s"
          % (guest.boot_s, res.total_s, res.downtime_s))
    with console.GuestConsole(lab.b.serial_path(guest.name)) as con_b:
        assert con_b.report()["BOOTID"] == before["BOOTID"]
