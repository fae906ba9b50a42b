"""The engine's ``[nova]`` group: how it asks Nova's compute API.

keystoneauth1's session, auth and adapter options, registered as Nova
registers its own ``[placement]`` and ``[neutron]`` clients, plus the rule
for reaping shelved vTPCMs whose instances were deleted.
"""

import copy
from typing import Any

from keystoneauth1 import loading as ks_loading
from oslo_config import cfg

from vtpcm_common import config

GROUP = "nova"
SERVICE_TYPE = "compute"
DEFAULT_TIMEOUT = 30

nova_group = cfg.OptGroup(
    GROUP, title="Nova's compute API, as the engine asks it",
    help="Service credentials the engine uses to check that Nova is unshelving an "
         "instance onto the host that asks for its shelved vTPCM, and to find vTPCMs "
         "whose instances Nova deleted without their driver. Reaping needs the admin "
         "role (Nova's all_tenants listing of deleted servers, with "
         "OS-EXT-SRV-ATTR:host): with any other credential the engine reaps nothing "
         "and logs a WARNING. Without auth_type the engine refuses every unshelve "
         "onto another host than the holder and reaps no vTPCM.")
NOVA_OPTS = [
    cfg.IntOpt("deleted_confirmations", default=2, min=2,
               help="Consecutive reaper passes in which Nova's admin listing "
                    "(GET /servers/detail?all_tenants=1&deleted=true&uuid=...) must "
                    "show an instance deleted before the engine destroys its vTPCM "
                    "on its holder; the first and last of them must also be at least "
                    "(deleted_confirmations - 1) x reap_interval "
                    "seconds apart. A 404 never counts. Any other answer, a timeout "
                    "or an error starts the count over. Only SHELVED vTPCMs are "
                    "destroyed this way: an ACTIVE or STOPPED one is reported "
                    "(WARNING, audit vtpcm.orphan) for 'vtpcm-manage vtpcm destroy'."),
    cfg.IntOpt("reap_interval", default=300, min=0,
               help="Seconds between reaper passes, in a periodic task of their own "
                    "(never inside the migration reconcile). 0 disables the reaper. "
                    "Also the interval deleted_confirmations counts in."),
    cfg.IntOpt("reap_max_checks", default=50, min=1,
               help="Most Nova requests in one reaper pass; the next pass resumes "
                    "after the last instance asked, so every vTPCM is asked in turn."),
    cfg.IntOpt("reap_budget", default=60, min=1,
               help="Seconds after which a reaper pass stops asking Nova (it also "
                    "stops at the first timeout or error)."),
    cfg.BoolOpt("require_api_witness", default=True,
                help="Whether moving a shelved vTPCM to another host at unshelve, and "
                     "the reaper's shred of a vTPCM whose instance Nova shows deleted, "
                     "need nova-api's signed witness of the user's request (the "
                     "vtpcm_witness paste filter on every nova-api, see the operator "
                     "guide). Nova's database is no such witness: a compromised compute "
                     "host can write an instance's host, task_state and deletion "
                     "through nova-conductor. Without a witness an unshelve elsewhere "
                     "is refused (UnshelveNotAuthorized, naming this option) and the "
                     "reaper only reports. False: Nova's view alone, as before 1.12. "
                     "Either way the reaper shreds only SHELVED vTPCMs (ACTIVE and "
                     "STOPPED ones of instances Nova shows deleted are only reported), "
                     "and a witness counts only if requested since the vTPCM was "
                     "shelved."),
    cfg.ListOpt("api_witness_public_keys", default=[],
                help="PEM files of the nova-api witness public keys (each API node's "
                     "<[vtpcm] api_witness_key_file>.pub, or one shared key). A "
                     "witness signed by any of them counts; remove a file to retire a "
                     "key. Empty with require_api_witness: every unshelve elsewhere is "
                     "refused and the reaper only reports."),
    cfg.IntOpt("witness_max_age", default=600, min=30, max=3600,
               help="Seconds an unshelve witness stays usable after nova-api accepted "
                    "the request: Nova's conductor, scheduler and the target's "
                    "nova-compute must reach the driver's spawn within it. A delete "
                    "witness stays usable until it is purged (one day): the reaper "
                    "needs deleted_confirmations passes first."),
    cfg.ListOpt("witness_admin_projects", default=[],
                help="Keystone project ids whose users' unshelve witnesses count for "
                     "any server (operators who unshelve other projects' servers onto "
                     "a host). By default only a request from the server's own project "
                     "(Nova's tenant_id) moves its shelved vTPCM. Never list the "
                     "service project: nova-compute's service credentials are scoped "
                     "to it, and a compromised compute host would then get witnesses "
                     "of its own unshelve requests (nova-api's vtpcm_witness filter "
                     "also refuses requests with [vtpcm] api_witness_refused_roles)."),
]


def _ksa_opts() -> list[Any]:
    opts: list[Any] = (ks_loading.get_session_conf_options()
                       + ks_loading.get_auth_common_conf_options()
                       + ks_loading.get_auth_plugin_conf_options("password")
                       + ks_loading.get_auth_plugin_conf_options("v3password")
                       + ks_loading.get_auth_plugin_conf_options("admin_token")
                       + ks_loading.get_adapter_conf_options(include_deprecated=False))
    defaults = _defaults()
    seen: set[str] = set()
    unique = []
    for opt in opts:
        if opt.dest not in seen:
            seen.add(opt.dest)
            if opt.dest in defaults:  # documented as register_opts sets it
                opt = copy.deepcopy(opt)
                opt.default = defaults[opt.dest]
            unique.append(opt)
    return unique


def _defaults() -> dict[str, Any]:
    return {"service_type": SERVICE_TYPE, "valid_interfaces": ["internal", "public"],
            "timeout": DEFAULT_TIMEOUT}


def register_opts(conf: cfg.ConfigOpts) -> None:
    config.register(conf, nova_group, NOVA_OPTS)
    ks_loading.register_session_conf_options(conf, GROUP)
    ks_loading.register_auth_conf_options(conf, GROUP)
    ks_loading.register_adapter_conf_options(conf, GROUP, include_deprecated=False)
    for name, value in _defaults().items():
        conf.set_default(name, value, group=GROUP)


def list_opts() -> list[tuple[cfg.OptGroup, list[Any]]]:
    return [(nova_group, NOVA_OPTS + _ksa_opts())]
