"""Generate real swtpm quotes of several shapes for the tpmstruct tests (run by hand).

Why: the fast quote reader must read every shape a TPM produces exactly as
tpm2-pytss does, not only the one selection the agent asks for: several
banks, SHA-1/SHA-256/SHA-384, all 24 PCRs, nonces of 1 to 64 bytes. One
throw-away swtpm, one AK (made as the agent makes it); written as JSON (hex)
next to this file::

    PYTHONPATH=. .venv/bin/python tests/unit/engine/vectors/make_shapes.py
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tpm2_pytss import ESAPI, TCTILdr
from tpm2_pytss.constants import ESYS_TR
from tpm2_pytss.types import TPM2B_PUBLIC, TPML_PCR_SELECTION

from tests.unit.engine.vectors.make_vectors import AK_ATTRS, OUT, swtpm

SELECTIONS = ("sha256:0,1,2,3,7,16", "sha256:" + ",".join(str(p) for p in range(24)),
              "sha1:0,1,2+sha256:0,1,2", "sha1:0,7", "sha384:0,7", "sha256:23",
              "sha256:0+sha256:1")
NONCE_LENGTHS = (1, 20, 33, 48, 64)


def main() -> None:
    out: dict[str, Any] = {"quotes": []}
    base = Path(tempfile.mkdtemp(prefix="vtpcm-shapes-"))
    try:
        with swtpm(base) as conf:
            ectx = ESAPI(TCTILdr("swtpm", conf))
            try:
                tmpl = TPM2B_PUBLIC.parse("ecc256:ecdsa-sha256:null", objectAttributes=AK_ATTRS)
                ak, ak_pub, _, _, _ = ectx.create_primary(None, tmpl, ESYS_TR.ENDORSEMENT)
                out["ak_public"] = bytes(ak_pub.publicArea.marshal()).hex()
                for i, text in enumerate(SELECTIONS):
                    n = NONCE_LENGTHS[i % len(NONCE_LENGTHS)]
                    for length in sorted({n, 64}):
                        nonce = hashlib.sha512(f"{text}/{length}".encode()).digest()[:length]
                        attest, sig = ectx.quote(ak, TPML_PCR_SELECTION.parse(text), nonce)
                        out["quotes"].append({"selection": text, "nonce": nonce.hex(),
                                              "attest": bytes(attest).hex(),
                                              "signature": sig.marshal().hex()})
                ectx.flush_context(ak)
            finally:
                ectx.close()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    (OUT / "quote_shapes.json").write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print("wrote", OUT / "quote_shapes.json", len(out["quotes"]), "quotes")


if __name__ == "__main__":
    main()
