"""The engine and agent clients of the Nova side (driver and filter).

Built from Nova's own configuration (``[vtpcm]``, see ``conf/compute.py``);
imports nothing from Nova. One transport per process: oslo.messaging
transports are thread-safe and expensive to make.
"""

import threading
from pathlib import Path

import oslo_messaging as messaging
from oslo_config import cfg

from vtpcm_common import authn, rpc
from vtpcm_common.api.agent.rpcapi import AgentAPI
from vtpcm_common.api.engine.rpcapi import EngineAPI
from vtpcm_nova import agentkeys
from vtpcm_nova.conf import compute as compute_conf

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


def engine_reader(conf: cfg.ConfigOpts) -> EngineAPI:
    """Unsigned engine client for read-only calls (the scheduler filter)."""
    compute_conf.register_opts(conf)
    return EngineAPI(conf, transport(conf), timeout=conf.vtpcm.engine_timeout,
                     exchange=conf.vtpcm.control_exchange)


def agent_reader(conf: cfg.ConfigOpts, host: str) -> AgentAPI:
    """Agent client of compute host ``host`` for read-only calls (health,
    where a vTPCM's socket is): sends no command, and takes only replies
    signed by the answering host's command key (its own, or another's as
    the engine enrolled it; ``agentkeys``)."""
    compute_conf.register_opts(conf)
    own = authn.load_host_key(Path(conf.vtpcm.host_command_key)).public_key
    keys = agentkeys.EngineReportedKeys(host, own, engine_reader(conf))
    return AgentAPI(conf, transport(conf), timeout=conf.vtpcm.agent_timeout,
                    exchange=conf.vtpcm.control_exchange, reply_keys=keys)
