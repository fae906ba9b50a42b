"""The real-Nova lab: the two-host lab, the vTPCM stack and Nova 34 on top.

``NovaLab.up`` starts, in order: both lab libvirt daemons each in its own
UTS + mount namespace (hostnames ``lab-a``/``lab-b``, one instances path),
the host-TPM stand-ins, agents and engine (``vtpcm_lab.stack``), fresh
MariaDB databases and a RabbitMQ vhost, then the Neutron stand-in, placement,
glance, nova-conductor, nova-scheduler (VTPCMFilter), nova-api, one sshd per
host (Nova copies a cold-migrated or resized guest's disks over ssh, see
``vtpcm_lab.nova.sshd``) and one nova-compute per host (this project's
driver, as the host's QEMU user inside its daemon's namespaces); it uploads
the lab guest as AMI-style images and makes the flavors. ``down`` stops all
of it by pid; ``up`` first stops what a crashed run left behind. Every wait
is bounded.
"""

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from oslo_log import log as logging

from vtpcm_common import authn, exception
from vtpcm_lab import daemons, ensure_dir, lab_dir
from vtpcm_lab.exception import LabError
from vtpcm_lab.hosts import LAB_GROUP, HostNamespace, Lab, LabHost, ensure_users
from vtpcm_lab.live import free_port
from vtpcm_lab.nova import configs, rest, sshd
from vtpcm_lab.nova.services import Service, kill_leftovers, run, stop_all, wait_http
from vtpcm_lab.stack import Stack, StackHost

LOG = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
EXCHANGE = "vtpcm-nova-lab"
RABBIT_VHOST = "vtpcm-nova-lab"
SUDOERS = Path("/etc/sudoers.d/vtpcm-lab-nova")
INBOUND = {"a": "127.0.0.10", "b": "127.0.0.11"}
VTPCM_FLAVOR = "vtpcm.small"
# a second vTPCM flavor to resize to (more memory; a disk never shrinks)
VTPCM_FLAVOR_LARGER = "vtpcm.medium"
PLAIN_FLAVOR = "plain.small"
IMAGE = "vtpcm-lab-guest"
START_TIMEOUT = 180.0
SETUP_TIMEOUT = 300.0


def services_venv() -> Path:
    """The services' venv, as tools/install-nova-services.sh names it."""
    env = os.environ.get("VTPCM_NOVA_SVC_VENV")
    if env:
        return Path(env)
    out = subprocess.run([str(ROOT / "tools" / "install-nova-services.sh"), "--print-venv"],
                         capture_output=True, text=True, check=True, timeout=30)
    return Path(out.stdout.strip())


@dataclasses.dataclass
class Timings:
    steps: dict[str, float] = dataclasses.field(default_factory=dict)

    def mark(self, step: str, started: float) -> None:
        self.steps[step] = time.monotonic() - started


class NovaLab:
    """The whole real-Nova lab; see the module docstring."""

    def __init__(self, base: Path | None = None, venv: Path | None = None,
                 compute_options: configs.Sections | None = None) -> None:
        self.base = base or Path(str(lab_dir()) + "-nova")
        self.nova_dir = self.base / "nova"
        self.venv = venv or services_venv()
        # added to both nova-computes' files (configs.Layout.compute_overrides)
        self.compute_options: configs.Sections = compute_options or {}
        self.lab = Lab(self.base)
        for host in self.lab.hosts:
            self._namespace(host)
        self.pid_dir = self.nova_dir.with_name("nova-pids")
        # sshd's command line names no venv: its own leftover marker
        self.sshd_pid_dir = self.nova_dir.with_name("sshd-pids")
        self.stack: Stack | None = None
        self.layout: configs.Layout | None = None
        self.services: dict[str, Service] = {}
        self.timings = Timings()
        self.ids: dict[str, str] = {}
        self._nova_port = 0  # chosen in _up_lab

    def __repr__(self) -> str:
        return "NovaLab(%s)" % self.base

    # --- public views ----------------------------------------------------------------
    def compute_api(self) -> rest.Client:
        return rest.compute(self._layout.url("nova"))

    def client(self, service: str, prefix: str = "") -> rest.Client:
        return rest.Client(self._layout.url(service) + prefix)

    @property
    def _layout(self) -> configs.Layout:
        if self.layout is None:
            raise LabError(reason="the Nova lab is not up")
        return self.layout

    @property
    def _stack(self) -> Stack:
        if self.stack is None:
            raise LabError(reason="the Nova lab is not up")
        return self.stack

    def stack_host(self, nova_host: str) -> StackHost:
        for host in self._stack.hosts.values():
            if host.name == nova_host:
                return host
        raise LabError(reason="no lab host %r" % nova_host)

    def log_files(self) -> list[Path]:
        """Every log of the run: Nova's, the services', agents', engine's, libvirt's,
        QEMU's, swtpm's (for the leak scan)."""
        roots = [self.nova_dir, self.base / "vtpcm"] + [h.dir for h in self.lab.hosts]
        found: list[Path] = []
        for root in roots:
            if root.is_dir():
                found += [p for p in root.rglob("*.log") if p.is_file()]
        return sorted(set(found))

    def openstack(self, *args: str, timeout: float = 120.0) -> str:
        """Run the unmodified ``openstack`` CLI of the services' venv against the lab
        (``clouds.yaml``: no keystone, one endpoint per service)."""
        env = {"PATH": "/usr/bin:/bin", "HOME": str(self.nova_dir),
               "OS_CLIENT_CONFIG_FILE": str(self._layout.etc / "clouds.yaml"),
               "OS_CLOUD": "vtpcm-lab", "LANG": "C.UTF-8"}
        proc = subprocess.run([str(self.venv / "bin" / "openstack"), *args], env=env,
                              capture_output=True, text=True, timeout=timeout, cwd="/")
        if proc.returncode:
            raise LabError(reason="openstack %s failed (%d): %s" % (
                " ".join(args[:3]), proc.returncode, proc.stderr[-1500:]))
        return proc.stdout

    # --- up / down ---------------------------------------------------------------------
    def up(self) -> None:
        if not (self.venv / "bin" / "nova-compute").exists():
            raise LabError(reason="no Nova services venv at %s: run "
                                     "tools/install-nova-services.sh" % self.venv)
        try:
            socket.create_connection(("127.0.0.1", 3306), timeout=5).close()
        except OSError:
            raise LabError(reason="the real-Nova lab needs MariaDB on 127.0.0.1:3306 (user "
                           "root without password) for Nova's, placement's and glance's "
                           "databases; nothing answers there") from None
        started = time.monotonic()
        self._kill_leftovers()
        try:
            self._up_lab()
            self.timings.mark("lab hosts and vTPCM stack", started)
            step = time.monotonic()
            self._write_configs()
            self._reset_backends()
            self._start_services()
            self.timings.mark("Nova services", step)
            step = time.monotonic()
            self._make_images_and_flavors()
            self.timings.mark("images and flavors", step)
        except BaseException:
            self.down()
            raise
        self.timings.mark("up in total", started)

    def down(self) -> None:
        """Stop everything by pid; safe after a failed ``up`` or twice."""
        errors: list[BaseException] = []
        try:
            stop_all(list(self.services.values()))
        except OSError as err:
            errors.append(err)
        self.services.clear()
        kill_leftovers(self.pid_dir, str(self.venv))
        kill_leftovers(self.sshd_pid_dir, sshd.SSHD)
        self._undo_ssh()
        if self.stack is not None:
            # the daemons take seconds each to leave the broker: let them all
            # start at once, then the stack's own (sequential) stop reaps them
            daemons = [h.agent for h in self.stack.hosts.values()] + [self.stack.engine_daemon]
            for daemon in daemons:
                if daemon is not None and daemon.proc is not None \
                        and daemon.proc.poll() is None:
                    daemon.proc.send_signal(signal.SIGTERM)
            try:
                self.stack.down()
            except (OSError, exception.VTPCMException) as err:
                errors.append(err)
            self.stack = None
        try:
            self.lab.down()
        except LabError as err:
            errors.append(err)
        SUDOERS.unlink(missing_ok=True)
        if errors:
            raise LabError(reason="stopping the Nova lab: %s" % errors)

    def _kill_leftovers(self) -> None:
        """A crashed run's services and daemons (the stack kills its own in ``up``)."""
        kill_leftovers(self.pid_dir, str(self.venv))
        kill_leftovers(self.sshd_pid_dir, sshd.SSHD)
        self._undo_ssh()
        self.lab.down()

    # --- the lab and the vTPCM stack -----------------------------------------------------
    def _namespace(self, host: LabHost) -> None:
        host.namespace = HostNamespace(hostname="lab-" + host.name,
                                       source=host.dir / "instances",
                                       mountpoint=self.base / "instances")

    def _key_path(self, host: LabHost) -> Path:
        return self.nova_dir / ("keys-" + host.name) / "host-command.key"

    @property
    def _witness_key(self) -> Path:
        """nova-api's witness key: root's (nova-api runs as root), made
        anew with the lab's state; the engine pins its public key."""
        return self.nova_dir / "keys-nova-api" / "witness.key"

    def _up_lab(self) -> None:
        shutil.rmtree(self.nova_dir, ignore_errors=True)
        shutil.rmtree(self.base / "instances", ignore_errors=True)
        ensure_dir(self.nova_dir)
        ensure_users(tuple(h.user for h in self.lab.hosts))
        for host in self.lab.hosts:
            shutil.rmtree(host.dir / "instances", ignore_errors=True)
            # only this host's nova-compute (its QEMU user) may traverse to its key
            key_dir = self._key_path(host).parent
            key_dir.mkdir(mode=0o700)
            os.chown(key_dir, host.uid, 0)
        self.lab.up()
        authn.load_or_create_signing_key(self._witness_key)
        # the engine's [nova] client needs nova-api's port before nova-api runs
        self._nova_port = free_port()
        self.stack = Stack(
            self.lab, exchange=EXCHANGE,
            agent_extra={h.name: {"agent": {"host_command_key": self._key_path(h),
                                            "host_command_key_group": LAB_GROUP}}
                         for h in self.lab.hosts},
            # verdicts stay fresh for the scheduler however long the test run
            engine_extra={"attestation": {"interval": 60, "jitter": 5},
                          "nova": configs.engine_nova_options(
                              "http://127.0.0.1:%d" % self._nova_port,
                              authn.public_key_path(self._witness_key))})
        self.stack.up()
        # the scheduler's filter reads verdicts, it never asks for one
        for stack_host in self.stack.hosts.values():
            verdict = self.stack.engine.attest(stack_host.name)
            if verdict.status != "TRUSTED":
                raise LabError(reason="host %s attested %s"
                                         % (stack_host.name, verdict.status))

    # --- Nova -------------------------------------------------------------------------
    def _write_configs(self) -> None:
        stack = self._stack
        nova = self.nova_dir
        computes = []
        for host in self.lab.hosts:
            cdir = nova / ("compute-" + host.name)
            for sub in ("", "state", "lock"):
                ensure_dir(cdir / sub, 0o700)
                os.chown(cdir / sub, host.uid, host.gid)
            computes.append(configs.ComputeHost(
                name=stack.host(host).name, user=host.user, libvirt_socket=host.socket_path,
                inbound_addr=INBOUND[host.name], command_key=self._key_path(host), dir=cdir))
        ports = {name: free_port() for name in ("placement", "glance", "neutron")}
        ports["nova"] = self._nova_port
        layout = configs.Layout(
            base=nova, venv=self.venv, rabbit_vhost=RABBIT_VHOST,
            vtpcm_transport_url=daemons.TRANSPORT_URL, vtpcm_exchange=EXCHANGE,
            vtpcm_topics=daemons.topics(EXCHANGE), socket_dirs=[h.tpm_dir for h in
                                                                 self.lab.hosts],
            engine_public_key=nova / "etc" / "engine-public.pem",
            witness_key=self._witness_key,
            instances_path=self.base / "instances", ports=ports, computes=computes,
            compute_overrides=self.compute_options)
        self.layout = layout
        for path in (layout.etc, layout.logs, layout.glance_dir, layout.placement_dir,
                     layout.migration_socket_dir, nova / "state", nova / "lock",
                     nova / "images"):
            ensure_dir(path)

        def write(path: Path, text: str, owner: LabHost | None = None) -> None:
            path.write_text(text)
            os.chmod(path, 0o644 if owner is None else 0o600)
            if owner is not None:
                os.chown(path, owner.uid, owner.gid)

        # the lab's key directory is root's only: nova-compute reads a copy
        write(layout.engine_public_key, authn.public_key_path(
            daemons.ensure_signing_key(EXCHANGE)).read_text())
        write(layout.placement_dir / "placement.conf",
              configs.render_ini(configs.placement_conf(layout)))
        write(layout.glance_dir / "glance-api.conf",
              configs.render_ini(configs.glance_conf(layout)))
        stock = self.venv / "etc"
        write(layout.glance_dir / "glance-api-paste.ini", configs.paste_with_identity_standin(
            (stock / "glance" / "glance-api-paste.ini").read_text()))
        write(layout.nova_paste, configs.paste_with_witness(configs.paste_with_identity_standin(
            (stock / "nova" / "api-paste.ini").read_text())))
        write(layout.nova_conf, configs.render_ini(configs.nova_conf(layout)))
        for host, compute in zip(self.lab.hosts, computes, strict=True):
            write(compute.config_file, configs.render_ini(configs.compute_conf(layout, compute)),
                  owner=host)
            link = layout.migration_socket_dir / ("sock-" + compute.inbound_addr)
            link.unlink(missing_ok=True)
            link.symlink_to(host.socket_path)
        write(layout.etc / "clouds.yaml", configs.clouds_yaml(layout))
        SUDOERS.write_text(configs.sudoers(layout))
        os.chmod(SUDOERS, 0o440)
        self._write_ssh()

    # --- ssh between the hosts (cold migration and resize copy disks over it) ------------
    def _ssh_hosts(self) -> list[sshd.SshHost]:
        return [sshd.SshHost(name=h.name, user=h.user, addr=INBOUND[h.name],
                             dir=self.nova_dir / ("sshd-" + h.name)) for h in self.lab.hosts]

    @property
    def _ssh_keys_dir(self) -> Path:
        return self.nova_dir / "ssh-keys"

    def _write_ssh(self) -> None:
        """Fresh key pairs at every ``up`` (host keys, one per compute user),
        each host's authorized keys and sshd config, the pinned host keys and
        the client drop-in; the compute users get a login shell."""
        log = self._layout.logs / "setup.log"
        keys_dir = self._ssh_keys_dir
        ensure_dir(keys_dir, 0o755)
        publics: list[str] = []
        for host in self.lab.hosts:
            user_dir = keys_dir / host.user
            ensure_dir(user_dir, 0o700)
            os.chown(user_dir, host.uid, host.gid)
            key = sshd.client_key(keys_dir, host.user)
            sshd.keygen(key, "nova-compute@lab-" + host.name, log)
            os.chown(key, host.uid, host.gid)
            publics.append(key.with_name(key.name + ".pub").read_text())
        known: list[str] = []
        for ssh_host in self._ssh_hosts():
            # sshd reads the authorized keys as the user logging in; ssh-keygen
            # leaves the private host key root's only (0600)
            ensure_dir(ssh_host.dir, 0o755)
            sshd.keygen(ssh_host.host_key, "sshd@lab-" + ssh_host.name, log)
            public = ssh_host.host_key.with_name(ssh_host.host_key.name + ".pub")
            known.append(sshd.known_hosts_line(ssh_host.addr, public.read_text()))
            ssh_host.authorized_keys.write_text("".join(publics))
            ssh_host.config.write_text(sshd.sshd_config(ssh_host))
        known_hosts = keys_dir / "known_hosts"
        known_hosts.write_text("".join(known))
        os.chmod(known_hosts, 0o644)
        sshd.CLIENT_DROPIN.parent.mkdir(parents=True, exist_ok=True)
        sshd.CLIENT_DROPIN.write_text(sshd.client_dropin(self._ssh_hosts(), keys_dir,
                                                         known_hosts))
        os.chmod(sshd.CLIENT_DROPIN, 0o644)
        for host in self.lab.hosts:
            sshd.set_login_shell(host.user, sshd.LOGIN_SHELL)

    def _undo_ssh(self) -> None:
        sshd.CLIENT_DROPIN.unlink(missing_ok=True)
        for host in self.lab.hosts:
            sshd.set_login_shell(host.user, sshd.NO_LOGIN)

    def _start_sshds(self) -> None:
        """One sshd per host, in its libvirt daemon's namespaces; then each
        compute user logs in to the other host exactly as Nova will."""
        sshd.ensure_privsep_dir()
        ssh_hosts = self._ssh_hosts()
        for host, ssh_host in zip(self.lab.hosts, ssh_hosts, strict=True):
            svc = Service("sshd-" + host.name, [
                "nsenter", "--target", str(self._daemon_pid(host)), "--mount", "--uts", "--",
                sshd.SSHD, "-D", "-e", "-f", str(ssh_host.config)],
                self._layout.logs / ("sshd-%s.log" % host.name), self.sshd_pid_dir,
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"},
                stop_timeout=3.0)
            self.services[svc.name] = svc
            svc.start()
        for host in self.lab.hosts:
            for ssh_host in ssh_hosts:
                if ssh_host.name != host.name:
                    self._check_ssh(host, ssh_host)

    def _check_ssh(self, host: LabHost, dest: sshd.SshHost) -> None:
        """Nova's own command (``ssh -o BatchMode=yes <ip> ...``), as ``host``'s
        compute user in its namespaces; retried while the sshd starts."""
        argv = ["nsenter", "--target", str(self._daemon_pid(host)), "--mount", "--uts", "--",
                "setpriv", "--reuid", host.user, "--regid", LAB_GROUP, "--init-groups",
                "ssh", "-o", "BatchMode=yes", dest.addr, "test", "-w",
                str(self._layout.instances_path)]
        deadline = time.monotonic() + 20.0
        while True:
            self.services["sshd-" + dest.name].check()
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                                  env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                                  cwd="/", check=False)
            if proc.returncode == 0:
                return
            if time.monotonic() >= deadline:
                raise LabError(reason="%s cannot ssh to %s (%s) as Nova does: %s" % (
                    host.user, dest.addr, dest.name, proc.stderr.strip()[-800:]))
            time.sleep(0.3)

    @staticmethod
    def _daemon_pid(host: LabHost) -> int:
        pid = host.pid
        if pid is None:
            raise LabError(reason="libvirtd of host %s is not running" % host.name)
        return pid

    def _reset_backends(self) -> None:
        layout = self._layout
        log = layout.logs / "setup.log"
        names = ", ".join("%s%s" % (configs.DB_PREFIX, n) for n in configs.DATABASES)
        script = (
            "import pymysql\n"
            "c = pymysql.connect(host='127.0.0.1', user='root', autocommit=True)\n"
            "for n in %r:\n"
            "    c.cursor().execute('DROP DATABASE IF EXISTS ' + n)\n"
            "    c.cursor().execute('CREATE DATABASE ' + n + ' CHARACTER SET utf8')\n"
            % ([configs.DB_PREFIX + n for n in configs.DATABASES],))
        LOG.info("Recreating databases %(names)s", {"names": names})
        run([str(self.venv / "bin" / "python"), "-c", script], log, 60)
        ctl = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
        if self._vhost_exists(ctl):  # a crashed run's queues
            run([ctl, "-q", "delete_vhost", RABBIT_VHOST], log, 60)
        run([ctl, "-q", "add_vhost", RABBIT_VHOST], log, 60)
        run([ctl, "-q", "set_permissions", "-p", RABBIT_VHOST, "guest", ".*", ".*", ".*"],
            log, 60)

    @staticmethod
    def _vhost_exists(ctl: str) -> bool:
        out = subprocess.run([ctl, "-q", "list_vhosts"], capture_output=True, text=True,
                             timeout=60, check=True).stdout
        return RABBIT_VHOST in out.split()

    def _env(self, **extra: str) -> dict[str, str]:
        """Root's services import the lab's stand-ins and WSGI wrappers from
        the source tree (the wheel leaves vtpcm_lab out); nova-compute, a lab
        user's, gets ``PYTHONPATH=""``: the driver comes from the venv."""
        return {"PATH": "%s/bin:/usr/sbin:/usr/bin:/sbin:/bin" % self.venv,
                "LANG": "C.UTF-8", "HOME": str(self.nova_dir), "PYTHONPATH": str(ROOT),
                **extra}

    def _service(self, name: str, argv: list[str], **kw: Any) -> Service:
        svc = Service(name, argv, self._layout.logs / ("%s.log" % name), self.pid_dir,
                      env=kw.pop("env", self._env()), **kw)
        self.services[name] = svc
        svc.start()
        return svc

    def _gunicorn(self, name: str, app: str, port: int, env: dict[str, str]) -> Service:
        return self._service(name, [
            str(self.venv / "bin" / "gunicorn"), "--workers", "1", "--threads", "8",
            "--worker-class", "gthread", "--timeout", "300", "--graceful-timeout", "5",
            # no keep-alive: a client polling every 2 s (openstack --wait) races
            # gunicorn's 2 s idle close and gets "connection aborted"
            "--keep-alive", "0",
            "--bind", "127.0.0.1:%d" % port, app], env=self._env(**env))

    def _start_services(self) -> None:
        layout = self._layout
        venv_bin = self.venv / "bin"
        conf = ["--config-file", str(layout.nova_conf)]
        log = layout.logs / "setup.log"
        # schemas, in parallel with the HTTP services that do not need them
        neutron = self._service("neutron-standin", [
            str(venv_bin / "python"), "-m", "vtpcm_lab.nova.neutron", "--port",
            str(layout.ports["neutron"]), "--log", str(layout.logs / "neutron-calls.jsonl")])
        placement = self._gunicorn(
            "placement-api", "placement.wsgi.api:application", layout.ports["placement"],
            {"OS_PLACEMENT_CONFIG_DIR": str(layout.placement_dir)})
        run([str(venv_bin / "glance-manage"), "--config-dir", str(layout.glance_dir),
             "db_sync"], log, SETUP_TIMEOUT)
        glance = self._gunicorn("glance-api", "vtpcm_lab.nova.wsgi:glance_api()",
                                layout.ports["glance"],
                                {"OS_GLANCE_CONFIG_DIR": str(layout.glance_dir)})
        manage = [str(venv_bin / "nova-manage"), *conf]
        run([*manage, "api_db", "sync"], log, SETUP_TIMEOUT)
        run([*manage, "cell_v2", "map_cell0", "--database_connection",
             layout.db_url("nova_cell0")], log, 60)
        run([*manage, "cell_v2", "create_cell", "--name", "cell1"], log, 60)
        run([*manage, "db", "sync"], log, SETUP_TIMEOUT)
        for name in ("nova-conductor", "nova-scheduler"):
            self._service(name, [str(venv_bin / name), *conf, "--log-file",
                                 str(layout.logs / ("%s.log" % name))])
        api = self._gunicorn("nova-api", "vtpcm_lab.nova.wsgi:nova_api()",
                             layout.ports["nova"],
                             # the paste file first: Nova loads the app from it
                             {"OS_NOVA_CONFIG_FILES": "%s;%s" % (layout.nova_paste,
                                                                 layout.nova_conf)})
        self._start_sshds()
        for host, compute in zip(self.lab.hosts, layout.computes, strict=True):
            self._service("nova-compute-" + host.name, [
                "nsenter", "--target", str(self._daemon_pid(host)), "--mount", "--uts", "--",
                "setpriv", "--reuid", host.user, "--regid", LAB_GROUP, "--init-groups",
                str(venv_bin / "nova-compute"), *conf, "--config-file",
                str(compute.config_file)], env=self._env(HOME=str(compute.dir),
                                                         PYTHONPATH=""),
                # native-thread nova-compute ignores SIGTERM: do not wait long
                stop_timeout=3.0)
        for svc, url in ((neutron, layout.url("neutron")), (placement, layout.url("placement")),
                         (glance, layout.url("glance")), (api, layout.url("nova"))):
            wait_http(svc, url, START_TIMEOUT)
        self._wait_computes()

    def _wait_computes(self) -> None:
        """Both computes up, discovered into the cell, with a resource provider."""
        api = self.compute_api()
        names = {c.name for c in self._layout.computes}
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            for svc in self.services.values():
                svc.check()
            services = api.get("/os-services?binary=nova-compute")["services"]
            up = {s["host"] for s in services if s["state"] == "up"}
            hypervisors = {h["hypervisor_hostname"] for h in
                           api.get("/os-hypervisors")["hypervisors"]}
            if up >= names and hypervisors >= names:
                return
            if time.monotonic() >= deadline:
                raise LabError(reason="computes not ready after %.0f s: services "
                                         "up %s, hypervisors %s" % (START_TIMEOUT,
                                                                    sorted(up),
                                                                    sorted(hypervisors)))
            time.sleep(1.0)

    # --- images and flavors --------------------------------------------------------------
    def _upload(self, name: str, fmt: str, data: bytes, **props: str) -> str:
        glance = self.client("glance")
        image = glance.post("/v2/images", {"name": name, "disk_format": fmt,
                                           "container_format": fmt,
                                           "visibility": "public", **props})
        glance.put("/v2/images/%s/file" % image["id"], data=data,
                   content_type="application/octet-stream")
        rest.poll("image %s active" % name, lambda: glance.get("/v2/images/" + image["id"]),
                  lambda img: img["status"] == "active", 60, 0.5,
                  fail=lambda img: "status %s" % img["status"]
                  if img["status"] in ("killed", "deleted") else None)
        return str(image["id"])

    def _make_images_and_flavors(self) -> None:
        image = self.lab.image
        if image is None:
            raise LabError(reason="lab guest not built")
        kernel = self._upload(IMAGE + "-kernel", "aki", image.kernel.read_bytes())
        ramdisk = self._upload(IMAGE + "-ramdisk", "ari", image.initrd.read_bytes())
        # the root disk is never read: the guest lives in its initramfs. Its
        # busybox init ignores ACPI power-off: Nova's clean shutdown (a cold
        # migration, resize or shelve) would wait its 60 s in vain, then
        # destroy the domain anyway; the image says so (os_shutdown_timeout)
        self.ids["image"] = self._upload(IMAGE, "ami", b"\0" * (1 << 20), kernel_id=kernel,
                                         ramdisk_id=ramdisk, os_command_line=image.cmdline,
                                         os_shutdown_timeout="0")
        api = self.compute_api()
        for name, ram, specs in ((VTPCM_FLAVOR, 256, {"vtpcm:enabled": "true"}),
                                 (VTPCM_FLAVOR_LARGER, 320, {"vtpcm:enabled": "true"}),
                                 (PLAIN_FLAVOR, 256, {})):
            flavor = api.post("/flavors", {"flavor": {"name": name, "ram": ram, "vcpus": 1,
                                                      "disk": 1}})["flavor"]
            if specs:
                api.post("/flavors/%s/os-extra_specs" % flavor["id"], {"extra_specs": specs})
            self.ids[name] = str(flavor["id"])
