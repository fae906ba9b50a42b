"""A TCP relay to RabbitMQ that the test can cut: what a broker restart
looks like to the daemons behind it (every connection dropped, new ones
refused until it is back), without restarting the broker everyone on this
machine shares."""

from __future__ import annotations

import contextlib
import select
import socket
import threading


class BrokerRelay:
    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.server.getsockname()[1]
        self.up = threading.Event()
        self.up.set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def start(self) -> BrokerRelay:
        self._thread.start()
        return self

    def cut(self) -> None:
        """The broker goes away: every connection drops, new ones are refused."""
        self.up.clear()
        with self._lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            self._conns.clear()

    def restore(self) -> None:
        self.up.set()

    def stop(self) -> None:
        self._stop.set()
        self.cut()
        self.server.close()
        self._thread.join(timeout=10)

    def _accept(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.server], [], [], 0.2)
            if not ready:
                continue
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if not self.up.is_set():
                client.close()  # refused while "restarting"
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            # the 5 s bound only the connect: left on the socket it cut every
            # connection idle for 5 s (oslo.messaging heartbeats every 60 s),
            # so all daemons reconnected every ~6 s and a call sent during a
            # reconnect waited past the RPC timeout; cut() still wakes a pump
            # blocked in recv by shutting the socket down
            upstream.settimeout(None)
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
