"""Client for the lab guest's serial console (a unix socket QEMU listens on).

The guest answers one line command at a time and ends every answer with
``VTPCM-END <command line>``; matching the whole command line lets the client
skip stale output (boot noise, answers to earlier pings) without guessing.
"""

import socket
import time
from pathlib import Path

from oslo_log import log as logging

from vtpcm_lab.exception import LabError

LOG = logging.getLogger(__name__)

END_MARKER = "VTPCM-END "
_POLL = 0.2


class GuestConsole:
    """One connection to a guest's serial socket; reconnect after a migration."""

    def __init__(self, path: str | Path, connect_timeout: float = 10.0) -> None:
        self.path = str(path)
        self._buf = b""
        self._ping_seq = 0
        self._sock = self._connect(connect_timeout)

    def __repr__(self) -> str:
        return "GuestConsole(%r)" % self.path

    def _connect(self, timeout: float) -> socket.socket:
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.path)
            except OSError as exc:
                sock.close()
                if time.monotonic() >= deadline:
                    raise LabError(
                        reason="serial socket %s not connectable: %s" % (self.path, exc)
                    ) from exc
                time.sleep(0.05)
                continue
            sock.settimeout(_POLL)
            return sock

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "GuestConsole":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _drain(self) -> None:
        """Drop whatever the guest printed before our next command."""
        self._sock.setblocking(False)
        try:
            while True:
                data = self._sock.recv(65536)
                if not data:
                    break
        except (BlockingIOError, InterruptedError):
            pass
        finally:
            self._sock.settimeout(_POLL)
        self._buf = b""

    def send(self, cmd: str, timeout: float = 30.0) -> list[str]:
        """Run ``cmd`` in the guest; return its answer lines (marker excluded)."""
        if "\n" in cmd or "\r" in cmd or not cmd.strip():
            raise LabError(reason="guest command must be one non-empty line")
        cmd = " ".join(cmd.split())
        self._drain()
        self._sock.sendall(cmd.encode() + b"\n")
        marker = (END_MARKER + cmd).encode()
        deadline = time.monotonic() + timeout
        while True:
            lines = self._buf.split(b"\n")
            for idx, raw in enumerate(lines):
                if raw.rstrip(b"\r") == marker:
                    self._buf = b"\n".join(lines[idx + 1:])
                    answer = [ln.decode(errors="replace").strip("\r") for ln in lines[:idx]]
                    return [ln for ln in answer if ln]
            if time.monotonic() >= deadline:
                raise LabError(
                    reason="guest did not answer %r within %.1fs" % (cmd.split()[0], timeout))
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            if not data:
                raise LabError(reason="serial socket %s closed" % self.path)
            self._buf += data

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Ping until the guest's command loop answers; return the seconds waited.

        Pinging (instead of waiting for the boot banner) also works when the
        client connects after the banner was printed, or after a migration.
        """
        start = time.monotonic()
        deadline = start + timeout
        while True:
            self._ping_seq += 1
            token = "%d" % self._ping_seq
            try:
                answer = self.send("ping " + token, timeout=1.0)
            except LabError:
                if time.monotonic() >= deadline:
                    raise
                continue
            if "pong " + token in answer:
                return time.monotonic() - start

    def report(self, timeout: float = 30.0) -> dict[str, str]:
        """``report`` as a dict (PCR16, NV, EK, UPTIME, BOOTID, TPMDEV)."""
        values: dict[str, str] = {}
        for line in self.send("report", timeout=timeout):
            key, sep, value = line.partition("=")
            if sep and key.isupper():
                values[key] = value
        missing = {"PCR16", "NV", "EK", "UPTIME", "BOOTID"} - values.keys()
        if missing:
            raise LabError(reason="guest report lacks %s" % sorted(missing))
        return values

    def write(self, hex32: str, timeout: float = 30.0) -> None:
        """Extend PCR16 with and store in NV the 32 bytes ``hex32`` (64 hex digits)."""
        answer = self.send("write " + hex32, timeout=timeout)
        if answer[-1:] != ["OK"]:
            raise LabError(reason="guest write failed: %s" % answer)
