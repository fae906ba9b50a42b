"""The real-Nova lab's pure parts: config rendering, the stand-ins' answers."""

import dataclasses
from pathlib import Path

from tests.unit.novapaste import NOVA_34_PIPELINES
from vtpcm_lab.nova import configs, identity, neutron, sshd

STOCK_PASTE = """[pipeline:main]
pipeline = authtoken keystonecontext app

[filter:authtoken]
paste.filter_factory = keystonemiddleware.auth_token:filter_factory
delay_auth_decision = true

[filter:keystonecontext]
paste.filter_factory = nova.api.auth:NovaKeystoneContext.factory
"""


def test_ini_repeats_a_list_value_as_a_multistr_option() -> None:
    text = configs.render_ini({"filter_scheduler": {"available_filters": ["a", "b"],
                                                    "enabled_filters": "X,Y"}})
    assert text.splitlines() == ["[filter_scheduler]", "available_filters = a",
                                 "available_filters = b", "enabled_filters = X,Y"]


def test_authtoken_is_replaced_by_the_identity_stand_in_only() -> None:
    out = configs.paste_with_identity_standin(STOCK_PASTE)
    assert "keystonemiddleware" not in out and "delay_auth_decision" not in out
    assert "[filter:authtoken]\npaste.filter_factory = vtpcm_lab.nova.identity:" \
        "filter_factory\n" in out
    assert "nova.api.auth:NovaKeystoneContext.factory" in out


def test_the_witness_filter_follows_keystonecontext_in_every_compute_pipeline() -> None:
    out = configs.paste_with_witness(NOVA_34_PIPELINES)
    assert "authtoken keystonecontext vtpcm_witness osapi_compute_app_v21" in out
    assert "keystonecontext vtpcm_witness legacy_v2_compatible" in out
    assert "pipeline = cors faultwrap request_log http_proxy_to_wsgi oscomputeversionapp\n" \
        in out  # no auth, nothing to witness
    assert "[filter:vtpcm_witness]\npaste.filter_factory = " \
        "vtpcm_nova.api.witness:filter_factory\n" in out
    assert configs.paste_with_witness(out) == out  # applied twice: once


def test_the_lab_engine_requires_witnesses_with_the_labs_key() -> None:
    options = configs.engine_nova_options("http://n", Path("/k/witness.key.pub"))
    assert (options["require_api_witness"], options["api_witness_public_keys"]) == \
        ("true", "/k/witness.key.pub")


def test_identity_stand_in_overrides_identity_headers_from_the_client() -> None:
    seen = {}

    def app(environ, start_response):  # type: ignore[no-untyped-def]
        seen.update(environ)
        return [b""]

    middleware = identity.filter_factory({})(app)
    middleware({"HTTP_X_ROLES": "reader", "HTTP_X_PROJECT_ID": "evil",
                "HTTP_X_TENANT_ID": "evil"}, lambda *a: None)
    assert (seen["HTTP_X_ROLES"], seen["HTTP_X_PROJECT_ID"]) == \
        ("admin,member,reader", identity.PROJECT_ID)
    assert "HTTP_X_TENANT_ID" not in seen


def test_neutron_stand_in_lists_nothing_and_refuses_writes() -> None:
    assert neutron.answer("GET", "/v2.0/ports.json") == (200, {"ports": []})
    assert neutron.answer("GET", "/v2.0/security-groups") == (200, {"security_groups": []})
    assert neutron.answer("GET", "/v2.0/extensions") == (200, {"extensions": []})
    assert neutron.answer("GET", "/v2.0/ports/123")[0] == 404
    status, body = neutron.answer("POST", "/v2.0/ports")
    assert status == 404 and "POST refused" in body["NeutronError"]["message"]


SSH_HOSTS = [sshd.SshHost(name="a", user="vtpcm-a", addr="127.0.0.10", dir=Path("/l/sshd-a")),
             sshd.SshHost(name="b", user="vtpcm-b", addr="127.0.0.11", dir=Path("/l/sshd-b"))]


def test_each_sshd_lets_in_its_own_compute_user_by_key_on_its_address_only() -> None:
    lines = sshd.sshd_config(SSH_HOSTS[1]).splitlines()
    assert {"ListenAddress 127.0.0.11:%d" % sshd.PORT, "AllowUsers vtpcm-b",
            "PasswordAuthentication no", "PermitRootLogin no",
            "AuthorizedKeysFile /l/sshd-b/authorized_keys",
            "HostKey /l/sshd-b/ssh_host_ed25519_key"} <= set(lines)
    assert not [line for line in lines if "vtpcm-a" in line or "127.0.0.10" in line]


def test_client_dropin_maps_each_address_to_its_host_user_and_pinned_key() -> None:
    text = sshd.client_dropin(SSH_HOSTS, Path("/l/keys"), Path("/l/keys/known_hosts"))
    blocks = text.split("Match ")[1:]
    assert [b.splitlines()[0] for b in blocks] == [
        "localuser vtpcm-a,vtpcm-b host 127.0.0.10", "localuser vtpcm-a,vtpcm-b host 127.0.0.11"]
    for block, user in zip(blocks, ("vtpcm-a", "vtpcm-b"), strict=True):
        settings = {tuple(line.split(None, 1)) for line in block.splitlines()[1:]}
        assert {("User", user), ("Port", str(sshd.PORT)), ("StrictHostKeyChecking", "yes"),
                ("IdentityFile", "/l/keys/%u/id_ed25519"), ("IdentitiesOnly", "yes"),
                ("UserKnownHostsFile", "/l/keys/known_hosts")} <= settings


def test_known_hosts_line_pins_the_port_and_drops_the_comment() -> None:
    assert sshd.known_hosts_line("127.0.0.11", "ssh-ed25519 AAAAC3 sshd@lab-b\n") == \
        "[127.0.0.11]:%d ssh-ed25519 AAAAC3\n" % sshd.PORT


def test_compute_has_its_own_address_for_nova_s_ssh_and_migration() -> None:
    compute = configs.ComputeHost(name="lab-b", user="vtpcm-b", libvirt_socket=Path("/s"),
                                  inbound_addr="127.0.0.11", command_key=Path("/k"),
                                  dir=Path("/c"))
    layout = configs.Layout(base=Path("/l"), venv=Path("/v"), rabbit_vhost="v",
                            vtpcm_transport_url="rabbit://", vtpcm_exchange="x",
                            vtpcm_topics={}, socket_dirs=[], engine_public_key=Path("/e"),
                            witness_key=Path("/w"),
                            instances_path=Path("/i"), ports={}, computes=[compute])
    conf = configs.compute_conf(layout, compute)
    assert (conf["DEFAULT"]["my_ip"], conf["libvirt"]["live_migration_inbound_addr"],
            conf["libvirt"]["remote_filesystem_transport"]) == ("127.0.0.11", "127.0.0.11",
                                                                 "ssh")


def test_the_engine_asks_the_labs_nova_api_with_the_identity_stand_ins_token() -> None:
    """The lab engine's [nova] loads through keystoneauth1 as an operator's
    would, and names nova-api's /v2.1 with the token the stand-in accepts."""
    from keystoneauth1 import loading as ks_loading
    from oslo_config import cfg

    from vtpcm_nova.conf import engine as engine_conf
    from vtpcm_nova.engine import novaapi

    conf = cfg.ConfigOpts()
    engine_conf.register_opts(conf)
    conf([], default_config_files=[])
    options = configs.engine_nova_options("http://127.0.0.1:8774")
    conf.set_override("auth_type", options["auth_type"], group="nova")
    ks_loading.load_auth_from_conf_options(conf, "nova")
    for name in ("endpoint", "token", "timeout"):
        conf.set_override(name, options[name], group="nova")
    client = novaapi.from_conf(conf)
    assert client is not None
    assert client.adapter.get_endpoint() == "http://127.0.0.1:8774/v2.1"
    assert conf.nova.token == identity.LAB_TOKEN


def test_the_computes_token_is_the_service_users_and_gets_no_witness() -> None:
    """Review finding 1: the lab's computes do not hold the API's admin
    token; theirs is the service user's (admin,service in the service
    project), whose requests nova-api's witness filter refuses."""
    from vtpcm_nova.api import witness
    compute = configs.ComputeHost(name="lab-b", user="vtpcm-b", libvirt_socket=Path("/s"),
                                  inbound_addr="127.0.0.11", command_key=Path("/k"),
                                  dir=Path("/c"))
    layout = configs.Layout(base=Path("/l"), venv=Path("/v"), rabbit_vhost="v",
                            vtpcm_transport_url="rabbit://", vtpcm_exchange="x",
                            vtpcm_topics={}, socket_dirs=[], engine_public_key=Path("/e"),
                            witness_key=Path("/w"),
                            instances_path=Path("/i"), ports={}, computes=[compute])
    assert configs.compute_conf(layout, compute)["neutron"]["token"] == \
        identity.SERVICE_TOKEN != identity.LAB_TOKEN
    seen = {}

    def app(environ, start_response):  # type: ignore[no-untyped-def]
        seen.update(environ)
        return [b""]
    identity.filter_factory({})(app)({"HTTP_X_AUTH_TOKEN": identity.SERVICE_TOKEN},
                                     lambda *a: None)
    who = witness.requester_of(seen)
    assert who.project_id == identity.SERVICE_PROJECT_ID
    assert "service" in who.refusal(frozenset({"service"}))


def test_compute_overrides_add_to_a_section_and_win_over_the_labs_value() -> None:
    """A benchmark's A/B setting reaches both computes' files: an option
    added to a section the lab writes keeps the lab's others, one the lab
    sets takes the override's value, a new section is added."""
    compute = configs.ComputeHost(name="lab-a", user="vtpcm-a", libvirt_socket=Path("/s"),
                                  inbound_addr="127.0.0.10", command_key=Path("/k"),
                                  dir=Path("/c"))
    layout = configs.Layout(base=Path("/l"), venv=Path("/v"), rabbit_vhost="v",
                            vtpcm_transport_url="rabbit://", vtpcm_exchange="x",
                            vtpcm_topics={}, socket_dirs=[], engine_public_key=Path("/e"),
                            witness_key=Path("/w"),
                            instances_path=Path("/i"), ports={}, computes=[compute],
                            compute_overrides={"vtpcm": {"early_begin_timeout": "0.0"},
                                               "libvirt": {"virt_type": "kvm"},
                                               "extra": {"a": "b"}})
    conf = configs.compute_conf(layout, compute)
    assert conf["vtpcm"] == {"host_command_key": "/k", "early_begin_timeout": "0.0"}
    assert conf["libvirt"]["virt_type"] == "kvm"
    assert conf["libvirt"]["live_migration_inbound_addr"] == "127.0.0.10"
    assert conf["extra"] == {"a": "b"}
    assert "vtpcm" in configs.compute_conf(
        dataclasses.replace(layout, compute_overrides={}), compute)
    assert "early_begin_timeout" not in configs.compute_conf(
        dataclasses.replace(layout, compute_overrides={}), compute)["vtpcm"]
