"""A recording relay in front of a swtpm stand-in: what a TPM-stream observer sees.

The tpm2-tss swtpm TCTI (``swtpm:path=S``) sends raw TPM 2.0 commands on
``S`` and power/locality commands on ``S.ctrl``. ``TPMWireTap`` listens on
its own ``S'`` and ``S'.ctrl``, forwards both to the stand-in, and keeps
every byte each way, per connection: a full trace of the TPM interface, the
same an observer of the SPI bus, a TSS trace or a TCTI logging layer gets.
``commands()`` splits the command direction into (command code, bytes).
"""

from __future__ import annotations

import os
import socket
import struct
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager

JOIN_TIMEOUT = 5.0
TPM_CC_CREATE_PRIMARY = 0x131
TPM_CC_LOAD = 0x157


class TPMWireTap:
    """Relay ``tcti`` (``swtpm:path=...``) through recorded unix sockets."""

    def __init__(self, target_tcti: str) -> None:
        prefix = "swtpm:path="
        if not target_tcti.startswith(prefix):
            raise ValueError("only swtpm:path= stand-ins are relayed")
        self._target = target_tcti[len(prefix):]
        self._dir = tempfile.mkdtemp(prefix="tap", dir="/tmp")
        self.path = os.path.join(self._dir, "tpm")
        # (command direction?, bytes) per connection direction, data socket only
        self.streams: list[tuple[bool, bytearray]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._servers: list[socket.socket] = []
        self._threads: list[threading.Thread] = []

    @property
    def tcti(self) -> str:
        return "swtpm:path=" + self.path

    def start(self) -> TPMWireTap:
        for suffix in ("", ".ctrl"):
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.bind(self.path + suffix)
            server.listen(8)
            server.settimeout(0.2)
            self._servers.append(server)
            self._spawn(self._accept, server, self._target + suffix, suffix == "")
        return self

    def _spawn(self, fn: object, *args: object) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)  # type: ignore[arg-type]
        t.start()
        self._threads.append(t)

    def _accept(self, server: socket.socket, target: str, record: bool) -> None:
        while not self._stop.is_set():
            try:
                client, _ = server.accept()
            except (TimeoutError, OSError):
                continue
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.connect(target)
            for src, dst, forward in ((client, upstream, True), (upstream, client, False)):
                buf = bytearray()
                if record:
                    with self._lock:
                        self.streams.append((forward, buf))
                self._spawn(self._pump, src, dst, buf)

    def _pump(self, src: socket.socket, dst: socket.socket, buf: bytearray) -> None:
        src.settimeout(0.2)
        try:
            while not self._stop.is_set():
                try:
                    data = src.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    break
                buf += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self) -> None:
        self._stop.set()
        for server in self._servers:
            server.close()
        for t in self._threads:
            t.join(JOIN_TIMEOUT)
        for suffix in ("", ".ctrl"):
            if os.path.exists(self.path + suffix):
                os.unlink(self.path + suffix)
        os.rmdir(self._dir)

    def everything(self) -> bytes:
        """Both directions of every connection (for scanning)."""
        with self._lock:
            return b"".join(bytes(b) for _fwd, b in self.streams)

    def commands(self) -> list[tuple[int, bytes]]:
        """Every TPM command sent, as (command code, whole command bytes)."""
        out = []
        with self._lock:
            streams = [bytes(b) for fwd, b in self.streams if fwd]
        for data in streams:
            off = 0
            while off + 10 <= len(data):
                _tag, size, code = struct.unpack_from(">HII", data, off)
                out.append((code, data[off:off + size]))
                off += size
        return out


@contextmanager
def wiretap(target_tcti: str) -> Iterator[TPMWireTap]:
    """A started tap, stopped (threads joined with a timeout) on exit."""
    tap = TPMWireTap(target_tcti).start()
    try:
        yield tap
    finally:
        tap.stop()


def parameters(command: bytes, handles: int) -> bytes:
    """The parameter area of a command with ``handles`` handles and sessions."""
    off = 10 + 4 * handles
    (auth_size,) = struct.unpack_from(">I", command, off)
    return command[off + 4 + auth_size:]


TPM_CC_START_AUTH_SESSION = 0x176
TPM_RH_NULL = 0x40000007
TPM_SE_TRIAL = 0x03


def unsalted_sessions(tap: TPMWireTap) -> list[bytes]:
    """Every TPM2_StartAuthSession of a real (not trial) session that is
    not salted: tpmKey TPM_RH_NULL or an empty encryptedSalt. Why: the
    scan "the secret's bytes are not on the wire" passes any encryption,
    also that of an unsalted session whose key is computed from values on
    the wire (empty-auth parent) -- finding M1."""
    out = []
    for code, cmd in tap.commands():
        if code != TPM_CC_START_AUTH_SESSION:
            continue
        (tpm_key,) = struct.unpack_from(">I", cmd, 10)
        off = 18  # after tpmKey and bind; no authorization area
        (n,) = struct.unpack_from(">H", cmd, off)
        off += 2 + n  # nonceCaller
        (salt_len,) = struct.unpack_from(">H", cmd, off)
        session_type = cmd[off + 2 + salt_len]
        if session_type != TPM_SE_TRIAL and (tpm_key == TPM_RH_NULL or salt_len == 0):
            out.append(cmd)
    return out
