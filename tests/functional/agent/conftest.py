"""Fixtures for functional tests of the swtpm layer (real swtpm processes).

Every swtpm started through ``swtpm_factory`` is stopped by pid in the
fixture finalizer, also when the test failed; socket dirs are short paths
under /tmp (unix socket paths are limited to 107 bytes).
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vtpcm_agent import association, instances
from vtpcm_agent.keystore import DevKeyFileHostKey, KeyStore
from vtpcm_agent.swtpm import process, uidprocs


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="vt", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def held_fd_scans(monkeypatch: pytest.MonkeyPatch) -> list[frozenset[int]]:
    """The uids each held-fd scan of ``/proc/*/fd`` covered while the test
    ran (``uidprocs._defuse_held``, run for real), in order."""
    scans: list[frozenset[int]] = []
    real = uidprocs._defuse_held

    def counted(uids: frozenset[int], deadline: float | None = None) -> Counter[int]:
        scans.append(uids)
        return real(uids, deadline)

    monkeypatch.setattr(uidprocs, "_defuse_held", counted)
    return scans


def _make_paths(base: Path, name: str, data_socket: bool = True) -> process.SwtpmPaths:
    run = base / name
    run.mkdir(exist_ok=True)
    state = base / ("state-" + name)
    if data_socket:
        return process.SwtpmPaths.for_data_socket(state, run / "tpm", run / "pid", run / "log")
    return process.SwtpmPaths(state, run / "ctrl", run / "pid", run / "log")


@pytest.fixture
def swtpm_paths(short_dir: Path) -> Callable[..., process.SwtpmPaths]:
    """``make(name, data_socket=True)``: paths under ``short_dir``; state in state-<name>.

    With a data socket, the control socket is ``<data_socket>.ctrl`` (tpm2-tss TCTI rule).
    """

    def make(name: str, data_socket: bool = True) -> process.SwtpmPaths:
        return _make_paths(short_dir, name, data_socket)

    return make


def _kill_hard(pid: int, paths: process.SwtpmPaths) -> None:
    """Last resort when process.stop itself failed: SIGKILL by pid, bounded wait."""
    if not process._is_our_swtpm(pid, paths):
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and process._is_our_swtpm(pid, paths):
        time.sleep(0.02)


@pytest.fixture
def swtpm_factory() -> Iterator[Callable[..., int]]:
    """``start(paths, at_rest_key, migration_key, **kw) -> pid``; all stopped at teardown."""
    started: list[tuple[int, process.SwtpmPaths]] = []

    def start(paths: process.SwtpmPaths, at_rest_key: bytes, migration_key: bytes,
              **kwargs: object) -> int:
        pid = process.start(paths, at_rest_key, migration_key, **kwargs)  # type: ignore[arg-type]
        started.append((pid, paths))
        return pid

    def track(pid: int, paths: process.SwtpmPaths) -> None:
        started.append((pid, paths))

    start.track = track  # type: ignore[attr-defined]
    try:
        yield start
    finally:
        for pid, paths in reversed(started):
            try:
                process.stop(pid, paths, timeout=6.0)
            finally:
                _kill_hard(pid, paths)


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[instances.InstanceManager]:
    """An instance manager on a real association list and key store (no
    swtpm runs: the tests only record and key their vTPCMs)."""
    settings = instances.AgentSettings(host="discard-host", state_root=tmp_path / "state",
                                       run_dir=tmp_path / "run", create_ek=False)
    settings.state_root.mkdir()
    assoc = association.AssociationList(settings.state_root / "associations.sqlite")
    keys = KeyStore(settings.state_root / "keys", DevKeyFileHostKey(tmp_path / "hostkey"))
    try:
        yield instances.InstanceManager(settings, assoc, keys)
    finally:
        assoc.close()
