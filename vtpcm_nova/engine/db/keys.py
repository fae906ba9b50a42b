"""Enrolled keys: each key a host enrolls with is bound to its name for good.

Why a table of digests: a key once enrolled under one name (revoked or
not) is refused under another, so no host can squat another's TPM. A host
command key is bound only once its host is APPROVED (it is public).
"""

from __future__ import annotations

import datetime
import hashlib

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from vtpcm_common import exception
from vtpcm_nova.engine.db import models
from vtpcm_nova.engine.db.store import Store

# kinds of enrolled keys (table enrolled_keys) and how refusals name them
KEY_KINDS = {"ak": "AK", "command": "host command key", "ek-cert": "EK certificate",
             "ek": "EK"}


def key_digest(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()


def host_keys(ak_name: bytes, command_public: bytes | None, ek_certificate: bytes | None,
              ek_public: bytes | None) -> list[tuple[str, str]]:
    """(kind, digest) of each key a host enrolls with."""
    keys = {"ak": ak_name, "command": command_public, "ek-cert": ek_certificate,
            "ek": ek_public}
    return [(kind, key_digest(key)) for kind, key in keys.items() if key]


class KeyStore(Store):
    """Binding keys to host names (in the caller's transaction) and looking them up."""

    @staticmethod
    def _bind_keys(s: Session, host: str, keys: list[tuple[str, str]],
                   now: datetime.datetime) -> None:
        for kind, digest in keys:
            owner = s.get(models.EnrolledKey, (kind, digest), with_for_update=True)
            if owner is None:
                s.add(models.EnrolledKey(kind=kind, digest=digest, host=host, enrolled_at=now))
            elif owner.host != host:
                raise exception.CertificationError(
                    host=host, reason=f"{KEY_KINDS[kind]} already enrolled for host "
                                      f"{owner.host}")
        try:
            s.flush()
        except IntegrityError:  # another worker bound one of them just now
            kinds = ", ".join(KEY_KINDS[kind] for kind, _ in keys)
            raise exception.CertificationError(
                host=host, reason=f"one of its keys ({kinds}) was enrolled for another "
                                  "host meanwhile") from None

    @staticmethod
    def _check_key_free(s: Session, host: str, kind: str, digest: str) -> None:
        """Refuse a key bound to another host, without binding it."""
        owner = s.get(models.EnrolledKey, (kind, digest))
        if owner is not None and owner.host != host:
            raise exception.CertificationError(
                host=host, reason=f"{KEY_KINDS[kind]} already enrolled for host {owner.host}")

    def key_owner(self, kind: str, key: bytes) -> str | None:
        """The host name ``key`` (of ``KEY_KINDS``) was first enrolled
        under, revoked or not, or None."""
        with self.session() as s:
            row = s.get(models.EnrolledKey, (kind, key_digest(key)))
            return None if row is None else row.host
