"""oslo.messaging plumbing shared by agent and engine."""

import oslo_messaging as messaging
from oslo_config import cfg

from vtpcm_common import exception

_TRACING_OPTS = [
    cfg.BoolOpt("enabled", default=False),
    cfg.BoolOpt("trace_requests", default=False),
]


def get_transport(conf: cfg.ConfigOpts) -> messaging.Transport:
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


def remote_to_local(err: messaging.RemoteError) -> exception.VTPCMException:
    """Map a remote vTPCM error back to its class, so callers can catch it."""
    for cls in _all_subclasses(exception.VTPCMException):
        if cls.__name__ == err.exc_type:
            return cls(message=str(err.value))
    return exception.VTPCMException(
        message="remote error %s: %s" % (err.exc_type, err.value))


def _all_subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out
