"""tpmstruct against tpm2-pytss: whatever the fast readers accept, the
reference parser accepts too and reads the same fields (real swtpm quotes
and signatures of several shapes, every one-byte change, cut and extension
of them, and quotes rebuilt with each field at its boundary values), and
verify_quote decides the same on the fast path and the reference path."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from tpm2_pytss.constants import TPM2_ST
from tpm2_pytss.TSS2_Exception import TSS2_Exception
from tpm2_pytss.types import TPMS_ATTEST, TPMT_SIGNATURE

from tests.refusal import refused
from tests.unit.engine import test_verifier as tv
from vtpcm_common import exception, tpmstruct
from vtpcm_nova.engine import verifier as V

H = bytes.fromhex
QUOTES = [(tpm, boot, name) for tpm in ("tpm_a", "tpm_b")
          for boot in ("boot1", "boot2") if boot in tv.VECTORS[tpm]
          for name in tv.VECTORS[tpm][boot]]


def real(field: str) -> list[bytes]:
    return [H(tv.VECTORS[tpm][boot][name][field]) for tpm, boot, name in QUOTES]


def variants(data: bytes) -> Iterator[bytes]:
    """Every single-byte change (three values), cut and short extension."""
    for pos in range(len(data)):
        for xor in (0x01, 0x80, 0xFF):
            yield data[:pos] + bytes([data[pos] ^ xor]) + data[pos + 1:]
    for cut in range(len(data)):
        yield data[:cut]
    for tail in (b"\x00", b"\x00\x00", b"\xff" * 4):
        yield data + tail


def reference(cls: Any, data: bytes) -> Any | None:
    try:
        obj, used = cls.unmarshal(data)
    except (TSS2_Exception, ValueError, TypeError, OverflowError):
        return None
    return obj if used == len(data) else None


def reference_quote(data: bytes) -> tpmstruct.Quote | None:
    info = reference(TPMS_ATTEST, data)
    if info is None or info.type != TPM2_ST.ATTEST_QUOTE:
        return None
    quote, clock = info.attested.quote, info.clockInfo
    return tpmstruct.Quote(
        int(info.magic), bytes(info.extraData), int(clock.clock), int(clock.resetCount),
        int(clock.restartCount), bool(clock.safe), int(info.firmwareVersion),
        tuple(tpmstruct.PcrSelection(int(s.hash), bytes(s.pcrSelect)[:int(s.sizeofSelect)])
              for s in quote.pcrSelect),
        bytes(quote.pcrDigest))


def reference_signature(data: bytes) -> tpmstruct.EcdsaSignature | None:
    sig = reference(TPMT_SIGNATURE, data)
    if sig is None or int(sig.sigAlg) != tpmstruct.ALG_ECDSA:
        return None
    e = sig.signature.ecdsa
    return tpmstruct.EcdsaSignature(int(e.hash), bytes(e.signatureR), bytes(e.signatureS))


def test_real_quotes_are_on_the_fast_path() -> None:
    """Control: the readers accept what a TPM produces, so the differential
    tests below compare parsed fields and not just two refusals."""
    for attest, sig in zip(real("attest"), real("signature"), strict=True):
        fast = tpmstruct.quote(attest)
        assert fast is not None and fast == reference_quote(attest)
        assert fast.pcr_select == (tpmstruct.PcrSelection(0x000B, b"\x8f\x00\x01"),)
        fast_sig = tpmstruct.ecdsa_signature(sig)
        assert fast_sig is not None and fast_sig == reference_signature(sig)


@pytest.mark.parametrize("index", range(len(QUOTES)))
def test_quote_reader_accepts_only_what_pytss_reads_the_same(index: int) -> None:
    accepted = 0
    for data in variants(real("attest")[index]):
        fast = tpmstruct.quote(data)
        if fast is not None:
            accepted += 1
            assert fast == reference_quote(data), data.hex()
    assert accepted > 100  # value changes inside fields stay on the fast path


@pytest.mark.parametrize("index", range(len(QUOTES)))
def test_signature_reader_accepts_only_what_pytss_reads_the_same(index: int) -> None:
    accepted = 0
    for data in variants(real("signature")[index]):
        fast = tpmstruct.ecdsa_signature(data)
        if fast is not None:
            accepted += 1
            assert fast == reference_signature(data), data.hex()
    assert accepted > 100


def test_other_types_and_schemes_are_left_to_the_reference_parser() -> None:
    certify = H(tv.A["certify"]["attest"])
    assert reference(TPMS_ATTEST, certify) is not None
    assert tpmstruct.quote(certify) is None
    rsassa = b"\x00\x14\x00\x0b\x00\x02\xab\xcd"
    assert tpmstruct.ecdsa_signature(rsassa) is None


def test_verifier_uses_the_fast_path_for_real_quotes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The speed-up is real: a real quote verifies without tpm2-pytss."""
    def no_reference(*args: Any) -> Any:
        raise AssertionError("reference parser used for a well-formed quote")
    monkeypatch.setattr(V, "_reference_quote", no_reference)
    monkeypatch.setattr(V, "_reference_signature", no_reference)
    attest, sig, nonce, pcrs = tv.quote_args(tv.A)
    assert V.verify_quote(tv.AK_A, attest, sig, nonce, pcrs).pcr_selection == \
        (0, 1, 2, 3, 7, 16)


def test_an_ak_is_parsed_once_and_refusals_still_name_each_host() -> None:
    public = tv.soft_public(tv.ec.generate_private_key(tv.ec.SECP256R1()))
    before = V._parsed_ak.cache_info()
    assert V.load_ak(public, host="h1") is V.load_ak(public, host="h2")
    after = V._parsed_ak.cache_info()
    assert (after.misses - before.misses, after.hits - before.hits) == (1, 1)
    bad = b"\x00\x23garbage-" + public[:8]
    for host in ("h1", "h2"):  # the second refusal comes from the cache
        with refused(exception.InvalidAttestationKey,
                     "Attestation key of host %s rejected: AK public area is malformed or "
                     "truncated" % host):
            V.load_ak(bad, host=host)
    with refused(exception.InvalidAttestationKey,
                 "Attestation key of host h3 rejected: AK public area must be bytes"):
        V.load_ak("text", host="h3")  # type: ignore[arg-type]


# ---- real quotes of several shapes, and boundary values of every field -------------
SHAPES = json.loads((Path(__file__).parent / "vectors" / "quote_shapes.json").read_text())
SHAPE_AK = V.load_ak(H(SHAPES["ak_public"]))
SIZES = (0, 1, 20, 31, 32, 33, 48, 63, 64, 65, 66, 67)  # around 32 (SHA-256) and the maxima


def build(q: tpmstruct.Quote, signer: bytes, *, magic: int | None = None,
          kind: int = 0x8018, sizes: dict[str, int] | None = None, count: int | None = None,
          safe: int | None = None, tail: bytes = b"") -> bytes:
    """A marshaled TPMS_ATTEST from fields; ``sizes``/``count``/``safe``
    write a size, bank count or safe byte that may lie about what follows."""
    sizes = sizes or {}
    out = struct.pack(">IH", q.magic if magic is None else magic, kind)
    for name, blob in (("signer", signer), ("extra", q.extra_data)):
        out += struct.pack(">H", sizes.get(name, len(blob))) + blob
    out += struct.pack(">QIIBQ", q.clock, q.reset_count, q.restart_count,
                       int(q.safe) if safe is None else safe, q.firmware_version)
    out += struct.pack(">I", len(q.pcr_select) if count is None else count)
    for sel in q.pcr_select:
        out += struct.pack(">HB", sel.hash_alg, len(sel.bitmap)) + sel.bitmap
    return out + struct.pack(">H", sizes.get("digest", len(q.pcr_digest))) + q.pcr_digest + tail


def blob(n: int) -> bytes:
    return bytes((7 * i + n) % 256 for i in range(n))


def boundary(q: tpmstruct.Quote, signer: bytes) -> Iterator[bytes]:
    """``q`` rebuilt with one field at a time at its boundary values: every
    TPM2B at sizes around 32 and its maximum (true and lying sizes), bank
    counts and select sizes around their maxima, the safe byte, clock
    extremes, magic, type and a trailing byte."""
    for n in SIZES:
        yield build(q, blob(n))
        yield build(q._replace(extra_data=blob(n)), signer)
        yield build(q._replace(pcr_digest=blob(n)), signer)
        for name in ("signer", "extra", "digest"):
            yield build(q, signer, sizes={name: n})
    bank = q.pcr_select[0]
    for count in (0, 1, 2, 3, 16, 17):
        yield build(q._replace(pcr_select=(bank,) * count), signer)
        yield build(q, signer, count=count)
    for size in range(6):
        for alg in (0x0004, 0x000B, 0x000C):
            yield build(q._replace(pcr_select=(tpmstruct.PcrSelection(alg, blob(size)),)),
                        signer)
    for safe in (0, 1, 2, 255):
        yield build(q, signer, safe=safe)
    top = (1 << 64) - 1, (1 << 32) - 1
    yield build(q._replace(clock=top[0], reset_count=top[1], restart_count=top[1],
                           firmware_version=top[0]), signer)
    yield build(q._replace(clock=0, reset_count=0, restart_count=0, firmware_version=0), signer)
    yield build(q, signer, magic=0x47435446)
    for kind in (0x8014, 0x8017, 0x8019):
        yield build(q, signer, kind=kind)
    yield build(q, signer, tail=b"\x00")


def signer_of(attest: bytes) -> bytes:
    (size,) = struct.unpack_from(">H", attest, 6)
    return attest[8:8 + size]


def test_real_quotes_of_every_shape_are_read_as_pytss_reads_them() -> None:
    """Several banks, SHA-1/-256/-384 banks, all 24 PCRs, nonces of 1 to 64
    bytes: each on the fast path, each field as tpm2-pytss reads it."""
    shapes = set()
    for q in SHAPES["quotes"]:
        attest, sig = H(q["attest"]), H(q["signature"])
        fast = tpmstruct.quote(attest)
        assert fast is not None and fast == reference_quote(attest), q["selection"]
        assert fast.extra_data == H(q["nonce"])  # the whole nonce, up to 64 bytes
        assert build(fast, signer_of(attest)) == attest  # the generator's own control
        fast_sig = tpmstruct.ecdsa_signature(sig)
        assert fast_sig is not None and fast_sig == reference_signature(sig)
        shapes.add((len(fast.pcr_select), len(fast.extra_data)))
    assert {(1, 1), (1, 64), (2, 33), (2, 64), (1, 48)} <= shapes


def test_boundary_values_are_read_as_pytss_reads_them() -> None:
    """Catches a limit off by a few bytes (a digest of 65 or 66 accepted) or
    a field read short (a nonce over 32 bytes cut), which single-byte
    changes of a real quote cannot reach."""
    accepted = refused_fast = 0
    for q in SHAPES["quotes"]:
        attest = H(q["attest"])
        base = tpmstruct.quote(attest)
        assert base is not None
        for data in boundary(base, signer_of(attest)):
            fast = tpmstruct.quote(data)
            if fast is None:
                refused_fast += 1
                continue
            accepted += 1
            assert fast == reference_quote(data), data.hex()
    assert accepted > 500 and refused_fast > 500  # both sides of each limit reached


def outcome(call: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return "ok", call()
    except exception.VTPCMException as err:
        return type(err).__name__, str(err)


def test_verify_quote_decides_the_same_on_both_paths(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each boundary variant of a real quote, re-signed with a software AK so
    that the parsers decide (not the signature): verify_quote's evidence
    or exact refusal is the same with the fast readers and with tpm2-pytss
    alone, and only project errors escape."""
    key = ec.generate_private_key(ec.SECP256R1())
    ak = V.load_ak(tv.soft_public(key))
    names = {alg: name for name, (alg, _) in V.BANKS.items()}
    cases = []
    for q in SHAPES["quotes"]:
        attest = H(q["attest"])
        base = reference_quote(attest)  # not the reader under test
        assert base is not None
        bank = base.pcr_select[0]
        selected = [b * 8 + i for b, byte in enumerate(bank.bitmap) for i in range(8)
                    if byte & (1 << i)]
        name = names[bank.hash_alg]
        pcrs = {i: hashlib.new(name, bytes([i])).digest() for i in selected}
        # the digest of the reported values: a single-bank shape verifies as is
        base = base._replace(pcr_digest=hashlib.sha256(
            b"".join(pcrs[i] for i in selected)).digest())
        for data in boundary(base, signer_of(attest)):
            cases.append((data, tv.soft_sign(key, data), base.extra_data, pcrs, name))
    fast = [outcome(lambda c=c: V.verify_quote(ak, *c)) for c in cases]
    monkeypatch.setattr(tpmstruct, "quote", lambda data: None)
    monkeypatch.setattr(tpmstruct, "ecdsa_signature", lambda data: None)
    reference_path = [outcome(lambda c=c: V.verify_quote(ak, *c)) for c in cases]
    for case, a, b in zip(cases, fast, reference_path, strict=True):
        assert a == b, case[0].hex()
    # the planted control: each of the 9 single-bank shapes verifies as is
    assert sum(a[0] == "ok" for a in fast) >= 9
    assert sum(a[0] != "ok" for a in fast) > 500
