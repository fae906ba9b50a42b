"""The ``vtpcm:`` flavor extra specs, parsed once for the driver and the filter.

nova-api validates each key on its own (``vtpcm_nova/api``); the rules that
span keys (never together with upstream's ``hw:tpm_*``) live here, where the
filter and the driver both apply them.
"""

import dataclasses
from collections.abc import Mapping

from vtpcm_common import exception

NAMESPACE = "vtpcm"
ENABLED = "vtpcm:enabled"
MODEL = "vtpcm:model"
MODELS = ("tpm-crb", "tpm-tis")
DEFAULT_MODEL = "tpm-crb"
UPSTREAM_VTPM_PREFIX = "hw:tpm_"

_TRUE = frozenset({"true", "1", "yes", "on", "t", "y"})
_FALSE = frozenset({"false", "0", "no", "off", "f", "n"})


@dataclasses.dataclass(frozen=True)
class VtpcmSpec:
    """What a flavor asks of the vTPCM; ``enabled=False`` for every other flavor."""

    enabled: bool
    model: str = DEFAULT_MODEL


DISABLED = VtpcmSpec(enabled=False)


def _bool(key: str, value: str) -> bool:
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise exception.InvalidInput(reason="flavor extra spec %s=%r is not a boolean"
                                 % (key, value))


def parse(extra_specs: Mapping[str, str]) -> VtpcmSpec:
    """The flavor's vTPCM request; InvalidInput names the offending key.

    A flavor without ``vtpcm:enabled=true`` is not ours (fast path: no other
    key is looked at). With it, upstream's ``hw:tpm_*`` must be absent: two
    TPM devices, one of them carried in plaintext by QEMU, is never what an
    operator meant."""
    raw = extra_specs.get(ENABLED)
    if raw is None or not _bool(ENABLED, raw):
        return DISABLED
    upstream = sorted(k for k in extra_specs if k.startswith(UPSTREAM_VTPM_PREFIX))
    if upstream:
        raise exception.InvalidInput(
            reason="flavor sets %s=true and upstream's %s: a vTPCM instance has one TPM, "
                   "remove the hw:tpm_* keys" % (ENABLED, ", ".join(upstream)))
    model = extra_specs.get(MODEL, DEFAULT_MODEL)
    if model not in MODELS:
        raise exception.InvalidInput(reason="flavor extra spec %s=%r: use one of %s"
                                     % (MODEL, model, ", ".join(MODELS)))
    return VtpcmSpec(enabled=True, model=model)


def requested(extra_specs: Mapping[str, str]) -> bool:
    """True when the flavor asks for a vTPCM at all (even if otherwise invalid):
    the filter fails such requests closed rather than letting them through."""
    raw = extra_specs.get(ENABLED)
    if raw is None:
        return False
    try:
        return _bool(ENABLED, raw)
    except exception.InvalidInput:
        return True
