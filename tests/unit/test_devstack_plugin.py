"""The DevStack plugin (devstack/plugin.sh, devstack/settings), run in bash.

Each test runs plugin phases the way stack.sh, unstack.sh and clean.sh do
(``settings`` sourced from a function, ``plugin.sh MODE PHASE`` sourced for
each phase, ``errexit`` and an ERR trap) against stub DevStack functions
(``tests/unit/devstack_stubs/functions.sh``) that record their calls, then
checks the recorded calls and the nova.conf / vTPCM config options the
plugin set. Nothing is installed or started. Also: shellcheck on the shell
files, and the Zuul job's YAML.
"""

import grp
import os
import pwd
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.unit.novapaste import NOVA_34_PIPELINES

REPO = Path(__file__).resolve().parents[2]
STUBS = REPO / "tests" / "unit" / "devstack_stubs" / "functions.sh"
PLUGIN = REPO / "devstack" / "plugin.sh"
SETTINGS = REPO / "devstack" / "settings"
LIVE_MIGRATE = REPO / "tools" / "zuul-live-migrate.sh"
TIMEOUT = 60

FILTER = "vtpcm_nova.scheduler.filters.vtpcm_filter.VTPCMFilter"
DRIVER = "vtpcm.VTPCMLibvirtDriver"
NOVA_FILTERS = ("ComputeFilter,ComputeCapabilitiesFilter,ImagePropertiesFilter,"
                "ServerGroupAntiAffinityFilter,ServerGroupAffinityFilter,"
                "SameHostFilter,DifferentHostFilter")
CONTROLLER = "mysql,rabbit,key,n-api,n-cond,n-sch,placement-api,vtpcm-engine"
COMPUTE = "n-cpu,placement-client,ovn-controller,q-ovn-agent,vtpcm-agent"
ALL_IN_ONE = CONTROLLER + ",n-cpu,vtpcm-agent"

# What stack.sh does around run_phase: settings from load_plugin_settings,
# plugin.sh from run_plugins, errexit and an ERR trap that ends the run.
RUNNER = r"""
set -o errexit
trap 'echo "ERR trap: $BASH_COMMAND" >&2; exit 97' ERR
source "$STUBS"
load_plugin_settings() { source "$REPO/devstack/settings"; }
run_plugins() { source "$REPO/devstack/plugin.sh" "$1" "$2"; }
load_plugin_settings
for step in "$@"; do
    case "$step" in
        start-nova-compute) stub_start_nova_compute ;;
        sh:*) eval "${step#sh:}" ;;
        *:*) run_plugins "${step%%:*}" "${step#*:}" ;;
        *) run_plugins "$step" "" ;;
    esac
done
"""

# nova-api's paste config as DevStack installs Nova 34's (the parts that matter)
NOVA_PASTE = NOVA_34_PIPELINES + """
[filter:keystonecontext]
paste.filter_factory = nova.api.auth:NovaKeystoneContext.factory
"""
FAKE_PYTHON = r"""#!/bin/bash
# Fake interpreter of DevStack's venv: records its call, answers the
# plugin's few questions.
{ printf 'python3'; printf '\t%s' "$@"; printf '\n'; } >> "$STUB_CALLS"
case "$*" in
    *SpecifierSet*) [[ "${STUB_NOVA_SUPPORTED:-1}" == 1 ]]; exit ;;
    *'m.version("nova")'*) echo "${STUB_NOVA_VERSION:-34.0.0}" ;;
    *nova.virt.__file__*) echo "$STUB_NOVA_VIRT" ;;
esac
"""

FAKE_RECORDER = r"""#!/bin/bash
{ printf '%s' "$(basename "$0")"; printf '\t%s' "$@"; printf '\n'; } >> "$STUB_CALLS"
"""


class Run:
    """One bash run of plugin phases: exit status, output, calls, options."""

    def __init__(self, env: dict[str, str], proc: subprocess.CompletedProcess[str]):
        self.env = env
        self.returncode = proc.returncode
        self.output = proc.stdout + proc.stderr
        calls_file = Path(env["STUB_CALLS"])
        text = calls_file.read_text() if calls_file.exists() else ""
        self.calls = [line.split("\t") for line in text.splitlines()]
        self.options: list[tuple[str, str, str, str]] = []
        for line in Path(env["STUB_INI"]).read_text().splitlines():
            file, section, option, value = line.split("\t", 3)
            self.options.append((file, section, option, value))

    def named(self, name: str) -> list[list[str]]:
        return [c[1:] for c in self.calls if c[0] == name]

    def values(self, conf: str, section: str, option: str) -> list[str]:
        return [v for f, s, o, v in self.options
                if (f, s, o) == (self.env[conf] if conf.isupper() else conf, section, option)]

    def value(self, conf: str, section: str, option: str) -> str | None:
        values = self.values(conf, section, option)
        assert len(values) <= 1, values
        return values[0] if values else None

    def ran(self, *argv: str) -> bool:
        """True if a recorded call starts with ``argv``."""
        return any(c[:len(argv)] == list(argv) for c in self.calls)

    def __repr__(self) -> str:
        return "<Run rc=%s>\n%s" % (self.returncode, self.output[-4000:])


@pytest.fixture
def devstack(tmp_path: Path):
    """Runs plugin phases; ``devstack(services, *steps, **env)``."""
    stub_bin = tmp_path / "venv" / "bin"
    vtpcm_src = tmp_path / "opt" / "stack" / "vtpcm"
    nova_virt = tmp_path / "opt" / "stack" / "nova" / "nova" / "virt"
    for d in (stub_bin, vtpcm_src / "tools", nova_virt / "vtpcm", tmp_path / "etc" / "nova",
              tmp_path / "etc" / "vtpcm", tmp_path / "home",
              tmp_path / "apparmor.d" / "abstractions"):
        d.mkdir(parents=True, exist_ok=True)
    executables = {stub_bin / "python3": FAKE_PYTHON,
                   stub_bin / "vtpcm-manage": FAKE_RECORDER,
                   vtpcm_src / "tools" / "install-nova-shim.sh": FAKE_RECORDER}
    for path, text in executables.items():
        path.write_text(text)
        path.chmod(0o755)
    (tmp_path / "etc" / "nova" / "api-paste.ini").write_text(NOVA_PASTE)
    aa = tmp_path / "apparmor.d"
    (aa / "abstractions" / "libvirt-qemu").write_text(
        "  /dev/kvm rw,\n  #include <local/abstractions/libvirt-qemu>\n")
    (aa / "usr.bin.swtpm").write_text("profile swtpm /usr/bin/swtpm {\n"
                                      "  #include <local/usr.bin.swtpm>\n}\n")

    def run(services: str, *steps: str, **extra: str) -> Run:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(tmp_path / "home"),
            "LANG": "C.UTF-8",
            "REPO": str(REPO),
            "STUBS": str(STUBS),
            "STUB_CALLS": str(tmp_path / "calls.tsv"),
            "STUB_INI": str(tmp_path / "ini.tsv"),
            "STUB_BIN": str(stub_bin),
            "STUB_NOVA_VIRT": str(nova_virt),
            "ENABLED_SERVICES": services,
            "DEST": str(tmp_path / "opt" / "stack"),
            "STACK_USER": _user(),
            "LIBVIRT_GROUP": "libvirt",
            "REGION_NAME": "RegionOne",
            "KEYSTONE_SERVICE_URI": "http://keystone.devstack.test/identity",
            "SERVICE_PASSWORD": "devstack-service-password",
            "SERVICE_DOMAIN_NAME": "Default",
            "SERVICE_PROJECT_NAME": "service",
            "DATABASE_BACKENDS": "mysql postgresql",
            "ENABLE_DEBUG_LOG_LEVEL": "True",
            "NOVA_CONF": str(tmp_path / "etc" / "nova" / "nova.conf"),
            "NOVA_CPU_CONF": str(tmp_path / "etc" / "nova" / "nova-cpu.conf"),
            "NOVA_BIN_DIR": str(stub_bin),
            "NOVA_FILTERS": NOVA_FILTERS,
            "VTPCM_CONF_DIR": str(tmp_path / "etc" / "vtpcm"),
            "VTPCM_AGENT_CONF": str(tmp_path / "etc" / "vtpcm" / "vtpcm-agent.conf"),
            "VTPCM_ENGINE_CONF": str(tmp_path / "etc" / "vtpcm" / "vtpcm-engine.conf"),
            "VTPCM_STATE_DIR": str(tmp_path / "var" / "lib" / "vtpcm"),
            "VTPCM_RUN_DIR": str(tmp_path / "run" / "vtpcm"),
            "VTPCM_ENGINE_STATE_DIR": str(tmp_path / "var" / "lib" / "vtpcm-engine"),
            "VTPCM_HOST_COMMAND_KEY": str(tmp_path / "var" / "lib" / "vtpcm-nova" / "hck.key"),
            "VTPCM_HOST_TPM": "swtpm",
            "VTPCM_APPARMOR": "True",
            "VTPCM_APPARMOR_DIR": str(aa),
        }
        env.update(extra)
        ini = Path(env["STUB_INI"])
        if not ini.exists():
            # What DevStack's create_nova_conf wrote before the plugin runs.
            ini.write_text("%s\tfilter_scheduler\tenabled_filters\t%s\n"
                           % (env["NOVA_CONF"], NOVA_FILTERS))
        proc = subprocess.run(["bash", "-c", RUNNER, "runner", *steps], env=env,
                              capture_output=True, text=True, timeout=TIMEOUT, check=False)
        return Run(env, proc)

    run.tmp_path = tmp_path  # type: ignore[attr-defined]
    return run


def _user() -> str:
    return pwd.getpwuid(os.getuid()).pw_name


STACK = ("stack:install", "stack:post-config", "start-nova-compute", "stack:extra")


# --- controller ------------------------------------------------------------------

def test_controller_configures_the_scheduler_filter(devstack):
    run = devstack(CONTROLLER, *STACK)
    assert run.returncode == 0, run
    assert run.values("NOVA_CONF", "filter_scheduler", "available_filters") == [
        "nova.scheduler.filters.all_filters", FILTER]
    # a second available_filters line, with DevStack's iniadd
    assert run.named("iniadd") == [
        [run.env["NOVA_CONF"], "filter_scheduler", "available_filters", FILTER]]
    assert run.value("NOVA_CONF", "filter_scheduler", "enabled_filters") == \
        NOVA_FILTERS + ",VTPCMFilter"
    assert run.ran("iniget", run.env["NOVA_CONF"], "filter_scheduler", "enabled_filters")


def test_controller_nova_vtpcm_options_match_the_daemons(devstack):
    run = devstack(CONTROLLER, *STACK)
    assert run.returncode == 0, run
    url = run.value("VTPCM_ENGINE_CONF", "DEFAULT", "transport_url")
    assert url and url.startswith("rabbit://")
    assert run.value("NOVA_CONF", "vtpcm", "transport_url") == url
    assert run.value("VTPCM_ENGINE_CONF", "DEFAULT", "control_exchange") == "openstack"
    assert run.value("NOVA_CONF", "vtpcm", "control_exchange") == "openstack"
    assert run.ran("iniset_rpc_backend", "vtpcm", run.env["NOVA_CONF"], "vtpcm")


def test_controller_is_not_a_compute(devstack):
    run = devstack(CONTROLLER, *STACK)
    assert run.returncode == 0, run
    assert run.value("NOVA_CONF", "DEFAULT", "compute_driver") is None
    assert not run.named("install-nova-shim.sh")
    assert not run.named("virsh")
    assert ["swtpm", "swtpm-tools"] not in run.named("install_package")
    assert not any(c[0] == "vtpcm-agent" for c in run.named("run_process"))


def test_controller_runs_the_engine_with_its_key_and_database(devstack):
    run = devstack(CONTROLLER, *STACK)
    assert run.returncode == 0, run
    assert ["libtss2-dev", "pkg-config", "gcc", "python3-dev"] in run.named("install_package")
    assert run.named("setup_develop") == [[run.env["DEST"] + "/vtpcm"]]
    assert run.named("recreate_database") == [["vtpcm"]]
    assert ["--config-file", run.env["VTPCM_CONF_DIR"] + "/vtpcm-engine.conf", "db", "sync"] \
        in run.named("vtpcm-manage")
    key = run.value("VTPCM_ENGINE_CONF", "engine", "command_signing_key")
    assert key == run.env["VTPCM_ENGINE_STATE_DIR"] + "/engine-signing.key"
    # The engine runs as the stack user: its key directory is the stack
    # user's, and the key is made without sudo.
    assert run.ran("sudo", "install", "-d", "-o", run.env["STACK_USER"], "-m", "0700",
                   run.env["VTPCM_ENGINE_STATE_DIR"])
    made = [c for c in run.named("python3") if "load_or_create_signing_key" in " ".join(c)]
    assert made and made[0][-1] == key
    assert not any("load_or_create_signing_key" in " ".join(c) for c in run.named("sudo"))
    assert ["keys", "create", run.env["HOME"] + "/.vtpcm/operator.key"] in \
        run.named("vtpcm-manage")
    engine = [c for c in run.named("run_process") if c[0] == "vtpcm-engine"]
    assert engine and "--config-file " + run.env["VTPCM_CONF_DIR"] + "/vtpcm-engine.conf" \
        in engine[0][1]


def test_controller_gives_the_engine_nova_service_credentials(devstack):
    run = devstack(CONTROLLER, *STACK)
    assert run.returncode == 0, run
    section = {k: run.value("VTPCM_ENGINE_CONF", "nova", k) for k in (
        "auth_type", "auth_url", "username", "password", "project_name", "region_name")}
    assert section == {"auth_type": "password", "auth_url": run.env["KEYSTONE_SERVICE_URI"],
                       "username": "nova", "password": run.env["SERVICE_PASSWORD"],
                       "project_name": "service", "region_name": "RegionOne"}


def test_controller_puts_the_witness_filter_into_nova_apis_pipelines(devstack):
    run = devstack(CONTROLLER, *STACK)
    assert run.returncode == 0, run
    paste = (Path(run.env["NOVA_CONF"]).parent / "api-paste.ini").read_text()
    assert "authtoken keystonecontext vtpcm_witness osapi_compute_app_v21\n" in paste
    assert "keystonecontext vtpcm_witness legacy_v2_compatible" in paste
    assert "[filter:keystonecontext]\n" in paste  # the section header untouched
    assert paste.count("[filter:vtpcm_witness]\npaste.filter_factory = "
                       "vtpcm_nova.api.witness:filter_factory\n") == 1
    key = run.env["VTPCM_ENGINE_STATE_DIR"] + "/nova-api-witness.key"
    assert run.value("NOVA_CONF", "vtpcm", "api_witness_key_file") == key
    assert ["keys", "create", key] in run.named("vtpcm-manage")
    assert run.value("VTPCM_ENGINE_CONF", "nova", "require_api_witness") == "True"
    assert run.value("VTPCM_ENGINE_CONF", "nova", "api_witness_public_keys") == key + ".pub"
    # stacked again: the filter once
    again = devstack(CONTROLLER, *STACK)
    assert again.returncode == 0, again
    twice = (Path(run.env["NOVA_CONF"]).parent / "api-paste.ini").read_text()
    assert twice.count("vtpcm_witness") == paste.count("vtpcm_witness")


def test_witness_off_leaves_nova_api_alone_and_says_so_to_the_engine(devstack):
    run = devstack(CONTROLLER, *STACK, VTPCM_API_WITNESS="False")
    assert run.returncode == 0, run
    paste = (Path(run.env["NOVA_CONF"]).parent / "api-paste.ini").read_text()
    assert "vtpcm_witness" not in paste
    assert run.value("NOVA_CONF", "vtpcm", "api_witness_key_file") is None
    assert run.value("VTPCM_ENGINE_CONF", "nova", "require_api_witness") == "False"


def test_controller_creates_the_flavor(devstack):
    run = devstack(CONTROLLER, *STACK)
    assert run.returncode == 0, run
    cmds = run.named("openstack")
    show = [c for c in cmds if "show" in c]
    create = [c for c in cmds if "create" in c]
    assert show and show[0][-1] == "vtpcm.small"
    assert len(create) == 1
    args = create[0]
    assert args[:3] == ["--os-region-name=RegionOne", "flavor", "create"]
    assert args[-1] == "vtpcm.small"
    assert args[args.index("--property") + 1] == "vtpcm:enabled=true"
    assert [args[args.index(o) + 1] for o in ("--ram", "--disk", "--vcpus")] == \
        ["512", "1", "1"]
    # The flavor comes after the engine, in the extra phase.
    phases = [c[0] for c in run.named("echo_summary")]
    assert phases[-1] == "Starting vtpcm"


def test_existing_flavor_is_kept(devstack):
    run = devstack(CONTROLLER, *STACK, STUB_FLAVOR_EXISTS="1")
    assert run.returncode == 0, run
    assert not [c for c in run.named("openstack") if "create" in c]


def test_filter_configuration_is_idempotent(devstack):
    run = devstack(CONTROLLER, "stack:post-config", "stack:post-config")
    assert run.returncode == 0, run
    assert run.values("NOVA_CONF", "filter_scheduler", "available_filters") == [
        "nova.scheduler.filters.all_filters", FILTER]
    assert run.value("NOVA_CONF", "filter_scheduler", "enabled_filters") == \
        NOVA_FILTERS + ",VTPCMFilter"


def test_filter_added_to_operator_available_filters(devstack):
    conf = str(devstack.tmp_path / "etc" / "nova" / "nova.conf")
    run = devstack(CONTROLLER,
                   "sh:iniset_multiline \"$NOVA_CONF\" filter_scheduler available_filters"
                   " nova.scheduler.filters.all_filters my.Filter",
                   "stack:post-config")
    assert run.returncode == 0, run
    assert run.values(conf, "filter_scheduler", "available_filters") == [
        "nova.scheduler.filters.all_filters", "my.Filter", FILTER]


# --- compute ----------------------------------------------------------------------

def compute_run(devstack, *steps, **env):
    env.setdefault("VTPCM_ENGINE_PUBLIC_KEY", "/etc/vtpcm/engine-signing.key.pub")
    return devstack(COMPUTE, *(steps or STACK), **env)


def test_compute_sets_the_driver(devstack):
    run = compute_run(devstack)
    assert run.returncode == 0, run
    assert run.value("NOVA_CONF", "DEFAULT", "compute_driver") == DRIVER
    # n-cpu's own file, made by DevStack from nova.conf when it starts n-cpu
    assert run.value("NOVA_CPU_CONF", "DEFAULT", "compute_driver") == DRIVER
    assert run.ran("iniget", run.env["NOVA_CPU_CONF"], "DEFAULT", "compute_driver")


def test_compute_nova_vtpcm_options(devstack):
    run = compute_run(devstack)
    assert run.returncode == 0, run
    key = run.env["VTPCM_HOST_COMMAND_KEY"]
    assert run.value("NOVA_CPU_CONF", "vtpcm", "host_command_key") == key
    # the engine key the agent pins checks the engine's signed key answers
    assert run.value("NOVA_CPU_CONF", "vtpcm", "engine_public_key") == \
        run.value("VTPCM_AGENT_CONF", "agent", "engine_public_key")
    assert run.value("NOVA_CPU_CONF", "vtpcm", "socket_dirs") == run.env["VTPCM_RUN_DIR"]
    # a deletion any compute can forge must not make nova-compute destroy a guest
    assert run.value("NOVA_CPU_CONF", "DEFAULT", "running_deleted_instance_action") == "log"
    assert run.value("NOVA_CPU_CONF", "vtpcm", "control_exchange") == "openstack"
    url = run.value("VTPCM_AGENT_CONF", "DEFAULT", "transport_url")
    assert url and run.value("NOVA_CPU_CONF", "vtpcm", "transport_url") == url
    assert run.value("VTPCM_AGENT_CONF", "DEFAULT", "control_exchange") == "openstack"
    assert run.value("VTPCM_AGENT_CONF", "agent", "run_dir") == run.env["VTPCM_RUN_DIR"]


def test_compute_host_command_key_readable_by_nova_compute(devstack):
    run = compute_run(devstack)
    assert run.returncode == 0, run
    key = run.env["VTPCM_HOST_COMMAND_KEY"]
    assert run.value("VTPCM_AGENT_CONF", "agent", "host_command_key") == key
    # DevStack runs n-cpu with Group=$LIBVIRT_GROUP
    assert run.value("VTPCM_AGENT_CONF", "agent", "host_command_key_group") == "libvirt"
    assert run.ran("sudo", "install", "-d", "-o", "root", "-g", "libvirt", "-m", "0750",
                   os.path.dirname(key))


def test_host_command_key_group_override(devstack):
    run = compute_run(devstack, "stack:post-config", VTPCM_HOST_COMMAND_KEY_GROUP="nova")
    assert run.returncode == 0, run
    assert run.value("VTPCM_AGENT_CONF", "agent", "host_command_key_group") == "nova"


def test_host_command_key_group_without_libvirt_group(devstack):
    run = compute_run(devstack, "stack:post-config", LIBVIRT_GROUP="")
    assert run.returncode == 0, run
    assert run.value("VTPCM_AGENT_CONF", "agent", "host_command_key_group") == \
        grp.getgrgid(os.getgid()).gr_name


def test_host_command_key_in_the_state_dir_is_refused(devstack):
    run = compute_run(devstack, "stack:post-config",
                      VTPCM_HOST_COMMAND_KEY="/nonexistent/state/hck.key",
                      VTPCM_STATE_DIR="/nonexistent/state")
    assert run.returncode != 0, run
    assert any("must not be in" in c[-1] for c in run.named("die"))


def test_compute_installs_swtpm_and_the_shim(devstack):
    run = compute_run(devstack)
    assert run.returncode == 0, run
    assert ["swtpm", "swtpm-tools"] in run.named("install_package")
    assert run.named("install-nova-shim.sh") == [[run.env["STUB_BIN"] + "/python3"]]
    assert run.named("virsh") == [["--version"]]
    assert (REPO / "tools" / "install-nova-shim.sh").is_file()


def test_compute_runs_the_agent_and_standin(devstack):
    run = compute_run(devstack)
    assert run.returncode == 0, run
    assert ["vtpcm-hosttpm"] in run.named("enable_service")
    procs = {c[0]: c for c in run.named("run_process")}
    assert set(procs) == {"vtpcm-hosttpm", "vtpcm-agent"}
    assert procs["vtpcm-agent"][-1] == "root"
    assert run.value("VTPCM_AGENT_CONF", "host_tpm", "tcti").startswith("swtpm:path=")
    assert run.value("VTPCM_AGENT_CONF", "agent", "engine_public_key") == \
        "/etc/vtpcm/engine-signing.key.pub"
    assert run.value("VTPCM_AGENT_CONF", "agent", "socket_user") == "libvirt-qemu"


def test_compute_does_not_touch_scheduler_or_flavors(devstack):
    run = compute_run(devstack)
    assert run.returncode == 0, run
    assert run.values("NOVA_CONF", "filter_scheduler", "available_filters") == []
    assert run.value("NOVA_CONF", "filter_scheduler", "enabled_filters") == NOVA_FILTERS
    assert not run.named("openstack")
    assert not run.named("recreate_database")


def test_compute_apparmor_rules(devstack):
    run = compute_run(devstack, "stack:post-config")
    assert run.returncode == 0, run
    aa = run.env["VTPCM_APPARMOR_DIR"]
    tees = [c[-1] for c in run.named("sudo") if c[0] == "tee"]
    assert tees == [aa + "/local/abstractions/libvirt-qemu", aa + "/local/usr.bin.swtpm"]
    lines = [c[0] for c in run.named("tee-input")]
    assert '  "%s/*.ctrl" rw,' % run.env["VTPCM_RUN_DIR"] in lines
    assert '  "%s/**" rwk,' % run.env["VTPCM_STATE_DIR"] in lines
    assert run.ran("sudo", "apparmor_parser", "-r", aa + "/usr.bin.swtpm")


def test_compute_apparmor_off(devstack):
    run = compute_run(devstack, "stack:post-config", VTPCM_APPARMOR="False")
    assert run.returncode == 0, run
    assert not [c for c in run.named("sudo") if c[0] in ("tee", "apparmor_parser")]


def test_old_libvirt_stops_the_run(devstack):
    run = compute_run(devstack, STUB_LIBVIRT_VERSION="8.0.0")
    assert run.returncode != 0, run
    dies = run.named("die")
    assert len(dies) == 1 and "libvirt 8.0.0 is too old" in dies[0][-1]
    assert ">= 9.0" in dies[0][-1]
    assert not run.named("install-nova-shim.sh")


def test_unknown_libvirt_version_warns(devstack):
    run = compute_run(devstack, "stack:install", STUB_LIBVIRT_VERSION="")
    assert run.returncode == 0, run
    assert any("cannot tell the libvirt version" in c[-1] for c in run.named("warn"))
    assert run.named("install-nova-shim.sh")


def test_nova_cpu_conf_with_another_driver_stops_the_run(devstack):
    run = compute_run(devstack, "stack:install", "stack:post-config", "start-nova-compute",
                      'sh:iniset "$NOVA_CPU_CONF" DEFAULT compute_driver libvirt.LibvirtDriver',
                      "stack:extra")
    assert run.returncode != 0, run
    assert any("compute_driver = 'libvirt.LibvirtDriver'" in c[-1] for c in run.named("die"))


def test_per_project_venv_is_refused(devstack):
    other = devstack.tmp_path / "nova.venv" / "bin"
    other.mkdir(parents=True)
    run = compute_run(devstack, "stack:install", NOVA_BIN_DIR=str(other))
    assert run.returncode != 0, run
    assert any("per-project virtualenvs" in c[-1] for c in run.named("die"))


def test_unsupported_nova_warns_and_goes_on(devstack):
    run = compute_run(devstack, "stack:install", STUB_NOVA_SUPPORTED="0",
                      STUB_NOVA_VERSION="35.0.0")
    assert run.returncode == 0, run
    assert any("Nova 35.0.0 is outside" in c[-1] for c in run.named("warn"))
    assert run.named("install-nova-shim.sh")


def test_missing_qemu_user_warns_and_goes_on(devstack):
    """DevStack's warn returns the status it is called with: the plugin must
    not call it where that is non-zero, or stack.sh stops."""
    run = compute_run(devstack, "stack:post-config", STUB_NO_QEMU_USER="1")
    assert run.returncode == 0, run
    assert any("no QEMU user" in c[-1] for c in run.named("warn"))
    assert run.value("VTPCM_AGENT_CONF", "agent", "socket_user") is None


def test_missing_key_group_stops_the_run(devstack):
    run = compute_run(devstack, "stack:post-config", STUB_NO_GROUP="1")
    assert run.returncode != 0, run
    assert any("no group 'libvirt'" in c[-1] for c in run.named("die"))


def test_configure_nova_false_leaves_nova_alone(devstack):
    run = devstack(ALL_IN_ONE, *STACK, VTPCM_CONFIGURE_NOVA="False")
    assert run.returncode == 0, run
    assert not [o for o in run.options if o[0] == run.env["NOVA_CONF"]
                and o[2] != "enabled_filters"]
    assert run.value("NOVA_CONF", "filter_scheduler", "enabled_filters") == NOVA_FILTERS
    assert not run.named("install-nova-shim.sh")
    assert not run.named("openstack")
    assert {c[0] for c in run.named("run_process")} == \
        {"vtpcm-engine", "vtpcm-hosttpm", "vtpcm-agent"}


# --- all-in-one, unstack, clean -------------------------------------------------------

def test_all_in_one(devstack):
    run = devstack(ALL_IN_ONE, *STACK)
    assert run.returncode == 0, run
    assert run.value("NOVA_CPU_CONF", "DEFAULT", "compute_driver") == DRIVER
    assert run.values("NOVA_CONF", "filter_scheduler", "available_filters") == [
        "nova.scheduler.filters.all_filters", FILTER]
    assert run.value("VTPCM_AGENT_CONF", "agent", "host_command_key_group") == "libvirt"
    assert run.value("VTPCM_AGENT_CONF", "agent", "engine_public_key") == \
        run.env["VTPCM_ENGINE_STATE_DIR"] + "/engine-signing.key.pub"
    assert [c[0] for c in run.named("run_process")] == \
        ["vtpcm-engine", "vtpcm-hosttpm", "vtpcm-agent"]
    assert len([c for c in run.named("openstack") if "create" in c]) == 1
    assert run.named("install-nova-shim.sh")


def test_unstack_stops_services(devstack):
    run = devstack(ALL_IN_ONE, "unstack")
    assert run.returncode == 0, run
    assert [c[0] for c in run.named("stop_process")] == \
        ["vtpcm-agent", "vtpcm-hosttpm", "vtpcm-engine"]
    assert not run.named("run_process")


def test_clean_removes_state_keys_shim_and_apparmor_rules(devstack):
    shim = devstack.tmp_path / "opt" / "stack" / "nova" / "nova" / "virt" / "vtpcm"
    (shim / "__init__.py").write_text("")
    local_rules = devstack.tmp_path / "apparmor.d" / "local" / "abstractions" / "libvirt-qemu"
    local_rules.parent.mkdir(parents=True)
    local_rules.write_text("  /srv/site r,\n# vtpcm-devstack begin\n  \"/run/vtpcm/*.ctrl\" rw,\n"
                           "# vtpcm-devstack end\n")
    run = devstack(ALL_IN_ONE, "clean")
    assert run.returncode == 0, run
    env = run.env
    assert run.ran("sudo", "rm", "-rf", env["VTPCM_STATE_DIR"], env["VTPCM_RUN_DIR"])
    assert run.ran("sudo", "rm", "-rf", os.path.dirname(env["VTPCM_HOST_COMMAND_KEY"]))
    assert run.ran("sudo", "rm", "-rf", env["VTPCM_ENGINE_STATE_DIR"])
    assert not shim.exists()
    aa = env["VTPCM_APPARMOR_DIR"]
    assert run.ran("sudo", "rm", "-f", aa + "/abstractions/libvirt-qemu.d/vtpcm")
    seds = [c for c in run.named("sudo") if c[0] == "sed"]
    assert [c[-1] for c in seds] == [str(local_rules)]
    # the sed program deletes exactly the plugin's block
    proc = subprocess.run(["sed", seds[0][2], str(local_rules)], capture_output=True,
                          text=True, timeout=TIMEOUT, check=True)
    assert proc.stdout == "  /srv/site r,\n"


# --- static checks ----------------------------------------------------------------------

SHELL_FILES = [PLUGIN, SETTINGS, LIVE_MIGRATE, STUBS]


def test_shellcheck():
    shellcheck = shutil.which("shellcheck")
    assert shellcheck is not None, \
        "shellcheck is not installed (Debian package shellcheck; tools/install-deps.sh installs it)"
    proc = subprocess.run([shellcheck, "-s", "bash", *map(str, SHELL_FILES)],
                          capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_shell_files_parse():
    for path in SHELL_FILES:
        proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True,
                              timeout=TIMEOUT, check=False)
        assert proc.returncode == 0, (path, proc.stderr)


def test_live_migrate_script_is_executable():
    assert LIVE_MIGRATE.stat().st_mode & stat.S_IXUSR


def test_zuul_job():
    config = yaml.safe_load((REPO / ".zuul.yaml").read_text())
    jobs = {item["job"]["name"]: item["job"] for item in config if "job" in item}
    job = jobs["vtpcm-devstack-multinode"]
    assert job["parent"] == "devstack"
    assert "two-node" in job["nodeset"]
    assert job["vars"]["devstack_plugins"] == {"vtpcm": "https://opendev.org/x/vtpcm"}
    assert job["vars"]["devstack_services"]["vtpcm-engine"] is True
    assert job["vars"]["devstack_services"]["vtpcm-agent"] is True
    subnode = job["group-vars"]["subnode"]
    assert subnode["devstack_services"]["vtpcm-agent"] is True
    assert "vtpcm-engine" not in subnode["devstack_services"]
    assert subnode["devstack_localrc"]["VTPCM_ENGINE_PUBLIC_KEY"] == \
        "/etc/vtpcm/engine-signing.key.pub"
    projects = [item["project"] for item in config if "project" in item]
    assert "vtpcm-devstack-multinode" in projects[0]["check"]["jobs"]
    for key in ("pre-run", "run"):
        playbook = REPO / job[key]
        assert playbook.is_file(), playbook
        assert isinstance(yaml.safe_load(playbook.read_text()), list)
    pre = yaml.safe_load((REPO / job["pre-run"]).read_text())
    copied = [t for play in pre if play["hosts"] == "subnode" for t in play["tasks"]
              if "copy" in t]
    assert copied[0]["copy"]["dest"] == subnode["devstack_localrc"]["VTPCM_ENGINE_PUBLIC_KEY"]
    run = yaml.safe_load((REPO / job["run"]).read_text())
    assert any("orchestrate-devstack" in play.get("roles", []) for play in run)
    commands = [t["command"] for play in run for t in play.get("tasks", []) if "command" in t]
    assert any(c.endswith("/vtpcm/tools/zuul-live-migrate.sh") for c in commands)
