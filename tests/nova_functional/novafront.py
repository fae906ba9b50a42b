"""A real HTTP endpoint on 127.0.0.1 for the engine's ``[nova]`` client.

The engine is a separate process and asks Nova's compute API over HTTP,
but Nova's functional harness serves its API only through wsgi-intercept
inside the test process. ``NovaFront`` listens on a real port for the
whole module and hands each request to the WSGI app the current test
plugs in (Nova's own ``osapi_compute`` app in tests/nova_functional, a
stand-in in tests/functional); with none plugged in it answers 503, which
the engine must take as no answer.

Identity is a token filter, as in the real-Nova lab: a request carrying
``TOKEN`` gets the admin identity headers the harness's stubbed keystone
middleware reads; any other token gets 401. No Nova import here.
"""

import json
import re
import socketserver
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref import simple_server

TOKEN = "vtpcm-engine-service-token"
SERVICE_PROJECT = "vtpcm-engine-service"
WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class _Server(socketserver.ThreadingMixIn, simple_server.WSGIServer):
    daemon_threads = True


class _Quiet(simple_server.WSGIRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


class NovaFront:
    def __init__(self) -> None:
        self.app: WsgiApp | None = None
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status)
        self._server = simple_server.make_server("127.0.0.1", 0, self._serve,
                                                 server_class=_Server, handler_class=_Quiet)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.1}, daemon=True,
                                        name="nova-front")

    @property
    def endpoint(self) -> str:
        return "http://127.0.0.1:%d/v2.1" % self._server.server_port

    def engine_options(self) -> dict[str, Any]:
        """The engine's ``[nova]`` section for this endpoint."""
        return {"auth_type": "admin_token", "endpoint": self.endpoint, "token": TOKEN,
                "timeout": 10}

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def _serve(self, environ: dict[str, Any], start: Callable[..., Any]) -> Iterable[bytes]:
        status = [0]
        method, path = environ["REQUEST_METHOD"], environ["PATH_INFO"]  # the app may shift it

        def recording_start(line: str, headers: Any, *exc: Any) -> Any:
            status[0] = int(line.split()[0])
            return start(line, headers, *exc)
        try:
            return self._dispatch(environ, recording_start)
        finally:
            self.requests.append((method, path, status[0]))

    def _dispatch(self, environ: dict[str, Any],
                  start: Callable[..., Any]) -> Iterable[bytes]:
        app = self.app
        if app is None:
            start("503 Service Unavailable", [("Content-Type", "text/plain")])
            return [b"no Nova API plugged in"]
        if environ.get("HTTP_X_AUTH_TOKEN") != TOKEN:
            start("401 Unauthorized", [("Content-Type", "text/plain")])
            return [b"unknown token"]
        environ["HTTP_X_AUTH_USER"] = "admin"
        environ["HTTP_X_AUTH_PROJECT_ID"] = SERVICE_PROJECT
        environ["HTTP_X_ROLES"] = "admin,reader,member"
        environ["SCRIPT_NAME"] = ""  # the API's paste urlmap mounts /v2.1 itself
        return app(environ, start)


class ServersStandIn:
    """What ``GET /v2.1/servers/{id}`` answers where no Nova runs (tests/
    functional): ``servers`` maps an instance to its admin view fields;
    an instance not listed is a 404."""

    PATH = re.compile(r"^/v2\.1/servers/([0-9a-f-]{36})$")

    def __init__(self) -> None:
        self.servers: dict[str, dict[str, Any]] = {}

    PROJECT = "0e4c9d5a6b7f4e1aa2b3c4d5e6f70811"  # whose servers they are

    def building(self, instance: str, host: str) -> None:
        """What Nova shows while it builds ``instance`` on ``host`` (the
        engine records the owner project from it at create)."""
        self.servers[instance] = {"OS-EXT-SRV-ATTR:host": host,
                                  "OS-EXT-STS:vm_state": "building",
                                  "OS-EXT-STS:task_state": "spawning",
                                  "tenant_id": self.PROJECT}

    def unshelving(self, instance: str, host: str) -> None:
        self.servers[instance] = {"OS-EXT-SRV-ATTR:host": host,
                                  "OS-EXT-STS:vm_state": "shelved_offloaded",
                                  "OS-EXT-STS:task_state": "spawning",
                                  "tenant_id": self.PROJECT}

    def __call__(self, environ: dict[str, Any],
                 start: Callable[..., Any]) -> Iterable[bytes]:
        match = self.PATH.match(environ["PATH_INFO"])
        server = self.servers.get(match.group(1)) if match else None
        if environ["REQUEST_METHOD"] != "GET" or server is None:
            start("404 Not Found", [("Content-Type", "application/json")])
            return [b'{"itemNotFound": {"code": 404}}']
        start("200 OK", [("Content-Type", "application/json")])
        return [json.dumps({"server": {"id": match.group(1), **server}}).encode()]
