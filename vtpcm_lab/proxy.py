"""A TCP relay that records what it forwards, to inspect a migration stream.

The "no plaintext TPM state in the migration stream" test puts this between
the source QEMU (connecting to ``listen``) and the destination QEMU
(listening on ``target``) and scans the capture afterwards. Forward bytes
(client -> target) go to ``capture``, the return direction to
``capture.rev``, so a window of the stream is never split by interleaving.
With several connections (a broker relay) the files interleave them;
``keep_streams=True`` also keeps each connection direction apart, in order,
in ``streams``.
"""

import select
import socket
import threading
from pathlib import Path
from typing import BinaryIO

from oslo_log import log as logging

from vtpcm_lab.exception import LabError

LOG = logging.getLogger(__name__)

_CHUNK = 65536


class CaptureProxy:
    """Relay ``listen`` -> ``target`` in threads; bounded capture; clean stop."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int],
                 capture: Path, max_capture_bytes: int = 1 << 30,
                 keep_streams: bool = False) -> None:
        self.listen = listen
        self.target = target
        self.capture = capture
        self.max_capture_bytes = max_capture_bytes
        self.forwarded = 0
        self.keep_streams = keep_streams
        # (client -> target?, bytes) per connection direction, if kept
        self.streams: list[tuple[bool, bytearray]] = []
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self._server: socket.socket | None = None

    def __repr__(self) -> str:
        return "CaptureProxy(%s:%d -> %s:%d)" % (*self.listen, *self.target)

    def start(self) -> "CaptureProxy":
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            server.bind(self.listen)
        except OSError as exc:
            server.close()
            raise LabError(reason="proxy cannot bind %s:%d: %s"
                                     % (*self.listen, exc)) from exc
        server.listen(4)
        server.settimeout(0.2)
        self._server = server
        self.capture.write_bytes(b"")
        Path(str(self.capture) + ".rev").write_bytes(b"")
        self._spawn(self._accept_loop, "proxy-accept")
        return self

    def __enter__(self) -> "CaptureProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, target: object, name: str, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=name,  # type: ignore[arg-type]
                                  daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        assert self._server is not None
        while not self._stopping.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10.0)
            except OSError as exc:
                LOG.warning("Proxy cannot reach %(t)s: %(err)s",
                            {"t": self.target, "err": exc})
                client.close()
                continue
            for sock in (client, upstream):
                # Long timeout for sendall; readiness is polled with select.
                sock.settimeout(30.0)
            with self._lock:
                self._conns.extend((client, upstream))
            out_f = open(self.capture, "ab")  # noqa: SIM115 - closed by the pump
            rev_f = open(str(self.capture) + ".rev", "ab")  # noqa: SIM115
            self._spawn(self._pump, "proxy-fwd", client, upstream, out_f, True)
            self._spawn(self._pump, "proxy-rev", upstream, client, rev_f, False)

    def _pump(self, src: socket.socket, dst: socket.socket, capture: BinaryIO,
              forward: bool) -> None:
        written = 0
        stream = bytearray()
        if self.keep_streams:
            with self._lock:
                self.streams.append((forward, stream))
        try:
            while not self._stopping.is_set():
                try:
                    ready, _, _ = select.select([src], [], [], 0.2)
                    if not ready:
                        continue
                    data = src.recv(_CHUNK)
                except OSError:
                    break
                if not data:
                    break
                if written < self.max_capture_bytes:
                    kept = data[: self.max_capture_bytes - written]
                    capture.write(kept)
                    if self.keep_streams:
                        stream += kept
                    written += len(data)
                try:
                    dst.sendall(data)
                except OSError:
                    break
                if forward:
                    with self._lock:
                        self.forwarded += len(data)
        finally:
            capture.close()
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def stop(self, timeout: float = 10.0) -> None:
        """Close everything and join the threads (bounded)."""
        self._stopping.set()
        if self._server is not None:
            self._server.close()
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout)
        with self._lock:
            for sock in self._conns:
                sock.close()
            self._conns.clear()
        alive = [t.name for t in threads if t.is_alive()]
        if alive:
            raise LabError(reason="proxy threads did not stop: %s" % alive)


def high_entropy_windows(blob: bytes, window: int = 32, min_distinct: int = 20) -> set[int]:
    """Offsets of ``window``-byte slices of ``blob`` that look random.

    Seeds and keys look random; padding, counters and zero runs do not and
    would match any memory image, so they are left out.
    """
    return {i for i in range(len(blob) - window + 1)
            if len(set(blob[i:i + window])) >= min_distinct}


def find_windows(blob: bytes, haystack: bytes, offsets: set[int],
                 window: int = 32) -> set[int]:
    """Offsets (of ``offsets``) whose ``window``-byte slice of ``blob`` occurs in ``haystack``.

    Exact and linear: any occurrence of a window at position p covers the
    aligned gram haystack[q:q+g] (q the first multiple of g >= p, g =
    window // 2), which is a g-byte gram of that window; so looking up only
    the aligned grams of the haystack in a set of the blob's grams finds
    every candidate, and each candidate is then verified byte for byte.
    Grams with fewer than 4 distinct bytes are skipped: a window holding one
    has at most g + 3 < 20 distinct bytes and is never in ``offsets``.
    """
    gram = window // 2
    index: dict[bytes, list[int]] = {}
    for start in offsets:
        for k in range(gram):
            piece = blob[start + k:start + k + gram]
            if len(set(piece)) >= 4:
                index.setdefault(piece, []).append(start)
    found: set[int] = set()
    view = memoryview(haystack)
    for q in range(0, len(haystack) - gram + 1, gram):
        starts = index.get(bytes(view[q:q + gram]))
        if not starts:
            continue
        for start in starts:
            if start in found:
                continue
            for k in range(gram):
                p = q - k
                if p >= 0 and view[p:p + window] == blob[start:start + window]:
                    found.add(start)
                    break
    return found
