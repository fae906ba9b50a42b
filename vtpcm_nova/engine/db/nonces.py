"""Single-use nonces: attestation challenges and signed admin commands.

Why each is one statement: the conditional UPDATE (or the primary key)
decides which one caller gets a nonce, across engine processes too.
"""

from __future__ import annotations

import datetime
import secrets

from sqlalchemy import delete, insert, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from vtpcm_nova.engine.db import models
from vtpcm_nova.engine.db.store import Store, utcnow

NONCE_BYTES = 32


def add_used_nonce(s: Session, host: str, nonce: bytes, purpose: str,
                   expires_at: datetime.datetime, now: datetime.datetime) -> bool:
    """Record a nonce the caller kept in memory as used, in the caller's
    transaction; False if it expired (the transaction stays usable). A
    nonce on record already fails the insert (unique column): the caller
    treats that as used."""
    if not isinstance(nonce, bytes) or len(nonce) != NONCE_BYTES or expires_at <= now:
        return False
    # in Core on the session's connection (the verdict's hot path)
    s.connection().execute(insert(models.Nonce).values(
        host=host, nonce=nonce.hex(), purpose=purpose, created_at=now,
        expires_at=expires_at, used=True))
    return True


def use_nonce(s: Session, host: str, nonce: bytes, purpose: str,
              now: datetime.datetime) -> bool:
    """Mark the nonce used in the caller's transaction (``consume_nonce``):
    one conditional UPDATE, True only for the one caller that found it unused."""
    if not isinstance(nonce, bytes) or len(nonce) != NONCE_BYTES:
        return False
    q = (update(models.Nonce)
         .where(models.Nonce.nonce == nonce.hex(), models.Nonce.host == host,
                models.Nonce.purpose == purpose, models.Nonce.used.is_(False),
                models.Nonce.expires_at > now)
         .values(used=True))
    return s.execute(q).rowcount == 1  # type: ignore[attr-defined,no-any-return]


class NonceStore(Store):
    """Challenge and command nonces."""

    def create_nonce(self, host: str, purpose: str, expires_at: datetime.datetime,
                     now: datetime.datetime | None = None) -> bytes:
        """A fresh random nonce bound to host and purpose, usable once before expiry."""
        nonce = secrets.token_bytes(NONCE_BYTES)
        with self.session() as s:
            s.add(models.Nonce(host=host, nonce=nonce.hex(), purpose=purpose,
                               created_at=now or utcnow(), expires_at=expires_at,
                               used=False))
        return nonce

    def consume_nonce(self, host: str, nonce: bytes, purpose: str,
                      now: datetime.datetime | None = None) -> bool:
        """Mark the nonce used; True only for the one caller that found it unused."""
        with self.session() as s:
            return use_nonce(s, host, nonce, purpose, now or utcnow())

    def purge_nonces(self, now: datetime.datetime | None = None) -> int:
        """Drop expired challenge nonces and forgettable command nonces."""
        now = now or utcnow()
        challenges = delete(models.Nonce).where(models.Nonce.expires_at <= now)
        commands = delete(models.CommandNonce).where(
            models.CommandNonce.keep_until < now.timestamp())
        with self.session() as s:
            return int(s.execute(challenges).rowcount  # type: ignore[attr-defined]
                       + s.execute(commands).rowcount)  # type: ignore[attr-defined]

    def claim_nonce(self, nonce: str, keep_until: float, now: float) -> bool:
        """Record a signed admin command's nonce; False if any worker saw it.

        The primary key makes the claim atomic across engine processes;
        ``now`` is unused because expired rows go in ``purge_nonces``."""
        del now
        try:
            with self.session() as s:
                s.add(models.CommandNonce(nonce=nonce, keep_until=keep_until))
        except IntegrityError:
            return False
        return True
