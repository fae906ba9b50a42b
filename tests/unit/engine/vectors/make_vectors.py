"""Generate real TPM test vectors for the engine verifier (run by hand).

Why: the unit tests must check the verifier against bytes a real TPM produced
(swtpm + tpm2-pytss, the same formats the agent sends), yet stay pure and fast.
This script starts two throw-away swtpm instances ("tpm_a", "tpm_b"), creates
the AK and KEM key exactly like the agent does, takes certifications and
quotes with known nonces, and writes them as JSON (hex) next to this file.

    PYTHONPATH=/work/main /opt/vtpcm-venv-probe/bin/python \
        tests/unit/engine/vectors/make_vectors.py
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tpm2_pytss import ESAPI, TCTILdr
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPMA_OBJECT
from tpm2_pytss.types import (
    TPM2B_PUBLIC,
    TPML_DIGEST_VALUES,
    TPML_PCR_SELECTION,
    TPMT_HA,
    TPMT_SIG_SCHEME,
    TPMU_HA,
)

OUT = Path(__file__).resolve().parent
PCRS = [0, 1, 2, 3, 7, 16]
AK_ATTRS = (TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.FIXEDTPM
            | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN
            | TPMA_OBJECT.USERWITHAUTH)
KEM_ATTRS = (TPMA_OBJECT.DECRYPT | TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT
             | TPMA_OBJECT.SENSITIVEDATAORIGIN | TPMA_OBJECT.USERWITHAUTH)


@contextmanager
def swtpm(state_dir: Path) -> Iterator[str]:
    sockdir = tempfile.mkdtemp(dir="/tmp", prefix="vv")
    sock = os.path.join(sockdir, "s")
    proc = subprocess.Popen([
        "swtpm", "socket", "--tpm2",
        "--server", f"type=unixio,path={sock}",
        "--ctrl", f"type=unixio,path={sock}.ctrl",
        "--tpmstate", f"dir={state_dir}", "--flags", "startup-clear"])
    try:
        deadline = time.monotonic() + 10
        while not (os.path.exists(sock) and os.path.exists(sock + ".ctrl")):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("swtpm did not start")
            time.sleep(0.02)
        yield f"path={sock}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        shutil.rmtree(sockdir, ignore_errors=True)


def _keys(ectx: ESAPI) -> tuple[ESYS_TR, bytes, ESYS_TR, bytes]:
    ak_tmpl = TPM2B_PUBLIC.parse("ecc256:ecdsa-sha256:null", objectAttributes=AK_ATTRS)
    ak, ak_pub, _, _, _ = ectx.create_primary(None, ak_tmpl, ESYS_TR.ENDORSEMENT)
    kem_tmpl = TPM2B_PUBLIC.parse("ecc256:ecdh-sha256:null", objectAttributes=KEM_ATTRS)
    kem, kem_pub, _, _, _ = ectx.create_primary(None, kem_tmpl, ESYS_TR.OWNER)
    return ak, ak_pub.publicArea.marshal(), kem, kem_pub.publicArea.marshal()


def _pcr_values(ectx: ESAPI) -> dict[str, str]:
    sel = TPML_PCR_SELECTION.parse("sha256:" + ",".join(str(p) for p in PCRS))
    values: dict[str, str] = {}
    # pcr_read returns at most 8 digests per call; PCRS has 6
    _, _, digests = ectx.pcr_read(sel)
    for idx, dig in zip(PCRS, digests, strict=True):
        values[str(idx)] = bytes(dig).hex()
    return values


def _quote(ectx: ESAPI, ak: ESYS_TR, nonce: bytes) -> dict[str, Any]:
    sel = TPML_PCR_SELECTION.parse("sha256:" + ",".join(str(p) for p in PCRS))
    attest, sig = ectx.quote(ak, sel, nonce)
    return {"nonce": nonce.hex(), "attest": bytes(attest).hex(),
            "signature": sig.marshal().hex(), "pcr_values": _pcr_values(ectx)}


def _extend16(ectx: ESAPI, data: bytes) -> None:
    dig = TPMT_HA(hashAlg=TPM2_ALG.SHA256, digest=TPMU_HA(sha256=hashlib.sha256(data).digest()))
    ectx.pcr_extend(ESYS_TR.PCR16, TPML_DIGEST_VALUES([dig]))


def _tpm_session(state: Path, label: str, out: dict[str, Any], reboot: bool) -> None:
    with swtpm(state) as conf:
        ectx = ESAPI(TCTILdr("swtpm", conf))
        try:
            ak, ak_pub, kem, kem_pub = _keys(ectx)
            key = "boot2" if reboot else "boot1"
            rec: dict[str, Any] = {}
            if not reboot:
                out["ak_public"] = ak_pub.hex()
                out["kem_public"] = kem_pub.hex()
                out["ak_name"] = bytes(ectx.tr_get_name(ak)).hex()
                out["kem_name"] = bytes(ectx.tr_get_name(kem)).hex()
                cnonce = hashlib.sha256(label.encode() + b"certify").digest()
                attest, sig = ectx.certify(kem, ak, cnonce,
                                           TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL))
                out["certify"] = {"nonce": cnonce.hex(), "attest": bytes(attest).hex(),
                                  "signature": sig.marshal().hex()}
                _extend16(ectx, b"boot-measurement")
                rec["quote1"] = _quote(ectx, ak, hashlib.sha256(label.encode() + b"q1").digest())
                time.sleep(0.05)
                rec["quote2"] = _quote(ectx, ak, hashlib.sha256(label.encode() + b"q2").digest())
                _extend16(ectx, b"rogue-measurement")
                rec["quote_tampered_pcr"] = _quote(
                    ectx, ak, hashlib.sha256(label.encode() + b"q3").digest())
            else:
                if ak_pub.hex() != out["ak_public"]:
                    raise RuntimeError("AK changed across reboot")
                _extend16(ectx, b"boot-measurement")
                rec["quote1"] = _quote(ectx, ak, hashlib.sha256(label.encode() + b"r1").digest())
            out[key] = rec
            ectx.flush_context(ak)
            ectx.flush_context(kem)
        finally:
            ectx.close()


def main() -> None:
    result: dict[str, Any] = {"pcrs": PCRS, "bank": "sha256"}
    base = Path(tempfile.mkdtemp(prefix="vtpcm-vectors-"))
    try:
        for label in ("tpm_a", "tpm_b"):
            state = base / label
            state.mkdir()
            out: dict[str, Any] = {}
            _tpm_session(state, label, out, reboot=False)
            if label == "tpm_a":
                # a second power-on of the same TPM: resetCount goes up
                _tpm_session(state, label, out, reboot=True)
            result[label] = out
    finally:
        shutil.rmtree(base, ignore_errors=True)
    (OUT / "tpm_vectors.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print("wrote", OUT / "tpm_vectors.json")


if __name__ == "__main__":
    main()
