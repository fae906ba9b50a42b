"""Options of the compute-node agent."""

import socket
from typing import Any

from oslo_config import cfg, types

from vtpcm_common import config, rpc
from vtpcm_common.conf import upgrade_levels

DEFAULT_OPTS = [
    cfg.StrOpt("host", default=socket.gethostname(), sample_default="<hostname>",
               help="Name of this compute host, as nova-compute knows it. The agent's "
                    "RPC server listens on topic vtpcm-agent with this server name."),
]

agent_group = cfg.OptGroup("agent", title="vTPCM agent")
AGENT_OPTS = [
    cfg.StrOpt("state_dir", default="/var/lib/vtpcm",
               help="Where the association list, wrapped keys and the encrypted swtpm "
                    "state of every vTPCM live. Must be on local, persistent storage."),
    cfg.StrOpt("run_dir", default="/run/vtpcm",
               help="Directory of the swtpm control sockets, <instance uuid>.ctrl. Nova's "
                    "guest XML points at the same path on every host."),
    cfg.StrOpt("swtpm_binary", default="swtpm", help="The swtpm executable."),
    cfg.StrOpt("swtpm_setup_binary", default="swtpm_setup",
               help="The swtpm_setup executable used to create new vTPCM state."),
    cfg.StrOpt("socket_mode", default="0660", regex=r"^0?[0-7]{3}$",
               help="Permission bits of each control socket, in octal (e.g. 0660). "
                    "QEMU must be able to connect."),
    cfg.StrOpt("socket_user", help="Owner of each control socket (the QEMU user, e.g. "
                                   "libvirt-qemu). Unset: the agent's user."),
    cfg.StrOpt("socket_group", help="Group of each control socket. Unset: the agent's "
                                    "group."),
    cfg.StrOpt("swtpm_uid_range", default="", regex=r"^(|[0-9]+-[0-9]+)$",
               help="FIRST-LAST: run each vTPCM's swtpm as an unprivileged uid (and gid "
                    "of the same number, no other groups) of its own from this range, "
                    "assigned per instance and kept across restarts in the association "
                    "list. Reserve the range: no account, group, /etc/subuid or "
                    "/etc/subgid block or systemd range (60001-65519, 524288-1879048191) "
                    "may overlap it (e.g. 1900000000-1900999999); ids above 4294967294 "
                    "and 65535 ((uid_t)-1: swtpm would stay root) are refused. A uid is "
                    "never given out twice: the range needs one uid per vTPCM ever created "
                    "or migrated in on the host over its life; a used-up range refuses new "
                    "vTPCMs until widened. Every process of a uid is killed before "
                    "the uid is handed over again or freed. Its control socket is "
                    "then owned by that uid and group (or socket_user/socket_group) and "
                    "sits in <run_dir>/vm/<instance uuid>/, which <run_dir>/<instance "
                    "uuid>.ctrl links to. Empty: every swtpm runs as the agent's user "
                    "(root), as releases before did; the agent refuses to start with it "
                    "empty while any swtpm uid is in use or kept aside (destroy or "
                    "migrate away those vTPCMs first)."),
    cfg.StrOpt("qemu_uid_range", default="", regex=r"^(|[0-9]+-[0-9]+)$",
               help="FIRST-LAST, as many uids as swtpm_uid_range (which it needs): "
                    "beside each vTPCM's swtpm uid U the agent reserves a QEMU uid Q "
                    "for that VM (Q = FIRST + (U - first of swtpm_uid_range)). Q follows "
                    "U: never given out again, killed and swept with U when the vTPCM "
                    "goes, kept aside with U while anything of either remains (Q is "
                    "computed from the FIRSTs the agent recorded, even once this option "
                    "is unset). Widen both ranges together (raise both LASTs); the agent "
                    "refuses to start if either FIRST moved once any uid was given out "
                    "(freed ones too), or if swtpm_uid_range's LAST is below a uid in "
                    "use or kept aside. Once unset, the QEMU uids swtpm_uid_range then "
                    "implies (from the recorded FIRST) get this option's checks at each "
                    "start, and the agent refuses to start if they fail. It reports Q "
                    "and U (the "
                    "VM's gid) to the "
                    "Nova driver, whose [vtpcm] qemu_dac_label runs the VM's QEMU as "
                    "Q:U, so that only this VM's QEMU reaches its 0660 U:U socket "
                    "(socket_user and socket_group must be unset). "
                    "Reserve it as swtpm_uid_range (the same checks); it must not "
                    "overlap swtpm_uid_range. Empty: no QEMU uids (QEMU runs as "
                    "libvirt's user)."),
    cfg.BoolOpt("ctrl_proxy", default=False,
                help="Put a small proxy process (python -m vtpcm_agent.swtpm.ctrlproxy, "
                     "run as the swtpm's uid, about 14 MB resident) between each VM's QEMU "
                     "and its swtpm's control channel: it lets the state be set once per "
                     "swtpm, migration-encrypted, before the TPM first starts (swtpm "
                     "0.7.1 alone takes any older state under the same key, or a "
                     "plaintext one, at any time), refuses commands QEMU does not use, "
                     "and records a digest of each state blob QEMU read or set, which "
                     "the engine's post-import check then compares (agent API 1.13: the "
                     "volatile state too). Needs swtpm_uid_range. The swtpm's own socket "
                     "becomes 0600 for its uid; <run_dir>/<instance uuid>.ctrl links to "
                     "the proxy's (socket_mode, socket_user, socket_group apply to it). "
                     "Applies to swtpms started from then on; guests whose QEMU is "
                     "attached directly keep that until their next start."),
    cfg.BoolOpt("create_ek", default=True,
                help="Create an EK with EK and platform certificates from this host's "
                     "local CA when a vTPCM is created (Windows 11 guests want them)."),
    cfg.BoolOpt("expose_data_socket", default=False, advanced=True,
                help="Also open a TPM data socket next to the control socket "
                     "(<uuid>.ctrl without .ctrl) and start swtpm with "
                     "--flags startup-clear, so TPM commands work without QEMU. Only "
                     "for tests and diagnostics: anyone who can connect can use the "
                     "guest's TPM."),
    cfg.IntOpt("max_state_blob_bytes", default=256 * 1024, min=4096,
               help="Largest state blob accepted on import."),
    cfg.FloatOpt("swtpm_timeout", default=10.0, min=0.5,
                 help="Seconds to wait for swtpm to start, answer or stop."),
    cfg.FloatOpt("swtpm_watchdog_interval", default=2.0, min=0.0,
                 help="Seconds between two checks for a vTPCM whose swtpm died (ACTIVE, "
                      "migrating out or in). Such a crash is logged and reported to the "
                      "engine's audit log with what the guest sees and what to do (a hard "
                      "reboot of the guest); the swtpm is not restarted, since QEMU never "
                      "reconnects to it (see the operator guide). 0 disables the check "
                      "(crashes are then only listed by health, and logged when a "
                      "migration step finds them: sent to the engine by an abort, the "
                      "operator's rollback or a commit that restarts an incoming swtpm, "
                      "not by a commit that shreds the source's copy)."),
    cfg.StrOpt("engine_public_key",
               help="Path of the vtpcm-engine's Ed25519 command signing public key "
                    "(PEM; the engine writes it next to its [engine] "
                    "command_signing_key as <key>.pub). Required: the agent runs "
                    "state-changing commands (create, destroy, export, every "
                    "migration step) only when the engine signed them with this "
                    "key, so a host holding broker credentials cannot command "
                    "another host's agent. The agent refuses to start without it."),
    cfg.StrOpt("host_command_key", default="",
               help="Path of this compute host's Ed25519 command key (created 0640 on "
                    "first start; empty: <state_dir>/host-command.key). The Nova driver "
                    "on this host signs its calls to the engine (create/destroy a "
                    "vTPCM, check_destination, begin, commit, abort) with it; the "
                    "engine learns the public key at enrollment, vouched for by the "
                    "host TPM's attestation key. nova-compute must be able to read "
                    "it (group of the file), nobody else."),
    cfg.StrOpt("host_command_key_group", default="",
               help="Group given read access to host_command_key when the agent "
                    "creates it (e.g. nova). Empty: the agent's own group."),
    cfg.BoolOpt("register_with_engine", default=True,
                help="At start, ask the vtpcm-engine to enroll this host (the engine "
                     "pulls a fresh, certified identity; an operator or auto_approve "
                     "approves it)."),
]

host_tpm_group = cfg.OptGroup("host_tpm", title="The host's own TPM")
HOST_TPM_OPTS = [
    cfg.StrOpt("tcti", default="device:/dev/tpmrm0",
               help="tpm2-tss TCTI of the host TPM that holds this host's identity and "
                    "seals its host key. swtpm:path=... for a stand-in in a lab."),
    cfg.FloatOpt("unsigned_calls_per_second", default=5.0, min=0.01,
                 help="Average rate of the unsigned TPM calls (get_identity, quote) "
                      "this agent serves; more are refused at once (RateLimited) "
                      "instead of queueing for the TPM in front of the signed "
                      "migration steps. The engine needs one quote per host per "
                      "attestation round."),
    cfg.IntOpt("unsigned_calls_burst", default=10, min=1,
               help="Unsigned TPM calls served at once above that rate."),
    cfg.FloatOpt("credential_activations_per_minute", default=2.0, min=0.01,
                 help="Average rate of credential activations (unsigned, needed once "
                      "per enrollment; each re-creates the RSA endorsement key, "
                      "seconds on a hardware TPM); more are refused at once."),
    cfg.ListOpt("kem_policy_pcrs", default=[], item_type=types.Integer(min=0, max=23),
                help="SHA-256 PCRs the host's KEM key is bound to (PolicyPCR + "
                     "PolicyAuthValue): migration keys sealed to the host open only "
                     "while these PCRs hold the values they had when the key was "
                     "created. Use the PCRs of the host's attestation policy on the "
                     "engine (or a subset). After an approved update that changes "
                     "them, or after changing this list, the agent creates a new KEM "
                     "key at the next get_identity and the host must be re-enrolled. "
                     "Empty: the KEM key is not bound to PCRs."),
    cfg.StrOpt("ek_ca_file",
               help="PEM bundle of the CA certificates that issue this host TPM's EK "
                    "certificate (its manufacturer's; the same file as the engine's "
                    "[attestation] ek_ca_file). When set, the agent's first start (no "
                    "hostkey.sealed in the state directory yet) verifies the TPM "
                    "before sending it any secret: EK certificate against this "
                    "bundle, AK created in a session salted to that EK and proven "
                    "by credential activation, storage primaries certified by the "
                    "AK; the host key is then sealed under the certified owner "
                    "primary. Any failure: the agent does not start and writes "
                    "nothing. Unset: the first start trusts whatever answers on the "
                    "TPM interface (logged as a warning). Later starts do not read it."),
]

keystore_group = cfg.OptGroup("keystore", title="Per-instance key storage")
KEYSTORE_OPTS = [
    cfg.StrOpt("host_key_mode", default="tpm",
               choices=[("tpm", "host key sealed in the host TPM"),
                        ("dev-keyfile", "host key in a root-only file; insecure, "
                                        "development only")],
               help="How the host key that wraps every instance key is protected: "
                    "sealed in the host TPM (tpm), or a root-only file (dev-keyfile, "
                    "insecure, development only; the agent warns at every start)."),
    cfg.StrOpt("dev_keyfile", help="Path of the host key file in dev-keyfile mode."),
]


def register_opts(conf: cfg.ConfigOpts) -> None:
    rpc.register_rpc_opts(conf)
    upgrade_levels.register_opts(conf)
    conf.register_opts(DEFAULT_OPTS)
    for group, opts in ((agent_group, AGENT_OPTS), (host_tpm_group, HOST_TPM_OPTS),
                        (keystore_group, KEYSTORE_OPTS)):
        config.register(conf, group, opts)


def list_opts() -> list[tuple[cfg.OptGroup | None, list[Any]]]:
    return [(None, DEFAULT_OPTS), (agent_group, AGENT_OPTS),
            (host_tpm_group, HOST_TPM_OPTS), (keystore_group, KEYSTORE_OPTS),
            *rpc.list_rpc_opts()]
