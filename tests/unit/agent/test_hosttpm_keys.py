"""The host TPM's AK and KEM key only with the agent's secrets (review
finding 7), and the EK cache (finding 4): only the EK public key is cached,
the certificate is read every time, a missing one never sticks, and only an
engine-signed failed activation drops the cache. No TPM: the TPM side is
faked at the hostek seams."""

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from tests.refusal import refused
from vtpcm_agent import hostek, hostkeys, hosttpm, keyauth, keycache
from vtpcm_common.exception import HostTPMError

NO_SECRETS = ("the AK and KEM key need the agent's key secrets (use_key_auth); this "
              "HostTPM serves PCRs and sealing only")


class _Untouched:
    def __getattr__(self, name: str) -> Any:
        raise AssertionError("the TPM was used: %s" % name)


def _bare(key_auth: keyauth.KeyAuth | None, esapi: Any) -> hosttpm.HostTPM:
    tpm = object.__new__(hosttpm.HostTPM)
    tpm._lock = threading.RLock()
    tpm._esapi = esapi
    tpm._key_auth = key_auth
    tpm._ek_public = None
    tpm._cache = keycache.KeyCache()
    tpm._tcti = "x:y"
    return tpm


def test_no_ak_or_kem_key_without_the_agents_secrets() -> None:
    """Before, a HostTPM without ``key_auth`` used the public-template keys,
    which any local TPM user derives as well. Refused before any TPM work."""
    tpm = _bare(None, _Untouched())
    for call in (lambda: tpm.identity(b"n" * 32),
                 lambda: tpm.quote(b"n" * 32, [0]),
                 lambda: tpm.activate_credential(b"\x00\x01b", b"\x00\x01s"),
                 lambda: tpm.ecdh_zgen(b"x" * 32, b"y" * 32)):
        with refused(HostTPMError, "Host TPM error: " + NO_SECRETS):
            call()


class _Public:
    class publicArea:  # noqa: N801 - the TSS attribute name
        @staticmethod
        def marshal() -> bytes:
            return b"pub"


class _Sig:
    @staticmethod
    def marshal() -> bytes:
        return b"sig"


class _Esapi:
    def certify(self, *args: Any, **sessions: Any) -> Any:
        return b"attest", _Sig()

    def tr_get_name(self, handle: Any) -> bytes:
        return b"name"


class _Template:
    @staticmethod
    def marshal() -> bytes:
        return b"template"


@pytest.fixture
def faked(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[hosttpm.HostTPM, dict[str, Any]]]:
    state: dict[str, Any] = {"cert": None, "ek_creates": 0}
    tpm = _bare(keyauth.derive(b"k" * 32), _Esapi())

    @contextmanager
    def primary(e: Any) -> Iterator[hostkeys.Loaded]:
        yield hostkeys.Loaded(object(), _Public, object())

    @contextmanager
    def ek(e: Any, template: Any) -> Iterator[tuple[object, Any]]:
        state["ek_creates"] += 1  # the expensive RSA EK re-creation
        yield object(), _Public

    monkeypatch.setattr(tpm, "_ak", primary)
    monkeypatch.setattr(tpm, "_kem", primary)
    monkeypatch.setattr(tpm, "_current_kem", lambda e, rotate: True)  # no PCR binding here
    monkeypatch.setattr(hostek, "ek_template",
                        lambda e: (state["cert"], _Template) if state["cert"] else None)
    monkeypatch.setattr(hostek, "_read_ek_certificate", lambda e: None)
    monkeypatch.setattr(hostek, "loaded_ek", ek)
    yield tpm, state


def test_a_certificate_provisioned_or_renewed_later_is_served(faked: Any) -> None:
    """Before, the first identity cached (None, None) for good."""
    tpm, state = faked
    assert tpm.identity(b"n" * 32).ek_certificate is None  # not provisioned yet
    state["cert"] = b"CERT provisioned later"
    assert tpm.identity(b"n" * 32).ek_certificate == b"CERT provisioned later"
    state["cert"] = b"CERT renewed"
    for _ in range(3):
        ident = tpm.identity(b"n" * 32)
        assert (ident.ek_certificate, ident.ek_public) == (b"CERT renewed", b"pub")
    assert state["ek_creates"] == 1  # the EK public key is cached


def test_only_a_signed_failed_activation_drops_the_ek_cache(
        faked: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before, any broker client dropped it with one bogus unsigned
    challenge, forcing an RSA EK re-creation per call."""
    tpm, state = faked
    state["cert"] = b"CERT"
    tpm.identity(b"n" * 32)

    def fails(*args: Any) -> bytes:
        raise HostTPMError(reason="activate credential failed: TPM_RC_INTEGRITY")
    monkeypatch.setattr(hostek, "parse_challenge", lambda blob, secret: (blob, secret))
    monkeypatch.setattr(hostek, "activate_credential", fails)
    for _ in range(3):
        with refused(HostTPMError, "Host TPM error: activate credential "
                                   "failed: TPM_RC_INTEGRITY"):
            tpm.activate_credential(b"x", b"y")
    tpm.identity(b"n" * 32)
    assert state["ek_creates"] == 1
    with refused(HostTPMError, "Host TPM error: activate credential "
                               "failed: TPM_RC_INTEGRITY"):
        tpm.activate_credential(b"x", b"y", signed=True)
    tpm.identity(b"n" * 32)
    assert state["ek_creates"] == 2
