"""oslo.messaging plumbing shared by agent and engine."""

import oslo_messaging as messaging
from oslo_config import cfg

from vtpcm_common import exception


def get_transport(conf: cfg.ConfigOpts) -> messaging.Transport:
    """Build the RPC transport for ``conf``.

    The RPC client reads ``[oslo_messaging_tracing]`` and
    ``[oslo_messaging_metrics]`` options that oslo.messaging registers only on
    the global CONF; register them on private ConfigOpts objects too (tests,
    the CLI and the lab use several in one process).
    """
    if conf is not cfg.CONF:
        # Private modules, but the only lists of those options; registering
        # the same Opt objects twice is a no-op.
        from oslo_messaging._metrics import client as metrics
        from oslo_messaging._tracing import client as tracing
        conf.register_opts(tracing.oslo_messaging_tracing, group="oslo_messaging_tracing")
        conf.register_opts(metrics.oslo_messaging_metrics, group="oslo_messaging_metrics")
    return messaging.get_rpc_transport(conf)


def remote_to_local(err: messaging.RemoteError) -> exception.VTPCMException:
    """Map a remote vTPCM error back to its class, so callers can catch it."""
    for cls in _all_subclasses(exception.VTPCMException):
        if cls.__name__ == err.exc_type:
            made: exception.VTPCMException = cls(message=str(err.value))
            return made
    return exception.VTPCMException(
        message="remote error %s: %s" % (err.exc_type, err.value))


def _all_subclasses(cls: type) -> list[type]:
    out: list[type] = []
    sub: type
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out
