"""Host TPM operations per call: identity, quotes, ECDH_ZGen, the migration-
key envelope (seal in software + open through the TPM) and the host key's
TPM seal/unseal, against a swtpm standing in for the host TPM. The AK and
the KEM key are the agent's child keys, used through salted sessions; the
last line is ZGen with the KEM key bound to PCRs 0-7.

Moved here from the functional tests (issue 12): it measures and asserts
nothing. Writes JSON to stdout or --out.
Usage: .venv/bin/python benchmarks/hosttpm_ops.py [-n 50] [--out FILE]
"""

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from vtpcm_agent import keyauth, sealing
from vtpcm_agent.hosttpm import HostTPM
from vtpcm_common import tpmpublic
from vtpcm_lab.hosttpm import HostTPMStandIn

CTX = sealing.SealContext(migration_id="mig-1", instance_uuid="inst-1", generation=3,
                          source_host="host-a", dest_host="host-b")


def measure(tpm: HostTPM, n: int) -> dict[str, float]:
    """Mean milliseconds per call of each operation, ``n`` calls each."""
    kem_public = tpm.identity(b"").kem_public
    nums = tpmpublic.kem_public_key(kem_public).key.public_numbers()
    kem_point = (nums.x.to_bytes(32, "big"), nums.y.to_bytes(32, "big"))
    ops: list[tuple[str, Callable[[], object]]] = [
        ("identity", lambda: tpm.identity(b"nonce")),
        ("quote(8 pcrs)", lambda: tpm.quote(b"nonce", list(range(8)))),
        ("quote(24 pcrs)", lambda: tpm.quote(b"nonce", list(range(24)))),
        ("ecdh_zgen", lambda: tpm.ecdh_zgen(*kem_point)),
        ("envelope seal+open", lambda: sealing.open_envelope(
            sealing.seal(kem_public, b"k" * 32, CTX), CTX, tpm.ecdh_zgen)),
        ("tpm seal+unseal", lambda: tpm.unseal(tpm.seal(b"k" * 32))),
    ]
    results = {}
    for name, fn in ops:
        start = time.perf_counter()
        for _ in range(n):
            fn()
        results[name] = (time.perf_counter() - start) / n * 1000
    return results


def measure_zgen(tpm: HostTPM, n: int) -> float:
    """Mean milliseconds per ECDH_ZGen, ``n`` calls."""
    nums = tpmpublic.kem_public_key(tpm.identity(b"").kem_public).key.public_numbers()
    point = (nums.x.to_bytes(32, "big"), nums.y.to_bytes(32, "big"))
    start = time.perf_counter()
    for _ in range(n):
        tpm.ecdh_zgen(*point)
    return (time.perf_counter() - start) / n * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=50)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vtbh") as base:
        standin = HostTPMStandIn(Path(base), "bench")
        standin.start()
        try:
            auth = keyauth.derive(os.urandom(32))
            with HostTPM(standin.tcti, auth, key_file=Path(base) / "hostkeys.tpm") as tpm:
                results = measure(tpm, args.n)
            # the KEM key bound to PCRs 0-7 ([host_tpm] kem_policy_pcrs): ZGen
            # through a policy session (PolicyPCR + PolicyAuthValue)
            with HostTPM(standin.tcti, auth, key_file=Path(base) / "bound.tpm",
                         kem_pcrs=range(8)) as bound:
                results["ecdh_zgen (kem_policy_pcrs 0-7)"] = measure_zgen(bound, args.n)
        finally:
            standin.cleanup()
    text = json.dumps({"n": args.n, "ms_per_call": results}, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
