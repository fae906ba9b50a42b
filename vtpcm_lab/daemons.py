"""Real vtpcm-agent / vtpcm-engine daemons as subprocesses.

Each daemon has its own config file and is stopped by pid (TERM, then KILL)
in ``stop()``; callers (the lab, test fixtures) call ``stop()`` in finally
blocks. Every wait has a deadline.

Each deployment (namespace = control exchange) has one engine command
signing key and one operator key, made on first use under a per-user
directory keyed by the namespace: the engine daemons sign with the first and
trust the second's public half for admin calls, the agent daemons pin the
first's public half, and ``client_conf`` lets test and lab clients sign like
the engine and like an operator. They live outside the work dirs because
``client_conf`` is built before any work dir exists (and the lab clears its
work dir on ``up``).
"""

import os
import re
import signal
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from oslo_config import cfg
from oslo_log import log as logging

from vtpcm_agent import conf as agent_conf
from vtpcm_agent.swtpm import uidprocs
from vtpcm_common import authn, rpc
from vtpcm_common.api.agent.rpcapi import AgentAPI
from vtpcm_common.api.engine.rpcapi import EngineAPI
from vtpcm_lab.exception import LabError
from vtpcm_nova import conf as engine_conf
from vtpcm_nova.engine.db import migration

LOG = logging.getLogger(__name__)
TRANSPORT_URL = os.environ.get("VTPCM_TEST_TRANSPORT_URL",
                               "rabbit://guest:guest@127.0.0.1:5672/")
ROOT = Path(__file__).resolve().parents[1]


def short_dir(prefix: str) -> Path:
    """A short directory (unix socket paths are limited to 107 bytes) that other
    users may traverse: QEMU runs as a lab user and must reach its socket."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(path, 0o755)  # noqa: S103
    return path


def topics(namespace: str) -> dict[str, str]:
    """RPC topics of one isolated deployment on the shared broker.

    RabbitMQ queue names are global per virtual host, so a separate
    control_exchange alone does not isolate two runs: the topics differ too."""
    return {"agent_topic": "vtpcm-agent-" + namespace,
            "engine_topic": "vtpcm-engine-" + namespace}


KEY_ROOT = Path(tempfile.gettempdir()) / ("vtpcm-lab-keys-%d" % os.getuid())


def signing_key_path(namespace: str) -> Path:
    """Where the engine signing key of deployment ``namespace`` lives."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", namespace):
        raise LabError(reason="namespace %r is not a plain name" % namespace[:100])
    return KEY_ROOT / namespace / "engine-signing.key"


def operator_key_path(namespace: str) -> Path:
    """Where the operator key of deployment ``namespace`` lives (its public
    half is the engine's only ``admin_public_keys`` entry)."""
    return signing_key_path(namespace).with_name("operator.key")


def _ensure_key(path: Path) -> Path:
    KEY_ROOT.mkdir(mode=0o700, exist_ok=True)
    st = os.lstat(KEY_ROOT)  # in /tmp: refuse a directory someone else planted
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise LabError(
            reason="%s must be a directory of uid %d with mode 0700" % (KEY_ROOT, os.getuid()))
    authn.load_or_create_signing_key(path)
    return path


def ensure_signing_key(namespace: str) -> Path:
    """The engine signing key of ``namespace``, created if missing (0600, its
    public half next to it as ``.pub``)."""
    return _ensure_key(signing_key_path(namespace))


def ensure_operator_key(namespace: str) -> Path:
    """The operator key of ``namespace``, created if missing (0600, ``.pub``
    next to it)."""
    return _ensure_key(operator_key_path(namespace))


def client_conf(namespace: str, *, signing: bool = True) -> cfg.ConfigOpts:
    """Client options for deployment ``namespace``. With ``signing`` the
    client holds the engine's signing key (``AgentAPI(conf)`` signs like the
    engine) and the operator key (``EngineAPI(conf)`` signs admin calls like
    vtpcm-manage); without it, it is any host with broker credentials."""
    conf = cfg.ConfigOpts()
    agent_conf.register_opts(conf)
    engine_conf.register_opts(conf)
    conf([], project="vtpcm", default_config_files=[])
    rpc.get_transport(conf)  # registers transport options
    conf.set_override("transport_url", TRANSPORT_URL)
    conf.set_override("control_exchange", namespace)
    for name, value in topics(namespace).items():
        conf.set_override(name, value, group="vtpcm_rpc")
    key = str(ensure_signing_key(namespace)) if signing else ""
    conf.set_override("command_signing_key", key, group="engine")
    admin_key = str(ensure_operator_key(namespace)) if signing else ""
    conf.set_override("admin_key", admin_key, group="manage")
    return conf


def wait_for(what: str, predicate: Callable[[], Any], timeout: float,
             interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            result = predicate()
            if result:
                return result
        except Exception as err:  # noqa: BLE001 - retried until the deadline
            last = err
        time.sleep(interval)
    raise TimeoutError("%s not ready after %.0fs (last error: %r)" % (what, timeout, last))


class Daemon:
    """One daemon process with a config file; ``stop`` kills by pid."""

    module = ""

    def __init__(self, workdir: Path, name: str, config: dict[str, dict[str, Any]]) -> None:
        self.workdir = workdir
        self.name = name
        self.config_file = workdir / ("%s.conf" % name)
        self.log_file = workdir / ("%s.log" % name)
        self.config = config
        self.proc: subprocess.Popen[bytes] | None = None

    def write_config(self) -> None:
        lines = []
        for section, values in self.config.items():
            lines.append("[%s]" % section)
            lines += ["%s = %s" % (k, v) for k, v in values.items()]
        self.config_file.write_text("\n".join(lines) + "\n")

    def start(self) -> None:
        self.write_config()
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        log = open(self.log_file, "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module, "--config-file", str(self.config_file)],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
        log.close()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)
        self.proc = None

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""


class AgentDaemon(Daemon):
    module = "vtpcm_agent.cmd.agent"

    def __init__(self, workdir: Path, host: str, exchange: str, tcti: str, *,
                 run_dir: Path, extra: dict[str, dict[str, Any]] | None = None) -> None:
        config: dict[str, dict[str, Any]] = {
            "DEFAULT": {"host": host, "transport_url": TRANSPORT_URL,
                        "control_exchange": exchange, "debug": "true"},
            "vtpcm_rpc": topics(exchange),
            "agent": {"state_dir": workdir / ("state-" + host), "run_dir": run_dir,
                      "expose_data_socket": "true",
                      "engine_public_key": authn.public_key_path(
                          ensure_signing_key(exchange))},
            "host_tpm": {"tcti": tcti},
        }
        for section, values in (extra or {}).items():
            config.setdefault(section, {}).update(values)
        super().__init__(workdir, "agent-" + host, config)
        self.host = host

    @property
    def command_key(self) -> Path:
        """The host's command key, made by the agent ([agent] host_command_key)."""
        agent = self.config["agent"]
        configured = agent.get("host_command_key")
        return Path(configured) if configured else Path(agent["state_dir"]) / "host-command.key"

    def wait_ready(self, api: AgentAPI, timeout: float = 60.0) -> None:
        def ready() -> bool:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError("agent %s exited:\n%s" % (self.host, self.log_text()[-3000:]))
            return bool(api.health(self.host, timeout=2))
        wait_for("agent " + self.host, ready, timeout)


class EngineDaemon(Daemon):
    module = "vtpcm_nova.cmd.engine"

    def __init__(self, workdir: Path, exchange: str, connection: str, *,
                 extra: dict[str, dict[str, Any]] | None = None,
                 name: str = "engine", db_sync: bool = True) -> None:
        """``db_sync``: run ``vtpcm-manage db sync``'s function on
        ``connection`` before each start, as an operator does after
        installing the engine (False: start on the database as it is)."""
        self.db_sync = db_sync
        config: dict[str, dict[str, Any]] = {
            "DEFAULT": {"transport_url": TRANSPORT_URL, "control_exchange": exchange,
                        "debug": "true"},
            "vtpcm_rpc": topics(exchange),
            "engine": {"host": "engine-" + uuid.uuid4().hex[:6], "connection": connection,
                       "rpc_timeout": 20,
                       "command_signing_key": ensure_signing_key(exchange),
                       "admin_public_keys": authn.public_key_path(
                           ensure_operator_key(exchange))},
            # every attest quotes (tests and demos attest on purpose); the
            # unsigned-flood tests set the production interval
            # this tree's agents certify their storage parents (API 1.10)
            "attestation": {"auto_approve": "true", "interval": 0,
                            "min_unsigned_interval": 0,
                            "require_certified_parents": "true"},
            "migration": {"reconcile_interval": 0},
        }
        for section, values in (extra or {}).items():
            config.setdefault(section, {}).update(values)
        super().__init__(workdir, name, config)

    def start(self) -> None:
        if self.db_sync:
            migration.db_sync(str(self.config["engine"]["connection"]))
        super().start()

    def wait_ready(self, api: EngineAPI, timeout: float = 60.0) -> None:
        def ready() -> bool:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError("engine exited:\n%s" % self.log_text()[-3000:])
            api.list_hosts(timeout=2)
            return True
        wait_for("engine", ready, timeout)


def kill_pidfiles(directory: Path) -> None:
    """SIGKILL every process named by a pid file in ``directory`` that still runs
    one of our programs (python daemons, swtpm) and started before its pid
    file was written, then remove the pid files. Why the start time: a pid
    file left by a crashed earlier run may name a pid the kernel has given
    since to another test's swtpm or daemon (the test groups run at once),
    whose command line matches too."""
    if not directory.exists():
        return
    # an unprivileged swtpm keeps its pid file in its own dir (vm/<uuid>/)
    for pidfile in [*directory.glob("*.pid"), *directory.glob("vm/*/*.pid")]:
        try:
            pid = int(pidfile.read_text().strip() or 0)
            written = pidfile.stat().st_mtime
        except (OSError, ValueError):
            continue
        if pid > 1 and _ours(pid, written):
            LOG.info("Stopping leftover process %(pid)d (%(file)s)",
                     {"pid": pid, "file": pidfile.name})
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        pidfile.unlink(missing_ok=True)


def _ours(pid: int, written: float) -> bool:
    """Whether ``pid`` runs one of our programs and started no later than
    ``written`` (its pid file's mtime), with two seconds of slack for a
    small wall-clock step since the write: not a reused pid. (The start
    computed from /proc/stat's ``btime``, truncated to whole seconds, is at
    most a second early, never late.)"""
    try:
        cmdline = Path("/proc/%d/cmdline" % pid).read_bytes()
    except OSError:
        return False
    ticks = uidprocs.start_time(pid)
    if ticks is None or not (b"swtpm" in cmdline or b"vtpcm" in cmdline):
        return False
    return _boot_time() + ticks / os.sysconf("SC_CLK_TCK") <= written + 2.0


def _boot_time() -> float:
    """The boot time (seconds since the epoch) of /proc/stat's ``btime``."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    raise LabError(reason="/proc/stat has no btime line")
