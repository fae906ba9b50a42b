"""nova-api's witness of unshelve and delete requests (a paste filter).

Why: the engine moves a shelved vTPCM to the host Nova's API shows it
unshelving onto, and the reaper shreds a vTPCM whose instance Nova shows
deleted; but Nova's database is no witness the compute hosts cannot
write (any nova-compute saves Instance objects through nova-conductor).
A request a user made to nova-api is: this filter, placed after
keystonemiddleware's auth in nova-api's pipeline, sees Nova answer 2xx to
``POST /servers/{id}/action`` with ``unshelve`` (the target host too when
the body names one, microversion 2.91) or ``forceDelete``, or to
``DELETE /servers/{id}``, and has the engine record that, signed with a
key only the API nodes hold (``[vtpcm] api_witness_key_file``, engine API
1.12 ``record_api_witness``). The signature covers the engine topic, the
method, the instance, the action, the host, the time and a nonce
(``vtpcm_common.authn``), so a witness cannot be forged, altered,
redirected or replayed.

It never changes Nova's answer: the witness is sent after Nova answered
and before the answer leaves, bounded by ``[vtpcm] api_witness_timeout``;
a failure is logged (never with key material) and the unshelve elsewhere
it was for is then refused by the engine. Plain WSGI: nothing from Nova
or webob is imported.
"""

import io
import json
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from oslo_config import cfg
from oslo_log import log as logging

from vtpcm_common import authn, exception
from vtpcm_common.api.engine import messages as m
from vtpcm_nova.conf import api as api_conf

LOG = logging.getLogger(__name__)

# the largest body read to find the action (Nova's own limit is 112 KiB by
# default, [oslo_middleware] max_request_body_size; an action is tiny)
MAX_BODY = 64 * 1024
_UUID = r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}"
# PATH_INFO inside the pipeline: /servers/ID[/action], after an optional
# project id (the legacy /v2/{project_id} routes) or version prefix
_SERVER = re.compile(r"^(?:/[^/]+){0,2}/servers/(?P<id>%s)(?P<action>/action)?/?$" % _UUID)

Send = Callable[[str, str, str | None], None]
StartResponse = Callable[..., Any]


def witnessed_request(method: str, path: str, body: bytes | None
                      ) -> tuple[str, str, str | None] | None:
    """(instance uuid, action, named host) if this request is one the engine
    wants witnessed, else None. Pure: tested on its own."""
    match = _SERVER.match(path)
    if match is None:
        return None
    instance = match.group("id").lower()
    if len(instance) == 32:
        instance = "-".join((instance[:8], instance[8:12], instance[12:16],
                             instance[16:20], instance[20:]))
    if method == "DELETE" and not match.group("action"):
        return instance, "delete", None
    if method != "POST" or not match.group("action") or body is None:
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
    witnessed one Nova answered 2xx, calls ``send`` once."""

    def __init__(self, app: Callable[..., Iterable[bytes]], send: Send) -> None:
        self.app = app
        self.send = send

    def __call__(self, environ: dict[str, Any],
                 start_response: StartResponse) -> Iterable[bytes]:
        method = str(environ.get("REQUEST_METHOD", ""))
        path = str(environ.get("PATH_INFO", ""))
        if method not in ("POST", "DELETE") or _SERVER.match(path) is None:
            return self.app(environ, start_response)
        body = _read_body(environ) if method == "POST" else None
        target = witnessed_request(method, path, body)
        if target is None:
            return self.app(environ, start_response)
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
                     target: tuple[str, str, str | None]) -> Iterator[bytes]:
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

    def _witness(self, status_line: str, target: tuple[str, str, str | None]) -> None:
        if not status_line[:1] == "2":
            return
        instance, action, host = target
        try:
            self.send(instance, action, host)
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

    def __repr__(self) -> str:
        return "<EngineWitness key=%s>" % self.signer.fingerprint

    def __call__(self, instance_uuid: str, action: str, host: str | None) -> None:
        with self._lock:
            if self._api is None:
                from vtpcm_common.api.engine.rpcapi import EngineAPI
                from vtpcm_nova import clients
                self._api = EngineAPI(self.conf, clients.transport(self.conf),
                                      timeout=self.conf.vtpcm.api_witness_timeout,
                                      witness_signer=self.signer,
                                      exchange=self.conf.vtpcm.control_exchange)
            api = self._api
        api.record_api_witness(instance_uuid, action, host,
                               timeout=self.conf.vtpcm.api_witness_timeout)


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
        return WitnessFilter(app, send)
    return make
