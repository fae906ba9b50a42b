"""Ask Nova's compute API about an instance, with the engine's service
credentials (``[nova]``, keystoneauth1 options as Nova's own ``[placement]``).

``GET /servers/{id}`` (admin view: ``OS-EXT-SRV-ATTR:host`` and the
``OS-EXT-STS`` states) before an unshelve moves a vTPCM, and
``GET /servers/detail?all_tenants=1&deleted=true&uuid=X`` before the reaper
destroys one. A 404 never counts as "deleted": a credential without the
admin role gets 404 for every other project's server, and so does a proxy
with no backend. Only Nova's own admin listing of the deleted server is
evidence. Any unexpected answer is no answer (``ServiceUnreachable``): the
callers fail closed on it.
"""

from typing import Any

from keystoneauth1 import exceptions as ks_exc
from keystoneauth1 import loading as ks_loading
from oslo_config import cfg
from oslo_log import log as logging

from vtpcm_common import exception
from vtpcm_nova.engine.shelved import Deletion, ServerView

LOG = logging.getLogger(__name__)

GROUP = "nova"
# Every field used exists since 2.1; pinned so a newer default cannot change them.
MICROVERSION = "2.1"
# Nova's wsgi layer names the microversion it answered with on every reply;
# a proxy, an ingress or another service does not.
VERSION_HEADER = "OpenStack-API-Version"
HOST_ATTR = "OS-EXT-SRV-ATTR:host"  # in the admin view only


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
            if server["id"] != instance_uuid:
                raise _unreachable(instance_uuid, "Nova answered with another server")
            return ServerView(host=_text(server.get("OS-EXT-SRV-ATTR:host")),
                              vm_state=_text(server.get("OS-EXT-STS:vm_state")),
                              task_state=_text(server.get("OS-EXT-STS:task_state")),
                              project_id=_text(server.get("tenant_id")))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise _unreachable(instance_uuid, "not a server document") from None


    def is_admin(self) -> bool:
        """Whether the credential gets Nova's admin view: the all-tenants
        listing of deleted servers is accepted (a 403 otherwise) and what it
        lists carries ``OS-EXT-SRV-ATTR:host``. Without it every other
        project's server looks like a 404, so nothing may be reaped."""
        path = "/servers/detail?all_tenants=1&deleted=true&limit=1"
        try:
            resp = self.adapter.get(path, raise_exc=False, microversion=MICROVERSION)
        except ks_exc.ClientException as err:
            raise _unreachable("", type(err).__name__, path) from None
        if resp.status_code == 403:
            return False
        if resp.status_code != 200:
            raise _unreachable("", "HTTP %d" % resp.status_code, path)
        if not str(resp.headers.get(VERSION_HEADER, "")).startswith("compute "):
            raise _unreachable("", "the reply is not Nova's (no %s header)"
                               % VERSION_HEADER, path)
        try:
            servers = resp.json()["servers"]
            return all(HOST_ATTR in server for server in servers)
        except (ValueError, KeyError, TypeError):
            raise _unreachable("", "not a server list", path) from None

    def deletion(self, instance_uuid: str) -> Deletion:
        """Whether Nova's admin listing shows the instance deleted.

        DELETED only if Nova itself (its microversion header on the reply)
        lists exactly this server, in the admin view, with vm_state
        ``deleted``; NOT_ADMIN if Nova refuses the all-tenants listing or
        answers without the admin attributes; NOT_SHOWN_DELETED otherwise."""
        path = "/servers/detail?all_tenants=1&deleted=true&uuid=%s" % instance_uuid
        try:
            resp = self.adapter.get(path, raise_exc=False, microversion=MICROVERSION)
        except ks_exc.ClientException as err:
            raise _unreachable(instance_uuid, type(err).__name__, path) from None
        if resp.status_code == 403:
            return Deletion.NOT_ADMIN
        if resp.status_code != 200:
            raise _unreachable(instance_uuid, "HTTP %d" % resp.status_code, path)
        if not str(resp.headers.get(VERSION_HEADER, "")).startswith("compute "):
            raise _unreachable(instance_uuid, "the reply is not Nova's (no %s header)"
                               % VERSION_HEADER, path)
        try:
            servers = resp.json()["servers"]
            mine = [s for s in servers if s["id"] == instance_uuid]
            if not mine:
                return Deletion.NOT_SHOWN_DELETED
            if any(HOST_ATTR not in s for s in mine):
                return Deletion.NOT_ADMIN
            if all(_text(s.get("OS-EXT-STS:vm_state")) == "deleted" for s in mine):
                return Deletion.DELETED
            return Deletion.NOT_SHOWN_DELETED
        except (ValueError, KeyError, TypeError, AttributeError):
            raise _unreachable(instance_uuid, "not a server list", path) from None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError("expected a string")
    return value


def _unreachable(instance_uuid: str, reason: str,
                 path: str | None = None) -> exception.ServiceUnreachable:
    return exception.ServiceUnreachable(service="Nova's compute API",
                                        method="GET %s" % (path or "/servers/" + instance_uuid),
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
