"""Neutron stand-in: empty answers to the read-only calls of networkless servers.

Nova calls Neutron even for ``--nic none`` servers (extensions, networks,
ports and security groups of the instance, in server show and in live
migration). The lab has no network service: this one answers every GET of a
collection with an empty list, refuses anything else (404, as Neutron does for
a missing resource) and logs every call as a JSON line, so the tests can
assert that Nova made only the read-only calls it is expected to make.

Run as ``python -m vtpcm_lab.nova.neutron --port PORT --log FILE``.
"""

import argparse
import json
import threading
import time
import urllib.parse
from http import server
from pathlib import Path
from typing import Any

API_PREFIX = "/v2.0"


def answer(method: str, path: str) -> tuple[int, dict[str, Any]]:
    """(status, body) for one request; pure so it can be tested without a socket."""
    parts = [p for p in path.split("/") if p]
    if method != "GET":
        return 404, {"NeutronError": {"type": "HTTPNotFound",
                                      "message": "read-only stand-in: %s refused" % method,
                                      "detail": ""}}
    if not parts:
        return 200, {"versions": [{"id": "v2.0", "status": "CURRENT",
                                   "links": [{"rel": "self", "href": API_PREFIX + "/"}]}]}
    if parts[0] != API_PREFIX.strip("/"):
        return 404, {"NeutronError": {"type": "HTTPNotFound", "message": "no such API",
                                      "detail": ""}}
    if len(parts) == 1:
        return 200, {"resources": []}
    if len(parts) == 2:
        collection = parts[1].removesuffix(".json").replace("-", "_")
        return 200, {collection: []}
    return 404, {"NeutronError": {"type": "HTTPNotFound",
                                  "message": "%s not found" % "/".join(parts[1:3]),
                                  "detail": ""}}


class _Handler(server.BaseHTTPRequestHandler):
    server_version = "vtpcm-lab-neutron/1"
    log_lock = threading.Lock()
    log_path: Path

    def _handle(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)  # drained, never logged: it is not ours to keep
        status, body = answer(self.command, url.path)
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        record = {"time": time.time(), "method": self.command, "path": url.path,
                  "query": url.query, "status": status}
        with self.log_lock, open(self.log_path, "a") as log:
            log.write(json.dumps(record) + "\n")

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _handle

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        """Silence the per-request stderr line: the JSON log has it."""


def read_calls(log_path: Path) -> list[dict[str, Any]]:
    """The calls logged so far (for the tests and the demo)."""
    if not log_path.exists():
        return []
    return [json.loads(line) for line in log_path.read_text().splitlines() if line]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log", type=Path, required=True)
    args = parser.parse_args(argv)
    _Handler.log_path = args.log
    httpd = server.ThreadingHTTPServer(("127.0.0.1", args.port), _Handler)
    httpd.serve_forever()


if __name__ == "__main__":
    main()
