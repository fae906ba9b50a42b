"""The engine's attestation service: enrollment, approval, periodic quotes, verdicts.

Why a separate layer: ``verifier`` decides from bytes, ``db`` stores; this
module owns the protocol around them (nonce lifetime and single use, which AK
to trust, when a clock baseline may move, what is audited) and turns every
failure of a host or its agent into a recorded UNTRUSTED/UNKNOWN verdict, so
the periodic task and the migration gate never see an exception from a bad
host, only a verdict with a reason.

A quote may take as long as the RPC timeout, and a host may hold its reply
on purpose. So each verdict carries the basis it was decided on (host and
policy revisions, read before the challenge) and is stored only if that
basis still holds when it lands (``Database.record_attestation``): a
revocation or a policy change made meanwhile wins, and the dropped verdict
is audited.
"""

from __future__ import annotations

import dataclasses
import datetime
import hmac
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

from cryptography import x509
from oslo_log import log as logging
from tpm2_pytss.types import TPM2B_NAME, TPM2B_PUBLIC, TPMT_PUBLIC
from tpm2_pytss.utils import make_credential

from vtpcm_common import authn, exception, spans
from vtpcm_nova.engine import ekcert, kembinding, parentcert, verifier
from vtpcm_nova.engine.db.api import (
    KEY_KINDS,
    NONCE_BYTES,
    Database,
    HostRecord,
    PolicyRecord,
    TrustBasis,
    VerdictRecord,
)
from vtpcm_nova.engine.db.models import HostStatus
from vtpcm_nova.engine.verifier import TrustStatus

LOG = logging.getLogger(__name__)

PURPOSE_ENROLL = "enroll"
PURPOSE_QUOTE = "quote"
PURPOSE_POLICY = "policy"
_MAX_REASON = 500


# Key the engine's agent client adds to an identity (never from the wire):
# True when get_identity was asked with the parents' certifications (agent
# API 1.10, engine not capped below), so that an answer without them is
# refused whatever [attestation] require_certified_parents says: the reply
# is unsigned and a broker client could strip them (akparents review, 2).
PARENTS_ASKED = "parents_asked"


class AgentClient(Protocol):
    """What the engine needs from a host's agent (an RPC client in production)."""

    def get_identity(self, host: str, nonce: bytes) -> Mapping[str, Any]: ...

    def quote(self, host: str, nonce: bytes, pcrs: Sequence[int],
              bank: str) -> Mapping[str, Any]: ...

    def activate_credential(self, host: str, credential_blob: bytes,
                            encrypted_secret: bytes) -> bytes: ...


class Attestor:
    """Attestation logic over one database and an injected agent client factory.

    ``agent_client_factory()`` is called for each operation that talks to an
    agent, so it may return a shared client or a fresh one.
    """

    def __init__(self, db: Database, agent_client_factory: Callable[[], AgentClient], *,
                 verdict_ttl: float, nonce_ttl: float,
                 reboot_policy: verifier.RebootPolicy = "reapprove",
                 ek_cas: Sequence[x509.Certificate] = (),
                 require_kem_pcr_binding: bool = False,
                 require_certified_parents: bool = False,
                 clock: Callable[[], float] = time.time) -> None:
        """``ek_cas``: trusted EK CA certificates; when given, enrollment
        checks the EK certificate and activates a credential (``ekcert``).
        ``require_kem_pcr_binding``: a host whose KEM key is not PCR-bound
        is UNTRUSTED (else it is accepted, with a warning: ``kembinding``).
        ``require_certified_parents``: refuse to enroll a host whose
        identity, asked below agent API 1.10 (an engine capped by
        ``[upgrade_levels] vtpcm_agent``), has no certification of its
        storage parents (else enrolled with a warning: ``parentcert``); an
        identity asked as 1.10 without them is refused whatever this says."""
        if verdict_ttl <= 0 or nonce_ttl <= 0:
            raise exception.InvalidInput(reason="verdict_ttl and nonce_ttl must be positive")
        if reboot_policy not in ("reapprove", "accept"):
            raise exception.InvalidInput(reason=f"unknown reboot policy {reboot_policy!r}")
        self.db = db
        self._agents = agent_client_factory
        self.verdict_ttl = datetime.timedelta(seconds=verdict_ttl)
        self.nonce_ttl = datetime.timedelta(seconds=nonce_ttl)
        self.reboot_policy: verifier.RebootPolicy = reboot_policy
        self._clock = clock
        self.ek_cas = tuple(ek_cas)
        self._aks: dict[bytes, verifier.AttestationKey] = {}
        self.require_kem_pcr_binding = require_kem_pcr_binding
        self.require_certified_parents = require_certified_parents

    def _now(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self._clock(), datetime.UTC)

    def _ak(self, host: HostRecord) -> verifier.AttestationKey:
        ak = self._aks.get(host.ak_public)
        if ak is None:
            ak = verifier.load_ak(host.ak_public, host=host.name)
            self._aks[host.ak_public] = ak
        return ak

    def _new_nonce(self, host: str, purpose: str) -> bytes:
        now = self._now()
        return self.db.create_nonce(host, purpose, now + self.nonce_ttl, now=now)

    # ---- enrollment -------------------------------------------------------------

    def enrollment_nonce(self, host: str) -> bytes:
        return self._new_nonce(host, PURPOSE_ENROLL)

    def enroll(self, host: str, identity: Mapping[str, Any], nonce: bytes,
               auto_approve: bool = False) -> HostRecord:
        """Enroll a host from its identity, certified with our enrollment nonce."""
        try:
            return self._enroll(host, identity, nonce, auto_approve)
        except exception.VTPCMException as err:
            self.db.audit("enroll", "refused", host=host, detail=_short(str(err)),
                          now=self._now())
            LOG.warning("Enrollment of host %(host)s refused: %(reason)s",
                        {"host": host, "reason": err})
            raise

    def _enroll(self, host: str, identity: Mapping[str, Any], nonce: bytes,
                auto_approve: bool) -> HostRecord:
        fields = _identity_fields(host, identity)
        # one try per nonce, whatever the outcome: a failed attempt cannot be retried
        if not self.db.consume_nonce(host, nonce, PURPOSE_ENROLL, now=self._now()):
            raise exception.CertificationError(
                host=host, reason="enrollment nonce is unknown, expired or already used")
        ak = verifier.load_ak(fields["ak_public"], host=host)
        kem_public = fields["kem_public"]
        # The certify's qualifying data binds our nonce to the host's command
        # key and this host name: the AK vouches for the key the host's Nova
        # driver signs with, for this name only (no relayed identity).
        command_public = fields["command_public"]
        verifier.verify_certification(ak, kem_public, fields["kem_certify_attest"],
                                      fields["kem_certify_signature"],
                                      authn.host_key_binding(nonce, command_public, host),
                                      host=host,
                                      nonce_mismatch="certify does not bind this enrollment's "
                                                     "nonce and host name to the reported host "
                                                     "command key (agents before API 1.6 bind "
                                                     "no host name: upgrade the agent)")
        parents, parents_detail = self._check_parents(
            host, identity, ak, authn.host_key_binding(nonce, command_public, host))
        kem_name = verifier.tpm_name(kem_public)
        for claimed, actual, what in ((identity.get("ak_name"), ak.name, "AK"),
                                      (identity.get("kem_name"), kem_name, "KEM key")):
            if claimed is not None and claimed != actual:
                raise exception.CertificationError(
                    host=host, reason=f"reported {what} name does not match its public area")
        # one TPM, one host name for good (enroll_host checks again, atomically)
        self._refuse_taken_key(host, "ak", ak.name)
        self._refuse_taken_key(host, "command", command_public)
        ek_detail, proven_ek = "EK not checked ([attestation] ek_ca_file unset)", None
        if self.ek_cas:
            ek_detail = self._prove_ak_in_certified_tpm(host, fields, ak)
            proven_ek = fields["ek_public"]
        # read before enroll_host stores the new names; said only once
        # every check passed (a refused attempt changes nothing)
        changed = self._parents_change(host, parents)
        record = self.db.enroll_host(
            host, ak_public=ak.public, ak_name=ak.name, kem_public=kem_public,
            kem_name=kem_name, ek_certificate=fields.get("ek_certificate"),
            command_public=command_public, ek_public=proven_ek,
            approved=auto_approve, now=self._now(), parent_names=parents)
        if changed:
            LOG.warning("Host %(host)s re-enrolled with other certified storage parents than "
                        "at its last certified enrollment (%(changed)s): that hierarchy's "
                        "seed changed (TPM cleared or replaced); check that this was intended",
                        {"host": host, "changed": changed})
            parents_detail += (f"; certified storage parents changed since the last certified "
                               f"enrollment ({changed}): hierarchy seed changed (TPM cleared "
                               "or replaced)")
        elif parents is None and record.kem_parent_name is not None:
            parents_detail += "; the names certified at an earlier enrollment are kept"
        self.db.audit("enroll", record.status.value, host=host,
                      detail=f"AK {ak.name.hex()[:16]}... certified KEM key; "
                             f"{parents_detail}; {ek_detail}",
                      now=self._now())
        LOG.info("Host %(host)s enrolled (%(status)s)",
                 {"host": host, "status": record.status.value})
        return record

    def _check_parents(self, host: str, identity: Mapping[str, Any],
                       ak: verifier.AttestationKey, qualifying: bytes,
                       ) -> tuple[tuple[bytes, bytes] | None, str]:
        """The AK's certification of the agent's pinned storage parents
        (``parentcert``; issue 9: without it an interposer present at the
        agent's first start stays pinned): the certified names (the AK's
        parent's, the KEM key's) or None, and the audit detail."""
        certs = identity.get("parent_certs")
        if not certs:
            if identity.get(PARENTS_ASKED) is True:
                raise exception.CertificationError(host=host, reason=(
                    "storage parents not certified by the AK: the identity was asked as "
                    "agent API 1.10, with the certifications, and came back without them "
                    "(the reply is not signed by the host: something between engine and "
                    "agent removed them, or the agent is faulty); refused whatever "
                    "[attestation] require_certified_parents says"))
            if self.require_certified_parents:
                raise exception.CertificationError(host=host, reason=(
                    "storage parents not certified by the AK: the identity was asked "
                    "below agent API 1.10 ([upgrade_levels] vtpcm_agent caps this engine) "
                    "and [attestation] require_certified_parents is on: lift the cap once "
                    "every agent is upgraded"))
            LOG.warning("Host %(host)s enrolled without a certification of its storage "
                        "parents (identity asked below agent API 1.10: [upgrade_levels] "
                        "vtpcm_agent caps this engine): an interposer on its TPM interface "
                        "at the agent's first start would not be seen; lift the cap once "
                        "every agent is upgraded", {"host": host})
            return None, "storage parents not certified (asked below agent API 1.10)"
        if not isinstance(certs, list | tuple):
            raise exception.CertificationError(
                host=host, reason="identity field parent_certs is not a list")
        certified = {c.hierarchy: c.name
                     for c in parentcert.verify(ak, certs, qualifying, host=host)}
        return (certified["endorsement"], certified["owner"]), (
            "storage parents certified: " + ", ".join(
                f"{h} {certified[h].hex()[:16]}..." for h in parentcert.HIERARCHIES))

    def _parents_change(self, host: str, parents: tuple[bytes, bytes] | None) -> str:
        """Which certified parents of a re-enrollment differ from those
        stored at the host's last certified enrollment ("" if none or
        nothing to compare): a storage primary's name changes only with its
        hierarchy's seed (TPM cleared or replaced), so the operator sees it
        in the audit and the log."""
        try:
            previous = self.db.get_host(host)
        except exception.NotFound:
            return ""
        if (parents is None or previous.ak_parent_name is None
                or previous.kem_parent_name is None):
            return ""
        before = (previous.ak_parent_name, previous.kem_parent_name)
        if before == parents:
            return ""
        return ", ".join(
            f"{which} {old.hex()[:16]}... -> {new.hex()[:16]}..."
            for which, old, new in zip(parentcert.HIERARCHIES, before, parents, strict=True)
            if old != new)

    def _prove_ak_in_certified_tpm(self, host: str, fields: Mapping[str, Any],
                                   ak: verifier.AttestationKey) -> str:
        """EK certificate from a trusted CA for the reported EK, then
        TPM2_MakeCredential to that EK naming the AK: only the TPM holding
        both can return the secret. Sound because ``verifier.load_ak``
        requires fixedTPM: a key whose private part was ever outside a TPM
        cannot carry it (so has another name), and an object loaded with
        only its public part cannot be authorized for ActivateCredential."""
        cert_der, ek_public = fields.get("ek_certificate"), fields.get("ek_public")
        if not cert_der or not ek_public:
            raise exception.CertificationError(
                host=host, reason="no EK certificate (required by [attestation] ek_ca_file)")
        cert = ekcert.verify(cert_der, ek_public, self.ek_cas, host=host, now=self._now())
        # one TPM, one host: a second name would be a second AK
        self._refuse_taken_key(host, "ek-cert", cert_der)
        self._refuse_taken_key(host, "ek", ek_public)
        secret = secrets.token_bytes(32)
        try:
            ek = TPMT_PUBLIC.unmarshal(ek_public)[0]
            blob, encrypted = make_credential(TPM2B_PUBLIC(publicArea=ek), secret,
                                              TPM2B_NAME(ak.name))
        except Exception as err:  # parameters tpm2-pytss cannot encrypt to
            raise exception.CertificationError(
                host=host, reason="cannot make a credential for the reported EK (%s)"
                                  % type(err).__name__) from None
        try:
            answer = self._agents().activate_credential(host, bytes(blob.marshal()),
                                                        bytes(encrypted.marshal()))
        except exception.VTPCMException as err:
            raise exception.CertificationError(
                host=host, reason="credential activation failed: %s" % _short(str(err), 300)) \
                from None
        if not hmac.compare_digest(answer, secret):
            raise exception.CertificationError(
                host=host, reason="credential activation returned a wrong secret")
        return "EK certificate %s from %s verified, AK activated" % (
            ekcert.fingerprint(cert), ekcert.printable(cert.issuer.rfc4514_string()))

    def _refuse_taken_key(self, host: str, kind: str, key: bytes) -> None:
        """Refuse a key ever enrolled under another host name, revoked or
        not: a revoked host must not come back under a new name."""
        owner = self.db.key_owner(kind, key)
        if owner is not None and owner != host:
            raise exception.CertificationError(
                host=host, reason=f"{KEY_KINDS[kind]} already enrolled for host {owner}")

    def enroll_from_agent(self, host: str, auto_approve: bool = False) -> HostRecord:
        """Convenience: fresh nonce, ask the agent for its identity, enroll."""
        nonce = self.enrollment_nonce(host)
        identity = self._agents().get_identity(host, nonce)
        return self.enroll(host, identity, nonce, auto_approve)

    def approve(self, host: str) -> HostRecord:
        """Admin vouches for the host's current boot: the clock baseline restarts."""
        record = self.db.approve_host(host, now=self._now())
        self.db.audit("approve", "APPROVED", host=host, now=self._now())
        LOG.info("Host %(host)s approved", {"host": host})
        return record

    def revoke(self, host: str) -> HostRecord:
        """REVOKED and UNTRUSTED at once; attestations in flight cannot undo it."""
        now = self._now()
        record = self.db.revoke_host(host, now=now, expires_at=now + self.verdict_ttl)
        self.db.audit("verdict", TrustStatus.UNTRUSTED.value, host=host, detail="host revoked",
                      now=now)
        self.db.audit("revoke", "REVOKED", host=host, now=now)
        LOG.info("Host %(host)s revoked", {"host": host})
        return record

    # ---- attestation ------------------------------------------------------------

    def attest(self, host: str) -> VerdictRecord:
        """Quote the host now and record the verdict; raises only NotFound.

        Returns the verdict that stands afterwards: ours, or the one that
        superseded it while the quote was under way.

        Two database transactions: ``open_challenge`` reads what the
        verdict is decided on; ``conclude_attestation`` records the nonce
        as used, the verdict, the clock and the audit, whatever the outcome.
        The nonce lives in this call until then: only this call sends it and
        checks the one reply to it, so it is single-use and bound to host
        and challenge by construction; its expiry is checked and its record
        (unique) written with the verdict. The clock baseline judged against
        is the challenge's; a verdict stored meanwhile may have moved it
        (one of an earlier challenge does, without making ours stale), so
        the verdict's transaction compares it under lock and, if it moved,
        judges ours again against the stored one (a reboot or TPM Restart
        between the two quotes is seen as one) or drops ours if its quote
        is the older."""
        now = self._now()
        with spans.span("attest:challenge"):
            challenge = self.db.open_challenge(host)
        record, policy = challenge.host, challenge.policy
        basis = TrustBasis(host, record.revision, record.policy_name, None, now)
        if record.status is not HostStatus.APPROVED:
            reason = f"host is {record.status.value}"
            if record.status is HostStatus.PENDING:
                reason += " (approval required)"
            return self._store(basis, TrustStatus.UNTRUSTED, reason)
        if policy is None:
            return self._store(basis, TrustStatus.UNTRUSTED, "no PCR policy assigned")
        nonce = secrets.token_bytes(NONCE_BYTES)
        used = (nonce, PURPOSE_QUOTE, now + self.nonce_ttl)
        basis = dataclasses.replace(basis, policy_revision=policy.revision)
        try:
            reply = self._ask_quote(record, nonce, policy.bank, sorted(policy.pcrs))
        except _AgentFailure as err:  # its nonce, unused, expires
            return self._store(basis, TrustStatus.UNKNOWN, str(err))
        try:
            with spans.span("attest:verify"):
                evidence, kem = self._check_quote(record, nonce, policy.bank, reply)
        except exception.AttestationError as err:
            return self._store(basis, TrustStatus.UNTRUSTED, str(err), nonce=used)
        def judge(baseline: verifier.ClockState | None) -> tuple[TrustStatus, str, bool]:
            return self._judge(record, policy, evidence, kem, baseline)

        with spans.span("attest:evaluate"):
            status, reason, reapprove = judge(challenge.clock)
        return self._store(basis, status, reason, nonce=used,
                           clock=verifier.clock_state(evidence), reapprove=reapprove,
                           baseline=challenge.clock, rejudge=judge,
                           unbound_kem=_unbound_kem(record))

    def _judge(self, record: HostRecord, policy: PolicyRecord,
               evidence: verifier.QuoteEvidence, kem: _KemReport,
               baseline: verifier.ClockState | None) -> tuple[TrustStatus, str, bool]:
        """The verdict on verified evidence against clock ``baseline``:
        (status, reason, whether the host goes back to PENDING). Pure: the
        verdict's transaction calls it again, under lock, if the stored
        baseline moved since the challenge."""
        verdict = verifier.evaluate(evidence, policy.spec(), baseline,
                                    reboot_policy=self.reboot_policy)
        reapprove = (verdict.rebooted and not verdict.trusted
                     and self.reboot_policy == "reapprove")
        status, reason = verdict.status, verdict.reason
        if verdict.trusted:
            problem = self._kem_problem(record, policy, kem)
            if problem is not None:
                status, reason = TrustStatus.UNTRUSTED, problem
        return status, _short(reason), reapprove

    def _kem_problem(self, record: HostRecord, policy: PolicyRecord,
                     kem: _KemReport) -> str | None:
        """Why the host's enrolled KEM key must not receive migration keys
        although its quote matched: the agent reports it stale, or its
        certified PolicyPCR binding is not the policy's golden values
        (``kembinding.check``); None if it may. Sources seal only to hosts
        with a fresh TRUSTED verdict, so this keeps them from sealing to a
        stale or wrongly bound KEM key."""
        if kem.current is False:
            return ("KEM key stale: the host reports its enrolled KEM key bound to PCR "
                    "values it no longer has or to another [host_tpm] kem_policy_pcrs; "
                    "re-enroll the host (its signed enrollment gives it a new KEM key)")
        try:
            kembinding.check(record.kem_public, policy.bank, policy.pcrs, kem.pcrs,
                             require_binding=self.require_kem_pcr_binding,
                             policy_name=policy.name)
        except kembinding.KemBindingError as err:
            return f"KEM key: {err.reason}"
        # accepted; an unbound one is audited with the verdict (_store)
        return None

    def attest_all(self) -> dict[str, VerdictRecord]:
        """Attest every APPROVED host (the periodic task)."""
        out: dict[str, VerdictRecord] = {}
        for record in self.db.list_hosts(HostStatus.APPROVED):
            try:
                out[record.name] = self.attest(record.name)
            except exception.NotFound:
                continue  # deleted meanwhile
        return out

    def recent(self, host: str, max_age: float) -> VerdictRecord | None:
        """The verdict in force if it is fresh and decided less than
        ``max_age`` seconds ago, else None: what an unsigned ``attest`` gets
        instead of a new quote, so unsigned triggers cannot make the engine
        quote a host (a vouched call its agent does not limit) at their rate.
        ``max_age`` <= 0 (no reuse): None without reading the database."""
        if max_age <= 0:
            return None
        current = self.db.get_verdict(host)
        now = self._now()
        if (current is not None and current.is_fresh(now)
                and now - current.attested_at < datetime.timedelta(seconds=max_age)):
            return current
        return None

    def check_fresh(self, host: str) -> VerdictRecord:
        """A fresh TRUSTED verdict if there is one, else attest now (migration gate)."""
        current = self.db.get_verdict(host)
        if current is not None and current.trusted and current.is_fresh(self._now()):
            return current
        return self.attest(host)

    def record_policy_from_host(self, name: str, host: str, pcrs: Sequence[int],
                                bank: str = "sha256", description: str = "") -> PolicyRecord:
        """Store the PCR values of a verified quote of ``host`` as golden policy ``name``."""
        record = self.db.get_host(host)
        if record.status in (HostStatus.REVOKED, HostStatus.FORGOTTEN):
            raise exception.HostNotTrusted(host=host,
                                           reason="host is %s" % record.status.value)
        wanted = sorted(set(pcrs))
        if not wanted:
            raise exception.InvalidInput(reason="no PCRs requested for the policy")
        try:
            evidence, _kem = self._verified_quote(record, bank, wanted, PURPOSE_POLICY)
        except exception.AttestationError as err:
            self.db.audit("policy", "refused", host=host, detail=_short(str(err)),
                          now=self._now())
            raise
        except _AgentFailure as err:
            self.db.audit("policy", "refused", host=host, detail=_short(str(err)),
                          now=self._now())
            raise exception.AttestationError(host=host, reason=_short(str(err))) from None
        policy = self.db.put_policy(
            name, bank, {i: evidence.pcr_values[i] for i in wanted},
            description or f"recorded from host {host}", now=self._now())
        self.db.audit("policy", "recorded", host=host,
                      detail=f"policy '{name}' PCRs {wanted} ({bank})", now=self._now())
        return policy

    # ---- internals --------------------------------------------------------------

    def _verified_quote(self, record: HostRecord, bank: str, pcrs: list[int],
                        purpose: str) -> tuple[verifier.QuoteEvidence, _KemReport]:
        """The verified quote, and what the agent reported of its KEM key
        (agent API 1.9: an older agent reports nothing); its nonce is used
        before the quote is read (``attest`` uses it with the verdict)."""
        host = record.name
        nonce = self._new_nonce(host, purpose)
        reply = self._ask_quote(record, nonce, bank, pcrs)
        if not self.db.consume_nonce(host, nonce, purpose, now=self._now()):
            raise exception.QuoteVerificationError(
                host=host, reason="quote nonce expired or already used")
        return self._check_quote(record, nonce, bank, reply)

    def _ask_quote(self, record: HostRecord, nonce: bytes, bank: str,
                   pcrs: list[int]) -> Mapping[str, Any]:
        """The agent's reply to a quote of ``pcrs``; any failure of the
        agent or of its RPC is an ``_AgentFailure``."""
        host = record.name
        try:
            return self._agents().quote(host, nonce, pcrs, bank)
        except Exception as err:  # noqa: BLE001 - any agent failure becomes a verdict
            raise _AgentFailure(f"agent of host {host} did not answer the quote: "
                                f"{type(err).__name__}: {_short(str(err), 200)}") from err

    def _check_quote(self, record: HostRecord, nonce: bytes, bank: str,
                     reply: Mapping[str, Any]) -> tuple[verifier.QuoteEvidence, _KemReport]:
        """The reply checked against the enrolled AK and ``nonce`` (bytes
        only, no database): AttestationError if it does not hold."""
        host = record.name
        attest, signature, values = _quote_fields(host, reply)
        evidence = verifier.verify_quote(self._ak(record), attest, signature, nonce, values,
                                         bank, host=host)
        return evidence, _kem_report(host, reply)

    def _store(self, basis: TrustBasis, status: TrustStatus, reason: str, *,
               clock: verifier.ClockState | None = None, reapprove: bool = False,
               nonce: tuple[bytes, str, datetime.datetime] | None = None,
               baseline: verifier.ClockState | None = None,
               rejudge: Callable[[verifier.ClockState], tuple[TrustStatus, str, bool]]
               | None = None, unbound_kem: str | None = None) -> VerdictRecord:
        """Record the verdict unless its basis changed meanwhile, with the
        quote's ``nonce`` (value, purpose, expiry) on record as used and the
        audit in the same transaction (a nonce expired or on record already
        makes it UNTRUSTED instead); the evidence counts from the
        challenge, so the TTL does too. ``unbound_kem``: the name of the
        host's KEM key if it is not PCR-bound; a TRUSTED verdict audits it
        (rate-limited: ``conclude_attestation``) and warns when it does."""
        host, now, reason = basis.host, self._now(), _short(reason)
        try:
            with spans.span("attest:conclude"):
                verdict, changed, kem_audited = self.db.conclude_attestation(
                    basis, status, reason, basis.challenged_at + self.verdict_ttl, now=now,
                    clock=clock, reapprove=reapprove, nonce=nonce, baseline=baseline,
                    rejudge=rejudge, unbound_kem=unbound_kem)
        except exception.StaleAttestation as err:
            return self._discarded(basis, status, err.kwargs["reason"])
        except exception.QuoteVerificationError as err:  # the nonce: nothing stored
            return self._store(basis, TrustStatus.UNTRUSTED, str(err))
        if verdict.trusted:  # ours, maybe judged again (see conclude_attestation)
            if changed:
                LOG.info("Host %(host)s is TRUSTED", {"host": host})
            if kem_audited:
                LOG.warning("Host %(host)s: its KEM key %(kem)s is not bound to PCRs "
                            "([host_tpm] kem_policy_pcrs empty): accepted because "
                            "[attestation] require_kem_pcr_binding is off (audited)",
                            {"host": host, "kem": unbound_kem})
        else:
            LOG.warning("Host %(host)s is %(status)s: %(reason)s",
                        {"host": host, "status": verdict.status.value,
                         "reason": verdict.reason})
        return verdict

    def _discarded(self, basis: TrustBasis, status: TrustStatus, why: str) -> VerdictRecord:
        """Audit a verdict that lost to a change made while it was under
        way, and return the verdict that stands. (Its nonce dies with the
        call that kept it.)"""
        now = self._now()
        self.db.audit("verdict", "discarded", host=basis.host,
                      detail=f"{status.value} verdict not recorded: {why}", now=now)
        LOG.warning("Attestation of host %(host)s discarded (%(status)s): %(why)s",
                    {"host": basis.host, "status": status.value, "why": why})
        current = self.db.get_verdict(basis.host)
        if current is not None:
            return current
        return VerdictRecord(basis.host, TrustStatus.UNKNOWN,
                             f"attestation superseded ({why}); attest again", now, now)


class _KemReport(NamedTuple):
    """The agent's word on its KEM key (agent API 1.9; None: not reported):
    the PCRs it bound the key to, and whether they still hold those values."""

    pcrs: tuple[int, ...] | None
    current: bool | None


def _kem_report(host: str, reply: Mapping[str, Any]) -> _KemReport:
    err = exception.QuoteVerificationError
    pcrs, current = reply.get("kem_pcrs"), reply.get("kem_current")
    if current is not None and not isinstance(current, bool):
        raise err(host=host, reason="quote reply field kem_current is not a boolean")
    if pcrs is not None:
        if not isinstance(pcrs, list | tuple) or not all(
                type(i) is int and 0 <= i <= 23 for i in pcrs):
            raise err(host=host, reason="quote reply field kem_pcrs is not a list of PCRs")
        pcrs = tuple(pcrs)
    return _KemReport(pcrs, current)


def _unbound_kem(record: HostRecord) -> str | None:
    """The name (hex) of the host's enrolled KEM key if it is not PCR-bound
    (an empty authPolicy), else None. Only accepted as such while
    ``require_kem_pcr_binding`` is off (``kembinding.check``)."""
    if not record.kem_public or not kembinding.unbound(record.kem_public):
        return None
    return record.kem_name.hex()


class _AgentFailure(Exception):
    """Internal: the agent raised or timed out (verdict UNKNOWN, not UNTRUSTED)."""


def _short(text: str, limit: int = _MAX_REASON) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _identity_fields(host: str, identity: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(identity, Mapping):
        raise exception.CertificationError(host=host, reason="identity must be a mapping")
    out: dict[str, Any] = {}
    for name in ("ak_public", "kem_public", "kem_certify_attest", "kem_certify_signature"):
        value = identity.get(name)
        if not isinstance(value, bytes) or not value:
            raise exception.CertificationError(
                host=host, reason=f"identity field {name} is missing or not bytes")
        out[name] = value
    command_public = identity.get("command_public")
    if not isinstance(command_public, bytes):
        raise exception.CertificationError(
            host=host, reason="identity has no host command key (agent API older than 1.4)")
    try:
        authn.load_public_raw(command_public, what="identity field command_public")
    except exception.InvalidInput as err:
        raise exception.CertificationError(host=host, reason=err.kwargs["reason"]) from None
    out["command_public"] = command_public
    ek_public = identity.get("ek_public")
    if ek_public is not None and not isinstance(ek_public, bytes):
        raise exception.CertificationError(host=host,
                                           reason="identity field ek_public is not bytes")
    out["ek_public"] = ek_public
    ek = identity.get("ek_certificate")
    if ek is not None and not isinstance(ek, bytes):
        raise exception.CertificationError(host=host,
                                           reason="identity field ek_certificate is not bytes")
    out["ek_certificate"] = ek
    return out


def _quote_fields(host: str, reply: Mapping[str, Any]) -> tuple[bytes, bytes, dict[int, bytes]]:
    err = exception.QuoteVerificationError
    if not isinstance(reply, Mapping):
        raise err(host=host, reason="quote reply must be a mapping")
    attest, signature = reply.get("attest"), reply.get("signature")
    raw = reply.get("pcr_values")
    if not isinstance(attest, bytes) or not isinstance(signature, bytes):
        raise err(host=host, reason="quote reply lacks attest/signature bytes")
    if not isinstance(raw, Mapping):
        raise err(host=host, reason="quote reply lacks pcr_values")
    values: dict[int, bytes] = {}
    for key, value in raw.items():
        # JSON transports turn int keys into strings
        if isinstance(key, str) and key.isdigit() and len(key) <= 2:
            key = int(key)
        values[key] = value
    return attest, signature, values
