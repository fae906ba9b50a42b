"""Ask Nova's compute API about an instance, with the engine's service
credentials (``[nova]``, keystoneauth1 options as Nova's own ``[placement]``).

Only ``GET /servers/{id}`` (admin view: ``OS-EXT-SRV-ATTR:host`` and the
``OS-EXT-STS`` states). Any answer other than 200 or 404 is no answer
(``ServiceUnreachable``): the callers fail closed on it.
"""

from typing import Any

from keystoneauth1 import exceptions as ks_exc
from keystoneauth1 import loading as ks_loading
from oslo_config import cfg
from oslo_log import log as logging

from vtpcm_common import exception
from vtpcm_nova.engine.shelved import ServerView

LOG = logging.getLogger(__name__)

GROUP = "nova"
# Every field used exists since 2.1; pinned so a newer default cannot change them.
MICROVERSION = "2.1"


class NovaServers:
    """``GET /servers/{id}`` through a keystoneauth1 adapter."""

    def __init__(self, adapter: Any) -> None:
        self.adapter = adapter

    def __repr__(self) -> str:
        return "NovaServers()"  # the adapter's session holds credentials

    def get_server(self, instance_uuid: str) -> ServerView | None:
        """Nova's view of the instance; None if Nova answers 404."""
        try:
            resp = self.adapter.get("/servers/%s" % instance_uuid, raise_exc=False,
                                    microversion=MICROVERSION)
        except ks_exc.ClientException as err:
            raise _unreachable(instance_uuid, type(err).__name__) from None
        if resp.status_code == 404:
            return None
        if resp.status_code != 200:
            raise _unreachable(instance_uuid, "HTTP %d" % resp.status_code)
        try:
            server = resp.json()["server"]
            return ServerView(host=_text(server.get("OS-EXT-SRV-ATTR:host")),
                              vm_state=_text(server.get("OS-EXT-STS:vm_state")),
                              task_state=_text(server.get("OS-EXT-STS:task_state")))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise _unreachable(instance_uuid, "not a server document") from None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError("expected a string")
    return value


def _unreachable(instance_uuid: str, reason: str) -> exception.ServiceUnreachable:
    return exception.ServiceUnreachable(service="Nova's compute API",
                                        method="GET /servers/%s" % instance_uuid,
                                        reason=reason)


def from_conf(conf: cfg.ConfigOpts) -> NovaServers | None:
    """The client ``[nova]`` describes; None when no ``auth_type`` is set
    (then the engine cannot ask Nova, and refuses what needs Nova's word)."""
    if not conf[GROUP].auth_type:
        return None
    auth = ks_loading.load_auth_from_conf_options(conf, GROUP)
    session = ks_loading.load_session_from_conf_options(conf, GROUP, auth=auth)
    adapter = ks_loading.load_adapter_from_conf_options(conf, GROUP, session=session,
                                                        auth=auth)
    LOG.info("Asking Nova's compute API (service type %(st)s, auth type %(at)s) before "
             "moving or reaping a shelved vTPCM",
             {"st": conf[GROUP].service_type, "at": conf[GROUP].auth_type})
    return NovaServers(adapter)
