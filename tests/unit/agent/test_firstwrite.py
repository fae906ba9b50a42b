"""The first-write capture (``vtpcm_agent.swtpm.firstwrite``) on real inotify.

Files are written as swtpm 0.7.1 writes its permanent state (a temporary
file renamed over ``tpm2-00.permall``) into a temp dir; an injected opener
makes a second write land between the first write's event and its read,
which only the drain after the read can see.
"""

from __future__ import annotations

import os
import resource
import threading
from pathlib import Path

import pytest

from vtpcm_agent.swtpm import firstwrite, permall

NAME = firstwrite.PERMANENT_STATE_FILE
WAIT = 10.0


def _swtpm_write(state_dir: Path, data: bytes) -> None:
    """swtpm's way: TMP2-00.permall written and closed, then renamed."""
    tmp = state_dir / "TMP2-00.permall"
    tmp.write_bytes(data)
    os.rename(tmp, state_dir / NAME)


class _Outcomes:
    def __init__(self) -> None:
        self.seen: list[firstwrite.Capture] = []

    def __call__(self, capture: firstwrite.Capture) -> None:
        self.seen.append(capture)


def _watch(state_dir: Path, outcomes: _Outcomes,
           opener: firstwrite.Opener = firstwrite.read_state_file,
           **kwargs: float) -> firstwrite.FirstWriteWatch:
    return firstwrite.FirstWriteWatch(state_dir, outcomes, opener=opener,
                                      **kwargs).arm().start()  # type: ignore[arg-type]


def _done(watch: firstwrite.FirstWriteWatch) -> firstwrite.Capture:
    assert watch.done.wait(WAIT)
    assert watch.stop(WAIT)  # the thread ended
    assert watch.outcome is not None
    return watch.outcome


def test_the_first_write_is_captured_and_later_ones_leave_it(tmp_path: Path) -> None:
    outcomes = _Outcomes()
    watch = _watch(tmp_path, outcomes)
    (tmp_path / ".lock").write_bytes(b"")  # swtpm's lock file: ignored
    _swtpm_write(tmp_path, b"first")
    assert _done(watch) == firstwrite.Capture(b"first")
    _swtpm_write(tmp_path, b"second")
    assert outcomes.seen == [firstwrite.Capture(b"first")]
    assert "first" not in repr(watch.outcome)  # a repr never shows state bytes


def test_a_second_write_before_the_read_makes_the_capture_ambiguous(
        tmp_path: Path) -> None:
    """The opener runs after the first write's event and before the read:
    a second write there is what a guest's NV write right after the import
    would be. Seen failing with the drain after the read removed (the
    second write's bytes were then reported as the first)."""
    def late(path: Path) -> bytes:
        _swtpm_write(tmp_path, b"second")
        return firstwrite.read_state_file(path)

    outcomes = _Outcomes()
    watch = _watch(tmp_path, outcomes, opener=late)
    _swtpm_write(tmp_path, b"first")
    assert _done(watch) == firstwrite.ambiguous(
        "2 writes of tpm2-00.permall before the first could be read")
    assert outcomes.seen == [watch.outcome]


def test_a_direct_write_counts_as_a_write(tmp_path: Path) -> None:
    watch = _watch(tmp_path, _Outcomes())
    (tmp_path / NAME).write_bytes(b"direct")  # CLOSE_WRITE, no rename
    assert _done(watch) == firstwrite.Capture(b"direct")


def test_a_symlink_or_an_oversized_file_is_not_read(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"not the state")
    (tmp_path / "d1").mkdir()
    watch = _watch(tmp_path / "d1", _Outcomes())
    os.symlink(target, tmp_path / "d1" / "link")
    os.rename(tmp_path / "d1" / "link", tmp_path / "d1" / NAME)
    assert _done(watch) == firstwrite.ambiguous(
        "the first write could not be read: Too many levels of symbolic links")

    (tmp_path / "d2").mkdir()
    watch = _watch(tmp_path / "d2", _Outcomes())
    _swtpm_write(tmp_path / "d2", b"x" * (permall.MAX_FILE_SIZE + 1))
    assert _done(watch) == firstwrite.ambiguous(
        "the first write could not be read: tpm2-00.permall has %d bytes, more than the "
        "%d a state file may have" % (permall.MAX_FILE_SIZE + 1, permall.MAX_FILE_SIZE))


def test_stop_ends_the_thread_without_an_outcome(tmp_path: Path) -> None:
    outcomes = _Outcomes()
    watch = _watch(tmp_path, outcomes)
    assert watch.alive()
    assert watch.stop(WAIT) and not watch.alive()
    _swtpm_write(tmp_path, b"late")
    assert outcomes.seen == [] and watch.outcome is None


def test_a_watch_ends_after_its_lifetime(tmp_path: Path) -> None:
    watch = _watch(tmp_path, _Outcomes(), lifetime=0.2)
    assert _done(watch) == firstwrite.ambiguous(
        "no write seen within the watch's lifetime of 0 s")


def test_the_removed_state_dir_ends_the_watch(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    watch = _watch(state_dir, _Outcomes())
    state_dir.rmdir()
    assert _done(watch) == firstwrite.ambiguous(
        "the state dir was removed or moved before a write")


def test_arming_a_missing_dir_fails_at_once(tmp_path: Path) -> None:
    with pytest.raises(OSError) as err:
        firstwrite.FirstWriteWatch(tmp_path / "missing", _Outcomes()).arm()
    assert "inotify_add_watch %s: No such file or directory" % (tmp_path / "missing") \
        in str(err.value)


def test_tally_counts_writes_of_the_name_only() -> None:
    tally = firstwrite.Tally()
    tally.add(firstwrite.IN_MOVED_TO, "TMP2-00.permall")
    tally.add(firstwrite.IN_CLOSE_WRITE, ".lock")
    tally.add(firstwrite.IN_CREATE, NAME)
    tally.add(firstwrite.IN_MOVED_TO, NAME)
    assert tally.verdict(b"s") == firstwrite.Capture(b"s")
    tally.add(firstwrite.IN_Q_OVERFLOW, "")
    assert tally.verdict(b"s") == firstwrite.ambiguous(
        "the inotify queue overflowed: writes may have been missed")


def test_many_watches_end(tmp_path: Path) -> None:
    """One thread per incoming migration, each ended by stop."""
    before = threading.active_count()
    watches = []
    for i in range(20):
        (tmp_path / str(i)).mkdir()
        watches.append(_watch(tmp_path / str(i), _Outcomes()))
    assert all(w.stop(WAIT) for w in watches)
    assert threading.active_count() == before


def _open_lock(state_dir: Path) -> None:
    """What swtpm 0.7.1 does to its storage on every SET_STATEBLOB and INIT
    (an import, or a TPM reset): opens ``.lock`` (and writes it)."""
    fd = os.open(state_dir / firstwrite.LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"1")
    finally:
        os.close(fd)


def _captured(tmp_path: Path, outcomes: _Outcomes) -> firstwrite.FirstWriteWatch:
    watch = _watch(tmp_path, outcomes)
    _open_lock(tmp_path)  # the import's own opens come before its write
    _swtpm_write(tmp_path, b"first")
    assert watch.done.wait(WAIT)
    assert outcomes.seen == [firstwrite.Capture(b"first")]
    return watch


def test_the_storage_opened_after_the_capture_supersedes_it(tmp_path: Path) -> None:
    """A second import (or a TPM reset) after the capture: the watch goes
    on after the first write, and a sync drains what is queued at once.
    Seen failing before the watch went on (it ended at the capture)."""
    outcomes = _Outcomes()
    watch = _captured(tmp_path, outcomes)
    _open_lock(tmp_path)
    assert watch.sync(WAIT)
    assert outcomes.seen == [firstwrite.Capture(b"first"),
                             firstwrite.ambiguous(firstwrite.SUPERSEDED)]
    assert watch.outcome == firstwrite.ambiguous(firstwrite.SUPERSEDED)
    assert watch.stop(WAIT) and not watch.alive()


def test_guest_writes_after_the_capture_do_not_supersede_it(tmp_path: Path) -> None:
    """Positive control: NV writes never touch ``.lock``."""
    outcomes = _Outcomes()
    watch = _captured(tmp_path, outcomes)
    for i in range(3):
        _swtpm_write(tmp_path, b"nv %d" % i)
    assert watch.sync(WAIT) and watch.alive()
    assert outcomes.seen == [firstwrite.Capture(b"first")]
    assert watch.stop(WAIT)


def test_the_storage_opened_between_the_write_and_its_read_supersedes_it(
        tmp_path: Path) -> None:
    def late(path: Path) -> bytes:
        _open_lock(tmp_path)
        return firstwrite.read_state_file(path)

    watch = _watch(tmp_path, _Outcomes(), opener=late)
    _swtpm_write(tmp_path, b"first")
    assert _done(watch) == firstwrite.ambiguous(firstwrite.SUPERSEDED)


def test_a_watch_that_ends_after_the_capture_marks_it(tmp_path: Path) -> None:
    """Its lifetime over, the watch can no longer exclude a later import."""
    outcomes = _Outcomes()
    watch = _watch(tmp_path, outcomes, lifetime=1.0)
    _swtpm_write(tmp_path, b"first")
    assert watch.done.wait(WAIT)
    assert watch._thread is not None
    watch._thread.join(WAIT)  # not stopped: it ends on its own
    assert not watch.alive()
    assert outcomes.seen == [firstwrite.Capture(b"first"), firstwrite.ambiguous(
        "the watch ended after the capture (its lifetime of 1 s was over): a later "
        "import cannot be excluded")]


def _inotify_fds() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink("/proc/self/fd/" + fd) == "anon_inode:inotify"
        except OSError:
            pass
    return count


def test_a_failed_arm_leaks_no_fd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Seen failing before the fix: one inotify fd leaked per failed pipe2."""
    before = _inotify_fds()

    def no_fds(flags: int) -> tuple[int, int]:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(os, "pipe2", no_fds)
    for _ in range(3):
        with pytest.raises(OSError, match="Too many open files"):
            firstwrite.FirstWriteWatch(tmp_path, _Outcomes()).arm()
    assert _inotify_fds() == before


def test_a_watch_on_an_fd_above_1024_works(tmp_path: Path) -> None:
    """select() cannot wait on an fd >= FD_SETSIZE (1024); an agent with
    many swtpm and RPC sockets gets such fds. Seen failing with select
    (every capture ambiguous: "filedescriptor out of range in select()")."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip("RLIMIT_NOFILE hard limit %d is below 1200" % hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    fillers: list[int] = []
    try:
        while not fillers or fillers[-1] < 1030:
            fillers.append(os.open("/dev/null", os.O_RDONLY))
        outcomes = _Outcomes()
        watch = _watch(tmp_path, outcomes)
        assert watch._fd >= 1024
        _swtpm_write(tmp_path, b"first")
        assert _done(watch) == firstwrite.Capture(b"first")
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_settled_watch_ends_with_its_capture_standing(tmp_path: Path) -> None:
    """After the agent's own import (no other may follow), the guest's start
    (CMD_INIT opens the storage) must not supersede the capture."""
    outcomes = _Outcomes()
    watch = _watch(tmp_path, outcomes)
    assert not watch.settle(WAIT)  # nothing captured yet: it goes on
    _swtpm_write(tmp_path, b"first")
    assert watch.settle(WAIT) and watch.settled
    assert watch._thread is not None
    watch._thread.join(WAIT)
    assert not watch.alive()
    _open_lock(tmp_path)
    assert watch.sync(WAIT)
    assert outcomes.seen == [firstwrite.Capture(b"first")] and watch.settled
