"""The lab guest's serial console when Nova defined the domain: a pty.

Nova's libvirt driver gives a guest without a serial proxy a ``pty`` serial
(its output also logged to ``console.log``). The guest speaks the same line
protocol as in the plain lab (``vtpcm_lab.console``); only the transport
differs: the pty's slave side, found in the live domain XML, in raw mode so
the host's line discipline neither echoes nor rewrites what passes.
"""

import errno
import os
import select
import termios
import tty
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt

from vtpcm_lab.console import GuestConsole
from vtpcm_lab.exception import LabError
from vtpcm_lab.hosts import LabHost


class _PtyChannel:
    """The socket methods ``GuestConsole`` uses, on a pty file descriptor."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._timeout: float | None = None

    def settimeout(self, timeout: float | None) -> None:
        self._timeout = timeout

    def setblocking(self, flag: bool) -> None:
        self._timeout = None if flag else 0.0

    def recv(self, size: int) -> bytes:
        ready, _, _ = select.select([self._fd], [], [], self._timeout)
        if not ready:
            if self._timeout == 0.0:
                raise BlockingIOError(errno.EAGAIN, "no data")
            raise TimeoutError("no data")
        try:
            return os.read(self._fd, size)
        except OSError as err:
            if err.errno == errno.EIO:  # QEMU closed the master side
                return b""
            raise

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    def close(self) -> None:
        os.close(self._fd)


class PtyConsole(GuestConsole):
    """A ``GuestConsole`` on a pty path (``/dev/pts/N``)."""

    def _connect(self, timeout: float) -> _PtyChannel:  # type: ignore[override]
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_NOCTTY)
        except OSError as err:
            raise LabError(reason="serial pty %s: %s" % (self.path, err.strerror)) \
                from None
        tty.setraw(fd, termios.TCSANOW)
        attrs = termios.tcgetattr(fd)
        attrs[3] &= ~termios.ECHO
        termios.tcsetattr(fd, termios.TCSANOW, attrs)
        channel = _PtyChannel(fd)
        channel.settimeout(0.2)
        return channel


def serial_pty(host: LabHost, instance_uuid: str) -> Path:
    """The pty of serial port 0 of the running domain ``instance_uuid`` on ``host``."""
    conn = host.connect()
    try:
        xml = conn.lookupByUUIDString(instance_uuid).XMLDesc(0)
    except libvirt.libvirtError as err:
        raise LabError(reason="no domain %s on host %s: %s"
                                 % (instance_uuid, host.name, err)) from None
    finally:
        conn.close()
    dom = ET.fromstring(xml)  # noqa: S314 - from our own libvirt daemon
    for serial in dom.findall("devices/serial[@type='pty']"):
        source = serial.find("source")
        if source is not None and source.get("path"):
            return Path(source.get("path", ""))
    raise LabError(reason="domain %s on host %s has no pty serial"
                             % (instance_uuid, host.name))


def open_console(host: LabHost, instance_uuid: str, ready_timeout: float = 120.0) -> PtyConsole:
    """Connect to the guest's serial pty and wait until its command loop answers."""
    con = PtyConsole(serial_pty(host, instance_uuid))
    try:
        con.wait_ready(timeout=ready_timeout)
    except LabError:
        con.close()
        raise
    return con
