"""Validators for the ``vtpcm`` flavor extra spec namespace (nova-api).

Registered through the ``nova.api.extra_spec_validators`` entry point, so a
typo (``vtpcm:enable``, ``vtpcm:model=tpm-tiss``) is refused by nova-api
with its own message. Rules across keys (never with ``hw:tpm_*``) are
checked by the filter and the driver (``vtpcm_nova.extra_specs``).
"""

from nova.api.validation.extra_specs import base

from vtpcm_nova import extra_specs

EXTRA_SPEC_VALIDATORS = [
    base.ExtraSpecValidator(
        name=extra_specs.ENABLED,
        description=(
            "Give the instance a vTPCM: a TPM 2.0 run by the vtpcm-agent, live-migrated "
            "with the instance to attested hosts only. Not with hw:tpm_*."),
        value={"type": bool, "description": "Whether the instance has a vTPCM."},
    ),
    base.ExtraSpecValidator(
        name=extra_specs.MODEL,
        description="The TPM device model the guest sees.",
        value={"type": str, "description": "TPM device model.",
               "enum": list(extra_specs.MODELS)},
    ),
]


def register() -> list[base.ExtraSpecValidator]:
    return EXTRA_SPEC_VALIDATORS
