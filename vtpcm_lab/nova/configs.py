"""Configuration files of the real-Nova lab's services (pure: text from a layout).

Every file is rendered from one ``Layout`` (paths, ports, names), so the
services, the tests and the demo agree on where everything is. The choices
that make Nova 34 run on one machine are commented where they are made; see
also doc/source/lab.rst ("Real Nova").
"""

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

from vtpcm_lab.nova import identity

Sections = Mapping[str, Mapping[str, str | Sequence[str]]]

DB_PREFIX = "vtpcm_lab_"
DATABASES = ("placement", "glance", "nova_api", "nova", "nova_cell0")
FILTERS = ("ComputeFilter", "ComputeCapabilitiesFilter", "ImagePropertiesFilter",
           "ServerGroupAntiAffinityFilter", "ServerGroupAffinityFilter", "VTPCMFilter")


@dataclasses.dataclass(frozen=True)
class ComputeHost:
    """One nova-compute: its lab host, its Nova names and its private dirs."""

    name: str              # [DEFAULT] host = the agent's and engine's host name
    user: str              # runs as the lab host's QEMU user
    libvirt_socket: Path
    inbound_addr: str      # [libvirt] live_migration_inbound_addr and my_ip
    command_key: Path      # the agent-made key the driver signs with
    dir: Path              # state, locks, logs; owned by ``user``

    @property
    def config_file(self) -> Path:
        return self.dir / "nova-compute.conf"

    @property
    def log_file(self) -> Path:
        return self.dir / "nova-compute.log"


@dataclasses.dataclass(frozen=True)
class Layout:
    base: Path             # <lab dir>/nova
    venv: Path
    rabbit_vhost: str
    vtpcm_transport_url: str
    vtpcm_exchange: str
    vtpcm_topics: Mapping[str, str]
    socket_dirs: Sequence[Path]
    engine_public_key: Path  # a copy of the engine's command public key, world-readable
    witness_key: Path      # nova-api's witness key (root's, nova-api runs as root)
    instances_path: Path   # the one path every host sees (a bind mount per host)
    ports: Mapping[str, int]
    computes: Sequence[ComputeHost]
    # options every compute's file adds or replaces (a benchmark's A/B
    # setting, e.g. [vtpcm] early_begin_timeout)
    compute_overrides: Sections = dataclasses.field(default_factory=dict)

    @property
    def etc(self) -> Path:
        return self.base / "etc"

    @property
    def logs(self) -> Path:
        return self.base / "log"

    @property
    def migration_socket_dir(self) -> Path:
        """``sock-<inbound addr>`` symlinks to each daemon's socket: the target of
        ``[libvirt] live_migration_uri`` (``%s`` is the destination's address)."""
        return self.base / "migrate"

    @property
    def nova_conf(self) -> Path:
        return self.etc / "nova.conf"

    @property
    def nova_paste(self) -> Path:
        return self.etc / "nova-api-paste.ini"

    @property
    def glance_dir(self) -> Path:
        return self.etc / "glance"

    @property
    def placement_dir(self) -> Path:
        return self.etc / "placement"

    def url(self, service: str) -> str:
        return "http://127.0.0.1:%d" % self.ports[service]

    @property
    def transport_url(self) -> str:
        return "rabbit://guest:guest@127.0.0.1:5672/%s" % self.rabbit_vhost

    def db_url(self, name: str) -> str:
        return "mysql+pymysql://root@127.0.0.1/%s%s?charset=utf8" % (DB_PREFIX, name)


def render_ini(sections: Sections) -> str:
    """oslo.config ini text; a list value repeats the key (MultiStrOpt)."""
    lines: list[str] = []
    for section, values in sections.items():
        lines.append("[%s]" % section)
        for key, value in values.items():
            for item in ([value] if isinstance(value, str) else value):
                lines.append("%s = %s" % (key, item))
        lines.append("")
    return "\n".join(lines)


def overlay(base: Sections, extra: Sections) -> Sections:
    """``base`` with ``extra``'s options added, an option in both taking ``extra``'s value."""
    out = {section: dict(values) for section, values in base.items()}
    for section, values in extra.items():
        out.setdefault(section, {}).update(values)
    return out


def placement_conf(layout: Layout) -> Sections:
    return {
        "DEFAULT": {"debug": "True"},
        # placement's own no-auth mode; nova reaches it with an admin token
        "api": {"auth_strategy": "noauth2"},
        "placement_database": {"connection": layout.db_url("placement"),
                               "sync_on_startup": "True"},
    }


def glance_conf(layout: Layout) -> Sections:
    return {
        "DEFAULT": {"debug": "True", "enabled_backends": "fs:file",
                    "log_file": str(layout.logs / "glance-api.log")},
        "database": {"connection": layout.db_url("glance")},
        "glance_store": {"default_backend": "fs"},
        "fs": {"filesystem_store_datadir": str(layout.base / "images")},
        # keystone flavor, with the identity stand-in in authtoken's place
        "paste_deploy": {"flavor": "keystone",
                         "config_file": str(layout.glance_dir / "glance-api-paste.ini")},
        "oslo_messaging_notifications": {"driver": "noop"},
    }


def engine_nova_options(nova_url: str, witness_public_key: Path | None = None
                        ) -> dict[str, str | int]:
    """The engine's ``[nova]``: it asks Nova's API before an unshelve moves a
    shelved vTPCM and before it reaps one. The lab has no keystone, so an
    admin_token client with the lab's token; the identity stand-in gives it
    the admin identity (a real cloud uses a service user, ``auth_type =
    password``). ``witness_public_key``: nova-api's witness key, which the
    engine then requires for unshelves elsewhere and reaps."""
    options: dict[str, str | int] = {
        "auth_type": "admin_token", "endpoint": nova_url + "/v2.1",
        "token": identity.LAB_TOKEN, "timeout": 10}
    if witness_public_key is not None:
        options.update(require_api_witness="true",
                       api_witness_public_keys=str(witness_public_key))
    return options


WITNESS_FILTER = "vtpcm_witness"


def paste_with_witness(ini: str) -> str:
    """nova-api's paste config with the vtpcm_witness filter right after
    ``keystonecontext`` in every pipeline that has it (the user's request,
    authenticated, is what it witnesses), and its filter section. What the
    operator guide tells a real cloud to do; the devstack plugin does the
    same with sed."""
    out: list[str] = []
    for line in ini.splitlines():
        key, sep, value = line.partition("=")
        words = value.split()
        if sep and "keystonecontext" in words and WITNESS_FILTER not in words:
            at = words.index("keystonecontext") + 1
            line = "%s= %s" % (key, " ".join(words[:at] + [WITNESS_FILTER] + words[at:]))
        out.append(line)
    if "[filter:%s]" % WITNESS_FILTER not in ini:
        out += ["", "[filter:%s]" % WITNESS_FILTER,
                "paste.filter_factory = vtpcm_nova.api.witness:filter_factory"]
    return "\n".join(out) + "\n"


def paste_with_identity_standin(stock_ini: str) -> str:
    """A stock api-paste.ini whose ``authtoken`` filter is the identity stand-in."""
    out: list[str] = []
    in_authtoken = False
    for line in stock_ini.splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            in_authtoken = stripped == "[filter:authtoken]"
            out.append(line)
            if in_authtoken:
                out.append("paste.filter_factory = %s:filter_factory" % identity.__name__)
            continue
        if not in_authtoken:
            out.append(line)
    return "\n".join(out) + "\n"


def nova_conf(layout: Layout) -> Sections:
    """What nova-api, conductor and scheduler read (computes add their own file)."""
    admin_token = {"auth_type": "admin_token", "token": identity.LAB_TOKEN}
    # placement's noauth2 grants the admin role to the user named "admin" only
    placement_token = {"auth_type": "admin_token", "token": "admin"}
    return {
        "DEFAULT": {
            "debug": "True", "transport_url": layout.transport_url, "my_ip": "127.0.0.1",
            "state_path": str(layout.base / "state"),
            "instances_path": str(layout.instances_path),
            # no Neutron agent will ever send network-vif-plugged
            "vif_plugging_is_fatal": "False", "vif_plugging_timeout": "0",
            "reserved_host_memory_mb": "0", "reserved_host_disk_mb": "0",
            "ram_allocation_ratio": "4.0", "disk_allocation_ratio": "16.0",
            "heal_instance_info_cache_interval": "-1",
        },
        "api_database": {"connection": layout.db_url("nova_api")},
        "database": {"connection": layout.db_url("nova")},
        "wsgi": {"api_paste_config": str(layout.nova_paste)},
        "placement": {**placement_token, "endpoint": layout.url("placement")},
        "glance": {"endpoint_override": layout.url("glance") + "/"},
        "neutron": {**admin_token, "endpoint": layout.url("neutron"),
                    "endpoint_override": layout.url("neutron")},
        "scheduler": {"discover_hosts_in_cells_interval": "2", "workers": "1"},
        "conductor": {"workers": "1"},
        "filter_scheduler": {
            "available_filters": ["nova.scheduler.filters.all_filters",
                                  "vtpcm_nova.scheduler.filters.vtpcm_filter.VTPCMFilter"],
            "enabled_filters": ",".join(FILTERS)},
        "compute": {"live_migration_wait_for_vif_plug": "False"},
        "oslo_concurrency": {"lock_path": str(layout.base / "lock")},
        "oslo_messaging_notifications": {"driver": "noop"},
        "oslo_messaging_rabbit": {"heartbeat_timeout_threshold": "0"},
        # pre_live_migration fetches the AMI kernel through the deep image
        # inspection, which takes a bzImage for an MBR disk and refuses it
        "workarounds": {"disable_deep_image_inspection": "True"},
        "vtpcm": {"transport_url": layout.vtpcm_transport_url,
                  "control_exchange": layout.vtpcm_exchange,
                  "socket_dirs": ",".join(str(d) for d in layout.socket_dirs),
                  # the driver trusts another host's reply key only from an
                  # engine answer signed with this key
                  "engine_public_key": str(layout.engine_public_key),
                  # nova-api's vtpcm_witness filter signs with it
                  "api_witness_key_file": str(layout.witness_key)},
        "vtpcm_rpc": dict(layout.vtpcm_topics),
    }


def compute_conf(layout: Layout, host: ComputeHost) -> Sections:
    """The compute's own file, read after ``nova.conf`` (it wins), with the
    layout's ``compute_overrides``."""
    return overlay({
        "DEFAULT": {
            "host": host.name, "compute_driver": "vtpcm.VTPCMLibvirtDriver",
            # a host's own address: a cold migration or resize reaches the
            # destination's sshd there (``dest == my_ip`` means shared storage)
            "my_ip": host.inbound_addr,
            "state_path": str(host.dir / "state"), "log_file": str(host.log_file),
            # as the operator guide says for vTPCM computes (Nova's reap would
            # destroy a guest whose deletion a compute forged through conductor)
            "running_deleted_instance_action": "log",
        },
        "libvirt": {
            "virt_type": "qemu", "cpu_mode": "none", "hw_machine_type": "x86_64=pc",
            "connection_uri": "qemu+unix:///session?socket=%s" % host.libvirt_socket,
            # deprecated but honoured as uri % dest: how a session daemon
            # reaches the other one's socket on the same machine
            "live_migration_uri": "qemu+unix:///session?socket=%s/sock-%%s"
                                  % layout.migration_socket_dir,
            "live_migration_inbound_addr": host.inbound_addr,
            # ssh + scp to the destination's sshd (vtpcm_lab.nova.sshd)
            "remote_filesystem_transport": "ssh",
        },
        "oslo_concurrency": {"lock_path": str(host.dir / "lock")},
        # computes reach the databases through the conductor only
        "database": {"connection": ""},
        "api_database": {"connection": ""},
        # privsep needs root; the compute runs as the QEMU user of its host
        "nova_sys_admin": {"helper_command": "sudo -n %s/bin/privsep-helper --config-file "
                                             "%s --config-file %s"
                                             % (layout.venv, layout.nova_conf,
                                                host.config_file)},
        "vtpcm": {"host_command_key": str(host.command_key)},
        # not the API's admin token: the service user's (identity stand-in),
        # which nova-api's vtpcm_witness filter never witnesses
        "neutron": {"token": identity.SERVICE_TOKEN},
    }, layout.compute_overrides)


def sudoers(layout: Layout) -> str:
    """The one root command the computes may run: the venv's privsep-helper."""
    users = ",".join(h.user for h in layout.computes)
    return ("Defaults:%(u)s !requiretty\n"
            "%(u)s ALL=(root) NOPASSWD: %(v)s/bin/privsep-helper *\n"
            % {"u": users, "v": layout.venv})


def clouds_yaml(layout: Layout) -> str:
    """The unmodified ``openstack`` CLI without keystone: no auth, one endpoint
    per service (the identity stand-in gives every request the lab's admin)."""
    return (
        "clouds:\n"
        "  vtpcm-lab:\n"
        "    auth_type: none\n"
        "    auth:\n"
        "      endpoint: %(nova)s/v2.1\n"
        "    compute_endpoint_override: %(nova)s/v2.1\n"
        "    image_endpoint_override: %(glance)s/\n"
        "    network_endpoint_override: %(neutron)s/\n"
        "    placement_endpoint_override: %(placement)s/\n"
        "    compute_api_version: '2.95'\n"
        "    image_api_version: '2'\n"
        % {s: layout.url(s) for s in ("nova", "glance", "neutron", "placement")})
