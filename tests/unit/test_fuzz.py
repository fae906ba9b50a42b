"""Fuzzing (hypothesis) of everything that parses bytes or payloads from a peer.

Targets: the swtpm control-channel reply parser, the migration-key envelope
opener, the wire schema of every RPC message of both APIs, and the TPM
structure parsers of the verifier (public areas, quotes, certifications, EK
certificates, the storage parents' creation certifications). Each may refuse
its input only with the project's own exception for that input; anything
else (IndexError, struct.error, UnicodeError, a tpm2-pytss or cryptography
exception) is a bug. Each target
runs a bounded number of examples with a per-example deadline (no hang), and
without an example database (nothing written next to the tests), so the
test command stays within a few seconds per target. Cases found are kept
as ``@example``s: regression tests.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import inspect
import os
import struct
import uuid
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from tpm2_pytss.types import TPMS_ATTEST

from tests.unit.agent.test_sealing import SoftKEM
from tests.unit.engine import test_parentcert as tpc
from tests.unit.engine import test_verifier as tv
from vtpcm_agent import sealing
from vtpcm_agent.swtpm import framing
from vtpcm_common import exception, tpmpublic, tpmstruct, wire
from vtpcm_common.api.agent import messages as agent_messages
from vtpcm_common.api.engine import messages as engine_messages
from vtpcm_nova.engine import ekcert, parentcert
from vtpcm_nova.engine import verifier as V

# VTPCM_FUZZ_EXAMPLES=20000 for a long local session; the test command's budget
# keeps each target at about a second or two on 2 busy cores
EXAMPLES = int(os.environ.get("VTPCM_FUZZ_EXAMPLES", "500"))
FUZZ = settings(max_examples=EXAMPLES, deadline=datetime.timedelta(milliseconds=500),
                database=None, suppress_health_check=[HealthCheck.too_slow])
Command, BlobType = framing.Command, framing.BlobType
U32 = struct.Struct(">I")

# --- swtpm control channel replies --------------------------------------------------

REPLY_COMMANDS = list(Command)


def _any_reply(command: Command, data: bytes) -> None:
    for end in range(0, min(len(data), 40) + 1):
        framing.response_length(command, data[:end], max_payload=4096)
    if command is Command.GET_CAPABILITY:
        framing.parse_capability(data)
    elif command is Command.GET_CONFIG:
        framing.parse_config(data)
    elif command is Command.GET_STATEBLOB:
        framing.parse_stateblob(BlobType.PERMANENT, data, max_size=4096)
    elif command is Command.GET_INFO:
        framing.parse_info(data)
    else:
        framing.parse_result(command, data)


def _header_then(data: st.DrawFn) -> bytes:
    """A reply that starts plausibly (success, lengths near the truth)."""
    payload = data(st.binary(max_size=64))
    length = data(st.sampled_from([len(payload), len(payload) + 1, 0, 2**32 - 1]))
    total = data(st.sampled_from([length, min(length + 1, 2**32 - 1), 0]))
    flags = data(st.sampled_from([0, 1, 2, 0xFFFFFFFF]))
    return U32.pack(0) + U32.pack(flags) + U32.pack(total) + U32.pack(length) + payload


@FUZZ
@given(st.sampled_from(REPLY_COMMANDS), st.one_of(st.binary(max_size=80), st.data()))
@example(Command.GET_INFO, U32.pack(0) + U32.pack(2) + U32.pack(2) + b"\xff\xfe")
def test_ctrl_reply_parsers_refuse_only_with_ctrl_errors(command: Command, raw: Any) -> None:
    data = raw if isinstance(raw, bytes) else _header_then(raw.draw)
    try:
        _any_reply(command, data)
    except (exception.CtrlChannelError, exception.InvalidInput):
        pass


@FUZZ
@given(st.binary(max_size=64))
def test_blob_header_parser_refuses_only_with_invalid_input(data: bytes) -> None:
    try:
        header = framing.parse_blob_header(data)
    except exception.InvalidInput:
        return
    assert header.total_length == len(data)


# --- the migration-key envelope -------------------------------------------------------

KEM = SoftKEM()
CTX = sealing.SealContext(str(uuid.uuid4()), str(uuid.uuid4()), 3, "src", "dst")
SEALED = sealing.seal(KEM.public, os.urandom(32), CTX)


@FUZZ
@given(st.one_of(st.binary(max_size=200),
                 st.tuples(st.integers(0, len(SEALED) - 1), st.integers(1, 255)),
                 st.integers(0, len(SEALED) - 1)))
def test_envelope_opener_refuses_all_but_the_envelope_with_seal_error(change: Any) -> None:
    """Random bytes, one byte of a real envelope changed, a real one cut short."""
    if isinstance(change, bytes):
        envelope = change
    elif isinstance(change, tuple):
        pos, xor = change
        envelope = SEALED[:pos] + bytes([SEALED[pos] ^ xor]) + SEALED[pos + 1:]
    else:
        envelope = SEALED[:change]
    try:
        sealing.open_envelope(envelope, CTX, KEM.zgen)
    except exception.SealError:
        return
    raise AssertionError("a changed envelope opened")


@FUZZ
@given(st.text(st.characters(codec=None, categories=None), min_size=1, max_size=8),
       st.integers(-1, 2**64))
@example("\ud800", 0)  # found: a lone surrogate cannot be encoded into the AAD
def test_seal_context_refuses_what_it_cannot_bind(text: str, generation: int) -> None:
    try:
        ctx = sealing.SealContext(text, text, generation, text, text)
    except exception.SealError:
        return
    assert ctx.aad()


# --- the wire schema of every RPC message ---------------------------------------------

def _messages() -> list[type[wire.Message]]:
    found = []
    for module in (agent_messages, engine_messages):
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, wire.Message) and cls is not wire.Message \
                    and cls.__module__ == module.__name__:
                found.append(cls)
    return found


MESSAGES = _messages()
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70)
    | st.floats(allow_nan=True) | st.text(max_size=40)
    | st.sampled_from([str(uuid.uuid4()), "cmp-1", "ACTIVE", "sha256", "source",
                       base64.b64encode(os.urandom(32)).decode(), "AAAA", "=="]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8),
                                                                 inner, max_size=4),
    max_leaves=12)


@FUZZ
@given(st.sampled_from(MESSAGES), st.data())
def test_every_message_refuses_bad_payloads_with_invalid_payload(cls: type[wire.Message],
                                                                  data: st.DataObject) -> None:
    """Payloads with the message's own field names and random values (so the
    field checkers run), or anything at all."""
    names = [f.name for f in dataclasses.fields(cls)]
    payload = data.draw(st.one_of(
        JSON, st.fixed_dictionaries({n: JSON for n in names}),
        st.fixed_dictionaries({}, optional={n: JSON for n in names})))
    try:
        message = cls.from_wire(payload)
    except exception.InvalidPayload:
        return
    assert cls.from_wire(message.to_wire()) == message  # what passes, round-trips


# --- the verifier's TPM structure parsers ---------------------------------------------

SOFT_KEY = ec.generate_private_key(ec.SECP256R1())
SOFT_AK = V.load_ak(tv.soft_public(SOFT_KEY))
REAL_QUOTE = bytes.fromhex(tv.A["boot1"]["quote1"]["attest"])
REAL_KEM = bytes.fromhex(tv.A["kem_public"])
ATTEST_ERRORS = (exception.AttestationError,)


def _mutated(data: st.DataObject, real: bytes) -> bytes:
    choice = data.draw(st.sampled_from(["random", "flip", "cut", "grow"]))
    if choice == "random":
        return data.draw(st.binary(max_size=160))
    if choice == "cut":
        return real[:data.draw(st.integers(0, len(real)))]
    if choice == "grow":
        return real + data.draw(st.binary(min_size=1, max_size=8))
    pos = data.draw(st.integers(0, len(real) - 1))
    return real[:pos] + bytes([real[pos] ^ data.draw(st.integers(1, 255))]) + real[pos + 1:]


@FUZZ
@given(st.data())
def test_public_area_parsers_refuse_only_with_their_errors(data: st.DataObject) -> None:
    public = _mutated(data, REAL_KEM)
    for parse, errors in ((V.load_ak, (exception.InvalidAttestationKey,)),
                          (V.tpm_name, (exception.InvalidAttestationKey,)),
                          (tpmpublic.kem_public_key, (exception.InvalidKemKey,))):
        try:
            parse(public)
        except errors:
            pass


@FUZZ
@given(st.data())
def test_signed_but_malformed_quotes_are_refused_with_quote_errors(data: st.DataObject) -> None:
    """Signed by the enrolled (software) AK, so parsing runs past the signature."""
    attest = _mutated(data, REAL_QUOTE)
    pcrs = data.draw(st.dictionaries(st.integers(-2, 30), st.binary(min_size=0, max_size=40),
                                     max_size=4))
    signature = tv.soft_sign(SOFT_KEY, attest) if attest else b""
    try:
        V.verify_quote(SOFT_AK, attest, signature, os.urandom(16), pcrs)
    except exception.QuoteVerificationError:
        return
    raise AssertionError("a mutated quote passed")


@FUZZ
@given(st.data())
def test_signed_but_malformed_certifications_are_refused(data: st.DataObject) -> None:
    attest = _mutated(data, REAL_QUOTE)
    kem_public = _mutated(data, REAL_KEM)
    signature = tv.soft_sign(SOFT_KEY, attest) if attest else b""
    try:
        V.verify_certification(SOFT_AK, kem_public, attest, signature, os.urandom(16))
    except exception.CertificationError:
        return
    raise AssertionError("a mutated certification passed")


@FUZZ
@given(st.data())
def test_creation_parsers_refuse_only_with_malformed(data: st.DataObject) -> None:
    """``tpmstruct.creation_attest``/``creation_data`` (the parents'
    certification, issue 9) on mutations of real swtpm bytes."""
    cert = tpc.real(data.draw(st.sampled_from(parentcert.HIERARCHIES)))
    for parse, real in ((tpmstruct.creation_attest, cert["attest"]),
                        (tpmstruct.creation_data, cert["creation_data"])):
        try:
            parse(_mutated(data, real))
        except tpmstruct.Malformed:
            pass


@FUZZ
@given(st.data())
def test_signed_but_malformed_parent_certifications_are_refused(data: st.DataObject) -> None:
    """Signed by the (software) AK, so the check runs past the signature.
    Only a change of the attestation's unchecked fields (qualifiedSigner,
    clockInfo, firmwareVersion) may pass, and then for the same name."""
    cert = tpc.real(data.draw(st.sampled_from(parentcert.HIERARCHIES)))
    pinned = cert["pinned_name"]
    field = data.draw(st.sampled_from(["attest", "creation_data", "public", "pinned_name"]))
    before, cert[field] = cert[field], _mutated(data, cert[field])
    cert["signature"] = tv.soft_sign(SOFT_KEY, cert["attest"]) if cert["attest"] else b""
    try:
        got = parentcert.verify_one(SOFT_AK, cert, tpc.QUALIFYING, host="h")
    except exception.CertificationError:
        return
    assert got.name == pinned and (field == "attest" or cert[field] == before), \
        "a mutated parent certification passed"


@FUZZ
@given(st.binary(max_size=300), st.data())
def test_ek_certificate_parser_refuses_with_certification_errors(der: bytes,
                                                                  data: st.DataObject) -> None:
    try:
        ekcert.verify(der, _mutated(data, REAL_KEM), [], host="h",
                      now=datetime.datetime(2026, 11, 30, tzinfo=datetime.UTC))
    except exception.CertificationError:
        return
    raise AssertionError("random bytes passed as an EK certificate")


def test_the_real_vectors_still_pass() -> None:
    """Control: the unmutated inputs are accepted, so the targets above reach
    past the first check (a fuzz target that refuses everything proves nothing)."""
    assert TPMS_ATTEST.unmarshal(REAL_QUOTE)[1] == len(REAL_QUOTE)
    assert tpmpublic.kem_public_key(REAL_KEM).name
    assert sealing.open_envelope(SEALED, CTX, KEM.zgen)
    attest, signature, nonce, pcrs = tv.quote_args(tv.A)
    assert V.verify_quote(tv.AK_A, attest, signature, nonce, pcrs).pcr_selection
    for cert in tpc.real_certs():
        assert parentcert.verify_one(tpc.AK, cert, tpc.QUALIFYING, host="h").name
        cert["signature"] = tv.soft_sign(SOFT_KEY, cert["attest"])
        assert parentcert.verify_one(SOFT_AK, cert, tpc.QUALIFYING, host="h").name
