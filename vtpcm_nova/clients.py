"""The engine and agent clients of the Nova side (driver and filter).

Built from Nova's own configuration (``[vtpcm]``, see ``conf/compute.py``);
imports nothing from Nova. One transport per process: oslo.messaging
transports are thread-safe and expensive to make.
"""

import threading
from pathlib import Path

import oslo_messaging as messaging
from cryptography.hazmat.primitives.asymmetric import ed25519
from oslo_config import cfg
from oslo_log import log as logging

from vtpcm_common import authn, exception, rpc
from vtpcm_common.api.agent.rpcapi import AgentAPI
from vtpcm_common.api.engine.rpcapi import EngineAPI
from vtpcm_nova import agentkeys
from vtpcm_nova.conf import compute as compute_conf

LOG = logging.getLogger(__name__)

_lock = threading.Lock()
_transports: dict[int, messaging.Transport] = {}


def transport(conf: cfg.ConfigOpts) -> messaging.Transport:
    """The vTPCM transport: ``[vtpcm] transport_url``, else Nova's own."""
    compute_conf.register_opts(conf)
    with _lock:
        made = _transports.get(id(conf))
        if made is None:
            made = rpc.get_transport(conf, url=conf.vtpcm.transport_url or None)
            _transports[id(conf)] = made
        return made


def engine_for_host(conf: cfg.ConfigOpts) -> EngineAPI:
    """The engine as this compute host calls it: compute-node calls signed
    with the host command key, the only key the driver holds."""
    compute_conf.register_opts(conf)
    signer = authn.load_host_key(Path(conf.vtpcm.host_command_key))
    return EngineAPI(conf, transport(conf), timeout=conf.vtpcm.engine_timeout,
                     host_signer=signer, exchange=conf.vtpcm.control_exchange)


class EngineForHost:
    """The host-signed engine client, made again when the host command key
    file is replaced (a rotation), so nova-compute signs with the key the
    host was enrolled with again without a restart."""

    def __init__(self, conf: cfg.ConfigOpts) -> None:
        compute_conf.register_opts(conf)
        self.conf = conf
        self._lock = threading.Lock()
        self._stamp: agentkeys.Stamp | None = None
        self._api: EngineAPI | None = None

    def __call__(self) -> EngineAPI:
        stamp = agentkeys.file_stamp(Path(self.conf.vtpcm.host_command_key))
        with self._lock:
            if self._api is None or stamp is None or stamp != self._stamp:
                self._api = engine_for_host(self.conf)
                self._stamp = stamp
            return self._api


def engine_reader(conf: cfg.ConfigOpts) -> EngineAPI:
    """Unsigned engine client for read-only calls (the scheduler filter)."""
    compute_conf.register_opts(conf)
    return EngineAPI(conf, transport(conf), timeout=conf.vtpcm.engine_timeout,
                     exchange=conf.vtpcm.control_exchange)


def engine_public_key(conf: cfg.ConfigOpts) -> ed25519.Ed25519PublicKey | None:
    """``[vtpcm] engine_public_key``, or None if unset (logged: live
    migrations of vTPCM instances then fail closed). A key that is set but
    unusable is an error naming the option."""
    compute_conf.register_opts(conf)
    path = conf.vtpcm.engine_public_key
    if not path:
        LOG.warning("[vtpcm] engine_public_key is not set: another host's agent replies "
                    "cannot be checked, live migrations of vTPCM instances will fail")
        return None
    try:
        return authn.load_public_key(Path(path), role="engine")
    except exception.InvalidInput as err:
        raise exception.InvalidInput(
            reason="[vtpcm] engine_public_key: %s" % err.kwargs.get("reason", err)) from None


def agent_reader(conf: cfg.ConfigOpts, host: str) -> AgentAPI:
    """Agent client of compute host ``host`` for read-only calls (health,
    where a vTPCM's socket is): sends no command, and takes only replies
    signed by the answering host's command key (its own, re-read when its
    file is replaced, or another's as the engine enrolled it;
    ``agentkeys``)."""
    compute_conf.register_opts(conf)
    own = agentkeys.OwnKey(Path(conf.vtpcm.host_command_key))
    own()  # a missing or unreadable key file fails here, as before
    keys = agentkeys.EngineReportedKeys(host, own, engine_reader(conf),
                                        engine_public_key(conf))
    return AgentAPI(conf, transport(conf), timeout=conf.vtpcm.agent_timeout,
                    exchange=conf.vtpcm.control_exchange, reply_keys=keys)
