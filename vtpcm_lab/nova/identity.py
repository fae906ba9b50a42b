"""Keystone stand-in: a paste filter that sets the identity headers.

Nova 34 and glance ship keystone pipelines only, and their ``keystonecontext``
/ ``context`` filters build the request context from the headers keystone's
``authtoken`` would set after validating a token. The lab has no keystone: this
filter takes ``authtoken``'s place and asserts one fixed admin identity for
every request (any incoming identity header is dropped first, so a client can
not choose its own), but for the computes' token (``SERVICE_TOKEN``, what
their ``[neutron]`` section holds): the service user of the service project
with the ``admin,service`` roles, as nova-compute's credentials are in an
upstream install, so nova-api's vtpcm_witness filter refuses to witness its
requests. A test cloud stand-in only: it authenticates nobody, and a client
sending no token (or the lab's) is the admin, so the lab cannot show that a
compute host cannot get an admin's witness; only that the computes' own
credentials get none.
"""

from collections.abc import Callable, Iterable
from typing import Any

PROJECT_ID = "5ab0c0ffee5ab0c0ffee5ab0c0ffee00"
USER_ID = "5ab0c0ffee5ab0c0ffee5ab0c0ffee01"
LAB_TOKEN = "vtpcm-lab-no-keystone"  # noqa: S105 - not a secret: nothing checks it
SERVICE_TOKEN = "vtpcm-lab-compute-service"  # noqa: S105 - the computes' (nothing checks it)
SERVICE_PROJECT_ID = "5ab0c0ffee5ab0c0ffee5ab0c0ffee10"
SERVICE_USER_ID = "5ab0c0ffee5ab0c0ffee5ab0c0ffee11"

_IDENTITY = {
    "HTTP_X_IDENTITY_STATUS": "Confirmed",
    "HTTP_X_SERVICE_IDENTITY_STATUS": "Invalid",
    "HTTP_X_USER_ID": USER_ID,
    "HTTP_X_USER_NAME": "admin",
    "HTTP_X_USER_DOMAIN_ID": "default",
    "HTTP_X_USER_DOMAIN_NAME": "Default",
    "HTTP_X_PROJECT_ID": PROJECT_ID,
    "HTTP_X_PROJECT_NAME": "admin",
    "HTTP_X_PROJECT_DOMAIN_ID": "default",
    "HTTP_X_PROJECT_DOMAIN_NAME": "Default",
    "HTTP_X_ROLES": "admin,member,reader",
}
_SERVICE_IDENTITY = {
    **_IDENTITY,
    "HTTP_X_USER_ID": SERVICE_USER_ID, "HTTP_X_USER_NAME": "nova",
    "HTTP_X_PROJECT_ID": SERVICE_PROJECT_ID, "HTTP_X_PROJECT_NAME": "service",
    "HTTP_X_ROLES": "admin,service",
}

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class IdentityHeaders:
    """WSGI middleware: replace identity headers by the lab's admin identity."""

    def __init__(self, app: WSGIApp) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any],
                 start_response: Callable[..., Any]) -> Iterable[bytes]:
        for key in [k for k in environ if k.startswith(("HTTP_X_USER", "HTTP_X_PROJECT",
                                                          "HTTP_X_ROLE", "HTTP_X_IDENTITY",
                                                          "HTTP_X_SERVICE", "HTTP_X_DOMAIN",
                                                          "HTTP_X_TENANT"))]:
            del environ[key]
        service = environ.get("HTTP_X_AUTH_TOKEN") == SERVICE_TOKEN
        environ.update(_SERVICE_IDENTITY if service else _IDENTITY)
        environ.setdefault("HTTP_X_AUTH_TOKEN", LAB_TOKEN)
        return self.app(environ, start_response)


def filter_factory(global_conf: dict[str, Any], **local_conf: Any) -> Callable[[WSGIApp],
                                                                              IdentityHeaders]:
    """paste.deploy entry: ``paste.filter_factory = vtpcm_lab.nova.identity:filter_factory``."""
    return IdentityHeaders
