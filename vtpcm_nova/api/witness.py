"""nova-api's witness of unshelve and delete requests (a paste filter).

Why: the engine moves a shelved vTPCM to the host Nova's API shows it
unshelving onto, and the reaper shreds a vTPCM whose instance Nova shows
deleted; but Nova's database is no witness the compute hosts cannot
write (any nova-compute saves Instance objects through nova-conductor).
A request a user made to nova-api is: this filter, placed after
keystonemiddleware's auth in nova-api's pipeline, sees Nova answer 2xx to
``POST /servers/{id}/action`` with ``unshelve`` (the target host too when
the body names one at microversion 2.91 or later: below it Nova ignores
the host) or ``forceDelete``, or to ``DELETE /servers/{id}`` (or
``/os-volumes_boot/{id}``, the same controller), and has the engine record
that, signed with a key only the API nodes hold (``[vtpcm]
api_witness_key_file``, engine API 1.12 ``record_api_witness``). The
signature covers the engine topic, the method, the instance, the action,
the host, who asked (project, user, roles), the time and a nonce
(``vtpcm_common.authn``), so a witness cannot be forged, altered,
redirected or replayed.

Who asked matters: nova-compute holds Keystone service credentials (the
admin role in the service project, in upstream installs), so a compromised
compute host can itself ask nova-api to unshelve a server onto it. The
filter witnesses no request whose roles or service roles include one of
``[vtpcm] api_witness_refused_roles`` (default ``service``) or that
carries a service token (it logs why; Nova's answer is unchanged), and
the engine takes an unshelve witness only from the instance's own project
or a listed admin project (``[nova] witness_admin_projects``). The
identity is what keystonemiddleware's ``auth_token`` put in the request
(it strips those headers from what clients send), so the filter must come
after it.

It never changes Nova's answer: the witness is sent after Nova answered
and before the answer leaves, bounded by ``[vtpcm] api_witness_timeout``;
a failure is logged (never with key material) and the unshelve elsewhere
it was for is then refused by the engine. A plain-flavor server is not
witnessed at all (``instances.has_vtpcm`` reads its flavor before the
request goes on; the one place Nova is imported), so the engine never
hears of it; when Nova cannot say, the filter witnesses.
"""

import dataclasses
import io
import json
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from oslo_config import cfg
from oslo_log import log as logging

from vtpcm_common import authn, exception
from vtpcm_common.api.engine import messages as m
from vtpcm_nova.api import instances
from vtpcm_nova.conf import api as api_conf

LOG = logging.getLogger(__name__)

# the largest body read to find the action (Nova's own limit is 112 KiB by
# default, [oslo_middleware] max_request_body_size; an action is tiny)
MAX_BODY = 64 * 1024
# witness sends running at once in one nova-api process (each normally takes
# milliseconds; more only while the engine or the broker is slow or down)
MAX_IN_FLIGHT = 8
# seconds a witness send may take beyond [vtpcm] api_witness_timeout
SEND_SLACK = 0.5
_UUID = r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}"
# PATH_INFO inside the pipeline: /servers/ID[/action] (or the legacy
# /os-volumes_boot/ID, Nova's ServersController too), after an optional
# project id (the legacy /v2/{project_id} routes) or version prefix
_SERVER = re.compile(r"^(?:/[^/]+){0,2}/(?P<coll>servers|os-volumes_boot)/(?P<id>%s)"
                     r"(?P<action>/action)?/?$" % _UUID)
# the first microversion at which Nova's unshelve takes a target host
HOST_MICROVERSION = (2, 91)
_VERSION = re.compile(r"^\s*(\d+)\.(\d+)\s*$")


@dataclasses.dataclass(frozen=True)
class Requester:
    """Who asked, as keystonemiddleware's ``auth_token`` put it in the
    request (``X-Project-Id``, ``X-User-Id``, ``X-Roles``,
    ``X-Service-Roles``, and whether a service token came with it)."""
    project_id: str | None = None
    user_id: str | None = None
    roles: tuple[str, ...] = ()
    service_roles: tuple[str, ...] = ()
    service_token: bool = False

    def refusal(self, refused_roles: frozenset[str]) -> str:
        """Why this requester's request is not witnessed ("" if it is)."""
        if self.service_token:
            return "it carries a service token"
        hit = sorted({r.lower() for r in self.roles + self.service_roles} & refused_roles)
        if hit:
            return "the requester has role(s) %s ([vtpcm] api_witness_refused_roles)" % (
                ", ".join(hit))
        return ""


Send = Callable[[str, str, str | None, Requester], None]
StartResponse = Callable[..., Any]
# whether a server has a vTPCM: True, False, or None when Nova could not say
HasVtpcm = Callable[[dict[str, Any], str], "bool | None"]


def requester_of(environ: dict[str, Any]) -> Requester:
    """Who asked: Nova's request context (``nova.context``, which
    keystonecontext builds from auth_token's headers, oslo.context fields)
    where there is one, else those headers; roles and service-token signs
    from both (a refusal on either counts)."""
    def header(name: str) -> str | None:
        value = environ.get("HTTP_" + name)
        return (str(value).strip() or None) if value is not None else None

    def roles(name: str) -> tuple[str, ...]:
        return tuple(r.strip() for r in (header(name) or "").split(",") if r.strip())

    def listed(value: Any) -> tuple[str, ...]:
        return tuple(str(r) for r in value) if isinstance(value, (list, tuple)) else ()
    ctx = environ.get("nova.context")
    token_auth = environ.get("keystone.token_auth")
    service_token = bool(header("X_SERVICE_TOKEN") or header("X_SERVICE_PROJECT_ID")
                         or getattr(token_auth, "has_service_token", False)
                         or getattr(ctx, "service_token", None)
                         or getattr(ctx, "service_user_id", None))
    project = getattr(ctx, "project_id", None) or header("X_PROJECT_ID") \
        or header("X_TENANT_ID")
    user = getattr(ctx, "user_id", None) or header("X_USER_ID")
    all_roles = dict.fromkeys(listed(getattr(ctx, "roles", None)) + roles("X_ROLES"))
    service_roles = dict.fromkeys(listed(getattr(ctx, "service_roles", None))
                                  + roles("X_SERVICE_ROLES"))
    return Requester(project_id=str(project) if project else None,
                     user_id=str(user) if user else None, roles=tuple(all_roles),
                     service_roles=tuple(service_roles), service_token=service_token)


def microversion_of(environ: dict[str, Any]) -> tuple[int, int]:
    """The compute microversion the request asks for (Nova's default 2.1
    without one or one this cannot read; 'latest' is above any)."""
    value = None
    for part in str(environ.get("HTTP_OPENSTACK_API_VERSION") or "").split(","):
        service, _, version = part.strip().partition(" ")
        if service.lower() == "compute":
            value = version
    if value is None:
        value = environ.get("HTTP_X_OPENSTACK_NOVA_API_VERSION")
    if value is None:
        return (2, 1)
    if str(value).strip().lower() == "latest":
        return (2, 10**6)
    match = _VERSION.match(str(value))
    if match is None:
        return (2, 1)
    return (int(match.group(1)), int(match.group(2)))


def witnessed_request(method: str, path: str, body: bytes | None,
                      microversion: tuple[int, int] = HOST_MICROVERSION
                      ) -> tuple[str, str, str | None] | None:
    """(instance uuid, action, named host) if this request is one the engine
    wants witnessed, else None; the host only at ``microversion`` 2.91 or
    later (Nova ignores it below). Pure: tested on its own."""
    match = _SERVER.match(path)
    if match is None:
        return None
    instance = match.group("id").lower()
    if len(instance) == 32:
        instance = "-".join((instance[:8], instance[8:12], instance[12:16],
                             instance[16:20], instance[20:]))
    if method == "DELETE" and not match.group("action"):
        return instance, "delete", None
    if (method != "POST" or not match.group("action") or match.group("coll") != "servers"
            or body is None):
        return None
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict) or len(doc) != 1:
        return None
    if "forceDelete" in doc:
        return instance, "delete", None
    if "unshelve" not in doc:
        return None
    args = doc["unshelve"]
    host = args.get("host") if isinstance(args, dict) else None
    if microversion < HOST_MICROVERSION:
        return instance, "unshelve", None  # Nova schedules it anywhere
    if host is not None and not (isinstance(host, str) and _valid_host(host)):
        return None  # Nova answers 400 for a host it cannot take anyway
    return instance, "unshelve", host


def _valid_host(host: str) -> bool:
    try:
        m.VtpcmPlacement("00000000-0000-0000-0000-000000000000", host).validated()
    except exception.InvalidInput:
        return False
    return True


class WitnessFilter:
    """The WSGI middleware: passes every request on unchanged and, for a
    witnessed one Nova answered 2xx and a requester not refused, calls
    ``send`` once."""

    def __init__(self, app: Callable[..., Iterable[bytes]], send: Send,
                 refused_roles: Iterable[str] = ("service",),
                 has_vtpcm: HasVtpcm | None = None) -> None:
        self.app = app
        self.send = send
        self.refused_roles = frozenset(r.strip().lower() for r in refused_roles if r.strip())
        self.has_vtpcm = has_vtpcm

    def __call__(self, environ: dict[str, Any],
                 start_response: StartResponse) -> Iterable[bytes]:
        method = str(environ.get("REQUEST_METHOD", ""))
        path = str(environ.get("PATH_INFO", ""))
        if method not in ("POST", "DELETE") or _SERVER.match(path) is None:
            return self.app(environ, start_response)
        body = _read_body(environ) if method == "POST" else None
        found = witnessed_request(method, path, body, microversion_of(environ))
        if found is None:
            return self.app(environ, start_response)
        if self.has_vtpcm is not None and self.has_vtpcm(environ, found[0]) is False:
            # a plain-flavor server: the engine never hears of it
            return self.app(environ, start_response)
        target = (*found, requester_of(environ))
        status: list[str] = []

        def capture(line: str, headers: list[tuple[str, str]],
                    exc_info: Any = None) -> Any:
            status.append(line)
            if exc_info is not None:
                return start_response(line, headers, exc_info)
            return start_response(line, headers)

        result = self.app(environ, capture)
        if status:  # Nova's (webob) answers start at once
            self._witness(status[-1], target)
            return result
        return self._after_first(result, status, target)

    def _after_first(self, result: Iterable[bytes], status: list[str],
                     target: tuple[str, str, str | None, Requester]) -> Iterator[bytes]:
        """An application that starts its answer lazily: witness once it did."""
        done = False
        try:
            for chunk in result:
                if not done and status:
                    done = True
                    self._witness(status[-1], target)
                yield chunk
            if not done and status:
                self._witness(status[-1], target)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()

    def _witness(self, status_line: str,
                 target: tuple[str, str, str | None, Requester]) -> None:
        if not status_line[:1] == "2":
            return
        instance, action, host, who = target
        refusal = who.refusal(self.refused_roles)
        if refusal:
            LOG.warning("Not witnessing the %(action)s of server %(i)s by user %(u)s of "
                        "project %(p)s: %(why)s (a compute host's service credentials "
                        "must not make witnesses); an unshelve of it onto another host "
                        "will be refused", {"action": action, "i": instance,
                                            "u": who.user_id, "p": who.project_id,
                                            "why": refusal})
            return
        try:
            self.send(instance, action, host, who)
        except Exception as err:  # noqa: BLE001 - never change Nova's answer
            LOG.warning("The vTPCM engine did not record nova-api's witness of the "
                        "%(action)s of server %(i)s (%(type)s: %(err)s): an unshelve of "
                        "it onto another host will be refused",
                        {"action": action, "i": instance, "type": type(err).__name__,
                         "err": str(err)[:300]})
            return
        LOG.debug("Witness of the %(action)s of server %(i)s recorded by the vTPCM engine",
                  {"action": action, "i": instance})


def _read_body(environ: dict[str, Any]) -> bytes | None:
    """The request body (put back for Nova), or None if it is not small
    and of a known length."""
    try:
        length = int(environ.get("CONTENT_LENGTH") or "")
    except ValueError:
        return None
    if length < 0 or length > MAX_BODY:
        return None
    stream = environ.get("wsgi.input")
    if stream is None:
        return None
    body = bytes(stream.read(length))
    environ["wsgi.input"] = io.BytesIO(body)
    return body


def load_witness_key(conf: cfg.ConfigOpts) -> authn.CommandSigner:
    """The API node's witness key; a clear error naming the option when it
    is not set or not usable (nova-api then does not start)."""
    api_conf.register_opts(conf)
    path = conf.vtpcm.api_witness_key_file
    if not path:
        raise exception.InvalidInput(
            reason="[vtpcm] api_witness_key_file is not set: the vtpcm_witness filter "
                   "needs the Ed25519 key this API node signs witnesses with "
                   "('vtpcm-manage keys create PATH')")
    try:
        return authn.load_signing_key(Path(path), group_readable=True,
                                      what="nova-api witness key")
    except exception.InvalidInput as err:
        raise exception.InvalidInput(
            reason="[vtpcm] api_witness_key_file: %s" % err.kwargs.get("reason", err)) \
            from None


class EngineWitness:
    """Sends witnesses to the engine through the vTPCM transport (``[vtpcm]
    transport_url`` or Nova's own), the client made at the first one."""

    def __init__(self, conf: cfg.ConfigOpts, signer: authn.CommandSigner) -> None:
        self.conf = conf
        self.signer = signer
        self._lock = threading.Lock()
        self._api: Any = None
        # sends started and not yet ended, with their start times: one that
        # outlived its bound (a broker that is down: the reply listener's
        # connection retries whatever ``retry`` says) makes later sends fail
        # at once, and at most MAX_IN_FLIGHT run at a time, so concurrent
        # requests cannot pile up threads (witness review round 2, F3)
        self._in_flight: dict[threading.Thread, float] = {}
        self._slots = threading.BoundedSemaphore(MAX_IN_FLIGHT)

    def __repr__(self) -> str:
        return "<EngineWitness key=%s>" % self.signer.fingerprint

    def __call__(self, instance_uuid: str, action: str, host: str | None,
                 who: Requester) -> None:
        """Record one witness, the whole send (the wait for a free slot
        included) bounded by ``[vtpcm] api_witness_timeout`` plus
        ``SEND_SLACK``: oslo.messaging's own timeout bounds only the
        wait for the reply, and without ``retry`` it reconnects to a broker
        that is down forever, which would hold Nova's answer. While a send
        is stuck, later ones fail at once, and at most ``MAX_IN_FLIGHT``
        sends run at a time (a stuck thread ends when the broker is back)."""
        timeout = self.conf.vtpcm.api_witness_timeout
        requester = m.ApiWitness(instance_uuid, action, host, who.project_id, who.user_id,
                                 ",".join(who.roles)[:255] or None)
        outcome: list[BaseException | None] = []
        api: Any = None

        def send() -> None:
            try:
                api.record_api_witness(instance_uuid, action, host, timeout=timeout,
                                       requester=requester)
            except BaseException as err:  # noqa: BLE001 - handed to the caller
                outcome.append(err)
            else:
                outcome.append(None)
            finally:
                self._slots.release()
        worker = threading.Thread(target=send, name="vtpcm-witness", daemon=True)
        with self._lock:
            now = time.monotonic()
            self._in_flight = {t: at for t, at in self._in_flight.items() if t.is_alive()}
            if any(now - at > timeout + SEND_SLACK for at in self._in_flight.values()):
                raise exception.ServiceUnreachable(
                    service="vtpcm-engine", method="record_api_witness",
                    reason="an earlier witness is still being sent (broker down?)")
            if self._api is None:
                from vtpcm_common.api.engine.rpcapi import EngineAPI
                from vtpcm_nova import clients
                self._api = EngineAPI(self.conf, clients.transport(self.conf),
                                      timeout=timeout, witness_signer=self.signer,
                                      exchange=self.conf.vtpcm.control_exchange,
                                      retry=0)
            api = self._api
        # one deadline for the whole send, the wait for a slot included: a
        # burst waits for a free slot (a healthy engine frees one in
        # milliseconds); the semaphore bounds the threads whatever happens
        deadline = time.monotonic() + timeout + SEND_SLACK
        if not self._slots.acquire(timeout=timeout):
            raise exception.ServiceUnreachable(
                service="vtpcm-engine", method="record_api_witness",
                reason="%d witnesses are being sent already" % MAX_IN_FLIGHT)
        try:  # the slot goes back on any failure before the thread owns it
            with self._lock:
                self._in_flight[worker] = time.monotonic()
                worker.start()
        except BaseException:
            self._in_flight.pop(worker, None)
            self._slots.release()
            raise
        worker.join(max(0.0, deadline - time.monotonic()))
        if not outcome:
            raise exception.ServiceUnreachable(
                service="vtpcm-engine", method="record_api_witness",
                reason="no answer within %.1f s ([vtpcm] api_witness_timeout)" % timeout)
        if outcome[0] is not None:
            raise outcome[0]


def filter_factory(global_conf: dict[str, Any], **local_conf: Any
                   ) -> Callable[[Callable[..., Iterable[bytes]]], WitnessFilter]:
    """paste.deploy's entry: ``[filter:vtpcm_witness] paste.filter_factory =
    vtpcm_nova.api.witness:filter_factory``, in nova-api's pipelines after
    the auth filter (``keystonecontext``)."""
    del global_conf, local_conf
    conf = cfg.CONF
    signer = load_witness_key(conf)
    send = EngineWitness(conf, signer)
    LOG.info("vTPCM witness filter: unshelve and delete requests Nova accepts are "
             "signed with nova-api witness key %(key)s", {"key": signer.fingerprint})

    def make(app: Callable[..., Iterable[bytes]]) -> WitnessFilter:
        return WitnessFilter(app, send, conf.vtpcm.api_witness_refused_roles,
                             instances.has_vtpcm)
    return make
