"""One scanner for "no secret in this text": every encoding a secret can take
in a log line, a JSON body or a repr.

A secret embedded in a longer base64 string appears as the encoding of its
bytes from offset 0, 1 or 2 (whichever starts a 3-byte group), without the
partial groups at either end; ``forms`` lists all three, in both base64
alphabets, besides raw bytes, lower/upper hex and Python's bytes repr.
"""

import base64
from collections.abc import Callable, Iterable


def _b64_inner(secret: bytes, encode: Callable[[bytes], bytes]) -> list[bytes]:
    out = []
    for skip in range(3):
        chunk = secret[skip:]
        chunk = chunk[:len(chunk) // 3 * 3]
        if len(chunk) >= 18:
            out.append(encode(chunk).rstrip(b"="))
    return out


def forms(secret: bytes) -> list[tuple[str, bytes]]:
    """(encoding name, bytes to look for) for one secret of >= 24 bytes."""
    if len(secret) < 24:
        raise ValueError("secrets shorter than 24 bytes give false hits")
    found = [("raw", secret), ("hex", secret.hex().encode()),
             ("HEX", secret.hex().upper().encode()), ("repr", repr(secret).encode()[2:-1])]
    found += [("base64", f) for f in _b64_inner(secret, base64.b64encode)]
    found += [("base64url", f) for f in _b64_inner(secret, base64.urlsafe_b64encode)]
    return found


def hits(secrets: Iterable[tuple[str, bytes]], haystack: bytes) -> list[str]:
    """Names (never values) of the secrets and encodings found in ``haystack``."""
    return ["%s as %s" % (name, kind) for name, secret in secrets
            for kind, form in forms(secret) if form in haystack]
