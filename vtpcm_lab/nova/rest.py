"""A minimal JSON REST client for the lab's Nova, glance and placement (stdlib only).

The tests and the demo run in the project's venv, which has no OpenStack
client libraries; the ``openstack`` CLI of the services' venv is used where
it works without keystone (see ``cloud.NovaLab.openstack``).
"""

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from vtpcm_lab.exception import LabError
from vtpcm_lab.nova import identity

COMPUTE_MICROVERSION = "2.95"


class APIError(LabError):
    msg_fmt = "%(method)s %(url)s: HTTP %(status)s %(body)s"


class Client:
    def __init__(self, base_url: str, headers: dict[str, str] | None = None,
                 timeout: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {"X-Auth-Token": identity.LAB_TOKEN, "Accept": "application/json",
                        **(headers or {})}
        self.timeout = timeout

    def __repr__(self) -> str:
        return "Client(%r)" % self.base_url

    def request(self, method: str, path: str, body: Any = None, *,
                data: bytes | None = None, content_type: str = "application/json",
                ok: tuple[int, ...] = (200, 201, 202, 204)) -> Any:
        url = self.base_url + path
        payload = data if data is not None else (
            json.dumps(body).encode() if body is not None else None)
        headers = dict(self.headers)
        if payload is not None:
            headers["Content-Type"] = content_type
        req = urllib.request.Request(  # noqa: S310 - http://127.0.0.1 URLs of the lab
            url, data=payload, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310
                status, text = resp.status, resp.read()
        except urllib.error.HTTPError as err:
            status, text = err.code, err.read()
        if status not in ok:
            raise APIError(method=method, url=url, status=status,
                           body=text[:500].decode(errors="replace"))
        return json.loads(text) if text.strip() else None

    def get(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> Any:
        return self.request("POST", path, body, **kw)

    def put(self, path: str, body: Any = None, **kw: Any) -> Any:
        return self.request("PUT", path, body, **kw)

    def delete(self, path: str, **kw: Any) -> Any:
        return self.request("DELETE", path, **kw)


def compute(base_url: str) -> Client:
    return Client(base_url + "/v2.1",
                  {"OpenStack-API-Version": "compute %s" % COMPUTE_MICROVERSION})


def poll(what: str, fetch: Callable[[], Any], done: Callable[[Any], bool], timeout: float,
         interval: float = 1.0, fail: Callable[[Any], str | None] | None = None) -> Any:
    """``fetch()`` until ``done``; a ``fail`` message ends early; every wait bounded."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = fetch()
        if done(last):
            return last
        if fail is not None:
            reason = fail(last)
            if reason:
                raise LabError(reason="%s: %s" % (what, reason))
        if time.monotonic() >= deadline:
            raise LabError(reason="%s: not done after %.0f s (last: %.300s)"
                                     % (what, timeout, last))
        time.sleep(interval)
