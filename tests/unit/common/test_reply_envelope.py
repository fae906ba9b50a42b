"""The signed reply envelope (vtpcm_common/authn.py) on its own: its bytes
pinned, and every refusal of verify_reply by its whole text (mutation
testing found these reachable only through the engine's tests)."""

import base64
import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from tests.refusal import refused
from vtpcm_common import authn, exception

KEY = ed25519.Ed25519PrivateKey.from_private_bytes(b"\x01" * 32)
NONCE = "ab" * 16
CALL = {"min_api": "1.6", "method": "get", "server": "host-a", "nonce": NONCE,
        "request": "c" * 64}


def _envelope(outcome, api="1.6", key=KEY, **over):
    call = dict(CALL, **over)
    data = authn.reply_bytes(api, call["method"], call["server"], call["nonce"],
                             call["request"], outcome)
    return {"api": api, "outcome": outcome,
            "signature": base64.b64encode(key.sign(data)).decode()}


def _refusal(reason: str) -> str:
    return "Reply of host-a to get not authenticated: " + reason


def test_reply_bytes_and_request_digest_known_answers():
    assert authn.reply_bytes("1.6", "get", "host-a", NONCE, "r", {"ok": {"b": 1, "a": [2]}}) \
        == (b'{"api":"1.6","method":"get","nonce":"' + NONCE.encode() + b'",'
            b'"outcome":{"ok":{"a":[2],"b":1}},"request":"r","server":"host-a",'
            b'"tag":"vtpcm agent reply v1"}')
    doc = b'{"auth":{"n":1},"payload":{"x":"y"}}'
    assert authn.request_digest({"x": "y"}, {"n": 1}) == hashlib.sha256(doc).hexdigest()
    with pytest.raises(ValueError, match="Out of range float"):
        authn.request_digest({"x": float("nan")}, None)


def test_an_honest_reply_verifies():
    for outcome in ({"ok": {"state": "ACTIVE"}},
                    {"error": {"type": "NotFound", "message": "m", "kwargs": {"key": "k"}}}):
        assert authn.verify_reply(KEY.public_key(), _envelope(outcome), **CALL) == outcome
    assert authn.verify_reply(KEY.public_key(), _envelope({"ok": 1}, api="1.7"), **CALL)


@pytest.mark.parametrize(("envelope", "reason"), [
    ({"api": "1.6", "outcome": {"ok": 1}}, "not a signed reply (fields api, outcome, "
     "signature expected)"),
    ("reply", "not a signed reply (fields api, outcome, signature expected)"),
    (_envelope({"ok": 1}, api="1.5"), "signed for an agent API other than 1.6 or later"),
    (_envelope({"ok": 1}, api="2.6"), "signed for an agent API other than 1.6 or later"),
    (_envelope({"ok": 1}, api="1"), "signed for an agent API other than 1.6 or later"),
    (_envelope({"ok": 1}, api="1." + "6" * 15), "signed for an agent API other than 1.6 or "
     "later"),
    (dict(_envelope({"ok": 1}), signature=12), "reply signature must be base64"),
    (dict(_envelope({"ok": 1}), signature="%%%"), "reply signature must be base64"),
    (dict(_envelope({"ok": 1}), signature=base64.b64encode(b"x" * 63).decode()),
     "reply signature must be 64 bytes"),
    (dict(_envelope({"ok": 1}), outcome={"ok": float("nan")}), "reply is not canonical JSON"),
    (dict(_envelope({"ok": 1}), outcome={"ok": 2}), "signature does not verify with the "
     "command key of host-a for this call"),
    (_envelope({"ok": 1}, key=ed25519.Ed25519PrivateKey.generate()), "signature does not "
     "verify with the command key of host-a for this call"),
    (_envelope({"ok": 1}, nonce="cd" * 16), "signature does not verify with the command key "
     "of host-a for this call"),
    (_envelope({"fine": 1}), "outcome must be {ok: reply} or {error: {type, message, kwargs}}"),
    (_envelope({"ok": 1, "error": 2}), "outcome must be {ok: reply} or {error: {type, "
     "message, kwargs}}"),
    (_envelope({"error": {"type": "X", "message": "m"}}), "error outcome must have a type, "
     "a message and named values"),
    (_envelope({"error": {"type": 1, "message": "m", "kwargs": {}}}), "error outcome must "
     "have a type, a message and named values"),
    (_envelope({"error": {"type": "X", "message": 1, "kwargs": {}}}), "error outcome must "
     "have a type, a message and named values"),
    (_envelope({"error": {"type": "X", "message": "m", "kwargs": []}}), "error outcome must "
     "have a type, a message and named values"),
    (_envelope({"error": {"type": "X", "message": "m", "kwargs": {"message": 1}}}),
     "error outcome must have a type, a message and named values"),
    (_envelope({"error": {"type": "X", "message": "m", "kwargs": {"not id": 1}}}),
     "error outcome must have a type, a message and named values"),
])
def test_every_refusal_of_a_reply_is_exact(envelope, reason):
    with refused(exception.ReplyNotAuthenticated, _refusal(reason)):
        authn.verify_reply(KEY.public_key(), envelope, **CALL)


def test_a_reply_larger_than_the_limit_is_refused(monkeypatch):
    limit = len(authn.reply_bytes("1.6", "get", "host-a", NONCE, "c" * 64, {"ok": "x"}))
    monkeypatch.setattr(authn, "MAX_REPLY_BYTES", limit)
    assert authn.verify_reply(KEY.public_key(), _envelope({"ok": "x"}), **CALL)  # at the limit
    with refused(exception.ReplyNotAuthenticated,
                 _refusal("reply larger than %d bytes" % limit)):
        authn.verify_reply(KEY.public_key(), _envelope({"ok": "xy"}), **CALL)


@pytest.mark.parametrize("nonce", [12, "AB" * 16, "ab" * 15, "ab" * 16 + "a", "xy" * 16])
def test_reply_nonces_are_checked(nonce):
    with refused(exception.InvalidInput,
                 "Invalid input: reply nonce must be 32 lowercase hex digits"):
        authn.check_nonce(nonce)
    assert authn.check_nonce(authn.new_nonce()) and len(authn.new_nonce()) == 32
