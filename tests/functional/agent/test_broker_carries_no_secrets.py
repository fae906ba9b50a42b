"""Nothing secret of a vTPCM crosses the message broker in plaintext.

Two real vtpcm-agent daemons (each with its swtpm host-TPM stand-in) and a
signed client talk to the real RabbitMQ through a recording TCP relay, and
run every secret-carrying RPC of one vTPCM: the sealed migration-key
hand-over (``seal_migration_key`` -> ``prepare_incoming``) and the state
transfer (``export_state`` -> ``import_state``), once for a stopped vTPCM
(then aborted) and once for a running one (then committed). Afterwards the
recorded bytes must hold none of the instance's keys (both hosts' at-rest
keys, the destination's fresh ones included, and the migration key), in any
encoding, nor any secret 32-byte window of its plaintext permanent or
volatile state; tests/leakscan.py is the scanner, as in every leak test.

On the wire oslo.messaging (rabbit driver, kombu) sends each message as the
JSON body of an AMQP 0-9-1 ``basic.publish``: ``{"oslo.version": "2.0",
"oslo.message": "<the message as a JSON string>"}``; the vTPCM messages put
bytes in it as standard base64 text (``vtpcm_common.wire``). A key inside a
base64 string shows up as ``b64encode(key)`` only at offsets that are a
multiple of three, and a body larger than the negotiated frame size is cut
into several body frames; so besides the raw bytes the scan also looks at the
reassembled message bodies, every JSON string in them and the base64
decoding of every such string. The relay interleaves the chunks of different
connections in its capture file, so it also keeps each connection direction
as a stream of its own here.
"""

import base64
import binascii
import dataclasses
import hmac
import json
import os
import shutil
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests import leakscan
from tests.functional import tpmtools
from tests.functional.harness import (
    TRANSPORT_URL,
    ClusterHost,
    agent_cluster,
    client_conf,
    short_dir,
)
from vtpcm_common.api.agent import messages as m
from vtpcm_common.api.agent.rpcapi import AgentAPI
from vtpcm_lab import proxy
from vtpcm_lab.live import free_port

pytestmark = pytest.mark.functional

SECRET_METHODS = ("seal_migration_key", "prepare_incoming", "export_state", "import_state")
_SEP = leakscan.SEP


def _amqp_bodies(stream: bytes) -> list[bytes]:
    """Message bodies of one direction of one AMQP 0-9-1 connection, each
    reassembled from its content-body frames."""
    pos = 8 if stream.startswith(b"AMQP") else 0  # protocol header (client side)
    pending: dict[int, tuple[int, bytearray]] = {}
    bodies: list[bytes] = []
    while pos < len(stream):
        kind, channel, size = struct.unpack_from(">BHI", stream, pos)
        end = pos + 7 + size
        assert end < len(stream) and stream[end] == 0xCE, "no AMQP frame at %d" % pos
        payload = stream[pos + 7:end]
        if kind == 2:  # content header: class, weight, body size, properties
            pending[channel] = (struct.unpack_from(">Q", payload, 4)[0], bytearray())
        if kind in (2, 3) and channel in pending:
            expected, body = pending[channel]
            if kind == 3:
                body += payload
            if len(body) >= expected:
                bodies.append(bytes(body))
                del pending[channel]
        pos = end + 1
    assert not pending, "a message body was cut off"
    return bodies


def _strings(value: Any) -> Iterator[str]:
    """Every JSON string in ``value``, descending into strings that are JSON
    themselves (the oslo.message envelope)."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value
        if value[:1] in ("{", "["):
            try:
                yield from _strings(json.loads(value))
            except ValueError:
                pass


def _decoded(bodies: list[bytes]) -> tuple[list[str], list[bytes]]:
    """(the JSON strings of the bodies, the bytes of those that are base64)."""
    texts = [s for body in bodies if body for s in _strings(json.loads(body))]
    blobs = []
    for text in texts:
        if len(text) >= 8 and len(text) % 4 == 0:
            try:
                blobs.append(base64.b64decode(text, validate=True))
            except (binascii.Error, ValueError):
                pass
    return texts, blobs


@dataclasses.dataclass
class Run:
    """What one run put on the wire, and what must not be there (hidden from repr)."""

    instance_uuid: str
    capture: bytes = dataclasses.field(repr=False)  # both capture files of the relay
    streams: list[tuple[bool, bytes]] = dataclasses.field(repr=False)
    bodies: list[bytes] = dataclasses.field(repr=False)
    texts: list[str] = dataclasses.field(repr=False)
    blobs: list[bytes] = dataclasses.field(repr=False)
    envelopes: list[bytes] = dataclasses.field(repr=False)
    exported: list[m.StateBlobs] = dataclasses.field(repr=False)
    keys: list[tuple[str, bytes]] = dataclasses.field(repr=False)
    found: set[bytes] = dataclasses.field(repr=False)  # secret windows of the state

    def haystack(self) -> bytes:
        """Everything to scan, pieces kept apart by a run of zeros."""
        return _SEP.join([self.capture, *(s for _, s in self.streams), *self.bodies,
                          *(t.encode() for t in self.texts), *self.blobs])


def _hand_over(api: AgentAPI, src: ClusterHost, dst: ClusterHost, instance: str, generation: int,
               envelopes: list[bytes]) -> m.MigrationContext:
    ctx = m.MigrationContext(str(uuid.uuid4()), instance, generation, src.name, dst.name)
    kem = api.get_identity(dst.name, os.urandom(32)).kem_public
    sealed = api.seal_migration_key(src.name, ctx, kem)
    envelopes.append(sealed.envelope)
    assert api.prepare_incoming(dst.name, ctx, sealed.envelope).state == "MIGRATING_IN"
    return ctx


def _traffic(api: AgentAPI, a: ClusterHost, b: ClusterHost, base: Path) -> dict[str, Any]:
    """The secret-carrying RPCs of one vTPCM, through the relay."""
    instance = str(uuid.uuid4())
    api.create(a.name, instance)
    info = api.start(a.name, instance)
    pa = a.paths(instance, info.vtpcm_id)
    tpmtools.write_guest_state(pa, os.urandom(48), os.urandom(32), make_key=True)
    api.stop(a.name, instance)  # state, volatile included, on disk for the plaintext read
    source = a.keys(info.vtpcm_id)
    found = tpmtools.secrets_of_state(pa.state_dir, source.at_rest_key, base)
    envelopes: list[bytes] = []
    exported: list[m.StateBlobs] = []
    keys = [("source at-rest key", source.at_rest_key),
            ("migration key", source.migration_key)]

    # Cold: the stopped vTPCM's state goes over the broker, then the move is aborted.
    ctx = _hand_over(api, a, b, instance, 0, envelopes)
    exported.append(api.export_state(a.name, instance))
    incoming = api.import_state(b.name, exported[-1])
    first = b.keys(incoming.vtpcm_id)
    assert first.migration_key == source.migration_key
    keys.append(("aborted destination's at-rest key", first.at_rest_key))
    api.abort_incoming(b.name, ctx)
    api.abort_outgoing(a.name, ctx)
    assert api.get(a.name, instance).state == "STOPPED"

    # Running: hand-over, export, import, commit on both sides. The start
    # began a new migration key epoch: the second hand-over carries that key.
    api.start(a.name, instance)
    second = a.keys(info.vtpcm_id).migration_key
    keys.append(("second epoch's migration key", second))
    ctx = _hand_over(api, a, b, instance, 0, envelopes)
    exported.append(api.export_state(a.name, instance))
    moved = api.import_state(b.name, exported[-1])
    api.commit_incoming(b.name, ctx)
    api.commit_outgoing(a.name, ctx)
    after = api.get(b.name, instance)
    assert (after.state, after.generation, after.running) == ("ACTIVE", 1, True)
    final = b.keys(moved.vtpcm_id)
    carried = hmac.compare_digest(final.migration_key, second)  # no key in a failure
    assert carried
    keys.append(("destination's at-rest key", final.at_rest_key))
    return {"instance_uuid": instance, "envelopes": envelopes, "exported": exported,
            "keys": keys, "found": found}


def _relay_url(port: int) -> tuple[str, tuple[str, int]]:
    """(the transport URL through the relay, the broker the relay forwards to)."""
    url = urlsplit(TRANSPORT_URL)
    creds = url.netloc.rpartition("@")[0]
    netloc = "%s@127.0.0.1:%d" % (creds, port) if creds else "127.0.0.1:%d" % port
    return urlunsplit(url._replace(netloc=netloc)), (url.hostname or "127.0.0.1",
                                                     url.port or 5672)


@pytest.fixture(scope="module")
def run() -> Iterator[Run]:
    work, base = short_dir("vtbrk"), short_dir("vtbrp")
    try:
        exchange = "vtpcm-test-" + uuid.uuid4().hex[:8]
        port = free_port()
        url, broker = _relay_url(port)
        relay = proxy.CaptureProxy(("127.0.0.1", port), broker, work / "broker.capture",
                                   keep_streams=True)
        conf = client_conf(exchange)  # signs like the engine
        conf.set_override("transport_url", url)
        relay.start()
        try:
            api = AgentAPI(conf, timeout=30)
            try:
                with agent_cluster(work, "bk", exchange, api, transport_url=url) as cluster:
                    hosts = [ClusterHost(*entry) for entry in cluster]
                    result = _traffic(api, hosts[0], hosts[1], base)
            finally:
                api.transport.cleanup()
        finally:
            relay.stop()
        capture = relay.capture.read_bytes() + _SEP + Path(
            str(relay.capture) + ".rev").read_bytes()
        streams = [(forward, bytes(s)) for forward, s in relay.streams]
        bodies = [b for _, s in streams for b in _amqp_bodies(s)]
        texts, blobs = _decoded(bodies)
        yield Run(capture=capture, streams=streams, bodies=bodies, texts=texts, blobs=blobs,
                  **result)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)


def test_capture_holds_this_runs_secret_traffic(run: Run) -> None:
    """Controls: the scans below look at the real traffic of this run, in a
    form in which they would find what they look for."""
    assert len(run.streams) >= 6 and len(run.bodies) >= 30  # client + 2 agents, both ways
    for word in (run.instance_uuid, *SECRET_METHODS):
        assert word.encode() in run.capture, word
        assert word in run.texts, word
    # The secret-carrying payloads themselves went through, as base64 text in
    # JSON, and the scan sees their decoded bytes.
    assert len(run.envelopes) == 2 and len(run.exported) == 2
    carried = [*run.envelopes, *(e.permanent for e in run.exported), run.exported[1].volatile]
    for blob in carried:
        assert len(blob) > 100
        assert base64.b64encode(blob) in run.capture
        assert blob in run.blobs
    assert len(run.found) > 1000, "too little of the state counts as secret"
    assert len({key for _, key in run.keys}) == len(run.keys) == 5

    # Planted: a key in a base64 blob at an offset that is not a multiple of
    # 3, and a secret window of the state, in an oslo.messaging body, are
    # found by the same scan as the test below runs (in the decoded blob).
    window = next(iter(run.found))
    key = run.keys[1][1]
    inner = {"method": "import_state", "args": {"payload": {"permanent": base64.b64encode(
        b"\x01" + key + window).decode()}}}
    body = json.dumps({"oslo.version": "2.0", "oslo.message": json.dumps(inner)}).encode()
    assert base64.b64encode(key) not in body and key not in body
    # found as an inner base64 form, and raw in the decoded blob
    found = leakscan.hits(run.keys[1:2], body)
    assert "migration key as base64" in found and "migration key decoded" in found
    assert leakscan.window_hits({window}, body) >= 1
    leakscan.assert_finds(run.keys, run.found, run.haystack())


def test_no_key_of_the_vtpcm_in_any_form_on_the_broker(run: Run) -> None:
    assert leakscan.hits(run.keys, run.haystack()) == []


def test_no_secret_window_of_the_plaintext_state_on_the_broker(run: Run) -> None:
    hits = leakscan.window_hits(run.found, run.haystack())
    assert hits == 0, "%d secret windows of the vTPCM state on the broker" % hits
