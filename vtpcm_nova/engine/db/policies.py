"""Golden PCR policies.

Why a policy change touches verdicts: a verdict holds only for the policy
revision it was decided against, so replacing a policy expires its
hosts' verdicts in the same transaction.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping

from sqlalchemy import select

from vtpcm_common import exception
from vtpcm_nova.engine import verifier
from vtpcm_nova.engine.db import models
from vtpcm_nova.engine.db.records import PolicyRecord, policy_rec
from vtpcm_nova.engine.db.store import utcnow
from vtpcm_nova.engine.db.trust import TrustStore


class PolicyStore(TrustStore):
    """Create, replace and read golden policies."""

    def put_policy(self, name: str, bank: str, pcrs: Mapping[int, bytes],
                   description: str = "", now: datetime.datetime | None = None
                   ) -> PolicyRecord:
        """Create or replace a golden policy after checking its shape."""
        if not name or len(name) > 255:
            raise exception.InvalidInput(reason="policy name must be 1-255 characters")
        if bank not in verifier.BANKS:
            raise exception.InvalidInput(reason=f"unsupported PCR bank {bank!r}")
        size = verifier.BANKS[bank][1]
        if not pcrs:
            raise exception.InvalidInput(reason=f"policy {name!r} has no PCRs")
        for index, value in pcrs.items():
            if isinstance(index, bool) or not isinstance(index, int) or \
                    not 0 <= index <= verifier.MAX_PCR:
                raise exception.InvalidInput(reason=f"policy PCR index {index!r} is invalid")
            if not isinstance(value, bytes) or len(value) != size:
                raise exception.InvalidInput(
                    reason=f"policy PCR {index} must be {size} bytes for bank {bank}")
        stored = {str(i): pcrs[i].hex() for i in sorted(pcrs)}
        now = now or utcnow()
        with self.session() as s:
            row = s.scalar(select(models.Policy).where(models.Policy.name == name)
                           .with_for_update())
            if row is None:
                row = models.Policy(name=name, revision=0)
                s.add(row)
            else:
                row.revision = models.Policy.revision + 1  # type: ignore[assignment]
            row.bank, row.pcrs, row.description = bank, stored, description
            row.created_at = now
            s.flush()
            users = select(models.Host.name).where(models.Host.policy_name == name)
            self._expire_verdicts(s, models.VerdictRow.host.in_(users),
                                  f"policy {name} changed", now)
            return policy_rec(row)

    def get_policy(self, name: str) -> PolicyRecord:
        with self.session() as s:
            row = s.scalar(select(models.Policy).where(models.Policy.name == name))
            if row is None:
                raise exception.NotFound(what="policy", key=name)
            return policy_rec(row)

    def list_policies(self) -> list[PolicyRecord]:
        with self.session() as s:
            return [policy_rec(r) for r in
                    s.scalars(select(models.Policy).order_by(models.Policy.name))]
