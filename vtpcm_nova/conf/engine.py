"""Options of the controller engine (vtpcm-engine) and its clients."""

import socket
from typing import Any

from oslo_config import cfg

from vtpcm_common import config, rpc
from vtpcm_common.conf import upgrade_levels
from vtpcm_nova.conf import novaapi

engine_group = cfg.OptGroup("engine", title="vTPCM engine")
ENGINE_OPTS = [
    cfg.StrOpt("host", default=socket.gethostname(), sample_default="<hostname>",
               help="Server name of this engine worker on the vtpcm-engine topic. "
                    "Several workers may share the topic and one database."),
    cfg.StrOpt("connection", default="sqlite:////var/lib/vtpcm/engine.sqlite",
               secret=True,
               help="SQLAlchemy URL of the engine database: SQLite for one controller, "
                    "postgresql:// or mysql+pymysql:// for several engine workers. "
                    "'vtpcm-manage db sync' creates and upgrades its schema; the "
                    "engine refuses to start on a database not at its revision."),
    cfg.StrOpt("command_signing_key", default="/var/lib/vtpcm/engine-signing.key",
               help="Path of the Ed25519 private key (PEM, mode 0600) the engine signs "
                    "every state-changing agent command with; created on first start, "
                    "its public key written to <path>.pub. Copy that public key to "
                    "every compute host ([agent] engine_public_key). Every engine "
                    "worker must use the same key."),
    cfg.ListOpt("admin_public_keys", default=[],
                help="Paths of the operators' Ed25519 public keys (PEM, made with "
                     "vtpcm-manage keys create). The admin methods (enroll, "
                     "approve_host, revoke_host, assign_policy, put_policy, "
                     "record_policy) run only when signed by one of these keys; "
                     "with none configured they are all refused. One key per "
                     "operator; remove a key (and restart the engine workers: keys "
                     "are read at start) to lock its holder out."),
    cfg.FloatOpt("rpc_timeout", default=60.0, min=1.0,
                 help="Seconds the engine waits for an agent to answer one call."),
    cfg.FloatOpt("worker_lease_ttl", default=60.0, min=2.0,
                 help="Seconds an engine run's lease lasts; each run renews it every "
                      "quarter of this (by the database's clock) and drops it at a "
                      "clean stop. A begin left SEALING or PREPARING by a run whose "
                      "lease is gone (stopped, or killed and not renewed for this "
                      "long) is aborted by the next reconcile of any worker: the "
                      "bound is this plus [migration] reconcile_interval. Shorter "
                      "aborts a killed run's begins sooner; a run paused longer "
                      "(a stalled database, a stopped process) may lose its begins "
                      "in flight, which costs those migrations, never a copy."),
    cfg.IntOpt("registration_workers", default=1, min=0, max=16,
               help="Threads that enroll hosts whose agents announced themselves "
                    "(the unsigned register_agent cast), in the background. 0: "
                    "announcements are ignored and only operators enroll hosts "
                    "(vtpcm-manage hosts enroll), the strictest setting. Each "
                    "enrollment may wait up to rpc_timeout for the agent; the RPC "
                    "threads that serve migrations never do."),
    cfg.IntOpt("registration_backlog", default=16, min=1,
               help="Announced host names waiting for a registration worker; when "
                    "full, the oldest waiting name is dropped to make room (its "
                    "agent announces itself again, with backoff, until the engine "
                    "contacts it)."),
    cfg.FloatOpt("registration_interval", default=60.0, min=0.0,
                 help="Seconds before an announcement of the same host name is "
                      "queued again (per-name rate limit of register_agent; a name "
                      "dropped from a full queue may be queued again at once)."),
    cfg.FloatOpt("registration_probe_timeout", default=5.0, min=0.5,
                 help="Seconds a registration worker waits for an announced host's "
                      "agent to answer a health call before it enrolls it (waiting "
                      "up to rpc_timeout); a name no agent serves costs this long."),
    cfg.IntOpt("max_unsigned_attestations", default=8, min=1,
               help="attest calls (unsigned: vtpcm-manage hosts attest) served at "
                    "once, one per host; more are refused at once (RateLimited). "
                    "Each may wait up to rpc_timeout for the host, and the RPC "
                    "threads are shared with the migration calls."),
    cfg.BoolOpt("post_import_check", default=True,
                help="Before a migration passes its commit point, compare a keyed digest "
                     "of the vTPCM's permanent state on both sides (agent API 1.12, "
                     "signed answers, a fresh nonce per check): the source's current "
                     "state against the state the destination's swtpm first wrote after "
                     "it imported the migration stream. A live migration's stream is "
                     "written by the destination's QEMU, and swtpm accepts an older "
                     "state under the same key or a plaintext one: without this check "
                     "whoever writes that stream can roll the vTPCM back. On a mismatch "
                     "the commit is refused (ImportedStateMismatch, audited): the "
                     "authority and the source's copy stay where they are and an "
                     "operator decides (vtpcm-manage migration show / resolve). When "
                     "the destination cannot tell what it imported, or an agent is "
                     "older than API 1.12 (or [upgrade_levels] vtpcm_agent caps it "
                     "below), the commit is refused the same way "
                     "(ImportedStateUnverified). Where both agents run [agent] "
                     "ctrl_proxy (agent API 1.13) it also compares the state blobs the "
                     "source's QEMU read with those the destination's QEMU set, the "
                     "volatile state (PCRs, loaded objects and sessions) included, and the "
                     "destination's proxy refuses a second import, plaintext blobs and "
                     "state set after the TPM started; elsewhere only the permanent state "
                     "is compared (see require_stream_check); protect the stream itself "
                     "with libvirt's native migration TLS. Only live migrations are checked: "
                     "on a cold migration, resize or unshelve the engine carries the "
                     "state itself. Off: no check, and a live migration's permanent "
                     "state can be rolled back through a forged stream; turn it off "
                     "only while agents are upgraded."),
    cfg.BoolOpt("require_stream_check", default=False,
                help="With post_import_check: refuse the commit of a live migration "
                     "(ImportedStateUnverified) unless both sides answer the digest of "
                     "the state blobs their control-channel proxies saw ([agent] "
                     "ctrl_proxy, agent API 1.13), so the volatile state is always "
                     "compared. Off (the default, for hosts without the proxy and guests "
                     "started before it): such a migration is checked on its permanent "
                     "state alone and a WARNING says why the blobs were not compared. "
                     "Turn it on once every host runs the proxy and every guest was "
                     "started (or migrated) since."),
]

attestation_group = cfg.OptGroup("attestation", title="Host attestation")
ATTESTATION_OPTS = [
    cfg.BoolOpt("auto_approve", default=False,
                help="Approve a host as soon as its AK and certified KEM key check out. "
                     "For labs; in production an operator approves each host with "
                     "vtpcm-manage hosts approve."),
    cfg.StrOpt("ek_ca_file", default="",
               help="PEM file of the CA certificates that issue host TPMs' EK "
                    "certificates (the TPM manufacturers' roots and intermediates; "
                    "swtpm-localca's in a lab). When set, enrollment requires the "
                    "host's EK certificate to chain to one of them and to certify "
                    "the EK the agent reports, and proves by credential activation "
                    "that the AK lives in that same TPM. Empty: the AK is trusted on "
                    "its own attributes and the operator's approval (a warning at "
                    "every start)."),
    cfg.BoolOpt("require_kem_pcr_binding", default=False,
                help="Refuse (verdict UNTRUSTED) a host whose KEM key is not bound to PCRs "
                     "(its agent's [host_tpm] kem_policy_pcrs empty). Whatever this says, "
                     "a host whose KEM key IS bound must be bound to a subset of its "
                     "policy's PCRs (sha256) at the policy's golden values, and a host "
                     "that reports its KEM key stale is UNTRUSTED until re-enrolled. "
                     "Off by default so that hosts enrolled without kem_policy_pcrs keep "
                     "working (the engine logs a warning per host); turn it on once every "
                     "host binds its KEM key."),
    cfg.BoolOpt("require_certified_parents", default=False,
                help="Refuse to enroll a host without the AK's TPM2_CertifyCreation of "
                     "its storage parents when this engine asked below agent API 1.10 "
                     "([upgrade_levels] vtpcm_agent caps it: it then asks without them). "
                     "An uncapped engine asks as 1.10 and refuses an answer without the "
                     "certifications whatever this says (the reply is unsigned); a "
                     "certification that is sent is always checked, and a host whose "
                     "pinned parents are not this TPM's primaries (an interposer on its "
                     "TPM interface when the agent first pinned them) is refused. Off by "
                     "default so that a capped engine still enrolls hosts during an "
                     "upgrade (with a warning); turn it on, or lift the cap, once every "
                     "agent is upgraded."),
    cfg.StrOpt("default_policy",
               help="Golden PCR policy assigned to newly enrolled hosts (by name)."),
    cfg.IntOpt("verdict_ttl", default=300, min=5,
               help="Seconds a TRUSTED verdict stays fresh. The migration pre-check "
                    "(check_destination) and begin attest again once it is stale."),
    cfg.FloatOpt("min_unsigned_interval", default=5.0, min=0.0,
                 help="Seconds during which the unsigned attest call (vtpcm-manage "
                      "hosts attest, anyone on the broker) answers with the host's "
                      "verdict in force instead of quoting the host again. The "
                      "engine's quotes are signed, so the agent's limit on unsigned "
                      "calls does not count them: this bounds the quotes unsigned "
                      "callers can make the engine send to one host. 0: every "
                      "attest quotes (labs)."),
    cfg.IntOpt("nonce_ttl", default=60, min=5,
               help="Seconds a challenge nonce may be answered."),
    cfg.IntOpt("interval", default=120, min=0,
               help="Seconds between periodic attestations of every approved host "
                    "(0 disables the periodic task)."),
    cfg.IntOpt("jitter", default=15, min=0,
               help="Random extra delay, up to this many seconds, per periodic round."),
    cfg.StrOpt("reboot_policy", default="reapprove",
               choices=[("reapprove", "a rebooted host is UNTRUSTED and PENDING until "
                                      "an operator approves it again"),
                        ("accept", "a rebooted host stays TRUSTED if its PCRs match")],
               help="A host whose TPM resetCount grew has rebooted: reapprove makes it "
                    "UNTRUSTED until an operator approves it again; accept trusts it if "
                    "its PCRs still match."),
]

migration_group = cfg.OptGroup("migration", title="vTPCM migration coordinator")
MIGRATION_OPTS = [
    cfg.IntOpt("timeout", default=10800, min=10,
               help="Seconds a migration may stay between begin and commit before the "
                    "engine aborts it (only while the destination has not received "
                    "the state). Keep it above Nova's live_migration_completion_timeout "
                    "(800 s per GiB of guest RAM by default) for your largest guests."),
    cfg.IntOpt("reconcile_interval", default=30, min=0,
               help="Seconds between retries of unfinished commits/aborts and deadline "
                    "checks (0 disables)."),
]


manage_group = cfg.OptGroup("manage", title="vtpcm-manage (operator CLI)")
MANAGE_OPTS = [
    cfg.StrOpt("admin_key",
               help="Path of the operator's Ed25519 private key (PEM, mode 0600) that "
                    "vtpcm-manage signs admin calls with (overridden by "
                    "--admin-key). Read by clients only, never by the engine: keep "
                    "the key with the operator and set this in the operator's own "
                    "config file (vtpcm-manage --config-file ... --config-file "
                    "<own file>). Its public half (<path>.pub) goes into the "
                    "engine's [engine] admin_public_keys."),
]


def register_opts(conf: cfg.ConfigOpts) -> None:
    """Register on ``conf`` through a fresh OptGroup per group: oslo.config
    keeps overrides in the group object, so a group shared by several
    ConfigOpts (tests, the lab, the CLI in one process) would leak one's
    set_override into the others."""
    for group, opts in list_opts():
        config.register(conf, group, opts)
    upgrade_levels.register_opts(conf)
    novaapi.register_opts(conf)


def list_opts() -> list[tuple[cfg.OptGroup, list[Any]]]:
    return [(engine_group, ENGINE_OPTS), (attestation_group, ATTESTATION_OPTS),
            (migration_group, MIGRATION_OPTS), (manage_group, MANAGE_OPTS),
            *rpc.list_rpc_opts()]

