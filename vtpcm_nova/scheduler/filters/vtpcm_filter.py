"""VTPCMFilter: a vTPCM instance goes only to hosts attested TRUSTED.

For flavors with ``vtpcm:enabled=true`` a host passes only with a fresh
TRUSTED verdict (which also says its agent answered a quote within the
verdict's lifetime); every other request passes untouched, at no cost.
Enable with ``[filter_scheduler] available_filters =
vtpcm_nova.scheduler.filters.vtpcm_filter.VTPCMFilter`` (besides
``nova.scheduler.filters.all_filters``) and ``VTPCMFilter`` in
``enabled_filters``.
"""

from typing import Any

import nova.conf
from nova.scheduler import filters
from oslo_log import log as logging

from vtpcm_common import exception
from vtpcm_nova import clients, extra_specs
from vtpcm_nova.conf import compute as compute_conf
from vtpcm_nova.scheduler.verdicts import VerdictCache

LOG = logging.getLogger(__name__)
CONF = nova.conf.CONF


class VTPCMFilter(filters.BaseHostFilter):
    """Only hosts with a fresh TRUSTED verdict, for vTPCM flavors."""

    # a same-host rebuild keeps the vTPCM where it is
    RUN_ON_REBUILD = False

    def __init__(self) -> None:
        super().__init__()
        compute_conf.register_opts(CONF)
        self._cache: VerdictCache | None = None

    def _verdicts(self) -> VerdictCache:
        if self._cache is None:
            engine = clients.engine_reader(CONF)
            timeout = CONF.vtpcm.scheduler_timeout
            self._cache = VerdictCache(lambda: engine.verdicts(timeout=timeout),
                                       ttl=CONF.vtpcm.verdict_cache_seconds)
        return self._cache

    def host_passes(self, host_state: Any, spec_obj: Any) -> bool:
        specs = spec_obj.flavor.extra_specs
        if not extra_specs.requested(specs):
            return True
        try:
            extra_specs.parse(specs)
        except exception.InvalidInput as err:
            LOG.debug("%(host)s fails vTPCM: flavor: %(err)s",
                      {"host": host_state.host, "err": err})
            return False
        reason = self._verdicts().why_not(host_state.host)
        if reason is not None:
            LOG.debug("%(host)s fails vTPCM: %(reason)s",
                      {"host": host_state.host, "reason": reason})
            return False
        return True
