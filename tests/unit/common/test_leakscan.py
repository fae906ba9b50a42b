import base64
import json
import secrets

import pytest

from tests import leakscan


@pytest.mark.parametrize("encode", [
    lambda k: k,
    lambda k: k.hex().encode(),
    lambda k: k.hex().upper().encode(),
    lambda k: repr(k).encode(),
    lambda k: base64.b64encode(k),
    lambda k: base64.urlsafe_b64encode(b"x" + k + b"yz"),
    lambda k: base64.b64encode(b"ab" + k),
    lambda k: json.dumps({"blob": base64.b64encode(b"p" + k).decode()}).encode(),
    lambda k: json.dumps({"m": json.dumps({"r": repr(b"\x01" + k)})}).encode(),
    lambda k: json.dumps({"m": json.dumps({"r": (b"\x01" + k).hex()})}).encode(),
    lambda k: b"=" + base64.b64encode(b"abc" + k)[1:],  # a run cut mid-group
], ids=["raw", "hex", "HEX", "repr", "b64", "b64url-unaligned", "b64-unaligned",
        "json-b64", "json-in-json-repr", "json-in-json-hex", "b64-cut"])
def test_every_encoding_is_found(encode) -> None:  # type: ignore[no-untyped-def]
    key = secrets.token_bytes(32)
    haystack = b"2026-11-30 DEBUG something " + encode(key) + b" more\n"
    assert leakscan.hits([("k", key)], haystack)
    window = key  # a window of state is found in the same encodings
    assert leakscan.window_hits({window}, haystack) >= 1


def test_nothing_found_in_clean_text() -> None:
    key = secrets.token_bytes(32)
    noise = secrets.token_bytes(4096)
    haystack = noise + base64.b64encode(noise) + noise.hex().encode()
    assert leakscan.hits([("k", key)], haystack) == []
    assert leakscan.window_hits({key}, haystack) == 0


def test_short_secrets_are_refused() -> None:
    with pytest.raises(ValueError, match="shorter than 24"):
        leakscan.forms(b"x" * 16)


def test_windows_leave_out_public_items_and_low_variety() -> None:
    public, secret = secrets.token_bytes(64), secrets.token_bytes(40)
    plain = b"\x00" * 64 + public + secret
    found = leakscan.windows(plain, [public])
    assert found and all(w in secret for w in found)
    assert len(found) == len(secret) - leakscan.WINDOW + 1


def test_the_planted_control_passes_on_a_clean_haystack_and_needs_secrets() -> None:
    key, window = secrets.token_bytes(32), secrets.token_bytes(32)
    leakscan.assert_finds([("k", key)], {window}, b"clean log\n")
    with pytest.raises(AssertionError, match="nothing to look for"):
        leakscan.assert_finds([], {window}, b"clean log\n")
