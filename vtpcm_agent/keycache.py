"""The loaded AK and KEM key and their salted sessions, kept between calls.

Why: re-creating the parent, loading the child and starting a salted
session for every quote or ECDH_ZGen cost ~8-10 ms against ~2 ms for the
command itself (the salt's ECDH inside the TPM is most of it). The first
use builds an entry through ``hostkeys.loaded``'s steps (pinned parent,
TPM2_Load, a session salted to that parent); afterwards the child and the
session are kept as *saved contexts* (TPM2_ContextSave), so they occupy no
object or session slot between calls (libtpms has three of each, shared
with every other user of a TPM without resource manager) and need no
parent: each use is ContextLoad, the command, ContextSave of the session
(continueSession), Flush of the child.

A policy session (the PCR-bound KEM key's ZGen) runs PolicyRestart,
PolicyPCR and PolicyAuthValue again before every use, so the PCRs are
checked at each ZGen as before. (The TPM itself resets a policy session's
digest after a successful authorization with continueSession; the explicit
PolicyRestart also covers a session whose last use failed.)

Any error while an entry is in use drops it (its session's nonces may be
out of step); the caller (``HostTPM``) then retries once with everything
rebuilt. Saved contexts die with a TPM Reset (ContextLoad fails): the same
path rebuilds them. Only handles are cached: never an auth value's use
result, an unsealed secret or Z.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

from tpm2_pytss import ESAPI
from tpm2_pytss.constants import ESYS_TR
from tpm2_pytss.TSS2_Exception import TSS2_Exception
from tpm2_pytss.types import TPM2B_PUBLIC, TPML_PCR_SELECTION, TPMS_CONTEXT

from vtpcm_agent import hostkeys


@dataclass
class _Entry:
    obj: TPMS_CONTEXT
    public: TPM2B_PUBLIC
    session: TPMS_CONTEXT


class KeyCache:
    """Saved contexts per key use (``"AK"``, ``"KEM key"``, ``"KEM key
    ZGen"``) of one ESAPI context; not thread-safe (HostTPM's lock)."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def __repr__(self) -> str:
        return f"KeyCache({sorted(self._entries)})"

    def __bool__(self) -> bool:
        return bool(self._entries)

    def clear(self, e: ESAPI | None) -> None:
        """Forget every entry; with ``e`` also flush their saved sessions
        (they stay active in the TPM until flushed)."""
        entries, self._entries = self._entries, {}
        if e is None:
            return
        for entry in entries.values():
            with suppress(TSS2_Exception):
                e.flush_context(e.context_load(entry.session))

    @staticmethod
    def _build(e: ESAPI, hierarchy: ESYS_TR, public: bytes, private: bytes,
               what: str, pinned: bytes, policy: bool) -> _Entry:
        handle, pub, session = hostkeys.load_with_session(e, hierarchy, public, private,
                                                          what, policy, pinned)
        try:
            obj = e.context_save(handle)
        except BaseException:
            e.flush_context(session)
            raise
        finally:
            e.flush_context(handle)
        return _Entry(obj, pub, e.context_save(session))

    @contextmanager
    def use(self, e: ESAPI, hierarchy: ESYS_TR, public: bytes, private: bytes,
            auth: bytes, what: str, pinned: bytes,
            policy: TPML_PCR_SELECTION | None = None) -> Iterator[hostkeys.Loaded]:
        """Like ``hostkeys.loaded``, from the cache (built on first use)."""
        slot = what + (" ZGen" if policy is not None else "")
        entry = self._entries.pop(slot, None)
        if entry is None:
            entry = self._build(e, hierarchy, public, private, what, pinned,
                                policy is not None)
        handle = e.context_load(entry.obj)
        try:
            session = e.context_load(entry.session)
        except BaseException:
            e.flush_context(handle)
            raise
        ok = False
        try:
            e.trsess_set_attributes(session, hostkeys.AUTH_ONLY)
            if policy is not None:
                e.policy_restart(session)
                hostkeys._policy_commands(e, session, policy)
            e.tr_set_auth(handle, auth)
            yield hostkeys.Loaded(handle, entry.public, session)
            ok = True
        finally:
            if ok:
                entry.session = e.context_save(session)
                self._entries[slot] = entry
            else:
                with suppress(TSS2_Exception):
                    e.flush_context(session)
            e.flush_context(handle)
