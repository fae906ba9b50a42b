"""oslo.messaging plumbing shared by agent and engine."""

import functools
import types
from collections.abc import Callable
from typing import Any, TypeVar

import oslo_messaging as messaging
from oslo_config import cfg
from oslo_log import log as logging

from vtpcm_common import authn, config, exception, spans
from vtpcm_common.conf import upgrade_levels
from vtpcm_common.ratelimit import Summary
from vtpcm_common.wire import Message

LOG = logging.getLogger(__name__)

rpc_group = cfg.OptGroup("vtpcm_rpc", title="vTPCM RPC topics")
RPC_OPTS = [
    cfg.StrOpt("agent_topic", default="vtpcm-agent",
               help="RPC topic of the vtpcm-agents (each listens as server = its host)."),
    cfg.StrOpt("engine_topic", default="vtpcm-engine",
               help="RPC topic of the vtpcm-engine workers."),
]
# RabbitMQ queue names are global per virtual host whatever control_exchange
# says: two deployments (or test runs) on one broker and virtual host must
# use different topics, or they consume each other's messages.


def register_rpc_opts(conf: cfg.ConfigOpts) -> None:
    config.register(conf, rpc_group, RPC_OPTS)


def list_rpc_opts() -> list[tuple[cfg.OptGroup, list[Any]]]:
    return [(rpc_group, RPC_OPTS)]


def topic(conf: cfg.ConfigOpts, which: str) -> str:
    """The configured topic, ``which`` being 'agent_topic' or 'engine_topic'."""
    register_rpc_opts(conf)
    return str(getattr(conf.vtpcm_rpc, which))


R = TypeVar("R", bound=Message)
# modules whose exceptions a client rebuilds from a server's error reply
REMOTE_EXMODS = [exception.__name__]
REMOTE_SUFFIX = "_Remote"  # what oslo.messaging appends to a rebuilt class
F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


def get_transport(conf: cfg.ConfigOpts, url: str | None = None) -> messaging.Transport:
    """Build the RPC transport for ``conf`` (to ``url`` if given, else
    ``conf``'s ``transport_url``).

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
    # oslo.messaging rebuilds the project's exceptions a server raised
    # (class and named values), as Nova does for nova.exception
    return messaging.get_rpc_transport(conf, url=url, allowed_remote_exmods=REMOTE_EXMODS)


def plain(err: exception.VTPCMException) -> exception.VTPCMException:
    """A rebuilt remote error as its own class again: oslo.messaging hands
    it back as a ``<Class>_Remote`` subclass whose str() appends the
    server's traceback; callers and the CLI show the server's message."""
    cls = type(err)
    if cls.__name__.endswith(REMOTE_SUFFIX) and cls.__module__.endswith(REMOTE_SUFFIX):
        err.__class__ = cls.__mro__[1]
    return err


def local_error(exc_type: str, message: str,
                kwargs: dict[str, Any] | None = None) -> exception.VTPCMException:
    """The vTPCM exception class named ``exc_type`` with ``message`` and its
    named values (a signed error reply's outcome)."""
    for cls in _all_subclasses(exception.VTPCMException):
        if cls.__name__ == exc_type:
            made: exception.VTPCMException = cls(message=message, **(kwargs or {}))
            return made
    return exception.VTPCMException(message="remote error %s: %s" % (exc_type, message))


def _all_subclasses(cls: type) -> list[type]:
    out: list[type] = []
    sub: type
    for sub in cls.__subclasses__():
        if not sub.__name__.endswith(REMOTE_SUFFIX):
            out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


def parse_version(text: str) -> tuple[int, int]:
    """'1.4' -> (1, 4); InvalidInput for anything else."""
    major, dot, minor = text.partition(".")
    if not (dot and major.isdigit() and minor.isdigit()):
        raise exception.InvalidInput(reason="%r is not an RPC API version (N.N)" % text)
    return int(major), int(minor)


def version_allows(cap: str | None, version: str) -> bool:
    """May a client capped at ``cap`` send a call prepared as ``version``?
    (oslo.messaging's rule: same major, minor not above the cap's.)"""
    if cap is None:
        return True
    (cap_major, cap_minor), (major, minor) = parse_version(cap), parse_version(version)
    return major == cap_major and minor <= cap_minor


class Client:
    """A versioned RPC client: one checked message out, one checked message back.

    Remote vTPCM errors come back as their own exception classes.

    ``API_VERSION`` is the newest version of the service's API the client
    knows; ``UPGRADE_LEVEL`` names its ``[upgrade_levels]`` option. A call
    prepared above the client's ``version_cap`` is refused before anything
    is sent (``RPCVersionCapped``), and a server that answers it cannot
    serve a version gives ``RPCVersionUnsupported``."""

    API_VERSION = "1.0"
    UPGRADE_LEVEL = ""
    # The version from which the servers sign their replies (None: never),
    # and the methods whose answers need no signature (the caller checks
    # them otherwise, e.g. TPM-signed).
    REPLY_VERSION: str | None = None
    UNVERIFIED_REPLIES: frozenset[str] = frozenset()

    def __init__(self, conf: cfg.ConfigOpts, topic_name: str,
                 transport: messaging.Transport | None = None, timeout: float = 60.0,
                 signer: authn.CommandSigner | None = None,
                 version_cap: str | None | types.EllipsisType = ...,
                 exchange: str | None = None,
                 reply_keys: authn.ReplyKeys | None = None,
                 retry: int | None = None) -> None:
        """``version_cap``: the highest version this client sends; by
        default the one ``[upgrade_levels]`` sets for the service (none:
        up to ``API_VERSION``). ``exchange``: the services' exchange when it
        is not this process's ``[DEFAULT] control_exchange`` (Nova's is
        ``nova``; the vTPCM daemons' default is ``openstack``).

        ``reply_keys``: whose signature each server's replies must carry
        (from ``REPLY_VERSION`` on). With it, every call but
        ``UNVERIFIED_REPLIES`` is asked at ``REPLY_VERSION`` or later (so a
        cap below it refuses them: ``RPCVersionCapped``) and an answer that
        does not verify raises ``ReplyNotAuthenticated``. Without it
        (tools, tests) answers are taken unverified.

        ``retry``: oslo.messaging's connection retries for a send (None:
        forever, its default; 0: none). A caller that must not hang on a
        broker that is down (nova-api's witness filter) passes 0."""
        self.signer = signer
        self.reply_keys = reply_keys
        self.topic = topic_name
        self.timeout = timeout
        if version_cap is ...:
            version_cap = upgrade_levels.version_cap(conf, self.UPGRADE_LEVEL) \
                if self.UPGRADE_LEVEL else None
        self.version_cap = self._checked_cap(version_cap)
        self.transport = transport or get_transport(conf)
        target = messaging.Target(topic=topic_name, version="1.0", exchange=exchange)
        self.client = messaging.get_rpc_client(self.transport, target, timeout=timeout,
                                               version_cap=self.version_cap, retry=retry)

    def _checked_cap(self, cap: str | None) -> str | None:
        """A cap of another major version would refuse every call: say so now."""
        if cap is None:
            return None
        option = "[upgrade_levels] %s = %s" % (self.UPGRADE_LEVEL, cap)
        try:
            major = parse_version(cap)[0]
        except exception.InvalidInput as err:
            raise exception.InvalidInput(reason="%s: %s" % (option, err.kwargs["reason"])) \
                from None
        if major != parse_version(self.API_VERSION)[0]:
            raise exception.InvalidInput(
                reason="%s: this client speaks %s API versions %d.x (up to %s)"
                       % (option, self.topic, parse_version(self.API_VERSION)[0],
                          self.API_VERSION))
        LOG.info("Calls to %(topic)s capped at RPC API %(cap)s ([upgrade_levels] %(opt)s)",
                 {"topic": self.topic, "cap": cap, "opt": self.UPGRADE_LEVEL})
        return cap

    def can_send_version(self, version: str) -> bool:
        return version_allows(self.version_cap, version)

    def _check_cap(self, method: str, version: str) -> None:
        if not self.can_send_version(version):
            raise exception.RPCVersionCapped(
                method=method, service=self.topic, version=version,
                option=self.UPGRADE_LEVEL, cap=self.version_cap)

    def _service(self, server: str | None) -> str:
        return "%s%s" % (self.topic, "." + server if server else "")

    def _verifies(self, method: str) -> bool:
        return self.reply_keys is not None and self.REPLY_VERSION is not None \
            and method not in self.UNVERIFIED_REPLIES

    def _call(self, method: str, version: str, request: Message, reply_type: type[R], *,
              server: str | None = None, timeout: float | None = None,
              signer: authn.CommandSigner | None | types.EllipsisType = ...) -> R:
        """``signer``: overrides the client's own signer for this call
        (None: unsigned)."""
        with spans.span("rpc:" + method):
            return self._round_trip(method, version, request, reply_type, server=server,
                                    timeout=timeout, signer=signer)

    def _round_trip(self, method: str, version: str, request: Message,
                    reply_type: type[R], *, server: str | None, timeout: float | None,
                    signer: authn.CommandSigner | None | types.EllipsisType) -> R:
        verify = self._verifies(method)
        if verify:
            version = _later(version, str(self.REPLY_VERSION))
        self._check_cap(method, version)
        use = self.signer if signer is ... else signer
        kwargs: dict[str, Any] = {"version": version}
        if server is not None:
            kwargs["server"] = server
        if timeout is not None:
            kwargs["timeout"] = timeout
        payload = request.validated().to_wire()
        args: dict[str, Any] = {"payload": payload}
        if use is not None:
            args["auth"] = use.sign(method, server or "", payload)
        if verify:
            if not server:
                raise exception.InvalidInput(reason="a verified reply needs a server")
            self._reply_key(server, method)  # nothing goes to a host that cannot answer
            args["reply_nonce"] = args["auth"]["nonce"] if "auth" in args \
                else authn.new_nonce()
        try:
            reply = self.client.prepare(**kwargs).call({}, method, **args)
        except exception.VTPCMException as err:  # the server's, rebuilt
            if verify:
                raise self._not_authenticated(
                    str(server), method,
                    "an unsigned error reply (%s)" % type(plain(err)).__name__) from None
            raise plain(err) from None
        except messaging.RemoteError as err:  # not of REMOTE_EXMODS
            if verify:
                # Even "cannot serve" counts as no answer: anyone could send
                # it, and a caller that took it for a refusal (create frees
                # its reservation) could be fooled while the command waits.
                why = " (an agent older than API %s, or a forgery)" % self.REPLY_VERSION \
                    if err.exc_type in UNSERVED else ""
                raise self._not_authenticated(
                    str(server), method,
                    "an unsigned error reply (%s)%s" % (err.exc_type, why)) from None
            if err.exc_type in UNSERVED:
                raise exception.RPCVersionUnsupported(
                    service=self._service(server), method=method, version=version,
                    reason=UNSERVED[err.exc_type] % {"option": self.UPGRADE_LEVEL}) \
                    from None
            raise exception.VTPCMException(
                message="remote error %s: %s" % (err.exc_type, err.value)) from None
        except messaging.MessagingException as err:
            # Timeouts and transport failures are vTPCM errors too: callers
            # (the coordinator's abort path, reconcile) handle one class.
            raise exception.ServiceUnreachable(
                service=self._service(server), method=method,
                reason=type(err).__name__) from None
        if verify:
            reply = self._verified(str(server), method, args, reply)
        return reply_type.from_wire(reply)

    def _reply_key(self, server: str, method: str) -> Any:
        assert self.reply_keys is not None
        try:
            return self.reply_keys.reply_key(server, method)
        except exception.ReplyNotAuthenticated as err:
            self.reply_keys.refused(server, method, str(err.kwargs.get("reason", err)))
            raise

    def _not_authenticated(self, server: str, method: str,
                           reason: str) -> exception.ReplyNotAuthenticated:
        assert self.reply_keys is not None
        err = exception.ReplyNotAuthenticated(host=server, method=method, reason=reason)
        LOG.warning("%(err)s", {"err": err})
        self.reply_keys.refused(server, method, reason)
        return err

    def _verified(self, server: str, method: str, args: dict[str, Any], reply: Any) -> Any:
        """The reply payload of a verified answer, or the error it carries."""
        key = self._reply_key(server, method)  # the host's status now counts
        try:
            outcome = authn.verify_reply(
                key, reply, min_api=str(self.REPLY_VERSION), method=method, server=server,
                nonce=args["reply_nonce"],
                request=authn.request_digest(args["payload"], args.get("auth")))
        except exception.ReplyNotAuthenticated as err:
            raise self._not_authenticated(server, method, str(err.kwargs["reason"])) \
                from None
        if "error" in outcome:
            error = outcome["error"]
            raise local_error(error["type"], error["message"], dict(error["kwargs"]))
        return outcome["ok"]

    def _cast(self, method: str, version: str, request: Message) -> None:
        """A one-way call (no signature, no answer), capped like ``_call``."""
        self._check_cap(method, version)
        self.client.prepare(version=version).cast(
            {}, method, payload=request.validated().to_wire())


def _later(one: str, other: str) -> str:
    return one if parse_version(one) >= parse_version(other) else other


# What oslo.messaging's dispatcher answers when a server cannot serve a call.
UNSERVED = {
    "UnsupportedVersion": "it runs an older API version; upgrade it first, or cap "
                          "this client with [upgrade_levels] %(option)s meanwhile",
    "NoSuchMethod": "it has no such method",
}


# Refusals anyone on the broker can cause at will, without a key: a rate
# limit, and whatever the endpoint refused before the method ran (a
# malformed request, a signature that does not verify, a replay, a stale
# command: ``at_verification``). Each at DEBUG, and a WARNING with their
# count at most once a period, so a flood refused at once does not cost a
# log line per call (review finding 6). Every other refusal, a key
# holder's refusal by the method itself included ("only the source may
# pass the commit point"), is logged at WARNING each (review fix3).
QUIET_REFUSALS = (exception.RateLimited,)
REFUSAL_SUMMARY_PERIOD = 60.0
_quiet_refusals = Summary(REFUSAL_SUMMARY_PERIOD)


def is_quiet_refusal(err: exception.VTPCMException) -> bool:
    """Whether anyone could have caused ``err`` without a key."""
    return err.at_verification or isinstance(err, QUIET_REFUSALS)


def log_refusal(method: str, err: exception.VTPCMException) -> None:
    """Log one refused call (its text carries no secret: messages hide
    secret fields)."""
    if not is_quiet_refusal(err):
        LOG.warning("Refused %(method)s: %(error)s", {"method": method, "error": err})
        return
    LOG.debug("Refused %(method)s: %(error)s", {"method": method, "error": err})
    count = _quiet_refusals.add()
    if count:
        LOG.warning("%(n)d calls refused for rate limits, signatures or malformed "
                    "requests since the last such report (each logged at debug "
                    "level); the last: %(method)s: %(error)s",
                    {"n": count, "method": method, "error": err})


def _verified(check: Callable[[], T]) -> T:
    """Run one verification step; its refusal is marked ``at_verification``."""
    try:
        return check()
    except exception.VTPCMException as err:
        err.at_verification = True
        raise


def endpoint(request_type: type[Message], signed: bool = False,
             host_signed: bool = False, vouched: bool = False,
             witness_signed: bool = False) -> Callable[[F], F]:
    """Server side of one RPC method: parse ``payload`` into ``request_type``,
    answer with the method's message; refusals go back to the caller and are
    logged once, without secrets (messages hide secret fields).

    ``signed``: the method changes state, so it runs only for a command the
    engine signed (``auth``), checked by the endpoint object's ``verifier``
    over the payload as received. The schema check comes first (a pure
    function every unsigned method already exposes), so a malformed command
    is named precisely; nothing acts before both passed. Without a verifier
    it refuses: an agent that cannot check the sender acts for nobody.

    ``host_signed``: the method is called by a compute node (the Nova
    driver); the endpoint object's ``verify_host_command(method, payload,
    auth, request)`` decides which hosts may sign it, checks the signature
    and returns the signing host, which the method gets as ``signer``
    (its actions stay bound to that host).

    ``witness_signed``: the method is nova-api's witness (engine API
    1.12); the endpoint object's ``verify_witness(method, payload, auth,
    request)`` checks the signature with the nova-api witness keys and
    returns what the signature says (key, time, nonce), which the method
    gets as ``signer``.

    ``vouched``: an unsigned method (anyone may call it) that the engine
    signs anyway, so that its calls are not rate-limited with everyone
    else's: a call that carries ``auth`` runs only if the ``verifier``
    accepts it, and the method gets ``vouched=True``; one without (or to a
    service without a verifier) gets ``vouched=False``.

    Signed replies: a caller that sends ``reply_nonce`` (agent API 1.6) gets
    the outcome, success or refusal alike, signed with the endpoint object's
    ``reply_signer`` (the host command key) over its API version, the
    method, its ``host``, the nonce and the request (``_signed_reply``).
    Every method decorated here answers so, none needs code of its own."""
    def wrap(func: F) -> F:
        def run(self: Any, payload: Any, auth: Any) -> Message:
            return _verified(lambda: verify(self, payload, auth))()

        def verify(self: Any, payload: Any, auth: Any) -> Callable[[], Message]:
            """Every check before the method runs; returns the method's call."""
            request = request_type.from_wire(payload)
            if signed:
                verifier = getattr(self, "verifier", None)
                if verifier is None:
                    raise exception.CommandRefused(
                        method=func.__name__,
                        reason="this service has no engine public key to check it")
                verifier.verify(func.__name__, payload, auth)
            if host_signed:
                signer = self.verify_host_command(func.__name__, payload, auth, request)
                return lambda: func(self, request, signer)
            if witness_signed:
                witnessed = self.verify_witness(func.__name__, payload, auth, request)
                return lambda: func(self, request, witnessed)
            if vouched:
                # a service that cannot check signatures counts every call
                verifier = getattr(self, "verifier", None)
                checked = auth is not None and verifier is not None
                if checked and verifier is not None:
                    verifier.verify(func.__name__, payload, auth)
                return lambda: func(self, request, vouched=checked)
            return lambda: func(self, request)

        @functools.wraps(func)
        @messaging.expected_exceptions(exception.VTPCMException)
        def inner(self: Any, ctxt: dict[str, Any], payload: Any, auth: Any = None,
                  reply_nonce: Any = None) -> Any:
            with spans.span("serve:" + func.__name__):
                if reply_nonce is not None:
                    return _signed_reply(self, func.__name__, signed, run, payload, auth,
                                         reply_nonce)
                try:
                    return run(self, payload, auth).to_wire()
                except exception.VTPCMException as err:
                    log_refusal(func.__name__, err)
                    raise
        inner.signed = signed  # type: ignore[attr-defined]
        inner.host_signed = host_signed  # type: ignore[attr-defined]
        inner.witness_signed = witness_signed  # type: ignore[attr-defined]
        return inner  # type: ignore[return-value]
    return wrap


def _named_values(err: exception.VTPCMException) -> dict[str, Any]:
    """An error's named values that travel (what oslo.messaging sends with
    an unsigned error reply too): JSON scalars only."""
    return {str(k): v for k, v in err.kwargs.items()
            if isinstance(v, (str, int, float, bool)) or v is None}


def _signed_reply(service: Any, method: str, signed: bool,
                  run: Callable[[Any, Any, Any], Message], payload: Any, auth: Any,
                  reply_nonce: Any) -> dict[str, Any]:
    """Run one call and sign its outcome. A signed command's reply is bound
    to the command's own nonce (so a reply exists only for the command the
    engine sent, executed once); refusals are signed too, since the caller
    may act on them (``DestinationInUse``), except a replay
    (``CommandReplayed``): its first delivery may have run, and a refusal
    decided by the clock (``CommandStale``, a subclass: "expired" once the
    nonce is forgotten may be a replay too). What is not signed (no key, a
    malformed nonce, a replay, a stale command) is refused unsigned: the
    caller takes it as no answer."""
    signer = getattr(service, "reply_signer", None)
    if signer is None:
        raise exception.CommandRefused(
            method=method, reason="this service has no host command key to sign its reply")
    nonce = _verified(lambda: authn.check_nonce(reply_nonce))
    try:
        if signed and not (isinstance(auth, dict) and auth.get("nonce") == nonce):
            err = exception.CommandRefused(
                method=method, reason="the reply nonce must be the command's nonce")
            err.at_verification = True
            raise err
        outcome: dict[str, Any] = {"ok": run(service, payload, auth).to_wire()}
    except exception.CommandReplayed as err:
        # The first delivery may have run (CommandStale too: its nonce may
        # be forgotten): a signed "refused" here would let whoever replays
        # it report a done command as not done.
        log_refusal(method, err)
        raise
    except exception.VTPCMException as err:
        log_refusal(method, err)
        outcome = {"error": {"type": type(err).__name__, "message": str(err),
                             "kwargs": _named_values(err)}}
    reply_signer: authn.CommandSigner = signer
    return reply_signer.sign_reply(str(service.target.version), method, str(service.host),
                                   nonce, authn.request_digest(payload, auth), outcome)
