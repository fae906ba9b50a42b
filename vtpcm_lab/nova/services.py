"""Processes of the real-Nova lab: started by pid, stopped by process group.

Each service runs in a session of its own (gunicorn's workers, nova-compute's
helpers share its process group), with a pid file, so that ``stop`` and the
next ``up`` after a crash find and kill every one of them: SIGTERM, a bounded
wait, then SIGKILL (nova-compute in native-thread mode ignores SIGTERM).
"""

import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from oslo_log import log as logging

from vtpcm_lab import hosts
from vtpcm_lab.exception import LabError

LOG = logging.getLogger(__name__)
STOP_TIMEOUT = 10.0


class Service:
    """One service process and its log; ``pid_dir`` survives a crash of the caller."""

    def __init__(self, name: str, argv: Sequence[str], log_file: Path, pid_dir: Path,
                 env: Mapping[str, str] | None = None, cwd: Path | None = None,
                 stop_timeout: float = STOP_TIMEOUT) -> None:
        self.name = name
        self.stop_timeout = stop_timeout
        self.argv = list(argv)
        self.log_file = log_file
        self.pid_file = pid_dir / ("%s.pid" % name)
        self.env = dict(env or {})
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def __repr__(self) -> str:
        return "Service(%r, pid=%s)" % (self.name, self.pid)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> None:
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=self.env, cwd=str(self.cwd or "/"), start_new_session=True)
        self.started_at = time.monotonic()
        self.pid_file.write_text("%d\n" % self.proc.pid)
        LOG.info("Started %(name)s, pid %(pid)d", {"name": self.name, "pid": self.proc.pid})

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check(self) -> None:
        """Raise with the log's tail if the process is gone."""
        if self.proc is not None and self.proc.poll() is not None:
            raise LabError(reason="%s exited with %s; log %s ends:\n%s" % (
                self.name, self.proc.returncode, self.log_file, tail(self.log_file)))

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc.pid, self.stop_timeout)
            try:
                self.proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                LOG.warning("%(name)s (pid %(pid)d) survived SIGKILL",
                            {"name": self.name, "pid": self.proc.pid})
            self.proc = None
        self.pid_file.unlink(missing_ok=True)


def stop_all(services: Sequence[Service]) -> None:
    """Stop ``services`` at once: SIGTERM to every group, then SIGKILL each group
    still alive after its own ``stop_timeout``; one bounded wait for all."""
    groups = {s.proc.pid: s for s in services if s.proc is not None}
    for pid in groups:
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    started = time.monotonic()
    pending, killed = set(groups), set()
    while pending and time.monotonic() - started < STOP_TIMEOUT + 5.0:
        for pid in list(pending):
            if not _group_alive(pid):
                pending.discard(pid)
            elif pid not in killed and time.monotonic() - started >= groups[pid].stop_timeout:
                LOG.info("%(name)s ignored SIGTERM, killing it", {"name": groups[pid].name})
                killed.add(pid)
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pending.discard(pid)
        time.sleep(0.1)
    for svc in groups.values():
        svc.stop()  # reaps; a survivor gets a SIGTERM/SIGKILL round of its own


def stop_group(pid: int, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM the process group ``pid`` leads, wait (bounded), then SIGKILL it."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _group_alive(pid):
            return
        time.sleep(0.1)
    LOG.info("Process group %(pid)d ignored SIGTERM, killing it", {"pid": pid})
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and _group_alive(pid):
        time.sleep(0.05)


def _group_alive(pgid: int) -> bool:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path("/proc/%s/stat" % entry).read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def kill_leftovers(pid_dir: Path, marker: str) -> None:
    """SIGKILL the process groups of pid files whose process still runs a
    command line containing ``marker`` (a crashed run's services)."""
    if not pid_dir.is_dir():
        return
    for pid_file in pid_dir.glob("*.pid"):
        try:
            pid = int(pid_file.read_text().strip())
            cmdline = Path("/proc/%d/cmdline" % pid).read_bytes()
        except (OSError, ValueError):
            pid_file.unlink(missing_ok=True)
            continue
        if pid > 1 and marker.encode() in cmdline:
            LOG.info("Stopping leftover %(file)s (pid %(pid)d)",
                     {"file": pid_file.name, "pid": pid})
            stop_group(pid, timeout=2.0)
            hosts.kill_pid(pid, timeout=2.0)
        pid_file.unlink(missing_ok=True)


def run(argv: Sequence[str], log_file: Path, timeout: float,
        env: Mapping[str, str] | None = None) -> None:
    """Run a setup command to completion (bounded), its output appended to ``log_file``."""
    with open(log_file, "ab") as log:
        try:
            proc = subprocess.run(list(argv), stdin=subprocess.DEVNULL, stdout=log,
                                  stderr=subprocess.STDOUT, env=dict(env or os.environ),
                                  timeout=timeout, cwd="/", check=False)
        except subprocess.TimeoutExpired:
            raise LabError(reason="%s timed out after %.0f s, see %s"
                                     % (argv[1] if len(argv) > 1 else argv[0], timeout,
                                        log_file)) from None
    if proc.returncode:
        raise LabError(reason="%s failed (%d); log %s ends:\n%s" % (
            " ".join(os.path.basename(a) for a in argv[:3]), proc.returncode, log_file,
            tail(log_file)))


def wait_http(service: Service, url: str, timeout: float) -> None:
    """Until ``url`` answers any HTTP status; fail early if the service died."""
    deadline = time.monotonic() + timeout
    while True:
        service.check()
        try:
            with urllib.request.urlopen(url, timeout=2.0):  # noqa: S310 - lab URL
                return
        except urllib.error.HTTPError:
            return
        except (OSError, urllib.error.URLError):
            pass
        if time.monotonic() >= deadline:
            raise LabError(reason="%s did not answer %s within %.0f s; log %s:\n%s"
                                     % (service.name, url, timeout, service.log_file,
                                        tail(service.log_file)))
        time.sleep(0.3)


def tail(path: Path, size: int = 3000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            return f.read().decode(errors="replace")
    except OSError:
        return ""
