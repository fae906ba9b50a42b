"""tpmstruct against tpm2-pytss: whatever the fast readers accept, the
reference parser accepts too and reads the same fields (real swtpm quotes
and signatures, and every one-byte change, cut and extension of them)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from tpm2_pytss.constants import TPM2_ST
from tpm2_pytss.TSS2_Exception import TSS2_Exception
from tpm2_pytss.types import TPMS_ATTEST, TPMT_SIGNATURE

from tests.refusal import refused
from tests.unit.engine import test_verifier as tv
from vtpcm_common import exception
from vtpcm_nova.engine import tpmstruct
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
