"""oslo.messaging plumbing shared by agent and engine."""

import oslo_messaging as messaging
from oslo_config import cfg

_TRACING_OPTS = [
    cfg.BoolOpt("enabled", default=False),
    cfg.BoolOpt("trace_requests", default=False),
]


def get_transport(conf: cfg.ConfigOpts) -> messaging.RPCTransport:
    """Build the RPC transport for ``conf``.

    The RPC client reads ``[oslo_messaging_tracing]`` options that oslo
    registers only on the global CONF; register them on private ConfigOpts
    objects too (tests and the lab use several in one process).
    """
    if conf is not cfg.CONF:
        try:
            conf.register_opts(_TRACING_OPTS, group="oslo_messaging_tracing")
        except cfg.DuplicateOptError:
            pass
    return messaging.get_rpc_transport(conf)
