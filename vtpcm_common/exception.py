"""One exception hierarchy for the whole project.

Subclasses only set ``msg_fmt``; callers pass the named values. Messages
name *what* was wrong (an instance uuid, a field, a state) and never carry
key material or TPM state: the format strings are fixed here, so a secret can
only leak if someone passes one as a keyword, and the reviewers look for that.
"""

from typing import Any


class VTPCMException(Exception):
    """Base class; ``code`` lets RPC callers and the CLI map errors."""

    msg_fmt = "An unknown vTPCM error occurred."
    code = "error"
    # Set on a refusal decided before a method ran (malformed request, bad
    # signature, replay, age): anyone on the broker can cause those at will,
    # so ``rpc.log_refusal`` keeps them quiet. Never sent over the wire.
    at_verification = False

    def __init__(self, message: str | None = None, **kwargs: Any) -> None:
        self.kwargs = kwargs
        if message is None:
            try:
                message = self.msg_fmt % kwargs
            except (KeyError, TypeError, ValueError):
                message = self.msg_fmt
        self.message = message
        super().__init__(message)

    def __str__(self) -> str:
        return self.message


class InvalidInput(VTPCMException):
    msg_fmt = "Invalid input: %(reason)s"
    code = "invalid_input"


class InvalidPayload(InvalidInput):
    msg_fmt = "Invalid %(message_type)s payload: field %(field)s: %(reason)s"
    code = "invalid_payload"


class NotFound(VTPCMException):
    msg_fmt = "%(what)s %(key)s not found"
    code = "not_found"


class AlreadyExists(VTPCMException):
    msg_fmt = "%(what)s %(key)s already exists"
    code = "already_exists"


class InvalidTransition(VTPCMException):
    msg_fmt = ("Illegal transition of %(what)s %(key)s from %(current)s "
               "to %(target)s")
    code = "invalid_transition"


class SwtpmError(VTPCMException):
    msg_fmt = "swtpm error for vTPCM %(vtpcm_id)s: %(reason)s"
    code = "swtpm_error"


class CtrlChannelError(VTPCMException):
    msg_fmt = "swtpm control channel %(command)s failed: %(reason)s"
    code = "ctrl_channel_error"


class StateImportError(VTPCMException):
    msg_fmt = "Importing state into vTPCM %(vtpcm_id)s failed: %(reason)s"
    code = "state_import_error"


class StateFileError(VTPCMException):
    """An at-rest swtpm state file (e.g. tpm2-00.permall) read without swtpm
    failed a check: format, authentication or padding. Never names bytes."""

    msg_fmt = "swtpm state file %(name)s rejected: %(reason)s"
    code = "state_file_error"


class KeyStoreError(VTPCMException):
    msg_fmt = "Key store error: %(reason)s"
    code = "keystore_error"


class HostTPMError(VTPCMException):
    msg_fmt = "Host TPM error: %(reason)s"
    code = "host_tpm_error"


class SealError(VTPCMException):
    msg_fmt = "Sealed key envelope rejected: %(reason)s"
    code = "seal_error"


class InvalidKemKey(VTPCMException):
    """A KEM key public area fails ``vtpcm_common.tpmpublic.kem_public_key``;
    enrollment and sealing re-raise it as their own error, same reason."""

    msg_fmt = "KEM key rejected: %(reason)s"
    code = "invalid_kem_key"


class AttestationError(VTPCMException):
    msg_fmt = "Attestation of host %(host)s failed: %(reason)s"
    code = "attestation_error"


class HostNotTrusted(VTPCMException):
    msg_fmt = "Host %(host)s is not trusted: %(reason)s"
    code = "host_not_trusted"


class MigrationError(VTPCMException):
    msg_fmt = "vTPCM migration %(migration_id)s failed: %(reason)s"
    code = "migration_error"


class ImportedStateMismatch(MigrationError):
    """The post-import check: the permanent state the destination's swtpm
    first wrote after the import is not the source's (a replayed or forged
    stream). Not retried: the migration waits for an operator."""

    msg_fmt = ("vTPCM migration %(migration_id)s: the destination's imported state is not "
               "the source's: %(reason)s")
    code = "imported_state_mismatch"


class ImportedStateUnverified(MigrationError):
    """The post-import check could not be made (the destination cannot tell
    what it imported, or its agent is too old). Not retried."""

    msg_fmt = ("vTPCM migration %(migration_id)s: the destination's imported state cannot "
               "be checked: %(reason)s")
    code = "imported_state_unverified"


class DestinationInUse(MigrationError):
    """The destination refused to destroy an incoming vTPCM that received
    its state: the guest may run on it (the engine's deadline abort)."""

    msg_fmt = "vTPCM migration %(migration_id)s: the destination keeps its vTPCM: %(reason)s"
    code = "destination_in_use"


class VTPCMBusy(VTPCMException):
    """Another operation holds the vTPCM's record; retrying later may work."""

    msg_fmt = "vTPCM of instance %(instance_uuid)s is busy: %(reason)s"
    code = "busy"


class GenerationMismatch(VTPCMException):
    msg_fmt = ("vTPCM of instance %(instance_uuid)s: generation %(given)s "
               "refused, authoritative generation is %(expected)s")
    code = "generation_mismatch"


class VTPCMNotHere(VTPCMException):
    msg_fmt = ("vTPCM of instance %(instance_uuid)s lives on %(holder)s, not on "
               "%(host)s: %(reason)s")
    code = "not_here"


class UnsupportedOperation(VTPCMException):
    """A Nova operation this project refuses for vTPCM instances (documented)."""

    msg_fmt = "%(operation)s is not supported for vTPCM instance %(instance_uuid)s: %(reason)s"
    code = "unsupported"


class NewerSchema(VTPCMException):
    """A node-local store written by a newer release: refused unchanged."""

    msg_fmt = ("%(what)s has schema version %(found)s, this release knows up to "
               "%(known)s (a newer release wrote it)")
    code = "newer_schema"


class SchemaNotAtHead(VTPCMException):
    """The engine database is not at the schema this code needs: the
    engine refuses to start rather than migrate it on its own."""

    msg_fmt = ("Engine database schema is %(found)s, this engine needs revision "
               "%(head)s: %(action)s")
    code = "schema_not_at_head"


class InvalidAttestationKey(AttestationError):
    msg_fmt = "Attestation key of host %(host)s rejected: %(reason)s"
    code = "invalid_attestation_key"


class CertificationError(AttestationError):
    msg_fmt = "KEM key certification of host %(host)s rejected: %(reason)s"
    code = "certification_error"


class QuoteVerificationError(AttestationError):
    msg_fmt = "Quote from host %(host)s rejected: %(reason)s"
    code = "quote_verification_error"


class StaleAttestation(AttestationError):
    """What an attestation was decided on changed before its verdict was
    stored (revocation, policy change, a newer quote): the verdict is dropped."""

    msg_fmt = "Verdict of host %(host)s not recorded: %(reason)s"
    code = "stale_attestation"


class ServiceUnreachable(VTPCMException):
    msg_fmt = "%(service)s did not answer %(method)s: %(reason)s"
    code = "unreachable"


class ReplyNotAuthenticated(ServiceUnreachable):
    """An answer the caller cannot verify (unsigned, another key, another
    call's, altered): as if the host had not answered, so the outcome of the
    call is unknown and the step is retried, never taken as done."""
    msg_fmt = "Reply of %(host)s to %(method)s not authenticated: %(reason)s"


class RateLimited(VTPCMException):
    """An unsigned call refused at once because too many came lately: the
    caller may retry later; nobody waited for it."""

    msg_fmt = "Too many %(what)s: refused without doing the work, retry in %(retry)s s"
    code = "rate_limited"


class ResolutionRefused(VTPCMException):
    """An operator's resolve or forget that would lose the only good state,
    or that does not apply to what the engine holds."""

    msg_fmt = "Refused to %(action)s: %(reason)s"
    code = "resolution_refused"


class CommandRefused(VTPCMException):
    msg_fmt = "Command %(method)s refused: %(reason)s"
    code = "command_refused"


class CommandReplayed(CommandRefused):
    """A signed command delivered again (its nonce is used). Its first
    delivery may have run, so an agent never signs this refusal: a verifying
    caller takes it as no answer, never as "the command did not run"."""


class CommandStale(CommandReplayed):
    """A signed command refused for its age at verification (expired, issued
    before the service started, issued in the future). Its nonce may have
    been forgotten already, so it may be a delivery of a command that ran;
    or a clock moving on may let it run later. Never signed, as a replay."""


class UnshelveNotAuthorized(CommandRefused):
    """A host asked for a SHELVED vTPCM that Nova is not unshelving onto it
    (or Nova could not be asked): the host's signature alone moves nothing."""

    msg_fmt = "Unshelve of instance %(instance_uuid)s onto %(host)s refused: %(reason)s"
    code = "unshelve_not_authorized"


class RPCVersionCapped(VTPCMException):
    """Refused by the client itself: nothing was sent."""

    msg_fmt = ("Not sent: %(method)s needs %(service)s RPC API %(version)s, but "
               "[upgrade_levels] %(option)s caps this client at %(cap)s (some "
               "%(service)s may still run an older release)")
    code = "version_capped"


class RPCVersionUnsupported(VTPCMException):
    """The server answered that it cannot serve the call's version."""

    msg_fmt = ("%(service)s cannot serve %(method)s (RPC API %(version)s): %(reason)s")
    code = "version_unsupported"
