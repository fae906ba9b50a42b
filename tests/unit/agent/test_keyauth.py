"""The AK/KEM secrets derived from the host key (``vtpcm_agent.keyauth``)."""

import pytest

from vtpcm_agent import keyauth
from vtpcm_common.exception import InvalidInput


def test_secrets_are_per_key_deterministic_and_never_shown() -> None:
    one, again, other = (keyauth.derive(k) for k in (b"h" * 32, b"h" * 32, b"o" * 32))
    assert (one.ak.auth, one.kem.auth) == (again.ak.auth, again.kem.auth)
    assert len(one.kem.auth) == 32 and len(one.ak.auth) == 32
    assert len({one.ak.auth, one.kem.auth, other.ak.auth}) == 3
    for shown in (repr(one), str(one), repr(one.kem)):
        assert one.kem.auth.hex() not in shown and "hidden" in shown


def test_short_host_key_is_refused() -> None:
    with pytest.raises(InvalidInput, match="at least 32 bytes"):
        keyauth.derive(b"short")
