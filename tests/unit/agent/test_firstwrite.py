"""The first-write capture (``vtpcm_agent.swtpm.firstwrite``) on real inotify.

Files are written as swtpm 0.7.1 writes its permanent state (a temporary
file renamed over ``tpm2-00.permall``) into a temp dir; an injected opener
makes a second write land between the first write's event and its read,
which only the drain after the read can see.
"""

from __future__ import annotations

import os
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
