"""One connection to a swtpm control socket, every read bounded by a deadline.

Why its own module: all socket I/O of the control channel is here and
nowhere else; it frames and checks through ``framing`` only. One write per
command; any failure closes the connection (a failed reply may leave unread
bytes behind: see ``framing.response_length``), the next command reconnects.
"""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path
from types import TracebackType

from vtpcm_agent.swtpm.framing import (
    _U32,
    MAX_BLOB_SIZE,
    TPM_SUCCESS,
    BlobType,
    Command,
    StateBlob,
    _fail,
    encode_get_info,
    encode_get_stateblob,
    encode_init,
    encode_request,
    encode_set_locality,
    encode_set_stateblob,
    parse_capability,
    parse_config,
    parse_info,
    parse_result,
    parse_stateblob,
    response_length,
)
from vtpcm_common import exception


class CtrlClient:
    """One connection to a swtpm control socket.

    ``timeout`` bounds each command (connect, write and every read). The
    channel serves one client at a time: while QEMU (or another client) is
    connected, commands time out; keep the client open only as long as a
    transaction needs it.
    """

    def __init__(self, path: Path | str, timeout: float = 5.0, *,
                 max_blob_size: int = MAX_BLOB_SIZE, peer_uid: int | None = None) -> None:
        if timeout <= 0:
            raise exception.InvalidInput(reason="timeout must be positive, got %r" % (timeout,))
        self.path = Path(path)
        self.timeout = timeout
        self.max_blob_size = max_blob_size
        # the uid the serving swtpm must run as (SO_PEERCRED), None: anyone;
        # the path lies in a directory of that uid, which may point it at
        # another VM's socket
        self.peer_uid = peer_uid
        self._sock: socket.socket | None = None

    def __repr__(self) -> str:
        return "CtrlClient(path=%r, timeout=%r)" % (str(self.path), self.timeout)

    def __enter__(self) -> CtrlClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def _connect(self, command: Command, deadline: float) -> socket.socket:
        if self._sock is not None:
            return self._sock
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.connect(str(self.path))
        except OSError as exc:
            sock.close()
            raise _fail(command, "cannot connect to control socket %s: %s"
                        % (self.path, exc.strerror or type(exc).__name__)) from None
        if self.peer_uid is not None:
            cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                   struct.calcsize("3i"))
            pid, uid, _ = struct.unpack("3i", cred)
            if uid != self.peer_uid:
                sock.close()
                raise _fail(command, "control socket %s is served by uid %d (pid %d), not "
                            "the swtpm's uid %d" % (self.path, uid, pid, self.peer_uid))
        self._sock = sock
        return sock

    def _transact(self, command: Command, request: bytes) -> bytes:
        deadline = time.monotonic() + self.timeout
        sock = self._connect(command, deadline)
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.sendall(request)
            received = bytearray()
            while True:
                need = response_length(command, bytes(received), max_payload=self.max_blob_size)
                if len(received) >= need:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining)
                chunk = sock.recv(min(need - len(received), 1 << 16))
                if not chunk:
                    raise _fail(command, "swtpm closed the connection after %d of %d bytes"
                                % (len(received), need))
                received += chunk
        except TimeoutError:
            self.close()
            raise _fail(command, "no complete reply within %.1fs (swtpm busy, or another "
                        "client such as QEMU holds the control channel)" % self.timeout) from None
        except OSError as exc:
            self.close()
            raise _fail(command, "I/O error on control socket: %s"
                        % (exc.strerror or type(exc).__name__)) from None
        except exception.CtrlChannelError:
            self.close()
            raise
        data = bytes(received)
        if command is not Command.GET_CAPABILITY and _U32.unpack_from(data)[0] != TPM_SUCCESS:
            # Unread header bytes may follow an error: never reuse the stream.
            self.close()
        return data

    def get_capability(self) -> int:
        return parse_capability(self._transact(Command.GET_CAPABILITY,
                                               encode_request(Command.GET_CAPABILITY)))

    def init(self, delete_volatile: bool = False) -> None:
        parse_result(Command.INIT, self._transact(Command.INIT, encode_init(delete_volatile)))

    def shutdown(self) -> None:
        """Terminate the swtpm process (it replies first)."""
        parse_result(Command.SHUTDOWN, self._transact(Command.SHUTDOWN,
                                                      encode_request(Command.SHUTDOWN)))
        self.close()

    def stop(self) -> None:
        parse_result(Command.STOP, self._transact(Command.STOP, encode_request(Command.STOP)))

    def get_config(self) -> int:
        return parse_config(self._transact(Command.GET_CONFIG, encode_request(Command.GET_CONFIG)))

    def store_volatile(self) -> None:
        parse_result(Command.STORE_VOLATILE,
                     self._transact(Command.STORE_VOLATILE, encode_request(Command.STORE_VOLATILE)))

    def get_stateblob(self, blob_type: BlobType, *, decrypted: bool = True) -> StateBlob:
        """Read one blob; the TPM must be running.

        Reading the volatile blob makes swtpm store it and then delete the
        volatile state file. With ``--migration-key`` the blob is always
        encrypted under that key, whatever ``decrypted`` says; ``decrypted``
        only strips the at-rest layer so a target with another at-rest key
        can take it.
        """
        data = self._transact(Command.GET_STATEBLOB,
                              encode_get_stateblob(blob_type, decrypted=decrypted))
        return parse_stateblob(blob_type, data, max_size=self.max_blob_size)

    def set_stateblob(self, blob_type: BlobType, data: bytes, flags: int = 0) -> None:
        """Set one blob; the TPM must be stopped. It is used at the next INIT."""
        request = encode_set_stateblob(blob_type, data, flags, max_size=self.max_blob_size)
        parse_result(Command.SET_STATEBLOB, self._transact(Command.SET_STATEBLOB, request))

    def set_locality(self, locality: int) -> None:
        parse_result(Command.SET_LOCALITY,
                     self._transact(Command.SET_LOCALITY, encode_set_locality(locality)))

    def get_info(self, flags: int) -> str:
        return parse_info(self._transact(Command.GET_INFO, encode_get_info(flags)))
