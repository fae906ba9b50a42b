"""The engine's client of Nova's API through real keystoneauth1 (options as
an operator writes them in ``[nova]``) against a fake Nova on a local port:
the request it sends, and each answer it must not take as an answer."""

import http.server
import json
import threading

import pytest
from oslo_config import cfg

from vtpcm_common import exception
from vtpcm_nova.conf import engine as engine_conf
from vtpcm_nova.engine import novaapi
from vtpcm_nova.engine.shelved import ServerView

INSTANCE = "6b0e9c3e-9f5e-4a57-9d8c-1f2b3c4d5e6f"
TOKEN = "service-token-7f3a"  # stands for a credential: must stay out of repr


class FakeNova(http.server.BaseHTTPRequestHandler):
    answers: dict[str, tuple[int, bytes]] = {}
    seen: list[dict[str, str]] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        FakeNova.seen.append({"path": self.path, **{k.lower(): v for k, v in
                                                    self.headers.items()}})
        status, body = FakeNova.answers.get(self.path, (404, b"{}"))
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def nova():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeNova)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    FakeNova.answers, FakeNova.seen = {}, []
    conf = cfg.ConfigOpts()
    engine_conf.register_opts(conf)
    conf([], default_config_files=[])
    conf.set_override("auth_type", "admin_token", group="nova")
    novaapi.ks_loading.load_auth_from_conf_options(conf, "nova")  # registers its options
    conf.set_override("endpoint", "http://127.0.0.1:%d/v2.1" % server.server_port,
                      group="nova")
    conf.set_override("token", TOKEN, group="nova")
    conf.set_override("timeout", 5, group="nova")
    try:
        yield novaapi.from_conf(conf)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _server(**fields):
    return json.dumps({"server": {"id": INSTANCE, **fields}}).encode()


def test_the_admin_view_of_a_server(nova):
    FakeNova.answers["/v2.1/servers/" + INSTANCE] = (200, _server(**{
        "OS-EXT-SRV-ATTR:host": "host-b", "OS-EXT-STS:vm_state": "shelved_offloaded",
        "OS-EXT-STS:task_state": "spawning"}))
    assert nova.get_server(INSTANCE) == ServerView("host-b", "shelved_offloaded", "spawning")
    (req,) = FakeNova.seen
    assert req["x-auth-token"] == TOKEN
    assert req["openstack-api-version"] == "compute 2.1"
    assert TOKEN not in repr(nova)


def test_404_is_no_such_instance(nova):
    assert nova.get_server(INSTANCE) is None


@pytest.mark.parametrize("status, body, why", [
    (500, b"{}", "HTTP 500"),
    (503, b"{}", "HTTP 503"),
    (403, b"{}", "HTTP 403"),
    (200, b"not json", "not a server document"),
    (200, b'{"servers": []}', "not a server document"),
    (200, json.dumps({"server": {"OS-EXT-SRV-ATTR:host": 7}}).encode(),
     "not a server document"),
])
def test_anything_else_is_no_answer(nova, status, body, why):
    FakeNova.answers["/v2.1/servers/" + INSTANCE] = (status, body)
    with pytest.raises(exception.ServiceUnreachable, match=why):
        nova.get_server(INSTANCE)


def test_a_dead_endpoint_is_no_answer():
    conf = cfg.ConfigOpts()
    engine_conf.register_opts(conf)
    conf([], default_config_files=[])
    conf.set_override("auth_type", "admin_token", group="nova")
    novaapi.ks_loading.load_auth_from_conf_options(conf, "nova")
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeNova) as closed:
        port = closed.server_port  # bound, then closed: nothing listens there
    conf.set_override("endpoint", "http://127.0.0.1:%d/v2.1" % port, group="nova")
    conf.set_override("token", TOKEN, group="nova")
    with pytest.raises(exception.ServiceUnreachable, match="ConnectFailure") as err:
        novaapi.from_conf(conf).get_server(INSTANCE)
    assert TOKEN not in str(err.value)


def test_no_auth_type_means_no_client():
    conf = cfg.ConfigOpts()
    engine_conf.register_opts(conf)
    conf([], default_config_files=[])
    assert novaapi.from_conf(conf) is None
    assert conf.nova.timeout == 30 and conf.nova.service_type == "compute"
