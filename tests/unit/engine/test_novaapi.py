"""The engine's client of Nova's API through real keystoneauth1 (options as
an operator writes them in ``[nova]``) against a fake Nova on a local port:
the request it sends, and each answer it must not take as an answer."""

import http.server
import json
import threading
from typing import Any

import pytest
from oslo_config import cfg

from tests.unit.engine.test_coordinator import INSTANCE, PROJECT, env  # noqa: F401
from tests.unit.engine.test_coordinator_cold import _shelved
from vtpcm_common import exception
from vtpcm_nova.conf import engine as engine_conf
from vtpcm_nova.engine import novaapi
from vtpcm_nova.engine.shelved import Deletion, ServerView

TOKEN = "service-token-7f3a"  # stands for a credential: must stay out of repr


class FakeNova(http.server.BaseHTTPRequestHandler):
    """``answers``: path (with query) -> (status, body[, content type[,
    Nova's microversion header]]); anything else a bare 404."""

    answers: dict[str, tuple[Any, ...]] = {}
    seen: list[dict[str, str]] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        FakeNova.seen.append({"path": self.path, **{k.lower(): v for k, v in
                                                    self.headers.items()}})
        status, body, ctype, version = (FakeNova.answers.get(self.path, (404, b"{}"))
                                        + ("application/json", "compute 2.1"))[:4]
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        if version:
            self.send_header("OpenStack-API-Version", version)
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


# --- the reaper's evidence: Nova's admin listing of deleted servers -------------------

LISTING = "/v2.1/servers/detail?all_tenants=1&deleted=true&uuid=" + INSTANCE
ADMIN_CHECK = "/v2.1/servers/detail?all_tenants=1&deleted=true&limit=1"
DELETED = {"id": INSTANCE, "OS-EXT-SRV-ATTR:host": None, "OS-EXT-STS:vm_state": "deleted",
           "status": "DELETED"}


def _listing(*servers):
    return json.dumps({"servers": list(servers)}).encode()


def test_novas_admin_listing_showing_it_deleted_is_deletion(nova):
    FakeNova.answers[LISTING] = (200, _listing(DELETED))
    assert nova.deletion(INSTANCE) is Deletion.DELETED
    (req,) = FakeNova.seen
    assert req["path"] == LISTING and req["openstack-api-version"] == "compute 2.1"


@pytest.mark.parametrize("answer, expected", [
    ((200, _listing()), Deletion.NOT_SHOWN_DELETED),
    ((200, _listing({**DELETED, "id": "0f0f0f0f-1111-2222-3333-444444444444"})),
     Deletion.NOT_SHOWN_DELETED),
    ((200, _listing({**DELETED, "OS-EXT-STS:vm_state": "shelved_offloaded"})),
     Deletion.NOT_SHOWN_DELETED),
    # Nova's deleted=true filter also lists SOFT_DELETED servers (deleted == id
    # OR vm_state == soft-delete): a restorable server is not deleted
    ((200, _listing({**DELETED, "OS-EXT-STS:vm_state": "soft-delete",
                     "status": "SOFT_DELETED"})),
     Deletion.NOT_SHOWN_DELETED),
    ((200, _listing({k: v for k, v in DELETED.items() if k != "OS-EXT-SRV-ATTR:host"})),
     Deletion.NOT_ADMIN),
    ((403, b'{"forbidden": {"code": 403}}'), Deletion.NOT_ADMIN),
], ids=["nothing listed", "another server", "not deleted", "soft-deleted (restorable)",
        "no admin view", "403"])
def test_anything_but_novas_word_is_not_deletion(nova, answer, expected):
    FakeNova.answers[LISTING] = answer
    assert nova.deletion(INSTANCE) is expected


@pytest.mark.parametrize("answer, why", [
    ((404, b'{"itemNotFound": {"code": 404}}'), "HTTP 404"),
    ((404, b"<html>404 Not Found</html>", "text/html", ""), "HTTP 404"),
    ((200, _listing(DELETED), "application/json", ""), "not Nova's"),
    ((200, b'{"server": {}}'), "not a server list"),
    ((503, b"{}"), "HTTP 503"),
], ids=["nova 404", "proxy 404", "no microversion header", "not a list", "503"])
def test_a_reply_that_is_not_novas_listing_is_no_answer(nova, answer, why):
    FakeNova.answers[LISTING] = answer
    with pytest.raises(exception.ServiceUnreachable, match=why):
        nova.deletion(INSTANCE)


@pytest.mark.parametrize("answer, admin", [
    ((200, _listing(DELETED)), True),
    ((200, _listing()), True),
    ((200, _listing({"id": INSTANCE, "status": "DELETED"})), False),
    ((403, b'{"forbidden": {"code": 403}}'), False),
], ids=["admin view", "nothing deleted yet", "no admin attributes", "403"])
def test_the_admin_check(nova, answer, admin):
    FakeNova.answers[ADMIN_CHECK] = answer
    assert nova.is_admin() is admin


def test_a_200_for_another_server_is_no_answer(nova, env):  # noqa: F811
    """Review L1 (P3b): the view of another server was taken as this one's
    and authorized the move."""
    other = "11111111-2222-3333-4444-555555555555"
    FakeNova.answers["/v2.1/servers/" + INSTANCE] = (200, json.dumps({"server": {
        "id": other, "OS-EXT-SRV-ATTR:host": "host-b",
        "OS-EXT-STS:vm_state": "shelved_offloaded",
        "OS-EXT-STS:task_state": "spawning"}}).encode())
    with pytest.raises(exception.ServiceUnreachable, match="another server"):
        nova.get_server(INSTANCE)
    coord, db, _, _, cold = _shelved(env)
    coord.nova = nova
    with pytest.raises(exception.UnshelveNotAuthorized, match="Nova could not be asked"):
        coord.unshelve_vtpcm(INSTANCE, "host-b", requested_by="host-b")
    assert db.get_vtpcm(INSTANCE).host == "host-a" and not cold.imported
    # positive control: the same view with this server's id (and the project
    # its vTPCM was created in) authorizes it
    FakeNova.answers["/v2.1/servers/" + INSTANCE] = (200, _server(**{
        "OS-EXT-SRV-ATTR:host": "host-b", "OS-EXT-STS:vm_state": "shelved_offloaded",
        "OS-EXT-STS:task_state": "spawning", "tenant_id": PROJECT}))
    assert coord.unshelve_vtpcm(INSTANCE, "host-b", requested_by="host-b").host == "host-b"


def test_a_proxy_answering_404_to_everything_reaps_nothing(nova, env):  # noqa: F811
    """Review M1 (P3): an nginx-style HTML 404 for every path (an ingress
    with no backend) shredded every shelved vTPCM in two passes."""
    coord, db, agents, _, _ = _shelved(env)
    coord.nova = nova
    html = (404, b"<html><body><h1>404 Not Found</h1>nginx</body></html>", "text/html", "")
    FakeNova.answers.update({"/v2.1/servers/" + INSTANCE: html, LISTING: html,
                             ADMIN_CHECK: html})
    for _ in range(4):
        assert coord.reap_deleted_shelved() == 0
    assert db.get_vtpcm(INSTANCE).state == "SHELVED"
    assert [c for c in agents.calls if c[0] == "destroy"] == []
    # positive control: Nova's own listing showing it deleted reaps it
    FakeNova.answers.update({LISTING: (200, _listing(DELETED)),
                             ADMIN_CHECK: (200, _listing(DELETED))})
    coord.reap_deleted_shelved()
    assert coord.reap_deleted_shelved() == 1
    assert [c for c in agents.calls if c[0] == "destroy"] == [("destroy", "host-a")]
