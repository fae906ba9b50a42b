"""VTPCMFilter: a vTPCM instance goes only to hosts attested TRUSTED.

For flavors with ``vtpcm:enabled=true`` a host passes only with a fresh
TRUSTED verdict (which also says its agent answered a quote within the
verdict's lifetime); every other request passes untouched, at no cost.
Enable with ``[filter_scheduler] available_filters =
vtpcm_nova.scheduler.filters.vtpcm_filter.VTPCMFilter`` (besides
``nova.scheduler.filters.all_filters``) and ``VTPCMFilter`` in
``enabled_filters``.
"""

from collections.abc import Iterable
from typing import Any

import nova.conf
from nova.scheduler import filters
from nova.scheduler import utils as scheduler_utils
from oslo_log import log as logging

from vtpcm_common import exception
from vtpcm_nova import clients, extra_specs
from vtpcm_nova.conf import compute as compute_conf
from vtpcm_nova.scheduler import verdicts
from vtpcm_nova.scheduler.verdicts import TrustSnapshot, VerdictCache

LOG = logging.getLogger(__name__)
CONF = nova.conf.CONF


class _FlavorRefused:
    """The check for a ``vtpcm:`` flavor that does not parse: every host fails."""

    __slots__ = ("reason",)

    def __init__(self, err: exception.InvalidInput) -> None:
        self.reason = "flavor: %s" % err

    def why_not(self, host: str) -> str:
        return self.reason


class VTPCMFilter(filters.BaseHostFilter):
    """Only hosts with a fresh TRUSTED verdict, for vTPCM flavors.

    The flavor is parsed and the trusted hosts and the clock are read once
    per request (``filter_all``, as Nova's scheduler calls filters), not per
    host: per host there remains a dict lookup and a comparison."""

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
            self._cache = VerdictCache(lambda: verdicts.fetch_trusted(engine, timeout),
                                       ttl=CONF.vtpcm.verdict_cache_seconds)
        return self._cache

    def _request_check(self, spec_obj: Any) -> TrustSnapshot | _FlavorRefused | None:
        """What every host of this request is checked with; None: not ours."""
        specs = spec_obj.flavor.extra_specs
        if not extra_specs.requested(specs):
            return None
        try:
            extra_specs.parse(specs)
        except exception.InvalidInput as err:
            return _FlavorRefused(err)
        return self._verdicts().snapshot()

    @staticmethod
    def _passes(check: TrustSnapshot | _FlavorRefused, host_state: Any) -> bool:
        reason = check.why_not(host_state.host)
        if reason is not None:
            LOG.debug("%(host)s fails vTPCM: %(reason)s",
                      {"host": host_state.host, "reason": reason})
            return False
        return True

    def filter_all(self, filter_obj_list: Iterable[Any], spec_obj: Any) -> list[Any]:
        hosts = list(filter_obj_list)
        if not self.RUN_ON_REBUILD and scheduler_utils.request_is_rebuild(spec_obj):
            return hosts
        check = self._request_check(spec_obj)
        if check is None:
            return hosts
        return [host for host in hosts if self._passes(check, host)]

    def host_passes(self, host_state: Any, spec_obj: Any) -> bool:
        check = self._request_check(spec_obj)
        return check is None or self._passes(check, host_state)
