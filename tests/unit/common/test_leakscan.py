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
])
def test_every_encoding_is_found(encode) -> None:  # type: ignore[no-untyped-def]
    key = secrets.token_bytes(32)
    haystack = b"2026-11-30 DEBUG something " + encode(key) + b" more\n"
    assert leakscan.hits([("k", key)], haystack)


def test_nothing_found_in_clean_text() -> None:
    key = secrets.token_bytes(32)
    assert leakscan.hits([("k", key)], secrets.token_bytes(4096)) == []


def test_short_secrets_are_refused() -> None:
    with pytest.raises(ValueError, match="shorter than 24"):
        leakscan.forms(b"x" * 16)
