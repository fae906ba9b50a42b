"""One scanner for "no secret in this text": every encoding a secret can take
in a log line, a JSON body, a repr or a file, used by every leak test.

Two kinds of secrets:

* keys (``hits``): each key is looked for as raw bytes, lower/upper hex,
  Python's bytes repr and base64 in both alphabets, also embedded in a longer
  base64 string: there it appears as the encoding of its bytes from offset 0,
  1 or 2 (whichever starts a 3-byte group), without the partial groups at
  either end; ``forms`` lists all of them;
* secret windows of a vTPCM's plaintext state (``window_hits``): 32-byte
  windows of the permanent and volatile state that are not public.

Both are also looked for, as raw bytes, in what ``decoded`` makes of the
haystack: every JSON string in it (and JSON inside those strings, as in an
oslo.messaging body), then every base64 run (both alphabets, from each of
its first four characters), every hex run (from each of its first two) and
Python escape sequences (``\\x12``) of all of these, decoded. So a window
inside a longer base64 or hex blob, or a key inside a JSON-quoted repr, is
found wherever it starts.

``assert_finds`` is the planted positive control every leak test runs on
its own haystack: it plants one key and one window in encodings only the
decoding finds and checks that they are found, so a scan that could not see
them (a broken decoder, a haystack of the wrong thing) fails the test.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable, Collection, Iterable, Iterator

WINDOW = 32
SEP = b"\x00" * WINDOW  # between scanned pieces: adds no random window

_B64 = re.compile(rb"[A-Za-z0-9+/]{24,}")
_B64URL = re.compile(rb"[A-Za-z0-9_-]{24,}")
_HEX = re.compile(rb"[0-9a-fA-F]{48,}")
_JSON_STRING = re.compile(rb'"(?:[^"\\\n]|\\.){16,}"')
_ESCAPE = re.compile(rb"\\x[0-9a-fA-F]{2}|\\[nrt\\'\"]")
_ESCAPES = {b"\\n": b"\n", b"\\r": b"\r", b"\\t": b"\t", b"\\\\": b"\\", b"\\'": b"'",
            b'\\"': b'"'}


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


def _unescape(data: bytes) -> bytes:
    def one(match: re.Match[bytes]) -> bytes:
        text = match.group(0)
        return bytes([int(text[2:], 16)]) if text[1:2] == b"x" else _ESCAPES[text]
    return _ESCAPE.sub(one, data)


def _json_strings(data: bytes, depth: int = 2) -> Iterator[bytes]:
    for match in _JSON_STRING.finditer(data):
        try:
            text = json.loads(match.group(0))
        except ValueError:
            continue
        raw = text.encode("utf-8", "surrogatepass")
        yield raw
        if any(0x80 <= ord(c) < 0x100 for c in text):
            yield text.encode("latin-1", "ignore")
        if depth > 1:
            yield from _json_strings(raw, depth - 1)


def _runs(data: bytes) -> Iterator[bytes]:
    """Decodings of the base64 and hex runs in ``data``, from every start."""
    for pattern, decode in ((_B64, base64.b64decode), (_B64URL, base64.urlsafe_b64decode)):
        for match in pattern.finditer(data):
            run = match.group(0)
            for skip in range(4):
                part = run[skip:]
                rest = len(part) % 4  # a partial last group: pad it, or drop a lone char
                part = part[:-1] if rest == 1 else part + b"=" * ((4 - rest) % 4)
                try:
                    yield decode(part)
                except (binascii.Error, ValueError):
                    continue
    for match in _HEX.finditer(data):
        run = match.group(0)
        for skip in range(2):
            part = run[skip:]
            yield bytes.fromhex(part[:len(part) // 2 * 2].decode())


def decoded(haystack: bytes) -> bytes:
    """Everything ``haystack`` decodes to (see the module docstring), the
    pieces kept apart by ``SEP``; the haystack itself is not included."""
    strings = list(_json_strings(haystack))
    first = [haystack, _unescape(haystack), *strings, *(_unescape(s) for s in strings)]
    pieces = [*first[1:], *(r for piece in first for r in _runs(piece))]
    return SEP.join(p for p in pieces if len(p) >= WINDOW // 2)


def hits(secrets: Iterable[tuple[str, bytes]], haystack: bytes) -> list[str]:
    """Names (never values) of the secrets and encodings found in ``haystack``."""
    secrets = list(secrets)
    found = ["%s as %s" % (name, kind) for name, secret in secrets
             for kind, form in forms(secret) if form in haystack]
    plain = decoded(haystack)
    found += ["%s decoded" % name for name, secret in secrets
              if secret not in haystack and secret in plain]
    return found


def public_mask(plain: bytes, public: Collection[bytes]) -> bytearray:
    """One byte per byte of ``plain``: non-zero where a ``public`` item lies."""
    covered = bytearray(len(plain))
    for item in public:
        start = plain.find(item)
        while start >= 0:
            covered[start:start + len(item)] = b"\x01" * len(item)
            start = plain.find(item, start + 1)
    return covered


def windows(plain: bytes, public: Collection[bytes] = ()) -> set[bytes]:
    """Secret 32-byte windows of a plaintext state: enough variety (runs of
    zeros match anything), and not inside any ``public`` item (what a guest
    may read through its TPM: public areas, names, certificates)."""
    covered = public_mask(plain, public)
    return {plain[i:i + WINDOW] for i in range(len(plain) - WINDOW + 1)
            if len(set(plain[i:i + WINDOW])) >= 12 and not any(covered[i:i + WINDOW])}


def _count(found: Collection[bytes], data: bytes) -> int:
    return sum(1 for i in range(len(data) - WINDOW + 1) if data[i:i + WINDOW] in found)


def window_hits(found: Collection[bytes], haystack: bytes) -> int:
    """How many secret windows ``haystack`` holds, raw or decoded."""
    return _count(found, haystack) + _count(found, decoded(haystack))


def planted(key: bytes, window: bytes) -> bytes:
    """A log line with ``key`` and ``window`` in forms only decoding finds:
    inside a JSON-quoted repr, and unaligned in a longer base64 blob."""
    blob = base64.b64encode(b"\x01" + window + b"\x02\x03")
    return (b"DEBUG body=" + json.dumps({"oslo.message": json.dumps(
        {"args": {"k": repr(b"\x07" + key), "v": blob.decode()}})}).encode() + b"\n")


def assert_finds(keys: list[tuple[str, bytes]], found: Collection[bytes],
                 haystack: bytes) -> None:
    """Planted positive control: one key and one window of this test's
    secrets, planted into this test's haystack, are found; the haystack
    alone holds neither."""
    assert keys and found, "nothing to look for: the control would prove nothing"
    name, key = keys[0]
    window = next(iter(found))
    text = haystack + planted(key, window)
    assert name + " decoded" in hits(keys[:1], text), "planted key not found"
    assert window_hits({window}, text) >= 1, "planted window not found"
    for kind, form in forms(key):
        assert "%s as %s" % (name, kind) in hits([(name, key)], b" " + form + b" "), kind
