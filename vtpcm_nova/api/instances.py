"""Whether a server nova-api is asked about has a vTPCM (its flavor's
``vtpcm:enabled``), for the witness filter.

Why: a plain-flavor server must be untouched by the whole system, not even
named to the engine; so the filter asks Nova, before the request goes on
(a deleted server is gone after it), and witnesses only a vTPCM server's
unshelve or delete. The only module of the filter that imports Nova.
"""

from typing import Any

from oslo_log import log as logging

from vtpcm_nova import extra_specs

LOG = logging.getLogger(__name__)

_compute_api: Any = None


def _api() -> Any:
    global _compute_api
    if _compute_api is None:
        from nova.compute import api as compute_api  # nova-api's own process
        _compute_api = compute_api.API()
    return _compute_api


def has_vtpcm(environ: dict[str, Any], instance_uuid: str) -> bool | None:
    """True or False from the server's flavor; None when Nova could not say
    (no request context, server not found, any error): the filter then
    witnesses as before, since a witness too many only costs an engine call."""
    context = environ.get("nova.context")
    if context is None:
        return None
    try:
        instance = _api().get(context.elevated(), instance_uuid,
                              expected_attrs=["flavor"])
        specs = dict(instance.flavor.extra_specs or {})
    except Exception as err:  # noqa: BLE001 - never change Nova's answer
        LOG.debug("vTPCM witness: could not read the flavor of server %(i)s "
                  "(%(type)s); witnessing it", {"i": instance_uuid,
                                                "type": type(err).__name__})
        return None
    try:
        return extra_specs.parse(specs).enabled
    except Exception:  # noqa: BLE001 - a malformed vtpcm flavor: witness it
        return None
