"""Options of the Nova side (nova-compute's driver and nova-scheduler's filter).

They live in ``nova.conf`` under ``[vtpcm]``; nothing here imports Nova, so
the options can be documented and checked without it.
"""

from typing import Any

from oslo_config import cfg

from vtpcm_common import config
from vtpcm_nova.conf import api

vtpcm_group = cfg.OptGroup(
    "vtpcm", title="vTPCM for Nova",
    help="How nova-compute's VTPCMLibvirtDriver and nova-scheduler's VTPCMFilter reach "
         "the vtpcm-engine and the local vtpcm-agent.")
VTPCM_OPTS = [
    cfg.StrOpt("transport_url", secret=True,
               help="oslo.messaging URL of the broker the vtpcm-engine and agents use. "
                    "Unset: Nova's own [DEFAULT] transport_url."),
    cfg.StrOpt("control_exchange", default="openstack",
               help="The exchange the vtpcm-engine and agents use: their [DEFAULT] "
                    "control_exchange (Nova's own is 'nova', theirs defaults to "
                    "'openstack')."),
    cfg.StrOpt("host_command_key", default="/var/lib/vtpcm/host-command.key",
               help="The compute host's Ed25519 command key, made by its vtpcm-agent "
                    "([agent] host_command_key; group-readable by nova-compute through "
                    "[agent] host_command_key_group). The driver signs its engine calls "
                    "with it; it holds no other key."),
    cfg.StrOpt("engine_public_key",
               help="The vtpcm-engine's command public key (PEM), the same file the "
                    "agents pin as [agent] engine_public_key (the engine writes it to "
                    "<[engine] command_signing_key>.pub). The driver takes another "
                    "host's command key (to check that host's agent replies during a "
                    "live migration) only from an engine answer signed with it. Unset: "
                    "no other host's reply counts, so live migrations of vTPCM "
                    "instances fail closed (rolled back, the guest stays)."),
    cfg.ListOpt("socket_dirs", default=["/run/vtpcm"],
                help="Directories where the agents' vTPCM control sockets may be: their "
                     "[agent] run_dir (the same on every host in a normal deployment). "
                     "The driver connects a guest only to <one of these>/<instance "
                     "uuid>.ctrl, whatever an agent's (unsigned) answer says."),
    cfg.FloatOpt("engine_timeout", default=120.0, min=1.0,
                 help="Seconds the driver waits for the engine to answer one call. begin "
                      "seals and prepares the destination within it."),
    cfg.FloatOpt("early_begin_timeout", default=60.0, min=0.0,
                 help="Seconds a live migration's begin, started in the background at "
                      "the source's check, waits for the source's live_migration to "
                      "take it over; after that (or as soon as Nova's migration record "
                      "ends, or a check for another destination arrives) it is aborted "
                      "and the vTPCM is free again. A begin aborted this way costs only "
                      "time: live_migration begins again. 0: no early begin, the begin "
                      "runs in live_migration only."),
    cfg.FloatOpt("agent_timeout", default=10.0, min=0.5,
                 help="Seconds to wait for an agent's read-only answer (health, where "
                      "a vTPCM's socket is)."),
    cfg.FloatOpt("verdict_cache_seconds", default=5.0, min=0.0,
                 help="How long VTPCMFilter reuses the verdicts fetched for one "
                      "scheduling request (0: fetch for every request)."),
    cfg.FloatOpt("scheduler_timeout", default=5.0, min=0.5,
                 help="Seconds VTPCMFilter waits for the engine's verdicts: one deadline "
                      "for the whole fetch, every page of it included. When the engine "
                      "does not answer within it, vtpcm: requests find no valid host (fail "
                      "closed) until the next try; other requests are not affected."),
    cfg.BoolOpt("evacuate_with_fresh_vtpcm", default=False,
                help="Evacuate vTPCM instances with a fresh vTPCM: the TPM state on the "
                     "failed host (sealed keys, NV indices, the EK) is lost for good, "
                     "and the guest boots with a new, empty TPM. Off: an evacuation of a "
                     "vTPCM instance fails with an instance fault and the server stays "
                     "on the failed host. The engine still refuses while the failed "
                     "host's agent answers, and audits each one as state loss. Set it "
                     "on the compute nodes that may take evacuated instances."),
    cfg.BoolOpt("qemu_dac_label", default=False,
                help="Run each vTPCM guest's QEMU as a uid and gid of its own, which its "
                     "host's vtpcm-agent reserved beside the VM's swtpm uid: a static "
                     "libvirt DAC label +QEMU_UID:+VM_GID, so that only this VM's QEMU "
                     "reaches its 0660 control socket and no QEMU can ptrace another. Needs "
                     "a privileged libvirtd (qemu:///system), the agent's [agent] "
                     "swtpm_uid_range and qemu_uid_range set and [agent] socket_user "
                     "unset, and qemu_uid_range / vm_gid_range here. The driver pins every "
                     "disk's backing files outside the instance's directory (Nova's "
                     "_base) so libvirt never relabels them (disk formats never guessed), "
                     "in every guest's XML, guests without a vTPCM too (whose live "
                     "snapshots are then taken cold: managed save, qemu-img, restore; "
                     "refused for a running guest that cannot be saved, such as one with "
                     "a vGPU or SEV; a guest leaving the host is pinned in its migration "
                     "XML, live migrations in are refused from a host that does not pin "
                     "(without the option, or not running this release's driver: upgrade "
                     "every host before turning it on anywhere), and a guest saved by a "
                     "rescue is pinned at unrescue, a vTPCM one saved unlabelled refused); "
                     "refuses a labelled guest a backing file not owned by root (or "
                     "nova-compute's user) or writable by group or others; "
                     "refuses multiattach volumes, and for a labelled guest live "
                     "snapshots, volume swaps, assisted volume snapshots and non-raw file "
                     "volumes (libvirt would relabel _base), and live-migrates with the "
                     "destination agent's ids. Enable it on a "
                     "host without running guests, or hard reboot them after (until then "
                     "a guest started or suspended before keeps its unpinned chain; a "
                     "vTPCM one also libvirt's user, and no live migration). Off: "
                     "QEMU runs as libvirt's user, as before; a guest still running "
                     "labelled cannot be live-migrated until a hard reboot."),
    cfg.StrOpt("qemu_uid_range", default="", regex=r"^(|[0-9]+-[0-9]+)$",
               help="FIRST-LAST: the QEMU uids an agent may report ([agent] qemu_uid_range "
                    "of every compute host). With qemu_dac_label, a guest whose agent "
                    "reports a uid outside it (0, root, included), or not at the offset "
                    "of its gid in vm_gid_range, is not started or migrated."),
    cfg.StrOpt("vm_gid_range", default="", regex=r"^(|[0-9]+-[0-9]+)$",
               help="FIRST-LAST: the VM gids an agent may report, its [agent] "
                    "swtpm_uid_range (every compute host's). Must not overlap "
                    "qemu_uid_range and must be the same size."),
    cfg.FloatOpt("trait_refresh_seconds", default=60.0, min=0.0,
                 help="How often the driver re-checks agent health and enrollment for "
                      "the CUSTOM_VTPCM trait it reports to placement."),
]


def register_opts(conf: cfg.ConfigOpts) -> None:
    config.register(conf, vtpcm_group, VTPCM_OPTS)


def list_opts() -> list[tuple[cfg.OptGroup, list[Any]]]:
    """All of nova.conf's ``[vtpcm]``: the compute and scheduler options and
    nova-api's witness filter options (``api``)."""
    return [(vtpcm_group, VTPCM_OPTS + api.API_OPTS)]
